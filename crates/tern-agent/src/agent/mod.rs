//! The agent: the guests this host runs and the migrations it sends and
//! receives, each guest in a process of its own ([`crate::guestproc`]).
//!
//! The agent starts guest processes, asks them over their control sockets
//! ([`crate::control`]) and re-adopts them when it starts again: a guest's
//! directory ([`crate::vmdir`]) holds its launch file, pid and journal, so
//! what happened while the agent was away is read from there. The agent's
//! own listener takes every migration session of the host: a session routed
//! to a migration is handed, as a TCP socket, to the guest process running
//! it ([`crate::peering`]); the others ask the agent to take a migration in
//! or to settle one.

mod adopt;
mod bandwidth;
mod eta;
mod migrations;
mod vms;

pub use migrations::MigrateRequest;

use crate::config::AgentConfig;
use crate::control::{self, OutJob, ProcState, ProcStatus, Request};
use crate::keys;
use crate::peerbook::PeerBook;
use crate::views::{MigrationView, VmView};
use crate::vmdir::{fold, DirFate, EndedMigration, Launch, LaunchRole, VmDir};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_migrate::MigrationPhase;
use tern_migrate::{Policy, Progress};
use tern_proto::{GuestSpec, GuestStatus, MigrationRole};
use tern_transport::TlsIdentity;
use tokio::sync::watch;

/// Why an agent request failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No such VM or migration.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with the VM's state.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The host named is not one of this host's peers. For a host that
    /// joined a control plane this may pass: its peers arrive with its
    /// next heartbeat.
    #[error("`{name}` is not a configured peer")]
    UnknownPeer {
        /// The host named.
        name: String,
        /// Whether the peers come from a control plane.
        joined: bool,
    },
    /// The host could not do it.
    #[error("{0}")]
    Internal(String),
    /// A guest process did not answer as it should.
    #[error(transparent)]
    Guest(#[from] control::ControlError),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a status question to a guest process may take.
pub(super) const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a boot may take before the agent gives up on it.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Clone)]
pub(crate) struct VmEntry {
    pub(crate) spec: GuestSpec,
    pub(crate) dir: VmDir,
}

pub(crate) struct MigrationEntry {
    pub(crate) vm: String,
    pub(crate) role: MigrationRole,
    pub(crate) peer: String,
    pub(crate) state: MigrationPhase,
    pub(crate) progress: watch::Receiver<Progress>,
    pub(crate) report: Option<tern_migrate::Report>,
    pub(crate) error: Option<String>,
    /// An outgoing migration's share of the host's bandwidth (`None`: no
    /// host cap, or not sent from here).
    pub(crate) bandwidth: Option<bandwidth::Bandwidth>,
}

/// One of the agent's ids in tern-proto's type. The agent makes and
/// checks every id it keeps (VMs, migrations, peers), so one that does not
/// parse is a fault of the agent's own state, not of a caller.
pub(crate) fn typed<T: std::str::FromStr>(what: &str, s: &str) -> Result<T, AgentError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| AgentError::Internal(format!("{what} `{s}`: {e}")))
}

/// Migration id → the directory of the guest process that runs it.
pub(crate) type Routes = Arc<Mutex<HashMap<String, VmDir>>>;

pub(crate) struct Inner {
    pub(crate) cfg: AgentConfig,
    pub(crate) public_key: String,
    pub(crate) tls: Option<TlsIdentity>,
    pub(crate) peers: PeerBook,
    pub(crate) exe: PathBuf,
    pub(crate) vms: Mutex<BTreeMap<String, VmEntry>>,
    pub(crate) migrations: Mutex<BTreeMap<String, MigrationEntry>>,
    pub(crate) routes: Routes,
    /// How far earlier migrations' estimates were from the truth.
    pub(crate) eta: eta::EtaHistory,
}

/// A running agent. Cloning shares it.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
    pub(crate) migrate_addr: SocketAddr,
}

impl Agent {
    /// Opens the data directory, re-adopts the guests found there and
    /// starts the migration listener. A TLS identity that does not load
    /// stops the agent (it never falls back to plaintext).
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let internal = |e: &dyn std::fmt::Display| AgentError::Internal(e.to_string());
        let key = keys::host_key(&cfg.data_dir).map_err(|e| internal(&e))?;
        let tls = match &cfg.tls {
            Some(t) => {
                let id = TlsIdentity::load(&t.cert, &t.key, &t.ca, &[])
                    .map_err(|e| AgentError::BadRequest(format!("TLS identity: {e}")))?;
                id.client_config()
                    .map_err(|e| AgentError::BadRequest(format!("TLS client: {e}")))?;
                Some(id)
            }
            None => None,
        };
        // The book sets the identity's pins, now and at every change.
        let peers = PeerBook::open(&cfg, tls.clone()).map_err(|e| internal(&e))?;
        let exe = std::env::current_exe().map_err(|e| internal(&e))?;
        let eta = eta::EtaHistory::load(cfg.data_dir.join("eta-history.json"));
        let inner = Arc::new(Inner {
            eta,
            public_key: hex::encode(key.verifying_key().to_bytes()),
            cfg,
            tls,
            peers,
            exe,
            vms: Mutex::default(),
            migrations: Mutex::default(),
            routes: Routes::default(),
        });
        let migrate_addr = crate::peering::listen(&inner).await?;
        let agent = Agent {
            inner,
            migrate_addr,
        };
        agent.adopt();
        Ok(agent)
    }

    /// This host's name.
    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    /// Where the migration listener is bound.
    pub fn migrate_addr(&self) -> SocketAddr {
        self.migrate_addr
    }

    /// This host's public key (hex), for peers' configuration.
    pub fn public_key(&self) -> String {
        self.inner.public_key.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    /// How many guests have a live process here (heartbeats report it).
    pub fn running_vms(&self) -> u32 {
        let n = lock(&self.inner.vms)
            .values()
            .filter(|e| e.dir.live_pid().is_some())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// How many migrations this host takes part in that have not ended.
    pub fn active_migrations(&self) -> u32 {
        let n = lock(&self.inner.migrations)
            .values()
            .filter(|m| !m.state.is_final())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The peers this host trusts now.
    pub fn peers(&self) -> Vec<crate::Peer> {
        self.inner.peers.all()
    }

    /// Replaces the peers (a joined host, at each heartbeat): trusted, or
    /// refused, from the next handshake on, by this agent and its guest
    /// processes.
    pub fn set_peers(&self, peers: Vec<crate::Peer>) -> Result<bool, AgentError> {
        self.inner
            .peers
            .replace(peers)
            .map_err(|e| AgentError::Internal(e.to_string()))
    }

    /// Where peers dial this host's migration listener.
    pub(crate) fn reply_addr(&self) -> SocketAddr {
        self.inner.cfg.advertise_addr.unwrap_or(self.migrate_addr)
    }
}
