//! Signed actor checkpoints and their wire form.
//!
//! `ActorCheckpoint {actor_id, sequence, state_hash, state, cursors, signer,
//! signature}`: the state (whole, or the pages written since checkpoint
//! `base`), the BLAKE3 tree hash of the whole state after it (see
//! [`crate::state`]), what the actor had handled from each sender (see
//! [`crate::delivery`]), and an Ed25519 signature by the executor that owns
//! the actor over every other field (over the BLAKE3 of their encoding, so
//! that signing a 100 MB state costs a BLAKE3 pass, not two SHA-512 ones). The wire form is a fixed binary layout so
//! that the signature covers exact bytes, and so that every length is
//! checked against the input and the state limit before anything is
//! allocated: checkpoints come from other hosts.

use crate::delivery::{Cursors, MAX_SENDERS};
use crate::state::{Digest, StateDelta, StateError, MAX_GLOBALS, PAGE};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use tern_proto::{ActorId, SenderId};
use thiserror::Error;

const MAGIC: &[u8; 4] = b"TACK";
/// Version 2: the signature covers the BLAKE3 of the record (version 1
/// signed the record itself).
const VERSION: u8 = 2;
/// BLAKE3's key-derivation context for what a signature covers.
const SIGNED_CONTEXT: &str = "tern actor checkpoint v2 signed body";
const SIGNATURE_LEN: usize = 64;

/// A signed checkpoint of one actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorCheckpoint {
    /// The actor.
    pub actor_id: ActorId,
    /// Increases with every checkpoint of the actor, across executors.
    pub sequence: u64,
    /// The tree hash of the whole state once `state` is applied.
    pub state_hash: Digest,
    /// The state, whole or as a delta.
    pub state: StateDelta,
    /// The last message handled from each sender (always whole).
    pub cursors: Cursors,
    /// The signing executor's Ed25519 public key.
    pub signer: [u8; 32],
    /// Ed25519 over the BLAKE3 of the encoded record up to this field.
    pub signature: [u8; SIGNATURE_LEN],
}

/// Why a checkpoint was refused. Each cause has its own variant so callers
/// (and metrics) tell a forgery from a replay without reading text.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The bytes are not a checkpoint.
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
    /// The state does not fit its own description or the size limit.
    #[error("checkpoint state: {0}")]
    State(#[from] StateError),
    /// The signer is not an executor this one trusts.
    #[error("checkpoint signed by an unknown executor")]
    UnknownSigner,
    /// The signature does not verify: forged or altered.
    #[error("checkpoint signature does not verify")]
    BadSignature,
    /// The state does not hash to the signed hash: corrupted.
    #[error("checkpoint state does not match its signed hash")]
    HashMismatch,
    /// Not newer than the last checkpoint seen for the actor.
    #[error("checkpoint {got} of actor is not newer than {last}: a replay")]
    Replay {
        /// The newest sequence already held.
        last: u64,
        /// The sequence offered.
        got: u64,
    },
    /// A delta whose base is not the checkpoint held.
    #[error("delta on checkpoint {base} but the store holds {held:?}")]
    MissingBase {
        /// The base the delta needs.
        base: u64,
        /// The newest sequence held, if any.
        held: Option<u64>,
    },
    /// The store holds no checkpoint of the actor.
    #[error("no checkpoint of actor {0} is held")]
    NotHeld(ActorId),
    /// The store could not read or write its files.
    #[error("checkpoint store: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a record's body is written: a buffer, or a hasher.
trait BodySink {
    fn put(&mut self, bytes: &[u8]);
}

impl BodySink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl BodySink for blake3::Hasher {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl ActorCheckpoint {
    /// Builds and signs a checkpoint.
    pub fn sign(
        actor_id: ActorId,
        sequence: u64,
        state_hash: Digest,
        state: StateDelta,
        cursors: Cursors,
        key: &SigningKey,
    ) -> Self {
        let mut c = Self {
            actor_id,
            sequence,
            state_hash,
            state,
            cursors,
            signer: key.verifying_key().to_bytes(),
            signature: [0; SIGNATURE_LEN],
        };
        c.signature = key.sign(&c.signed_digest()).to_bytes();
        c
    }

    /// Checks the signature against the record's own signer key (whether
    /// that signer is trusted is the store's question).
    pub fn verify_signature(&self) -> Result<(), CheckpointError> {
        let key =
            VerifyingKey::from_bytes(&self.signer).map_err(|_| CheckpointError::BadSignature)?;
        key.verify_strict(
            &self.signed_digest(),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| CheckpointError::BadSignature)
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.state;
        let mut out = Vec::with_capacity(
            160 + s.globals.len() * 8 + s.pages.len() * 4 + s.data.len() + self.cursors.len() * 80,
        );
        self.write_body(&mut out);
        out.extend_from_slice(&self.signature);
        out
    }

    /// The record up to the signature, into `out` (a buffer, or a hasher).
    fn write_body(&self, out: &mut impl BodySink) {
        let s = &self.state;
        out.put(MAGIC);
        out.put(&[VERSION]);
        out.put(&self.actor_id.to_bytes());
        out.put(&self.sequence.to_le_bytes());
        out.put(&self.state_hash);
        match s.base {
            None => out.put(&[0]),
            Some(b) => {
                out.put(&[1]);
                out.put(&b.to_le_bytes());
            }
        }
        out.put(&s.memory_bytes.to_le_bytes());
        out.put(&(s.globals.len() as u32).to_le_bytes());
        for g in &s.globals {
            out.put(&g.to_le_bytes());
        }
        out.put(&(s.pages.len() as u32).to_le_bytes());
        for p in &s.pages {
            out.put(&p.to_le_bytes());
        }
        out.put(&s.data);
        out.put(&(self.cursors.len() as u32).to_le_bytes());
        for (sender, seq) in self.cursors.iter() {
            out.put(&[sender.as_str().len() as u8]);
            out.put(sender.as_str().as_bytes());
            out.put(&seq.to_le_bytes());
        }
        out.put(&self.signer);
    }

    /// What the signature covers: the BLAKE3 of the body, hashed as it is
    /// written (no copy of the state), domain-separated from every other
    /// use of BLAKE3 in tern.
    fn signed_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key(SIGNED_CONTEXT);
        self.write_body(&mut h);
        *h.finalize().as_bytes()
    }

    /// Parses a record, refusing anything that does not fit `max_state_bytes`
    /// before allocating for it. The signature is not checked here.
    pub fn decode(bytes: &[u8], max_state_bytes: u64) -> Result<Self, CheckpointError> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return Err(CheckpointError::Malformed("not a tern actor checkpoint"));
        }
        if r.u8()? != VERSION {
            return Err(CheckpointError::Malformed("unknown checkpoint version"));
        }
        let actor_id = ActorId::from_bytes(r.array()?);
        let sequence = r.u64()?;
        let state_hash = r.array()?;
        let base = match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            _ => return Err(CheckpointError::Malformed("bad base flag")),
        };
        let memory_bytes = r.u64()?;
        if memory_bytes > max_state_bytes {
            return Err(StateError::TooLarge {
                bytes: memory_bytes,
                max: max_state_bytes,
            }
            .into());
        }
        let n_globals = r.u32()? as usize;
        if n_globals > MAX_GLOBALS {
            return Err(StateError::TooManyGlobals(n_globals).into());
        }
        let globals = r.counted(n_globals, 8)?.chunks(8).map(le_u64).collect();
        let n_pages = r.u32()? as usize;
        if n_pages as u64 > memory_bytes / PAGE as u64 {
            return Err(CheckpointError::Malformed(
                "more pages than the memory holds",
            ));
        }
        let pages = r
            .counted(n_pages, 4)?
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let data = r.counted(n_pages, PAGE)?.to_vec();
        let cursors = r.cursors()?;
        let signer = r.array()?;
        let signature = r.array()?;
        if !r.0.is_empty() {
            return Err(CheckpointError::Malformed("trailing bytes"));
        }
        let state = StateDelta {
            base,
            memory_bytes,
            globals,
            pages,
            data,
        };
        state.check(max_state_bytes)?;
        Ok(Self {
            actor_id,
            sequence,
            state_hash,
            state,
            cursors,
            signer,
            signature,
        })
    }
}

fn le_u64(c: &[u8]) -> u64 {
    u64::from_le_bytes(c.try_into().expect("8 bytes"))
}

/// A cursor that refuses to read past the input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        if n > self.0.len() {
            return Err(CheckpointError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    /// `count` items of `size` bytes, checked against the input first.
    fn counted(&mut self, count: usize, size: usize) -> Result<&'a [u8], CheckpointError> {
        let n = count
            .checked_mul(size)
            .ok_or(CheckpointError::Malformed("length overflows"))?;
        self.take(n)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CheckpointError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CheckpointError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The cursors: a count, then (name length, name, sequence) each, in
    /// increasing name order so that one set of cursors has one encoding.
    fn cursors(&mut self) -> Result<Cursors, CheckpointError> {
        let n = self.u32()? as usize;
        // Each entry takes at least 10 bytes: refuse a count the input cannot hold.
        if n > MAX_SENDERS || n.saturating_mul(10) > self.0.len() {
            return Err(CheckpointError::Malformed("too many senders"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u8()? as usize;
            let name = std::str::from_utf8(self.take(len)?)
                .map_err(|_| CheckpointError::Malformed("sender is not UTF-8"))?;
            let sender =
                SenderId::new(name).map_err(|_| CheckpointError::Malformed("bad sender name"))?;
            if out
                .last()
                .is_some_and(|(last, _): &(SenderId, u64)| *last >= sender)
            {
                return Err(CheckpointError::Malformed("senders out of order"));
            }
            out.push((sender, self.u64()?));
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StateHashes, WASM_PAGE};
    use proptest::prelude::*;

    const MAX: u64 = 1 << 30;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn sample(seq: u64) -> ActorCheckpoint {
        let mut m = vec![0u8; WASM_PAGE as usize];
        m[10] = 1;
        m[9000] = 2;
        let state = StateDelta::full(&m, vec![7, 8]);
        let hash = StateHashes::of(&m, &[7, 8]).root();
        ActorCheckpoint::sign(
            ActorId::new(),
            seq,
            hash,
            state,
            Cursors::default(),
            &key(1),
        )
    }

    #[test]
    fn a_checkpoint_round_trips_and_verifies() {
        let c = sample(3);
        let back = ActorCheckpoint::decode(&c.encode(), MAX).unwrap();
        assert_eq!(back, c);
        back.verify_signature().unwrap();
    }

    #[test]
    fn an_altered_field_breaks_the_signature() {
        let mut c = sample(3);
        c.sequence = 4;
        assert!(matches!(
            c.verify_signature(),
            Err(CheckpointError::BadSignature)
        ));
        let mut c = sample(3);
        c.state.data[0] ^= 1;
        assert!(matches!(
            c.verify_signature(),
            Err(CheckpointError::BadSignature)
        ));
    }

    #[test]
    fn oversized_states_are_refused_before_allocation() {
        let c = sample(1);
        let err = ActorCheckpoint::decode(&c.encode(), 1024).unwrap_err();
        assert!(matches!(
            err,
            CheckpointError::State(StateError::TooLarge { .. })
        ));
        // A page count far past the input is refused without allocating it.
        let mut bytes = c.encode();
        let at = 4 + 1 + 16 + 8 + 32 + 1 + 8 + 4 + 16;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ActorCheckpoint::decode(&bytes, u64::MAX).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ActorCheckpoint::decode(&bytes, MAX);
        }

        #[test]
        fn every_truncation_is_refused(cut in 0usize..200) {
            let bytes = sample(1).encode();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(ActorCheckpoint::decode(&bytes[..cut], MAX).is_err());
        }
    }
}
