//! Migrations the control plane runs between the fleet's hosts.
//!
//! A migration is asked for ([`Migrations::request`]: a user, a drain) and
//! recorded in the store at phase `requesting`, with its target chosen by
//! the scheduler or checked against it (room, labels: a VM that requires
//! `region=eu` is never sent to a host without it). A runner loop then
//! carries every migration that has not ended: it starts it on the source
//! host's agent under the store's id (idempotently: asking again answers
//! the same migration), follows its phase into the store, and at its end
//! moves the VM's owner to the target by compare-and-swap on
//! `(host, epoch)`. Requests start through the scheduler's [`Queue`]:
//! most urgent first (evacuation, maintenance, manual, rebalance), within
//! limits per host and per link, and an urgent request that a less urgent
//! migration blocks (a host's slot, the link, the target's room) cancels
//! it, which rolls back. All of its state is in the store and on the agents, and
//! the loop runs under a lease: when the replica that runs it dies, another
//! takes the lease over and carries on from the store.

use crate::driver::AgentsDriver;
use std::sync::Arc;
use std::time::Duration;
use tern_agent::{ClientError, MigrateRequest, MigrationPhase, MigrationView};
use tern_proto::{
    HostId, HostState, MigrationId, MigrationReason, MigrationRecord, VmId, VmStatus,
};
use tern_scheduler::{Limits, Queue, Request, Step};
use tern_store::{Store, StoreError};

/// The lease the runner loop holds (one replica at a time).
pub const LEASE: &str = "fleet-migrations";
/// How long a lease lasts unless renewed: how soon another replica takes
/// over from one that died.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the runner looks at every migration.
const TICK: Duration = Duration::from_millis(500);
/// How long a migration may wait for its source to take it.
const START_PATIENCE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Why a migration was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// No such VM.
    #[error("VM {0} not found")]
    NotFound(VmId),
    /// The VM is not running.
    #[error("VM {vm} is {status}: only a running VM migrates")]
    NotRunning {
        /// The VM.
        vm: VmId,
        /// Its status.
        status: VmStatus,
    },
    /// It already runs on the host asked for.
    #[error("VM {vm} already runs on {host}")]
    SameHost {
        /// The VM.
        vm: VmId,
        /// Its host.
        host: HostId,
    },
    /// The target may not, or cannot, take it.
    #[error("VM {vm} cannot move: {source}")]
    Refused {
        /// The VM.
        vm: VmId,
        /// What the scheduler said.
        source: tern_scheduler::PlaceError,
    },
    /// It is migrating already.
    #[error("VM {0} is migrating already")]
    Busy(VmId),
    /// No such migration.
    #[error("migration {0} not found")]
    NoMigration(MigrationId),
    /// The migration has ended.
    #[error("migration {0} has ended")]
    Ended(MigrationId),
    /// Too late to cancel (switchover began, or the source would not).
    #[error("cannot cancel: {0}")]
    TooLate(String),
    /// The options do not make a migration.
    #[error("migration options: {0}")]
    Options(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// The fleet could not be read.
    #[error(transparent)]
    Driver(#[from] tern_drivers::DriverError),
}

/// What a migration is asked with.
#[derive(Clone, Debug)]
pub struct Ask {
    /// The VM.
    pub vm: VmId,
    /// Where to (the scheduler picks when `None`).
    pub to: Option<HostId>,
    /// Why.
    pub reason: MigrationReason,
    /// The agent's migration options (`mode`, `max_downtime_ms`,
    /// `bandwidth_mbps`, ...); `to` and `id` are the control plane's.
    pub options: serde_json::Value,
}

/// The control plane's migrations.
pub struct Migrations {
    store: Arc<dyn Store>,
    driver: Arc<AgentsDriver>,
    holder: String,
    down_after: Duration,
    drain_options: serde_json::Value,
    rebalance_options: serde_json::Value,
    /// Decides which VMs move off hot hosts, and how often it is asked.
    policy: Box<dyn tern_scheduler::Policy>,
    rebalance_every: Duration,
    last_rebalance: std::sync::Mutex<Option<std::time::Instant>>,
    /// How many migrations run at once per host and per link.
    limits: Limits,
    /// Migrations cancelled to make way for another (victim, for), kept
    /// until they end so a later pass does not cancel them again.
    preempted: std::sync::Mutex<std::collections::HashMap<MigrationId, MigrationId>>,
}

fn metric_reason(r: MigrationReason) -> &'static str {
    r.as_str()
}

impl Migrations {
    /// Migrations over `driver`'s fleet; `holder` names this replica in
    /// the runner's lease; a host silent for `down_after` is down and its
    /// VMs restart elsewhere.
    pub fn new(
        store: Arc<dyn Store>,
        driver: Arc<AgentsDriver>,
        holder: &str,
        down_after: Duration,
    ) -> Self {
        Self {
            store,
            driver,
            holder: holder.into(),
            down_after,
            drain_options: serde_json::json!({}),
            rebalance_options: serde_json::json!({}),
            policy: Box::new(tern_scheduler::LoadBalance::default()),
            rebalance_every: Duration::from_secs(30),
            last_rebalance: std::sync::Mutex::new(None),
            limits: Limits::default(),
            preempted: std::sync::Mutex::default(),
        }
    }

    /// How many migrations may run at once per host (both ends counted)
    /// and per link.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The options of the migrations the load policy makes.
    pub fn with_rebalance_options(mut self, options: serde_json::Value) -> Self {
        self.rebalance_options = options;
        self
    }

    /// The rebalancing policy and how often it runs (`Duration::ZERO`:
    /// never).
    pub fn with_policy(mut self, policy: Box<dyn tern_scheduler::Policy>, every: Duration) -> Self {
        self.policy = policy;
        self.rebalance_every = every;
        self
    }

    /// The options of the migrations drains make (a bandwidth cap, say).
    pub fn with_drain_options(mut self, options: serde_json::Value) -> Self {
        self.drain_options = options;
        self
    }

    /// Records a migration (phase `requesting`) for the runner to carry
    /// out; a request the fleet refuses counts in `migrations_rejected_total`.
    pub async fn request(&self, ask: Ask) -> Result<MigrationRecord, MigrationError> {
        let res = self.record(ask).await;
        if let Err(
            MigrationError::NotFound(_)
            | MigrationError::NotRunning { .. }
            | MigrationError::SameHost { .. }
            | MigrationError::Refused { .. }
            | MigrationError::Busy(_)
            | MigrationError::Options(_),
        ) = &res
        {
            metrics::counter!("migrations_rejected_total").increment(1);
        }
        res
    }

    async fn record(&self, ask: Ask) -> Result<MigrationRecord, MigrationError> {
        let vm = self
            .store
            .get_vm(ask.vm)
            .await
            .map_err(MigrationError::Store)?
            .ok_or(MigrationError::NotFound(ask.vm))?;
        if vm.status != VmStatus::Running {
            return Err(MigrationError::NotRunning {
                vm: vm.id,
                status: vm.status,
            });
        }
        let options = options_of(&ask.options)?;
        let fleet = self.driver.model().await?;
        let refused = |source| MigrationError::Refused { vm: vm.id, source };
        if fleet.vm(&vm.id).is_some_and(|v| v.migrating) {
            return Err(MigrationError::Busy(vm.id));
        }
        let to = match ask.to {
            Some(to) if to == vm.host => {
                return Err(MigrationError::SameHost {
                    vm: vm.id,
                    host: to,
                })
            }
            Some(to) => {
                let d = crate::driver::demand(&vm.spec);
                fleet
                    .check_target(&to, d, &vm.spec.labels)
                    .map_err(refused)?;
                to
            }
            None => fleet
                .target_for_move(&vm.id, f64::INFINITY)
                .map_err(refused)?,
        };
        let now = chrono::Utc::now();
        let rec = MigrationRecord {
            id: MigrationId::new(format!("mig-{}", &VmId::new().to_string()[..13]))
                .expect("a valid id"),
            vm: vm.id,
            from: vm.host.clone(),
            to,
            reason: ask.reason,
            phase: MigrationPhase::Requesting,
            error: None,
            report: None,
            created_at: now,
            updated_at: now,
            options,
        };
        let rec = match self.store.insert_migration(&rec).await {
            Ok(r) => r,
            Err(StoreError::VmMigrating(v)) => return Err(MigrationError::Busy(v)),
            Err(e) => return Err(MigrationError::Store(e)),
        };
        metrics::counter!("migrations_initiated_total").increment(1);
        metrics::counter!("migration_reason_total", "reason" => metric_reason(rec.reason))
            .increment(1);
        tracing::info!(migration = %rec.id, vm = %rec.vm, from = %rec.from, to = %rec.to, reason = rec.reason.as_str(), "migration requested");
        Ok(rec)
    }

    /// What the source agent says of `m` now (its progress), if it answers.
    pub async fn live_view(&self, m: &MigrationRecord) -> Option<MigrationView> {
        let src = self.driver.client(&m.from).await.ok()?;
        src.migration(&m.id).await.ok()
    }

    /// Runs the runner loop until `stop` turns true: one pass every
    /// 500 ms while this replica holds the lease.
    pub fn spawn(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut held = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(TICK) => {}
                    _ = stop.changed() => break,
                }
                match self.store.try_lease(LEASE, &self.holder, LEASE_TTL).await {
                    Ok(true) => {
                        if !held {
                            tracing::info!(holder = %self.holder, "this replica runs the fleet's migrations");
                            held = true;
                        }
                        if let Err(e) = self.pass().await {
                            tracing::warn!(error = %e, "fleet migration pass failed");
                        }
                    }
                    Ok(false) => held = false,
                    Err(e) => tracing::warn!(error = %e, "cannot take the fleet lease"),
                }
            }
            let _ = self.store.release_lease(LEASE, &self.holder).await;
        })
    }

    /// One pass: plans the draining hosts' and the policy's moves,
    /// advances every migration under way, then starts what the queue
    /// admits.
    pub async fn pass(&self) -> Result<(), MigrationError> {
        let down = self.mark_down().await?;
        self.plan_drains().await?;
        self.rebalance().await?;
        let open = self.open().await?;
        for m in &open {
            let res = match (m.phase, down.contains(&m.from)) {
                (MigrationPhase::Requesting, false) => continue,
                (MigrationPhase::Requesting, true) => {
                    self.end(
                        m,
                        MigrationPhase::RolledBack,
                        Some("the source host went down"),
                        None,
                    )
                    .await
                }
                (_, true) => self.source_down(m).await,
                (_, false) => self.advance(m).await,
            };
            if let Err(e) = res {
                tracing::warn!(migration = %m.id, error = %e, "cannot advance a migration");
            }
        }
        self.admit().await?;
        if !down.is_empty() {
            self.restart_orphans(&down).await?;
        }
        Ok(())
    }

    async fn open(&self) -> Result<Vec<MigrationRecord>, MigrationError> {
        self.store
            .list_migrations(true)
            .await
            .map_err(MigrationError::Store)
    }

    /// Rebuilds the queue from the store (migrations under way hold their
    /// slots and room; requested ones wait) and carries out what it says:
    /// start, cancel a less urgent migration in the way, or refuse.
    async fn admit(&self) -> Result<(), MigrationError> {
        let open = self.open().await?;
        let mut fleet = self.driver.model_under_way().await?;
        let mut queue = Queue::new(self.limits);
        {
            let mut preempted = lock(&self.preempted);
            preempted.retain(|victim, _| open.iter().any(|m| &m.id == victim));
            for m in &open {
                let req = Request {
                    id: m.id.clone(),
                    vm: m.vm,
                    from: m.from.clone(),
                    to: m.to.clone(),
                    reason: m.reason,
                };
                if m.phase == MigrationPhase::Requesting {
                    queue.push(req);
                } else {
                    queue.resume(req, preempted.get(&m.id).cloned());
                }
            }
        }
        let running = queue.running().count();
        metrics::gauge!("migrations_active").set(running as f64);
        metrics::gauge!("migrations_pending").set((open.len() - running) as f64);
        for step in queue.admit(&mut fleet) {
            let res = match step {
                Step::Start(id) => self.claim(find(&open, &id)).await,
                Step::Cancel { victim, for_ } => {
                    self.preempt(&victim, &for_).await;
                    Ok(())
                }
                Step::Refuse { id, error } => {
                    metrics::counter!("migrations_rejected_total").increment(1);
                    let why = format!("refused: {error}");
                    self.end(
                        find(&open, &id),
                        MigrationPhase::RolledBack,
                        Some(&why),
                        None,
                    )
                    .await
                }
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "cannot carry out the migration queue's step");
            }
        }
        Ok(())
    }

    /// Cancels `victim` to make way for the more urgent `for_`.
    async fn preempt(&self, victim: &MigrationId, for_: &MigrationId) {
        match self.cancel(victim).await {
            Ok(_) => {
                metrics::counter!("migrations_preempted_total").increment(1);
                tracing::warn!(migration = %victim, for_ = %for_, "preempted a less urgent migration");
            }
            Err(e) => tracing::debug!(migration = %victim, error = %e, "not preempted"),
        }
        // Either way it is ending or ends by itself: not asked again.
        lock(&self.preempted).insert(victim.clone(), for_.clone());
    }

    /// Claims requested migration `m` (`requesting → precopy` by
    /// compare-and-swap, before its source is asked: a cancel that comes
    /// first finds it unclaimed and ends it here, one that comes after
    /// goes through the source's agent) and starts it.
    async fn claim(&self, m: &MigrationRecord) -> Result<(), MigrationError> {
        let src = self.driver.client(&m.from).await?;
        match self
            .store
            .update_migration(
                &m.id,
                MigrationPhase::Requesting,
                MigrationPhase::Precopy,
                None,
                None,
            )
            .await
        {
            Ok(claimed) => self.start(&src, &claimed).await,
            Err(StoreError::MigrationConflict { .. }) => Ok(()),
            Err(e) => Err(MigrationError::Store(e)),
        }
    }

    /// Marks hosts silent for longer than `down_after` down; returns every
    /// host that is down.
    async fn mark_down(&self) -> Result<std::collections::HashSet<HostId>, MigrationError> {
        let newly = self
            .store
            .mark_silent_hosts_down(self.down_after)
            .await
            .map_err(MigrationError::Store)?;
        for h in &newly {
            metrics::counter!("hosts_down_total").increment(1);
            tracing::warn!(host = %h, silent_for = ?self.down_after, "host down: no heartbeat; its VMs restart elsewhere");
        }
        Ok(self
            .store
            .list_hosts()
            .await
            .map_err(MigrationError::Store)?
            .into_iter()
            .filter(|h| h.state == HostState::Down)
            .map(|h| h.id)
            .collect())
    }

    /// A migration whose source went down: if the target committed, the
    /// VM runs there; otherwise it ends, and the VM restarts elsewhere.
    async fn source_down(&self, m: &MigrationRecord) -> Result<(), MigrationError> {
        let dst = self.driver.client(&m.to).await?;
        match dst.migration(&m.id).await {
            Ok(v) if v.state == MigrationPhase::Committed => self.follow(m, v).await,
            Ok(v) if !v.state.is_final() => Ok(()), // the target settles it first
            _ => {
                self.end(
                    m,
                    MigrationPhase::RolledBack,
                    Some("the source host went down"),
                    None,
                )
                .await
            }
        }
    }

    /// Restarts, on hosts that are up, the running VMs of hosts that are
    /// down: same id, tenant, spec and config, owner moved by
    /// compare-and-swap to the new host at the next epoch, which fences the
    /// old copy if its host comes back.
    async fn restart_orphans(
        &self,
        down: &std::collections::HashSet<HostId>,
    ) -> Result<(), MigrationError> {
        let open: std::collections::HashSet<VmId> = self
            .store
            .list_migrations(true)
            .await
            .map_err(MigrationError::Store)?
            .into_iter()
            .map(|m| m.vm)
            .collect();
        let orphans: Vec<tern_proto::VmRecord> = self
            .store
            .list_vms(&tern_store::VmFilter::statuses(&[VmStatus::Running]))
            .await
            .map_err(MigrationError::Store)?
            .into_iter()
            .filter(|v| down.contains(&v.host) && !open.contains(&v.id))
            .collect();
        if orphans.is_empty() {
            return Ok(());
        }
        let mut fleet = self.driver.model().await?;
        for vm in orphans {
            let d = crate::driver::demand(&vm.spec);
            let to = match fleet.place(d, &vm.spec.labels) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(vm = %vm.id, error = %e, "nowhere to restart a VM of a down host");
                    continue;
                }
            };
            let moved = match self
                .store
                .move_owner(vm.id, &vm.host, vm.owner_epoch, &to)
                .await
            {
                Ok(r) => r,
                Err(StoreError::OwnerConflict { .. }) => continue,
                Err(e) => return Err(MigrationError::Store(e)),
            };
            fleet.add_vm(tern_scheduler::Vm {
                id: vm.id,
                host: to.clone(),
                demand: d,
                requires: vm.spec.labels.clone(),
                migrating: false,
                last_moved: None,
            });
            let client = self.driver.client(&to).await?;
            let id = vm.id;
            let started = client
                .put_vm(&id, moved.owner_epoch.0, &vm.spec.guest_spec())
                .await;
            let configured = match started {
                Ok(_) => {
                    let config = serde_json::to_value(&vm.config).unwrap_or_default();
                    client.set_config(&id, &config).await
                }
                Err(e) => Err(e),
            };
            match configured {
                Ok(()) => {
                    metrics::counter!("vms_restarted_total").increment(1);
                    tracing::warn!(vm = %vm.id, from = %vm.host, to = %to, epoch = moved.owner_epoch.0, "restarted a VM of a down host");
                }
                // The health loop finds it missing there and replaces it.
                Err(e) => {
                    tracing::error!(vm = %vm.id, to = %to, error = %e, "cannot restart a VM of a down host")
                }
            }
        }
        Ok(())
    }

    /// Every `rebalance_every`, asks the policy which VMs should leave hot
    /// hosts, and asks for those moves.
    async fn rebalance(&self) -> Result<(), MigrationError> {
        if self.rebalance_every.is_zero() {
            return Ok(());
        }
        {
            let mut last = self
                .last_rebalance
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.rebalance_every) {
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let fleet = self.driver.model().await?;
        let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0);
        for p in self.policy.plan(&fleet, now) {
            let ask = Ask {
                vm: p.vm,
                to: Some(p.to.clone()),
                reason: p.reason,
                options: self.rebalance_options.clone(),
            };
            match self.request(ask).await {
                Ok(m) => {
                    tracing::info!(migration = %m.id, vm = %p.vm, from = %p.from, to = %p.to, "rebalancing")
                }
                Err(e) => tracing::debug!(vm = %p.vm, error = %e, "rebalancing move not made"),
            }
        }
        Ok(())
    }

    /// For every draining or evacuating host, asks for moves of the VMs it
    /// still runs (the queue paces them: per-host and per-link limits). An evacuation
    /// first cancels the rebalancing migrations from or to its host: they
    /// hold the host's migration slots and links, and nothing should be
    /// balanced onto a failing host.
    async fn plan_drains(&self) -> Result<(), MigrationError> {
        let hosts = self
            .store
            .list_hosts()
            .await
            .map_err(MigrationError::Store)?;
        let emptying: Vec<(HostId, MigrationReason)> = hosts
            .into_iter()
            .filter_map(|h| match h.state {
                HostState::Draining => Some((h.id, MigrationReason::Maintenance)),
                HostState::Evacuating => Some((h.id, MigrationReason::Evacuation)),
                _ => None,
            })
            .collect();
        if emptying.is_empty() {
            return Ok(());
        }
        for (host, reason) in &emptying {
            if *reason == MigrationReason::Evacuation {
                self.preempt_rebalancing(host).await?;
            }
        }
        let fleet = self.driver.model().await?;
        for (host, reason) in emptying {
            let (plans, stuck) = tern_scheduler::drain(&fleet, &host, reason);
            for (vm, why) in stuck {
                tracing::warn!(host = %host, vm = %vm, error = %why, "a VM of a host being emptied has nowhere to go");
            }
            for p in plans {
                let ask = Ask {
                    vm: p.vm,
                    to: Some(p.to),
                    reason: p.reason,
                    options: self.drain_options.clone(),
                };
                match self.request(ask).await {
                    Ok(_)
                    | Err(MigrationError::Busy(_))
                    | Err(MigrationError::NotRunning { .. }) => {}
                    Err(e) => tracing::warn!(host = %host, vm = %p.vm, error = %e, "move refused"),
                }
            }
        }
        Ok(())
    }

    /// Cancels every rebalancing migration from or to `host` (it rolls back).
    async fn preempt_rebalancing(&self, host: &HostId) -> Result<(), MigrationError> {
        let open = self
            .store
            .list_migrations(true)
            .await
            .map_err(MigrationError::Store)?;
        for m in open.iter().filter(|m| {
            m.reason == MigrationReason::Rebalance && (&m.from == host || &m.to == host)
        }) {
            match self.cancel(&m.id).await {
                Ok(_) => {
                    metrics::counter!("migrations_preempted_total").increment(1);
                    tracing::warn!(migration = %m.id, host = %host, "preempted a rebalancing migration for an evacuation");
                }
                // Cancelled at the last pass and not yet recorded, or
                // already switching over: either way it ends by itself.
                Err(e @ MigrationError::TooLate(_)) => {
                    tracing::debug!(migration = %m.id, error = %e, "not preempted")
                }
                Err(e) => tracing::warn!(migration = %m.id, error = %e, "cannot preempt"),
            }
        }
        Ok(())
    }

    /// Moves one migration under way on: follows its phase, and records
    /// its end.
    async fn advance(&self, m: &MigrationRecord) -> Result<(), MigrationError> {
        let src = self.driver.client(&m.from).await?;
        match src.migration(&m.id).await {
            Ok(v) => self.follow(m, v).await,
            // Claimed, but the source never heard of it (the replica that
            // claimed it died first): ask again; the agent answers the
            // same migration if it has it.
            Err(ClientError::Api { status: 404, .. }) => self.start(&src, m).await,
            Err(e) => {
                // The source is away (down, restarting): the target knows
                // whether it committed.
                let dst = self.driver.client(&m.to).await?;
                match dst.migration(&m.id).await {
                    Ok(v) if v.state == MigrationPhase::Committed => self.follow(m, v).await,
                    _ => {
                        tracing::debug!(migration = %m.id, error = %e, "source not answering; will ask again");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Starts claimed migration `m` on its source's agent.
    async fn start(
        &self,
        src: &tern_agent::AgentClient,
        m: &MigrationRecord,
    ) -> Result<(), MigrationError> {
        let req = start_request(m)?;
        match src.migrate(&m.vm, &req).await {
            Ok(v) => {
                metrics::counter!("migrations_accepted_total").increment(1);
                self.follow(m, v).await
            }
            Err(ClientError::Api { status, message }) if status < 500 => {
                metrics::counter!("migrations_rejected_total").increment(1);
                // The source refused (VM not there, options): the VM stays
                // where it is.
                self.end(m, MigrationPhase::RolledBack, Some(&message), None)
                    .await
            }
            Err(e) if chrono::Utc::now() - m.created_at > START_PATIENCE => {
                let why = format!("the source host never took it: {e}");
                self.end(m, MigrationPhase::RolledBack, Some(&why), None)
                    .await
            }
            // Not yet (a peer the source learns at its next heartbeat, a
            // source restarting): asked again at the next pass.
            Err(_) => Ok(()),
        }
    }

    /// Cancels migration `id` before its switchover: one not yet handed
    /// to its source ends here; one under way is cancelled by the source's
    /// agent and rolls back there (the runner records the end).
    pub async fn cancel(&self, id: &MigrationId) -> Result<MigrationRecord, MigrationError> {
        let m = self
            .store
            .get_migration(id)
            .await
            .map_err(MigrationError::Store)?
            .ok_or_else(|| MigrationError::NoMigration(id.clone()))?;
        if m.phase.is_final() {
            return Err(MigrationError::Ended(id.clone()));
        }
        if m.phase == MigrationPhase::Requesting {
            match self
                .store
                .update_migration(
                    id,
                    MigrationPhase::Requesting,
                    MigrationPhase::RolledBack,
                    Some("cancelled"),
                    None,
                )
                .await
            {
                Ok(r) => {
                    metrics::counter!("migrations_failed_total").increment(1);
                    return Ok(r);
                }
                Err(StoreError::MigrationConflict { .. }) => {}
                Err(e) => return Err(MigrationError::Store(e)),
            }
        }
        let src = self.driver.client(&m.from).await?;
        // The runner may be handing it to the source right now.
        for _ in 0..25 {
            match src.cancel_migration(id).await {
                Ok(_) => {
                    tracing::info!(migration = %id, "cancelled");
                    return self
                        .store
                        .get_migration(id)
                        .await
                        .map_err(MigrationError::Store)?
                        .ok_or_else(|| MigrationError::NoMigration(id.clone()));
                }
                Err(ClientError::Api { status: 404, .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(ClientError::Api {
                    status: 409,
                    message,
                }) => return Err(MigrationError::TooLate(message)),
                Err(e) => return Err(MigrationError::TooLate(e.to_string())),
            }
        }
        Err(MigrationError::TooLate("its source never took it".into()))
    }

    /// Records what the agent says of `m`.
    async fn follow(&self, m: &MigrationRecord, v: MigrationView) -> Result<(), MigrationError> {
        if v.state.is_final() {
            let report = v.report.as_ref().and_then(|r| serde_json::to_value(r).ok());
            return self
                .end(m, v.state, v.error.as_deref(), report.as_ref())
                .await;
        }
        // The agent's own `requesting` comes after the runner's claim.
        if v.state != m.phase && v.state != MigrationPhase::Requesting {
            self.store
                .update_migration(&m.id, m.phase, v.state, None, None)
                .await
                .map_err(MigrationError::Store)?;
        }
        Ok(())
    }

    /// Ends `m` at `phase`; a committed migration first moves the VM's
    /// owner to the target (compare-and-swap: a stale pass changes nothing).
    async fn end(
        &self,
        m: &MigrationRecord,
        phase: MigrationPhase,
        error: Option<&str>,
        report: Option<&serde_json::Value>,
    ) -> Result<(), MigrationError> {
        if phase == MigrationPhase::Committed {
            let vm = self
                .store
                .get_vm(m.vm)
                .await
                .map_err(MigrationError::Store)?
                .ok_or(MigrationError::NotFound(m.vm))?;
            if vm.host == m.from {
                self.store
                    .move_owner(m.vm, &m.from, vm.owner_epoch, &m.to)
                    .await
                    .map_err(MigrationError::Store)?;
            }
        }
        self.store
            .update_migration(&m.id, m.phase, phase, error, report)
            .await
            .map_err(MigrationError::Store)?;
        let secs = (chrono::Utc::now() - m.created_at).num_milliseconds() as f64 / 1e3;
        metrics::histogram!("migration_duration_seconds").record(secs);
        if let Some(b) = report.and_then(|r| r["wire_bytes"].as_u64()) {
            metrics::histogram!("migration_checkpoint_size_bytes").record(b as f64);
        }
        if phase == MigrationPhase::Committed {
            metrics::counter!("migrations_completed_total").increment(1);
        } else {
            metrics::counter!("migrations_failed_total").increment(1);
        }
        tracing::info!(migration = %m.id, vm = %m.vm, phase = phase.as_str(), error = error.unwrap_or(""), "migration ended");
        Ok(())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The record of the queue's step `id` (the queue is built from `open`).
fn find<'a>(open: &'a [MigrationRecord], id: &MigrationId) -> &'a MigrationRecord {
    open.iter()
        .find(|m| &m.id == id)
        .expect("the queue only names migrations it was given")
}

/// The options a migration was asked with, checked as the agent will read
/// them.
fn options_of(v: &serde_json::Value) -> Result<serde_json::Value, MigrationError> {
    let v = match v {
        serde_json::Value::Null => serde_json::json!({}),
        other => other.clone(),
    };
    let mut probe = v.clone();
    let obj = probe
        .as_object_mut()
        .ok_or_else(|| MigrationError::Options("must be a JSON object".into()))?;
    if ["to", "id", "reason"].iter().any(|k| obj.contains_key(*k)) {
        return Err(MigrationError::Options(
            "`to`, `id` and `reason` are the control plane's".into(),
        ));
    }
    obj.insert("to".into(), "x".into());
    let req: MigrateRequest =
        serde_json::from_value(probe).map_err(|e| MigrationError::Options(e.to_string()))?;
    req.policy()
        .map_err(|e| MigrationError::Options(e.to_string()))?;
    Ok(v)
}

/// The agent request that starts `m` on its source.
fn start_request(m: &MigrationRecord) -> Result<MigrateRequest, MigrationError> {
    let mut v = options_of(&m.options)?;
    let obj = v.as_object_mut().expect("options are an object");
    obj.insert("to".into(), m.to.as_str().into());
    obj.insert("id".into(), m.id.as_str().into());
    // Its class when its source shares the host's bandwidth.
    obj.insert("reason".into(), m.reason.as_str().into());
    serde_json::from_value(v).map_err(|e| MigrationError::Options(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_as_the_agent_reads_them() {
        assert!(options_of(&serde_json::json!({"mode": "hybrid"})).is_ok());
        assert!(options_of(&serde_json::Value::Null).is_ok());
        assert!(options_of(&serde_json::json!({"mode": "teleport"})).is_err());
        assert!(options_of(&serde_json::json!({"to": "h9"})).is_err());
        assert!(options_of(&serde_json::json!({"reason": "evacuation"})).is_err());
        assert!(options_of(&serde_json::json!([1])).is_err());
        assert!(options_of(&serde_json::json!({"bogus": 1})).is_err());
    }
}
