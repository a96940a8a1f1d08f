//! Sessions: ordered, resumable frame delivery over N parallel streams.
//!
//! `sender` holds the sending end and its streams, `writer` what each
//! stream writes and reads back, `receiver` the receiving end, and
//! `listener` accepting streams (routes, TLS, hellos, frames).

mod listener;
mod receiver;
mod sender;
mod writer;

use listener::*;
pub use listener::{Listener, Router, MAX_PENDING, MAX_ROUTE_LEN, MAX_SESSIONS, ROUTE_TIMEOUT};
use receiver::*;
pub use receiver::{Receiver, ReceiverMetrics, MAX_REORDER_BYTES};
use sender::*;
pub use sender::{Redirector, Sender, RESUME_FOREVER};
use writer::*;

use crate::ratelimit::{min_rate, HostLimiter, TokenBucket, UNLIMITED};
use crate::wire::{
    self, Control, DataHeader, Hello, HelloAck, HelloStatus, ResumeToken, SessionId, CONTROL_LEN,
    DATA_HEADER_LEN, HELLO_ACK_LEN, HELLO_LEN, PAYLOAD_HASH_LEN,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

/// How often a sender's stream sends a heartbeat ([`wire::ping_header`]),
/// busy or idle; the receiver answers each at once.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A stream that hears nothing from its peer for this long is dead and is
/// dropped (then resumed, and the resume deadline runs). Without it a
/// half-open connection (a link that holds packets instead of resetting, a
/// frozen peer) would wait on TCP's own timeouts: many minutes.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(5);

/// Why a session failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Could not reach or authenticate the peer.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed: a certificate or pin that does not
    /// match, or a damaged handshake message.
    #[error("cannot connect to {addr}: TLS handshake failed: {reason}")]
    Handshake {
        /// Peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The peer refused the session.
    #[error("peer refused the session: {0}")]
    Refused(String),
    /// Every stream stayed down past the resume deadline.
    #[error("link lost for longer than the resume deadline ({0:?})")]
    LinkLost(Duration),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The session was closed.
    #[error("session closed")]
    Closed,
}

/// How a sender secures its streams.
#[derive(Clone)]
pub enum Security {
    /// TLS 1.3 with mutual auth and pinning; `server_name` must be in the peer's certificate.
    Tls {
        /// From [`crate::TlsIdentity::client_config`].
        config: Arc<rustls::ClientConfig>,
        /// Name to verify the peer's certificate against.
        server_name: String,
    },
    /// Plain TCP. Only for tests and trusted links; must be asked for by name.
    InsecurePlaintext,
}

/// Per-session settings.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Parallel TCP streams.
    pub streams: u16,
    /// Most unacknowledged payload bytes in flight (and in the replay buffer).
    pub window_bytes: usize,
    /// Session rate cap in bytes/s (0: none).
    pub rate_bytes_per_sec: u64,
    /// Adapt the rate to congestion (back off when RTT climbs or throughput stalls).
    pub adaptive: bool,
    /// Turn the adaptive rate on when the link's round trip (measured by
    /// the streams' hellos at connect) is above this: a WAN link, where a
    /// fixed rate either wastes the path or overruns its queue. `None`:
    /// only `adaptive` decides.
    pub adaptive_above_rtt: Option<Duration>,
    /// Adaptive rate never goes below this.
    pub min_rate_bytes_per_sec: u64,
    /// Rate an adaptive session starts at when it has no cap.
    pub initial_rate_bytes_per_sec: u64,
    /// How long the session waits for a dropped link to come back.
    pub resume_deadline: Duration,
    /// Timeout of one connection attempt (TCP + TLS + hello).
    pub connect_timeout: Duration,
    /// Which process behind the peer's listener serves this session (see
    /// [`Listener::bind_routed`]); `None`: the listener's own process.
    pub route: Option<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            streams: 4,
            window_bytes: 64 << 20,
            rate_bytes_per_sec: UNLIMITED,
            adaptive: false,
            adaptive_above_rtt: None,
            min_rate_bytes_per_sec: 1 << 20,
            initial_rate_bytes_per_sec: 8 << 20,
            resume_deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            route: None,
        }
    }
}

/// Counters of one session (sender side unless noted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SessionMetrics {
    /// Bytes written to streams (payload + framing, retransmissions included).
    pub bytes_sent: u64,
    /// Payload bytes the receiver acknowledged.
    pub bytes_acked: u64,
    /// Frames written (retransmissions included).
    pub frames_sent: u64,
    /// Frames written more than once.
    pub retransmits: u64,
    /// Payload bytes written more than once.
    pub retransmitted_bytes: u64,
    /// Stream reconnections after a drop.
    pub reconnects: u64,
    /// Frames the peer re-requested because they arrived damaged.
    pub nacks: u64,
    /// Current rate limit in bytes/s (0: unlimited).
    pub rate_bytes_per_sec: u64,
    /// Smoothed RTT (send to ack).
    pub srtt: Duration,
    /// Lowest RTT seen.
    pub min_rtt: Duration,
    /// Whether the rate adapts to congestion.
    pub adaptive: bool,
}

pub(super) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
pub(super) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

pub(super) fn split<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    s: S,
) -> (BoxRead, BoxWrite) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}
