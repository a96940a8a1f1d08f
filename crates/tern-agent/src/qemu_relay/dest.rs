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
use tokio::sync::watch;

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
        unpacker,
        load: args.load,
        progress: &args.progress,
        replies: &replies,
        committed: false,
    };
    let res = relay.run(mode, &mut data, on_commit).await;
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
    /// The stream's compression (zstd keeps state across frames).
    unpacker: Unpacker,
    load: LoadParams,
    progress: &'a watch::Sender<Progress>,
    replies: &'a Sender,
    /// `Commit` arrived and the guest runs here.
    committed: bool,
}

/// The state of the receiving loop.
struct Feed {
    q: Qmp,
    to_qemu: OwnedWriteHalf,
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
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let res = self.receive(mode, data, on_commit).await;
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
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let (q, stream) = self.open(mode).await?;
        let (from_qemu, to_qemu) = stream.into_split();
        self.replies.send(msg_frame(&RelayDestMsg::Accept)).await?;
        self.progress
            .send_modify(|p| p.phase = MigrationPhase::Precopy);
        let mut f = Feed {
            q,
            to_qemu,
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
        // QEMU's return path is carried by a future of its own, polled
        // beside the feeding loop, never from inside it: when both waited in
        // one loop, a write into QEMU's stream that blocked (QEMU busy
        // answering on its return path) stopped the return path from being
        // read, and post-copy could deadlock.
        let return_path = carry_return_path(from_qemu, self.replies);
        let feeding = self.feed(&mut f, data, on_commit);
        tokio::pin!(return_path, feeding);
        let mut return_open = true;
        loop {
            tokio::select! {
                r = &mut feeding => return r,
                r = &mut return_path, if return_open => {
                    r?;
                    return_open = false;
                }
            }
        }
    }

    /// Feeds QEMU the stream and watches it until the migration is done here.
    async fn feed(
        &mut self,
        f: &mut Feed,
        data: &mut Receiver,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                r = data.recv() => {
                    let (seq, frame) = r.ok_or(MigrateError::Closed("data"))??;
                    let ended = f.stream_end;
                    self.on_data(f, &frame, on_commit).await?;
                    data.ack(seq);
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

    async fn on_data(
        &mut self,
        f: &mut Feed,
        frame: &bytes::Bytes,
        on_commit: CommitHook<'_>,
    ) -> Result<(), MigrateError> {
        match decode::<RelaySourceMsg>(frame)? {
            Incoming::Bytes(KIND_STREAM, p) => {
                let chunk = self.unpacker.unpack(&p).map_err(MigrateError::Protocol)?;
                f.to_qemu.write_all(&chunk).await.map_err(|e| {
                    MigrateError::DestinationFailed(format!("the destination QEMU's stream: {e}"))
                })?;
            }
            Incoming::Msg(RelaySourceMsg::StreamEnd) => f.stream_end = true,
            Incoming::Msg(RelaySourceMsg::Commit { last_tick }) if f.loaded && !self.committed => {
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
            Incoming::Msg(RelaySourceMsg::Abort { reason }) => {
                return Err(MigrateError::Aborted(reason))
            }
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
