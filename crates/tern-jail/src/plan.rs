//! What a jail holds and how it is limited.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The operator's jail settings (the agent's `[jail]` table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// The uid guest processes run as (never 0).
    pub uid: u32,
    /// Their gid (never 0).
    pub gid: u32,
    /// Where jails are made; `<data_dir>/jail` when unset.
    pub dir: Option<PathBuf>,
    /// The cgroup hierarchy (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// Memory allowed beyond the guest's RAM (monitor, buffers), MiB.
    pub overhead_mib: u64,
    /// Processes and threads a guest process may have.
    pub pids_max: u64,
    /// Open files a guest process may have.
    pub max_open_files: u64,
    /// Install the seccomp filter (on unless a debugging operator turns it off).
    pub seccomp: bool,
    /// Test hooks (a control request that makes a forbidden system call).
    /// Off in production.
    pub test_hooks: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            uid: 65534,
            gid: 65534,
            dir: None,
            cgroup_root: "/sys/fs/cgroup".into(),
            overhead_mib: 384,
            pids_max: 512,
            max_open_files: 4096,
            seccomp: true,
            test_hooks: false,
        }
    }
}

impl JailConfig {
    /// The directory of jail `name` for an agent whose data dir is `data_dir`.
    pub fn root_for(&self, data_dir: &std::path::Path, name: &str) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| data_dir.join("jail"))
            .join(name)
    }

    /// Checks what the jail cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if self.uid == 0 || self.gid == 0 {
            return Err("jail: uid and gid must not be 0 (root)".into());
        }
        if self.pids_max < 16 || self.max_open_files < 64 {
            return Err("jail: pids_max must be at least 16, max_open_files at least 64".into());
        }
        Ok(())
    }
}

/// A path of the host shown inside the jail.
#[derive(Clone, Debug)]
pub struct Bind {
    /// The host path (a directory).
    pub host: PathBuf,
    /// Where it appears, relative to the jail's root.
    pub inside: PathBuf,
    /// Whether the jailed process may write it.
    pub writable: bool,
}

/// Resource limits of one jailed process.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Memory (guest RAM and overhead), bytes.
    pub memory_bytes: u64,
    /// CPUs it may use (its vCPUs and one for its other threads).
    pub cpus: u32,
    /// Processes and threads.
    pub pids: u64,
    /// Open files.
    pub open_files: u64,
}

/// One jail: its name, room, devices, limits and identity.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The jail's name: its directory's and its cgroup's (see [`Plan::check_name`]).
    pub name: String,
    /// The host directory that becomes the jail's root.
    pub root: PathBuf,
    /// What it shows of the host.
    pub binds: Vec<Bind>,
    /// Device nodes it gets (`/dev/kvm`, `/dev/userfaultfd`), made for its uid.
    pub devices: Vec<PathBuf>,
    /// The cgroup hierarchy.
    pub cgroup_root: PathBuf,
    /// Its limits.
    pub limits: Limits,
    /// Who it runs as.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Whether to install the seccomp filter.
    pub seccomp: bool,
    /// A network namespace of its own (no interfaces but a down loopback):
    /// for a process that needs no host network.
    pub own_network: bool,
}

/// Device nodes a VM's process needs, when the host has them.
const VM_DEVICES: &[&str] = &["/dev/kvm", "/dev/userfaultfd"];

/// What a VM's jail is made of: its own name, room and binds; the rest
/// follows from the operator's settings and the VM's size.
pub struct VmJail {
    /// The jail's name (see [`Plan::check_name`]).
    pub name: String,
    /// The host directory that becomes its root.
    pub root: PathBuf,
    /// What it shows of the host.
    pub binds: Vec<Bind>,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// A network namespace of its own (see [`Plan::own_network`]).
    pub own_network: bool,
}

impl Plan {
    /// The jail of a VM's process under `cfg`: the VM's devices, memory of
    /// its RAM plus the configured overhead, a CPU per vCPU and one more.
    pub fn for_vm(vm: VmJail, cfg: &JailConfig) -> Plan {
        let mib = vm.memory_mib.saturating_add(cfg.overhead_mib);
        Plan {
            name: vm.name,
            root: vm.root,
            binds: vm.binds,
            devices: VM_DEVICES
                .iter()
                .map(PathBuf::from)
                .filter(|d| d.exists())
                .collect(),
            cgroup_root: cfg.cgroup_root.clone(),
            limits: Limits {
                memory_bytes: mib.saturating_mul(1 << 20),
                cpus: u32::from(vm.vcpus) + 1,
                pids: cfg.pids_max,
                open_files: cfg.max_open_files,
            },
            uid: cfg.uid,
            gid: cfg.gid,
            seccomp: cfg.seccomp,
            own_network: vm.own_network,
        }
    }

    /// The name becomes a directory and a cgroup: one path component of
    /// `A-Z a-z 0-9 _ - .`, never `.` or `..`.
    pub fn check_name(&self) -> Result<(), crate::JailError> {
        let n = &self.name;
        let ok = !n.is_empty()
            && n.len() <= 128
            && n != "."
            && n != ".."
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(())
        } else {
            Err(crate::JailError::Plan(format!("bad jail name `{n}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_tiny_limits_are_refused_and_defaults_are_sane() {
        assert!(JailConfig::default().validate().is_ok());
        let c = JailConfig {
            uid: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("uid"));
        let c = JailConfig {
            pids_max: 2,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("pids_max"));
    }
}
