//! decode(encode(pages)) == pages, over several rounds of changes, for every
//! compression; and damaged frames are refused without touching memory.

use proptest::prelude::*;
use tern_pagecodec::{Compression, Decoder, Encoder, EncoderConfig, Tag, PAGE_SIZE};

#[derive(Clone, Debug)]
enum Change {
    Random(u64),
    Zero,
    CopyOf(usize),
    Tweak { seed: u64, bytes: usize },
}

fn fill_random(page: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in page.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn apply(mem: &mut [u8], page: usize, change: &Change) {
    let pages = mem.len() / PAGE_SIZE;
    match change {
        Change::Random(seed) => fill_random(&mut mem[page * PAGE_SIZE..][..PAGE_SIZE], *seed),
        Change::Zero => mem[page * PAGE_SIZE..][..PAGE_SIZE].fill(0),
        Change::CopyOf(other) => {
            let other = other % pages;
            let src = mem[other * PAGE_SIZE..][..PAGE_SIZE].to_vec();
            mem[page * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&src);
        }
        Change::Tweak { seed, bytes } => {
            let mut x = *seed | 1;
            for _ in 0..*bytes {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 33) as usize % PAGE_SIZE;
                mem[page * PAGE_SIZE + off] ^= (x >> 8) as u8 | 1;
            }
        }
    }
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        any::<u64>().prop_map(Change::Random),
        Just(Change::Zero),
        any::<usize>().prop_map(Change::CopyOf),
        (any::<u64>(), 1usize..300).prop_map(|(seed, bytes)| Change::Tweak { seed, bytes }),
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Lz4),
        Just(Compression::Zstd(1)),
        Just(Compression::Zstd(3)),
    ]
}

/// Sends the dirty pages of `src` in frames of `per_frame` pages.
fn send(
    enc: &mut Encoder,
    dec: &mut Decoder,
    src: &[u8],
    dst: &mut [u8],
    dirty: &[usize],
    per_frame: usize,
) {
    for chunk in dirty.chunks(per_frame.max(1)) {
        let mut frame = Vec::new();
        enc.encode_frame(
            chunk
                .iter()
                .map(|&p| (p as u64, &src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])),
            &mut frame,
        );
        dec.decode_frame(&frame, dst).expect("own frames decode");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn rounds_of_changes_round_trip(
        pages in 1usize..48,
        initial in proptest::collection::vec(change(), 48),
        rounds in proptest::collection::vec(proptest::collection::vec((any::<usize>(), change()), 0..24), 1..5),
        comp in compression(),
        cache in prop_oneof![Just(0usize), Just(4), Just(64)],
        dedup in prop_oneof![Just(0usize), Just(1 << 16)],
        per_frame in 1usize..20,
    ) {
        let mut src = vec![0u8; pages * PAGE_SIZE];
        for (p, c) in initial.iter().take(pages).enumerate() {
            apply(&mut src, p, c);
        }
        let mut dst = vec![0xAAu8; pages * PAGE_SIZE];
        let mut enc = Encoder::new(EncoderConfig { compression: comp, xor_cache_pages: cache, dedup_entries: dedup });
        let mut dec = Decoder::new(pages as u64);
        let all: Vec<usize> = (0..pages).collect();
        send(&mut enc, &mut dec, &src, &mut dst, &all, per_frame);
        prop_assert!(src == dst, "round 1 differs");
        for round in rounds {
            let mut dirty: Vec<usize> = vec![];
            for (p, c) in round {
                let p = p % pages;
                apply(&mut src, p, &c);
                if !dirty.contains(&p) { dirty.push(p); }
            }
            send(&mut enc, &mut dec, &src, &mut dst, &dirty, per_frame);
            prop_assert!(src == dst, "later round differs");
        }
    }

    #[test]
    fn damaged_frames_never_panic_or_write(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<usize>()),
        comp in compression(),
    ) {
        let pages = 8usize;
        let mut src = vec![0u8; pages * PAGE_SIZE];
        for p in 0..pages {
            apply(&mut src, p, &[Change::Random(p as u64 + 1), Change::Zero, Change::CopyOf(0)][p % 3]);
        }
        let mut enc = Encoder::new(EncoderConfig { compression: comp, ..Default::default() });
        let mut dec = Decoder::new(pages as u64);
        let mut dst = vec![0u8; pages * PAGE_SIZE];
        let mut frame = Vec::new();
        enc.encode_frame((0..pages).map(|p| (p as u64, &src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])), &mut frame);
        dec.decode_frame(&frame, &mut dst).unwrap();
        // Second round: deltas and duplicates against what was sent.
        apply(&mut src, 0, &Change::Tweak { seed: 9, bytes: 20 });
        apply(&mut src, 5, &Change::CopyOf(2));
        let mut frame = Vec::new();
        enc.encode_frame([0u64, 5, 7].iter().map(|&p| (p, &src[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE])), &mut frame);
        for (at, x) in flips {
            let i = at % frame.len();
            frame[i] ^= x | 1;
        }
        if let Some(c) = cut {
            frame.truncate(c % frame.len());
        }
        let before = dst.clone();
        if dec.decode_frame(&frame, &mut dst).is_err() {
            prop_assert!(before == dst, "a refused frame wrote memory");
        }
    }
}

fn frame_of(entries: &[(u64, u8, &[u8])]) -> Vec<u8> {
    let mut f = b"TPG1".to_vec();
    f.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (page, tag, payload) in entries {
        f.extend_from_slice(&page.to_le_bytes());
        f.push(*tag);
        f.extend_from_slice(payload);
    }
    f
}

#[test]
fn hand_made_bad_frames_get_clear_errors() {
    let mut dec = Decoder::new(4);
    let mut mem = vec![7u8; 4 * PAGE_SIZE];
    let check = |dec: &mut Decoder, mem: &mut Vec<u8>, f: Vec<u8>, want: &str| {
        let e = dec.decode_frame(&f, mem).unwrap_err().to_string();
        assert!(e.contains(want), "got `{e}`, wanted `{want}`");
        assert!(mem.iter().all(|&b| b == 7), "memory untouched");
    };
    check(&mut dec, &mut mem, b"XXXX\0\0\0\0".to_vec(), "bad magic");
    let mut f = b"TPG1".to_vec();
    f.extend_from_slice(&u32::MAX.to_le_bytes());
    check(&mut dec, &mut mem, f, "more than the limit");
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(9, 0, &[])]),
        "outside guest memory",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, 0, &[]), (1, 0, &[])]),
        "twice",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, 42, &[])]),
        "unknown encoding tag 42",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::XorDelta as u8, &[1, 0, 0])]),
        "never received",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::Duplicate as u8, &2u64.to_le_bytes())]),
        "never received",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::Raw as u8, &[0; 100])]),
        "truncated",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::Lz4 as u8, &[4, 0, 1, 2, 3, 4])]),
        "lz4",
    );
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::Zstd as u8, &[2, 0, 1, 2])]),
        "zstd",
    );
    // A length that lies about the payload.
    check(
        &mut dec,
        &mut mem,
        frame_of(&[(1, Tag::Lz4 as u8, &[0xff, 0x0f, 1])]),
        "truncated",
    );
    let mut ok = frame_of(&[(1, 0, &[])]);
    ok.push(0);
    check(&mut dec, &mut mem, ok, "after the last entry");
    // A good frame, then the wrong memory size.
    let good = frame_of(&[(1, 0, &[])]);
    assert!(dec.decode_frame(&good, &mut mem).is_ok());
    assert!(dec.decode_frame(&good, &mut vec![0u8; PAGE_SIZE]).is_err());
}

#[test]
fn encodings_are_chosen_as_documented() {
    let pages = 4;
    let mut src = vec![0u8; pages * PAGE_SIZE];
    fill_random(&mut src[PAGE_SIZE..2 * PAGE_SIZE], 5);
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
        .iter()
        .cycle()
        .take(PAGE_SIZE)
        .copied()
        .collect();
    src[2 * PAGE_SIZE..3 * PAGE_SIZE].copy_from_slice(&text);
    src[3 * PAGE_SIZE..].copy_from_slice(&text);
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut dec = Decoder::new(pages as u64);
    let mut dst = vec![0u8; pages * PAGE_SIZE];
    let mut f = Vec::new();
    let s = enc.encode_frame(
        (0..pages).map(|p| (p as u64, &src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])),
        &mut f,
    );
    assert_eq!(
        (
            s.count(Tag::Zero),
            s.count(Tag::Raw),
            s.count(Tag::Lz4),
            s.count(Tag::Duplicate)
        ),
        (1, 1, 1, 1)
    );
    dec.decode_frame(&f, &mut dst).unwrap();
    // Change a few bytes of the random page: a delta, far smaller than the page.
    src[PAGE_SIZE + 100] ^= 1;
    src[PAGE_SIZE + 3000] ^= 1;
    let mut f = Vec::new();
    let s = enc.encode_frame([(1u64, &src[PAGE_SIZE..2 * PAGE_SIZE])], &mut f);
    assert_eq!(s.count(Tag::XorDelta), 1);
    assert!(s.bytes_out < 40, "{}", s.bytes_out);
    dec.decode_frame(&f, &mut dst).unwrap();
    assert_eq!(src, dst);
}

#[test]
fn pages_sent_without_caching_are_no_delta_base_and_forget_an_old_one() {
    let mut enc = Encoder::new(EncoderConfig {
        compression: Compression::None,
        ..EncoderConfig::default()
    });
    let mut dec = Decoder::new(1);
    let mut dst = vec![0u8; PAGE_SIZE];
    let mut page = vec![0u8; PAGE_SIZE];
    fill_random(&mut page, 9);
    let mut send = |enc: &mut Encoder, page: &[u8]| {
        let mut f = Vec::new();
        let s = enc.encode_frame([(0u64, page)], &mut f);
        dec.decode_frame(&f, &mut dst).unwrap();
        assert_eq!(dst, page);
        s
    };
    // Sent once with caching on: the next change is a delta.
    send(&mut enc, &page);
    page[7] ^= 1;
    assert_eq!(send(&mut enc, &page).count(Tag::XorDelta), 1);
    // With caching off the cached copy still serves once, then is stale
    // and dropped: the next change goes whole (a delta against it would
    // be wrong).
    enc.set_caching(false);
    page[8] ^= 1;
    assert_eq!(send(&mut enc, &page).count(Tag::XorDelta), 1);
    page[11] ^= 1;
    assert_eq!(send(&mut enc, &page).count(Tag::Raw), 1);
    enc.set_caching(true);
    page[9] ^= 1;
    assert_eq!(send(&mut enc, &page).count(Tag::Raw), 1);
    page[10] ^= 1;
    assert_eq!(send(&mut enc, &page).count(Tag::XorDelta), 1);
}

#[test]
fn a_staged_frame_names_its_fresh_runs_and_writes_nothing_until_committed() {
    let pages = 8;
    let mut src = vec![0u8; pages * PAGE_SIZE];
    for p in [0usize, 1, 3, 5] {
        fill_random(&mut src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], p as u64 + 1);
    }
    let mut enc = Encoder::new(EncoderConfig {
        compression: Compression::None,
        ..EncoderConfig::default()
    });
    let mut f = Vec::new();
    // Page 2 is zero: left unwritten, so no run pre-faults it.
    enc.encode_frame(
        [0usize, 1, 2, 3, 5].map(|p| (p as u64, &src[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])),
        &mut f,
    );
    let mut dec = Decoder::new(pages as u64);
    let mut dst = vec![0u8; pages * PAGE_SIZE];
    {
        let staged = dec.stage(&f, &dst).unwrap();
        assert_eq!(staged.fresh_runs(), &[(0, 2), (3, 1), (5, 1)]);
        let got: Vec<(u64, Vec<u8>)> = staged.pages().map(|(p, b)| (p, b.to_vec())).collect();
        assert_eq!(got.len(), 5);
        for (p, b) in got {
            assert_eq!(b, src[p as usize * PAGE_SIZE..][..PAGE_SIZE], "page {p}");
        }
        // Dropped: nothing written, nothing received.
    }
    assert!(dst.iter().all(|&b| b == 0));
    assert!(!dec.has(0));
    dec.stage(&f, &dst).unwrap().commit(&mut dst).unwrap();
    assert_eq!(dst, src);
    assert!(dec.has(0) && dec.has(5) && !dec.has(4));
    // Sent again: nothing is fresh any more.
    src[7] ^= 1;
    let mut f = Vec::new();
    enc.encode_frame([(0u64, &src[..PAGE_SIZE])], &mut f);
    assert!(dec.stage(&f, &dst).unwrap().fresh_runs().is_empty());
    // Memory of another size is refused at commit too.
    let staged = dec.stage(&f, &dst).unwrap();
    assert!(staged.commit(&mut vec![0u8; PAGE_SIZE]).is_err());
}

#[test]
fn a_duplicate_of_a_raw_page_in_the_same_frame_is_its_content() {
    let mut page = vec![0u8; PAGE_SIZE];
    fill_random(&mut page, 11);
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut f = Vec::new();
    let s = enc.encode_frame([(0u64, &page[..]), (2, &page[..])], &mut f);
    assert_eq!((s.count(Tag::Raw), s.count(Tag::Duplicate)), (1, 1));
    let mut dec = Decoder::new(3);
    let mut dst = vec![0u8; 3 * PAGE_SIZE];
    dec.decode_frame(&f, &mut dst).unwrap();
    assert_eq!(dst[..PAGE_SIZE], page[..]);
    assert_eq!(dst[2 * PAGE_SIZE..], page[..]);
    assert!(dst[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
}

#[test]
fn hashed_frames_find_duplicates_by_the_callers_hash() {
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    fill_random(&mut a, 21);
    fill_random(&mut b, 22);
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut f = Vec::new();
    // Same content, told apart by their hashes: both sent whole...
    let s = enc.encode_frame_hashed([(0u64, &a[..], 1u128), (1, &a[..], 2)], &mut f);
    assert_eq!(s.count(Tag::Duplicate), 0);
    // ...and a page with a known hash goes as a reference to its holder.
    let s = enc.encode_frame_hashed([(2u64, &b[..], 2u128)], &mut f);
    assert_eq!(s.count(Tag::Duplicate), 1);
}
