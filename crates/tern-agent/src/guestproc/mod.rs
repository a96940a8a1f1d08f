//! The guest process (`tern guest DIR`): one guest of any kind, in a process
//! of its own that outlives the agent.
//!
//! It boots (or receives) the guest its directory's `launch.json` names,
//! serves the agent on its control socket, and runs the guest's migrations
//! itself: the engine reads and fills guest RAM in the process that owns it
//! ([`outgoing`], [`incoming`]). It records every decisive step in the
//! directory's journal before the step takes effect, so an agent that comes
//! back learns from the directory what happened while it was away.

mod error;
mod incoming;
mod jail;
mod outgoing;
mod server;

pub use error::{HelloError, SessionError};

use crate::config::{AgentConfig, Peer};
use crate::hosted::Hosted;
use crate::journal::{Journal, JournalError, Record};
use crate::peerbook::PeerBook;
use crate::vmdir::{EndedMigration, Launch, VmDir};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tern_migrate::protocol::{SessionHello, KIND_HELLO};
use tern_migrate::Progress;
use tern_transport::{Listener, Security, SessionConfig, TlsIdentity};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};

/// Sessions over a link slower than this round trip adapt their rate.
const ADAPTIVE_ABOVE_RTT: Duration = Duration::from_millis(5);

/// Why a guest process could not start.
#[derive(Debug, thiserror::Error)]
pub enum GuestProcError {
    /// Its directory or launch file is unusable.
    #[error("{0}")]
    Launch(String),
    /// Its sockets or runtime could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Its journal would not open.
    #[error(transparent)]
    Journal(crate::journal::JournalError),
    /// The TLS identity or a peer's pin would not load.
    #[error("TLS identity: {0}")]
    Tls(#[source] tern_transport::tls::TlsSetupError),
    /// The host's peer list would not load.
    #[error(transparent)]
    Peers(crate::peerbook::PeerBookError),
    /// The host key (which signs manifests) would not load.
    #[error("host key: {0}")]
    HostKey(#[source] std::io::Error),
    /// The jail could not be entered; the guest does not start half-jailed.
    #[error(transparent)]
    Jail(tern_jail::JailError),
}

/// What the process holds in its slot.
enum Slot {
    Booting,
    Running(Box<Hosted>),
    Migrating,
    Receiving,
    MovedAway,
    Stopped,
    Failed(String),
}

/// The migration this process runs (or last ran).
struct Track {
    id: String,
    progress: watch::Receiver<Progress>,
    end: watch::Receiver<Option<EndedMigration>>,
}

/// Destination: whether `Commit` was journaled, or the source's settling
/// question came first and `Commit` must now be refused.
#[derive(Default)]
struct CommitGate {
    committed: bool,
    fenced: bool,
}

/// The process's state, shared by its control server and migration tasks.
struct Proc {
    dir: VmDir,
    launch: Launch,
    journal: Journal,
    tls: Option<TlsIdentity>,
    /// Signs the manifests of its outgoing migrations.
    host_key: ed25519_dalek::SigningKey,
    peers: PeerBook,
    epoch: Mutex<u64>,
    slot: Mutex<Slot>,
    track: Mutex<Option<Track>>,
    streams: Mutex<Option<mpsc::Sender<TcpStream>>>,
    gate: Mutex<CommitGate>,
    /// The outgoing migration under way: what cancels it and what paces it.
    outgoing: Mutex<Option<outgoing::Controls>>,
    /// Paused because the host's lease ran out (see [`crate::lease`]).
    fenced: std::sync::atomic::AtomicBool,
    done: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the guest of `dir` until it is stopped, moves away or fails.
pub fn main(dir: &Path) -> Result<(), GuestProcError> {
    let dir = VmDir(dir.to_path_buf());
    let launch = dir.launch().map_err(GuestProcError::Launch)?;
    // What lies outside a jail is loaded before going in.
    let tls = match &launch.agent.tls {
        Some(t) => {
            Some(TlsIdentity::load(&t.cert, &t.key, &t.ca, &[]).map_err(GuestProcError::Tls)?)
        }
        None => None,
    };
    let host_key =
        crate::keys::host_key(&launch.agent.data_dir).map_err(GuestProcError::HostKey)?;
    let (dir, launch) = match jail::applies(&launch).cloned() {
        Some(cfg) => jail::enter(dir, launch, &cfg)?,
        None => (dir, launch),
    };
    let journal = dir.journal().map_err(GuestProcError::Journal)?;
    // The book sets the identity's pins; a joined host's are re-read from
    // the agent's peers file at each lookup.
    let peers = PeerBook::open(&launch.agent, tls.clone()).map_err(GuestProcError::Peers)?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| GuestProcError::Io { what, source }
    };
    std::fs::write(dir.pid_file(), std::process::id().to_string()).map_err(io("pid file"))?;
    let rt = tokio::runtime::Runtime::new().map_err(io("runtime"))?;
    let epoch = launch.epoch;
    let p = Arc::new(Proc {
        dir,
        launch,
        journal,
        tls,
        host_key,
        peers,
        epoch: Mutex::new(epoch),
        slot: Mutex::new(Slot::Booting),
        track: Mutex::new(None),
        streams: Mutex::new(None),
        gate: Mutex::default(),
        outgoing: Mutex::default(),
        fenced: Default::default(),
        done: Notify::new(),
    });
    rt.block_on(server::serve(p))
}

/// How sessions to `peer` are secured: mutual TLS with this host's
/// identity, or plaintext when there is none (the configuration allows
/// that only when it asks for it by name).
pub(crate) fn security(tls: Option<&TlsIdentity>, peer: &str) -> Result<Security, SessionError> {
    match tls {
        Some(t) => Ok(Security::Tls {
            config: t.client_config()?,
            server_name: peer.into(),
        }),
        None => Ok(Security::InsecurePlaintext),
    }
}

impl Proc {
    fn cfg(&self) -> &AgentConfig {
        &self.launch.agent
    }

    fn peer(&self, name: &str) -> Result<Peer, SessionError> {
        self.peers.refresh();
        self.peers
            .get(name)
            .ok_or_else(|| SessionError::UnknownPeer(name.into()))
    }

    /// Whether `rx` was opened by `host`, as its certificate says (a
    /// session's own messages name whoever the peer likes). Without TLS
    /// (tests on one machine) there is nothing to check.
    fn opened_by(&self, rx: &tern_transport::Receiver, host: &str) -> bool {
        if self.tls.is_none() {
            return true;
        }
        self.peers.refresh();
        rx.peer_pin()
            .and_then(|pin| self.peers.by_pin(&pin))
            .is_some_and(|p| p.name == host)
    }

    /// How sessions to `peer` are secured; plaintext only when the
    /// configuration asked for it (validated by the agent).
    fn security(&self, peer: &str) -> Result<Security, SessionError> {
        security(self.tls.as_ref(), peer)
    }

    fn session_config(&self, route: Option<&str>) -> SessionConfig {
        SessionConfig {
            streams: 2,
            resume_deadline: Duration::from_secs(self.cfg().resume_deadline_secs),
            route: route.map(str::to_string),
            // A WAN link: the rate follows what the path delivers.
            adaptive_above_rtt: Some(ADAPTIVE_ABOVE_RTT),
            ..Default::default()
        }
    }

    /// A listener for sessions the agent routes to this process.
    fn listener(&self) -> Result<Listener, SessionError> {
        let (tx, rx) = mpsc::channel(16);
        *lock(&self.streams) = Some(tx);
        let server = match &self.tls {
            Some(t) => Some(t.server_config()?),
            None => None,
        };
        Ok(Listener::from_streams(
            rx,
            server,
            Duration::from_secs(self.cfg().resume_deadline_secs),
        ))
    }

    fn record(&self, r: &Record) -> Result<(), JournalError> {
        self.journal.append(r)
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Pauses the running guest when the host's lease has run out, and
    /// runs it again when a new lease comes (checked every 250 ms).
    async fn keep_lease(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let run_out = crate::lease::run_out(&self.cfg().data_dir, crate::lease::now_ms());
            if run_out != self.is_fenced() {
                self.fence(run_out);
            }
        }
    }

    fn fence(&self, on: bool) {
        let mut slot = lock(&self.slot);
        // A migration under way has its own commit protocol; a stopped or
        // departed guest has nothing to pause.
        let Slot::Running(g) = &mut *slot else { return };
        match g.set_paused(on) {
            Ok(()) => {
                self.fenced.store(on, std::sync::atomic::Ordering::SeqCst);
                if on {
                    tracing::warn!("the host's lease from the control plane ran out: the guest is paused (fenced) so that no second copy runs");
                } else {
                    tracing::info!("a new lease: the guest runs again");
                }
            }
            Err(e) => tracing::error!(error = %e, fence = on, "cannot pause or resume the guest"),
        }
    }

    fn set_slot(&self, s: Slot) {
        *lock(&self.slot) = s;
    }

    /// Starts tracking a migration; returns its progress and end publishers.
    fn track(
        &self,
        id: &str,
        first: Progress,
    ) -> (
        watch::Sender<Progress>,
        watch::Sender<Option<EndedMigration>>,
    ) {
        let (ptx, prx) = watch::channel(first);
        let (etx, erx) = watch::channel(None);
        *lock(&self.track) = Some(Track {
            id: id.into(),
            progress: prx,
            end: erx,
        });
        (ptx, etx)
    }

    /// Records a migration's end and publishes it.
    fn end(&self, end: EndedMigration, tx: &watch::Sender<Option<EndedMigration>>) {
        if let Err(e) = self.record(&Record::MigrationEnded(Box::new(end.clone()))) {
            tracing::error!(error = %e, "journal");
        }
        let _ = tx.send(Some(end));
    }

    /// After the guest left this process for good: let watchers read the
    /// end, then exit.
    fn finish_soon(self: &Arc<Self>) {
        let p = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            p.done.notify_one();
        });
    }
}

/// Reads the hello that opens a session.
pub(crate) async fn read_hello(
    rx: &mut tern_transport::Receiver,
    within: Duration,
) -> Result<SessionHello, HelloError> {
    let (seq, f) = tokio::time::timeout(within, rx.recv())
        .await
        .map_err(|_| HelloError::Timeout(within))?
        .ok_or(HelloError::Closed)??;
    rx.ack(seq);
    match tern_migrate::protocol::split(&f).map_err(HelloError::Malformed)? {
        (KIND_HELLO, p) => {
            serde_json::from_slice(&p).map_err(|e| HelloError::Malformed(e.to_string()))
        }
        (k, _) => Err(HelloError::WrongKind(k)),
    }
}
