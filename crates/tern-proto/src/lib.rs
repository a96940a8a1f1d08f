//! Types every tern crate speaks: identifiers as newtypes, the VM record and its
//! lifecycle state machine, and (later) wire messages.
//!
//! Keeping them in one small crate with no I/O means the store, the orchestrator,
//! the API and the migration engine cannot drift apart on what a "VM" is.

pub mod guest;
pub mod host;
pub mod ids;
pub mod join;
pub mod migration;
pub mod quota;
pub mod vm;

pub use guest::{
    GuestKind, GuestSpec, GuestStatus, BUILT_IN_IMAGES, CONTAINER_IMAGE, MAX_DIRTY_MIB_PER_SEC,
};
pub use host::{
    labels_satisfy, Capacity, HostLoad, HostRecord, HostState, Labels, MigrationReason,
    MigrationRecord,
};
pub use ids::{
    ActorId, ExecutorId, HostId, IdError, MigrationId, OwnerEpoch, SenderId, TenantId, VmId,
    VsockCid,
};
pub use join::{
    Heartbeat, HeartbeatResponse, JoinRequest, JoinResponse, JoinToken, PeerView, RunningGuest,
};
pub use migration::{MigrationPhase, MigrationRole};
pub use quota::{Quota, QuotaExceeded, Quotas};
pub use vm::{
    is_image_name, CreateVmRequest, IllegalTransition, VmConfig, VmRecord, VmSpec, VmStatus,
};
