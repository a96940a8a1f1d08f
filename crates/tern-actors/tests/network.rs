//! Executors over mutual TLS on loopback: the seed's scenario for real.

mod support;

use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv};
use tern_actors::manager::{MigrationState, SendOutcome};
use tern_actors::policy::MigrationReason;
use tern_actors::runtime::ActorConfig;
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
