//! Every page's hash and the root the manifest signs, kept so that a root
//! costs what changed since the last one, not what the guest has.
//!
//! The root is BLAKE3 over group digests, each BLAKE3 over the hashes of
//! [`GROUP_PAGES`] consecutive pages. Setting a page's hash marks its group;
//! [`PageDigests::refresh`] rehashes the marked groups. Both sides refresh
//! after every pre-copy round, while the guest still runs, so at switchover
//! only the groups of the last pages are rehashed and the rest is a hash of
//! the group digests (64 KiB per GiB of RAM). Before, both sides hashed the
//! whole table while the guest was paused: 8 MiB, about 1.6 ms, per GiB.

use super::pages::zero_page_hash;

/// Pages per group: 4 KiB of page hashes (512 KiB of RAM). A page that
/// changes costs its group's rehash (~1 µs); the root costs 32 bytes per
/// group.
pub(crate) const GROUP_PAGES: usize = 128;

/// The page hashes, their group digests and which groups are out of date.
pub(crate) struct PageDigests {
    hashes: Vec<[u8; 32]>,
    groups: Vec<[u8; 32]>,
    stale: Vec<bool>,
    any_stale: bool,
}

impl PageDigests {
    /// `n_pages` zero pages (what both sides hold before anything is sent).
    pub(crate) fn new(n_pages: u64) -> Self {
        let hashes = vec![zero_page_hash(); n_pages as usize];
        let n_groups = hashes.len().div_ceil(GROUP_PAGES);
        // Every full group of zero pages has one digest.
        let full = group_digest(&hashes[..GROUP_PAGES.min(hashes.len())]);
        let mut groups = vec![full; n_groups];
        if let Some(last) = groups.last_mut() {
            *last = group_digest(&hashes[(n_groups - 1) * GROUP_PAGES..]);
        }
        Self {
            hashes,
            stale: vec![false; n_groups],
            groups,
            any_stale: false,
        }
    }

    /// Pages covered.
    pub(crate) fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Records page `page`'s hash (the caller checked `page` is in range).
    pub(crate) fn set(&mut self, page: u64, hash: [u8; 32]) {
        let i = page as usize;
        self.hashes[i] = hash;
        self.stale[i / GROUP_PAGES] = true;
        self.any_stale = true;
    }

    /// Rehashes the groups whose pages changed since the last refresh.
    pub(crate) fn refresh(&mut self) {
        if !std::mem::take(&mut self.any_stale) {
            return;
        }
        for (g, stale) in self.stale.iter_mut().enumerate() {
            if std::mem::take(stale) {
                let end = ((g + 1) * GROUP_PAGES).min(self.hashes.len());
                self.groups[g] = group_digest(&self.hashes[g * GROUP_PAGES..end]);
            }
        }
    }

    /// The root over every page's hash, hex: what the manifest signs.
    pub(crate) fn root(&mut self) -> String {
        self.refresh();
        blake3::hash(self.groups.as_flattened())
            .to_hex()
            .to_string()
    }
}

fn group_digest(hashes: &[[u8; 32]]) -> [u8; 32] {
    *blake3::hash(hashes.as_flattened()).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The root computed from scratch over the given hashes.
    fn reference(hashes: &[[u8; 32]]) -> String {
        let groups: Vec<[u8; 32]> = hashes.chunks(GROUP_PAGES).map(group_digest).collect();
        blake3::hash(groups.as_flattened()).to_hex().to_string()
    }

    proptest! {
        /// However pages are set and refreshed, the root equals one
        /// computed from scratch, and any changed page changes it.
        #[test]
        fn the_root_always_matches_a_full_recomputation(
            n_pages in 1u64..1000,
            writes in proptest::collection::vec((0u64..1000, any::<u8>(), any::<bool>()), 0..60),
        ) {
            let mut d = PageDigests::new(n_pages);
            let mut plain = vec![zero_page_hash(); n_pages as usize];
            prop_assert_eq!(d.root(), reference(&plain));
            for (page, byte, refresh) in writes {
                let page = page % n_pages;
                let h = *blake3::hash(&[byte]).as_bytes();
                let before = d.root();
                let had = std::mem::replace(&mut plain[page as usize], h);
                d.set(page, h);
                if refresh {
                    d.refresh();
                }
                let after = d.root();
                prop_assert_eq!(&after, &reference(&plain));
                prop_assert_eq!(before == after, had == h);
            }
        }
    }

    #[test]
    fn a_changed_page_changes_the_root() {
        let mut d = PageDigests::new(3 * GROUP_PAGES as u64 + 5);
        let r0 = d.root();
        d.set(3 * GROUP_PAGES as u64 + 4, [1; 32]);
        let r1 = d.root();
        assert_ne!(r0, r1);
        d.set(3 * GROUP_PAGES as u64 + 4, zero_page_hash());
        assert_eq!(d.root(), r0);
        assert_eq!(d.len(), 3 * GROUP_PAGES + 5);
    }
}
