//! The `kvm` driver: one `tern-vmm` monitor process per VM, driven over the
//! VM's control socket.
//!
//! Each VM gets a directory `<run_dir>/<vm id>/` holding its control socket
//! (`control.sock`), console log, the monitor's event log (`monitor.out`,
//! JSON lines) and error output, its spec and its configuration. Monitors
//! run in their own process group, so a VM outlives a restart of the control
//! plane and a monitor crash takes down only its own VM; after a restart the
//! driver finds its VMs again by their directories and live sockets.

use crate::images::{BootImage, ImageCatalogue};
use crate::{DriverError, StartRequest, VmDriver, VmHandle};
use async_trait::async_trait;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_proto::{VmConfig, VmId};
pub use tern_vmm::control::{Request, Response, StatusReport};
use tern_vmm::RunState;

/// How the driver runs monitors.
#[derive(Clone, Debug)]
pub struct KvmDriverConfig {
    /// The `tern-vmm` binary.
    pub monitor: PathBuf,
    /// Where VM directories live.
    pub run_dir: PathBuf,
    /// How long a VM may take from launch to its ready line.
    pub start_timeout: Duration,
    /// Timeout of one control request.
    pub control_timeout: Duration,
    /// What VMs may boot, by name.
    pub images: ImageCatalogue,
    /// Jail each monitor (see [`crate::kvmjail`]); `None` runs them as root.
    pub jail: Option<tern_jail::JailConfig>,
}

impl KvmDriverConfig {
    /// Defaults: the `tern-vmm` next to the running executable (else on
    /// PATH), VM directories under `run_dir`.
    pub fn new(run_dir: PathBuf) -> Self {
        Self {
            monitor: default_monitor(),
            run_dir,
            start_timeout: Duration::from_secs(30),
            control_timeout: Duration::from_secs(30),
            images: ImageCatalogue::builtin(),
            jail: None,
        }
    }
}

/// `tern-vmm` beside the current executable, else the bare name (PATH).
pub fn default_monitor() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tern-vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tern-vmm"))
}

/// The kvm driver.
pub struct KvmDriver {
    cfg: KvmDriverConfig,
}

fn op_err(id: VmId, op: &'static str, reason: impl std::fmt::Display) -> DriverError {
    DriverError::OperationFailed {
        id,
        op,
        reason: reason.to_string(),
    }
}

fn pid_alive(pid: i32) -> bool {
    rustix::process::Pid::from_raw(pid).is_some_and(|p| {
        rustix::process::test_kill_process(p).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    })
}

impl KvmDriver {
    /// A driver; creates the run directory.
    pub fn new(cfg: KvmDriverConfig) -> Result<Self, DriverError> {
        std::fs::create_dir_all(&cfg.run_dir).map_err(|e| {
            DriverError::Unavailable(format!("run dir {}: {e}", cfg.run_dir.display()))
        })?;
        Ok(Self { cfg })
    }

    /// The VM's directory.
    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.cfg.run_dir.join(id.to_string())
    }

    /// Where a VM's snapshots go when its monitor is jailed (its room shows
    /// this directory, writable): `<run_dir>/<vm id>.snapshots/`.
    pub fn snapshot_dir(&self, id: VmId) -> PathBuf {
        self.cfg.run_dir.join(format!("{id}.snapshots"))
    }

    /// A jailed monitor's room.
    fn jail_root(&self, id: VmId) -> PathBuf {
        self.cfg.run_dir.join(format!("{id}.jail"))
    }

    /// The jail flags of a monitor started with `args`: its directory and
    /// snapshot directory writable; the directories of the files it boots
    /// and the snapshots it restores, read-only.
    fn jail_flags(&self, id: VmId, cfg: &tern_jail::JailConfig, args: &[String]) -> Vec<String> {
        let rw = vec![self.vm_dir(id), self.snapshot_dir(id)];
        let mut ro = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--kernel" | "--initrd" | "--guest-elf" => {
                    if let Some(dir) = it.next().and_then(|p| Path::new(p).parent()) {
                        ro.push(dir.to_path_buf());
                    }
                }
                "--restore" => {
                    while let Some(p) = it.next_if(|p| !p.starts_with("--")) {
                        ro.push(PathBuf::from(p));
                    }
                }
                _ => {}
            }
        }
        crate::kvmjail::MonitorJail::flags(cfg, &self.jail_root(id), &rw, &ro)
    }

    fn socket(&self, id: VmId) -> PathBuf {
        self.vm_dir(id).join("control.sock")
    }

    /// Sends one control request to a VM's monitor.
    pub async fn control(&self, id: VmId, req: Request) -> Result<Response, DriverError> {
        let sock = self.socket(id);
        if !sock.exists() {
            return Err(DriverError::NotFound(id));
        }
        let timeout = self.cfg.control_timeout;
        tokio::task::spawn_blocking(move || {
            let mut c = tern_vmm::control::Client::connect(&sock, timeout)?;
            c.call(&req)
        })
        .await
        .map_err(|e| op_err(id, "control", e))?
        .map_err(|e| op_err(id, "control", e))
    }

    /// The monitor's status.
    pub async fn status(&self, id: VmId) -> Result<StatusReport, DriverError> {
        match self.control(id, Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(op_err(id, "status", format!("unexpected answer {other:?}"))),
        }
    }

    /// Starts a VM's monitor with extra arguments (boot or restore) and waits
    /// for it to be ready.
    async fn launch(
        &self,
        id: VmId,
        args: Vec<String>,
        restored: bool,
    ) -> Result<VmHandle, DriverError> {
        let dir = self.vm_dir(id);
        let fail = |reason: String| DriverError::StartFailed { id, reason };
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let out =
            std::fs::File::create(dir.join("monitor.out")).map_err(|e| fail(e.to_string()))?;
        let err =
            std::fs::File::create(dir.join("monitor.err")).map_err(|e| fail(e.to_string()))?;
        let mut cmd = Command::new(&self.cfg.monitor);
        if let Some(j) = &self.cfg.jail {
            std::fs::create_dir_all(self.snapshot_dir(id))
                .map_err(|e| fail(format!("snapshot dir: {e}")))?;
            cmd.args(self.jail_flags(id, j, &args)).env_clear();
        }
        cmd.arg("--control")
            .arg(dir.join("control.sock"))
            .arg("--console-log")
            .arg(dir.join("console.log"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            fail(format!(
                "cannot run the monitor {}: {e}",
                self.cfg.monitor.display()
            ))
        })?;
        let pid = child.id();
        std::fs::write(dir.join("pid"), pid.to_string()).map_err(|e| fail(e.to_string()))?;
        // Reap the monitor when it ends, so it never lingers as a zombie,
        // and remove its jail's room and cgroups.
        let jail = self.cfg.jail.as_ref().map(|j| {
            let name = id.to_string();
            (self.jail_root(id), j.cgroup_root.clone(), name)
        });
        std::thread::spawn(move || {
            let _ = child.wait();
            if let Some((root, cgroups, name)) = jail {
                tern_jail::clean(&root, &cgroups, &name);
            }
        });

        let deadline = Instant::now() + self.cfg.start_timeout;
        loop {
            if !pid_alive(pid as i32) {
                let why = std::fs::read_to_string(dir.join("monitor.err")).unwrap_or_default();
                return Err(fail(format!("the monitor exited: {}", why.trim())));
            }
            if let Ok(s) = self.status(id).await {
                // A booted guest is ready at its ready line; a restored one
                // was ready when it was snapshotted (its console starts empty).
                let up = s.ready
                    || matches!(s.run_state, RunState::Paused)
                    || (restored && s.run_state == RunState::Running);
                if up {
                    return Ok(VmHandle {
                        id,
                        driver: self.name().into(),
                        detail: format!("pid {pid}, {}", dir.display()),
                    });
                }
                if let RunState::Exited(r) = s.run_state {
                    return Err(fail(format!("the guest exited before it was ready: {r}")));
                }
            }
            if Instant::now() > deadline {
                let _ = self.kill(id);
                return Err(fail(format!(
                    "not ready within {:?}",
                    self.cfg.start_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts a VM in a new monitor process from a snapshot chain (a full
    /// snapshot, then incrementals), running or left paused.
    pub async fn restore(
        &self,
        id: VmId,
        chain: &[PathBuf],
        paused: bool,
    ) -> Result<VmHandle, DriverError> {
        let mut args = if paused {
            vec!["--paused".to_string()]
        } else {
            Vec::new()
        };
        args.push("--restore".to_string());
        args.extend(chain.iter().map(|p| p.display().to_string()));
        self.launch(id, args, true).await
    }

    fn pid(&self, id: VmId) -> Option<i32> {
        std::fs::read_to_string(self.vm_dir(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn kill(&self, id: VmId) -> bool {
        match self.pid(id).filter(|&p| pid_alive(p)) {
            Some(p) => rustix::process::Pid::from_raw(p).is_some_and(|pid| {
                rustix::process::kill_process(pid, rustix::process::Signal::KILL).is_ok()
            }),
            None => false,
        }
    }

    async fn wait_gone(&self, id: VmId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.pid(id).is_some_and(pid_alive) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

#[async_trait]
impl VmDriver for KvmDriver {
    fn name(&self) -> &'static str {
        "kvm"
    }

    async fn place(
        &self,
        _id: VmId,
        _spec: &tern_proto::VmSpec,
    ) -> Result<Option<tern_proto::HostId>, DriverError> {
        // One machine: every VM runs on the control plane's host.
        Ok(None)
    }

    async fn start(&self, req: &StartRequest) -> Result<VmHandle, DriverError> {
        let s = &req.spec;
        let mut args = vec![
            "--memory".to_string(),
            s.memory_mib.to_string(),
            "--vcpus".to_string(),
            s.vcpus.to_string(),
        ];
        let boot = self
            .cfg
            .images
            .resolve(&s.image)
            .map_err(|e| DriverError::StartFailed {
                id: req.id,
                reason: e.to_string(),
            })?;
        match boot {
            BootImage::Test => args.extend(["--guest".into(), "test".into()]),
            BootImage::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                args.extend(["--guest".into(), "linux".into()]);
                args.extend(["--kernel".into(), kernel.display().to_string()]);
                if let Some(i) = initrd {
                    args.extend(["--initrd".into(), i.display().to_string()]);
                }
                if let Some(c) = cmdline {
                    args.extend(["--cmdline".into(), c]);
                }
            }
        }
        let dir = self.vm_dir(req.id);
        std::fs::create_dir_all(&dir).map_err(|e| DriverError::StartFailed {
            id: req.id,
            reason: e.to_string(),
        })?;
        let spec = serde_json::to_vec_pretty(s).unwrap_or_default();
        let _ = std::fs::write(dir.join("spec.json"), spec);
        self.launch(req.id, args, false).await
    }

    async fn configure(&self, id: VmId, config: &VmConfig) -> Result<(), DriverError> {
        // Kept beside the VM for its agent to fetch; the status call proves
        // the VM is there.
        self.status(id).await?;
        let json = serde_json::to_vec_pretty(config).map_err(|e| op_err(id, "configure", e))?;
        std::fs::write(self.vm_dir(id).join("config.json"), json)
            .map_err(|e| op_err(id, "configure", e))
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        match self.control(id, Request::Stop).await {
            Ok(Response::Ok) => {}
            Ok(Response::Error { message }) => return Err(op_err(id, "stop", message)),
            Ok(_) => {}
            Err(DriverError::NotFound(_)) if !self.vm_dir(id).exists() => {
                return Err(DriverError::NotFound(id))
            }
            Err(_) => {
                self.kill(id);
            }
        }
        if !self.wait_gone(id, Duration::from_secs(10)).await {
            self.kill(id);
            self.wait_gone(id, Duration::from_secs(5)).await;
        }
        Ok(())
    }

    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError> {
        if !self.vm_dir(id).exists() {
            return Err(DriverError::NotFound(id));
        }
        Ok(match self.status(id).await {
            Ok(s) => s.run_state == RunState::Running,
            Err(_) => false,
        })
    }

    async fn cleanup(&self, id: VmId) -> Result<(), DriverError> {
        let dir = self.vm_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        if self.pid(id).is_some_and(pid_alive) {
            let _ = self.stop(id).await;
            if self.pid(id).is_some_and(pid_alive) {
                self.kill(id);
                self.wait_gone(id, Duration::from_secs(5)).await;
            }
        }
        std::fs::remove_dir_all(&dir).map_err(|e| op_err(id, "cleanup", e))
    }

    async fn list(&self) -> Result<Vec<VmId>, DriverError> {
        let rd = std::fs::read_dir(&self.cfg.run_dir).map_err(|e| {
            DriverError::Unavailable(format!("{}: {e}", self.cfg.run_dir.display()))
        })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<VmId>().ok()) else {
                continue;
            };
            if self.pid(id).is_some_and(pid_alive) {
                out.push(id);
            }
        }
        Ok(out)
    }
}

/// Whether a path looks like a usable monitor binary (for clear errors at start-up).
pub fn check_monitor(path: &Path) -> Result<(), DriverError> {
    let found = if path.components().count() > 1 {
        path.exists()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(path).exists()))
    };
    if found {
        Ok(())
    } else {
        Err(DriverError::Unavailable(format!(
            "the monitor binary {} was not found (build it with `cargo build -p tern-drivers`)",
            path.display()
        )))
    }
}
