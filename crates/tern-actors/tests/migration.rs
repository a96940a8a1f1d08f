//! Migrations between two executors' managers with real wasmtime actors,
//! real checkpoint stores on disk and every protocol message encoded and
//! decoded as it would travel; the network in between is a queue here (the
//! transport is the network layer's job).

use ed25519_dalek::SigningKey;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv, ledger, log};
use tern_actors::manager::{ActorMigrationManager, ManagerConfig, MigrationState, SendOutcome};
use tern_actors::policy::{DefaultMigrationPolicy, MigrationReason};
use tern_actors::protocol::ActorMessage;
use tern_actors::runtime::{ActorConfig, ActorError};
use tern_actors::{CheckpointStore, Envelope};
use tern_proto::{ActorId, ExecutorId, MigrationId, SenderId};

/// Executors and the messages in flight between them.
struct Net {
    execs: Vec<ActorMigrationManager>,
    wire: VecDeque<(usize, ExecutorId, Vec<u8>)>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Net {
    fn new(names: &[&str]) -> Self {
        let mut execs = Vec::new();
        let mut dirs = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let store = CheckpointStore::open(dir.path(), 256 << 20).unwrap();
            let key = SigningKey::from_bytes(&[i as u8 + 1; 32]);
            let cfg = ManagerConfig::new(ExecutorId::new(*name).unwrap());
            let policy = Box::new(DefaultMigrationPolicy::default());
            execs.push(ActorMigrationManager::new(cfg, key, store, policy).unwrap());
            dirs.push(dir);
        }
        for i in 0..names.len() {
            for j in 0..names.len() {
                let key = SigningKey::from_bytes(&[j as u8 + 1; 32]);
                let id = execs[j].id().clone();
                execs[i].trust_peer(id, key.verifying_key().to_bytes());
            }
        }
        Self {
            execs,
            wire: VecDeque::new(),
            _dirs: dirs,
        }
    }

    fn index(&self, id: &ExecutorId) -> usize {
        self.execs.iter().position(|e| e.id() == id).unwrap()
    }

    /// Moves what the executors want sent onto the wire, encoded.
    fn collect(&mut self) {
        for i in 0..self.execs.len() {
            for (to, msg) in self.execs[i].take_outbox() {
                let j = self.index(&to);
                let from = self.execs[i].id().clone();
                self.wire.push_back((j, from, msg.encode()));
            }
        }
    }

    /// Delivers up to `n` messages from the wire.
    fn deliver(&mut self, n: usize) -> usize {
        self.collect();
        let mut done = 0;
        while done < n {
            let Some((to, from, bytes)) = self.wire.pop_front() else {
                break;
            };
            let msg = ActorMessage::decode(&bytes).unwrap();
            self.execs[to].handle(&from, msg, Instant::now());
            self.collect();
            done += 1;
        }
        done
    }

    /// Delivers until nothing is in flight.
    fn settle(&mut self) {
        while self.deliver(usize::MAX) > 0 {}
    }

    /// Delivers until nothing is in flight, losing the messages `lose`
    /// picks; gives them back (to replay late).
    fn settle_losing(
        &mut self,
        lose: impl Fn(&ActorMessage) -> bool,
    ) -> Vec<(usize, ExecutorId, ActorMessage)> {
        let mut lost = Vec::new();
        loop {
            self.collect();
            let Some((to, from, bytes)) = self.wire.pop_front() else {
                return lost;
            };
            let msg = ActorMessage::decode(&bytes).unwrap();
            if lose(&msg) {
                lost.push((to, from, msg));
            } else {
                self.execs[to].handle(&from, msg, Instant::now());
            }
        }
    }

    fn state(&self, i: usize, m: &MigrationId) -> MigrationState {
        self.execs[i].get_state(m).unwrap().state.clone()
    }
}

/// Two executors; an actor of `wat` deployed on A, `prepare` run, and a
/// move to B started for `reason` (nothing delivered yet).
fn start_move(
    wat: &str,
    reason: MigrationReason,
    prepare: impl FnOnce(&mut Net),
) -> (Net, ActorId, MigrationId) {
    let mut net = Net::new(&["exec-a", "exec-b"]);
    let actor = net.execs[0]
        .deploy(wat.as_bytes(), ActorConfig::default())
        .unwrap();
    prepare(&mut net);
    let m = net.execs[0]
        .initiate_migration(
            actor,
            ExecutorId::new("exec-b").unwrap(),
            reason,
            Instant::now(),
        )
        .unwrap();
    (net, actor, m)
}

fn env(sender: &str, seq: u64, payload: Vec<u8>) -> Envelope {
    Envelope {
        sender: SenderId::new(sender).unwrap(),
        seq,
        payload,
    }
}

/// The seed's scenario: A at 90 % load, B at 20 %. A stateful actor on A
/// handles messages; `evaluate_migration` picks B for load balancing; both
/// sides report Complete; B holds a checkpoint past 0; the actor answers on
/// B with its state intact.
#[test]
fn an_overloaded_executor_sheds_an_actor_that_keeps_its_state() {
    let mut net = Net::new(&["exec-a", "exec-b"]);
    let (a, b) = (0, 1);
    let actor = net.execs[a]
        .deploy(examples::KV.as_bytes(), ActorConfig::default())
        .unwrap();
    for k in 1..=20u64 {
        let out = net.execs[a]
            .send(actor, env("client", k, kv::put(k, k * 100)), None)
            .unwrap();
        assert!(matches!(out, SendOutcome::Accepted(_)));
    }
    assert_eq!(net.execs[a].run(100, Instant::now()).len(), 20);

    net.execs[a].set_load(0.9);
    net.execs[b].set_load(0.2);
    let b_load = net.execs[b].local_load();
    net.execs[a].peer_load(b_load);
    let started = net.execs[a].evaluate_migration(Instant::now());
    assert_eq!(started.len(), 1, "the policy picks the actor");
    let m = &started[0];
    let mig = net.execs[a].get_state(m).unwrap();
    assert_eq!(mig.peer.as_str(), "exec-b");
    assert_eq!(mig.reason, MigrationReason::LoadBalancing);
    net.settle();

    assert_eq!(net.state(a, m), MigrationState::Complete);
    assert_eq!(net.state(b, m), MigrationState::Complete);
    assert!(net.execs[b].store().latest(actor).unwrap().sequence > 0);
    assert!(net.execs[b].runs(actor) && !net.execs[a].runs(actor));
    assert_eq!(net.execs[a].moved_to(actor).unwrap().as_str(), "exec-b");
    assert_eq!(
        net.execs[a]
            .send(actor, env("client", 21, kv::get(7)), None)
            .unwrap(),
        SendOutcome::Moved(ExecutorId::new("exec-b").unwrap())
    );
    net.execs[b]
        .send(actor, env("client", 21, kv::get(7)), None)
        .unwrap();
    let handled = net.execs[b].run(10, Instant::now());
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0].reply.as_ref().unwrap(), &700u64.to_le_bytes());
    // Just moved: the cooldown keeps it on B even if B is now overloaded.
    net.execs[b].set_load(0.95);
    let a_load = net.execs[a].local_load();
    net.execs[b].peer_load(a_load);
    assert!(net.execs[b].evaluate_migration(Instant::now()).is_empty());
}

/// A target that refuses leaves the actor running on the source, messages
/// and all.
#[test]
fn a_rejected_migration_leaves_the_actor_where_it_was() {
    let (mut net, actor, m) =
        start_move(examples::COUNTER, MigrationReason::LoadBalancing, |net| {
            net.execs[1].set_load(0.95)
        });
    net.settle();
    assert!(matches!(net.state(0, &m), MigrationState::Rejected(_)));
    assert!(net.execs[0].runs(actor));
    net.execs[0]
        .send(actor, env("c", 1, 5i64.to_le_bytes().to_vec()), None)
        .unwrap();
    assert_eq!(net.execs[0].run(10, Instant::now()).len(), 1);
}

/// One sender's view: what it sent and where it thinks the actor is.
struct Sender {
    name: String,
    number: u64,
    next: u64,
    at: usize,
}

/// 10,000 messages from 4 senders while the actor migrates back and forth
/// 20 times: each handled exactly once, in its sender's order, as the
/// actor's own log shows.
#[test]
fn messages_are_handled_once_in_order_across_twenty_migrations() {
    const PER_SENDER: u64 = 2_500;
    let mut net = Net::new(&["exec-a", "exec-b"]);
    let actor: ActorId = net.execs[0]
        .deploy(examples::LOG.as_bytes(), ActorConfig::default())
        .unwrap();
    let mut senders: Vec<Sender> = (0..4)
        .map(|n| Sender {
            name: format!("sender-{n}"),
            number: n,
            next: 1,
            at: 0,
        })
        .collect();
    let (mut moves, mut current): (usize, Option<(usize, MigrationId)>) = (0, None);
    let mut round = 0u64;
    let (mut redirected, mut rewound) = (0, 0);
    while senders.iter().any(|s| s.next <= PER_SENDER) || current.is_some() || moves < 20 {
        round += 1;
        assert!(round < 200_000, "no progress: {moves} moves");
        for s in senders.iter_mut().filter(|s| s.next <= PER_SENDER) {
            let e = env(&s.name, s.next, log::append(s.number, s.next));
            match net.execs[s.at].send(actor, e, None) {
                Ok(SendOutcome::Accepted(_)) => s.next += 1,
                Ok(SendOutcome::Moved(to)) => {
                    redirected += 1;
                    s.at = net.index(&to)
                }
                Ok(SendOutcome::Unknown) => s.at = 1 - s.at,
                Err(tern_actors::manager::ManagerError::Actor(ActorError::OutOfOrder(o))) => {
                    rewound += 1;
                    s.next = o.expected
                }
                Err(tern_actors::manager::ManagerError::Actor(ActorError::MailboxFull(_))) => {}
                Err(e) => panic!("{e}"),
            }
        }
        for e in net.execs.iter_mut() {
            for h in e.run(3, Instant::now()) {
                h.reply.unwrap();
            }
        }
        net.deliver(1);
        if let Some((src, m)) = &current {
            if net.execs[*src].get_state(m).unwrap().state.is_final() {
                assert_eq!(net.state(*src, m), MigrationState::Complete);
                moves += 1;
                current = None;
            }
        } else if moves < 20 && round.is_multiple_of(97) {
            let src = (0..2).find(|&i| net.execs[i].runs(actor)).unwrap();
            let to = net.execs[1 - src].id().clone();
            let m = net.execs[src]
                .initiate_migration(actor, to, MigrationReason::Operator, Instant::now())
                .unwrap();
            current = Some((src, m));
        }
    }
    net.settle();
    let at = (0..2).find(|&i| net.execs[i].runs(actor)).unwrap();
    while !net.execs[at].run(1000, Instant::now()).is_empty() {}
    let mut entries = Vec::new();
    loop {
        let reply = net.execs[at]
            .call(actor, &log::read(entries.len() as u32, 4000))
            .unwrap();
        if reply.is_empty() {
            break;
        }
        entries.extend(log::entries(&reply));
    }
    assert_eq!(moves, 20);
    eprintln!("{round} rounds, {redirected} redirects, {rewound} rewinds");
    assert!(
        redirected > 0 && rewound > 0,
        "senders met moved actors and forwarded messages"
    );
    assert_eq!(
        entries.len() as u64,
        4 * PER_SENDER,
        "every message exactly once"
    );
    let mut last = [0u64; 4];
    for (sender, seq) in entries {
        assert_eq!(seq, last[sender as usize] + 1, "sender {sender}'s order");
        last[sender as usize] = seq;
    }
}

/// The target's confirmation is lost: the source, in doubt after its
/// timeout, asks; the target runs the actor, so the move completes.
#[test]
fn a_lost_confirmation_is_resolved_by_asking() {
    let (mut net, actor, m) = start_move(examples::COUNTER, MigrationReason::Operator, |_| {});
    let lost = net.settle_losing(|m| matches!(m, ActorMessage::MigrationCompleted { .. }));
    assert_eq!(lost.len(), 1);
    assert_eq!(net.state(0, &m), MigrationState::Completing);
    assert!(!net.execs[0].runs(actor), "paused while in doubt");
    net.execs[0].tick(Instant::now() + Duration::from_secs(11));
    net.settle();
    assert_eq!(net.state(0, &m), MigrationState::Complete);
    assert!(net.execs[1].runs(actor) && !net.execs[0].runs(actor));
}

/// The final checkpoint is lost: the source asks, the target gives the
/// migration up before answering, the actor runs on the source again, and
/// the final checkpoint arriving late is refused. One copy throughout.
#[test]
fn a_lost_completion_leaves_one_copy_on_the_source() {
    let (mut net, actor, m) = start_move(examples::COUNTER, MigrationReason::Operator, |_| {});
    let lost = net.settle_losing(|m| matches!(m, ActorMessage::MigrationComplete { .. }));
    assert_eq!(lost.len(), 1);
    net.execs[0]
        .send(actor, env("c", 1, 5i64.to_le_bytes().to_vec()), None)
        .unwrap();
    net.execs[0].tick(Instant::now() + Duration::from_secs(11));
    net.settle();
    assert!(matches!(net.state(0, &m), MigrationState::Failed(_)));
    assert!(net.execs[0].runs(actor) && !net.execs[1].runs(actor));
    let handled = net.execs[0].run(10, Instant::now());
    assert_eq!(
        handled.len(),
        1,
        "the message held during the move is handled here"
    );
    for (to, from, msg) in lost {
        net.execs[to].handle(&from, msg, Instant::now());
    }
    net.settle();
    assert!(!net.execs[1].runs(actor), "the late completion was refused");
    assert!(net.execs[0].runs(actor));
}

/// Writes made while the first checkpoint travels go over in a pre-copy
/// round with the actor running, and arrive intact.
#[test]
fn writes_during_the_first_round_go_over_in_a_pre_copy_round() {
    let (mut net, actor, m) = start_move(examples::KV, MigrationReason::Operator, |_| {});
    net.deliver(1); // the request: B stores and accepts
    for k in 1..=50u64 {
        net.execs[0]
            .send(actor, env("c", k, kv::put(k, k + 1000)), None)
            .unwrap();
    }
    assert_eq!(net.execs[0].run(100, Instant::now()).len(), 50);
    std::thread::sleep(Duration::from_millis(10));
    net.settle();
    let mig = net.execs[0].get_state(&m).unwrap();
    assert_eq!(mig.state, MigrationState::Complete);
    assert!(mig.rounds >= 1, "a round went while the actor ran");
    for k in [1u64, 25, 50] {
        assert_eq!(
            net.execs[1].call(actor, &kv::get(k)).unwrap(),
            (k + 1000).to_le_bytes()
        );
    }
}

/// The bank ledger, written in C and built for wasm32 by the project's
/// script: deposits, transfers, three moves between executors with
/// transfers in between; no money made or lost, every transfer counted,
/// and an overdraft refused by the actor itself.
#[test]
fn the_c_ledger_keeps_its_books_across_moves() {
    let Some(wasm) = examples::ledger_wasm() else {
        assert!(
            std::env::var_os("TERN_REQUIRE_C_ACTORS").is_none(),
            "ledger.wasm is not built (scripts/build-actors.sh)"
        );
        eprintln!("SKIPPED: ledger.wasm is not built (run scripts/build-actors.sh)");
        return;
    };
    let mut net = Net::new(&["exec-a", "exec-b"]);
    let actor = net.execs[0].deploy(&wasm, ActorConfig::default()).unwrap();
    let mut seq = 0u64;
    let mut at = 0usize;
    let mut ask = |net: &mut Net, at: usize, msg: Vec<u8>| {
        seq += 1;
        net.execs[at]
            .send(actor, env("bank", seq, msg), None)
            .unwrap();
        let h = net.execs[at].run(1, Instant::now());
        h.into_iter().next().unwrap().reply
    };
    for account in 1..=10u64 {
        ask(&mut net, at, ledger::deposit(account, 1000)).unwrap();
    }
    let mut made = 0u64;
    for round in 0..4u64 {
        for i in 0..50u64 {
            let (from, to) = ((i + round) % 10 + 1, (i * 7 + round) % 10 + 1);
            if ask(&mut net, at, ledger::transfer(from, to, 37)).is_ok() {
                made += 1;
            }
        }
        if round < 3 {
            let to = net.execs[1 - at].id().clone();
            net.execs[at]
                .initiate_migration(actor, to, MigrationReason::Operator, Instant::now())
                .unwrap();
            net.settle();
            at = 1 - at;
            assert!(net.execs[at].runs(actor));
        }
    }
    assert!(matches!(
        ask(&mut net, at, ledger::transfer(1, 2, 1_000_000)),
        Err(ActorError::Refused(-2))
    ));
    let audit = ask(&mut net, at, ledger::audit()).unwrap();
    assert_eq!(ledger::amount(&audit), 10 * 1000, "money made or lost");
    assert_eq!(u64::from_le_bytes(audit[8..16].try_into().unwrap()), made);
    assert!(made > 150, "{made} transfers");
}
