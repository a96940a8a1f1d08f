//! The messages executors exchange, point to point, to move actors and
//! their messages.
//!
//! Names follow the seed design (`MigrationRequest`, `MigrationAccept`,
//! `MigrationReject`, `MigrationComplete`, `CheckpointAnnounce`,
//! `CheckpointQuery`, `CheckpointResponse`); `MigrationCompleted` (the
//! target's acknowledgement), `MigrationAbort` and the delivery messages are
//! tern's additions. A migration:
//!
//! 1. source → target `MigrationRequest`: the module, and a full checkpoint
//!    taken while the actor keeps running;
//! 2. target → source `MigrationAccept` (checkpoint verified and stored,
//!    policy agrees) or `MigrationReject {reason}`;
//! 3. while the last round took long (so the actor wrote much meanwhile),
//!    the source sends another incremental checkpoint (`MigrationRound`)
//!    without stopping the actor, and the target accepts again: pre-copy;
//! 4. source pauses the actor and sends `MigrationComplete`: the final
//!    incremental checkpoint and the messages queued for it;
//! 5. target verifies, stores, applies, resumes and answers
//!    `MigrationCompleted`; the source then drops its copy and forwards what
//!    arrived meanwhile. Without an answer the source asks with
//!    `CheckpointQuery`; a target that has not completed gives the migration
//!    up for good before answering, so the actor runs on exactly one side.
//!
//! Checkpoints travel in their own signed binary form; the rest is encoded
//! with postcard under [`MAX_FRAME`], checked before decoding.

use crate::delivery::Envelope;
use crate::policy::{ExecutorLoad, MigrationReason, RejectReason};
use serde::{Deserialize, Serialize};
use tern_proto::{ActorId, ExecutorId, MigrationId, OwnerEpoch, SenderId, TenantId};
use thiserror::Error;

/// The largest protocol message: a 256 MiB state plus its module.
pub const MAX_FRAME: usize = 320 << 20;

/// An actor's settings as they travel with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorSettings {
    /// Whether it keeps state (and its checkpoint interval, ms).
    pub checkpoint_interval_ms: Option<u64>,
    /// Its memory limit.
    pub max_state_size_bytes: u64,
    /// Fuel per message.
    pub fuel_per_message: u64,
    /// Mailbox bound.
    pub mailbox_capacity: u32,
    /// Its tenant.
    pub tenant: Option<TenantId>,
}

/// A message queued for an actor, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEnvelope {
    /// Sender.
    pub sender: SenderId,
    /// Its number.
    pub seq: u64,
    /// Contents.
    #[serde(with = "serde_bytes_vec")]
    pub payload: Vec<u8>,
}

impl From<Envelope> for WireEnvelope {
    fn from(e: Envelope) -> Self {
        Self {
            sender: e.sender,
            seq: e.seq,
            payload: e.payload,
        }
    }
}

impl From<WireEnvelope> for Envelope {
    fn from(e: WireEnvelope) -> Self {
        Self {
            sender: e.sender,
            seq: e.seq,
            payload: e.payload,
        }
    }
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ActorMessage {
    /// Asks the target to take an actor.
    MigrationRequest {
        /// The migration.
        migration: MigrationId,
        /// The actor.
        actor: ActorId,
        /// Its ownership epoch on the source.
        epoch: OwnerEpoch,
        /// Why it moves.
        reason: MigrationReason,
        /// Its settings.
        settings: ActorSettings,
        /// Its wasm module.
        #[serde(with = "serde_bytes_vec")]
        module: Vec<u8>,
        /// A full signed checkpoint.
        #[serde(with = "serde_bytes_vec")]
        checkpoint: Vec<u8>,
    },
    /// The target took the checkpoint and will take the actor.
    MigrationAccept {
        /// The migration.
        migration: MigrationId,
    },
    /// The target will not take the actor.
    MigrationReject {
        /// The migration.
        migration: MigrationId,
        /// Why.
        reason: RejectReason,
    },
    /// The actor is paused on the source: its last changes and mailbox.
    MigrationComplete {
        /// The migration.
        migration: MigrationId,
        /// The final incremental checkpoint.
        #[serde(with = "serde_bytes_vec")]
        checkpoint: Vec<u8>,
        /// Messages queued and not yet handled, in order.
        mailbox: Vec<WireEnvelope>,
    },
    /// The actor runs on the target now.
    MigrationCompleted {
        /// The migration.
        migration: MigrationId,
    },
    /// The source gave the migration up (timed out before completing).
    MigrationAbort {
        /// The migration.
        migration: MigrationId,
    },
    /// An executor holds `actor` from checkpoint `sequence` on: sent by an
    /// executor that restored a dead peer's actor, so that the others send
    /// its messages there (gossip tells too, later).
    CheckpointAnnounce {
        /// The actor.
        actor: ActorId,
        /// Its sequence.
        sequence: u64,
    },
    /// Does the receiver run `actor`, and at which checkpoint? Asked about a
    /// migration, it also gives that migration up if it has not completed.
    CheckpointQuery {
        /// The actor.
        actor: ActorId,
        /// The migration in doubt, if any.
        migration: Option<MigrationId>,
    },
    /// The answer to a query.
    CheckpointResponse {
        /// The actor.
        actor: ActorId,
        /// The migration asked about.
        migration: Option<MigrationId>,
        /// Whether the receiver runs the actor.
        running: bool,
        /// Its latest checkpoint held, if any.
        sequence: Option<u64>,
    },
    /// A message for an actor (from a sender, or forwarded by its old executor).
    Deliver {
        /// The actor.
        actor: ActorId,
        /// The message.
        envelope: WireEnvelope,
    },
    /// The actor lives elsewhere now; send there.
    Moved {
        /// The actor.
        actor: ActorId,
        /// Its executor.
        to: ExecutorId,
    },
    /// What an executor says about itself (where gossip does not carry it).
    Load(ExecutorLoad),
    /// A pre-copy round: the pages written since the last checkpoint sent,
    /// while the actor keeps running; the target applies it to the paused
    /// copy and answers `MigrationAccept` again. (Last, so that the other
    /// messages keep their wire tags.)
    MigrationRound {
        /// The migration.
        migration: MigrationId,
        /// An incremental checkpoint.
        #[serde(with = "serde_bytes_vec")]
        checkpoint: Vec<u8>,
    },
    /// Owner → every live peer after each periodic checkpoint: what a peer
    /// needs to run the actor if the owner dies. `records` is the new
    /// checkpoint alone when the peer acknowledged its base, else the whole
    /// chain from a full checkpoint (with the module). Acknowledged with a
    /// `CheckpointResponse` without a migration.
    CheckpointReplica {
        /// The actor.
        actor: ActorId,
        /// Its ownership epoch on the sender.
        epoch: OwnerEpoch,
        /// Its settings.
        settings: ActorSettings,
        /// Its wasm module, or empty when the peer has it.
        #[serde(with = "serde_bytes_vec")]
        module: Vec<u8>,
        /// Signed checkpoints, in order.
        records: Vec<WireRecord>,
    },
    /// Owner → peers, every heartbeat interval: acknowledged by a majority,
    /// it extends the owner's lease to run its actors.
    Heartbeat {
        /// Matches the acknowledgement.
        nonce: u64,
    },
    /// The answer to a heartbeat, with the actors the answering executor
    /// let others take from the heartbeat's sender (which must drop them).
    HeartbeatAck {
        /// The heartbeat's.
        nonce: u64,
        /// Actors restored elsewhere.
        taken: Vec<Taken>,
    },
    /// A survivor asks to run `actor` of the silent `owner` at `epoch`.
    Claim {
        /// The actor.
        actor: ActorId,
        /// The epoch it would run at.
        epoch: OwnerEpoch,
        /// The executor that owned it.
        owner: ExecutorId,
    },
    /// The answer to a claim.
    ClaimReply {
        /// The actor.
        actor: ActorId,
        /// The claim's epoch.
        epoch: OwnerEpoch,
        /// Whether the claim has this executor's vote.
        granted: bool,
    },
    /// Owner → peers: the actor was stopped; drop its replica (a stopped
    /// actor must not come back when its executor dies).
    Retired {
        /// The actor.
        actor: ActorId,
        /// Its epoch when stopped.
        epoch: OwnerEpoch,
    },
}

/// One encoded checkpoint in a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

/// An actor a claim took from an executor thought dead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The actor.
    pub actor: ActorId,
    /// Who claimed it.
    pub by: ExecutorId,
    /// At which epoch: a copy at an older one must stop.
    pub epoch: OwnerEpoch,
}

impl ActorMessage {
    /// The migration a message belongs to.
    pub fn migration(&self) -> Option<&MigrationId> {
        match self {
            Self::MigrationRequest { migration, .. }
            | Self::MigrationAccept { migration }
            | Self::MigrationReject { migration, .. }
            | Self::MigrationComplete { migration, .. }
            | Self::MigrationRound { migration, .. }
            | Self::MigrationCompleted { migration }
            | Self::MigrationAbort { migration } => Some(migration),
            Self::CheckpointQuery { migration, .. }
            | Self::CheckpointResponse { migration, .. } => migration.as_ref(),
            _ => None,
        }
    }

    /// The bytes on the wire, in a buffer sized up front (a checkpoint of
    /// 100 MB would otherwise be copied through every doubling).
    pub fn encode(&self) -> Vec<u8> {
        let buf = Vec::with_capacity(self.size_hint());
        postcard::to_extend(self, buf).expect("actor messages serialize")
    }

    /// Roughly the encoded size: the large fields and room for the rest.
    fn size_hint(&self) -> usize {
        let big = match self {
            Self::MigrationRequest {
                module, checkpoint, ..
            } => module.len() + checkpoint.len(),
            Self::MigrationComplete {
                checkpoint,
                mailbox,
                ..
            } => checkpoint.len() + mailbox.iter().map(|e| e.payload.len() + 48).sum::<usize>(),
            Self::MigrationRound { checkpoint, .. } => checkpoint.len(),
            Self::CheckpointReplica {
                module, records, ..
            } => module.len() + records.iter().map(|r| r.0.len() + 8).sum::<usize>(),
            Self::Deliver { envelope, .. } => envelope.payload.len(),
            _ => 0,
        };
        big + 256
    }

    /// Parses a message, refusing one over [`MAX_FRAME`] before reading it.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        if bytes.len() > MAX_FRAME {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        let (msg, rest) = postcard::take_from_bytes(bytes)
            .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(ProtocolError::Malformed("trailing bytes".into()));
        }
        if let Self::Load(l) = &msg {
            if !(0.0..=1.0).contains(&l.load) {
                return Err(ProtocolError::Malformed(format!(
                    "load {} is not in 0..=1",
                    l.load
                )));
            }
        }
        Ok(msg)
    }
}

/// A message that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Over [`MAX_FRAME`].
    #[error("actor protocol message of {0} bytes is too large")]
    TooLarge(usize),
    /// Not a message.
    #[error("malformed actor protocol message: {0}")]
    Malformed(String),
}

/// Byte vectors as one length and the bytes (serde's default for `Vec<u8>`
/// is a sequence of numbers).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{MigrationReason, RejectReason};

    #[test]
    fn messages_round_trip_and_bad_bytes_are_refused() {
        let m = ActorMessage::MigrationComplete {
            migration: MigrationId::new("m-1").unwrap(),
            checkpoint: vec![1, 2, 3],
            mailbox: vec![WireEnvelope {
                sender: SenderId::new("s").unwrap(),
                seq: 4,
                payload: vec![9; 100],
            }],
        };
        let bytes = m.encode();
        assert!(bytes.len() < 150, "bytes travel as bytes: {}", bytes.len());
        assert_eq!(ActorMessage::decode(&bytes).unwrap(), m);
        assert!(ActorMessage::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(ActorMessage::decode(&long).is_err());
        assert!(ActorMessage::decode(&[200, 1]).is_err());
    }

    /// Found by the fuzzer: a peer's NaN load would make policies compare
    /// nothing; loads outside 0..=1 are refused.
    #[test]
    fn a_load_that_is_not_a_share_is_refused() {
        for load in [f64::NAN, -0.5, 1.5, f64::INFINITY] {
            let m = ActorMessage::Load(ExecutorLoad {
                executor: ExecutorId::new("e").unwrap(),
                load,
                queue_depth: 0,
                actors: 0,
                capacity: 1,
            });
            assert!(matches!(
                ActorMessage::decode(&m.encode()),
                Err(ProtocolError::Malformed(_))
            ));
        }
    }

    /// The fuzz target's seeds are messages of today's format (with
    /// `TERN_WRITE_SEEDS=1` the test writes them anew).
    #[test]
    fn the_fuzz_seeds_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/actor_protocol");
        let m = MigrationId::new("am-1").unwrap();
        let actor = ActorId::from_bytes([7; 16]);
        let seeds = [
            ActorMessage::MigrationRequest {
                migration: m.clone(),
                actor,
                epoch: OwnerEpoch(3),
                reason: MigrationReason::LoadBalancing,
                settings: ActorSettings {
                    checkpoint_interval_ms: Some(1000),
                    max_state_size_bytes: 1 << 20,
                    fuel_per_message: 1000,
                    mailbox_capacity: 16,
                    tenant: Some(TenantId::new("acme").unwrap()),
                },
                module: b"\0asm\x01\0\0\0".to_vec(),
                checkpoint: b"TACK\x01".to_vec(),
            },
            ActorMessage::MigrationReject {
                migration: m.clone(),
                reason: RejectReason::QueueDepth { depth: 5, max: 4 },
            },
            ActorMessage::CheckpointQuery {
                actor,
                migration: Some(m.clone()),
            },
            ActorMessage::Deliver {
                actor,
                envelope: WireEnvelope {
                    sender: SenderId::new("s").unwrap(),
                    seq: 1,
                    payload: vec![1, 2, 3],
                },
            },
            ActorMessage::CheckpointReplica {
                actor,
                epoch: OwnerEpoch(2),
                settings: ActorSettings {
                    checkpoint_interval_ms: Some(100),
                    max_state_size_bytes: 1 << 20,
                    fuel_per_message: 1000,
                    mailbox_capacity: 16,
                    tenant: None,
                },
                module: b"\0asm\x01\0\0\0".to_vec(),
                records: vec![WireRecord(b"TACK\x01".to_vec())],
            },
            ActorMessage::HeartbeatAck {
                nonce: 9,
                taken: vec![Taken {
                    actor,
                    by: ExecutorId::new("exec-b").unwrap(),
                    epoch: OwnerEpoch(4),
                }],
            },
            ActorMessage::Claim {
                actor,
                epoch: OwnerEpoch(4),
                owner: ExecutorId::new("exec-a").unwrap(),
            },
        ];
        for (i, msg) in seeds.iter().enumerate() {
            let path = dir.join(format!("seed-{i}"));
            if std::env::var_os("TERN_WRITE_SEEDS").is_some() {
                std::fs::write(&path, msg.encode()).unwrap();
            }
            let stored = std::fs::read(&path).unwrap();
            assert_eq!(
                &ActorMessage::decode(&stored).unwrap(),
                msg,
                "{}",
                path.display()
            );
        }
    }
}
