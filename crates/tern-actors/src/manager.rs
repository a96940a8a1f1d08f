//! One executor's actors and the migrations that move them: the seed's
//! `ActorMigrationManager`.
//!
//! The manager is a state machine without I/O or clocks of its own: callers
//! hand it protocol messages and the time, and take what it wants sent from
//! its outbox ([`ActorMigrationManager::take_outbox`]). The network side (the
//! mutual-TLS transport, gossip) and the tests drive the same code.
//!
//! Two rules keep exactly one copy of every actor running:
//! - the source pauses the actor before its final checkpoint and drops it
//!   only when the target says it runs it (`MigrationCompleted`);
//! - a source that hears nothing asks (`CheckpointQuery`), and a target that
//!   has not completed gives the migration up *before* it answers, so a late
//!   `MigrationComplete` is refused. Until an answer comes the actor stays
//!   paused on the source: unavailable for a while, never twice.

use crate::checkpoint::ActorCheckpoint;
use crate::delivery::{Delivery, Envelope};
use crate::policy::{
    ActorStats, Cooldown, ExecutorLoad, MigrationPolicy, MigrationReason, RejectReason,
};
use crate::protocol::{ActorMessage, ActorSettings, WireEnvelope};
use crate::runtime::{Actor, ActorConfig, ActorError, ActorMode, Runtime};
use crate::store::{CheckpointStore, Durability};
use ed25519_dalek::SigningKey;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_proto::{ActorId, ExecutorId, MigrationId, OwnerEpoch};
use thiserror::Error;

mod failover;
pub use failover::FailoverConfig;
use failover::{Failover, ReplicaMsg};

/// Pre-copy rounds after the first checkpoint, at most.
const MAX_ROUNDS: u32 = 4;
/// A first checkpoint that went over faster than this needs no round.
const ROUND_TARGET: Duration = Duration::from_millis(5);
/// A round of at most this many pages ends pre-copy: what the actor wrote
/// meanwhile goes in the pause.
const SMALL_ROUND_PAGES: usize = 64;
/// The slowest rate a checkpoint is expected to travel and be stored at: a
/// step's timeout grows by its size over this rate.
const MIN_RATE: u64 = 10 << 20;

/// How an executor runs migrations.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// This executor.
    pub executor: ExecutorId,
    /// Actors it may hold.
    pub capacity: usize,
    /// How long each step of a migration may take before it fails.
    pub step_timeout: Duration,
    /// Migrations (either side) at once.
    pub max_active: usize,
    /// How long an actor stays put after it moved.
    pub cooldown: Duration,
    /// The largest state an incoming actor may ask for.
    pub max_state_bytes: u64,
    /// The largest module an incoming actor may bring.
    pub max_module_bytes: usize,
    /// Replication, leases and restores after a fault; without it an
    /// executor's actors die with it.
    pub failover: Option<FailoverConfig>,
}

impl ManagerConfig {
    /// Defaults for executor `executor`.
    pub fn new(executor: ExecutorId) -> Self {
        Self {
            executor,
            capacity: 1024,
            step_timeout: Duration::from_secs(10),
            max_active: 4,
            cooldown: Duration::from_secs(60),
            max_state_bytes: 256 << 20,
            max_module_bytes: 16 << 20,
            failover: None,
        }
    }
}

/// Where a migration is; both sides report it with the same states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationState {
    /// Source: the request with the first checkpoint is out.
    Requested,
    /// Target: checkpoint stored, waiting for the final one.
    Accepted,
    /// Source: actor paused, final checkpoint sent, waiting for the target.
    Completing,
    /// The actor runs on the target.
    Complete,
    /// The target refused; the actor runs on the source.
    Rejected(RejectReason),
    /// Given up; the actor runs on the source.
    Failed(String),
}

impl MigrationState {
    /// Whether the migration is over.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Complete | Self::Rejected(_) | Self::Failed(_))
    }
}

/// Which end of a migration this executor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Sends the actor.
    Source,
    /// Takes it.
    Target,
}

/// One migration as this executor sees it.
#[derive(Clone, Debug)]
pub struct Migration {
    /// The actor.
    pub actor: ActorId,
    /// This executor's end.
    pub side: Side,
    /// The other end.
    pub peer: ExecutorId,
    /// Why.
    pub reason: MigrationReason,
    /// Where it is.
    pub state: MigrationState,
    /// When it began.
    pub started: Instant,
    /// When it ended, if it has.
    pub ended: Option<Instant>,
    /// Checkpoint bytes sent or received.
    pub checkpoint_bytes: u64,
    /// When the current step times out.
    deadline: Instant,
    /// Source: how many queued messages went with the final checkpoint.
    sent_mailbox: usize,
    /// Source: when the actor was paused for the final checkpoint.
    paused_at: Option<Instant>,
    /// Source: pre-copy rounds sent after the first checkpoint.
    pub rounds: u32,
    /// Source: when the checkpoint now with the target was sent.
    round_sent: Instant,
    /// Source: pages in the last round sent.
    round_pages: usize,
}

impl Migration {
    /// How long the actor was paused (source side, once complete): from
    /// the pause for the final checkpoint to the target's confirmation.
    pub fn pause(&self) -> Option<Duration> {
        Some(self.ended?.saturating_duration_since(self.paused_at?))
    }

    /// From the request to the end (once ended).
    pub fn total(&self) -> Option<Duration> {
        Some(self.ended?.saturating_duration_since(self.started))
    }
}

/// An operation the manager refused.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// No such actor here.
    #[error("actor {0} is not on this executor")]
    NotHere(ActorId),
    /// It is already migrating.
    #[error("actor {0} is already migrating")]
    Migrating(ActorId),
    /// Too many migrations at once.
    #[error("{0} migrations are running; try later")]
    RateLimited(usize),
    /// Ephemeral actors start afresh elsewhere rather than move.
    #[error("actor {0} is ephemeral")]
    Ephemeral(ActorId),
    /// The runtime failed.
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// The store failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// A replicated actor was refused: what was wrong with it.
    #[error("replica refused: {0}")]
    Replica(&'static str),
    /// A replicated actor's settings do not fit this executor.
    #[error(transparent)]
    Settings(#[from] RejectReason),
}

/// An actor hosted here, as the API shows it.
#[derive(Clone, Debug)]
pub struct ActorInfo {
    /// Its ownership epoch (grows with each move and restore).
    pub epoch: OwnerEpoch,
    /// Its latest checkpoint's sequence (0: none yet).
    pub sequence: u64,
    /// Messages waiting.
    pub queued: usize,
    /// Paused (for a move completing).
    pub paused: bool,
    /// A migration of it is under way.
    pub migrating: bool,
    /// Checkpointed (else ephemeral).
    pub stateful: bool,
    /// Its tenant.
    pub tenant: Option<tern_proto::TenantId>,
    /// Its linear memory.
    pub memory_bytes: usize,
}

/// What became of a message handed to [`ActorMigrationManager::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted here (queued, or already had).
    Accepted(Delivery),
    /// The actor lives on another executor: send there.
    Moved(ExecutorId),
    /// Not known here.
    Unknown,
}

/// A message an actor handled, with its answer, for whoever waits on it.
#[derive(Debug)]
pub struct Handled {
    /// The actor.
    pub actor: ActorId,
    /// The message.
    pub envelope: Envelope,
    /// Its answer.
    pub reply: Result<Vec<u8>, ActorError>,
}

struct Hosted {
    actor: Actor,
    wasm: Arc<Vec<u8>>,
    config: ActorConfig,
    epoch: OwnerEpoch,
    stats: ActorStats,
    last_checkpoint: Option<Instant>,
    /// Source side: the migration under way.
    migrating: Option<MigrationId>,
    /// Source side, while completing: what was sent with the final checkpoint
    /// and what arrived since, given back to the actor if the move fails.
    carried: Vec<Envelope>,
}

/// Target side: an actor whose first checkpoint is stored and restored
/// (paused), awaiting its last.
struct Incoming {
    migration: MigrationId,
    actor: Actor,
    wasm: Arc<Vec<u8>>,
    config: ActorConfig,
    epoch: OwnerEpoch,
}

/// The seed's `ActorMigrationManager`: one per executor.
pub struct ActorMigrationManager {
    cfg: ManagerConfig,
    key: SigningKey,
    runtime: Runtime,
    store: CheckpointStore,
    policy: Box<dyn MigrationPolicy>,
    actors: HashMap<ActorId, Hosted>,
    incoming: HashMap<ActorId, Incoming>,
    /// Actors that left, and where to.
    moved: HashMap<ActorId, ExecutorId>,
    migrations: HashMap<MigrationId, Migration>,
    /// Migrations this executor gave up as a target: a late completion is refused.
    abandoned: HashMap<MigrationId, Instant>,
    cooldown: Cooldown,
    peers: BTreeMap<ExecutorId, ExecutorLoad>,
    load: f64,
    outbox: Vec<(ExecutorId, ActorMessage)>,
    failover: Option<Failover>,
}

impl ActorMigrationManager {
    /// A manager over `store`, signing with `key`.
    pub fn new(
        cfg: ManagerConfig,
        key: SigningKey,
        store: CheckpointStore,
        policy: Box<dyn MigrationPolicy>,
    ) -> Result<Self, ManagerError> {
        store.trust(key.verifying_key().to_bytes(), cfg.executor.clone());
        let cfg_failover = cfg.failover.clone();
        Ok(Self {
            cooldown: Cooldown::new(cfg.cooldown),
            cfg,
            key,
            runtime: Runtime::new()?,
            store,
            policy,
            actors: HashMap::new(),
            incoming: HashMap::new(),
            moved: HashMap::new(),
            migrations: HashMap::new(),
            abandoned: HashMap::new(),
            peers: BTreeMap::new(),
            load: 0.0,
            outbox: Vec::new(),
            failover: cfg_failover.map(|c| Failover::new(c, Instant::now())),
        })
    }

    /// This executor.
    pub fn id(&self) -> &ExecutorId {
        &self.cfg.executor
    }

    /// The checkpoint store.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Trusts `executor`'s checkpoint key.
    pub fn trust_peer(&self, executor: ExecutorId, key: [u8; 32]) {
        self.store.trust(key, executor);
    }

    /// Sets this executor's load as measured (0 to 1).
    pub fn set_load(&mut self, load: f64) {
        self.load = load;
    }

    /// Records what gossip says about a peer.
    pub fn peer_load(&mut self, load: ExecutorLoad) {
        if load.executor != self.cfg.executor {
            self.peers.insert(load.executor.clone(), load);
        }
    }

    /// What this executor says about itself.
    pub fn local_load(&self) -> ExecutorLoad {
        ExecutorLoad {
            executor: self.cfg.executor.clone(),
            load: self.load,
            queue_depth: self.actors.values().map(|h| h.actor.queued()).sum(),
            actors: self.actors.len() + self.incoming.len(),
            capacity: self.cfg.capacity,
        }
    }

    /// Messages to send, each to its executor.
    pub fn take_outbox(&mut self) -> Vec<(ExecutorId, ActorMessage)> {
        std::mem::take(&mut self.outbox)
    }

    /// Starts a new actor here.
    pub fn deploy(&mut self, wasm: &[u8], config: ActorConfig) -> Result<ActorId, ManagerError> {
        let module = self.runtime.compile(wasm)?;
        let id = ActorId::new();
        let actor = Actor::start(&self.runtime, &module, id, config.clone())?;
        self.host(id, actor, Arc::new(wasm.to_vec()), config, OwnerEpoch(1));
        Ok(id)
    }

    fn host(
        &mut self,
        id: ActorId,
        actor: Actor,
        wasm: Arc<Vec<u8>>,
        config: ActorConfig,
        epoch: OwnerEpoch,
    ) {
        self.moved.remove(&id);
        self.actors.insert(
            id,
            Hosted {
                actor,
                wasm,
                config,
                epoch,
                stats: ActorStats {
                    actor: Some(id),
                    ..Default::default()
                },
                last_checkpoint: None,
                migrating: None,
                carried: Vec::new(),
            },
        );
    }

    /// The actors running here.
    pub fn actors(&self) -> Vec<ActorId> {
        self.actors.keys().copied().collect()
    }

    /// Whether `actor` runs here (not paused for a move that is completing).
    pub fn runs(&self, actor: ActorId) -> bool {
        self.actors
            .get(&actor)
            .is_some_and(|h| !h.actor.is_paused())
    }

    /// Stops and removes an actor hosted here (its checkpoints stay in the
    /// store). Refused while it migrates.
    pub fn remove(&mut self, actor: ActorId) -> Result<(), ManagerError> {
        match self.actors.get(&actor) {
            None => Err(ManagerError::NotHere(actor)),
            Some(h) if h.migrating.is_some() => Err(ManagerError::Migrating(actor)),
            Some(_) => {
                let h = self.actors.remove(&actor).expect("just seen");
                self.retire(actor, h.epoch);
                Ok(())
            }
        }
    }

    /// What an operator or tenant sees of an actor hosted here.
    pub fn info(&self, actor: ActorId) -> Option<ActorInfo> {
        let h = self.actors.get(&actor)?;
        Some(ActorInfo {
            epoch: h.epoch,
            sequence: h.actor.sequence(),
            queued: h.actor.queued(),
            paused: h.actor.is_paused(),
            migrating: h.migrating.is_some(),
            stateful: matches!(h.config.mode, ActorMode::Stateful { .. }),
            tenant: h.config.tenant.clone(),
            memory_bytes: h.actor.memory_bytes(),
        })
    }

    /// Where `actor` went, if it left.
    pub fn moved_to(&self, actor: ActorId) -> Option<&ExecutorId> {
        self.moved.get(&actor)
    }

    /// Hands a message to `actor`, which came through executor `via` (for
    /// locality; `None` when a client called this executor directly).
    pub fn send(
        &mut self,
        actor: ActorId,
        envelope: Envelope,
        via: Option<&ExecutorId>,
    ) -> Result<SendOutcome, ManagerError> {
        let Some(h) = self.actors.get_mut(&actor) else {
            return Ok(match self.moved.get(&actor) {
                Some(to) => SendOutcome::Moved(to.clone()),
                None => SendOutcome::Unknown,
            });
        };
        let origin = via.unwrap_or(&self.cfg.executor).clone();
        *h.stats.messages_from.entry(origin).or_default() += 1;
        if let Some(m) = &h.migrating {
            if self.migrations.get(m).map(|m| &m.state) == Some(&MigrationState::Completing) {
                // The mailbox left with the final checkpoint: hold the message
                // for the target (or for this actor again if the move fails).
                if h.carried.len() >= h.config.mailbox_capacity {
                    return Err(ActorError::MailboxFull(h.carried.len()).into());
                }
                h.carried.push(envelope);
                return Ok(SendOutcome::Accepted(Delivery::Queued));
            }
        }
        Ok(SendOutcome::Accepted(h.actor.deliver(envelope)?))
    }

    /// Runs up to `budget` queued messages over all actors, and checkpoints
    /// stateful actors whose interval has passed.
    pub fn run(&mut self, budget: usize, now: Instant) -> Vec<Handled> {
        let mut out = Vec::new();
        if !self.leased(now) {
            // Cut off from the majority: others may be taking these actors.
            return out;
        }
        let ids: Vec<ActorId> = self.actors.keys().copied().collect();
        for id in ids {
            let h = self.actors.get_mut(&id).expect("listed");
            while out.len() < budget {
                let Some((envelope, reply)) = h.actor.step() else {
                    break;
                };
                out.push(Handled {
                    actor: id,
                    envelope,
                    reply,
                });
            }
            if let Err(e) = self.checkpoint_if_due(id, now) {
                tracing::warn!(actor = %id, error = %e, "periodic checkpoint failed");
            }
        }
        out
    }

    fn checkpoint_if_due(&mut self, id: ActorId, now: Instant) -> Result<(), ManagerError> {
        let h = self.actors.get_mut(&id).expect("hosted");
        let ActorMode::Stateful {
            checkpoint_interval,
            ..
        } = h.config.mode
        else {
            return Ok(());
        };
        // While migrating, the final checkpoint must follow the one the
        // target holds: no periodic one in between.
        if h.actor.is_paused()
            || h.migrating.is_some()
            || h.last_checkpoint
                .is_some_and(|t| now.saturating_duration_since(t) < checkpoint_interval)
        {
            return Ok(());
        }
        let c = h.actor.checkpoint(&self.key)?;
        h.last_checkpoint = Some(now);
        let encoded = c.encode();
        self.store
            .store_own(&c, encoded.clone(), h.actor.hashes(), Durability::Synced)?;
        self.replicate(id, &c, encoded);
        Ok(())
    }

    /// Calls `actor` directly, outside every sender's order (reads).
    pub fn call(&mut self, actor: ActorId, payload: &[u8]) -> Result<Vec<u8>, ManagerError> {
        let h = self
            .actors
            .get_mut(&actor)
            .ok_or(ManagerError::NotHere(actor))?;
        Ok(h.actor.call(payload)?)
    }

    /// The seed's `evaluate_migration`: asks the policy about every actor
    /// that is not migrating or cooling down, and starts what it picks.
    pub fn evaluate_migration(&mut self, now: Instant) -> Vec<MigrationId> {
        if !self.leased(now) {
            return Vec::new();
        }
        let local = self.local_load();
        let peers: Vec<ExecutorLoad> = self.peers.values().cloned().collect();
        let mut ids: Vec<ActorId> = self.actors.keys().copied().collect();
        ids.sort();
        let mut started = Vec::new();
        for id in ids {
            let h = &self.actors[&id];
            if h.migrating.is_some()
                || !self.cooldown.ready(id, now)
                || matches!(h.config.mode, ActorMode::Ephemeral)
            {
                continue;
            }
            let Some(d) = self.policy.evaluate(&local, &peers, &h.stats) else {
                continue;
            };
            match self.initiate_migration(id, d.target, d.reason, now) {
                Ok(m) => started.push(m),
                Err(ManagerError::RateLimited(_)) => break,
                Err(e) => tracing::warn!(actor = %id, error = %e, "cannot start a migration"),
            }
            // One actor per evaluation: the next one sees the new load.
            break;
        }
        started
    }

    /// A step's timeout for a checkpoint of `bytes`.
    fn step_timeout(&self, bytes: u64) -> Duration {
        self.cfg.step_timeout + Duration::from_secs(bytes / MIN_RATE)
    }

    fn active(&self) -> usize {
        self.migrations
            .values()
            .filter(|m| !m.state.is_final())
            .count()
    }

    /// The seed's `initiate_migration`: a full checkpoint goes to `target`
    /// while the actor keeps running.
    pub fn initiate_migration(
        &mut self,
        actor: ActorId,
        target: ExecutorId,
        reason: MigrationReason,
        now: Instant,
    ) -> Result<MigrationId, ManagerError> {
        let active = self.active();
        let h = self
            .actors
            .get_mut(&actor)
            .ok_or(ManagerError::NotHere(actor))?;
        if h.migrating.is_some() {
            return Err(ManagerError::Migrating(actor));
        }
        if matches!(h.config.mode, ActorMode::Ephemeral) {
            return Err(ManagerError::Ephemeral(actor));
        }
        if active >= self.cfg.max_active {
            return Err(ManagerError::RateLimited(active));
        }
        let c = h.actor.checkpoint_full(&self.key)?;
        h.last_checkpoint = Some(now);
        let checkpoint = c.encode();
        self.store.store_own(
            &c,
            checkpoint.clone(),
            h.actor.hashes(),
            Durability::Unsynced,
        )?;
        let migration = new_migration_id();
        h.migrating = Some(migration.clone());
        let bytes = checkpoint.len() as u64;
        let msg = ActorMessage::MigrationRequest {
            migration: migration.clone(),
            actor,
            epoch: h.epoch,
            reason,
            settings: settings_of(&h.config),
            module: h.wasm.to_vec(),
            checkpoint,
        };
        self.outbox.push((target.clone(), msg));
        self.migrations.insert(
            migration.clone(),
            Migration {
                actor,
                side: Side::Source,
                peer: target,
                reason,
                state: MigrationState::Requested,
                started: now,
                ended: None,
                checkpoint_bytes: bytes,
                deadline: now + self.step_timeout(bytes),
                sent_mailbox: 0,
                paused_at: None,
                rounds: 0,
                round_sent: now,
                round_pages: usize::MAX,
            },
        );
        metrics::counter!("migrations_initiated_total", "workload" => "actor").increment(1);
        metrics::counter!("migration_reason_total", "workload" => "actor", "reason" => reason.as_str())
            .increment(1);
        Ok(migration)
    }

    /// The seed's `get_state`.
    pub fn get_state(&self, migration: &MigrationId) -> Option<&Migration> {
        self.migrations.get(migration)
    }

    /// Handles one protocol message from executor `from`.
    pub fn handle(&mut self, from: &ExecutorId, msg: ActorMessage, now: Instant) {
        self.heard_from(from, now);
        match msg {
            ActorMessage::MigrationRequest {
                migration,
                actor,
                epoch,
                reason,
                settings,
                module,
                checkpoint,
            } => self.handle_migration_request(
                from,
                Request {
                    migration,
                    actor,
                    epoch,
                    reason,
                    settings,
                    module,
                    checkpoint,
                },
                now,
            ),
            ActorMessage::MigrationAccept { migration } => {
                self.handle_migration_accept(from, &migration, now)
            }
            ActorMessage::MigrationReject { migration, reason } => {
                self.handle_migration_reject(from, &migration, reason, now)
            }
            ActorMessage::MigrationComplete {
                migration,
                checkpoint,
                mailbox,
            } => self.handle_migration_complete(from, &migration, &checkpoint, mailbox, now),
            ActorMessage::MigrationCompleted { migration } => {
                self.handle_migration_completed(from, &migration, now)
            }
            ActorMessage::MigrationAbort { migration } => {
                self.abandon_incoming(from, &migration, now);
            }
            ActorMessage::CheckpointQuery { actor, migration } => {
                self.handle_checkpoint_query(from, actor, migration, now)
            }
            ActorMessage::CheckpointResponse {
                migration: Some(migration),
                running,
                ..
            } => self.handle_doubt_resolved(from, &migration, running, now),
            ActorMessage::CheckpointResponse {
                actor,
                migration: None,
                sequence,
                ..
            } => self.handle_replica_ack(from, actor, sequence),
            ActorMessage::CheckpointAnnounce { actor, .. } => {
                if from != &self.cfg.executor
                    && (!self.actors.contains_key(&actor) || self.drop_in_doubt(from, actor, now))
                {
                    self.moved.insert(actor, from.clone());
                }
            }
            ActorMessage::Deliver { actor, envelope } => {
                match self.send(actor, envelope.into(), Some(from)) {
                    Ok(SendOutcome::Moved(to)) => {
                        self.outbox
                            .push((from.clone(), ActorMessage::Moved { actor, to }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(actor = %actor, error = %e, "forwarded message refused")
                    }
                }
            }
            ActorMessage::Moved { actor, to } => {
                if !self.actors.contains_key(&actor) && to != self.cfg.executor {
                    self.moved.insert(actor, to);
                }
            }
            ActorMessage::Load(load) => self.peer_load(load),
            ActorMessage::MigrationRound {
                migration,
                checkpoint,
            } => self.handle_migration_round(from, &migration, &checkpoint, now),
            ActorMessage::CheckpointReplica {
                actor,
                epoch,
                settings,
                module,
                records,
            } => self.handle_replica(
                from,
                ReplicaMsg {
                    actor,
                    epoch,
                    settings,
                    module,
                    records,
                },
            ),
            ActorMessage::Heartbeat { nonce } => self.handle_heartbeat(from, nonce),
            ActorMessage::HeartbeatAck { nonce, taken } => {
                self.handle_heartbeat_ack(from, nonce, taken)
            }
            ActorMessage::Claim {
                actor,
                epoch,
                owner,
            } => self.handle_claim(from, actor, epoch, owner, now),
            ActorMessage::ClaimReply {
                actor,
                epoch,
                granted,
            } => self.handle_claim_reply(from, actor, epoch, granted, now),
            ActorMessage::Retired { actor, epoch } => self.handle_retired(from, actor, epoch),
        }
    }

    /// Whether `m` is a migration of ours on `side` with `peer`, in `state`.
    fn is_step(
        &self,
        m: &MigrationId,
        peer: &ExecutorId,
        side: Side,
        state: &MigrationState,
    ) -> bool {
        self.migrations
            .get(m)
            .is_some_and(|m| m.side == side && &m.peer == peer && &m.state == state)
    }

    fn finish(&mut self, m: &MigrationId, state: MigrationState, now: Instant) {
        let Some(mig) = self.migrations.get_mut(m) else {
            return;
        };
        let name = match &state {
            MigrationState::Complete => "migrations_completed_total",
            MigrationState::Rejected(_) => "migrations_rejected_total",
            _ => "migrations_failed_total",
        };
        if mig.side == Side::Source || state == MigrationState::Complete {
            metrics::counter!(name, "workload" => "actor").increment(1);
        }
        if state == MigrationState::Complete && mig.side == Side::Source {
            metrics::histogram!("migration_duration_seconds", "workload" => "actor")
                .record(now.saturating_duration_since(mig.started).as_secs_f64());
            metrics::histogram!("migration_checkpoint_size_bytes", "workload" => "actor")
                .record(mig.checkpoint_bytes as f64);
        }
        mig.state = state;
        mig.ended = Some(now);
    }

    fn handle_migration_request(&mut self, from: &ExecutorId, r: Request, now: Instant) {
        let migration = r.migration.clone();
        let reply = match self.admit_request(from, r, now) {
            Ok(()) => ActorMessage::MigrationAccept { migration },
            Err(reason) => ActorMessage::MigrationReject { migration, reason },
        };
        self.outbox.push((from.clone(), reply));
    }

    /// The target's checks: room, policy, module, checkpoint (stored here).
    fn admit_request(
        &mut self,
        from: &ExecutorId,
        mut r: Request,
        now: Instant,
    ) -> Result<(), RejectReason> {
        if self.abandoned.contains_key(&r.migration) {
            return Err(RejectReason::Abandoned);
        }
        if self.actors.contains_key(&r.actor) || self.incoming.contains_key(&r.actor) {
            return Err(RejectReason::AlreadyHere);
        }
        if self.active() >= self.cfg.max_active {
            return Err(RejectReason::RateLimited);
        }
        self.policy.should_accept(&self.local_load(), r.reason)?;
        let config = self.config_of(&r.settings, r.module.len())?;
        let module = self
            .runtime
            .compile(&r.module)
            .map_err(|e| RejectReason::BadModule(e.to_string()))?;
        let ckpt_len = r.checkpoint.len() as u64;
        let c = ActorCheckpoint::decode(&r.checkpoint, self.cfg.max_state_bytes)
            .map_err(|e| RejectReason::BadCheckpoint(e.to_string()))?;
        if c.actor_id != r.actor || c.state.base.is_some() {
            return Err(RejectReason::BadCheckpoint(
                "not a full checkpoint of this actor".into(),
            ));
        }
        let bad =
            |e: crate::checkpoint::CheckpointError| RejectReason::BadCheckpoint(e.to_string());
        let verified = self.store.verify(&c).map_err(bad)?;
        let hashes = verified.hashes().clone();
        self.store
            .commit(
                &c,
                std::mem::take(&mut r.checkpoint),
                verified,
                Durability::Unsynced,
            )
            .map_err(bad)?;
        // Restored now, while the actor still runs on the source: the pause
        // then costs only the final delta.
        let mut actor =
            Actor::restore_checkpoint(&self.runtime, &module, r.actor, config.clone(), &c, hashes)
                .map_err(|e| RejectReason::BadModule(e.to_string()))?;
        actor.pause();
        self.incoming.insert(
            r.actor,
            Incoming {
                migration: r.migration.clone(),
                actor,
                wasm: Arc::new(r.module),
                config,
                epoch: r.epoch,
            },
        );
        self.migrations.insert(
            r.migration,
            Migration {
                actor: r.actor,
                side: Side::Target,
                peer: from.clone(),
                reason: r.reason,
                state: MigrationState::Accepted,
                started: now,
                ended: None,
                checkpoint_bytes: ckpt_len,
                deadline: now + self.step_timeout(ckpt_len),
                sent_mailbox: 0,
                paused_at: None,
                rounds: 0,
                round_sent: now,
                round_pages: usize::MAX,
            },
        );
        metrics::counter!("migrations_accepted_total", "workload" => "actor").increment(1);
        Ok(())
    }

    fn config_of(&self, s: &ActorSettings, module_len: usize) -> Result<ActorConfig, RejectReason> {
        if module_len > self.cfg.max_module_bytes {
            return Err(RejectReason::BadModule(format!(
                "module of {module_len} bytes (at most {})",
                self.cfg.max_module_bytes
            )));
        }
        if s.max_state_size_bytes > self.cfg.max_state_bytes {
            return Err(RejectReason::BadModule(format!(
                "state limit {} over this executor's {}",
                s.max_state_size_bytes, self.cfg.max_state_bytes
            )));
        }
        let interval = s
            .checkpoint_interval_ms
            .ok_or_else(|| RejectReason::BadModule("an ephemeral actor does not move".into()))?;
        Ok(ActorConfig {
            mode: ActorMode::Stateful {
                checkpoint_interval: Duration::from_millis(interval.max(10)),
                max_state_size_bytes: s.max_state_size_bytes,
            },
            fuel_per_message: s.fuel_per_message,
            mailbox_capacity: (s.mailbox_capacity as usize).clamp(1, 1 << 16),
            tenant: s.tenant.clone(),
        })
    }

    /// Source: the target holds the first checkpoint; pause, take the last.
    fn handle_migration_accept(&mut self, from: &ExecutorId, m: &MigrationId, now: Instant) {
        if !self.is_step(m, from, Side::Source, &MigrationState::Requested) {
            // A late accept of a migration given up: tell the target.
            self.outbox.push((
                from.clone(),
                ActorMessage::MigrationAbort {
                    migration: m.clone(),
                },
            ));
            return;
        }
        let mig = &self.migrations[m];
        let actor = mig.actor;
        // Pre-copy: a round that took long let the actor write much; send
        // that without stopping it, until rounds are short.
        let another = if mig.rounds == 0 {
            now.saturating_duration_since(mig.round_sent) > ROUND_TARGET
        } else {
            mig.rounds < MAX_ROUNDS && mig.round_pages > SMALL_ROUND_PAGES
        };
        if another {
            self.send_round(from, m, now);
            return;
        }
        let h = self
            .actors
            .get_mut(&actor)
            .expect("a migrating actor is hosted");
        h.actor.pause();
        let Some((_, checkpoint)) = self.checkpoint_for_move(from, m, "final checkpoint", now)
        else {
            return;
        };
        let h = self.actors.get_mut(&actor).expect("hosted");
        h.carried = h.actor.take_mailbox();
        let mailbox: Vec<WireEnvelope> =
            h.carried.iter().cloned().map(WireEnvelope::from).collect();
        let mailbox_len = mailbox.len();
        let mig = self.migrations.get_mut(m).expect("checked");
        mig.checkpoint_bytes += checkpoint.len() as u64;
        mig.state = MigrationState::Completing;
        mig.sent_mailbox = mailbox_len;
        mig.paused_at = Some(now);
        mig.deadline = now + self.cfg.step_timeout;
        self.outbox.push((
            from.clone(),
            ActorMessage::MigrationComplete {
                migration: m.clone(),
                checkpoint,
                mailbox,
            },
        ));
    }

    /// Source: a checkpoint of a migrating actor, kept here too. If it
    /// cannot be taken the migration fails (the target is told) and the
    /// actor runs on here.
    fn checkpoint_for_move(
        &mut self,
        to: &ExecutorId,
        m: &MigrationId,
        what: &str,
        now: Instant,
    ) -> Option<(ActorCheckpoint, Vec<u8>)> {
        let actor = self.migrations[m].actor;
        let h = self
            .actors
            .get_mut(&actor)
            .expect("a migrating actor is hosted");
        match h.actor.checkpoint(&self.key) {
            Ok(c) => {
                let encoded = c.encode();
                if let Err(e) = self.store.store_own(
                    &c,
                    encoded.clone(),
                    h.actor.hashes(),
                    Durability::Unsynced,
                ) {
                    tracing::warn!(actor = %actor, error = %e, "cannot keep a {what} here");
                }
                Some((c, encoded))
            }
            Err(e) => {
                h.actor.resume();
                h.migrating = None;
                self.outbox.push((
                    to.clone(),
                    ActorMessage::MigrationAbort {
                        migration: m.clone(),
                    },
                ));
                self.finish(m, MigrationState::Failed(format!("{what}: {e}")), now);
                None
            }
        }
    }

    /// Source: one pre-copy round, the actor running.
    fn send_round(&mut self, to: &ExecutorId, m: &MigrationId, now: Instant) {
        let Some((c, checkpoint)) = self.checkpoint_for_move(to, m, "pre-copy round", now) else {
            return;
        };
        let mig = self.migrations.get_mut(m).expect("checked");
        mig.checkpoint_bytes += checkpoint.len() as u64;
        mig.rounds += 1;
        mig.round_sent = now;
        mig.round_pages = c.state.pages.len();
        mig.deadline =
            now + self.cfg.step_timeout + Duration::from_secs(checkpoint.len() as u64 / MIN_RATE);
        self.outbox.push((
            to.clone(),
            ActorMessage::MigrationRound {
                migration: m.clone(),
                checkpoint,
            },
        ));
    }

    /// Target: a pre-copy round goes into the paused copy.
    fn handle_migration_round(
        &mut self,
        from: &ExecutorId,
        m: &MigrationId,
        checkpoint: &[u8],
        now: Instant,
    ) {
        let reply = if !self.is_step(m, from, Side::Target, &MigrationState::Accepted) {
            ActorMessage::MigrationReject {
                migration: m.clone(),
                reason: RejectReason::Abandoned,
            }
        } else {
            match self.apply_incoming(m, checkpoint) {
                Ok(()) => {
                    let mig = self.migrations.get_mut(m).expect("checked");
                    mig.checkpoint_bytes += checkpoint.len() as u64;
                    mig.deadline = now + self.cfg.step_timeout;
                    ActorMessage::MigrationAccept {
                        migration: m.clone(),
                    }
                }
                Err(reason) => {
                    self.abandon_incoming(from, m, now);
                    ActorMessage::MigrationReject {
                        migration: m.clone(),
                        reason,
                    }
                }
            }
        };
        self.outbox.push((from.clone(), reply));
    }

    /// Target: verifies and stores an incremental checkpoint of an incoming
    /// actor and writes its pages into the paused copy.
    fn apply_incoming(&mut self, m: &MigrationId, checkpoint: &[u8]) -> Result<(), RejectReason> {
        let actor = self.migrations[m].actor;
        let bad =
            |e: crate::checkpoint::CheckpointError| RejectReason::BadCheckpoint(e.to_string());
        let c = ActorCheckpoint::decode(checkpoint, self.cfg.max_state_bytes).map_err(bad)?;
        if c.actor_id != actor {
            return Err(RejectReason::BadCheckpoint(
                "another actor's checkpoint".into(),
            ));
        }
        let verified = self.store.verify(&c).map_err(bad)?;
        let hashes = verified.hashes().clone();
        self.store
            .commit(&c, checkpoint.to_vec(), verified, Durability::Unsynced)
            .map_err(bad)?;
        let inc = self
            .incoming
            .get_mut(&actor)
            .expect("accepted migrations have one");
        inc.actor
            .apply(&c, hashes)
            .map_err(|e| RejectReason::BadCheckpoint(e.to_string()))
    }

    /// Source: refused (before or at completion); the actor runs here again.
    fn handle_migration_reject(
        &mut self,
        from: &ExecutorId,
        m: &MigrationId,
        reason: RejectReason,
        now: Instant,
    ) {
        let ok = [MigrationState::Requested, MigrationState::Completing]
            .iter()
            .any(|s| self.is_step(m, from, Side::Source, s));
        if ok {
            self.resume_here(m);
            self.finish(m, MigrationState::Rejected(reason), now);
        }
    }

    /// Source: the move failed; the actor goes on here with every message.
    fn resume_here(&mut self, m: &MigrationId) {
        let actor = self.migrations[m].actor;
        let Some(h) = self.actors.get_mut(&actor) else {
            return;
        };
        for e in std::mem::take(&mut h.carried) {
            if let Err(err) = h.actor.deliver(e) {
                tracing::warn!(actor = %actor, error = %err, "a carried message did not go back");
            }
        }
        h.migrating = None;
        h.actor.resume();
    }

    /// Target: the final checkpoint; restore, resume, confirm.
    fn handle_migration_complete(
        &mut self,
        from: &ExecutorId,
        m: &MigrationId,
        checkpoint: &[u8],
        mailbox: Vec<WireEnvelope>,
        now: Instant,
    ) {
        if !self.is_step(m, from, Side::Target, &MigrationState::Accepted) {
            self.outbox.push((
                from.clone(),
                ActorMessage::MigrationReject {
                    migration: m.clone(),
                    reason: RejectReason::Abandoned,
                },
            ));
            return;
        }
        match self.complete_incoming(m, checkpoint, mailbox, now) {
            Ok(()) => {
                self.finish(m, MigrationState::Complete, now);
                self.outbox.push((
                    from.clone(),
                    ActorMessage::MigrationCompleted {
                        migration: m.clone(),
                    },
                ));
            }
            Err(reason) => {
                self.abandon_incoming(from, m, now);
                self.outbox.push((
                    from.clone(),
                    ActorMessage::MigrationReject {
                        migration: m.clone(),
                        reason,
                    },
                ));
            }
        }
    }

    fn complete_incoming(
        &mut self,
        m: &MigrationId,
        checkpoint: &[u8],
        mailbox: Vec<WireEnvelope>,
        now: Instant,
    ) -> Result<(), RejectReason> {
        self.apply_incoming(m, checkpoint)?;
        let actor = self.migrations[m].actor;
        let inc = self
            .incoming
            .remove(&actor)
            .expect("accepted migrations have one");
        let mut a = inc.actor;
        a.resume();
        for e in mailbox {
            a.deliver(e.into())
                .map_err(|e| RejectReason::BadCheckpoint(format!("carried message: {e}")))?;
        }
        self.host(actor, a, inc.wasm, inc.config, inc.epoch.next());
        let h = self.actors.get_mut(&actor).expect("just hosted");
        // With failover, checkpoint (durably) and replicate at once: the
        // peers' replicas name the old owner until then, and would not be
        // restored if this executor died now.
        h.last_checkpoint = self.failover.is_none().then_some(now);
        self.cooldown.moved(actor, now);
        if let Some(mig) = self.migrations.get_mut(m) {
            mig.checkpoint_bytes += checkpoint.len() as u64;
        }
        Ok(())
    }

    /// Target: gives an accepted migration from `from` up for good (one not
    /// seen yet is refused if it comes later).
    fn abandon_incoming(&mut self, from: &ExecutorId, m: &MigrationId, now: Instant) {
        let Some(mig) = self.migrations.get(m) else {
            self.abandoned.insert(m.clone(), now);
            return;
        };
        if mig.side != Side::Target || mig.state != MigrationState::Accepted || &mig.peer != from {
            return;
        }
        let actor = mig.actor;
        if self.incoming.get(&actor).is_some_and(|i| &i.migration == m) {
            self.incoming.remove(&actor);
        }
        self.abandoned.insert(m.clone(), now);
        self.finish(m, MigrationState::Failed("abandoned".into()), now);
    }

    /// Source: the actor runs on the target; drop it here, forward the rest.
    fn handle_migration_completed(&mut self, from: &ExecutorId, m: &MigrationId, now: Instant) {
        if !self.is_step(m, from, Side::Source, &MigrationState::Completing) {
            return;
        }
        let actor = self.migrations[m].actor;
        if let Some(h) = self.actors.remove(&actor) {
            // What went with the final checkpoint is the target's already;
            // what came since is forwarded, in order.
            let sent = self.sent_with_completion(m);
            for e in h.carried.into_iter().skip(sent) {
                self.outbox.push((
                    from.clone(),
                    ActorMessage::Deliver {
                        actor,
                        envelope: e.into(),
                    },
                ));
            }
        }
        self.moved.insert(actor, from.clone());
        self.cooldown.moved(actor, now);
        self.finish(m, MigrationState::Complete, now);
    }

    /// Target: a source in doubt asks. Give an unfinished migration up first.
    fn handle_checkpoint_query(
        &mut self,
        from: &ExecutorId,
        actor: ActorId,
        migration: Option<MigrationId>,
        now: Instant,
    ) {
        if let Some(m) = &migration {
            self.abandon_incoming(from, m, now);
        }
        let running = self.actors.contains_key(&actor);
        let sequence = self.store.latest(actor).map(|l| l.sequence);
        self.outbox.push((
            from.clone(),
            ActorMessage::CheckpointResponse {
                actor,
                migration,
                running,
                sequence,
            },
        ));
    }

    /// Source: the answer to a doubt.
    fn handle_doubt_resolved(
        &mut self,
        from: &ExecutorId,
        m: &MigrationId,
        running: bool,
        now: Instant,
    ) {
        if !self.is_step(m, from, Side::Source, &MigrationState::Completing) {
            return;
        }
        if running {
            self.handle_migration_completed(from, m, now);
        } else {
            self.resume_here(m);
            self.finish(
                m,
                MigrationState::Failed("timed out; the target never ran it".into()),
                now,
            );
        }
    }

    /// Applies step timeouts: a source still waiting for an accept gives up
    /// (the actor never stopped); one waiting for the target's confirmation
    /// asks again; a target waiting for the final checkpoint gives up.
    pub fn tick(&mut self, now: Instant) {
        self.failover_tick(now);
        let due: Vec<MigrationId> = self
            .migrations
            .iter()
            .filter(|(_, m)| !m.state.is_final() && now >= m.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let m = &self.migrations[&id];
            let (side, state, peer, actor) = (m.side, m.state.clone(), m.peer.clone(), m.actor);
            match (side, state) {
                (Side::Source, MigrationState::Requested) => {
                    if let Some(h) = self.actors.get_mut(&actor) {
                        h.migrating = None;
                    }
                    self.outbox.push((
                        peer,
                        ActorMessage::MigrationAbort {
                            migration: id.clone(),
                        },
                    ));
                    self.finish(
                        &id,
                        MigrationState::Failed("timed out waiting for an accept".into()),
                        now,
                    );
                }
                (Side::Source, MigrationState::Completing) => {
                    if self.claim_in_doubt(&id, now) {
                        // The target is dead: a vote decides, not its answer.
                        self.migrations.get_mut(&id).expect("listed").deadline =
                            now + self.cfg.step_timeout;
                        continue;
                    }
                    self.outbox.push((
                        peer,
                        ActorMessage::CheckpointQuery {
                            actor,
                            migration: Some(id.clone()),
                        },
                    ));
                    self.migrations.get_mut(&id).expect("listed").deadline =
                        now + self.cfg.step_timeout;
                }
                (Side::Target, _) => self.abandon_incoming(&peer, &id, now),
                _ => {}
            }
        }
        metrics::gauge!("migrations_active", "workload" => "actor").set(self.active() as f64);
        metrics::gauge!("migrations_pending", "workload" => "actor").set(
            self.migrations
                .values()
                .filter(|m| m.state == MigrationState::Requested)
                .count() as f64,
        );
    }

    /// The seed's `cleanup_migrations`: forgets migrations that ended more
    /// than `max_age` ago.
    pub fn cleanup_migrations(&mut self, max_age: Duration, now: Instant) {
        self.migrations.retain(|_, m| {
            m.ended
                .is_none_or(|t| now.saturating_duration_since(t) < max_age)
        });
        self.abandoned
            .retain(|_, t| now.saturating_duration_since(*t) < max_age);
        self.cooldown.prune(now);
    }

    /// How many carried messages went with `m`'s final checkpoint.
    fn sent_with_completion(&self, m: &MigrationId) -> usize {
        self.migrations.get(m).map_or(0, |mig| mig.sent_mailbox)
    }
}

/// A migration request's fields.
struct Request {
    migration: MigrationId,
    actor: ActorId,
    epoch: OwnerEpoch,
    reason: MigrationReason,
    settings: ActorSettings,
    module: Vec<u8>,
    checkpoint: Vec<u8>,
}

fn settings_of(c: &ActorConfig) -> ActorSettings {
    let (interval, max) = match c.mode {
        ActorMode::Stateful {
            checkpoint_interval,
            max_state_size_bytes,
        } => (
            Some(checkpoint_interval.as_millis() as u64),
            max_state_size_bytes,
        ),
        ActorMode::Ephemeral => (None, c.max_memory()),
    };
    ActorSettings {
        checkpoint_interval_ms: interval,
        max_state_size_bytes: max,
        fuel_per_message: c.fuel_per_message,
        mailbox_capacity: c.mailbox_capacity.min(u32::MAX as usize) as u32,
        tenant: c.tenant.clone(),
    }
}

fn new_migration_id() -> MigrationId {
    MigrationId::new(format!("am-{}", uuid::Uuid::new_v4().simple())).expect("a valid name")
}
