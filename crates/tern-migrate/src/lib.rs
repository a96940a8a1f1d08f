//! tern's live-migration engine: pre-copy, post-copy and hybrid.
//!
//! The engine moves a running guest between hosts through the
//! [`guest::SourceGuest`] and [`guest::DestinationGuest`] halves (the
//! `tern-guest` leaf crate: each kind of guest implements them beside
//! itself, so this crate depends on no hypervisor), encoding pages with
//! `tern-pagecodec` and carrying them on `tern-transport` sessions (data one
//! way, replies the other). It verifies everything at the destination
//! against a manifest the source signs with its host key, and moves
//! ownership once, at commit; before commit any failure leaves the source
//! running and the destination empty. It runs in the process that owns the
//! guest (the agent's guest processes).

pub mod engine;
pub mod protocol;
pub mod relay;

pub use engine::{
    commit_at_once, migrate, migrate_observed, receive, receive_observed, Cancel, Capacity, Codec,
    CommitHook, CommitStep, DestLink, Encodings, HookError, MigrateError, MigrationPhase, Mode,
    Outcome, Policy, Progress, Report, RoundStats, SourceCommitHook, SourceLink, SwitchoverTimes,
};
/// The guest halves the engine drives (a leaf crate: guests implement them beside themselves).
pub use tern_guest as guest;
pub use tern_guest::{DestinationGuest, GuestError, GuestShape, PostcopyMemory, SourceGuest};
pub use tern_proto::MigrationRole;
