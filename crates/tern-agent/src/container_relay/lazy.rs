//! The lazy half of a container migration: after `Commit`, CRIU's page
//! server on the source and the `criu lazy-pages` daemon on the destination
//! talk through the migration's sessions.
//!
//! ```text
//! source                                        destination
//!   CRIU page server (loopback)                   relay listener (loopback)
//!                                                 restore --lazy-pages, daemon dials the relay
//!                                          <-     Running (downtime ends)
//!   connect on the first request           <-     KIND_RETURN bytes (page requests)
//!   KIND_STREAM bytes (pages)              ->     to the daemon
//!                                          <-     empty KIND_RETURN: the daemon closed its side
//!   close CRIU's request side; CRIU closes ->     StreamEnd
//!                                          <-     Verified
//!   the dump ends the container here              the daemon exits
//! ```
//!
//! One copy, always:
//! - The destination says `Failed` only while its container never ran
//!   (its restore failed): the source then lets its frozen copy run on.
//! - Once it ran, its memory is split between the hosts. A transfer that
//!   fails then ends it on the destination (a guest missing pages cannot
//!   go on) and the source ends its frozen copy too: the container is lost,
//!   and both sides say so. The sessions resume across short link cuts, so
//!   only a link down past the resume deadline comes to that; precopy mode
//!   never risks it.
//! - A link lost before `Running` leaves the source in doubt: its copy is
//!   frozen by its cgroup and kept whole, to be settled as any commit in
//!   doubt.

use super::{
    guest_err, ms, next_incoming, ContainerGuest, Dest, Source, SourceArgs, LOAD_WAIT, VERIFY_WAIT,
};
use bytes::Bytes;
use std::time::{Duration, Instant};
use tern_drivers::runc::LazyDump;
use tern_migrate::protocol::{frame, msg_frame};
use tern_migrate::relay::{
    decode, Incoming, Packer, RelayDestMsg, RelaySourceMsg, Unpacker, CHUNK, KIND_RETURN,
    KIND_STREAM,
};
use tern_migrate::{MigrateError, MigrationPhase};
use tern_transport::{Receiver, Sender};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `conn` when there is one; never ready otherwise.
async fn read_some(conn: &mut Option<TcpStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match conn {
        Some(c) => c.read(buf).await,
        None => std::future::pending().await,
    }
}

fn io_err(what: &str, e: std::io::Error) -> MigrateError {
    guest_err(format!("{what}: {e}"))
}

/// The source after `Commit`: serves the container's pages until the
/// destination has them all.
pub(super) struct Serve {
    dump: Option<LazyDump>,
    /// The connection to CRIU's page server, made on the first request.
    pages: Option<TcpStream>,
    commit: Instant,
    frozen: Instant,
    /// When the destination said `Running` (it ran the container).
    ran: Option<Instant>,
    /// CRIU closed its side: every page went.
    served_all: bool,
    verdict: Option<Option<MigrateError>>,
    /// The page stream's compression (a stream of its own, after the
    /// archive's).
    packer: Packer,
}

impl Serve {
    pub(super) fn new(dump: LazyDump, commit: Instant, frozen: Instant, packer: Packer) -> Self {
        Self {
            packer,
            dump: Some(dump),
            pages: None,
            commit,
            frozen,
            ran: None,
            served_all: false,
            verdict: None,
        }
    }

    /// Returns the destination's fault after it ran the container, if any;
    /// an error with `s.committed` still set leaves the source in doubt
    /// (its copy held frozen and whole).
    pub(super) async fn run(
        &mut self,
        s: &mut Source,
        a: &SourceArgs<'_>,
        guest: &mut ContainerGuest,
        data: &Sender,
        replies: &mut Receiver,
    ) -> Result<Option<MigrateError>, MigrateError> {
        let mut buf = vec![0u8; CHUNK];
        while !(self.served_all && self.verdict.is_some()) {
            let step = tokio::select! {
                r = read_some(&mut self.pages, &mut buf), if !self.served_all => {
                    self.on_pages(s, a, data, r, &buf).await
                }
                m = next_incoming(replies, LOAD_WAIT, "the destination's page requests") => {
                    self.on_reply(s, a, guest, m).await
                }
            };
            if let Err(e) = step {
                return self.fail(s, guest, e);
            }
        }
        // The memory moved after the container ran: post-copy, as reported.
        s.report.postcopy = true;
        s.report.postcopy_ms = self.ran.map_or(0.0, ms);
        let dump = self.dump.take().expect("held until the end");
        if let Err(e) = tokio::task::spawn_blocking(move || dump.finish())
            .await
            .map_err(|e| guest_err(format!("the dump's end: {e}")))
            .and_then(|r| r.map_err(guest_err))
        {
            tracing::warn!(error = %e, "CRIU's lazy dump did not end cleanly after the transfer");
        }
        Ok(self.verdict.take().flatten())
    }

    async fn on_pages(
        &mut self,
        s: &mut Source,
        a: &SourceArgs<'_>,
        data: &Sender,
        r: std::io::Result<usize>,
        buf: &[u8],
    ) -> Result<(), MigrateError> {
        match r {
            Ok(0) | Err(_) => {
                self.served_all = true;
                data.send(msg_frame(&RelaySourceMsg::StreamEnd)).await?;
            }
            Ok(n) => {
                let packed = self
                    .packer
                    .frame(KIND_STREAM, &buf[..n])
                    .map_err(guest_err)?;
                s.report.wire_bytes += packed.len() as u64 - 1;
                data.send(packed).await?;
                let wire = s.report.wire_bytes;
                a.progress.send_modify(|p| p.wire_bytes = wire);
            }
        }
        Ok(())
    }

    async fn on_reply(
        &mut self,
        s: &mut Source,
        a: &SourceArgs<'_>,
        guest: &mut ContainerGuest,
        m: Result<Incoming<RelayDestMsg>, MigrateError>,
    ) -> Result<(), MigrateError> {
        match m? {
            Incoming::Bytes(KIND_RETURN, p) if p.is_empty() => {
                // The daemon is done: CRIU's page server waits for this
                // close before it closes its own side.
                if let Some(c) = self.pages.as_mut() {
                    c.shutdown()
                        .await
                        .map_err(|e| io_err("closing CRIU's page server", e))?;
                }
            }
            Incoming::Bytes(KIND_RETURN, p) => self.request(&p).await?,
            Incoming::Msg(RelayDestMsg::Running) if self.ran.is_none() => {
                self.ran = Some(Instant::now());
                s.report.switchover.running_ms = ms(self.commit);
                s.report.downtime_ms = ms(self.frozen);
                a.progress
                    .send_modify(|p| p.phase = MigrationPhase::Committed);
            }
            Incoming::Msg(RelayDestMsg::Verified { ok, detail }) if self.ran.is_some() => {
                self.verdict = Some((!ok).then_some(MigrateError::Verification(detail)));
            }
            Incoming::Msg(RelayDestMsg::Failed { reason }) if self.ran.is_none() => {
                // Its container never ran: ours runs on, whole.
                s.committed = false;
                let dump = self.dump.take().expect("held until the end");
                let open = self.pages.take().and_then(|c| c.into_std().ok());
                let again = tokio::task::block_in_place(|| guest.resume_lazy(dump, open));
                let e = MigrateError::DestinationFailed(reason);
                return Err(match again {
                    Ok(()) => e,
                    Err(r) => guest_err(format!("{e}; and resuming it here failed: {r}")),
                });
            }
            Incoming::Msg(RelayDestMsg::Failed { reason }) => {
                return Err(MigrateError::DestinationFailed(reason))
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "unexpected {other:?} during the page transfer"
                )))
            }
        }
        Ok(())
    }

    /// Passes a page request to CRIU's page server (connecting on the first).
    async fn request(&mut self, p: &Bytes) -> Result<(), MigrateError> {
        if self.pages.is_none() {
            let at = self
                .dump
                .as_ref()
                .expect("held until the end")
                .page_server();
            let c = TcpStream::connect(at)
                .await
                .map_err(|e| io_err("CRIU's page server", e))?;
            let _ = c.set_nodelay(true);
            self.pages = Some(c);
        }
        let c = self.pages.as_mut().expect("connected above");
        c.write_all(p)
            .await
            .map_err(|e| io_err("CRIU's page server", e))
    }

    /// A failure after `Commit`. The destination's answer decides: before
    /// `Running` nobody knows whether it ran (in doubt: ours held frozen);
    /// after it, ours is part of a copy that cannot go on (ended).
    fn fail(
        &mut self,
        s: &mut Source,
        guest: &mut ContainerGuest,
        e: MigrateError,
    ) -> Result<Option<MigrateError>, MigrateError> {
        let Some(dump) = self.dump.take() else {
            // Resumed here already (the destination's restore failed).
            return Err(e);
        };
        let open = self.pages.take().and_then(|c| c.into_std().ok());
        if self.ran.is_some() {
            tracing::error!(error = %e, "the page transfer failed after the destination ran the container: it is lost");
            drop(open);
            drop(dump);
            return Ok(Some(MigrateError::Guest(tern_migrate::GuestError(
                format!(
                    "the container's memory transfer failed after it ran on the destination; \
                 it cannot go on there without its pages and was ended on both hosts: {e}"
                ),
            ))));
        }
        if let Err(h) = tokio::task::block_in_place(|| guest.hold_lazy(dump, open)) {
            tracing::error!(error = %h, "holding the container after a commit in doubt");
        }
        s.report.phase = MigrationPhase::CommitInDoubt;
        Err(e)
    }
}

/// The destination after `Commit`: restores the container lazily and
/// relays its page traffic.
pub(super) struct Land<'d, 'a> {
    d: &'d Dest<'a>,
    last_tick: u64,
    /// The daemon's connection to our relay listener.
    conn: Option<TcpStream>,
    daemon: Option<std::process::Child>,
    /// The source said its page server closed.
    pages_done: bool,
    /// The daemon closed its side.
    daemon_done: bool,
    verified: bool,
    ran_at: Option<Instant>,
    /// The page stream's compression.
    unpacker: Unpacker,
}

impl<'d, 'a> Land<'d, 'a> {
    pub(super) fn new(d: &'d Dest<'a>, last_tick: u64, unpacker: Unpacker) -> Self {
        Self {
            unpacker,
            d,
            last_tick,
            conn: None,
            daemon: None,
            pages_done: false,
            daemon_done: false,
            verified: false,
            ran_at: None,
        }
    }

    /// Runs the container here; returns it once its memory is all here.
    pub(super) async fn run(
        mut self,
        g: ContainerGuest,
        data: &mut Receiver,
    ) -> Result<ContainerGuest, MigrateError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| io_err("the page relay's listener", e))?;
        let at = listener
            .local_addr()
            .map_err(|e| io_err("the page relay's listener", e))?;
        let mut restore = Some(tokio::task::spawn_blocking(move || {
            let mut g = g;
            let r = g.restore_lazy(at);
            (g, r)
        }));
        let mut guest: Option<ContainerGuest> = None;
        let res = self.relay(&listener, &mut restore, &mut guest, data).await;
        if let Err(e) = res {
            if let Some(mut d) = self.daemon.take() {
                let _ = d.kill();
                let _ = d.wait();
            }
            if guest.is_some() {
                // It ran: tell the source it cannot go on (the caller ends it here).
                let detail = format!("the container lost its memory transfer: {e}");
                let _ = self
                    .d
                    .replies
                    .send(msg_frame(&RelayDestMsg::Verified { ok: false, detail }))
                    .await;
            }
            return Err(e);
        }
        let g = guest.expect("the relay ends after the restore");
        let mut daemon = self.daemon.take().expect("set with the guest");
        let exited = tokio::task::spawn_blocking(move || daemon.wait())
            .await
            .map_err(|e| guest_err(format!("the lazy-pages daemon: {e}")))?
            .map_err(|e| io_err("the lazy-pages daemon", e))?;
        if !exited.success() {
            tracing::warn!(status = %exited, "the lazy-pages daemon ended with an error after the transfer");
        }
        Ok(g)
    }

    async fn relay(
        &mut self,
        listener: &tokio::net::TcpListener,
        restore: &mut Option<
            tokio::task::JoinHandle<(ContainerGuest, Result<std::process::Child, String>)>,
        >,
        guest: &mut Option<ContainerGuest>,
        data: &mut Receiver,
    ) -> Result<(), MigrateError> {
        let mut buf = vec![0u8; CHUNK];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !(self.pages_done && self.daemon_done && self.verified) {
            tokio::select! {
                a = listener.accept(), if self.conn.is_none() => {
                    let (c, _) = a.map_err(|e| io_err("the page relay's listener", e))?;
                    let _ = c.set_nodelay(true);
                    self.conn = Some(c);
                }
                r = async { restore.as_mut().expect("guarded").await }, if restore.is_some() => {
                    *restore = None;
                    let (g, daemon) = r.map_err(|e| guest_err(format!("the restore: {e}")))?;
                    self.daemon = Some(daemon.map_err(guest_err)?);
                    *guest = Some(g);
                    self.ran_at = Some(Instant::now());
                    self.d.args.progress.send_modify(|p| p.phase = MigrationPhase::Committed);
                    self.d.replies.send(msg_frame(&RelayDestMsg::Running)).await?;
                }
                f = data.recv(), if !self.pages_done => {
                    let (seq, f) = f.ok_or(MigrateError::Closed("data"))??;
                    data.ack(seq);
                    self.on_source(&f).await?;
                }
                r = read_some(&mut self.conn, &mut buf), if !self.daemon_done => {
                    let n = r.unwrap_or(0);
                    if n == 0 {
                        self.daemon_done = true;
                    }
                    self.d.replies.send(frame(KIND_RETURN, &buf[..n])).await?;
                }
                _ = tick.tick(), if guest.is_some() && !self.verified => {
                    self.check(guest.as_ref().expect("guarded")).await?;
                }
            }
        }
        Ok(())
    }

    /// Page bytes for the daemon, or the end of them.
    async fn on_source(&mut self, f: &Bytes) -> Result<(), MigrateError> {
        match decode::<RelaySourceMsg>(f)? {
            Incoming::Bytes(KIND_STREAM, p) => {
                let chunk = self.unpacker.unpack(&p).map_err(MigrateError::Protocol)?;
                let len = chunk.len() as u64;
                let c = self.conn.as_mut().ok_or_else(|| {
                    MigrateError::Protocol("pages before the daemon asked for any".into())
                })?;
                c.write_all(&chunk)
                    .await
                    .map_err(|e| io_err("the lazy-pages daemon", e))?;
                self.d.args.progress.send_modify(|p| p.wire_bytes += len);
            }
            Incoming::Msg(RelaySourceMsg::StreamEnd) => {
                self.pages_done = true;
                if let Some(c) = self.conn.as_mut() {
                    let _ = c.shutdown().await;
                }
            }
            Incoming::Msg(RelaySourceMsg::Abort { reason }) => {
                return Err(MigrateError::Aborted(reason))
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "unexpected {other:?} during the page transfer"
                )))
            }
        }
        Ok(())
    }

    /// The workload's own check: its counter passes the source's last value
    /// with its continuity intact.
    async fn check(&mut self, g: &ContainerGuest) -> Result<(), MigrateError> {
        let n = g.counter();
        let verdict = if let Some(why) = g.broken() {
            Some((false, format!("the workload broke: {}", why.trim())))
        } else if n > self.last_tick {
            Some((true, format!("counter {} -> {n}", self.last_tick)))
        } else if self.ran_at.is_some_and(|t| t.elapsed() > VERIFY_WAIT) {
            Some((
                false,
                format!(
                    "the counter stayed at {n} (the source stopped at {})",
                    self.last_tick
                ),
            ))
        } else {
            None
        };
        if let Some((ok, detail)) = verdict {
            if !ok {
                tracing::error!(detail, "the restored container's check failed");
            }
            self.verified = true;
            self.d
                .replies
                .send(msg_frame(&RelayDestMsg::Verified { ok, detail }))
                .await?;
        }
        Ok(())
    }
}
