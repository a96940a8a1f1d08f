//! What can go wrong around a migration in a guest process, typed with its
//! source: callers decide on the variant, and a message is made only where
//! it leaves the process (the control socket, the journal, the API).

use crate::journal::JournalError;
use std::time::Duration;
use tern_transport::tls::TlsSetupError;
use tern_transport::TransportError;

/// A guest process could not set up or answer a migration session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The host named is not one of this host's configured peers.
    #[error("`{0}` is not a configured peer")]
    UnknownPeer(String),
    /// A session arrived from a host other than the one expected.
    #[error("a session for this migration came from a host other than `{expected}`")]
    WrongPeer {
        /// The host that should have opened it.
        expected: String,
    },
    /// The peer's reply address does not parse.
    #[error("bad reply address `{0}`")]
    BadReplyAddress(String),
    /// This host's TLS identity would not give a client or server config.
    #[error("TLS set-up: {0}")]
    Tls(#[from] TlsSetupError),
    /// The guest's journal could not be written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The session failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The session's opening hello was missing or wrong.
    #[error(transparent)]
    Hello(#[from] HelloError),
    /// The peer did not answer in time.
    #[error("no {waiting_for} within {after:?}")]
    Timeout {
        /// What was awaited.
        waiting_for: &'static str,
        /// How long.
        after: Duration,
    },
    /// The listener this process takes routed sessions from is gone.
    #[error("the session listener closed")]
    ListenerClosed,
}

/// The hello that opens every migration session was not there or not right.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// Nothing came in time.
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    /// The session closed first.
    #[error("the session closed before its hello")]
    Closed,
    /// The session failed first.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The first frame was not a hello.
    #[error("expected a hello, got frame kind {0}")]
    WrongKind(u8),
    /// The frame or its JSON was malformed.
    #[error("bad hello: {0}")]
    Malformed(String),
    /// A hello of another kind or migration than expected.
    #[error("unexpected hello: {0}")]
    Unexpected(String),
}
