//! A container checkpoint archive as it arrives from a peer: a manifest the
//! peer signed (here the fuzzer's, signed with the expected key, so the
//! checks past the signature run) and tar bytes that may not match it. The
//! reader refuses or unpacks inside its destination; it never panics and
//! never writes outside it.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use tern_drivers::checkpoint::{unpack, CheckpointManifest};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize * 8).min(data.len());
    let (manifest, archive) = data.split_at(split);
    let Ok(manifest) = serde_json::from_slice::<CheckpointManifest>(manifest) else {
        return;
    };
    let key = SigningKey::from_bytes(&[5; 32]);
    let signed = manifest.sign(&key);
    let base = std::env::temp_dir().join(format!("tern-fuzz-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let dest = base.join("out");
    let _ = unpack(archive, &signed, &key.verifying_key(), &dest);
    let _ = std::fs::remove_dir_all(&base);
});
