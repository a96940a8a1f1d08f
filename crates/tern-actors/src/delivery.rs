//! Exactly-once, per-sender ordered delivery.
//!
//! Every message carries its sender and a sequence number that the sender
//! counts from 1 for each actor. An actor keeps, per sender, the last number
//! it *handled* (its [`Cursors`]) and the last one it *queued*; a message is
//! queued only if it is the next one, and one already queued or handled is
//! acknowledged as a duplicate without running again. The handled cursors are
//! part of every checkpoint, so they travel with the actor when it migrates
//! and come back with its state after a restore: a sender that retries what
//! was not answered gets each message handled once against the state it
//! sees.

use std::collections::BTreeMap;
use tern_proto::SenderId;
use thiserror::Error;

/// Senders one actor remembers. A checkpoint refuses more, so an attacker
/// cannot make one grow without bound.
pub const MAX_SENDERS: usize = 65_536;

/// One message for an actor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Who sent it.
    pub sender: SenderId,
    /// The sender's number for it, from 1.
    pub seq: u64,
    /// What the actor reads.
    pub payload: Vec<u8>,
}

/// What happened to a delivered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued; it will be handled once.
    Queued,
    /// Already queued or handled: dropped, not run again.
    Duplicate,
}

/// A message that is not next in its sender's order.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("message {got} from {sender} arrived before {expected}")]
pub struct OutOfOrder {
    /// The sender.
    pub sender: SenderId,
    /// The number that would be accepted.
    pub expected: u64,
    /// The number offered.
    pub got: u64,
}

/// The last sequence number handled from each sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursors(BTreeMap<SenderId, u64>);

impl Cursors {
    /// The last number handled from `sender` (0: none).
    pub fn handled(&self, sender: &SenderId) -> u64 {
        self.0.get(sender).copied().unwrap_or(0)
    }

    /// Records that `sender`'s message `seq` was handled.
    pub fn advance(&mut self, sender: &SenderId, seq: u64) {
        self.0.insert(sender.clone(), seq);
    }

    /// Every sender and its cursor.
    pub fn iter(&self) -> impl Iterator<Item = (&SenderId, u64)> {
        self.0.iter().map(|(s, &n)| (s, n))
    }

    /// How many senders are remembered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no sender is remembered.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(SenderId, u64)> for Cursors {
    fn from_iter<I: IntoIterator<Item = (SenderId, u64)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// Admission of messages into a mailbox: the handled cursors plus the last
/// number queued per sender.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    handled: Cursors,
    queued: BTreeMap<SenderId, u64>,
}

impl Admission {
    /// Admission that starts from what a checkpoint says was handled.
    pub fn from_cursors(handled: Cursors) -> Self {
        Self {
            handled,
            queued: BTreeMap::new(),
        }
    }

    /// Whether `e` may be queued: the next of its sender, a duplicate, or
    /// out of order.
    pub fn admit(&mut self, e: &Envelope) -> Result<Delivery, OutOfOrder> {
        let last = self
            .queued
            .get(&e.sender)
            .copied()
            .unwrap_or_else(|| self.handled.handled(&e.sender));
        if e.seq <= last {
            return Ok(Delivery::Duplicate);
        }
        if e.seq != last + 1 {
            return Err(OutOfOrder {
                sender: e.sender.clone(),
                expected: last + 1,
                got: e.seq,
            });
        }
        self.queued.insert(e.sender.clone(), e.seq);
        Ok(Delivery::Queued)
    }

    /// Records that `e` was handled.
    pub fn handled(&mut self, e: &Envelope) {
        self.handled.advance(&e.sender, e.seq);
        if self.queued.get(&e.sender) == Some(&e.seq) {
            self.queued.remove(&e.sender);
        }
    }

    /// What was handled, as a checkpoint records it.
    pub fn cursors(&self) -> &Cursors {
        &self.handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(sender: &str, seq: u64) -> Envelope {
        Envelope {
            sender: SenderId::new(sender).unwrap(),
            seq,
            payload: vec![],
        }
    }

    #[test]
    fn each_message_is_admitted_once_in_order() {
        let mut a = Admission::default();
        assert_eq!(a.admit(&env("a", 1)), Ok(Delivery::Queued));
        assert_eq!(a.admit(&env("a", 1)), Ok(Delivery::Duplicate));
        assert_eq!(a.admit(&env("a", 3)).unwrap_err().expected, 2);
        assert_eq!(a.admit(&env("b", 1)), Ok(Delivery::Queued));
        a.handled(&env("a", 1));
        assert_eq!(a.admit(&env("a", 1)), Ok(Delivery::Duplicate));
        assert_eq!(a.admit(&env("a", 2)), Ok(Delivery::Queued));
        assert_eq!(a.cursors().handled(&SenderId::new("a").unwrap()), 1);
    }

    #[test]
    fn admission_resumes_from_cursors() {
        let c: Cursors = [(SenderId::new("a").unwrap(), 5)].into_iter().collect();
        let mut a = Admission::from_cursors(c);
        assert_eq!(a.admit(&env("a", 5)), Ok(Delivery::Duplicate));
        assert_eq!(a.admit(&env("a", 6)), Ok(Delivery::Queued));
    }
}
