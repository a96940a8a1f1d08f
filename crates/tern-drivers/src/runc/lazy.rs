//! Lazy checkpoints (CRIU's post-copy for containers): the source dumps
//! everything but the memory, keeps the container frozen and serves its
//! pages from a page server; the destination restores at once and a
//! `criu lazy-pages` daemon pulls each page on its first touch (userfaultfd),
//! then the rest in the background. The downtime no longer carries the
//! memory, which is what makes it a fraction of a plain dump + restore.
//!
//! CRIU's rules, which the caller must respect:
//! - The page server is served once. A connection that simply closes counts
//!   as a finished transfer, and CRIU then ends the frozen container here.
//!   [`LazyDump::cancel`] sends a command CRIU refuses instead, so the
//!   transfer fails and CRIU lets the container run on (before any restore
//!   took it).
//! - A transfer that fails after the destination ran the container leaves
//!   CRIU resuming the frozen one here: the caller ends it, the migration
//!   being committed.
//! - CRIU sizes its page pipes past the default `fs.pipe-max-size` (1 MiB);
//!   without `CAP_SYS_RESOURCE` (as under this sandbox) its page server then
//!   fails (`splice: Bad file descriptor`). [`ensure_pipe_size`] raises the
//!   limit.

use super::{image_paths, with_log, Bundle, Runc, RuncError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `fs.pipe-max-size` CRIU's page server needs: its pipes hold 819
/// pages (3.2 MiB); 8 MiB leaves room.
const PIPE_MAX: u64 = 8 << 20;
const PIPE_MAX_FILE: &str = "/proc/sys/fs/pipe-max-size";
/// How long CRIU may take to dump a container's state (not its memory).
const DUMP_WAIT: Duration = Duration::from_secs(120);

/// Raises `fs.pipe-max-size` to what CRIU's page server needs, if lower.
pub fn ensure_pipe_size() -> Result<(), RuncError> {
    let now: u64 = std::fs::read_to_string(PIPE_MAX_FILE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if now >= PIPE_MAX {
        return Ok(());
    }
    std::fs::write(PIPE_MAX_FILE, PIPE_MAX.to_string()).map_err(|source| RuncError::Bundle {
        path: PIPE_MAX_FILE.into(),
        source,
    })
}

/// A free port on loopback for CRIU's page server (bound and released:
/// CRIU binds it a moment later).
fn free_port() -> Result<SocketAddr, RuncError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| RuncError::Spawn {
            program: "a loopback port for CRIU's page server".into(),
            source,
        })
}

/// Kills and reaps a helper process (runc, the lazy-pages daemon).
fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A container dumped lazily: frozen here, its images written, its memory
/// served from [`LazyDump::page_server`] until a restore took it all.
pub struct LazyDump {
    child: Child,
    id: String,
    page_server: SocketAddr,
    log: PathBuf,
}

impl Runc {
    /// Dumps container `id` into `images`, all but its memory, and returns
    /// once CRIU serves the memory (blocking).
    pub fn checkpoint_lazy(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        tcp_established: bool,
    ) -> Result<LazyDump, RuncError> {
        ensure_pipe_size()?;
        let page_server = free_port()?;
        let spawn_err = |source| RuncError::Spawn {
            program: "runc checkpoint --lazy-pages".into(),
            source,
        };
        std::fs::create_dir_all(work).map_err(spawn_err)?;
        // CRIU writes one byte to the status pipe once it serves pages; the
        // pipe's write end is runc's only (ours closes after the spawn), so
        // a runc that fails ends the read.
        let (status_r, status_w) = rustix::pipe::pipe().map_err(|e| spawn_err(e.into()))?;
        let mut c = self.cmd();
        c.args(["checkpoint", "--lazy-pages", "--page-server"])
            .arg(page_server.to_string())
            .arg("--status-fd")
            .arg(status_w.as_raw_fd().to_string());
        image_paths(&mut c, images, work);
        if tcp_established {
            c.arg("--tcp-established");
        }
        let err = std::fs::File::create(work.join("runc-checkpoint.err")).map_err(spawn_err)?;
        c.arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let child = c.spawn().map_err(spawn_err)?;
        drop(status_w);
        let mut dump = LazyDump {
            child,
            id: id.to_string(),
            page_server,
            log: work.join("dump.log"),
        };
        let mut byte = [0u8; 1];
        let mut status = std::fs::File::from(status_r);
        match status.read(&mut byte) {
            Ok(1) => Ok(dump),
            _ => Err(dump.failure()),
        }
    }

    /// Restores container `id` from lazily dumped `images` into `bundle`,
    /// its memory pulled from `page_server` (a relay of the source's) by a
    /// `criu lazy-pages` daemon; returns the daemon once the container runs.
    pub fn restore_lazy(
        &self,
        id: &str,
        bundle: &Bundle,
        images: &Path,
        work: &Path,
        page_server: SocketAddr,
    ) -> Result<Child, RuncError> {
        ensure_pipe_size()?;
        let spawn_err = |source| RuncError::Spawn {
            program: "criu lazy-pages".into(),
            source,
        };
        std::fs::create_dir_all(work).map_err(spawn_err)?;
        let mut daemon = Command::new(self.criu.path())
            .args(["lazy-pages", "--page-server", "--address"])
            .arg(page_server.ip().to_string())
            .arg("--port")
            .arg(page_server.port().to_string())
            .arg("-D")
            .arg(images)
            .arg("-W")
            .arg(work)
            .args(["-v4", "-o", "lazy-pages.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(spawn_err)?;
        let socket = work.join("lazy-pages.socket");
        let t = Instant::now();
        while !socket.exists() {
            if let Ok(Some(_)) = daemon.try_wait() {
                return Err(with_log(
                    RuncError::Failed {
                        op: "lazy-pages",
                        id: id.to_string(),
                        stderr: "the lazy-pages daemon exited".into(),
                    },
                    &work.join("lazy-pages.log"),
                ));
            }
            if t.elapsed() > Duration::from_secs(10) {
                end(&mut daemon);
                return Err(RuncError::Failed {
                    op: "lazy-pages",
                    id: id.to_string(),
                    stderr: "the lazy-pages daemon made no socket in 10 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = self.cmd();
        c.arg("--log").arg(bundle.log());
        c.args(["restore", "--detach", "--lazy-pages", "--bundle"])
            .arg(bundle.dir());
        image_paths(&mut c, images, work);
        c.arg("--tcp-established").arg(id);
        if let Err(e) = self.detached("restore", id, bundle, c) {
            end(&mut daemon);
            return Err(with_log(e, &work.join("restore.log")));
        }
        Ok(daemon)
    }
}

impl LazyDump {
    /// Where CRIU serves the container's pages (loopback).
    pub fn page_server(&self) -> SocketAddr {
        self.page_server
    }

    /// Waits for the transfer to end (blocking): `Ok` once every page went
    /// and CRIU ended the container here.
    pub fn finish(mut self) -> Result<(), RuncError> {
        match self.child.wait() {
            Ok(s) if s.success() => Ok(()),
            _ => Err(self.failure()),
        }
    }

    /// Gives the migration up before any restore pulled a page: CRIU is
    /// sent a command it refuses, fails the transfer and lets the frozen
    /// container run on here (blocking). A silent close would instead read
    /// as a finished transfer and end the container.
    ///
    /// `open` is the connection to the page server, if one was made (CRIU
    /// serves one only).
    pub fn cancel(mut self, open: Option<TcpStream>) -> Result<(), RuncError> {
        // page_server_iov {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id}:
        // 32 bytes on x86-64, an unknown command.
        let refused = [0xffu8; 32];
        let conn = open
            .or_else(|| TcpStream::connect_timeout(&self.page_server, Duration::from_secs(2)).ok());
        if let Some(mut s) = conn {
            let _ = s.write_all(&refused);
            let mut rest = Vec::new();
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read_to_end(&mut rest);
        }
        let t = Instant::now();
        while t.elapsed() < DUMP_WAIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        end(&mut self.child);
        Err(RuncError::Failed {
            op: "checkpoint",
            id: self.id.clone(),
            stderr: "CRIU did not end its page server when told to".into(),
        })
    }

    fn failure(&mut self) -> RuncError {
        end(&mut self.child);
        with_log(
            RuncError::Failed {
                op: "checkpoint",
                id: self.id.clone(),
                stderr: "CRIU's lazy dump failed".into(),
            },
            &self.log,
        )
    }
}

impl Drop for LazyDump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            end(&mut self.child);
        }
    }
}
