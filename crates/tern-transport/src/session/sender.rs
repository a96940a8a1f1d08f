//! The sending end: its shared state, its streams and reconnects.

use super::*;

pub(super) struct Pending {
    pub(super) payload: Bytes,
    pub(super) sent_at: Option<Instant>,
    pub(super) sent_on: Option<(u16, u64)>,
    pub(super) times_sent: u32,
    /// The receiver reported it received (not yet applied): no need to replay.
    pub(super) received: bool,
}

pub(super) struct SendState {
    pub(super) next_seq: u64,
    pub(super) unacked: BTreeMap<u64, Pending>,
    pub(super) unacked_bytes: usize,
    pub(super) acked_upto: u64,
    pub(super) finish: Option<u64>,
    pub(super) finish_confirmed: bool,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes_sent: AtomicU64,
    pub(super) bytes_acked: AtomicU64,
    pub(super) frames_sent: AtomicU64,
    pub(super) retransmits: AtomicU64,
    pub(super) retransmitted_bytes: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) nacks: AtomicU64,
    pub(super) srtt_us: AtomicU64,
    pub(super) min_rtt_us: AtomicU64,
}

/// Bytes read from a TLS socket per syscall (see the listener).
pub(super) const TLS_READ_BUFFER: usize = 1 << 20;
/// Bytes of TLS records a sender gathers before writing them out.
pub(super) const TLS_SEND_BUFFER: usize = 1 << 20;

pub(super) struct SenderShared {
    /// Where streams (re)connect; [`Sender::redirect`] changes it.
    pub(super) addr: Mutex<SocketAddr>,
    /// How long the streams may stay down (ms); starts as
    /// `cfg.resume_deadline`, [`Sender::set_resume_deadline`] changes it.
    pub(super) resume_deadline_ms: AtomicU64,
    pub(super) security: Security,
    pub(super) cfg: SessionConfig,
    pub(super) session: SessionId,
    pub(super) token: ResumeToken,
    pub(super) state: Mutex<SendState>,
    pub(super) progress: Notify,
    pub(super) queue: (async_channel::Sender<u64>, async_channel::Receiver<u64>),
    pub(super) replay: (async_channel::Sender<u64>, async_channel::Receiver<u64>),
    pub(super) bucket: Arc<TokenBucket>,
    pub(super) cap: AtomicU64,
    pub(super) host: Option<Arc<HostLimiter>>,
    /// Whether the rate adapts: asked for, or turned on at connect for a
    /// link slower than `cfg.adaptive_above_rtt`.
    pub(super) adaptive: AtomicBool,
    pub(super) counters: Counters,
    pub(super) failed: watch::Sender<Option<TransportError>>,
}

/// The sending end of a session. Cheap to share behind an `Arc`.
pub struct Sender {
    pub(super) shared: Arc<SenderShared>,
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub(super) async fn open_stream(
    sh: &SenderShared,
    index: u16,
    resume: bool,
) -> Result<(BoxRead, BoxWrite, u64), TransportError> {
    let addr = *sh.addr.lock().expect("addr");
    let fail = |reason: String| TransportError::Connect { addr, reason };
    let attempt = async {
        let t0 = Instant::now();
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
                // A handshake slower than the adaptive threshold may be a
                // WAN link's: no big buffer then either.
                let maybe_wan = sh.cfg.adaptive_above_rtt.is_some_and(|t| t0.elapsed() > t);
                if !sh.adaptive.load(Relaxed)
                    && !maybe_wan
                    && sh.cfg.rate_bytes_per_sec == UNLIMITED
                    && sh.host.is_none()
                {
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
        let asked = Instant::now();
        let mut b = [0u8; HELLO_ACK_LEN];
        r.read_exact(&mut b)
            .await
            .map_err(|e| fail(format!("no hello reply: {e}")))?;
        sh.rtt_sample(asked.elapsed());
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
pub(super) fn is_fatal(e: &TransportError, resume: bool) -> bool {
    match e {
        TransportError::Refused(_) => true,
        TransportError::Handshake { .. } => !resume,
        _ => false,
    }
}

impl SenderShared {
    pub(super) fn resume_deadline(&self) -> Duration {
        Duration::from_millis(self.resume_deadline_ms.load(Relaxed))
    }

    /// The most this session may send: its cap, under its fair share of the host.
    pub(super) fn ceiling(&self) -> u64 {
        let cap = self.cap.load(Relaxed);
        match &self.host {
            Some(h) => min_rate(cap, h.fair_share()),
            None => cap,
        }
    }

    /// Counts one round trip measured outside the data (a hello's).
    pub(super) fn rtt_sample(&self, rtt: Duration) {
        let us = (rtt.as_micros() as u64).max(1);
        let min = self.counters.min_rtt_us.load(Relaxed);
        if min == 0 || us < min {
            self.counters.min_rtt_us.store(us, Relaxed);
        }
    }

    /// Turns the adaptive rate on while the link's smallest round trip
    /// so far (hellos at connect, then acknowledgements) is above the
    /// configured threshold, and off again if a smaller one shows the
    /// first was a busy machine's, not the link's.
    pub(super) fn adapt_to_link(&self) {
        let Some(threshold) = self.cfg.adaptive_above_rtt else {
            return;
        };
        let us = self.counters.min_rtt_us.load(Relaxed);
        if self.cfg.adaptive || us == 0 {
            return;
        }
        let rtt = Duration::from_micros(us);
        let slow = rtt > threshold;
        match (self.adaptive.swap(slow, Relaxed), slow) {
            (false, true) => {
                tracing::info!(?rtt, ?threshold, "a slow link: the session's rate adapts");
                if self.bucket.rate() == UNLIMITED {
                    self.bucket.set_rate(min_rate(
                        self.cfg.initial_rate_bytes_per_sec,
                        self.ceiling(),
                    ));
                }
            }
            (true, false) => {
                tracing::info!(?rtt, ?threshold, "a fast link after all: the rate is fixed");
                self.bucket.set_rate(self.ceiling());
            }
            _ => {}
        }
    }

    pub(super) fn fail(&self, e: TransportError) {
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

    pub(super) fn failure(&self) -> Option<TransportError> {
        self.failed.borrow().clone()
    }

    pub(super) fn on_ack(&self, upto: u64) {
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
    pub(super) fn requeue_from(&self, stream: u16, generation: u64) {
        let st = self.state.lock().expect("send state");
        for (seq, p) in st.unacked.iter() {
            if p.sent_on == Some((stream, generation)) && !p.received {
                let _ = self.replay.0.try_send(*seq);
            }
        }
    }

    pub(super) fn mark_received_below(&self, next_expected: u64) {
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
            addr: Mutex::new(addr),
            resume_deadline_ms: AtomicU64::new(duration_ms(cfg.resume_deadline)),
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
            adaptive: AtomicBool::new(cfg.adaptive),
            counters: Counters::default(),
            failed: watch::channel(None).0,
            cfg,
        });
        let mut conns = Vec::new();
        for i in 0..shared.cfg.streams {
            conns.push(open_stream(&shared, i, false).await?);
        }
        shared.adapt_to_link();
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

    /// How long the streams may stay down before the session fails, from
    /// now on. Post-copy sets it to [`RESUME_FOREVER`]: the guest already
    /// runs at the destination, so giving up loses it.
    pub fn set_resume_deadline(&self, d: Duration) {
        self.shared
            .resume_deadline_ms
            .store(duration_ms(d), Relaxed);
    }

    /// Streams reconnect to `addr` from now on (the peer moved, or an
    /// operator points a stalled session at a new route to it); live
    /// streams stay where they are. The peer must be the same session's
    /// listener: the resume token and the pin still have to match.
    pub fn redirect(&self, addr: SocketAddr) {
        self.redirector().redirect(addr);
    }

    /// A handle that can redirect this session after it was moved away.
    pub fn redirector(&self) -> Redirector {
        Redirector(self.shared.clone())
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
            adaptive: self.shared.adaptive.load(Relaxed),
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
pub(super) async fn stream_task(sh: Arc<SenderShared>, index: u16, r: BoxRead, w: BoxWrite) {
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

pub(super) async fn reconnect(sh: &Arc<SenderShared>, index: u16) -> Option<(BoxRead, BoxWrite)> {
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
                let deadline = sh.resume_deadline();
                if since.elapsed() > deadline {
                    tracing::warn!(stream = index, error = %e, "giving up reconnecting");
                    sh.fail(TransportError::LinkLost(deadline));
                    return None;
                }
                tracing::debug!(stream = index, error = %e, ?backoff, "reconnect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Redirects a [`Sender`] held elsewhere (see [`Sender::redirect`]).
#[derive(Clone)]
pub struct Redirector(Arc<SenderShared>);

impl Redirector {
    /// See [`Sender::redirect`].
    pub fn redirect(&self, addr: SocketAddr) {
        *self.0.addr.lock().expect("addr") = addr;
    }
}

/// A resume deadline that never passes in practice (about 31 years).
pub const RESUME_FOREVER: Duration = Duration::from_secs(1 << 30);

pub(super) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
