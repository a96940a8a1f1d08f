//! The `qemu` driver: real Linux guests in QEMU, one process per VM, driven
//! over QMP.
//!
//! Each VM gets a directory holding its QMP socket (`qmp.sock`), serial
//! console log (`console.log`), QEMU's own output (`qemu.log`), pid file and
//! disks. QEMU runs in its own process group, so a VM outlives a restart of
//! whoever started it; [`QemuVm`] kills its process when dropped, and the
//! driver's `cleanup` leaves no process, socket or file behind.
//!
//! The accelerator is KVM when the host has hardware virtualization (and
//! `/dev/kvm`), TCG otherwise; the VM's status says which. On hosts whose
//! `/dev/kvm` cannot run a stock kernel (PVM), the CPU flags show no
//! `vmx`/`svm`, so TCG is chosen.

pub mod load;
pub mod qmp;

use crate::images::{BootImage, ImageCatalogue};
use crate::{DriverError, StartRequest, VmDriver, VmHandle};
use async_trait::async_trait;
use qmp::{Qmp, QmpError};
use serde_json::json;
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tern_proto::{VmConfig, VmId};

/// How guest code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's binary translator: slow, works everywhere.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` exists and the CPU has `vmx` or `svm`, else TCG.
    pub fn detect() -> Accel {
        let hw = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false);
        if hw && Path::new("/dev/kvm").exists() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Disk image formats `qemu-img` makes for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Copy-on-write, grows as written.
    Qcow2,
    /// A plain file.
    Raw,
}

/// A disk to create for a VM (attached as virtio-blk, in order).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// Size, MiB.
    pub size_mib: u64,
    /// Image format.
    pub format: DiskFormat,
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QemuSpec {
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line words (the console is set by the driver).
    pub cmdline: String,
    /// Disks to create.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
}

impl QemuSpec {
    /// Checks what a user gave before anything is started.
    pub fn validate(&self) -> Result<(), String> {
        if !self.kernel.is_file() {
            return Err(format!(
                "kernel {} not found (scripts/guest-kernel.sh fetches Debian's)",
                self.kernel.display()
            ));
        }
        if let Some(i) = &self.initrd {
            if !i.is_file() {
                return Err(format!("initrd {} not found", i.display()));
            }
        }
        if !(16..=65536).contains(&self.memory_mib) {
            return Err(format!(
                "memory_mib {} must be in 16..=65536",
                self.memory_mib
            ));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(format!("vcpus {} must be in 1..=64", self.vcpus));
        }
        if self.disks.iter().any(|d| d.size_mib == 0) {
            return Err("a disk needs a size above 0".into());
        }
        Ok(())
    }
}

/// How a VM's QEMU starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Launch {
    /// Boot the kernel.
    Boot,
    /// Wait paused for an incoming migration, started later with
    /// `migrate-incoming` (so capabilities can be set first), and stay
    /// paused after it until told to run (`cont`): tern commits first.
    Incoming,
    /// As `Incoming`, but run as soon as the migration completes (QEMU's own
    /// behaviour; the benchmark's baseline).
    IncomingAutostart,
}

/// Where QEMU lives and how long things may take.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `qemu-img`.
    pub qemu_img: PathBuf,
    /// Accelerator (detected by default).
    pub accel: Accel,
    /// Launch to ready line.
    pub start_timeout: Duration,
    /// One QMP exchange.
    pub qmp_timeout: Duration,
    /// Kill QEMU when the process that started it dies (Linux's parent-death
    /// signal, set by `setpriv`). A host agent that keeps its VMs in its own
    /// lifetime sets this, so a crashed agent leaves no orphan copy running.
    pub die_with_parent: bool,
    /// QEMU's own seccomp filter (`-sandbox on`, denying obsolete calls,
    /// privilege changes, process spawning and resource control): a guest
    /// that escapes into QEMU cannot start programs or change its uid.
    pub sandbox: bool,
    /// Run QEMU as this uid:gid, chrooted to its VM directory (`-runas`,
    /// `-chroot`: it drops both once its files are open). Paths QEMU is
    /// told later (migration sockets) are then given inside that root
    /// ([`QemuVm::path_for_qemu`]).
    pub confine: Option<(u32, u32)>,
}

/// QEMU's `-sandbox` argument when [`QemuConfig::sandbox`] is on.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The same for a confined QEMU, which must change its uid once (`-runas`)
/// and cannot regain root after.
const SANDBOX_CONFINED: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_img: PathBuf::from("qemu-img"),
            accel: Accel::detect(),
            start_timeout: Duration::from_secs(120),
            qmp_timeout: Duration::from_secs(10),
            die_with_parent: false,
            sandbox: true,
            confine: None,
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z ") && !s.contains(") X "))
        .unwrap_or(false)
}

fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid file a QEMU launched in `dir` writes (before it drops its
/// privileges, so also when confined).
pub fn pidfile(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// Ends the QEMU launched in `dir` if it still runs: the process its pid
/// file names, when that process's command line names the same pid file (a
/// pid since reused by anything else is left alone). Returns its pid.
///
/// QEMU dies with the process that launched it (a parent-death signal),
/// except when confined: `-runas` changes its uid, and the kernel clears
/// the signal on that change. Whoever sees a launching process end calls
/// this, so no unmanaged copy of a guest runs on.
pub fn kill_stray(dir: &Path) -> Option<i32> {
    use std::os::unix::ffi::OsStrExt;
    let file = pidfile(dir);
    let pid: i32 = std::fs::read_to_string(&file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let wanted = file.as_os_str().as_bytes();
    if !cmdline.split(|&b| b == 0).any(|arg| arg == wanted) {
        return None;
    }
    let target = rustix::process::Pid::from_raw(pid)?;
    rustix::process::kill_process(target, rustix::process::Signal::KILL).ok()?;
    Some(pid)
}

/// QEMU processes whose command line mentions `dir` (a VM directory, or a
/// directory holding VM directories): how tests and benchmarks find the
/// QEMUs an agent runs, and check that none is left behind.
pub fn pids_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// One QEMU process.
pub struct QemuVm {
    dir: PathBuf,
    pid: i32,
    accel: Accel,
    qmp_timeout: Duration,
    spec: QemuSpec,
    confine: Option<(u32, u32)>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QemuVm(pid {}, {})", self.pid, self.dir.display())
    }
}

impl QemuVm {
    /// Starts QEMU for `spec` in `dir` (created; disks made with `qemu-img`).
    /// A booting VM is returned once QMP answers; wait for its console with
    /// [`QemuVm::wait_console`]. An incoming one waits paused.
    pub async fn launch(
        cfg: &QemuConfig,
        dir: &Path,
        spec: &QemuSpec,
        how: Launch,
    ) -> Result<QemuVm, String> {
        spec.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for name in ["qmp.sock", "console.log"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_file(pidfile(dir));
        let mut cmd = if cfg.die_with_parent {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(&cfg.qemu);
            c
        } else {
            Command::new(&cfg.qemu)
        };
        let cpu = match cfg.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "qemu64",
        };
        cmd.arg("-name")
            .arg(format!(
                "tern-{}",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ))
            .args(["-machine", &format!("q35,accel={}", cfg.accel.name())])
            .args(["-cpu", cpu])
            .args(["-m", &spec.memory_mib.to_string()])
            .args(["-smp", &spec.vcpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-no-reboot"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .args([
                "-append",
                &format!("console=ttyS0 quiet panic=-1 {}", spec.cmdline),
            ])
            .arg("-chardev")
            .arg(format!(
                "file,id=con,path={}",
                dir.join("console.log").display()
            ))
            .args(["-serial", "chardev:con"])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("qmp.sock").display()
            ))
            .arg("-pidfile")
            .arg(pidfile(dir));
        if let Some(i) = &spec.initrd {
            cmd.arg("-initrd").arg(i);
        }
        match (cfg.sandbox, cfg.confine) {
            (true, None) => {
                cmd.args(["-sandbox", SANDBOX]);
            }
            (true, Some(_)) => {
                cmd.args(["-sandbox", SANDBOX_CONFINED]);
            }
            (false, _) => {}
        }
        if let Some((uid, gid)) = cfg.confine {
            // Its own directory becomes its root; it may write there only.
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.display()))?;
            cmd.args(["-runas", &format!("{uid}:{gid}")])
                .arg("-chroot")
                .arg(dir);
        }
        for (n, d) in spec.disks.iter().enumerate() {
            let fmt = match d.format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            let path = dir.join(format!("disk{n}.{fmt}"));
            if !path.exists() {
                let out = Command::new(&cfg.qemu_img)
                    .args(["create", "-q", "-f", fmt])
                    .arg(&path)
                    .arg(format!("{}M", d.size_mib))
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", cfg.qemu_img.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "qemu-img create {}: {}",
                        path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            cmd.arg("-drive").arg(format!(
                "file={},format={fmt},if=virtio,cache=none,aio=threads",
                path.display()
            ));
        }
        match how {
            Launch::Boot => {}
            Launch::Incoming => {
                cmd.args(["-S", "-incoming", "defer"]);
            }
            Launch::IncomingAutostart => {
                cmd.args(["-incoming", "defer"]);
            }
        }
        let log =
            std::fs::File::create(dir.join("qemu.log")).map_err(|e| format!("qemu.log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // One thread spawns QEMU and reaps it when it ends (no zombie). The
        // parent-death signal fires when the spawning *thread* exits, so that
        // thread must live exactly as long as QEMU: this one does.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id() as i32));
                let _ = child.wait();
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        });
        let pid = rx
            .recv()
            .map_err(|_| "the QEMU launcher thread died".to_string())?
            .map_err(|e| format!("cannot run {}: {e}", cfg.qemu.display()))?;
        let vm = QemuVm {
            dir: dir.to_path_buf(),
            pid,
            accel: cfg.accel,
            qmp_timeout: cfg.qmp_timeout,
            spec: spec.clone(),
            confine: cfg.confine,
        };
        let deadline = Instant::now() + cfg.start_timeout.min(Duration::from_secs(30));
        loop {
            if !vm.is_alive() {
                return Err(format!("QEMU exited: {}", vm.qemu_log().trim()));
            }
            if vm.dir.join("qmp.sock").exists() && vm.qmp().await.is_ok() {
                return Ok(vm);
            }
            if Instant::now() > deadline {
                return Err("QEMU's QMP socket did not answer within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A fresh QMP connection (QEMU serves one at a time: drop it when done).
    pub async fn qmp(&self) -> Result<Qmp, QmpError> {
        Qmp::connect(&self.dir.join("qmp.sock"), self.qmp_timeout).await
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How QEMU names `name` in its directory: inside its root when it is
    /// confined, else the full path.
    pub fn path_for_qemu(&self, name: &str) -> String {
        match self.confine {
            Some(_) => format!("/{name}"),
            None => self.dir.join(name).display().to_string(),
        }
    }

    /// Lets a confined QEMU use `path` (a socket tern made for it).
    pub fn give_to_qemu(&self, path: &Path) -> std::io::Result<()> {
        match self.confine {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// QEMU's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The accelerator it runs on.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// What it was started from.
    pub fn spec(&self) -> &QemuSpec {
        &self.spec
    }

    /// Whether the process still runs.
    pub fn is_alive(&self) -> bool {
        pid_alive(self.pid)
    }

    /// Whether the QEMU process is stopped (SIGSTOP, a debugger): alive,
    /// yet its guest cannot advance.
    pub fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // The state follows the command name, which may itself hold ')'.
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        matches!(state, Some("T" | "t"))
    }

    /// Everything the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read(self.dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }

    /// Waits until the console satisfies `pred`, or fails with the tail of
    /// the console when QEMU exits or `timeout` passes.
    pub async fn wait_console(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if pred(&text) {
                return Ok(text);
            }
            let tail = || {
                let t: Vec<&str> = text.lines().rev().take(5).collect();
                t.into_iter().rev().collect::<Vec<_>>().join(" | ")
            };
            if !self.is_alive() {
                return Err(format!(
                    "QEMU exited ({}); console: {}",
                    self.qemu_log().trim(),
                    tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "console not as expected after {timeout:?}: {}",
                    tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks QEMU to quit, then kills it if it has not within a second.
    pub async fn shutdown(&mut self) {
        if self.is_alive() {
            if let Ok(mut q) = self.qmp().await {
                let _ = q.run("quit", json!({})).await;
            }
            let t = Instant::now();
            while self.is_alive() && t.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.kill();
    }

    /// Kills QEMU now and removes its sockets (the directory stays for the
    /// logs; [`QemuVm::remove`] deletes it).
    pub fn kill(&mut self) {
        if let Some(p) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        // Until reaped (by the thread that waits for it), not just dead.
        let t = Instant::now();
        while pid_exists(self.pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(self.dir.join("qmp.sock"));
        let _ = std::fs::remove_file(pidfile(&self.dir));
    }

    /// Kills QEMU and deletes the VM's directory.
    pub fn remove(mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.is_alive() {
            self.kill();
        }
    }
}

/// The qemu driver: the [`VmDriver`] face of [`QemuVm`].
pub struct QemuDriver {
    cfg: QemuConfig,
    run_dir: PathBuf,
    images: ImageCatalogue,
    vms: Mutex<HashMap<VmId, QemuVm>>,
}

fn op_err(id: VmId, op: &'static str, reason: impl std::fmt::Display) -> DriverError {
    DriverError::OperationFailed {
        id,
        op,
        reason: reason.to_string(),
    }
}

impl QemuDriver {
    /// A driver keeping VM directories under `run_dir`.
    pub fn new(
        cfg: QemuConfig,
        run_dir: PathBuf,
        images: ImageCatalogue,
    ) -> Result<Self, DriverError> {
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| DriverError::Unavailable(format!("{}: {e}", run_dir.display())))?;
        let ok = Command::new(&cfg.qemu)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(DriverError::Unavailable(format!(
                "{} does not run (apt-get install qemu-system-x86)",
                cfg.qemu.display()
            )));
        }
        Ok(Self {
            cfg,
            run_dir,
            images,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The spec a control-plane request means: a catalogue image with a kernel.
    pub fn spec_of(&self, req: &StartRequest) -> Result<QemuSpec, String> {
        let s = &req.spec;
        match self.images.resolve(&s.image).map_err(|e| e.to_string())? {
            BootImage::Test => Err(format!(
                "the qemu driver boots Linux images, not `{}`",
                s.image
            )),
            BootImage::Linux {
                kernel,
                initrd,
                cmdline,
            } => Ok(QemuSpec {
                memory_mib: s.memory_mib as u64,
                vcpus: s.vcpus,
                kernel,
                initrd,
                cmdline: cmdline.unwrap_or_default(),
                disks: Vec::new(),
            }),
        }
    }

    fn with_vm<T>(&self, id: VmId, f: impl FnOnce(&mut QemuVm) -> T) -> Result<T, DriverError> {
        let mut vms = self.vms.lock().expect("vms");
        vms.get_mut(&id).map(f).ok_or(DriverError::NotFound(id))
    }
}

#[async_trait]
impl VmDriver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
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
        let id = req.id;
        let fail = |reason: String| DriverError::StartFailed { id, reason };
        let spec = self.spec_of(req).map_err(fail)?;
        let dir = self.run_dir.join(id.to_string());
        let vm = QemuVm::launch(&self.cfg, &dir, &spec, Launch::Boot)
            .await
            .map_err(fail)?;
        // Ready: the initramfs's line, or any userspace line of tern's workload.
        vm.wait_console(self.cfg.start_timeout, |c| {
            c.contains("tern-ready") || c.contains("tern-load ready")
        })
        .await
        .map_err(fail)?;
        let detail = format!(
            "pid {}, accel {}, {}",
            vm.pid(),
            vm.accel().name(),
            dir.display()
        );
        self.vms.lock().expect("vms").insert(id, vm);
        Ok(VmHandle {
            id,
            driver: "qemu".into(),
            detail,
        })
    }

    async fn configure(&self, id: VmId, _config: &VmConfig) -> Result<(), DriverError> {
        // Linux guests take configuration from their image and command line;
        // there is no in-guest agent channel yet, so this only checks the VM.
        self.with_vm(id, |_| ())
    }

    async fn stop(&self, id: VmId) -> Result<(), DriverError> {
        let vm = self.vms.lock().expect("vms").remove(&id);
        match vm {
            Some(mut vm) => {
                vm.shutdown().await;
                self.vms.lock().expect("vms").insert(id, vm);
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn is_healthy(&self, id: VmId) -> Result<bool, DriverError> {
        let path = self.with_vm(id, |vm| {
            if vm.is_alive() {
                Some(vm.dir().join("qmp.sock"))
            } else {
                None
            }
        })?;
        let Some(path) = path else { return Ok(false) };
        let mut q = Qmp::connect(&path, self.cfg.qmp_timeout)
            .await
            .map_err(|e| op_err(id, "health", e))?;
        let s = q.status().await.map_err(|e| op_err(id, "health", e))?;
        // Running per QEMU, and the guest itself said it came up.
        let console = self.with_vm(id, |vm| vm.console())?;
        Ok(s.running && (console.contains("tern-ready") || console.contains("tern-load ready")))
    }

    async fn cleanup(&self, id: VmId) -> Result<(), DriverError> {
        let vm = self.vms.lock().expect("vms").remove(&id);
        if let Some(mut vm) = vm {
            vm.shutdown().await;
            vm.remove();
        } else {
            let _ = std::fs::remove_dir_all(self.run_dir.join(id.to_string()));
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmId>, DriverError> {
        let vms = self.vms.lock().expect("vms");
        Ok(vms
            .iter()
            .filter(|(_, vm)| vm.is_alive())
            .map(|(id, _)| *id)
            .collect())
    }
}

/// Test support: the guest kernel and initramfs named by the environment
/// (`TERN_GUEST_KERNEL`, `TERN_GUEST_INITRD`, set by `scripts/test.sh`), and
/// QEMU itself.
pub mod testing {
    use std::path::PathBuf;

    /// `(kernel, initrd)` when both exist and QEMU runs; otherwise says
    /// SKIPPED and why, or panics when `TERN_REQUIRE_QEMU=1` (CI must not skip).
    pub fn guest_or_skip() -> Option<(PathBuf, PathBuf)> {
        let files = std::env::var_os("TERN_GUEST_KERNEL")
            .map(PathBuf::from)
            .zip(std::env::var_os("TERN_GUEST_INITRD").map(PathBuf::from))
            .filter(|(k, i)| k.is_file() && i.is_file());
        let qemu = std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let why = match (&files, qemu) {
            (Some(_), true) => return files,
            (None, _) => "no guest kernel (run scripts/guest-kernel.sh and set TERN_GUEST_KERNEL, TERN_GUEST_INITRD)",
            (_, false) => "qemu-system-x86_64 is not installed",
        };
        if std::env::var("TERN_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("TERN_REQUIRE_QEMU=1 but {why}");
        }
        eprintln!("SKIPPED: {why}");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose command line holds `arg` (as its `argv[0]`),
    /// returned once that command line is readable: `spawn` returns while
    /// exec is still setting it up.
    fn process_naming(arg: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("sleep")
            .arg0(arg)
            .arg("30")
            .spawn()
            .unwrap();
        let cmdline = format!("/proc/{}/cmdline", child.id());
        while std::fs::read(&cmdline).unwrap().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn a_stray_is_ended_only_when_its_command_line_names_the_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        // A pid reused by another process: left alone.
        let mut unrelated = process_naming(&pidfile(other.path()));
        std::fs::write(pidfile(dir.path()), format!("{}\n", unrelated.id())).unwrap();
        assert_eq!(kill_stray(dir.path()), None);
        assert!(unrelated.try_wait().unwrap().is_none(), "it was left alone");
        unrelated.kill().unwrap();
        unrelated.wait().unwrap();
        // The process the pid file names, naming it back: ended.
        let mut stray = process_naming(&pidfile(dir.path()));
        std::fs::write(pidfile(dir.path()), format!("{}\n", stray.id())).unwrap();
        assert_eq!(kill_stray(dir.path()), Some(stray.id() as i32));
        let status = stray.wait().unwrap();
        assert!(!status.success(), "killed: {status:?}");
        // No pid file, or garbage in it: nothing to do.
        std::fs::write(pidfile(dir.path()), "not a pid").unwrap();
        assert_eq!(kill_stray(dir.path()), None);
        assert_eq!(kill_stray(other.path()), None);
    }
}
