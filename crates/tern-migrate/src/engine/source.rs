//! The source side: request, pre-copy rounds, switchover, commit.

use super::convergence::{decide, Decision, Model, RoundFigures, Standing};
use super::eta::EtaPlan;
use super::pages::{drain, PageSender};
use super::replies::reply;
use super::{
    ms_since, CommitStep, MigrateError, MigrationPhase, Mode, Outcome, Policy, Progress, Report,
    RoundStats, SourceCommitHook, SourceLink, SwitchoverTimes, PAGE,
};
use crate::guest::{DirtyBitmap, SourceGuest};
use crate::protocol::*;
use ed25519_dalek::SigningKey;
use std::time::{Duration, Instant};
use tern_transport::{Receiver, Sender};
use tokio::sync::watch;

/// Migrates `guest` away. On [`Outcome::Moved`] the guest runs on the
/// destination and the local copy is discarded; on [`Outcome::Stayed`] the
/// local guest runs again, unchanged; on [`Outcome::InDoubt`] it is paused
/// for the caller to settle.
pub async fn migrate<G: SourceGuest>(
    guest: &mut G,
    link: SourceLink,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
) -> Outcome {
    let progress = watch::channel(Progress::default()).0;
    migrate_observed(guest, link, key, policy, migration, progress, &mut |_| {
        Ok(())
    })
    .await
}

/// [`migrate`], publishing a [`Progress`] on `progress` as it goes (the
/// agent's progress bar and server-sent events read it) and calling
/// `before_commit` at each [`CommitStep`].
pub async fn migrate_observed<G: SourceGuest>(
    guest: &mut G,
    link: SourceLink,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
    progress: watch::Sender<Progress>,
    before_commit: SourceCommitHook<'_>,
) -> Outcome {
    let SourceLink { data, mut replies } = link;
    if policy.bandwidth_bytes_per_sec > 0 {
        data.set_rate(policy.bandwidth_bytes_per_sec);
    }
    let memory_bytes = guest.shape().memory_bytes;
    progress.send_modify(|p| {
        p.memory_bytes = memory_bytes;
        p.phase = MigrationPhase::Requesting;
    });
    let t0 = Instant::now();
    let mut src = Source {
        guest,
        data: &data,
        replies: &mut replies,
        key,
        policy,
        migration,
        report: Report::new(memory_bytes),
        paused: false,
        tracking: false,
        ps: PageSender::new(
            memory_bytes / PAGE as u64,
            policy.compression,
            progress.clone(),
        ),
        before_commit,
    };
    let res = src.run().await;
    src.report.total_ms = ms_since(t0);
    src.report.encodings = (&src.ps.encoded).into();
    let outcome = src.conclude(res).await;
    progress.send_modify(|p| {
        p.phase = outcome.report().phase;
        p.pages_remaining = 0;
        p.eta_seconds = 0.0;
    });
    match &outcome {
        Outcome::Moved { fault: None, .. } => {
            let _ = data.finish().await;
        }
        Outcome::Stayed { .. } => {
            // Flush what is queued (the abort last) so the destination
            // learns now, not when its link's resume deadline passes.
            let flush = policy.reply_timeout.min(Duration::from_secs(5));
            let _ = tokio::time::timeout(flush, data.finish()).await;
        }
        _ => {}
    }
    outcome
}

/// How often a round reads the dirty log while it sends (for the dirty
/// rate the time-left estimate needs from round 1 on).
const DIRTY_LOOK: Duration = Duration::from_millis(200);

/// One outgoing migration in progress.
pub(super) struct Source<'a, G> {
    pub(super) guest: &'a mut G,
    pub(super) data: &'a Sender,
    pub(super) replies: &'a mut Receiver,
    pub(super) key: &'a SigningKey,
    pub(super) policy: &'a Policy,
    pub(super) migration: &'a str,
    pub(super) report: Report,
    /// The guest is paused (switchover began).
    paused: bool,
    /// Dirty tracking is on.
    tracking: bool,
    pub(super) ps: PageSender,
    before_commit: SourceCommitHook<'a>,
}

impl<G: SourceGuest> Source<'_, G> {
    async fn run(&mut self) -> Result<(), MigrateError> {
        self.request().await?;
        let (todo, postcopy) = self.precopy().await?;
        if postcopy {
            self.postcopy_switchover(todo).await
        } else {
            self.switchover(todo).await
        }
    }

    /// Turns the result into the outcome, putting the guest where it
    /// belongs: discarded, running again, or paused for the verdict.
    async fn conclude(&mut self, res: Result<(), MigrateError>) -> Outcome {
        let report = &mut self.report;
        let migration = self.migration;
        match res {
            Ok(()) => Outcome::Moved {
                report: report.clone(),
                fault: None,
            },
            Err(error @ MigrateError::CommitUnconfirmed(_)) => {
                tracing::error!(migration, %error, "commit in doubt; the source guest stays paused until settled");
                report.phase = MigrationPhase::CommitInDoubt;
                self.untrack();
                Outcome::InDoubt {
                    report: self.report.clone(),
                    error,
                }
            }
            Err(error @ MigrateError::PostcopyFailed(_)) => {
                tracing::error!(migration, %error, "ownership moved at commit; the source copy is discarded");
                report.phase = MigrationPhase::Committed;
                self.guest.discard();
                Outcome::Moved {
                    report: report.clone(),
                    fault: Some(error),
                }
            }
            Err(error) => {
                tracing::warn!(migration, %error, "migration failed; the source keeps the guest");
                report.phase = MigrationPhase::RolledBack;
                self.roll_back(&error).await;
                Outcome::Stayed {
                    report: self.report.clone(),
                    error,
                }
            }
        }
    }

    /// Tells the destination (the caller flushes it), then resumes the
    /// guest as it was.
    async fn roll_back(&mut self, error: &MigrateError) {
        let abort = SourceMsg::Abort {
            reason: error.to_string(),
        };
        let _ = self.data.send(msg_frame(&abort)).await;
        self.untrack();
        if self.paused {
            if let Err(e) = self.guest.resume() {
                tracing::error!(migration = self.migration, error = %e, "resuming the guest after a rollback");
            }
        }
    }

    /// Ends throttling and dirty tracking (the guest stays as it is).
    fn untrack(&mut self) {
        if self.report.throttle_percent > 0 {
            let _ = self.guest.throttle(0);
        }
        if self.tracking {
            let _ = self.guest.stop_dirty_tracking();
        }
    }

    /// Asks the destination to take the guest.
    async fn request(&mut self) -> Result<(), MigrateError> {
        self.report.phase = MigrationPhase::Requesting;
        let request = SourceMsg::Request(MigrationRequest {
            migration: self.migration.to_string(),
            shape: self.guest.shape(),
            reason: self.policy.reason.clone(),
            cpu_features: host_cpu_features(),
        });
        self.ps.send(self.data, msg_frame(&request)).await?;
        match reply(
            self.replies,
            self.policy.reply_timeout,
            "answer to the request",
        )
        .await?
        {
            DestMsg::Accept => Ok(()),
            DestMsg::Reject { reason } => Err(MigrateError::Rejected(reason)),
            other => Err(MigrateError::Protocol(format!(
                "expected accept, got {other:?}"
            ))),
        }
    }

    /// Runs pre-copy rounds; returns the pages still to send and whether to
    /// go on in post-copy.
    async fn precopy(&mut self) -> Result<(Vec<u64>, bool), MigrateError> {
        let n_pages = self.report.memory_bytes / PAGE as u64;
        // Switchover folds the page digests into a root on both sides while
        // the guest is paused: time it once here so predictions include it.
        let root_t = Instant::now();
        let _ = self.ps.root();
        let root_secs = root_t.elapsed().as_secs_f64();
        let mut model = Model::new(root_secs);
        self.guest.start_dirty_tracking()?;
        self.tracking = true;
        let mut todo = self.first_round_pages(n_pages)?;
        // The time-left estimate's view of what follows each round.
        let mut plan = EtaPlan {
            rounds_after: 0,
            cap: todo.len() as u64,
            budget_secs: self.policy.max_downtime.as_secs_f64() / 2.0,
            fixed_secs: 2.0 * root_secs,
        };
        if self.policy.cancel.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let rounds_allowed = match self.policy.mode {
            Mode::Precopy => self.policy.max_rounds.max(1),
            Mode::Postcopy => return Ok((todo, true)),
            Mode::Hybrid => self.policy.hybrid_rounds.max(1),
        };
        let started = Instant::now();
        for round in 1..=rounds_allowed {
            if self.policy.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            if let Some(d) = self.policy.deadline.filter(|&d| started.elapsed() > d) {
                return Err(MigrateError::NotConverged(d));
            }
            plan.rounds_after = rounds_allowed - round;
            let (figures, next) = self.round(round, &todo, &plan).await?;
            let sent = todo.len() as u64;
            todo = next;
            let prediction = model.predict(&figures);
            self.record_round(round, &figures, prediction.throughput, prediction.downtime);
            let standing = Standing {
                round,
                sent,
                dirtied: figures.dirtied,
                downtime: prediction.downtime,
                transfer: prediction.transfer,
                last: round == rounds_allowed,
                rate: match self.report.bandwidth_raised_to {
                    0 => self.policy.bandwidth_bytes_per_sec,
                    raised => raised,
                },
                throttle: self.report.throttle_percent,
            };
            match decide(&standing, self.policy) {
                Decision::SwitchOver => return Ok((todo, false)),
                Decision::Continue => {}
                Decision::RaiseRate(rate) => {
                    tracing::info!(
                        migration = self.migration,
                        round,
                        rate,
                        "pre-copy is not converging; raising bandwidth"
                    );
                    self.data.set_rate(rate);
                    self.report.bandwidth_raised_to = rate;
                }
                Decision::Throttle(t) => {
                    tracing::info!(
                        migration = self.migration,
                        round,
                        throttle = t,
                        "pre-copy is not converging; throttling the guest"
                    );
                    self.guest.throttle(t)?;
                    self.report.throttle_percent = t;
                }
            }
        }
        // Not converged: hybrid moves on to post-copy; pre-copy stops the
        // guest anyway (its downtime exceeds the budget).
        Ok((todo, self.policy.mode == Mode::Hybrid))
    }

    /// What the first round sends (or, in post-copy, what the destination
    /// lacks): the pages the guest ever wrote where it can say (asked after
    /// tracking started, so later writes are in the dirty log), else every
    /// page. The others are zeros on both sides; a post-copy destination
    /// zero-fills them when its guest touches one.
    fn first_round_pages(&mut self, n_pages: u64) -> Result<Vec<u64>, MigrateError> {
        let Some(populated) = self.guest.populated()? else {
            return Ok((0..n_pages).collect());
        };
        let todo: Vec<u64> = populated.pages().filter(|&p| p < n_pages).collect();
        tracing::debug!(
            migration = self.migration,
            populated = todo.len(),
            skipped = n_pages - todo.len() as u64,
            "first round: pages never written are zeros on both sides"
        );
        self.report.pages_never_written = n_pages - todo.len() as u64;
        Ok(todo)
    }

    /// Sends one round; returns its figures and the pages dirtied meanwhile.
    async fn round(
        &mut self,
        round: u32,
        todo: &[u64],
        plan: &EtaPlan,
    ) -> Result<(RoundFigures, Vec<u64>), MigrateError> {
        let n_pages = self.report.memory_bytes / PAGE as u64;
        self.report.phase = MigrationPhase::Precopy;
        // Round 1 sends each page for the first time: no delta bases yet.
        self.ps.encoder.set_caching(round > 1);
        let pending = todo.len() as u64;
        self.ps.publish(|p| {
            p.phase = MigrationPhase::Precopy;
            p.round = round;
            p.pages_remaining = pending;
        });
        self.ps.start_eta(pending, plan);
        let t = Instant::now();
        let frame_pages = self.policy.frame_pages;
        let mut wire = 0;
        // The dirty log read during the round (for the dirty rate), merged
        // into what it says at the end: the next round's pages are the same.
        let mut seen = DirtyBitmap::with_pages(n_pages);
        let mut looked = Instant::now();
        // A cancel is looked at every 16 frames (16 MiB at the default).
        for part in todo.chunks(frame_pages.max(1) * 16) {
            if self.policy.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            wire += self
                .ps
                .send_pages(self.guest, self.data, part, frame_pages)
                .await?;
            if looked.elapsed() >= DIRTY_LOOK {
                seen.merge(&self.guest.take_dirty()?);
                if let Some(e) = &mut self.ps.eta {
                    e.dirtied(seen.count());
                }
                looked = Instant::now();
            }
        }
        let end = SourceMsg::RoundEnd {
            round,
            pages: pending,
        };
        self.ps.send(self.data, msg_frame(&end)).await?;
        drain(self.data, self.policy.reply_timeout, &self.policy.cancel).await?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let scan_t = Instant::now();
        let mut dirty = self.guest.take_dirty()?;
        let scan_secs = scan_t.elapsed().as_secs_f64();
        dirty.merge(&seen);
        // The destination refreshes at `RoundEnd` too: while the guest runs.
        self.ps.digests.refresh();
        let figures = RoundFigures {
            secs,
            wire,
            sent: pending,
            dirtied: dirty.count(),
            scan_secs,
            min_rtt: self.data.metrics().min_rtt.as_secs_f64(),
        };
        Ok((figures, dirty.pages().filter(|&p| p < n_pages).collect()))
    }

    fn record_round(&mut self, round: u32, f: &RoundFigures, throughput: f64, predicted: f64) {
        self.report.rounds.push(RoundStats {
            round,
            pages: f.sent,
            wire_bytes: f.wire,
            seconds: f.secs,
            dirtied: f.dirtied,
            predicted_downtime_ms: predicted * 1e3,
        });
        let left = f.dirtied;
        self.ps.publish(|p| {
            p.pages_remaining = left;
            p.dirty_pages_per_sec = f.dirtied as f64 / f.secs;
            p.throughput_bytes_per_sec = throughput;
            p.predicted_downtime_ms = predicted * 1e3;
        });
    }

    /// Switchover's first step, for both modes: stops the guest and returns
    /// when it stopped and every page the destination does not hold as it
    /// is now (`todo` left over from the last round plus what was dirtied
    /// since).
    pub(super) fn pause(
        &mut self,
        mut todo: Vec<u64>,
    ) -> Result<(Instant, Vec<u64>), MigrateError> {
        let n_pages = self.report.memory_bytes / PAGE as u64;
        self.report.phase = MigrationPhase::Switchover;
        self.ps.publish(|p| p.phase = MigrationPhase::Switchover);
        let t = Instant::now();
        (self.before_commit)(CommitStep::Switchover).map_err(MigrateError::CommitRecord)?;
        self.report.switchover.commit_record_ms = ms_since(t);
        let pause_at = Instant::now();
        self.guest.pause()?;
        self.paused = true;
        let mut left = self.guest.take_dirty()?;
        for &p in &todo {
            left.insert(p);
        }
        // Into `todo`'s own memory: a new list of a 1 GiB guest's pages
        // (post-copy) is 2 MiB touched for the first time while paused.
        todo.clear();
        todo.extend(left.pages().filter(|&p| p < n_pages));
        self.report.switchover.pause_ms = ms_since(pause_at);
        Ok((pause_at, todo))
    }

    /// Pre-copy switchover: stop the guest, send the rest, commit.
    async fn switchover(&mut self, todo: Vec<u64>) -> Result<(), MigrateError> {
        let (pause_at, last) = self.pause(todo)?;
        let frame_pages = self.policy.frame_pages;
        let t = Instant::now();
        self.ps
            .send_pages(self.guest, self.data, &last, frame_pages)
            .await?;
        self.report.switchover.last_pages_ms = ms_since(t);
        let t = Instant::now();
        let state = self.guest.device_state()?;
        self.report.switchover.device_state_ms = ms_since(t);
        self.ps
            .send(self.data, frame(KIND_DEVICE_STATE, &state))
            .await?;
        // The hash of every page as last sent, kept up to date while
        // sending: the root is all the destination needs (it hashes what it
        // holds).
        let manifest = Manifest {
            migration: self.migration.to_string(),
            frames: self.ps.frames,
            memory_bytes: self.report.memory_bytes,
            pages_root: self.ps.root(),
            device_state: blake3::hash(&state).to_hex().to_string(),
            postcopy_pages: 0,
        };
        self.send_manifest(manifest).await?;
        self.report.pages_sent = self.ps.pages;
        self.report.wire_bytes = self.ps.wire;
        self.report.switchover.send_ms = ms_since(pause_at) - self.report.switchover.pause_ms;
        self.commit_exchange().await?;
        self.report.downtime_ms = ms_since(pause_at);
        self.owned_elsewhere();
        self.report.phase = MigrationPhase::Committed;
        Ok(())
    }

    /// Signs and sends a switchover manifest.
    pub(super) async fn send_manifest(&mut self, manifest: Manifest) -> Result<(), MigrateError> {
        let signed = SourceMsg::Manifest(SignedManifest::sign(manifest, self.key));
        self.ps.send(self.data, msg_frame(&signed)).await
    }

    /// The destination owns the guest: the local copy goes.
    pub(super) fn owned_elsewhere(&mut self) {
        self.tracking = false;
        self.paused = false;
        self.guest.discard();
    }

    /// Waits for `Ready`, journals and sends `Commit` (the one point where
    /// ownership moves), then waits for `Running`. Failing before `Commit`
    /// left rolls back; after it, the source must not resume
    /// (`CommitUnconfirmed`).
    pub(super) async fn commit_exchange(&mut self) -> Result<(), MigrateError> {
        let timeout = self.policy.reply_timeout;
        let times: &mut SwitchoverTimes = &mut self.report.switchover;
        let t = Instant::now();
        match reply(self.replies, timeout, "ready").await? {
            DestMsg::Ready => {}
            DestMsg::Failed { reason } => return Err(MigrateError::DestinationFailed(reason)),
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected ready, got {other:?}"
                )))
            }
        }
        times.ready_ms = ms_since(t);
        self.ps.publish(|p| p.destination_ready = true);
        let t = Instant::now();
        (self.before_commit)(CommitStep::Commit).map_err(MigrateError::CommitRecord)?;
        let unconfirmed = |e| MigrateError::CommitUnconfirmed(Box::new(e));
        // A failed send queued nothing: `Commit` never left, so this rolls back.
        self.data.send(msg_frame(&SourceMsg::Commit)).await?;
        match reply(self.replies, timeout, "running").await {
            Ok(DestMsg::Running) => {
                times.running_ms = ms_since(t);
                Ok(())
            }
            Ok(other) => Err(unconfirmed(MigrateError::Protocol(format!(
                "expected running, got {other:?}"
            )))),
            Err(e) => Err(unconfirmed(e)),
        }
    }
}
