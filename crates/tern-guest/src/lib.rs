//! What a live migration needs from a guest: the source half
//! ([`SourceGuest`]: shape, dirty tracking, page reads, pause, state) and
//! the destination half ([`DestinationGuest`]: RAM to fill, state to load,
//! start, post-copy memory), with the [`DirtyBitmap`] they report.
//!
//! A leaf crate of traits, as Cloud Hypervisor's `vm-migration` is: each
//! kind of guest implements the halves beside itself (tern-vmm's `Machine`,
//! its process workload), and the engine (`tern-migrate`) is written
//! against them alone, so it depends on no hypervisor.

use serde::{Deserialize, Serialize};

/// The page size of every guest and of the migration wire: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;

/// A guest operation failed.
#[derive(Debug, thiserror::Error)]
#[error("guest: {0}")]
pub struct GuestError(pub String);

/// Memory size and vCPUs: what the destination must be able to host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestShape {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// The source half: read pages, track what changes, stop and save.
pub trait SourceGuest: Send {
    /// Shape of the guest.
    fn shape(&self) -> GuestShape;
    /// Starts tracking written pages (what was written before is not reported).
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError>;
    /// Pages written since the last call (or since tracking started).
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError>;
    /// Stops tracking.
    fn stop_dirty_tracking(&mut self) -> Result<(), GuestError>;
    /// The pages that may hold anything but zeros: every page ever written
    /// (in memory or swapped out). The first round sends only these; the
    /// rest read as zeros, which a destination's fresh RAM already holds.
    /// Asked after dirty tracking started, so a page first written after
    /// the answer is in the dirty log. `None` (the default): not known,
    /// every page is sent.
    fn populated(&self) -> Result<Option<DirtyBitmap>, GuestError> {
        Ok(None)
    }
    /// Copies `out.len()` bytes of guest RAM from `addr` (a consistent copy
    /// of each page as it was at some moment; the dirty log catches changes).
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestError>;
    /// Stops the guest.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets it run again (rollback).
    fn resume(&mut self) -> Result<(), GuestError>;
    /// Its device and vCPU state, paused.
    fn device_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// Ends it for good (after commit).
    fn discard(&mut self);
    /// Auto-converge: slows the guest to (100 - `percent`) % of its speed
    /// (0: full speed again), so it dirties memory slower than the link sends it.
    fn throttle(&mut self, percent: u8) -> Result<(), GuestError>;
}

/// Guest RAM filled on demand after the guest started (post-copy).
pub trait PostcopyMemory: Send + Sync {
    /// The next page the guest touched and lacks, waiting up to `timeout`.
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, GuestError>;
    /// Places a page (waking the guest if it waits on it); false if it was there.
    fn fill(&self, page: u64, data: &[u8]) -> Result<bool, GuestError>;
}

/// The destination half: receive RAM and state, then run.
pub trait DestinationGuest: Send {
    /// Guest RAM to fill, before it runs.
    fn ram_mut(&mut self) -> Result<&mut [u8], GuestError>;
    /// A hint before `pages` pages from `first` are written through
    /// `ram_mut` for the first time: back them with memory in one go
    /// (`MADV_POPULATE_WRITE`), which costs a third less than a page fault
    /// on each first write. Failing changes nothing but speed.
    fn prefault(&mut self, first: u64, pages: u64);
    /// Loads device and vCPU state.
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// Starts the guest.
    fn start(&mut self) -> Result<(), GuestError>;
    /// Called after `Ready` went out, while the source journals its commit
    /// and `Commit` travels: work done here (a monitor's vCPU threads,
    /// created parked) is off the downtime. The guest must not run yet,
    /// and [`DestinationGuest::start`] must work whether this ran or not.
    fn prepare_to_start(&mut self) -> Result<(), GuestError> {
        Ok(())
    }
    /// Post-copy: before [`DestinationGuest::start`], forget the `stale`
    /// pages (runs of `(first page, count)`, in order; and any never
    /// filled) and serve the guest's accesses to them through the returned
    /// memory. Bulk writes through `ram_mut` end here.
    fn enter_postcopy(
        &mut self,
        stale: &[(u64, u64)],
    ) -> Result<Box<dyn PostcopyMemory>, GuestError>;
}

/// A set of guest pages (one bit per 4 KiB page from guest physical 0).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// 64 pages per word, lowest bit first.
    pub words: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty set sized for `pages`.
    pub fn with_pages(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds `page`, growing the set if needed.
    pub fn insert(&mut self, page: u64) {
        let w = (page / 64) as usize;
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (page % 64);
    }

    /// Adds every page of the 64-page word `word` taken from `first` on
    /// (a KVM or vm-memory bitmap of a region that starts at page `first`).
    pub fn insert_word(&mut self, first: u64, word: u64) {
        if first.is_multiple_of(64) {
            let w = (first / 64) as usize;
            if self.words.len() <= w {
                self.words.resize(w + 1, 0);
            }
            self.words[w] |= word;
        } else {
            let mut bits = word;
            while bits != 0 {
                self.insert(first + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// The pages in the set, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}
