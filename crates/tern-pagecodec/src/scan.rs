//! Zero-page detection.

use crate::PAGE_SIZE;

/// Whether a page is all zeros. ORs 64-byte blocks as eight u64 words (the
/// compiler vectorises this) and stops at the first non-zero block, so random
/// pages are rejected after a few bytes and zero pages run at memory speed.
#[inline]
pub fn is_zero_page(page: &[u8]) -> bool {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    page.chunks_exact(64).all(|block| {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8-byte chunk"));
        }
        acc == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_zero_and_any_set_byte() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        for i in [0, 7, 8, 63, 64, 2048, PAGE_SIZE - 1] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
    }
}
