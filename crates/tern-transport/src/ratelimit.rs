//! Bandwidth shaping: a token bucket per session under one per host.
//!
//! Buckets reserve ahead: a caller takes its bytes at once, even into debt, and
//! sleeps until the debt would have been paid. Callers are served in the order
//! they asked, so writers of one session share it evenly, and the host bucket
//! never lets the sum of its sessions exceed the host cap. The host limiter also
//! gives each registered session a fair share (`host rate / sessions`) as its
//! ceiling, so two migrations under one cap each get about half even if one
//! has more streams than the other.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Rate 0 means unlimited.
pub const UNLIMITED: u64 = 0;

#[derive(Debug)]
struct BucketState {
    rate: u64,
    tokens: f64,
    last: Instant,
}

/// A token bucket in bytes per second. Burst is 20 ms of rate (at least 256 KiB),
/// so a cap holds tightly over seconds.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<BucketState>,
}

impl TokenBucket {
    /// A bucket at `rate` bytes/s (0: unlimited).
    pub fn new(rate: u64) -> Self {
        Self {
            state: Mutex::new(BucketState {
                rate,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Changes the rate; takes effect for the next reservation.
    pub fn set_rate(&self, rate: u64) {
        let mut s = self.state.lock().expect("bucket lock");
        Self::refill(&mut s);
        s.rate = rate;
    }

    /// Current rate (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.state.lock().expect("bucket lock").rate
    }

    fn burst(rate: u64) -> f64 {
        (rate as f64 * 0.02).max(256.0 * 1024.0)
    }

    fn refill(s: &mut BucketState) {
        let now = Instant::now();
        let dt = now.duration_since(s.last).as_secs_f64();
        s.last = now;
        if s.rate != UNLIMITED {
            s.tokens = (s.tokens + dt * s.rate as f64).min(Self::burst(s.rate));
        }
    }

    /// Takes `n` bytes now and says how long to wait before using them.
    pub fn reserve(&self, n: usize) -> Duration {
        let mut s = self.state.lock().expect("bucket lock");
        if s.rate == UNLIMITED {
            return Duration::ZERO;
        }
        Self::refill(&mut s);
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / s.rate as f64)
        }
    }

    /// Waits until `n` bytes may be sent.
    pub async fn acquire(&self, n: usize) {
        let wait = self.reserve(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A host's cap, shared by every session on the host.
#[derive(Debug)]
pub struct HostLimiter {
    bucket: TokenBucket,
    sessions: Mutex<Vec<Weak<TokenBucket>>>,
}

impl HostLimiter {
    /// A host cap of `rate` bytes/s (0: unlimited).
    pub fn new(rate: u64) -> Arc<Self> {
        Arc::new(Self {
            bucket: TokenBucket::new(rate),
            sessions: Mutex::new(Vec::new()),
        })
    }

    /// The host cap.
    pub fn rate(&self) -> u64 {
        self.bucket.rate()
    }

    /// Changes the host cap.
    pub fn set_rate(&self, rate: u64) {
        self.bucket.set_rate(rate);
    }

    /// Registers a session's bucket; its fair share is recomputed as sessions come and go.
    pub fn register(&self, session: &Arc<TokenBucket>) {
        let mut s = self.sessions.lock().expect("host lock");
        s.retain(|w| w.strong_count() > 0);
        s.push(Arc::downgrade(session));
    }

    /// The ceiling a session should respect now: the host cap over live sessions.
    pub fn fair_share(&self) -> u64 {
        let rate = self.bucket.rate();
        if rate == UNLIMITED {
            return UNLIMITED;
        }
        let mut s = self.sessions.lock().expect("host lock");
        s.retain(|w| w.strong_count() > 0);
        rate / (s.len().max(1) as u64)
    }

    /// Waits for host tokens.
    pub async fn acquire(&self, n: usize) {
        self.bucket.acquire(n).await
    }

    /// Takes host tokens now and says how long to wait before using them.
    pub fn reserve(&self, n: usize) -> Duration {
        self.bucket.reserve(n)
    }
}

/// One claim on a shared rate: its weight, and the most it may use (0: no
/// limit of its own).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Claim {
    /// Its weight against the others (above 0).
    pub weight: f64,
    /// Its own cap in bytes/s (0: none).
    pub cap: u64,
}

/// Splits `total` bytes/s among `claims` by weight, no claim above its own
/// cap, and what a capped claim leaves goes to the others by weight
/// (weighted max-min fairness, by water-filling). An unlimited total gives
/// every claim its own cap. This is how one host's migration bandwidth is
/// shared between migrations that run in different processes: their agent
/// computes the shares and hands each process its own.
pub fn weighted_shares(total: u64, claims: &[Claim]) -> Vec<u64> {
    if total == UNLIMITED {
        return claims.iter().map(|c| c.cap).collect();
    }
    let mut share = vec![0u64; claims.len()];
    let mut open: Vec<usize> = (0..claims.len()).collect();
    let mut left = total as f64;
    while !open.is_empty() {
        let weights: f64 = open
            .iter()
            .map(|&i| claims[i].weight.max(f64::MIN_POSITIVE))
            .sum();
        let unit = left / weights;
        let (capped, free): (Vec<usize>, Vec<usize>) = open.iter().partition(|&&i| {
            let c = claims[i];
            c.cap != UNLIMITED && (c.cap as f64) < c.weight * unit
        });
        if capped.is_empty() {
            for i in free {
                share[i] = (claims[i].weight.max(f64::MIN_POSITIVE) * unit) as u64;
            }
            break;
        }
        for i in capped {
            share[i] = claims[i].cap;
            left -= claims[i].cap as f64;
        }
        open = free;
    }
    // No share of a capped total is "unlimited".
    share.iter().map(|&s| s.max(1)).collect()
}

/// The smaller of two rates where 0 means unlimited.
pub fn min_rate(a: u64, b: u64) -> u64 {
    match (a, b) {
        (UNLIMITED, x) | (x, UNLIMITED) => x,
        (a, b) => a.min(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_ahead_accumulates_debt() {
        let b = TokenBucket::new(1_000_000);
        // Past the burst, each MB costs a second.
        let mut last = Duration::ZERO;
        for _ in 0..3 {
            last = b.reserve(1_000_000);
        }
        assert!(
            last > Duration::from_millis(2500) && last < Duration::from_millis(3100),
            "{last:?}"
        );
        assert_eq!(TokenBucket::new(UNLIMITED).reserve(1 << 30), Duration::ZERO);
    }

    fn c(weight: f64, cap: u64) -> Claim {
        Claim { weight, cap }
    }

    #[test]
    fn shares_follow_weights_and_caps() {
        assert_eq!(weighted_shares(900, &[c(8.0, 0), c(1.0, 0)]), [800, 100]);
        // A capped claim leaves the rest to the others, by weight.
        assert_eq!(
            weighted_shares(900, &[c(8.0, 200), c(1.0, 0), c(2.0, 0)]),
            [200, 233, 466]
        );
        assert_eq!(weighted_shares(0, &[c(1.0, 5), c(1.0, 0)]), [5, 0]);
        assert!(weighted_shares(100, &[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn shares_never_exceed_the_total_or_a_cap(
            total in 1u64..10_000_000_000,
            claims in proptest::collection::vec((0.5f64..16.0, 0u64..5_000_000_000), 0..12),
        ) {
            let claims: Vec<Claim> = claims.into_iter().map(|(w, cap)| c(w, cap)).collect();
            let shares = weighted_shares(total, &claims);
            proptest::prop_assert_eq!(shares.len(), claims.len());
            let sum: u64 = shares.iter().sum();
            proptest::prop_assert!(sum <= total + claims.len() as u64, "{} > {}", sum, total);
            for (s, cl) in shares.iter().zip(&claims) {
                proptest::prop_assert!(*s >= 1);
                if cl.cap != UNLIMITED {
                    proptest::prop_assert!(*s <= cl.cap.max(1));
                }
            }
            // Nothing is left idle while a claim could use more.
            let uncapped = claims.iter().any(|cl| cl.cap == UNLIMITED);
            if uncapped {
                proptest::prop_assert!(sum + claims.len() as u64 >= total, "{} < {}", sum, total);
            }
        }
    }

    #[test]
    fn fair_share_follows_sessions() {
        let h = HostLimiter::new(100);
        let a = Arc::new(TokenBucket::new(0));
        h.register(&a);
        assert_eq!(h.fair_share(), 100);
        let b = Arc::new(TokenBucket::new(0));
        h.register(&b);
        assert_eq!(h.fair_share(), 50);
        drop(b);
        assert_eq!(h.fair_share(), 100);
        assert_eq!(min_rate(0, 5), 5);
        assert_eq!(min_rate(7, 5), 5);
        assert_eq!(min_rate(0, 0), 0);
    }
}
