//! Post-copy: the guest runs on the destination before all its pages are
//! there. The source pushes the missing pages in the background and serves
//! the ones the guest faults on first; the destination turns faults into
//! requests and places pages as they land. Both ends end with a root over
//! every page's hash, signed by the source.

use super::digests::PageDigests;
use super::eta::EtaPlan;
use super::pages::page_hash;
use super::replies::{next, parse_msg, poll_reply};
use super::source::Source;
use super::{ms_since, MigrateError, MigrationPhase, Progress, PAGE};
use crate::guest::{PostcopyMemory, SourceGuest};
use crate::protocol::*;
use ed25519_dalek::VerifyingKey;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_pagecodec::Decoder;
use tern_transport::{Receiver, Sender, RESUME_FOREVER};
use tokio::sync::watch;

/// Pages prefetched after each faulting page (the guest tends to read on).
const PREFETCH_PAGES: u64 = 15;
/// Background pages kept in flight during post-copy: more only delays the
/// pages the guest is waiting for behind them.
const POSTCOPY_INFLIGHT_BYTES: usize = 2 << 20;
/// Pages per background frame in post-copy (4 MiB): a frame goes out when
/// less than the in-flight bound is unacknowledged, so big frames keep the
/// link full at one frame in flight; with 1 MiB frames the push slowed and
/// the guest faulted on twice as many pages (bench: busy 1 GiB post-copy
/// total 1.5 → 2.0 s).
const POSTCOPY_PUSH_PAGES: usize = 1024;
/// What a page the source never wrote holds.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

fn failed(e: MigrateError) -> MigrateError {
    MigrateError::PostcopyFailed(Box::new(e))
}

impl<G: SourceGuest> Source<'_, G> {
    /// Post-copy switchover: stop the guest, send its state and the list of
    /// pages the destination lacks, commit, then push those pages.
    pub(super) async fn postcopy_switchover(&mut self, todo: Vec<u64>) -> Result<(), MigrateError> {
        self.report.postcopy = true;
        let (pause_at, stale) = self.pause(todo)?;
        let t = Instant::now();
        let state = self.guest.device_state()?;
        self.report.switchover.device_state_ms = ms_since(t);
        self.ps
            .send(self.data, frame(KIND_DEVICE_STATE, &state))
            .await?;
        let list = SourceMsg::Postcopy {
            stale: to_runs(&stale),
        };
        self.ps.send(self.data, msg_frame(&list)).await?;
        let manifest = Manifest {
            migration: self.migration.to_string(),
            frames: self.ps.frames,
            memory_bytes: self.report.memory_bytes,
            pages_root: String::new(),
            device_state: blake3::hash(&state).to_hex().to_string(),
            postcopy_pages: stale.len() as u64,
        };
        self.send_manifest(manifest).await?;
        self.report.switchover.send_ms = ms_since(pause_at) - self.report.switchover.pause_ms;
        self.commit_exchange().await?;
        // The guest now runs at the destination and needs these pages: a
        // link that fails from here is waited for, however long (see
        // `push_pages`), never given up on.
        self.data.set_resume_deadline(RESUME_FOREVER);
        self.replies.set_resume_deadline(RESUME_FOREVER);
        self.report.downtime_ms = ms_since(pause_at);
        // From here the destination owns the guest: failures are reported,
        // the source never resumes.
        self.report.phase = MigrationPhase::Postcopy;
        let started = Instant::now();
        let n = stale.len() as u64;
        // What is left goes out once, at the pace pre-copy had (if any).
        let plan = EtaPlan {
            rounds_after: 0,
            cap: n,
            budget_secs: 0.0,
            fixed_secs: 0.0,
        };
        self.ps.start_eta(n, &plan);
        self.ps.publish(|p| {
            p.phase = MigrationPhase::Postcopy;
            p.pages_remaining = n;
        });
        self.ps.self_contained();
        self.push_pages(&stale).await.map_err(failed)?;
        self.report.postcopy_ms = ms_since(started);
        self.report.pages_sent = self.ps.pages;
        self.report.wire_bytes = self.ps.wire;
        self.owned_elsewhere();
        self.report.phase = MigrationPhase::Committed;
        Ok(())
    }

    /// Sends every `stale` page once, those asked for first, then the
    /// signed final manifest; returns when the destination says `Done`.
    /// While the link is down it waits for it to come back (or for an
    /// operator to point the session at a new address); only a cancel
    /// ends it then, and the guest, which runs at the destination without
    /// these pages, is lost with it.
    async fn push_pages(&mut self, stale: &[u64]) -> Result<(), MigrateError> {
        let n_pages = self.report.memory_bytes / PAGE as u64;
        let mut need = vec![false; n_pages as usize];
        for &p in stale {
            need[p as usize] = true;
        }
        // A capped link drains slowly: keep ~20 ms of it in flight at most.
        let inflight = match self.policy.bandwidth_bytes_per_sec {
            0 => POSTCOPY_INFLIGHT_BYTES,
            rate => ((rate / 50) as usize).clamp(64 << 10, POSTCOPY_INFLIGHT_BYTES),
        };
        let mut cursor = 0usize;
        let mut final_sent = false;
        let mut down = false;
        loop {
            let link_down = !self.replies.is_connected();
            if link_down != down {
                down = link_down;
                self.report_link(down);
            }
            // With the link up post-copy ends on its own; a cancel only
            // ends a stalled one.
            if down && self.policy.cancel.is_cancelled() {
                return Err(MigrateError::Cancelled);
            }
            // Requests first: the guest is waiting on them.
            let wait = if cursor >= stale.len() && final_sent {
                self.policy.reply_timeout
            } else if cursor < stale.len() && self.data.unacked_bytes() > inflight {
                Duration::from_millis(1)
            } else {
                Duration::ZERO
            };
            if let Some(msg) = poll_reply(self.replies, wait).await? {
                match msg {
                    DestMsg::PageRequest { page } if page < n_pages => {
                        self.serve_fault(page, &mut need).await?
                    }
                    DestMsg::Done => return Ok(()),
                    DestMsg::Failed { reason } => {
                        return Err(MigrateError::DestinationFailed(reason))
                    }
                    other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
                }
            } else if cursor < stale.len() {
                if self.data.unacked_bytes() <= inflight {
                    self.push_batch(stale, &mut cursor, &mut need).await?;
                }
            } else if !final_sent {
                self.send_final_manifest().await?;
                final_sent = true;
            } else if down || self.data.unacked_bytes() > 0 {
                // `Done` cannot come before the destination has it all.
            } else {
                return Err(MigrateError::Timeout {
                    waiting_for: "post-copy done",
                    after: wait,
                });
            }
        }
    }

    /// Says that the link went down (or came back) in post-copy.
    fn report_link(&mut self, down: bool) {
        if down {
            self.report.postcopy_link_losses += 1;
            tracing::warn!(
                migration = self.migration,
                "post-copy: the link is down; waiting for it (the guest waits on its missing pages; only a cancel ends the migration, and loses the guest)"
            );
        } else {
            tracing::info!(migration = self.migration, "post-copy: the link is back");
        }
        self.ps.publish(|p| p.link_down = down);
    }

    /// The guest faulted on `page`: send it and the next few still needed.
    async fn serve_fault(&mut self, page: u64, need: &mut [bool]) -> Result<(), MigrateError> {
        let end = (page + 1 + PREFETCH_PAGES).min(need.len() as u64);
        let batch: Vec<u64> = (page..end)
            .filter(|&p| std::mem::take(&mut need[p as usize]))
            .collect();
        if !batch.is_empty() {
            self.report.faults_served += 1;
            let per_frame = self.policy.frame_pages;
            self.ps
                .send_pages(self.guest, self.data, &batch, per_frame)
                .await?;
        }
        Ok(())
    }

    /// Pushes the next frame's worth of pages still needed.
    async fn push_batch(
        &mut self,
        stale: &[u64],
        cursor: &mut usize,
        need: &mut [bool],
    ) -> Result<(), MigrateError> {
        let per_frame = self.policy.frame_pages.max(POSTCOPY_PUSH_PAGES);
        let mut batch = Vec::with_capacity(per_frame);
        while *cursor < stale.len() && batch.len() < per_frame {
            let p = stale[*cursor];
            *cursor += 1;
            if std::mem::take(&mut need[p as usize]) {
                batch.push(p);
            }
        }
        if !batch.is_empty() {
            self.ps
                .send_pages(self.guest, self.data, &batch, per_frame)
                .await?;
        }
        Ok(())
    }

    async fn send_final_manifest(&mut self) -> Result<(), MigrateError> {
        let manifest = Manifest {
            migration: self.migration.to_string(),
            frames: self.ps.frames,
            memory_bytes: self.report.memory_bytes,
            pages_root: self.ps.root(),
            device_state: String::new(),
            postcopy_pages: 0,
        };
        let done = SourceMsg::PostcopyDone(SignedManifest::sign(manifest, self.key));
        self.ps.send(self.data, msg_frame(&done)).await
    }
}

/// The destination's post-copy state, with the guest running.
pub(super) struct Incoming<'a> {
    pub data: &'a mut Receiver,
    pub replies: &'a Sender,
    pub decoder: &'a mut Decoder,
    pub digests: &'a mut PageDigests,
    pub source_key: &'a VerifyingKey,
    pub migration: &'a str,
    /// Frames received so far.
    pub frames: u64,
    /// Where the destination stands (its receiver's).
    pub progress: &'a watch::Sender<Progress>,
}

/// Post-copy on the destination, with the guest running: a thread turns
/// the guest's faults on missing pages into requests to the source; pages
/// (asked for or pushed) are placed as they arrive; the final manifest's
/// root must match every page's hash.
pub(super) async fn serve(
    mut inc: Incoming<'_>,
    mem: Arc<dyn PostcopyMemory>,
    stale: &[(u64, u64)],
) -> Result<(), MigrateError> {
    // The guest runs here and needs the source's pages: wait for a failed
    // link however long it takes (the source decides when to give up).
    inc.data.set_resume_deadline(RESUME_FOREVER);
    inc.replies.set_resume_deadline(RESUME_FOREVER);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let (fault_tx, mut faults) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let faulter = spawn_fault_reader(mem.clone(), stop.0.clone(), fault_tx)?;
    let mut need = vec![false; inc.digests.len()];
    for &(first, n) in stale {
        need[first as usize..(first + n) as usize].fill(true);
    }
    // Pages the source will send; any other page the guest faults on was
    // never written there (zeros) and never sent.
    let was_stale = need.clone();
    inc.progress
        .send_modify(|p| p.phase = MigrationPhase::Postcopy);
    let mut requested = vec![false; inc.digests.len()];
    let mut zero_filled = 0u64;
    let res: Result<(), MigrateError> = async {
        loop {
            tokio::select! {
                Some(page) = faults.recv() => {
                    let i = page as usize;
                    if !was_stale[i] {
                        zero_filled += u64::from(mem.fill(page, &ZERO_PAGE)?);
                    } else if need[i] && !std::mem::replace(&mut requested[i], true) {
                        inc.replies.send(msg_frame(&DestMsg::PageRequest { page })).await?;
                    }
                }
                got = next(inc.data) => {
                    let (kind, p) = got?;
                    inc.frames += 1;
                    if inc.land(kind, &p, mem.as_ref(), &mut need)? {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    drop(stop);
    let _ = faulter.join();
    tracing::debug!(
        zero_filled,
        "post-copy: pages never written at the source, zero-filled here on first touch"
    );
    res?;
    inc.replies.send(msg_frame(&DestMsg::Done)).await?;
    Ok(())
}

/// Ends the fault reader when post-copy ends, or when its future is
/// dropped mid-way (a cancelled task, a runtime shutting down): the reader
/// holds the guest's post-copy memory open, and a guest thread waiting on
/// a missing page waits until that memory closes, so a guest dropped
/// after it would wait for ever to join its own threads.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// A thread that waits for the guest's faults on missing pages.
fn spawn_fault_reader(
    mem: Arc<dyn PostcopyMemory>,
    stop: Arc<AtomicBool>,
    faults: tokio::sync::mpsc::UnboundedSender<u64>,
) -> Result<std::thread::JoinHandle<()>, MigrateError> {
    std::thread::Builder::new()
        .name("postcopy-faults".into())
        .spawn(move || {
            while !stop.load(Relaxed) {
                match mem.next_fault(Duration::from_millis(50)) {
                    Ok(Some(p)) => {
                        if faults.send(p).is_err() {
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
        .map_err(|e| MigrateError::Guest(crate::guest::GuestError(format!("fault thread: {e}"))))
}

impl Incoming<'_> {
    /// Places one frame; returns true once the final manifest verified.
    fn land(
        &mut self,
        kind: u8,
        p: &[u8],
        mem: &dyn PostcopyMemory,
        need: &mut [bool],
    ) -> Result<bool, MigrateError> {
        match kind {
            KIND_PAGES => {
                let staged = self
                    .decoder
                    .decode_frame_detached(p)
                    .map_err(|e| MigrateError::Verification(format!("page frame: {e}")))?;
                let mut n = 0;
                for (page, bytes) in staged.pages() {
                    let i = page as usize;
                    if !std::mem::take(&mut need[i]) {
                        return Err(MigrateError::Protocol(format!(
                            "page {page} was not stale or came twice"
                        )));
                    }
                    mem.fill(page, bytes)?;
                    self.digests.set(page, page_hash(bytes));
                    n += 1;
                }
                staged.placed_elsewhere();
                super::report::received(self.progress, n, p.len());
                Ok(false)
            }
            KIND_MSG => match parse_msg(p)? {
                SourceMsg::PostcopyDone(signed) => {
                    self.verify_final(&signed, need)?;
                    Ok(true)
                }
                other => Err(MigrateError::Protocol(format!(
                    "unexpected {other:?} in post-copy"
                ))),
            },
            k => Err(MigrateError::Protocol(format!(
                "unexpected frame kind {k} in post-copy"
            ))),
        }
    }

    fn verify_final(&mut self, signed: &SignedManifest, need: &[bool]) -> Result<(), MigrateError> {
        signed
            .verify(self.source_key)
            .map_err(MigrateError::Verification)?;
        let m = &signed.manifest;
        if m.migration != self.migration || m.frames + 1 != self.frames {
            return Err(MigrateError::Verification(
                "final manifest does not match this migration".into(),
            ));
        }
        if need.iter().any(|&n| n) {
            return Err(MigrateError::Verification(
                "post-copy ended with pages missing".into(),
            ));
        }
        if self.digests.root() != m.pages_root {
            return Err(MigrateError::Verification(
                "guest RAM here differs from the source's (page hash root mismatch)".into(),
            ));
        }
        Ok(())
    }
}
