//! The ETA history: how far each outgoing migration's time-left estimate
//! was from the truth, kept per destination host and mode, and the
//! correction it gives the next migration between the same two hosts.
//!
//! The engine's estimate (`tern-migrate`'s `engine/eta.rs`) models what it
//! can measure: the pace of its rounds, the guest's dirty rate, the rounds
//! the policy allows. What it cannot see repeats between the same hosts
//! (the destination's checks and commit, a pace that changes from round to
//! round, the QEMU relay's coarser figures), so after each committed
//! migration the agent compares the estimates it published with the time
//! that was really left, in two parts: a fixed **tail** (what was left
//! after the last estimate, beyond it: ending costs no pace explains,
//! which dominate a migration of a few MiB) and a **ratio** (the time
//! left before that tail ÷ the estimate, over the middle of the
//! migration). The next estimates are `ratio × estimate + tail`, each the
//! median of the last few migrations'. The history is a small JSON file in
//! the data directory; one that does not load starts the history afresh.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tern_migrate::Progress;

/// What one migration showed, and (as medians) what corrects the next.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Correction {
    /// Time left before the tail ÷ the engine's estimate.
    pub ratio: f64,
    /// Seconds left after the engine's estimates ran out.
    pub tail_secs: f64,
}

impl Correction {
    /// No correction: the engine's estimate as it is.
    pub const NONE: Correction = Correction {
        ratio: 1.0,
        tail_secs: 0.0,
    };

    /// `eta` corrected.
    pub fn apply(&self, eta: f64) -> f64 {
        eta * self.ratio + self.tail_secs
    }
}

/// Ratios kept per pair (the median of these corrects the next estimate).
const KEPT: usize = 8;
/// A correction never goes beyond these (one odd migration must not make
/// the next estimates absurd).
const LIMITS: (f64, f64) = (0.25, 4.0);
/// A tail longer than this is a stall, not a cost to expect again.
const MAX_TAIL: f64 = 10.0;
/// Estimates are compared between these shares of the migration's bytes:
/// early ones lack a measured pace, the last ones are mostly fixed costs.
const COMPARED: (f64, f64) = (0.10, 0.60);
/// One sample per this much time is kept (progress comes per frame).
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// At most this many samples per migration.
const MAX_SAMPLES: usize = 20_000;

/// The corrections learned per destination host and mode.
pub(crate) struct EtaHistory {
    path: PathBuf,
    learned: Mutex<BTreeMap<String, VecDeque<Correction>>>,
}

impl EtaHistory {
    /// The history kept at `path` (empty when missing or unreadable).
    pub fn load(path: PathBuf) -> Self {
        let learned = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "the ETA history does not load; starting afresh");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Self {
            path,
            learned: Mutex::new(learned),
        }
    }

    /// The key of migrations to `peer` in `mode`.
    pub fn key(peer: &str, mode: &str) -> String {
        format!("{peer}/{mode}")
    }

    /// What corrects estimates for `key` (none without history).
    pub fn correction(&self, key: &str) -> Correction {
        let learned = super::lock(&self.learned);
        learned.get(key).map_or(Correction::NONE, |r| Correction {
            ratio: median(r.iter().map(|c| c.ratio)),
            tail_secs: median(r.iter().map(|c| c.tail_secs)),
        })
    }

    /// Adds what one migration showed and saves the history.
    pub fn record(&self, key: &str, c: Correction) {
        let text = {
            let mut all = super::lock(&self.learned);
            let r = all.entry(key.to_string()).or_default();
            r.push_back(Correction {
                ratio: c.ratio.clamp(LIMITS.0, LIMITS.1),
                tail_secs: c.tail_secs.clamp(0.0, MAX_TAIL),
            });
            while r.len() > KEPT {
                r.pop_front();
            }
            serde_json::to_vec_pretty(&*all)
        };
        let saved = text.map_err(std::io::Error::other).and_then(|t| {
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, t)?;
            std::fs::rename(&tmp, &self.path)
        });
        if let Err(e) = saved {
            tracing::warn!(path = %self.path.display(), error = %e, "saving the ETA history");
        }
    }
}

/// The median of `v` (0 when empty).
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One migration's estimates: scales them as they are published and
/// keeps samples to compare with the truth at the end.
pub(crate) struct EtaTracker {
    correction: Correction,
    /// When, the bytes sent by then, and the engine's own estimate.
    samples: Vec<(Instant, u64, f64)>,
    /// The newest of those (kept or not).
    last: Option<(Instant, f64)>,
}

impl EtaTracker {
    /// A migration whose estimates `correction` corrects.
    pub fn new(correction: Correction) -> Self {
        Self {
            correction,
            samples: Vec::new(),
            last: None,
        }
    }

    /// Scales `p`'s estimate, keeping the engine's own as a sample.
    pub fn observe(&mut self, p: &mut Progress, now: Instant) {
        if p.eta_seconds <= 0.0 || !p.eta_seconds.is_finite() {
            return;
        }
        let due = self
            .samples
            .last()
            .is_none_or(|&(t, _, _)| now.duration_since(t) >= SAMPLE_EVERY);
        if due && self.samples.len() < MAX_SAMPLES {
            self.samples.push((now, p.wire_bytes, p.eta_seconds));
        }
        self.last = Some((now, p.eta_seconds));
        p.eta_seconds = self.correction.apply(p.eta_seconds);
    }

    /// How far the engine's estimates were from the time really left, for
    /// a migration that ended at `end` having sent `wire` bytes: the tail
    /// (left after the last estimate, beyond it) and the median ratio of
    /// what was left before the tail to the estimate over its middle part;
    /// `None` with too few samples.
    pub fn learned(&self, end: Instant, wire: u64) -> Option<Correction> {
        let (last_t, last_eta) = self.last?;
        let tail_secs = (end.saturating_duration_since(last_t).as_secs_f64() - last_eta).max(0.0);
        let (lo, hi) = (
            (wire as f64 * COMPARED.0) as u64,
            (wire as f64 * COMPARED.1) as u64,
        );
        let ratios: Vec<f64> = self
            .samples
            .iter()
            .filter(|&&(_, w, _)| (lo..=hi).contains(&w))
            .map(|&(t, _, eta)| {
                let left = end.saturating_duration_since(t).as_secs_f64();
                (left - tail_secs).max(0.0) / eta
            })
            .collect();
        (ratios.len() >= 3).then(|| Correction {
            ratio: median(ratios.into_iter()),
            tail_secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(wire: u64, eta: f64) -> Progress {
        Progress {
            wire_bytes: wire,
            eta_seconds: eta,
            ..Default::default()
        }
    }

    fn near(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn estimates_that_ran_short_teach_a_ratio_and_a_tail_that_correct_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eta-history.json");
        let h = EtaHistory::load(path.clone());
        let key = EtaHistory::key("host-b", "precopy");
        assert_eq!(h.correction(&key), Correction::NONE);
        // The engine said 0.5 s left every 100 ms up to 900 ms.
        let t0 = Instant::now();
        let mut t = EtaTracker::new(h.correction(&key));
        for i in 0..10u64 {
            let mut p = progress(i * 100, 0.5);
            t.observe(&mut p, t0 + Duration::from_millis(100 * i));
            assert_eq!(p.eta_seconds, 0.5);
        }
        // It ended at 1.5 s: 0.1 s beyond the last estimate is the tail;
        // the samples at 100..=600 bytes (10-60 % of 1000) had 1.3 .. 0.8 s
        // left before it, 2.6 .. 1.6 times the estimate.
        let c = t.learned(t0 + Duration::from_millis(1500), 1000).unwrap();
        assert!(near(c.ratio, 2.1) && near(c.tail_secs, 0.1), "{c:?}");
        h.record(&key, c);
        // Saved, and used from then on.
        let again = EtaHistory::load(path);
        assert_eq!(again.correction(&key), c);
        let mut t = EtaTracker::new(again.correction(&key));
        let mut p = progress(1, 0.5);
        t.observe(&mut p, t0);
        assert!(near(p.eta_seconds, 1.15), "{p:?}");
        // Other pairs are untouched.
        let other = EtaHistory::key("host-c", "precopy");
        assert_eq!(again.correction(&other), Correction::NONE);
    }

    #[test]
    fn the_correction_is_the_median_of_the_last_few_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let h = EtaHistory::load(dir.path().join("h.json"));
        for r in [100.0, 1.1, 1.2, 0.9, 1.0] {
            h.record(
                "k",
                Correction {
                    ratio: r,
                    tail_secs: r / 10.0,
                },
            );
        }
        let c = h.correction("k");
        assert!(near(c.ratio, 1.1) && near(c.tail_secs, 0.11), "{c:?}");
        for _ in 0..KEPT {
            h.record(
                "k",
                Correction {
                    ratio: 1e-9,
                    tail_secs: 1e9,
                },
            );
        }
        let c = h.correction("k");
        assert_eq!((c.ratio, c.tail_secs), (LIMITS.0, MAX_TAIL));
    }

    #[test]
    fn a_damaged_history_starts_afresh_and_few_samples_teach_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.json");
        std::fs::write(&path, b"{not json").unwrap();
        let h = EtaHistory::load(path);
        assert_eq!(h.correction("k"), Correction::NONE);
        let mut t = EtaTracker::new(Correction::NONE);
        let now = Instant::now();
        t.observe(&mut progress(500, 1.0), now);
        assert_eq!(t.learned(now + Duration::from_secs(1), 1000), None);
    }
}
