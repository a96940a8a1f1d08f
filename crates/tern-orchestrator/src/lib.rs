//! The manager: the only component that moves VMs through their lifecycle.
//!
//! It provisions tenants' VMs from a warm pool (cold-starting when the pool is
//! empty), keeps the pool at its target size and recycles idle VMs, checks the
//! health of running VMs and replaces those that fail repeatedly, and on start-up
//! reconciles what the store believes against what the driver actually runs.
//!
//! Every status change is a compare-and-swap in the store, so the background
//! loops, API requests and other control-plane replicas can act concurrently:
//! whoever loses a race sees a conflict and backs off, and no VM is ever handed
//! to two tenants.

mod manager;
/// Quotas live in `tern-proto`, where configuration parsing can reach them
/// without the store.
pub use tern_proto::quota;

pub use manager::{
    HealthReport, Manager, ManagerConfig, ManagerError, PoolReport, ProvisionSource, StartupReport,
};
pub use quota::{Quota, QuotaExceeded, Quotas};
