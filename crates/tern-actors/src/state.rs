//! An actor's state as checkpoints carry it: its linear memory in 4 KiB
//! pages plus its exported mutable globals, and the hash that names it.
//!
//! The hash is a BLAKE3 tree over the state: one BLAKE3 hash per page, then
//! one over the memory size, the globals and the page hashes in order. A
//! checkpoint that carries only the pages written since the last one can
//! then be verified against its signed hash by hashing just those pages,
//! so checking a checkpoint costs what changed, not what exists.

use thiserror::Error;

/// The unit of dirty tracking and of checkpoint deltas (the host page).
pub const PAGE: usize = 4096;
/// WebAssembly memories grow in 64 KiB pages.
pub const WASM_PAGE: u64 = 65536;
/// At most this many globals are part of a state (a real module has a few).
pub const MAX_GLOBALS: usize = 1024;

/// A BLAKE3 digest.
pub type Digest = [u8; 32];

/// Part or all of an actor's state: the pages written since checkpoint
/// `base`, or (without a base) every page that is not all zeros.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StateDelta {
    /// The checkpoint sequence this applies on; `None` for a full state.
    pub base: Option<u64>,
    /// The linear memory's size in bytes after applying (whole wasm pages).
    pub memory_bytes: u64,
    /// The raw bits of the module's exported mutable globals, in export order.
    pub globals: Vec<u64>,
    /// Indices of the pages carried, strictly increasing.
    pub pages: Vec<u32>,
    /// `pages.len() * PAGE` bytes: the pages' contents in the same order.
    pub data: Vec<u8>,
}

/// Why a state or a delta does not fit.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    /// The memory size is not a whole number of wasm pages.
    #[error("memory size {0} is not a multiple of 64 KiB")]
    UnalignedMemory(u64),
    /// The state is larger than the actor may hold.
    #[error("state of {bytes} bytes is over the limit of {max}")]
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// Linear memory never shrinks, so a delta cannot make it smaller.
    #[error("memory shrinks from {from} to {to} bytes")]
    Shrinks {
        /// The size before.
        from: u64,
        /// The size the delta gives.
        to: u64,
    },
    /// A page index is past the end of memory or out of order.
    #[error("page {0} is out of order or past the end of memory")]
    BadPage(u32),
    /// The page data does not match the page list.
    #[error("{got} bytes of page data for {pages} pages")]
    DataLength {
        /// Pages listed.
        pages: usize,
        /// Bytes carried.
        got: usize,
    },
    /// Too many globals.
    #[error("{0} globals (at most {MAX_GLOBALS})")]
    TooManyGlobals(usize),
}

impl StateDelta {
    /// The full state of `memory` and `globals`, leaving out zero pages
    /// (memory grows zero-filled, so they need not travel).
    pub fn full(memory: &[u8], globals: Vec<u64>) -> Self {
        let mut delta = StateDelta {
            base: None,
            memory_bytes: memory.len() as u64,
            globals,
            // Room for every page up front: only what is written is touched,
            // and the data never moves while it grows.
            data: Vec::with_capacity(memory.len()),
            ..Default::default()
        };
        for (i, page) in memory.chunks(PAGE).enumerate() {
            if !is_zero(page) {
                delta.push_page(i as u32, page);
            }
        }
        delta
    }

    /// Adds one page (callers add pages in increasing order).
    pub fn push_page(&mut self, index: u32, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE);
        self.pages.push(index);
        self.data.extend_from_slice(page);
    }

    /// The pages carried, with their contents.
    pub fn iter_pages(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.pages.iter().copied().zip(self.data.chunks(PAGE))
    }

    /// Checks the delta's own shape against a size limit.
    pub fn check(&self, max_state_bytes: u64) -> Result<(), StateError> {
        if !self.memory_bytes.is_multiple_of(WASM_PAGE) {
            return Err(StateError::UnalignedMemory(self.memory_bytes));
        }
        if self.memory_bytes > max_state_bytes {
            return Err(StateError::TooLarge {
                bytes: self.memory_bytes,
                max: max_state_bytes,
            });
        }
        if self.globals.len() > MAX_GLOBALS {
            return Err(StateError::TooManyGlobals(self.globals.len()));
        }
        if self.data.len() != self.pages.len() * PAGE {
            return Err(StateError::DataLength {
                pages: self.pages.len(),
                got: self.data.len(),
            });
        }
        let page_count = self.memory_bytes / PAGE as u64;
        let mut next = 0u64;
        for &p in &self.pages {
            if u64::from(p) < next || u64::from(p) >= page_count {
                return Err(StateError::BadPage(p));
            }
            next = u64::from(p) + 1;
        }
        Ok(())
    }
}

fn zero_page_hash() -> Digest {
    static ZERO: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| *blake3::hash(&[0u8; PAGE]).as_bytes())
}

/// What a verifier keeps of an actor's state: the page hashes, not the pages.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StateHashes {
    memory_bytes: u64,
    globals: Vec<u64>,
    pages: Vec<Digest>,
}

impl StateHashes {
    /// The hashes of a whole state.
    pub fn of(memory: &[u8], globals: &[u64]) -> Self {
        Self {
            memory_bytes: memory.len() as u64,
            globals: globals.to_vec(),
            pages: memory
                .chunks(PAGE)
                .map(|p| *blake3::hash(p).as_bytes())
                .collect(),
        }
    }

    /// The linear memory's size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// The state hash a checkpoint signs.
    pub fn root(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"tern-actor-state-v1");
        h.update(&self.memory_bytes.to_le_bytes());
        h.update(&(self.globals.len() as u64).to_le_bytes());
        for g in &self.globals {
            h.update(&g.to_le_bytes());
        }
        for p in &self.pages {
            h.update(p);
        }
        *h.finalize().as_bytes()
    }

    /// The hashes after `delta` is applied to the state these describe (a
    /// full delta replaces it), leaving `self` as it is.
    pub fn after(&self, delta: &StateDelta, max_state_bytes: u64) -> Result<Self, StateError> {
        delta.check(max_state_bytes)?;
        let mut next = match delta.base {
            None => Self::default(),
            Some(_) if delta.memory_bytes < self.memory_bytes => {
                return Err(StateError::Shrinks {
                    from: self.memory_bytes,
                    to: delta.memory_bytes,
                })
            }
            Some(_) => self.clone(),
        };
        next.memory_bytes = delta.memory_bytes;
        next.globals = delta.globals.clone();
        next.pages.resize(
            (delta.memory_bytes / PAGE as u64) as usize,
            zero_page_hash(),
        );
        for (i, page) in delta.iter_pages() {
            next.pages[i as usize] = *blake3::hash(page).as_bytes();
        }
        Ok(next)
    }
}

/// A whole state in memory, rebuilt from a full checkpoint and its deltas.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StateImage {
    /// Linear memory.
    pub memory: Vec<u8>,
    /// Exported mutable globals' raw bits.
    pub globals: Vec<u64>,
}

impl StateImage {
    /// Applies a delta that [`StateDelta::check`] and
    /// [`StateHashes::after`] already accepted.
    pub fn apply(&mut self, delta: &StateDelta) {
        if delta.base.is_none() {
            self.memory.clear();
        }
        self.memory.resize(delta.memory_bytes as usize, 0);
        self.globals.clone_from(&delta.globals);
        for (i, page) in delta.iter_pages() {
            let at = i as usize * PAGE;
            self.memory[at..at + PAGE].copy_from_slice(page);
        }
    }
}

/// Whether a page is all zeros: OR-folded a word at a time (the compiler
/// vectorises it), which a byte-wise `any` with its early exit does not.
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    words.fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))
    }) == 0
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u64 = 1 << 30;

    fn memory(wasm_pages: usize, seed: u8) -> Vec<u8> {
        let mut m = vec![0u8; wasm_pages * WASM_PAGE as usize];
        for (i, b) in m.iter_mut().enumerate().step_by(977) {
            *b = seed.wrapping_add(i as u8);
        }
        m
    }

    #[test]
    fn zero_pages_are_told_from_pages_with_one_byte_set() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        for at in [0, 7, 8, 2049, PAGE - 1] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 3]));
    }

    #[test]
    fn a_full_state_leaves_out_zero_pages_and_hashes_like_the_memory() {
        let mut m = vec![0u8; 2 * WASM_PAGE as usize];
        m[5 * PAGE + 3] = 7;
        let full = StateDelta::full(&m, vec![42]);
        assert_eq!(full.pages, vec![5]);
        let hashes = StateHashes::default().after(&full, MAX).unwrap();
        assert_eq!(hashes.root(), StateHashes::of(&m, &[42]).root());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut d = StateDelta::full(&memory(1, 1), vec![]);
        d.memory_bytes = 1000;
        assert_eq!(d.check(MAX), Err(StateError::UnalignedMemory(1000)));
        let d = StateDelta::full(&memory(2, 1), vec![]);
        assert!(matches!(
            d.check(WASM_PAGE),
            Err(StateError::TooLarge { .. })
        ));
        let mut d = StateDelta::full(&memory(1, 1), vec![]);
        d.pages.swap(0, 1);
        assert!(matches!(d.check(MAX), Err(StateError::BadPage(_))));
        let mut d = StateDelta::full(&memory(1, 1), vec![]);
        d.data.pop();
        assert!(matches!(d.check(MAX), Err(StateError::DataLength { .. })));
        let base = StateHashes::of(&memory(2, 1), &[]);
        let mut shrink = StateDelta::full(&memory(1, 1), vec![]);
        shrink.base = Some(1);
        assert!(matches!(
            base.after(&shrink, MAX),
            Err(StateError::Shrinks { .. })
        ));
    }

    proptest! {
        /// Applying a delta of the written pages gives the same image and
        /// the same hash as capturing the new memory whole.
        #[test]
        fn deltas_hash_and_apply_like_full_states(
            grow in 0usize..3,
            writes in proptest::collection::vec((0usize..(4 * WASM_PAGE as usize), any::<u8>()), 0..64),
            global in any::<u64>(),
        ) {
            let before = memory(1, 3);
            let mut after = before.clone();
            after.resize(before.len() + grow * WASM_PAGE as usize, 0);
            let mut dirty = std::collections::BTreeSet::new();
            for (at, v) in writes {
                let at = at % after.len();
                after[at] = v;
                dirty.insert(at / PAGE);
            }
            let mut delta = StateDelta { base: Some(1), memory_bytes: after.len() as u64, globals: vec![global], ..Default::default() };
            for p in dirty {
                delta.push_page(p as u32, &after[p * PAGE..(p + 1) * PAGE]);
            }
            let base = StateHashes::of(&before, &[0]);
            let hashed = base.after(&delta, MAX).unwrap();
            prop_assert_eq!(hashed.root(), StateHashes::of(&after, &[global]).root());
            let mut image = StateImage { memory: before, globals: vec![0] };
            image.apply(&delta);
            prop_assert_eq!(image.memory, after);
            prop_assert_eq!(image.globals, vec![global]);
        }
    }
}
