//! The sending side.

use crate::scan::is_zero_page;
use crate::{zrle, Compression, Tag, FRAME_MAGIC, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use rustc_hash::FxHashMap as HashMap;
use xxhash_rust::xxh3::xxh3_128;

/// How the encoder works. Change it between frames with [`Encoder::set_compression`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Compression for pages that are not zero, duplicate or delta.
    pub compression: Compression,
    /// Pages whose last sent copy is kept for XOR deltas (0 disables deltas).
    /// Memory: this many × 4 KiB.
    pub xor_cache_pages: usize,
    /// Most content hashes remembered for duplicate detection (0 disables it).
    pub dedup_entries: usize,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            compression: Compression::Lz4,
            xor_cache_pages: 16 * 1024, // 64 MiB
            dedup_entries: 1 << 20,
        }
    }
}

/// What one or more frames contained.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Pages per tag, indexed by `Tag as usize`.
    pub pages_by_tag: [u64; 6],
    /// Page bytes in.
    pub bytes_in: u64,
    /// Frame bytes out.
    pub bytes_out: u64,
    /// Page bytes that went to the configured compression (sent compressed
    /// or, when it did not pay, raw): what an adaptive policy learns from.
    pub packed_in: u64,
    /// Their payload bytes out.
    pub packed_out: u64,
}

impl EncodeStats {
    /// Pages encoded.
    pub fn pages(&self) -> u64 {
        self.pages_by_tag.iter().sum()
    }

    /// Pages with one tag.
    pub fn count(&self, tag: Tag) -> u64 {
        self.pages_by_tag[tag as usize]
    }

    /// Output / input (1.0 = no saving).
    pub fn ratio(&self) -> f64 {
        if self.bytes_in == 0 {
            1.0
        } else {
            self.bytes_out as f64 / self.bytes_in as f64
        }
    }

    /// Adds another set of statistics into this one.
    pub fn add(&mut self, o: &EncodeStats) {
        for (a, b) in self.pages_by_tag.iter_mut().zip(o.pages_by_tag) {
            *a += b;
        }
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.packed_in += o.packed_in;
        self.packed_out += o.packed_out;
    }
}

/// Last-sent copies of pages in one preallocated slab, evicted in FIFO order.
struct XorCache {
    slab: Vec<u8>,
    slot_of: HashMap<u64, usize>,
    owner: Vec<Option<u64>>,
    next_victim: usize,
}

impl XorCache {
    fn new(pages: usize) -> Self {
        Self {
            slab: vec![0; pages * PAGE_SIZE],
            slot_of: HashMap::with_capacity_and_hasher(pages, Default::default()),
            owner: vec![None; pages],
            next_victim: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.owner.len()
    }

    fn get(&self, page: u64) -> Option<&[u8]> {
        let slot = *self.slot_of.get(&page)?;
        Some(&self.slab[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE])
    }

    fn put(&mut self, page: u64, data: &[u8]) {
        if self.capacity() == 0 {
            return;
        }
        let slot = match self.slot_of.get(&page) {
            Some(&s) => s,
            None => {
                let s = self.next_victim;
                self.next_victim = (s + 1) % self.capacity();
                if let Some(old) = self.owner[s].replace(page) {
                    self.slot_of.remove(&old);
                }
                self.slot_of.insert(page, s);
                s
            }
        };
        self.slab[slot * PAGE_SIZE..(slot + 1) * PAGE_SIZE].copy_from_slice(data);
    }

    fn forget(&mut self, page: u64) {
        if let Some(s) = self.slot_of.remove(&page) {
            self.owner[s] = None;
        }
    }
}

/// Encodes runs of pages into frames. Keep one per migration: it remembers
/// what was sent so later rounds can send references and deltas.
pub struct Encoder {
    cfg: EncoderConfig,
    cache: XorCache,
    /// Content hash -> a page that holds it on the destination now.
    holder_of: HashMap<u128, u64>,
    /// Page -> the hash of what the destination holds for it.
    hash_of: HashMap<u64, u128>,
    /// Whether pages sent now are kept for later deltas.
    caching: bool,
    scratch_delta: Vec<u8>,
    scratch_comp: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zstd_level: i32,
}

impl Encoder {
    /// A fresh encoder (nothing sent yet).
    pub fn new(cfg: EncoderConfig) -> Self {
        Self {
            cache: XorCache::new(cfg.xor_cache_pages),
            holder_of: HashMap::default(),
            hash_of: HashMap::default(),
            caching: true,
            scratch_delta: vec![0; PAGE_SIZE],
            scratch_comp: vec![0; zstd::zstd_safe::compress_bound(PAGE_SIZE).max(PAGE_SIZE * 2)],
            zstd: None,
            zstd_level: 0,
            cfg,
        }
    }

    /// The current configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// Whether the pages of the following frames are kept as XOR-delta
    /// bases (on by default). A first pass over all of memory turns it off:
    /// the bounded cache would keep only its last pages, at the price of a
    /// copy of every page, while a page sent again is likely sent again.
    pub fn set_caching(&mut self, on: bool) {
        self.caching = on;
    }

    /// Switches compression for the following frames (the adaptive policy calls this).
    pub fn set_compression(&mut self, c: Compression) {
        self.cfg.compression = c;
    }

    /// Appends one frame holding `pages` (index, 4 KiB content) to `out`.
    /// Panics if a page is not 4 KiB or more than [`MAX_PAGES_PER_FRAME`] are
    /// given: both are programming errors on the sending side, not input.
    pub fn encode_frame<'a>(
        &mut self,
        pages: impl IntoIterator<Item = (u64, &'a [u8])>,
        out: &mut Vec<u8>,
    ) -> EncodeStats {
        self.encode(pages.into_iter().map(|(i, d)| (i, d, None)), out)
    }

    /// [`Encoder::encode_frame`] for a caller that hashed each page
    /// already (index, content, hash): duplicates are found by that hash
    /// instead of one the encoder computes. It must identify content as
    /// well as a cryptographic hash does (e.g. 128 bits of its BLAKE3):
    /// two pages with one hash are sent as one.
    pub fn encode_frame_hashed<'a>(
        &mut self,
        pages: impl IntoIterator<Item = (u64, &'a [u8], u128)>,
        out: &mut Vec<u8>,
    ) -> EncodeStats {
        self.encode(pages.into_iter().map(|(i, d, h)| (i, d, Some(h))), out)
    }

    fn encode<'a>(
        &mut self,
        pages: impl Iterator<Item = (u64, &'a [u8], Option<u128>)>,
        out: &mut Vec<u8>,
    ) -> EncodeStats {
        let start = out.len();
        out.extend_from_slice(&FRAME_MAGIC);
        let count_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut stats = EncodeStats::default();
        let mut count = 0u32;
        for (index, data, hash) in pages {
            assert_eq!(data.len(), PAGE_SIZE, "pages are 4 KiB");
            assert!(
                (count as usize) < MAX_PAGES_PER_FRAME,
                "too many pages in one frame"
            );
            let before = out.len();
            let tag = self.encode_page(index, data, hash, out);
            stats.pages_by_tag[tag as usize] += 1;
            if matches!(tag, Tag::Lz4 | Tag::Zstd | Tag::Raw) {
                stats.packed_in += PAGE_SIZE as u64;
                // Less the page index and tag (and the length of a compressed one).
                let header = if tag == Tag::Raw { 9 } else { 11 };
                stats.packed_out += (out.len() - before - header) as u64;
            }
            count += 1;
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        stats.bytes_in = u64::from(count) * PAGE_SIZE as u64;
        stats.bytes_out = (out.len() - start) as u64;
        stats
    }

    fn remember_content(&mut self, index: u64, hash: Option<u128>) {
        // The destination's copy of `index` changes: it can no longer serve as
        // the holder of its old content.
        if let Some(old) = self.hash_of.remove(&index) {
            if self.holder_of.get(&old) == Some(&index) {
                self.holder_of.remove(&old);
            }
        }
        if let Some(h) = hash {
            if self.hash_of.len() < self.cfg.dedup_entries {
                self.hash_of.insert(index, h);
                self.holder_of.entry(h).or_insert(index);
            }
        }
    }

    fn encode_page(
        &mut self,
        index: u64,
        data: &[u8],
        hash: Option<u128>,
        out: &mut Vec<u8>,
    ) -> Tag {
        out.extend_from_slice(&index.to_le_bytes());
        if is_zero_page(data) {
            out.push(Tag::Zero as u8);
            self.remember_content(index, None);
            self.cache.forget(index);
            return Tag::Zero;
        }
        let hash = (self.cfg.dedup_entries > 0).then(|| hash.unwrap_or_else(|| xxh3_128(data)));
        if let Some(h) = hash {
            if let Some(&holder) = self.holder_of.get(&h) {
                out.push(Tag::Duplicate as u8);
                out.extend_from_slice(&holder.to_le_bytes());
                if holder != index {
                    self.finish(index, data, Some(h));
                }
                return Tag::Duplicate;
            }
        }

        // Candidates: a delta against the last copy, and the configured compression.
        let delta_len = self.cache.get(index).and_then(|old| {
            // Only worth it if well under a page; the limit also bounds the work.
            let limit = PAGE_SIZE / 2;
            zrle::encode(old, data, &mut self.scratch_delta[..limit])
        });
        let comp_len = match self.cfg.compression {
            // A delta that small beats any compressor: skip compressing.
            _ if delta_len.is_some_and(|d| d < 512) => None,
            Compression::None => None,
            Compression::Lz4 => lz4_flex::block::compress_into(data, &mut self.scratch_comp)
                .ok()
                .map(|n| (Tag::Lz4, n)),
            Compression::Zstd(level) => {
                if self.zstd.is_none() || self.zstd_level != level {
                    self.zstd = zstd::bulk::Compressor::new(level).ok();
                    self.zstd_level = level;
                }
                self.zstd
                    .as_mut()
                    .and_then(|z| z.compress_to_buffer(data, &mut self.scratch_comp[..]).ok())
                    .map(|n| (Tag::Zstd, n))
            }
        };
        let best_comp = comp_len.filter(|&(_, n)| n < PAGE_SIZE - 64);
        match (delta_len, best_comp) {
            (Some(d), c) if c.is_none_or(|(_, n)| d <= n) => {
                out.push(Tag::XorDelta as u8);
                out.extend_from_slice(&(d as u16).to_le_bytes());
                out.extend_from_slice(&self.scratch_delta[..d]);
                self.finish(index, data, hash);
                Tag::XorDelta
            }
            (_, Some((tag, n))) => {
                out.push(tag as u8);
                out.extend_from_slice(&(n as u16).to_le_bytes());
                out.extend_from_slice(&self.scratch_comp[..n]);
                self.finish(index, data, hash);
                tag
            }
            _ => {
                out.push(Tag::Raw as u8);
                out.extend_from_slice(data);
                self.finish(index, data, hash);
                Tag::Raw
            }
        }
    }

    fn finish(&mut self, index: u64, data: &[u8], hash: Option<u128>) {
        self.remember_content(index, hash);
        if self.caching {
            self.cache.put(index, data);
        } else {
            // Its cached copy, if any, is stale now.
            self.cache.forget(index);
        }
    }
}
