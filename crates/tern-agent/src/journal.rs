//! The agent's append-only journal: every VM's ownership and every
//! migration's decisive steps, one JSON record per line, synced to disk
//! before the step it records takes effect.
//!
//! Ownership of a VM moves once, at commit: the source writes
//! `CommitDecided` before it sends `Commit`, the destination writes
//! `CommitReceived` before it starts the guest. After a crash the agent
//! replays the journal ([`Journal::replay`]) and never starts a VM whose
//! last record says it moved away, so a restarted source cannot bring back a
//! second copy of a VM that now runs elsewhere.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One journal line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    /// A VM was booted here.
    VmStarted {
        /// The VM.
        vm: String,
        /// Its owner epoch (1 when first booted).
        epoch: u64,
        /// Its spec.
        spec: serde_json::Value,
    },
    /// This host began migrating a VM away.
    MigrationOut {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// The destination host.
        to: String,
    },
    /// The source decided to commit: from here on the VM belongs to `to`.
    CommitDecided {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// The new owner.
        to: String,
        /// The new owner's epoch.
        epoch: u64,
    },
    /// A migration ended without moving the VM.
    RolledBack {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A migration began arriving here.
    MigrationIn {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// The source host.
        from: String,
    },
    /// The destination received `Commit`: the VM is this host's now.
    CommitReceived {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// Its new epoch.
        epoch: u64,
        /// Its spec.
        spec: serde_json::Value,
    },
    /// An incoming migration was discarded before commit.
    Discarded {
        /// The migration.
        migration: String,
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A VM was stopped on request.
    VmStopped {
        /// The VM.
        vm: String,
    },
    /// A migration ended (how, with its report): what the agent answers
    /// about it after a restart.
    MigrationEnded(Box<crate::vmdir::EndedMigration>),
}

/// What the journal says of one VM.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmFate {
    /// It runs (or ran, before a crash) on this host.
    Owned {
        /// Owner epoch.
        epoch: u64,
        /// Spec.
        spec: serde_json::Value,
    },
    /// It moved to another host.
    MovedAway {
        /// The host that owns it.
        to: String,
        /// That host's epoch.
        epoch: u64,
    },
    /// It was stopped here.
    Stopped,
}

/// A journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line in the middle does not parse (a torn last line is tolerated).
    #[error("journal {path} line {line}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parse error.
        message: String,
    },
}

/// The open journal.
pub struct Journal {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Journal {
    /// Opens (creating) `dir/journal.jsonl`.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let path = dir.join("journal.jsonl");
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends a record and syncs it to disk before returning.
    pub fn append(&self, r: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(r).expect("records always serialize");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Every record, in order. A torn final line (a crash mid-write) is
    /// dropped; damage anywhere else is an error.
    pub fn records(&self) -> Result<Vec<Record>, JournalError> {
        let f = std::fs::File::open(&self.path).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })?;
        let lines: Vec<String> = std::io::BufReader::new(f)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                source,
            })?;
        let mut out = Vec::with_capacity(lines.len());
        for (i, l) in lines.iter().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(l) {
                Ok(r) => out.push(r),
                Err(_) if i + 1 == lines.len() => {
                    tracing::warn!(path = %self.path.display(), "dropping a torn last journal line");
                }
                Err(e) => {
                    return Err(JournalError::Corrupt {
                        path: self.path.clone(),
                        line: i + 1,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Folds the records into each VM's fate.
    pub fn replay(&self) -> Result<BTreeMap<String, VmFate>, JournalError> {
        Ok(fold(&self.records()?))
    }
}

/// Each VM's fate after `records`.
pub fn fold(records: &[Record]) -> BTreeMap<String, VmFate> {
    let mut fates = BTreeMap::new();
    // The fate a VM returns to when a migration whose commit was decided
    // still rolls back (the `Commit` never left this host).
    let mut owned: BTreeMap<String, VmFate> = BTreeMap::new();
    for r in records {
        match r {
            Record::VmStarted { vm, epoch, spec }
            | Record::CommitReceived {
                vm, epoch, spec, ..
            } => {
                let fate = VmFate::Owned {
                    epoch: *epoch,
                    spec: spec.clone(),
                };
                owned.insert(vm.clone(), fate.clone());
                fates.insert(vm.clone(), fate);
            }
            Record::CommitDecided { vm, to, epoch, .. } => {
                fates.insert(
                    vm.clone(),
                    VmFate::MovedAway {
                        to: to.clone(),
                        epoch: *epoch,
                    },
                );
            }
            Record::VmStopped { vm } => {
                fates.insert(vm.clone(), VmFate::Stopped);
            }
            Record::RolledBack { vm, .. } => {
                if let Some(f) = owned.get(vm) {
                    fates.insert(vm.clone(), f.clone());
                }
            }
            Record::MigrationOut { .. }
            | Record::MigrationIn { .. }
            | Record::Discarded { .. }
            | Record::MigrationEnded(_) => {}
        }
    }
    fates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(vm: &str) -> Record {
        Record::VmStarted {
            vm: vm.into(),
            epoch: 1,
            spec: serde_json::json!({}),
        }
    }

    #[test]
    fn a_committed_vm_is_never_owned_again_after_replay() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.append(&started("a")).unwrap();
        j.append(&started("b")).unwrap();
        j.append(&Record::MigrationOut {
            migration: "m".into(),
            vm: "a".into(),
            to: "h2".into(),
        })
        .unwrap();
        j.append(&Record::CommitDecided {
            migration: "m".into(),
            vm: "a".into(),
            to: "h2".into(),
            epoch: 2,
        })
        .unwrap();
        drop(j);
        let fates = Journal::open(d.path()).unwrap().replay().unwrap();
        assert_eq!(
            fates["a"],
            VmFate::MovedAway {
                to: "h2".into(),
                epoch: 2
            }
        );
        assert!(matches!(fates["b"], VmFate::Owned { epoch: 1, .. }));
    }

    #[test]
    fn a_rollback_after_a_decided_commit_gives_the_vm_back() {
        let recs = vec![
            started("a"),
            Record::CommitDecided {
                migration: "m".into(),
                vm: "a".into(),
                to: "h2".into(),
                epoch: 2,
            },
            Record::RolledBack {
                migration: "m".into(),
                vm: "a".into(),
                reason: "commit never left".into(),
            },
        ];
        assert!(matches!(fold(&recs)["a"], VmFate::Owned { epoch: 1, .. }));
    }

    #[test]
    fn a_torn_last_line_is_dropped_but_damage_inside_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.append(&started("a")).unwrap();
        let path = d.path().join("journal.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"event\":\"vm_sta");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(j.records().unwrap().len(), 1);
        text.push_str("\n{\"event\":\"vm_stopped\",\"vm\":\"a\"}\n");
        std::fs::write(&path, &text).unwrap();
        assert!(matches!(
            j.records(),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
    }
}
