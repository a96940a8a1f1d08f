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

use crate::config::AgentConfig;
use crate::control::{self, GuestState, GuestStatus, OutJob, Request};
use crate::keys;
use crate::views::{MigrationView, Role, VmSpec, VmStatus, VmView};
use crate::vmdir::{fold, DirFate, EndedMigration, Launch, LaunchRole, VmDir};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tern_migrate::MigrationPhase;
use tern_migrate::{Policy, Progress};
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
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a boot may take before the agent gives up on it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Clone)]
pub(crate) struct VmEntry {
    pub(crate) spec: VmSpec,
    pub(crate) dir: VmDir,
}

pub(crate) struct MigrationEntry {
    pub(crate) vm: String,
    pub(crate) role: Role,
    pub(crate) peer: String,
    pub(crate) state: MigrationPhase,
    pub(crate) progress: watch::Receiver<Progress>,
    pub(crate) report: Option<tern_migrate::Report>,
    pub(crate) error: Option<String>,
}

/// Migration id → the directory of the guest process that runs it.
pub(crate) type Routes = Arc<Mutex<HashMap<String, VmDir>>>;

pub(crate) struct Inner {
    pub(crate) cfg: AgentConfig,
    pub(crate) public_key: String,
    pub(crate) tls: Option<TlsIdentity>,
    pub(crate) exe: PathBuf,
    pub(crate) vms: Mutex<BTreeMap<String, VmEntry>>,
    pub(crate) migrations: Mutex<BTreeMap<String, MigrationEntry>>,
    pub(crate) routes: Routes,
}

/// A running agent. Cloning shares it.
#[derive(Clone)]
pub struct Agent {
    pub(crate) inner: Arc<Inner>,
    pub(crate) migrate_addr: SocketAddr,
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

impl MigrateRequest {
    /// The engine policy and stream compression it asks for.
    fn policy(&self) -> Result<(Policy, String), AgentError> {
        let mut policy = Policy {
            mode: self.mode.parse().map_err(AgentError::BadRequest)?,
            ..Policy::default()
        };
        if let Some(ms) = self.max_downtime_ms {
            if ms == 0 {
                return Err(AgentError::BadRequest(
                    "max_downtime_ms must be above 0".into(),
                ));
            }
            policy.max_downtime = Duration::from_millis(ms);
        }
        let mbps = |v: Option<u64>| v.unwrap_or(0).saturating_mul(1_000_000);
        policy.bandwidth_bytes_per_sec = mbps(self.bandwidth_mbps);
        policy.deadline = self.deadline_secs.map(Duration::from_secs);
        policy.max_bandwidth_bytes_per_sec = mbps(self.max_bandwidth_mbps);
        policy.auto_converge = self.auto_converge.unwrap_or(true);
        let compress = match &self.compress {
            Some(c) => {
                c.parse::<crate::qemu_relay::Compress>()
                    .map_err(AgentError::BadRequest)?;
                c.clone()
            }
            None if policy.bandwidth_bytes_per_sec > 0 => "zstd".into(),
            None => "none".into(),
        };
        Ok((policy, compress))
    }
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
                let pins = cfg
                    .peers
                    .iter()
                    .filter_map(|p| p.tls_pin.as_deref())
                    .map(tern_transport::tls::parse_pin)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| internal(&e))?;
                let id = TlsIdentity::load(&t.cert, &t.key, &t.ca, &pins)
                    .map_err(|e| AgentError::BadRequest(format!("TLS identity: {e}")))?;
                id.client_config()
                    .map_err(|e| AgentError::BadRequest(format!("TLS client: {e}")))?;
                Some(id)
            }
            None => None,
        };
        let exe = std::env::current_exe().map_err(|e| internal(&e))?;
        let inner = Arc::new(Inner {
            public_key: hex::encode(key.verifying_key().to_bytes()),
            cfg,
            tls,
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

    /// Where peers dial this host's migration listener.
    pub(crate) fn reply_addr(&self) -> SocketAddr {
        self.inner.cfg.advertise_addr.unwrap_or(self.migrate_addr)
    }

    /// Starts the process of the guest in `dir` (it outlives the agent: its
    /// own process group, no parent-death signal).
    pub(crate) fn spawn_guest(&self, dir: &VmDir) -> Result<(), AgentError> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.log())
            .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.log().display())))?;
        let err = log
            .try_clone()
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut child = std::process::Command::new(&self.inner.exe)
            .arg("guest")
            .arg(&dir.0)
            .process_group(0)
            // Frames are made on one thread and freed on another: two
            // malloc arenas keep the freed memory reusable (measured: the
            // source's peak during a 1 GiB pre-copy fell by 10-18 MB).
            .env(
                "MALLOC_ARENA_MAX",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                AgentError::Internal(format!("cannot start {}: {e}", self.inner.exe.display()))
            })?;
        // Reaped here while this agent lives; after it, by init.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }

    /// Boots a VM here, in a process of its own.
    pub async fn create_vm(&self, spec: VmSpec) -> Result<VmView, AgentError> {
        spec.validate().map_err(AgentError::BadRequest)?;
        let id = format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = VmDir::new(&self.inner.cfg.data_dir, &id);
        dir.write_launch(&Launch {
            vm: id.clone(),
            epoch: 1,
            spec: spec.clone(),
            role: LaunchRole::Boot,
            agent: self.inner.cfg.clone(),
        })
        .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.0.display())))?;
        self.spawn_guest(&dir)?;
        if let Err(e) = wait_running(&dir).await {
            // Leave nothing behind: a half-booted guest is no VM.
            let _ = control::call::<()>(&dir.control(), &Request::Stop, STATUS_TIMEOUT).await;
            if let Some(pid) = dir.live_pid() {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).expect("live pids are positive"),
                    rustix::process::Signal::KILL,
                );
            }
            return Err(e);
        }
        lock(&self.inner.vms).insert(id.clone(), VmEntry { spec, dir });
        self.vm(&id).await
    }

    fn entry(&self, id: &str) -> Result<VmEntry, AgentError> {
        // A guest that arrived may have committed a moment before its
        // migration's end reached this agent: its journal already says so.
        if let Some(e) = self.arrived(id) {
            lock(&self.inner.vms).insert(id.into(), e.clone());
            return Ok(e);
        }
        lock(&self.inner.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("vm {id}")))
    }

    /// The directory of an incoming migration of `id` under way here whose
    /// guest process has journaled the commit.
    fn arrived(&self, id: &str) -> Option<VmEntry> {
        let dirs: Vec<VmDir> = lock(&self.inner.routes).values().cloned().collect();
        dirs.into_iter().find_map(|dir| {
            let l = dir.launch().ok()?;
            if l.vm != id || matches!(l.role, LaunchRole::Boot) {
                return None;
            }
            let records = dir.journal().ok()?.records().ok()?;
            records
                .iter()
                .any(|r| matches!(r, crate::journal::Record::CommitReceived { .. }))
                .then_some(VmEntry { spec: l.spec, dir })
        })
    }

    /// Stops a VM running here.
    pub async fn stop_vm(&self, id: &str) -> Result<(), AgentError> {
        let e = self.entry(id)?;
        if e.dir.live_pid().is_none() {
            return Err(AgentError::Conflict(format!("vm {id} does not run here")));
        }
        match control::call::<()>(&e.dir.control(), &Request::Stop, STATUS_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(control::ControlError::Refused(why)) => {
                Err(AgentError::Conflict(format!("vm {id}: {why}")))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// One VM, as its process (or, when that is gone, its journal) says.
    pub async fn vm(&self, id: &str) -> Result<VmView, AgentError> {
        let e = self.entry(id)?;
        Ok(view(id, &e).await)
    }

    /// Every VM this host knows of (running, moved away, lost, stopped).
    pub async fn vms(&self) -> Vec<VmView> {
        let all: Vec<(String, VmEntry)> = lock(&self.inner.vms)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(all.len());
        for (id, e) in &all {
            out.push(view(id, e).await);
        }
        out
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
            state: shown_phase(m.state, progress.phase),
            progress,
            report: m.report.clone(),
            error: m.error.clone(),
        })
    }

    /// Every migration this host ran (its guests' journals keep them).
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
    /// (follow it with [`Agent::migration`] or [`Agent::progress`]). The
    /// guest's own process runs it.
    pub async fn migrate(&self, vm: &str, req: MigrateRequest) -> Result<String, AgentError> {
        if self.inner.cfg.peer(&req.to).is_none() {
            return Err(AgentError::BadRequest(format!(
                "`{}` is not a configured peer",
                req.to
            )));
        }
        let (policy, compress) = req.policy()?;
        let e = self.entry(vm)?;
        let migration = format!("mig-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        lock(&self.inner.routes).insert(migration.clone(), e.dir.clone());
        let job = OutJob {
            migration: migration.clone(),
            to: req.to.clone(),
            policy,
            compress,
            reply_to: self.reply_addr().to_string(),
        };
        let started = control::call::<()>(
            &e.dir.control(),
            &Request::MigrateOut(Box::new(job)),
            STATUS_TIMEOUT,
        )
        .await;
        if let Err(err) = started {
            lock(&self.inner.routes).remove(&migration);
            return Err(match err {
                control::ControlError::Refused(why) => {
                    AgentError::Conflict(format!("vm {vm}: {why}"))
                }
                control::ControlError::Io { .. } => {
                    AgentError::Conflict(format!("vm {vm} is not running here"))
                }
                other => other.into(),
            });
        }
        self.track(&migration, vm, Role::Source, &req.to, e.dir);
        Ok(migration)
    }

    /// Lists a migration under way and follows it to its end.
    pub(crate) fn track(&self, migration: &str, vm: &str, role: Role, peer: &str, dir: VmDir) {
        let (tx, rx) = watch::channel(Progress {
            phase: MigrationPhase::Requesting,
            ..Default::default()
        });
        lock(&self.inner.migrations).insert(
            migration.into(),
            MigrationEntry {
                vm: vm.into(),
                role,
                peer: peer.into(),
                state: MigrationPhase::Requesting,
                progress: rx,
                report: None,
                error: None,
            },
        );
        let a = self.clone();
        let migration = migration.to_string();
        tokio::spawn(async move { a.follow(migration, dir, tx).await });
    }

    /// Follows a migration on its process's control socket; when the
    /// process is gone, its journal says how the migration ended.
    async fn follow(self, migration: String, dir: VmDir, tx: watch::Sender<Progress>) {
        let started = Instant::now();
        let end = loop {
            let res = control::watch(&dir.control(), &migration, |p| {
                let _ = tx.send(p);
            })
            .await;
            if let Ok(Some(end)) = res {
                break end;
            }
            if let Some(end) = ended_in_journal(&dir, &migration) {
                break end;
            }
            let gone = dir.live_pid().is_none() && started.elapsed() > Duration::from_secs(10);
            if gone {
                break lost_end(
                    &self,
                    &migration,
                    "its guest process ended without recording an end",
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.apply_end(end, &dir);
    }

    /// Publishes a migration's end; a guest that arrived becomes a VM here.
    fn apply_end(&self, end: EndedMigration, dir: &VmDir) {
        lock(&self.inner.routes).remove(&end.migration);
        if end.role == Role::Destination
            && matches!(
                end.state,
                MigrationPhase::Committed | MigrationPhase::Corrupted
            )
        {
            if let Ok(l) = dir.launch() {
                lock(&self.inner.vms).insert(
                    end.vm.clone(),
                    VmEntry {
                        spec: l.spec,
                        dir: dir.clone(),
                    },
                );
            }
        }
        if let Some(m) = lock(&self.inner.migrations).get_mut(&end.migration) {
            m.state = end.state;
            m.report = end.report;
            m.error = end.error;
        }
    }

    /// Re-adopts every guest directory: running processes are served as
    /// before, ended ones are reported as their journals say.
    fn adopt(&self) {
        let root = self.inner.cfg.data_dir.join("vms");
        let Ok(list) = std::fs::read_dir(&root) else {
            return;
        };
        let mut best: BTreeMap<String, (u64, bool, VmEntry)> = BTreeMap::new();
        for d in list.flatten() {
            let dir = VmDir(d.path());
            let Ok(launch) = dir.launch() else { continue };
            let fate = dir
                .journal()
                .and_then(|j| j.records())
                .map(|r| fold(&r))
                .unwrap_or_default();
            let live = dir.live_pid().is_some();
            self.adopt_migrations(&dir, &launch, &fate, live);
            let incoming = !matches!(launch.role, LaunchRole::Boot);
            let was_vm_here =
                !incoming || fate.owned.is_some() || fate.moved_to.is_some() || fate.stopped;
            if !was_vm_here {
                continue;
            }
            let rank = (launch.epoch, live);
            let cur = best.get(&launch.vm).map(|(e, l, _)| (*e, *l));
            if cur.is_none_or(|c| rank > c) {
                let entry = VmEntry {
                    spec: launch.spec.clone(),
                    dir,
                };
                best.insert(launch.vm.clone(), (launch.epoch, live, entry));
            }
        }
        let mut vms = lock(&self.inner.vms);
        for (vm, (_, _, e)) in best {
            vms.insert(vm, e);
        }
    }

    fn adopt_migrations(&self, dir: &VmDir, launch: &Launch, fate: &DirFate, live: bool) {
        for e in &fate.ended {
            let (_, rx) = watch::channel(Progress {
                phase: e.state,
                ..Default::default()
            });
            lock(&self.inner.migrations).insert(
                e.migration.clone(),
                MigrationEntry {
                    vm: e.vm.clone(),
                    role: e.role,
                    peer: e.peer.clone(),
                    state: e.state,
                    progress: rx,
                    report: e.report.clone(),
                    error: e.error.clone(),
                },
            );
        }
        // One still under way in a live process: follow it again.
        let open = match &launch.role {
            LaunchRole::Receive {
                migration,
                source_host,
                ..
            } if !fate.ended.iter().any(|e| &e.migration == migration) => {
                Some((migration.clone(), Role::Destination, source_host.clone()))
            }
            _ => self.open_outgoing(dir).map(|(m, to)| (m, Role::Source, to)),
        };
        if let (Some((m, role, peer)), true) = (open, live) {
            lock(&self.inner.routes).insert(m.clone(), dir.clone());
            self.track(&m, &launch.vm, role, &peer, dir.clone());
        }
    }

    /// The outgoing migration a guest's journal shows begun and not ended.
    fn open_outgoing(&self, dir: &VmDir) -> Option<(String, String)> {
        let records = dir.journal().ok()?.records().ok()?;
        let mut open = None;
        for r in &records {
            match r {
                crate::journal::Record::MigrationOut { migration, to, .. } => {
                    open = Some((migration.clone(), to.clone()))
                }
                crate::journal::Record::MigrationEnded(e)
                    if open.as_ref().is_some_and(|(m, _)| m == &e.migration) =>
                {
                    open = None
                }
                _ => {}
            }
        }
        open
    }
}

fn ended_in_journal(dir: &VmDir, migration: &str) -> Option<EndedMigration> {
    let records = dir.journal().ok()?.records().ok()?;
    fold(&records)
        .ended
        .into_iter()
        .find(|e| e.migration == migration)
}

/// A migration's phase as served: final only once its end is recorded
/// (with its report), the live phase before. The progress may name the
/// final phase a moment earlier; until the end arrives it shows as the
/// switchover still closing.
fn shown_phase(recorded: MigrationPhase, live: MigrationPhase) -> MigrationPhase {
    if recorded.is_final() {
        recorded
    } else if live.is_final() {
        MigrationPhase::Switchover
    } else {
        live
    }
}

fn lost_end(a: &Agent, migration: &str, why: &str) -> EndedMigration {
    let ms = lock(&a.inner.migrations);
    let m = ms.get(migration);
    EndedMigration {
        migration: migration.into(),
        vm: m.map(|m| m.vm.clone()).unwrap_or_default(),
        role: m.map_or(Role::Source, |m| m.role),
        peer: m.map(|m| m.peer.clone()).unwrap_or_default(),
        state: MigrationPhase::RolledBack,
        report: None,
        error: Some(why.into()),
    }
}

/// Waits for a freshly started guest process to run its guest.
async fn wait_running(dir: &VmDir) -> Result<(), AgentError> {
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match control::call::<GuestStatus>(&dir.control(), &Request::Status, STATUS_TIMEOUT).await {
            Ok(s) if s.state == GuestState::Running => return Ok(()),
            Ok(s) if s.state == GuestState::Failed => {
                return Err(AgentError::Internal(s.detail.unwrap_or_default()))
            }
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(2) && dir.live_pid().is_none() {
            let log = std::fs::read_to_string(dir.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(AgentError::Internal(format!(
                "the guest process ended: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        if t.elapsed() > BOOT_TIMEOUT {
            return Err(AgentError::Internal(format!(
                "the guest did not start within {BOOT_TIMEOUT:?}"
            )));
        }
    }
}

/// A VM's view: its process's answer, or its journal's when it has none
/// (the journal is read only then, or to name where a guest moved).
async fn view(id: &str, e: &VmEntry) -> VmView {
    let status = match e.dir.live_pid() {
        Some(_) => control::call::<GuestStatus>(&e.dir.control(), &Request::Status, STATUS_TIMEOUT)
            .await
            .map_err(|err| err.to_string()),
        None => Err(String::new()),
    };
    let mut v = VmView {
        id: id.into(),
        status: VmStatus::Lost,
        epoch: 1,
        spec: e.spec.clone(),
        counter: None,
        checksum_ok: None,
        moved_to: None,
        detail: None,
    };
    let fate = || {
        e.dir
            .journal()
            .and_then(|j| j.records())
            .map(|r| fold(&r))
            .unwrap_or_default()
    };
    match status {
        Ok(s) => {
            v.epoch = s.epoch;
            v.detail = s.detail.or(s.migration);
            v.status = match s.state {
                GuestState::Running => {
                    v.counter = s.counter;
                    v.checksum_ok = s.checksum_ok;
                    VmStatus::Running
                }
                GuestState::Booting => VmStatus::Starting,
                GuestState::Migrating | GuestState::Receiving => VmStatus::Migrating,
                GuestState::MovedAway => {
                    v.moved_to = fate().moved_to.map(|m| m.0);
                    VmStatus::MovedAway
                }
                GuestState::Stopped => VmStatus::Stopped,
                GuestState::Failed => VmStatus::Lost,
            };
        }
        Err(why) => {
            let fate = fate();
            v.epoch = fate
                .owned
                .or(fate.moved_to.as_ref().map(|m| m.1))
                .unwrap_or(1);
            v.status = if fate.stopped {
                VmStatus::Stopped
            } else if fate.moved_to.is_some() && fate.in_doubt.is_none() {
                v.moved_to = fate.moved_to.map(|m| m.0);
                VmStatus::MovedAway
            } else {
                VmStatus::Lost
            };
            if v.status == VmStatus::Lost {
                v.detail = Some(if why.is_empty() {
                    "its guest process ended".into()
                } else {
                    format!("its guest process does not answer: {why}")
                });
            }
        }
    }
    v
}
