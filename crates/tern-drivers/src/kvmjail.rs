//! A jailed `tern-vmm` monitor (see [`tern_jail`]): the flags the kvm
//! driver passes and the monitor reads, so both agree on one definition.
//!
//! The monitor's room shows each bound host directory at its own path, so
//! every path the driver names (control socket, console, snapshot
//! directories, kernel, restore chain) means the same inside and out.

use std::path::{Path, PathBuf};
use tern_jail::{Bind, JailConfig, Plan, VmJail};

/// `tern-vmm`'s jail flags. Without `--jail-uid` the monitor runs unjailed.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct MonitorJail {
    /// Jail the monitor and run it as this uid (never 0).
    #[arg(long)]
    pub jail_uid: Option<u32>,
    /// Its gid (never 0).
    #[arg(long)]
    pub jail_gid: Option<u32>,
    /// The directory that becomes its root.
    #[arg(long)]
    pub jail_root: Option<PathBuf>,
    /// A host directory shown at its own path: `rw:PATH` or `ro:PATH`.
    #[arg(long = "jail-bind")]
    pub jail_binds: Vec<String>,
    /// The cgroup hierarchy.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub jail_cgroup_root: PathBuf,
    /// Memory allowed beyond guest RAM, MiB.
    #[arg(long, default_value_t = 384)]
    pub jail_overhead_mib: u64,
    /// Processes and threads allowed.
    #[arg(long, default_value_t = 512)]
    pub jail_pids_max: u64,
    /// Open files allowed.
    #[arg(long, default_value_t = 4096)]
    pub jail_max_open_files: u64,
    /// Leave the seccomp filter out (debugging only).
    #[arg(long)]
    pub jail_no_seccomp: bool,
}

impl MonitorJail {
    /// The flags for a monitor jailed by `cfg` in `root`, showing `rw` and
    /// `ro` directories.
    pub fn flags(cfg: &JailConfig, root: &Path, rw: &[PathBuf], ro: &[PathBuf]) -> Vec<String> {
        let mut f = vec![
            format!("--jail-uid={}", cfg.uid),
            format!("--jail-gid={}", cfg.gid),
            format!("--jail-root={}", root.display()),
            format!("--jail-cgroup-root={}", cfg.cgroup_root.display()),
            format!("--jail-overhead-mib={}", cfg.overhead_mib),
            format!("--jail-pids-max={}", cfg.pids_max),
            format!("--jail-max-open-files={}", cfg.max_open_files),
        ];
        f.extend(rw.iter().map(|p| format!("--jail-bind=rw:{}", p.display())));
        f.extend(ro.iter().map(|p| format!("--jail-bind=ro:{}", p.display())));
        if !cfg.seccomp {
            f.push("--jail-no-seccomp".into());
        }
        f
    }

    /// The jail these flags describe for a monitor of `memory_mib` and
    /// `vcpus`, named `name`; `None` when it runs unjailed.
    pub fn plan(&self, name: &str, memory_mib: u64, vcpus: u8) -> Result<Option<Plan>, String> {
        let Some(uid) = self.jail_uid else {
            return Ok(None);
        };
        let gid = self.jail_gid.ok_or("--jail-uid needs --jail-gid")?;
        let root = self
            .jail_root
            .clone()
            .ok_or("--jail-uid needs --jail-root")?;
        let binds = self
            .jail_binds
            .iter()
            .map(|b| {
                let (writable, path) = match b.split_once(':') {
                    Some(("rw", p)) => (true, p),
                    Some(("ro", p)) => (false, p),
                    _ => return Err(format!("--jail-bind `{b}`: rw:PATH or ro:PATH")),
                };
                let host = PathBuf::from(path);
                let inside = host
                    .strip_prefix("/")
                    .map_err(|_| format!("--jail-bind `{b}`: the path must be absolute"))?
                    .to_path_buf();
                Ok(Bind {
                    host,
                    inside,
                    writable,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let cfg = JailConfig {
            uid,
            gid,
            dir: None,
            cgroup_root: self.jail_cgroup_root.clone(),
            overhead_mib: self.jail_overhead_mib,
            pids_max: self.jail_pids_max,
            max_open_files: self.jail_max_open_files,
            seccomp: !self.jail_no_seccomp,
            test_hooks: false,
        };
        let vm = VmJail {
            name: name.to_string(),
            root,
            binds,
            memory_mib,
            vcpus,
            // A monitor talks over its control socket only.
            own_network: true,
        };
        Ok(Some(Plan::for_vm(vm, &cfg)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        jail: MonitorJail,
    }

    #[test]
    fn the_drivers_flags_read_back_as_the_same_jail() {
        let cfg = JailConfig::default();
        let flags = MonitorJail::flags(
            &cfg,
            Path::new("/run/j"),
            &[PathBuf::from("/var/vms/a")],
            &[PathBuf::from("/images")],
        );
        let cli =
            Cli::try_parse_from(std::iter::once("tern-vmm".to_string()).chain(flags)).unwrap();
        let p = cli.jail.plan("a", 64, 1).unwrap().unwrap();
        assert_eq!((p.uid, p.gid), (65534, 65534));
        assert_eq!(p.binds[0].inside, Path::new("var/vms/a"));
        assert!(p.binds[0].writable && !p.binds[1].writable);
        assert_eq!(p.limits.memory_bytes, (64 + 384) << 20);
        assert!(p.seccomp);
        let bad = Cli::try_parse_from([
            "tern-vmm",
            "--jail-uid=5",
            "--jail-gid=5",
            "--jail-root=/r",
            "--jail-bind=x:/a",
        ])
        .unwrap();
        assert!(bad.jail.plan("a", 64, 1).unwrap_err().contains("rw:PATH"));
        let none = Cli::try_parse_from(["tern-vmm"]).unwrap();
        assert!(none.jail.plan("a", 64, 1).unwrap().is_none());
    }
}
