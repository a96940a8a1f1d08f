//! The agent: the VMs this host runs, the migrations it sends and receives.
//!
//! VMs run inside the agent process as tern-vmm [`Machine`]s, so the
//! migration engine reads and writes their RAM directly. Each migration is
//! two transport sessions between agents, each dialled by the side that
//! sends on it and opened by a [`SessionHello`]: data (source → destination)
//! and replies (back). One listener per agent takes both kinds.

use crate::config::{AgentConfig, Peer};
use crate::hosted::Hosted;
use crate::journal::{Journal, Record, VmFate};
use crate::keys;
use crate::qemu_relay::{self, Compress};
use crate::views::{GuestKind, MigrationState, MigrationView, Role, VmSpec, VmStatus, VmView};
use ed25519_dalek::SigningKey;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tern_drivers::qemu::{Launch, QemuConfig, QemuSpec, QemuVm};
use tern_migrate::protocol::{frame, split, SessionHello, KIND_HELLO};
use tern_migrate::{Capacity, DestLink, MigrateError, Policy, Progress, SourceLink};
use tern_transport::{Listener, Receiver, Security, Sender, SessionConfig, TlsIdentity};
use tokio::sync::{oneshot, watch};

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
    /// The host could not do it.
    #[error("{0}")]
    Internal(String),
}

/// In-flight bytes of a QEMU guest's data session (see `run_outgoing`).
const QEMU_WINDOW_BYTES: usize = 4 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Slot {
    Running(Box<Hosted>),
    Migrating { migration: String },
    MovedAway { to: String },
    Lost { reason: String },
    Stopped,
}

struct VmEntry {
    spec: VmSpec,
    epoch: u64,
    slot: Slot,
}

struct MigrationEntry {
    vm: String,
    role: Role,
    peer: String,
    state: MigrationState,
    progress: watch::Receiver<Progress>,
    report: Option<tern_migrate::Report>,
    error: Option<String>,
}

struct Inner {
    cfg: AgentConfig,
    key: SigningKey,
    journal: Journal,
    tls: Option<TlsIdentity>,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    migrations: Mutex<BTreeMap<String, MigrationEntry>>,
    reply_waiters: Mutex<HashMap<String, oneshot::Sender<Receiver>>>,
}

/// A running agent. Cloning shares it.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
    migrate_addr: SocketAddr,
}

/// Options of one outgoing migration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MigrateRequest {
    /// Destination host (a configured peer).
    pub to: String,
    /// `precopy`, `postcopy` or `hybrid`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Downtime budget, ms (default 50).
    #[serde(default)]
    pub max_downtime_ms: Option<u64>,
    /// Bandwidth cap, MB/s (default: none).
    #[serde(default)]
    pub bandwidth_mbps: Option<u64>,
    /// Give up (roll back) if switchover has not begun after this many seconds.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
    /// Ceiling the bandwidth cap may be raised to when pre-copy stalls, MB/s.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<u64>,
    /// Throttle a guest whose pre-copy does not converge (default true).
    #[serde(default)]
    pub auto_converge: Option<bool>,
    /// Linux (QEMU) guests: compress the stream on the wire: `none`, `lz4`
    /// or `zstd` (default: zstd under a bandwidth cap, else none).
    #[serde(default)]
    pub compress: Option<String>,
}

fn default_mode() -> String {
    "precopy".into()
}

impl Agent {
    /// Opens the data directory (key, journal), replays the journal and
    /// starts the migration listener.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.validate()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        let internal = |e: &dyn std::fmt::Display| AgentError::Internal(e.to_string());
        let key = keys::host_key(&cfg.data_dir).map_err(|e| internal(&e))?;
        let journal = Journal::open(&cfg.data_dir).map_err(|e| internal(&e))?;
        let tls = match &cfg.tls {
            Some(t) => {
                let pins = cfg
                    .peers
                    .iter()
                    .filter_map(|p| p.tls_pin.as_deref())
                    .map(tern_transport::tls::parse_pin)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| internal(&e))?;
                Some(TlsIdentity::load(&t.cert, &t.key, &t.ca, &pins).map_err(|e| internal(&e))?)
            }
            None => None,
        };
        // Recovery: nothing the journal says moved away is ever started
        // again; VMs that ran in a previous agent process died with it.
        let mut vms = BTreeMap::new();
        for (vm, fate) in journal.replay().map_err(|e| internal(&e))? {
            let (epoch, spec, slot) = match fate {
                VmFate::Owned { epoch, spec } => (
                    epoch,
                    spec,
                    Slot::Lost {
                        reason: "it ran in an earlier agent process, which ended".into(),
                    },
                ),
                VmFate::MovedAway { to, epoch } => {
                    (epoch, serde_json::Value::Null, Slot::MovedAway { to })
                }
                VmFate::Stopped => (0, serde_json::Value::Null, Slot::Stopped),
            };
            let spec = serde_json::from_value(spec).unwrap_or_default();
            vms.insert(vm, VmEntry { spec, epoch, slot });
        }
        let server = match &tls {
            Some(t) => Some(t.server_config().map_err(|e| internal(&e))?),
            None => None,
        };
        let mut listener = Listener::bind(
            cfg.migrate_addr,
            server,
            Duration::from_secs(cfg.resume_deadline_secs),
        )
        .await
        .map_err(|e| AgentError::Internal(format!("cannot listen on {}: {e}", cfg.migrate_addr)))?;
        let migrate_addr = listener.local_addr();
        let agent = Agent {
            inner: Arc::new(Inner {
                cfg,
                key,
                journal,
                tls,
                vms: Mutex::new(vms),
                migrations: Mutex::default(),
                reply_waiters: Mutex::default(),
            }),
            migrate_addr,
        };
        let a = agent.clone();
        tokio::spawn(async move {
            while let Some(rx) = listener.accept().await {
                let a = a.clone();
                tokio::spawn(async move { a.session(rx).await });
            }
        });
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
        hex::encode(self.inner.key.verifying_key().to_bytes())
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    fn security(&self, peer: &str) -> Security {
        match &self.inner.tls {
            Some(t) => match t.client_config() {
                Ok(config) => Security::Tls {
                    config,
                    server_name: peer.into(),
                },
                Err(e) => {
                    // The identity loaded at start-up; this cannot fail later.
                    tracing::error!(error = %e, "TLS client configuration");
                    Security::InsecurePlaintext
                }
            },
            None => Security::InsecurePlaintext,
        }
    }

    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            streams: 2,
            resume_deadline: Duration::from_secs(self.inner.cfg.resume_deadline_secs),
            ..Default::default()
        }
    }

    /// Boots a test-guest VM here.
    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmView, AgentError> {
        spec.validate().map_err(AgentError::BadRequest)?;
        let id = format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let machine = if spec.kind == GuestKind::Linux {
            self.boot_linux(&id, &spec).await?
        } else {
            let boot_spec = spec.clone();
            tokio::task::spawn_blocking(move || Hosted::boot(&boot_spec))
                .await
                .map_err(|e| AgentError::Internal(e.to_string()))?
                .map_err(AgentError::Internal)?
        };
        let spec_json = serde_json::to_value(&spec).expect("specs serialize");
        self.inner
            .journal
            .append(&Record::VmStarted {
                vm: id.clone(),
                epoch: 1,
                spec: spec_json,
            })
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        lock(&self.inner.vms).insert(
            id.clone(),
            VmEntry {
                spec,
                epoch: 1,
                slot: Slot::Running(Box::new(machine)),
            },
        );
        self.vm(&id)
    }

    /// How this agent runs QEMU: its guests die with it, like its other VMs
    /// (which live in its process), so a crashed agent leaves no orphan copy.
    fn qemu_config(&self) -> QemuConfig {
        QemuConfig {
            die_with_parent: true,
            ..QemuConfig::default()
        }
    }

    fn qemu_spec(&self, spec: &VmSpec) -> Result<QemuSpec, String> {
        qemu_relay::qemu_spec(
            spec,
            self.inner.cfg.guest_kernel.as_deref(),
            self.inner.cfg.guest_initrd.as_deref(),
        )
    }

    fn qemu_dir(&self, vm: &str, epoch: u64) -> std::path::PathBuf {
        self.inner
            .cfg
            .data_dir
            .join("vms")
            .join(format!("{vm}-e{epoch}"))
    }

    async fn boot_linux(&self, id: &str, spec: &VmSpec) -> Result<Hosted, AgentError> {
        let qspec = self.qemu_spec(spec).map_err(AgentError::BadRequest)?;
        let vm = QemuVm::launch(
            &self.qemu_config(),
            &self.qemu_dir(id, 1),
            &qspec,
            Launch::Boot,
        )
        .await
        .map_err(AgentError::Internal)?;
        vm.wait_console(Duration::from_secs(120), |c| c.contains("tern-load ready"))
            .await
            .map_err(|e| AgentError::Internal(format!("the Linux guest did not come up: {e}")))?;
        Ok(Hosted::Qemu(vm))
    }

    /// Stops a VM running here.
    pub fn stop_vm(&self, id: &str) -> Result<(), AgentError> {
        let mut vms = lock(&self.inner.vms);
        let e = vms
            .get_mut(id)
            .ok_or_else(|| AgentError::NotFound(format!("vm {id}")))?;
        match &mut e.slot {
            Slot::Migrating { migration } => Err(AgentError::Conflict(format!(
                "vm {id} is migrating ({migration}); wait for it to end"
            ))),
            Slot::Running(m) => {
                self.inner
                    .journal
                    .append(&Record::VmStopped { vm: id.into() })
                    .map_err(|e| AgentError::Internal(e.to_string()))?;
                m.stop();
                e.slot = Slot::Stopped;
                Ok(())
            }
            _ => Err(AgentError::Conflict(format!("vm {id} does not run here"))),
        }
    }

    fn view(id: &str, e: &VmEntry) -> VmView {
        let (status, counter, checksum_ok, moved_to, detail) = match &e.slot {
            Slot::Running(m) => {
                let (counter, ok) = m.progress(&e.spec);
                (VmStatus::Running, Some(counter), ok, None, None)
            }
            Slot::Migrating { migration } => (
                VmStatus::Migrating,
                None,
                None,
                None,
                Some(migration.clone()),
            ),
            Slot::MovedAway { to } => (VmStatus::MovedAway, None, None, Some(to.clone()), None),
            Slot::Lost { reason } => (VmStatus::Lost, None, None, None, Some(reason.clone())),
            Slot::Stopped => (VmStatus::Stopped, None, None, None, None),
        };
        VmView {
            id: id.into(),
            status,
            epoch: e.epoch,
            spec: e.spec.clone(),
            counter,
            checksum_ok,
            moved_to,
            detail,
        }
    }

    /// One VM.
    pub fn vm(&self, id: &str) -> Result<VmView, AgentError> {
        let vms = lock(&self.inner.vms);
        let e = vms
            .get(id)
            .ok_or_else(|| AgentError::NotFound(format!("vm {id}")))?;
        Ok(Self::view(id, e))
    }

    /// Every VM this host knows of (running, moved away, lost, stopped).
    pub fn vms(&self) -> Vec<VmView> {
        lock(&self.inner.vms)
            .iter()
            .map(|(id, e)| Self::view(id, e))
            .collect()
    }

    /// One migration.
    pub fn migration(&self, id: &str) -> Result<MigrationView, AgentError> {
        let ms = lock(&self.inner.migrations);
        let m = ms
            .get(id)
            .ok_or_else(|| AgentError::NotFound(format!("migration {id}")))?;
        let progress = m.progress.borrow().clone();
        Ok(MigrationView {
            id: id.into(),
            vm: m.vm.clone(),
            role: m.role,
            peer: m.peer.clone(),
            state: m.state,
            progress,
            report: m.report.clone(),
            error: m.error.clone(),
        })
    }

    /// Every migration since this agent started.
    pub fn migrations(&self) -> Vec<MigrationView> {
        let ids: Vec<String> = lock(&self.inner.migrations).keys().cloned().collect();
        ids.iter()
            .filter_map(|id| self.migration(id).ok())
            .collect()
    }

    /// A live feed of one migration's progress.
    pub fn progress(&self, id: &str) -> Result<watch::Receiver<Progress>, AgentError> {
        lock(&self.inner.migrations)
            .get(id)
            .map(|m| m.progress.clone())
            .ok_or_else(|| AgentError::NotFound(format!("migration {id}")))
    }

    /// Starts migrating a VM to a peer; returns the migration's id at once
    /// (follow it with [`Agent::migration`] or [`Agent::progress`]).
    pub fn migrate(&self, vm: &str, req: MigrateRequest) -> Result<String, AgentError> {
        let peer = self.inner.cfg.peer(&req.to).cloned().ok_or_else(|| {
            AgentError::BadRequest(format!("`{}` is not a configured peer", req.to))
        })?;
        let mut policy = Policy {
            mode: req.mode.parse().map_err(AgentError::BadRequest)?,
            ..Policy::default()
        };
        if let Some(ms) = req.max_downtime_ms {
            if ms == 0 {
                return Err(AgentError::BadRequest(
                    "max_downtime_ms must be above 0".into(),
                ));
            }
            policy.max_downtime = Duration::from_millis(ms);
        }
        policy.bandwidth_bytes_per_sec = req.bandwidth_mbps.unwrap_or(0) * 1_000_000;
        policy.deadline = req.deadline_secs.map(Duration::from_secs);
        policy.max_bandwidth_bytes_per_sec = req.max_bandwidth_mbps.unwrap_or(0) * 1_000_000;
        policy.auto_converge = req.auto_converge.unwrap_or(true);
        let compress: Compress = match &req.compress {
            Some(c) => c.parse().map_err(AgentError::BadRequest)?,
            None if policy.bandwidth_bytes_per_sec > 0 => Compress::Zstd,
            None => Compress::None,
        };
        let migration = format!("mig-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let (machine, epoch, spec) = {
            let mut vms = lock(&self.inner.vms);
            let e = vms
                .get_mut(vm)
                .ok_or_else(|| AgentError::NotFound(format!("vm {vm}")))?;
            if !matches!(e.slot, Slot::Running(_)) {
                return Err(AgentError::Conflict(format!("vm {vm} is not running here")));
            }
            self.inner
                .journal
                .append(&Record::MigrationOut {
                    migration: migration.clone(),
                    vm: vm.into(),
                    to: peer.name.clone(),
                })
                .map_err(|e| AgentError::Internal(e.to_string()))?;
            let Slot::Running(m) = std::mem::replace(
                &mut e.slot,
                Slot::Migrating {
                    migration: migration.clone(),
                },
            ) else {
                unreachable!("checked above")
            };
            (m, e.epoch, e.spec.clone())
        };
        let (tx, rx) = watch::channel(Progress::default());
        lock(&self.inner.migrations).insert(
            migration.clone(),
            MigrationEntry {
                vm: vm.into(),
                role: Role::Source,
                peer: peer.name.clone(),
                state: MigrationState::Running,
                progress: rx,
                report: None,
                error: None,
            },
        );
        let a = self.clone();
        let (id, vm) = (migration.clone(), vm.to_string());
        tokio::spawn(async move {
            a.run_outgoing(id, vm, peer, policy, compress, machine, epoch, spec, tx)
                .await;
        });
        Ok(migration)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_outgoing(
        self,
        migration: String,
        vm: String,
        peer: Peer,
        policy: Policy,
        compress: Compress,
        mut machine: Box<Hosted>,
        epoch: u64,
        spec: VmSpec,
        progress: watch::Sender<Progress>,
    ) {
        let res = async {
            let mut cfg = self.session_config();
            if spec.kind == GuestKind::Linux {
                // QEMU paces itself by how fast its socket drains and picks
                // switchover from that: a deep window would hide the link
                // from it, and the last round would queue behind the window.
                cfg.window_bytes = QEMU_WINDOW_BYTES;
            }
            let data = Sender::connect(peer.migrate_addr, self.security(&peer.name), cfg, None)
                .await
                .map_err(|e| MigrateError::Transport(format!("cannot reach {}: {e}", peer.name)))?;
            let (tx, rx) = oneshot::channel();
            lock(&self.inner.reply_waiters).insert(migration.clone(), tx);
            let hello = SessionHello::Data {
                migration: migration.clone(),
                source_host: self.inner.cfg.name.clone(),
                reply_to: self
                    .inner
                    .cfg
                    .advertise_addr
                    .unwrap_or(self.migrate_addr)
                    .to_string(),
                vm: vm.clone(),
                epoch,
                spec: serde_json::to_value(&spec).expect("specs serialize"),
            };
            data.send(hello_frame(&hello))
                .await
                .map_err(|e| MigrateError::Transport(e.to_string()))?;
            let replies = tokio::time::timeout(policy.reply_timeout, rx)
                .await
                .map_err(|_| {
                    MigrateError::Transport(format!(
                        "{} did not open the reply session within {:?} (is this host its peer?)",
                        peer.name, policy.reply_timeout
                    ))
                })?
                .map_err(|_| MigrateError::Transport("reply session lost".into()))?;
            let journal = &self.inner.journal;
            let mut before_commit = || {
                journal
                    .append(&Record::CommitDecided {
                        migration: migration.clone(),
                        vm: vm.clone(),
                        to: peer.name.clone(),
                        epoch: epoch + 1,
                    })
                    .map_err(|e| e.to_string())
            };
            match &mut *machine {
                Hosted::Qemu(q) => {
                    qemu_relay::source(
                        qemu_relay::SourceArgs {
                            vm: q,
                            policy: &policy,
                            compress,
                            progress,
                        },
                        data,
                        replies,
                        &mut before_commit,
                    )
                    .await
                }
                _ => {
                    tern_migrate::migrate_observed(
                        &mut *machine,
                        SourceLink { data, replies },
                        &self.inner.key,
                        &policy,
                        &migration,
                        progress,
                        &mut before_commit,
                    )
                    .await
                }
            }
        }
        .await;
        lock(&self.inner.reply_waiters).remove(&migration);
        // A QEMU guest that failed its own check after commit still moved.
        let corrupted =
            spec.kind == GuestKind::Linux && matches!(&res, Err(MigrateError::Verification(_)));
        let moved = corrupted || matches!(&res, Ok(_) | Err(MigrateError::CommitUnconfirmed(_)));
        if !moved {
            let reason = res
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if let Err(e) = self.inner.journal.append(&Record::RolledBack {
                migration: migration.clone(),
                vm: vm.clone(),
                reason,
            }) {
                tracing::error!(error = %e, "journal");
            }
        }
        if let Some(e) = lock(&self.inner.vms).get_mut(&vm) {
            if moved {
                e.slot = Slot::MovedAway {
                    to: peer.name.clone(),
                };
                e.epoch += 1;
            } else {
                e.slot = Slot::Running(machine);
            }
        }
        if let Some(m) = lock(&self.inner.migrations).get_mut(&migration) {
            match res {
                Ok(report) => {
                    m.state = MigrationState::Committed;
                    m.report = Some(report);
                }
                Err(e) => {
                    m.state = if corrupted {
                        MigrationState::Corrupted
                    } else if moved {
                        MigrationState::Committed
                    } else {
                        MigrationState::RolledBack
                    };
                    m.error = Some(e.to_string());
                }
            }
        }
    }

    async fn session(self, mut rx: Receiver) {
        let hello = match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Ok((seq, f)))) => {
                rx.ack(seq);
                match split(&f) {
                    Ok((KIND_HELLO, p)) => serde_json::from_slice::<SessionHello>(&p)
                        .map_err(|e| format!("bad hello: {e}")),
                    Ok((k, _)) => Err(format!("expected a hello, got frame kind {k}")),
                    Err(e) => Err(e),
                }
            }
            Ok(Some(Err(e))) => Err(e.to_string()),
            Ok(None) => Err("session closed before its hello".into()),
            Err(_) => Err("no hello within 10 s".into()),
        };
        match hello {
            Err(e) => tracing::warn!(error = %e, "refused a migration session"),
            Ok(SessionHello::Replies { migration }) => {
                match lock(&self.inner.reply_waiters).remove(&migration) {
                    Some(w) => {
                        let _ = w.send(rx);
                    }
                    None => tracing::warn!(migration, "reply session for no migration of ours"),
                }
            }
            Ok(SessionHello::Data {
                migration,
                source_host,
                reply_to,
                vm,
                epoch,
                spec,
            }) => {
                if let Err(e) = self
                    .incoming(rx, &migration, &source_host, &reply_to, &vm, epoch, spec)
                    .await
                {
                    tracing::warn!(migration, from = source_host, error = %e, "incoming migration refused");
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn incoming(
        &self,
        data: Receiver,
        migration: &str,
        source_host: &str,
        reply_to: &str,
        vm: &str,
        epoch: u64,
        spec_json: serde_json::Value,
    ) -> Result<(), String> {
        let peer = self
            .inner
            .cfg
            .peer(source_host)
            .cloned()
            .ok_or_else(|| format!("`{source_host}` is not a configured peer"))?;
        let source_key = keys::parse_public(&peer.key)?;
        let spec: VmSpec =
            serde_json::from_value(spec_json.clone()).map_err(|e| format!("bad VM spec: {e}"))?;
        let reply_addr: SocketAddr = reply_to
            .parse()
            .map_err(|_| format!("bad reply address {reply_to}"))?;
        let replies = Sender::connect(
            reply_addr,
            self.security(source_host),
            self.session_config(),
            None,
        )
        .await
        .map_err(|e| format!("cannot dial the reply session to {reply_addr}: {e}"))?;
        replies
            .send(hello_frame(&SessionHello::Replies {
                migration: migration.into(),
            }))
            .await
            .map_err(|e| e.to_string())?;
        let journal = &self.inner.journal;
        journal
            .append(&Record::MigrationIn {
                migration: migration.into(),
                vm: vm.into(),
                from: source_host.into(),
            })
            .map_err(|e| e.to_string())?;
        let (ptx, prx) = watch::channel(Progress {
            phase: "receiving".into(),
            ..Default::default()
        });
        lock(&self.inner.migrations).insert(
            migration.into(),
            MigrationEntry {
                vm: vm.into(),
                role: Role::Destination,
                peer: source_host.into(),
                state: MigrationState::Running,
                progress: prx,
                report: None,
                error: None,
            },
        );
        let capacity = Capacity {
            max_memory_bytes: self.inner.cfg.max_memory_mib << 20,
            max_vcpus: self.inner.cfg.max_vcpus,
        };
        let owned_here = matches!(
            lock(&self.inner.vms).get(vm).map(|e| &e.slot),
            Some(Slot::Running(_) | Slot::Migrating { .. })
        );
        if spec.kind == GuestKind::Linux {
            return self
                .incoming_qemu(
                    data, replies, migration, vm, epoch, &spec, &spec_json, owned_here, ptx,
                )
                .await;
        }
        let mut on_commit = || {
            journal
                .append(&Record::CommitReceived {
                    migration: migration.into(),
                    vm: vm.into(),
                    epoch: epoch + 1,
                    spec: spec_json.clone(),
                })
                .map_err(|e| e.to_string())
        };
        let res = tern_migrate::receive_observed(
            DestLink { data, replies },
            |req| {
                if owned_here {
                    return Err(format!("{vm} already runs on this host"));
                }
                Hosted::incoming(&spec, &req.shape)
            },
            &source_key,
            &capacity,
            &mut on_commit,
        )
        .await;
        let (state, error) = match res {
            Ok(machine) => {
                lock(&self.inner.vms).insert(
                    vm.into(),
                    VmEntry {
                        spec: spec.clone(),
                        epoch: epoch + 1,
                        slot: Slot::Running(Box::new(machine)),
                    },
                );
                (MigrationState::Committed, None)
            }
            Err(e) => {
                let _ = journal.append(&Record::Discarded {
                    migration: migration.into(),
                    vm: vm.into(),
                    reason: e.to_string(),
                });
                (MigrationState::Discarded, Some(e.to_string()))
            }
        };
        self.end_incoming(migration, &ptx, state, error)
    }
}

impl Agent {
    /// Publishes how an incoming migration ended (phase, state, error).
    fn end_incoming(
        &self,
        migration: &str,
        progress: &watch::Sender<Progress>,
        state: MigrationState,
        error: Option<String>,
    ) -> Result<(), String> {
        progress.send_modify(|p| {
            p.phase = match state {
                MigrationState::Discarded => "discarded".into(),
                _ => "committed".into(),
            }
        });
        if let Some(m) = lock(&self.inner.migrations).get_mut(migration) {
            m.state = state;
            m.error = error.clone();
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The destination of a QEMU guest's migration (see [`qemu_relay`]).
    #[allow(clippy::too_many_arguments)]
    async fn incoming_qemu(
        &self,
        data: Receiver,
        replies: Sender,
        migration: &str,
        vm: &str,
        epoch: u64,
        spec: &VmSpec,
        spec_json: &serde_json::Value,
        owned_here: bool,
        progress: watch::Sender<Progress>,
    ) -> Result<(), String> {
        let refuse = if owned_here {
            Some(format!("{vm} already runs on this host"))
        } else if spec.memory_mib > self.inner.cfg.max_memory_mib
            || spec.vcpus > self.inner.cfg.max_vcpus
        {
            Some(format!(
                "no capacity for {} MiB and {} vCPUs (limit {} MiB, {} vCPUs)",
                spec.memory_mib,
                spec.vcpus,
                self.inner.cfg.max_memory_mib,
                self.inner.cfg.max_vcpus
            ))
        } else {
            None
        };
        let (qspec, refuse) = match self.qemu_spec(spec) {
            Ok(q) => (Some(q), refuse),
            Err(e) => (None, Some(e)),
        };
        let qconf = self.qemu_config();
        let journal = &self.inner.journal;
        let mut on_commit = || {
            journal
                .append(&Record::CommitReceived {
                    migration: migration.into(),
                    vm: vm.into(),
                    epoch: epoch + 1,
                    spec: spec_json.clone(),
                })
                .map_err(|e| e.to_string())
        };
        let qspec = qspec.unwrap_or_else(|| QemuSpec {
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            kernel: Default::default(),
            initrd: None,
            cmdline: String::new(),
            disks: Vec::new(),
        });
        let res = qemu_relay::destination(
            qemu_relay::DestArgs {
                qemu: &qconf,
                dir: self.qemu_dir(vm, epoch + 1),
                spec: qspec,
                load: spec.load_params(),
                progress: progress.clone(),
                refuse,
            },
            data,
            replies,
            &mut on_commit,
        )
        .await;
        let (state, error, guest) = match res {
            Ok(q) => (MigrationState::Committed, None, Some(q)),
            Err((e, Some(q))) => (MigrationState::Corrupted, Some(e.to_string()), Some(q)),
            Err((e, None)) => {
                let _ = journal.append(&Record::Discarded {
                    migration: migration.into(),
                    vm: vm.into(),
                    reason: e.to_string(),
                });
                (MigrationState::Discarded, Some(e.to_string()), None)
            }
        };
        if let Some(q) = guest {
            // Committed here: the VM is ours now, well or not. A QEMU that
            // died (its kernel panicked) is lost, not running.
            let slot = if q.is_alive() {
                Slot::Running(Box::new(Hosted::Qemu(q)))
            } else {
                Slot::Lost {
                    reason: error.clone().unwrap_or_default(),
                }
            };
            lock(&self.inner.vms).insert(
                vm.into(),
                VmEntry {
                    spec: spec.clone(),
                    epoch: epoch + 1,
                    slot,
                },
            );
        }
        self.end_incoming(migration, &progress, state, error)
    }
}

fn hello_frame(h: &SessionHello) -> bytes::Bytes {
    frame(
        KIND_HELLO,
        &serde_json::to_vec(h).expect("hellos serialize"),
    )
}
