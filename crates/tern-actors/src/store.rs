//! The durable [`CheckpointStore`] each executor keeps: the latest signed
//! checkpoints of the actors it owns or may have to restore.
//!
//! One append-only log per actor (`<actor>.log`): a full checkpoint, then the
//! deltas on it, each record length-prefixed. A writer thread writes them in
//! the order they were committed; a [`Durability::Synced`] commit waits until
//! its record is on disk, an unsynced one (a migration's) returns at once. A new full checkpoint replaces the log (written aside and
//! renamed), so the log never holds more than one state and its deltas.
//! Opening the store replays every log, checking each record's signature and
//! hash chain again, and cuts off a record torn by a crash mid-write.
//!
//! In memory the store keeps only what verifying the next checkpoint needs:
//! the last sequence, the signer and the state's page hashes (32 bytes per
//! 4 KiB). The state itself is rebuilt from the log when an actor is restored.

use crate::checkpoint::{ActorCheckpoint, CheckpointError};
use crate::delivery::Cursors;
use crate::state::{StateHashes, StateImage};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tern_proto::{ActorId, ExecutorId};

mod writer;
use writer::Writer;

/// What the store holds for one actor.
#[derive(Clone, Debug)]
struct Held {
    sequence: u64,
    signer: [u8; 32],
    /// Shared so a verification can take it out of the lock without copying
    /// 32 bytes per page of state.
    hashes: Arc<StateHashes>,
}

/// An actor's whole state at a checkpoint, ready to restore.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadedState {
    /// The checkpoint's sequence.
    pub sequence: u64,
    /// Linear memory and globals.
    pub image: StateImage,
    /// What the actor had handled from each sender.
    pub cursors: Cursors,
}

/// The latest checkpoint the store holds for an actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latest {
    /// Its sequence number.
    pub sequence: u64,
    /// The executor that signed it.
    pub signer: [u8; 32],
    /// Its state hash.
    pub state_hash: [u8; 32],
}

/// A checkpoint that passed [`CheckpointStore::verify`], with the state
/// hashes it leads to.
pub struct Verified {
    hashes: Arc<StateHashes>,
}

impl Verified {
    /// The state hashes after the checkpoint (what its owner keeps).
    pub fn hashes(&self) -> &StateHashes {
        &self.hashes
    }
}

/// Whether a stored checkpoint must be on disk before `commit` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync'd: what a restart or a peer's restore starts from.
    Synced,
    /// Written, flushed by the kernel or the next synced record. For a
    /// migration's checkpoints, which matter only while both ends hold the
    /// actor in memory: a crash ends the migration anyway, and a torn tail
    /// is cut at replay.
    Unsynced,
}

/// Durable, verified storage of actor checkpoints.
pub struct CheckpointStore {
    dir: PathBuf,
    max_state_bytes: u64,
    trusted: Mutex<HashMap<[u8; 32], ExecutorId>>,
    held: Mutex<HashMap<ActorId, Held>>,
    writer: Writer,
}

const LOG_SUFFIX: &str = "log";

impl CheckpointStore {
    /// Opens (creating) the store in `dir` and replays its logs. Records are
    /// checked for signature and hash chain; which signers are trusted is
    /// decided for new checkpoints only, since membership is learnt later.
    pub fn open(dir: &Path, max_state_bytes: u64) -> Result<Self, CheckpointError> {
        fs::create_dir_all(dir)?;
        let store = Self {
            dir: dir.to_owned(),
            max_state_bytes,
            trusted: Mutex::default(),
            held: Mutex::default(),
            writer: Writer::start(dir.to_owned())?,
        };
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(actor) = Self::actor_of(&path) else {
                continue;
            };
            if let Some(held) = store.replay(&path)? {
                store.held.lock().expect("store lock").insert(actor, held);
            }
        }
        Ok(store)
    }

    fn actor_of(path: &Path) -> Option<ActorId> {
        if path.extension()? != LOG_SUFFIX {
            return None;
        }
        path.file_stem()?.to_str()?.parse().ok()
    }

    fn log_path(&self, actor: ActorId) -> PathBuf {
        self.dir.join(format!("{actor}.{LOG_SUFFIX}"))
    }

    /// Trusts checkpoints signed by `key`, the key of `executor`.
    pub fn trust(&self, key: [u8; 32], executor: ExecutorId) {
        self.trusted
            .lock()
            .expect("store lock")
            .insert(key, executor);
    }

    /// The executor a key belongs to, if trusted.
    pub fn signer_name(&self, key: &[u8; 32]) -> Option<ExecutorId> {
        self.trusted.lock().expect("store lock").get(key).cloned()
    }

    /// Whether `c`'s signer is trusted (its signature is checked later).
    fn check_signer(&self, c: &ActorCheckpoint) -> Result<(), CheckpointError> {
        let trusted = self.trusted.lock().expect("store lock");
        if trusted.contains_key(&c.signer) {
            Ok(())
        } else {
            Err(CheckpointError::UnknownSigner)
        }
    }

    /// Checks a checkpoint without storing it: a trusted signer, a valid
    /// signature, newer than what is held, on the held base if a delta, and
    /// a state that hashes to the signed hash.
    pub fn verify(&self, c: &ActorCheckpoint) -> Result<Verified, CheckpointError> {
        self.check_signer(c)?;
        let held = self
            .held
            .lock()
            .expect("store lock")
            .get(&c.actor_id)
            .map(|h| (h.sequence, Arc::clone(&h.hashes)));
        let held = held.as_ref().map(|(s, h)| (*s, h.as_ref()));
        Self::check_against(held, c, self.max_state_bytes)
    }

    /// Whether `c` may follow the checkpoint held (`held`, its sequence):
    /// newer, and on it if a delta.
    fn check_order(held: Option<u64>, c: &ActorCheckpoint) -> Result<(), CheckpointError> {
        if let Some(last) = held.filter(|&last| c.sequence <= last) {
            return Err(CheckpointError::Replay {
                last,
                got: c.sequence,
            });
        }
        match c.state.base {
            Some(base) if Some(base) != held => Err(CheckpointError::MissingBase { base, held }),
            _ => Ok(()),
        }
    }

    /// Verifies `c` against the checkpoint held: its sequence and page hashes.
    fn check_against(
        held: Option<(u64, &StateHashes)>,
        c: &ActorCheckpoint,
        max_state_bytes: u64,
    ) -> Result<Verified, CheckpointError> {
        c.verify_signature()?;
        Self::check_order(held.map(|(s, _)| s), c)?;
        let empty = StateHashes::default();
        let base = match (c.state.base, held) {
            (Some(_), Some((_, hashes))) => hashes,
            _ => &empty,
        };
        let hashes = Arc::new(base.after(&c.state, max_state_bytes)?);
        if hashes.root() != c.state_hash {
            return Err(CheckpointError::HashMismatch);
        }
        Ok(Verified { hashes })
    }

    /// Checks a chain that starts with a full checkpoint, as a store holding
    /// nothing of the actor would: what may replace what is held.
    pub fn verify_chain(&self, chain: &[ActorCheckpoint]) -> Result<(), CheckpointError> {
        let mut held: Option<(u64, Arc<StateHashes>)> = None;
        for c in chain {
            self.check_signer(c)?;
            let before = held.as_ref().map(|(s, h)| (*s, h.as_ref()));
            let v = Self::check_against(before, c, self.max_state_bytes)?;
            held = Some((c.sequence, v.hashes));
        }
        Ok(())
    }

    /// Verifies and durably stores a checkpoint; on any error nothing changes.
    pub fn store(&self, c: &ActorCheckpoint) -> Result<(), CheckpointError> {
        let verified = self.verify(c)?;
        self.commit(c, c.encode(), verified, Durability::Synced)
    }

    /// Stores a checkpoint this executor took of its own actor, whose state
    /// hashes the actor computed as it took it: no second hashing (its
    /// order is still checked).
    pub fn store_own(
        &self,
        c: &ActorCheckpoint,
        encoded: Vec<u8>,
        hashes: &StateHashes,
        durability: Durability,
    ) -> Result<(), CheckpointError> {
        self.commit(
            c,
            encoded,
            Verified {
                hashes: Arc::new(hashes.clone()),
            },
            durability,
        )
    }

    /// Stores a checkpoint [`Self::verify`] accepted; `encoded` is its wire
    /// form (the caller has it already: sent or received).
    pub fn commit(
        &self,
        c: &ActorCheckpoint,
        encoded: Vec<u8>,
        v: Verified,
        durability: Durability,
    ) -> Result<(), CheckpointError> {
        let sync = durability == Durability::Synced;
        let mut held = self.held.lock().expect("store lock");
        // Re-check under the lock: another checkpoint may have landed since.
        Self::check_order(held.get(&c.actor_id).map(|h| h.sequence), c)?;
        let path = self.log_path(c.actor_id);
        // Queued under the lock, so the writer sees the order of `held`.
        self.writer
            .write(path, c.state.base.is_none(), encoded, sync)?;
        held.insert(
            c.actor_id,
            Held {
                sequence: c.sequence,
                signer: c.signer,
                hashes: v.hashes,
            },
        );
        Ok(())
    }

    /// Drops all that is held of `actor`, its log too: a new owner's chain
    /// replaces it (its sequence may restart below the old one's).
    pub fn forget(&self, actor: ActorId) -> Result<(), CheckpointError> {
        let mut held = self.held.lock().expect("store lock");
        self.writer.remove(self.log_path(actor))?;
        held.remove(&actor);
        Ok(())
    }

    /// The latest checkpoint held for `actor`.
    pub fn latest(&self, actor: ActorId) -> Option<Latest> {
        self.held
            .lock()
            .expect("store lock")
            .get(&actor)
            .map(|h| Latest {
                sequence: h.sequence,
                signer: h.signer,
                state_hash: h.hashes.root(),
            })
    }

    /// Every actor the store holds a checkpoint of.
    pub fn actors(&self) -> Vec<ActorId> {
        self.held
            .lock()
            .expect("store lock")
            .keys()
            .copied()
            .collect()
    }

    /// The records of `actor`'s log (a full checkpoint and its deltas), as
    /// another executor needs them to restore the actor.
    pub fn records(&self, actor: ActorId) -> Result<Vec<ActorCheckpoint>, CheckpointError> {
        self.writer.barrier()?;
        let mut out = Vec::new();
        self.read_log(&self.log_path(actor), |c| {
            out.push(c.clone());
            Ok(())
        })?;
        Ok(out)
    }

    /// Rebuilds the whole state of `actor` at its latest checkpoint.
    pub fn load(&self, actor: ActorId) -> Result<LoadedState, CheckpointError> {
        self.writer.barrier()?;
        let mut image = StateImage::default();
        let mut last = None;
        self.read_log(&self.log_path(actor), |c| {
            image.apply(&c.state);
            last = Some((c.sequence, c.cursors.clone()));
            Ok(())
        })?;
        let (sequence, cursors) = last.ok_or(CheckpointError::NotHeld(actor))?;
        Ok(LoadedState {
            sequence,
            image,
            cursors,
        })
    }

    /// Replays one log, keeping the records that chain and verify, and cuts
    /// the file after the last good one.
    fn replay(&self, path: &Path) -> Result<Option<Held>, CheckpointError> {
        let mut held: Option<Held> = None;
        let good_len = self.read_log(path, |c| {
            let v = Self::check_against(
                held.as_ref().map(|h| (h.sequence, h.hashes.as_ref())),
                c,
                self.max_state_bytes,
            )?;
            held = Some(Held {
                sequence: c.sequence,
                signer: c.signer,
                hashes: v.hashes,
            });
            Ok(())
        })?;
        let f = OpenOptions::new().write(true).open(path)?;
        if f.metadata()?.len() != good_len {
            tracing::warn!(path = %path.display(), good_len, "checkpoint log cut after a torn or bad record");
            f.set_len(good_len)?;
            f.sync_all()?;
        }
        Ok(held)
    }

    /// Calls `each` on the log's records in order until one is torn or
    /// refused; returns the length of the good prefix.
    fn read_log(
        &self,
        path: &Path,
        mut each: impl FnMut(&ActorCheckpoint) -> Result<(), CheckpointError>,
    ) -> Result<u64, CheckpointError> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let file_len = f.metadata()?.len();
        let mut good = 0u64;
        let mut len = [0u8; 8];
        while good + 8 <= file_len {
            f.read_exact(&mut len)?;
            let n = u64::from_le_bytes(len);
            if n > file_len - good - 8 {
                break;
            }
            let mut buf = vec![0u8; n as usize];
            f.read_exact(&mut buf)?;
            let Ok(c) = ActorCheckpoint::decode(&buf, self.max_state_bytes) else {
                break;
            };
            if each(&c).is_err() {
                break;
            }
            good += 8 + n;
        }
        Ok(good)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateDelta, WASM_PAGE};
    use ed25519_dalek::SigningKey;

    const MAX: u64 = 1 << 24;

    struct Fixture {
        dir: tempfile::TempDir,
        key: SigningKey,
        actor: ActorId,
        memory: Vec<u8>,
    }

    impl Fixture {
        fn new() -> Self {
            let mut memory = vec![0u8; 2 * WASM_PAGE as usize];
            memory[100] = 1;
            Self {
                dir: tempfile::tempdir().unwrap(),
                key: SigningKey::from_bytes(&[9; 32]),
                actor: ActorId::new(),
                memory,
            }
        }

        fn open(&self) -> CheckpointStore {
            let s = CheckpointStore::open(self.dir.path(), MAX).unwrap();
            s.trust(
                self.key.verifying_key().to_bytes(),
                ExecutorId::new("a").unwrap(),
            );
            s
        }

        fn full(&self, seq: u64) -> ActorCheckpoint {
            let hash = StateHashes::of(&self.memory, &[seq]).root();
            let state = StateDelta::full(&self.memory, vec![seq]);
            ActorCheckpoint::sign(self.actor, seq, hash, state, Default::default(), &self.key)
        }

        /// Writes `value` at `at` and checkpoints the one page as a delta.
        fn delta(&mut self, seq: u64, base: u64, at: usize, value: u8) -> ActorCheckpoint {
            self.memory[at] = value;
            let page = at / crate::state::PAGE;
            let mut state = StateDelta {
                base: Some(base),
                memory_bytes: self.memory.len() as u64,
                globals: vec![seq],
                ..Default::default()
            };
            let p = crate::state::PAGE;
            state.push_page(page as u32, &self.memory[page * p..(page + 1) * p]);
            let hash = StateHashes::of(&self.memory, &[seq]).root();
            ActorCheckpoint::sign(self.actor, seq, hash, state, Default::default(), &self.key)
        }
    }

    #[test]
    fn deltas_chain_on_a_full_checkpoint_and_survive_reopening() {
        let mut f = Fixture::new();
        let store = f.open();
        store.store(&f.full(1)).unwrap();
        store.store(&f.delta(2, 1, 70_000, 5)).unwrap();
        store.store(&f.delta(3, 2, 10, 6)).unwrap();
        drop(store);
        let store = f.open();
        assert_eq!(store.latest(f.actor).unwrap().sequence, 3);
        let LoadedState {
            sequence: seq,
            image,
            ..
        } = store.load(f.actor).unwrap();
        assert_eq!(seq, 3);
        assert_eq!(image.memory, f.memory);
        assert_eq!(image.globals, vec![3]);
        assert_eq!(store.records(f.actor).unwrap().len(), 3);
        // A new full checkpoint replaces the log.
        store.store(&f.full(4)).unwrap();
        assert_eq!(store.records(f.actor).unwrap().len(), 1);
    }

    #[test]
    fn forged_corrupted_and_replayed_checkpoints_are_refused_and_change_nothing() {
        let mut f = Fixture::new();
        let store = f.open();
        store.store(&f.full(1)).unwrap();
        let log = std::fs::read(store.log_path(f.actor)).unwrap();

        let mut stranger = f.full(2);
        let other = SigningKey::from_bytes(&[3; 32]);
        stranger = ActorCheckpoint::sign(
            stranger.actor_id,
            2,
            stranger.state_hash,
            stranger.state,
            stranger.cursors,
            &other,
        );
        assert!(matches!(
            store.store(&stranger),
            Err(CheckpointError::UnknownSigner)
        ));

        let mut forged = f.full(2);
        forged.state.globals[0] = 99;
        assert!(matches!(
            store.store(&forged),
            Err(CheckpointError::BadSignature)
        ));

        let good = f.full(2);
        let corrupt = ActorCheckpoint::sign(
            f.actor,
            2,
            [0; 32],
            good.state.clone(),
            Default::default(),
            &f.key,
        );
        assert!(matches!(
            store.store(&corrupt),
            Err(CheckpointError::HashMismatch)
        ));

        assert!(matches!(
            store.store(&f.full(1)),
            Err(CheckpointError::Replay { last: 1, got: 1 })
        ));

        let orphan = f.delta(2, 7, 0, 1);
        assert!(matches!(
            store.store(&orphan),
            Err(CheckpointError::MissingBase {
                base: 7,
                held: Some(1)
            })
        ));

        assert_eq!(store.latest(f.actor).unwrap().sequence, 1);
        assert_eq!(std::fs::read(store.log_path(f.actor)).unwrap(), log);
    }

    #[test]
    fn a_record_torn_by_a_crash_is_cut_on_open() {
        let mut f = Fixture::new();
        let store = f.open();
        store.store(&f.full(1)).unwrap();
        store.store(&f.delta(2, 1, 5, 5)).unwrap();
        let path = store.log_path(f.actor);
        drop(store);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 10).unwrap();
        let store = f.open();
        assert_eq!(store.latest(f.actor).unwrap().sequence, 1);
        // The cut log takes the next delta on the surviving checkpoint.
        f.memory[5] = 0;
        store.store(&f.delta(3, 1, 5, 8)).unwrap();
        assert_eq!(store.load(f.actor).unwrap().image.memory, f.memory);
    }
}
