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

#[inline]
fn word(p: &[u8], i: usize) -> u64 {
    u64::from_ne_bytes(p[i..i + 8].try_into().expect("8 bytes"))
}

/// Encodes `new` as a delta against `old` into `out`. Returns the length, or
/// `None` when the delta would not fit in `out` (then it is not worth sending).
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Option<usize> {
    debug_assert!(old.len() == PAGE_SIZE && new.len() == PAGE_SIZE);
    let mut pos = 0;
    let mut i = 0;
    while i < PAGE_SIZE {
        // Equal run: skip whole equal words first, then bytes.
        let start = i;
        while i + 8 <= PAGE_SIZE && word(old, i) == word(new, i) {
            i += 8;
        }
        while i < PAGE_SIZE && old[i] == new[i] {
            i += 1;
        }
        if i == PAGE_SIZE {
            break;
        }
        let zrun = i - start;
        // Changed run: until the next equal byte.
        let nz_start = i;
        while i < PAGE_SIZE && old[i] != new[i] {
            i += 1;
        }
        let nzrun = i - nz_start;
        put_varint(out, &mut pos, zrun)?;
        put_varint(out, &mut pos, nzrun)?;
        let dst = out.get_mut(pos..pos + nzrun)?;
        for (d, (a, b)) in dst
            .iter_mut()
            .zip(old[nz_start..i].iter().zip(&new[nz_start..i]))
        {
            *d = a ^ b;
        }
        pos += nzrun;
    }
    Some(pos)
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
