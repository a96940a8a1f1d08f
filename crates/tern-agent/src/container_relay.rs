//! Live migration of containers through tern's channels: a CRIU checkpoint
//! as one signed archive ([`tern_drivers::checkpoint`]), carried on the
//! migration's data session, verified, unpacked and restored under the
//! same commit rule as every guest.
//!
//! ```text
//! source                                    destination
//!   Start{compress}                   ->    Accept | Reject{reason}
//!   journal CommitDecided (before the downtime, as for VMs)
//!   dump (the container stops: downtime begins)
//!   Checkpoint{signed manifest, bytes} ->   signer checked before a byte is kept
//!   archive chunks, StreamEnd         ->    every entry checked, unpacked whole
//!                                     <-    Loaded (bundle ready, not running)
//!   Commit{last_tick}                 ->    journal CommitReceived, restore
//!                                     <-    Running (downtime ends)
//!                                     <-    Verified{ok, detail} (the counter went on)
//!   remove the dumped container
//! ```
//!
//! In post-copy (and hybrid) mode the dump is lazy ([`lazy`]): the
//! archive carries everything but the memory, which CRIU's page server
//! keeps on the source; after `Commit` the destination restores at once
//! and pulls the pages through the same sessions (its page requests as
//! return-path bytes, the pages as stream bytes), so the downtime carries
//! no memory.
//!
//! Before `Commit` any failure (a refused archive, a broken link, a
//! destination that cannot take it) restores the container on the source
//! from its own images (or, for a lazy dump, lets the frozen container
//! run on). A destination whose restore fails after `Commit`
//! runs nothing (CRIU ends what it half restored, and the container is
//! reaped) before it says `Failed`, and the source restores its own: one
//! copy runs either way. The CRIU images carry the
//! container's memory, open files, pipes, shared memory and established
//! TCP connections (`--tcp-established`).

use crate::config::ContainerHost;
use crate::container::{self, ContainerGuest};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_drivers::checkpoint::{self, SignedCheckpoint};
use tern_drivers::runc::LazyDump;
use tern_migrate::protocol::msg_frame;
use tern_migrate::relay::{
    decode, Compress, Incoming, Packer, RelayDestMsg, RelaySourceMsg, Unpacker, CHUNK, KIND_STREAM,
};
use tern_migrate::{
    CommitHook, CommitStep, GuestError, MigrateError, MigrationPhase, Mode, Outcome, Policy,
    Progress, Report, SourceCommitHook,
};

mod lazy;
use tern_transport::{Receiver, Sender};
use tokio::sync::watch;

/// How long the destination may take to check and unpack an archive, and
/// to restore it, before the source gives up on it.
const LOAD_WAIT: Duration = Duration::from_secs(300);
/// How long the destination watches the restored workload for its counter
/// to pass the source's last value.
const VERIFY_WAIT: Duration = Duration::from_secs(20);
/// The most a manifest may take on the wire (it names every file).
const MAX_MANIFEST: usize = 64 << 20;

fn guest_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Guest(GuestError(e.to_string()))
}

/// What the source side needs besides the links.
pub struct SourceArgs<'a> {
    /// Its VM id (the archive names it).
    pub vm: &'a str,
    /// Timeouts (the reply wait), bandwidth.
    pub policy: &'a Policy,
    /// Chunk compression.
    pub compress: Compress,
    /// Signs the archive's manifest.
    pub key: &'a SigningKey,
    /// Published as it goes.
    pub progress: watch::Sender<Progress>,
}

/// Migrates a container away. [`Outcome::Moved`]: the destination runs it;
/// [`Outcome::Stayed`]: it runs here again (restored from its own images);
/// [`Outcome::InDoubt`]: it is kept dumped here to be settled.
pub async fn source(
    args: SourceArgs<'_>,
    guest: &mut ContainerGuest,
    data: Sender,
    mut replies: Receiver,
    before_commit: SourceCommitHook<'_>,
) -> Outcome {
    if args.policy.bandwidth_bytes_per_sec > 0 {
        data.set_rate(args.policy.bandwidth_bytes_per_sec);
    }
    let mut s = Source {
        report: Report::default(),
        committed: false,
        t0: Instant::now(),
        lazy: None,
    };
    s.report.phase = MigrationPhase::Requesting;
    args.progress
        .send_modify(|p| p.phase = MigrationPhase::Requesting);
    let res = s
        .run(&args, guest, &data, &mut replies, before_commit)
        .await;
    s.report.total_ms = s.t0.elapsed().as_secs_f64() * 1e3;
    let _ = tokio::time::timeout(Duration::from_secs(5), data.finish()).await;
    match res {
        Ok(fault) => {
            s.report.phase = if fault.is_some() {
                MigrationPhase::Corrupted
            } else {
                MigrationPhase::Committed
            };
            Outcome::Moved {
                report: s.report,
                fault,
            }
        }
        Err(error) if s.committed => {
            s.report.phase = MigrationPhase::CommitInDoubt;
            Outcome::InDoubt {
                report: s.report,
                error: MigrateError::CommitUnconfirmed(Box::new(error)),
            }
        }
        Err(error) => {
            s.report.phase = MigrationPhase::RolledBack;
            Outcome::Stayed {
                report: s.report,
                error,
            }
        }
    }
}

/// One outgoing container migration.
struct Source {
    report: Report,
    /// `Commit` went out.
    committed: bool,
    t0: Instant,
    /// A lazy dump's page server, while it holds the container's memory.
    lazy: Option<LazyDump>,
}

impl Source {
    /// Returns a fault after commit (the guest's own check failed), if any.
    async fn run(
        &mut self,
        a: &SourceArgs<'_>,
        guest: &mut ContainerGuest,
        data: &Sender,
        replies: &mut Receiver,
        before_commit: SourceCommitHook<'_>,
    ) -> Result<Option<MigrateError>, MigrateError> {
        let lazily = a.policy.mode != Mode::Precopy;
        let start = RelaySourceMsg::Start {
            mode: if lazily { "postcopy" } else { "precopy" }.into(),
            compress: a.compress,
        };
        data.send(msg_frame(&start)).await?;
        match next_reply(replies, a.policy.reply_timeout, "the destination's accept").await? {
            RelayDestMsg::Accept => {}
            RelayDestMsg::Reject { reason } => return Err(MigrateError::Rejected(reason)),
            other => return Err(unexpected("accept", &other)),
        }
        // Everything that can be done with the container running is done,
        // the commit record among them (its disk flush is no part of the
        // downtime, as for VMs): downtime starts with the dump.
        let record = Instant::now();
        before_commit(CommitStep::Switchover).map_err(MigrateError::CommitRecord)?;
        self.report.switchover.commit_record_ms = ms(record);
        let scratch = guest.home().join("out");
        let frozen = Instant::now();
        self.report.phase = MigrationPhase::Switchover;
        a.progress
            .send_modify(|p| p.phase = MigrationPhase::Switchover);
        let images = if lazily {
            let (images, dump) =
                tokio::task::block_in_place(|| guest.dump_lazy(&scratch)).map_err(guest_err)?;
            self.lazy = Some(dump);
            images
        } else {
            tokio::task::block_in_place(|| guest.dump(&scratch)).map_err(guest_err)?
        };
        let last_tick = guest.counter();
        self.report.switchover.pause_ms = ms(frozen);
        let sent = Instant::now();
        let res = self.send_checkpoint(a, guest, data, replies, &images).await;
        if let Err(e) = res {
            return Err(self.restore_after(guest, e));
        }
        self.report.switchover.send_ms = ms(sent);
        let loaded = Instant::now();
        let res =
            match next_reply(replies, LOAD_WAIT, "the destination to load the checkpoint").await {
                Ok(RelayDestMsg::Loaded) => Ok(()),
                Ok(RelayDestMsg::Failed { reason } | RelayDestMsg::Reject { reason }) => {
                    Err(MigrateError::DestinationFailed(reason))
                }
                Ok(other) => Err(unexpected("loaded", &other)),
                Err(e) => Err(e),
            };
        if let Err(e) = res {
            return Err(self.restore_after(guest, e));
        }
        self.report.switchover.ready_ms = ms(loaded);
        a.progress.send_modify(|p| p.destination_ready = true);
        if let Err(e) = before_commit(CommitStep::Commit) {
            return Err(self.restore_after(guest, MigrateError::CommitRecord(e)));
        }
        let commit = Instant::now();
        let msg = RelaySourceMsg::Commit {
            last_tick: Some(last_tick),
        };
        self.committed = true;
        data.send(msg_frame(&msg)).await?;
        if let Some(dump) = self.lazy.take() {
            let packer = Packer::new(a.compress).map_err(guest_err)?;
            let mut serve = lazy::Serve::new(dump, commit, frozen, packer);
            return serve.run(self, a, guest, data, replies).await;
        }
        match next_reply(replies, LOAD_WAIT, "the destination to run the container").await? {
            RelayDestMsg::Running => {}
            RelayDestMsg::Failed { reason } => {
                // Nothing runs there: it reaped its container before saying so.
                self.committed = false;
                return Err(self.restore_after(guest, MigrateError::DestinationFailed(reason)));
            }
            other => return Err(unexpected("running", &other)),
        }
        self.report.switchover.running_ms = ms(commit);
        self.report.downtime_ms = ms(frozen);
        a.progress
            .send_modify(|p| p.phase = MigrationPhase::Committed);
        // The verdict is the destination's to act on; it is reported here.
        let fault = match next_reply(replies, VERIFY_WAIT * 2, "the restored container's check")
            .await
        {
            Ok(RelayDestMsg::Verified { ok: true, .. }) => None,
            Ok(RelayDestMsg::Verified { ok: false, detail }) => {
                Some(MigrateError::Verification(detail))
            }
            Ok(other) => Some(unexpected("verified", &other)),
            Err(e) => {
                tracing::warn!(error = %e, "no verdict from the destination after it ran the container");
                None
            }
        };
        Ok(fault)
    }

    /// Sends the signed manifest of the dumped images and rootfs, then the
    /// archive itself, written straight into the session (no file between).
    async fn send_checkpoint(
        &mut self,
        a: &SourceArgs<'_>,
        guest: &ContainerGuest,
        data: &Sender,
        replies: &mut Receiver,
        images: &Path,
    ) -> Result<(), MigrateError> {
        let parts = [images.to_path_buf(), guest.rootfs()];
        let manifest = tokio::task::block_in_place(|| {
            checkpoint::manifest(a.vm, &[("images", &parts[0]), ("rootfs", &parts[1])])
        })
        .map_err(guest_err)?;
        let bytes = checkpoint::archive_bound(&manifest);
        let fault = Fault::from_env();
        let signed = fault.sign(manifest.clone(), a.key);
        self.report.memory_bytes = bytes;
        a.progress.send_modify(|p| p.memory_bytes = bytes);
        let manifest_json = serde_json::to_string(&signed).expect("manifests serialize");
        let msg = RelaySourceMsg::Checkpoint {
            manifest: manifest_json,
            bytes,
        };
        data.send(msg_frame(&msg)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let corrupt_at = fault.corrupt_at(bytes);
        let writer = tokio::task::spawn_blocking(move || {
            let out = ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
                offset: 0,
                corrupt_at,
            };
            let parts = [
                ("images", parts[0].as_path()),
                ("rootfs", parts[1].as_path()),
            ];
            checkpoint::write_archive(&parts, &manifest, out)
        });
        // A refusal (a manifest the destination would not take) ends the
        // stream early (`recv` loses nothing when it is dropped).
        tokio::select! {
            r = self.stream(a, data, rx, writer) => r,
            m = next_reply(replies, LOAD_WAIT * 4, "the destination while sending") => match m {
                Ok(RelayDestMsg::Failed { reason }) => Err(MigrateError::DestinationFailed(reason)),
                Ok(other) => Err(unexpected("nothing while sending", &other)),
                Err(e) => Err(e),
            },
        }
    }

    /// Sends the archive's chunks as the writer makes them, then `StreamEnd`.
    async fn stream(
        &mut self,
        a: &SourceArgs<'_>,
        data: &Sender,
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        writer: tokio::task::JoinHandle<Result<(), checkpoint::CheckpointError>>,
    ) -> Result<(), MigrateError> {
        let mut packer = Packer::new(a.compress).map_err(guest_err)?;
        while let Some(chunk) = rx.recv().await {
            let packed = packer.frame(KIND_STREAM, &chunk).map_err(guest_err)?;
            self.report.wire_bytes += packed.len() as u64 - 1;
            data.send(packed).await?;
            let wire = self.report.wire_bytes;
            a.progress.send_modify(|p| p.wire_bytes = wire);
        }
        writer
            .await
            .map_err(|e| guest_err(format!("the archive writer: {e}")))?
            .map_err(guest_err)?;
        data.send(msg_frame(&RelaySourceMsg::StreamEnd)).await?;
        Ok(())
    }

    /// Runs the container here again after `e` (before commit).
    fn restore_after(&mut self, guest: &mut ContainerGuest, e: MigrateError) -> MigrateError {
        let lazy = self.lazy.take();
        let again = tokio::task::block_in_place(|| match lazy {
            Some(dump) => guest.resume_lazy(dump, None),
            None => guest.restore(),
        });
        match again {
            Ok(()) => e,
            Err(r) => {
                tracing::error!(error = %r, "restoring the container on the source failed");
                MigrateError::Guest(GuestError(format!(
                    "{e}; and restoring it here failed: {r}"
                )))
            }
        }
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn unexpected(wanted: &str, got: &RelayDestMsg) -> MigrateError {
    MigrateError::Protocol(format!("expected {wanted}, got {got:?}"))
}

async fn next_reply(
    replies: &mut Receiver,
    within: Duration,
    waiting_for: &'static str,
) -> Result<RelayDestMsg, MigrateError> {
    match next_incoming(replies, within, waiting_for).await? {
        Incoming::Msg(m) => Ok(m),
        Incoming::Bytes(k, _) => Err(MigrateError::Protocol(format!(
            "unexpected stream bytes (kind {k}) from the destination"
        ))),
    }
}

/// The destination's next frame, message or return-path bytes.
async fn next_incoming(
    replies: &mut Receiver,
    within: Duration,
    waiting_for: &'static str,
) -> Result<Incoming<RelayDestMsg>, MigrateError> {
    let (seq, f) = tokio::time::timeout(within, replies.recv())
        .await
        .map_err(|_| MigrateError::Timeout {
            waiting_for,
            after: within,
        })?
        .ok_or(MigrateError::Closed("replies"))??;
    replies.ack(seq);
    decode::<RelayDestMsg>(&f)
}

/// Failure injection (`TERN_FAULT_CHECKPOINT` in the agent's environment,
/// which its guest processes inherit): `forge` signs the checkpoint with a
/// key no peer knows, `corrupt` flips a byte of the archive after signing.
enum Fault {
    None,
    Forge,
    Corrupt,
}

impl Fault {
    fn from_env() -> Self {
        match std::env::var("TERN_FAULT_CHECKPOINT").as_deref() {
            Ok("forge") => Fault::Forge,
            Ok("corrupt") => Fault::Corrupt,
            _ => Fault::None,
        }
    }

    fn sign(&self, m: checkpoint::CheckpointManifest, key: &SigningKey) -> SignedCheckpoint {
        if let Fault::Forge = self {
            tracing::warn!("fault injection: signing the checkpoint with a forged key");
            return m.sign(&SigningKey::from_bytes(&rand::random()));
        }
        m.sign(key)
    }

    /// Where to flip a byte of an archive of at most `bound` bytes.
    fn corrupt_at(&self, bound: u64) -> Option<u64> {
        matches!(self, Fault::Corrupt).then(|| {
            tracing::warn!("fault injection: corrupting the checkpoint after signing it");
            bound / 3
        })
    }
}

/// The archive writer's output: chunks of at most [`CHUNK`] bytes handed to
/// the task that sends them (a full channel holds the writer back).
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    offset: u64,
    corrupt_at: Option<u64>,
}

impl ChunkWriter {
    fn ship(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the send ended"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(CHUNK - self.buf.len());
        let start = self.buf.len();
        self.buf.extend_from_slice(&b[..n]);
        if let Some(at) = self.corrupt_at {
            if (self.offset..self.offset + n as u64).contains(&at) {
                self.buf[start + (at - self.offset) as usize] ^= 0x20;
            }
        }
        self.offset += n as u64;
        if self.buf.len() == CHUNK {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.ship()
    }
}

/// What the destination side needs besides the links.
pub struct DestArgs<'a> {
    /// The guest process's directory.
    pub vm_dir: PathBuf,
    /// The VM.
    pub vm: &'a str,
    /// What it runs.
    pub spec: &'a tern_proto::GuestSpec,
    /// This host's `[container]`, if it hosts containers.
    pub host: Option<&'a ContainerHost>,
    /// This host's name.
    pub host_name: &'a str,
    /// The source host's manifest key: only an archive it signed is kept.
    pub source_key: VerifyingKey,
    /// Published as it goes.
    pub progress: watch::Sender<Progress>,
}

/// Receives a container. Returns it running once committed; an error
/// carries it only when it was committed and restored here.
pub async fn destination(
    args: DestArgs<'_>,
    mut data: Receiver,
    replies: Sender,
    on_commit: CommitHook<'_>,
) -> Result<ContainerGuest, (MigrateError, Option<ContainerGuest>)> {
    let (compress, lazily) = match read_start(&mut data).await {
        Ok(c) => c,
        Err(e) => return Err((e, None)),
    };
    let refuse = match args.host {
        None => Some("this host runs no containers (no [container] in its config)".to_string()),
        Some(h) => container::runc(&args.vm_dir, h).err(),
    };
    if let Some(reason) = refuse {
        let _ = replies
            .send(msg_frame(&RelayDestMsg::Reject {
                reason: reason.clone(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
        return Err((MigrateError::Rejected(reason), None));
    }
    let mut d = Dest {
        args: &args,
        compress,
        lazily,
        replies: &replies,
    };
    let res = d.run(&mut data, on_commit).await;
    if let Err(e) = &res {
        let reason = e.to_string();
        let _ = replies
            .send(msg_frame(&RelayDestMsg::Failed { reason }))
            .await;
        tokio::task::block_in_place(|| container::reap(&args.vm_dir));
        let _ = std::fs::remove_dir_all(container::home(&args.vm_dir));
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), replies.finish()).await;
    res.map_err(|e| (e, None))
}

/// The source's `Start`: its chunk compression, and whether its dump is
/// lazy (post-copy and hybrid).
async fn read_start(data: &mut Receiver) -> Result<(Compress, bool), MigrateError> {
    let (seq, f) = data.recv().await.ok_or(MigrateError::Closed("data"))??;
    data.ack(seq);
    match decode::<RelaySourceMsg>(&f)? {
        Incoming::Msg(RelaySourceMsg::Start { compress, mode }) => {
            Ok((compress, mode != "precopy"))
        }
        other => Err(MigrateError::Protocol(format!(
            "expected start, got {other:?}"
        ))),
    }
}

/// One incoming container migration.
struct Dest<'a> {
    args: &'a DestArgs<'a>,
    compress: Compress,
    /// The source's dump is lazy: its memory follows the restore.
    lazily: bool,
    replies: &'a Sender,
}

/// The archive as it arrives: its chunks go to the unpacker (a blocking
/// task that checks every entry as it writes it), nothing is kept whole.
struct Landing {
    bytes: u64,
    written: u64,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    unpacker: tokio::task::JoinHandle<Result<(), checkpoint::CheckpointError>>,
}

/// The unpacker's input: the chunks the session delivered, in order; the
/// end of the stream once the sender is dropped.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Dest<'_> {
    async fn run(
        &mut self,
        data: &mut Receiver,
        on_commit: CommitHook<'_>,
    ) -> Result<ContainerGuest, MigrateError> {
        self.replies.send(msg_frame(&RelayDestMsg::Accept)).await?;
        let mut landing: Option<Landing> = None;
        let mut guest: Option<ContainerGuest> = None;
        let mut unpacker = Unpacker::new(self.compress).map_err(MigrateError::Protocol)?;
        loop {
            let (seq, f) = data.recv().await.ok_or(MigrateError::Closed("data"))??;
            data.ack(seq);
            match decode::<RelaySourceMsg>(&f)? {
                Incoming::Msg(RelaySourceMsg::Checkpoint { manifest, bytes })
                    if landing.is_none() =>
                {
                    landing = Some(self.open(&manifest, bytes)?);
                }
                Incoming::Bytes(KIND_STREAM, p) => {
                    let l = landing.as_mut().ok_or_else(|| {
                        MigrateError::Protocol("archive bytes before its manifest".into())
                    })?;
                    let chunk = unpacker.unpack(&p).map_err(MigrateError::Protocol)?;
                    let len = chunk.len() as u64;
                    l.written += len;
                    if l.written > l.bytes {
                        return Err(MigrateError::Verification(format!(
                            "the archive runs past the {} bytes announced",
                            l.bytes
                        )));
                    }
                    if tokio::task::block_in_place(|| l.tx.send(chunk.into_owned())).is_err() {
                        // The unpacker stopped: it found something wrong.
                        let l = landing.take().expect("checked above");
                        return Err(finish(l).await.err().unwrap_or_else(|| {
                            MigrateError::Verification("the archive ended early".into())
                        }));
                    }
                    self.args.progress.send_modify(|p| p.wire_bytes += len);
                }
                Incoming::Msg(RelaySourceMsg::StreamEnd) if guest.is_none() => {
                    let l = landing.take().ok_or_else(|| {
                        MigrateError::Protocol("stream end before a checkpoint".into())
                    })?;
                    finish(l).await?;
                    guest = Some(tokio::task::block_in_place(|| self.land())?);
                    self.replies.send(msg_frame(&RelayDestMsg::Loaded)).await?;
                }
                Incoming::Msg(RelaySourceMsg::Commit { last_tick }) => {
                    let mut g = guest.take().ok_or_else(|| {
                        MigrateError::Protocol("commit before the checkpoint landed".into())
                    })?;
                    on_commit().map_err(MigrateError::CommitRecord)?;
                    if self.lazily {
                        let last = last_tick.unwrap_or(0);
                        let pages = Unpacker::new(self.compress).map_err(MigrateError::Protocol)?;
                        return lazy::Land::new(self, last, pages).run(g, data).await;
                    }
                    tokio::task::block_in_place(|| g.restore()).map_err(guest_err)?;
                    self.args
                        .progress
                        .send_modify(|p| p.phase = MigrationPhase::Committed);
                    self.replies.send(msg_frame(&RelayDestMsg::Running)).await?;
                    let (ok, detail) = verify(&g, last_tick.unwrap_or(0)).await;
                    if !ok {
                        tracing::error!(detail, "the restored container's check failed");
                    }
                    let _ = self
                        .replies
                        .send(msg_frame(&RelayDestMsg::Verified { ok, detail }))
                        .await;
                    return Ok(g);
                }
                Incoming::Msg(RelaySourceMsg::Abort { reason }) => {
                    return Err(MigrateError::Aborted(reason))
                }
                other => {
                    return Err(MigrateError::Protocol(format!(
                        "unexpected {other:?} in a container migration"
                    )))
                }
            }
        }
    }

    /// Checks the manifest's signer and size before anything is kept.
    fn open(&self, manifest: &str, bytes: u64) -> Result<Landing, MigrateError> {
        if manifest.len() > MAX_MANIFEST {
            return Err(MigrateError::Verification(
                "the manifest is too large".into(),
            ));
        }
        let signed: SignedCheckpoint = serde_json::from_str(manifest)
            .map_err(|e| MigrateError::Protocol(format!("bad checkpoint manifest: {e}")))?;
        signed
            .verify(&self.args.source_key)
            .map_err(|e| MigrateError::Verification(e.to_string()))?;
        let max = (self.args.spec.memory_mib << 20) + (4 << 30);
        if bytes > max {
            return Err(MigrateError::Verification(format!(
                "a checkpoint of {bytes} bytes is more than a container of {} MiB needs",
                self.args.spec.memory_mib
            )));
        }
        let home = container::home(&self.args.vm_dir);
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).map_err(guest_err)?;
        let dest = container::bundle_dir(&self.args.vm_dir);
        let key = self.args.source_key;
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        let unpacker = tokio::task::spawn_blocking(move || {
            let reader = ChunkReader {
                rx,
                chunk: Vec::new(),
                pos: 0,
            };
            checkpoint::unpack(std::io::BufReader::new(reader), &signed, &key, &dest)
        });
        Ok(Landing {
            bytes,
            written: 0,
            tx,
            unpacker,
        })
    }

    /// The container of the bundle the archive became.
    fn land(&self) -> Result<ContainerGuest, MigrateError> {
        let at = container::Placement {
            vm: self.args.vm,
            host_name: self.args.host_name,
            host: self.args.host.expect("checked at start"),
        };
        ContainerGuest::landed(&self.args.vm_dir, &at, self.args.spec).map_err(guest_err)
    }
}

/// Ends the archive's stream and waits for the unpacker's verdict.
async fn finish(l: Landing) -> Result<(), MigrateError> {
    drop(l.tx);
    l.unpacker
        .await
        .map_err(|e| guest_err(format!("the unpacker: {e}")))?
        .map_err(|e| MigrateError::Verification(e.to_string()))
}

/// Whether the restored workload carries on from `last_tick` with its
/// continuity intact.
async fn verify(g: &ContainerGuest, last_tick: u64) -> (bool, String) {
    let t = Instant::now();
    loop {
        if let Some(why) = g.broken() {
            return (false, format!("the workload broke: {}", why.trim()));
        }
        let n = g.counter();
        if n > last_tick {
            return (true, format!("counter {last_tick} -> {n}"));
        }
        if t.elapsed() > VERIFY_WAIT {
            return (
                false,
                format!("the counter stayed at {n} (the source stopped at {last_tick})"),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
