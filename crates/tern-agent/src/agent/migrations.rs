//! The migrations this host sends and receives: starting them in the guests' processes and following them to their ends.

use super::*;

impl Agent {
    /// One migration.
    pub fn migration(&self, id: &str) -> Result<MigrationView, AgentError> {
        let ms = lock(&self.inner.migrations);
        let m = ms
            .get(id)
            .ok_or_else(|| AgentError::NotFound(format!("migration {id}")))?;
        let progress = m.progress.borrow().clone();
        Ok(MigrationView {
            id: typed("migration id", id)?,
            vm: typed("VM id", &m.vm)?,
            role: m.role,
            peer: typed("host name", &m.peer)?,
            state: shown_phase(m.state, progress.phase),
            progress,
            report: m.report.clone(),
            error: m.error.clone(),
            bandwidth_share_bytes_per_sec: m
                .bandwidth
                .filter(|_| !m.state.is_final())
                .map(|b| b.share),
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
        let to = req.to.as_str();
        if self.inner.peers.get(to).is_none() {
            return Err(AgentError::UnknownPeer {
                name: to.to_string(),
                joined: self.inner.cfg.control_plane.is_some(),
            });
        }
        let (policy, compress) = req.policy()?;
        let reason = req.reason.unwrap_or(tern_proto::MigrationReason::Manual);
        let own_cap = policy
            .max_bandwidth_bytes_per_sec
            .max(policy.bandwidth_bytes_per_sec);
        let share = self.share_for(reason, own_cap);
        let migration = match req.id.as_ref().map(|id| id.as_str()) {
            Some(id) => {
                if let Some(m) = lock(&self.inner.migrations).get(id) {
                    return if m.vm == vm && m.role == MigrationRole::Source {
                        Ok(id.to_string())
                    } else {
                        Err(AgentError::Conflict(format!("migration {id} exists here")))
                    };
                }
                id.to_string()
            }
            None => format!("mig-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        };
        let e = self.entry(vm)?;
        lock(&self.inner.routes).insert(migration.clone(), e.dir.clone());
        let job = OutJob {
            migration: migration.clone(),
            to: to.to_string(),
            policy,
            compress,
            reply_to: self.reply_addr().to_string(),
            share_bytes_per_sec: share,
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
        metrics::counter!("migrations_initiated_total").increment(1);
        let eta = eta::EtaHistory::key(to, &req.mode);
        self.track(&migration, vm, MigrationRole::Source, to, e.dir, Some(eta));
        self.claim_bandwidth(&migration, reason, own_cap, share);
        Ok(migration)
    }

    /// Cancels an outgoing migration before its switchover: it rolls back
    /// and the guest runs on here (follow it to its end as usual).
    pub async fn cancel_migration(&self, id: &str) -> Result<(), AgentError> {
        self.tell_source(
            id,
            &Request::Cancel {
                migration: id.into(),
            },
        )
        .await
    }

    /// Points an outgoing migration's data session at the destination's
    /// new migration address `addr` (its old route is gone and post-copy
    /// waits): the streams reconnect there and the migration goes on.
    pub async fn redirect_migration(
        &self,
        id: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), AgentError> {
        self.tell_source(
            id,
            &Request::Redirect {
                migration: id.into(),
                addr,
            },
        )
        .await
    }

    /// Passes `req` to the guest process that runs outgoing migration `id`.
    async fn tell_source(&self, id: &str, req: &Request) -> Result<(), AgentError> {
        let view = self.migration(id)?;
        if view.role != MigrationRole::Source || view.state.is_final() {
            return Err(AgentError::Conflict(format!(
                "migration {id} is not an outgoing migration under way here"
            )));
        }
        let dir = lock(&self.inner.routes)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::Conflict(format!("migration {id} has ended")))?;
        match control::call::<()>(&dir.control(), req, STATUS_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(control::ControlError::Refused(why)) => Err(AgentError::Conflict(why)),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists a migration under way and follows it to its end (with the
    /// key of its ETA history, if its estimates are corrected by one).
    pub(crate) fn track(
        &self,
        migration: &str,
        vm: &str,
        role: MigrationRole,
        peer: &str,
        dir: VmDir,
        eta: Option<String>,
    ) {
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
                bandwidth: None,
            },
        );
        let a = self.clone();
        let migration = migration.to_string();
        tokio::spawn(async move { a.follow(migration, dir, tx, eta).await });
    }

    /// Follows a migration on its process's control socket; when the
    /// process is gone, its journal says how the migration ended. Its
    /// time-left estimates are corrected by the history under `eta`, which
    /// learns from how this one ends.
    async fn follow(
        self,
        migration: String,
        dir: VmDir,
        tx: watch::Sender<Progress>,
        eta: Option<String>,
    ) {
        let started = Instant::now();
        let correction = eta
            .as_ref()
            .map_or(eta::Correction::NONE, |k| self.inner.eta.correction(k));
        let mut estimates = eta::EtaTracker::new(correction);
        let end = loop {
            let res = control::watch(&dir.control(), &migration, |mut p| {
                estimates.observe(&mut p, Instant::now());
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
        let ended = Instant::now();
        if let (Some(key), Some(r), MigrationPhase::Committed) = (&eta, &end.report, end.state) {
            if let Some(c) = estimates.learned(ended, r.wire_bytes) {
                self.inner.eta.record(key, c);
            }
        }
        self.apply_end(end, &dir);
    }

    /// Publishes a migration's end; a guest that arrived becomes a VM here.
    pub(super) fn apply_end(&self, end: EndedMigration, dir: &VmDir) {
        // The VM is listed before its route goes, so a request in between
        // finds it one way or the other.
        if end.role == MigrationRole::Destination
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
        lock(&self.inner.routes).remove(&end.migration);
        record_end(&end);
        if let Some(m) = lock(&self.inner.migrations).get_mut(&end.migration) {
            m.state = end.state;
            m.report = end.report;
            m.error = end.error;
        }
        // What it used goes to the others.
        self.reshare();
    }
}

/// Counts a migration's end in the agent's metrics (the source's and the
/// destination's ends both count, each on its own host).
fn record_end(end: &EndedMigration) {
    let role = match end.role {
        MigrationRole::Source => "source",
        MigrationRole::Destination => "destination",
    };
    if end.state == MigrationPhase::Committed {
        metrics::counter!("migrations_completed_total", "role" => role).increment(1);
    } else {
        metrics::counter!("migrations_failed_total", "role" => role).increment(1);
    }
    if let Some(r) = &end.report {
        metrics::histogram!("migration_duration_seconds", "role" => role).record(r.total_ms / 1e3);
        metrics::histogram!("migration_checkpoint_size_bytes", "role" => role)
            .record(r.wire_bytes as f64);
    }
}

/// Options of one outgoing migration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination host (a configured peer).
    pub to: tern_proto::HostId,
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
    /// Compression on the wire: `auto` (the default), `none`, `lz4` or
    /// `zstd`. Native guests: `auto` picks per frame from the measured link
    /// rate and what each codec achieves on the guest's pages. Linux guests
    /// and containers: `auto` is zstd under a bandwidth cap, else none.
    #[serde(default)]
    pub compress: Option<String>,
    /// The migration's id, when a control plane names it (default: one of
    /// the agent's own). Asking again with the id of a migration of the
    /// same VM that this host already runs answers that migration, so a
    /// control plane that lost the first answer may retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<tern_proto::MigrationId>,
    /// Why it moves (default `manual`): its class when the host's
    /// bandwidth is shared (`host_bandwidth_mbps`). A control plane sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<tern_proto::MigrationReason>,
}

fn default_mode() -> String {
    "precopy".into()
}

impl MigrateRequest {
    /// The engine policy and stream compression it asks for.
    pub fn policy(&self) -> Result<(Policy, String), AgentError> {
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
        // Native guests: the engine's page compression. Linux guests and
        // containers: their relay's stream compression, which has no `auto`
        // (it stands for zstd under a cap, else none, as when not given).
        let asked = self.compress.as_deref().unwrap_or("auto");
        policy.compression = asked
            .parse::<tern_migrate::Codec>()
            .map_err(AgentError::BadRequest)?;
        let compress = match asked {
            "auto" if policy.bandwidth_bytes_per_sec > 0 => "zstd".into(),
            "auto" => "none".into(),
            c => c.to_string(),
        };
        Ok((policy, compress))
    }
}

pub(super) fn ended_in_journal(dir: &VmDir, migration: &str) -> Option<EndedMigration> {
    let records = dir.records().ok()?;
    fold(&records)
        .ended
        .into_iter()
        .find(|e| e.migration == migration)
}

/// A migration's phase as served: final only once its end is recorded
/// (with its report), the live phase before. The progress may name the
/// final phase a moment earlier; until the end arrives it shows as the
/// switchover still closing.
pub(super) fn shown_phase(recorded: MigrationPhase, live: MigrationPhase) -> MigrationPhase {
    if recorded.is_final() {
        recorded
    } else if live.is_final() {
        MigrationPhase::Switchover
    } else {
        live
    }
}

pub(super) fn lost_end(a: &Agent, migration: &str, why: &str) -> EndedMigration {
    let ms = lock(&a.inner.migrations);
    let m = ms.get(migration);
    EndedMigration {
        migration: migration.into(),
        vm: m.map(|m| m.vm.clone()).unwrap_or_default(),
        role: m.map_or(MigrationRole::Source, |m| m.role),
        peer: m.map(|m| m.peer.clone()).unwrap_or_default(),
        state: MigrationPhase::RolledBack,
        report: None,
        error: Some(why.into()),
    }
}
