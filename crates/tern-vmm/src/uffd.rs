//! userfaultfd: the kernel tells us when the guest touches memory we have
//! not filled yet (post-copy's missing pages), or has written since we last
//! looked (write-protect in async mode, read back with `PAGEMAP_SCAN`: dirty
//! tracking of plain process memory, where KVM's dirty log does not exist).
//!
//! The ioctl numbers and structures are the kernel's uapi
//! (`linux/userfaultfd.h`, `linux/fs.h`); libc does not carry them.

use crate::VmmError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const PAGE: usize = crate::memory::PAGE_SIZE as usize;

const UFFD_API: u64 = 0xAA;
// _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_API: u64 = 0xC018_AA3F;
// _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
// _IOWR(0xAA, 0x03, struct uffdio_copy)
const UFFDIO_COPY: u64 = 0xC028_AA03;
// _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: u64 = 0xC060_6610;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    flags: u64,
    address: u64,
    _rest: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

fn os_err(what: &str) -> VmmError {
    VmmError::Memory(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// An open userfaultfd.
struct Uffd(OwnedFd);

impl Uffd {
    /// A new userfaultfd from `/dev/userfaultfd` (access is the device
    /// node's permission: a jailed, unprivileged monitor has its own node),
    /// else from the system call (root, or `vm.unprivileged_userfaultfd`).
    fn new_fd() -> Result<OwnedFd, VmmError> {
        /// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`.
        const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if let Ok(dev) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd or -1.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if fd >= 0 {
                // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: a plain syscall with flag arguments; it returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(os_err("userfaultfd"));
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn open(features: u64) -> Result<Self, VmmError> {
        let uffd = Uffd(Self::new_fd()?);
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(uffd.0.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(os_err("UFFDIO_API (features this kernel lacks?)"));
        }
        Ok(uffd)
    }

    fn register(&self, start: usize, len: usize, mode: u64) -> Result<(), VmmError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; the
        // range is a mapping of this process (the kernel checks it).
        if unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        Ok(())
    }
}

/// Discards the contents of `runs` (first page, pages) of the private
/// anonymous mapping at `base`, so they read as missing. This runs while the
/// guest is paused at a post-copy switchover, and the stale pages of a busy
/// guest are scattered: one `madvise` per run cost 23 ms for 16,000 runs
/// here, so runs go 1,024 at a time through `process_madvise` on our own
/// pidfd (9 ms), with `madvise` per run where the kernel lacks it.
fn drop_runs(base: usize, runs: &[(u64, u64)]) -> Result<(), VmmError> {
    // A run's address and length (its pages were checked against the mapping).
    let span = |(first, n): (u64, u64)| (base + first as usize * PAGE, n as usize * PAGE);
    let madvise_each = |runs: &[(u64, u64)]| -> Result<(), VmmError> {
        for &run in runs {
            let (addr, len) = span(run);
            // SAFETY: the run lies inside the caller's private anonymous
            // mapping (checked when built); MADV_DONTNEED only discards
            // contents the caller wants refetched; no reference to them is held.
            let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(os_err("madvise(MADV_DONTNEED)"));
            }
        }
        Ok(())
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (or -1); nothing is borrowed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if raw < 0 {
        return madvise_each(runs);
    }
    // SAFETY: `raw` is a descriptor just returned to us and owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    for batch in runs.chunks(1024) {
        let iov: Vec<libc::iovec> = batch
            .iter()
            .map(|&run| {
                let (addr, len) = span(run);
                libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len,
                }
            })
            .collect();
        let want: usize = iov.iter().map(|v| v.iov_len).sum();
        // SAFETY: process_madvise reads `iov.len()` iovecs from `iov`, which
        // lives across the call; they name runs of the caller's mapping as
        // above, and MADV_DONTNEED only discards their contents.
        let done = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                pidfd.as_raw_fd(),
                iov.as_ptr(),
                iov.len(),
                libc::MADV_DONTNEED,
                0u32,
            )
        };
        if done < 0 || done as usize != want {
            // Not supported here, or stopped part way: discarding twice is
            // harmless, so the whole batch goes again run by run.
            madvise_each(batch)?;
        }
    }
    Ok(())
}

/// Guest RAM whose missing pages are filled on demand (post-copy). Accesses
/// to a missing page block until [`MissingPages::fill`] places it; the
/// faults queue for [`MissingPages::next_fault`].
pub struct MissingPages {
    uffd: Uffd,
    base: usize,
    len: usize,
}

impl MissingPages {
    /// Drops the `stale` runs of pages (`(first, count)`) of the mapping at
    /// `base..base+len` (so they read as missing) and registers the whole
    /// range for missing-page faults. The mapping must be private anonymous
    /// memory of this process that stays mapped while this lives (fills
    /// into an unmapped range fail).
    pub fn register(base: usize, len: usize, stale: &[(u64, u64)]) -> Result<Self, VmmError> {
        if !base.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(VmmError::Memory(
                "post-copy range is not page aligned".into(),
            ));
        }
        // Checked against the mapping first.
        let pages = (len / PAGE) as u64;
        if let Some(&(first, n)) = stale
            .iter()
            .find(|&&(first, n)| first.checked_add(n).is_none_or(|end| end > pages))
        {
            return Err(VmmError::Memory(format!(
                "stale pages {first}+{n} are outside guest RAM"
            )));
        }
        drop_runs(base, stale)?;
        let uffd = Uffd::open(0)?;
        uffd.register(base, len, UFFDIO_REGISTER_MODE_MISSING)?;
        Ok(Self { uffd, base, len })
    }

    /// The page of the next fault, waiting up to `timeout` (None: none came).
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<u64>, VmmError> {
        let mut pfd = libc::pollfd {
            fd: self.uffd.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(VmmError::Memory(format!("poll(userfaultfd): {e}")));
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = UffdMsg::default();
        // SAFETY: reads at most one `struct uffd_msg` (32 bytes) into `msg`.
        let got = unsafe {
            libc::read(
                self.uffd.0.as_raw_fd(),
                &mut msg as *mut UffdMsg as *mut libc::c_void,
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VmmError::Memory(format!("read(userfaultfd): {e}")));
        }
        if got as usize != std::mem::size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let addr = msg.address as usize;
        if addr < self.base || addr >= self.base + self.len {
            return Ok(None);
        }
        Ok(Some(((addr - self.base) / PAGE) as u64))
    }

    /// Places a page and wakes whoever waits on it. `Ok(false)`: it was
    /// already there (a duplicate fill changes nothing).
    pub fn fill(&self, page: u64, data: &[u8]) -> Result<bool, VmmError> {
        let off = page as usize * PAGE;
        if data.len() != PAGE || off >= self.len {
            return Err(VmmError::Memory(format!(
                "bad post-copy fill of page {page}"
            )));
        }
        let mut c = UffdioCopy {
            dst: (self.base + off) as u64,
            src: data.as_ptr() as u64,
            len: PAGE as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads one `struct uffdio_copy`; `src` points at
        // PAGE readable bytes (checked) and `dst` inside the registered range.
        if unsafe { libc::ioctl(self.uffd.0.as_raw_fd(), UFFDIO_COPY as _, &mut c) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(false);
            }
            return Err(VmmError::Memory(format!("UFFDIO_COPY page {page}: {e}")));
        }
        Ok(true)
    }
}

/// Kernel dirty tracking of a process memory range: userfaultfd
/// write-protect in async mode (a write just clears the protection, no fault
/// is delivered) and `PAGEMAP_SCAN`, which reports the written pages and
/// re-protects them in one call.
pub struct WriteTracker {
    uffd: Uffd,
    pagemap: std::fs::File,
    base: usize,
    len: usize,
    regions: Vec<PageRegion>,
}

impl WriteTracker {
    /// Starts tracking `base..base+len` (private anonymous memory of this
    /// process that stays mapped while this lives). Nothing counts as written yet.
    pub fn start(base: usize, len: usize) -> Result<Self, VmmError> {
        if !base.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(VmmError::Memory("tracked range is not page aligned".into()));
        }
        let uffd = Uffd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)?;
        uffd.register(base, len, UFFDIO_REGISTER_MODE_WP)?;
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: base as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect` over a registered range.
        if unsafe { libc::ioctl(uffd.0.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } != 0 {
            return Err(os_err("UFFDIO_WRITEPROTECT"));
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| VmmError::Memory(format!("/proc/self/pagemap: {e}")))?;
        Ok(Self {
            uffd,
            pagemap,
            base,
            len,
            regions: vec![PageRegion::default(); 4096],
        })
    }

    /// Calls `each(page)` for every page written since the last call (or
    /// since start) and write-protects them again, atomically per page.
    pub fn take_written(&mut self, mut each: impl FnMut(u64)) -> Result<(), VmmError> {
        let end = (self.base + self.len) as u64;
        let mut start = self.base as u64;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
            // `struct page_region`s into `self.regions`, which has that many.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(os_err("PAGEMAP_SCAN"));
            }
            for r in &self.regions[..n as usize] {
                let mut a = r.start;
                while a < r.end {
                    each((a - self.base as u64) / PAGE as u64);
                    a += PAGE as u64;
                }
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        // Keep the fd alive with the registration.
        let _ = &self.uffd;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(len: usize) -> usize {
        // SAFETY: a fresh private anonymous mapping; the tests unmap it at the end.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    #[test]
    fn written_pages_are_reported_once() {
        let len = 64 * PAGE;
        let base = anon(len);
        let mut t = match WriteTracker::start(base, len) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED: async write-protect not available here: {e}");
                return;
            }
        };
        for p in [3usize, 4, 40] {
            // SAFETY: inside the mapping made above.
            unsafe { *((base + p * PAGE + 7) as *mut u8) = 1 };
        }
        let mut got = Vec::new();
        t.take_written(|p| got.push(p)).unwrap();
        assert_eq!(got, vec![3, 4, 40]);
        got.clear();
        t.take_written(|p| got.push(p)).unwrap();
        assert!(got.is_empty(), "{got:?}");
        // SAFETY: inside the mapping made above.
        unsafe { *((base + 9 * PAGE) as *mut u8) = 2 };
        t.take_written(|p| got.push(p)).unwrap();
        assert_eq!(got, vec![9]);
        drop(t);
        // SAFETY: unmaps the mapping made above; nothing refers to it any more.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
    }

    #[test]
    fn dropped_runs_read_as_zero_and_the_rest_is_kept() {
        // 1,500 runs: two process_madvise batches, scattered like a busy
        // guest's stale pages.
        let pages = 3000;
        let base = anon(pages * PAGE);
        for p in 0..pages {
            // SAFETY: inside the mapping made above.
            unsafe { *((base + p * PAGE) as *mut u8) = 7 };
        }
        let runs: Vec<(u64, u64)> = (0..pages as u64 / 2).map(|i| (i * 2, 1)).collect();
        drop_runs(base, &runs).unwrap();
        for p in 0..pages {
            // SAFETY: inside the mapping made above.
            let v = unsafe { *((base + p * PAGE) as *const u8) };
            assert_eq!(v, if p % 2 == 0 { 0 } else { 7 }, "page {p}");
        }
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(base as *mut libc::c_void, pages * PAGE) };
    }

    #[test]
    fn missing_pages_fault_and_fill() {
        let len = 16 * PAGE;
        let base = anon(len);
        // SAFETY: inside the mapping made above.
        unsafe { *((base + 2 * PAGE) as *mut u8) = 9 };
        let mp = match MissingPages::register(base, len, &[(2, 1)]) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("SKIPPED: userfaultfd not available here: {e}");
                return;
            }
        };
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; blocks until the page is filled.
            unsafe { std::ptr::read_volatile((base + 2 * PAGE + 1) as *const u8) }
        });
        let page = loop {
            if let Some(p) = mp.next_fault(Duration::from_secs(5)).unwrap() {
                break p;
            }
        };
        assert_eq!(page, 2);
        let mut data = vec![0u8; PAGE];
        data[1] = 42;
        assert!(mp.fill(2, &data).unwrap());
        assert_eq!(reader.join().unwrap(), 42);
        assert!(!mp.fill(2, &data).unwrap(), "a second fill is a no-op");
        drop(mp);
        // SAFETY: unmaps the mapping made above; the reader thread is done.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
    }
}
