//! The time a migration has left, as the source publishes it after every
//! frame.
//!
//! Three things decide it, all measured while the migration runs:
//! - the **pace** of this round, seconds per page sent: the link, encoding,
//!   hashing and the guest competing for the CPUs all fold into it (a
//!   link rate alone misses the CPU bound, which is what limits loopback);
//! - the guest's **dirty rate**: the engine reads the dirty log during a
//!   round as well as after it (merging what it read, so the next round's
//!   pages are the same), so it is known from the first round on;
//! - the **policy**: later rounds are projected as pre-copy would run them
//!   (each resends what the guest dirtied during the one before, until
//!   what is left fits the downtime budget or the rounds allowed run out;
//!   a round that does not shrink is taken to be the last few, as
//!   auto-converge then throttles the guest), then the switchover; in
//!   post-copy (and hybrid's end) what is left goes out once.
//!
//! Earlier migrations between the same two hosts correct it: the agent
//! keeps how far this estimate was from the truth and scales it (its ETA
//! history), which covers what no model here sees (the destination's
//! checks, the commit's round trips, a pace that changes between rounds).

use std::time::Instant;

/// Pages a round must have sent before its own pace counts (its first
/// frames carry the link's slow start).
const MIN_PAGES: u64 = 1024;
/// Rounds that stop shrinking are projected this many more times (then
/// auto-converge has slowed the guest, or the round limit stops them).
const STALLED_ROUNDS: u32 = 3;

/// What one round contributes to the estimate; set when it starts.
#[derive(Clone, Debug)]
pub(super) struct RoundEta {
    started: Instant,
    /// Pages this round sends.
    pages: u64,
    /// Pages the migration had sent when it started.
    sent_before: u64,
    /// Pages the guest dirtied since it started (last look at the log) and
    /// seconds after its start that look was.
    dirtied: u64,
    dirtied_secs: f64,
    /// What follows this round.
    plan: EtaPlan,
    /// The last round's pace, seconds per page (used until this round
    /// has its own).
    last_pace: Option<f64>,
}

impl RoundEta {
    /// A round of `pages`, started when the migration had sent `sent_before`.
    pub fn new(pages: u64, sent_before: u64, plan: &EtaPlan, last_pace: Option<f64>) -> Self {
        Self {
            started: Instant::now(),
            pages,
            sent_before,
            dirtied: 0,
            dirtied_secs: 0.0,
            plan: *plan,
            last_pace,
        }
    }

    /// The guest has dirtied `pages` since this round started (read now).
    pub fn dirtied(&mut self, pages: u64) {
        self.dirtied = pages;
        self.dirtied_secs = self.started.elapsed().as_secs_f64();
    }

    /// This round's pace so far, seconds per page, once it counts.
    pub fn pace(&self, sent_now: u64) -> Option<f64> {
        let done = sent_now.saturating_sub(self.sent_before);
        (done >= MIN_PAGES.min(self.pages.max(1)))
            .then(|| self.started.elapsed().as_secs_f64() / done as f64)
    }

    /// Seconds left when the migration has sent `sent_now` pages; `None`
    /// until a pace is known.
    pub fn eta(&self, sent_now: u64) -> Option<f64> {
        let pace = self.pace(sent_now).or(self.last_pace)?;
        let done = sent_now.saturating_sub(self.sent_before).min(self.pages);
        let rate = if self.dirtied_secs > 0.0 {
            self.dirtied as f64 / self.dirtied_secs
        } else {
            0.0
        };
        Some(project(&Projection {
            pace,
            left: self.pages - done,
            dirtied: self.dirtied,
            dirty_rate: rate,
            plan: self.plan,
        }))
    }
}

/// What the policy and the guest say about the rounds to come.
#[derive(Clone, Copy, Debug)]
pub(super) struct EtaPlan {
    /// Pre-copy rounds allowed after the current one (0: what is left
    /// goes out in this one and the switchover, as in post-copy).
    pub rounds_after: u32,
    /// Pages the guest has written (the most a round resends).
    pub cap: u64,
    /// Seconds of sending that fit the downtime budget.
    pub budget_secs: f64,
    /// The switchover's fixed cost, seconds.
    pub fixed_secs: f64,
}

/// The inputs of [`project`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Projection {
    /// Seconds per page.
    pub pace: f64,
    /// Pages this round still sends.
    pub left: u64,
    /// Pages dirtied so far this round (the next round resends them).
    pub dirtied: u64,
    /// Pages dirtied per second.
    pub dirty_rate: f64,
    /// What follows this round.
    pub plan: EtaPlan,
}

/// Seconds left: this round, the rounds pre-copy would run after it, and
/// the switchover (what is left then, sent at the same pace, plus its
/// fixed cost).
pub(super) fn project(p: &Projection) -> f64 {
    let plan = &p.plan;
    let cap = plan.cap.max(1) as f64;
    let this_round = p.left as f64 * p.pace;
    let mut total = this_round;
    // Dirtied by the end of this round (each page at most once).
    let mut next = (p.dirtied as f64 + p.dirty_rate * this_round).min(cap);
    let mut rounds = plan.rounds_after;
    let mut stalled = 0;
    while rounds > 0 && next * p.pace > plan.budget_secs {
        let secs = next * p.pace;
        total += secs;
        let after = (p.dirty_rate * secs).min(cap);
        if after >= next {
            stalled += 1;
            if stalled >= STALLED_ROUNDS {
                next = after;
                break;
            }
        }
        next = after;
        rounds -= 1;
    }
    total + next * p.pace + plan.fixed_secs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn idle() -> Projection {
        Projection {
            pace: 10e-6,
            left: 100_000,
            dirtied: 0,
            dirty_rate: 0.0,
            plan: EtaPlan {
                rounds_after: 29,
                cap: 200_000,
                budget_secs: 0.015,
                fixed_secs: 0.005,
            },
        }
    }

    #[test]
    fn an_idle_guest_has_this_round_and_the_switchover_left() {
        let t = project(&idle());
        assert!((t - 1.005).abs() < 1e-9, "{t}");
    }

    #[test]
    fn a_dirtying_guest_adds_shrinking_rounds() {
        // 20 000 pages/s at 10 µs a page: each round is a fifth of the last.
        let p = Projection {
            dirty_rate: 20_000.0,
            ..idle()
        };
        let t = project(&p);
        // 1 s, then 20 000 pages (0.2 s), 4 000 (0.04 s), then 800 fit
        // the budget and go paused (8 ms).
        assert!((t - (1.0 + 0.2 + 0.04 + 0.008 + 0.005)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn rounds_that_do_not_shrink_end_after_a_few() {
        let p = Projection {
            dirty_rate: 1e6,
            plan: EtaPlan {
                cap: 50_000,
                ..idle().plan
            },
            ..idle()
        };
        let t = project(&p);
        // This round, three more of the whole written set, then it paused.
        assert!((t - (1.0 + 3.0 * 0.5 + 0.5 + 0.005)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn with_no_rounds_left_what_is_dirtied_goes_at_switchover() {
        let p = Projection {
            dirty_rate: 20_000.0,
            dirtied: 1_000,
            plan: EtaPlan {
                rounds_after: 0,
                ..idle().plan
            },
            ..idle()
        };
        let t = project(&p);
        assert!((t - (1.0 + 21_000.0 * 10e-6 + 0.005)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn a_round_has_no_estimate_until_it_has_a_pace() {
        let plan = EtaPlan {
            rounds_after: 2,
            cap: 10_000,
            budget_secs: 0.01,
            fixed_secs: 0.0,
        };
        let r = RoundEta::new(10_000, 500, &plan, None);
        assert_eq!(r.eta(600), None);
        let r = RoundEta::new(10_000, 500, &plan, Some(1e-5));
        let t = r.eta(600).unwrap();
        assert!((t - 9_900.0 * 1e-5).abs() < 1e-9, "{t}");
    }

    proptest! {
        /// More to send never makes it sooner;
        /// it is finite and at least this round's own time.
        #[test]
        fn the_estimate_is_monotonic_and_bounded(
            left in 0u64..1_000_000,
            more in 0u64..1_000_000,
            rate in 0.0f64..1e6,
            rounds in 0u32..40,
            pace in 1e-7f64..1e-3,
        ) {
            let plan = EtaPlan { rounds_after: rounds, ..idle().plan };
            let p = Projection { pace, left, dirty_rate: rate, plan, ..idle() };
            let t = project(&p);
            prop_assert!(t.is_finite());
            prop_assert!(t >= left as f64 * pace);
            let bigger = project(&Projection { left: left + more, ..p });
            prop_assert!(bigger >= t - 1e-9);
        }
    }
}
