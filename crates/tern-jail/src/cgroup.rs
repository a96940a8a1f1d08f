//! The jailed process's cgroup: `tern/<name>` under each controller it
//! limits (cgroup v1, as on this host), or one `tern/<name>` group on a
//! unified (v2) hierarchy.

use crate::{os, JailError, Limits};
use std::path::{Path, PathBuf};

/// The CFS period the CPU quota is given in, µs.
const CPU_PERIOD_US: u64 = 100_000;

/// Whether `root` is a unified (v2) hierarchy.
pub fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").exists()
}

/// The groups a jail named `name` uses under `root`.
pub fn groups(root: &Path, name: &str) -> Vec<PathBuf> {
    if is_v2(root) {
        vec![root.join("tern").join(name)]
    } else {
        ["memory", "cpu", "pids"]
            .iter()
            .map(|c| root.join(c).join("tern").join(name))
            .collect()
    }
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(os(format!("write {value} to {}", path.display())))
}

/// Moves this process into the jail's cgroup, with `limits`.
pub fn join(name: &str, limits: &Limits, root: &Path) -> Result<(), JailError> {
    let pid = std::process::id().to_string();
    let quota = CPU_PERIOD_US * u64::from(limits.cpus.max(1));
    if is_v2(root) {
        let t = root.join("tern");
        std::fs::create_dir_all(&t).map_err(os(format!("mkdir {}", t.display())))?;
        // Delegate the controllers to tern's groups (some may be absent).
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids");
        let _ = std::fs::write(t.join("cgroup.subtree_control"), "+memory +cpu +pids");
        let g = t.join(name);
        std::fs::create_dir_all(&g).map_err(os(format!("mkdir {}", g.display())))?;
        write(&g.join("memory.max"), &limits.memory_bytes.to_string())?;
        write(&g.join("pids.max"), &limits.pids.to_string())?;
        write(&g.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
        return write(&g.join("cgroup.procs"), &pid);
    }
    for (controller, files) in [
        (
            "memory",
            vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
        ),
        (
            "cpu",
            vec![
                ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
        ),
        ("pids", vec![("pids.max", limits.pids.to_string())]),
    ] {
        let base = root.join(controller);
        if !base.exists() {
            return Err(JailError::Plan(format!(
                "the {controller} controller is not mounted at {}",
                base.display()
            )));
        }
        let g = base.join("tern").join(name);
        std::fs::create_dir_all(&g).map_err(os(format!("mkdir {}", g.display())))?;
        for (file, value) in files {
            write(&g.join(file), &value)?;
        }
        write(&g.join("cgroup.procs"), &pid)?;
    }
    Ok(())
}

/// Removes a jail's groups once its process has ended (an empty group can
/// be removed; one still in use is left).
pub fn remove(root: &Path, name: &str) {
    for g in groups(root, name) {
        let _ = std::fs::remove_dir(g);
    }
}
