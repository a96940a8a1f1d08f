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
    let start = Instant::now();
    while !(1..3).all(|i| c.nodes[i].with(|m| m.replicas() == [actor])) {
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
