//! The source side of a QEMU migration: QEMU's stream out, its return
//! path in, commit when the destination QEMU holds the guest.

use super::check::Verdict;
use super::{capabilities, qmp_err, resume_source};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tern_drivers::qemu::load::workload_tick;
use tern_drivers::qemu::qmp::{MigrateInfo, Qmp, QmpError};
use tern_drivers::qemu::QemuVm;
use tern_migrate::protocol::msg_frame;
use tern_migrate::relay::{
    decode, Compress, Incoming, Packer, RelayDestMsg, RelaySourceMsg, CHUNK, KIND_RETURN,
    KIND_STREAM,
};
use tern_migrate::{
    commit_at_once, GuestError, MigrateError, MigrationPhase, Mode, Outcome, Policy, Progress,
    Report, RoundStats, SourceCommitHook,
};
use tern_transport::{Receiver, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

const PAGE: u64 = tern_migrate::guest::PAGE_SIZE;

/// What the source side needs besides the links.
pub struct SourceArgs<'a> {
    /// The running guest.
    pub vm: &'a mut QemuVm,
    /// Mode, downtime budget, bandwidth, deadline, auto-converge.
    pub policy: &'a Policy,
    /// Chunk compression.
    pub compress: Compress,
    /// Published as it goes.
    pub progress: watch::Sender<Progress>,
}

/// Migrates a QEMU guest away. [`Outcome::Moved`]: the destination runs it
/// and the local QEMU is gone; [`Outcome::Stayed`]: the local guest runs
/// again; [`Outcome::InDoubt`]: the local QEMU is kept paused to be settled.
pub async fn source(
    args: SourceArgs<'_>,
    data: Sender,
    replies: Receiver,
    before_commit: SourceCommitHook<'_>,
) -> Outcome {
    let memory_bytes = args.vm.spec().memory_mib << 20;
    if args.policy.bandwidth_bytes_per_sec > 0 {
        data.set_rate(args.policy.bandwidth_bytes_per_sec);
    }
    args.progress.send_modify(|p| {
        p.memory_bytes = memory_bytes;
        p.phase = MigrationPhase::Requesting;
    });
    let mut relay = SourceRelay {
        vm: args.vm,
        policy: args.policy,
        compress: args.compress,
        progress: args.progress,
        data: Arc::new(data),
        replies,
        before_commit,
        report: Report::new(memory_bytes),
        committed: false,
        tasks: Vec::new(),
        t0: Instant::now(),
    };
    relay.report.phase = MigrationPhase::Requesting;
    let res = relay.run().await;
    // Total time runs to the guest running on the destination (set at
    // `Running`); the guest's check after that is not part of it.
    if relay.report.total_ms == 0.0 {
        relay.report.total_ms = relay.t0.elapsed().as_secs_f64() * 1e3;
    }
    // The stream pump and return-path writer end with the migration; once
    // they are gone this is the only holder of the data session.
    for t in relay.tasks.drain(..) {
        t.abort();
        let _ = t.await;
    }
    let progress = relay.progress.clone();
    let outcome = relay.conclude(res).await;
    let phase = outcome.report().phase;
    progress.send_modify(|p| p.phase = phase);
    outcome
}

/// One outgoing QEMU migration.
struct SourceRelay<'a> {
    vm: &'a mut QemuVm,
    policy: &'a Policy,
    compress: Compress,
    progress: watch::Sender<Progress>,
    data: Arc<Sender>,
    replies: Receiver,
    before_commit: SourceCommitHook<'a>,
    report: Report,
    /// `Commit` went out.
    committed: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    t0: Instant,
}

/// The state of the carrying loop.
struct Carry {
    q: Qmp,
    /// The pump's end: the stream's length, or why it broke.
    pumped: mpsc::Receiver<Result<u64, MigrateError>>,
    /// Return-path bytes for the source QEMU.
    to_qemu: mpsc::UnboundedSender<Bytes>,
    started: Instant,
    stream_bytes: u64,
    eof: bool,
    running: bool,
    verdict: Option<Verdict>,
    /// When QEMU stopped the guest (its STOP event, wall-clock µs).
    stopped_at_us: Option<u64>,
    commit_sent_us: u64,
    postcopy_started: bool,
    /// QEMU's transferred bytes at the last tick, and when they last grew.
    transferred: u64,
    progressed_at: Instant,
}

/// How long post-copy may send nothing, once the reply channel is lost,
/// before the source stops waiting for QEMU's stream to end.
const POSTCOPY_STALL: Duration = Duration::from_secs(30);

impl SourceRelay<'_> {
    async fn run(&mut self) -> Result<(), MigrateError> {
        self.request().await?;
        tracing::info!(ms = self.ms(), "the destination QEMU accepted");
        let (q, stream) = self.open_stream().await?;
        tracing::info!(ms = self.ms(), "QEMU's stream opened");
        let mut c = self.start_pumps(q, stream);
        if self.policy.mode == Mode::Postcopy {
            // Switch as early as QEMU allows (after its first pass), or a
            // quick stream completes as pre-copy before a poll would see it.
            self.start_postcopy(&mut c).await?;
        }
        self.report.phase = MigrationPhase::Precopy;
        self.carry(&mut c).await?;
        self.report.pages_sent = c.stream_bytes / PAGE;
        self.report.wire_bytes = self.data.metrics().bytes_sent;
        tracing::info!(
            ms = self.ms(),
            stream_bytes = c.stream_bytes,
            wire_bytes = self.report.wire_bytes,
            "QEMU stream carried"
        );
        match c.verdict {
            Some(v) if v.ok => Ok(()),
            Some(v) => Err(MigrateError::Verification(format!(
                "QEMU reported success but the guest's check after switchover failed: {}",
                v.detail
            ))),
            None => unreachable!("the loop ends only once judged"),
        }
    }

    /// Milliseconds since the migration began (for the timeline in the log).
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Puts the guest where the result says it belongs.
    async fn conclude(self, res: Result<(), MigrateError>) -> Outcome {
        let SourceRelay {
            vm,
            data,
            mut report,
            committed,
            ..
        } = self;
        match res {
            Ok(()) => {
                finish(data).await;
                report.phase = MigrationPhase::Committed;
                vm.shutdown().await;
                Outcome::Moved {
                    report,
                    fault: None,
                }
            }
            Err(e @ MigrateError::Verification(_)) if committed => {
                // The destination ran the guest and its check failed: it
                // moved (corrupted); the source copy must not run again.
                tracing::error!(error = %e, "after commit; the source QEMU is discarded");
                report.phase = MigrationPhase::Corrupted;
                vm.shutdown().await;
                Outcome::Moved {
                    report,
                    fault: Some(e),
                }
            }
            Err(e) if committed => {
                // Commit went out and what followed failed: whether the
                // destination committed is in doubt. The paused source QEMU
                // is kept whole until the caller has settled it.
                tracing::error!(error = %e, "after commit; the source QEMU waits, paused, to be settled");
                report.phase = MigrationPhase::CommitInDoubt;
                Outcome::InDoubt {
                    report,
                    error: MigrateError::CommitUnconfirmed(Box::new(e)),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "QEMU migration failed; resuming the source");
                let abort = RelaySourceMsg::Abort {
                    reason: error.to_string(),
                };
                let _ = data.send(msg_frame(&abort)).await;
                finish(data).await;
                if let Err(e) = resume_source(vm).await {
                    tracing::error!(error = %e, "resuming the source QEMU");
                }
                report.phase = MigrationPhase::RolledBack;
                Outcome::Stayed { report, error }
            }
        }
    }

    /// Asks the destination to launch its QEMU and take the stream.
    async fn request(&mut self) -> Result<(), MigrateError> {
        let mode = match self.policy.mode {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        };
        let start = RelaySourceMsg::Start {
            mode: mode.into(),
            compress: self.compress,
        };
        self.data.send(msg_frame(&start)).await?;
        // The destination boots QEMU before it answers: allow for that.
        let wait = self.policy.reply_timeout + Duration::from_secs(30);
        let (seq, f) = tokio::time::timeout(wait, self.replies.recv())
            .await
            .map_err(|_| MigrateError::Timeout {
                waiting_for: "answer to the migration request",
                after: wait,
            })?
            .ok_or(MigrateError::Closed("reply"))??;
        self.replies.ack(seq);
        match decode::<RelayDestMsg>(&f)? {
            Incoming::Msg(RelayDestMsg::Accept) => Ok(()),
            Incoming::Msg(RelayDestMsg::Reject { reason }) => Err(MigrateError::Rejected(reason)),
            other => Err(MigrateError::Protocol(format!(
                "expected accept, got {other:?}"
            ))),
        }
    }

    /// Sets QEMU up and has it write its stream to a socket of ours.
    async fn open_stream(&mut self) -> Result<(Qmp, UnixStream), MigrateError> {
        let mut q = self.vm.qmp().await.map_err(qmp_err)?;
        let caps = capabilities(self.policy.mode, self.policy.auto_converge);
        q.set_capabilities(&caps).await.map_err(qmp_err)?;
        q.set_parameters(json!({
            "downtime-limit": self.policy.max_downtime.as_millis() as u64,
            // tern's link paces the stream; QEMU's own limiter (32 MiB/s by
            // default) would only get in the way.
            "max-bandwidth": 1u64 << 40,
        }))
        .await
        .map_err(qmp_err)?;
        let sock = self.vm.dir().join("migrate-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .map_err(|e| MigrateError::Guest(GuestError(format!("{}: {e}", sock.display()))))?;
        self.vm
            .give_to_qemu(&sock)
            .map_err(|e| MigrateError::Guest(GuestError(format!("{}: {e}", sock.display()))))?;
        let uri = format!("unix:{}", self.vm.path_for_qemu("migrate-out.sock"));
        q.run("migrate", json!({ "uri": uri }))
            .await
            .map_err(qmp_err)?;
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .map_err(|_| MigrateError::Timeout {
                waiting_for: "QEMU's migration stream",
                after: Duration::from_secs(10),
            })?
            .map_err(|e| MigrateError::Guest(GuestError(format!("QEMU's stream: {e}"))))?;
        let _ = std::fs::remove_file(&sock);
        Ok((q, stream))
    }

    /// The stream is pumped by its own task, never by the loop that talks
    /// QMP: at switchover QEMU holds its big lock while it writes the last
    /// of the stream, so QMP answers only once the stream is drained.
    fn start_pumps(&mut self, q: Qmp, stream: UnixStream) -> Carry {
        let (from_qemu, mut to_qemu) = stream.into_split();
        let (pumped_tx, pumped) = mpsc::channel(1);
        let data = self.data.clone();
        let compress = self.compress;
        self.tasks.push(tokio::spawn(async move {
            let end = pump(from_qemu, &data, compress).await;
            let _ = pumped_tx.send(end).await;
        }));
        let (ret_tx, mut ret_rx) = mpsc::unbounded_channel::<Bytes>();
        self.tasks.push(tokio::spawn(async move {
            while let Some(b) = ret_rx.recv().await {
                if to_qemu.write_all(&b).await.is_err() {
                    return;
                }
            }
        }));
        Carry {
            q,
            pumped,
            to_qemu: ret_tx,
            started: Instant::now(),
            stream_bytes: 0,
            eof: false,
            running: false,
            verdict: None,
            stopped_at_us: None,
            commit_sent_us: wall_us(SystemTime::now()),
            postcopy_started: false,
            transferred: 0,
            progressed_at: Instant::now(),
        }
    }

    async fn start_postcopy(&mut self, c: &mut Carry) -> Result<(), MigrateError> {
        c.q.run("migrate-start-postcopy", json!({}))
            .await
            .map_err(qmp_err)?;
        c.postcopy_started = true;
        self.report.postcopy = true;
        Ok(())
    }

    /// Carries the stream until it ended, the guest runs on the
    /// destination and its check has judged it.
    async fn carry(&mut self, c: &mut Carry) -> Result<(), MigrateError> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // Why the reply channel ended, if it did while post-copy pages were
        // still going out: the source serves them to the end regardless.
        let mut replies_lost: Option<MigrateError> = None;
        while !(c.eof && c.running && c.verdict.is_some()) {
            // Without replies, QEMU may never end its stream (it waits for
            // the destination's last word on the return path): serve while
            // pages still go out, then stop waiting.
            let stalled = c.progressed_at.elapsed() > POSTCOPY_STALL;
            if c.eof || stalled {
                if let Some(e) = replies_lost.take() {
                    return Err(e);
                }
            }
            tokio::select! {
                end = c.pumped.recv(), if !c.eof => {
                    c.stream_bytes = end.ok_or(MigrateError::Closed("stream pump"))??;
                    c.eof = true;
                    tracing::info!(ms = self.ms(), "QEMU's stream ended");
                }
                r = self.replies.recv(), if replies_lost.is_none() => {
                    let (seq, f) = match r.ok_or(MigrateError::Closed("reply")).and_then(|r| r.map_err(Into::into)) {
                        Ok(x) => x,
                        // After commit, the destination's guest needs every
                        // page still here: keep serving until QEMU's stream ends.
                        Err(e) if self.committed && c.postcopy_started && !c.eof => {
                            tracing::warn!(error = %e, "reply channel lost in post-copy; serving the remaining pages");
                            replies_lost = Some(e);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    self.replies.ack(seq);
                    self.on_reply(c, &f).await?;
                }
                _ = tick.tick() => self.on_tick(c).await?,
            }
        }
        Ok(())
    }

    async fn on_reply(&mut self, c: &mut Carry, f: &Bytes) -> Result<(), MigrateError> {
        match decode::<RelayDestMsg>(f)? {
            Incoming::Bytes(KIND_RETURN, p) => {
                let _ = c.to_qemu.send(p);
            }
            Incoming::Msg(RelayDestMsg::Loaded) if !self.committed => self.commit(c).await?,
            Incoming::Msg(RelayDestMsg::Running) if self.committed => self.on_running(c).await,
            Incoming::Msg(RelayDestMsg::Verified { ok, detail }) => {
                c.verdict = Some(Verdict { ok, detail });
            }
            Incoming::Msg(RelayDestMsg::Failed { reason }) => {
                return Err(MigrateError::DestinationFailed(reason))
            }
            other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
        }
        Ok(())
    }

    /// The destination QEMU holds the whole guest: journal and send `Commit`.
    async fn commit(&mut self, c: &mut Carry) -> Result<(), MigrateError> {
        self.report.phase = MigrationPhase::Switchover;
        tracing::info!(ms = self.ms(), "the destination QEMU holds the guest");
        let last_tick = workload_tick(&self.vm.console());
        commit_at_once(self.before_commit).map_err(MigrateError::CommitRecord)?;
        // A failed send queued nothing: `Commit` never left, so this rolls back.
        self.data
            .send(msg_frame(&RelaySourceMsg::Commit { last_tick }))
            .await?;
        c.commit_sent_us = wall_us(SystemTime::now());
        self.committed = true;
        Ok(())
    }

    /// The guest runs on the destination: the downtime ends.
    async fn on_running(&mut self, c: &mut Carry) {
        c.running = true;
        let now = wall_us(SystemTime::now());
        if c.stopped_at_us.is_none() {
            // QMP is read on ticks, so the STOP event may still sit unread
            // on its socket: any command reads it in.
            let _ = tokio::time::timeout(Duration::from_secs(1), c.q.status()).await;
            c.stopped_at_us = stop_time(&c.q);
        }
        let stop = c.stopped_at_us.unwrap_or_else(|| {
            // The guest was stopped before the destination loaded it, so
            // this undercounts, never inflates.
            tracing::warn!("no STOP event from the source QEMU: downtime counted from the commit");
            c.commit_sent_us
        });
        self.report.downtime_ms = now.saturating_sub(stop) as f64 / 1e3;
        self.report.total_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            ms = self.ms(),
            downtime_ms = self.report.downtime_ms,
            "the guest runs on the destination"
        );
        // Ownership moved: what follows is post-copy's pages (if any) and
        // the guest check.
        let phase = if self.report.postcopy {
            MigrationPhase::Postcopy
        } else {
            MigrationPhase::Switchover
        };
        self.report.phase = phase;
        self.progress.send_modify(|p| p.phase = phase);
    }

    /// Reads QEMU's progress: fails on its failure, starts post-copy when
    /// the policy says, enforces the deadline, publishes.
    async fn on_tick(&mut self, c: &mut Carry) -> Result<(), MigrateError> {
        let m = match c.q.query_migrate().await {
            Ok(m) => m,
            // After a post-copy commit the guest lives on the destination and
            // QEMU here only serves its pages. A QEMU whose stream cannot move
            // (a frozen or slow destination) answers QMP late (measured: over
            // 10 s with the destination stopped), which is no reason to stop
            // serving: the stall limit decides when waiting ends.
            Err(QmpError::Timeout(_)) if self.committed && c.postcopy_started => {
                tracing::warn!("the source QEMU answers QMP late in post-copy; serving on");
                return Ok(());
            }
            Err(e) => return Err(qmp_err(e)),
        };
        if c.stopped_at_us.is_none() {
            c.stopped_at_us = stop_time(&c.q);
        }
        if matches!(m.status.as_str(), "failed" | "cancelled") {
            return Err(MigrateError::Guest(GuestError(format!(
                "QEMU's migration {}: {}",
                m.status,
                m.error_desc.clone().unwrap_or_default()
            ))));
        }
        // Cancelled (a user, or a more urgent migration preempting this
        // one): until Commit goes out or post-copy moves the guest, the
        // source QEMU is whole, and the rollback resumes it.
        if self.policy.cancel.is_cancelled() && !self.committed && !c.postcopy_started {
            return Err(MigrateError::Cancelled);
        }
        let transferred = m.ram.as_ref().map_or(0, |r| r.transferred);
        if transferred > c.transferred {
            c.transferred = transferred;
            c.progressed_at = Instant::now();
        }
        let round = m.ram.as_ref().map_or(0, |r| r.dirty_sync_count).max(1);
        if !self.committed && !c.postcopy_started && m.status == "active" {
            let after = match self.policy.mode {
                Mode::Precopy => None,
                Mode::Postcopy => Some(1),
                Mode::Hybrid => Some(self.policy.hybrid_rounds.max(1) as u64),
            };
            if after.is_some_and(|after| round > after) {
                self.start_postcopy(c).await?;
            }
            if let Some(d) = self.policy.deadline.filter(|&d| c.started.elapsed() > d) {
                return Err(MigrateError::NotConverged(d));
            }
        }
        self.publish(&m, round, c.started);
        Ok(())
    }

    fn publish(&mut self, m: &MigrateInfo, round: u64, started: Instant) {
        let ram = m.ram.clone().unwrap_or_default();
        let wire = self.data.metrics().bytes_sent;
        let rate = ram.mbps * 1e6 / 8.0;
        let committed = self.committed;
        self.progress.send_modify(|p| {
            if !committed {
                p.phase = match m.status.as_str() {
                    "postcopy-active" | "device" | "completed" => MigrationPhase::Switchover,
                    _ => MigrationPhase::Precopy,
                };
            }
            p.round = round as u32;
            p.pages_sent = ram.transferred / PAGE;
            p.pages_remaining = ram.remaining / PAGE;
            p.wire_bytes = wire;
            p.dirty_pages_per_sec = ram.dirty_pages_rate as f64;
            p.throughput_bytes_per_sec = rate;
            p.predicted_downtime_ms = m.expected_downtime.unwrap_or(0) as f64;
            p.eta_seconds = if rate > 0.0 {
                ram.remaining as f64 / rate
            } else {
                0.0
            };
        });
        let rounds = &mut self.report.rounds;
        if let Some(r) = rounds.last_mut().filter(|r| r.round == round as u32) {
            r.wire_bytes = wire;
        } else if !committed {
            rounds.push(RoundStats {
                round: round as u32,
                pages: ram.remaining / PAGE,
                wire_bytes: wire,
                seconds: started.elapsed().as_secs_f64(),
                dirtied: 0,
                predicted_downtime_ms: m.expected_downtime.unwrap_or(0) as f64,
            });
        }
    }
}

/// Reads QEMU's stream into frames until it closes; returns its length.
async fn pump(
    mut from_qemu: tokio::net::unix::OwnedReadHalf,
    data: &Sender,
    compress: Compress,
) -> Result<u64, MigrateError> {
    // QEMU's bytes are read straight into the frame that carries them
    // (behind its kind byte): uncompressed, nothing is copied in this
    // process but by TLS. Frames split off one buffer until it is used up.
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    let mut packer = Packer::new(compress).map_err(MigrateError::Protocol)?;
    loop {
        buf.clear();
        buf.reserve(1 + CHUNK);
        buf.put_u8(KIND_STREAM);
        let n = from_qemu
            .read_buf(&mut (&mut buf).limit(CHUNK))
            .await
            .map_err(|e| MigrateError::Guest(GuestError(format!("QEMU's stream: {e}"))))?;
        if n == 0 {
            data.send(msg_frame(&RelaySourceMsg::StreamEnd)).await?;
            return Ok(total);
        }
        total += n as u64;
        let f = match compress {
            Compress::None => buf.split().freeze(),
            _ => packer
                .frame(KIND_STREAM, &buf[1..])
                .map_err(MigrateError::Protocol)?,
        };
        data.send(f).await?;
    }
}

/// Closes the data session cleanly if this is its last holder.
async fn finish(data: Arc<Sender>) {
    if let Ok(d) = Arc::try_unwrap(data) {
        let _ = tokio::time::timeout(Duration::from_secs(5), d.finish()).await;
    }
}

/// When QEMU stopped the guest (its STOP event, wall-clock µs).
fn stop_time(q: &Qmp) -> Option<u64> {
    q.events
        .iter()
        .rev()
        .find(|e| e.event == "STOP")
        .and_then(|e| e.timestamp)
        .map(|t| t.unix_micros())
}

fn wall_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
