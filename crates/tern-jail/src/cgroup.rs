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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            memory_bytes: 448 << 20,
            cpus: 2,
            pids: 512,
            open_files: 4096,
        }
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    // cgroupfs files are plain files in a scratch tree: what `join` writes
    // where is checked there, for both hierarchies.
    #[test]
    fn v1_writes_each_controllers_limit_and_joins_each() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        join("vm-1", &limits(), root.path()).unwrap();
        let g = |c: &str| root.path().join(c).join("tern/vm-1");
        assert_eq!(
            read(g("memory").join("memory.limit_in_bytes")),
            (448u64 << 20).to_string()
        );
        assert_eq!(read(g("cpu").join("cpu.cfs_quota_us")), "200000");
        assert_eq!(read(g("pids").join("pids.max")), "512");
        for c in ["memory", "cpu", "pids"] {
            assert_eq!(
                read(g(c).join("cgroup.procs")),
                std::process::id().to_string()
            );
        }
        assert_eq!(groups(root.path(), "vm-1").len(), 3);
    }

    #[test]
    fn v2_writes_one_groups_limits() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        join("vm-2", &limits(), root.path()).unwrap();
        let g = root.path().join("tern/vm-2");
        assert_eq!(read(g.join("memory.max")), (448u64 << 20).to_string());
        assert_eq!(read(g.join("cpu.max")), "200000 100000");
        assert_eq!(read(g.join("pids.max")), "512");
        assert_eq!(read(g.join("cgroup.procs")), std::process::id().to_string());
        assert_eq!(groups(root.path(), "vm-2"), vec![g]);
    }

    #[test]
    fn a_missing_controller_is_an_error_not_a_silent_skip() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        let e = join("vm-3", &limits(), root.path()).unwrap_err();
        assert!(e.to_string().contains("cpu"), "{e}");
    }
}
