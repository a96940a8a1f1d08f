//! When an actor should move, and whether an executor should take one.
//!
//! Policies are behind [`MigrationPolicy`] so an operator can choose one per
//! executor: [`DefaultMigrationPolicy`] balances load (an overloaded
//! executor sheds actors to the least loaded one), [`LocalityFirstPolicy`]
//! moves an actor to the executor most of its messages come from. Both decide
//! from what gossip says about the executors ([`ExecutorLoad`]) and what the
//! local executor saw of the actor ([`ActorStats`]); the manager adds the
//! per-actor cooldown ([`Cooldown`]) so no policy can make an actor bounce.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tern_proto::{ActorId, ExecutorId};

/// Why an actor moves (the seed's reasons; a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationReason {
    /// Its executor is overloaded.
    LoadBalancing,
    /// Its messages come from elsewhere.
    Locality,
    /// Its executor failed (restores from checkpoints).
    FaultTolerance,
    /// An operator asked.
    Operator,
}

impl MigrationReason {
    /// The label in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancing => "LoadBalancing",
            Self::Locality => "Locality",
            Self::FaultTolerance => "FaultTolerance",
            Self::Operator => "Operator",
        }
    }
}

/// Why a target refused an actor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    /// It holds as many actors as it may.
    #[error("at capacity ({actors} of {capacity} actors)")]
    Capacity {
        /// Actors it holds.
        actors: usize,
        /// Actors it may hold.
        capacity: usize,
    },
    /// Its mailboxes hold too many messages.
    #[error("queue depth {depth} is over {max}")]
    QueueDepth {
        /// Messages waiting on the executor.
        depth: usize,
        /// The policy's limit.
        max: usize,
    },
    /// It is itself too loaded to take work for load balancing.
    #[error("load {0} % is too high")]
    Overloaded(u32),
    /// It already holds or is receiving the actor.
    #[error("the actor is already here or on its way")]
    AlreadyHere,
    /// Its migration rate limit is reached.
    #[error("too many migrations at once")]
    RateLimited,
    /// The checkpoint did not verify (the error's text).
    #[error("checkpoint refused: {0}")]
    BadCheckpoint(String),
    /// The module does not compile or the state does not fit it.
    #[error("cannot run the actor: {0}")]
    BadModule(String),
    /// The migration was given up (timed out, or queried before completing).
    #[error("the migration was abandoned")]
    Abandoned,
}

/// What an executor tells the others about itself (by gossip).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutorLoad {
    /// Which executor.
    pub executor: ExecutorId,
    /// CPU load, 0 to 1.
    pub load: f64,
    /// Messages waiting in all its mailboxes.
    pub queue_depth: usize,
    /// Actors it holds.
    pub actors: usize,
    /// Actors it may hold.
    pub capacity: usize,
}

/// What the local executor saw of one actor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ActorStats {
    /// The actor.
    pub actor: Option<ActorId>,
    /// Messages lately received per executor they came through.
    pub messages_from: BTreeMap<ExecutorId, u64>,
    /// Bytes of state.
    pub state_bytes: u64,
}

/// A policy's choice: move the actor there, for this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The executor to move to.
    pub target: ExecutorId,
    /// Why.
    pub reason: MigrationReason,
}

/// Decides when actors move and whether to take one.
pub trait MigrationPolicy: Send + Sync {
    /// Whether `actor` on `local` should move to one of `peers`.
    fn evaluate(
        &self,
        local: &ExecutorLoad,
        peers: &[ExecutorLoad],
        actor: &ActorStats,
    ) -> Option<Decision>;

    /// Whether `local` should take an actor moving for `reason`.
    fn should_accept(
        &self,
        local: &ExecutorLoad,
        reason: MigrationReason,
    ) -> Result<(), RejectReason>;
}

/// Load balancing: an executor above `overload` sheds actors to the least
/// loaded peer, if that one is at least `min_gap` less loaded.
#[derive(Clone, Debug)]
pub struct DefaultMigrationPolicy {
    /// Load above which an executor sheds actors (and refuses them).
    pub overload: f64,
    /// How much less loaded a target must be.
    pub min_gap: f64,
    /// Messages waiting above which an executor refuses actors.
    pub max_queue_depth: usize,
}

impl Default for DefaultMigrationPolicy {
    fn default() -> Self {
        Self {
            overload: 0.8,
            min_gap: 0.2,
            max_queue_depth: 10_000,
        }
    }
}

/// The checks every policy applies before taking an actor.
fn has_room(local: &ExecutorLoad, max_queue_depth: usize) -> Result<(), RejectReason> {
    if local.actors >= local.capacity {
        return Err(RejectReason::Capacity {
            actors: local.actors,
            capacity: local.capacity,
        });
    }
    if local.queue_depth > max_queue_depth {
        return Err(RejectReason::QueueDepth {
            depth: local.queue_depth,
            max: max_queue_depth,
        });
    }
    Ok(())
}

impl MigrationPolicy for DefaultMigrationPolicy {
    fn evaluate(
        &self,
        local: &ExecutorLoad,
        peers: &[ExecutorLoad],
        _actor: &ActorStats,
    ) -> Option<Decision> {
        if local.load <= self.overload {
            return None;
        }
        peers
            .iter()
            .filter(|p| p.executor != local.executor && p.actors < p.capacity)
            .filter(|p| p.load + self.min_gap <= local.load)
            .min_by(|a, b| a.load.total_cmp(&b.load))
            .map(|p| Decision {
                target: p.executor.clone(),
                reason: MigrationReason::LoadBalancing,
            })
    }

    fn should_accept(
        &self,
        local: &ExecutorLoad,
        reason: MigrationReason,
    ) -> Result<(), RejectReason> {
        has_room(local, self.max_queue_depth)?;
        if reason == MigrationReason::LoadBalancing && local.load > self.overload {
            return Err(RejectReason::Overloaded((local.load * 100.0).round() as u32));
        }
        Ok(())
    }
}

/// Locality first: an actor whose messages mostly (`min_share`) come through
/// another executor moves there once it has seen `min_messages`; otherwise
/// the load-balancing rule decides.
#[derive(Clone, Debug)]
pub struct LocalityFirstPolicy {
    /// Share of the actor's messages that must come through one executor.
    pub min_share: f64,
    /// Messages seen before locality is judged.
    pub min_messages: u64,
    /// What decides when locality does not.
    pub fallback: DefaultMigrationPolicy,
}

impl Default for LocalityFirstPolicy {
    fn default() -> Self {
        Self {
            min_share: 0.6,
            min_messages: 100,
            fallback: DefaultMigrationPolicy::default(),
        }
    }
}

impl MigrationPolicy for LocalityFirstPolicy {
    fn evaluate(
        &self,
        local: &ExecutorLoad,
        peers: &[ExecutorLoad],
        actor: &ActorStats,
    ) -> Option<Decision> {
        let total: u64 = actor.messages_from.values().sum();
        let top = actor
            .messages_from
            .iter()
            .max_by_key(|(_, &n)| n)
            .filter(|(e, &n)| {
                **e != local.executor
                    && total >= self.min_messages
                    && n as f64 >= self.min_share * total as f64
            });
        if let Some((e, _)) = top {
            if peers
                .iter()
                .any(|p| &p.executor == e && p.actors < p.capacity)
            {
                return Some(Decision {
                    target: e.clone(),
                    reason: MigrationReason::Locality,
                });
            }
        }
        self.fallback.evaluate(local, peers, actor)
    }

    fn should_accept(
        &self,
        local: &ExecutorLoad,
        reason: MigrationReason,
    ) -> Result<(), RejectReason> {
        self.fallback.should_accept(local, reason)
    }
}

/// The time an actor must stay put after it moved, so that policies that
/// disagree cannot make it bounce.
#[derive(Debug)]
pub struct Cooldown {
    period: Duration,
    moved: HashMap<ActorId, Instant>,
}

impl Cooldown {
    /// A cooldown of `period` per actor.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            moved: HashMap::new(),
        }
    }

    /// Records that `actor` moved (or arrived) at `now`.
    pub fn moved(&mut self, actor: ActorId, now: Instant) {
        self.moved.insert(actor, now);
    }

    /// Whether `actor` may move at `now`.
    pub fn ready(&self, actor: ActorId, now: Instant) -> bool {
        self.moved
            .get(&actor)
            .is_none_or(|&t| now.saturating_duration_since(t) >= self.period)
    }

    /// Forgets actors whose cooldown is over.
    pub fn prune(&mut self, now: Instant) {
        let period = self.period;
        self.moved
            .retain(|_, t| now.saturating_duration_since(*t) < period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, load: f64, actors: usize) -> ExecutorLoad {
        ExecutorLoad {
            executor: ExecutorId::new(name).unwrap(),
            load,
            queue_depth: 0,
            actors,
            capacity: 10,
        }
    }

    #[test]
    fn an_overloaded_executor_sheds_to_the_least_loaded() {
        let p = DefaultMigrationPolicy::default();
        let a = load("a", 0.9, 3);
        let peers = [load("b", 0.2, 1), load("c", 0.5, 1), load("d", 0.1, 10)];
        let d = p.evaluate(&a, &peers, &ActorStats::default()).unwrap();
        assert_eq!(d.target.as_str(), "b", "d is full");
        assert_eq!(d.reason, MigrationReason::LoadBalancing);
        assert!(p
            .evaluate(&load("a", 0.5, 3), &peers, &ActorStats::default())
            .is_none());
        assert!(p
            .evaluate(&a, &[load("c", 0.85, 1)], &ActorStats::default())
            .is_none());
    }

    #[test]
    fn a_full_or_busy_executor_refuses() {
        let p = DefaultMigrationPolicy::default();
        assert!(p
            .should_accept(&load("b", 0.2, 1), MigrationReason::LoadBalancing)
            .is_ok());
        assert!(matches!(
            p.should_accept(&load("b", 0.2, 10), MigrationReason::Operator),
            Err(RejectReason::Capacity { .. })
        ));
        let mut busy = load("b", 0.2, 1);
        busy.queue_depth = 20_000;
        assert!(matches!(
            p.should_accept(&busy, MigrationReason::Operator),
            Err(RejectReason::QueueDepth { .. })
        ));
        assert!(matches!(
            p.should_accept(&load("b", 0.95, 1), MigrationReason::LoadBalancing),
            Err(RejectReason::Overloaded(_))
        ));
    }

    #[test]
    fn an_actor_moves_to_where_its_messages_come_from() {
        let p = LocalityFirstPolicy::default();
        let a = load("a", 0.3, 3);
        let peers = [load("b", 0.3, 1), load("c", 0.3, 1)];
        let mut stats = ActorStats::default();
        stats
            .messages_from
            .insert(ExecutorId::new("c").unwrap(), 80);
        stats
            .messages_from
            .insert(ExecutorId::new("a").unwrap(), 20);
        let d = p.evaluate(&a, &peers, &stats).unwrap();
        assert_eq!(
            (d.target.as_str(), d.reason),
            ("c", MigrationReason::Locality)
        );
        stats
            .messages_from
            .insert(ExecutorId::new("a").unwrap(), 80);
        assert!(p.evaluate(&a, &peers, &stats).is_none(), "no majority");
    }

    #[test]
    fn the_cooldown_holds_an_actor_that_just_moved() {
        let mut c = Cooldown::new(Duration::from_secs(60));
        let (actor, t0) = (ActorId::new(), Instant::now());
        assert!(c.ready(actor, t0));
        c.moved(actor, t0);
        assert!(!c.ready(actor, t0 + Duration::from_secs(30)));
        assert!(c.ready(actor, t0 + Duration::from_secs(60)));
        c.prune(t0 + Duration::from_secs(61));
        assert!(c.moved.is_empty());
    }
}
