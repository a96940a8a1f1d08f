//! Live migration of QEMU guests through tern's channels.
//!
//! QEMU writes its migration stream to a unix socket owned by the source
//! guest process; it carries the bytes over the migration's data session
//! (mutual TLS, token bucket, resume across link drops, optional LZ4/zstd)
//! to the destination's guest process, which feeds the destination QEMU's
//! incoming socket. QEMU's return path (post-copy page requests, acks)
//! travels back on the reply session. QEMU only ever talks to a local
//! socket, so a link that drops for seconds looks to it like a slow peer,
//! never a failure.
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
//!                                    <-    Verified{ok, detail} (the guest check's verdict)
//!   quit the source QEMU
//! ```
//!
//! Before `Commit` any failure cancels QEMU's migration and resumes the
//! source; the destination QEMU is killed. After it, the destination judges
//! the guest with a [`check::GuestCheck`] (tern's workload reports its
//! counter and checksums; other guests are judged by QEMU's result), and a
//! failed check marks the migration `corrupted`.

pub mod check;
mod dest;
mod source;

pub use dest::{destination, DestArgs};
pub use source::{source, SourceArgs};
pub use tern_migrate::relay::Compress;

use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_drivers::qemu::qmp::QmpError;
use tern_drivers::qemu::{QemuSpec, QemuVm};
use tern_migrate::{GuestError, MigrateError, Mode};
use tern_proto::GuestSpec;

fn qmp_err(e: QmpError) -> MigrateError {
    MigrateError::Guest(GuestError(format!("QMP: {e}")))
}

fn capabilities(mode: Mode, auto_converge: bool) -> Vec<(&'static str, bool)> {
    vec![
        ("postcopy-ram", mode != Mode::Precopy),
        ("auto-converge", auto_converge),
        ("events", true),
    ]
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

/// The last lines the guest printed, for error messages.
fn console_tail(vm: &QemuVm) -> String {
    let c = vm.console();
    let lines: Vec<&str> = c.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The QEMU spec of a Linux VM on this host (its own kernel and initrd).
pub fn qemu_spec(
    spec: &GuestSpec,
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
        cmdline: crate::hosted::load_params(spec).cmdline(),
        disks: Vec::new(),
    })
}
