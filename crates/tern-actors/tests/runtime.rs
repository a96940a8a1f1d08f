//! The actor runtime with real wasmtime and real kernel write tracking:
//! messages, fuel, the mailbox, pause, and checkpoints that restore.

use ed25519_dalek::SigningKey;
use std::time::Duration;
use tern_actors::examples::{self, kv};
use tern_actors::runtime::{Actor, ActorConfig, ActorError, ActorMode, Runtime};
use tern_actors::state::{PAGE, WASM_PAGE};
use tern_actors::{CheckpointStore, Delivery, Envelope, LoadedState};
use tern_proto::{ActorId, ExecutorId, SenderId};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[4; 32])
}

fn config(max_state: u64) -> ActorConfig {
    ActorConfig {
        mode: ActorMode::Stateful {
            checkpoint_interval: Duration::from_secs(10),
            max_state_size_bytes: max_state,
        },
        fuel_per_message: 10_000_000,
        mailbox_capacity: 4,
        tenant: None,
    }
}

fn start(rt: &Runtime, wat: &str) -> Actor {
    let module = rt.compile(wat.as_bytes()).unwrap();
    Actor::start(rt, &module, ActorId::new(), config(64 << 20)).unwrap()
}

fn total(reply: &[u8]) -> i64 {
    i64::from_le_bytes(reply.try_into().unwrap())
}

#[test]
fn the_counter_counts_and_a_runaway_message_is_stopped_by_fuel() {
    let rt = Runtime::new().unwrap();
    let mut a = start(&rt, examples::COUNTER);
    assert_eq!(total(&a.call(&5i64.to_le_bytes()).unwrap()), 5);
    assert_eq!(total(&a.call(&7i64.to_le_bytes()).unwrap()), 12);
    assert!(matches!(a.call(&[]), Err(ActorError::OutOfFuel)));
    assert!(matches!(a.call(&[1, 2]), Err(ActorError::Refused(-1))));
    // The runaway did not touch the state and the actor still works.
    assert_eq!(total(&a.call(&1i64.to_le_bytes()).unwrap()), 13);
    assert_eq!(a.image().globals, vec![3]);
}

#[test]
fn modules_without_the_actor_abi_are_refused() {
    let rt = Runtime::new().unwrap();
    let err = rt
        .compile(b"(module (memory (export \"memory\") 1))")
        .err()
        .unwrap();
    assert!(matches!(err, ActorError::Module(_)), "{err}");
    assert!(matches!(
        rt.compile(b"not wasm").err().unwrap(),
        ActorError::Module(_)
    ));
}

#[test]
fn a_paused_actor_keeps_its_mailbox_filling_up_to_its_bound() {
    let rt = Runtime::new().unwrap();
    let mut a = start(&rt, examples::COUNTER);
    a.pause();
    for n in 1..=4i64 {
        assert_eq!(a.deliver(msg("s", n as u64, n)).unwrap(), Delivery::Queued);
    }
    assert!(matches!(
        a.deliver(msg("s", 5, 9)),
        Err(ActorError::MailboxFull(4))
    ));
    assert!(a.step().is_none(), "a paused actor handles nothing");
    assert_eq!(a.queued(), 4);
    a.resume();
    let mut last = 0;
    while let Some((_, reply)) = a.step() {
        last = total(&reply.unwrap());
    }
    assert_eq!(last, 10);
}

fn msg(sender: &str, seq: u64, n: i64) -> Envelope {
    Envelope {
        sender: SenderId::new(sender).unwrap(),
        seq,
        payload: n.to_le_bytes().to_vec(),
    }
}

/// Each message is handled once, in its sender's order, and what was handled
/// survives a checkpoint and restore: a retried message is not run again.
#[test]
fn messages_are_handled_once_each_across_a_restore() {
    let rt = Runtime::new().unwrap();
    let module = rt.compile(examples::COUNTER.as_bytes()).unwrap();
    let id = ActorId::new();
    let mut a = Actor::start(&rt, &module, id, ActorConfig::default()).unwrap();
    assert_eq!(a.deliver(msg("x", 1, 5)).unwrap(), Delivery::Queued);
    assert_eq!(a.deliver(msg("x", 1, 5)).unwrap(), Delivery::Duplicate);
    assert!(matches!(
        a.deliver(msg("x", 3, 5)),
        Err(ActorError::OutOfOrder(o)) if o.expected == 2
    ));
    assert_eq!(a.deliver(msg("y", 1, 7)).unwrap(), Delivery::Queued);
    while a.step().is_some() {}
    let c = a.checkpoint(&key()).unwrap();
    let handled = |s: &str| c.cursors.handled(&SenderId::new(s).unwrap());
    assert_eq!((handled("x"), handled("y")), (1, 1));
    let state = LoadedState {
        sequence: c.sequence,
        image: a.image(),
        cursors: c.cursors.clone(),
    };
    let mut b = Actor::restore(&rt, &module, id, ActorConfig::default(), &state).unwrap();
    assert_eq!(b.deliver(msg("x", 1, 5)).unwrap(), Delivery::Duplicate);
    assert_eq!(b.deliver(msg("x", 2, 100)).unwrap(), Delivery::Queued);
    let (e, reply) = b.step().unwrap();
    assert_eq!((e.seq, total(&reply.unwrap())), (2, 112));
}

#[test]
fn memory_past_the_state_limit_is_refused() {
    let rt = Runtime::new().unwrap();
    let module = rt.compile(examples::KV.as_bytes()).unwrap();
    let mut a = Actor::start(&rt, &module, ActorId::new(), config(4 << 20)).unwrap();
    assert!(matches!(
        a.call(&kv::grow(64)),
        Err(ActorError::Refused(-3))
    ));
    assert_eq!(a.call(&kv::grow(16)).unwrap(), 32u32.to_le_bytes());
}

/// Pages a checkpoint carries, as byte offsets' page numbers.
fn pages(c: &tern_actors::ActorCheckpoint) -> Vec<u32> {
    c.state.pages.clone()
}

#[test]
fn checkpoints_after_the_first_carry_only_the_written_pages() {
    let rt = Runtime::new().unwrap();
    let mut a = start(&rt, examples::KV);
    a.call(&kv::put(1, 100)).unwrap();
    let first = a.checkpoint(&key()).unwrap();
    assert_eq!(first.state.base, None);
    assert_eq!(first.sequence, 1);

    // Three pages far from the inbox (page 0) and the table.
    let at = 1 << 20 | 64;
    a.call(&kv::touch(at, 3, PAGE as u32, 0xab)).unwrap();
    let second = a.checkpoint(&key()).unwrap();
    assert_eq!(second.state.base, Some(1));
    let p = (at as usize / PAGE) as u32;
    assert_eq!(pages(&second), vec![0, p, p + 1, p + 2]);

    // Nothing but the inbox is written by a read.
    a.call(&kv::get(1)).unwrap();
    let third = a.checkpoint(&key()).unwrap();
    assert_eq!(pages(&third), vec![0]);
    assert_eq!(third.state.base, Some(2));
}

#[test]
fn grown_memory_and_globals_survive_checkpoint_store_and_restore() {
    let rt = Runtime::new().unwrap();
    let module = rt.compile(examples::KV.as_bytes()).unwrap();
    let id = ActorId::new();
    let mut a = Actor::start(&rt, &module, id, config(64 << 20)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path(), 64 << 20).unwrap();
    store.trust(
        key().verifying_key().to_bytes(),
        ExecutorId::new("a").unwrap(),
    );

    for k in 1..=50 {
        a.call(&kv::put(k, k * 10)).unwrap();
    }
    store.store(&a.checkpoint(&key()).unwrap()).unwrap();
    a.call(&kv::grow(4)).unwrap();
    let end = (36 * WASM_PAGE - 1) as u32;
    a.call(&kv::touch(end, 1, 1, 0x5a)).unwrap();
    a.call(&kv::put(7, 777)).unwrap();
    let delta = a.checkpoint(&key()).unwrap();
    assert_eq!(delta.state.memory_bytes, 36 * WASM_PAGE);
    store.store(&delta).unwrap();
    let expected = a.image();
    drop(a);
    drop(store);

    let store = CheckpointStore::open(dir.path(), 64 << 20).unwrap();
    let state: LoadedState = store.load(id).unwrap();
    assert_eq!(state.sequence, 2);
    assert_eq!(state.image, expected);
    let mut b = Actor::restore(&rt, &module, id, config(64 << 20), &state).unwrap();
    assert_eq!(b.call(&kv::get(7)).unwrap(), 777u64.to_le_bytes());
    assert_eq!(b.call(&kv::get(50)).unwrap(), 500u64.to_le_bytes());
    assert_eq!(b.call(&kv::peek(end)).unwrap(), vec![0x5a]);
    assert_eq!(b.image().globals, vec![50]);
    // The restored actor goes on with deltas the store takes.
    store.trust(
        key().verifying_key().to_bytes(),
        ExecutorId::new("a").unwrap(),
    );
    b.call(&kv::put(8, 1)).unwrap();
    let next = b.checkpoint(&key()).unwrap();
    assert_eq!((next.sequence, next.state.base), (3, Some(2)));
    store.store(&next).unwrap();
}
