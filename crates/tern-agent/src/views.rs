//! What the host API takes and returns (shared by the server and the client).

use serde::{Deserialize, Serialize};
use tern_migrate::{MigrationPhase, Progress, Report};
use tern_proto::{GuestSpec, GuestStatus, HostId, MigrationId, MigrationRole, VmId};

/// One VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    /// Its id (the same on every host it moves to).
    pub id: VmId,
    /// Its status here.
    pub status: GuestStatus,
    /// Owner epoch: +1 at every committed migration.
    pub epoch: u64,
    /// What it is.
    pub spec: GuestSpec,
    /// The guest's progress counter (when running here).
    pub counter: Option<u64>,
    /// Whether its last working-set checksum is right (when it made one).
    pub checksum_ok: Option<bool>,
    /// The host it moved to.
    pub moved_to: Option<HostId>,
    /// More about the status.
    pub detail: Option<String>,
}

/// One migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationView {
    /// Its id.
    pub id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// This host's end.
    pub role: MigrationRole,
    /// The other host.
    pub peer: HostId,
    /// How it stands (the same phases on both ends; `is_final` once ended).
    pub state: MigrationPhase,
    /// The latest progress.
    pub progress: Progress,
    /// The final report (source, once ended).
    pub report: Option<Report>,
    /// Why it failed.
    pub error: Option<String>,
    /// Source, while it runs under a host cap: its share of the host's
    /// migration bandwidth now, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_share_bytes_per_sec: Option<u64>,
}
