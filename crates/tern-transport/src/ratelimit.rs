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
