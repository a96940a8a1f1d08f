//! Pre-copy of a running tern-vmm test guest between two machines over real
//! transport sessions on loopback (both ends in this process; the agent
//! processes and the CLI come later).

use ed25519_dalek::SigningKey;
use std::path::Path;
use std::time::Duration;
use tern_migrate::{
    migrate, receive, Capacity, Codec, CommitStep, DestLink, MigrateError, MigrationPhase, Policy,
    SourceLink,
};
use tern_transport::{certs, Listener, Security, Sender, SessionConfig, TlsIdentity};
use tern_vmm::halves::incoming_machine;
use tern_vmm::{Machine, MachineConfig, RunState, TestGuestConfig, WaitOutcome, TEST_GUEST_ELF};

const WAIT: Duration = Duration::from_secs(60);

use tern_vmm::testing::kvm_or_skip as kvm_available;

fn guest() -> TestGuestConfig {
    TestGuestConfig {
        ws_pages: 256,
        pages_per_tick: 4,
        ticks_per_sum: 16,
        exit_after: 0,
    }
}

fn boot() -> Machine {
    let m = tern_vmm::boot_test_guest(
        MachineConfig {
            memory_mib: 64,
            ..Default::default()
        },
        &guest(),
        Path::new(TEST_GUEST_ELF),
    )
    .unwrap();
    m.resume().unwrap();
    assert_eq!(
        m.wait_until(WAIT, |d| d.agent.counter >= 50),
        WaitOutcome::Satisfied
    );
    m
}

/// Host identities for mutual TLS: host-a (source) and host-b
/// (destination), each pinned to the other.
struct Hosts {
    _dir: tempfile::TempDir,
    a: TlsIdentity,
    b: TlsIdentity,
}

fn hosts() -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::init_ca(&d.join("ca")).unwrap();
    let year = Duration::from_secs(365 * 86400);
    let a = certs::issue(&d.join("ca"), "host-a", d, year, false).unwrap();
    let b = certs::issue(&d.join("ca"), "host-b", d, year, false).unwrap();
    let pin = |s: &str| tern_transport::tls::parse_pin(s).unwrap();
    let ca = d.join("ca/ca.pem");
    Hosts {
        a: TlsIdentity::load(&a.cert, &a.key, &ca, &[pin(&b.spki_sha256)]).unwrap(),
        b: TlsIdentity::load(&b.cert, &b.key, &ca, &[pin(&a.spki_sha256)]).unwrap(),
        _dir: dir,
    }
}

async fn links() -> (SourceLink, DestLink) {
    links_with(None).await
}

/// Data source -> destination, replies back; over mutual TLS when `tls`.
async fn links_with(tls: Option<&Hosts>) -> (SourceLink, DestLink) {
    let cfg = SessionConfig {
        streams: 2,
        ..Default::default()
    };
    let server = |id: &TlsIdentity| Some(id.server_config().unwrap());
    let client = |id: &TlsIdentity, peer: &str| Security::Tls {
        config: id.client_config().unwrap(),
        server_name: peer.into(),
    };
    let addr = "127.0.0.1:0".parse().unwrap();
    let mut data_l = Listener::bind(
        addr,
        tls.and_then(|h| server(&h.b)),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let mut reply_l = Listener::bind(
        addr,
        tls.and_then(|h| server(&h.a)),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let (data_sec, reply_sec) = match tls {
        Some(h) => (client(&h.a, "host-b"), client(&h.b, "host-a")),
        None => (Security::InsecurePlaintext, Security::InsecurePlaintext),
    };
    let data_tx = Sender::connect(data_l.local_addr(), data_sec, cfg.clone(), None)
        .await
        .unwrap();
    let data_rx = data_l.accept().await.unwrap();
    let reply_tx = Sender::connect(reply_l.local_addr(), reply_sec, cfg, None)
        .await
        .unwrap();
    let reply_rx = reply_l.accept().await.unwrap();
    (
        SourceLink {
            data: data_tx,
            replies: reply_rx,
        },
        DestLink {
            data: data_rx,
            replies: reply_tx,
        },
    )
}

/// Runs the destination half with a fresh tern-vmm machine.
fn spawn_dest(
    dl: DestLink,
    trusted: ed25519_dalek::VerifyingKey,
    cap: Capacity,
) -> tokio::task::JoinHandle<Result<Machine, MigrateError>> {
    tokio::spawn(async move {
        receive(
            dl,
            |req| incoming_machine(&req.shape).map_err(|e| e.to_string()),
            &trusted,
            &cap,
        )
        .await
    })
}

fn capacity() -> Capacity {
    Capacity {
        max_memory_bytes: 1 << 30,
        max_vcpus: 8,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_moves_a_running_guest_and_it_carries_on() {
    precopy_round_trip(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_over_mutual_tls_with_pinned_hosts() {
    let h = hosts();
    precopy_round_trip(Some(&h)).await;
}

async fn precopy_round_trip(tls: Option<&Hosts>) {
    if !kvm_available() {
        return;
    }
    let mut src = boot();
    let (sl, dl) = links_with(tls).await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_dest(dl, vk, capacity());
    let report = migrate(&mut src, sl, &key, &Policy::default(), "m-1")
        .await
        .committed()
        .unwrap();
    let dst: Machine = dest.await.unwrap().unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert_eq!(report.phase, MigrationPhase::Committed);
    assert!(
        matches!(src.run_state(), RunState::Exited(_)),
        "the source copy is gone after commit"
    );
    // The destination verified every page against the source's signed
    // hashes; now the guest must carry on from where it stopped.
    let at_switch = dst.with_devices(|d| d.agent.counter);
    assert!(at_switch >= 50);
    let g = guest();
    let out = dst.wait_until(WAIT, |d| {
        d.agent.checksum.is_some_and(|(at, _)| at > at_switch + 16)
    });
    assert_eq!(out, WaitOutcome::Satisfied);
    let (at, sum) = dst.with_devices(|d| d.agent.checksum).unwrap();
    assert_eq!(
        sum,
        g.expected_checksum(at),
        "working set intact at counter {at}"
    );
    assert!(!report.rounds.is_empty() && report.downtime_ms > 0.0);
    // Pages the guest never wrote are not read, let alone sent: the first
    // round covers only the written ones (the test guest leaves most of
    // its RAM untouched), and the destination still verified every page.
    let total = report.memory_bytes / 4096;
    assert!(report.pages_never_written > total / 2, "{report:?}");
    assert_eq!(
        report.rounds[0].pages,
        total - report.pages_never_written,
        "{report:?}"
    );
    // The switchover steps are measured one after another inside the pause,
    // so they account for the downtime without exceeding it.
    let s = &report.switchover;
    // The commit record is written before the pause (not counted).
    let steps = [s.pause_ms, s.send_ms, s.ready_ms, s.running_ms];
    assert!(steps.iter().all(|&t| t >= 0.0) && s.ready_ms > 0.0, "{s:?}");
    assert!(
        steps.iter().sum::<f64>() <= report.downtime_ms + 1e-6,
        "{s:?} vs {report:?}"
    );
}

/// Moves a fresh test guest under `policy`; returns how its pages were
/// encoded, after checking the guest carried on intact.
async fn encodings_under(policy: Policy) -> tern_migrate::Encodings {
    let mut src = boot();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let dest = spawn_dest(dl, key.verifying_key(), capacity());
    let report = migrate(&mut src, sl, &key, &policy, "m-codec")
        .await
        .committed()
        .unwrap();
    let dst: Machine = dest.await.unwrap().unwrap();
    let at_switch = dst.with_devices(|d| d.agent.counter);
    let out = dst.wait_until(WAIT, |d| {
        d.agent.checksum.is_some_and(|(at, _)| at > at_switch + 16)
    });
    assert_eq!(out, WaitOutcome::Satisfied);
    let (at, sum) = dst.with_devices(|d| d.agent.checksum).unwrap();
    assert_eq!(sum, guest().expected_checksum(at), "intact at counter {at}");
    eprintln!("{:?}: {:?}", policy.compression, report.encodings);
    report.encodings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_chosen_from_the_link_unless_one_is_asked_for() {
    if !kvm_available() {
        return;
    }
    // A 4 MB/s cap: bytes cost more than CPU, and the test guest's pages
    // compress, so `auto` picks zstd.
    let slow = |compression| Policy {
        bandwidth_bytes_per_sec: 4_000_000,
        compression,
        ..Policy::default()
    };
    let auto = encodings_under(slow(Codec::Auto)).await;
    assert!(auto.zstd > 0 && auto.lz4 == 0, "{auto:?}");
    // What the operator asks for is used as it is.
    let none = encodings_under(slow(Codec::None)).await;
    assert!(none.zstd == 0 && none.lz4 == 0 && none.raw > 0, "{none:?}");
    let lz4 = encodings_under(slow(Codec::Lz4)).await;
    assert!(lz4.zstd == 0 && lz4.lz4 > 0, "{lz4:?}");
    // Unlimited loopback: the link is fast, so no zstd, and LZ4 (probed
    // first) pays on these pages.
    let fast = encodings_under(Policy::default()).await;
    assert!(fast.zstd == 0 && fast.lz4 > 0, "{fast:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_manifest_is_refused_and_the_source_keeps_running() {
    if !kvm_available() {
        return;
    }
    let mut src = boot();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    // The destination trusts another host's key: the signature is forged from its view.
    let trusted = SigningKey::from_bytes(&rand::random()).verifying_key();
    let dest = spawn_dest(dl, trusted, capacity());
    let err = migrate(&mut src, sl, &key, &Policy::default(), "m-2")
        .await
        .committed()
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::DestinationFailed(r) if r.contains("signature")),
        "{err}"
    );
    let dest_err = dest.await.unwrap().err().unwrap();
    assert!(dest_err.to_string().contains("signature"), "{dest_err}");
    assert_eq!(src.run_state(), RunState::Running, "the source runs again");
    let c = src.with_devices(|d| d.agent.counter);
    assert_eq!(
        src.wait_until(WAIT, |d| d.agent.counter > c + 10),
        WaitOutcome::Satisfied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_capacity_rejects() {
    if !kvm_available() {
        return;
    }
    let mut src = boot();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_dest(
        dl,
        vk,
        Capacity {
            max_memory_bytes: 32 << 20,
            max_vcpus: 8,
        },
    );
    let err = migrate(&mut src, sl, &key, &Policy::default(), "m-3")
        .await
        .committed()
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::Rejected(r) if r.contains("capacity")),
        "{err}"
    );
    assert!(dest.await.unwrap().is_err());
    assert_eq!(src.run_state(), RunState::Running);
}

/// Through the link emulator: 20 ms RTT, 4 MB/s, and the link cut for 2 s
/// in the middle of round 1. The transport resumes, the migration completes,
/// and the destination verifies every page (8 MiB of them random).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_link_cut_mid_transfer_is_survived() {
    use tern_testkit::{LinkConfig, LinkEmulator};
    use vm_memory::{Bytes, GuestAddress};
    if !kvm_available() {
        return;
    }
    let mut src = boot();
    // Incompressible content the guest never touches, so round 1 takes a while.
    let noise: Vec<u8> = (0..8 << 20).map(|_| rand::random::<u8>()).collect();
    src.memory()
        .write_slice(&noise, GuestAddress(32 << 20))
        .unwrap();

    let cfg = SessionConfig {
        streams: 2,
        resume_deadline: Duration::from_secs(20),
        ..Default::default()
    };
    let mut data_l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        None,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let link = LinkEmulator::start(
        data_l.local_addr(),
        LinkConfig {
            one_way_delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            rate_bytes_per_sec: 4 << 20,
            queue_bytes: 256 << 10,
        },
    )
    .await
    .unwrap();
    let mut reply_l = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        None,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let data_tx = Sender::connect(link.addr(), Security::InsecurePlaintext, cfg.clone(), None)
        .await
        .unwrap();
    let data_rx = data_l.accept().await.unwrap();
    let reply_tx = Sender::connect(reply_l.local_addr(), Security::InsecurePlaintext, cfg, None)
        .await
        .unwrap();
    let reply_rx = reply_l.accept().await.unwrap();

    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_dest(
        DestLink {
            data: data_rx,
            replies: reply_tx,
        },
        vk,
        capacity(),
    );
    let cutter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        link.cut(Duration::from_secs(2));
        link
    });
    let report = migrate(
        &mut src,
        SourceLink {
            data: data_tx,
            replies: reply_rx,
        },
        &key,
        &Policy::default(),
        "m-cut",
    )
    .await
    .committed()
    .unwrap();
    let link = cutter.await.unwrap();
    let dst = dest.await.unwrap().unwrap();
    eprintln!(
        "through a 20 ms RTT, 4 MB/s link cut for 2 s: total {:.0} ms, downtime {:.1} ms, {} rounds, {} KiB on the wire, {} connections",
        report.total_ms,
        report.downtime_ms,
        report.rounds.len(),
        report.wire_bytes / 1024,
        link.connections()
    );
    assert_eq!(report.phase, MigrationPhase::Committed);
    assert!(
        link.connections() > 2,
        "the data session reconnected after the cut"
    );
    assert!(
        report.total_ms > 2000.0,
        "the cut happened during the transfer"
    );
    let mut got = vec![0u8; noise.len()];
    dst.read_memory(32 << 20, &mut got).unwrap();
    assert!(got == noise, "the random region arrived intact");
    let c = dst.with_devices(|d| d.agent.counter);
    assert_eq!(
        dst.wait_until(WAIT, |d| d.agent.counter > c + 10),
        WaitOutcome::Satisfied
    );
}

/// A process workload that dirties its whole working set faster than a
/// capped link can send it.
fn outrunning_workload() -> tern_vmm::process::ProcessGuest {
    // 64 MiB, 8 MiB of incompressible working set rewritten at 2 GiB/s.
    tern_vmm::process::ProcessGuest::start(64 << 20, 2048, 2000 << 20).unwrap()
}

/// Runs the destination half with an empty process workload.
fn spawn_process_dest(
    dl: DestLink,
    vk: ed25519_dalek::VerifyingKey,
) -> tokio::task::JoinHandle<Result<tern_vmm::process::ProcessGuest, MigrateError>> {
    tokio::spawn(async move {
        receive(
            dl,
            |req| tern_vmm::process::ProcessGuest::incoming(&req.shape).map_err(|e| e.to_string()),
            &vk,
            &capacity(),
        )
        .await
    })
}

fn capped_policy() -> Policy {
    Policy {
        bandwidth_bytes_per_sec: 24 << 20,
        max_downtime: Duration::from_millis(20),
        max_rounds: 6,
        ..Policy::default()
    }
}

/// The source's commit hook runs twice: at `Switchover`, before the guest
/// pauses (the durable record, whose disk flush is then no part of the
/// downtime), and at `Commit`, after `Ready`. A record that cannot be
/// written stops the migration before any pause: it rolls back, the
/// destination keeps nothing and the guest runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_record_comes_before_the_pause_and_its_failure_rolls_back() {
    for fail in [false, true] {
        let mut src = tern_vmm::process::ProcessGuest::start(32 << 20, 256, 20 << 20).unwrap();
        let (sl, dl) = links().await;
        let key = SigningKey::from_bytes(&rand::random());
        let dest = spawn_process_dest(dl, key.verifying_key());
        let mut steps = Vec::new();
        let mut hook = |step: CommitStep| -> Result<(), tern_migrate::HookError> {
            steps.push(step);
            if fail {
                return Err("disk full".into());
            }
            Ok(())
        };
        let (progress, _) = tokio::sync::watch::channel(Default::default());
        let outcome = tern_migrate::migrate_observed(
            &mut src,
            sl,
            &key,
            &Policy::default(),
            "m-record",
            progress,
            &mut hook,
        )
        .await;
        let d = tokio::time::timeout(Duration::from_secs(30), dest)
            .await
            .expect("the destination hung")
            .unwrap();
        if !fail {
            assert_eq!(steps, [CommitStep::Switchover, CommitStep::Commit]);
            let report = outcome.committed().unwrap();
            assert!(report.switchover.commit_record_ms >= 0.0);
            assert!(d.is_ok());
            continue;
        }
        assert_eq!(steps, [CommitStep::Switchover], "Commit was attempted");
        let err = outcome.committed().unwrap_err();
        assert!(matches!(err, MigrateError::CommitRecord(_)), "{err}");
        assert!(d.is_err(), "the destination kept a copy");
        let w = src.writes();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(src.writes() > w, "the source guest does not run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_converge_throttles_a_guest_that_outruns_the_link() {
    let mut src = outrunning_workload();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_process_dest(dl, vk);
    let report = migrate(&mut src, sl, &key, &capped_policy(), "m-converge")
        .await
        .committed()
        .unwrap();
    let dst = dest.await.unwrap().unwrap();
    eprintln!(
        "rounds {:?}, throttle {} %, downtime {:.1} ms",
        report
            .rounds
            .iter()
            .map(|r| (r.pages, r.dirtied))
            .collect::<Vec<_>>(),
        report.throttle_percent,
        report.downtime_ms
    );
    assert_eq!(report.phase, MigrationPhase::Committed);
    assert!(report.throttle_percent >= 30, "auto-converge never engaged");
    assert_eq!(report.bandwidth_raised_to, 0, "no ceiling was given");
    // The destination verified every page; the workload carries on there.
    let w = dst.writes();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(dst.is_running() && dst.writes() > w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_misses_its_deadline_rolls_back_and_the_source_runs_at_full_speed() {
    let mut src = outrunning_workload();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_process_dest(dl, vk);
    let policy = Policy {
        deadline: Some(Duration::from_millis(300)),
        max_rounds: 1000,
        auto_converge: false,
        ..capped_policy()
    };
    let err = migrate(&mut src, sl, &key, &policy, "m-deadline")
        .await
        .committed()
        .unwrap_err();
    eprintln!("source: {err}");
    assert!(matches!(err, MigrateError::NotConverged(_)), "{err}");
    let d = tokio::time::timeout(Duration::from_secs(30), dest)
        .await
        .expect("the destination hung");
    assert!(d.unwrap().is_err(), "the destination kept a copy");
    let w = src.writes();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 200 MiB/s is 5120 pages per 100 ms: unthrottled, it writes thousands.
    assert!(
        src.writes() > w + 1000,
        "the source is not running at full speed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_migration_rolls_back_and_the_source_runs_on() {
    let mut src = outrunning_workload();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_process_dest(dl, vk);
    let policy = Policy {
        max_rounds: 1000,
        auto_converge: false,
        ..capped_policy()
    };
    let cancel = policy.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let t = std::time::Instant::now();
    let err = migrate(&mut src, sl, &key, &policy, "m-cancel")
        .await
        .committed()
        .unwrap_err();
    eprintln!("source: {err} after {:?}", t.elapsed());
    assert!(matches!(err, MigrateError::Cancelled), "{err}");
    let d = tokio::time::timeout(Duration::from_secs(30), dest)
        .await
        .expect("the destination hung");
    assert!(d.unwrap().is_err(), "the destination kept a copy");
    let w = src.writes();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(src.writes() > w, "the source guest does not run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_serves_the_pages_a_running_workload_touches_first() {
    // Whether the workload on the destination reaches a page before the
    // background push does is up to the scheduler (a loaded CI machine once
    // starved it for the whole push), so this takes up to six migrations
    // to see a page served on demand; each must complete correctly.
    let mut served = 0;
    for _ in 0..6 {
        served = postcopy_once().await;
        if served > 0 {
            break;
        }
    }
    assert!(served > 0, "no page was served on demand in six migrations");
}

/// One post-copy migration; returns the faults served on demand.
async fn postcopy_once() -> u64 {
    let mut src = outrunning_workload();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_process_dest(dl, vk);
    // 8 MiB of working set behind a 4 MB/s push: the workload, running on the
    // destination at once, writes to pages long before the push gets there.
    let policy = Policy {
        mode: tern_migrate::engine::Mode::Postcopy,
        bandwidth_bytes_per_sec: 4 << 20,
        ..Policy::default()
    };
    let report = migrate(&mut src, sl, &key, &policy, "m-postcopy")
        .await
        .committed()
        .unwrap();
    let dst = dest.await.unwrap().unwrap();
    eprintln!(
        "post-copy: downtime {:.1} ms, {:.0} ms to finish, {} faults served, {:.1} MB",
        report.downtime_ms,
        report.postcopy_ms,
        report.faults_served,
        report.wire_bytes as f64 / 1e6
    );
    assert!(report.postcopy && report.rounds.is_empty());
    // Every page arrived and matched the source's signed root; it runs on.
    let w = dst.writes();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(dst.writes() > w);
    report.faults_served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_link_is_raised_toward_its_ceiling_before_the_guest_is_throttled() {
    let mut src = outrunning_workload();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let dest = spawn_process_dest(dl, vk);
    let policy = Policy {
        max_bandwidth_bytes_per_sec: 36 << 20,
        ..capped_policy()
    };
    let report = migrate(&mut src, sl, &key, &policy, "m-raise")
        .await
        .committed()
        .unwrap();
    dest.await.unwrap().unwrap();
    eprintln!(
        "raised to {} B/s, throttle {} %",
        report.bandwidth_raised_to, report.throttle_percent
    );
    assert_eq!(
        report.bandwidth_raised_to,
        36 << 20,
        "24 MiB/s x 1.5 = the 36 MiB/s ceiling"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_sends_only_written_pages_and_the_destination_zero_fills_the_rest() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    const RAM_PAGES: u64 = 16384;
    const WS_PAGES: u64 = 2048;
    // 64 MiB, of which the workload ever wrote its 8 MiB working set: the
    // rest was never touched, as in most real processes.
    let mut src =
        tern_vmm::process::ProcessGuest::start_with(RAM_PAGES << 12, WS_PAGES, 8 << 20, false)
            .unwrap();
    let (sl, dl) = links().await;
    let key = SigningKey::from_bytes(&rand::random());
    let vk = key.verifying_key();
    let (mem_tx, mem_rx) = std::sync::mpsc::channel();
    let dest = tokio::spawn(async move {
        receive(
            dl,
            move |req| {
                let g = tern_vmm::process::ProcessGuest::incoming(&req.shape)
                    .map_err(|e| e.to_string())?;
                let _ = mem_tx.send(g.memory());
                Ok(g)
            },
            &vk,
            &capacity(),
        )
        .await
    });
    // As a guest would, a thread reads pages the source never wrote on the
    // destination, a new one every 2 ms, and counts the reads that began
    // and ended while post-copy ran. Such a page is never sent: without a
    // zero fill the first read would wait until post-copy ended.
    let (progress, watch) = tokio::sync::watch::channel(tern_migrate::Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let within = Arc::new(AtomicU64::new(0));
    let reader = {
        let (done, within) = (done.clone(), within.clone());
        std::thread::spawn(move || {
            let mem = mem_rx.recv_timeout(WAIT).unwrap();
            let in_postcopy = || watch.borrow().phase == MigrationPhase::Postcopy;
            let mut buf = [0u8; 64];
            for page in WS_PAGES + 1..RAM_PAGES {
                if done.load(Relaxed) {
                    break;
                }
                let before = in_postcopy();
                mem.read(page as usize * 4096, &mut buf).unwrap();
                assert_eq!(buf, [0; 64], "page {page} reads as zeros");
                if before && in_postcopy() {
                    within.fetch_add(1, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // 8 MiB behind a 4 MB/s link: post-copy lasts about two seconds.
    let policy = Policy {
        mode: tern_migrate::engine::Mode::Postcopy,
        bandwidth_bytes_per_sec: 4 << 20,
        ..Policy::default()
    };
    let report = tern_migrate::migrate_observed(
        &mut src,
        sl,
        &key,
        &policy,
        "m-sparse",
        progress,
        &mut |_| Ok(()),
    )
    .await
    .committed()
    .unwrap();
    let dst = dest.await.unwrap().unwrap();
    done.store(true, Relaxed);
    reader.join().unwrap();
    let within = within.load(Relaxed);
    eprintln!(
        "sparse post-copy: {} pages never written, {} sent, {:.0} ms of post-copy, {within} reads of unsent pages during it",
        report.pages_never_written, report.pages_sent, report.postcopy_ms
    );
    // Only the working set crossed; the rest is zeros on both sides, and
    // the destination verified every page's hash against the source's root.
    assert_eq!(
        report.pages_never_written,
        RAM_PAGES - WS_PAGES,
        "{report:?}"
    );
    assert!(report.pages_sent <= WS_PAGES, "{report:?}");
    assert!(
        within >= 20,
        "reads of unsent pages waited for post-copy: {within}"
    );
    let w = dst.writes();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(dst.writes() > w, "the workload runs on the destination");
}
