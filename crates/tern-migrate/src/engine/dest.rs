//! The destination side: accept or refuse, take pages in, verify
//! everything against the signed manifest, load, commit, run.

use super::digests::PageDigests;
use super::pages::page_hash;
use super::postcopy::{self, Incoming};
use super::replies::{next, next_msg, parse_msg};
use super::report::received;
use super::{CommitHook, DestLink, MigrateError, MigrationPhase, Progress, PAGE};
use crate::guest::{DestinationGuest, PostcopyMemory};
use crate::protocol::*;
use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use std::time::Duration;
use tern_pagecodec::Decoder;
use tern_transport::{Receiver, Sender};
use tokio::sync::watch;

/// Limits the destination enforces on requests.
#[derive(Clone, Debug)]
pub struct Capacity {
    /// Largest guest RAM accepted.
    pub max_memory_bytes: u64,
    /// Most vCPUs.
    pub max_vcpus: u8,
}

/// Receives one migration. Returns the running guest; on failure nothing
/// is kept and the source is told why.
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
    let progress = watch::channel(Progress::default()).0;
    receive_observed(
        link,
        make_guest,
        source_key,
        capacity,
        &mut || Ok(()),
        &progress,
    )
    .await
}

/// [`receive`], calling `on_commit` when `Commit` arrives, before the guest
/// starts, and publishing where it stands on `progress`: the phase (the
/// source's pause shows as `Switchover`, then `Postcopy` while pages still
/// come), the round, and the pages and bytes received (`pages_sent`,
/// `wire_bytes`; in post-copy `pages_remaining` counts down). Its caller
/// sets the final phase.
pub async fn receive_observed<G, F>(
    link: DestLink,
    make_guest: F,
    source_key: &VerifyingKey,
    capacity: &Capacity,
    on_commit: CommitHook<'_>,
    progress: &watch::Sender<Progress>,
) -> Result<G, MigrateError>
where
    G: DestinationGuest,
    F: FnOnce(&MigrationRequest) -> Result<G, String>,
{
    let DestLink { mut data, replies } = link;
    let res = async {
        let (req, guest) = accept(&mut data, &replies, make_guest, capacity).await?;
        let mut dest = Dest::new(&req, guest, source_key, progress);
        dest.take_in(&mut data).await?;
        let postcopy = dest.verify_and_load()?;
        replies.send(msg_frame(&DestMsg::Ready)).await?;
        progress.send_modify(|p| p.destination_ready = true);
        dest.guest.prepare_to_start()?;
        await_commit(&mut data).await?;
        on_commit().map_err(MigrateError::CommitRecord)?;
        dest.guest.start()?;
        replies.send(msg_frame(&DestMsg::Running)).await?;
        if let Some(mem) = postcopy {
            dest.finish_postcopy(&mut data, &replies, mem)
                .await
                .map_err(|e| MigrateError::PostcopyFailed(Box::new(e)))?;
        }
        Ok(dest.guest)
    }
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

/// Reads the request, checks it against this host, makes the guest and
/// answers `Accept`.
async fn accept<G, F>(
    data: &mut Receiver,
    replies: &Sender,
    make_guest: F,
    capacity: &Capacity,
) -> Result<(MigrationRequest, G), MigrateError>
where
    F: FnOnce(&MigrationRequest) -> Result<G, String>,
{
    let req = match next_msg(data, "a request").await? {
        SourceMsg::Request(r) => r,
        other => {
            return Err(MigrateError::Protocol(format!(
                "expected a request, got {other:?}"
            )))
        }
    };
    check_request(&req, capacity)?;
    let guest = make_guest(&req).map_err(MigrateError::Rejected)?;
    replies.send(msg_frame(&DestMsg::Accept)).await?;
    Ok((req, guest))
}

/// Refuses what this host cannot run: missing CPU features, too large, or
/// a memory size that is not whole pages.
fn check_request(req: &MigrationRequest, capacity: &Capacity) -> Result<(), MigrateError> {
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
    if s.memory_bytes == 0 || !s.memory_bytes.is_multiple_of(PAGE as u64) {
        return Err(MigrateError::Rejected(format!(
            "bad memory size {}",
            s.memory_bytes
        )));
    }
    Ok(())
}

/// Waits for `Commit` (or the source's abort).
async fn await_commit(data: &mut Receiver) -> Result<(), MigrateError> {
    match next_msg(data, "commit").await? {
        SourceMsg::Commit => Ok(()),
        SourceMsg::Abort { reason } => Err(MigrateError::Aborted(reason)),
        other => Err(MigrateError::Protocol(format!(
            "expected commit, got {other:?}"
        ))),
    }
}

/// One incoming migration, after `Accept`.
struct Dest<'a, G> {
    guest: G,
    migration: String,
    memory_bytes: u64,
    source_key: &'a VerifyingKey,
    decoder: Decoder,
    /// Each page's hash as it now stands here, updated as frames land so
    /// switchover verifies a root, not all of RAM (fresh RAM is zero).
    digests: PageDigests,
    state: Option<Bytes>,
    /// Post-copy: the pages the source still has to send, as runs, and
    /// how many.
    stale: Option<(Vec<(u64, u64)>, u64)>,
    signed: Option<SignedManifest>,
    /// Frames received (the request counts).
    frames: u64,
    progress: &'a watch::Sender<Progress>,
}

impl<'a, G: DestinationGuest> Dest<'a, G> {
    fn new(
        req: &MigrationRequest,
        guest: G,
        source_key: &'a VerifyingKey,
        progress: &'a watch::Sender<Progress>,
    ) -> Self {
        let n_pages = req.shape.memory_bytes / PAGE as u64;
        progress.send_modify(|p| {
            p.phase = MigrationPhase::Precopy;
            p.memory_bytes = req.shape.memory_bytes;
        });
        Self {
            guest,
            migration: req.migration.clone(),
            memory_bytes: req.shape.memory_bytes,
            source_key,
            decoder: Decoder::new(n_pages),
            digests: PageDigests::new(n_pages),
            state: None,
            stale: None,
            signed: None,
            frames: 1,
            progress,
        }
    }

    /// Takes frames in until the switchover manifest.
    async fn take_in(&mut self, data: &mut Receiver) -> Result<(), MigrateError> {
        let n_pages = self.digests.len() as u64;
        loop {
            let (kind, p) = next(data).await?;
            match kind {
                KIND_PAGES => self.land(&p)?,
                KIND_DEVICE_STATE => self.state = Some(p),
                KIND_MSG => match parse_msg(&p)? {
                    // The source sends on: fold this round into the
                    // digests now, not at switchover.
                    SourceMsg::RoundEnd { round, .. } => {
                        self.digests.refresh();
                        self.progress.send_modify(|p| p.round = round);
                    }
                    SourceMsg::Postcopy { stale: runs } => {
                        let n = check_runs(&runs, n_pages).map_err(MigrateError::Protocol)?;
                        self.stale = Some((runs, n));
                        self.switching_over(n);
                    }
                    SourceMsg::Manifest(m) => {
                        if self.stale.is_none() {
                            self.switching_over(0);
                        }
                        self.signed = Some(m);
                        return Ok(());
                    }
                    SourceMsg::Abort { reason } => return Err(MigrateError::Aborted(reason)),
                    other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
                },
                k => return Err(MigrateError::Protocol(format!("unknown frame kind {k}"))),
            }
            self.frames += 1;
        }
    }

    /// Decodes a page frame into guest RAM and rehashes its pages.
    fn land(&mut self, p: &[u8]) -> Result<(), MigrateError> {
        let refused = |e| MigrateError::Verification(format!("page frame: {e}"));
        let staged = self
            .decoder
            .stage(p, self.guest.ram_mut()?)
            .map_err(refused)?;
        for &(first, pages) in staged.fresh_runs() {
            self.guest.prefault(first, pages);
        }
        let mut n = 0;
        for (page, bytes) in staged.pages() {
            self.digests.set(page, page_hash(bytes));
            n += 1;
        }
        staged.commit(self.guest.ram_mut()?).map_err(refused)?;
        received(self.progress, n, p.len());
        Ok(())
    }

    /// The source paused its guest: what is left comes now (in post-copy,
    /// its `stale` pages after the guest starts here).
    fn switching_over(&self, stale: u64) {
        self.progress.send_modify(|p| {
            p.phase = MigrationPhase::Switchover;
            p.pages_remaining = stale;
        });
    }

    /// Verifies everything before the guest may run, then loads its state;
    /// returns the post-copy memory when pages are still to come.
    fn verify_and_load(&mut self) -> Result<Option<Box<dyn PostcopyMemory>>, MigrateError> {
        let signed = self.signed.as_ref().expect("take_in ends at the manifest");
        signed
            .verify(self.source_key)
            .map_err(MigrateError::Verification)?;
        let m = &signed.manifest;
        if m.migration != self.migration || m.memory_bytes != self.memory_bytes {
            return Err(MigrateError::Verification(
                "manifest is for another migration".into(),
            ));
        }
        if m.frames != self.frames {
            return Err(MigrateError::Verification(format!(
                "manifest counts {} frames, {} arrived",
                m.frames, self.frames
            )));
        }
        let state = self
            .state
            .take()
            .ok_or_else(|| MigrateError::Verification("no device state".into()))?;
        if blake3::hash(&state).to_hex().as_str() != m.device_state {
            return Err(MigrateError::Verification(
                "device state hash mismatch".into(),
            ));
        }
        let postcopy = match (&self.stale, m.postcopy_pages) {
            (None, 0) if self.digests.root() == m.pages_root => None,
            (None, 0) => {
                return Err(MigrateError::Verification(
                    "guest RAM here differs from the source's (page hash root mismatch)".into(),
                ))
            }
            (Some((runs, pages)), n) if *pages == n => Some(self.guest.enter_postcopy(runs)?),
            _ => {
                return Err(MigrateError::Verification(
                    "the manifest and the post-copy page list disagree".into(),
                ))
            }
        };
        self.guest.load_device_state(&state)?;
        Ok(postcopy)
    }

    /// Runs post-copy to its end with the guest running.
    async fn finish_postcopy(
        &mut self,
        data: &mut Receiver,
        replies: &Sender,
        mem: Box<dyn PostcopyMemory>,
    ) -> Result<(), MigrateError> {
        let (stale, _) = self.stale.take().unwrap_or_default();
        let inc = Incoming {
            data,
            replies,
            decoder: &mut self.decoder,
            digests: &mut self.digests,
            source_key: self.source_key,
            migration: &self.migration,
            frames: self.frames + 1,
            progress: self.progress,
        };
        postcopy::serve(inc, mem.into(), &stale).await
    }
}
