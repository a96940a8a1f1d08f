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
use std::io::Write;
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
            .read(true)
            .open(&path)
            .map_err(io)?;
        cut_torn_tail(&file, &path).map_err(io)?;
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

    /// Every record, in order (see [`read_records`]).
    pub fn records(&self) -> Result<Vec<Record>, JournalError> {
        read_records(&self.path)
    }

    /// Folds the records into each VM's fate.
    pub fn replay(&self) -> Result<BTreeMap<String, VmFate>, JournalError> {
        Ok(fold(&self.records()?))
    }
}

/// Every record of the journal at `path`, in order, read without changing
/// the file. A torn final line (a crash mid-write, or a write in progress)
/// is dropped; a damaged line anywhere else is reported with its number and
/// skipped: the records around it still say what they say.
pub fn read_records(path: &Path) -> Result<Vec<Record>, JournalError> {
    let f = std::fs::File::open(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut text).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_records(path, &text))
}

/// The records in a journal's bytes (`path` only names it in messages):
/// the torn-tail and damaged-line rules of [`read_records`].
pub fn parse_records(path: &Path, text: &[u8]) -> Vec<Record> {
    let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    // A final newline leaves an empty last piece: the line before it is whole.
    let last = lines.iter().rposition(|l| !l.trim_ascii().is_empty());
    let torn = !text.ends_with(b"\n");
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if l.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice(l) {
            Ok(r) => out.push(r),
            Err(_) if torn && Some(i) == last => {
                tracing::warn!(path = %path.display(), "dropping a torn last journal line");
            }
            Err(e) => {
                let err = JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                };
                tracing::error!(error = %err, "skipping a damaged journal line");
            }
        }
    }
    out
}

/// A crash mid-append leaves a last line without its newline: cut it off
/// before anything is appended, or the next record would be glued onto it
/// and damage a line in the middle.
fn cut_torn_tail(file: &std::fs::File, path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek};
    let mut f = file;
    let mut text = Vec::new();
    f.seek(std::io::SeekFrom::Start(0))?;
    f.read_to_end(&mut text)?;
    if text.last().is_none_or(|&b| b == b'\n') {
        return Ok(());
    }
    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(path = %path.display(), torn = text.len() - keep, "cutting a torn last journal line");
    file.set_len(keep as u64)?;
    file.sync_data()
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
    fn a_torn_last_line_is_cut_at_open_and_the_next_record_lands_whole() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("journal.jsonl");
        {
            let j = Journal::open(d.path()).unwrap();
            j.append(&started("a")).unwrap();
        }
        // A crash mid-append: half a record, no newline.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"event\":\"vm_sta");
        std::fs::write(&path, &text).unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.records().unwrap().len(), 1);
        j.append(&Record::VmStopped { vm: "a".into() }).unwrap();
        // The restart after that starts too: every line is whole.
        let j = Journal::open(d.path()).unwrap();
        let recs = j.records().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(fold(&recs)["a"], VmFate::Stopped);
    }

    #[test]
    fn a_damaged_line_inside_is_skipped_and_the_rest_replayed() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path()).unwrap();
        j.append(&started("a")).unwrap();
        let path = d.path().join("journal.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"event\":\"vm_sta\n{\"event\":\"vm_stopped\",\"vm\":\"a\"}\n");
        std::fs::write(&path, &text).unwrap();
        let recs = j.records().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(fold(&recs)["a"], VmFate::Stopped);
    }
}
