//! tern's jailer: what a guest's process does to itself before any guest
//! code runs, so that a guest that escapes its monitor finds an
//! unprivileged, filtered process in an empty room.
//!
//! [`enter`] runs, as root and while the process has a single thread:
//! 1. [`cgroup`]: the process joins a cgroup of its own with memory, CPU and
//!    pids limits (cgroup v1 or v2, whichever the host mounts);
//! 2. [`root`]: a new mount namespace whose root (`pivot_root`) holds only
//!    the binds and device nodes of its [`Plan`];
//! 3. [`creds`]: rlimits, an empty capability bounding set, no
//!    supplementary groups, the plan's uid and gid, `no_new_privs`;
//! 4. [`filter`]: a default-deny seccomp filter (killing the process on any
//!    other system call), inherited by every thread it starts; vCPU threads
//!    add a narrower one of their own ([`filter::install_vcpu`]).
//!
//! The design follows Firecracker's jailer (a chroot of hard links or binds,
//! device nodes made for the jail's uid, per-thread seccomp), applied in the
//! process itself: the guest process must load its TLS identity and open
//! its journal before it loses the right to.

pub mod cgroup;
pub mod creds;
pub mod filter;
mod plan;
pub mod root;

pub use plan::{Bind, JailConfig, Limits, Plan, VmJail};

/// Why a jail could not be entered. The process must not run its guest
/// then: it is half-jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A step failed at the operating system.
    #[error("jail: {what}: {source}")]
    Os {
        /// The step.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The seccomp filter could not be built or installed.
    #[error("jail: seccomp: {0}")]
    Seccomp(String),
    /// The plan asks for something that cannot be done.
    #[error("jail: {0}")]
    Plan(String),
}

pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Os { what, source }
}

pub(crate) fn errno(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let what = what.into();
    move |e| JailError::Os {
        what,
        source: e.into(),
    }
}

/// Removes what a jail left on the host once its process has ended: its
/// room (empty mount points and device nodes: the mounts died with the
/// process's namespace) and its cgroups.
pub fn clean(root: &std::path::Path, cgroup_root: &std::path::Path, name: &str) {
    let _ = std::fs::remove_dir_all(root);
    cgroup::remove(cgroup_root, name);
}

/// Puts this process in the jail `plan` describes. Call it while the
/// process has one thread (before any runtime starts): the uid change and
/// the filter are per thread, and threads started later inherit them.
pub fn enter(plan: &Plan) -> Result<(), JailError> {
    plan.check_name()?;
    cgroup::join(&plan.name, &plan.limits, &plan.cgroup_root)?;
    root::pivot(plan)?;
    creds::drop_to(plan.uid, plan.gid, &plan.limits)?;
    if plan.seccomp {
        filter::install_process()?;
    }
    tracing::info!(
        jail = %plan.name,
        uid = plan.uid,
        gid = plan.gid,
        seccomp = plan.seccomp,
        "entered the jail"
    );
    Ok(())
}
