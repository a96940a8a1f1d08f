//! Judging a QEMU guest after it resumed on the destination.
//!
//! QEMU saying "completed" is not trusted alone when the guest can say
//! more: a guest running tern's workload reports its counter and the
//! checksum of its working set, and those must continue from the source.
//! An ordinary Linux guest reports nothing, and QEMU's result judges it.
//! The source decides which applies from its guest's console and tells the
//! destination at commit (the last tick it saw, or none).

use std::time::Duration;
use tern_drivers::qemu::load::{verify_after_switchover, LoadParams};

/// A guest check's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Whether the guest is well.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// Judges a guest from what it printed since it resumed on the destination.
pub trait GuestCheck: Send {
    /// `Some` once the guest's output (since it resumed) decides.
    fn judge(&mut self, fresh_console: &str) -> Option<Verdict>;
    /// How long after resuming the guest may take to report.
    fn patience(&self) -> Duration;
}

/// tern's workload: its counter continues from the source's last tick and
/// its checksums are the expected ones.
pub struct WorkloadCheck {
    /// The workload's parameters (how often it checks itself).
    pub load: LoadParams,
    /// The last tick it printed on the source.
    pub source_last_tick: u64,
}

impl GuestCheck for WorkloadCheck {
    fn judge(&mut self, fresh: &str) -> Option<Verdict> {
        verify_after_switchover(fresh, self.source_last_tick, &self.load)
            .map(|(ok, detail)| Verdict { ok, detail })
    }

    fn patience(&self) -> Duration {
        // Three of its check periods, and time for a slow (TCG) guest.
        Duration::from_millis(self.load.tick_ms * self.load.verify_every.max(1) * 3)
            + Duration::from_secs(10)
    }
}

/// A guest that reports nothing of its own: QEMU's result is the verdict.
pub struct QemuResult;

impl GuestCheck for QemuResult {
    fn judge(&mut self, _fresh: &str) -> Option<Verdict> {
        Some(Verdict {
            ok: true,
            detail: "QEMU completed the migration (the guest reports no check of its own)".into(),
        })
    }

    fn patience(&self) -> Duration {
        Duration::ZERO
    }
}

/// The check for a guest whose source reported `last_tick` (none: the
/// guest runs no workload of tern's).
pub fn for_guest(last_tick: Option<u64>, load: LoadParams) -> Box<dyn GuestCheck> {
    match last_tick {
        Some(source_last_tick) => Box::new(WorkloadCheck {
            load,
            source_last_tick,
        }),
        None => Box::new(QemuResult),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_guest_is_judged_by_qemu() {
        let mut c = for_guest(None, LoadParams::default());
        assert!(c.judge("").unwrap().ok);
    }

    #[test]
    fn the_workload_must_continue() {
        let load = LoadParams {
            verify_every: 1,
            ..LoadParams::default()
        };
        let mut c = for_guest(Some(10), load);
        assert_eq!(c.judge("partial"), None);
        assert!(c.patience() >= Duration::from_secs(10));
    }
}
