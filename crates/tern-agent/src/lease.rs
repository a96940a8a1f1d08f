//! The host's lease from the control plane, which its guests fence by.
//!
//! A joined host's VMs may be restarted elsewhere once the control plane
//! has not heard from the host for `host_down_after`. A host cut off from
//! the control plane (its network, or its agent dead while its guests run
//! on) must not keep running them past that point, or two copies would
//! run. So each heartbeat's answer grants a lease shorter than
//! `host_down_after`, counted from when the heartbeat was sent; the agent
//! writes its end to `<data_dir>/shared/lease.json`, and every guest process
//! pauses its guest while the lease has run out (fenced), and runs it again
//! when a new lease comes. The agent stops stale copies (named in the same
//! answer) before it writes the new lease, so a copy the control plane has
//! moved on never runs again. A host that never joined has no lease file
//! and fences nothing.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The lease file's content.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// Until when guests may run, in milliseconds since the Unix epoch.
    pub until_unix_ms: u64,
}

/// Where a host's lease is kept.
pub fn path(data_dir: &Path) -> PathBuf {
    crate::vmdir::shared_dir(data_dir).join("lease.json")
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Grants guests until `until_unix_ms` (written whole, then renamed).
pub fn grant(data_dir: &Path, until_unix_ms: u64) -> std::io::Result<()> {
    let shared = crate::vmdir::shared_dir(data_dir);
    std::fs::create_dir_all(&shared)?;
    let tmp = shared.join("lease.json.tmp");
    let body = serde_json::to_vec(&Lease { until_unix_ms }).expect("a lease serializes");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path(data_dir))
}

/// Removes the lease: the control plane grants none (guests run freely).
pub fn clear(data_dir: &Path) {
    let _ = std::fs::remove_file(path(data_dir));
}

/// Whether guests must be fenced now: a lease exists and has run out. A
/// lease that cannot be read is taken as run out (fencing is the safe
/// side); no lease file means the host is not under one.
pub fn run_out(data_dir: &Path, now_ms: u64) -> bool {
    match std::fs::read(path(data_dir)) {
        Ok(b) => serde_json::from_slice::<Lease>(&b).map_or(true, |l| now_ms > l.until_unix_ms),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_runs_out_and_no_lease_fences_nothing() {
        let d = tempfile::tempdir().unwrap();
        assert!(!run_out(d.path(), 5), "no lease: not fenced");
        grant(d.path(), 100).unwrap();
        assert!(!run_out(d.path(), 100));
        assert!(run_out(d.path(), 101));
        std::fs::write(path(d.path()), b"garbage").unwrap();
        assert!(run_out(d.path(), 0), "an unreadable lease fences");
        clear(d.path());
        assert!(!run_out(d.path(), u64::MAX));
    }
}
