//! The per-VM control socket: one JSON request per line, one JSON response
//! per line, over a Unix socket only the monitor's user can open.
//!
//! The `kvm` driver uses it to ask a monitor process for its status, to
//! pause and resume the guest, take snapshots, read the state tree and the
//! dirty log, read the console, and stop the VM. A malformed request gets an
//! error response and changes nothing.

use crate::devices::AgentReport;
use crate::machine::{Machine, MachineShape, RunState};
use crate::snapshot::{SnapshotInfo, SnapshotKind};
use crate::state::MachineState;
use crate::VmmError;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;
/// Longest response line a client accepts (a state tree, a dirty-page list).
pub const MAX_RESPONSE_BYTES: u64 = 256 << 20;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Status, agent report and shape.
    Status,
    /// Park every vCPU.
    Pause,
    /// Run again.
    Resume,
    /// Write a snapshot to `dir` (pauses briefly if running).
    Snapshot {
        /// Target directory (created).
        dir: PathBuf,
        /// Full or incremental.
        kind: SnapshotKind,
    },
    /// The whole state tree (paused only).
    State,
    /// Start KVM's dirty log.
    DirtyLogStart,
    /// Pages written since the last sync.
    DirtyLogSync,
    /// Stop the dirty log.
    DirtyLogStop,
    /// The console's recent output.
    Console,
    /// End the VM; the monitor process exits.
    Stop,
}

/// A monitor's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The monitor's process id.
    pub pid: u32,
    /// Running, paused or exited.
    pub run_state: RunState,
    /// Memory and vCPUs.
    pub shape: MachineShape,
    /// The guest agent's last reports.
    pub agent: AgentReport,
    /// Whether the guest printed its ready line.
    pub ready: bool,
    /// Milliseconds since the machine was created.
    pub uptime_ms: u64,
    /// Whether the dirty log runs.
    pub dirty_logging: bool,
}

/// What the monitor answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok,
    /// Status.
    Status(StatusReport),
    /// Paused after this many µs of handshake.
    Paused {
        /// Handshake time.
        pause_us: u64,
    },
    /// A snapshot was written.
    Snapshot(SnapshotInfo),
    /// The state tree.
    State(MachineState),
    /// Dirty pages, as inclusive-exclusive page ranges.
    Dirty {
        /// Page count.
        pages: u64,
        /// `[start, end)` page ranges, ascending.
        ranges: Vec<(u64, u64)>,
    },
    /// Console output.
    Console {
        /// The recent text.
        text: String,
        /// Bytes the guest wrote since the monitor started.
        total_bytes: u64,
    },
    /// The request failed; nothing changed.
    Error {
        /// Why.
        message: String,
    },
}

/// What the server needs besides the machine.
pub struct ServerContext {
    /// The machine.
    pub machine: Arc<Mutex<Machine>>,
    /// The line that means "the guest is ready".
    pub ready_line: String,
}

fn ranges(b: &crate::DirtyBitmap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in b.pages() {
        match out.last_mut() {
            Some((_, end)) if *end == p => *end = p + 1,
            _ => out.push((p, p + 1)),
        }
    }
    out
}

/// Serves one request.
pub fn handle(ctx: &ServerContext, req: Request) -> Response {
    let mut m = ctx.machine.lock().unwrap_or_else(|p| p.into_inner());
    let r: Result<Response, VmmError> = (|| match req {
        Request::Status => {
            let (agent, ready) = m.with_devices(|d| {
                (
                    d.agent.clone(),
                    d.console().text().contains(&ctx.ready_line),
                )
            });
            Ok(Response::Status(StatusReport {
                pid: std::process::id(),
                run_state: m.run_state(),
                shape: m.shape(),
                agent,
                ready,
                uptime_ms: m.age().as_millis() as u64,
                dirty_logging: m.dirty_logging(),
            }))
        }
        Request::Pause => Ok(Response::Paused {
            pause_us: m.pause()?.as_micros() as u64,
        }),
        Request::Resume => m.resume().map(|_| Response::Ok),
        Request::Snapshot { dir, kind } => m.snapshot(&dir, kind).map(Response::Snapshot),
        Request::State => m.save_state().map(Response::State),
        Request::DirtyLogStart => m.start_dirty_log().map(|_| Response::Ok),
        Request::DirtyLogSync => {
            let b = m.sync_dirty_log()?;
            Ok(Response::Dirty {
                pages: b.count(),
                ranges: ranges(&b),
            })
        }
        Request::DirtyLogStop => m.stop_dirty_log().map(|_| Response::Ok),
        Request::Console => Ok(m.with_devices(|d| Response::Console {
            text: d.console().text(),
            total_bytes: d.console().total_bytes(),
        })),
        Request::Stop => {
            m.stop("stopped by a control request");
            Ok(Response::Ok)
        }
    })();
    r.unwrap_or_else(|e| Response::Error {
        message: e.to_string(),
    })
}

/// Binds the control socket (mode 0600). A stale socket from a dead monitor
/// is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener, VmmError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(VmmError::Config(format!(
                "another monitor serves {}",
                path.display()
            )));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| VmmError::Config(format!("control socket {}: {e}", path.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts connections forever, one thread per client.
pub fn serve(listener: UnixListener, ctx: Arc<ServerContext>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let ctx = ctx.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_conn(conn, &ctx));
    }
}

fn serve_conn(conn: UnixStream, ctx: &ServerContext) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_REQUEST_BYTES).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            let _ = write_line(
                &mut out,
                &Response::Error {
                    message: format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                },
            );
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(ctx, req),
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        if write_line(&mut out, &resp).is_err() {
            return;
        }
    }
}

fn write_line<T: Serialize>(w: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    s.push(b'\n');
    w.write_all(&s)
}

/// A blocking client of one monitor's control socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects, with `timeout` on every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Client> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends one request and reads its response.
    pub fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        write_line(&mut self.writer, req)?;
        let mut line = String::new();
        (&mut self.reader)
            .take(MAX_RESPONSE_BYTES)
            .read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the monitor closed the control socket",
            ));
        }
        serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("malformed response: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r: Request =
            serde_json::from_str(r#"{"op":"snapshot","dir":"/x","kind":"full"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/x".into(),
                kind: SnapshotKind::Full
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        let resp = serde_json::to_string(&Response::Paused { pause_us: 5 }).unwrap();
        assert_eq!(resp, r#"{"result":"paused","pause_us":5}"#);
    }

    #[test]
    fn ranges_merge_adjacent_pages() {
        let mut b = crate::DirtyBitmap::with_pages(256);
        for p in [1, 2, 3, 7, 64, 65] {
            b.insert(p);
        }
        assert_eq!(ranges(&b), vec![(1, 4), (7, 8), (64, 66)]);
    }
}
