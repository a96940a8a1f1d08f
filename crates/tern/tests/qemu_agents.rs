//! End to end with real Linux guests: Debian's kernel and tern's workload
//! in QEMU (TCG here), live-migrated between two `tern agent` processes over
//! mutual TLS, QEMU's stream carried by tern through the test link
//! emulator. Slow (Linux boots under TCG): `#[ignore]`d; `scripts/test.sh`
//! runs them. They run one at a time: each keeps both cores busy.

use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrateRequest, MigrationPhase, MigrationView};
use tern_drivers::qemu::pids_under;
use tern_drivers::qemu::testing::guest_or_skip;
use tern_proto::{GuestKind, GuestSpec, GuestStatus, HostId, MigrationId, VmId};
use tern_testbed::{self as testbed, AgentProcess, HostPlan, LocalHost};
use tern_testkit::{LinkConfig, LinkEmulator};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LO: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

struct Bed {
    a: AgentProcess,
    b: AgentProcess,
    to_b: LinkEmulator,
    to_a: LinkEmulator,
    hosts: Vec<LocalHost>,
    _dir: tempfile::TempDir,
}

/// Two agents whose migration sessions cross link emulators (no delay, `rate` cap).
async fn bed(rate: u64) -> Option<Bed> {
    bed_with(rate, false).await
}

/// [`bed`], with both agents' guests jailed (`[jail]`: QEMU runs as
/// nobody, chrooted to its directory) when `jailed`.
async fn bed_with(rate: u64, jailed: bool) -> Option<Bed> {
    let (kernel, initrd) = guest_or_skip()?;
    let dir = tempfile::tempdir().unwrap();
    let mut a = HostPlan::new("host-a", LO).unwrap();
    let mut b = HostPlan::new("host-b", LO).unwrap();
    let link = LinkConfig {
        one_way_delay: Duration::ZERO,
        jitter: Duration::ZERO,
        rate_bytes_per_sec: rate,
        queue_bytes: 4 << 20,
    };
    let to_b = LinkEmulator::start(b.migrate_addr(), link.clone())
        .await
        .unwrap();
    let to_a = LinkEmulator::start(a.migrate_addr(), link).await.unwrap();
    a.reached_at = Some(to_a.addr());
    b.reached_at = Some(to_b.addr());
    for h in [&mut a, &mut b] {
        h.guest = Some((kernel.clone(), initrd.clone()));
        h.jail = jailed.then(tern_jail::JailConfig::default);
    }
    let hosts = testbed::write(dir.path(), &[a, b]).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_tern"));
    let pa = AgentProcess::start(bin, &hosts[0], None).unwrap();
    let pb = AgentProcess::start(bin, &hosts[1], None).unwrap();
    Some(Bed {
        a: pa,
        b: pb,
        to_b,
        to_a,
        hosts,
        _dir: dir,
    })
}

fn linux() -> GuestSpec {
    GuestSpec {
        kind: GuestKind::Linux,
        memory_mib: 256,
        ws_mib: 16,
        dirty_mib_per_sec: 8,
        ..Default::default()
    }
}

/// A pre-copy to host-b with a downtime budget that [`linux`]'s 16 MiB
/// working set meets by QEMU's second or third pass: QEMU 7.2 under TCG
/// corrupts guests after 4+ passes (tern then reports `corrupted`). With
/// 300 ms the loopback relay's ~70 MB/s sat at the edge: 6 of 13 runs of
/// the jailed test reached pass 4 and were caught corrupted.
fn precopy(bandwidth_mbps: Option<u64>) -> MigrateRequest {
    MigrateRequest {
        to: HostId::new("host-b").unwrap(),
        mode: "precopy".into(),
        max_downtime_ms: Some(1000),
        bandwidth_mbps,
        deadline_secs: None,
        max_bandwidth_mbps: None,
        auto_converge: None,
        compress: None,
        id: None,
        reason: None,
    }
}

async fn wait_end(c: &AgentClient, id: &MigrationId) -> MigrationView {
    let t = Instant::now();
    loop {
        let v = c.migration(id).await.unwrap();
        if v.state.is_final() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "stuck: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The guest runs on `c`: its counter passes `beyond` and its checks hold.
async fn assert_runs(c: &AgentClient, vm: &VmId, beyond: u64) -> u64 {
    let t = Instant::now();
    loop {
        let v = c.vm(vm).await.unwrap();
        assert_eq!(v.status, GuestStatus::Running, "{v:?}");
        let counter = v.counter.unwrap_or(0);
        if counter > beyond + 10 && v.checksum_ok == Some(true) {
            return counter;
        }
        assert_ne!(
            v.checksum_ok,
            Some(false),
            "the guest's own check failed: {v:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not advancing: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_linux_guest_migrates_between_agents_and_keeps_counting() {
    let _one = ONE_AT_A_TIME.lock().await;
    // On hosts that jail their guests: QEMU is confined at both ends.
    let Some(bed) = bed_with(0, true).await else {
        return;
    };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca.create_vm(&linux()).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    assert_confined(&bed.hosts[0].data_dir);
    let m = ca.migrate(&vm.id, &precopy(None)).await.unwrap();
    let done = wait_end(&ca, &m.id).await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.unwrap();
    eprintln!(
        "linux guest: downtime {:.1} ms, total {:.0} ms, wire {} bytes",
        r.downtime_ms, r.total_ms, r.wire_bytes
    );
    assert!(r.wire_bytes > 0 && r.downtime_ms > 0.0);
    assert_runs(&cb, &vm.id, before).await;
    let gone = ca.vm(&vm.id).await.unwrap();
    assert_eq!(gone.status, GuestStatus::MovedAway);
    assert!(
        pids_under(&bed.hosts[0].data_dir).is_empty(),
        "the source QEMU still runs"
    );
    assert_eq!(pids_under(&bed.hosts[1].data_dir).len(), 1);
    assert_confined(&bed.hosts[1].data_dir);
}

/// The one QEMU under `data_dir` runs as nobody, chrooted to its own
/// directory, under its seccomp sandbox.
fn assert_confined(data_dir: &Path) {
    let pids = pids_under(data_dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let field = |k: &str| tern_testkit::procstatus::field(pids[0] as u32, k);
    assert_eq!(field("Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("Seccomp"), "2");
    let root = std::fs::read_link(format!("/proc/{}/root", pids[0])).unwrap();
    assert!(
        root.starts_with(data_dir) && root.ends_with("qemu"),
        "QEMU's root is {}",
        root.display()
    );
}

/// A confined QEMU does not outlive its guest process (a crash, an OOM
/// kill): `-runas` clears its parent-death signal, so the agent that reaps
/// the process ends it, and an agent that was down ends it at its start.
/// Otherwise an unmanaged copy of the guest would run on beside the one
/// healing starts.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_confined_qemu_ends_with_its_guest_process() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut bed) = bed_with(0, true).await else {
        return;
    };
    let data = bed.hosts[0].data_dir.clone();
    let kill_guest = |data: &Path| {
        let pids = tern_agent::layout::guest_pids(data);
        assert_eq!(pids.len(), 1, "{pids:?}");
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(pids[0]).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
    };
    let ends = |data: &Path, within: Duration| {
        let t = Instant::now();
        while !pids_under(data).is_empty() {
            assert!(t.elapsed() < within, "QEMU outlived its guest process");
            std::thread::sleep(Duration::from_millis(50));
        }
        t.elapsed()
    };
    // The agent lives: it reaps the process and ends its QEMU.
    let ca = bed.a.client().unwrap();
    let vm = ca.create_vm(&linux()).await.unwrap();
    assert_confined(&data);
    kill_guest(&data);
    let t = ends(&data, Duration::from_secs(10));
    eprintln!("the agent ended the QEMU its killed guest process left in {t:?}");
    let v = ca.vm(&vm.id).await.unwrap();
    assert_ne!(v.status, GuestStatus::Running, "{v:?}");
    // No agent: the QEMU runs on until the next agent's start.
    let vm = ca.create_vm(&linux()).await.unwrap();
    assert_confined(&data);
    bed.a.release_guests();
    bed.a.kill();
    kill_guest(&data);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(pids_under(&data).len(), 1, "the confined QEMU lived on");
    let bin = Path::new(env!("CARGO_BIN_EXE_tern"));
    bed.a = AgentProcess::start(bin, &bed.hosts[0], None).unwrap();
    let t = ends(&data, Duration::from_secs(10));
    eprintln!("the restarted agent ended the stray QEMU in {t:?}");
    let v = bed.a.client().unwrap().vm(&vm.id).await.unwrap();
    assert_ne!(v.status, GuestStatus::Running, "{v:?}");
}

/// A Linux guest's migration cancelled mid pre-copy (a user, or a more
/// urgent migration preempting it) rolls back: the guest runs on where it
/// was, counting on, and no QEMU is left on the target.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_cancelled_linux_guest_migration_rolls_back_and_the_guest_runs_on() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(bed) = bed(0).await else { return };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca.create_vm(&linux()).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    // 2 MB/s: seconds of pre-copy to cancel in.
    let m = ca.migrate(&vm.id, &precopy(Some(2))).await.unwrap();
    let t = Instant::now();
    while ca.migration(&m.id).await.unwrap().progress.wire_bytes == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "nothing sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ca.cancel_migration(&m.id).await.unwrap();
    let done = wait_end(&ca, &m.id).await;
    assert_eq!(done.state, MigrationPhase::RolledBack, "{done:?}");
    assert!(
        done.error.as_deref().unwrap_or("").contains("cancelled"),
        "{done:?}"
    );
    assert_runs(&ca, &vm.id, before).await;
    let t = Instant::now();
    while !pids_under(&bed.hosts[1].data_dir).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the target QEMU stays"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(cb.vm(&vm.id).await.is_err(), "the target lists the VM");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_3s_link_cut_mid_migration_is_invisible_to_qemu() {
    let _one = ONE_AT_A_TIME.lock().await;
    // 8 MB/s so the stream takes long enough to cut it in the middle; a
    // guest writing a page per tick and a 5 s downtime budget, so pre-copy
    // ends in few rounds even with the cut (QEMU 7.2 under TCG corrupts
    // guests after 4 or more rounds: tern reports that run as corrupted).
    let Some(bed) = bed(8 << 20).await else {
        return;
    };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let spec = GuestSpec {
        dirty_mib_per_sec: 0,
        ..linux()
    };
    let vm = ca.create_vm(&spec).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    // zstd: one compression stream across the frames, so the resumed
    // session must hand the destination every frame once, in order, or
    // the stream cannot decode.
    let req = MigrateRequest {
        max_downtime_ms: Some(5000),
        compress: Some("zstd".into()),
        ..precopy(None)
    };
    let m = ca.migrate(&vm.id, &req).await.unwrap();
    let t = Instant::now();
    while ca.migration(&m.id).await.unwrap().progress.wire_bytes < (2 << 20) {
        assert!(t.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bed.to_b.cut(Duration::from_secs(3));
    bed.to_a.cut(Duration::from_secs(3));
    let done = wait_end(&ca, &m.id).await;
    eprintln!(
        "rounds {}, {:?}: {:?}",
        done.progress.round, done.state, done.error
    );
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.as_ref().expect("a report");
    eprintln!("stream {} pages, wire {} bytes", r.pages_sent, r.wire_bytes);
    assert!(
        r.wire_bytes < r.pages_sent * 4096 * 3 / 4,
        "the stream went uncompressed: {r:?}"
    );
    assert!(bed.to_b.connections() > 2, "no reconnection happened");
    assert_runs(&cb, &vm.id, before).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn killing_the_target_qemu_mid_migration_leaves_the_source_running() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(bed) = bed(4 << 20).await else {
        return;
    };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca.create_vm(&linux()).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    let m = ca.migrate(&vm.id, &precopy(None)).await.unwrap();
    let t = Instant::now();
    let target = loop {
        let q = pids_under(&bed.hosts[1].data_dir);
        let sent = ca.migration(&m.id).await.unwrap().progress.wire_bytes;
        if q.len() == 1 && sent > (1 << 20) {
            break q[0];
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(target).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let done = wait_end(&ca, &m.id).await;
    assert_eq!(done.state, MigrationPhase::RolledBack, "{done:?}");
    eprintln!("rolled back: {}", done.error.unwrap_or_default());
    assert_runs(&ca, &vm.id, before).await;
    let on_b = cb.vm(&vm.id).await;
    assert!(
        on_b.map(|v| v.status != GuestStatus::Running)
            .unwrap_or(true),
        "the target must not run the VM"
    );
    assert!(pids_under(&bed.hosts[1].data_dir).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_linux_guest_moves_by_postcopy_through_tern() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(bed) = bed(0).await else { return };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca.create_vm(&linux()).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    let req = MigrateRequest {
        mode: "postcopy".into(),
        ..precopy(None)
    };
    let m = ca.migrate(&vm.id, &req).await.unwrap();
    let done = wait_end(&ca, &m.id).await;
    if done.state != MigrationPhase::Committed {
        dump_guest_logs(&bed);
    }
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.unwrap();
    assert!(r.postcopy, "QEMU was switched to post-copy");
    eprintln!(
        "linux guest, post-copy: downtime {:.1} ms, total {:.0} ms",
        r.downtime_ms, r.total_ms
    );
    assert_runs(&cb, &vm.id, before).await;
    assert!(pids_under(&bed.hosts[0].data_dir).is_empty());
}

/// An agent killed mid-migration of a Linux guest (source or destination;
/// early pre-copy, a later round, just after the source's commit record,
/// mid post-copy): QEMU and its relay live in the guest's process, so the
/// migration ends as it would have, one copy runs, and the restarted agent
/// reports it. (Switchover under QEMU is QEMU's own final pass, too short to
/// hit from outside; the commit-record case is the moment after it.)
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_linux_guest_migrates_through_an_agent_killed_at_each_phase() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut bed) = bed(0).await else { return };
    let bin = Path::new(env!("CARGO_BIN_EXE_tern"));
    let env = [("TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS", "1500")];
    bed.a.kill();
    bed.a = AgentProcess::start_with_env(bin, &bed.hosts[0], None, &env).unwrap();
    let phases = [
        LinuxPhase::Streaming,
        LinuxPhase::LaterRound,
        LinuxPhase::AfterCommitRecord,
        LinuxPhase::MidPostcopy,
    ];
    for phase in phases {
        for k in [0usize, 1] {
            // A phase can pass between two polls (and QEMU can corrupt a
            // guest of a later round): try again with a new VM.
            let mut reached = false;
            for _ in 0..3 {
                if kill_agent_at(&mut bed, bin, &env, phase, k).await {
                    reached = true;
                    break;
                }
            }
            assert!(reached, "{phase:?} never reached in 3 tries");
            eprintln!(
                "linux guest, {} agent killed at {phase:?}: committed",
                if k == 0 { "source" } else { "destination" },
            );
        }
    }
}

/// Where a Linux guest's migration is when an agent is killed.
#[derive(Clone, Copy, Debug)]
enum LinuxPhase {
    /// Early pre-copy: QEMU's first pass is streaming.
    Streaming,
    /// Pre-copy after QEMU's first dirty sync (its next pass, or its final
    /// one with the guest stopped: QEMU's switchover).
    LaterRound,
    /// The source journaled its commit decision; `Commit` not yet sent.
    AfterCommitRecord,
    /// Post-copy: the guest runs on the destination, pages still follow.
    MidPostcopy,
}

/// Migrates a fresh Linux guest, kills agent `k` (0: source) at `phase`
/// and restarts it; false when the migration passed the phase unseen (or,
/// in a later round, QEMU corrupted the guest and tern caught it).
/// Otherwise asserts that the migration committed on both sides and one
/// copy runs on the destination, its counter going on.
async fn kill_agent_at(
    bed: &mut Bed,
    bin: &Path,
    env: &[(&str, &str)],
    phase: LinuxPhase,
    k: usize,
) -> bool {
    let ca = bed.a.client().unwrap();
    // A later round needs one: a guest that dirties more than a capped
    // link moves in QEMU's first pass (it still converges in 2-3 rounds).
    let later = matches!(phase, LinuxPhase::LaterRound);
    let spec = GuestSpec {
        dirty_mib_per_sec: if later { 8 } else { 1 },
        ..linux()
    };
    let vm = ca.create_vm(&spec).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    let req = match phase {
        LinuxPhase::MidPostcopy => MigrateRequest {
            mode: "postcopy".into(),
            ..precopy(None)
        },
        // A budget that its 16 MiB working set meets at 200 Mbit/s, so it
        // switches over in round 2 or 3: QEMU 7.2 under TCG corrupts guests
        // after 4+ rounds (tern then reports `corrupted`, seen once in CI
        // with a 300 ms budget).
        LinuxPhase::LaterRound => MigrateRequest {
            max_downtime_ms: Some(1000),
            ..precopy(Some(200))
        },
        _ => precopy(None),
    };
    let m = ca.migrate(&vm.id, &req).await.unwrap();
    let journal = tern_agent::vmdir::VmDir::new(&bed.hosts[0].data_dir, &vm.id.to_string())
        .0
        .join("journal.jsonl");
    let t = Instant::now();
    let reached = loop {
        let v = ca.migration(&m.id).await.unwrap();
        let recorded =
            std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("commit_decided"));
        let p = &v.progress;
        let at = match phase {
            LinuxPhase::Streaming => p.phase == MigrationPhase::Precopy && p.wire_bytes > 0,
            LinuxPhase::LaterRound => p.round >= 2,
            LinuxPhase::AfterCommitRecord => recorded,
            LinuxPhase::MidPostcopy => v.state == MigrationPhase::Postcopy,
        };
        let early = !matches!(
            phase,
            LinuxPhase::AfterCommitRecord | LinuxPhase::MidPostcopy
        );
        if at && !(early && recorded) {
            break true;
        }
        if v.state.is_final() {
            break false;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stuck before {phase:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if reached {
        let agent = if k == 0 { &mut bed.a } else { &mut bed.b };
        agent.kill();
        agent.release_guests();
        tokio::time::sleep(Duration::from_millis(300)).await;
        *agent = AgentProcess::start_with_env(bin, &bed.hosts[k], None, env).unwrap();
    }
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let done = wait_end(&ca, &m.id).await;
    if later && done.state == MigrationPhase::Corrupted {
        // QEMU 7.2 under TCG corrupted the guest in its own multi-round
        // pre-copy (seen in CI at round 3), and tern's check caught it.
        // Not what this case is about: try again with a new guest.
        eprintln!(
            "{phase:?}: QEMU corrupted the guest and tern caught it ({}); again",
            done.error.as_deref().unwrap_or_default()
        );
        let _ = cb.stop_vm(&vm.id).await;
        let _ = ca.stop_vm(&vm.id).await;
        return false;
    }
    assert_eq!(done.state, MigrationPhase::Committed, "{phase:?}: {done:?}");
    assert_eq!(wait_end(&cb, &m.id).await.state, MigrationPhase::Committed);
    assert_runs(&cb, &vm.id, before).await;
    assert_eq!(ca.vm(&vm.id).await.unwrap().status, GuestStatus::MovedAway);
    cb.stop_vm(&vm.id).await.unwrap();
    reached
}

/// The destination's guest process (and its QEMU) killed in the commit
/// window of a Linux guest: the source QEMU, paused and whole, is settled
/// as not committed and resumed; it keeps counting.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_linux_guest_resumes_when_its_destination_dies_in_the_commit_window() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut bed) = bed(0).await else { return };
    let bin = Path::new(env!("CARGO_BIN_EXE_tern"));
    let env = [("TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS", "3000")];
    bed.a.kill();
    bed.a = AgentProcess::start_with_env(bin, &bed.hosts[0], None, &env).unwrap();
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca
        .create_vm(&GuestSpec {
            dirty_mib_per_sec: 1,
            ..linux()
        })
        .await
        .unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    let m = ca.migrate(&vm.id, &precopy(None)).await.unwrap();
    let journal = tern_agent::vmdir::VmDir::new(&bed.hosts[0].data_dir, &vm.id.to_string())
        .0
        .join("journal.jsonl");
    let t = Instant::now();
    while !std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("commit_decided")) {
        assert!(t.elapsed() < Duration::from_secs(60), "no commit record");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    testbed::kill_guests(&bed.hosts[1].data_dir);
    let done = wait_end(&ca, &m.id).await;
    assert_eq!(done.state, MigrationPhase::RolledBack, "{done:?}");
    assert_eq!(wait_end(&cb, &m.id).await.state, MigrationPhase::RolledBack);
    assert_runs(&ca, &vm.id, before).await;
    assert!(cb.vm(&vm.id).await.is_err(), "host-b lists the VM");
    eprintln!(
        "commit window, destination killed: {}",
        done.error.unwrap_or_default()
    );
}

/// Waits for the end; if it does not come in 120 s, prints the guest
/// processes' logs of both hosts and fails.
async fn wait_end_or_dump(c: &AgentClient, id: &MigrationId, bed: &Bed) -> MigrationView {
    let t = Instant::now();
    loop {
        let v = c.migration(id).await.unwrap();
        if v.state.is_final() {
            return v;
        }
        if t.elapsed() > Duration::from_secs(120) {
            dump_guest_logs(bed);
            panic!("stuck: {v:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints every guest process's log on both hosts: what a failed test
/// needs to say why.
fn dump_guest_logs(bed: &Bed) {
    for h in &bed.hosts {
        for d in std::fs::read_dir(h.data_dir.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let log = std::fs::read_to_string(d.path().join("guest.log")).unwrap_or_default();
            eprintln!("==== {}:\n{log}", d.path().display());
        }
    }
}

/// Sends `sig` (`-STOP`, `-CONT`) to every process in `pids`.
fn signal(pids: &[i32], sig: &str) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status();
    }
}

/// Sends `sig` to host-b's agent, guest processes and QEMUs.
fn signal_host(bed: &Bed, sig: &str) {
    let data = &bed.hosts[1].data_dir;
    let mut pids = tern_agent::layout::guest_pids(data);
    pids.extend(pids_under(data));
    pids.push(bed.b.pid());
    signal(&pids, sig);
}

/// `tern migrate VM --to host-b --mode MODE` against host-a's agent, and
/// the migration it started.
async fn cli_migrate(bed: &Bed, vm: &VmId, mode: &str) -> (MigrationView, tokio::process::Child) {
    let host = &bed.hosts[0];
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["migrate", &vm.to_string(), "--to", "host-b", "--mode", mode])
        .args(["--max-downtime", "300", "--agent", &host.api_url])
        .arg("--token-file")
        .arg(host.data_dir.join("api-token"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ca = bed.a.client().unwrap();
    let t = Instant::now();
    loop {
        let started = ca.migrations_list().await.unwrap().into_iter();
        if let Some(m) = started
            .filter(|m| m.vm == *vm)
            .find(|m| !m.state.is_final())
        {
            return (m, cli);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the CLI started no migration"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the CLI printed when its migration ended; it succeeds only on a commit.
async fn cli_verdict(cli: tokio::process::Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(120), cli.wait_with_output())
        .await
        .expect("the CLI ended")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.success(), text.contains("Committed"), "{text}");
    text
}

/// Waits until `Commit` reached the destination in post-copy (true) or
/// the migration ended before it (false).
async fn reaches_postcopy(ca: &AgentClient, cb: &AgentClient, id: &MigrationId) -> bool {
    let t = Instant::now();
    loop {
        if let Ok(v) = cb.migration(id).await {
            if v.progress.phase == MigrationPhase::Postcopy {
                return true;
            }
        }
        let v = ca.migration(id).await.unwrap();
        if v.state.is_final() {
            eprintln!("ended before a post-copy commit: {v:?}");
            return false;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "no commit: {v:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The destination host frozen (SIGSTOP: its agent, guest process and
/// QEMU) for 10 s just after the commit of a post-copy migration, with
/// pages still to send: the source keeps serving pages until the
/// destination has them all (its QEMU, its stream blocked, answers QMP
/// late meanwhile), the destination's guest check waits for the guest to
/// be able to advance, and the guest ends up running on host-b, its
/// checks holding.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: Linux guests under QEMU, two agent processes"]
async fn a_linux_guest_survives_its_destination_frozen_after_a_postcopy_commit() {
    let _one = ONE_AT_A_TIME.lock().await;
    // An unlimited link: on a slow one (4 MB/s) the destination QEMU,
    // faulting on pages while it loads, can miss QMP deadlines before the
    // commit (a rollback; see the closing note of issue 16).
    let Some(bed) = bed(0).await else {
        return;
    };
    let (ca, cb) = (bed.a.client().unwrap(), bed.b.client().unwrap());
    let vm = ca.create_vm(&linux()).await.unwrap();
    let before = assert_runs(&ca, &vm.id, 0).await;
    // Before the commit a slow destination may make the migration roll back
    // (its QEMU, loading over a slow link, can miss a QMP deadline): that is
    // allowed, so try again; this test is about what follows a commit.
    let mut tries = 0;
    let (m, cli) = loop {
        tries += 1;
        let (m, cli) = cli_migrate(&bed, &vm.id, "postcopy").await;
        if reaches_postcopy(&ca, &cb, &m.id).await {
            break (m, cli);
        }
        let said = cli_verdict(cli).await;
        assert!(said.contains("RolledBack"), "the CLI said: {said}");
        assert!(tries < 3, "no post-copy commit in {tries} tries");
        assert_runs(&ca, &vm.id, before).await;
    };
    // A slow link from the commit on keeps pages to send while host-b is
    // frozen: the source fills its window and its acks are lost with the
    // dropped streams (unthrottled, post-copy often ended before the freeze).
    bed.to_b.set_rate(8 << 20);
    // The source publishes QEMU's RAM figures on its 100 ms ticks (QMP can
    // answer late under TCG): wait for figures from post-copy itself, or
    // the reading below may still be the one taken before any page moved.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let p = ca.migration(&m.id).await.unwrap().progress;
        if p.phase == MigrationPhase::Postcopy && (p.pages_sent > 0 || p.pages_remaining > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal_host(&bed, "-STOP");
    let at = ca.migration(&m.id).await.unwrap().progress;
    eprintln!(
        "froze host-b in post-copy: {} pages sent, {} remaining",
        at.pages_sent, at.pages_remaining
    );
    assert!(
        at.pages_remaining > 0,
        "post-copy ended before the freeze: {at:?}"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    bed.to_b.set_rate(0);
    signal_host(&bed, "-CONT");
    let done = wait_end_or_dump(&ca, &m.id, &bed).await;
    eprintln!(
        "post-copy, destination frozen 10 s after commit: {:?} {}",
        done.state,
        done.error.clone().unwrap_or_default()
    );
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    assert_eq!(wait_end(&cb, &m.id).await.state, MigrationPhase::Committed);
    let said = cli_verdict(cli).await;
    assert!(said.contains("Committed"), "the CLI said: {said}");
    let now = assert_runs(&cb, &vm.id, before).await;
    assert!(pids_under(&bed.hosts[0].data_dir).is_empty());
    // A guest that cannot advance is never listed as running.
    let qemu = pids_under(&bed.hosts[1].data_dir);
    signal(&qemu, "-STOP");
    let v = cb.vm(&vm.id).await.unwrap();
    signal(&qemu, "-CONT");
    assert_eq!(v.status, GuestStatus::Stalled, "{v:?}");
    assert_runs(&cb, &vm.id, now).await;
}
