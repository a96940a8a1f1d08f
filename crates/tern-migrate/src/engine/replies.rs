//! Reading the peer's messages: the source reads replies, the destination
//! reads data frames. Both acknowledge what they read.

use super::MigrateError;
use crate::protocol::{split, DestMsg, SourceMsg, KIND_MSG};
use bytes::Bytes;
use std::time::Duration;
use tern_transport::Receiver;

/// The next reply, within `timeout`; `waiting_for` names it in the error.
pub(super) async fn reply(
    rx: &mut Receiver,
    timeout: Duration,
    waiting_for: &'static str,
) -> Result<DestMsg, MigrateError> {
    poll_reply(rx, timeout).await?.ok_or(MigrateError::Timeout {
        waiting_for,
        after: timeout,
    })
}

/// A reply if one is waiting (or arrives within `wait`).
pub(super) async fn poll_reply(
    rx: &mut Receiver,
    wait: Duration,
) -> Result<Option<DestMsg>, MigrateError> {
    // `Receiver::recv` is cancel-safe: a timed-out wait loses nothing.
    match tokio::time::timeout(wait, rx.recv()).await {
        Err(_) => Ok(None),
        Ok(None) => Err(MigrateError::Closed("reply")),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(Some(Ok((seq, f)))) => {
            rx.ack(seq);
            parse_reply(&f).map(Some)
        }
    }
}

fn parse_reply(f: &Bytes) -> Result<DestMsg, MigrateError> {
    match split(f).map_err(MigrateError::Protocol)? {
        (KIND_MSG, p) => serde_json::from_slice(&p)
            .map_err(|e| MigrateError::Protocol(format!("bad reply: {e}"))),
        (k, _) => Err(MigrateError::Protocol(format!(
            "unexpected reply frame kind {k}"
        ))),
    }
}

/// The next data frame: its kind and payload.
pub(super) async fn next(data: &mut Receiver) -> Result<(u8, Bytes), MigrateError> {
    let (seq, f) = data.recv().await.ok_or(MigrateError::Closed("data"))??;
    data.ack(seq);
    split(&f).map_err(MigrateError::Protocol)
}

/// A source message's payload.
pub(super) fn parse_msg(p: &[u8]) -> Result<SourceMsg, MigrateError> {
    serde_json::from_slice(p).map_err(|e| MigrateError::Protocol(format!("bad message: {e}")))
}

/// The next data frame, which must be a source message; `what` names it.
pub(super) async fn next_msg(data: &mut Receiver, what: &str) -> Result<SourceMsg, MigrateError> {
    match next(data).await? {
        (KIND_MSG, p) => parse_msg(&p),
        (k, _) => Err(MigrateError::Protocol(format!(
            "expected {what}, got frame kind {k}"
        ))),
    }
}
