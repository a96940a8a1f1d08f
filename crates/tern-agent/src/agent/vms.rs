//! The VMs this host runs: starting their processes and asking them how they are.

use super::*;

impl Agent {
    /// Starts the process of the guest in `dir` (it outlives the agent: its
    /// own process group, no parent-death signal).
    pub(crate) fn spawn_guest(&self, dir: &VmDir) -> Result<(), AgentError> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.log())
            .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.log().display())))?;
        let err = log
            .try_clone()
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut cmd = std::process::Command::new(&self.inner.exe);
        if self.inner.cfg.jail.is_some() {
            // A jailed process inherits nothing it was not given: its
            // logging, and the operator's failure injection.
            cmd.env_clear();
            for (k, v) in std::env::vars_os() {
                let k_str = k.to_string_lossy();
                if matches!(
                    &*k_str,
                    "PATH" | "RUST_LOG" | "TERN_LOG" | "TERN_LOG_FORMAT"
                ) || k_str.starts_with("TERN_FAULT_")
                {
                    cmd.env(k, v);
                }
            }
        }
        let mut child = cmd
            .arg("guest")
            .arg(&dir.0)
            .process_group(0)
            // Frames are made on one thread and freed on another: two
            // malloc arenas keep the freed memory reusable (measured: the
            // source's peak during a 1 GiB pre-copy fell by 10-18 MB).
            .env(
                "MALLOC_ARENA_MAX",
                std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                AgentError::Internal(format!("cannot start {}: {e}", self.inner.exe.display()))
            })?;
        // Reaped here while this agent lives; after it, by init (and what
        // it left cleaned at the next agent's start).
        let (cfg, dir) = (self.inner.cfg.clone(), dir.clone());
        std::thread::spawn(move || {
            let _ = child.wait();
            super::adopt::clean_after_exit(&cfg, &dir);
        });
        Ok(())
    }

    /// Boots a VM here, in a process of its own, under an id of its own.
    pub async fn create_vm(&self, spec: GuestSpec) -> Result<VmView, AgentError> {
        let id = tern_proto::VmId::new().to_string();
        self.create_vm_as(&id, 1, spec).await
    }

    /// Boots VM `id` at owner epoch `epoch` (the control plane names both).
    /// Asking again for a VM that runs here at that epoch answers it as it
    /// is, so a control plane that lost the first answer may retry; any
    /// other VM of that id here is a conflict.
    pub async fn create_vm_as(
        &self,
        id: &str,
        epoch: u64,
        spec: GuestSpec,
    ) -> Result<VmView, AgentError> {
        spec.validate().map_err(AgentError::BadRequest)?;
        // A VM's id is tern-proto's (a UUID, the same on every host).
        id.parse::<tern_proto::VmId>()
            .map_err(|e| AgentError::BadRequest(e.to_string()))?;
        if epoch == 0 {
            return Err(AgentError::BadRequest("epoch must be at least 1".into()));
        }
        let dir = VmDir::new(&self.inner.cfg.data_dir, id);
        if let Ok(l) = dir.launch() {
            let here = self.vm(id).await.ok();
            return match here {
                Some(v)
                    if l.epoch == epoch && l.spec == spec && v.status == GuestStatus::Running =>
                {
                    Ok(v)
                }
                _ => Err(AgentError::Conflict(format!(
                    "vm {id} already exists here (epoch {})",
                    l.epoch
                ))),
            };
        }
        let id = id.to_string();
        dir.write_launch(&Launch {
            vm: id.clone(),
            epoch,
            spec: spec.clone(),
            role: LaunchRole::Boot,
            agent: self.inner.cfg.clone(),
        })
        .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.0.display())))?;
        self.spawn_guest(&dir)?;
        if let Err(e) = wait_running(&dir).await {
            // Leave nothing behind: a half-booted guest is no VM.
            let _ = control::call::<()>(&dir.control(), &Request::Stop, STATUS_TIMEOUT).await;
            if let Some(pid) = dir.live_pid() {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid).expect("live pids are positive"),
                    rustix::process::Signal::KILL,
                );
            }
            return Err(e);
        }
        lock(&self.inner.vms).insert(id.clone(), VmEntry { spec, dir });
        self.vm(&id).await
    }

    pub(super) fn entry(&self, id: &str) -> Result<VmEntry, AgentError> {
        // A guest that arrived may have committed a moment before its
        // migration's end reached this agent: its journal already says so.
        if let Some(e) = self.arrived(id) {
            lock(&self.inner.vms).insert(id.into(), e.clone());
            return Ok(e);
        }
        lock(&self.inner.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("vm {id}")))
    }

    /// The directory of an incoming migration of `id` under way here whose
    /// guest process has journaled the commit.
    pub(super) fn arrived(&self, id: &str) -> Option<VmEntry> {
        let dirs: Vec<VmDir> = lock(&self.inner.routes).values().cloned().collect();
        dirs.into_iter().find_map(|dir| {
            let l = dir.launch().ok()?;
            if l.vm != id || matches!(l.role, LaunchRole::Boot) {
                return None;
            }
            let records = dir.records().ok()?;
            records
                .iter()
                .any(|r| matches!(r, crate::journal::Record::CommitReceived { .. }))
                .then_some(VmEntry { spec: l.spec, dir })
        })
    }

    /// Keeps a VM's configuration (the control plane's tenant settings)
    /// beside it, in `config.json` of its directory, for its guest to fetch.
    pub async fn set_config(&self, id: &str, config: &serde_json::Value) -> Result<(), AgentError> {
        let e = self.entry(id)?;
        if e.dir.live_pid().is_none() {
            return Err(AgentError::Conflict(format!("vm {id} does not run here")));
        }
        let file = e.dir.0.join("config.json");
        let tmp = e.dir.0.join("config.json.tmp");
        let text =
            serde_json::to_vec_pretty(config).map_err(|e| AgentError::BadRequest(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|err| AgentError::Internal(format!("{}: {err}", file.display())))
    }

    /// Stops a VM running here.
    pub async fn stop_vm(&self, id: &str) -> Result<(), AgentError> {
        let e = self.entry(id)?;
        if e.dir.live_pid().is_none() {
            return Err(AgentError::Conflict(format!("vm {id} does not run here")));
        }
        match control::call::<()>(&e.dir.control(), &Request::Stop, STATUS_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(control::ControlError::Refused(why)) => {
                Err(AgentError::Conflict(format!("vm {id}: {why}")))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// One VM, as its process (or, when that is gone, its journal) says.
    pub async fn vm(&self, id: &str) -> Result<VmView, AgentError> {
        let e = self.entry(id)?;
        view(id, &e).await
    }

    /// Every VM this host knows of (running, moved away, lost, stopped).
    pub async fn vms(&self) -> Vec<VmView> {
        let all: Vec<(String, VmEntry)> = lock(&self.inner.vms)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(all.len());
        for (id, e) in &all {
            match view(id, e).await {
                Ok(v) => out.push(v),
                Err(err) => tracing::warn!(vm = %id, error = %err, "a VM that cannot be shown"),
            }
        }
        out
    }
}

/// Waits for a freshly started guest process to run its guest.
pub(super) async fn wait_running(dir: &VmDir) -> Result<(), AgentError> {
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match control::call::<ProcStatus>(&dir.control(), &Request::Status, STATUS_TIMEOUT).await {
            Ok(s) if s.state == ProcState::Running => return Ok(()),
            Ok(s) if s.state == ProcState::Failed => {
                return Err(AgentError::Internal(s.detail.unwrap_or_default()))
            }
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(2) && dir.live_pid().is_none() {
            let log = std::fs::read_to_string(dir.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(AgentError::Internal(format!(
                "the guest process ended: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        if t.elapsed() > BOOT_TIMEOUT {
            return Err(AgentError::Internal(format!(
                "the guest did not start within {BOOT_TIMEOUT:?}"
            )));
        }
    }
}

/// A VM's view: its process's answer, or its journal's when it has none
/// (the journal is read only then, or to name where a guest moved).
pub(super) async fn view(id: &str, e: &VmEntry) -> Result<VmView, AgentError> {
    let status = match e.dir.live_pid() {
        Some(_) => control::call::<ProcStatus>(&e.dir.control(), &Request::Status, STATUS_TIMEOUT)
            .await
            .map_err(|err| err.to_string()),
        None => Err(String::new()),
    };
    let mut v = VmView {
        id: typed("VM id", id)?,
        status: GuestStatus::Lost,
        epoch: 1,
        spec: e.spec.clone(),
        counter: None,
        checksum_ok: None,
        moved_to: None,
        detail: None,
    };
    let fate = || e.dir.records().map(|r| fold(&r)).unwrap_or_default();
    match status {
        Ok(s) => {
            v.epoch = s.epoch;
            v.detail = s.detail.or(s.migration);
            v.status = match s.state {
                ProcState::Running => {
                    v.counter = s.counter;
                    v.checksum_ok = s.checksum_ok;
                    GuestStatus::Running
                }
                ProcState::Stalled => GuestStatus::Stalled,
                ProcState::Fenced => {
                    v.counter = s.counter;
                    GuestStatus::Fenced
                }
                ProcState::Booting => GuestStatus::Starting,
                ProcState::Migrating | ProcState::Receiving => GuestStatus::Migrating,
                ProcState::MovedAway => {
                    v.moved_to = fate().moved_to.and_then(|m| m.0.parse().ok());
                    GuestStatus::MovedAway
                }
                ProcState::Stopped => GuestStatus::Stopped,
                ProcState::Failed => GuestStatus::Lost,
            };
        }
        Err(why) => {
            let fate = fate();
            v.epoch = fate
                .owned
                .or(fate.moved_to.as_ref().map(|m| m.1))
                .unwrap_or(1);
            v.status = if fate.stopped {
                GuestStatus::Stopped
            } else if fate.moved_to.is_some() && fate.in_doubt.is_none() {
                v.moved_to = fate.moved_to.and_then(|m| m.0.parse().ok());
                GuestStatus::MovedAway
            } else {
                GuestStatus::Lost
            };
            if v.status == GuestStatus::Lost {
                // A container outlives a guest process that was killed:
                // it must not run on as a copy nobody owns.
                if e.dir.live_pid().is_none() {
                    let dir = e.dir.0.clone();
                    let _ = tokio::task::spawn_blocking(move || crate::container::reap(&dir)).await;
                }
                v.detail = Some(if why.is_empty() {
                    "its guest process ended".into()
                } else {
                    format!("its guest process does not answer: {why}")
                });
            }
        }
    }
    Ok(v)
}
