//! The guest process's servers: the control socket, the stream hand-over
//! socket, and the boot or receive that fills its slot.

use super::{incoming, lock, outgoing, GuestProcError, Proc, Slot};
use crate::control::{Answer, ProcState, ProcStatus, Request, WatchEvent};
use crate::hosted::Hosted;
use crate::journal::Record;
use crate::vmdir::LaunchRole;
use std::sync::Arc;
use std::time::Duration;
use tern_drivers::qemu::{Launch as QemuLaunch, QemuConfig, QemuVm};
use tern_proto::GuestKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Serves until the guest has left this process.
pub(super) async fn serve(p: Arc<Proc>) -> Result<(), GuestProcError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |source| GuestProcError::Io { what, source }
    };
    let _ = std::fs::remove_file(p.dir.control());
    let _ = std::fs::remove_file(p.dir.streams());
    let control = UnixListener::bind(p.dir.control()).map_err(io("control socket"))?;
    let streams =
        std::os::unix::net::UnixListener::bind(p.dir.streams()).map_err(io("streams socket"))?;
    spawn_stream_intake(p.clone(), streams);
    tokio::spawn(p.clone().keep_lease());
    let server = p.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = control.accept().await {
            tokio::spawn(handle(server.clone(), conn));
        }
    });
    match p.launch.role.clone() {
        LaunchRole::Boot => {
            let p2 = p.clone();
            tokio::spawn(async move { boot(p2).await });
        }
        LaunchRole::Receive {
            migration,
            source_host,
            reply_to,
        } => {
            p.set_slot(Slot::Receiving);
            let p2 = p.clone();
            tokio::spawn(async move {
                incoming::run(p2, migration, source_host, reply_to).await;
            });
        }
    }
    p.done.notified().await;
    let _ = std::fs::remove_file(p.dir.control());
    let _ = std::fs::remove_file(p.dir.streams());
    Ok(())
}

/// Takes streams the agent hands over and feeds them to the listener of
/// the migration under way (a blocking thread: one `recvmsg` each).
fn spawn_stream_intake(p: Arc<Proc>, streams: std::os::unix::net::UnixListener) {
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        for conn in streams.incoming() {
            let Ok(conn) = conn else { continue };
            let fd = match crate::control::take_over(&conn) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(error = %e, "stream hand-over failed");
                    continue;
                }
            };
            let std_stream = std::net::TcpStream::from(fd);
            let tx = lock(&p.streams).clone();
            rt.spawn(async move {
                if std_stream.set_nonblocking(true).is_err() {
                    return;
                }
                let (Ok(s), Some(tx)) = (tokio::net::TcpStream::from_std(std_stream), tx) else {
                    tracing::warn!("a stream was handed over with no migration to take it");
                    return;
                };
                if tx.send(s).await.is_err() {
                    tracing::warn!("a stream was handed over after its migration ended");
                }
            });
        }
    });
}

async fn boot(p: Arc<Proc>) {
    let spec = p.launch.spec.clone();
    let res = if spec.kind == GuestKind::Linux {
        boot_linux(&p).await
    } else if spec.kind == GuestKind::Container {
        let p2 = p.clone();
        tokio::task::spawn_blocking(move || {
            let host = p2.cfg().container.as_ref().ok_or(
                "this agent hosts no containers (add [container] to its config)".to_string(),
            )?;
            let at = crate::container::Placement {
                vm: &p2.launch.vm,
                host_name: &p2.cfg().name,
                host,
            };
            crate::container::ContainerGuest::boot(&p2.dir.0, &at, &p2.launch.spec)
                .map(Hosted::Container)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    } else {
        let s = spec.clone();
        tokio::task::spawn_blocking(move || Hosted::boot(&s))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let started = res.and_then(|g| {
        p.record(&Record::VmStarted {
            vm: p.launch.vm.clone(),
            epoch: p.launch.epoch,
            spec: serde_json::to_value(&spec).expect("specs serialize"),
        })
        .map(|_| g)
        .map_err(|e| e.to_string())
    });
    match started {
        Ok(g) => p.set_slot(Slot::Running(Box::new(g))),
        Err(e) => {
            tracing::error!(error = %e, "boot failed");
            p.set_slot(Slot::Failed(e));
            p.finish_soon();
        }
    }
}

/// QEMU runs as this process's child and dies with it; on a host that
/// jails its guests, as the jail's uid, chrooted to its own directory.
pub(super) fn qemu_config(p: &Proc) -> QemuConfig {
    QemuConfig {
        die_with_parent: true,
        confine: p.cfg().jail.as_ref().map(|j| (j.uid, j.gid)),
        ..QemuConfig::default()
    }
}

async fn boot_linux(p: &Proc) -> Result<Hosted, String> {
    let qspec = crate::qemu_relay::qemu_spec(
        &p.launch.spec,
        p.cfg().guest_kernel.as_deref(),
        p.cfg().guest_initrd.as_deref(),
    )?;
    let vm = QemuVm::launch(&qemu_config(p), &p.dir.qemu(), &qspec, QemuLaunch::Boot).await?;
    vm.wait_console(Duration::from_secs(120), |c| c.contains("tern-load ready"))
        .await
        .map_err(|e| format!("the Linux guest did not come up: {e}"))?;
    Ok(Hosted::Qemu(vm))
}

async fn handle(p: Arc<Proc>, conn: UnixStream) {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r);
    let read = tokio::io::AsyncReadExt::take(&mut r, crate::control::MAX_LINE)
        .read_line(&mut line)
        .await;
    if read.is_err() {
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = write(&mut w, &Answer::<()>::Err(format!("bad request: {e}"))).await;
            return;
        }
    };
    let _ = match req {
        Request::Status => write(&mut w, &Answer::Ok(status(&p))).await,
        Request::Stop => write(&mut w, &stop(&p)).await,
        Request::MigrateOut(job) => write(&mut w, &outgoing::start(&p, *job)).await,
        Request::Settle { migration } => write(&mut w, &settle(&p, &migration)).await,
        Request::Cancel { migration } => write(&mut w, &outgoing::cancel(&p, &migration)).await,
        Request::Redirect { migration, addr } => {
            write(&mut w, &outgoing::redirect(&p, &migration, addr)).await
        }
        Request::SetShare {
            migration,
            bytes_per_sec,
        } => write(&mut w, &outgoing::set_share(&p, &migration, bytes_per_sec)).await,
        Request::Watch { migration } => watch(&p, &migration, &mut w).await,
        Request::ForbiddenCall => write(&mut w, &forbidden_call(&p)).await,
    };
}

/// The jail's test hook: a jailed process does not live to answer.
fn forbidden_call(p: &Proc) -> Answer<()> {
    if !p.cfg().jail.as_ref().is_some_and(|j| j.test_hooks) {
        return Answer::Err("test hooks are off (`[jail] test_hooks`)".into());
    }
    tracing::warn!("test hook: making a system call the jail forbids");
    match tern_jail::filter::forbidden_call() {
        Ok(()) => Answer::Err("the forbidden call succeeded: this process is not filtered".into()),
        Err(e) => Answer::Err(format!("the forbidden call failed ({e}) but did not kill")),
    }
}

async fn write<T: serde::Serialize>(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    v: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).expect("answers serialize");
    line.push(b'\n');
    w.write_all(&line).await
}

fn status(p: &Proc) -> ProcStatus {
    let epoch = *lock(&p.epoch);
    let migration = lock(&p.track)
        .as_ref()
        .and_then(|t| (t.end.borrow().is_none()).then(|| t.id.clone()));
    let (state, counter, checksum_ok, detail) = match &*lock(&p.slot) {
        Slot::Booting => (ProcState::Booting, None, None, None),
        Slot::Running(g) => {
            let (c, ok) = g.progress(&p.launch.spec);
            if p.is_fenced() {
                let why = "paused: the host lost the control plane for longer than its lease";
                (ProcState::Fenced, Some(c), ok, Some(why.into()))
            } else if g.is_stalled() {
                let why = "alive but not advancing: its QEMU process is stopped";
                (ProcState::Stalled, Some(c), ok, Some(why.into()))
            } else if g.is_alive() {
                (ProcState::Running, Some(c), ok, None)
            } else {
                (
                    ProcState::Failed,
                    None,
                    None,
                    Some("the guest ended".into()),
                )
            }
        }
        Slot::Migrating => (ProcState::Migrating, None, None, None),
        Slot::Receiving => (ProcState::Receiving, None, None, None),
        Slot::MovedAway => (ProcState::MovedAway, None, None, None),
        Slot::Stopped => (ProcState::Stopped, None, None, None),
        Slot::Failed(e) => (ProcState::Failed, None, None, Some(e.clone())),
    };
    ProcStatus {
        state,
        epoch,
        counter,
        checksum_ok,
        migration,
        detail,
    }
}

fn stop(p: &Arc<Proc>) -> Answer<()> {
    let mut slot = lock(&p.slot);
    match &mut *slot {
        Slot::Running(g) => {
            if let Err(e) = p.record(&Record::VmStopped {
                vm: p.launch.vm.clone(),
            }) {
                return Answer::Err(e.to_string());
            }
            g.stop();
            *slot = Slot::Stopped;
            p.finish_soon();
            Answer::Ok(())
        }
        Slot::Migrating | Slot::Receiving => {
            Answer::Err("the VM is migrating; wait for it to end".into())
        }
        _ => Answer::Err("the VM does not run here".into()),
    }
}

/// The source's question about an unconfirmed `Commit`: the answer is final.
fn settle(p: &Proc, migration: &str) -> Answer<bool> {
    let ours = matches!(&p.launch.role, LaunchRole::Receive { migration: m, .. } if m == migration);
    if !ours {
        return Answer::Err(format!("this process does not receive {migration}"));
    }
    let mut gate = lock(&p.gate);
    if !gate.committed {
        gate.fenced = true;
    }
    Answer::Ok(gate.committed)
}

async fn watch(
    p: &Proc,
    migration: &str,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let found = match &*lock(&p.track) {
        Some(t) if t.id == migration => Some((t.progress.clone(), t.end.clone())),
        _ => None,
    };
    let Some((mut progress, mut end)) = found else {
        return write(
            w,
            &Answer::<WatchEvent>::Err(format!("no migration {migration} here")),
        )
        .await;
    };
    loop {
        let ended = end.borrow_and_update().clone();
        if let Some(e) = ended {
            return write(w, &Answer::Ok(WatchEvent::End(Box::new(e)))).await;
        }
        let now = progress.borrow_and_update().clone();
        write(w, &Answer::Ok(WatchEvent::Progress(now))).await?;
        let gone = tokio::select! {
            r = progress.changed() => r.is_err() && end.changed().await.is_err(),
            r = end.changed() => r.is_err(),
        };
        if gone {
            let last = end.borrow().clone();
            return match last {
                Some(e) => write(w, &Answer::Ok(WatchEvent::End(Box::new(e)))).await,
                None => Ok(()),
            };
        }
    }
}
