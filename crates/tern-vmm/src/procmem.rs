//! Plain process memory as a migratable workload: a region a thread dirties
//! at a set rate, with the kernel tracking the writes (userfaultfd async
//! write-protect + `PAGEMAP_SCAN`, see [`crate::uffd`]). It exercises the
//! migration engine at GiB scale and full speed where guest code is
//! emulated, and is the base for migrating processes and WebAssembly actors.

use crate::uffd::{MissingPages, WriteTracker};
use crate::VmmError;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PAGE: usize = crate::memory::PAGE_SIZE as usize;

/// An anonymous private mapping, unmapped on drop.
pub struct Region {
    base: usize,
    len: usize,
}

impl Region {
    /// Maps `len` bytes (a multiple of 4 KiB); `populate` pre-faults them so
    /// first touches do not distort measurements.
    pub fn new(len: usize, populate: bool) -> Result<Self, VmmError> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(VmmError::Config(format!(
                "region of {len} bytes is not whole pages"
            )));
        }
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(VmmError::Memory(format!(
                "mmap {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self {
            base: p as usize,
            len,
        })
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: regions are at least a page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies bytes out. A concurrent writer may tear a page; the write
    /// tracker reports such a page again, so the final copy is whole.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), VmmError> {
        if offset.checked_add(out.len()).is_none_or(|e| e > self.len) {
            return Err(VmmError::Memory(format!(
                "read past the region at {offset}"
            )));
        }
        // SAFETY: the range is inside the mapping (checked), which lives as
        // long as `self`; concurrent writes only change bytes, never the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset) as *const u8,
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// The whole region, writable, for filling an incoming copy.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, lives as long as `self`, and
        // `&mut self` excludes other access through this type.
        unsafe { std::slice::from_raw_parts_mut(self.base as *mut u8, self.len) }
    }

    /// The pages ever written (or read as zeros), from the page map; `None`
    /// where the page map cannot be read.
    pub fn populated(&self) -> Option<crate::DirtyBitmap> {
        crate::memory::populated_range(self.base, self.len)
    }

    /// Starts kernel write tracking of the region.
    pub fn track_writes(&self) -> Result<WriteTracker, VmmError> {
        WriteTracker::start(self.base, self.len)
    }

    /// Drops `stale` pages and serves later accesses through userfaultfd.
    pub fn missing_pages(&self, stale: &[(u64, u64)]) -> Result<MissingPages, VmmError> {
        MissingPages::register(self.base, self.len, stale)
    }

    /// Fills the first `pages` pages with pseudo-random bytes (seeded):
    /// data that neither compresses nor deduplicates, as a real working set.
    pub fn fill_random(&self, pages: u64, seed: u64) {
        let mut x = seed | 1;
        let words = (pages as usize * PAGE).min(self.len) / 8;
        for i in 0..words {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.write_u64(i * 8, x);
        }
    }

    fn write_u64(&self, offset: usize, v: u64) {
        debug_assert!(offset + 8 <= self.len);
        // SAFETY: callers pass an 8-aligned offset inside the mapping, which
        // lives as long as `self` (the dirtier holds an Arc to it).
        unsafe { std::ptr::write_volatile((self.base + offset) as *mut u64, v) };
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; nothing borrows it
        // any more (borrows end with `self`).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

// SAFETY: the region is plain memory addressed by integers; concurrent
// access is by raw copies whose tearing the write tracker covers.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

#[derive(Default)]
struct Gate {
    paused: bool,
    parked: bool,
}

/// A thread that writes a counter into pages of a working set at a set
/// rate: a guest's memory behaviour without a guest.
pub struct Dirtier {
    gate: Arc<(Mutex<Gate>, Condvar)>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    throttle: Arc<AtomicU8>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dirtier {
    /// Dirties `ws_pages` pages from the start of `region` at `bytes_per_sec`
    /// (whole pages: one write per page counts as 4 KiB), starting at page
    /// `cursor_seed` so a migrated workload carries on where it was.
    pub fn start(region: Arc<Region>, ws_pages: u64, bytes_per_sec: u64, start_value: u64) -> Self {
        let gate = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(start_value));
        let throttle = Arc::new(AtomicU8::new(0));
        let ws = ws_pages.clamp(1, (region.len() / PAGE) as u64);
        let pages_per_sec = (bytes_per_sec / PAGE as u64).max(1);
        let thread = {
            let (gate, stop, writes, throttle) =
                (gate.clone(), stop.clone(), writes.clone(), throttle.clone());
            std::thread::Builder::new()
                .name("dirtier".into())
                .spawn(move || {
                    // Pages owed at the current (possibly throttled) rate.
                    let mut credit = 0f64;
                    let mut last = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        {
                            let (m, cv) = &*gate;
                            let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                            while g.paused && !stop.load(Ordering::Relaxed) {
                                g.parked = true;
                                cv.notify_all();
                                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                            }
                            g.parked = false;
                        }
                        let now = Instant::now();
                        let speed =
                            f64::from(100 - throttle.load(Ordering::Relaxed).min(100)) / 100.0;
                        // A pause earns nothing: at most 50 ms of catching up.
                        let dt = (now - last).as_secs_f64().min(0.05);
                        credit += dt * pages_per_sec as f64 * speed;
                        last = now;
                        if credit < 1.0 {
                            std::thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                        let batch = (credit as u64).min(256);
                        for _ in 0..batch {
                            let n = writes.fetch_add(1, Ordering::Relaxed);
                            let page = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % ws;
                            region.write_u64(page as usize * PAGE + (n % 512) as usize * 8, n);
                        }
                        credit -= batch as f64;
                    }
                })
                .expect("spawn dirtier thread")
        };
        Self {
            gate,
            stop,
            writes,
            throttle,
            thread: Some(thread),
        }
    }

    /// Auto-converge: writes at (100 - `percent`) % of the set rate.
    pub fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(95), Ordering::Relaxed);
    }

    /// Stops writing; returns once the thread wrote its last byte.
    pub fn pause(&self) {
        let (m, cv) = &*self.gate;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        g.paused = true;
        while !g.parked {
            g = cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Writes again.
    pub fn resume(&self) {
        let (m, cv) = &*self.gate;
        m.lock().unwrap_or_else(|p| p.into_inner()).paused = false;
        cv.notify_all();
    }

    /// Writes made so far (the workload's progress counter).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

impl Drop for Dirtier {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.resume();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_sees_what_the_dirtier_writes_and_pause_stops_it() {
        let region = Arc::new(Region::new(4 << 20, true).unwrap());
        let mut tracker = match region.track_writes() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED: async write-protect not available: {e}");
                return;
            }
        };
        let d = Dirtier::start(region.clone(), 64, 40 << 20, 0);
        std::thread::sleep(Duration::from_millis(50));
        d.pause();
        let w = d.writes();
        let mut pages = Vec::new();
        tracker.take_written(|p| pages.push(p)).unwrap();
        assert!(
            !pages.is_empty() && pages.iter().all(|&p| p < 64),
            "{pages:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.writes(), w, "paused but still writing");
        pages.clear();
        tracker.take_written(|p| pages.push(p)).unwrap();
        assert!(pages.is_empty());
        d.resume();
    }
}
