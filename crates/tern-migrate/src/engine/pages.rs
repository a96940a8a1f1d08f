//! The page stream: reading guest pages, encoding them into frames, keeping
//! every page's hash as last sent (the manifest's root), and publishing
//! progress as frames go out.

use super::codec::CodecChooser;
use super::digests::PageDigests;
use super::eta::{EtaPlan, RoundEta};
use super::{Cancel, Codec, MigrateError, Progress, PAGE};
use crate::guest::SourceGuest;
use crate::protocol::KIND_PAGES;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_pagecodec::{EncodeStats, Encoder, EncoderConfig};
use tern_transport::Sender;
use tokio::sync::watch;

/// Encodes and sends pages, tracking what went out.
pub(super) struct PageSender {
    pub(super) encoder: Encoder,
    /// The compression of each frame.
    codec: CodecChooser,
    /// What every frame so far held, by encoding.
    pub(super) encoded: EncodeStats,
    /// Each page's BLAKE3 hash as last sent (zero pages before).
    pub(super) digests: PageDigests,
    buf: Vec<u8>,
    /// The pages in `buf`: 128 bits of each one's BLAKE3 hash.
    hashes: Vec<u128>,
    /// Buffers of acknowledged frames, for the next ones.
    pool: FramePool,
    /// Frames sent, all kinds (the manifest counts them).
    pub(super) frames: u64,
    /// Pages sent.
    pub(super) pages: u64,
    /// Encoded page bytes sent.
    pub(super) wire: u64,
    /// The round under way, for the time left (none before the first).
    pub(super) eta: Option<RoundEta>,
    progress: watch::Sender<Progress>,
}

impl PageSender {
    /// A sender for a guest of `n_pages`, publishing on `progress`.
    pub(super) fn new(n_pages: u64, codec: Codec, progress: watch::Sender<Progress>) -> Self {
        Self {
            encoder: Encoder::new(encoder_config(n_pages)),
            codec: CodecChooser::new(codec),
            encoded: EncodeStats::default(),
            digests: PageDigests::new(n_pages),
            buf: Vec::new(),
            hashes: Vec::new(),
            pool: FramePool::default(),
            frames: 0,
            pages: 0,
            wire: 0,
            eta: None,
            progress,
        }
    }

    /// Updates the published progress (with the page counters).
    pub(super) fn publish(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(|p| {
            p.pages_sent = self.pages;
            p.wire_bytes = self.wire;
            f(p);
        });
    }

    /// Sends `pages` in frames of `per_frame`; returns the encoded bytes.
    pub(super) async fn send_pages<G: SourceGuest>(
        &mut self,
        guest: &G,
        tx: &Sender,
        pages: &[u64],
        per_frame: usize,
    ) -> Result<u64, MigrateError> {
        let mut wire = 0;
        for chunk in pages.chunks(per_frame.max(1)) {
            let (f, bytes) = self.encode(guest, chunk, tx)?;
            wire += bytes;
            self.send(tx, f).await?;
            self.pages += chunk.len() as u64;
            self.wire += bytes;
            self.published_sent(chunk.len() as u64);
        }
        Ok(wire)
    }

    /// Reads and hashes `chunk` into one encoded frame; returns it and its
    /// encoded bytes. The frame is encoded in place after its kind byte and
    /// handed to the transport as it is: a frame is never copied, and the
    /// window holds it only until the destination acknowledges it.
    fn encode<G: SourceGuest>(
        &mut self,
        guest: &G,
        chunk: &[u64],
        tx: &Sender,
    ) -> Result<(Bytes, u64), MigrateError> {
        self.buf.resize(chunk.len() * PAGE, 0);
        self.hashes.clear();
        for (i, &p) in chunk.iter().enumerate() {
            let slot = &mut self.buf[i * PAGE..(i + 1) * PAGE];
            guest.read(p * PAGE as u64, slot)?;
            let hash = page_hash(slot);
            self.digests.set(p, hash);
            // The encoder finds duplicates by this hash: no second one.
            let first: [u8; 16] = hash[..16].try_into().expect("16 bytes");
            self.hashes.push(u128::from_le_bytes(first));
        }
        let mut out = self.pool.take(1 + chunk.len() * (PAGE + 64) + 64);
        out.push(KIND_PAGES);
        let compression = self.codec.next(&tx.metrics());
        self.encoder.set_compression(compression);
        let t = Instant::now();
        let stats = self.encoder.encode_frame_hashed(
            chunk
                .iter()
                .zip(&self.hashes)
                .enumerate()
                .map(|(i, (&p, &h))| (p, &self.buf[i * PAGE..(i + 1) * PAGE], h)),
            &mut out,
        );
        self.codec
            .observe(compression, &stats, t.elapsed().as_secs_f64());
        self.encoded.add(&stats);
        // A frame of zero or repeated pages is small: do not keep the room
        // reserved for raw pages while it waits in the window.
        if out.len() < out.capacity() / 2 {
            out.shrink_to_fit();
            return Ok((Bytes::from(out), stats.bytes_out));
        }
        Ok((self.pool.frame(out), stats.bytes_out))
    }

    fn published_sent(&self, n: u64) {
        let eta = self.eta.as_ref().and_then(|e| e.eta(self.pages));
        self.publish(|p| {
            p.pages_remaining = p.pages_remaining.saturating_sub(n);
            if let Some(eta) = eta {
                p.eta_seconds = eta;
            }
        });
    }

    /// Starts the time-left estimate of a round of `pages` (its pace is
    /// the last round's until it has its own).
    pub(super) fn start_eta(&mut self, pages: u64, plan: &EtaPlan) {
        let last_pace = self.eta.as_ref().and_then(|e| e.pace(self.pages));
        self.eta = Some(RoundEta::new(pages, self.pages, plan, last_pace));
    }

    /// Sends one frame of any kind, counting it.
    pub(super) async fn send(&mut self, tx: &Sender, f: Bytes) -> Result<(), MigrateError> {
        tx.send(f).await?;
        self.frames += 1;
        Ok(())
    }

    /// From here on, self-contained pages only: a post-copy destination
    /// places them with userfaultfd and has no old copy to apply deltas to.
    pub(super) fn self_contained(&mut self) {
        self.encoder = Encoder::new(EncoderConfig {
            xor_cache_pages: 0,
            dedup_entries: 0,
            ..EncoderConfig::default()
        });
    }

    /// The root over every page's hash as last sent.
    pub(super) fn root(&mut self) -> String {
        self.digests.root()
    }
}

/// Buffers of frames the destination acknowledged, kept for the next
/// frames: each new frame would otherwise be fresh memory, and first
/// touches of fresh memory cost here (perf: `clear_page` under the
/// encoder was 5 % of the source's round 1) what the copies into it do.
#[derive(Clone, Default)]
struct FramePool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Most buffers kept (each a frame: about 1 MiB at 256 pages).
const POOLED_FRAMES: usize = 8;

impl FramePool {
    /// An empty buffer of at least `capacity` bytes.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut free = self.0.lock().expect("frame pool");
        match free.iter().position(|b| b.capacity() >= capacity) {
            Some(i) => free.swap_remove(i),
            None => Vec::with_capacity(capacity),
        }
    }

    /// `buf` as a frame whose memory comes back here when the transport
    /// drops it (acknowledged).
    fn frame(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: FramePool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        let mut free = self.pool.0.lock().expect("frame pool");
        if free.len() < POOLED_FRAMES {
            buf.clear();
            free.push(buf);
        }
    }
}

/// Waits until the destination has acknowledged everything sent, so a
/// round's time is the time its bytes took to arrive, not to be queued.
/// A cancel ends the wait: on a slow link most of a round (small frames of
/// zero pages) is queued at once and then waits here for seconds.
pub(super) async fn drain(
    tx: &Sender,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    while tx.unacked_bytes() > 0 {
        if let Some(e) = tx.error() {
            return Err(e.into());
        }
        if cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(MigrateError::Timeout {
                waiting_for: "acknowledgement",
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The encoder's caches grow with the guest, within the source process's
/// memory budget (its RAM + 5 %, with the page hashes, the transport window
/// and the process itself): XOR-delta copies of 1/256 of the pages,
/// duplicate detection for one page in 8, both capped at the codec's
/// defaults. (At the defaults a 1 GiB guest's process peaked at RAM + 14 %.)
fn encoder_config(n_pages: u64) -> EncoderConfig {
    let d = EncoderConfig::default();
    EncoderConfig {
        xor_cache_pages: d.xor_cache_pages.min((n_pages / 256) as usize),
        dedup_entries: d.dedup_entries.min((n_pages / 8) as usize),
        ..d
    }
}

/// A page's BLAKE3 hash. Zero pages (most of a first round) take the
/// hash computed once: the zero test runs at memory speed, BLAKE3 at a
/// fraction of it.
pub(crate) fn page_hash(page: &[u8]) -> [u8; 32] {
    if tern_pagecodec::is_zero_page(page) {
        zero_page_hash()
    } else {
        *blake3::hash(page).as_bytes()
    }
}

/// The hash of a zero page: what both sides hold for a page never sent.
pub(crate) fn zero_page_hash() -> [u8; 32] {
    static ZERO: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| *blake3::hash(&[0u8; PAGE]).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_frame_gives_its_buffer_to_the_next() {
        let pool = FramePool::default();
        let mut buf = pool.take(1 << 20);
        buf.extend_from_slice(b"frame");
        let at = buf.as_ptr();
        let frame = pool.frame(buf);
        assert_eq!(&frame[..], b"frame");
        // Still held (in the window): a new frame gets other memory.
        let other = pool.take(1 << 20);
        assert_ne!(other.as_ptr(), at);
        drop(frame);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), at, "the acknowledged frame's memory");
        assert!(again.is_empty());
        // A larger frame than any kept gets new memory.
        assert!(pool.take(2 << 20).capacity() >= 2 << 20);
    }
}
