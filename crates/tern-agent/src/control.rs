//! The control socket between the agent and a guest process: one JSON
//! request per connection, answered by one JSON line (or, for `watch`, a
//! line per progress change and a last line with the end), and the hand-over
//! of migration streams (a TCP socket passed with `SCM_RIGHTS`).

use crate::vmdir::EndedMigration;
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;
use tern_migrate::{Policy, Progress};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A request to a guest process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// How the guest stands.
    Status,
    /// Stop the guest and end the process.
    Stop,
    /// Migrate the guest to a peer.
    MigrateOut(Box<OutJob>),
    /// Follow a migration: progress lines, then its end.
    Watch {
        /// The migration.
        migration: String,
    },
    /// Destination: answer whether the migration committed, and if it has
    /// not, never commit it (the source settles an unconfirmed `Commit`).
    Settle {
        /// The migration.
        migration: String,
    },
    /// Source: stop the outgoing migration before its switchover (it rolls
    /// back; one already switching over finishes).
    Cancel {
        /// The migration.
        migration: String,
    },
    /// Source: the outgoing migration's share of the host's bandwidth
    /// changed (others started or ended).
    SetShare {
        /// The migration.
        migration: String,
        /// Bytes/s (above 0).
        bytes_per_sec: u64,
    },
    /// Source: the destination is now reached at `addr` (a post-copy
    /// stalled on a route that is gone); the data session reconnects there.
    Redirect {
        /// The migration.
        migration: String,
        /// The destination agent's migration address.
        addr: std::net::SocketAddr,
    },
    /// Test hook (only with `[jail] test_hooks = true`): make a system call
    /// the jail's seccomp filter forbids, which kills the process.
    ForbiddenCall,
}

/// One outgoing migration, as the agent hands it to the guest's process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutJob {
    /// The migration.
    pub migration: String,
    /// The destination host (a configured peer).
    pub to: String,
    /// Mode, budget, bandwidth, deadline.
    pub policy: Policy,
    /// Linux guests: stream compression (`none`, `lz4`, `zstd`).
    pub compress: String,
    /// Where the destination dials replies (this host's migration listener,
    /// which routes them here by the migration's id).
    pub reply_to: String,
    /// Its share of the host's migration bandwidth, bytes/s (0: the host
    /// has no cap); the agent sends a new one as others start and end.
    #[serde(default)]
    pub share_bytes_per_sec: u64,
}

/// Where a guest process stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcState {
    /// Booting.
    Booting,
    /// Runs (its counter advances).
    Running,
    /// Alive but not advancing (its QEMU process is stopped): never called running.
    Stalled,
    /// Paused: the host's lease from the control plane ran out.
    Fenced,
    /// Being migrated away (runs until switchover; paused while a commit is settled).
    Migrating,
    /// Receiving a migration (not running yet).
    Receiving,
    /// Moved to another host; the process is about to end.
    MovedAway,
    /// Stopped; the process is about to end.
    Stopped,
    /// Failed to boot or receive; the process is about to end.
    Failed,
}

/// A status answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcStatus {
    /// The state.
    pub state: ProcState,
    /// The owner epoch.
    pub epoch: u64,
    /// The guest's progress counter (running).
    pub counter: Option<u64>,
    /// Whether its last self-check held (running, when it made one).
    pub checksum_ok: Option<bool>,
    /// The migration under way, if any.
    pub migration: Option<String>,
    /// More about the state.
    pub detail: Option<String>,
}

/// One line of a `watch` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEvent {
    /// Progress changed.
    Progress(Progress),
    /// The migration ended.
    End(Box<EndedMigration>),
}

/// A control-socket exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be used (the process is gone or not ready).
    #[error("guest control socket {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process answered something else than expected.
    #[error("guest control socket {path}: bad answer: {message}")]
    BadAnswer {
        /// The socket.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The process refused the request.
    #[error("{0}")]
    Refused(String),
    /// No answer in time.
    #[error("guest control socket {0}: no answer in time")]
    Timeout(String),
}

/// An answer: the value, or why the request was refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer<T> {
    /// Done.
    Ok(T),
    /// Refused, with why.
    Err(String),
}

async fn open(path: &Path, req: &Request) -> Result<BufReader<UnixStream>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).await.map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    s.write_all(&line).await.map_err(io)?;
    Ok(BufReader::new(s))
}

/// Longest message line either end of a control socket reads: a message
/// is a few KiB; a peer that sends more without a newline is cut off
/// rather than buffered.
pub const MAX_LINE: u64 = 1 << 20;

async fn read_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    r: &mut BufReader<UnixStream>,
) -> Result<Option<T>, ControlError> {
    let mut line = String::new();
    let n = tokio::io::AsyncReadExt::take(&mut *r, MAX_LINE)
        .read_line(&mut line)
        .await
        .map_err(|source| ControlError::Io {
            path: path.display().to_string(),
            source,
        })?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| ControlError::BadAnswer {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// Sends `req` and reads its one answer, within `timeout`.
pub async fn call<T: serde::de::DeserializeOwned>(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<T, ControlError> {
    let exchange = async {
        let mut r = open(path, req).await?;
        match read_line::<Answer<T>>(path, &mut r).await? {
            Some(Answer::Ok(v)) => Ok(v),
            Some(Answer::Err(e)) => Err(ControlError::Refused(e)),
            None => Err(ControlError::BadAnswer {
                path: path.display().to_string(),
                message: "closed without an answer".into(),
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ControlError::Timeout(path.display().to_string()))?
}

/// Follows a migration: calls `on_progress` per change; returns its end, or
/// `None` if the process closed the socket first (it ended: read its journal).
pub async fn watch(
    path: &Path,
    migration: &str,
    mut on_progress: impl FnMut(Progress),
) -> Result<Option<EndedMigration>, ControlError> {
    let mut r = open(
        path,
        &Request::Watch {
            migration: migration.into(),
        },
    )
    .await?;
    loop {
        match read_line::<Answer<WatchEvent>>(path, &mut r).await? {
            Some(Answer::Ok(WatchEvent::Progress(p))) => on_progress(p),
            Some(Answer::Ok(WatchEvent::End(e))) => return Ok(Some(*e)),
            Some(Answer::Err(e)) => return Err(ControlError::Refused(e)),
            None => return Ok(None),
        }
    }
}

/// Hands a TCP stream to the guest process listening on `path` (blocking).
pub fn hand_over(path: &Path, stream: OwnedFd) -> std::io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let s = std::os::unix::net::UnixStream::connect(path)?;
    let fds = [stream.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !cmsg.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the descriptor"));
    }
    sendmsg(&s, &[IoSlice::new(b"s")], &mut cmsg, SendFlags::empty())?;
    Ok(())
}

/// Takes one stream handed over on an accepted connection (blocking).
pub fn take_over(conn: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut byte)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = m {
            if let Some(fd) = fds.next() {
                return Ok(fd);
            }
        }
    }
    Err(std::io::Error::other("no descriptor in the hand-over"))
}
