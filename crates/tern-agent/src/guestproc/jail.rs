//! Jailing a guest process (see [`tern_jail`]) before its guest boots or
//! arrives.
//!
//! A jailed process sees, under its new root, only `vms/<id>/` (its own
//! directory, writable), `shared/` (the agent's peers file and lease,
//! read-only) and `dev/kvm`, `dev/userfaultfd`; so its data dir is `/` and
//! every path it derives from it keeps its shape. Its TLS identity and
//! host key are loaded before it goes in. Migration streams come in as
//! descriptors over its streams socket, and it dials peers itself, so it
//! keeps the host's network namespace.
//!
//! Only test guests (tern-vmm machines in this process) are jailed: process
//! workloads and QEMU start programs of their own, which the filter forbids.

use super::GuestProcError;
use crate::vmdir::{shared_dir, Launch, VmDir};
use std::path::Path;
use tern_jail::{Bind, JailConfig, Plan, VmJail};
use tern_proto::GuestKind;

/// The jail settings that apply to `launch`'s guest, if any.
pub(super) fn applies(launch: &Launch) -> Option<&JailConfig> {
    launch
        .agent
        .jail
        .as_ref()
        .filter(|_| launch.spec.kind == GuestKind::TestGuest)
}

fn name_of(dir: &VmDir) -> Result<String, GuestProcError> {
    dir.0
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| GuestProcError::Launch(format!("{} has no name", dir.0.display())))
}

/// The jail of the guest in `dir`.
pub(super) fn plan(dir: &VmDir, launch: &Launch, cfg: &JailConfig) -> Result<Plan, GuestProcError> {
    let name = name_of(dir)?;
    let data_dir = &launch.agent.data_dir;
    let vm = VmJail {
        root: cfg.root_for(data_dir, &name),
        binds: vec![
            Bind {
                host: dir.0.clone(),
                inside: Path::new("vms").join(&name),
                writable: true,
            },
            Bind {
                host: shared_dir(data_dir),
                inside: "shared".into(),
                writable: false,
            },
        ],
        memory_mib: launch.spec.memory_mib,
        vcpus: launch.spec.vcpus,
        // It dials its migration peers itself.
        own_network: false,
        name,
    };
    Ok(Plan::for_vm(vm, cfg))
}

/// Enters the jail and answers the directory and launch as seen from
/// inside it.
pub(super) fn enter(
    dir: VmDir,
    mut launch: Launch,
    cfg: &JailConfig,
) -> Result<(VmDir, Launch), GuestProcError> {
    let plan = plan(&dir, &launch, cfg)?;
    let shared = shared_dir(&launch.agent.data_dir);
    std::fs::create_dir_all(&shared).map_err(|source| GuestProcError::Io {
        what: format!("mkdir {}", shared.display()),
        source,
    })?;
    if cfg.seccomp {
        tern_vmm::set_vcpu_thread_hook(tern_jail::filter::install_vcpu);
    }
    tern_jail::enter(&plan).map_err(GuestProcError::Jail)?;
    launch.agent.data_dir = "/".into();
    Ok((VmDir::new(Path::new("/"), &plan.name), launch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use crate::vmdir::LaunchRole;

    #[test]
    fn a_test_guests_jail_holds_its_own_dir_and_the_shared_one() {
        let mut agent = AgentConfig::new("host-a");
        agent.data_dir = "/var/lib/tern".into();
        agent.jail = Some(JailConfig::default());
        let id = tern_proto::VmId::new().to_string();
        let mut launch = Launch {
            vm: id.clone(),
            epoch: 1,
            spec: tern_proto::GuestSpec::default(),
            role: LaunchRole::Boot,
            agent,
        };
        let dir = VmDir::new(&launch.agent.data_dir, &id);
        let cfg = applies(&launch).unwrap().clone();
        let p = plan(&dir, &launch, &cfg).unwrap();
        assert_eq!(p.root, Path::new("/var/lib/tern/jail").join(&id));
        assert_eq!(p.binds[0].host, dir.0);
        assert!(p.binds[0].writable && !p.binds[1].writable);
        assert_eq!(p.binds[1].host, Path::new("/var/lib/tern/shared"));
        assert_eq!(p.limits.memory_bytes, (launch.spec.memory_mib + 384) << 20);
        launch.spec.kind = GuestKind::Linux;
        assert!(applies(&launch).is_none(), "QEMU guests are not jailed");
    }
}
