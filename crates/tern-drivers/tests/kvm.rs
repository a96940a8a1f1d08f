//! The kvm driver with real `tern-vmm` monitor processes on this host's KVM:
//! lifecycle, control socket, and snapshots restored in a new process.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tern_drivers::conformance::local_request as start_req;
use tern_drivers::kvm::{KvmDriver, KvmDriverConfig, Request, Response, StatusReport};
use tern_drivers::VmDriver;
use tern_proto::{VmConfig, VmId, VmSpec};
use tern_vmm::{RunState, SnapshotKind, TestGuestConfig};

use tern_vmm::testing::kvm_or_skip as kvm_available;

fn driver(dir: &std::path::Path) -> KvmDriver {
    let mut cfg = KvmDriverConfig::new(dir.join("vms"));
    cfg.monitor = PathBuf::from(env!("CARGO_BIN_EXE_tern-vmm"));
    KvmDriver::new(cfg).unwrap()
}

fn spec() -> VmSpec {
    VmSpec {
        memory_mib: 64,
        vcpus: 1,
        image: "test".into(),
        ..VmSpec::default()
    }
}

async fn wait_counter(d: &KvmDriver, id: VmId, at_least: u64) -> StatusReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = d.status(id).await.unwrap();
        if s.agent.counter >= at_least {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "counter stuck at {}",
            s.agent.counter
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn snapshot(
    d: &KvmDriver,
    id: VmId,
    dir: PathBuf,
    kind: SnapshotKind,
) -> tern_vmm::SnapshotInfo {
    match d
        .control(id, Request::Snapshot { dir, kind })
        .await
        .unwrap()
    {
        Response::Snapshot(i) => i,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_kvm_driver_keeps_the_driver_contract() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = driver(tmp.path());
    tern_drivers::conformance::run(&d, spec(), start_req, Some("windows")).await;
}

#[tokio::test]
async fn a_vm_lives_in_its_own_monitor_process() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = driver(tmp.path());
    let id = VmId::new();
    let h = d.start(&start_req(id, spec())).await.unwrap();
    assert!(h.detail.contains("pid"), "{h:?}");
    assert!(d.is_healthy(id).await.unwrap());
    assert_eq!(d.list().await.unwrap(), vec![id]);
    d.configure(id, &VmConfig::default()).await.unwrap();
    let s = wait_counter(&d, id, 10).await;
    assert_eq!(s.shape.vcpus, 1);

    // A second driver (a restarted control plane) finds the same VM.
    let again = driver(tmp.path());
    assert_eq!(again.list().await.unwrap(), vec![id]);
    assert!(again.is_healthy(id).await.unwrap());

    // A request that cannot be served gets an error and changes nothing.
    let r = d
        .control(
            id,
            Request::Snapshot {
                dir: tmp.path().join("x"),
                kind: SnapshotKind::Incremental,
            },
        )
        .await
        .unwrap();
    match r {
        Response::Error { message } => assert!(message.contains("incremental"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(d.is_healthy(id).await.unwrap());

    d.stop(id).await.unwrap();
    assert!(!d.is_healthy(id).await.unwrap());
    assert!(d.list().await.unwrap().is_empty());
    d.cleanup(id).await.unwrap();
    assert!(!d.vm_dir(id).exists());

    // Bad specs fail clearly and leave nothing running.
    let bad = VmId::new();
    let err = d
        .start(&start_req(
            bad,
            VmSpec {
                image: "windows".into(),
                ..spec()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown image"), "{err}");
    let err = d
        .start(&start_req(
            bad,
            VmSpec {
                memory_mib: 3,
                ..spec()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
    d.cleanup(bad).await.unwrap();
    assert!(d.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn snapshots_restore_in_a_new_process_and_the_guest_carries_on() {
    if !kvm_available() {
        return;
    }
    // What the monitor's test guest does with the driver's defaults.
    let g = TestGuestConfig::default();
    let tmp = tempfile::tempdir().unwrap();
    let d = driver(tmp.path());
    let id = VmId::new();
    d.start(&start_req(id, spec())).await.unwrap();
    wait_counter(&d, id, 20).await;
    let (a, b) = (tmp.path().join("snap-a"), tmp.path().join("snap-b"));
    let full = snapshot(&d, id, a.clone(), SnapshotKind::Full).await;
    let c = d.status(id).await.unwrap().agent.counter;
    wait_counter(&d, id, c + 20).await;
    assert!(matches!(
        d.control(id, Request::Pause).await.unwrap(),
        Response::Paused { .. }
    ));
    let inc = snapshot(&d, id, b.clone(), SnapshotKind::Incremental).await;
    let at_b = d.status(id).await.unwrap();
    assert_eq!(at_b.run_state, RunState::Paused);
    eprintln!("full {full:?}\nincremental {inc:?}");
    // Issue 14, finding 6: guest memory and console are the owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [a.join("memory.tern"), d.vm_dir(id).join("console.log")] {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.display());
        }
    }
    d.stop(id).await.unwrap();
    d.cleanup(id).await.unwrap();

    let full_counter = {
        let s = tern_vmm::snapshot::read_state_file(&a).unwrap();
        s.body
            .state
            .get::<tern_vmm::AgentReport>("device.agent")
            .unwrap()
            .counter
    };
    for (chain, expected, name) in [
        (vec![a.clone()], full_counter, "full"),
        (
            vec![a.clone(), b.clone()],
            at_b.agent.counter,
            "full+incremental",
        ),
    ] {
        let rid = VmId::new();
        d.restore(rid, &chain, true).await.unwrap();
        let s = d.status(rid).await.unwrap();
        assert_ne!(s.pid, at_b.pid, "a new process");
        assert_eq!(s.run_state, RunState::Paused);
        assert_eq!(
            s.agent.counter, expected,
            "{name}: the counter continues from the snapshot"
        );
        assert_eq!(d.control(rid, Request::Resume).await.unwrap(), Response::Ok);
        let after = wait_counter(&d, rid, expected + 40).await;
        let (at, sum) = after.agent.checksum.expect("a checksum report");
        assert!(at > expected, "{name}: a checksum taken after the restore");
        assert_eq!(
            sum,
            g.expected_checksum(at),
            "{name}: working set intact at counter {at}"
        );
        eprintln!(
            "{name}: restored at counter {expected}, now {}; checksum at {at} matches",
            after.agent.counter
        );
        d.stop(rid).await.unwrap();
        d.cleanup(rid).await.unwrap();
    }

    // Restored running (not paused), the VM is up and healthy at once.
    let rid = VmId::new();
    d.restore(rid, &[a.clone(), b.clone()], false)
        .await
        .unwrap();
    assert!(d.is_healthy(rid).await.unwrap());
    let s = d.status(rid).await.unwrap();
    wait_counter(&d, rid, s.agent.counter + 10).await;
    d.stop(rid).await.unwrap();
    d.cleanup(rid).await.unwrap();

    // A corrupted chain is refused by the new monitor, which exits.
    let mut bad = std::fs::read(b.join("state.tern")).unwrap();
    let n = bad.len();
    bad[n - 10] ^= 0x40;
    std::fs::write(b.join("state.tern"), &bad).unwrap();
    let rid = VmId::new();
    let err = d
        .restore(rid, &[a, b], false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    d.cleanup(rid).await.unwrap();
}

/// Checks from outside that monitor `pid` is jailed: nobody's uid, no
/// capabilities, `no_new_privs`, a seccomp filter, a root holding only its
/// binds and devices.
fn assert_jailed(pid: u32, vm_dir: &std::path::Path) {
    tern_testkit::procstatus::assert_jailed(pid, 65534);
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("dev/kvm").exists());
    assert!(!root.join("etc").exists() && !root.join("usr").exists());
    // No network: a namespace of its own.
    let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(net(&pid.to_string()), net("self"), "the host's network");
    let inside = root.join(vm_dir.strip_prefix("/").unwrap());
    assert!(inside.join("control.sock").exists(), "{}", inside.display());
}

fn monitor_pid(d: &KvmDriver, id: VmId) -> u32 {
    std::fs::read_to_string(d.vm_dir(id).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Issue 14, finding 7: a jailed monitor boots, snapshots into its
/// snapshot directory, and a new jailed monitor restores the guest, which
/// carries on counting.
#[tokio::test]
async fn a_jailed_monitor_snapshots_and_restores() {
    if !kvm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = KvmDriverConfig::new(tmp.path().join("vms"));
    cfg.monitor = PathBuf::from(env!("CARGO_BIN_EXE_tern-vmm"));
    cfg.jail = Some(tern_jail::JailConfig::default());
    let d = KvmDriver::new(cfg).unwrap();
    let id = VmId::new();
    d.start(&start_req(id, spec())).await.unwrap();
    assert_jailed(monitor_pid(&d, id), &d.vm_dir(id));
    wait_counter(&d, id, 20).await;
    // A path outside its room is refused, not written.
    let outside = tmp.path().join("outside");
    let e = d
        .control(
            id,
            Request::Snapshot {
                dir: outside.clone(),
                kind: SnapshotKind::Full,
            },
        )
        .await;
    assert!(
        !matches!(e, Ok(Response::Snapshot(_))) && !outside.exists(),
        "{e:?}"
    );
    let snap = d.snapshot_dir(id).join("full");
    let full = snapshot(&d, id, snap.clone(), SnapshotKind::Full).await;
    eprintln!("jailed full snapshot {full:?}");
    let at = tern_vmm::snapshot::read_state_file(&snap)
        .unwrap()
        .body
        .state
        .get::<tern_vmm::AgentReport>("device.agent")
        .unwrap()
        .counter;
    d.stop(id).await.unwrap();
    d.cleanup(id).await.unwrap();
    // A new VM restored from it, in a jail of its own that shows the
    // snapshot read-only.
    let rid = VmId::new();
    d.restore(rid, &[snap], true).await.unwrap();
    assert_jailed(monitor_pid(&d, rid), &d.vm_dir(rid));
    assert_eq!(d.status(rid).await.unwrap().agent.counter, at);
    assert_eq!(d.control(rid, Request::Resume).await.unwrap(), Response::Ok);
    let after = wait_counter(&d, rid, at + 40).await;
    let (sum_at, sum) = after.agent.checksum.expect("a checksum report");
    assert!(sum_at > at);
    let g = TestGuestConfig::default();
    assert_eq!(sum, g.expected_checksum(sum_at), "working set intact");
    d.stop(rid).await.unwrap();
    d.cleanup(rid).await.unwrap();
    let t = Instant::now();
    while tmp.path().join("vms").join(format!("{rid}.jail")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the jail's room is left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
