//! Messages of a migration. Data flows source → destination on one
//! transport session; replies flow back on a second one. Every transport
//! frame starts with a kind byte.

use crate::guest::GuestShape;
use bytes::{BufMut, Bytes, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A JSON control message ([`SourceMsg`] or [`DestMsg`]).
pub const KIND_MSG: u8 = 1;
/// A page-codec frame.
pub const KIND_PAGES: u8 = 2;
/// The device state (opaque to the engine).
pub const KIND_DEVICE_STATE: u8 = 3;
/// A [`SessionHello`]: the first frame of every session between agents.
pub const KIND_HELLO: u8 = 4;

/// Opens a session between two host agents and says what it carries. A
/// migration is two sessions (data source → destination, replies back), each
/// dialled by the side that sends on it, so each agent needs one listener and
/// the hello tells it which migration a new session belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "carries", rename_all = "snake_case")]
pub enum SessionHello {
    /// Asks the destination host to take a migration: it starts a process
    /// for the guest, which dials `reply_to` (routed to the source's guest
    /// process by the migration's id) with [`SessionHello::Replies`]; the
    /// source then opens the data session routed to that process, with
    /// [`SessionHello::Data`] again as its first frame.
    Data(Offer),
    /// Replies from the destination host.
    Replies {
        /// The migration.
        migration: String,
    },
    /// The destination host will not take the migration (on the reply route).
    Refused {
        /// The migration.
        migration: String,
        /// Why, for the operator.
        reason: String,
    },
    /// The source asks whether the destination committed a migration whose
    /// `Commit` went unconfirmed; the answer comes as [`SessionHello::Settled`]
    /// on the reply route. Asking fences the destination: a `Commit` that
    /// arrives after the question is refused.
    Settle {
        /// The sender's [`PROTOCOL_VERSION`].
        #[serde(default)]
        version: u32,
        /// The migration.
        migration: String,
        /// The source host's name.
        source_host: String,
        /// Where to dial the answer.
        reply_to: String,
    },
    /// The destination's final word on a migration.
    Settled {
        /// The migration.
        migration: String,
        /// Whether it journaled the commit (it owns the VM) or never will.
        committed: bool,
    },
}

/// What a source offers when it opens a migration ([`SessionHello::Data`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The sender's [`PROTOCOL_VERSION`]; another version is refused.
    #[serde(default)]
    pub version: u32,
    /// The migration.
    pub migration: String,
    /// The source host's name (selects the key its manifest must verify against).
    pub source_host: String,
    /// Where the destination dials the reply session.
    pub reply_to: String,
    /// The VM's id (kept across hosts).
    pub vm: String,
    /// Its owner epoch on the source; the destination owns it at epoch + 1 after commit.
    pub epoch: u64,
    /// What the VM is (the agent's spec, opaque to the engine).
    pub spec: serde_json::Value,
}

/// The first frame of a session: a hello.
pub fn hello_frame(h: &SessionHello) -> Bytes {
    frame(
        KIND_HELLO,
        &serde_json::to_vec(h).expect("hellos serialize"),
    )
}

/// The version of the migration handshake this build speaks.
/// 3: the pages root is BLAKE3 over digests of 128-page groups.
/// 4: a relayed stream compressed with zstd is one zstd stream (flushed per
/// frame, long-distance matching), no longer a zstd frame per chunk.
pub const PROTOCOL_VERSION: u32 = 4;

/// Why a migration is asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// The migration's id (also the VM's name on the destination).
    pub migration: String,
    /// What the destination must host.
    pub shape: GuestShape,
    /// Why (maintenance, rebalancing, operator).
    pub reason: String,
    /// CPU features the guest may be using (the source host's flags): the
    /// destination refuses a guest that would lose any of them.
    #[serde(default)]
    pub cpu_features: Vec<String>,
}

/// This host's CPU feature flags (from `/proc/cpuinfo`), sorted.
pub fn host_cpu_features() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut flags: Vec<String> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    flags.sort();
    flags.dedup();
    flags
}

/// The features in `guest` that `host` lacks (empty: compatible).
pub fn missing_cpu_features(guest: &[String], host: &[String]) -> Vec<String> {
    guest
        .iter()
        .filter(|f| host.binary_search(f).is_err())
        .cloned()
        .collect()
}

/// What the source signs at switchover: proof of every page and the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The migration.
    pub migration: String,
    /// Transport frames the source sent before this manifest.
    pub frames: u64,
    /// Guest RAM size.
    pub memory_bytes: u64,
    /// BLAKE3 over the group digests (each BLAKE3 over the BLAKE3 hashes
    /// of 128 consecutive pages; the last group may be shorter), hex.
    pub pages_root: String,
    /// BLAKE3 of the device state, hex.
    pub device_state: String,
    /// Post-copy: pages still to come after the guest starts on the
    /// destination (0: pre-copy, and `pages_root` covers all of RAM now; else
    /// `pages_root` is empty here and the final manifest carries it).
    #[serde(default)]
    pub postcopy_pages: u64,
}

impl Manifest {
    fn signed_bytes(&self) -> Vec<u8> {
        // Field order is fixed by the struct: this is the canonical form.
        serde_json::to_vec(self).expect("a manifest always serializes")
    }
}

/// A manifest and the source host's Ed25519 signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// Signature, hex.
    pub signature: String,
}

impl SignedManifest {
    /// Signs a manifest.
    pub fn sign(manifest: Manifest, key: &SigningKey) -> Self {
        let sig = key.sign(&manifest.signed_bytes());
        Self {
            manifest,
            signature: hex::encode(sig.to_bytes()),
        }
    }

    /// Checks the signature against the source host's key.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), String> {
        let raw = hex::decode(&self.signature).map_err(|_| "signature is not hex".to_string())?;
        let raw: [u8; 64] = raw
            .try_into()
            .map_err(|_| "signature is not 64 bytes".to_string())?;
        key.verify(&self.manifest.signed_bytes(), &Signature::from_bytes(&raw))
            .map_err(|_| "manifest signature does not verify against the source host's key".into())
    }
}

/// Source → destination control messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum SourceMsg {
    /// Opens the migration.
    Request(MigrationRequest),
    /// A pre-copy round ended.
    RoundEnd {
        /// Round number (1 = all pages).
        round: u32,
        /// Pages sent in it.
        pages: u64,
    },
    /// Post-copy switchover: these pages (runs of `(first, count)`) are stale
    /// at the destination and will follow after the guest starts there.
    Postcopy {
        /// Runs of stale pages.
        stale: Vec<(u64, u64)>,
    },
    /// Switchover data is complete: verify and get ready.
    Manifest(SignedManifest),
    /// Post-copy: every page is sent; the manifest's root covers all of RAM.
    PostcopyDone(SignedManifest),
    /// Ownership moves: start the guest.
    Commit,
    /// The source gave up: discard everything.
    Abort {
        /// Why.
        reason: String,
    },
}

/// Destination → source replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum DestMsg {
    /// The request can be served.
    Accept,
    /// It cannot.
    Reject {
        /// Why.
        reason: String,
    },
    /// Everything verified; the guest is loaded and waits for commit.
    Ready,
    /// Verification or loading failed; the destination discarded the guest.
    Failed {
        /// Why.
        reason: String,
    },
    /// The guest runs on the destination.
    Running,
    /// Post-copy: the guest touched a page it lacks; send it first.
    PageRequest {
        /// The page.
        page: u64,
    },
    /// Post-copy: every page arrived and the final manifest verified.
    Done,
}

/// Sorted pages as runs of `(first, count)`.
pub fn to_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Checks runs of pages (in order, not overlapping, none empty, none past
/// `limit` pages) and returns how many pages they hold. They stay runs:
/// expanding a 1 GiB guest's list into pages cost ~1.5 ms of fresh memory
/// inside a post-copy downtime.
pub fn check_runs(runs: &[(u64, u64)], limit: u64) -> Result<u64, String> {
    let mut pages = 0u64;
    let mut next = 0u64;
    for &(first, n) in runs {
        let end = first.checked_add(n).filter(|&e| e <= limit && n > 0);
        match end {
            Some(end) if first >= next => {
                pages += n;
                next = end;
            }
            _ => {
                return Err(format!(
                    "bad stale-page run ({first}, {n}) for {limit} pages"
                ))
            }
        }
    }
    Ok(pages)
}

/// Wraps a payload with its kind byte.
pub fn frame(kind: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + payload.len());
    b.put_u8(kind);
    b.put_slice(payload);
    b.freeze()
}

/// Wraps a control message.
pub fn msg_frame<T: Serialize>(m: &T) -> Bytes {
    frame(
        KIND_MSG,
        &serde_json::to_vec(m).expect("messages always serialize"),
    )
}

/// Splits a frame into kind and payload.
pub fn split(f: &Bytes) -> Result<(u8, Bytes), String> {
    match f.first() {
        Some(&k) => Ok((k, f.slice(1..))),
        None => Err("empty frame".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            migration: "m".into(),
            frames: 3,
            memory_bytes: 4096,
            pages_root: "00".into(),
            device_state: "11".into(),
            postcopy_pages: 0,
        }
    }

    #[test]
    fn signatures_verify_and_forgeries_do_not() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let other = SigningKey::from_bytes(&[8u8; 32]);
        let s = SignedManifest::sign(manifest(), &key);
        assert!(s.verify(&key.verifying_key()).is_ok());
        assert!(s.verify(&other.verifying_key()).is_err());
        let mut forged = s.clone();
        forged.manifest.frames = 4;
        assert!(forged.verify(&key.verifying_key()).is_err());
        let mut junk = s;
        junk.signature = "zz".into();
        assert!(junk.verify(&key.verifying_key()).is_err());
    }

    #[test]
    fn cpu_features_that_would_be_lost_are_named() {
        let host = host_cpu_features();
        assert!(!host.is_empty(), "no flags in /proc/cpuinfo");
        assert!(missing_cpu_features(&host, &host).is_empty());
        let mut guest = host.clone();
        guest.push("avx1024".into());
        assert_eq!(missing_cpu_features(&guest, &host), vec!["avx1024"]);
    }

    #[test]
    fn runs_round_trip_and_bad_runs_are_refused() {
        let pages = vec![0, 1, 2, 7, 9, 10];
        let runs = to_runs(&pages);
        assert_eq!(runs, vec![(0, 3), (7, 1), (9, 2)]);
        assert_eq!(check_runs(&runs, 11).unwrap(), pages.len() as u64);
        let back: Vec<u64> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
        assert_eq!(back, pages);
        assert!(check_runs(&runs, 10).is_err());
        assert!(check_runs(&[(5, 1), (2, 1)], 10).is_err());
        assert!(check_runs(&[(2, 3), (4, 1)], 10).is_err(), "overlap");
        assert!(check_runs(&[(u64::MAX, 2)], 10).is_err());
        assert!(check_runs(&[(1, 0)], 10).is_err());
    }

    #[test]
    fn messages_are_tagged() {
        let f = msg_frame(&DestMsg::Reject {
            reason: "full".into(),
        });
        let (k, p) = split(&f).unwrap();
        assert_eq!(k, KIND_MSG);
        assert_eq!(
            serde_json::from_slice::<DestMsg>(&p).unwrap(),
            DestMsg::Reject {
                reason: "full".into()
            }
        );
        assert!(split(&Bytes::new()).is_err());
    }
}
