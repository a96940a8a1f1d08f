//! A guest's directory, `<data_dir>/vms/<name>/`: everything a guest process
//! and the agent share, so that either can come and go.
//!
//! - `launch.json`: what the process hosts and how (written by the agent before it starts it);
//! - `journal.jsonl`: the guest's own record of its ownership and migrations,
//!   written by its process, synced before each step it records takes effect;
//! - `control.sock`: the process's control socket ([`crate::control`]);
//! - `streams.sock`: where the agent hands it migration streams routed to it;
//! - `pid`, `guest.log`.

use crate::config::AgentConfig;
use crate::journal::{Journal, JournalError, Record};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tern_migrate::MigrationPhase;
use tern_proto::{GuestSpec, MigrationRole};

/// What a guest process hosts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    /// The VM.
    pub vm: String,
    /// Its owner epoch here (once committed, for an incoming one).
    pub epoch: u64,
    /// What it is.
    pub spec: GuestSpec,
    /// Boot it, or receive it.
    pub role: LaunchRole,
    /// The agent's configuration when it started the process: host name, TLS
    /// files, peers, host key directory, deadlines.
    pub agent: AgentConfig,
}

/// How the guest comes to be.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum LaunchRole {
    /// Boot it fresh.
    Boot,
    /// Receive it by a migration from `source_host`.
    Receive {
        /// The migration.
        migration: String,
        /// The source host (a peer).
        source_host: String,
        /// Where the reply session goes (the source agent routes it).
        reply_to: String,
    },
}

/// `<data_dir>/shared/`: what the agent writes for every guest process to
/// read (the peers file, the host's lease). A jailed guest process sees
/// this directory (read-only) and its own, nothing else of the data dir.
pub fn shared_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("shared")
}

/// A name that becomes a path component (a VM id, a migration id) came
/// from outside and is not one: 1-64 of `A-Z a-z 0-9 _ -`, so never `..`,
/// a slash or a dot.
#[derive(Debug, thiserror::Error)]
#[error("bad {kind} `{value}`: 1-64 characters of A-Z, a-z, 0-9, `_` and `-`")]
pub struct BadName {
    /// What the name names.
    pub kind: &'static str,
    /// The name, as given.
    pub value: String,
}

/// Checks a name a peer or a client chose before it becomes part of a path.
pub fn check_name(kind: &'static str, value: &str) -> Result<(), BadName> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(BadName {
            kind,
            value: value.chars().take(80).collect(),
        })
    }
}

/// The files of one guest directory.
#[derive(Clone, Debug)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    /// The directory of `name` under `data_dir`.
    pub fn new(data_dir: &Path, name: &str) -> Self {
        VmDir(data_dir.join("vms").join(name))
    }
    /// `launch.json`.
    pub fn launch_file(&self) -> PathBuf {
        self.0.join("launch.json")
    }
    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.0.join("control.sock")
    }
    /// Where routed streams are handed in.
    pub fn streams(&self) -> PathBuf {
        self.0.join("streams.sock")
    }
    /// The process id file.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("pid")
    }
    /// Where the guest's QEMU (a Linux guest's) runs: its sockets, pid
    /// file, console, disks.
    pub fn qemu(&self) -> PathBuf {
        self.0.join("qemu")
    }
    /// The process's log.
    pub fn log(&self) -> PathBuf {
        self.0.join("guest.log")
    }
    /// Reads `launch.json`.
    pub fn launch(&self) -> Result<Launch, String> {
        let text = std::fs::read(self.launch_file())
            .map_err(|e| format!("{}: {e}", self.launch_file().display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", self.launch_file().display()))
    }
    /// Writes `launch.json` (creating the directory).
    pub fn write_launch(&self, l: &Launch) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.0)?;
        let tmp = self.0.join("launch.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(l).expect("launches serialize"),
        )?;
        std::fs::rename(tmp, self.launch_file())
    }
    /// The guest's journal, to append to: only the guest's own process
    /// (its one writer) opens it so, which also cuts a torn last line.
    pub fn journal(&self) -> Result<Journal, JournalError> {
        Journal::open(&self.0)
    }
    /// The guest's journal records, read without touching the file (the
    /// agent reads journals its guests' processes may be appending to).
    pub fn records(&self) -> Result<Vec<crate::journal::Record>, JournalError> {
        crate::journal::read_records(&self.0.join("journal.jsonl"))
    }
    /// Its process id, if it wrote one and that process still runs this
    /// directory's guest (a pid reused by another program does not count).
    pub fn live_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 3, after the parenthesised name: Z is a zombie (exited).
        let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let dir = self.0.to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .split('\0')
            .any(|a| a == dir)
            .then_some(pid)
    }
}

/// What a guest directory's journal says.
#[derive(Clone, Debug, Default)]
pub struct DirFate {
    /// Owned here at this epoch (booted, or committed in), unless later moved or stopped.
    pub owned: Option<u64>,
    /// Moved to this host at this epoch.
    pub moved_to: Option<(String, u64)>,
    /// Stopped on request.
    pub stopped: bool,
    /// An incoming migration that was discarded.
    pub discarded: bool,
    /// A commit decided and not yet settled (the process was settling).
    pub in_doubt: Option<String>,
    /// Every migration that ended, as it ended.
    pub ended: Vec<EndedMigration>,
}

/// A migration's end, as its guest process recorded it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndedMigration {
    /// The migration.
    pub migration: String,
    /// The VM.
    pub vm: String,
    /// This host's end.
    pub role: MigrationRole,
    /// The other host.
    pub peer: String,
    /// How it ended.
    pub state: MigrationPhase,
    /// The engine's report (source).
    pub report: Option<tern_migrate::Report>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Folds one guest directory's records.
pub fn fold(records: &[Record]) -> DirFate {
    let mut f = DirFate::default();
    let mut owned_epoch = None;
    for r in records {
        match r {
            Record::VmStarted { epoch, .. } | Record::CommitReceived { epoch, .. } => {
                owned_epoch = Some(*epoch);
                f.owned = owned_epoch;
                f.discarded = false;
            }
            Record::CommitDecided {
                migration,
                to,
                epoch,
                ..
            } => {
                f.owned = None;
                f.moved_to = Some((to.clone(), *epoch));
                f.in_doubt = Some(migration.clone());
            }
            Record::RolledBack { .. } => {
                f.owned = owned_epoch;
                f.moved_to = None;
                f.in_doubt = None;
            }
            Record::VmStopped { .. } => {
                f.owned = None;
                f.stopped = true;
            }
            Record::Discarded { .. } => f.discarded = true,
            Record::MigrationEnded(e) => {
                if f.in_doubt.as_deref() == Some(&e.migration) {
                    f.in_doubt = None;
                }
                f.ended.push((**e).clone());
            }
            Record::MigrationOut { .. } | Record::MigrationIn { .. } => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_leave_the_data_dir_are_refused() {
        for bad in [
            "",
            "..",
            "../../etc",
            "a/b",
            "vm.1",
            &"x".repeat(65),
            "vm\0",
        ] {
            assert!(check_name("VM id", bad).is_err(), "{bad:?}");
        }
        for good in ["vm-0123abcd", "mig-1", "A_b-9"] {
            assert!(check_name("VM id", good).is_ok(), "{good:?}");
        }
    }

    fn ended(m: &str, state: MigrationPhase) -> Record {
        Record::MigrationEnded(Box::new(EndedMigration {
            migration: m.into(),
            vm: "v".into(),
            role: MigrationRole::Source,
            peer: "b".into(),
            state,
            report: None,
            error: None,
        }))
    }

    #[test]
    fn a_decided_commit_is_in_doubt_until_its_end_is_recorded() {
        let mut recs = vec![
            Record::VmStarted {
                vm: "v".into(),
                epoch: 1,
                spec: serde_json::json!({}),
            },
            Record::CommitDecided {
                migration: "m".into(),
                vm: "v".into(),
                to: "b".into(),
                epoch: 2,
            },
        ];
        let f = fold(&recs);
        assert_eq!(f.in_doubt.as_deref(), Some("m"));
        assert_eq!(f.owned, None);
        // Settled as not committed: the guest is ours again.
        recs.push(Record::RolledBack {
            migration: "m".into(),
            vm: "v".into(),
            reason: "the destination never committed".into(),
        });
        recs.push(ended("m", MigrationPhase::RolledBack));
        let f = fold(&recs);
        assert_eq!((f.owned, f.in_doubt, f.moved_to), (Some(1), None, None));
        assert_eq!(f.ended.len(), 1);
    }
}
