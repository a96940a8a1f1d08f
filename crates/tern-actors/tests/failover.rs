//! Fault tolerance between three executors' managers, on a simulated clock:
//! replication of checkpoints, leases, and claims after an executor dies or
//! is cut off. Every protocol message is encoded and decoded as it would
//! travel; the network is a queue that can drop an executor.

use ed25519_dalek::SigningKey;
use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv};
use tern_actors::manager::{ActorMigrationManager, FailoverConfig, ManagerConfig, MigrationState};
use tern_actors::policy::DefaultMigrationPolicy;
use tern_actors::policy::MigrationReason;
use tern_actors::protocol::ActorMessage;
use tern_actors::runtime::{ActorConfig, ActorMode};
use tern_actors::{CheckpointStore, Envelope};
use tern_proto::{ActorId, ExecutorId, SenderId};

const NAMES: [&str; 3] = ["exec-a", "exec-b", "exec-c"];
const STEP: Duration = Duration::from_millis(10);

struct Cluster {
    execs: Vec<ActorMigrationManager>,
    /// Executors that run (a dead one does nothing).
    up: [bool; 3],
    /// Executors whose links work (a cut-off one runs, alone).
    linked: [bool; 3],
    now: Instant,
    /// Messages lost on the wire.
    lose: fn(&ActorMessage) -> bool,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn new() -> Self {
        let ids: Vec<ExecutorId> = NAMES.iter().map(|n| ExecutorId::new(*n).unwrap()).collect();
        let mut execs = Vec::new();
        let mut dirs = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let store = CheckpointStore::open(dir.path(), 256 << 20).unwrap();
            let mut cfg = ManagerConfig::new(id.clone());
            let mut f = FailoverConfig::new(ids.clone());
            f.heartbeat = Duration::from_millis(50);
            f.lease = Duration::from_millis(300);
            cfg.failover = Some(f);
            let key = SigningKey::from_bytes(&[i as u8 + 1; 32]);
            let policy = Box::new(DefaultMigrationPolicy::default());
            execs.push(ActorMigrationManager::new(cfg, key, store, policy).unwrap());
            dirs.push(dir);
        }
        for e in &execs {
            for (j, id) in ids.iter().enumerate() {
                let key = SigningKey::from_bytes(&[j as u8 + 1; 32]);
                e.trust_peer(id.clone(), key.verifying_key().to_bytes());
            }
        }
        let mut c = Self {
            execs,
            up: [true; 3],
            linked: [true; 3],
            now: Instant::now(),
            lose: |_| false,
            _dirs: dirs,
        };
        c.gossip();
        c
    }

    /// What gossip would say: the executors that run and can be reached.
    fn gossip(&mut self) {
        let live: Vec<ExecutorId> = (0..3)
            .filter(|&i| self.up[i] && self.linked[i])
            .map(|i| self.execs[i].id().clone())
            .collect();
        for i in 0..3 {
            if self.linked[i] {
                self.execs[i].set_live(live.clone());
            } else {
                self.execs[i].set_live([]);
            }
        }
    }

    /// One step of the clock: timers, actors, and every message delivered.
    fn step(&mut self) {
        self.now += STEP;
        for i in (0..3).filter(|&i| self.up[i]) {
            self.execs[i].tick(self.now);
            self.execs[i].run(100, self.now);
        }
        loop {
            let mut wire = Vec::new();
            for i in 0..3 {
                let from = self.execs[i].id().clone();
                for (to, msg) in self.execs[i].take_outbox() {
                    wire.push((from.clone(), to, msg.encode()));
                }
            }
            if wire.is_empty() {
                return;
            }
            for (from, to, bytes) in wire {
                let (i, j) = (self.index(&from), self.index(&to));
                let msg = ActorMessage::decode(&bytes).unwrap();
                if self.up[i]
                    && self.up[j]
                    && self.linked[i]
                    && self.linked[j]
                    && !(self.lose)(&msg)
                {
                    self.execs[j].handle(&from, msg, self.now);
                }
            }
        }
    }

    fn index(&self, id: &ExecutorId) -> usize {
        self.execs.iter().position(|e| e.id() == id).unwrap()
    }

    /// Executors that run `actor` now (hosting it, with a lease).
    fn running(&self, actor: ActorId) -> Vec<usize> {
        (0..3)
            .filter(|&i| self.up[i] && self.execs[i].runs(actor) && self.execs[i].leased(self.now))
            .collect()
    }

    /// Steps for `d`, checking at every step that at most one copy runs.
    fn run_for(&mut self, d: Duration, actor: ActorId) {
        let end = self.now + d;
        while self.now < end {
            self.step();
            let r = self.running(actor);
            assert!(r.len() <= 1, "two copies of {actor} run: {r:?}");
        }
    }

    /// Steps until `actor` runs on another executor than `old`; returns
    /// where and after how long.
    fn until_moved(&mut self, actor: ActorId, old: usize, limit: Duration) -> (usize, Duration) {
        let start = self.now;
        while self.now < start + limit {
            self.run_for(STEP, actor);
            if let [i] = self.running(actor)[..] {
                if i != old {
                    return (i, self.now - start);
                }
            }
        }
        panic!("{actor} did not run again within {limit:?}");
    }
}

fn env(seq: u64, payload: Vec<u8>) -> Envelope {
    Envelope {
        sender: SenderId::new("client").unwrap(),
        seq,
        payload,
    }
}

fn stateful() -> ActorConfig {
    ActorConfig {
        mode: ActorMode::Stateful {
            checkpoint_interval: Duration::from_millis(100),
            max_state_size_bytes: 16 << 20,
        },
        ..ActorConfig::default()
    }
}

/// A, B, C up; an actor on A with keys 1..=20 written and checkpointed to
/// the others.
fn cluster_with_actor() -> (Cluster, ActorId) {
    let mut c = Cluster::new();
    let actor = c.execs[0]
        .deploy(examples::KV.as_bytes(), stateful())
        .unwrap();
    for k in 1..=20u64 {
        c.execs[0]
            .send(actor, env(k, kv::put(k, k * 10)), None)
            .unwrap();
    }
    c.run_for(Duration::from_millis(500), actor);
    assert_eq!(c.running(actor), [0]);
    for i in [1, 2] {
        assert_eq!(
            c.execs[i].replicas(),
            [actor],
            "{} keeps a replica",
            NAMES[i]
        );
        assert!(c.execs[i].store().latest(actor).unwrap().sequence > 0);
    }
    (c, actor)
}

fn get(c: &mut Cluster, at: usize, actor: ActorId, key: u64) -> u64 {
    let reply = c.execs[at].call(actor, &kv::get(key)).unwrap();
    u64::from_le_bytes(reply[..8].try_into().unwrap())
}

#[test]
fn a_dead_executors_actor_runs_again_on_one_survivor_with_its_state() {
    let (mut c, actor) = cluster_with_actor();
    c.up[0] = false;
    c.gossip();
    let (at, after) = c.until_moved(actor, 0, Duration::from_secs(5));
    assert_ne!(at, 0);
    // The owner's lease (300 ms) is surely over after twice as long silent;
    // its last heartbeat came up to 50 ms before it died.
    assert!(
        after >= Duration::from_millis(550),
        "restored after {after:?}"
    );
    assert!(
        after <= Duration::from_millis(1000),
        "restored after {after:?}"
    );
    assert_eq!(get(&mut c, at, actor, 7), 70);
    assert_eq!(get(&mut c, at, actor, 20), 200);
    // The other survivor was told where it runs now.
    let other = 3 - at;
    assert_eq!(c.execs[other].moved_to(actor), Some(c.execs[at].id()));
    // It goes on: new messages, and checkpoints now replicated to the other.
    c.execs[at]
        .send(actor, env(21, kv::put(21, 210)), None)
        .unwrap();
    c.run_for(Duration::from_secs(1), actor);
    assert_eq!(c.running(actor), [at]);
    assert_eq!(get(&mut c, at, actor, 21), 210);
    assert_eq!(c.execs[other].replicas(), [actor]);
}

#[test]
fn a_cut_off_owner_stops_on_its_own_and_drops_its_copy_when_back() {
    let (mut c, actor) = cluster_with_actor();
    c.linked[0] = false;
    c.gossip();
    // A still runs, alone: its lease ends and it stops before B or C start.
    let (at, _) = c.until_moved(actor, 0, Duration::from_secs(5));
    assert_ne!(at, 0);
    assert!(c.execs[0].runs(actor) && !c.execs[0].leased(c.now));
    // A message that reached A meanwhile waits there, unhandled.
    c.execs[0]
        .send(actor, env(21, kv::put(21, 1)), None)
        .unwrap();
    c.linked[0] = true;
    c.gossip();
    c.run_for(Duration::from_secs(1), actor);
    assert!(!c.execs[0].runs(actor), "A dropped its copy");
    assert_eq!(c.execs[0].moved_to(actor), Some(c.execs[at].id()));
    assert!(c.execs[0].leased(c.now), "A runs again (other actors)");
    assert_eq!(c.running(actor), [at]);
}

#[test]
fn a_replica_from_an_unknown_signer_or_an_old_owner_is_refused() {
    let (mut c, actor) = cluster_with_actor();
    let before = c.execs[1].store().latest(actor).unwrap();
    // Checkpoints signed by a key nobody trusts, sent as A's.
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let forged = tern_actors::ActorCheckpoint::sign(
        actor,
        before.sequence + 1,
        [0; 32],
        tern_actors::StateDelta::default(),
        Default::default(),
        &stranger,
    );
    let a = c.execs[0].id().clone();
    c.execs[1].handle(
        &a,
        ActorMessage::CheckpointReplica {
            actor,
            epoch: tern_proto::OwnerEpoch(1),
            settings: tern_actors::protocol::ActorSettings {
                checkpoint_interval_ms: Some(100),
                max_state_size_bytes: 16 << 20,
                fuel_per_message: 1000,
                mailbox_capacity: 16,
                tenant: None,
            },
            module: Vec::new(),
            records: vec![tern_actors::protocol::WireRecord(forged.encode())],
        },
        c.now,
    );
    assert_eq!(
        c.execs[1].store().latest(actor).unwrap().sequence,
        before.sequence
    );
    let out = c.execs[1].take_outbox();
    assert!(matches!(
        &out[..],
        [(_, ActorMessage::CheckpointResponse { sequence: None, .. })]
    ));
}

/// The survivors last heard the owner at different times: a claim the
/// later one refuses is tried again soon, and wins once its silence is
/// long enough too (not after the claim's 10 s timeout).
#[test]
fn a_refused_claim_is_retried_until_every_voter_agrees() {
    let (mut c, actor) = cluster_with_actor();
    c.up[0] = false;
    c.gossip();
    // The survivor that will claim (rendezvous hashing, as the manager
    // does) and the voter, which hears a last heartbeat 200 ms later.
    let rank = |i: usize| {
        let mut h = blake3::Hasher::new();
        h.update(&actor.to_bytes());
        h.update(NAMES[i].as_bytes());
        *h.finalize().as_bytes()
    };
    let claimant = if rank(1) < rank(2) { 1 } else { 2 };
    let voter = 3 - claimant;
    let a = c.execs[0].id().clone();
    let later = c.now + Duration::from_millis(200);
    c.execs[voter].handle(&a, ActorMessage::Heartbeat { nonce: 0 }, later);
    let (at, after) = c.until_moved(actor, 0, Duration::from_secs(5));
    assert_eq!(at, claimant);
    assert!(
        after >= Duration::from_millis(750),
        "restored after {after:?}"
    );
    assert!(
        after <= Duration::from_millis(1200),
        "restored after {after:?}"
    );
}

/// A stopped actor's replicas go with it: when its executor dies later,
/// nobody brings it back.
#[test]
fn a_stopped_actor_is_not_restored_when_its_executor_dies() {
    let (mut c, actor) = cluster_with_actor();
    c.execs[0].remove(actor).unwrap();
    c.run_for(Duration::from_millis(50), actor);
    for i in [1, 2] {
        assert!(c.execs[i].replicas().is_empty(), "{} dropped it", NAMES[i]);
        assert!(c.execs[i].store().latest(actor).is_none());
    }
    c.up[0] = false;
    c.gossip();
    c.run_for(Duration::from_secs(2), actor);
    assert!(c.running(actor).is_empty());
}

/// The target of a move dies after the source paused the actor and sent
/// its last checkpoint, before confirming: once the target is surely gone,
/// a majority's vote lets the source resume its paused copy (instead of
/// keeping it paused for ever).
#[test]
fn a_source_in_doubt_resumes_when_its_target_died() {
    let (mut c, actor) = cluster_with_actor();
    c.lose = |m| matches!(m, ActorMessage::MigrationComplete { .. });
    let b = c.execs[1].id().clone();
    let m = c.execs[0]
        .initiate_migration(actor, b, MigrationReason::Operator, c.now)
        .unwrap();
    c.run_for(Duration::from_millis(100), actor);
    assert_eq!(
        c.execs[0].get_state(&m).unwrap().state,
        MigrationState::Completing
    );
    assert!(c.running(actor).is_empty(), "paused while in doubt");
    c.up[1] = false;
    c.lose = |_| false;
    c.gossip();
    let (at, after) = c.until_moved(actor, 1, Duration::from_secs(20));
    assert_eq!(at, 0, "the source runs it again");
    assert!(
        after >= Duration::from_secs(9),
        "after the step timeout: {after:?}"
    );
    assert!(matches!(
        c.execs[0].get_state(&m).unwrap().state,
        MigrationState::Failed(_)
    ));
    assert_eq!(get(&mut c, 0, actor, 7), 70);
    // It goes on, and the remaining peer keeps its replica up to date.
    c.execs[0]
        .send(actor, env(21, kv::put(21, 210)), None)
        .unwrap();
    c.run_for(Duration::from_millis(500), actor);
    assert_eq!(get(&mut c, 0, actor, 21), 210);
    assert_eq!(c.execs[2].replicas(), [actor]);
}

/// The target completed the move, ran the actor and replicated it, then
/// died before its confirmation reached the source: the actor is restored
/// from the target's replica or resumed on the source, on exactly one.
#[test]
fn a_target_that_completed_and_died_leaves_exactly_one_copy() {
    let (mut c, actor) = cluster_with_actor();
    c.lose = |m| matches!(m, ActorMessage::MigrationCompleted { .. });
    let b = c.execs[1].id().clone();
    let m = c.execs[0]
        .initiate_migration(actor, b, MigrationReason::Operator, c.now)
        .unwrap();
    c.run_for(Duration::from_millis(300), actor);
    assert_eq!(c.running(actor), [1], "the target runs it");
    assert_eq!(
        c.execs[0].get_state(&m).unwrap().state,
        MigrationState::Completing
    );
    c.up[1] = false;
    c.lose = |_| false;
    c.gossip();
    let (at, after) = c.until_moved(actor, 1, Duration::from_secs(20));
    assert_ne!(at, 1);
    eprintln!("{} runs it after {after:?}", NAMES[at]);
    c.run_for(Duration::from_secs(12), actor);
    assert_eq!(c.running(actor), [at], "one copy, still");
    assert!(c.execs[0].get_state(&m).unwrap().state.is_final());
    assert_eq!(get(&mut c, at, actor, 7), 70);
}
