//! Helpers shared by the end-to-end tests: agent processes, VM specs,
//! waiting for migrations, checking that a guest runs.
#![allow(dead_code)]

pub mod up;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrateRequest, MigrationPhase, MigrationView};
use tern_proto::{GuestSpec, GuestStatus, HostId, MigrationId, VmId};
use tern_testbed::{self as testbed, AgentProcess, HostPlan, LocalHost};
use tern_testkit::{LinkConfig, LinkEmulator};

pub const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// An agent process, killed when dropped.
pub struct AgentProc(pub AgentProcess);

impl AgentProc {
    pub fn start(host: &LocalHost, netns: Option<&str>) -> AgentProc {
        let p = AgentProcess::start(Path::new(env!("CARGO_BIN_EXE_tern")), host, netns).unwrap();
        eprintln!("{}", p.ready_line);
        AgentProc(p)
    }

    pub fn client(&self) -> AgentClient {
        self.0.client().unwrap()
    }

    pub fn kill(&mut self) {
        self.0.kill()
    }
}

pub fn spec() -> GuestSpec {
    GuestSpec {
        memory_mib: 64,
        ws_pages: 2048,
        pages_per_tick: 16,
        ..Default::default()
    }
}

/// A process workload: it needs no KVM, and it dirties memory all along.
pub fn process_spec() -> GuestSpec {
    GuestSpec {
        kind: tern_proto::GuestKind::Process,
        memory_mib: 64,
        ws_pages: 256,
        dirty_mib_per_sec: 1,
        ..Default::default()
    }
}

/// An id given as tern-proto's type or as its text (JSON answers, CLI
/// output): tests name VMs and migrations both ways.
pub trait Id<T> {
    fn id(&self) -> T;
}

impl<T: Clone> Id<T> for &T {
    fn id(&self) -> T {
        (*self).clone()
    }
}

impl<T: std::str::FromStr> Id<T> for &str
where
    T::Err: std::fmt::Debug,
{
    fn id(&self) -> T {
        self.parse().unwrap()
    }
}

impl Id<VmId> for &String {
    fn id(&self) -> VmId {
        self.parse().unwrap()
    }
}

impl Id<MigrationId> for &String {
    fn id(&self) -> MigrationId {
        MigrationId::new(self.as_str()).unwrap()
    }
}

pub fn precopy_to(to: &str) -> MigrateRequest {
    mode_to(to, "precopy")
}

pub fn mode_to(to: &str, mode: &str) -> MigrateRequest {
    MigrateRequest {
        to: HostId::new(to).unwrap(),
        mode: mode.into(),
        max_downtime_ms: Some(50),
        bandwidth_mbps: None,
        deadline_secs: None,
        max_bandwidth_mbps: None,
        auto_converge: None,
        compress: None,
        id: None,
        reason: None,
    }
}

pub async fn wait_end(c: &AgentClient, id: impl Id<MigrationId>, limit: Duration) -> MigrationView {
    let id = &id.id();
    let t = Instant::now();
    loop {
        let v = c.migration(id).await.unwrap();
        if v.state.is_final() {
            return v;
        }
        assert!(t.elapsed() < limit, "migration {id} still running: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The guest runs on `c`: its counter advances and its working-set checksum is right.
pub async fn assert_runs(c: &AgentClient, vm: impl Id<VmId>, epoch: u64) {
    let vm = &vm.id();
    let a = c.vm(vm).await.unwrap();
    assert_eq!(a.status, GuestStatus::Running, "{a:?}");
    assert_eq!(a.epoch, epoch);
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b = c.vm(vm).await.unwrap();
        // Process workloads make no checksums; their counter is enough.
        let checked = b.checksum_ok.is_some() || b.spec.kind == tern_proto::GuestKind::Process;
        if b.counter > a.counter && checked {
            assert_ne!(
                b.checksum_ok,
                Some(false),
                "working-set checksum wrong: {b:?}"
            );
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest stopped counting: {b:?}"
        );
    }
}

pub fn kvm() -> bool {
    tern_vmm::testing::kvm_or_skip()
}

/// Migrates a fresh VM a → b and checks both ends.
pub async fn migrate_and_check(a: &AgentClient, b: &AgentClient) -> MigrationView {
    migrate_mode_and_check(a, b, "precopy").await
}

pub async fn migrate_mode_and_check(a: &AgentClient, b: &AgentClient, mode: &str) -> MigrationView {
    let vm = a.create_vm(&spec()).await.unwrap();
    assert_runs(a, &vm.id, 1).await;
    let mut req = mode_to("host-b", mode);
    if mode == "hybrid" {
        // A budget no pre-copy round can meet: hybrid must move on to post-copy.
        req.max_downtime_ms = Some(1);
    }
    let m = a.migrate(&vm.id, &req).await.unwrap();
    let done = wait_end(a, &m.id, Duration::from_secs(120)).await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    let r = done.report.as_ref().unwrap();
    eprintln!(
        "{mode}: migrated {} in {:.1} ms, downtime {:.1} ms, {} rounds, {:.2} MB on the wire, post-copy {} ({:.1} ms, {} faults served)",
        vm.id,
        r.total_ms,
        r.downtime_ms,
        r.rounds.len(),
        r.wire_bytes as f64 / 1e6,
        r.postcopy,
        r.postcopy_ms,
        r.faults_served
    );
    assert_eq!(r.postcopy, mode != "precopy", "{r:?}");
    assert_runs(b, &vm.id, 2).await;
    let gone = a.vm(&vm.id).await.unwrap();
    assert_eq!(gone.status, GuestStatus::MovedAway);
    assert_eq!(gone.moved_to.as_ref().map(|h| h.as_str()), Some("host-b"));
    // The destination records its end a moment after the source's (a
    // migration of a few ms can be read between the two).
    let dest_side = wait_end(b, &m.id, Duration::from_secs(30)).await;
    assert_eq!(dest_side.state, MigrationPhase::Committed);
    done
}

/// Two loopback agents, peers of each other.
pub fn loopback_pair(dir: &Path) -> Vec<LocalHost> {
    loopback_pair_jailed(dir, None)
}

/// [`loopback_pair`] with `jail` as both agents' `[jail]`.
pub fn loopback_pair_jailed(dir: &Path, jail: Option<tern_jail::JailConfig>) -> Vec<LocalHost> {
    let mut plans = [
        HostPlan::new("host-a", LO).unwrap(),
        HostPlan::new("host-b", LO).unwrap(),
    ];
    for p in &mut plans {
        p.jail = jail.clone();
    }
    testbed::write(dir, &plans).unwrap()
}

pub fn link(rate: u64) -> LinkConfig {
    LinkConfig {
        one_way_delay: Duration::from_millis(10),
        jitter: Duration::from_millis(1),
        rate_bytes_per_sec: rate,
        queue_bytes: 4 << 20,
    }
}

/// Two loopback agents whose migration traffic (both sessions) crosses
/// link emulators with 10 ms each way.
pub async fn pair_via_emulator(
    dir: &Path,
    rate: u64,
    resume: u64,
) -> (Vec<LocalHost>, LinkEmulator, LinkEmulator) {
    let (bed, to_b, to_a, _) = pair_via_emulator_at(dir, rate, resume).await;
    (bed, to_b, to_a)
}

/// [`pair_via_emulator`], with host-b's own migration address (behind `to_b`).
pub async fn pair_via_emulator_at(
    dir: &Path,
    rate: u64,
    resume: u64,
) -> (
    Vec<LocalHost>,
    LinkEmulator,
    LinkEmulator,
    std::net::SocketAddr,
) {
    let mut a = HostPlan::new("host-a", LO).unwrap();
    let mut b = HostPlan::new("host-b", LO).unwrap();
    let to_b = LinkEmulator::start(b.migrate_addr(), link(rate))
        .await
        .unwrap();
    let to_a = LinkEmulator::start(a.migrate_addr(), link(rate))
        .await
        .unwrap();
    a.reached_at = Some(to_a.addr());
    b.reached_at = Some(to_b.addr());
    a.resume_deadline_secs = resume;
    b.resume_deadline_secs = resume;
    let b_addr = b.migrate_addr();
    (testbed::write(dir, &[a, b]).unwrap(), to_b, to_a, b_addr)
}

/// Agent processes started with extra environment (fault injection).
impl AgentProc {
    pub fn start_env(host: &LocalHost, env: &[(&str, &str)]) -> AgentProc {
        let p =
            AgentProcess::start_with_env(Path::new(env!("CARGO_BIN_EXE_tern")), host, None, env)
                .unwrap();
        eprintln!("{}", p.ready_line);
        AgentProc(p)
    }
}

/// Every guest process of `vm` under the agents' data directories that
/// says its guest runs (asked on its control socket, agents or not).
pub async fn running_copies(
    data_dirs: &[&Path],
    vm: impl Id<VmId>,
) -> Vec<(String, u64, Option<u64>)> {
    let vm = vm.id().to_string();
    use tern_agent::control::{self, ProcState, ProcStatus, Request};
    let mut out = Vec::new();
    for d in data_dirs {
        let Ok(list) = std::fs::read_dir(d.join("vms")) else {
            continue;
        };
        for e in list.flatten() {
            let dir = tern_agent::vmdir::VmDir(e.path());
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name == *vm || name.starts_with(&format!("{vm}."))) || dir.live_pid().is_none() {
                continue;
            }
            let st = control::call::<ProcStatus>(
                &dir.control(),
                &Request::Status,
                Duration::from_secs(3),
            )
            .await;
            if let Ok(s) = st {
                if s.state == ProcState::Running {
                    out.push((d.display().to_string(), s.epoch, s.counter));
                }
            }
        }
    }
    out
}

/// Whether containers can run here (root, a working CRIU, the workload's
/// rootfs); sets `TERN_WORKLOAD_ROOTFS`, from which test hosts take their
/// `[container]`. Says SKIPPED otherwise, or fails under
/// `TERN_REQUIRE_CRIU=1` (CI).
pub fn containers_or_skip() -> bool {
    let rootfs = std::env::var("TERN_WORKLOAD_ROOTFS")
        .unwrap_or_else(|_| "/var/cache/tern/workload/rootfs.tar".into());
    let why = if !rustix::process::geteuid().is_root() {
        Some("not root".to_string())
    } else if !Path::new(&rootfs).exists() {
        Some(format!("{rootfs} missing (scripts/workload-rootfs.sh)"))
    } else {
        tern_drivers::runc::Criu::locate(std::env::var_os("TERN_CRIU").as_deref().map(Path::new))
            .err()
            .map(|e| e.to_string())
    };
    match why {
        None => {
            // The test bed's hosts take their [container] from these.
            std::env::set_var("TERN_WORKLOAD_ROOTFS", &rootfs);
            true
        }
        Some(why) if std::env::var("TERN_REQUIRE_CRIU").as_deref() == Ok("1") => {
            panic!("TERN_REQUIRE_CRIU=1 but {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}
