//! Every decoder of the migration protocol on arbitrary bytes, as a peer agent
//! could send them: the kind-byte framing, the JSON control messages of a
//! native migration (both directions, the session hello, signed manifests and
//! stale-page runs) and of a relayed one (QEMU's stream, a container
//! checkpoint's signed manifest), and the bounded
//! unpacking of relayed chunks. Refusing is fine; panicking, accepting a
//! forged manifest, or expanding a chunk past its bound is not.
#![no_main]

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use tern_migrate::protocol::{check_runs, DestMsg, SessionHello, SourceMsg};
use tern_migrate::relay::{decode, Compress, Incoming, RelayDestMsg, RelaySourceMsg, Unpacker, CHUNK};

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    let key = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
    if let Ok(Incoming::Bytes(_, p)) = decode::<RelaySourceMsg>(&frame) {
        for c in [Compress::None, Compress::Lz4, Compress::Zstd] {
            if let Ok(out) = c.unpack(&p) {
                assert!(c == Compress::None || out.len() <= CHUNK, "{c:?} expanded past CHUNK");
            }
            // A relayed stream's unpacker: the frame as its first and as a
            // later frame (the state of zstd's stream carried across).
            let mut u = Unpacker::new(c).expect("an unpacker");
            for _ in 0..2 {
                if let Ok(out) = u.unpack(&p) {
                    assert!(c == Compress::None || out.len() <= CHUNK, "{c:?} stream expanded past CHUNK");
                }
            }
        }
    }
    if let Ok(Incoming::Msg(RelaySourceMsg::Checkpoint { manifest, .. })) =
        decode::<RelaySourceMsg>(&frame)
    {
        // A container checkpoint's manifest: nobody without the key signs.
        if let Ok(signed) =
            serde_json::from_str::<tern_drivers::checkpoint::SignedCheckpoint>(&manifest)
        {
            assert!(signed.verify(&key).is_err(), "forged checkpoint verified");
        }
    }
    let _ = decode::<RelayDestMsg>(&frame);
    let body = data.get(1..).unwrap_or_default();
    if let Ok(m) = serde_json::from_slice::<SourceMsg>(body) {
        match m {
            SourceMsg::Manifest(sm) | SourceMsg::PostcopyDone(sm) => {
                // Nobody without the key signs: a forged manifest never verifies.
                assert!(sm.verify(&key).is_err(), "forged manifest verified");
            }
            SourceMsg::Postcopy { stale } => {
                if let Ok(pages) = check_runs(&stale, 1 << 20) {
                    assert!(pages <= 1 << 20);
                    assert!(stale.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
                    assert!(stale.iter().all(|&(f, n)| n > 0 && f + n <= 1 << 20));
                }
            }
            _ => {}
        }
    }
    let _ = serde_json::from_slice::<DestMsg>(body);
    let _ = serde_json::from_slice::<SessionHello>(body);
});
