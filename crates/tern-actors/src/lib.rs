//! Stateful WebAssembly actors, tern's third kind of workload beside
//! microVMs and processes.
//!
//! - [`runtime`]: actors run by wasmtime with a fuel budget per message, a
//!   bounded mailbox, pause and resume, and incremental checkpoints of their
//!   linear memory from kernel write tracking.
//! - [`checkpoint`]: the signed [`ActorCheckpoint`] and its wire form.
//! - [`delivery`]: each message handled once, in its sender's order.
//! - [`state`]: states and deltas of linear memory and the BLAKE3 tree hash
//!   that lets a delta be verified by hashing only what it carries.
//! - [`store`]: each executor's durable [`CheckpointStore`].
//! - [`protocol`]: what executors send each other to move actors.
//! - [`manager`]: the `ActorMigrationManager`, one per executor.
//! - [`net`]: an executor on the network, its peers over mutual TLS.
//! - [`gossip`]: membership, loads and owners by gossip (chitchat).
//! - [`policy`]: when actors move ([`policy::MigrationPolicy`]).

pub mod checkpoint;
pub mod delivery;
pub mod examples;
#[cfg(feature = "runtime")]
pub mod gossip;
#[cfg(feature = "runtime")]
pub mod manager;
#[cfg(feature = "runtime")]
pub mod net;
pub mod policy;
pub mod protocol;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod state;
pub mod store;

pub use checkpoint::{ActorCheckpoint, CheckpointError};
pub use delivery::{Cursors, Delivery, Envelope};
pub use state::{StateDelta, StateHashes, StateImage};
pub use store::{CheckpointStore, Durability, LoadedState};
