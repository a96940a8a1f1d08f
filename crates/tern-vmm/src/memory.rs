//! Guest RAM: one vm-memory region per KVM slot, with a write bitmap so the
//! pages the monitor itself writes are tracked next to KVM's dirty log.

use crate::VmmError;
use std::fs::File;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryRegion, GuestRegionMmap};

/// Guest RAM with a dirty bitmap (one bit per 4 KiB page) on every region.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest page size.
pub use tern_guest::PAGE_SIZE;

/// Where guest RAM comes from.
#[derive(Debug)]
pub enum Backing<'a> {
    /// Fresh anonymous memory.
    Anonymous {
        /// Back it with 2 MiB huge pages (needs pages reserved in
        /// /proc/sys/vm/nr_hugepages).
        hugepages: bool,
    },
    /// A private (copy-on-write) mapping of a full snapshot's memory file:
    /// restore touches no page until the guest does.
    SnapshotFile(&'a File),
}

fn mem_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// Maps `bytes` of guest RAM at guest physical 0.
pub fn create(bytes: u64, backing: Backing<'_>) -> Result<GuestMem, VmmError> {
    if bytes == 0 || !bytes.is_multiple_of(2 << 20) {
        return Err(VmmError::Config(format!(
            "guest memory must be a non-zero multiple of 2 MiB, not {bytes} bytes"
        )));
    }
    let size = usize::try_from(bytes).map_err(mem_err)?;
    let bitmap = <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size);
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let builder = MmapRegionBuilder::new_with_bitmap(size, bitmap).with_mmap_prot(prot);
    let builder = match backing {
        Backing::Anonymous { hugepages: false } => {
            builder.with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        }
        Backing::Anonymous { hugepages: true } => builder
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB)
            .with_hugetlbfs(true),
        Backing::SnapshotFile(f) => {
            let len = f.metadata().map_err(mem_err)?.len();
            if len != bytes {
                return Err(VmmError::Snapshot(format!(
                    "memory file holds {len} bytes, the snapshot says {bytes}"
                )));
            }
            let f = f.try_clone().map_err(mem_err)?;
            builder
                .with_file_offset(FileOffset::new(f, 0))
                .with_mmap_flags(libc::MAP_PRIVATE)
        }
    };
    let region = builder.build().map_err(|e| match backing {
        Backing::Anonymous { hugepages: true } => VmmError::Memory(format!(
            "cannot map {bytes} bytes of huge pages ({e}); reserve them in /proc/sys/vm/nr_hugepages"
        )),
        _ => mem_err(e),
    })?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| VmmError::Memory("guest region overflows".into()))?;
    GuestMem::from_regions(vec![region]).map_err(mem_err)
}

/// Total bytes of guest RAM.
pub fn total_bytes(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The host address and length of every region, in slot order.
pub fn host_regions(mem: &GuestMem) -> Vec<(u64, *mut u8, usize)> {
    mem.iter()
        .map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize))
        .collect()
}

pub use tern_guest::DirtyBitmap;

/// Takes (and clears) the pages the monitor wrote through vm-memory.
pub fn take_monitor_writes(mem: &GuestMem) -> DirtyBitmap {
    let mut out = DirtyBitmap::with_pages(total_bytes(mem) / PAGE_SIZE);
    for r in mem.iter() {
        let first = r.start_addr().0 / PAGE_SIZE;
        let words = vm_memory::MmapRegion::bitmap(r).get_and_reset();
        for (i, &w) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
            out.insert_word(first + i as u64 * 64, w);
        }
    }
    out
}

/// The pages of anonymous guest RAM ever written (in memory or swapped
/// out), from this process's page map: a page never touched is not mapped
/// at all and reads as zeros. Only for anonymous RAM: an untouched page of
/// a file mapping is not mapped either, yet holds the file's bytes.
/// `None` when the page map cannot be read (a jailed process does not see
/// `/proc`): then every page counts as written.
pub fn populated(mem: &GuestMem) -> Option<DirtyBitmap> {
    let regions = mem.iter().map(|r| {
        (
            r.start_addr().0 / PAGE_SIZE,
            r.as_ptr() as usize,
            r.len() as usize,
        )
    });
    or_every_page(read_populated(total_bytes(mem) / PAGE_SIZE, regions))
}

/// Backs pages `first..first + pages` of `ram` (page 0 at its start,
/// page-aligned) with memory, as a write to each would, without writing:
/// one call instead of a page fault per page. Pages out of range are left
/// alone; a kernel without `MADV_POPULATE_WRITE` (before 5.14) just leaves
/// the faults to the writes.
pub fn prefault(ram: &mut [u8], first: u64, pages: u64) {
    let page = PAGE_SIZE as usize;
    let Some(range) = usize::try_from(first)
        .ok()
        .zip(usize::try_from(pages).ok())
        .and_then(|(f, n)| Some(f.checked_mul(page)?..f.checked_add(n)?.checked_mul(page)?))
        .filter(|r| r.end <= ram.len() && r.start < r.end)
    else {
        return;
    };
    let part = &mut ram[range];
    // SAFETY: `part` is memory this process owns and we hold exclusively;
    // populating it changes no byte of it (fresh pages read zero either way).
    let rc = unsafe {
        libc::madvise(
            part.as_mut_ptr().cast(),
            part.len(),
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc != 0 {
        tracing::trace!(error = %std::io::Error::last_os_error(), "prefault");
    }
}

/// [`populated`] for one anonymous mapping of this process at
/// `base..base+len` (page 0 at `base`).
pub fn populated_range(base: usize, len: usize) -> Option<DirtyBitmap> {
    or_every_page(read_populated(
        (len / PAGE_SIZE as usize) as u64,
        std::iter::once((0, base, len)),
    ))
}

fn or_every_page(read: std::io::Result<DirtyBitmap>) -> Option<DirtyBitmap> {
    match read {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::debug!(error = %e, "no page map: every page counts as written");
            None
        }
    }
}

/// Reads the page map for `regions` (first guest page, host address,
/// bytes) into a set of `pages` pages.
fn read_populated(
    pages: u64,
    regions: impl Iterator<Item = (u64, usize, usize)>,
) -> std::io::Result<DirtyBitmap> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    /// A swap entry's type (bits 0-4, shown to root). The last type marks
    /// a PTE marker, not a page: userfaultfd write-protect (the process
    /// workload's dirty tracking) leaves one on every page never touched.
    const SWAP_TYPE: u64 = 0x1f;
    const MARKER: u64 = 0x1f;
    /// Entries read at once: 512 KiB of page map, 256 MiB of RAM.
    const BATCH: usize = 64 << 10;
    let map = File::open("/proc/self/pagemap")?;
    let mut out = DirtyBitmap::with_pages(pages);
    let mut buf = vec![0u8; BATCH * 8];
    for (first, host, len) in regions {
        let host_page = host as u64 / PAGE_SIZE;
        let pages = len as u64 / PAGE_SIZE;
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(BATCH as u64) as usize;
            let chunk = &mut buf[..n * 8];
            map.read_exact_at(chunk, (host_page + done) * 8)?;
            for (i, e) in chunk.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if e & PRESENT != 0 || (e & SWAPPED != 0 && e & SWAP_TYPE != MARKER) {
                    out.insert(first + done + i as u64);
                }
            }
            done += n as u64;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn monitor_writes_are_tracked() {
        let mem = create(4 << 20, Backing::Anonymous { hugepages: false }).unwrap();
        let _ = take_monitor_writes(&mem);
        mem.write_obj(7u64, GuestAddress(5 * PAGE_SIZE + 8))
            .unwrap();
        mem.write_slice(&[1u8; 5000], GuestAddress(100 * PAGE_SIZE))
            .unwrap();
        let d = take_monitor_writes(&mem);
        assert_eq!(d.pages().collect::<Vec<_>>(), vec![5, 100, 101]);
        assert_eq!(take_monitor_writes(&mem).count(), 0);
    }

    #[test]
    fn prefault_backs_only_the_pages_asked_for_and_changes_no_byte() {
        let mut region = crate::procmem::Region::new(64 * PAGE_SIZE as usize, false).unwrap();
        prefault(region.as_mut_slice(), 3, 2);
        prefault(region.as_mut_slice(), 60, 10); // past the end: left alone
        prefault(region.as_mut_slice(), u64::MAX, 2);
        let p = region.populated().unwrap();
        assert_eq!(p.pages().collect::<Vec<_>>(), vec![3, 4]);
        assert!(region.as_mut_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn only_written_pages_are_populated() {
        let mem = create(4 << 20, Backing::Anonymous { hugepages: false }).unwrap();
        assert_eq!(populated(&mem).unwrap().count(), 0);
        mem.write_obj(7u64, GuestAddress(3 * PAGE_SIZE)).unwrap();
        mem.write_slice(&[1u8; 5000], GuestAddress(700 * PAGE_SIZE))
            .unwrap();
        let p = populated(&mem).unwrap();
        assert_eq!(p.pages().collect::<Vec<_>>(), vec![3, 700, 701]);
    }

    #[test]
    fn refuses_odd_sizes() {
        assert!(create(3 << 19, Backing::Anonymous { hugepages: false }).is_err());
    }
}
