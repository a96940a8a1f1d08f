//! The migration engine: one state machine per side.
//!
//! Source: `Idle → Requesting → Precopy(round) → Switchover → Committed`
//! (post-copy and hybrid pass through `Postcopy` after the commit), or
//! `RolledBack` from any phase before commit (the guest is resumed where it
//! was; it never stops being the one running copy). The destination passes
//! through the same phases as it learns of them ([`MigrationPhase`]).
//!
//! Round 1 sends every page; each later round sends the pages written
//! meanwhile; [`convergence`] decides when to stop. At switchover the source
//! pauses, sends the last dirty pages, the device state and a signed
//! manifest holding the BLAKE3 root over every page's hash (kept up to date
//! as pages are sent, so switchover hashes only the last pages). The
//! destination hashes the RAM it holds, verifies all of it, loads the state
//! and answers `Ready`; only then does the source send `Commit`, and only
//! after `Running` does it discard its copy.
//!
//! Modules: [`source`] and [`dest`] run the two sides, [`postcopy`] the
//! pages that follow a post-copy commit, [`pages`] the page stream and its
//! hashes, [`replies`] reading the peer's messages, [`report`] what a
//! migration publishes and reports, [`policy`] how the source runs it.

mod codec;
mod convergence;
mod dest;
mod digests;
mod eta;
mod pages;
mod policy;
mod postcopy;
mod replies;
mod report;
mod source;

pub use dest::{receive, receive_observed, Capacity};
pub use policy::{Cancel, Codec, Mode, Policy};
pub use report::{Encodings, Progress, Report, RoundStats, SwitchoverTimes};
pub use source::{migrate, migrate_observed};
pub use tern_proto::MigrationPhase;

use std::time::Duration;
use tern_transport::{Receiver, Sender, TransportError};

const PAGE: usize = tern_guest::PAGE_SIZE as usize;

/// A boxed error from a caller's hook (the agent's journal).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination refused the request (its reason).
    #[error("the destination rejected the migration: {0}")]
    Rejected(String),
    /// The destination could not verify or load what it received (its reason).
    #[error("the destination failed: {0}")]
    DestinationFailed(String),
    /// The source aborted (its reason).
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// This host could not set the migration up (its peer, TLS identity,
    /// sessions or journal).
    #[error("setting up on this host: {0}")]
    Setup(#[source] HookError),
    /// The durable commit record could not be written: the commit does not happen.
    #[error("commit record: {0}")]
    CommitRecord(#[source] HookError),
    /// A guest operation failed.
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// The link failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The peer said nothing in time.
    #[error("no {waiting_for} within {after:?}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// How long.
        after: Duration,
    },
    /// The peer closed a channel.
    #[error("the {0} channel closed")]
    Closed(&'static str),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Data did not verify.
    #[error("verification failed: {0}")]
    Verification(String),
    /// `Commit` was sent but the destination never confirmed it runs the
    /// guest: whether ownership moved is in doubt.
    #[error("commit sent, but the destination did not confirm it runs the guest: {0}")]
    CommitUnconfirmed(#[source] Box<MigrateError>),
    /// Cancelled before switchover (an operator, or a more urgent
    /// migration that needed what this one held).
    #[error("cancelled before switchover")]
    Cancelled,
    /// Pre-copy did not reach switchover before the policy's deadline.
    #[error("did not converge within the deadline of {0:?}")]
    NotConverged(Duration),
    /// Post-copy failed after commit: the guest runs on the destination but
    /// did not receive all its pages.
    #[error("post-copy failed after commit: {0}")]
    PostcopyFailed(#[source] Box<MigrateError>),
}

/// How a migration ended, for the source: its report, and whether
/// ownership of the guest moved. Callers act on the variant; they never
/// decode the error.
#[derive(Debug)]
pub enum Outcome {
    /// The destination runs the guest; the source's copy is discarded.
    /// `fault` is set when something failed after the commit (post-copy
    /// lost pages, or the guest's own check failed): ownership moved anyway.
    Moved {
        /// What the migration did.
        report: Report,
        /// A failure after the commit, if any.
        fault: Option<MigrateError>,
    },
    /// Ended before commit: the source runs the guest again, unchanged.
    Stayed {
        /// What the migration did.
        report: Report,
        /// Why it failed.
        error: MigrateError,
    },
    /// `Commit` went out and was not confirmed: the source guest is left
    /// paused and whole. The caller settles with the destination (did it
    /// journal the commit?) and then resumes or discards it.
    InDoubt {
        /// What the migration did.
        report: Report,
        /// Why the confirmation is missing.
        error: MigrateError,
    },
}

impl Outcome {
    /// The report, whatever the ending.
    pub fn report(&self) -> &Report {
        match self {
            Outcome::Moved { report, .. }
            | Outcome::Stayed { report, .. }
            | Outcome::InDoubt { report, .. } => report,
        }
    }

    /// Consumes the outcome into its report.
    pub fn into_report(self) -> Report {
        match self {
            Outcome::Moved { report, .. }
            | Outcome::Stayed { report, .. }
            | Outcome::InDoubt { report, .. } => report,
        }
    }

    /// The failure, if any (after the commit for `Moved`).
    pub fn error(&self) -> Option<&MigrateError> {
        match self {
            Outcome::Moved { fault, .. } => fault.as_ref(),
            Outcome::Stayed { error, .. } | Outcome::InDoubt { error, .. } => Some(error),
        }
    }

    /// The report of a clean commit, or the failure (for callers and tests
    /// that only accept a clean move).
    pub fn committed(self) -> Result<Report, MigrateError> {
        match self {
            Outcome::Moved {
                report,
                fault: None,
            } => Ok(report),
            Outcome::Moved { fault: Some(e), .. }
            | Outcome::Stayed { error: e, .. }
            | Outcome::InDoubt { error: e, .. } => Err(e),
        }
    }
}

/// Runs just before the destination commits (after `Commit` arrived, before
/// the guest starts): the agent writes its durable commit record here; an
/// error stops the commit.
pub type CommitHook<'a> = &'a mut (dyn FnMut() -> Result<(), HookError> + Send);

/// Where the source stands when it calls its [`SourceCommitHook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// Switchover begins: the guest is about to pause, and from here on
    /// `Commit` may leave. The agent makes its commit record durable now,
    /// while the guest still runs, so the disk's flush (0.5 ms, and a
    /// 177 ms stall seen under other writers) is not part of the downtime.
    /// A restart that finds this record asks the destination before it
    /// resumes; a migration that ends before `Commit` left records its
    /// rollback after it.
    Switchover,
    /// `Ready` arrived: `Commit` is sent next (fault injection holds here).
    Commit,
}

/// The source's commit hook, called at each [`CommitStep`]; an error stops
/// the migration before `Commit` is sent, so it rolls back.
pub type SourceCommitHook<'a> = &'a mut (dyn FnMut(CommitStep) -> Result<(), HookError> + Send);

/// Calls `hook` at both steps in a row: for a relay whose guest is stopped
/// by its own hypervisor (QEMU, CRIU) and commits as soon as it is.
pub fn commit_at_once(hook: SourceCommitHook<'_>) -> Result<(), HookError> {
    hook(CommitStep::Switchover)?;
    hook(CommitStep::Commit)
}

/// The source's ends of the two sessions.
pub struct SourceLink {
    /// Data to the destination.
    pub data: Sender,
    /// Replies from it.
    pub replies: Receiver,
}

/// The destination's ends.
pub struct DestLink {
    /// Data from the source.
    pub data: Receiver,
    /// Replies to it.
    pub replies: Sender,
}

fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
