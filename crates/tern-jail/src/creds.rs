//! Who the jailed process is and what it may hold: rlimits, no capabilities
//! (not even in its bounding set), no supplementary groups, an unprivileged
//! uid and gid, and `no_new_privs`.

use crate::{errno, JailError, Limits};
use rustix::process::{setrlimit, Resource, Rlimit};
use rustix::thread::{CapabilitySet, Gid, Uid};

fn limit(r: Resource, n: u64, what: &str) -> Result<(), JailError> {
    setrlimit(
        r,
        Rlimit {
            current: Some(n),
            maximum: Some(n),
        },
    )
    .map_err(errno(format!("setrlimit {what}")))
}

/// Drops this (single-threaded) process to `uid:gid` with `limits`.
pub fn drop_to(uid: u32, gid: u32, limits: &Limits) -> Result<(), JailError> {
    if uid == 0 || gid == 0 {
        return Err(JailError::Plan("a jail never runs as root".into()));
    }
    limit(Resource::Nofile, limits.open_files, "open files")?;
    // A crashing monitor leaves no core holding guest memory.
    limit(Resource::Core, 0, "core size")?;
    for cap in CapabilitySet::all().iter() {
        // Capabilities this kernel does not know answer EINVAL.
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(errno("drop the capability bounding set")(e)),
        }
    }
    rustix::thread::set_thread_groups(&[]).map_err(errno("setgroups"))?;
    let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
    rustix::thread::set_thread_res_gid(g, g, g).map_err(errno("setresgid"))?;
    rustix::thread::set_thread_res_uid(u, u, u).map_err(errno("setresuid"))?;
    rustix::thread::set_no_new_privs(true).map_err(errno("no_new_privs"))?;
    let held = rustix::thread::capabilities(None).map_err(errno("capget"))?;
    if !(held.effective.is_empty() && held.permitted.is_empty()) {
        return Err(JailError::Plan(format!(
            "capabilities remain after the uid change: {:?}",
            held.effective
        )));
    }
    Ok(())
}
