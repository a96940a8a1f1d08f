//! Accepting streams: routes, TLS, hellos, and reading frames.

use super::*;

/// Hands a stream whose route names another process to that process
/// (before any TLS: the process it goes to does its own handshake).
pub type Router = Arc<dyn Fn(String, TcpStream) + Send + Sync>;

/// Longest route a stream may name.
pub const MAX_ROUTE_LEN: usize = 128;

/// Sessions one listener holds at once: a migration is one or two, a guest
/// process runs one migration at a time, an agent's own listener a few.
/// Each may buffer up to the reorder bound, so the table is what bounds a
/// peer's memory.
pub const MAX_SESSIONS: usize = 16;

/// Connections accepted but not yet routed: past this, new ones wait in
/// the kernel's backlog (a peer that opens sockets and sends nothing holds
/// no more than this many descriptors, each for [`ROUTE_TIMEOUT`]).
pub const MAX_PENDING: usize = 64;

/// How long a new connection has to name its route.
pub const ROUTE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every stream opens with its route, in plain text before TLS: one length
/// byte, then that many bytes of UTF-8 (0: the listener's own process). A
/// route names no secret; the process it reaches still authenticates the peer.
pub(super) async fn write_route(tcp: &mut TcpStream, route: Option<&str>) -> std::io::Result<()> {
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
pub(super) async fn read_route(tcp: &mut TcpStream) -> Result<Option<String>, String> {
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

pub(super) type SessionTable = Arc<Mutex<HashMap<SessionId, Arc<RecvShared>>>>;

/// What every accepted stream needs: TLS, the session table, where new
/// sessions go.
#[derive(Clone)]
pub(super) struct Acceptor {
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(super) sessions: SessionTable,
    pub(super) new_tx: mpsc::Sender<Receiver>,
    pub(super) resume_deadline: Duration,
}

impl Acceptor {
    /// TLS (unless plaintext was asked for), then the stream's hello and frames.
    pub(super) async fn serve(self, sock: TcpStream, peer: Option<SocketAddr>) {
        let peer = peer.map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        let checksummed = self.tls.is_none();
        let (r, w, pin) = match self.tls {
            Some(a) => {
                // rustls reads the socket 4 KiB at a time (its buffer
                // shrinks whenever it empties): a buffer underneath turns
                // that into one syscall per MiB.
                let sock = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, sock);
                match tokio::time::timeout(Duration::from_secs(10), a.accept(sock)).await {
                    Ok(Ok(s)) => {
                        let pin = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| crate::tls::spki_sha256(c));
                        let (r, w) = split(s);
                        (r, w, pin)
                    }
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
            None => {
                let (r, w) = split(sock);
                (r, w, None)
            }
        };
        if let Err(e) = serve_stream(
            r,
            w,
            pin,
            self.sessions,
            self.new_tx,
            self.resume_deadline,
            checksummed,
        )
        .await
        {
            tracing::warn!(%peer, error = %e, "migration stream ended");
        }
    }
}

/// Accepts sessions (and reconnecting streams of existing ones).
pub struct Listener {
    pub(super) addr: Option<SocketAddr>,
    pub(super) new_sessions: mpsc::Receiver<Receiver>,
    pub(super) task: tokio::task::JoinHandle<()>,
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
        let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
        let task = tokio::spawn(async move {
            loop {
                let permit = pending.clone().acquire_owned().await.expect("never closed");
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
                    let route = tokio::time::timeout(ROUTE_TIMEOUT, read_route(&mut sock)).await;
                    drop(permit);
                    match (route, router) {
                        (Ok(Ok(None)), _) => acceptor.serve(sock, Some(peer)).await,
                        (Ok(Ok(Some(r))), Some(router)) => router(r, sock),
                        (Ok(Ok(Some(r))), None) => {
                            tracing::warn!(%peer, route = r, "refused a stream routed elsewhere")
                        }
                        (Ok(Err(e)), _) => tracing::warn!(%peer, error = e, "bad stream route"),
                        (Err(_), _) => tracing::warn!(%peer, "no stream route in time"),
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

    pub(super) fn acceptor(
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

pub(super) async fn serve_stream(
    mut r: BoxRead,
    mut w: BoxWrite,
    peer_pin: Option<[u8; 32]>,
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
    let (shared, status) = join_session(&sessions, &hello, peer_pin, resume_deadline);
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
    if is_new {
        let rx = Receiver {
            shared: shared.clone(),
        };
        new_tx
            .send(rx)
            .await
            .map_err(|_| "listener is gone".to_string())?;
    }
    stream_up(&shared, true);
    let (nack_tx, nack_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(control_writer(w, shared.acks.subscribe(), nack_rx));
    let res = read_frames(&shared, &mut r, nack_tx, checksummed).await;
    writer.abort();
    stream_up(&shared, false);
    shared.arrived.notify_waiters();
    res
}

/// Finds the hello's session (or opens it); returns it (and whether it is
/// new) with the status to answer.
fn join_session(
    sessions: &SessionTable,
    hello: &Hello,
    peer_pin: Option<[u8; 32]>,
    resume_deadline: Duration,
) -> (Option<(Arc<RecvShared>, bool)>, HelloStatus) {
    let mut map = sessions.lock().expect("sessions");
    // A session whose receiver is gone and whose streams are all closed is
    // over: only the table still holds it.
    map.retain(|_, s| Arc::strong_count(s) > 1);
    match map.get(&hello.session) {
        Some(s) if s.token != hello.token || s.peer_pin != peer_pin => {
            (None, HelloStatus::BadToken)
        }
        Some(s) if s.streams != hello.stream_count => (None, HelloStatus::Mismatch),
        Some(s) => (Some((s.clone(), false)), HelloStatus::Ok),
        None if hello.resume => (None, HelloStatus::UnknownSession),
        None if map.len() >= MAX_SESSIONS => (None, HelloStatus::Busy),
        None => {
            let s = Arc::new(RecvShared {
                token: hello.token,
                streams: hello.stream_count,
                state: Mutex::new(RecvState {
                    next_deliver: 0,
                    buffer: BTreeMap::new(),
                    buffered_bytes: 0,
                    applied_upto: 0,
                    total: None,
                    live_streams: 0,
                    down_since: None,
                    corrupt: 0,
                    duplicates: 0,
                }),
                arrived: Notify::new(),
                acks: watch::channel(0).0,
                resume_deadline_ms: AtomicU64::new(duration_ms(resume_deadline)),
                peer_pin,
            });
            map.insert(hello.session, s.clone());
            (Some((s, true)), HelloStatus::Ok)
        }
    }
}

/// Counts a stream of the session up or down; the last one down starts
/// the resume deadline.
fn stream_up(shared: &RecvShared, up: bool) {
    let mut st = shared.state.lock().expect("recv state");
    if up {
        st.live_streams += 1;
        st.down_since = None;
    } else {
        st.live_streams -= 1;
        if st.live_streams == 0 {
            st.down_since = Some(Instant::now());
        }
    }
}

pub(super) async fn read_frames(
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
        // A live sender writes at least a heartbeat a second.
        match tokio::time::timeout(SILENCE_LIMIT, r.read_exact(&mut hb)).await {
            Err(_) => return Err(format!("stream silent for {SILENCE_LIMIT:?}")),
            Ok(Err(_)) => return Ok(()), // ended; the sender reconnects if it needs to
            Ok(Ok(_)) => {}
        }
        match wire::parse_data_header(&hb).map_err(|e| e.to_string())? {
            DataHeader::Ping(n) => {
                let _ = nack.send(Control::Pong(n));
            }
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
                    let mut limited = (&mut *r).take(want);
                    let n = tokio::time::timeout(SILENCE_LIMIT, limited.read_buf(&mut pool))
                        .await
                        .map_err(|_| format!("stream silent for {SILENCE_LIMIT:?} inside a frame"))?
                        .map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("connection ended inside a frame".into());
                    }
                }
                let payload = pool.split_to(len).freeze();
                let mut hash = [0u8; PAYLOAD_HASH_LEN];
                if checksummed {
                    tokio::time::timeout(SILENCE_LIMIT, r.read_exact(&mut hash))
                        .await
                        .map_err(|_| format!("stream silent for {SILENCE_LIMIT:?} inside a frame"))?
                        .map_err(|e| e.to_string())?;
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
                if st.buffered_bytes + payload.len() > MAX_REORDER_BYTES {
                    return Err(format!(
                        "the peer sent more than {MAX_REORDER_BYTES} bytes ahead of delivery"
                    ));
                }
                st.buffered_bytes += payload.len();
                st.buffer.insert(seq, payload);
                drop(st);
                sh.arrived.notify_waiters();
            }
        }
    }
}

pub(super) async fn control_writer(
    mut w: BoxWrite,
    mut acks: watch::Receiver<u64>,
    mut nacks: mpsc::UnboundedReceiver<Control>,
) {
    // A new connection (a resumed stream) starts with what is applied so
    // far: the acks written on the dead one may be lost, and a sender whose
    // window they filled would wait for room forever while this end waits
    // for frames (seen: a post-copy migration stopped after its destination
    // was frozen with the window full).
    let mut last_sent = *acks.borrow_and_update();
    if last_sent > 0 {
        let msg = Control::Ack(last_sent).encode();
        if w.write_all(&msg).await.is_err() || w.flush().await.is_err() {
            return;
        }
    }
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
