//! Choosing compression from the link and the CPU.
//!
//! Sending a page costs CPU (compressing it) and link time (its bytes). With
//! `cores` of CPU at `speed` bytes/s each and a link of `link` bytes/s, a
//! codec with ratio `r` moves guest memory at `min(speed × cores, link / r)`.
//! The policy picks the codec with the highest such rate, preferring the
//! cheaper one when two are within 5%: no compression on a fast link with a
//! slow CPU, zstd on a slow WAN. Speeds and ratios start from defaults measured
//! on guest-like memory and are updated (EWMA) from what the encoder actually
//! achieves on this migration's pages, so the choice follows conditions.

use crate::Compression;

/// What the codec may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkBudget {
    /// Link bandwidth available to this migration, bytes/s.
    pub link_bytes_per_sec: f64,
    /// CPU the codec may use, in cores (e.g. 1.0, 0.5).
    pub cpu_cores: f64,
}

#[derive(Clone, Copy, Debug)]
struct Profile {
    compression: Compression,
    /// Input bytes per second per core.
    speed: f64,
    /// Output / input on non-zero, non-duplicate pages.
    ratio: f64,
}

/// Picks compression per frame batch and learns from results.
#[derive(Clone, Debug)]
pub struct AdaptivePolicy {
    profiles: Vec<Profile>,
    alpha: f64,
}

impl Default for AdaptivePolicy {
    fn default() -> Self {
        // Priors from `cargo bench -p tern-pagecodec` on a mixed guest image;
        // refined per migration by `observe`.
        Self {
            profiles: vec![
                Profile {
                    compression: Compression::None,
                    speed: 8.0e9,
                    ratio: 1.0,
                },
                Profile {
                    compression: Compression::Lz4,
                    speed: 1.0e9,
                    ratio: 0.55,
                },
                Profile {
                    compression: Compression::Zstd(1),
                    speed: 4.0e8,
                    ratio: 0.42,
                },
                Profile {
                    compression: Compression::Zstd(3),
                    speed: 1.5e8,
                    ratio: 0.38,
                },
            ],
            alpha: 0.3,
        }
    }
}

impl AdaptivePolicy {
    /// Predicted memory transfer rate (bytes of guest memory per second) of a codec.
    pub fn predicted_rate(&self, c: Compression, b: LinkBudget) -> Option<f64> {
        let p = self.profiles.iter().find(|p| p.compression == c)?;
        Some((p.speed * b.cpu_cores).min(b.link_bytes_per_sec / p.ratio.max(1e-3)))
    }

    /// The compression to use now.
    pub fn choose(&self, b: LinkBudget) -> Compression {
        let rates: Vec<(Compression, f64)> = self
            .profiles
            .iter()
            .map(|p| {
                (
                    p.compression,
                    self.predicted_rate(p.compression, b).unwrap_or(0.0),
                )
            })
            .collect();
        let best = rates.iter().map(|r| r.1).fold(0.0, f64::max);
        // Profiles are ordered cheapest first: take the first within 5% of the best.
        rates
            .iter()
            .find(|r| r.1 >= best * 0.95)
            .map_or(Compression::None, |r| r.0)
    }

    /// Feeds back what a codec achieved: `bytes_in` of page data took
    /// `cpu_secs` of one core and became `bytes_out`.
    pub fn observe(&mut self, c: Compression, bytes_in: u64, bytes_out: u64, cpu_secs: f64) {
        if bytes_in < 64 * 1024 || cpu_secs <= 0.0 {
            return; // too little to learn from
        }
        let a = self.alpha;
        if let Some(p) = self.profiles.iter_mut().find(|p| p.compression == c) {
            p.speed = (1.0 - a) * p.speed + a * (bytes_in as f64 / cpu_secs);
            p.ratio = (1.0 - a) * p.ratio + a * (bytes_out as f64 / bytes_in as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn fast_link_slow_cpu_sends_uncompressed() {
        let p = AdaptivePolicy::default();
        let c = p.choose(LinkBudget {
            link_bytes_per_sec: 1250.0 * MB,
            cpu_cores: 0.5,
        });
        assert_eq!(c, Compression::None);
    }

    #[test]
    fn slow_wan_uses_zstd() {
        let p = AdaptivePolicy::default();
        let c = p.choose(LinkBudget {
            link_bytes_per_sec: 12.5 * MB,
            cpu_cores: 1.0,
        });
        assert!(matches!(c, Compression::Zstd(_)), "{c:?}");
    }

    #[test]
    fn middle_link_uses_lz4() {
        let p = AdaptivePolicy::default();
        let c = p.choose(LinkBudget {
            link_bytes_per_sec: 300.0 * MB,
            cpu_cores: 1.0,
        });
        assert_eq!(c, Compression::Lz4);
    }

    #[test]
    fn learns_that_data_does_not_compress() {
        let mut p = AdaptivePolicy::default();
        let wan = LinkBudget {
            link_bytes_per_sec: 12.5 * MB,
            cpu_cores: 1.0,
        };
        assert!(matches!(p.choose(wan), Compression::Zstd(_)));
        // Encrypted-looking memory: nothing compresses.
        for _ in 0..20 {
            p.observe(Compression::Zstd(1), 1 << 24, 1 << 24, 0.05);
            p.observe(Compression::Zstd(3), 1 << 24, 1 << 24, 0.1);
            p.observe(Compression::Lz4, 1 << 24, 1 << 24, 0.02);
        }
        assert_eq!(p.choose(wan), Compression::None);
    }
}
