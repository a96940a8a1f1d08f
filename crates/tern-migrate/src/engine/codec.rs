//! Which compression the page stream uses, frame by frame.
//!
//! A fixed choice (`--compress none|lz4|zstd`) is used as asked. `auto`
//! feeds `tern-pagecodec`'s [`AdaptivePolicy`] with two measurements and
//! asks it again every [`EVERY`] frames:
//! - the link: the rate cap when there is one, else 1.5 × the best rate at
//!   which the destination acknowledged bytes (the link carries at least
//!   that; the margin lets a link that was only waiting on the encoder show
//!   it is faster). Before the first measurement the link counts as fast.
//! - each codec's speed (page bytes per second of encoder time) and ratio on
//!   this guest's pages, from the frames it encoded.
//!
//! So an incompressible working set stops paying for LZ4 (its measured ratio
//! goes to 1), a fast link sends raw pages unless they compress cheaply,
//! and a slow one earns zstd. While it sends raw pages, one batch in
//! [`PROBE`] frames (and the first) tries LZ4 again to keep its figures
//! current.

use super::Codec;
use std::time::{Duration, Instant};
use tern_pagecodec::{AdaptivePolicy, Compression, EncodeStats, LinkBudget};
use tern_transport::SessionMetrics;

/// Frames between two choices.
const EVERY: u32 = 8;
/// Frames between two LZ4 probes while nothing is compressed (the first
/// batch is one): the policy only learns from codecs it uses, so memory
/// that starts to compress, or compresses at all, must get to show it.
const PROBE: u32 = 128;
/// The shortest interval an acknowledgement rate is measured over.
const MIN_SAMPLE: Duration = Duration::from_millis(20);
/// zstd's level when chosen (fixed or adaptive).
pub(super) const ZSTD_LEVEL: i32 = 3;

/// Chooses the compression of the next frame and learns from the last.
pub(super) struct CodecChooser {
    fixed: Option<Compression>,
    adaptive: AdaptivePolicy,
    current: Compression,
    frames: u32,
    /// When and how many bytes were acknowledged at the last sample.
    sample: Option<(Instant, u64)>,
    /// Best acknowledgement rate seen, bytes/s.
    best_ack_rate: f64,
}

impl CodecChooser {
    pub(super) fn new(choice: Codec) -> Self {
        let fixed = match choice {
            Codec::Auto => None,
            Codec::None => Some(Compression::None),
            Codec::Lz4 => Some(Compression::Lz4),
            Codec::Zstd => Some(Compression::Zstd(ZSTD_LEVEL)),
        };
        Self {
            fixed,
            adaptive: AdaptivePolicy::default(),
            current: fixed.unwrap_or(Compression::None),
            frames: 0,
            sample: None,
            best_ack_rate: 0.0,
        }
    }

    /// The compression for the next frame, given the data session's counters.
    pub(super) fn next(&mut self, link: &SessionMetrics) -> Compression {
        if let Some(c) = self.fixed {
            return c;
        }
        self.measure_link(link, Instant::now());
        if self.frames.is_multiple_of(EVERY) {
            let chosen = self.adaptive.choose(self.budget(link.rate_bytes_per_sec));
            self.current = if chosen == Compression::None && self.frames.is_multiple_of(PROBE) {
                Compression::Lz4
            } else {
                chosen
            };
        }
        self.frames += 1;
        self.current
    }

    /// Learns from a frame encoded with `c` in `secs`.
    pub(super) fn observe(&mut self, c: Compression, stats: &EncodeStats, secs: f64) {
        if self.fixed.is_none() {
            self.adaptive
                .observe(c, stats.packed_in, stats.packed_out, secs);
        }
    }

    fn measure_link(&mut self, link: &SessionMetrics, now: Instant) {
        match self.sample {
            Some((at, acked)) if now.duration_since(at) >= MIN_SAMPLE => {
                let secs = now.duration_since(at).as_secs_f64();
                let rate = link.bytes_acked.saturating_sub(acked) as f64 / secs;
                self.best_ack_rate = self.best_ack_rate.max(rate);
                self.sample = Some((now, link.bytes_acked));
            }
            Some(_) => {}
            None => self.sample = Some((now, link.bytes_acked)),
        }
    }

    fn budget(&self, cap: u64) -> LinkBudget {
        let link = if cap > 0 {
            cap as f64
        } else if self.best_ack_rate > 0.0 {
            self.best_ack_rate * 1.5
        } else {
            f64::INFINITY
        };
        LinkBudget {
            link_bytes_per_sec: link,
            cpu_cores: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(acked: u64, cap: u64) -> SessionMetrics {
        SessionMetrics {
            bytes_acked: acked,
            rate_bytes_per_sec: cap,
            ..SessionMetrics::default()
        }
    }

    #[test]
    fn a_fixed_choice_is_kept() {
        let mut c = CodecChooser::new(Codec::Lz4);
        for _ in 0..20 {
            assert_eq!(c.next(&metrics(0, 1_000_000)), Compression::Lz4);
        }
        let mut c = CodecChooser::new(Codec::None);
        assert_eq!(c.next(&metrics(0, 1_000_000)), Compression::None);
    }

    #[test]
    fn auto_compresses_hard_under_a_slow_cap_and_probes_lz4_on_a_fast_link() {
        let mut c = CodecChooser::new(Codec::Auto);
        assert!(matches!(
            c.next(&metrics(0, 10_000_000)),
            Compression::Zstd(_)
        ));
        // Unmeasured and uncapped: fast. The first batch probes LZ4 ...
        let mut c = CodecChooser::new(Codec::Auto);
        let random = EncodeStats {
            packed_in: 1 << 20,
            packed_out: 1 << 20,
            ..EncodeStats::default()
        };
        for _ in 0..EVERY {
            assert_eq!(c.next(&metrics(0, 0)), Compression::Lz4);
            c.observe(Compression::Lz4, &random, 1e-3);
        }
        // ... and pages that do not compress send it away until the next probe.
        for _ in EVERY..PROBE {
            assert_eq!(c.next(&metrics(0, 0)), Compression::None);
        }
        assert_eq!(c.next(&metrics(0, 0)), Compression::Lz4);
    }

    #[test]
    fn auto_follows_the_measured_acknowledgement_rate() {
        let mut c = CodecChooser::new(Codec::Auto);
        let t0 = Instant::now();
        c.measure_link(&metrics(0, 0), t0);
        // 2 MB acknowledged in 100 ms: a 20 MB/s link.
        c.measure_link(&metrics(2_000_000, 0), t0 + Duration::from_millis(100));
        assert!((c.best_ack_rate - 20e6).abs() < 1.0);
        let chosen = c.adaptive.choose(c.budget(0));
        assert!(matches!(chosen, Compression::Zstd(_)), "{chosen:?}");
    }

    #[test]
    fn incompressible_pages_turn_lz4_off() {
        let mut c = CodecChooser::new(Codec::Auto);
        // A 300 MB/s link: LZ4 at its prior ratio wins.
        let budget = LinkBudget {
            link_bytes_per_sec: 300e6,
            cpu_cores: 1.0,
        };
        assert_eq!(c.adaptive.choose(budget), Compression::Lz4);
        let random = EncodeStats {
            packed_in: 1 << 20,
            packed_out: 1 << 20,
            ..EncodeStats::default()
        };
        for _ in 0..10 {
            c.observe(Compression::Lz4, &random, 1e-3);
            c.observe(Compression::Zstd(1), &random, 3e-3);
            c.observe(Compression::Zstd(ZSTD_LEVEL), &random, 4e-3);
        }
        assert_eq!(c.adaptive.choose(budget), Compression::None);
    }
}
