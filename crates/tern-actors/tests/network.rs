//! Executors over mutual TLS on loopback: the seed's scenario for real.

mod support;

use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv};
use tern_actors::manager::{MigrationState, SendOutcome};
use tern_actors::policy::MigrationReason;
use tern_actors::runtime::{ActorConfig, ActorMode};
use tern_actors::Envelope;
use tern_proto::SenderId;

fn env(seq: u64, payload: Vec<u8>) -> Envelope {
    Envelope {
        sender: SenderId::new("client").unwrap(),
        seq,
        payload,
    }
}

/// A at 90 % load, B at 20 %: A's stateful actor handles messages,
/// `evaluate_migration` picks B for load balancing, the actor moves over
/// mutual TLS, both sides report Complete, B holds a checkpoint past 0 and
/// the actor answers the next message on B with its state intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_scenario_over_mutual_tls() {
    let mut c = support::cluster(2, 256 << 20).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let actor = a
        .with(|m| m.deploy(examples::KV.as_bytes(), ActorConfig::default()))
        .unwrap();
    for k in 1..=20u64 {
        let out = a.with(|m| m.send(actor, env(k, kv::put(k, k * 100)), None));
        assert!(matches!(out.unwrap(), SendOutcome::Accepted(_)));
    }
    for _ in 0..20 {
        let h = c.handled[0].recv().await.unwrap();
        h.reply.unwrap();
    }
    a.with(|m| m.set_load(0.9));
    let b_load = b.with(|m| {
        m.set_load(0.2);
        m.local_load()
    });
    let started = a.with(|m| {
        m.peer_load(b_load);
        m.evaluate_migration(Instant::now())
    });
    assert_eq!(started.len(), 1);
    let id = &started[0];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = a.with(|m| m.get_state(id).unwrap().state.is_final())
            && b.with(|m| m.get_state(id).is_some_and(|s| s.state.is_final()));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end: {:?} / {:?}",
            a.with(|m| m.get_state(id).map(|s| s.state.clone())),
            b.with(|m| m.get_state(id).map(|s| s.state.clone()))
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (state, reason, pause) = a.with(|m| {
        let s = m.get_state(id).unwrap();
        (s.state.clone(), s.reason, s.pause().unwrap())
    });
    assert_eq!(state, MigrationState::Complete);
    assert_eq!(reason, MigrationReason::LoadBalancing);
    assert_eq!(
        b.with(|m| m.get_state(id).unwrap().state.clone()),
        MigrationState::Complete
    );
    eprintln!("pause {pause:?}");
    assert!(b.with(|m| m.store().latest(actor).unwrap().sequence) > 0);
    let moved = a
        .with(|m| m.send(actor, env(21, kv::get(7)), None))
        .unwrap();
    assert!(matches!(moved, SendOutcome::Moved(to) if to.as_str() == "exec-1"));
    b.with(|m| m.send(actor, env(21, kv::get(7)), None))
        .unwrap();
    let h = tokio::time::timeout(Duration::from_secs(10), c.handled[1].recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.reply.unwrap(), 700u64.to_le_bytes());
}

/// Three executors that gossip: the one running a stateful actor stops
/// (its tasks end, as when its process dies); the actor runs again on one
/// of the others from its latest checkpoint, with its state, and gossip
/// tells where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_executors_actor_runs_again_on_a_survivor() {
    let mut c = support::cluster_with(3, 64 << 20, true).await;
    let config = ActorConfig {
        mode: ActorMode::Stateful {
            checkpoint_interval: Duration::from_millis(100),
            max_state_size_bytes: 16 << 20,
        },
        ..ActorConfig::default()
    };
    // Gossip first: everyone alive, leases granted.
    let start = Instant::now();
    while !c.nodes.iter().all(|n| n.with(|m| m.leased(Instant::now()))) {
        assert!(start.elapsed() < Duration::from_secs(10), "no leases");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let actor = c.nodes[0]
        .with(|m| m.deploy(examples::KV.as_bytes(), config))
        .unwrap();
    for k in 1..=20u64 {
        c.nodes[0]
            .with(|m| m.send(actor, env(k, kv::put(k, k * 100)), None))
            .unwrap();
    }
    for _ in 0..20 {
        c.handled[0].recv().await.unwrap().reply.unwrap();
    }
    // A checkpoint taken after the last put (one interval later), and
    // replicas on both others at least as new.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let wanted = c.nodes[0].with(|m| m.info(actor).unwrap().sequence);
    let start = Instant::now();
    while !(1..3).all(|i| {
        c.nodes[i].with(|m| {
            m.replicas() == [actor]
                && m.store()
                    .latest(actor)
                    .is_some_and(|l| l.sequence >= wanted)
        })
    }) {
        assert!(start.elapsed() < Duration::from_secs(10), "no replicas");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    while c.nodes[1].locate(actor).map(|e| e.as_str().to_string()) != Some("exec-0".into()) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gossip does not tell"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    c.nodes[0].shutdown();
    let died = Instant::now();
    let at = loop {
        let running: Vec<usize> = (1..3)
            .filter(|&i| c.nodes[i].with(|m| m.runs(actor)))
            .collect();
        assert!(running.len() <= 1, "two copies: {running:?}");
        if let [i] = running[..] {
            break i;
        }
        assert!(
            died.elapsed() < Duration::from_secs(10),
            "not restored within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("restored on exec-{at} after {:?}", died.elapsed());
    assert_eq!(
        c.nodes[at].with(|m| m.call(actor, &kv::get(7))).unwrap(),
        700u64.to_le_bytes()
    );
    let other = 3 - at;
    let start = Instant::now();
    while c.nodes[other].locate(actor).map(|e| e.as_str().to_string()) != Some(format!("exec-{at}"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gossip does not tell"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 10,000 messages from 4 senders (tasks of their own) while the actor
/// moves back and forth 20 times between two executors over mutual TLS:
/// each handled exactly once, in its sender's order, as the actor's own log
/// shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_once_in_order_across_twenty_moves_over_mtls() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tern_actors::examples::log;
    use tern_actors::manager::ManagerError;
    use tern_actors::runtime::ActorError;
    const PER_SENDER: u64 = 2_500;
    let mut c = support::cluster(2, 256 << 20).await;
    for mut rx in std::mem::take(&mut c.handled) {
        tokio::spawn(async move {
            while let Some(h) = rx.recv().await {
                h.reply.unwrap();
            }
        });
    }
    let c = Arc::new(c);
    let actor = c.nodes[0]
        .with(|m| m.deploy(examples::LOG.as_bytes(), ActorConfig::default()))
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4u64)
        .map(|n| {
            let c = c.clone();
            tokio::spawn(async move {
                let sender = SenderId::new(format!("sender-{n}")).unwrap();
                let (mut next, mut at, mut redirects) = (1u64, 0usize, 0u32);
                while next <= PER_SENDER {
                    let e = Envelope {
                        sender: sender.clone(),
                        seq: next,
                        payload: log::append(n, next),
                    };
                    match c.nodes[at].with(|m| m.send(actor, e, None)) {
                        Ok(SendOutcome::Accepted(_)) => next += 1,
                        Ok(SendOutcome::Moved(to)) => {
                            redirects += 1;
                            at = if to.as_str() == "exec-0" { 0 } else { 1 };
                        }
                        Ok(SendOutcome::Unknown) => at = 1 - at,
                        Err(ManagerError::Actor(ActorError::OutOfOrder(o))) => next = o.expected,
                        Err(ManagerError::Actor(ActorError::MailboxFull(_))) => {
                            tokio::time::sleep(Duration::from_millis(1)).await
                        }
                        Err(e) => panic!("{e}"),
                    }
                    if next % 64 == 0 {
                        tokio::time::sleep(Duration::from_micros(500)).await;
                    }
                }
                redirects
            })
        })
        .collect();
    let mover = {
        let (c, done) = (c.clone(), done.clone());
        tokio::spawn(async move {
            let mut moves = 0;
            while moves < 20 {
                let src = (0..2).find(|&i| c.nodes[i].with(|m| m.runs(actor)));
                let Some(src) = src else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let to = c.nodes[1 - src].with(|m| m.id().clone());
                let Ok(m) = c.nodes[src].with(|m| {
                    m.initiate_migration(actor, to, MigrationReason::Operator, Instant::now())
                }) else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                loop {
                    let s = c.nodes[src].with(|mm| mm.get_state(&m).unwrap().state.clone());
                    if s.is_final() {
                        assert_eq!(s, MigrationState::Complete);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                moves += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let mut redirects = 0;
    for s in senders {
        redirects += s.await.unwrap();
    }
    mover.await.unwrap();
    assert!(done.load(Ordering::Relaxed));
    // Everything sent is handled (forwarded messages included).
    let start = Instant::now();
    let entries = loop {
        let at = (0..2).find(|&i| c.nodes[i].with(|m| m.runs(actor)));
        let mut entries = Vec::new();
        if let Some(at) = at {
            loop {
                let reply = c.nodes[at]
                    .with(|m| m.call(actor, &log::read(entries.len() as u32, 4000)))
                    .unwrap();
                if reply.is_empty() {
                    break;
                }
                entries.extend(log::entries(&reply));
            }
        }
        if entries.len() as u64 == 4 * PER_SENDER {
            break entries;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} of {} handled",
            entries.len(),
            4 * PER_SENDER
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("{redirects} redirects");
    let mut last = [0u64; 4];
    for (sender, seq) in entries {
        assert_eq!(seq, last[sender as usize] + 1, "sender {sender}'s order");
        last[sender as usize] = seq;
    }
    assert_eq!(last, [PER_SENDER; 4]);
}
