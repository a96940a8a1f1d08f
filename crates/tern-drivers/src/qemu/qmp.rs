//! A small typed client for QMP, QEMU's JSON control protocol, over the VM's
//! unix socket.
//!
//! QMP is line-delimited JSON: a greeting, then `qmp_capabilities` to leave
//! negotiation mode, then one `{"execute": ..}` per request, answered by a
//! `{"return": ..}` or `{"error": ..}`. Asynchronous events (`{"event": ..}`)
//! can arrive between them at any time; this client keeps the ones it reads
//! past in [`Qmp::events`] so a caller waiting for, say, `MIGRATION` can find it.
//! Each request has a timeout: a wedged QEMU is an error, never a hang.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {reason}")]
    Io {
        /// The socket.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's explanation.
        desc: String,
    },
    /// QEMU sent something that is not QMP, or not the expected shape.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("QMP `{0}` timed out")]
    Timeout(String),
}

/// One QMP connection.
pub struct Qmp {
    path: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    /// The id of the last request: every request carries one, and a reply
    /// to an earlier one (which timed out) is dropped, so a slow answer is
    /// never taken for the next request's.
    last_id: u64,
    /// Events read while waiting for answers, oldest first.
    pub events: Vec<Event>,
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, Deserialize)]
pub struct Event {
    /// Its name (`STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`, ...).
    pub event: String,
    /// Its data, if any.
    #[serde(default)]
    pub data: Value,
    /// When QEMU raised it (wall clock).
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

/// A QMP event's wall-clock time.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// And microseconds.
    pub microseconds: u64,
}

impl Timestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(&self) -> u64 {
        self.seconds * 1_000_000 + self.microseconds
    }
}

/// `query-status`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Whether vCPUs run.
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `postmigrate`, `inmigrate`,
    /// `prelaunch`, `shutdown`, `internal-error`, ...).
    pub status: String,
}

/// RAM statistics of `query-migrate`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateRam {
    /// Bytes QEMU wrote to the migration stream so far.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes of RAM still to send (this round).
    #[serde(default)]
    pub remaining: u64,
    /// Guest RAM bytes.
    #[serde(default)]
    pub total: u64,
    /// Pages dirtied per second, as QEMU measured the last round.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Dirty-bitmap sync rounds so far.
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Migration throughput, Mbit/s.
    #[serde(default)]
    pub mbps: f64,
    /// Pages sent on request during post-copy.
    #[serde(default)]
    pub postcopy_requests: u64,
}

/// `query-migrate`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateInfo {
    /// `none`, `setup`, `active`, `postcopy-active`, `device`, `completed`,
    /// `failed`, `cancelling`, `cancelled`, `pre-switchover`, ...
    #[serde(default)]
    pub status: String,
    /// RAM statistics while a migration runs or after it completed.
    #[serde(default)]
    pub ram: Option<MigrateRam>,
    /// Milliseconds since the migration started.
    #[serde(default)]
    pub total_time: Option<u64>,
    /// Measured downtime (ms), once completed.
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Downtime QEMU expects (ms) while active.
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and leaves
    /// negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let p = path.display().to_string();
        let io = |e: std::io::Error| QmpError::Io {
            path: p.clone(),
            reason: e.to_string(),
        };
        let s = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(io)?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            path: p.clone(),
            reader: BufReader::new(r),
            writer: w,
            timeout,
            last_id: 0,
            events: Vec::new(),
        };
        let greeting = q.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        q.execute_value("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        // QEMU's messages are small; a line past this bound is cut, not buffered.
        let mut bounded = tokio::io::AsyncReadExt::take(&mut self.reader, 4 << 20);
        let n = tokio::time::timeout(self.timeout, bounded.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(what.into()))?
            .map_err(|e| QmpError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                reason: "QEMU closed the socket".into(),
            });
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("not JSON ({e}): {}", line.trim())))
    }

    /// Runs `command` with `args` and returns QEMU's `return` value.
    pub async fn execute_value(&mut self, command: &str, args: Value) -> Result<Value, QmpError> {
        self.last_id += 1;
        let id = self.last_id;
        let mut req = json!({ "execute": command, "id": id });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = args;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| QmpError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        loop {
            let m = self.read_message(command).await?;
            if m.get("id").is_some_and(|i| i.as_u64() != Some(id)) {
                continue; // the late answer to a request that timed out
            }
            match classify(m) {
                Reply::Return(v) => return Ok(v),
                Reply::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                Reply::Event(ev) => self.events.extend(ev),
                Reply::Unexpected(m) => {
                    return Err(QmpError::Protocol(format!("unexpected message {m}")))
                }
            }
        }
    }

    /// Runs `command` and decodes its answer as `T`.
    pub async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<T, QmpError> {
        let v = self.execute_value(command, args).await?;
        serde_json::from_value(v).map_err(|e| {
            QmpError::Protocol(format!("`{command}` answered an unexpected shape: {e}"))
        })
    }

    /// `query-status`.
    pub async fn status(&mut self) -> Result<Status, QmpError> {
        self.execute("query-status", json!({})).await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&mut self) -> Result<MigrateInfo, QmpError> {
        self.execute("query-migrate", json!({})).await
    }

    /// `migrate-set-capabilities` with `(name, on)` pairs.
    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.execute_value("migrate-set-capabilities", json!({ "capabilities": list }))
            .await
            .map(drop)
    }

    /// `migrate-set-parameters` (e.g. `{"downtime-limit": 300}`).
    pub async fn set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute_value("migrate-set-parameters", params)
            .await
            .map(drop)
    }

    /// Runs a command that returns nothing of interest.
    pub async fn run(&mut self, command: &str, args: Value) -> Result<(), QmpError> {
        self.execute_value(command, args).await.map(drop)
    }
}

/// One message from QEMU, sorted.
#[derive(Debug)]
pub enum Reply {
    /// A command's answer.
    Return(Value),
    /// A command's failure.
    Error {
        /// QEMU's error class.
        class: String,
        /// Its description.
        desc: String,
    },
    /// An event (`None` if its shape is not one tern reads).
    Event(Option<Event>),
    /// Anything else.
    Unexpected(Value),
}

/// Sorts a message QEMU sent (decoded JSON, any shape).
pub fn classify(mut m: Value) -> Reply {
    if let Some(r) = m.get_mut("return") {
        return Reply::Return(r.take());
    }
    if let Some(e) = m.get("error") {
        return Reply::Error {
            class: e["class"].as_str().unwrap_or("?").into(),
            desc: e["desc"].as_str().unwrap_or("?").into(),
        };
    }
    if m.get("event").is_some() {
        return Reply::Event(serde_json::from_value::<Event>(m).ok());
    }
    Reply::Unexpected(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: sends the greeting, then answers each request
    /// line with the next canned reply (events may precede it).
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) -> Vec<String> {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for reply in replies {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            seen.push(line.trim().to_string());
            w.write_all(reply.as_bytes()).await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        seen
    }

    #[tokio::test]
    async fn negotiates_runs_commands_and_keeps_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(fake_qemu(
            l,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 7, \"microseconds\": 5}}\n{\"return\": {\"running\": false, \"status\": \"paused\", \"singlestep\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n",
                "{\"return\": {\"status\": \"completed\", \"downtime\": 12, \"ram\": {\"transferred\": 5, \"total\": 9}}}\n",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let s = q.status().await.unwrap();
        assert_eq!((s.running, s.status.as_str()), (false, "paused"));
        assert_eq!(q.events.len(), 1);
        assert_eq!(q.events[0].event, "STOP");
        assert_eq!(q.events[0].timestamp.unwrap().unix_micros(), 7_000_005);
        let e = q.run("cont", json!({})).await.unwrap_err();
        assert!(e.to_string().contains("GenericError: no"), "{e}");
        let m = q.query_migrate().await.unwrap();
        assert_eq!(m.status, "completed");
        assert_eq!(m.downtime, Some(12));
        assert_eq!(m.ram.unwrap().transferred, 5);
        drop(q);
        let seen = peer.await.unwrap();
        assert!(seen[0].contains("qmp_capabilities"));
        assert!(seen[2].contains("\"cont\""));
    }

    #[tokio::test]
    async fn a_late_answer_is_never_taken_for_the_next_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap(); // qmp_capabilities, id 1
            w.write_all(b"{\"return\": {}, \"id\": 1}\n").await.unwrap();
            r.read_line(&mut line).await.unwrap(); // query-status, id 2: no answer in time
            r.read_line(&mut line).await.unwrap(); // query-migrate, id 3
            w.write_all(b"{\"return\": {\"running\": true, \"status\": \"running\"}, \"id\": 2}\n")
                .await
                .unwrap();
            w.write_all(b"{\"return\": {\"status\": \"active\"}, \"id\": 3}\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut q = Qmp::connect(&path, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(matches!(q.status().await, Err(QmpError::Timeout(_))));
        assert_eq!(q.query_migrate().await.unwrap().status, "active");
    }

    #[tokio::test]
    async fn garbage_and_silence_are_errors_not_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"this is not json\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let e = Qmp::connect(&path, Duration::from_millis(500))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::Protocol(_)), "{e}");
        let e = Qmp::connect(&dir.path().join("none.sock"), Duration::from_millis(500))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::Io { .. }), "{e}");
    }
}
