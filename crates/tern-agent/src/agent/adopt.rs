//! Re-adopting the guests found in the data directory when the agent starts.

use super::*;

impl Agent {
    /// Re-adopts every guest directory: running processes are served as
    /// before, ended ones are reported as their journals say.
    pub(super) fn adopt(&self) {
        let root = self.inner.cfg.data_dir.join("vms");
        let Ok(list) = std::fs::read_dir(&root) else {
            return;
        };
        let mut best: BTreeMap<String, (u64, bool, VmEntry)> = BTreeMap::new();
        for d in list.flatten() {
            let dir = VmDir(d.path());
            let Ok(launch) = dir.launch() else { continue };
            let fate = dir.records().map(|r| fold(&r)).unwrap_or_default();
            let live = dir.live_pid().is_some();
            if !live {
                clean_after_exit(&self.inner.cfg, &dir);
            }
            self.adopt_migrations(&dir, &launch, &fate, live);
            let incoming = !matches!(launch.role, LaunchRole::Boot);
            let was_vm_here =
                !incoming || fate.owned.is_some() || fate.moved_to.is_some() || fate.stopped;
            if !was_vm_here {
                continue;
            }
            let rank = (launch.epoch, live);
            let cur = best.get(&launch.vm).map(|(e, l, _)| (*e, *l));
            if cur.is_none_or(|c| rank > c) {
                let entry = VmEntry {
                    spec: launch.spec.clone(),
                    dir,
                };
                best.insert(launch.vm.clone(), (launch.epoch, live, entry));
            }
        }
        let mut vms = lock(&self.inner.vms);
        for (vm, (_, _, e)) in best {
            vms.insert(vm, e);
        }
    }

    pub(super) fn adopt_migrations(
        &self,
        dir: &VmDir,
        launch: &Launch,
        fate: &DirFate,
        live: bool,
    ) {
        for e in &fate.ended {
            let (_, rx) = watch::channel(Progress {
                phase: e.state,
                ..Default::default()
            });
            lock(&self.inner.migrations).insert(
                e.migration.clone(),
                MigrationEntry {
                    vm: e.vm.clone(),
                    role: e.role,
                    peer: e.peer.clone(),
                    state: e.state,
                    progress: rx,
                    report: e.report.clone(),
                    error: e.error.clone(),
                    bandwidth: None,
                },
            );
        }
        // One still under way in a live process: follow it again.
        let open = match &launch.role {
            LaunchRole::Receive {
                migration,
                source_host,
                ..
            } if !fate.ended.iter().any(|e| &e.migration == migration) => Some((
                migration.clone(),
                MigrationRole::Destination,
                source_host.clone(),
            )),
            _ => self
                .open_outgoing(dir)
                .map(|(m, to)| (m, MigrationRole::Source, to)),
        };
        if let (Some((m, role, peer)), true) = (open, live) {
            lock(&self.inner.routes).insert(m.clone(), dir.clone());
            self.track(&m, &launch.vm, role, &peer, dir.clone(), None);
        }
    }

    /// The outgoing migration a guest's journal shows begun and not ended.
    pub(super) fn open_outgoing(&self, dir: &VmDir) -> Option<(String, String)> {
        let records = dir.records().ok()?;
        let mut open = None;
        for r in &records {
            match r {
                crate::journal::Record::MigrationOut { migration, to, .. } => {
                    open = Some((migration.clone(), to.clone()))
                }
                crate::journal::Record::MigrationEnded(e)
                    if open.as_ref().is_some_and(|(m, _)| m == &e.migration) =>
                {
                    open = None
                }
                _ => {}
            }
        }
        open
    }
}

/// Removes what the guest process of `dir` left once it ended: a QEMU that
/// outlived it (a confined QEMU loses its parent-death signal; healing may
/// start the guest elsewhere, so no unmanaged copy may run on), and its
/// jail's room and cgroups.
pub(crate) fn clean_after_exit(cfg: &AgentConfig, dir: &VmDir) {
    if let Some(pid) = tern_drivers::qemu::kill_stray(&dir.qemu()) {
        tracing::warn!(pid, dir = %dir.0.display(), "ended a QEMU its guest process left behind");
    }
    clean_jail(cfg, dir);
}

fn clean_jail(cfg: &AgentConfig, dir: &VmDir) {
    let (Some(j), Some(name)) = (&cfg.jail, dir.0.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    tern_jail::clean(&j.root_for(&cfg.data_dir, &name), &j.cgroup_root, &name);
}
