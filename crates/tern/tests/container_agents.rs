//! End to end with containers: tern's counter workload under runc, moved
//! between two `tern agent` processes as a CRIU checkpoint in one signed
//! archive (CRIU 4.2, built by scripts/criu-setup.sh; the rootfs from
//! scripts/workload-rootfs.sh).
//!
//! Skipped when not root, or without a working CRIU or the rootfs, unless
//! `TERN_REQUIRE_CRIU=1` (CI).

mod common;

use common::{containers_or_skip, mode_to, wait_end, AgentProc};
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrationPhase};
use tern_proto::{GuestKind, GuestSpec, GuestStatus, VmId};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn container() -> GuestSpec {
    GuestSpec {
        kind: GuestKind::Container,
        memory_mib: 64,
        ws_mib: 8,
        dirty_mib_per_sec: 4,
        ..Default::default()
    }
}

/// The container runs on `c` at `epoch`: its counter passes `beyond` and
/// the workload's own continuity check holds. Returns the counter.
async fn runs_beyond(c: &AgentClient, vm: &VmId, epoch: u64, beyond: u64) -> u64 {
    let t = Instant::now();
    loop {
        let v = c.vm(vm).await.unwrap();
        assert_eq!(v.status, GuestStatus::Running, "{v:?}");
        assert_eq!(v.epoch, epoch, "{v:?}");
        assert_ne!(v.checksum_ok, Some(false), "the workload broke: {v:?}");
        let n = v.counter.unwrap_or(0);
        if n > beyond + 3 {
            return n;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not counting: {v:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Migrates `vm` from `c` to `to` by pre-copy and waits for the end.
async fn move_to(c: &AgentClient, vm: &VmId, to: &str) -> tern_agent::MigrationView {
    move_in(c, vm, to, "precopy").await
}

/// Migrates `vm` from `c` to `to` in `mode` (`postcopy`: a lazy dump, the
/// memory moving after the container runs again) and waits for the end.
async fn move_in(c: &AgentClient, vm: &VmId, to: &str, mode: &str) -> tern_agent::MigrationView {
    let m = c.migrate(vm, &mode_to(to, mode)).await.unwrap();
    wait_end(c, &m.id, Duration::from_secs(120)).await
}

struct Bed {
    a: AgentProc,
    b: AgentProc,
    hosts: Vec<tern_testbed::LocalHost>,
    _dir: tempfile::TempDir,
}

fn bed(source_env: &[(&str, &str)]) -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let hosts = common::loopback_pair(dir.path());
    let a = AgentProc::start_env(&hosts[0], source_env);
    let b = AgentProc::start(&hosts[1], None);
    Bed {
        a,
        b,
        hosts,
        _dir: dir,
    }
}

/// No runc container of `vm` is left under `data_dir`'s VM directories
/// but those of running guests.
fn container_dirs(data_dir: &Path, vm: &VmId) -> usize {
    let Ok(list) = std::fs::read_dir(data_dir.join("vms")) else {
        return 0;
    };
    list.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&vm.to_string()))
        .filter(|e| e.path().join("container").exists())
        .count()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: containers checkpointed by CRIU between two agent processes"]
async fn a_container_migrates_between_agents_and_back_and_keeps_counting() {
    if !containers_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = bed(&[]);
    let (ca, cb) = (bed.a.client(), bed.b.client());
    let vm = ca.create_vm(&container()).await.unwrap();
    let before = runs_beyond(&ca, &vm.id, 1, 0).await;

    let done = move_to(&ca, &vm.id, "host-b").await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.as_ref().unwrap();
    eprintln!(
        "container a -> b: downtime {:.1} ms (dump {:.1}, send {:.1}, load {:.1}, commit record {:.1}, restore {:.1}), total {:.1} ms, archive {} bytes, {} on the wire",
        r.downtime_ms,
        r.switchover.pause_ms,
        r.switchover.send_ms,
        r.switchover.ready_ms,
        r.switchover.commit_record_ms,
        r.switchover.running_ms,
        r.total_ms,
        r.memory_bytes,
        r.wire_bytes
    );
    assert!(r.downtime_ms > 0.0 && r.wire_bytes > 0, "{r:?}");
    let after = runs_beyond(&cb, &vm.id, 2, before).await;
    let gone = ca.vm(&vm.id).await.unwrap();
    assert_eq!(gone.status, GuestStatus::MovedAway, "{gone:?}");
    assert_eq!(
        wait_end(&cb, &done.id, Duration::from_secs(30)).await.state,
        MigrationPhase::Committed
    );
    assert_eq!(
        container_dirs(&bed.hosts[0].data_dir, &vm.id),
        0,
        "the source kept its container's files"
    );

    // And back, lazily: the same container runs on from where it was
    // before its memory followed.
    let done = move_in(&cb, &vm.id, "host-a", "postcopy").await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.as_ref().unwrap();
    eprintln!(
        "container b -> a, lazy: downtime {:.1} ms (dump {:.1}, send {:.1}, load {:.1}, restore {:.1}), total {:.1} ms, {} on the wire",
        r.downtime_ms,
        r.switchover.pause_ms,
        r.switchover.send_ms,
        r.switchover.ready_ms,
        r.switchover.running_ms,
        r.total_ms,
        r.wire_bytes
    );
    assert!(r.downtime_ms > 0.0, "{r:?}");
    let back = runs_beyond(&ca, &vm.id, 3, after).await;
    assert_eq!(cb.vm(&vm.id).await.unwrap().status, GuestStatus::MovedAway);
    assert_eq!(container_dirs(&bed.hosts[1].data_dir, &vm.id), 0);

    // And there again, lazily, from the host it came back to.
    let done = move_in(&ca, &vm.id, "host-b", "postcopy").await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    runs_beyond(&cb, &vm.id, 4, back).await;
    cb.stop_vm(&vm.id).await.unwrap();
}

/// A checkpoint the destination cannot trust is refused before it is
/// restored, and the source runs its container on, at the same epoch.
async fn refused_and_source_runs_on(fault: &str, says: &str, mode: &str) {
    let bed = bed(&[("TERN_FAULT_CHECKPOINT", fault)]);
    let (ca, cb) = (bed.a.client(), bed.b.client());
    let vm = ca.create_vm(&container()).await.unwrap();
    let before = runs_beyond(&ca, &vm.id, 1, 0).await;
    let done = move_in(&ca, &vm.id, "host-b", mode).await;
    assert_eq!(done.state, MigrationPhase::RolledBack, "{done:?}");
    let error = done.error.clone().unwrap_or_default();
    assert!(error.contains(says), "{fault}: {error}");
    eprintln!("{fault}: refused: {error}");
    runs_beyond(&ca, &vm.id, 1, before).await;
    let there = cb.vm(&vm.id).await;
    assert!(
        there
            .as_ref()
            .map_or(true, |v| v.status != GuestStatus::Running),
        "{there:?}"
    );
    assert_eq!(container_dirs(&bed.hosts[1].data_dir, &vm.id), 0);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: containers checkpointed by CRIU between two agent processes"]
async fn a_forged_or_corrupted_checkpoint_is_refused_and_the_source_runs_on() {
    if !containers_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    refused_and_source_runs_on("forge", "signature", "precopy").await;
    refused_and_source_runs_on("corrupt", "", "precopy").await;
    // A lazy dump given up: the frozen container runs on where it was.
    refused_and_source_runs_on("forge", "signature", "postcopy").await;
}

/// A client outside both hosts that keeps one connection to the container
/// and asks for the count every 10 ms: every answer, in order.
struct Client {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<(Duration, u64)>, String>>,
}

impl Client {
    fn start(addr: std::net::SocketAddr) -> (Client, std::net::SocketAddr) {
        use std::io::{BufRead, Write};
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let local = s.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            // A request may wait out the downtime and the address's move,
            // never fail.
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let t0 = Instant::now();
            let mut seen = Vec::new();
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                let asked = Instant::now();
                w.write_all(b"?\n").map_err(|e| format!("write: {e}"))?;
                let mut line = String::new();
                let n = r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err(format!(
                        "the connection closed after {} answers",
                        seen.len()
                    ));
                }
                let count = line
                    .trim()
                    .parse()
                    .map_err(|_| format!("answer {line:?}"))?;
                seen.push((asked.duration_since(t0), count));
                std::thread::sleep(Duration::from_millis(10).saturating_sub(asked.elapsed()));
            }
            Ok(seen)
        });
        (Client { stop, thread }, local)
    }

    fn finish(self) -> Vec<(Duration, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap().unwrap()
    }
}

/// Two agents, each in a network namespace on one bridge (the root
/// namespace, where the client is, holds the bridge's `.1`), with the
/// container's address `.100` of the same subnet: whichever host runs it
/// answers for it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: containers checkpointed by CRIU between two agent processes"]
async fn a_clients_tcp_connection_follows_the_container_to_its_new_host() {
    if !containers_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    tcp_follows("precopy").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: containers checkpointed by CRIU between two agent processes"]
async fn a_clients_tcp_connection_follows_a_lazily_moved_container() {
    if !containers_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    tcp_follows("postcopy").await;
}

/// A client keeps one connection to a container served on its own address
/// while it moves in `mode`: every answer comes, in order.
async fn tcp_follows(mode: &str) {
    let Some(ns) = tern_testkit::netns::Netns::create("ctm", 234, 2) else {
        panic!("cannot make network namespaces as root");
    };
    let dir = tempfile::tempdir().unwrap();
    let mut plans = Vec::new();
    for (i, name) in ["host-a", "host-b"].into_iter().enumerate() {
        let mut p = tern_testbed::HostPlan::new(name, ns.ips[i]).unwrap();
        if let Some(c) = p.container.as_mut() {
            c.uplink = Some("eth0".into());
        }
        plans.push(p);
    }
    let hosts = tern_testbed::write(dir.path(), &plans).unwrap();
    let a = AgentProc::start(&hosts[0], Some(&ns.names[0]));
    let b = AgentProc::start(&hosts[1], Some(&ns.names[1]));
    let (ca, cb) = (a.client(), b.client());
    let address = std::net::Ipv4Addr::new(10, 234, 0, 100);
    let spec = GuestSpec {
        listen_port: 7000,
        address: Some(address),
        ..container()
    };
    let vm = ca.create_vm(&spec).await.unwrap();
    runs_beyond(&ca, &vm.id, 1, 0).await;

    let (client, local) = Client::start((address, 7000).into());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let done = move_in(&ca, &vm.id, "host-b", mode).await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let moved = runs_beyond(&cb, &vm.id, 2, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = client.finish();

    let r = done.report.unwrap();
    let longest = seen
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0))
        .max()
        .unwrap_or_default();
    eprintln!(
        "{mode}: {} answers over one connection ({local}); longest wait {:.0} ms; downtime {:.1} ms",
        seen.len(),
        longest.as_secs_f64() * 1e3,
        r.downtime_ms
    );
    assert!(
        seen.windows(2).all(|w| w[1].1 >= w[0].1),
        "the count went back"
    );
    let last = seen.last().unwrap().1;
    assert!(
        last >= moved.saturating_sub(5),
        "answers stopped at {last}, the container is at {moved}"
    );
    assert!(seen.len() > 100, "{} answers", seen.len());
    ca.vm(&vm.id)
        .await
        .map(|v| assert_eq!(v.status, GuestStatus::MovedAway))
        .unwrap();
}

/// A guest process killed outright leaves its container under runc; the
/// agent reports the guest lost and ends the container, so no copy runs
/// on that nobody owns.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: containers under runc in an agent process"]
async fn a_container_whose_guest_process_dies_is_lost_and_ended() {
    if !containers_or_skip() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = bed(&[]);
    let ca = bed.a.client();
    let vm = ca.create_vm(&container()).await.unwrap();
    runs_beyond(&ca, &vm.id, 1, 0).await;
    let pids = tern_testbed::guest_pids(&bed.hosts[0].data_dir);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let pid = rustix::process::Pid::from_raw(pids[0]).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let t = Instant::now();
    while !tern_testbed::guest_pids(&bed.hosts[0].data_dir).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the guest process lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = ca.vm(&vm.id).await.unwrap();
    assert_eq!(v.status, GuestStatus::Lost, "{v:?}");
    let root = bed.hosts[0]
        .data_dir
        .join("vms")
        .join(vm.id.to_string())
        .join("container/runc");
    assert!(root.is_dir(), "{} missing", root.display());
    let state = std::process::Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["state", &format!("tern-{}", vm.id)])
        .output()
        .unwrap();
    assert!(
        !state.status.success(),
        "the container still runs: {}",
        String::from_utf8_lossy(&state.stdout)
    );
}
