//! Actor protocol messages as they arrive from another executor: they decode
//! or are refused without panicking, what decodes encodes back to a message
//! that decodes the same, and the checkpoints they carry go through the
//! checkpoint decoder with its own limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_actors::protocol::ActorMessage;
use tern_actors::ActorCheckpoint;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = ActorMessage::decode(data) else {
        return;
    };
    let again = ActorMessage::decode(&msg.encode()).expect("an encoded message decodes");
    assert_eq!(again, msg);
    match &msg {
        ActorMessage::MigrationRequest { checkpoint, .. }
        | ActorMessage::MigrationComplete { checkpoint, .. }
        | ActorMessage::MigrationRound { checkpoint, .. } => {
            let _ = ActorCheckpoint::decode(checkpoint, 1 << 24);
        }
        _ => {}
    }
});
