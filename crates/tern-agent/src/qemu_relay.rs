//! Live migration of QEMU guests through tern's channels.
//!
//! QEMU writes its migration stream to a unix socket owned by the source
//! agent; the agent carries the bytes over the migration's data session
//! (mutual TLS, token bucket, resume across link drops, optional LZ4/zstd)
//! to the destination agent, which feeds the destination QEMU's incoming
//! socket. QEMU's return path (post-copy page requests, acks) travels back on
//! the reply session. QEMU only ever talks to a local socket, so a link that
//! drops for seconds looks to it like a slow peer, never a failure.
//!
//! tern drives the rest over QMP on both sides and keeps its own ownership
//! rules:
//!
//! ```text
//! source                                   destination
//!   Start{mode, compress}            ->    launch QEMU -incoming (paused, -S), capabilities
//!                                    <-    Accept | Reject{reason}
//!   QEMU stream bytes ...            ->    ... into the destination QEMU
//!   (pre-copy rounds, switchover)    <-    return-path bytes
//!   StreamEnd (pre-copy: before Loaded)
//!                                    <-    Loaded (QEMU holds the whole guest, paused)
//!   journal CommitDecided, Commit{last_tick} ->  journal CommitReceived, `cont`
//!                                    <-    Running (downtime ends)
//!                                    <-    Verified{ok, detail} (the guest's own report)
//!   quit the source QEMU
//! ```
//!
//! Before `Commit` any failure cancels QEMU's migration and resumes the
//! source; the destination QEMU is killed. QEMU saying "completed" is not
//! trusted alone: the destination checks the guest's own console report
//! (counter continues from the source's last tick, checksums match the
//! expected ones) and a failed check marks the migration `corrupted`.

use crate::views::VmSpec;
use bytes::Bytes;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tern_drivers::qemu::load::{last_complete_tick, verify_after_switchover, LoadParams};
use tern_drivers::qemu::qmp::{Qmp, QmpError};
use tern_drivers::qemu::{Launch, QemuConfig, QemuSpec, QemuVm};
use tern_migrate::protocol::{frame, msg_frame};
pub use tern_migrate::relay::Compress;
use tern_migrate::relay::{
    decode, Incoming, RelayDestMsg, RelaySourceMsg, CHUNK, KIND_RETURN, KIND_STREAM,
};
use tern_migrate::{CommitHook, MigrateError, Mode, Policy, Progress, Report, SourcePhase};
use tern_transport::{Receiver, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

fn qmp_err(e: QmpError) -> MigrateError {
    MigrateError::Guest(tern_migrate::GuestError(format!("QMP: {e}")))
}

fn tx_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Transport(e.to_string())
}

fn capabilities(mode: Mode, auto_converge: bool) -> Vec<(&'static str, bool)> {
    vec![
        ("postcopy-ram", mode != Mode::Precopy),
        ("auto-converge", auto_converge),
        ("events", true),
    ]
}

fn wall_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

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

/// Migrates a QEMU guest away. On success the destination runs it and the
/// local QEMU is gone; before commit every failure resumes the local guest.
pub async fn source(
    args: SourceArgs<'_>,
    data: Sender,
    mut replies: Receiver,
    before_commit: CommitHook<'_>,
) -> Result<Report, MigrateError> {
    let SourceArgs {
        vm,
        policy,
        compress,
        progress,
    } = args;
    let t0 = Instant::now();
    let mut report = Report {
        phase: SourcePhase::Requesting,
        rounds: Vec::new(),
        pages_sent: 0,
        wire_bytes: 0,
        memory_bytes: vm.spec().memory_mib << 20,
        downtime_ms: 0.0,
        total_ms: 0.0,
        postcopy: false,
        faults_served: 0,
        postcopy_ms: 0.0,
        throttle_percent: 0,
        bandwidth_raised_to: 0,
        switchover: Default::default(),
    };
    if policy.bandwidth_bytes_per_sec > 0 {
        data.set_rate(policy.bandwidth_bytes_per_sec);
    }
    progress.send_modify(|p| {
        p.memory_bytes = report.memory_bytes;
        p.phase = "requesting".into();
    });
    let mut committed = false;
    let data = Arc::new(data);
    let mut tasks = Vec::new();
    let res = run_source(
        t0,
        vm,
        policy,
        compress,
        &progress,
        &data,
        &mut replies,
        before_commit,
        &mut report,
        &mut committed,
        &mut tasks,
    )
    .await;
    // Total time runs to the guest running on the destination (set at
    // `Running`); the guest's own check after that is not part of it.
    if report.total_ms == 0.0 {
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    // The stream pump and return-path writer end with the migration; once
    // they are gone this is the only holder of the data session.
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    let finish = |data: Arc<Sender>| async move {
        if let Ok(d) = Arc::try_unwrap(data) {
            let _ = tokio::time::timeout(Duration::from_secs(5), d.finish()).await;
        }
    };
    match res {
        Ok(()) => {
            finish(data).await;
            report.phase = SourcePhase::Committed;
            progress.send_modify(|p| p.phase = "committed".into());
            vm.shutdown().await;
            Ok(report)
        }
        Err(e @ MigrateError::Verification(_)) if committed => {
            // The destination ran the guest and its own check failed: it
            // moved (corrupted); the source copy must not run again.
            tracing::error!(error = %e, "after commit; the source QEMU is discarded");
            vm.shutdown().await;
            Err(e)
        }
        Err(e) if committed => {
            // Commit went out and what followed failed: whether the
            // destination committed is in doubt. The paused source QEMU is
            // kept whole until the caller has settled it.
            tracing::error!(error = %e, "after commit; the source QEMU waits, paused, to be settled");
            Err(MigrateError::CommitUnconfirmed(e.to_string()))
        }
        Err(e) => {
            tracing::warn!(error = %e, "QEMU migration failed; resuming the source");
            let _ = data
                .send(msg_frame(&RelaySourceMsg::Abort {
                    reason: e.to_string(),
                }))
                .await;
            finish(data).await;
            resume_source(vm).await?;
            progress.send_modify(|p| p.phase = "rolled_back".into());
            Err(e)
        }
    }
}

/// Cancels QEMU's migration if it still runs and resumes the guest (also
/// after a commit settled as never received by the destination).
pub async fn resume_source(vm: &QemuVm) -> Result<(), MigrateError> {
    let mut q = vm.qmp().await.map_err(qmp_err)?;
    let _ = q.run("migrate_cancel", json!({})).await;
    let t = Instant::now();
    loop {
        let m = q.query_migrate().await.map_err(qmp_err)?;
        if !matches!(
            m.status.as_str(),
            "active" | "setup" | "cancelling" | "device"
        ) {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = q.status().await.map_err(qmp_err)?;
    if !s.running {
        q.run("cont", json!({})).await.map_err(qmp_err)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_source(
    t0: Instant,
    vm: &mut QemuVm,
    policy: &Policy,
    compress: Compress,
    progress: &watch::Sender<Progress>,
    data: &Arc<Sender>,
    replies: &mut Receiver,
    before_commit: CommitHook<'_>,
    report: &mut Report,
    committed: &mut bool,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), MigrateError> {
    let mode_name = match policy.mode {
        Mode::Precopy => "precopy",
        Mode::Postcopy => "postcopy",
        Mode::Hybrid => "hybrid",
    };
    data.send(msg_frame(&RelaySourceMsg::Start {
        mode: mode_name.into(),
        compress,
    }))
    .await
    .map_err(tx_err)?;
    // The destination boots QEMU before it answers: allow for that.
    let answer = tokio::time::timeout(
        policy.reply_timeout + Duration::from_secs(30),
        replies.recv(),
    )
    .await
    .map_err(|_| MigrateError::Transport("no answer to the migration request".into()))?;
    match answer {
        Some(Ok((seq, f))) => {
            replies.ack(seq);
            match decode::<RelayDestMsg>(&f)? {
                Incoming::Msg(RelayDestMsg::Accept) => {}
                Incoming::Msg(RelayDestMsg::Reject { reason }) => {
                    return Err(MigrateError::Rejected(reason))
                }
                Incoming::Msg(other) => {
                    return Err(MigrateError::Protocol(format!(
                        "expected accept, got {other:?}"
                    )))
                }
                Incoming::Bytes(k, _) => {
                    return Err(MigrateError::Protocol(format!(
                        "expected accept, got frame kind {k}"
                    )))
                }
            }
        }
        Some(Err(e)) => return Err(tx_err(e)),
        None => return Err(tx_err("the reply session closed")),
    }

    let mut q = vm.qmp().await.map_err(qmp_err)?;
    q.set_capabilities(&capabilities(policy.mode, policy.auto_converge))
        .await
        .map_err(qmp_err)?;
    q.set_parameters(json!({
        "downtime-limit": policy.max_downtime.as_millis() as u64,
        // tern's link paces the stream; QEMU's own limiter (32 MiB/s by
        // default) would only get in the way.
        "max-bandwidth": 1u64 << 40,
    }))
    .await
    .map_err(qmp_err)?;
    let sock = vm.dir().join("migrate-out.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .map_err(|e| MigrateError::Guest(tern_migrate::GuestError(format!("{e}"))))?;
    q.run(
        "migrate",
        json!({ "uri": format!("unix:{}", sock.display()) }),
    )
    .await
    .map_err(qmp_err)?;
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .map_err(|_| MigrateError::Protocol("QEMU did not connect its migration stream".into()))?
        .map_err(|e| MigrateError::Transport(e.to_string()))?;
    let _ = std::fs::remove_file(&sock);
    let mut postcopy_started = false;
    if policy.mode == Mode::Postcopy {
        // Switch as early as QEMU allows (after its first pass), or a
        // quick stream completes as pre-copy before a poll would see it.
        q.run("migrate-start-postcopy", json!({}))
            .await
            .map_err(qmp_err)?;
        postcopy_started = true;
        report.postcopy = true;
    }
    let (mut from_qemu, mut to_qemu) = stream.into_split();
    // The stream is pumped by its own task, never by the loop that talks
    // QMP: at switchover QEMU holds its big lock while it writes the last
    // of the stream, so QMP answers only once the stream is drained.
    let (pumped_tx, mut pumped) = tokio::sync::mpsc::channel::<Result<u64, String>>(1);
    let pump_data = data.clone();
    tasks.push(tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        let end = loop {
            match from_qemu.read(&mut buf).await {
                Ok(0) => {
                    break match pump_data.send(msg_frame(&RelaySourceMsg::StreamEnd)).await {
                        Ok(_) => Ok(total),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Ok(n) => {
                    total += n as u64;
                    let packed = match compress.pack(&buf[..n]) {
                        Ok(p) => p,
                        Err(e) => break Err(e),
                    };
                    if let Err(e) = pump_data.send(frame(KIND_STREAM, &packed)).await {
                        break Err(e.to_string());
                    }
                }
                Err(e) => break Err(format!("QEMU stream: {e}")),
            }
        };
        let _ = pumped_tx.send(end).await;
    }));
    let (ret_tx, mut ret_rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    tasks.push(tokio::spawn(async move {
        while let Some(b) = ret_rx.recv().await {
            if to_qemu.write_all(&b).await.is_err() {
                return;
            }
        }
    }));

    let started = Instant::now();
    let mut stream_bytes = 0u64;
    let mut eof = false;
    let mut running = false;
    let mut verified: Option<(bool, String)> = None;
    let mut stopped_at_us: Option<u64> = None;
    let mut commit_sent_us = wall_us(SystemTime::now());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let postcopy_after_round = match policy.mode {
        Mode::Precopy => None,
        Mode::Postcopy => Some(1),
        Mode::Hybrid => Some(policy.hybrid_rounds.max(1) as u64),
    };
    report.phase = SourcePhase::Precopy { round: 1 };
    loop {
        if eof && running && verified.is_some() {
            break;
        }
        tokio::select! {
            end = pumped.recv(), if !eof => {
                match end {
                    Some(Ok(n)) => {
                        eof = true;
                        stream_bytes = n;
                    }
                    Some(Err(e)) => return Err(MigrateError::Transport(e)),
                    None => return Err(MigrateError::Transport("the stream pump ended".into())),
                }
            }
            r = replies.recv() => {
                let (seq, f) = match r {
                    Some(Ok(x)) => x,
                    Some(Err(e)) => return Err(tx_err(e)),
                    None => return Err(tx_err("the reply session closed")),
                };
                replies.ack(seq);
                match decode::<RelayDestMsg>(&f)? {
                    Incoming::Bytes(KIND_RETURN, p) => {
                        let _ = ret_tx.send(p);
                    }
                    Incoming::Bytes(k, _) => {
                        return Err(MigrateError::Protocol(format!("unexpected frame kind {k}")))
                    }
                    Incoming::Msg(RelayDestMsg::Loaded) if !*committed => {
                        report.phase = SourcePhase::Switchover;
                        let last = last_complete_tick(&vm.console());
                        before_commit().map_err(|e| MigrateError::Aborted(format!("commit record: {e}")))?;
                        data.send(msg_frame(&RelaySourceMsg::Commit { last_tick: last }))
                            .await
                            .map_err(tx_err)?;
                        commit_sent_us = wall_us(SystemTime::now());
                        *committed = true;
                    }
                    Incoming::Msg(RelayDestMsg::Running) if *committed => {
                        running = true;
                        let now = wall_us(SystemTime::now());
                        if stopped_at_us.is_none() {
                            // QMP is read on ticks, so the STOP event may still
                            // sit unread on its socket: any command reads it in.
                            let _ = tokio::time::timeout(Duration::from_secs(1), q.status()).await;
                            stopped_at_us = stop_time(&q);
                        }
                        let stop = stopped_at_us.unwrap_or_else(|| {
                            // The guest was stopped before the destination
                            // loaded it, so this undercounts, never inflates.
                            tracing::warn!("no STOP event from the source QEMU: downtime counted from the commit");
                            commit_sent_us
                        });
                        report.downtime_ms = now.saturating_sub(stop) as f64 / 1e3;
                        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                        progress.send_modify(|p| p.phase = "running on destination".into());
                    }
                    Incoming::Msg(RelayDestMsg::Verified { ok, detail }) => {
                        verified = Some((ok, detail));
                    }
                    Incoming::Msg(RelayDestMsg::Failed { reason }) => {
                        return Err(MigrateError::DestinationFailed(reason))
                    }
                    Incoming::Msg(other) => {
                        return Err(MigrateError::Protocol(format!("unexpected {other:?}")))
                    }
                }
            }
            _ = tick.tick() => {
                let m = q.query_migrate().await.map_err(qmp_err)?;
                if stopped_at_us.is_none() {
                    stopped_at_us = stop_time(&q);
                }
                if matches!(m.status.as_str(), "failed" | "cancelled") {
                    return Err(MigrateError::Guest(tern_migrate::GuestError(format!(
                        "QEMU's migration {}: {}",
                        m.status,
                        m.error_desc.unwrap_or_default()
                    ))));
                }
                let ram = m.ram.clone().unwrap_or_default();
                let round = ram.dirty_sync_count.max(1);
                if !*committed && !postcopy_started && m.status == "active" {
                    if let Some(after) = postcopy_after_round {
                        if round > after {
                            q.run("migrate-start-postcopy", json!({})).await.map_err(qmp_err)?;
                            postcopy_started = true;
                            report.postcopy = true;
                        }
                    }
                    if let Some(d) = policy.deadline {
                        if started.elapsed() > d {
                            return Err(MigrateError::NotConverged(d));
                        }
                    }
                }
                let wire = data.metrics().bytes_sent;
                let rate = ram.mbps * 1e6 / 8.0;
                progress.send_modify(|p| {
                    if !*committed {
                        p.phase = match m.status.as_str() {
                            "postcopy-active" => "postcopy".into(),
                            "device" | "completed" => "switchover".into(),
                            _ => "precopy".into(),
                        };
                    }
                    p.round = round as u32;
                    p.pages_sent = ram.transferred / 4096;
                    p.pages_remaining = ram.remaining / 4096;
                    p.wire_bytes = wire;
                    p.dirty_pages_per_sec = ram.dirty_pages_rate as f64;
                    p.throughput_bytes_per_sec = rate;
                    p.predicted_downtime_ms = m.expected_downtime.unwrap_or(0) as f64;
                    p.eta_seconds = if rate > 0.0 { ram.remaining as f64 / rate } else { 0.0 };
                });
                if let Some(r) = report.rounds.last_mut().filter(|r| r.round == round as u32) {
                    r.wire_bytes = wire;
                } else if !*committed {
                    report.rounds.push(tern_migrate::RoundStats {
                        round: round as u32,
                        pages: ram.remaining / 4096,
                        wire_bytes: wire,
                        seconds: started.elapsed().as_secs_f64(),
                        dirtied: 0,
                        predicted_downtime_ms: m.expected_downtime.unwrap_or(0) as f64,
                    });
                }
            }
        }
    }
    report.pages_sent = stream_bytes / 4096;
    report.wire_bytes = data.metrics().bytes_sent;
    report.postcopy_ms = 0.0;
    tracing::info!(
        stream_bytes,
        wire_bytes = report.wire_bytes,
        "QEMU stream carried"
    );
    match verified {
        Some((true, _)) => Ok(()),
        Some((false, detail)) => Err(MigrateError::Verification(format!(
            "QEMU reported success but the guest's own report after switchover failed: {detail}"
        ))),
        None => unreachable!("the loop ends only once verified"),
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

/// What the destination side needs besides the links.
pub struct DestArgs<'a> {
    /// How this host runs QEMU.
    pub qemu: &'a QemuConfig,
    /// Where the incoming VM's directory goes.
    pub dir: PathBuf,
    /// The guest (its kernel and initrd are this host's).
    pub spec: QemuSpec,
    /// The workload it runs.
    pub load: LoadParams,
    /// Published as it goes.
    pub progress: watch::Sender<Progress>,
    /// Refuse with this reason instead of receiving.
    pub refuse: Option<String>,
}

/// Receives a QEMU guest. Returns it running once committed and verified
/// (a failed verification is an error, with the guest left running).
pub async fn destination(
    args: DestArgs<'_>,
    mut data: Receiver,
    replies: Sender,
    on_commit: CommitHook<'_>,
) -> Result<QemuVm, (MigrateError, Option<QemuVm>)> {
    let DestArgs {
        qemu,
        dir,
        spec,
        load,
        progress,
        refuse,
    } = args;
    let fail = |e: MigrateError| (e, None);
    let (mode, compress) = match data.recv().await {
        Some(Ok((seq, f))) => {
            data.ack(seq);
            match decode::<RelaySourceMsg>(&f).map_err(fail)? {
                Incoming::Msg(RelaySourceMsg::Start { mode, compress }) => (mode, compress),
                _ => return Err(fail(MigrateError::Protocol("expected start".into()))),
            }
        }
        Some(Err(e)) => return Err(fail(tx_err(e))),
        None => return Err(fail(tx_err("the data session closed"))),
    };
    async fn reject(replies: Sender, reason: String) -> (MigrateError, Option<QemuVm>) {
        let _ = replies
            .send(msg_frame(&RelayDestMsg::Reject {
                reason: reason.clone(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
        (MigrateError::Rejected(reason), None)
    }
    if let Some(r) = refuse {
        return Err(reject(replies, r).await);
    }
    let mode: Mode = match mode.parse() {
        Ok(m) => m,
        Err(e) => return Err(reject(replies, e).await),
    };
    let vm = match QemuVm::launch(qemu, &dir, &spec, Launch::Incoming).await {
        Ok(vm) => vm,
        Err(e) => return Err(reject(replies, format!("cannot start QEMU here: {e}")).await),
    };
    let res = run_destination(
        &vm, mode, compress, &load, &progress, &mut data, &replies, on_commit,
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
    match res {
        Ok(()) => Ok(vm),
        Err((e, true)) => Err((e, Some(vm))),
        Err((e, false)) => {
            vm.remove();
            Err((e, None))
        }
    }
}

/// Errors carry whether the guest was committed here (then it is kept).
#[allow(clippy::too_many_arguments)]
async fn run_destination(
    vm: &QemuVm,
    mode: Mode,
    compress: Compress,
    load: &LoadParams,
    progress: &watch::Sender<Progress>,
    data: &mut Receiver,
    replies: &Sender,
    on_commit: CommitHook<'_>,
) -> Result<(), (MigrateError, bool)> {
    let mut committed = false;
    let res = async {
        let mut q = vm.qmp().await.map_err(qmp_err)?;
        q.set_capabilities(&capabilities(mode, false))
            .await
            .map_err(qmp_err)?;
        let sock = vm.dir().join("migrate-in.sock");
        q.run(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", sock.display()) }),
        )
        .await
        .map_err(qmp_err)?;
        let stream = connect_when_there(&sock).await?;
        let (mut from_qemu, mut to_qemu) = stream.into_split();
        replies
            .send(msg_frame(&RelayDestMsg::Accept))
            .await
            .map_err(tx_err)?;
        progress.send_modify(|p| p.phase = "receiving".into());
        let mut buf = vec![0u8; 256 << 10];
        let mut return_open = true;
        let mut loaded = false;
        let mut stream_end = false;
        let mut source_last_tick = 0u64;
        let mut console_from = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut verify_deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                r = data.recv() => {
                    let (seq, f) = match r {
                        Some(Ok(x)) => x,
                        Some(Err(e)) => return Err(tx_err(e)),
                        None => return Err(tx_err("the data session closed")),
                    };
                    match decode::<RelaySourceMsg>(&f)? {
                        Incoming::Bytes(KIND_STREAM, p) => {
                            let chunk = compress.unpack(&p).map_err(MigrateError::Protocol)?;
                            to_qemu.write_all(&chunk).await.map_err(|e| {
                                MigrateError::DestinationFailed(format!("the destination QEMU's stream: {e}"))
                            })?;
                        }
                        Incoming::Bytes(k, _) => {
                            return Err(MigrateError::Protocol(format!("unexpected frame kind {k}")))
                        }
                        Incoming::Msg(RelaySourceMsg::StreamEnd) => stream_end = true,
                        Incoming::Msg(RelaySourceMsg::Commit { last_tick }) if loaded && !committed => {
                            on_commit().map_err(|e| MigrateError::Aborted(format!("commit record: {e}")))?;
                            committed = true;
                            source_last_tick = last_tick;
                            console_from = vm.console().len();
                            q.run("cont", json!({})).await.map_err(qmp_err)?;
                            replies.send(msg_frame(&RelayDestMsg::Running)).await.map_err(tx_err)?;
                            progress.send_modify(|p| p.phase = "running".into());
                            verify_deadline = Some(Instant::now() + Duration::from_millis(load.tick_ms * load.verify_every.max(1) * 3) + Duration::from_secs(10));
                        }
                        Incoming::Msg(RelaySourceMsg::Abort { reason }) => {
                            return Err(MigrateError::Aborted(reason))
                        }
                        Incoming::Msg(other) => {
                            return Err(MigrateError::Protocol(format!("unexpected {other:?}")))
                        }
                    }
                    data.ack(seq);
                }
                n = from_qemu.read(&mut buf), if return_open => {
                    match n {
                        Ok(0) | Err(_) => return_open = false,
                        Ok(n) => {
                            replies.send(frame(KIND_RETURN, &buf[..n])).await.map_err(tx_err)?;
                        }
                    }
                }
                _ = tick.tick() => {
                    if !vm.is_alive() {
                        return Err(MigrateError::DestinationFailed("the destination QEMU exited".into()));
                    }
                    if !loaded {
                        let m = q.query_migrate().await.map_err(qmp_err)?;
                        let s = q.status().await.map_err(qmp_err)?;
                        if m.status == "failed" {
                            return Err(MigrateError::DestinationFailed(format!(
                                "the destination QEMU failed to load: {}",
                                m.error_desc.unwrap_or_default()
                            )));
                        }
                        // Pre-copy: all loaded, paused (-S). Post-copy: the
                        // device state is in and the guest waits to run.
                        let ready = (m.status == "completed" && stream_end && !s.running)
                            || (m.status == "postcopy-active" && !s.running);
                        if ready {
                            loaded = true;
                            replies.send(msg_frame(&RelayDestMsg::Loaded)).await.map_err(tx_err)?;
                        }
                    }
                    if let Some(deadline) = verify_deadline {
                        let console = vm.console();
                        let fresh = console.get(console_from..).unwrap_or("");
                        if let Some(v) = verify_after_switchover(fresh, source_last_tick, load) {
                            replies.send(msg_frame(&RelayDestMsg::Verified { ok: v.0, detail: v.1.clone() }))
                                .await
                                .map_err(tx_err)?;
                            if !v.0 {
                                return Err(MigrateError::Verification(v.1));
                            }
                            if stream_end {
                                return Ok(());
                            }
                            verify_deadline = None;
                            console_from = usize::MAX;
                        } else if Instant::now() > deadline {
                            let detail = format!("the guest printed no check in time after resuming; console: {}", console_tail(vm));
                            let _ = replies.send(msg_frame(&RelayDestMsg::Verified { ok: false, detail: detail.clone() })).await;
                            return Err(MigrateError::Verification(detail));
                        }
                    } else if committed && stream_end {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    match res {
        Ok(()) => Ok(()),
        Err(e) => {
            // Before commit the source resumes; after it, the source must
            // learn that the guest here is not well (e.g. its kernel
            // panicked and QEMU exited), so the migration is marked corrupted.
            let msg = if committed {
                RelayDestMsg::Verified {
                    ok: false,
                    detail: format!("{e}; console: {}", console_tail(vm)),
                }
            } else {
                RelayDestMsg::Failed {
                    reason: e.to_string(),
                }
            };
            let _ = replies.send(msg_frame(&msg)).await;
            Err((e, committed))
        }
    }
}

/// The last lines the guest printed, for error messages.
fn console_tail(vm: &QemuVm) -> String {
    let c = vm.console();
    let lines: Vec<&str> = c.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
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
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The QEMU spec of a Linux VM on this host (its own kernel and initrd).
pub fn qemu_spec(
    spec: &VmSpec,
    kernel: Option<&Path>,
    initrd: Option<&Path>,
) -> Result<QemuSpec, String> {
    let kernel = kernel.ok_or(
        "this agent has no guest kernel (set guest_kernel in its config; scripts/guest-kernel.sh fetches one)",
    )?;
    Ok(QemuSpec {
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        kernel: kernel.to_path_buf(),
        initrd: initrd.map(Path::to_path_buf),
        cmdline: spec.load_params().cmdline(),
        disks: Vec::new(),
    })
}
