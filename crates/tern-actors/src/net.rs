//! An executor on the network: its [`ActorMigrationManager`] driven by a
//! tokio task, talking to its peers over mutual TLS.
//!
//! Every connection is TLS 1.3 with both certificates checked against the
//! CA and pinned (tern-transport's [`TlsIdentity`]); the pin of the
//! certificate a connection presents says which executor sent what arrives
//! on it, so an executor cannot speak for another. Frames are a 4-byte
//! big-endian length and a [`ActorMessage`]; a frame over [`MAX_FRAME`] ends
//! the connection before anything is read into memory. Each peer gets one
//! outgoing connection, made when first needed and made again after a
//! failure; a message lost with a connection is the protocol's business
//! (every step times out and is resolved, see [`crate::manager`]).

use crate::gossip::{GossipConfig, GossipError, Membership};
use crate::manager::{ActorMigrationManager, Handled};
use crate::protocol::{ActorMessage, MAX_FRAME};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_proto::{ActorId, ExecutorId};
use tern_transport::tls::{spki_sha256, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The most a frame's buffer takes before its bytes arrive.
const RESERVE_AHEAD: usize = 16 << 20;

/// Another executor: where it listens and the pin of its certificate.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its name.
    pub executor: ExecutorId,
    /// Where it listens, if known before gossip says.
    pub addr: Option<SocketAddr>,
    /// SHA-256 of its certificate's SubjectPublicKeyInfo.
    pub pin: [u8; 32],
}

/// How a node runs.
pub struct NodeConfig {
    /// This executor's certificate, key, CA and its peers' pins.
    pub tls: TlsIdentity,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The other executors: the only ones this one talks to, whatever
    /// gossip says.
    pub peers: Vec<Peer>,
    /// Membership by gossip; without it every peer counts as alive.
    pub gossip: Option<GossipConfig>,
    /// How often timeouts and periodic checkpoints are looked at.
    pub tick: Duration,
    /// Messages run per actor between two looks at the network.
    pub budget: usize,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The listener could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS identity is unusable.
    #[error(transparent)]
    Tls(#[from] tern_transport::tls::TlsSetupError),
    /// Gossip did not start.
    #[error(transparent)]
    Gossip(#[from] GossipError),
}

/// A running executor.
pub struct ExecutorNode {
    manager: Arc<Mutex<ActorMigrationManager>>,
    poke: Arc<Notify>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    membership: Option<Arc<Membership>>,
}

/// What the driver task shares with the connection tasks.
struct Shared {
    manager: Arc<Mutex<ActorMigrationManager>>,
    peers: Mutex<HashMap<ExecutorId, Peer>>,
    /// Where gossip says each actor runs.
    owners: Mutex<HashMap<ActorId, ExecutorId>>,
    /// The REST APIs gossip tells of.
    apis: Mutex<HashMap<ExecutorId, SocketAddr>>,
    /// The peers gossip says are alive.
    members: Mutex<Vec<ExecutorId>>,
    connector: TlsConnector,
    links: Mutex<HashMap<ExecutorId, mpsc::UnboundedSender<Vec<u8>>>>,
}

impl ExecutorNode {
    /// Starts serving `manager`; messages actors handle come out of the
    /// returned channel with their answers.
    pub async fn start(
        manager: ActorMigrationManager,
        cfg: NodeConfig,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Handled>), NodeError> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(cfg.tls.server_config()?);
        let manager = Arc::new(Mutex::new(manager));
        let shared = Arc::new(Shared {
            manager: manager.clone(),
            peers: Mutex::new(
                cfg.peers
                    .into_iter()
                    .map(|p| (p.executor.clone(), p))
                    .collect(),
            ),
            owners: Mutex::default(),
            apis: Mutex::default(),
            members: Mutex::default(),
            connector: TlsConnector::from(cfg.tls.client_config()?),
            links: Mutex::new(HashMap::new()),
        });
        let me = manager.lock().expect("manager lock").id().clone();
        let membership = match &cfg.gossip {
            Some(g) => Some(Arc::new(Membership::start(&me, addr, g).await?)),
            None => {
                let all: Vec<ExecutorId> = shared
                    .peers
                    .lock()
                    .expect("peers lock")
                    .keys()
                    .cloned()
                    .collect();
                manager.lock().expect("manager lock").set_live(all);
                None
            }
        };
        let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
        let (handled_tx, handled_rx) = mpsc::unbounded_channel();
        let poke = Arc::new(Notify::new());
        let accept = tokio::spawn(accept_loop(listener, acceptor, shared.clone(), inbound_tx));
        let drive = tokio::spawn(drive(
            shared.clone(),
            inbound_rx,
            handled_tx,
            poke.clone(),
            cfg.tick,
            cfg.budget,
        ));
        let mut tasks = vec![accept, drive];
        if let (Some(m), Some(g)) = (&membership, &cfg.gossip) {
            tasks.push(tokio::spawn(gossip_loop(
                shared.clone(),
                m.clone(),
                g.interval,
            )));
        }
        Ok((
            Self {
                manager,
                poke,
                addr,
                tasks,
                shared,
                membership,
            },
            handled_rx,
        ))
    }

    /// Where the node listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `f` on the manager, then lets the driver send what it queued.
    pub fn with<R>(&self, f: impl FnOnce(&mut ActorMigrationManager) -> R) -> R {
        let r = f(&mut self.manager.lock().expect("manager lock"));
        self.poke.notify_one();
        r
    }

    /// Where gossip says `actor` runs (this executor included).
    pub fn locate(&self, actor: ActorId) -> Option<ExecutorId> {
        let here = self.manager.lock().expect("manager lock");
        if here.runs(actor) {
            return Some(here.id().clone());
        }
        drop(here);
        self.shared
            .owners
            .lock()
            .expect("owners lock")
            .get(&actor)
            .cloned()
    }

    /// The REST API of `executor`, as gossip tells.
    pub fn api_of(&self, executor: &ExecutorId) -> Option<SocketAddr> {
        self.shared
            .apis
            .lock()
            .expect("apis lock")
            .get(executor)
            .copied()
    }

    /// The peers gossip says are alive.
    pub fn members(&self) -> Vec<ExecutorId> {
        self.shared.members.lock().expect("members lock").clone()
    }

    /// Stops the node (its actors stop with it).
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(m) = &self.membership {
            m.shutdown();
        }
    }
}

impl Drop for ExecutorNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs the manager: protocol messages as they come, actors' messages, the
/// timeouts, and what the manager wants sent.
async fn drive(
    shared: Arc<Shared>,
    mut inbound: mpsc::UnboundedReceiver<(ExecutorId, ActorMessage)>,
    handled: mpsc::UnboundedSender<Handled>,
    poke: Arc<Notify>,
    tick: Duration,
    budget: usize,
) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some((from, msg)) = inbound.recv() => {
                shared.manager.lock().expect("manager lock").handle(&from, msg, Instant::now());
            }
            _ = poke.notified() => {}
            _ = interval.tick() => {
                shared.manager.lock().expect("manager lock").tick(Instant::now());
            }
        }
        let (done, outbox) = {
            let mut m = shared.manager.lock().expect("manager lock");
            let done = m.run(budget, Instant::now());
            (done, m.take_outbox())
        };
        let more = !done.is_empty();
        for h in done {
            let _ = handled.send(h);
        }
        for (to, msg) in outbox {
            send_to(&shared, &to, msg.encode());
        }
        if more {
            // Actors have more queued: come back without waiting for a tick.
            poke.notify_one();
        }
    }
}

/// Queues `frame` on the connection to `to`, making one if there is none.
fn send_to(shared: &Arc<Shared>, to: &ExecutorId, frame: Vec<u8>) {
    let mut links = shared.links.lock().expect("links lock");
    if let Some(tx) = links.get(to) {
        if tx.send(frame.clone()).is_ok() {
            return;
        }
    }
    let Some(peer) = shared.peers.lock().expect("peers lock").get(to).cloned() else {
        tracing::warn!(executor = %to, "a message for an executor this one does not know");
        return;
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(frame);
    links.insert(to.clone(), tx);
    tokio::spawn(write_loop(shared.clone(), peer, rx));
}

/// One outgoing connection: frames in order until it fails.
async fn write_loop(shared: Arc<Shared>, peer: Peer, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let result: std::io::Result<()> = async {
        let addr = peer
            .addr
            .ok_or_else(|| std::io::Error::other("no address known yet"))?;
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
        let mut tls = shared.connector.connect(name, tcp).await?;
        while let Some(frame) = rx.recv().await {
            tls.write_all(&(frame.len() as u32).to_be_bytes()).await?;
            tls.write_all(&frame).await?;
            tls.flush().await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(executor = %peer.executor, error = %e, "connection to a peer failed");
    }
    // The next message makes a new connection (unless one was made already).
    rx.close();
    let mut links = shared.links.lock().expect("links lock");
    if links.get(&peer.executor).is_some_and(|tx| tx.is_closed()) {
        links.remove(&peer.executor);
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    inbound: mpsc::UnboundedSender<(ExecutorId, ActorMessage)>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared, inbound) = (acceptor.clone(), shared.clone(), inbound.clone());
        tokio::spawn(async move {
            if let Err(e) = read_loop(tcp, acceptor, &shared, inbound).await {
                tracing::debug!(error = %e, "a peer connection ended");
            }
        });
    }
}

/// One incoming connection: which executor it is (by its pin), then frames.
async fn read_loop(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    shared: &Shared,
    inbound: mpsc::UnboundedSender<(ExecutorId, ActorMessage)>,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let pin = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spki_sha256(c));
    let Some(from) = shared
        .peers
        .lock()
        .expect("peers lock")
        .values()
        .find(|p| Some(p.pin) == pin)
        .map(|p| p.executor.clone())
    else {
        return Err(std::io::Error::other("a certificate no peer has"));
    };
    loop {
        let len = match tls.read_u32().await {
            Ok(n) => n as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if len > MAX_FRAME {
            return Err(std::io::Error::other(format!("a frame of {len} bytes")));
        }
        // Room for up to 16 MiB at once (a peer's frame, authenticated and
        // under MAX_FRAME); beyond that it grows with what arrives instead of
        // trusting the length up front.
        let mut frame = Vec::with_capacity(len.min(RESERVE_AHEAD));
        (&mut tls).take(len as u64).read_to_end(&mut frame).await?;
        if frame.len() != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match ActorMessage::decode(&frame) {
            Ok(msg) => {
                if inbound.send((from.clone(), msg)).is_err() {
                    return Ok(());
                }
            }
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
}

/// Publishes this executor's load and actors, and takes in what gossip says
/// of the others: addresses, loads, owners, and who is alive.
async fn gossip_loop(shared: Arc<Shared>, g: Arc<Membership>, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let (load, owns) = {
            let m = shared.manager.lock().expect("manager lock");
            (m.local_load(), m.actors())
        };
        g.publish(&load, &owns).await;
        let mut live = g.live().await;
        {
            let mut peers = shared.peers.lock().expect("peers lock");
            live.retain(|e, _| peers.contains_key(e));
            for (e, member) in &live {
                if let Some(p) = peers.get_mut(e) {
                    p.addr = Some(member.addr);
                }
            }
        }
        *shared.apis.lock().expect("apis lock") = live
            .iter()
            .filter_map(|(e, m)| Some((e.clone(), m.api?)))
            .collect();
        *shared.members.lock().expect("members lock") = live.keys().cloned().collect();
        *shared.owners.lock().expect("owners lock") = live
            .iter()
            .flat_map(|(e, m)| m.owns.iter().map(move |a| (*a, e.clone())))
            .collect();
        let mut m = shared.manager.lock().expect("manager lock");
        m.set_live(live.keys().cloned());
        for member in live.into_values() {
            m.peer_load(member.load);
        }
    }
}
