//! tern's live-migration engine (first part: pre-copy).
//!
//! The engine moves a running guest between hosts through the
//! [`guest::SourceGuest`] and [`guest::DestinationGuest`] halves, encoding
//! pages with `tern-pagecodec` and carrying them on `tern-transport`
//! sessions (data one way, replies the other). It verifies everything at the
//! destination against a manifest the source signs with its host key, and
//! moves ownership once, at commit; before commit any failure leaves the
//! source running and the destination empty.
//!
//! Still to come (issue: tern-migrate): post-copy and hybrid, auto-converge,
//! durable migration logs and store-backed ownership, the host agent and CLI.

pub mod engine;
pub mod guest;
pub mod process;
pub mod protocol;
pub mod relay;

pub use engine::{
    migrate, migrate_observed, receive, receive_observed, Capacity, CommitHook, DestLink,
    MigrateError, Mode, Policy, Progress, Report, RoundStats, SourceLink, SourcePhase,
    SwitchoverTimes,
};
pub use guest::{DestinationGuest, GuestError, GuestShape, SourceGuest};
