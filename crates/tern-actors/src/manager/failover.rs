//! Fault tolerance: an executor that dies has its stateful actors run again
//! by the others, from their latest replicated checkpoints, never twice.
//!
//! Three mechanisms, all over the authenticated point-to-point links (the
//! gossip only says *when* to look, never *what is safe*):
//! - **Replication.** After every periodic checkpoint the owner sends it to
//!   each live peer (`CheckpointReplica`); a peer that has not acknowledged
//!   the checkpoint's base gets the whole chain and the module.
//! - **Leases.** The owner sends a heartbeat every `heartbeat`; once a
//!   majority of the cluster (itself counted) acknowledged a heartbeat sent
//!   at `s`, it may run its actors until `s + lease`. Without a lease it runs
//!   nothing (its mailboxes keep filling): an executor cut off from the rest
//!   stops on its own.
//! - **Claims.** A survivor that has heard nothing from an owner for
//!   `2 × lease`, and that gossip says is dead, asks every live peer to vote
//!   for running each of the owner's actors at the next epoch. A peer votes
//!   once per epoch, and only when it too has heard nothing from the owner
//!   for `2 × lease`; a majority of votes lets the claimant restore. Every
//!   peer that acknowledged the owner's last lease is silent-checked, so by
//!   the time a claim wins, the owner's lease has ended. Votes are remembered
//!   (`taken`) and handed to the old owner with its next acknowledgement, so
//!   an executor that comes back drops the copies it must not run.
//!
//! What a restore loses: messages the actor handled after the latest
//! checkpoint the claimant holds (at most a checkpoint interval, plus one
//! checkpoint in flight when the owner died), and messages queued on the
//! dead executor.

use super::{ActorMigrationManager, ManagerError};
use crate::checkpoint::ActorCheckpoint;
use crate::policy::MigrationReason;
use crate::protocol::{ActorMessage, ActorSettings, Taken, WireRecord};
use crate::runtime::Actor;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::{ActorId, ExecutorId, MigrationId, OwnerEpoch};

/// How an executor takes part in fault tolerance.
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// Every executor of the cluster, this one included: majorities are
    /// counted over it.
    pub cluster: Vec<ExecutorId>,
    /// How often the owner asks its peers to renew its lease.
    pub heartbeat: Duration,
    /// How long a majority's acknowledgement lets the owner run its actors.
    pub lease: Duration,
}

impl FailoverConfig {
    /// A cluster with the default timings (250 ms heartbeats, 1.5 s leases:
    /// a dead executor's actors run again after about 3 s of silence).
    pub fn new(cluster: Vec<ExecutorId>) -> Self {
        Self {
            cluster,
            heartbeat: Duration::from_millis(250),
            lease: Duration::from_millis(1500),
        }
    }

    fn majority(&self) -> usize {
        self.cluster.len() / 2 + 1
    }

    /// The silence after which an owner's lease has surely ended.
    fn guard(&self) -> Duration {
        self.lease * 2
    }
}

/// A peer's actor this executor keeps checkpoints of.
struct Replica {
    owner: ExecutorId,
    epoch: OwnerEpoch,
    settings: ActorSettings,
    module: Arc<Vec<u8>>,
}

/// A claim under way.
struct Claim {
    epoch: OwnerEpoch,
    votes: BTreeSet<ExecutorId>,
    deadline: Instant,
    /// A migration in doubt whose paused actor a won claim resumes here
    /// (else the claim restores a replica).
    resume: Option<MigrationId>,
}

/// The fault-tolerance state of one executor.
pub(super) struct Failover {
    cfg: FailoverConfig,
    started: Instant,
    /// When each peer last sent anything over its authenticated link.
    heard: HashMap<ExecutorId, Instant>,
    /// Peers gossip says are alive.
    live: BTreeSet<ExecutorId>,
    next_heartbeat: Instant,
    nonce: u64,
    /// Heartbeats sent, by nonce: when, and who acknowledged.
    pending: BTreeMap<u64, (Instant, BTreeSet<ExecutorId>)>,
    lease_until: Option<Instant>,
    replicas: HashMap<ActorId, Replica>,
    /// The highest epoch this executor voted for, per actor, and for whom.
    voted: HashMap<ActorId, (OwnerEpoch, ExecutorId)>,
    /// Per old owner: the actors voted away from it.
    taken: HashMap<ExecutorId, BTreeMap<ActorId, Taken>>,
    claims: HashMap<ActorId, Claim>,
    /// The last sequence each peer acknowledged of each actor.
    acked: HashMap<(ActorId, ExecutorId), u64>,
}

impl Failover {
    pub(super) fn new(cfg: FailoverConfig, now: Instant) -> Self {
        Self {
            cfg,
            started: now,
            heard: HashMap::new(),
            live: BTreeSet::new(),
            next_heartbeat: now,
            nonce: 0,
            pending: BTreeMap::new(),
            lease_until: None,
            replicas: HashMap::new(),
            voted: HashMap::new(),
            taken: HashMap::new(),
            claims: HashMap::new(),
            acked: HashMap::new(),
        }
    }

    /// Whether `owner` has been silent long enough that its lease is over.
    fn silent(&self, owner: &ExecutorId, now: Instant) -> bool {
        let last = self.heard.get(owner).copied().unwrap_or(self.started);
        now.saturating_duration_since(last) >= self.cfg.guard()
    }
}

/// The executor among `candidates` that should claim `actor`: the same on
/// every executor that sees the same candidates (rendezvous hashing).
fn chosen<'a>(
    actor: ActorId,
    candidates: impl Iterator<Item = &'a ExecutorId>,
) -> Option<&'a ExecutorId> {
    candidates.min_by_key(|e| {
        let mut h = blake3::Hasher::new();
        h.update(&actor.to_bytes());
        h.update(e.as_str().as_bytes());
        *h.finalize().as_bytes()
    })
}

impl ActorMigrationManager {
    /// Whether this executor may run its actors now: always without
    /// failover; with it, while a majority's lease holds.
    pub fn leased(&self, now: Instant) -> bool {
        match &self.failover {
            None => true,
            Some(f) => f.cfg.cluster.len() <= 1 || f.lease_until.is_some_and(|t| now < t),
        }
    }

    /// Records which peers gossip says are alive.
    pub fn set_live(&mut self, live: impl IntoIterator<Item = ExecutorId>) {
        let me = self.cfg.executor.clone();
        if let Some(f) = &mut self.failover {
            f.live = live.into_iter().filter(|e| *e != me).collect();
        }
    }

    /// Actors this executor keeps checkpoints of for others.
    pub fn replicas(&self) -> Vec<ActorId> {
        self.failover
            .as_ref()
            .map(|f| f.replicas.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Notes that `from` spoke over its authenticated link.
    pub(super) fn heard_from(&mut self, from: &ExecutorId, now: Instant) {
        if let Some(f) = &mut self.failover {
            f.heard.insert(from.clone(), now);
        }
    }

    /// Heartbeats, claims that ran out, and restores that are due.
    pub(super) fn failover_tick(&mut self, now: Instant) {
        let Some(f) = &mut self.failover else {
            return;
        };
        if now >= f.next_heartbeat {
            f.next_heartbeat = now + f.cfg.heartbeat;
            f.nonce += 1;
            let me = self.cfg.executor.clone();
            f.pending
                .insert(f.nonce, (now, BTreeSet::from([me.clone()])));
            let lease = f.cfg.lease;
            f.pending
                .retain(|_, (sent, _)| now.saturating_duration_since(*sent) < lease);
            // Only to peers gossip says are alive: a dead one would not
            // answer, and the lease needs answers.
            for peer in &f.live {
                self.outbox
                    .push((peer.clone(), ActorMessage::Heartbeat { nonce: f.nonce }));
            }
        }
        f.claims.retain(|_, c| now < c.deadline);
        self.start_claims(now);
    }

    /// Claims every actor of a dead, silent owner that falls to this executor.
    fn start_claims(&mut self, now: Instant) {
        let me = self.cfg.executor.clone();
        let Some(f) = &mut self.failover else {
            return;
        };
        let mut due = Vec::new();
        for (actor, r) in &f.replicas {
            if f.live.contains(&r.owner) || !f.silent(&r.owner, now) || f.claims.contains_key(actor)
            {
                continue;
            }
            if self.actors.contains_key(actor) || self.incoming.contains_key(actor) {
                continue;
            }
            let candidates = f.live.iter().chain([&me]).filter(|e| **e != r.owner);
            if chosen(*actor, candidates) != Some(&me) {
                continue;
            }
            let floor = f.voted.get(actor).map_or(r.epoch, |v| v.0).max(r.epoch);
            due.push((*actor, r.owner.clone(), floor.next(), None));
        }
        for (actor, owner, epoch, resume) in due {
            self.claim(actor, owner, epoch, resume, now);
        }
    }

    /// Asks the live peers (the owner aside) to vote for this executor
    /// running `actor` at `epoch`: from its replica, or (`resume`) by
    /// resuming the copy it holds paused for that migration.
    fn claim(
        &mut self,
        actor: ActorId,
        owner: ExecutorId,
        epoch: OwnerEpoch,
        resume: Option<MigrationId>,
        now: Instant,
    ) {
        let me = self.cfg.executor.clone();
        let Some(f) = &mut self.failover else {
            return;
        };
        tracing::info!(actor = %actor, owner = %owner, epoch = %epoch, "claiming an actor of a silent executor");
        f.voted.insert(actor, (epoch, me.clone()));
        f.taken.entry(owner.clone()).or_default().insert(
            actor,
            Taken {
                actor,
                by: me.clone(),
                epoch,
            },
        );
        f.claims.insert(
            actor,
            Claim {
                epoch,
                votes: BTreeSet::from([me.clone()]),
                deadline: now + self.cfg.step_timeout,
                resume,
            },
        );
        for peer in f.live.iter().filter(|p| **p != owner) {
            self.outbox.push((
                peer.clone(),
                ActorMessage::Claim {
                    actor,
                    epoch,
                    owner: owner.clone(),
                },
            ));
        }
        self.count_votes(actor, now);
    }

    /// Votes on a claim: once per epoch, and only for an owner silent here too.
    pub(super) fn handle_claim(
        &mut self,
        from: &ExecutorId,
        actor: ActorId,
        epoch: OwnerEpoch,
        owner: ExecutorId,
        now: Instant,
    ) {
        let me = self.cfg.executor.clone();
        // A copy held paused for a move to `owner` that is in doubt does not
        // count: a claim on the owner's replica means the move completed.
        let hosted = self.actors.contains_key(&actor) && !self.in_doubt_with(actor, &owner);
        let Some(f) = &mut self.failover else {
            return;
        };
        // A vote for another claimant before stands while that claimant
        // speaks: its claim may have won, and it runs the actor under its
        // own lease. This executor's own earlier claim stands while it runs.
        let earlier_stands = f.voted.get(&actor).is_some_and(|(v, by)| {
            epoch <= *v
                || (by != from
                    && if *by == me {
                        f.claims.contains_key(&actor)
                    } else {
                        !f.silent(by, now)
                    })
        });
        let granted = owner != me && !hosted && !earlier_stands && f.silent(&owner, now);
        if granted {
            f.voted.insert(actor, (epoch, from.clone()));
            f.taken.entry(owner).or_default().insert(
                actor,
                Taken {
                    actor,
                    by: from.clone(),
                    epoch,
                },
            );
        }
        self.outbox.push((
            from.clone(),
            ActorMessage::ClaimReply {
                actor,
                epoch,
                granted,
            },
        ));
    }

    pub(super) fn handle_claim_reply(
        &mut self,
        from: &ExecutorId,
        actor: ActorId,
        epoch: OwnerEpoch,
        granted: bool,
        now: Instant,
    ) {
        let Some(f) = &mut self.failover else {
            return;
        };
        let retry = now + f.cfg.heartbeat;
        let Some(c) = f.claims.get_mut(&actor).filter(|c| c.epoch == epoch) else {
            return;
        };
        if granted {
            c.votes.insert(from.clone());
            self.count_votes(actor, now);
        } else {
            // Refused (the voter heard the owner a little later than this
            // executor, or voted for another claim): try again soon, at a
            // higher epoch, instead of waiting for the claim to time out.
            c.deadline = c.deadline.min(retry);
        }
    }

    /// Restores a claimed actor once a majority voted for it.
    fn count_votes(&mut self, actor: ActorId, now: Instant) {
        let Some(f) = &mut self.failover else {
            return;
        };
        let Some(c) = f.claims.get(&actor) else {
            return;
        };
        if c.votes.len() < f.cfg.majority() {
            return;
        }
        let (epoch, resume) = (c.epoch, c.resume.clone());
        f.claims.remove(&actor);
        if let Some(m) = resume {
            self.resume_in_doubt(actor, &m, epoch, now);
            return;
        }
        let Some(f) = &mut self.failover else {
            return;
        };
        let Some(r) = f.replicas.remove(&actor) else {
            return;
        };
        f.acked.retain(|(a, _), _| *a != actor);
        if let Err(e) = self.restore_replica(actor, &r, epoch, now) {
            tracing::error!(actor = %actor, error = %e, "cannot restore a claimed actor");
        }
    }

    fn restore_replica(
        &mut self,
        actor: ActorId,
        r: &Replica,
        epoch: OwnerEpoch,
        now: Instant,
    ) -> Result<(), ManagerError> {
        let state = self.store.load(actor)?;
        let config = self.config_of(&r.settings, r.module.len())?;
        let module = self.runtime.compile(&r.module)?;
        let a = Actor::restore(&self.runtime, &module, actor, config.clone(), &state)?;
        self.host(actor, a, r.module.clone(), config, epoch);
        self.actors
            .get_mut(&actor)
            .expect("just hosted")
            .last_checkpoint = Some(now);
        if let Some(f) = &self.failover {
            for peer in &f.live {
                self.outbox.push((
                    peer.clone(),
                    ActorMessage::CheckpointAnnounce {
                        actor,
                        sequence: state.sequence,
                    },
                ));
            }
        }
        metrics::counter!("migration_reason_total", "workload" => "actor", "reason" => MigrationReason::FaultTolerance.as_str()).increment(1);
        tracing::info!(actor = %actor, from = %r.owner, sequence = state.sequence, epoch = %epoch, "restored an actor of a dead executor");
        Ok(())
    }

    pub(super) fn handle_heartbeat(&mut self, from: &ExecutorId, nonce: u64) {
        let Some(f) = &self.failover else {
            return;
        };
        let taken = f
            .taken
            .get(from)
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        self.outbox
            .push((from.clone(), ActorMessage::HeartbeatAck { nonce, taken }));
    }

    /// Drops what others took, then counts the acknowledgement.
    pub(super) fn handle_heartbeat_ack(
        &mut self,
        from: &ExecutorId,
        nonce: u64,
        taken: Vec<Taken>,
    ) {
        for t in taken {
            if self.actors.get(&t.actor).is_some_and(|h| h.epoch < t.epoch) {
                tracing::warn!(actor = %t.actor, by = %t.by, "the actor runs elsewhere since this executor was cut off; dropping this copy");
                self.actors.remove(&t.actor);
                self.moved.insert(t.actor, t.by);
            }
        }
        let Some(f) = &mut self.failover else {
            return;
        };
        let majority = f.cfg.majority();
        let lease = f.cfg.lease;
        if let Some((sent, acks)) = f.pending.get_mut(&nonce) {
            acks.insert(from.clone());
            if acks.len() >= majority {
                let until = *sent + lease;
                f.lease_until = Some(f.lease_until.map_or(until, |t| t.max(until)));
            }
        }
    }

    /// After a periodic checkpoint: send it to every live peer.
    pub(super) fn replicate(&mut self, actor: ActorId, c: &ActorCheckpoint, encoded: Vec<u8>) {
        let Some(f) = &self.failover else {
            return;
        };
        let Some(h) = self.actors.get(&actor) else {
            return;
        };
        let settings = super::settings_of(&h.config);
        let mut chain: Option<Vec<WireRecord>> = None;
        for peer in &f.live {
            let in_sync = c.state.base.is_some()
                && f.acked.get(&(actor, peer.clone())).copied() == c.state.base;
            let (module, records) = if in_sync {
                (Vec::new(), vec![WireRecord(encoded.clone())])
            } else {
                let chain = match &mut chain {
                    Some(ch) => ch.clone(),
                    None => match self.store.records(actor) {
                        Ok(rs) => chain
                            .insert(rs.iter().map(|r| WireRecord(r.encode())).collect())
                            .clone(),
                        Err(e) => {
                            tracing::warn!(actor = %actor, error = %e, "cannot read checkpoints to replicate");
                            return;
                        }
                    },
                };
                (h.wasm.as_ref().clone(), chain)
            };
            self.outbox.push((
                peer.clone(),
                ActorMessage::CheckpointReplica {
                    actor,
                    epoch: h.epoch,
                    settings: settings.clone(),
                    module,
                    records,
                },
            ));
        }
    }

    /// A peer's checkpoints of its actor: verified, stored, acknowledged.
    pub(super) fn handle_replica(&mut self, from: &ExecutorId, msg: ReplicaMsg) {
        let Some(f) = &self.failover else {
            return;
        };
        let stale = f.voted.get(&msg.actor).is_some_and(|v| msg.epoch < v.0)
            || f.replicas
                .get(&msg.actor)
                .is_some_and(|r| msg.epoch < r.epoch)
            || self.actors.contains_key(&msg.actor)
            || self.incoming.contains_key(&msg.actor);
        let sequence = if stale {
            tracing::debug!(actor = %msg.actor, from = %from, "a replica from an old owner, ignored");
            None
        } else {
            match self.store_replica(from, &msg) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(actor = %msg.actor, from = %from, error = %e, "a replicated checkpoint was refused");
                    None
                }
            }
        };
        self.outbox.push((
            from.clone(),
            ActorMessage::CheckpointResponse {
                actor: msg.actor,
                migration: None,
                running: false,
                sequence,
            },
        ));
    }

    fn store_replica(&mut self, from: &ExecutorId, msg: &ReplicaMsg) -> Result<u64, ManagerError> {
        let max = self.cfg.max_state_bytes;
        let records = msg
            .records
            .iter()
            .map(|r| ActorCheckpoint::decode(&r.0, max))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = records.first() else {
            return Err(ManagerError::Replica("no checkpoint in it"));
        };
        if records.iter().any(|c| c.actor_id != msg.actor) {
            return Err(ManagerError::Replica("another actor's checkpoint in it"));
        }
        let f = self.failover.as_mut().expect("checked by the caller");
        let module = if msg.module.is_empty() {
            match f.replicas.get(&msg.actor) {
                Some(r) => r.module.clone(),
                None => return Err(ManagerError::Replica("no module, and none held")),
            }
        } else {
            if msg.module.len() > self.cfg.max_module_bytes {
                return Err(ManagerError::Replica("a module over this executor's limit"));
            }
            Arc::new(msg.module.clone())
        };
        if first.state.base.is_none() {
            // A whole chain (a new owner's, or a resend): it replaces ours
            // once all of it verifies.
            self.store.verify_chain(&records)?;
            self.store.forget(msg.actor)?;
        }
        let mut last = 0;
        for c in &records {
            self.store.store(c)?;
            last = c.sequence;
        }
        f.replicas.insert(
            msg.actor,
            Replica {
                owner: from.clone(),
                epoch: msg.epoch,
                settings: msg.settings.clone(),
                module,
            },
        );
        Ok(last)
    }

    /// Tells the live peers an actor stopped, so they drop its replica.
    pub(super) fn retire(&mut self, actor: ActorId, epoch: OwnerEpoch) {
        let Some(f) = &mut self.failover else {
            return;
        };
        f.acked.retain(|(a, _), _| *a != actor);
        for peer in &f.live {
            self.outbox
                .push((peer.clone(), ActorMessage::Retired { actor, epoch }));
        }
    }

    /// The owner stopped an actor: its replica goes (checkpoints too).
    pub(super) fn handle_retired(&mut self, from: &ExecutorId, actor: ActorId, epoch: OwnerEpoch) {
        let Some(f) = &mut self.failover else {
            return;
        };
        if f.replicas
            .get(&actor)
            .is_some_and(|r| &r.owner == from && r.epoch <= epoch)
        {
            f.replicas.remove(&actor);
            if let Err(e) = self.store.forget(actor) {
                tracing::warn!(actor = %actor, error = %e, "cannot drop a retired actor's checkpoints");
            }
        }
    }

    /// Source of a migration in doubt whose target went silent: once gossip
    /// calls the target dead and its lease is surely over, claim the actor
    /// (at an epoch above any the target could have run it at) to resume
    /// the paused copy here. Returns whether a claim is (now) under way.
    pub(super) fn claim_in_doubt(&mut self, m: &MigrationId, now: Instant) -> bool {
        let Some(mig) = self.migrations.get(m) else {
            return false;
        };
        let (actor, target) = (mig.actor, mig.peer.clone());
        let Some(h) = self.actors.get(&actor) else {
            return false;
        };
        let Some(f) = &self.failover else {
            return false;
        };
        if f.claims.contains_key(&actor) {
            return true;
        }
        if f.live.contains(&target) || !f.silent(&target, now) {
            return false;
        }
        if f.voted
            .get(&actor)
            .is_some_and(|(_, by)| *by != self.cfg.executor && !f.silent(by, now))
        {
            // This executor voted for another's claim on the target's copy:
            // that one restores it, and its announcement drops the copy here.
            return true;
        }
        let floor = f
            .voted
            .get(&actor)
            .map_or(h.epoch, |v| v.0)
            .max(h.epoch.next());
        self.claim(actor, target, floor.next(), Some(m.clone()), now);
        true
    }

    /// Whether migration `m` is waiting for its target's confirmation.
    fn completing(&self, m: &MigrationId) -> bool {
        self.migrations
            .get(m)
            .is_some_and(|mig| mig.state == super::MigrationState::Completing)
    }

    /// Whether `actor` is held here paused for a move to `target` that is
    /// in doubt.
    fn in_doubt_with(&self, actor: ActorId, target: &ExecutorId) -> bool {
        self.actors
            .get(&actor)
            .and_then(|h| h.migrating.as_ref())
            .is_some_and(|m| self.completing(m) && &self.migrations[m].peer == target)
    }

    /// A won claim on a migration in doubt: the actor runs here again.
    fn resume_in_doubt(
        &mut self,
        actor: ActorId,
        m: &MigrationId,
        epoch: OwnerEpoch,
        now: Instant,
    ) {
        if !self.completing(m) {
            return;
        }
        self.resume_here(m);
        if let Some(h) = self.actors.get_mut(&actor) {
            h.epoch = epoch;
            // Checkpoint and replicate at once: the peers' replicas may be
            // the dead target's.
            h.last_checkpoint = None;
        }
        tracing::warn!(actor = %actor, migration = %m.as_str(), "the target died before confirming; the actor runs here again by a majority's vote");
        self.finish(
            m,
            super::MigrationState::Failed(
                "the target died before confirming; resumed on the source by a majority's vote"
                    .into(),
            ),
            now,
        );
    }

    /// Another executor restored `actor` from the dead target's replica: a
    /// copy held paused here for a migration in doubt goes (the target had
    /// completed the move).
    pub(super) fn drop_in_doubt(
        &mut self,
        from: &ExecutorId,
        actor: ActorId,
        now: Instant,
    ) -> bool {
        let Some(m) = self.actors.get(&actor).and_then(|h| h.migrating.clone()) else {
            return false;
        };
        if !self.completing(&m) {
            return false;
        }
        tracing::warn!(actor = %actor, by = %from, "the actor runs elsewhere after its target died; dropping the paused copy");
        self.actors.remove(&actor);
        self.moved.insert(actor, from.clone());
        self.finish(&m, super::MigrationState::Complete, now);
        true
    }

    /// A peer acknowledged a replica up to `sequence` (or refused it).
    pub(super) fn handle_replica_ack(
        &mut self,
        from: &ExecutorId,
        actor: ActorId,
        sequence: Option<u64>,
    ) {
        let Some(f) = &mut self.failover else {
            return;
        };
        match sequence {
            Some(s) => f.acked.insert((actor, from.clone()), s),
            None => f.acked.remove(&(actor, from.clone())),
        };
    }
}

/// A `CheckpointReplica`'s fields.
pub(super) struct ReplicaMsg {
    pub actor: ActorId,
    pub epoch: OwnerEpoch,
    pub settings: ActorSettings,
    pub module: Vec<u8>,
    pub records: Vec<WireRecord>,
}
