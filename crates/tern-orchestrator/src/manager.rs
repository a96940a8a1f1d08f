use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tern_drivers::{DriverError, StartRequest, VmDriver};
use tern_proto::{HostId, IllegalTransition, TenantId, VmConfig, VmId, VmRecord, VmSpec, VmStatus};
use tern_store::{NewVm, Store, StoreError, VmFilter};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the manager behaves. Defaults match the documented configuration defaults.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// This host's id; recorded as the owner of VMs it starts.
    pub host: HostId,
    /// Warm VMs to keep ready.
    pub warm_pool_size: usize,
    /// Warm VMs idle longer than this are recycled (fresh VMs replace them).
    pub warm_idle_ttl: Duration,
    /// How often the pool is reconciled.
    pub reconcile_interval: Duration,
    /// How often running VMs are health-checked.
    pub health_interval: Duration,
    /// How many health probes run at once.
    pub health_concurrency: usize,
    /// Failed probes in a row that make a VM unhealthy (and replaced).
    pub max_consecutive_failures: u32,
    /// What warm-pool VMs are made of; tenants asking for another spec cold-start.
    pub default_spec: VmSpec,
    /// How many pool VMs boot at once during a reconcile.
    pub start_concurrency: usize,
    /// Image names tenants may ask for (the driver's catalogue).
    pub images: std::collections::BTreeSet<String>,
    /// What each tenant may hold.
    pub quotas: crate::quota::Quotas,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            host: HostId::new("local").expect("valid host id"),
            warm_pool_size: 2,
            warm_idle_ttl: Duration::from_secs(3600),
            reconcile_interval: Duration::from_secs(30),
            health_interval: Duration::from_secs(10),
            health_concurrency: 10,
            max_consecutive_failures: 3,
            default_spec: VmSpec::default(),
            start_concurrency: 4,
            images: [VmSpec::default().image].into(),
            quotas: crate::quota::Quotas::default(),
        }
    }
}

/// Why a manager operation failed. The API maps each kind to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No such VM (or it is destroyed).
    #[error("VM {0} not found")]
    NotFound(VmId),
    /// The VM is not in a status that allows the operation.
    #[error("VM {id} is {status}: cannot {op}")]
    WrongStatus {
        /// The VM.
        id: VmId,
        /// Its status.
        status: VmStatus,
        /// What was asked.
        op: &'static str,
    },
    /// The lifecycle has no such edge, or another actor moved the VM first.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// Another actor changed the VM concurrently.
    #[error("VM {id} changed concurrently (now {actual})")]
    Conflict {
        /// The VM.
        id: VmId,
        /// Its status now.
        actual: VmStatus,
    },
    /// The request itself is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The tenant would exceed its quota.
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaExceeded),
    /// The store failed.
    #[error("store: {0}")]
    Store(StoreError),
    /// Another replica held what this request needed for too long.
    #[error("busy: {0}")]
    Busy(String),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ManagerError::NotFound(id),
            StoreError::Illegal(i) => ManagerError::Illegal(i),
            StoreError::Conflict { id, actual, .. } => ManagerError::Conflict { id, actual },
            other => ManagerError::Store(other),
        }
    }
}

type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// Where a provisioned VM came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvisionSource {
    /// Claimed from the warm pool.
    Warm,
    /// Booted on demand because no suitable warm VM was available.
    Cold,
}

/// What one pool reconcile did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolReport {
    /// Warm VMs started.
    pub started: usize,
    /// Starts that failed.
    pub start_failures: usize,
    /// Idle warm VMs recycled.
    pub recycled: usize,
    /// Stuck `Destroying` records finished.
    pub finished_destroys: usize,
    /// Warm VMs after the pass.
    pub warm: usize,
}

/// What one health pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthReport {
    /// VMs probed.
    pub checked: usize,
    /// Probes that failed.
    pub failures: usize,
    /// VMs that crossed the threshold and were replaced.
    pub replaced: usize,
}

/// What start-up reconciliation found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartupReport {
    /// Running VMs the driver no longer had (marked unhealthy and replaced).
    pub missing_replaced: usize,
    /// Warm or half-created VMs the driver no longer had, or interrupted
    /// creations and provisions, destroyed.
    pub stale_destroyed: usize,
    /// VMs the driver ran without a record, cleaned up.
    pub orphans_cleaned: usize,
    /// Interrupted destroys finished.
    pub finished_destroys: usize,
}

/// The orchestrator. Share it as `Arc<Manager>`.
pub struct Manager {
    store: Arc<dyn Store>,
    driver: Arc<dyn VmDriver>,
    cfg: ManagerConfig,
    /// Held from a tenant's quota check to its new VM's record, so two
    /// creates of this process cannot both pass on the same headroom.
    admission: tokio::sync::Mutex<()>,
    /// This manager's name as a holder of the store's per-tenant admission
    /// lease, which replicas sharing a database take for the same window.
    holder: String,
}

/// How long an admission lease lasts if its holder dies holding it.
const ADMISSION_LEASE: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a create waits for another replica's admission of its tenant.
const ADMISSION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Manager {
    /// A manager over a store and a driver.
    pub fn new(store: Arc<dyn Store>, driver: Arc<dyn VmDriver>, cfg: ManagerConfig) -> Self {
        Self {
            store,
            driver,
            cfg,
            admission: tokio::sync::Mutex::new(()),
            holder: format!("manager-{}", VmId::new()),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// The store it writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The driver it runs VMs with.
    pub fn driver(&self) -> &Arc<dyn VmDriver> {
        &self.driver
    }

    /// Gives `tenant` a running VM: the oldest warm one if the spec matches the
    /// pool's, else (or when the pool is empty) a cold start. Returns once the VM
    /// is running with `config` injected.
    pub async fn provision(
        &self,
        tenant: &TenantId,
        spec: Option<VmSpec>,
        config: VmConfig,
    ) -> Result<(VmRecord, ProvisionSource)> {
        config.validate().map_err(ManagerError::Invalid)?;
        let spec = spec.unwrap_or_else(|| self.cfg.default_spec.clone());
        spec.validate().map_err(ManagerError::Invalid)?;
        if !self.cfg.images.contains(&spec.image) {
            let offered: Vec<&str> = self.cfg.images.iter().map(String::as_str).collect();
            return Err(ManagerError::Invalid(format!(
                "spec.image: unknown image `{}` (this host offers: {})",
                spec.image,
                offered.join(", ")
            )));
        }

        if spec == self.cfg.default_spec {
            // A claimed VM that cannot take its config is destroyed and the next tried.
            for _ in 0..3 {
                let claimed = self
                    .admitted(tenant, &spec, || async {
                        Ok(self.store.claim_warm(tenant, &config).await?)
                    })
                    .await?;
                let Some(claimed) = claimed else {
                    break;
                };
                match self.finish_provision(&claimed, &config).await {
                    Ok(rec) => {
                        metrics::counter!("tern_provisions_total", "source" => "warm").increment(1);
                        return Ok((rec, ProvisionSource::Warm));
                    }
                    Err(e) => {
                        tracing::warn!(vm = %claimed.id, error = %e, "claimed warm VM failed provisioning; destroying it");
                        self.destroy_quietly(claimed.id).await;
                    }
                }
            }
        }

        let rec = self
            .admitted(tenant, &spec, || async {
                let id = VmId::new();
                let host = self.host_for(id, &spec).await?;
                Ok(self
                    .store
                    .insert_vm(NewVm {
                        id,
                        tenant: Some(tenant.clone()),
                        status: VmStatus::Provisioning,
                        host,
                        spec: spec.clone(),
                        config: config.clone(),
                    })
                    .await?)
            })
            .await?;
        self.boot(&rec).await?;
        match self.finish_provision(&rec, &config).await {
            Ok(rec) => {
                metrics::counter!("tern_provisions_total", "source" => "cold").increment(1);
                Ok((rec, ProvisionSource::Cold))
            }
            Err(e) => {
                self.destroy_quietly(rec.id).await;
                Err(e)
            }
        }
    }

    /// Checks `tenant`'s quota for one more VM of `spec` and, if it fits,
    /// runs `record` (which gives that VM its record) before any other
    /// create of the tenant is checked: in this process (a mutex) and in
    /// every replica sharing the store (the store's lease `quota:<tenant>`).
    async fn admitted<T, F, Fut>(&self, tenant: &TenantId, spec: &VmSpec, record: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let _local = self.admission.lock().await;
        let lease = format!("quota:{tenant}");
        self.take_lease(&lease).await?;
        let out = async {
            let live = self.list(Some(tenant)).await?;
            if let Err(e) = self.cfg.quotas.admit(tenant, &live, spec) {
                tracing::warn!(tenant = %tenant, error = %e, "create refused: quota");
                return Err(e.into());
            }
            record().await
        }
        .await;
        if let Err(e) = self.store.release_lease(&lease, &self.holder).await {
            // It runs out by itself within ADMISSION_LEASE.
            tracing::warn!(lease, error = %e, "could not release an admission lease");
        }
        out
    }

    /// Takes the store lease `name`, waiting up to [`ADMISSION_WAIT`] for
    /// another replica to give it up.
    async fn take_lease(&self, name: &str) -> Result<()> {
        let until = tokio::time::Instant::now() + ADMISSION_WAIT;
        while !self
            .store
            .try_lease(name, &self.holder, ADMISSION_LEASE)
            .await?
        {
            if tokio::time::Instant::now() >= until {
                return Err(ManagerError::Busy(format!(
                    "another replica holds {name}; try again"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Where a new VM runs: the driver's choice (a fleet of hosts), or this
    /// control plane's own host.
    async fn host_for(&self, id: VmId, spec: &VmSpec) -> Result<HostId> {
        Ok(self
            .driver
            .place(id, spec)
            .await?
            .unwrap_or_else(|| self.cfg.host.clone()))
    }

    /// Starts a freshly recorded VM in the driver; if the driver fails, the
    /// record is destroyed so nothing half-made is left behind.
    async fn boot(&self, rec: &VmRecord) -> Result<()> {
        let started = self
            .driver
            .start(&StartRequest {
                id: rec.id,
                spec: rec.spec.clone(),
                vsock_cid: rec.vsock_cid,
                host: rec.host.clone(),
                epoch: rec.owner_epoch,
            })
            .await;
        if let Err(e) = started {
            metrics::counter!("tern_vm_start_failures_total").increment(1);
            self.destroy_quietly(rec.id).await;
            return Err(e.into());
        }
        Ok(())
    }

    async fn finish_provision(&self, rec: &VmRecord, config: &VmConfig) -> Result<VmRecord> {
        self.driver.configure(rec.id, config).await?;
        Ok(self
            .store
            .transition(rec.id, VmStatus::Provisioning, VmStatus::Running)
            .await?)
    }

    /// A VM that still exists.
    pub async fn get(&self, id: VmId) -> Result<VmRecord> {
        match self.store.get_vm(id).await? {
            Some(r) if r.status.is_live() => Ok(r),
            _ => Err(ManagerError::NotFound(id)),
        }
    }

    /// Live VMs, of one tenant or all.
    pub async fn list(&self, tenant: Option<&TenantId>) -> Result<Vec<VmRecord>> {
        let mut filter = VmFilter::live();
        filter.tenant = tenant.cloned();
        Ok(self.store.list_vms(&filter).await?)
    }

    /// Replaces a running VM's configuration (injected into the guest first, then recorded).
    pub async fn configure(&self, id: VmId, config: VmConfig) -> Result<VmRecord> {
        config.validate().map_err(ManagerError::Invalid)?;
        let rec = self.get(id).await?;
        if rec.status != VmStatus::Running {
            return Err(ManagerError::WrongStatus {
                id,
                status: rec.status,
                op: "configure",
            });
        }
        self.driver.configure(id, &config).await?;
        Ok(self.store.set_config(id, &config).await?)
    }

    /// Destroys a VM: marks it `Destroying`, stops and cleans it up in the driver,
    /// then marks it `Destroyed`. If the driver fails, the record stays
    /// `Destroying` and the pool reconciler finishes the job later.
    pub async fn destroy(&self, id: VmId) -> Result<()> {
        let rec = self.get(id).await?;
        if rec.status != VmStatus::Destroying {
            self.store
                .transition(id, rec.status, VmStatus::Destroying)
                .await?;
        }
        self.finish_destroy(id).await
    }

    async fn finish_destroy(&self, id: VmId) -> Result<()> {
        if let Err(e) = self.driver.stop(id).await {
            tracing::warn!(vm = %id, error = %e, "stop failed; cleaning up anyway");
        }
        self.driver.cleanup(id).await.inspect_err(|e| {
            tracing::warn!(vm = %id, error = %e, "cleanup failed; the VM stays destroying");
        })?;
        match self
            .store
            .transition(id, VmStatus::Destroying, VmStatus::Destroyed)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else finished it first: the outcome is the one we wanted.
            Err(StoreError::Conflict {
                actual: VmStatus::Destroyed,
                ..
            }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Destroys a VM on an error path, logging (not returning) what goes wrong.
    async fn destroy_quietly(&self, id: VmId) {
        if let Err(e) = self.destroy(id).await {
            tracing::warn!(vm = %id, error = %e, "destroy failed; the reconciler will retry");
        }
    }

    /// One pass of the warm-pool reconciler: finish interrupted destroys, recycle
    /// warm VMs idle past the TTL, then boot VMs until the pool is full.
    pub async fn reconcile_pool(&self) -> Result<PoolReport> {
        let mut report = PoolReport::default();
        for rec in self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Destroying]))
            .await?
        {
            match self.finish_destroy(rec.id).await {
                Ok(()) => report.finished_destroys += 1,
                Err(e) => tracing::warn!(vm = %rec.id, error = %e, "cannot finish destroy"),
            }
        }

        let now = chrono::Utc::now();
        let ttl =
            chrono::Duration::from_std(self.cfg.warm_idle_ttl).unwrap_or(chrono::Duration::MAX);
        let warm = self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
            .await?;
        for rec in &warm {
            if now - rec.status_changed_at > ttl {
                // A claim may win the race for this VM; then it is no longer ours to recycle.
                match self
                    .store
                    .transition(rec.id, VmStatus::Warm, VmStatus::Destroying)
                    .await
                {
                    Ok(_) => {
                        if let Err(e) = self.finish_destroy(rec.id).await {
                            tracing::warn!(vm = %rec.id, error = %e, "recycle destroy failed");
                        }
                        report.recycled += 1;
                        metrics::counter!("tern_warm_recycled_total").increment(1);
                    }
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }

        let ready_or_booting = self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Warm, VmStatus::Creating]))
            .await?
            .len();
        let missing = self.cfg.warm_pool_size.saturating_sub(ready_or_booting);
        let results: Vec<Result<()>> = futures::stream::iter(0..missing)
            .map(|_| self.start_warm())
            .buffer_unordered(self.cfg.start_concurrency.max(1))
            .collect()
            .await;
        for r in results {
            match r {
                Ok(()) => report.started += 1,
                Err(e) => {
                    report.start_failures += 1;
                    tracing::warn!(error = %e, "warm VM failed to start");
                }
            }
        }
        report.warm = self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
            .await?
            .len();
        Ok(report)
    }

    async fn start_warm(&self) -> Result<()> {
        let id = VmId::new();
        let host = self.host_for(id, &self.cfg.default_spec).await?;
        let rec = self
            .store
            .insert_vm(NewVm {
                id,
                tenant: None,
                status: VmStatus::Creating,
                host,
                spec: self.cfg.default_spec.clone(),
                config: VmConfig::default(),
            })
            .await?;
        self.boot(&rec).await?;
        match self
            .store
            .transition(rec.id, VmStatus::Creating, VmStatus::Warm)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.destroy_quietly(rec.id).await;
                Err(e.into())
            }
        }
    }

    /// One pass of the health loop: probe every running VM (at most
    /// `health_concurrency` at once), and replace those that reach the failure
    /// threshold. Also retries replacements that failed earlier.
    pub async fn health_pass(&self) -> Result<HealthReport> {
        let running = self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Running]))
            .await?;
        let outcomes: Vec<(bool, bool)> = futures::stream::iter(running)
            .map(|rec| self.check_one(rec))
            .buffer_unordered(self.cfg.health_concurrency.max(1))
            .collect()
            .await;
        let mut report = HealthReport {
            checked: outcomes.len(),
            ..Default::default()
        };
        for (failed, replaced) in outcomes {
            report.failures += usize::from(failed);
            report.replaced += usize::from(replaced);
        }
        // Unhealthy VMs whose replacement failed before (or was interrupted).
        for rec in self
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Unhealthy]))
            .await?
        {
            if self.replace(&rec).await.is_ok() {
                report.replaced += 1;
            }
        }
        Ok(report)
    }

    /// Probes one VM; returns (probe failed, VM replaced).
    async fn check_one(&self, rec: VmRecord) -> (bool, bool) {
        let healthy = match self.driver.is_healthy(rec.id).await {
            Ok(h) => h,
            Err(DriverError::HostAway(host)) => {
                // Not the VM's failure: its host is away, and the fleet
                // restarts its VMs elsewhere once the host is declared down.
                tracing::debug!(vm = %rec.id, host = %host, "health unknown: host away");
                return (false, false);
            }
            Err(e) => {
                tracing::debug!(vm = %rec.id, error = %e, "health probe failed");
                false
            }
        };
        if !healthy {
            metrics::counter!("tern_health_failures_total").increment(1);
        }
        let updated = match self.store.record_health(rec.id, healthy).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(vm = %rec.id, error = %e, "cannot record health");
                return (!healthy, false);
            }
        };
        if healthy || updated.consecutive_failures < self.cfg.max_consecutive_failures {
            return (!healthy, false);
        }
        tracing::warn!(vm = %rec.id, failures = updated.consecutive_failures, "VM unhealthy; replacing it");
        match self
            .store
            .transition(rec.id, VmStatus::Running, VmStatus::Unhealthy)
            .await
        {
            Ok(unhealthy) => (true, self.replace(&unhealthy).await.is_ok()),
            // Deleted or moved meanwhile: nothing to replace.
            Err(_) => (true, false),
        }
    }

    /// Provisions a replacement for an unhealthy VM (same tenant, spec and
    /// config), then destroys the old one.
    async fn replace(&self, old: &VmRecord) -> Result<VmRecord> {
        let Some(tenant) = old.tenant.clone() else {
            self.destroy(old.id).await?;
            return Err(ManagerError::Invalid("unhealthy VM had no tenant".into()));
        };
        let spec = (old.spec != self.cfg.default_spec).then(|| old.spec.clone());
        let (new, _) = self
            .provision(&tenant, spec, old.config.clone())
            .await
            .inspect_err(|e| {
                tracing::warn!(vm = %old.id, error = %e, "replacement failed; will retry next pass");
            })?;
        metrics::counter!("tern_replacements_total").increment(1);
        tracing::info!(old = %old.id, new = %new.id, tenant = %tenant, "replaced unhealthy VM");
        self.destroy_quietly(old.id).await;
        Ok(new)
    }

    /// Reconciles the store with the driver after a (re)start: VMs the store
    /// thinks run but the driver lost are replaced, interrupted operations are
    /// finished or undone, and VMs the driver runs without a record are removed.
    pub async fn reconcile_startup(&self) -> Result<StartupReport> {
        let mut report = StartupReport::default();
        let present: std::collections::HashSet<VmId> =
            self.driver.list().await?.into_iter().collect();
        let live = self.store.list_vms(&VmFilter::live()).await?;
        let known: std::collections::HashSet<VmId> = live.iter().map(|r| r.id).collect();

        for rec in live {
            let here = present.contains(&rec.id);
            match rec.status {
                VmStatus::Running if here => {}
                VmStatus::Running => {
                    tracing::warn!(vm = %rec.id, "running VM is missing from the driver; replacing it");
                    if let Ok(unhealthy) = self
                        .store
                        .transition(rec.id, VmStatus::Running, VmStatus::Unhealthy)
                        .await
                    {
                        if self.replace(&unhealthy).await.is_ok() {
                            report.missing_replaced += 1;
                        }
                    }
                }
                VmStatus::Unhealthy => {
                    if self.replace(&rec).await.is_ok() {
                        report.missing_replaced += 1;
                    }
                }
                VmStatus::Warm if here => {}
                // Lost warm VMs, and boots or provisions cut short by the restart
                // (nobody got an answer for those): undo them.
                VmStatus::Warm | VmStatus::Creating | VmStatus::Provisioning => {
                    self.destroy_quietly(rec.id).await;
                    report.stale_destroyed += 1;
                }
                VmStatus::Destroying => {
                    if self.finish_destroy(rec.id).await.is_ok() {
                        report.finished_destroys += 1;
                    }
                }
                VmStatus::Destroyed => {}
            }
        }
        for orphan in present.difference(&known) {
            tracing::warn!(vm = %orphan, "driver runs a VM the store does not know; cleaning it up");
            let _ = self.driver.stop(*orphan).await;
            if self.driver.cleanup(*orphan).await.is_ok() {
                report.orphans_cleaned += 1;
            }
        }
        Ok(report)
    }

    /// Runs the pool reconciler and the health loop until `shutdown` turns true.
    /// Shutting down stops the loops only; running VMs are left alone.
    pub fn spawn_loops(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let pool = every(self.cfg.reconcile_interval, false, shutdown.clone(), {
            let m = self.clone();
            move || {
                let m = m.clone();
                async move {
                    match m.reconcile_pool().await {
                        Ok(r) => tracing::debug!(?r, "pool reconciled"),
                        Err(e) => tracing::warn!(error = %e, "pool reconcile failed"),
                    }
                }
            }
        });
        // The first health pass waits one interval: the VMs have just booted.
        let health = every(self.cfg.health_interval, true, shutdown, {
            let m = self.clone();
            move || {
                let m = m.clone();
                async move {
                    match m.health_pass().await {
                        Ok(r) => tracing::debug!(?r, "health pass"),
                        Err(e) => tracing::warn!(error = %e, "health pass failed"),
                    }
                }
            }
        });
        vec![pool, health]
    }
}

/// Runs `pass` every `period` (a slow pass delays the next tick rather than
/// bunching them up) until `stop` turns true or its sender goes away.
fn every<F, Fut>(
    period: Duration,
    skip_first: bool,
    mut stop: watch::Receiver<bool>,
    pass: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if skip_first {
            tick.tick().await;
        }
        loop {
            tokio::select! {
                _ = tick.tick() => pass().await,
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
        }
    })
}
