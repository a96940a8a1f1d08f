//! Per-core codec throughput. Memory is warm (written before timing).
//! Run: `cargo bench -p tern-pagecodec --bench codec`.
//!
//! - zero_scan: 64 MiB of zero pages through `is_zero_page`;
//! - xor_delta: 16 MiB of random pages with 5% of bytes changed (scattered),
//!   encoded as XOR deltas against the previous copy;
//! - compress/{lz4,zstd1,zstd3}: a synthetic guest image (60% zero, 20%
//!   text-like, 20% random pages); the ratio is printed once per codec.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use tern_pagecodec::{is_zero_page, Compression, Encoder, EncoderConfig, PAGE_SIZE};

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

fn guest_image(pages: usize) -> Vec<u8> {
    let mut rnd = xorshift(42);
    let words = [
        "kernel", "page", "memory", "struct", "return", "the", "int", "void", "if", "for", "0x0",
        "NULL", "lock", "unlock", "tern", "migrate", "\n", " ", "{", "}",
    ];
    let mut img = vec![0u8; pages * PAGE_SIZE];
    for p in 0..pages {
        let page = &mut img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        match p % 10 {
            0..=5 => {}
            6 | 7 => {
                let mut i = 0;
                while i < PAGE_SIZE {
                    let w = words[(rnd() % words.len() as u64) as usize].as_bytes();
                    let n = w.len().min(PAGE_SIZE - i);
                    page[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            _ => page.iter_mut().for_each(|b| *b = rnd() as u8),
        }
    }
    img
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pagecodec");
    g.sample_size(20)
        .measurement_time(std::time::Duration::from_secs(3));

    // Written, so the pages are real and resident (not the shared zero page).
    // (black_box keeps the compiler from turning this into calloc.)
    let mut zeros = vec![1u8; 64 << 20];
    black_box(&mut zeros);
    zeros.fill(0);
    black_box(&mut zeros);
    g.throughput(Throughput::Bytes(zeros.len() as u64));
    g.bench_function("zero_scan", |b| {
        b.iter(|| {
            let n = zeros
                .chunks_exact(PAGE_SIZE)
                .filter(|p| is_zero_page(black_box(p)))
                .count();
            black_box(n)
        })
    });

    let pages = 4096;
    let mut rnd = xorshift(7);
    let a: Vec<u8> = (0..pages * PAGE_SIZE).map(|_| rnd() as u8).collect();
    let mut bv = a.clone();
    for p in 0..pages {
        for _ in 0..PAGE_SIZE * 5 / 100 {
            let off = (rnd() % PAGE_SIZE as u64) as usize;
            bv[p * PAGE_SIZE + off] ^= (rnd() as u8) | 1;
        }
    }
    let mut enc = Encoder::new(EncoderConfig {
        compression: Compression::None,
        xor_cache_pages: pages,
        dedup_entries: 0,
    });
    let mut out = Vec::with_capacity(pages * PAGE_SIZE * 2);
    let frame = |enc: &mut Encoder, img: &[u8], out: &mut Vec<u8>| {
        out.clear();
        let mut st = tern_pagecodec::EncodeStats::default();
        for chunk in (0..pages).collect::<Vec<_>>().chunks(1024) {
            st.add(
                &enc.encode_frame(
                    chunk
                        .iter()
                        .map(|&p| (p as u64, &img[p * PAGE_SIZE..(p + 1) * PAGE_SIZE])),
                    out,
                ),
            );
        }
        st
    };
    frame(&mut enc, &a, &mut out); // prime the cache with version A
    let st = frame(&mut enc, &bv, &mut out);
    eprintln!(
        "xor_delta: {} of {} pages as deltas, ratio {:.3}",
        st.count(tern_pagecodec::Tag::XorDelta),
        st.pages(),
        st.ratio()
    );
    let mut flip = false;
    g.throughput(Throughput::Bytes((pages * PAGE_SIZE) as u64));
    g.bench_function("xor_delta_5pct", |b| {
        b.iter(|| {
            flip = !flip;
            let img = if flip { &a } else { &bv };
            black_box(frame(&mut enc, img, &mut out))
        })
    });

    let img = guest_image(4096);
    g.throughput(Throughput::Bytes(img.len() as u64));
    for (name, comp) in [
        ("compress_lz4", Compression::Lz4),
        ("compress_zstd1", Compression::Zstd(1)),
        ("compress_zstd3", Compression::Zstd(3)),
        ("compress_none", Compression::None),
    ] {
        let cfg = EncoderConfig {
            compression: comp,
            xor_cache_pages: 0,
            dedup_entries: 0,
        };
        let mut out = Vec::with_capacity(img.len() * 2);
        let mut st = tern_pagecodec::EncodeStats::default();
        let mut enc = Encoder::new(cfg.clone());
        for chunk in img.chunks(1024 * PAGE_SIZE).enumerate() {
            let base = chunk.0 * 1024;
            st.add(
                &enc.encode_frame(
                    chunk
                        .1
                        .chunks_exact(PAGE_SIZE)
                        .enumerate()
                        .map(|(i, p)| ((base + i) as u64, p)),
                    &mut out,
                ),
            );
        }
        eprintln!("{name}: guest image ratio {:.3} (out/in)", st.ratio());
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let mut enc = Encoder::new(cfg.clone());
                for chunk in img.chunks(1024 * PAGE_SIZE).enumerate() {
                    let base = chunk.0 * 1024;
                    enc.encode_frame(
                        chunk
                            .1
                            .chunks_exact(PAGE_SIZE)
                            .enumerate()
                            .map(|(i, p)| ((base + i) as u64, p)),
                        &mut out,
                    );
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
