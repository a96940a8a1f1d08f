//! When pre-copy stops: the downtime model and the remedies for a guest
//! that dirties pages faster than the link moves them.
//!
//! After each round the engine predicts the downtime of stopping now (dirty
//! pages × bytes per page on the wire ÷ measured throughput, scaled by how
//! far earlier rounds overran their own predictions, plus the fixed cost of
//! a switchover: final scan, page roots, two round trips) and switches over
//! when it fits half the budget, or the whole budget once rounds stop
//! shrinking, or after the last allowed round.

use super::Policy;

/// What one round measured.
pub(super) struct RoundFigures {
    /// Its duration, seconds.
    pub secs: f64,
    /// Encoded bytes it sent.
    pub wire: u64,
    /// Pages it sent.
    pub sent: u64,
    /// Pages dirtied meanwhile.
    pub dirtied: u64,
    /// The dirty scan after it, seconds.
    pub scan_secs: f64,
    /// The link's base round trip, seconds.
    pub min_rtt: f64,
}

/// The model's prediction after a round.
pub(super) struct Prediction {
    /// The throughput it used, bytes/s.
    pub throughput: f64,
    /// The downtime of switching over now, seconds.
    pub downtime: f64,
    /// Of it, sending what is left (scaled by the overrun), seconds.
    pub transfer: f64,
}

/// The downtime model, learning the link and the CPUs round by round.
pub(super) struct Model {
    best_throughput: f64,
    /// How long the last round's leftovers were predicted to take to send.
    leftover_secs: Option<f64>,
    /// How far the rounds since ran over their predictions (>= 1).
    overrun: f64,
    /// Hashing the page table into a root once (both sides do it paused).
    root_secs: f64,
}

impl Model {
    /// A model for a guest whose page root takes `root_secs` to compute.
    pub fn new(root_secs: f64) -> Self {
        Self {
            best_throughput: 0.0,
            leftover_secs: None,
            overrun: 1.0,
            root_secs,
        }
    }

    /// Predicts the downtime of switching over after the round `r`.
    pub fn predict(&mut self, r: &RoundFigures) -> Prediction {
        let bytes_per_page = if r.sent == 0 {
            super::PAGE as f64
        } else {
            (r.wire as f64 / r.sent as f64).max(64.0)
        };
        // Small rounds are bound by latency, not bandwidth: they take the
        // best round seen (round 1 moves the most). A round that moved real
        // volume says what the link and the CPUs give now (a busy guest
        // competes for them), so it counts as measured even if slower.
        let this_round = r.wire.max(1) as f64 / r.secs;
        self.best_throughput = self.best_throughput.max(this_round);
        let throughput = if r.wire >= 4 << 20 {
            this_round
        } else {
            self.best_throughput
        };
        // Downtime is the remaining pages plus what switchover costs anyway:
        // the final dirty scan, the root on both sides, and two round trips
        // (Ready, then Commit/Running) on a link drained by then: the base
        // RTT, as the smoothed one carries this round's queueing.
        let fixed = r.scan_secs + 2.0 * self.root_secs + 2.0 * r.min_rtt;
        // This round sent what the last one left over: the time it took
        // against the time predicted for it says how optimistic the model is
        // on this link and these CPUs (the final send is the same work, so it
        // is scaled alike; never scaled down, and at most fourfold).
        if let Some(pred) = self.leftover_secs.filter(|&p| p > 0.0) {
            self.overrun = self
                .overrun
                .max(((r.secs - r.min_rtt) / pred).clamp(1.0, 4.0));
        }
        let transfer = r.dirtied as f64 * bytes_per_page / throughput;
        self.leftover_secs = Some(transfer);
        Prediction {
            throughput,
            downtime: transfer * self.overrun + fixed,
            transfer: transfer * self.overrun,
        }
    }
}

/// What the source does after a round.
#[derive(Debug, PartialEq)]
pub(super) enum Decision {
    /// Stop the guest and send the rest.
    SwitchOver,
    /// Another round, as things are.
    Continue,
    /// Another round at this rate (bytes/s): a capped link may go faster.
    RaiseRate(u64),
    /// Another round with the guest throttled by this percentage.
    Throttle(u8),
}

/// Where the source stands when it decides.
pub(super) struct Standing {
    /// The round just sent.
    pub round: u32,
    /// Its pages.
    pub sent: u64,
    /// Pages dirtied meanwhile.
    pub dirtied: u64,
    /// Predicted downtime, seconds.
    pub downtime: f64,
    /// Of it, sending what is left, seconds.
    pub transfer: f64,
    /// No round may follow this one (hybrid then goes to post-copy).
    pub last: bool,
    /// The data session's rate cap now (0: none).
    pub rate: u64,
    /// The guest's throttle now, percent.
    pub throttle: u8,
}

/// Below this, the pages left are not worth another round: their send is
/// no larger than the switchover's fixed costs (pause and scan, root, two
/// round trips, commit: 2-3 ms on loopback), seconds.
const WORTH_A_ROUND: f64 = 0.002;

/// A round that leaves less than this share of what it sent is converging
/// fast enough to be worth another, while the rest is worth a round.
const FAST_SHRINK: f64 = 0.65;

/// Switch over once the prediction fits half the budget, or fits at all
/// and another round would not shrink what is left by much. The half is
/// room for the model's error: the last pages have gone at half a round's
/// pace (bench: 2,400 pages predicted at 19 ms took 30), and one more short
/// round costs only milliseconds of total time. So while rounds at least
/// halve what is left, they go on until the rest would send in
/// [`WORTH_A_ROUND`], however roomy the budget: the budget is a ceiling,
/// not an aim. When rounds stop shrinking, raise a capped link's rate
/// first, then throttle the guest.
pub(super) fn decide(s: &Standing, policy: &Policy) -> Decision {
    let budget = policy.max_downtime.as_secs_f64();
    let shrinking = (s.dirtied as f64) < 0.8 * s.sent as f64;
    // Rounds that leave under 0.65 of what they sent converge fast: one
    // more costs a few milliseconds of total time and takes the downtime
    // toward a quarter of the budget (bench, busy 1 GiB, 30 ms budget: the
    // half rule switched at 2-4 rounds with 9-20 ms of downtime; with 0.5,
    // rounds 4 and 5 there leave 0.43-0.61 of what they sent, and a round
    // 4 that left 0.55 switched over with 486 pages and 13 ms of downtime).
    let fast = (s.dirtied as f64) < FAST_SHRINK * s.sent as f64;
    let aim = if fast { 0.25 } else { 0.5 };
    if s.downtime <= aim * budget || (s.downtime <= budget && !shrinking) {
        if fast && !s.last && s.transfer > WORTH_A_ROUND {
            return Decision::Continue;
        }
        return Decision::SwitchOver;
    }
    let stalled = s.round > 1 && !shrinking;
    if !stalled {
        return Decision::Continue;
    }
    let ceiling = policy.max_bandwidth_bytes_per_sec;
    if s.rate > 0 && s.rate < ceiling {
        return Decision::RaiseRate((s.rate.saturating_mul(3) / 2).min(ceiling));
    }
    if !policy.auto_converge {
        return Decision::Continue;
    }
    let t = if s.throttle == 0 {
        30
    } else {
        (s.throttle + 20).min(90)
    };
    if t == s.throttle {
        Decision::Continue
    } else {
        Decision::Throttle(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn standing(dirtied: u64, downtime: f64) -> Standing {
        Standing {
            round: 3,
            sent: 1000,
            dirtied,
            downtime,
            transfer: 0.001,
            last: false,
            rate: 0,
            throttle: 0,
        }
    }

    #[test]
    fn fast_shrinking_rounds_go_on_while_the_rest_is_worth_a_round() {
        let p = Policy {
            max_downtime: Duration::from_millis(50),
            ..Policy::default()
        };
        // Fits a quarter of the budget, but 5 ms of pages would be left
        // and rounds halve them: one more round.
        let mut s = standing(100, 0.008);
        s.transfer = 0.005;
        assert_eq!(decide(&s, &p), Decision::Continue);
        // Not when no round may follow (hybrid would go to post-copy).
        s.last = true;
        assert_eq!(decide(&s, &p), Decision::SwitchOver);
        // Nor when rounds no longer shrink what is left by a third.
        s.last = false;
        s.dirtied = 700;
        assert_eq!(decide(&s, &p), Decision::SwitchOver);
    }

    #[test]
    fn switches_over_when_the_prediction_fits() {
        let p = Policy {
            max_downtime: Duration::from_millis(50),
            ..Policy::default()
        };
        assert_eq!(decide(&standing(100, 0.012), &p), Decision::SwitchOver);
        // Shrinking fast: one more round brings it toward a quarter.
        assert_eq!(decide(&standing(100, 0.02), &p), Decision::Continue);
        // Shrinking slowly: half the budget is enough.
        assert_eq!(decide(&standing(700, 0.02), &p), Decision::SwitchOver);
        // Fits the whole budget but still shrinking: one more round.
        assert_eq!(decide(&standing(100, 0.04), &p), Decision::Continue);
        // Fits and no longer shrinking: go.
        assert_eq!(decide(&standing(900, 0.04), &p), Decision::SwitchOver);
    }

    #[test]
    fn raises_the_rate_before_throttling() {
        let p = Policy {
            max_bandwidth_bytes_per_sec: 300,
            ..Policy::default()
        };
        let mut s = standing(900, 1.0);
        s.rate = 100;
        assert_eq!(decide(&s, &p), Decision::RaiseRate(150));
        s.rate = 300;
        assert_eq!(decide(&s, &p), Decision::Throttle(30));
        s.throttle = 90;
        assert_eq!(decide(&s, &p), Decision::Continue);
    }

    #[test]
    fn overrun_scales_later_predictions() {
        let mut m = Model::new(0.0);
        let r = |secs, dirtied| RoundFigures {
            secs,
            wire: 8 << 20,
            sent: 2048,
            dirtied,
            scan_secs: 0.0,
            min_rtt: 0.0,
        };
        let first = m.predict(&r(1.0, 100)).downtime;
        // The next round took twice what was predicted for its 100 pages.
        let second = m.predict(&r(2.0 * first, 100));
        assert!(second.downtime > 1.5 * (100.0 * 4096.0 / second.throughput));
    }
}
