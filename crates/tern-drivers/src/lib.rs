//! How the orchestrator runs VMs: the [`VmDriver`] trait and its implementations.
//!
//! A driver knows how to start, stop, health-check and clean up a VM on this host.
//! It knows nothing of tenants, pools or the store: the orchestrator owns those.
//! Implementations: [`mock::MockDriver`] (in-memory, with fault injection for
//! rehearsing failure handling), [`kvm::KvmDriver`] (one `tern-vmm` monitor
//! process per VM), [`qemu::QemuDriver`] (one QEMU process per Linux VM,
//! driven over QMP) and [`docker::DockerDriver`] (one container of the local
//! Docker Engine per VM).

pub mod checkpoint;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod docker;
pub mod images;
pub mod kvm;
pub mod kvmjail;
pub mod mock;
pub mod qemu;
pub mod runc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tern_proto::{HostId, OwnerEpoch, VmConfig, VmId, VmSpec, VsockCid};

/// What a driver needs to start one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Identity the control plane gave the VM; the driver keys everything by it.
    pub id: VmId,
    /// What to boot.
    pub spec: VmSpec,
    /// The vsock CID allocated for the guest.
    pub vsock_cid: Option<VsockCid>,
    /// The host the control plane recorded as its owner (what
    /// [`VmDriver::place`] chose, or the control plane's own host).
    pub host: HostId,
    /// Its owner epoch there.
    pub epoch: OwnerEpoch,
}

/// A started VM as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    /// The VM's id.
    pub id: VmId,
    /// Which driver runs it.
    pub driver: String,
    /// Driver-specific detail for operators (process id, socket path, accelerator).
    pub detail: String,
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver has no VM with this id (never started, or gone).
    #[error("VM {0} is not known to the driver")]
    NotFound(VmId),
    /// The VM could not be started.
    #[error("VM {id} failed to start: {reason}")]
    StartFailed {
        /// The VM.
        id: VmId,
        /// What went wrong, for the operator.
        reason: String,
    },
    /// The host the VM runs on does not answer: its health is unknown, not
    /// bad (the fleet declares the host down and moves its VMs instead).
    #[error("the host {0} of this VM does not answer")]
    HostAway(tern_proto::HostId),
    /// The driver as a whole cannot work (hypervisor missing, state unreadable).
    #[error("driver unavailable: {0}")]
    Unavailable(String),
    /// An operation on a running VM failed.
    #[error("VM {id}: {op} failed: {reason}")]
    OperationFailed {
        /// The VM.
        id: VmId,
        /// The operation (stop, configure, ...).
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Runs VMs on one host. All methods are idempotent where that makes sense:
/// stopping or cleaning up a VM that is already gone succeeds.
#[async_trait]
pub trait VmDriver: Send + Sync + 'static {
    /// Short name shown to operators (`mock`, `kvm`, `qemu`).
    fn name(&self) -> &'static str;

    /// Chooses the host a new VM of `spec` runs on, or `None` when this
    /// driver runs every VM on the control plane's own host. Called before
    /// the VM is recorded; the choice comes back in [`StartRequest::host`].
    async fn place(&self, id: VmId, spec: &VmSpec) -> Result<Option<HostId>, DriverError>;

    /// Boots a VM; returns once it is ready to be configured.
    async fn start(&self, req: &StartRequest) -> Result<VmHandle, DriverError>;

    /// Hands tenant configuration to a running VM.
    async fn configure(&self, id: VmId, config: &VmConfig) -> Result<(), DriverError>;

    /// Stops a VM (it may still hold resources until [`VmDriver::cleanup`]).
    async fn stop(&self, id: VmId) -> Result<(), DriverError>;

    /// One health probe. `Ok(false)` is an unhealthy VM; `Err(NotFound)` a vanished one.
    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError>;

    /// Releases everything the VM held (files, sockets, processes). Idempotent.
    async fn cleanup(&self, id: VmId) -> Result<(), DriverError>;

    /// The VMs this driver is running now, for reconciliation after a restart.
    async fn list(&self) -> Result<Vec<VmId>, DriverError>;
}
