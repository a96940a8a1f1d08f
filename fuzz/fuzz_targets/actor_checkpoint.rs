//! An actor checkpoint as it arrives from another executor. Raw bytes must
//! decode or be refused without panicking, and whatever decodes encodes back
//! to the same bytes. When the first byte is odd, the decoded checkpoint is
//! also given the hash its state really has and re-signed by a trusted key, so
//! the store's checks past the signature run: it is stored or refused, and
//! a stored one loads back to a state with exactly that hash.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tern_actors::{ActorCheckpoint, CheckpointStore, StateHashes};
use tern_proto::ExecutorId;

const MAX: u64 = 1 << 24;

fn store() -> &'static (CheckpointStore, SigningKey) {
    static STORE: OnceLock<(CheckpointStore, SigningKey)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tern-fuzz-actors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = CheckpointStore::open(&dir, MAX).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        store.trust(
            key.verifying_key().to_bytes(),
            ExecutorId::new("fuzz").unwrap(),
        );
        (store, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let Ok(c) = ActorCheckpoint::decode(bytes, MAX) else {
        return;
    };
    assert_eq!(c.encode(), bytes, "decode then encode changed the record");
    let (store, key) = store();
    if mode & 1 == 0 {
        // As received: almost always refused (unknown signer, bad signature).
        let _ = store.store(&c);
        return;
    }
    // The hash the state really leads to, from what the store holds.
    let base = match (c.state.base, store.load(c.actor_id)) {
        (Some(_), Ok(held)) => StateHashes::of(&held.image.memory, &held.image.globals),
        _ => StateHashes::default(),
    };
    let Ok(hashes) = base.after(&c.state, MAX) else {
        assert!(
            store.store(&c).is_err(),
            "a state that cannot apply was stored"
        );
        return;
    };
    let signed = ActorCheckpoint::sign(
        c.actor_id,
        c.sequence,
        hashes.root(),
        c.state,
        c.cursors,
        key,
    );
    if store.store(&signed).is_ok() {
        let back = store.load(signed.actor_id).unwrap();
        assert_eq!(back.sequence, signed.sequence);
        assert_eq!(back.cursors, signed.cursors);
        let got = StateHashes::of(&back.image.memory, &back.image.globals).root();
        assert_eq!(
            got, signed.state_hash,
            "a stored state loads back different"
        );
    }
});
