//! Containers run by `runc` and checkpointed by CRIU: the parts a
//! container's migration is built from.
//!
//! tern runs checkpointable containers with runc rather than through the
//! Docker Engine: a migration needs the checkpoint's every option (CRIU's
//! binary, `--tcp-established`, the network namespace the container joins
//! on the destination, where images and logs go), and runc gives each of
//! them directly. A [`Bundle`] is an OCI bundle (a root filesystem and
//! `config.json`, made from `runc spec` and adjusted); [`Runc`] runs,
//! inspects, checkpoints, restores and deletes containers under a state
//! directory of its own, so tern's containers never mix with others.
//!
//! [`Criu`] finds a CRIU that works on this kernel: Debian 12's 3.17 fails
//! `criu check` on newer kernels, so a configured path, `criu` on PATH and
//! the project's cached 4.2 build (`scripts/criu-setup.sh`) are each tried,
//! and only one that passes `criu check` is used.

mod lazy;

pub use lazy::{ensure_pipe_size, LazyDump};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where `scripts/criu-setup.sh` leaves its build of CRIU 4.2.
pub const CACHED_CRIU: &str = "/var/cache/tern/criu/criu-4.2/criu/criu";

/// Why a container operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// No CRIU that passes `criu check` was found.
    #[error("no working CRIU: tried {tried} (build one with scripts/criu-setup.sh)")]
    NoCriu {
        /// What was tried, and why each was refused.
        tried: String,
    },
    /// A program could not be started at all.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// runc (or CRIU through it) refused an operation.
    #[error("runc {op} {id} failed: {stderr}")]
    Failed {
        /// The runc command.
        op: &'static str,
        /// The container.
        id: String,
        /// What runc said (with CRIU's log tail for checkpoints and restores).
        stderr: String,
    },
    /// A bundle could not be written.
    #[error("bundle {path}: {source}")]
    Bundle {
        /// The bundle directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `runc state` printed something that is not a state.
    #[error("runc state {id}: unreadable answer: {source}")]
    State {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn run(cmd: &mut Command) -> Result<Output, RuncError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| RuncError::Spawn { program, source })
}

/// A CRIU binary that passed `criu check` here.
#[derive(Clone, Debug)]
pub struct Criu {
    path: PathBuf,
}

impl Criu {
    /// The first of `configured`, `criu` on PATH and [`CACHED_CRIU`] that
    /// passes `criu check`.
    pub fn locate(configured: Option<&Path>) -> Result<Self, RuncError> {
        let mut candidates: Vec<PathBuf> = configured.map(Path::to_path_buf).into_iter().collect();
        if let Some(paths) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&paths).map(|d| d.join("criu")));
        }
        candidates.push(PathBuf::from(CACHED_CRIU));
        let mut tried = Vec::new();
        for c in candidates.into_iter().filter(|c| c.is_file()) {
            match run(Command::new(&c).arg("check")) {
                Ok(o) if o.status.success() => return Ok(Self { path: c }),
                Ok(o) => {
                    let why = String::from_utf8_lossy(&o.stderr);
                    let first = why.lines().next().unwrap_or("check failed").to_string();
                    tried.push(format!("{} ({first})", c.display()));
                }
                Err(e) => tried.push(format!("{} ({e})", c.display())),
            }
        }
        if tried.is_empty() {
            tried.push("no criu on PATH or in the cache".into());
        }
        Err(RuncError::NoCriu {
            tried: tried.join("; "),
        })
    }

    /// The binary.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a bundle's container runs and with what limits.
#[derive(Clone, Debug)]
pub struct BundleSpec {
    /// The command and its arguments.
    pub args: Vec<String>,
    /// Memory limit in MiB.
    pub memory_mib: u32,
    /// An existing network namespace to join (`/var/run/netns/NAME`);
    /// `None` gives the container one of its own.
    pub netns: Option<PathBuf>,
    /// The container's cgroup path (runc's `cgroupsPath`); `None` leaves
    /// runc's default, named after the container. Two hosts on one machine
    /// need their own: a lazy migration restores the container on the
    /// destination while the source still holds it, frozen.
    pub cgroup: Option<String>,
}

/// An OCI bundle: `rootfs/` and `config.json` in one directory.
#[derive(Clone, Debug)]
pub struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// Makes a bundle in `dir` from a root filesystem tarball.
    pub fn create(dir: &Path, rootfs_tar: &Path, spec: &BundleSpec) -> Result<Self, RuncError> {
        let bundle_err = |source| RuncError::Bundle {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join("rootfs")).map_err(bundle_err)?;
        let out = run(Command::new("tar")
            .arg("-xf")
            .arg(rootfs_tar)
            .arg("-C")
            .arg(dir.join("rootfs")))?;
        if !out.status.success() {
            return Err(bundle_err(std::io::Error::other(format!(
                "tar: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        Self::around_rootfs(dir, spec)
    }

    /// Makes a bundle of `dir` around the root filesystem already in
    /// `dir/rootfs` (one a checkpoint carried, on a destination host).
    pub fn around_rootfs(dir: &Path, spec: &BundleSpec) -> Result<Self, RuncError> {
        let bundle_err = |source| RuncError::Bundle {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.join("rootfs").is_dir() {
            return Err(bundle_err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no rootfs directory",
            )));
        }
        let _ = std::fs::remove_file(dir.join("config.json"));
        let out = run(Command::new("runc").arg("spec").arg("--bundle").arg(dir))?;
        if !out.status.success() {
            return Err(RuncError::Failed {
                op: "spec",
                id: dir.display().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(bundle_err)?;
        let mut config: Value = serde_json::from_slice(&text)
            .map_err(|e| bundle_err(std::io::Error::other(e.to_string())))?;
        adjust(&mut config, spec);
        let text = serde_json::to_vec_pretty(&config).expect("a JSON value serializes");
        std::fs::write(&path, text).map_err(bundle_err)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The bundle in `dir`, as it is (nothing is read or written).
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The container's root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Where runc's own messages go when it runs or restores the container.
    pub fn log(&self) -> PathBuf {
        self.dir.join("runc.log")
    }
}

/// Adjusts `runc spec`'s default config to `spec`: no terminal (a detached
/// container), a writable root, the command, a memory limit, and the
/// network namespace to join.
fn adjust(config: &mut Value, spec: &BundleSpec) {
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(spec.args);
    config["root"]["readonly"] = json!(false);
    let bytes = u64::from(spec.memory_mib) << 20;
    config["linux"]["resources"]["memory"] = json!({ "limit": bytes, "swap": bytes });
    if let Some(cg) = &spec.cgroup {
        config["linux"]["cgroupsPath"] = json!(cg);
    }
    if let Some(ns) = &spec.netns {
        if let Some(list) = config["linux"]["namespaces"].as_array_mut() {
            for n in list.iter_mut() {
                if n["type"] == "network" {
                    n["path"] = json!(ns);
                }
            }
        }
    }
}

/// How a checkpoint is taken.
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// Keep the container running after the dump (a copy, not a move).
    pub leave_running: bool,
    /// Save established TCP connections (their peers see nothing).
    pub tcp_established: bool,
}

/// runc with its own state directory and a CRIU for checkpoints.
#[derive(Clone, Debug)]
pub struct Runc {
    root: PathBuf,
    criu: Criu,
}

/// A container's state as `runc state` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The container's init process on the host.
    pub pid: u32,
}

impl Runc {
    /// runc keeping its state under `root`, checkpointing with `criu`.
    pub fn new(root: &Path, criu: Criu) -> Self {
        Self {
            root: root.to_path_buf(),
            criu,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.root);
        c.arg("--criu").arg(self.criu.path());
        c
    }

    fn check(&self, op: &'static str, id: &str, out: Output) -> Result<Output, RuncError> {
        if out.status.success() {
            return Ok(out);
        }
        Err(RuncError::Failed {
            op,
            id: id.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// Runs a command whose container keeps runc's standard streams: those
    /// are `/dev/null` (a pipe would be held open by the container and
    /// runc's answer never end; a host file would be outside the
    /// container's mounts, which CRIU cannot dump), so runc's own messages
    /// go to the bundle's `runc.log`, and a failure reports them.
    fn detached(
        &self,
        op: &'static str,
        id: &str,
        bundle: &Bundle,
        mut c: Command,
    ) -> Result<(), RuncError> {
        let log = bundle.log();
        let start = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = c.status().map_err(|source| RuncError::Spawn {
            program: "runc".into(),
            source,
        })?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read(&log).unwrap_or_default();
        let said = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
        Err(RuncError::Failed {
            op,
            id: id.to_string(),
            stderr: said.trim().to_string(),
        })
    }

    /// Starts container `id` from `bundle`, detached; returns when it runs.
    pub fn run(&self, id: &str, bundle: &Bundle) -> Result<(), RuncError> {
        let mut c = self.cmd();
        c.arg("--log").arg(bundle.log());
        c.args(["run", "--detach", "--bundle"])
            .arg(bundle.dir())
            .arg(id);
        self.detached("run", id, bundle, c)
    }

    /// The container's state, or `None` when runc does not know it.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, RuncError> {
        let out = run(self.cmd().args(["state", id]))?;
        if !out.status.success() {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|source| RuncError::State {
            id: id.to_string(),
            source,
        })?;
        Ok(Some(ContainerState {
            status: v["status"].as_str().unwrap_or_default().to_string(),
            pid: v["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
        }))
    }

    /// Runs `args` inside the container; returns its standard output.
    pub fn exec(&self, id: &str, args: &[&str]) -> Result<Vec<u8>, RuncError> {
        let out = run(self.cmd().args(["exec", id]).args(args))?;
        self.check("exec", id, out).map(|o| o.stdout)
    }

    /// Dumps the container into `images` (CRIU's log goes to `work`); the
    /// container stops unless `leave_running`.
    pub fn checkpoint(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        opts: &CheckpointOptions,
    ) -> Result<(), RuncError> {
        let mut c = self.cmd();
        c.arg("checkpoint");
        image_paths(&mut c, images, work);
        if opts.leave_running {
            c.arg("--leave-running");
        }
        if opts.tcp_established {
            c.arg("--tcp-established");
        }
        let out = run(c.arg(id))?;
        self.check("checkpoint", id, out)
            .map_err(|e| with_log(e, &work.join("dump.log")))
            .map(drop)
    }

    /// Restores container `id` from `images` into `bundle`, detached.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Bundle,
        images: &Path,
        work: &Path,
        tcp_established: bool,
    ) -> Result<(), RuncError> {
        let mut c = self.cmd();
        c.arg("--log").arg(bundle.log());
        c.args(["restore", "--detach", "--bundle"])
            .arg(bundle.dir());
        image_paths(&mut c, images, work);
        if tcp_established {
            c.arg("--tcp-established");
        }
        c.arg(id);
        self.detached("restore", id, bundle, c)
            .map_err(|e| with_log(e, &work.join("restore.log")))
    }

    /// Freezes every process of the container (its cgroup's freezer).
    pub fn pause(&self, id: &str) -> Result<(), RuncError> {
        let out = run(self.cmd().args(["pause", id]))?;
        self.check("pause", id, out).map(drop)
    }

    /// Thaws a container [`Runc::pause`] froze.
    pub fn resume(&self, id: &str) -> Result<(), RuncError> {
        let out = run(self.cmd().args(["resume", id]))?;
        self.check("resume", id, out).map(drop)
    }

    /// Kills and deletes the container; one that is gone already is fine.
    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        if self.state(id)?.is_none() {
            return Ok(());
        }
        let out = run(self.cmd().args(["delete", "--force", id]))?;
        self.check("delete", id, out).map(drop)
    }
}

/// Where a checkpoint's images go (or come from) and CRIU's logs go.
fn image_paths(c: &mut Command, images: &Path, work: &Path) {
    c.arg("--image-path")
        .arg(images)
        .arg("--work-path")
        .arg(work);
}

/// Adds CRIU's first errors to a failure (the cause comes first; what
/// follows is its consequences): runc itself only says that CRIU failed.
/// The RLIMIT_NOFILE complaint CRIU logs on every run here is left out.
fn with_log(e: RuncError, log: &Path) -> RuncError {
    let RuncError::Failed { op, id, stderr } = e else {
        return e;
    };
    let tail = std::fs::read_to_string(log)
        .map(|l| {
            let errors = l
                .lines()
                .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"));
            errors.take(3).collect::<Vec<_>>().join(" | ")
        })
        .unwrap_or_default();
    RuncError::Failed {
        op,
        id,
        stderr: if tail.is_empty() {
            stderr
        } else {
            format!("{stderr} (CRIU: {tail})")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_is_applied_to_runcs_defaults() {
        let mut c = json!({
            "process": {"terminal": true, "args": ["sh"]},
            "root": {"path": "rootfs", "readonly": true},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}], "resources": {}}
        });
        let spec = BundleSpec {
            args: vec!["/bin/tern-counter".into()],
            memory_mib: 64,
            netns: Some(PathBuf::from("/var/run/netns/h1")),
            cgroup: None,
        };
        adjust(&mut c, &spec);
        assert_eq!(c["process"]["terminal"], json!(false));
        assert_eq!(c["process"]["args"], json!(["/bin/tern-counter"]));
        assert_eq!(c["root"]["readonly"], json!(false));
        assert_eq!(
            c["linux"]["resources"]["memory"]["limit"],
            json!(64u64 << 20)
        );
        assert_eq!(
            c["linux"]["namespaces"][1]["path"],
            json!("/var/run/netns/h1")
        );
        assert!(c["linux"]["namespaces"][0].get("path").is_none());
    }

    #[test]
    fn a_missing_criu_is_named_with_what_was_tried() {
        let e = Criu::locate(Some(Path::new("/nonexistent/criu")));
        // Either a working criu exists on this machine, or the error says where to get one.
        if let Err(e) = e {
            assert!(e.to_string().contains("criu-setup.sh"), "{e}");
        }
    }
}
