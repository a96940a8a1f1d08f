//! Migration channels between hosts.
//!
//! A [`session`] carries ordered frames from a [`Sender`] to a [`Receiver`]
//! over N parallel TCP streams, each wrapped in TLS 1.3 with mutual
//! authentication and SPKI pinning ([`tls`]), or plain TCP behind an explicit
//! insecure flag for tests. Frames are striped across streams and put back in
//! order on arrival; each carries a sequence number, a header check and a
//! payload checksum ([`wire`]). The receiver acknowledges what the
//! application has applied; when a connection drops the sender reconnects (with
//! backoff, up to a deadline) with the session id and resume token and replays
//! only unacknowledged frames. Every stream carries a heartbeat a second and a
//! stream silent for [`SILENCE_LIMIT`] is dropped and resumed, so a link that
//! holds packets without resetting anything is noticed. A damaged frame is re-requested, never delivered.
//! Bandwidth is shaped by a token bucket per session under one per host
//! ([`ratelimit`]), and the session's rate adapts to congestion.

pub mod certs;
pub mod ratelimit;
pub mod session;
pub mod tls;
pub mod wire;

pub use ratelimit::{weighted_shares, Claim, HostLimiter, TokenBucket};
pub use session::{
    Listener, Receiver, Redirector, Router, Security, Sender, SessionConfig, SessionMetrics,
    TransportError, HEARTBEAT, MAX_PENDING, MAX_REORDER_BYTES, MAX_SESSIONS, RESUME_FOREVER,
    ROUTE_TIMEOUT, SILENCE_LIMIT,
};
pub use tls::TlsIdentity;
