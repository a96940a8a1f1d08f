//! Stateful WebAssembly actors, tern's third kind of workload beside
//! microVMs and processes.
//!
//! - [`runtime`]: actors run by wasmtime with a fuel budget per message, a
//!   bounded mailbox, pause and resume, and incremental checkpoints of their
//!   linear memory from kernel write tracking.
//! - [`checkpoint`]: the signed [`ActorCheckpoint`] and its wire form.
//! - [`state`]: states and deltas of linear memory and the BLAKE3 tree hash
//!   that lets a delta be verified by hashing only what it carries.
//! - [`store`]: each executor's durable [`CheckpointStore`].

pub mod checkpoint;
pub mod examples;
#[cfg(feature = "runtime")]
pub mod runtime;
pub mod state;
pub mod store;

pub use checkpoint::{ActorCheckpoint, CheckpointError};
pub use state::{StateDelta, StateHashes, StateImage};
pub use store::CheckpointStore;
