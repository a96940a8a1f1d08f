//! Sessions: ordered, resumable frame delivery over N parallel streams.

use crate::ratelimit::{min_rate, HostLimiter, TokenBucket, UNLIMITED};
use crate::wire::{
    self, Control, DataHeader, Hello, HelloAck, HelloStatus, ResumeToken, SessionId, CONTROL_LEN,
    DATA_HEADER_LEN, HELLO_ACK_LEN, HELLO_LEN, PAYLOAD_HASH_LEN,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

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
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

fn split<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(s: S) -> (BoxRead, BoxWrite) {
    let (r, w) = tokio::io::split(s);
    (Box::new(r), Box::new(w))
}

// ---------------------------------------------------------------- sender

struct Pending {
    payload: Bytes,
    sent_at: Option<Instant>,
    sent_on: Option<(u16, u64)>,
    times_sent: u32,
    /// The receiver reported it received (not yet applied): no need to replay.
    received: bool,
}

struct SendState {
    next_seq: u64,
    unacked: BTreeMap<u64, Pending>,
    unacked_bytes: usize,
    acked_upto: u64,
    finish: Option<u64>,
    finish_confirmed: bool,
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_acked: AtomicU64,
    frames_sent: AtomicU64,
    retransmits: AtomicU64,
    retransmitted_bytes: AtomicU64,
    reconnects: AtomicU64,
    nacks: AtomicU64,
    srtt_us: AtomicU64,
    min_rtt_us: AtomicU64,
}

/// Bytes read from a TLS socket per syscall (see the listener).
const TLS_READ_BUFFER: usize = 1 << 20;
/// Bytes of TLS records a sender gathers before writing them out.
const TLS_SEND_BUFFER: usize = 1 << 20;

struct SenderShared {
    addr: SocketAddr,
    security: Security,
    cfg: SessionConfig,
    session: SessionId,
    token: ResumeToken,
    state: Mutex<SendState>,
    progress: Notify,
    queue: (async_channel::Sender<u64>, async_channel::Receiver<u64>),
    replay: (async_channel::Sender<u64>, async_channel::Receiver<u64>),
    bucket: Arc<TokenBucket>,
    cap: AtomicU64,
    host: Option<Arc<HostLimiter>>,
    counters: Counters,
    failed: watch::Sender<Option<TransportError>>,
}

/// The sending end of a session. Cheap to share behind an `Arc`.
pub struct Sender {
    shared: Arc<SenderShared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn open_stream(
    sh: &SenderShared,
    index: u16,
    resume: bool,
) -> Result<(BoxRead, BoxWrite, u64), TransportError> {
    let addr = sh.addr;
    let fail = |reason: String| TransportError::Connect { addr, reason };
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tcp.set_nodelay(true).ok();
        let mut tcp = tcp;
        write_route(&mut tcp, sh.cfg.route.as_deref())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let (mut r, mut w) = match &sh.security {
            Security::InsecurePlaintext => split(tcp),
            Security::Tls {
                config,
                server_name,
            } => {
                let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                    .map_err(|e| fail(format!("bad server name `{server_name}`: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        // rustls reports certificate and alert failures as InvalidData;
                        // anything else is the network, which a retry may get past.
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            TransportError::Handshake {
                                addr,
                                reason: e.to_string(),
                            }
                        } else {
                            fail(format!("connection lost during TLS handshake: {e}"))
                        }
                    })?;
                let mut tls = tls;
                // rustls flushes its send buffer at this limit (64 KiB by
                // default): 1 MiB means one writev per MiB of frames. Only
                // for unpaced sessions: bytes parked in rustls count as sent,
                // so a paced or adaptive session would see them as queueing
                // delay (measured: the adaptive rate stopped climbing).
                if !sh.cfg.adaptive && sh.cfg.rate_bytes_per_sec == UNLIMITED && sh.host.is_none() {
                    tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER));
                }
                split(tls)
            }
        };
        let hello = Hello {
            session: sh.session,
            token: sh.token,
            stream_index: index,
            stream_count: sh.cfg.streams,
            resume,
        };
        w.write_all(&hello.encode())
            .await
            .map_err(|e| fail(e.to_string()))?;
        w.flush().await.map_err(|e| fail(e.to_string()))?;
        let mut b = [0u8; HELLO_ACK_LEN];
        r.read_exact(&mut b)
            .await
            .map_err(|e| fail(format!("no hello reply: {e}")))?;
        let ack = HelloAck::decode(&b).map_err(|e| fail(e.to_string()))?;
        if ack.status != HelloStatus::Ok {
            return Err(TransportError::Refused(format!("{:?}", ack.status)));
        }
        Ok((r, w, ack.next_expected))
    };
    tokio::time::timeout(sh.cfg.connect_timeout, attempt)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// Whether a failed connection attempt ends the session. A refusal does.
/// A failed handshake does on the first connection (a peer that is not
/// the pinned one does not become it by retrying), but not on a reconnect
/// of a session that already authenticated: there it is a damaged message
/// on a noisy link, retried until the resume deadline.
fn is_fatal(e: &TransportError, resume: bool) -> bool {
    match e {
        TransportError::Refused(_) => true,
        TransportError::Handshake { .. } => !resume,
        _ => false,
    }
}

impl SenderShared {
    /// The most this session may send: its cap, under its fair share of the host.
    fn ceiling(&self) -> u64 {
        let cap = self.cap.load(Relaxed);
        match &self.host {
            Some(h) => min_rate(cap, h.fair_share()),
            None => cap,
        }
    }

    fn fail(&self, e: TransportError) {
        self.failed.send_if_modified(|f| {
            if f.is_none() {
                tracing::warn!(error = %e, "migration session failed");
                *f = Some(e);
                true
            } else {
                false
            }
        });
        self.progress.notify_waiters();
        self.queue.0.close();
        self.replay.0.close();
    }

    fn failure(&self) -> Option<TransportError> {
        self.failed.borrow().clone()
    }

    fn on_ack(&self, upto: u64) {
        let mut st = self.state.lock().expect("send state");
        if upto <= st.acked_upto {
            return;
        }
        let keep = st.unacked.split_off(&upto);
        let done = std::mem::replace(&mut st.unacked, keep);
        let mut bytes = 0usize;
        let mut sample = None;
        for (seq, p) in &done {
            bytes += p.payload.len();
            if *seq == upto - 1 && p.times_sent == 1 {
                sample = p.sent_at.map(|t| t.elapsed());
            }
        }
        st.unacked_bytes -= bytes;
        st.acked_upto = upto;
        drop(st);
        self.counters.bytes_acked.fetch_add(bytes as u64, Relaxed);
        if let Some(rtt) = sample {
            let us = rtt.as_micros() as u64;
            let old = self.counters.srtt_us.load(Relaxed);
            let srtt = if old == 0 { us } else { (old * 7 + us) / 8 };
            self.counters.srtt_us.store(srtt, Relaxed);
            let min = self.counters.min_rtt_us.load(Relaxed);
            if min == 0 || us < min {
                self.counters.min_rtt_us.store(us, Relaxed);
            }
        }
        self.progress.notify_waiters();
    }

    /// Requeues frames last sent on a connection that died.
    fn requeue_from(&self, stream: u16, generation: u64) {
        let st = self.state.lock().expect("send state");
        for (seq, p) in st.unacked.iter() {
            if p.sent_on == Some((stream, generation)) && !p.received {
                let _ = self.replay.0.try_send(*seq);
            }
        }
    }

    fn mark_received_below(&self, next_expected: u64) {
        let mut st = self.state.lock().expect("send state");
        for (_, p) in st.unacked.range_mut(..next_expected) {
            p.received = true;
        }
    }
}

impl Sender {
    /// Opens a session of `cfg.streams` streams to `addr`. Fails at once if the
    /// peer cannot be reached or authenticated.
    pub async fn connect(
        addr: SocketAddr,
        security: Security,
        cfg: SessionConfig,
        host: Option<Arc<HostLimiter>>,
    ) -> Result<Sender, TransportError> {
        if cfg.streams == 0 || cfg.streams > 256 {
            return Err(TransportError::Protocol("streams must be 1..=256".into()));
        }
        let start_rate = if cfg.adaptive && cfg.rate_bytes_per_sec == UNLIMITED {
            cfg.initial_rate_bytes_per_sec
        } else {
            cfg.rate_bytes_per_sec
        };
        let bucket = Arc::new(TokenBucket::new(start_rate));
        if let Some(h) = &host {
            h.register(&bucket);
        }
        let shared = Arc::new(SenderShared {
            addr,
            security,
            session: rand::random(),
            token: rand::random(),
            state: Mutex::new(SendState {
                next_seq: 0,
                unacked: BTreeMap::new(),
                unacked_bytes: 0,
                acked_upto: 0,
                finish: None,
                finish_confirmed: false,
            }),
            progress: Notify::new(),
            queue: async_channel::unbounded(),
            replay: async_channel::unbounded(),
            bucket,
            cap: AtomicU64::new(cfg.rate_bytes_per_sec),
            host,
            counters: Counters::default(),
            failed: watch::channel(None).0,
            cfg,
        });
        let mut conns = Vec::new();
        for i in 0..shared.cfg.streams {
            conns.push(open_stream(&shared, i, false).await?);
        }
        let mut tasks = Vec::new();
        for (i, (r, w, _)) in conns.into_iter().enumerate() {
            tasks.push(tokio::spawn(stream_task(shared.clone(), i as u16, r, w)));
        }
        tasks.push(tokio::spawn(rate_task(Arc::downgrade(&shared))));
        Ok(Sender { shared, tasks })
    }

    /// Queues one frame; waits while the unacknowledged window is full.
    /// Returns its sequence number.
    pub async fn send(&self, payload: Bytes) -> Result<u64, TransportError> {
        if payload.len() > wire::MAX_PAYLOAD {
            return Err(TransportError::Protocol(format!(
                "frame of {} bytes is too large",
                payload.len()
            )));
        }
        let sh = &self.shared;
        loop {
            let notified = sh.progress.notified();
            if let Some(e) = sh.failure() {
                return Err(e);
            }
            {
                let mut st = sh.state.lock().expect("send state");
                if st.finish.is_some() {
                    return Err(TransportError::Closed);
                }
                if st.unacked.is_empty() || st.unacked_bytes + payload.len() <= sh.cfg.window_bytes
                {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.unacked_bytes += payload.len();
                    st.unacked.insert(
                        seq,
                        Pending {
                            payload,
                            sent_at: None,
                            sent_on: None,
                            times_sent: 0,
                            received: false,
                        },
                    );
                    drop(st);
                    let _ = sh.queue.0.try_send(seq);
                    return Ok(seq);
                }
            }
            notified.await;
        }
    }

    /// Sends the end-of-session marker and waits until the receiver has applied
    /// every frame. Returns the final counters.
    pub async fn finish(mut self) -> Result<SessionMetrics, TransportError> {
        let sh = self.shared.clone();
        {
            let mut st = sh.state.lock().expect("send state");
            st.finish = Some(st.next_seq);
        }
        sh.progress.notify_waiters();
        loop {
            let notified = sh.progress.notified();
            if let Some(e) = sh.failure() {
                return Err(e);
            }
            {
                let st = sh.state.lock().expect("send state");
                if Some(st.acked_upto) == st.finish && st.finish_confirmed {
                    break;
                }
            }
            notified.await;
        }
        let m = self.metrics();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        Ok(m)
    }

    /// Sets the session's rate cap (bytes/s, 0: none) while running.
    pub fn set_rate(&self, rate: u64) {
        self.shared.cap.store(rate, Relaxed);
        self.shared.bucket.set_rate(self.shared.ceiling());
    }

    /// Why the session failed, if it has (e.g. the link stayed down past the
    /// resume deadline). Lets a caller waiting on acknowledgements stop at once.
    pub fn error(&self) -> Option<TransportError> {
        self.shared.failure()
    }

    /// Payload bytes sent but not yet acknowledged: what a drop could make us replay.
    pub fn unacked_bytes(&self) -> usize {
        self.shared.state.lock().expect("send state").unacked_bytes
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> SessionMetrics {
        let c = &self.shared.counters;
        SessionMetrics {
            bytes_sent: c.bytes_sent.load(Relaxed),
            bytes_acked: c.bytes_acked.load(Relaxed),
            frames_sent: c.frames_sent.load(Relaxed),
            retransmits: c.retransmits.load(Relaxed),
            retransmitted_bytes: c.retransmitted_bytes.load(Relaxed),
            reconnects: c.reconnects.load(Relaxed),
            nacks: c.nacks.load(Relaxed),
            rate_bytes_per_sec: self.shared.bucket.rate(),
            srtt: Duration::from_micros(c.srtt_us.load(Relaxed)),
            min_rtt: Duration::from_micros(c.min_rtt_us.load(Relaxed)),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One stream: write frames while the connection lives, reconnect when it dies.
async fn stream_task(sh: Arc<SenderShared>, index: u16, r: BoxRead, w: BoxWrite) {
    let mut conn = Some((r, w));
    let mut generation = 0u64;
    loop {
        let (r, w) = match conn.take() {
            Some(c) => c,
            None => match reconnect(&sh, index).await {
                Some(c) => {
                    // Now that the receiver has said what it holds, replay only
                    // what this stream's dead connection may have lost.
                    sh.requeue_from(index, generation);
                    c
                }
                None => return,
            },
        };
        generation += 1;
        let (dead_tx, mut dead_rx) = mpsc::channel::<()>(1);
        let reader = tokio::spawn(control_reader(sh.clone(), r, dead_tx));
        let res = write_loop(&sh, index, generation, w, &mut dead_rx).await;
        reader.abort();
        match res {
            WriteEnd::Done | WriteEnd::Failed => return,
            WriteEnd::ConnectionLost => {
                tracing::info!(stream = index, "migration stream dropped; reconnecting");
            }
        }
    }
}

async fn reconnect(sh: &Arc<SenderShared>, index: u16) -> Option<(BoxRead, BoxWrite)> {
    let since = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        if sh.failure().is_some() {
            return None;
        }
        match open_stream(sh, index, true).await {
            Ok((r, w, next_expected)) => {
                sh.counters.reconnects.fetch_add(1, Relaxed);
                sh.mark_received_below(next_expected);
                return Some((r, w));
            }
            Err(e) if is_fatal(&e, true) => {
                sh.fail(e);
                return None;
            }
            Err(e) => {
                if since.elapsed() > sh.cfg.resume_deadline {
                    tracing::warn!(stream = index, error = %e, "giving up reconnecting");
                    sh.fail(TransportError::LinkLost(sh.cfg.resume_deadline));
                    return None;
                }
                tracing::debug!(stream = index, error = %e, ?backoff, "reconnect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

enum WriteEnd {
    Done,
    Failed,
    ConnectionLost,
}

async fn write_loop(
    sh: &Arc<SenderShared>,
    index: u16,
    generation: u64,
    w: BoxWrite,
    dead: &mut mpsc::Receiver<()>,
) -> WriteEnd {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let mut finish_sent = false;
    loop {
        // Next frame: replays first, then new frames; flush before waiting.
        let seq = match sh.replay.1.try_recv().or_else(|_| sh.queue.1.try_recv()) {
            Ok(s) => Some(s),
            Err(_) => {
                let flushed = tokio::select! {
                    r = w.flush() => r.is_ok(),
                    _ = dead.recv() => false,
                };
                if !flushed {
                    return WriteEnd::ConnectionLost;
                }
                // Every stream announces the end, so it arrives whichever streams survive.
                let finish = { sh.state.lock().expect("send state").finish };
                if let (Some(total), false) = (finish, finish_sent) {
                    if w.write_all(&wire::finish_header(total)).await.is_err()
                        || w.flush().await.is_err()
                    {
                        return WriteEnd::ConnectionLost;
                    }
                    finish_sent = true;
                }
                let progress = sh.progress.notified();
                tokio::select! {
                    biased;
                    _ = dead.recv() => return WriteEnd::ConnectionLost,
                    s = sh.replay.1.recv() => match s { Ok(s) => Some(s), Err(_) => return end_state(sh) },
                    s = sh.queue.1.recv() => match s { Ok(s) => Some(s), Err(_) => return end_state(sh) },
                    _ = progress => None,
                }
            }
        };
        let Some(seq) = seq else { continue };
        let payload = {
            let mut st = sh.state.lock().expect("send state");
            if seq < st.acked_upto {
                continue;
            }
            let Some(p) = st.unacked.get_mut(&seq) else {
                continue;
            };
            if p.received && p.times_sent > 0 {
                continue; // the receiver has it; only its ack is outstanding
            }
            p.sent_on = Some((index, generation));
            p.times_sent += 1;
            if p.times_sent > 1 {
                sh.counters.retransmits.fetch_add(1, Relaxed);
                sh.counters
                    .retransmitted_bytes
                    .fetch_add(p.payload.len() as u64, Relaxed);
            }
            p.payload.clone()
        };
        // TLS authenticates every byte; plaintext streams carry a checksum.
        let checksummed = matches!(sh.security, Security::InsecurePlaintext);
        let wire_len = payload.len() + wire::frame_overhead(checksummed);
        let mut wait = sh.bucket.reserve(wire_len);
        if let Some(h) = &sh.host {
            wait = wait.max(h.reserve(wire_len));
        }
        if !wait.is_zero() {
            // Rate-limited: push out what is buffered before sleeping, or it
            // would sit in the buffer and look like network delay.
            let flushed = tokio::select! {
                r = w.flush() => r.is_ok(),
                _ = dead.recv() => false,
            };
            if !flushed {
                return WriteEnd::ConnectionLost;
            }
            tokio::time::sleep(wait).await;
        }
        let ok = async {
            w.write_all(&wire::data_header(seq, payload.len() as u32))
                .await?;
            w.write_all(&payload).await?;
            if checksummed {
                w.write_all(&wire::payload_hash(&payload)).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        // A write can block on a connection whose peer is gone; the control
        // reader notices first, so race the two.
        let wrote = tokio::select! {
            r = ok => r.is_ok(),
            _ = dead.recv() => false,
        };
        if !wrote {
            return WriteEnd::ConnectionLost;
        }
        // Sent time is when the bytes left us, not when they were queued.
        if let Some(p) = sh.state.lock().expect("send state").unacked.get_mut(&seq) {
            p.sent_at = Some(Instant::now());
        }
        sh.counters.frames_sent.fetch_add(1, Relaxed);
        sh.counters.bytes_sent.fetch_add(wire_len as u64, Relaxed);
        if let Ok(()) = dead.try_recv() {
            return WriteEnd::ConnectionLost;
        }
    }
}

fn end_state(sh: &SenderShared) -> WriteEnd {
    if sh.failure().is_some() {
        WriteEnd::Failed
    } else {
        WriteEnd::Done
    }
}

async fn control_reader(sh: Arc<SenderShared>, mut r: BoxRead, dead: mpsc::Sender<()>) {
    let mut b = [0u8; CONTROL_LEN];
    loop {
        if r.read_exact(&mut b).await.is_err() {
            let _ = dead.try_send(());
            return;
        }
        match Control::decode(&b) {
            Ok(Control::Ack(upto)) => sh.on_ack(upto),
            Ok(Control::Nack(seq)) => {
                sh.counters.nacks.fetch_add(1, Relaxed);
                let _ = sh.replay.0.try_send(seq);
            }
            Ok(Control::FinishAck(total)) => {
                let mut st = sh.state.lock().expect("send state");
                if st.finish == Some(total) {
                    st.finish_confirmed = true;
                }
                drop(st);
                sh.progress.notify_waiters();
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad control message; dropping stream");
                let _ = dead.try_send(());
                return;
            }
        }
    }
}

/// Adapts the session rate: back off to what is delivered when the RTT shows a
/// queue building or throughput stalls; probe upwards while the path is clear.
async fn rate_task(sh: std::sync::Weak<SenderShared>) {
    const TICK: Duration = Duration::from_millis(100);
    let mut last_acked = 0u64;
    let mut last = Instant::now();
    let mut hold_until = Instant::now();
    // (seconds, bytes delivered, limiter rate) per tick, last 5 ticks: one tick
    // holds too few frames at low rates to judge by.
    let mut history: std::collections::VecDeque<(f64, f64, f64)> = Default::default();
    loop {
        tokio::time::sleep(TICK).await;
        let Some(sh) = sh.upgrade() else { return };
        if sh.failure().is_some() {
            return;
        }
        let ceiling = sh.ceiling();
        let acked = sh.counters.bytes_acked.load(Relaxed);
        let dt = last.elapsed().as_secs_f64();
        history.push_back((dt, (acked - last_acked) as f64, sh.bucket.rate() as f64));
        if history.len() > 5 {
            history.pop_front();
        }
        last_acked = acked;
        last = Instant::now();
        let span: f64 = history.iter().map(|h| h.0).sum();
        let delivered = history.iter().map(|h| h.1).sum::<f64>() / span;
        let mean_rate = history.iter().map(|h| h.2 * h.0).sum::<f64>() / span;
        if !sh.cfg.adaptive {
            if sh.bucket.rate() != ceiling {
                sh.bucket.set_rate(ceiling);
            }
            continue;
        }
        let backlog = {
            let st = sh.state.lock().expect("send state");
            st.unacked_bytes > 0 || !sh.queue.1.is_empty()
        };
        let srtt = sh.counters.srtt_us.load(Relaxed) as f64;
        let min_rtt = sh.counters.min_rtt_us.load(Relaxed) as f64;
        let rate = sh.bucket.rate() as f64;
        if Instant::now() < hold_until {
            continue; // let the last decrease take effect before judging again
        }
        // Congestion: what gets through falls well short of what we send
        // (throughput stalls), or a heavy queue doubles the round trip.
        // Judged against the lowest rate of the window: while probing up
        // 10% a tick, what is delivered trails the newest rate by a round
        // trip, and comparing with the mean made a clear path look stalled
        // (the rate then stuck near its start; seen in CI).
        let lowest_rate = history.iter().map(|h| h.2).fold(f64::MAX, f64::min);
        let stalled = backlog && history.len() == 5 && delivered < lowest_rate.min(mean_rate) * 0.8;
        let heavy_queue = min_rtt > 0.0 && srtt > 2.0 * min_rtt + 10_000.0;
        let next = if (stalled || heavy_queue) && delivered > 0.0 {
            hold_until = Instant::now()
                + Duration::from_micros((srtt * 2.0) as u64).max(Duration::from_millis(200));
            history.clear();
            (delivered * 0.95).min(rate)
        } else if backlog {
            rate * 1.1
        } else {
            rate
        };
        let floor = sh.cfg.min_rate_bytes_per_sec as f64;
        let mut next = next.max(floor) as u64;
        if ceiling != UNLIMITED {
            next = next.min(ceiling);
        }
        sh.bucket.set_rate(next.max(1));
    }
}

// -------------------------------------------------------------- receiver

struct RecvState {
    next_deliver: u64,
    buffer: BTreeMap<u64, Bytes>,
    applied_upto: u64,
    total: Option<u64>,
    live_streams: usize,
    down_since: Option<Instant>,
    corrupt: u64,
    duplicates: u64,
}

struct RecvShared {
    token: ResumeToken,
    streams: u16,
    state: Mutex<RecvState>,
    arrived: Notify,
    acks: watch::Sender<u64>,
    resume_deadline: Duration,
}

impl RecvShared {
    /// Lowest seq not yet received (all below arrived or were delivered).
    fn next_expected(&self) -> u64 {
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
    shared: Arc<RecvShared>,
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
                    st.next_deliver += 1;
                    return Some(Ok((seq, b)));
                }
                if st.total == Some(seq) {
                    return None;
                }
                if let Some(t) = st.down_since {
                    if st.live_streams == 0 && t.elapsed() > sh.resume_deadline {
                        return Some(Err(TransportError::LinkLost(sh.resume_deadline)));
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), arrived).await;
        }
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

/// Hands a stream whose route names another process to that process
/// (before any TLS: the process it goes to does its own handshake).
pub type Router = Arc<dyn Fn(String, TcpStream) + Send + Sync>;

/// Longest route a stream may name.
pub const MAX_ROUTE_LEN: usize = 128;

/// Every stream opens with its route, in plain text before TLS: one length
/// byte, then that many bytes of UTF-8 (0: the listener's own process). A
/// route names no secret; the process it reaches still authenticates the peer.
async fn write_route(tcp: &mut TcpStream, route: Option<&str>) -> std::io::Result<()> {
    let route = route.unwrap_or("");
    if route.len() > MAX_ROUTE_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("route longer than {MAX_ROUTE_LEN} bytes"),
        ));
    }
    let mut b = Vec::with_capacity(1 + route.len());
    b.push(route.len() as u8);
    b.extend_from_slice(route.as_bytes());
    tcp.write_all(&b).await
}

/// Reads a stream's route (`None`: the listener's own).
async fn read_route(tcp: &mut TcpStream) -> Result<Option<String>, String> {
    let mut len = [0u8; 1];
    tcp.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = len[0] as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > MAX_ROUTE_LEN {
        return Err(format!("route of {len} bytes (limit {MAX_ROUTE_LEN})"));
    }
    let mut b = vec![0u8; len];
    tcp.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    String::from_utf8(b)
        .map(Some)
        .map_err(|_| "route is not UTF-8".to_string())
}

type SessionTable = Arc<Mutex<HashMap<SessionId, Arc<RecvShared>>>>;

/// What every accepted stream needs: TLS, the session table, where new
/// sessions go.
#[derive(Clone)]
struct Acceptor {
    tls: Option<tokio_rustls::TlsAcceptor>,
    sessions: SessionTable,
    new_tx: mpsc::Sender<Receiver>,
    resume_deadline: Duration,
}

impl Acceptor {
    /// TLS (unless plaintext was asked for), then the stream's hello and frames.
    async fn serve(self, sock: TcpStream, peer: Option<SocketAddr>) {
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        let checksummed = self.tls.is_none();
        let (r, w) = match self.tls {
            Some(a) => {
                // rustls reads the socket 4 KiB at a time (its buffer
                // shrinks whenever it empties): a buffer underneath turns
                // that into one syscall per MiB.
                let sock = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, sock);
                match tokio::time::timeout(Duration::from_secs(10), a.accept(sock)).await {
                    Ok(Ok(s)) => split(s),
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "refused migration peer: TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "refused migration peer: TLS handshake timed out");
                        return;
                    }
                }
            }
            None => split(sock),
        };
        if let Err(e) = serve_stream(
            r,
            w,
            self.sessions,
            self.new_tx,
            self.resume_deadline,
            checksummed,
        )
        .await
        {
            tracing::warn!(%peer, error = %e, "migration stream refused");
        }
    }
}

/// Accepts sessions (and reconnecting streams of existing ones).
pub struct Listener {
    addr: Option<SocketAddr>,
    new_sessions: mpsc::Receiver<Receiver>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Listens on `addr`. `tls: None` accepts plain TCP: only for tests, and
    /// only when the caller asks for it by passing `None` explicitly.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        resume_deadline: Duration,
    ) -> std::io::Result<Listener> {
        Self::bind_routed(addr, tls, resume_deadline, None).await
    }

    /// [`Listener::bind`], handing streams whose route names another
    /// process to `router` (without one, such streams are refused).
    pub async fn bind_routed(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        resume_deadline: Duration,
        router: Option<Router>,
    ) -> std::io::Result<Listener> {
        let tcp = TcpListener::bind(addr).await?;
        let addr = tcp.local_addr()?;
        let (acceptor, rx) = Self::acceptor(tls, resume_deadline);
        let task = tokio::spawn(async move {
            loop {
                let (mut sock, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors or memory: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                sock.set_nodelay(true).ok();
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let route =
                        tokio::time::timeout(Duration::from_secs(10), read_route(&mut sock)).await;
                    match (route, router) {
                        (Ok(Ok(None)), _) => acceptor.serve(sock, Some(peer)).await,
                        (Ok(Ok(Some(r))), Some(router)) => router(r, sock),
                        (Ok(Ok(Some(r))), None) => {
                            tracing::warn!(%peer, route = r, "refused a stream routed elsewhere")
                        }
                        (Ok(Err(e)), _) => tracing::warn!(%peer, error = e, "bad stream route"),
                        (Err(_), _) => tracing::warn!(%peer, "no stream route within 10 s"),
                    }
                });
            }
        });
        Ok(Listener {
            addr: Some(addr),
            new_sessions: rx,
            task,
        })
    }

    /// A listener fed with streams another process accepted and routed
    /// here (their route already read).
    pub fn from_streams(
        mut streams: mpsc::Receiver<TcpStream>,
        tls: Option<Arc<rustls::ServerConfig>>,
        resume_deadline: Duration,
    ) -> Listener {
        let (acceptor, rx) = Self::acceptor(tls, resume_deadline);
        let task = tokio::spawn(async move {
            while let Some(sock) = streams.recv().await {
                sock.set_nodelay(true).ok();
                let peer = sock.peer_addr().ok();
                tokio::spawn(acceptor.clone().serve(sock, peer));
            }
        });
        Listener {
            addr: None,
            new_sessions: rx,
            task,
        }
    }

    fn acceptor(
        tls: Option<Arc<rustls::ServerConfig>>,
        resume_deadline: Duration,
    ) -> (Acceptor, mpsc::Receiver<Receiver>) {
        let (new_tx, rx) = mpsc::channel(16);
        let acceptor = Acceptor {
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            sessions: Arc::default(),
            new_tx,
            resume_deadline,
        };
        (acceptor, rx)
    }

    /// The bound address (useful with port 0; unspecified for a listener
    /// fed by [`Listener::from_streams`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The next new session.
    pub async fn accept(&mut self) -> Option<Receiver> {
        self.new_sessions.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_stream(
    mut r: BoxRead,
    mut w: BoxWrite,
    sessions: SessionTable,
    new_tx: mpsc::Sender<Receiver>,
    resume_deadline: Duration,
    checksummed: bool,
) -> Result<(), String> {
    let mut hb = [0u8; HELLO_LEN];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut hb))
        .await
        .map_err(|_| "no hello within 10 s".to_string())?
        .map_err(|e| format!("reading hello: {e}"))?;
    let hello = Hello::decode(&hb).map_err(|e| e.to_string())?;
    let (shared, status) = {
        let mut map = sessions.lock().expect("sessions");
        match map.get(&hello.session) {
            Some(s) if s.token != hello.token => (None, HelloStatus::BadToken),
            Some(s) if s.streams != hello.stream_count => (None, HelloStatus::Mismatch),
            Some(s) => (Some((s.clone(), false)), HelloStatus::Ok),
            None if hello.resume => (None, HelloStatus::UnknownSession),
            None => {
                let s = Arc::new(RecvShared {
                    token: hello.token,
                    streams: hello.stream_count,
                    state: Mutex::new(RecvState {
                        next_deliver: 0,
                        buffer: BTreeMap::new(),
                        applied_upto: 0,
                        total: None,
                        live_streams: 0,
                        down_since: None,
                        corrupt: 0,
                        duplicates: 0,
                    }),
                    arrived: Notify::new(),
                    acks: watch::channel(0).0,
                    resume_deadline,
                });
                map.insert(hello.session, s.clone());
                (Some((s, true)), HelloStatus::Ok)
            }
        }
    };
    let next_expected = shared.as_ref().map_or(0, |(s, _)| s.next_expected());
    let reply = HelloAck {
        status,
        next_expected,
    };
    w.write_all(&reply.encode())
        .await
        .map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())?;
    let Some((shared, is_new)) = shared else {
        return Err(format!("hello refused: {status:?}"));
    };
    if is_new
        && new_tx
            .send(Receiver {
                shared: shared.clone(),
            })
            .await
            .is_err()
    {
        return Err("listener is gone".into());
    }
    {
        let mut st = shared.state.lock().expect("recv state");
        st.live_streams += 1;
        st.down_since = None;
    }
    let (nack_tx, nack_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(control_writer(w, shared.acks.subscribe(), nack_rx));
    let res = read_frames(&shared, &mut r, nack_tx, checksummed).await;
    writer.abort();
    {
        let mut st = shared.state.lock().expect("recv state");
        st.live_streams -= 1;
        if st.live_streams == 0 {
            st.down_since = Some(Instant::now());
        }
    }
    shared.arrived.notify_waiters();
    res
}

async fn read_frames(
    sh: &RecvShared,
    r: &mut BoxRead,
    nack: mpsc::UnboundedSender<Control>,
    checksummed: bool,
) -> Result<(), String> {
    let mut hb = [0u8; DATA_HEADER_LEN];
    // Payloads are read into one reused buffer: once the application drops a
    // frame its memory is reclaimed here, so frames land in warm pages instead
    // of a fresh allocation (and page faults) per frame.
    let mut pool = bytes::BytesMut::new();
    loop {
        if r.read_exact(&mut hb).await.is_err() {
            return Ok(()); // connection ended; the sender reconnects if it needs to
        }
        match wire::parse_data_header(&hb).map_err(|e| e.to_string())? {
            DataHeader::Finish { total } => {
                sh.state.lock().expect("recv state").total = Some(total);
                sh.arrived.notify_waiters();
                let _ = nack.send(Control::FinishAck(total));
            }
            DataHeader::Data { seq, len } => {
                let len = len as usize;
                // Room for a few frames of this size (up to 4 MiB): bulk
                // frames reuse warm memory, a session of small replies
                // does not hold 4 MiB per stream.
                pool.reserve(len.max((len * 4).min(4 << 20)));
                while pool.len() < len {
                    let want = (len - pool.len()) as u64;
                    let n = (&mut *r)
                        .take(want)
                        .read_buf(&mut pool)
                        .await
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection ended inside a frame".into());
                    }
                }
                let payload = pool.split_to(len).freeze();
                let mut hash = [0u8; PAYLOAD_HASH_LEN];
                if checksummed {
                    r.read_exact(&mut hash).await.map_err(|e| e.to_string())?;
                }
                if checksummed && wire::payload_hash(&payload) != hash {
                    sh.state.lock().expect("recv state").corrupt += 1;
                    tracing::warn!(
                        seq,
                        "damaged frame (checksum mismatch); asking for it again"
                    );
                    let _ = nack.send(Control::Nack(seq));
                    continue;
                }
                let mut st = sh.state.lock().expect("recv state");
                if seq < st.next_deliver || st.buffer.contains_key(&seq) {
                    st.duplicates += 1;
                    continue;
                }
                st.buffer.insert(seq, payload);
                drop(st);
                sh.arrived.notify_waiters();
            }
        }
    }
}

async fn control_writer(
    mut w: BoxWrite,
    mut acks: watch::Receiver<u64>,
    mut nacks: mpsc::UnboundedReceiver<Control>,
) {
    let mut last_sent = 0u64;
    loop {
        let msg = tokio::select! {
            r = acks.changed() => {
                if r.is_err() { return; }
                let v = *acks.borrow_and_update();
                if v <= last_sent { continue; }
                last_sent = v;
                Control::Ack(v)
            }
            n = nacks.recv() => match n { Some(c) => c, None => return },
        };
        if w.write_all(&msg.encode()).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
}
