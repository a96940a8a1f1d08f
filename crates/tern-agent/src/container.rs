//! A container slot: tern's counter workload under runc, kept in the guest
//! process's own directory, and checkpointed by CRIU when it moves.
//!
//! The guest process owns the container the way it owns a QEMU: runc keeps
//! its state under `<vm dir>/container/runc`, the bundle (root filesystem
//! and `config.json`) is `<vm dir>/container/bundle`, so containers of two
//! agents on one machine never meet. The workload publishes its counter in
//! `/run/tern-counter` and writes `/run/tern-broken` on any break of
//! continuity (`images/workload/tern-counter.c`), which is what the agent
//! reports as the guest's progress and check.

use crate::config::ContainerHost;
use crate::container_net::ContainerNet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use tern_drivers::runc::{Bundle, BundleSpec, CheckpointOptions, Criu, LazyDump, Runc};
use tern_proto::GuestSpec;

/// A container this process runs (or holds dumped, mid-migration).
pub struct ContainerGuest {
    runc: Runc,
    id: String,
    bundle: Bundle,
    /// Where its working files go (`<vm dir>/container`).
    home: PathBuf,
    /// Set while it is dumped for a migration: the images it is restored
    /// from here if the migration does not commit.
    dumped: Option<PathBuf>,
    /// Its namespace and address, when it has one.
    net: Option<ContainerNet>,
}

/// The directory of a VM's container files.
pub fn home(vm_dir: &Path) -> PathBuf {
    vm_dir.join("container")
}

/// The container's bundle directory (where a checkpoint lands, too).
pub fn bundle_dir(vm_dir: &Path) -> PathBuf {
    home(vm_dir).join("bundle")
}

/// runc's name for the container of `vm`.
fn container_id(vm: &str) -> String {
    format!("tern-{vm}")
}

/// The workload's command line for `spec`.
fn args(spec: &GuestSpec) -> Vec<String> {
    let mut a = vec!["/bin/tern-counter".to_string()];
    if spec.listen_port > 0 {
        a.extend(["--listen".into(), spec.listen_port.to_string()]);
    }
    if spec.ws_mib > 0 && spec.dirty_mib_per_sec > 0 {
        a.extend([
            "--dirty-mib".into(),
            spec.ws_mib.to_string(),
            "--rate-mib".into(),
            spec.dirty_mib_per_sec.to_string(),
        ]);
    }
    a
}

fn bundle_spec(spec: &GuestSpec, net: Option<&ContainerNet>, at: &Placement<'_>) -> BundleSpec {
    BundleSpec {
        args: args(spec),
        memory_mib: u32::try_from(spec.memory_mib).unwrap_or(u32::MAX),
        netns: net.map(ContainerNet::path),
        // Per host: a lazy migration restores the container on the
        // destination while the source holds it frozen in its own cgroup.
        cgroup: Some(format!(
            "/tern-containers/{}/{}",
            at.host_name,
            container_id(at.vm)
        )),
    }
}

/// Who a container is on this host: its VM, the host's name (namespaces
/// are per host, so two agents on one machine never share one) and the
/// host's `[container]`.
pub struct Placement<'a> {
    /// The VM.
    pub vm: &'a str,
    /// This host's name.
    pub host_name: &'a str,
    /// This host's `[container]`.
    pub host: &'a ContainerHost,
}

impl Placement<'_> {
    fn net(&self, vm_dir: &Path, spec: &GuestSpec) -> Result<Option<ContainerNet>, String> {
        let Some(a) = spec.address else {
            return Ok(None);
        };
        let net = ContainerNet::create(self.host_name, self.vm, a, self.host.uplink.as_deref())?;
        let file = home(vm_dir).join("net");
        if let Err(e) = std::fs::write(&file, net.record()) {
            net.remove();
            return Err(format!("{}: {e}", file.display()));
        }
        Ok(Some(net))
    }
}

/// Ends whatever container and namespace a VM directory still holds: a
/// guest process that died (killed, crashed) leaves its container running
/// under runc, which must not run on as a copy nobody owns. Idempotent;
/// a directory without a container is left alone.
pub fn reap(vm_dir: &Path) {
    let home = home(vm_dir);
    let root = home.join("runc");
    if let Ok(list) = std::fs::read_dir(&root) {
        for e in list.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", &id])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    if let Ok(record) = std::fs::read_to_string(home.join("net")) {
        ContainerNet::remove_named(&record);
    }
}

/// runc for the containers of `vm_dir`, with a CRIU that works here.
pub fn runc(vm_dir: &Path, host: &ContainerHost) -> Result<Runc, String> {
    let criu = Criu::locate(host.criu.as_deref()).map_err(|e| e.to_string())?;
    let root = home(vm_dir).join("runc");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    Ok(Runc::new(&root, criu))
}

impl ContainerGuest {
    /// Starts the workload of `spec` from the host's rootfs (blocking).
    pub fn boot(vm_dir: &Path, at: &Placement<'_>, spec: &GuestSpec) -> Result<Self, String> {
        let runc = runc(vm_dir, at.host)?;
        let net = at.net(vm_dir, spec)?;
        let mut g = Self {
            runc,
            id: container_id(at.vm),
            bundle: Bundle::at(&bundle_dir(vm_dir)),
            home: home(vm_dir),
            dumped: None,
            net,
        };
        let started = Bundle::create(
            &bundle_dir(vm_dir),
            &at.host.rootfs,
            &bundle_spec(spec, g.net.as_ref(), at),
        )
        .map_err(|e| e.to_string())
        .and_then(|b| {
            g.bundle = b;
            g.runc.run(&g.id, &g.bundle).map_err(|e| e.to_string())
        })
        .and_then(|()| g.net.as_ref().map_or(Ok(()), ContainerNet::route))
        .and_then(|()| g.wait_counting(std::time::Duration::from_secs(20)));
        if let Err(e) = started {
            g.discard();
            return Err(e);
        }
        Ok(g)
    }

    /// The container of a checkpoint unpacked into [`bundle_dir`], not yet
    /// restored (blocking).
    pub fn landed(vm_dir: &Path, at: &Placement<'_>, spec: &GuestSpec) -> Result<Self, String> {
        let runc = runc(vm_dir, at.host)?;
        let dir = bundle_dir(vm_dir);
        let net = at.net(vm_dir, spec)?;
        let bundle = match Bundle::around_rootfs(&dir, &bundle_spec(spec, net.as_ref(), at)) {
            Ok(b) => b,
            Err(e) => {
                if let Some(n) = &net {
                    n.remove();
                }
                return Err(e.to_string());
            }
        };
        Ok(Self {
            runc,
            id: container_id(at.vm),
            bundle,
            home: home(vm_dir),
            dumped: Some(dir.join("images")),
            net,
        })
    }

    fn wait_counting(&self, within: std::time::Duration) -> Result<(), String> {
        let t = std::time::Instant::now();
        while self.counter() == 0 {
            if let Some(why) = self.broken() {
                return Err(format!("the workload broke: {why}"));
            }
            if t.elapsed() > within {
                return Err(format!("the workload did not start counting in {within:?}"));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// The workload's counter (0 before its first tick).
    pub fn counter(&self) -> u64 {
        std::fs::read_to_string(self.bundle.rootfs().join("run/tern-counter"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Why the workload found its own state broken, if it did.
    pub fn broken(&self) -> Option<String> {
        std::fs::read_to_string(self.bundle.rootfs().join("run/tern-broken")).ok()
    }

    /// Whether runc reports it running.
    pub fn is_alive(&self) -> bool {
        self.dumped.is_none()
            && matches!(self.runc.state(&self.id), Ok(Some(s)) if s.status == "running")
    }

    /// Whether it is frozen (fenced or paused by an operator).
    pub fn is_paused(&self) -> bool {
        matches!(self.runc.state(&self.id), Ok(Some(s)) if s.status == "paused")
    }

    /// Freezes or thaws it.
    pub fn set_paused(&mut self, paused: bool) -> Result<(), String> {
        let r = if paused {
            self.runc.pause(&self.id)
        } else {
            self.runc.resume(&self.id)
        };
        r.map_err(|e| e.to_string())
    }

    /// Dumps it for a move into `scratch/images` (it stops; its TCP
    /// connections are saved): returns the images directory.
    pub fn dump(&mut self, scratch: &Path) -> Result<PathBuf, String> {
        let _ = std::fs::remove_dir_all(scratch);
        let images = scratch.join("images");
        std::fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
        let opts = CheckpointOptions {
            leave_running: false,
            tcp_established: true,
        };
        self.runc
            .checkpoint(&self.id, &images, &scratch.join("dump-work"), &opts)
            .map_err(|e| e.to_string())?;
        self.dumped = Some(images.clone());
        Ok(images)
    }

    /// Dumps it lazily for a move into `scratch/images`: everything but
    /// its memory, which CRIU then serves from the returned dump's page
    /// server while the container stays frozen here (blocking).
    pub fn dump_lazy(&mut self, scratch: &Path) -> Result<(PathBuf, LazyDump), String> {
        let _ = std::fs::remove_dir_all(scratch);
        let images = scratch.join("images");
        std::fs::create_dir_all(&images).map_err(|e| format!("{}: {e}", images.display()))?;
        let dump = self
            .runc
            .checkpoint_lazy(&self.id, &images, &scratch.join("dump-work"), true)
            .map_err(|e| e.to_string())?;
        self.dumped = Some(images.clone());
        Ok((images, dump))
    }

    /// Lets a lazily dumped container run on here: the migration did not
    /// commit and no restore took a page (blocking). CRIU leaves the
    /// connections it locked for the dump locked when a lazy transfer
    /// fails; the container's namespace is tern's own, so its filter rules
    /// are cleared.
    ///
    /// `open` is the connection to the dump's page server, if one was made.
    pub fn resume_lazy(&mut self, dump: LazyDump, open: Option<TcpStream>) -> Result<(), String> {
        dump.cancel(open).map_err(|e| e.to_string())?;
        self.dumped = None;
        if let Some(n) = &self.net {
            n.unlock_filters();
        }
        Ok(())
    }

    /// Keeps a lazily dumped container whole and frozen here while a
    /// committed migration is in doubt (blocking): frozen by its cgroup
    /// first, so that the end of the dump lets nothing run. [`Self::restore`]
    /// thaws it; [`Self::discard`] ends it.
    pub fn hold_lazy(&mut self, dump: LazyDump, open: Option<TcpStream>) -> Result<(), String> {
        self.set_paused(true)?;
        self.resume_lazy(dump, open)
    }

    /// Restores it from the images it was dumped into (a migration that did
    /// not commit, or one that landed here and committed).
    /// A container held frozen ([`Self::hold_lazy`]) is thawed.
    pub fn restore(&mut self) -> Result<(), String> {
        let Some(images) = self.dumped.clone() else {
            if self.is_paused() {
                return self.set_paused(false);
            }
            return Err("the container is neither dumped nor held".into());
        };
        let work = self.restore_work();
        self.runc
            .restore(&self.id, &self.bundle, &images, &work, true)
            .map_err(|e| e.to_string())?;
        self.restored()
    }

    /// Restores a lazily dumped container that landed here, its memory
    /// pulled through `page_server` (a relay of the source's) by the
    /// returned `criu lazy-pages` daemon (blocking).
    pub fn restore_lazy(&mut self, page_server: SocketAddr) -> Result<Child, String> {
        let images = self.dumped.clone().ok_or("the container is not dumped")?;
        let work = self.restore_work();
        let daemon = self
            .runc
            .restore_lazy(&self.id, &self.bundle, &images, &work, page_server)
            .map_err(|e| e.to_string())?;
        self.restored()?;
        Ok(daemon)
    }

    fn restore_work(&self) -> PathBuf {
        self.home.join(format!(
            "restore-work-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0)
        ))
    }

    fn restored(&mut self) -> Result<(), String> {
        self.dumped = None;
        if let Some(n) = &self.net {
            n.route()?;
            n.announce();
        }
        Ok(())
    }

    /// Its root filesystem (what a checkpoint carries beside the images).
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.rootfs()
    }

    /// Where its working files go.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Ends it.
    pub fn stop(&mut self) {
        if let Err(e) = self.runc.delete(&self.id) {
            tracing::error!(error = %e, "deleting the container");
        }
    }

    /// Ends it and removes its files and its namespace: it runs on
    /// another host now (or never ran here).
    pub fn discard(&mut self) {
        self.stop();
        if let Some(n) = &self.net {
            n.remove();
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_follows_the_spec() {
        let spec = GuestSpec {
            kind: tern_proto::GuestKind::Container,
            listen_port: 7000,
            ws_mib: 8,
            dirty_mib_per_sec: 4,
            ..GuestSpec::default()
        };
        assert_eq!(
            args(&spec).join(" "),
            "/bin/tern-counter --listen 7000 --dirty-mib 8 --rate-mib 4"
        );
        let quiet = GuestSpec {
            dirty_mib_per_sec: 0,
            ..GuestSpec::default()
        };
        assert_eq!(args(&quiet), ["/bin/tern-counter"]);
    }
}
