//! XOR delta as zero-run-length data, the XBZRLE idea: a page changed in a few
//! places XORs to mostly zeros, which we write as alternating
//! `varint(equal bytes) varint(changed bytes) <xor of changed bytes>` runs.
//! The trailing equal run is implied.

use crate::PAGE_SIZE;

fn put_varint(out: &mut [u8], pos: &mut usize, mut v: usize) -> Option<()> {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        *out.get_mut(*pos)? = if v == 0 { byte } else { byte | 0x80 };
        *pos += 1;
        if v == 0 {
            return Some(());
        }
    }
}

fn get_varint(data: &[u8], pos: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    for shift in [0, 7] {
        let b = *data.get(*pos)?;
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None // runs are at most 4096: two varint bytes always suffice
}

/// Bit k of the result is set when byte k of `w` is non-zero.
#[inline]
fn nonzero_bytes(w: u64) -> u64 {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HI: u64 = 0x8080_8080_8080_8080;
    // High bit of each byte: set iff the byte is non-zero (no carries cross bytes).
    let t = (((w & LO7) + LO7) | w) & HI;
    // Gather the eight high bits into the low byte.
    ((t >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

const BLOCKS: usize = PAGE_SIZE / 64;

/// First byte at or after `i` whose bit in `mask` equals `want_set`
/// (PAGE_SIZE if none): whole 64-byte blocks at a time with tzcnt.
#[inline]
fn next_bit(mask: &[u64; BLOCKS], i: usize, want_set: bool) -> usize {
    let mut b = i / 64;
    if b >= BLOCKS {
        return PAGE_SIZE;
    }
    let flip = if want_set { 0 } else { !0 };
    let mut m = (mask[b] ^ flip) & (!0u64 << (i % 64));
    loop {
        if m != 0 {
            return b * 64 + m.trailing_zeros() as usize;
        }
        b += 1;
        if b == BLOCKS {
            return PAGE_SIZE;
        }
        m = mask[b] ^ flip;
    }
}

/// Encodes `new` as a delta against `old` into `out`. Returns the length, or
/// `None` when the delta would not fit in `out` (then it is not worth sending).
///
/// One pass XORs the pages and builds a bitmap of changed bytes; runs are then
/// found with trailing-zero counts on the bitmap, a few instructions per run.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
    debug_assert!(old.len() == PAGE_SIZE && new.len() == PAGE_SIZE);
    let mut xor = [0u8; PAGE_SIZE];
    let mut mask = [0u64; BLOCKS];
    for (((o, n), x), m) in old
        .chunks_exact(64)
        .zip(new.chunks_exact(64))
        .zip(xor.chunks_exact_mut(64))
        .zip(mask.iter_mut())
    {
        let mut bits = 0u64;
        for k in 0..8 {
            let a = u64::from_le_bytes(o[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            let b = u64::from_le_bytes(n[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
            let w = a ^ b;
            x[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
            bits |= nonzero_bytes(w) << (k * 8);
        }
        *m = bits;
    }
    let mut pos = 0;
    let mut i = 0;
    loop {
        let start = next_bit(&mask, i, true);
        if start == PAGE_SIZE {
            return Some(pos);
        }
        let end = next_bit(&mask, start, false);
        put_varint(out, &mut pos, start - i)?;
        put_varint(out, &mut pos, end - start)?;
        out.get_mut(pos..pos + (end - start))?
            .copy_from_slice(&xor[start..end]);
        pos += end - start;
        i = end;
    }
}

/// Applies a delta to `page` (which holds the base) in place. Fails, leaving
/// `page` partly written, on any malformed run; callers decode into scratch.
pub fn apply(delta: &[u8], page: &mut [u8]) -> Result<(), &'static str> {
    let mut pos = 0;
    let mut i = 0usize;
    while pos < delta.len() {
        let zrun = get_varint(delta, &mut pos).ok_or("truncated equal-run length")?;
        let nzrun = get_varint(delta, &mut pos).ok_or("truncated changed-run length")?;
        if nzrun == 0 {
            return Err("empty changed run");
        }
        i = i
            .checked_add(zrun)
            .filter(|&e| e + nzrun <= PAGE_SIZE)
            .ok_or("run past the end of the page")?;
        let xor = delta
            .get(pos..pos + nzrun)
            .ok_or("changed run longer than the data")?;
        for (b, x) in page[i..i + nzrun].iter_mut().zip(xor) {
            *b ^= x;
        }
        i += nzrun;
        pos += nzrun;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_byte_mask_matches_naive() {
        for w in [
            0u64,
            1,
            0x80,
            0xff00,
            0x0100_0000_0000_0000,
            u64::MAX,
            0x8000_0000_0000_0001,
            0x0001_0200_0080_7f00,
        ] {
            let naive = (0..8).fold(0u64, |m, k| m | u64::from((w >> (8 * k)) & 0xff != 0) << k);
            assert_eq!(nonzero_bytes(w), naive, "{w:#x}");
        }
    }

    #[test]
    fn round_trip_sparse_change() {
        let old: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7) as u8).collect();
        let mut new = old.clone();
        for i in (0..PAGE_SIZE).step_by(97) {
            new[i] ^= 0x5a;
        }
        new[PAGE_SIZE - 1] ^= 1;
        let mut out = vec![0u8; PAGE_SIZE];
        let n = encode(&old, &new, &mut out).unwrap();
        assert!(n < 300, "{n}");
        let mut page = old.clone();
        apply(&out[..n], &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn identical_pages_give_empty_delta_and_overflow_gives_none() {
        let p = vec![3u8; PAGE_SIZE];
        let mut out = vec![0u8; 16];
        assert_eq!(encode(&p, &p, &mut out), Some(0));
        let q: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8 ^ 0xff).collect();
        assert_eq!(encode(&p, &q, &mut out), None);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(apply(&[0x80], &mut page).is_err());
        assert!(apply(&[0x80, 0x40, 1, 0], &mut page).is_err()); // 8192 > page
        assert!(apply(&[0, 5, 1, 2], &mut page).is_err()); // run longer than data
        assert!(apply(&[0, 0], &mut page).is_err());
        assert!(apply(&[0xff, 0xff, 0xff], &mut page).is_err());
    }
}
