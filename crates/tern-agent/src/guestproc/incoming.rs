//! The destination side, run in the process that will own the guest: dial
//! the source's reply route, take the data session the destination agent
//! hands over, receive the guest, and journal `Commit` before it starts,
//! unless the source's settling question came first.

use super::{lock, read_hello, server::qemu_config, HelloError, Proc, SessionError, Slot};
use crate::hosted::Hosted;
use crate::journal::Record;
use crate::vmdir::EndedMigration;
use std::net::SocketAddr;
use std::sync::Arc;
use tern_drivers::qemu::{Launch as QemuLaunch, QemuVm};
use tern_migrate::protocol::{hello_frame, SessionHello};
use tern_migrate::{Capacity, DestLink, MigrateError, MigrationPhase, Progress};
use tern_proto::{GuestKind, MigrationRole};
use tern_transport::{Listener, Receiver, Sender};
use tokio::sync::watch;

/// Receives the guest of `migration` from `source_host`.
pub(super) async fn run(p: Arc<Proc>, migration: String, source_host: String, reply_to: String) {
    let (ptx, etx) = p.track(
        &migration,
        Progress {
            phase: MigrationPhase::Precopy,
            ..Default::default()
        },
    );
    let mut end = EndedMigration {
        migration: migration.clone(),
        vm: p.launch.vm.clone(),
        role: MigrationRole::Destination,
        peer: source_host.clone(),
        state: MigrationPhase::RolledBack,
        report: None,
        error: None,
    };
    // A QEMU guest's destination QEMU starts while the sessions open: its
    // launch is off the migration's path (it used to follow `Start`).
    let (connected, qemu) = tokio::join!(
        connect(&p, &migration, &source_host, &reply_to),
        launch_qemu(&p)
    );
    let res = match connected {
        // The listener lives as long as the transfer: the source's data
        // streams come back through it after a link drop.
        Ok((data, replies, _listener)) => {
            receive(&p, &migration, &source_host, data, replies, &ptx, qemu).await
        }
        Err(e) => {
            if let Some(Ok(vm)) = qemu {
                vm.remove();
            }
            Err((MigrateError::Setup(Box::new(e)), None))
        }
    };
    match res.map_err(|(e, g)| (e.to_string(), g)) {
        Ok(g) => {
            p.set_slot(Slot::Running(Box::new(g)));
            end.state = MigrationPhase::Committed;
        }
        Err((e, Some(g))) => {
            // Committed, but the guest's own check failed (QEMU): it is
            // ours, well or not, and its status says whether it runs.
            p.set_slot(Slot::Running(Box::new(g)));
            end.state = MigrationPhase::Corrupted;
            end.error = Some(e);
        }
        Err((e, None)) => {
            let _ = p.record(&Record::Discarded {
                migration: migration.clone(),
                vm: p.launch.vm.clone(),
                reason: e.clone(),
            });
            p.set_slot(Slot::Failed(e.clone()));
            end.error = Some(e);
            p.finish_soon();
        }
    }
    ptx.send_modify(|x| x.phase = end.state);
    p.end(end, &etx);
}

/// Dials the reply session (routed to the source's guest process) and
/// waits for the data session.
async fn connect(
    p: &Arc<Proc>,
    migration: &str,
    source_host: &str,
    reply_to: &str,
) -> Result<(Receiver, Sender, Listener), SessionError> {
    p.record(&Record::MigrationIn {
        migration: migration.into(),
        vm: p.launch.vm.clone(),
        from: source_host.into(),
    })?;
    let mut listener = p.listener()?;
    let addr: SocketAddr = reply_to
        .parse()
        .map_err(|_| SessionError::BadReplyAddress(reply_to.into()))?;
    let replies = Sender::connect(
        addr,
        p.security(source_host)?,
        p.session_config(Some(migration)),
        None,
    )
    .await?;
    replies
        .send(hello_frame(&SessionHello::Replies {
            migration: migration.into(),
        }))
        .await?;
    let wait = tern_migrate::Policy::default().reply_timeout;
    let mut data = tokio::time::timeout(wait, listener.accept())
        .await
        .ok()
        .flatten()
        .ok_or(SessionError::Timeout {
            waiting_for: "data session from the source",
            after: wait,
        })?;
    if !p.opened_by(&data, source_host) {
        return Err(SessionError::WrongPeer {
            expected: source_host.into(),
        });
    }
    match read_hello(&mut data, wait).await? {
        SessionHello::Data(o) if o.migration == migration => Ok((data, replies, listener)),
        other => Err(HelloError::Unexpected(format!(
            "expected the data hello of {migration}, got {other:?}"
        ))
        .into()),
    }
}

/// Starts the destination QEMU of a Linux guest (paused, waiting for its
/// stream), or says why it cannot run here; `None` for other guests.
async fn launch_qemu(p: &Proc) -> Option<Result<QemuVm, String>> {
    let spec = &p.launch.spec;
    if spec.kind != GuestKind::Linux {
        return None;
    }
    let cfg = p.cfg();
    let qspec = match crate::qemu_relay::qemu_spec(
        spec,
        cfg.guest_kernel.as_deref(),
        cfg.guest_initrd.as_deref(),
    ) {
        Ok(q) => q,
        Err(reason) => return Some(Err(reason)),
    };
    let dir = p.dir.qemu();
    let launched = QemuVm::launch(&qemu_config(p), &dir, &qspec, QemuLaunch::Incoming).await;
    Some(launched.map_err(|e| format!("cannot start QEMU here: {e}")))
}

async fn receive(
    p: &Arc<Proc>,
    migration: &str,
    source_host: &str,
    data: Receiver,
    replies: Sender,
    progress: &watch::Sender<Progress>,
    qemu: Option<Result<QemuVm, String>>,
) -> Result<Hosted, (MigrateError, Option<Hosted>)> {
    let spec = p.launch.spec.clone();
    let epoch = p.launch.epoch;
    let spec_json = serde_json::to_value(&spec).expect("specs serialize");
    let mut on_commit = || {
        let mut gate = lock(&p.gate);
        if gate.fenced {
            return Err("the source settled this migration as not committed".into());
        }
        p.record(&Record::CommitReceived {
            migration: migration.into(),
            vm: p.launch.vm.clone(),
            epoch,
            spec: spec_json.clone(),
        })?;
        gate.committed = true;
        Ok(())
    };
    if spec.kind == GuestKind::Linux {
        let args = crate::qemu_relay::DestArgs {
            vm: qemu.unwrap_or_else(|| Err("no QEMU was launched for this guest".into())),
            load: crate::hosted::load_params(&spec),
            progress: progress.clone(),
        };
        return crate::qemu_relay::destination(args, data, replies, &mut on_commit)
            .await
            .map(Hosted::Qemu)
            .map_err(|(e, g)| (e, g.map(Hosted::Qemu)));
    }
    let setup = |e: Box<dyn std::error::Error + Send + Sync>| (MigrateError::Setup(e), None);
    let peer = p.peer(source_host).map_err(|e| setup(Box::new(e)))?;
    let source_key = crate::keys::parse_public(&peer.key).map_err(|e| setup(e.into()))?;
    if spec.kind == GuestKind::Container {
        let args = crate::container_relay::DestArgs {
            vm_dir: p.dir.0.clone(),
            vm: &p.launch.vm,
            spec: &spec,
            host: p.cfg().container.as_ref(),
            host_name: &p.cfg().name,
            source_key,
            progress: progress.clone(),
        };
        return crate::container_relay::destination(args, data, replies, &mut on_commit)
            .await
            .map(Hosted::Container)
            .map_err(|(e, g)| (e, g.map(Hosted::Container)));
    }
    let capacity = Capacity {
        max_memory_bytes: p.cfg().max_memory_mib << 20,
        max_vcpus: p.cfg().max_vcpus,
    };
    tern_migrate::receive_observed(
        DestLink { data, replies },
        |req| Hosted::incoming(&spec, &req.shape),
        &source_key,
        &capacity,
        &mut on_commit,
        progress,
    )
    .await
    .map_err(|e| (e, None))
}
