//! The source side, run in the guest's own process: open the migration
//! through the destination agent, run the engine (or QEMU's stream relay)
//! on the guest it holds, and settle a `Commit` that went unconfirmed.

use super::{lock, read_hello, Proc, SessionError, Slot};
use crate::control::{Answer, OutJob};
use crate::hosted::Hosted;
use crate::journal::Record;
use crate::qemu_relay::{self, Compress};
use crate::vmdir::EndedMigration;
use std::sync::Arc;
use std::time::Duration;
use tern_migrate::protocol::{hello_frame, Offer, SessionHello, PROTOCOL_VERSION};
use tern_migrate::{
    CommitStep, MigrateError, MigrationPhase, Outcome, Progress, Report, SourceGuest, SourceLink,
};
use tern_proto::MigrationRole;
use tern_transport::{HostLimiter, Listener, Receiver, Redirector, Sender};
use tokio::sync::watch;

/// In-flight bytes of a QEMU guest's data session: QEMU paces itself by how
/// fast its socket drains and picks switchover from that; a deep window
/// would hide the link from it.
const QEMU_WINDOW_BYTES: usize = 2 << 20;

/// The data session's window (unacknowledged bytes the source keeps for
/// replay): 1/128 of guest RAM between 4 and 64 MiB, so the source process
/// stays within its RAM + 5 % (at 64 MiB a 1 GiB guest's process peaked at
/// RAM + 14 %, with the encoder's caches at their defaults).
fn data_window(ram_bytes: u64) -> usize {
    (ram_bytes / 128).clamp(4 << 20, 64 << 20) as usize
}

/// How often an unconfirmed commit is asked about while the destination is away.
const SETTLE_RETRY: Duration = Duration::from_secs(2);

/// What the agent may change of the outgoing migration under way.
pub(super) struct Controls {
    migration: String,
    cancel: tern_migrate::Cancel,
    /// Its share of the host's bandwidth, as the data session's host
    /// limiter (`None`: the host has no cap).
    share: Option<Arc<HostLimiter>>,
    /// Points the data session elsewhere, once it is open.
    redirect: Option<Redirector>,
}

/// Cancels the outgoing migration `migration` if it has not begun its
/// switchover (the engine then rolls back and the guest runs on here).
pub(super) fn cancel(p: &Proc, migration: &str) -> Answer<()> {
    match &*lock(&p.outgoing) {
        Some(c) if c.migration == migration => {
            c.cancel.cancel();
            tracing::info!(migration, "cancel asked");
            Answer::Ok(())
        }
        _ => Answer::Err(format!("no outgoing migration {migration} runs here")),
    }
}

/// Points the outgoing migration's data session at `addr` (the
/// destination agent's migration address moved): its streams reconnect
/// there, resuming the same session.
pub(super) fn redirect(p: &Proc, migration: &str, addr: std::net::SocketAddr) -> Answer<()> {
    match &*lock(&p.outgoing) {
        Some(c) if c.migration == migration => match &c.redirect {
            Some(r) => {
                r.redirect(addr);
                tracing::warn!(migration, %addr, "data session redirected");
                Answer::Ok(())
            }
            None => Answer::Err(format!("migration {migration} has no data session yet")),
        },
        _ => Answer::Err(format!("no outgoing migration {migration} runs here")),
    }
}

/// Sets the outgoing migration's share of the host's bandwidth (its data
/// session follows within 100 ms).
pub(super) fn set_share(p: &Proc, migration: &str, bytes_per_sec: u64) -> Answer<()> {
    match &*lock(&p.outgoing) {
        Some(c) if c.migration == migration => match (&c.share, bytes_per_sec) {
            (_, 0) => Answer::Err("a share is above 0".into()),
            (Some(h), rate) => {
                h.set_rate(rate);
                tracing::debug!(migration, rate, "bandwidth share");
                Answer::Ok(())
            }
            (None, _) => Answer::Err(format!("migration {migration} has no share")),
        },
        _ => Answer::Err(format!("no outgoing migration {migration} runs here")),
    }
}

/// Takes the running guest and starts migrating it.
pub(super) fn start(p: &Arc<Proc>, mut job: OutJob) -> Answer<()> {
    if let Err(e) = p.peer(&job.to) {
        return Answer::Err(e.to_string());
    }
    let compress: Compress = match job.compress.parse() {
        Ok(c) => c,
        Err(e) => return Answer::Err(e),
    };
    let guest = {
        let mut slot = lock(&p.slot);
        if !matches!(&*slot, Slot::Running(_)) {
            return Answer::Err("the VM is not running here".into());
        }
        if p.is_fenced() {
            return Answer::Err(
                "the VM is fenced: its host lost the control plane, which may run it elsewhere"
                    .into(),
            );
        }
        if let Err(e) = p.record(&Record::MigrationOut {
            migration: job.migration.clone(),
            vm: p.launch.vm.clone(),
            to: job.to.clone(),
        }) {
            return Answer::Err(e.to_string());
        }
        let Slot::Running(g) = std::mem::replace(&mut *slot, Slot::Migrating) else {
            unreachable!("checked above")
        };
        g
    };
    job.policy.cancel = tern_migrate::Cancel::default();
    let share = (job.share_bytes_per_sec > 0).then(|| HostLimiter::new(job.share_bytes_per_sec));
    *lock(&p.outgoing) = Some(Controls {
        migration: job.migration.clone(),
        cancel: job.policy.cancel.clone(),
        share: share.clone(),
        redirect: None,
    });
    let (ptx, etx) = p.track(&job.migration, Progress::default());
    let p = p.clone();
    tokio::spawn(async move {
        let end = run(&p, guest, &job, compress, ptx, share).await;
        *lock(&p.outgoing) = None;
        p.end(end, &etx);
    });
    Answer::Ok(())
}

/// The links of one outgoing migration.
struct Links {
    link: SourceLink,
    listener: Listener,
}

async fn run(
    p: &Arc<Proc>,
    mut guest: Box<Hosted>,
    job: &OutJob,
    compress: Compress,
    progress: watch::Sender<Progress>,
    share: Option<Arc<HostLimiter>>,
) -> EndedMigration {
    let mut end = EndedMigration {
        migration: job.migration.clone(),
        vm: p.launch.vm.clone(),
        role: MigrationRole::Source,
        peer: job.to.clone(),
        state: MigrationPhase::RolledBack,
        report: None,
        error: None,
    };
    let (outcome, listener) = match open(p, job, guest.is_qemu(), share).await {
        Ok(Links { link, listener }) => {
            if let Some(c) = lock(&p.outgoing).as_mut() {
                c.redirect = Some(link.data.redirector());
            }
            let o = transfer(p, &mut guest, job, compress, link, progress.clone()).await;
            (o, Some(listener))
        }
        Err(error) => (not_started(p, error), None),
    };
    end.error = outcome.error().map(|e| e.to_string());
    end.state = outcome.report().phase;
    let in_doubt = matches!(outcome, Outcome::InDoubt { .. });
    let moved = match outcome {
        Outcome::Moved { .. } => true,
        Outcome::Stayed { .. } => false,
        Outcome::InDoubt { .. } => match listener {
            Some(mut l) => settle(p, job, &mut l, &progress).await,
            None => false,
        },
    };
    end.report = Some(outcome.into_report());
    if moved {
        guest.discard();
        *lock(&p.epoch) += 1;
        p.set_slot(Slot::MovedAway);
        if !end.state.ownership_moved() {
            // Settled: the destination had journaled the commit.
            end.state = MigrationPhase::Committed;
        }
        p.finish_soon();
    } else {
        end.state = MigrationPhase::RolledBack;
        roll_back(p, guest, &end, in_doubt).await;
    }
    progress.send_modify(|x| x.phase = end.state);
    end
}

/// The outcome of a migration that failed before the engine ran: the
/// guest stayed, nothing was sent.
fn not_started(p: &Proc, error: MigrateError) -> Outcome {
    Outcome::Stayed {
        report: Report::new(p.launch.spec.memory_mib << 20),
        error,
    }
}

async fn roll_back(p: &Proc, mut guest: Box<Hosted>, end: &EndedMigration, in_doubt: bool) {
    if let Err(e) = p.record(&Record::RolledBack {
        migration: end.migration.clone(),
        vm: end.vm.clone(),
        reason: end.error.clone().unwrap_or_default(),
    }) {
        tracing::error!(error = %e, "journal");
    }
    // The engine resumed a guest it paused, except after an unconfirmed
    // commit, which it leaves paused for the verdict.
    let resumed = match &mut *guest {
        Hosted::Qemu(q) if in_doubt => qemu_relay::resume_source(q)
            .await
            .map_err(|e| e.to_string()),
        Hosted::Qemu(_) => Ok(()),
        // Restored from its images when the migration rolled back before
        // commit; one in doubt is still dumped.
        Hosted::Container(c) if in_doubt => c.restore(),
        Hosted::Container(_) => Ok(()),
        g if !g.is_alive() => SourceGuest::resume(g).map_err(|e| e.to_string()),
        _ => Ok(()),
    };
    if let Err(e) = resumed {
        tracing::error!(error = %e, "resuming the guest after a rollback");
    }
    p.set_slot(Slot::Running(guest));
}

/// Asks the destination agent to take the migration, waits for its guest
/// process to dial back, then opens the data session routed to it.
async fn open(
    p: &Arc<Proc>,
    job: &OutJob,
    qemu: bool,
    share: Option<Arc<HostLimiter>>,
) -> Result<Links, MigrateError> {
    let setup = |e: SessionError| MigrateError::Setup(Box::new(e));
    let peer = p.peer(&job.to).map_err(setup)?;
    let security = p.security(&peer.name).map_err(setup)?;
    let mut listener = p.listener().map_err(setup)?;
    let hello = SessionHello::Data(Offer {
        version: PROTOCOL_VERSION,
        migration: job.migration.clone(),
        source_host: p.cfg().name.clone(),
        reply_to: job.reply_to.clone(),
        vm: p.launch.vm.clone(),
        epoch: *lock(&p.epoch),
        spec: serde_json::to_value(&p.launch.spec).expect("specs serialize"),
    });
    let prepare = Sender::connect(
        peer.migrate_addr,
        security.clone(),
        p.session_config(None),
        None,
    )
    .await?;
    prepare.send(hello_frame(&hello)).await?;
    let replies = accept_replies(p, &mut listener, job).await;
    // The asking session has done its job (either way): close it.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), prepare.finish()).await;
    });
    let replies = replies?;
    let mut cfg = p.session_config(Some(&job.migration));
    cfg.window_bytes = if qemu {
        QEMU_WINDOW_BYTES
    } else {
        data_window(p.launch.spec.memory_mib << 20)
    };
    if qemu {
        // QEMU paces itself by how fast its socket drains and the small
        // window bounds what can queue on the path, so the session keeps
        // its fixed rate (the policy's cap, the host's share) on a WAN too:
        // the adaptive controller's probing only added its sawtooth. Over
        // 20 ms / 200 Mbit, 4 runs each in one sitting: total 2.08-2.17 s
        // fixed against 2.28-2.53 s adaptive, downtime 228-270 ms against
        // 184-256 ms (QEMU's own migration: 3.7 s, 377-467 ms).
        cfg.adaptive_above_rtt = None;
    }
    let data = Sender::connect(peer.migrate_addr, security, cfg, share).await?;
    data.send(hello_frame(&hello)).await?;
    Ok(Links {
        link: SourceLink { data, replies },
        listener,
    })
}

/// The destination's guest process dials back with `Replies`, or its agent
/// with `Refused`.
async fn accept_replies(
    p: &Proc,
    listener: &mut Listener,
    job: &OutJob,
) -> Result<Receiver, MigrateError> {
    let wait = job.policy.reply_timeout;
    let t = tokio::time::Instant::now();
    loop {
        let left = wait.saturating_sub(t.elapsed());
        let mut rx = tokio::time::timeout(left, listener.accept())
            .await
            .ok()
            .flatten()
            .ok_or(MigrateError::Timeout {
                waiting_for: "reply session from the destination (is this host its peer?)",
                after: wait,
            })?;
        if !p.opened_by(&rx, &job.to) {
            tracing::warn!(
                expected = job.to,
                "refused a reply session opened by another host"
            );
            continue;
        }
        match read_hello(&mut rx, Duration::from_secs(10)).await {
            Ok(SessionHello::Replies { migration }) if migration == job.migration => return Ok(rx),
            Ok(SessionHello::Refused { migration, reason }) if migration == job.migration => {
                return Err(MigrateError::Rejected(reason))
            }
            Ok(other) => tracing::warn!(?other, "unexpected session while waiting for replies"),
            Err(e) => tracing::warn!(error = %e, "a reply session without a hello"),
        }
    }
}

async fn transfer(
    p: &Arc<Proc>,
    guest: &mut Hosted,
    job: &OutJob,
    compress: Compress,
    link: SourceLink,
    progress: watch::Sender<Progress>,
) -> Outcome {
    let epoch = *lock(&p.epoch);
    let mut before_commit = |step| {
        match step {
            CommitStep::Switchover => p.record(&Record::CommitDecided {
                migration: job.migration.clone(),
                vm: p.launch.vm.clone(),
                to: job.to.clone(),
                epoch: epoch + 1,
            })?,
            CommitStep::Commit => hold_after_commit_record(),
        }
        Ok(())
    };
    let key = p.host_key.clone();
    match guest {
        Hosted::Qemu(q) => {
            let args = qemu_relay::SourceArgs {
                vm: q,
                policy: &job.policy,
                compress,
                progress,
            };
            qemu_relay::source(args, link.data, link.replies, &mut before_commit).await
        }
        Hosted::Container(c) => {
            let args = crate::container_relay::SourceArgs {
                vm: &p.launch.vm,
                policy: &job.policy,
                compress,
                key: &key,
                progress,
            };
            crate::container_relay::source(args, c, link.data, link.replies, &mut before_commit)
                .await
        }
        g => {
            tern_migrate::migrate_observed(
                g,
                link,
                &key,
                &job.policy,
                &job.migration,
                progress,
                &mut before_commit,
            )
            .await
        }
    }
}

/// Failure injection for tests and drills: `TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS`
/// (in the agent's environment, which its guest processes inherit) holds
/// the source between its commit record and sending `Commit`: the window
/// in which a fault leaves the commit in doubt.
fn hold_after_commit_record() {
    let ms = std::env::var("TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = ms {
        tracing::warn!(ms, "fault injection: holding after the commit record");
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(ms)));
    }
}

/// `Commit` went out but was never confirmed: ask the destination agent
/// until it answers (its answer is final: asking fences a late `Commit`).
/// Meanwhile the guest stays paused here and nothing calls it running.
async fn settle(
    p: &Arc<Proc>,
    job: &OutJob,
    listener: &mut Listener,
    progress: &watch::Sender<Progress>,
) -> bool {
    progress.send_modify(|x| x.phase = MigrationPhase::CommitInDoubt);
    loop {
        match ask(p, job, listener).await {
            Ok(committed) => {
                tracing::info!(migration = job.migration, committed, "commit settled");
                return committed;
            }
            Err(e) => {
                tracing::warn!(migration = job.migration, error = %e, "cannot settle the commit yet");
                tokio::time::sleep(SETTLE_RETRY).await;
            }
        }
    }
}

async fn ask(p: &Arc<Proc>, job: &OutJob, listener: &mut Listener) -> Result<bool, SessionError> {
    let peer = p.peer(&job.to)?;
    let security = p.security(&peer.name)?;
    let mut cfg = p.session_config(None);
    cfg.resume_deadline = Duration::from_secs(5);
    let s = Sender::connect(peer.migrate_addr, security, cfg, None).await?;
    s.send(hello_frame(&SessionHello::Settle {
        version: PROTOCOL_VERSION,
        migration: job.migration.clone(),
        source_host: p.cfg().name.clone(),
        reply_to: job.reply_to.clone(),
    }))
    .await?;
    let answer = async {
        loop {
            let Some(mut rx) = listener.accept().await else {
                return Err(SessionError::ListenerClosed);
            };
            if !p.opened_by(&rx, &job.to) {
                tracing::warn!(expected = job.to, "refused a verdict from another host");
                continue;
            }
            if let Ok(SessionHello::Settled {
                migration,
                committed,
            }) = read_hello(&mut rx, Duration::from_secs(5)).await
            {
                if migration == job.migration {
                    return Ok(committed);
                }
            }
        }
    };
    let wait = Duration::from_secs(10);
    let res = tokio::time::timeout(wait, answer)
        .await
        .map_err(|_| SessionError::Timeout {
            waiting_for: "settling answer",
            after: wait,
        })?;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), s.finish()).await;
    });
    res
}
