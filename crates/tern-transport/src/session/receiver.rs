//! The receiving end: the reorder buffer and delivery.

use super::*;

pub(super) struct RecvState {
    pub(super) next_deliver: u64,
    pub(super) buffer: BTreeMap<u64, Bytes>,
    /// Payload bytes in `buffer` (bounded by [`MAX_REORDER_BYTES`]).
    pub(super) buffered_bytes: usize,
    pub(super) applied_upto: u64,
    pub(super) total: Option<u64>,
    pub(super) live_streams: usize,
    pub(super) down_since: Option<Instant>,
    pub(super) corrupt: u64,
    pub(super) duplicates: u64,
}

/// The most payload a session's receiver holds before the application
/// takes it: 4 × the largest window a tern sender uses (64 MiB). An honest
/// sender never has more unacknowledged than its window; a peer that sends
/// more (frames far ahead, never the one awaited) loses its stream instead
/// of growing this process without bound.
pub const MAX_REORDER_BYTES: usize = 256 << 20;

pub(super) struct RecvShared {
    pub(super) token: ResumeToken,
    pub(super) streams: u16,
    pub(super) state: Mutex<RecvState>,
    pub(super) arrived: Notify,
    pub(super) acks: watch::Sender<u64>,
    /// How long every stream may stay down (ms) before `recv` fails.
    pub(super) resume_deadline_ms: AtomicU64,
    /// SHA-256 of the peer certificate's public key (TLS sessions): who
    /// opened the session. Every later stream must come from the same key.
    pub(super) peer_pin: Option<[u8; 32]>,
}

impl RecvShared {
    /// Lowest seq not yet received (all below arrived or were delivered).
    pub(super) fn next_expected(&self) -> u64 {
        let st = self.state.lock().expect("recv state");
        let mut n = st.next_deliver;
        while st.buffer.contains_key(&n) {
            n += 1;
        }
        n
    }
}

/// The receiving end of a session.
pub struct Receiver {
    pub(super) shared: Arc<RecvShared>,
}

/// Receiver-side counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiverMetrics {
    /// Frames delivered to the application.
    pub delivered: u64,
    /// Frames dropped because their payload hash did not match (re-requested).
    pub corrupt: u64,
    /// Frames that arrived twice (replays of frames already received).
    pub duplicates: u64,
}

impl Receiver {
    /// The SHA-256 pin of the public key the peer authenticated with (TLS
    /// sessions only): the identity a peer's claims must match, since the
    /// names it writes in its messages are its own to choose.
    pub fn peer_pin(&self) -> Option<[u8; 32]> {
        self.shared.peer_pin
    }

    /// The next frame in order, `None` after the sender's last one, or an error
    /// if the link stayed down past the resume deadline.
    pub async fn recv(&mut self) -> Option<Result<(u64, Bytes), TransportError>> {
        let sh = &self.shared;
        loop {
            let arrived = sh.arrived.notified();
            {
                let mut st = sh.state.lock().expect("recv state");
                let seq = st.next_deliver;
                if let Some(b) = st.buffer.remove(&seq) {
                    st.buffered_bytes -= b.len();
                    st.next_deliver += 1;
                    return Some(Ok((seq, b)));
                }
                if st.total == Some(seq) {
                    return None;
                }
                if let Some(t) = st.down_since {
                    let deadline = Duration::from_millis(sh.resume_deadline_ms.load(Relaxed));
                    if st.live_streams == 0 && t.elapsed() > deadline {
                        return Some(Err(TransportError::LinkLost(deadline)));
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), arrived).await;
        }
    }

    /// How long every stream may stay down before [`Receiver::recv`]
    /// fails, from now on (see [`Sender::set_resume_deadline`]).
    pub fn set_resume_deadline(&self, d: Duration) {
        self.shared
            .resume_deadline_ms
            .store(duration_ms(d), Relaxed);
    }

    /// Whether at least one stream is connected now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.lock().expect("recv state").live_streams > 0
    }

    /// Acknowledges that every frame up to and including `seq` is durably
    /// applied; the sender may forget them.
    pub fn ack(&self, seq: u64) {
        let mut st = self.shared.state.lock().expect("recv state");
        if seq + 1 > st.applied_upto {
            st.applied_upto = seq + 1;
            let v = st.applied_upto;
            drop(st);
            self.shared.acks.send_replace(v);
        }
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> ReceiverMetrics {
        let st = self.shared.state.lock().expect("recv state");
        ReceiverMetrics {
            delivered: st.next_deliver,
            corrupt: st.corrupt,
            duplicates: st.duplicates,
        }
    }
}
