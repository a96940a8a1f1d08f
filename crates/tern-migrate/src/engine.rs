//! The pre-copy engine: one state machine per side.
//!
//! Source: `Idle → Requesting → Precopy(round) → Switchover → Committed`, or
//! `RolledBack` from any phase before commit (the guest is resumed where it
//! was; it never stops being the one running copy). Destination: `Idle →
//! Receiving → Ready → Running`, or `Discarded`.
//!
//! Round 1 sends every page; each later round sends the pages written
//! meanwhile. After each round the engine predicts the downtime of stopping
//! now (dirty pages × bytes per page on the wire ÷ measured throughput,
//! scaled by how far earlier rounds overran their own predictions, plus the
//! fixed cost of a switchover: final scan, page roots, two round trips) and
//! switches over when it fits half the budget, or the whole budget
//! once rounds stop shrinking, or after the last allowed round. The report's
//! `switchover` says where the downtime went, step by step.
//! At switchover the source pauses, sends the last dirty pages, the device
//! state and a signed manifest holding the BLAKE3 root over every page's
//! hash (kept up to date as pages are sent, so switchover hashes only the
//! last pages). The destination hashes the RAM it holds, verifies all of
//! it, loads the state and answers `Ready`; only then does the source send
//! `Commit`, and only after `Running` does it discard its copy.

use crate::guest::{DestinationGuest, GuestShape, SourceGuest};
use crate::protocol::*;
use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Serialize;
use std::time::{Duration, Instant};
use tern_pagecodec::{Decoder, Encoder, EncoderConfig};
use tern_transport::{Receiver, Sender};
use tokio::sync::watch;

const PAGE: usize = tern_guest::PAGE_SIZE as usize;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination refused the request.
    #[error("the destination rejected the migration: {0}")]
    Rejected(String),
    /// The destination could not verify or load what it received.
    #[error("the destination failed: {0}")]
    DestinationFailed(String),
    /// The source aborted.
    #[error("the source aborted: {0}")]
    Aborted(String),
    /// A guest operation failed.
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// The link failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Data did not verify.
    #[error("verification failed: {0}")]
    Verification(String),
    /// `Commit` was sent but the destination never confirmed it runs the
    /// guest: whether ownership moved is in doubt. The source guest is left
    /// paused and whole; the caller must settle with the destination (did
    /// it journal the commit?) and then resume or discard it.
    #[error("commit sent, but the destination did not confirm it runs the guest: {0}")]
    CommitUnconfirmed(String),
    /// Pre-copy did not reach switchover before the policy's deadline.
    #[error("did not converge within the deadline of {0:?}")]
    NotConverged(Duration),
    /// Post-copy failed after commit: the guest runs on the destination but
    /// did not receive all its pages (the source copy is discarded).
    #[error("post-copy failed after commit: {0}")]
    PostcopyFailed(String),
}

fn tx_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Transport(e.to_string())
}

/// Where the source is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum SourcePhase {
    /// Not started.
    Idle,
    /// Waiting for Accept.
    Requesting,
    /// Sending round `round`.
    Precopy {
        /// 1 = all pages.
        round: u32,
    },
    /// Paused, sending the rest.
    Switchover,
    /// The destination runs the guest; the source copy is gone.
    Committed,
    /// `Commit` went out unconfirmed: the paused source waits for the
    /// destination's verdict before it resumes or discards the guest.
    CommitInDoubt,
    /// The source runs the guest again; the destination discarded its copy.
    RolledBack {
        /// Why.
        reason: String,
    },
}

/// How pages move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Copy while the guest runs, stop it for the last dirty pages.
    Precopy,
    /// Start the guest on the destination at once; pages follow on demand
    /// and in the background.
    Postcopy,
    /// Pre-copy rounds while they converge (up to `hybrid_rounds`), then post-copy.
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown mode `{other}` (precopy, postcopy, hybrid)"
            )),
        }
    }
}

/// How the source runs a migration.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Pre-copy, post-copy or hybrid.
    pub mode: Mode,
    /// Hybrid: pre-copy rounds before switching to post-copy.
    pub hybrid_rounds: u32,
    /// Throttle the guest when pre-copy rounds stop shrinking (auto-converge).
    pub auto_converge: bool,
    /// Give up and roll back if switchover has not begun by then.
    pub deadline: Option<Duration>,
    /// The longest the guest may be stopped.
    pub max_downtime: Duration,
    /// Rounds before switching over regardless.
    pub max_rounds: u32,
    /// Pages per codec frame.
    pub frame_pages: usize,
    /// How long to wait for each reply.
    pub reply_timeout: Duration,
    /// Cap on the data session's rate in bytes/s (0: none).
    pub bandwidth_bytes_per_sec: u64,
    /// When pre-copy stops converging under a cap, raise the cap (×1.5 per
    /// round) up to this before throttling the guest (0: never raise).
    pub max_bandwidth_bytes_per_sec: u64,
    /// Why the migration is asked for (sent to the destination, logged there).
    pub reason: String,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            hybrid_rounds: 2,
            auto_converge: true,
            deadline: None,
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            frame_pages: 1024,
            reply_timeout: Duration::from_secs(30),
            bandwidth_bytes_per_sec: 0,
            max_bandwidth_bytes_per_sec: 0,
            reason: "operator".into(),
        }
    }
}

/// A live view of a migration, published after every frame and round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Progress {
    /// `requesting`, `precopy`, `switchover`, `committed`, `rolled_back`.
    pub phase: String,
    /// Pre-copy round (0 before the first).
    pub round: u32,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Pages still to send in this round plus those dirtied since it began.
    pub pages_remaining: u64,
    /// Encoded page bytes on the wire so far.
    pub wire_bytes: u64,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_pages_per_sec: f64,
    /// Best measured link throughput, bytes/s.
    pub throughput_bytes_per_sec: f64,
    /// Downtime of switching over now, from the dirty set and throughput.
    pub predicted_downtime_ms: f64,
    /// Time left, from what remains, the dirty rate and the throughput.
    pub eta_seconds: f64,
    /// Guest RAM.
    pub memory_bytes: u64,
}

impl Progress {
    fn phase_name(p: &SourcePhase) -> &'static str {
        match p {
            SourcePhase::Idle => "idle",
            SourcePhase::Requesting => "requesting",
            SourcePhase::Precopy { .. } => "precopy",
            SourcePhase::Switchover => "switchover",
            SourcePhase::Committed => "committed",
            SourcePhase::CommitInDoubt => "commit_in_doubt",
            SourcePhase::RolledBack { .. } => "rolled_back",
        }
    }
}

/// One round's figures.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct RoundStats {
    /// Round number.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes on the wire (encoded).
    pub wire_bytes: u64,
    /// How long it took.
    pub seconds: f64,
    /// Pages written during it (sent next round).
    pub dirtied: u64,
    /// Predicted downtime of switching over after it.
    pub predicted_downtime_ms: f64,
}

/// What a finished (or rolled back) migration did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Report {
    /// Final phase.
    pub phase: SourcePhase,
    /// Rounds.
    pub rounds: Vec<RoundStats>,
    /// Pages sent in all (including switchover).
    pub pages_sent: u64,
    /// Encoded page bytes on the wire.
    pub wire_bytes: u64,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// Pause on the source → running on the destination (measured).
    pub downtime_ms: f64,
    /// Whole migration.
    pub total_ms: f64,
    /// Whether the guest ran on the destination before all pages arrived.
    #[serde(default)]
    pub postcopy: bool,
    /// Post-copy: pages the destination asked for because the guest touched them.
    #[serde(default)]
    pub faults_served: u64,
    /// Post-copy: guest started on the destination → last page acknowledged.
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Auto-converge: the most the guest was throttled, percent.
    #[serde(default)]
    pub throttle_percent: u8,
    /// The bandwidth cap was raised to this (bytes/s; 0: never raised).
    #[serde(default)]
    pub bandwidth_raised_to: u64,
    /// Where the downtime went, step by step.
    #[serde(default)]
    pub switchover: SwitchoverTimes,
}

/// The steps of a switchover, in ms, in the order they happen: they add up
/// to the downtime, so a budget overrun says which step to blame.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct SwitchoverTimes {
    /// Stopping the guest and its final dirty scan.
    pub pause_ms: f64,
    /// Sending the last pages, the device state and the signed manifest.
    pub send_ms: f64,
    /// Until the destination said `Ready` (it drained the link, checked the
    /// manifest and loaded the guest).
    pub ready_ms: f64,
    /// The source's durable commit record.
    pub commit_record_ms: f64,
    /// `Commit` → `Running` (the destination's record and its guest start).
    pub running_ms: f64,
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

struct PageSender {
    encoder: Encoder,
    hashes: Vec<[u8; 32]>,
    buf: Vec<u8>,
    out: Vec<u8>,
    frames: u64,
    pages: u64,
    wire: u64,
    progress: watch::Sender<Progress>,
}

impl PageSender {
    fn publish(&self, f: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(|p| {
            p.pages_sent = self.pages;
            p.wire_bytes = self.wire;
            f(p);
        });
    }

    async fn send_pages<G: SourceGuest>(
        &mut self,
        guest: &G,
        tx: &Sender,
        pages: &[u64],
        per_frame: usize,
    ) -> Result<u64, MigrateError> {
        let mut wire = 0;
        for chunk in pages.chunks(per_frame.max(1)) {
            self.buf.resize(chunk.len() * PAGE, 0);
            for (i, &p) in chunk.iter().enumerate() {
                let slot = &mut self.buf[i * PAGE..(i + 1) * PAGE];
                guest.read(p * PAGE as u64, slot)?;
                self.hashes[p as usize] = *blake3::hash(slot).as_bytes();
            }
            self.out.clear();
            let stats = self.encoder.encode_frame(
                chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| (p, &self.buf[i * PAGE..(i + 1) * PAGE])),
                &mut self.out,
            );
            wire += stats.bytes_out;
            self.send(tx, frame(KIND_PAGES, &self.out)).await?;
            self.pages += chunk.len() as u64;
            self.wire += stats.bytes_out;
            let n = chunk.len() as u64;
            self.publish(|p| {
                p.pages_remaining = p.pages_remaining.saturating_sub(n);
                if p.throughput_bytes_per_sec > 0.0 && self.pages > 0 {
                    let per_page = self.wire as f64 / self.pages as f64;
                    p.eta_seconds = p.pages_remaining as f64 * per_page
                        / p.throughput_bytes_per_sec
                        + p.predicted_downtime_ms / 1e3;
                }
            });
        }
        Ok(wire)
    }

    async fn send(&mut self, tx: &Sender, f: Bytes) -> Result<(), MigrateError> {
        tx.send(f).await.map_err(tx_err)?;
        self.frames += 1;
        Ok(())
    }
}

/// Waits until the destination has acknowledged everything sent, so a
/// round's time is the time its bytes took to arrive, not to be queued.
async fn drain(tx: &Sender, timeout: Duration) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    while tx.unacked_bytes() > 0 {
        if let Some(e) = tx.error() {
            return Err(tx_err(e));
        }
        if Instant::now() > deadline {
            return Err(MigrateError::Transport(format!(
                "the destination acknowledged nothing for {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn reply(rx: &mut Receiver, timeout: Duration) -> Result<DestMsg, MigrateError> {
    poll_reply(rx, timeout)
        .await?
        .ok_or_else(|| MigrateError::Transport(format!("no reply within {timeout:?}")))
}

/// Switchover's first step, for both modes: stops the guest and returns
/// when it stopped and every page the destination does not hold as it is
/// now (`todo` left over from the last round plus what was dirtied since).
fn pause_for_switchover<G: SourceGuest>(
    guest: &mut G,
    report: &mut Report,
    ps: &PageSender,
    paused: &mut bool,
    todo: Vec<u64>,
) -> Result<(Instant, Vec<u64>), MigrateError> {
    let n_pages = report.memory_bytes / PAGE as u64;
    report.phase = SourcePhase::Switchover;
    ps.publish(|p| p.phase = "switchover".into());
    let pause_at = Instant::now();
    guest.pause()?;
    *paused = true;
    let mut left = guest.take_dirty()?;
    for p in todo {
        left.insert(p);
    }
    report.switchover.pause_ms = ms_since(pause_at);
    Ok((pause_at, left.pages().filter(|&p| p < n_pages).collect()))
}

/// Migrates `guest` away. On success the guest runs on the destination and
/// the local copy is discarded; on any failure before commit the local guest
/// runs again, unchanged, and the error says why.
pub async fn migrate<G: SourceGuest>(
    guest: &mut G,
    link: SourceLink,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
) -> Result<Report, MigrateError> {
    let progress = watch::channel(Progress::default()).0;
    migrate_observed(
        guest,
        link,
        key,
        policy,
        migration,
        progress,
        &mut || Ok(()),
    )
    .await
}

/// Runs just before a side commits: the source calls it before sending
/// `Commit`, the destination before starting the guest. The agent writes its
/// durable commit record here; an error stops the commit (before it is sent,
/// the migration rolls back).
pub type CommitHook<'a> = &'a mut (dyn FnMut() -> Result<(), String> + Send);

/// [`migrate`], publishing a [`Progress`] on `progress` as it goes (the
/// agent's progress bar and server-sent events read it) and calling
/// `before_commit` at the commit point.
pub async fn migrate_observed<G: SourceGuest>(
    guest: &mut G,
    link: SourceLink,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
    progress: watch::Sender<Progress>,
    before_commit: CommitHook<'_>,
) -> Result<Report, MigrateError> {
    let SourceLink { data, mut replies } = link;
    if policy.bandwidth_bytes_per_sec > 0 {
        data.set_rate(policy.bandwidth_bytes_per_sec);
    }
    progress.send_modify(|p| {
        p.memory_bytes = guest.shape().memory_bytes;
        p.phase = "requesting".into();
    });
    let t0 = Instant::now();
    let mut paused = false;
    let mut tracking = false;
    let mut report = Report {
        phase: SourcePhase::Idle,
        rounds: Vec::new(),
        pages_sent: 0,
        wire_bytes: 0,
        memory_bytes: guest.shape().memory_bytes,
        downtime_ms: 0.0,
        total_ms: 0.0,
        postcopy: false,
        faults_served: 0,
        postcopy_ms: 0.0,
        throttle_percent: 0,
        bandwidth_raised_to: 0,
        switchover: Default::default(),
    };
    let res = run_source(
        guest,
        &data,
        &mut replies,
        key,
        policy,
        migration,
        &mut report,
        &mut paused,
        &mut tracking,
        progress.clone(),
        before_commit,
    )
    .await;
    report.total_ms = ms_since(t0);
    match &res {
        Err(MigrateError::CommitUnconfirmed(_)) => report.phase = SourcePhase::CommitInDoubt,
        Err(MigrateError::PostcopyFailed(_)) => report.phase = SourcePhase::Committed,
        Err(e) => {
            report.phase = SourcePhase::RolledBack {
                reason: e.to_string(),
            }
        }
        Ok(()) => {}
    }
    progress.send_modify(|p| {
        p.phase = Progress::phase_name(&report.phase).into();
        p.pages_remaining = 0;
        p.eta_seconds = 0.0;
    });
    match res {
        Ok(()) => {
            let _ = data.finish().await;
            Ok(report)
        }
        Err(e @ MigrateError::CommitUnconfirmed(_)) => {
            tracing::error!(migration, error = %e, "commit in doubt; the source guest stays paused until settled");
            if report.throttle_percent > 0 {
                let _ = guest.throttle(0);
            }
            if tracking {
                let _ = guest.stop_dirty_tracking();
            }
            Err(e)
        }
        Err(e @ MigrateError::PostcopyFailed(_)) => {
            tracing::error!(migration, error = %e, "ownership moved at commit; the source copy is discarded");
            guest.discard();
            Err(e)
        }
        Err(e) => {
            tracing::warn!(migration, error = %e, "migration failed; the source keeps the guest");
            let _ = data
                .send(msg_frame(&SourceMsg::Abort {
                    reason: e.to_string(),
                }))
                .await;
            // Flush what is queued (the abort last) so the destination
            // learns now, not when its link's resume deadline passes.
            let _ = tokio::time::timeout(
                policy.reply_timeout.min(Duration::from_secs(5)),
                data.finish(),
            )
            .await;
            if report.throttle_percent > 0 {
                let _ = guest.throttle(0);
            }
            if tracking {
                let _ = guest.stop_dirty_tracking();
            }
            if paused {
                guest.resume()?;
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_source<G: SourceGuest>(
    guest: &mut G,
    data: &Sender,
    replies: &mut Receiver,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
    report: &mut Report,
    paused: &mut bool,
    tracking: &mut bool,
    progress: watch::Sender<Progress>,
    before_commit: CommitHook<'_>,
) -> Result<(), MigrateError> {
    let shape: GuestShape = guest.shape();
    let n_pages = shape.memory_bytes / PAGE as u64;
    report.phase = SourcePhase::Requesting;
    let mut ps = PageSender {
        encoder: Encoder::new(encoder_config(n_pages)),
        hashes: vec![*blake3::hash(&[0u8; PAGE]).as_bytes(); n_pages as usize],
        buf: Vec::new(),
        out: Vec::new(),
        frames: 0,
        pages: 0,
        wire: 0,
        progress,
    };
    ps.send(
        data,
        msg_frame(&SourceMsg::Request(MigrationRequest {
            migration: migration.to_string(),
            shape: shape.clone(),
            reason: policy.reason.clone(),
            cpu_features: host_cpu_features(),
        })),
    )
    .await?;
    match reply(replies, policy.reply_timeout).await? {
        DestMsg::Accept => {}
        DestMsg::Reject { reason } => return Err(MigrateError::Rejected(reason)),
        other => {
            return Err(MigrateError::Protocol(format!(
                "expected accept, got {other:?}"
            )))
        }
    }

    // Switchover hashes the page table into a root on both sides while the
    // guest is paused: time it once here so predictions include it.
    let root_t = Instant::now();
    let _ = pages_root(&ps.hashes);
    let root_secs = root_t.elapsed().as_secs_f64();
    guest.start_dirty_tracking()?;
    *tracking = true;
    let mut todo: Vec<u64> = (0..n_pages).collect();
    let mut round = 0u32;
    let mut best_throughput = 0f64;
    let rounds_allowed = match policy.mode {
        Mode::Precopy => policy.max_rounds.max(1),
        Mode::Postcopy => 0,
        Mode::Hybrid => policy.hybrid_rounds.max(1),
    };
    let mut postcopy = rounds_allowed == 0;
    let started = Instant::now();
    let mut rate = policy.bandwidth_bytes_per_sec;
    // How long the last round's leftovers were predicted to take to send, and
    // how far the rounds since ran over their predictions (>= 1).
    let mut leftover_secs: Option<f64> = None;
    let mut overrun = 1f64;
    while round < rounds_allowed {
        if let Some(d) = policy.deadline {
            if started.elapsed() > d {
                return Err(MigrateError::NotConverged(d));
            }
        }
        round += 1;
        report.phase = SourcePhase::Precopy { round };
        let pending = todo.len() as u64;
        ps.publish(|p| {
            p.phase = "precopy".into();
            p.round = round;
            p.pages_remaining = pending;
        });
        let t = Instant::now();
        let wire = ps
            .send_pages(guest, data, &todo, policy.frame_pages)
            .await?;
        ps.send(
            data,
            msg_frame(&SourceMsg::RoundEnd {
                round,
                pages: todo.len() as u64,
            }),
        )
        .await?;
        drain(data, policy.reply_timeout).await?;
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let scan_t = Instant::now();
        let dirty = guest.take_dirty()?;
        let scan_secs = scan_t.elapsed().as_secs_f64();
        let dirtied = dirty.count();
        let bytes_per_page = if todo.is_empty() {
            PAGE as f64
        } else {
            (wire as f64 / todo.len() as f64).max(64.0)
        };
        // Small rounds are bound by latency, not bandwidth: they take the
        // best round seen (round 1 moves the most). A round that moved real
        // volume says what the link and the CPUs give now (a busy guest
        // competes for them), so it counts as measured even if slower.
        let this_round = wire.max(1) as f64 / secs;
        best_throughput = best_throughput.max(this_round);
        let throughput = if wire >= 4 << 20 {
            this_round
        } else {
            best_throughput
        };
        // Downtime is the remaining pages plus what switchover costs anyway:
        // the final dirty scan, the root on both sides, and two round trips
        // (Ready, then Commit/Running) on a link drained by then: the base
        // RTT, as the smoothed one carries this round's queueing.
        let min_rtt = data.metrics().min_rtt.as_secs_f64();
        let fixed = scan_secs + 2.0 * root_secs + 2.0 * min_rtt;
        // This round sent what the last one left over: the time it took
        // against the time predicted for it says how optimistic the model is
        // on this link and these CPUs (the final send is the same work, so it
        // is scaled alike; never scaled down, and at most fourfold).
        if let Some(pred) = leftover_secs.filter(|&p| p > 0.0) {
            overrun = overrun.max(((secs - min_rtt) / pred).clamp(1.0, 4.0));
        }
        let transfer = dirtied as f64 * bytes_per_page / throughput;
        leftover_secs = Some(transfer);
        let predicted = transfer * overrun + fixed;
        report.rounds.push(RoundStats {
            round,
            pages: todo.len() as u64,
            wire_bytes: wire,
            seconds: secs,
            dirtied,
            predicted_downtime_ms: predicted * 1e3,
        });
        todo = dirty.pages().filter(|&p| p < n_pages).collect();
        let left = todo.len() as u64;
        ps.publish(|p| {
            p.pages_remaining = left;
            p.dirty_pages_per_sec = dirtied as f64 / secs;
            p.throughput_bytes_per_sec = throughput;
            p.predicted_downtime_ms = predicted * 1e3;
            p.eta_seconds = predicted;
        });
        // Switch over once the prediction fits half the budget, or fits at
        // all and another round would not shrink what is left by much. The
        // half is room for the model's error: the last pages have gone at
        // half a round's pace (bench: 2,400 pages predicted at 19 ms took
        // 30), and one more short round costs only milliseconds of total time.
        let sent = report.rounds.last().map_or(0, |r| r.pages);
        let budget = policy.max_downtime.as_secs_f64();
        let shrinking = (dirtied as f64) < 0.8 * sent as f64;
        if predicted <= 0.5 * budget || (predicted <= budget && !shrinking) {
            break;
        }
        // Not converging: the guest dirtied most of what this round sent.
        let stalled = round > 1 && !shrinking;
        if stalled && rate > 0 && rate < policy.max_bandwidth_bytes_per_sec {
            // First remedy: a capped link may go faster, up to its ceiling.
            rate = (rate.saturating_mul(3) / 2).min(policy.max_bandwidth_bytes_per_sec);
            tracing::info!(
                migration,
                round,
                rate,
                "pre-copy is not converging; raising bandwidth"
            );
            data.set_rate(rate);
            report.bandwidth_raised_to = rate;
        } else if policy.auto_converge && stalled {
            let t = if report.throttle_percent == 0 {
                30
            } else {
                (report.throttle_percent + 20).min(90)
            };
            if t != report.throttle_percent {
                tracing::info!(
                    migration,
                    round,
                    throttle = t,
                    "pre-copy is not converging; throttling the guest"
                );
                guest.throttle(t)?;
                report.throttle_percent = t;
            }
        }
        if round >= rounds_allowed {
            // Not converged: hybrid moves on to post-copy; pre-copy stops
            // the guest anyway (its downtime exceeds the budget).
            postcopy = policy.mode == Mode::Hybrid;
        }
    }
    if postcopy {
        return postcopy_switchover(
            guest,
            data,
            replies,
            key,
            policy,
            migration,
            report,
            paused,
            &mut ps,
            todo,
            before_commit,
        )
        .await;
    }

    // Switchover: stop the guest and send the rest.
    let (pause_at, last) = pause_for_switchover(guest, report, &ps, paused, todo)?;
    ps.send_pages(guest, data, &last, policy.frame_pages)
        .await?;
    let state = guest.device_state()?;
    ps.send(data, frame(KIND_DEVICE_STATE, &state)).await?;
    // The hash of every page as last sent, kept up to date while sending:
    // the root is all the destination needs (it hashes what it holds).
    let manifest = Manifest {
        migration: migration.to_string(),
        frames: ps.frames,
        memory_bytes: shape.memory_bytes,
        pages_root: pages_root(&ps.hashes),
        device_state: blake3::hash(&state).to_hex().to_string(),
        postcopy_pages: 0,
    };
    ps.send(
        data,
        msg_frame(&SourceMsg::Manifest(SignedManifest::sign(manifest, key))),
    )
    .await?;
    report.pages_sent = ps.pages;
    report.wire_bytes = ps.wire;
    report.switchover.send_ms = ms_since(pause_at) - report.switchover.pause_ms;
    commit_exchange(data, replies, policy, before_commit, &mut report.switchover).await?;
    report.downtime_ms = ms_since(pause_at);
    *tracking = false;
    *paused = false;
    guest.discard();
    report.phase = SourcePhase::Committed;
    Ok(())
}

/// Waits for `Ready`, journals and sends `Commit` (the one point where
/// ownership moves), then waits for `Running`. Failing before `Commit` left
/// rolls back; after it, the source must not resume (`CommitUnconfirmed`).
async fn commit_exchange(
    data: &Sender,
    replies: &mut Receiver,
    policy: &Policy,
    before_commit: CommitHook<'_>,
    times: &mut SwitchoverTimes,
) -> Result<(), MigrateError> {
    let t = Instant::now();
    match reply(replies, policy.reply_timeout).await? {
        DestMsg::Ready => {}
        DestMsg::Failed { reason } => return Err(MigrateError::DestinationFailed(reason)),
        other => {
            return Err(MigrateError::Protocol(format!(
                "expected ready, got {other:?}"
            )))
        }
    }
    times.ready_ms = ms_since(t);
    let t = Instant::now();
    before_commit().map_err(|e| MigrateError::Aborted(format!("commit record: {e}")))?;
    times.commit_record_ms = ms_since(t);
    let t = Instant::now();
    data.send(msg_frame(&SourceMsg::Commit))
        .await
        .map_err(tx_err)?;
    match reply(replies, policy.reply_timeout).await {
        Ok(DestMsg::Running) => {
            times.running_ms = ms_since(t);
            Ok(())
        }
        Ok(other) => Err(MigrateError::CommitUnconfirmed(format!(
            "expected running, got {other:?}"
        ))),
        Err(e) => Err(MigrateError::CommitUnconfirmed(e.to_string())),
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Pages prefetched after each faulting page (the guest tends to read on).
const PREFETCH_PAGES: u64 = 15;
/// Background pages kept in flight during post-copy: more only delays the
/// pages the guest is waiting for behind them.
const POSTCOPY_INFLIGHT_BYTES: usize = 2 << 20;

fn parse_reply(f: &Bytes) -> Result<DestMsg, MigrateError> {
    match split(f).map_err(MigrateError::Protocol)? {
        (KIND_MSG, p) => serde_json::from_slice(&p)
            .map_err(|e| MigrateError::Protocol(format!("bad reply: {e}"))),
        (k, _) => Err(MigrateError::Protocol(format!(
            "unexpected reply frame kind {k}"
        ))),
    }
}

/// A reply if one is waiting (or arrives within `wait`).
async fn poll_reply(rx: &mut Receiver, wait: Duration) -> Result<Option<DestMsg>, MigrateError> {
    // `Receiver::recv` is cancel-safe: a timed-out wait loses nothing.
    match tokio::time::timeout(wait, rx.recv()).await {
        Err(_) => Ok(None),
        Ok(None) => Err(MigrateError::Transport("the reply channel closed".into())),
        Ok(Some(Err(e))) => Err(tx_err(e)),
        Ok(Some(Ok((seq, f)))) => {
            rx.ack(seq);
            parse_reply(&f).map(Some)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn postcopy_switchover<G: SourceGuest>(
    guest: &mut G,
    data: &Sender,
    replies: &mut Receiver,
    key: &SigningKey,
    policy: &Policy,
    migration: &str,
    report: &mut Report,
    paused: &mut bool,
    ps: &mut PageSender,
    todo: Vec<u64>,
    before_commit: CommitHook<'_>,
) -> Result<(), MigrateError> {
    let n_pages = report.memory_bytes / PAGE as u64;
    report.postcopy = true;
    let (pause_at, stale) = pause_for_switchover(guest, report, ps, paused, todo)?;
    let state = guest.device_state()?;
    ps.send(data, frame(KIND_DEVICE_STATE, &state)).await?;
    ps.send(
        data,
        msg_frame(&SourceMsg::Postcopy {
            stale: to_runs(&stale),
        }),
    )
    .await?;
    let manifest = Manifest {
        migration: migration.to_string(),
        frames: ps.frames,
        memory_bytes: report.memory_bytes,
        pages_root: String::new(),
        device_state: blake3::hash(&state).to_hex().to_string(),
        postcopy_pages: stale.len() as u64,
    };
    ps.send(
        data,
        msg_frame(&SourceMsg::Manifest(SignedManifest::sign(manifest, key))),
    )
    .await?;
    report.switchover.send_ms = ms_since(pause_at) - report.switchover.pause_ms;
    commit_exchange(data, replies, policy, before_commit, &mut report.switchover).await?;
    report.downtime_ms = ms_since(pause_at);
    let started = Instant::now();
    ps.publish(|p| {
        p.phase = "postcopy".into();
        p.pages_remaining = stale.len() as u64;
    });
    // From here the destination owns the guest: failures are reported, the
    // source never resumes.
    let failed = |e: MigrateError| MigrateError::PostcopyFailed(e.to_string());
    // Self-contained pages only: the destination places them with
    // userfaultfd and has no old copy to apply deltas to.
    ps.encoder = Encoder::new(EncoderConfig {
        xor_cache_pages: 0,
        dedup_entries: 0,
        ..EncoderConfig::default()
    });
    let mut need = vec![false; n_pages as usize];
    for &p in &stale {
        need[p as usize] = true;
    }
    // A capped link drains slowly: keep ~20 ms of it in flight at most.
    let inflight = match policy.bandwidth_bytes_per_sec {
        0 => POSTCOPY_INFLIGHT_BYTES,
        rate => ((rate / 50) as usize).clamp(64 << 10, POSTCOPY_INFLIGHT_BYTES),
    };
    let mut cursor = 0usize;
    let mut final_sent = false;
    let mut batch = Vec::with_capacity(policy.frame_pages);
    loop {
        // Requests first: the guest is waiting on them.
        let mut wait = Duration::ZERO;
        if cursor >= stale.len() && final_sent {
            wait = policy.reply_timeout;
        } else if cursor < stale.len() && data.unacked_bytes() > inflight {
            wait = Duration::from_millis(1);
        }
        if let Some(msg) = poll_reply(replies, wait).await.map_err(failed)? {
            match msg {
                DestMsg::PageRequest { page } if page < n_pages => {
                    batch.clear();
                    for p in page..(page + 1 + PREFETCH_PAGES).min(n_pages) {
                        if std::mem::take(&mut need[p as usize]) {
                            batch.push(p);
                        }
                    }
                    if !batch.is_empty() {
                        report.faults_served += 1;
                        ps.send_pages(guest, data, &batch, policy.frame_pages)
                            .await
                            .map_err(failed)?;
                    }
                }
                DestMsg::Done => break,
                DestMsg::Failed { reason } => return Err(MigrateError::PostcopyFailed(reason)),
                other => {
                    return Err(MigrateError::PostcopyFailed(format!(
                        "unexpected {other:?}"
                    )))
                }
            }
            continue;
        }
        if cursor < stale.len() {
            if data.unacked_bytes() > inflight {
                continue;
            }
            batch.clear();
            while cursor < stale.len() && batch.len() < policy.frame_pages {
                let p = stale[cursor];
                cursor += 1;
                if std::mem::take(&mut need[p as usize]) {
                    batch.push(p);
                }
            }
            if !batch.is_empty() {
                ps.send_pages(guest, data, &batch, policy.frame_pages)
                    .await
                    .map_err(failed)?;
            }
        } else if !final_sent {
            let manifest = Manifest {
                migration: migration.to_string(),
                frames: ps.frames,
                memory_bytes: report.memory_bytes,
                pages_root: pages_root(&ps.hashes),
                device_state: String::new(),
                postcopy_pages: 0,
            };
            ps.send(
                data,
                msg_frame(&SourceMsg::PostcopyDone(SignedManifest::sign(
                    manifest, key,
                ))),
            )
            .await
            .map_err(failed)?;
            final_sent = true;
        }
    }
    report.postcopy_ms = ms_since(started);
    report.pages_sent = ps.pages;
    report.wire_bytes = ps.wire;
    *paused = false;
    guest.discard();
    report.phase = SourcePhase::Committed;
    Ok(())
}

/// The encoder's caches grow with the guest, within the source process's
/// memory budget (its RAM + 5 %, with the page hashes, the transport window
/// and the process itself): XOR-delta copies of 1/256 of the pages,
/// duplicate detection for one page in 8, both capped at the codec's
/// defaults. (At the defaults a 1 GiB guest's process peaked at RAM + 14 %.)
fn encoder_config(n_pages: u64) -> EncoderConfig {
    let d = EncoderConfig::default();
    EncoderConfig {
        xor_cache_pages: d.xor_cache_pages.min((n_pages / 256) as usize),
        dedup_entries: d.dedup_entries.min((n_pages / 8) as usize),
        ..d
    }
}

/// BLAKE3 over the concatenated per-page hashes, hex: what the manifest signs.
/// Both sides compute it while the guest is paused, so it is one update over
/// the whole table (8 MiB for 1 GiB of RAM): BLAKE3 then hashes many chunks
/// at once in SIMD lanes, where 32-byte updates went one chunk at a time.
fn pages_root(hashes: &[[u8; 32]]) -> String {
    blake3::hash(hashes.as_flattened()).to_hex().to_string()
}

/// Limits the destination enforces on requests.
#[derive(Clone, Debug)]
pub struct Capacity {
    /// Largest guest RAM accepted.
    pub max_memory_bytes: u64,
    /// Most vCPUs.
    pub max_vcpus: u8,
}

/// Receives one migration. Returns the running guest and the final phase;
/// on failure nothing is kept and the source is told why.
pub async fn receive<G, F>(
    link: DestLink,
    make_guest: F,
    source_key: &VerifyingKey,
    capacity: &Capacity,
) -> Result<G, MigrateError>
where
    G: DestinationGuest,
    F: FnOnce(&MigrationRequest) -> Result<G, String>,
{
    receive_observed(link, make_guest, source_key, capacity, &mut || Ok(())).await
}

/// [`receive`], calling `on_commit` when `Commit` arrives, before the guest starts.
pub async fn receive_observed<G, F>(
    link: DestLink,
    make_guest: F,
    source_key: &VerifyingKey,
    capacity: &Capacity,
    on_commit: CommitHook<'_>,
) -> Result<G, MigrateError>
where
    G: DestinationGuest,
    F: FnOnce(&MigrationRequest) -> Result<G, String>,
{
    let DestLink { mut data, replies } = link;
    let res = run_dest(
        &mut data, &replies, make_guest, source_key, capacity, on_commit,
    )
    .await;
    if let Err(e) = &res {
        tracing::warn!(error = %e, "incoming migration discarded");
        let msg = match e {
            MigrateError::Rejected(r) => DestMsg::Reject { reason: r.clone() },
            other => DestMsg::Failed {
                reason: other.to_string(),
            },
        };
        let _ = replies.send(msg_frame(&msg)).await;
    }
    // Bounded: after a failure the source may no longer read replies.
    let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
    res
}

async fn next(data: &mut Receiver) -> Result<(u8, Bytes), MigrateError> {
    let (seq, f) = data
        .recv()
        .await
        .ok_or_else(|| MigrateError::Transport("the data channel closed".into()))?
        .map_err(tx_err)?;
    data.ack(seq);
    split(&f).map_err(MigrateError::Protocol)
}

fn parse_msg(p: &[u8]) -> Result<SourceMsg, MigrateError> {
    serde_json::from_slice(p).map_err(|e| MigrateError::Protocol(format!("bad message: {e}")))
}

async fn run_dest<G, F>(
    data: &mut Receiver,
    replies: &Sender,
    make_guest: F,
    source_key: &VerifyingKey,
    capacity: &Capacity,
    on_commit: CommitHook<'_>,
) -> Result<G, MigrateError>
where
    G: DestinationGuest,
    F: FnOnce(&MigrationRequest) -> Result<G, String>,
{
    let req = match next(data).await? {
        (KIND_MSG, p) => match parse_msg(&p)? {
            SourceMsg::Request(r) => r,
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected a request, got {other:?}"
                )))
            }
        },
        (k, _) => {
            return Err(MigrateError::Protocol(format!(
                "expected a request, got kind {k}"
            )))
        }
    };
    let s = &req.shape;
    let missing = missing_cpu_features(&req.cpu_features, &host_cpu_features());
    if !missing.is_empty() {
        return Err(MigrateError::Rejected(format!(
            "CPU incompatible: the guest would lose {}",
            missing.join(", ")
        )));
    }
    if s.memory_bytes > capacity.max_memory_bytes || s.vcpus > capacity.max_vcpus {
        return Err(MigrateError::Rejected(format!(
            "no capacity for {} bytes and {} vCPUs (limit {} bytes, {} vCPUs)",
            s.memory_bytes, s.vcpus, capacity.max_memory_bytes, capacity.max_vcpus
        )));
    }
    if s.memory_bytes == 0 || s.memory_bytes % PAGE as u64 != 0 {
        return Err(MigrateError::Rejected(format!(
            "bad memory size {}",
            s.memory_bytes
        )));
    }
    let mut guest = make_guest(&req).map_err(MigrateError::Rejected)?;
    replies
        .send(msg_frame(&DestMsg::Accept))
        .await
        .map_err(tx_err)?;

    let n_pages = s.memory_bytes / PAGE as u64;
    let mut decoder = Decoder::new(n_pages);
    // Each page's hash as it now stands here, updated as frames land so
    // switchover verifies a root, not all of RAM (fresh RAM is zero).
    let zero_hash = *blake3::hash(&[0u8; PAGE]).as_bytes();
    let mut page_hashes = vec![zero_hash; n_pages as usize];
    let mut state: Option<Bytes> = None;
    let mut stale: Option<Vec<u64>> = None;
    let mut frames = 1u64; // the request
    let signed = loop {
        let (kind, p) = next(data).await?;
        match kind {
            KIND_PAGES => {
                decoder
                    .decode_frame(&p, guest.ram_mut()?)
                    .map_err(|e| MigrateError::Verification(format!("page frame: {e}")))?;
                for (page, bytes) in decoder.last_frame_pages() {
                    page_hashes[page as usize] = *blake3::hash(bytes).as_bytes();
                }
            }
            KIND_DEVICE_STATE => state = Some(p),
            KIND_MSG => match parse_msg(&p)? {
                SourceMsg::RoundEnd { .. } => {}
                SourceMsg::Postcopy { stale: runs } => {
                    stale = Some(from_runs(&runs, n_pages).map_err(MigrateError::Protocol)?)
                }
                SourceMsg::Manifest(m) => break m,
                SourceMsg::Abort { reason } => return Err(MigrateError::Aborted(reason)),
                other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
            },
            k => return Err(MigrateError::Protocol(format!("unknown frame kind {k}"))),
        }
        frames += 1;
    };

    // Verify everything before the guest may run.
    signed
        .verify(source_key)
        .map_err(MigrateError::Verification)?;
    let m = &signed.manifest;
    if m.migration != req.migration || m.memory_bytes != s.memory_bytes {
        return Err(MigrateError::Verification(
            "manifest is for another migration".into(),
        ));
    }
    if m.frames != frames {
        return Err(MigrateError::Verification(format!(
            "manifest counts {} frames, {} arrived",
            m.frames, frames
        )));
    }
    let state = state.ok_or_else(|| MigrateError::Verification("no device state".into()))?;
    if blake3::hash(&state).to_hex().as_str() != m.device_state {
        return Err(MigrateError::Verification(
            "device state hash mismatch".into(),
        ));
    }
    let postcopy = match (&stale, m.postcopy_pages) {
        (None, 0) => {
            if pages_root(&page_hashes) != m.pages_root {
                return Err(MigrateError::Verification(
                    "guest RAM here differs from the source's (page hash root mismatch)".into(),
                ));
            }
            None
        }
        (Some(st), n) if st.len() as u64 == n => Some(guest.enter_postcopy(st)?),
        _ => {
            return Err(MigrateError::Verification(
                "the manifest and the post-copy page list disagree".into(),
            ))
        }
    };
    guest.load_device_state(&state)?;
    replies
        .send(msg_frame(&DestMsg::Ready))
        .await
        .map_err(tx_err)?;

    match next(data).await? {
        (KIND_MSG, p) => match parse_msg(&p)? {
            SourceMsg::Commit => {}
            SourceMsg::Abort { reason } => return Err(MigrateError::Aborted(reason)),
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected commit, got {other:?}"
                )))
            }
        },
        (k, _) => {
            return Err(MigrateError::Protocol(format!(
                "expected commit, got kind {k}"
            )))
        }
    }
    on_commit().map_err(|e| MigrateError::Aborted(format!("commit record: {e}")))?;
    guest.start()?;
    replies
        .send(msg_frame(&DestMsg::Running))
        .await
        .map_err(tx_err)?;
    if let (Some(mem), Some(stale)) = (postcopy, stale) {
        let served = serve_postcopy(
            data,
            replies,
            mem.into(),
            &mut decoder,
            &mut page_hashes,
            &stale,
            source_key,
            &req.migration,
            frames + 1,
        )
        .await;
        if let Err(e) = served {
            return Err(MigrateError::PostcopyFailed(e.to_string()));
        }
    }
    Ok(guest)
}

/// Post-copy on the destination, with the guest running: a thread turns
/// the guest's faults on missing pages into requests to the source; pages
/// (asked for or pushed) are placed as they arrive; the final manifest's
/// root must match every page's hash.
#[allow(clippy::too_many_arguments)]
async fn serve_postcopy(
    data: &mut Receiver,
    replies: &Sender,
    mem: std::sync::Arc<dyn crate::guest::PostcopyMemory>,
    decoder: &mut Decoder,
    page_hashes: &mut [[u8; 32]],
    stale: &[u64],
    source_key: &VerifyingKey,
    migration: &str,
    mut frames: u64,
) -> Result<(), MigrateError> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (fault_tx, mut faults) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let faulter = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match mem.next_fault(Duration::from_millis(50)) {
                        Ok(Some(p)) => {
                            if fault_tx.send(p).is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "post-copy fault reader");
                            break;
                        }
                    }
                }
            })
            .map_err(|e| MigrateError::PostcopyFailed(format!("fault thread: {e}")))?
    };
    let mut need = vec![false; page_hashes.len()];
    for &p in stale {
        need[p as usize] = true;
    }
    let mut requested = vec![false; page_hashes.len()];
    let res = async {
        loop {
            tokio::select! {
                Some(page) = faults.recv() => {
                    let i = page as usize;
                    if need[i] && !std::mem::replace(&mut requested[i], true) {
                        replies
                            .send(msg_frame(&DestMsg::PageRequest { page }))
                            .await
                            .map_err(tx_err)?;
                    }
                }
                got = next(data) => {
                    let (kind, p) = got?;
                    frames += 1;
                    match kind {
                        KIND_PAGES => {
                            decoder
                                .decode_frame_detached(&p)
                                .map_err(|e| MigrateError::Verification(format!("page frame: {e}")))?;
                            for (page, bytes) in decoder.last_frame_pages() {
                                let i = page as usize;
                                if !std::mem::take(&mut need[i]) {
                                    return Err(MigrateError::Protocol(format!(
                                        "page {page} was not stale or came twice"
                                    )));
                                }
                                mem.fill(page, bytes)?;
                                page_hashes[i] = *blake3::hash(bytes).as_bytes();
                            }
                        }
                        KIND_MSG => match parse_msg(&p)? {
                            SourceMsg::PostcopyDone(signed) => {
                                signed.verify(source_key).map_err(MigrateError::Verification)?;
                                let m = &signed.manifest;
                                if m.migration != migration || m.frames + 1 != frames {
                                    return Err(MigrateError::Verification(
                                        "final manifest does not match this migration".into(),
                                    ));
                                }
                                if need.iter().any(|&n| n) {
                                    return Err(MigrateError::Verification(
                                        "post-copy ended with pages missing".into(),
                                    ));
                                }
                                if pages_root(page_hashes) != m.pages_root {
                                    return Err(MigrateError::Verification(
                                        "guest RAM here differs from the source's (page hash root mismatch)".into(),
                                    ));
                                }
                                return Ok(());
                            }
                            other => return Err(MigrateError::Protocol(format!("unexpected {other:?} in post-copy"))),
                        },
                        k => return Err(MigrateError::Protocol(format!("unexpected frame kind {k} in post-copy"))),
                    }
                }
            }
        }
    }
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = faulter.join();
    res?;
    replies
        .send(msg_frame(&DestMsg::Done))
        .await
        .map_err(tx_err)?;
    Ok(())
}
