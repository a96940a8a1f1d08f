//! The destination side of a QEMU migration: launch QEMU paused, feed it
//! the stream, say when it holds the guest, run it at `Commit`, judge it.

use super::check::{self, GuestCheck};
use super::{capabilities, console_tail, qmp_err};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_drivers::qemu::load::LoadParams;
use tern_drivers::qemu::qmp::{Qmp, QmpError};
use tern_drivers::qemu::QemuVm;
use tern_migrate::protocol::{frame, msg_frame};
use tern_migrate::relay::{
    decode, Compress, Incoming, RelayDestMsg, RelaySourceMsg, Unpacker, KIND_RETURN, KIND_STREAM,
};
use tern_migrate::{CommitHook, MigrateError, MigrationPhase, Mode, Progress};
use tern_transport::{Receiver, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// What the destination side needs besides the links.
pub struct DestArgs {
    /// The QEMU launched for this migration (`-incoming defer`, paused)
    /// while the sessions opened, or why this host has none: the reason
    /// the source is told.
    pub vm: Result<QemuVm, String>,
    /// The workload it runs (if the source says it reports one).
    pub load: LoadParams,
    /// Published as it goes.
    pub progress: watch::Sender<Progress>,
}

/// Receives a QEMU guest. Returns it running once committed and judged
/// well; an error carries the guest when it was committed here (a failed
/// check leaves it running: it is the one copy).
pub async fn destination(
    args: DestArgs,
    mut data: Receiver,
    replies: Sender,
    on_commit: CommitHook<'_>,
) -> Result<QemuVm, (MigrateError, Option<QemuVm>)> {
    let (vm, mode, unpacker) = match take_start(args.vm, &mut data).await {
        Ok(x) => x,
        Err(StartRefused::Broken(e)) => return Err((e, None)),
        Err(StartRefused::Reason(r)) => return Err(reject(replies, r).await),
    };
    let mut relay = DestRelay {
        vm: &vm,
        load: args.load,
        progress: &args.progress,
        replies: &replies,
        committed: false,
    };
    let res = relay.run(mode, &mut data, unpacker, on_commit).await;
    let committed = relay.committed;
    let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
    match res {
        Ok(()) => Ok(vm),
        Err(e) if committed => Err((e, Some(vm))),
        Err(e) => {
            vm.remove();
            Err((e, None))
        }
    }
}

/// Why the source's `Start` is not taken.
enum StartRefused {
    /// No `Start` came (nothing to answer).
    Broken(MigrateError),
    /// Refused with this reason, said to the source.
    Reason(String),
}

/// Reads and checks the source's `Start`; on any refusal the QEMU
/// launched for it is removed.
async fn take_start(
    vm: Result<QemuVm, String>,
    data: &mut Receiver,
) -> Result<(QemuVm, Mode, Unpacker), StartRefused> {
    let start = async {
        let (mode, compress) = read_start(data).await.map_err(StartRefused::Broken)?;
        let mode: Mode = mode.parse().map_err(StartRefused::Reason)?;
        let unpacker = Unpacker::new(compress).map_err(StartRefused::Reason)?;
        Ok((mode, unpacker))
    };
    match (vm, start.await) {
        (Ok(vm), Ok((mode, unpacker))) => Ok((vm, mode, unpacker)),
        (Ok(vm), Err(e)) => {
            vm.remove();
            Err(e)
        }
        (Err(_), Err(e @ StartRefused::Broken(_))) => Err(e),
        (Err(reason), _) => Err(StartRefused::Reason(reason)),
    }
}

async fn read_start(data: &mut Receiver) -> Result<(String, Compress), MigrateError> {
    let (seq, f) = data.recv().await.ok_or(MigrateError::Closed("data"))??;
    data.ack(seq);
    match decode::<RelaySourceMsg>(&f)? {
        Incoming::Msg(RelaySourceMsg::Start { mode, compress }) => Ok((mode, compress)),
        other => Err(MigrateError::Protocol(format!(
            "expected start, got {other:?}"
        ))),
    }
}

async fn reject(replies: Sender, reason: String) -> (MigrateError, Option<QemuVm>) {
    let msg = RelayDestMsg::Reject {
        reason: reason.clone(),
    };
    let _ = replies.send(msg_frame(&msg)).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
    (MigrateError::Rejected(reason), None)
}

/// One incoming QEMU migration, after its QEMU started.
struct DestRelay<'a> {
    vm: &'a QemuVm,
    load: LoadParams,
    progress: &'a watch::Sender<Progress>,
    replies: &'a Sender,
    /// `Commit` arrived and the guest runs here.
    committed: bool,
}

/// The state of the watching loop.
struct Feed {
    q: Qmp,
    mode: Mode,
    loaded: bool,
    stream_end: bool,
    /// The console's length when the guest resumed here.
    console_from: usize,
    /// Judging the guest: its check and the patience it has left.
    judging: Option<(Box<dyn GuestCheck>, Duration)>,
    judged: bool,
    /// The check failed: said to the source, and returned once the source
    /// stopped serving (post-copy pages still flow until then).
    failed: Option<String>,
    /// When the last tick ran (patience counts only time the guest could
    /// use: not while this process or QEMU was stopped).
    last_tick: Instant,
    /// QMP requests in a row that timed out while loading: a QEMU busy
    /// loading under load answers late, not never.
    qmp_timeouts: u32,
}

impl Feed {
    /// How often QEMU is looked at. While the guest is paused between its
    /// last bytes and `Loaded`, every millisecond of the wait is downtime:
    /// look often then (and through post-copy's first pass, whose switch
    /// comes without a stream end), rarely otherwise.
    fn tick(&self) -> Duration {
        match (self.loaded, self.stream_end, self.mode) {
            (false, true, _) => Duration::from_millis(5),
            (false, false, Mode::Postcopy | Mode::Hybrid) => Duration::from_millis(10),
            _ => Duration::from_millis(50),
        }
    }
}

/// QMP timeouts in a row (each the driver's QMP timeout, 10 s) tolerated
/// while the destination QEMU loads; past them it is wedged.
const MAX_LOAD_QMP_TIMEOUTS: u32 = 3;

impl DestRelay<'_> {
    async fn run(
        &mut self,
        mode: Mode,
        data: &mut Receiver,
        unpacker: Unpacker,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let res = self.receive(mode, data, unpacker, on_commit).await;
        // A failed check already sent its own verdict.
        let said = matches!(res, Err(MigrateError::Verification(_)));
        if let (Err(e), false) = (&res, said) {
            // Before commit the source resumes; after it, the source must
            // learn that the guest here is not well (e.g. its kernel
            // panicked and QEMU exited), so the migration is marked corrupted.
            let msg = if self.committed {
                RelayDestMsg::Verified {
                    ok: false,
                    detail: format!("{e}; console: {}", console_tail(self.vm)),
                }
            } else {
                RelayDestMsg::Failed {
                    reason: e.to_string(),
                }
            };
            let _ = self.replies.send(msg_frame(&msg)).await;
        }
        res
    }

    async fn receive(
        &mut self,
        mode: Mode,
        data: &mut Receiver,
        unpacker: Unpacker,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let (q, stream) = self.open(mode).await?;
        let (from_qemu, to_qemu) = stream.into_split();
        self.replies.send(msg_frame(&RelayDestMsg::Accept)).await?;
        self.progress
            .send_modify(|p| p.phase = MigrationPhase::Precopy);
        let mut f = Feed {
            q,
            mode,
            loaded: false,
            stream_end: false,
            console_from: 0,
            judging: None,
            judged: false,
            failed: None,
            last_tick: Instant::now(),
            qmp_timeouts: 0,
        };
        // Three futures polled side by side, none awaited inside another:
        // the pump feeds QEMU's stream, the return path carries QEMU's page
        // requests back, and the watching loop asks QEMU over QMP. When the
        // stream was fed from the watching loop, a QMP question QEMU could
        // not answer (its main thread loading device state, blocked on a
        // guest page still on its way) stopped the very bytes that page was
        // in: post-copy stalled for a QMP timeout (10 s) at a time. And a
        // write into QEMU's stream that blocks (QEMU busy answering on its
        // return path) never stops that return path from being read.
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let pumping = pump(data, unpacker, to_qemu, ctl_tx);
        let return_path = carry_return_path(from_qemu, self.replies);
        let watching = self.watch(&mut f, ctl_rx, on_commit);
        tokio::pin!(pumping, return_path, watching);
        let mut return_open = true;
        loop {
            tokio::select! {
                r = &mut pumping => return r,
                r = &mut watching => return r,
                r = &mut return_path, if return_open => {
                    r?;
                    return_open = false;
                }
            }
        }
    }

    /// Watches QEMU until the migration is done here, acting on the
    /// source's messages as the pump passes them on.
    async fn watch(
        &mut self,
        f: &mut Feed,
        mut ctl: mpsc::UnboundedReceiver<RelaySourceMsg>,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                c = ctl.recv() => {
                    // The pump ended: its own result ends the migration.
                    let Some(c) = c else { return std::future::pending().await };
                    let ended = f.stream_end;
                    self.on_control(f, c, on_commit).await?;
                    if f.stream_end && !ended {
                        // The last bytes are in QEMU: see it loaded at once.
                        next = tokio::time::Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + f.tick();
                    if self.on_tick(f).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sets QEMU up to receive and connects to its incoming socket.
    async fn open(&mut self, mode: Mode) -> Result<(Qmp, UnixStream), MigrateError> {
        let mut q = self.vm.qmp().await.map_err(qmp_err)?;
        q.set_capabilities(&capabilities(mode, false))
            .await
            .map_err(qmp_err)?;
        let sock = self.vm.dir().join("migrate-in.sock");
        let uri = format!("unix:{}", self.vm.path_for_qemu("migrate-in.sock"));
        q.run("migrate-incoming", json!({ "uri": uri }))
            .await
            .map_err(qmp_err)?;
        Ok((q, connect_when_there(&sock).await?))
    }

    async fn on_control(
        &mut self,
        f: &mut Feed,
        m: RelaySourceMsg,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        match m {
            RelaySourceMsg::StreamEnd => f.stream_end = true,
            RelaySourceMsg::Commit { last_tick } if f.loaded && !self.committed => {
                on_commit().map_err(MigrateError::CommitRecord)?;
                self.committed = true;
                f.console_from = self.vm.console().len();
                f.q.run("cont", json!({})).await.map_err(qmp_err)?;
                self.replies.send(msg_frame(&RelayDestMsg::Running)).await?;
                self.progress
                    .send_modify(|p| p.phase = MigrationPhase::Postcopy);
                let check = check::for_guest(last_tick, self.load);
                let patience = check.patience();
                f.judging = Some((check, patience));
            }
            RelaySourceMsg::Abort { reason } => return Err(MigrateError::Aborted(reason)),
            other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
        }
        Ok(())
    }

    /// Watches QEMU load the guest and the guest's check; returns true
    /// once the migration is done here.
    async fn on_tick(&mut self, f: &mut Feed) -> Result<bool, MigrateError> {
        if !self.vm.is_alive() {
            return Err(MigrateError::DestinationFailed(
                "the destination QEMU exited".into(),
            ));
        }
        if !f.loaded {
            self.check_loaded(f).await?;
        }
        // Time the guest could have used to report: not while this process
        // was stopped (a tick late by seconds counts one tick), not while
        // QEMU is stopped, and not before the source stopped serving pages
        // (until then a post-copy guest may wait on the link).
        let step = f.last_tick.elapsed().min(Duration::from_millis(200));
        f.last_tick = Instant::now();
        let counts = f.stream_end && !self.vm.is_stopped();
        if let Some((check, left)) = &mut f.judging {
            if counts {
                *left = left.saturating_sub(step);
            }
            let console = self.vm.console();
            let fresh = console.get(f.console_from..).unwrap_or("");
            let verdict = check.judge(fresh);
            let Some(v) = verdict.or_else(|| {
                left.is_zero().then(|| check::Verdict {
                    ok: false,
                    detail: format!(
                        "the guest printed no check in time after resuming; console: {}",
                        console_tail(self.vm)
                    ),
                })
            }) else {
                return Ok(false);
            };
            let msg = RelayDestMsg::Verified {
                ok: v.ok,
                detail: v.detail.clone(),
            };
            self.replies.send(msg_frame(&msg)).await?;
            if !v.ok {
                f.failed = Some(v.detail);
            }
            f.judging = None;
            f.judged = true;
        }
        if !(f.judged && f.stream_end) {
            return Ok(false);
        }
        match f.failed.take() {
            Some(detail) => Err(MigrateError::Verification(detail)),
            None => Ok(true),
        }
    }

    /// Pre-copy: all loaded, paused (-S). Post-copy: the device state is
    /// in and the guest waits to run. Either way: `Loaded`.
    async fn check_loaded(&mut self, f: &mut Feed) -> Result<(), MigrateError> {
        let answers =
            async { Ok::<_, QmpError>((f.q.query_migrate().await?, f.q.status().await?)) };
        let (m, s) = match answers.await {
            Ok(a) => {
                f.qmp_timeouts = 0;
                a
            }
            Err(QmpError::Timeout(_)) if f.qmp_timeouts < MAX_LOAD_QMP_TIMEOUTS => {
                f.qmp_timeouts += 1;
                tracing::warn!(
                    timeouts = f.qmp_timeouts,
                    "the destination QEMU answers QMP late; asking again"
                );
                return Ok(());
            }
            Err(e) => return Err(qmp_err(e)),
        };
        if m.status == "failed" {
            return Err(MigrateError::DestinationFailed(format!(
                "the destination QEMU failed to load: {}",
                m.error_desc.unwrap_or_default()
            )));
        }
        let ready = (m.status == "completed" && f.stream_end && !s.running)
            || (m.status == "postcopy-active" && !s.running);
        if ready {
            f.loaded = true;
            self.progress
                .send_modify(|p| p.phase = MigrationPhase::Switchover);
            self.replies.send(msg_frame(&RelayDestMsg::Loaded)).await?;
        }
        Ok(())
    }
}

/// Feeds QEMU's incoming socket the stream, in order, and passes the
/// source's messages to the watching loop in stream order: every byte
/// before a message is in QEMU's socket. A frame is acknowledged once it is
/// in the socket (or passed on).
async fn pump(
    data: &mut Receiver,
    mut unpacker: Unpacker,
    mut to_qemu: OwnedWriteHalf,
    ctl: mpsc::UnboundedSender<RelaySourceMsg>,
) -> Result<(), MigrateError> {
    loop {
        let (seq, frame) = data.recv().await.ok_or(MigrateError::Closed("data"))??;
        match decode::<RelaySourceMsg>(&frame)? {
            Incoming::Bytes(KIND_STREAM, p) => {
                let chunk = unpacker.unpack(&p).map_err(MigrateError::Protocol)?;
                to_qemu.write_all(&chunk).await.map_err(|e| {
                    MigrateError::DestinationFailed(format!("the destination QEMU's stream: {e}"))
                })?;
            }
            // The watching loop outlives the pump; if it ended, so did this.
            Incoming::Msg(m) => {
                let _ = ctl.send(m);
            }
            other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
        }
        data.ack(seq);
    }
}

/// Carries what QEMU writes on its return path (post-copy page requests,
/// acks) to the source until QEMU closes it.
async fn carry_return_path(
    mut from_qemu: tokio::net::unix::OwnedReadHalf,
    replies: &Sender,
) -> Result<(), MigrateError> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from_qemu.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => {
                replies.send(frame(KIND_RETURN, &buf[..n])).await?;
            }
        }
    }
}

async fn connect_when_there(sock: &Path) -> Result<UnixStream, MigrateError> {
    let t = Instant::now();
    loop {
        match UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                return Err(MigrateError::DestinationFailed(format!(
                    "the destination QEMU's incoming socket: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}
