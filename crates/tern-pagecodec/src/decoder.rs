//! The receiving side.

use crate::{is_zero_page, zrle, Tag, FRAME_MAGIC, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use rustc_hash::FxHashMap;

/// Why a frame was refused. Guest memory is untouched when any of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with the magic and version this build speaks.
    #[error("not a page frame (bad magic or version)")]
    BadMagic,
    /// The frame claims more pages than any encoder writes.
    #[error("frame claims {0} pages, more than the limit of {MAX_PAGES_PER_FRAME}")]
    TooManyPages(u32),
    /// The frame ends inside an entry.
    #[error("frame truncated in entry {entry}")]
    Truncated {
        /// Entry number.
        entry: usize,
    },
    /// Bytes follow the last entry.
    #[error("{0} bytes after the last entry")]
    TrailingBytes(usize),
    /// A page index outside guest memory.
    #[error("entry {entry}: page {page} is outside guest memory ({pages} pages)")]
    PageOutOfRange {
        /// Entry number.
        entry: usize,
        /// Claimed page.
        page: u64,
        /// Pages in guest memory.
        pages: u64,
    },
    /// The same page twice in one frame.
    #[error("entry {entry}: page {page} appears twice in one frame")]
    RepeatedPage {
        /// Entry number.
        entry: usize,
        /// The page.
        page: u64,
    },
    /// An unknown encoding tag.
    #[error("entry {entry}: unknown encoding tag {tag}")]
    BadTag {
        /// Entry number.
        entry: usize,
        /// The tag byte.
        tag: u8,
    },
    /// A delta or duplicate whose base page was never received.
    #[error("entry {entry}: page {page} refers to page {base}, which was never received")]
    NoBase {
        /// Entry number.
        entry: usize,
        /// The page.
        page: u64,
        /// The missing base.
        base: u64,
    },
    /// A payload that does not decode to exactly one page.
    #[error("entry {entry}: page {page}: {reason}")]
    BadPayload {
        /// Entry number.
        entry: usize,
        /// The page.
        page: u64,
        /// What is wrong.
        reason: String,
    },
    /// The memory given to the decoder is not the size it was made for.
    #[error("guest memory is {got} bytes, decoder was made for {want}")]
    MemorySize {
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
}

/// What a frame held.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Pages written.
    pub pages: u64,
    /// Pages per tag, indexed by `Tag as usize`.
    pub pages_by_tag: [u64; 6],
}

/// Decodes frames into guest memory. One per migration, fed frames in order.
pub struct Decoder {
    pages: u64,
    received: Vec<u64>,
    /// Pages rebuilt (decompressed, delta-applied, copied from memory):
    /// raw pages are read from the frame itself, saving a copy of each.
    staging: Vec<u8>,
    slots_used: usize,
    /// The last frame's pages, in frame order, and where each one's new
    /// content is.
    staged: Vec<(u64, Content)>,
    /// Runs of pages (first, count) the last frame fills for the first
    /// time with content that is not zero: what a receiver may pre-fault.
    fresh: Vec<(u64, u64)>,
    /// Page -> its entry in the frame being staged.
    slot_of: FxHashMap<u64, usize>,
    zstd: zstd::bulk::Decompressor<'static>,
}

/// Where a staged page's new content is.
#[derive(Clone, Copy, Debug)]
enum Content {
    /// In the frame, at this offset (a raw page).
    Frame(usize),
    /// In this slot of the staging buffer.
    Slot(usize),
    /// A zero page.
    Zero,
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// A frame validated and decoded, not yet written to guest memory: see
/// [`Decoder::stage`]. Dropping it writes nothing and marks nothing
/// received.
pub struct Staged<'d, 'f> {
    dec: &'d mut Decoder,
    frame: &'f [u8],
    stats: DecodeStats,
}

impl Staged<'_, '_> {
    /// The frame's pages with their new contents, in frame order: lets a
    /// receiver hash pages as they arrive instead of all of RAM at the end.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let (dec, frame) = (&*self.dec, self.frame);
        dec.staged
            .iter()
            .map(move |&(p, c)| (p, dec.content(frame, c)))
    }

    /// Runs of pages (first, count) this frame fills for the first time
    /// with content that is not zero: fresh memory a receiver may populate
    /// in one call per run (`MADV_POPULATE_WRITE`) instead of taking a
    /// page fault per page.
    pub fn fresh_runs(&self) -> &[(u64, u64)] {
        &self.dec.fresh
    }

    /// Writes the pages into `mem` (the memory the frame was staged
    /// against) and marks them received. A zero page over a page that
    /// already reads as zero is not written: in fresh RAM that read maps
    /// the kernel's shared zero page, where the write would allocate and
    /// clear a page of its own (first touch runs at 0.4-1.4 GB/s here).
    pub fn commit(self, mem: &mut [u8]) -> Result<DecodeStats, DecodeError> {
        let dec = self.dec;
        dec.check_size(mem)?;
        for &(page, c) in &dec.staged {
            let new = dec.content(self.frame, c);
            let old = &mut mem[page as usize * PAGE_SIZE..][..PAGE_SIZE];
            if is_zero_page(new) && is_zero_page(old) {
                continue;
            }
            old.copy_from_slice(new);
        }
        dec.mark_staged();
        Ok(self.stats)
    }

    /// Marks the pages received without writing them: the caller placed
    /// them itself (post-copy, where RAM is guarded by userfaultfd).
    pub fn placed_elsewhere(self) -> DecodeStats {
        self.dec.mark_staged();
        self.stats
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

impl Decoder {
    /// A decoder for guest memory of `pages` pages, nothing received yet.
    pub fn new(pages: u64) -> Self {
        Self {
            pages,
            received: vec![0; pages.div_ceil(64) as usize],
            staging: Vec::new(),
            slots_used: 0,
            staged: Vec::new(),
            fresh: Vec::new(),
            slot_of: FxHashMap::default(),
            zstd: zstd::bulk::Decompressor::new().expect("zstd decompressor"),
        }
    }

    /// Whether a page has been received (by any frame so far).
    pub fn has(&self, page: u64) -> bool {
        page < self.pages && self.received[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Marks a page as present without a frame (e.g. it arrived by another path).
    pub fn mark_received(&mut self, page: u64) {
        if page < self.pages {
            self.received[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Pages received so far.
    pub fn received_count(&self) -> u64 {
        self.received
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Validates and decodes one frame, then writes its pages into `mem`.
    /// On error nothing is written.
    pub fn decode_frame(
        &mut self,
        frame: &[u8],
        mem: &mut [u8],
    ) -> Result<DecodeStats, DecodeError> {
        self.stage(frame, mem)?.commit(mem)
    }

    /// Validates and decodes one frame against `mem` (the bases of its
    /// duplicates and deltas) without writing anything yet: the caller may
    /// hash the pages and prepare memory before [`Staged::commit`].
    pub fn stage<'d, 'f>(
        &'d mut self,
        frame: &'f [u8],
        mem: &[u8],
    ) -> Result<Staged<'d, 'f>, DecodeError> {
        self.check_size(mem)?;
        let stats = self.stage_entries(frame, Some(mem))?;
        Ok(Staged {
            dec: self,
            frame,
            stats,
        })
    }

    /// Validates and decodes a frame of self-contained pages (no duplicate
    /// or delta references to memory) without touching guest memory: the
    /// caller places the pages itself and then calls
    /// [`Staged::placed_elsewhere`] (post-copy, where RAM is guarded by
    /// userfaultfd). A frame that refers to memory is refused.
    pub fn decode_frame_detached<'d, 'f>(
        &'d mut self,
        frame: &'f [u8],
    ) -> Result<Staged<'d, 'f>, DecodeError> {
        let stats = self.stage_entries(frame, None)?;
        Ok(Staged {
            dec: self,
            frame,
            stats,
        })
    }

    fn check_size(&self, mem: &[u8]) -> Result<(), DecodeError> {
        let want = self.pages as usize * PAGE_SIZE;
        if mem.len() != want {
            return Err(DecodeError::MemorySize {
                got: mem.len(),
                want,
            });
        }
        Ok(())
    }

    fn content<'a>(&'a self, frame: &'a [u8], c: Content) -> &'a [u8] {
        match c {
            Content::Frame(at) => &frame[at..at + PAGE_SIZE],
            Content::Slot(s) => &self.staging[s * PAGE_SIZE..(s + 1) * PAGE_SIZE],
            Content::Zero => &ZERO_PAGE,
        }
    }

    /// A staging slot of its own for the next rebuilt page.
    fn new_slot(&mut self) -> usize {
        self.slots_used += 1;
        self.slots_used - 1
    }

    fn mark_staged(&mut self) {
        for &(page, _) in &self.staged {
            self.received[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Notes a page as filled by this frame: fresh memory not zero joins
    /// the runs a receiver may pre-fault.
    fn note_fresh(&mut self, page: u64, tag: Tag) {
        if tag == Tag::Zero || has(&self.received, page) {
            return;
        }
        match self.fresh.last_mut() {
            Some((first, n)) if *first + *n == page => *n += 1,
            _ => self.fresh.push((page, 1)),
        }
    }

    fn stage_entries(
        &mut self,
        frame: &[u8],
        mem: Option<&[u8]>,
    ) -> Result<DecodeStats, DecodeError> {
        let mut r = Reader {
            data: frame,
            pos: 0,
        };
        if r.take(4) != Some(&FRAME_MAGIC[..]) {
            return Err(DecodeError::BadMagic);
        }
        let count = r.u32().ok_or(DecodeError::Truncated { entry: 0 })?;
        if count as usize > MAX_PAGES_PER_FRAME {
            return Err(DecodeError::TooManyPages(count));
        }
        let count = count as usize;
        if self.staging.len() < count * PAGE_SIZE {
            self.staging.resize(count * PAGE_SIZE, 0);
        }
        self.staged.clear();
        self.fresh.clear();
        self.slot_of.clear();
        self.slots_used = 0;
        let mut stats = DecodeStats::default();

        for entry in 0..count {
            let trunc = DecodeError::Truncated { entry };
            let page = r.u64().ok_or(trunc.clone())?;
            if page >= self.pages {
                return Err(DecodeError::PageOutOfRange {
                    entry,
                    page,
                    pages: self.pages,
                });
            }
            if self.slot_of.insert(page, entry).is_some() {
                return Err(DecodeError::RepeatedPage { entry, page });
            }
            let tag_byte = r.u8().ok_or(trunc.clone())?;
            let tag = Tag::from_byte(tag_byte).ok_or(DecodeError::BadTag {
                entry,
                tag: tag_byte,
            })?;
            let content = self.stage_page(&mut r, mem, entry, page, tag)?;
            self.note_fresh(page, tag);
            self.staged.push((page, content));
            stats.pages_by_tag[tag as usize] += 1;
        }
        if r.pos != frame.len() {
            return Err(DecodeError::TrailingBytes(frame.len() - r.pos));
        }
        stats.pages = count as u64;
        Ok(stats)
    }

    /// Decodes entry `entry` (page `page`, its tag read) and says where
    /// its new content is.
    fn stage_page(
        &mut self,
        r: &mut Reader<'_>,
        mem: Option<&[u8]>,
        entry: usize,
        page: u64,
        tag: Tag,
    ) -> Result<Content, DecodeError> {
        let trunc = DecodeError::Truncated { entry };
        let bad = |reason: String| DecodeError::BadPayload {
            entry,
            page,
            reason,
        };
        match tag {
            Tag::Zero => Ok(Content::Zero),
            Tag::Raw => {
                let at = r.pos;
                r.take(PAGE_SIZE).ok_or(trunc)?;
                Ok(Content::Frame(at))
            }
            Tag::Duplicate => {
                let base = r.u64().ok_or(trunc)?;
                if base >= self.pages {
                    return Err(DecodeError::PageOutOfRange {
                        entry,
                        page: base,
                        pages: self.pages,
                    });
                }
                // A base staged earlier in this frame: the same content.
                match self.slot_of.get(&base) {
                    Some(&e) if e < entry => Ok(self.staged[e].1),
                    Some(_) | None if has(&self.received, base) && mem.is_some() => {
                        let mem = mem.expect("checked");
                        let s = self.new_slot();
                        self.staging[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]
                            .copy_from_slice(&mem[base as usize * PAGE_SIZE..][..PAGE_SIZE]);
                        Ok(Content::Slot(s))
                    }
                    _ => Err(DecodeError::NoBase { entry, page, base }),
                }
            }
            Tag::XorDelta | Tag::Lz4 | Tag::Zstd => {
                let len = r.u16().ok_or(trunc.clone())? as usize;
                let payload = r.take(len).ok_or(trunc)?;
                let received = has(&self.received, page);
                let s = self.new_slot();
                let slot = &mut self.staging[s * PAGE_SIZE..(s + 1) * PAGE_SIZE];
                match tag {
                    Tag::XorDelta => {
                        let Some(mem) = mem.filter(|_| received) else {
                            return Err(DecodeError::NoBase {
                                entry,
                                page,
                                base: page,
                            });
                        };
                        slot.copy_from_slice(&mem[page as usize * PAGE_SIZE..][..PAGE_SIZE]);
                        zrle::apply(payload, slot).map_err(|e| bad(e.to_string()))?;
                    }
                    Tag::Lz4 => {
                        let n = lz4_flex::block::decompress_into(payload, slot)
                            .map_err(|e| bad(format!("lz4: {e}")))?;
                        if n != PAGE_SIZE {
                            return Err(bad(format!("lz4 gave {n} bytes, not a page")));
                        }
                    }
                    _ => {
                        let n = self
                            .zstd
                            .decompress_to_buffer(payload, slot)
                            .map_err(|e| bad(format!("zstd: {e}")))?;
                        if n != PAGE_SIZE {
                            return Err(bad(format!("zstd gave {n} bytes, not a page")));
                        }
                    }
                }
                Ok(Content::Slot(s))
            }
        }
    }
}

fn has(bits: &[u64], page: u64) -> bool {
    bits[(page / 64) as usize] & (1 << (page % 64)) != 0
}
