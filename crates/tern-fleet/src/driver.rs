//! The `agents` driver: VMs run on the hosts that joined the control plane.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, ClientError};
use tern_drivers::{DriverError, StartRequest, VmDriver, VmHandle};
use tern_proto::{GuestStatus, HostId, HostState, VmConfig, VmId, VmSpec};
use tern_scheduler::{Demand, Fleet, Host, Vm};
use tern_store::{Store, VmFilter};

/// How long a placement counts against its host before its VM shows up in
/// the store (the manager records a VM right after placing it).
const PENDING_TTL: Duration = Duration::from_secs(120);

/// Runs VMs on the fleet's hosts through their agents.
pub struct AgentsDriver {
    store: Arc<dyn Store>,
    /// Placements made but not yet recorded: two VMs placed at once must
    /// not both take a host's last room.
    pending: Mutex<HashMap<VmId, (HostId, Demand, Instant)>>,
}

pub(crate) fn demand(spec: &VmSpec) -> Demand {
    Demand {
        memory_mib: u64::from(spec.memory_mib),
        vcpus: u32::from(spec.vcpus),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_err(e: tern_store::StoreError) -> DriverError {
    DriverError::Unavailable(format!("store: {e}"))
}

/// An agent's answer as a driver error about `id`.
fn agent_err(id: VmId, op: &'static str, e: ClientError) -> DriverError {
    match e {
        ClientError::Api { status: 404, .. } => DriverError::NotFound(id),
        ClientError::Unreachable { .. } => DriverError::Unavailable(e.to_string()),
        other => DriverError::OperationFailed {
            id,
            op,
            reason: other.to_string(),
        },
    }
}

impl AgentsDriver {
    /// A driver over the hosts and VMs of `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            pending: Mutex::default(),
        }
    }

    /// The fleet as the store has it, with placements not yet recorded;
    /// every migration that has not ended reserves its target's room.
    pub(crate) async fn model(&self) -> Result<Fleet, DriverError> {
        self.model_reserving(true).await
    }

    /// The fleet with only the migrations under way (past `requesting`)
    /// reserving room: what the migration queue admits requests against.
    pub(crate) async fn model_under_way(&self) -> Result<Fleet, DriverError> {
        self.model_reserving(false).await
    }

    async fn model_reserving(&self, requested: bool) -> Result<Fleet, DriverError> {
        let hosts = self.store.list_hosts().await.map_err(store_err)?;
        let live = self
            .store
            .list_vms(&VmFilter::live())
            .await
            .map_err(store_err)?;
        let mut vms: Vec<Vm> = live
            .iter()
            .map(|r| Vm {
                id: r.id,
                host: r.host.clone(),
                demand: demand(&r.spec),
                requires: r.spec.labels.clone(),
                migrating: false,
                last_moved: None,
            })
            .collect();
        {
            let mut pending = lock(&self.pending);
            pending.retain(|id, (_, _, at)| {
                at.elapsed() < PENDING_TTL && !live.iter().any(|r| r.id == *id)
            });
            vms.extend(pending.iter().map(|(id, (host, d, _))| Vm {
                id: *id,
                host: host.clone(),
                demand: *d,
                requires: Default::default(),
                migrating: false,
                last_moved: None,
            }));
        }
        let hosts = hosts
            .into_iter()
            .map(|h| Host {
                id: h.id,
                state: h.state,
                labels: h.labels,
                capacity: h.capacity,
                load: h.load,
            })
            .collect();
        // When each VM last moved (for the rebalancing cooldown).
        let migrations = self.store.list_migrations(false).await.map_err(store_err)?;
        let mut moved: HashMap<VmId, u64> = HashMap::new();
        for m in migrations.iter().filter(|m| m.phase.is_final()) {
            let at = u64::try_from(m.updated_at.timestamp()).unwrap_or(0);
            let e = moved.entry(m.vm).or_default();
            *e = (*e).max(at);
        }
        for v in &mut vms {
            v.last_moved = moved.get(&v.id).copied();
        }
        let mut fleet = Fleet::new(hosts, vms);
        // Migrations in flight reserve their target's room and mark their VM.
        let reserves = |m: &&tern_proto::MigrationRecord| {
            !m.phase.is_final() && (requested || m.phase != tern_proto::MigrationPhase::Requesting)
        };
        for m in migrations.iter().filter(reserves) {
            if let Err(e) = fleet.start_migration(&m.vm, &m.to) {
                tracing::debug!(migration = %m.id, error = %e, "a migration in flight reserves nothing");
            }
        }
        Ok(fleet)
    }

    /// A client of `host`'s agent.
    pub(crate) async fn client(&self, host: &HostId) -> Result<AgentClient, DriverError> {
        let rec = self
            .store
            .get_host(host)
            .await
            .map_err(store_err)?
            .ok_or_else(|| DriverError::Unavailable(format!("host {host} never joined")))?;
        let token = self
            .store
            .host_api_token(host)
            .await
            .map_err(store_err)?
            .unwrap_or_default();
        Ok(AgentClient::new(&rec.api_url, &token))
    }

    /// The store's record of `id`.
    async fn record(&self, id: VmId) -> Result<tern_proto::VmRecord, DriverError> {
        self.store
            .get_vm(id)
            .await
            .map_err(store_err)?
            .ok_or(DriverError::NotFound(id))
    }

    /// The agent of the host that owns `id`.
    async fn owner(&self, id: VmId) -> Result<AgentClient, DriverError> {
        let rec = self.record(id).await?;
        self.client(&rec.host).await
    }
}

#[async_trait]
impl VmDriver for AgentsDriver {
    fn name(&self) -> &'static str {
        "agents"
    }

    async fn place(&self, id: VmId, spec: &VmSpec) -> Result<Option<HostId>, DriverError> {
        let fleet = self.model().await?;
        let d = demand(spec);
        let host = fleet
            .place(d, &spec.labels)
            .map_err(|e| DriverError::Unavailable(format!("no host can take it: {e}")))?;
        lock(&self.pending).insert(id, (host.clone(), d, Instant::now()));
        tracing::info!(vm = %id, host = %host, "placed");
        Ok(Some(host))
    }

    async fn start(&self, req: &StartRequest) -> Result<VmHandle, DriverError> {
        let client = self.client(&req.host).await?;
        let started = client
            .put_vm(&req.id, req.epoch.0, &req.spec.guest_spec())
            .await;
        lock(&self.pending).remove(&req.id);
        let view = started.map_err(|e| DriverError::StartFailed {
            id: req.id,
            reason: format!("host {}: {e}", req.host),
        })?;
        Ok(VmHandle {
            id: req.id,
            driver: "agents".into(),
            detail: format!("host {} (epoch {})", req.host, view.epoch),
        })
    }

    async fn configure(&self, id: VmId, config: &VmConfig) -> Result<(), DriverError> {
        let value = serde_json::to_value(config).map_err(|e| DriverError::OperationFailed {
            id,
            op: "configure",
            reason: e.to_string(),
        })?;
        self.owner(id)
            .await?
            .set_config(&id, &value)
            .await
            .map_err(|e| agent_err(id, "configure", e))
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        match self.owner(id).await?.stop_vm(&id).await {
            // Gone already, or no longer running there: stopped either way.
            Ok(()) | Err(ClientError::Api { status: 404, .. }) => Ok(()),
            Err(ClientError::Api { status: 409, .. }) => Ok(()),
            Err(e) => Err(agent_err(id, "stop", e)),
        }
    }

    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError> {
        let rec = self.record(id).await?;
        let host = self.store.get_host(&rec.host).await.map_err(store_err)?;
        if host.as_ref().is_none_or(|h| h.state == HostState::Down) {
            // Not this VM's failure: the fleet restarts it elsewhere.
            return Err(DriverError::HostAway(rec.host));
        }
        let client = self.client(&rec.host).await?;
        match client.vm(&id).await {
            Ok(v) => Ok(v.status == GuestStatus::Running && v.checksum_ok != Some(false)),
            Err(ClientError::Unreachable { .. }) => Err(DriverError::HostAway(rec.host)),
            Err(e) => Err(agent_err(id, "health check", e)),
        }
    }

    async fn cleanup(&self, _id: VmId) -> Result<(), DriverError> {
        // A stopped guest's directory stays on its host with its journal
        // (what fences a stale copy after a crash); nothing to remove here.
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmId>, DriverError> {
        let mut out = Vec::new();
        for h in self.store.list_hosts().await.map_err(store_err)? {
            if h.state == HostState::Down {
                continue;
            }
            let client = self.client(&h.id).await?;
            match client.vms().await {
                Ok(vms) => out.extend(
                    vms.iter()
                        .filter(|v| {
                            matches!(
                                v.status,
                                GuestStatus::Running
                                    | GuestStatus::Starting
                                    | GuestStatus::Stalled
                                    | GuestStatus::Fenced
                                    | GuestStatus::Migrating
                            )
                        })
                        .map(|v| v.id),
                ),
                Err(e) => tracing::warn!(host = %h.id, error = %e, "cannot list a host's VMs"),
            }
        }
        Ok(out)
    }
}
