//! Durable VM records behind one trait, [`Store`], with two real back ends:
//! SQLite (embedded, the default: one file under the data dir) and PostgreSQL
//! (a fleet's shared control plane, several replicas at once).
//!
//! Every status change is a compare-and-swap on the old status, checked
//! against the lifecycle in [`tern_proto::VmStatus`], so the store itself refuses
//! illegal transitions and lost updates whoever the caller is. Schema changes
//! are versioned migrations applied at open (see [`schema`]).

mod backend;
pub mod fleet;
mod row;
pub mod schema;
pub mod testing;

use async_trait::async_trait;
use std::sync::Arc;
use tern_proto::{
    HostId, HostState, IllegalTransition, MigrationId, MigrationPhase, OwnerEpoch, TenantId,
    VmConfig, VmId, VmRecord, VmSpec, VmStatus,
};

pub use backend::{PostgresStore, SqliteStore};
pub use fleet::FleetStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No record with this id.
    #[error("VM {0} not found")]
    NotFound(VmId),
    /// The VM was not in the status the caller expected (someone else moved it).
    #[error("VM {id} is {actual}, expected {expected}")]
    Conflict {
        /// The VM.
        id: VmId,
        /// Status the caller assumed.
        expected: VmStatus,
        /// Status it has.
        actual: VmStatus,
    },
    /// The lifecycle has no such edge.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// A record may only be created in an initial status.
    #[error("a VM cannot be created in status {0}")]
    NotInitial(VmStatus),
    /// No free vsock CID could be taken (after retries on collisions).
    #[error("could not allocate a vsock CID after {0} attempts")]
    CidExhausted(u32),
    /// A stored row does not decode (hand-edited or from a newer tern).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database schema is newer than this binary knows.
    #[error("database schema is at version {found}, this tern knows up to {known}: upgrade tern")]
    SchemaTooNew {
        /// Version in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// The store URL is not one we can open.
    #[error("bad store URL `{0}`: use sqlite://PATH or postgres://USER@HOST/DB")]
    BadUrl(String),
    /// No such host.
    #[error("host {0} not found")]
    HostNotFound(HostId),
    /// The host was not in the state the caller expected.
    #[error("host {id} is {}, expected {}", .actual.as_str(), .expected.as_str())]
    HostConflict {
        /// The host.
        id: HostId,
        /// State the caller assumed.
        expected: HostState,
        /// State it has.
        actual: HostState,
    },
    /// No such migration.
    #[error("migration {0} not found")]
    MigrationNotFound(MigrationId),
    /// A migration with this id exists.
    #[error("migration {0} exists")]
    MigrationExists(MigrationId),
    /// The VM already has a migration that has not ended.
    #[error("VM {0} is already migrating")]
    VmMigrating(VmId),
    /// The migration was not in the phase the caller expected.
    #[error("migration {id} is {}, expected {}", .actual.as_str(), .expected.as_str())]
    MigrationConflict {
        /// The migration.
        id: MigrationId,
        /// Phase the caller assumed.
        expected: MigrationPhase,
        /// Phase it has.
        actual: MigrationPhase,
    },
    /// The VM's owner is not who the caller thought (it moved, or the
    /// caller's copy is stale and must stop).
    #[error("VM {vm} is owned by {} at epoch {}, not {} at epoch {}", .actual.0, .actual.1, .expected.0, .expected.1)]
    OwnerConflict {
        /// The VM.
        vm: VmId,
        /// Owner the caller assumed.
        expected: (HostId, OwnerEpoch),
        /// Owner it has.
        actual: (HostId, OwnerEpoch),
    },
    /// The database said no.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Result alias for store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A record to create.
#[derive(Clone, Debug)]
pub struct NewVm {
    /// Identity, chosen by the caller so the driver and store agree on it.
    pub id: VmId,
    /// Tenant (None for warm-pool VMs).
    pub tenant: Option<TenantId>,
    /// Initial status: `Creating` or `Provisioning`.
    pub status: VmStatus,
    /// Owning host.
    pub host: HostId,
    /// What to boot.
    pub spec: VmSpec,
    /// Tenant configuration.
    pub config: VmConfig,
}

/// Which records to list.
#[derive(Clone, Debug, Default)]
pub struct VmFilter {
    /// Only this tenant's VMs.
    pub tenant: Option<TenantId>,
    /// Only these statuses (empty: every status).
    pub statuses: Vec<VmStatus>,
}

impl VmFilter {
    /// VMs in any of `statuses`.
    pub fn statuses(statuses: &[VmStatus]) -> Self {
        Self {
            tenant: None,
            statuses: statuses.to_vec(),
        }
    }

    /// Every VM that still exists.
    pub fn live() -> Self {
        Self::statuses(
            &VmStatus::ALL
                .into_iter()
                .filter(|s| s.is_live())
                .collect::<Vec<_>>(),
        )
    }
}

/// The control plane's memory. Implementations must be safe to share between
/// tasks and, for PostgreSQL, between processes.
#[async_trait]
pub trait Store: FleetStore + Send + Sync + 'static {
    /// `sqlite` or `postgres`, for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Creates a record in an initial status and allocates its vsock CID (the
    /// lowest free one from 3; retried when another writer takes it first).
    async fn insert_vm(&self, new: NewVm) -> Result<VmRecord>;

    /// One record, destroyed ones included.
    async fn get_vm(&self, id: VmId) -> Result<Option<VmRecord>>;

    /// Records matching `filter`, oldest first.
    async fn list_vms(&self, filter: &VmFilter) -> Result<Vec<VmRecord>>;

    /// Moves a VM `from -> to` if it is still `from` and the lifecycle allows it.
    /// Entering `Destroyed` releases the vsock CID.
    async fn transition(&self, id: VmId, from: VmStatus, to: VmStatus) -> Result<VmRecord>;

    /// Atomically takes the oldest warm VM for `tenant` (status becomes
    /// `Provisioning`, tenant and config set). `None` when the pool is empty.
    /// No two callers ever get the same VM.
    async fn claim_warm(&self, tenant: &TenantId, config: &VmConfig) -> Result<Option<VmRecord>>;

    /// Replaces a VM's configuration.
    async fn set_config(&self, id: VmId, config: &VmConfig) -> Result<VmRecord>;

    /// Records one health probe: a healthy one resets the failure count, an
    /// unhealthy one adds to it. Returns the updated record.
    async fn record_health(&self, id: VmId, healthy: bool) -> Result<VmRecord>;

    /// Number of records per status.
    async fn count_by_status(&self) -> Result<Vec<(VmStatus, u64)>>;
}

/// Opens a store from a URL (`sqlite://PATH`, `sqlite::memory:`, `postgres://...`)
/// and brings its schema up to date.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::open(url).await?))
    } else {
        Err(StoreError::BadUrl(url.to_owned()))
    }
}
