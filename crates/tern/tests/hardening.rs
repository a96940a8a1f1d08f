//! Issue 14's attacks, each reproduced against real processes, each asserting
//! the fix.

mod common;

use common::up::{token, Up};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tern_testkit::procstatus;

/// `root` and every path under it (symlinks not followed).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            todo.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        out.push(p);
    }
    out
}

/// Every file and directory under `root` (and `root` itself) that group or
/// others can read, write or enter.
fn exposed(root: &Path) -> Vec<(PathBuf, String)> {
    walk(root)
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::symlink_metadata(&p).ok()?;
            let mode = meta.permissions().mode() & 0o7777;
            (mode & 0o077 != 0 && !meta.file_type().is_symlink()).then(|| (p, format!("{mode:o}")))
        })
        .collect()
}

/// Finding 6: `tern up`'s data dir (store, WAL, secret, each VM's
/// directory, config and console) is its owner's alone, even when the
/// directory existed with looser permissions.
#[tokio::test]
async fn tern_up_keeps_its_data_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let alice = token(&data, "alice");
    let monitor = Path::new(env!("CARGO_BIN_EXE_tern"))
        .with_file_name("tern-vmm")
        .display()
        .to_string();
    let driver = if kvm() && Path::new(&monitor).exists() {
        "kvm"
    } else {
        eprintln!("no KVM or no tern-vmm beside tern: the mock driver stands in");
        "mock"
    };
    // VMs outlive `tern up` by design: end this test's monitors however it ends.
    let _reap = Reap(data.clone());
    let up = Up::start(
        &data,
        driver,
        &[("TERN_POOL_SIZE", "1"), ("TERN_KVM_MONITOR", &monitor)],
    );
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v1/vms", up.base))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"config": {"settings": {"api_key": "tenant-secret"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // Let the WAL and the monitor's files appear.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if driver == "kvm" {
        let vms = std::fs::read_dir(data.join("vms")).unwrap().count();
        assert!(vms >= 1, "the kvm driver made VM directories");
    }
    let bad = exposed(&data);
    assert!(bad.is_empty(), "readable by others: {bad:?}");
    up.stop();
}

/// Kills the processes started under a data dir when dropped.
struct Reap(PathBuf);

impl Drop for Reap {
    fn drop(&mut self) {
        kill_processes_under(&self.0);
    }
}

/// Kills every process whose command line names a path under `dir`.
fn kill_processes_under(dir: &Path) {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Finding 6: an agent's data dir (keys, API token, each guest's directory,
/// journal, launch file and log) is its owner's alone, on both hosts of a
/// migration.
#[tokio::test]
async fn agents_keep_their_data_private() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = loopback_pair(dir.path());
    for h in &hosts {
        std::fs::set_permissions(&h.data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let a = AgentProc::start(&hosts[0], None);
    let b = AgentProc::start(&hosts[1], None);
    migrate_and_check(&a.client(), &b.client()).await;
    for h in &hosts {
        // host.pub is the public half peers are given: not a secret.
        let bad: Vec<_> = exposed(&h.data_dir)
            .into_iter()
            .filter(|(p, _)| !p.ends_with("host.pub"))
            .collect();
        assert!(bad.is_empty(), "readable by others: {bad:?}");
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Finding 3's attack on the server at `addr` (process `pid`): its
/// descriptors cut to 256, then 300 connections that send half a request
/// and wait. The server must not spin while it is out of descriptors, must
/// cut the half-sent requests at its header timeout, and must then answer
/// `url` again.
async fn flood(pid: u32, addr: std::net::SocketAddr, url: &str) {
    use tokio::io::AsyncWriteExt;
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .status()
        .unwrap();
    assert!(st.success());
    let mut held = vec![];
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        held.push(s);
    }
    let cpu0 = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_secs(pid) - cpu0;
    eprintln!("CPU while out of descriptors: {spent:.2} s in 1 s");
    assert!(
        spent < 0.5,
        "the accept loop spins: {spent:.2} CPU-s in 1 s"
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if http.get(url).send().await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "locked out for 30 s by half-sent requests"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);
}

/// Finding 3 against `tern up`.
#[tokio::test]
async fn half_sent_requests_do_not_lock_out_tern_up() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(
        dir.path(),
        "mock",
        &[
            ("TERN_POOL_SIZE", "0"),
            ("TERN_HTTP_HEADER_TIMEOUT_MS", "1000"),
        ],
    );
    let addr: std::net::SocketAddr = up.base.trim_start_matches("http://").parse().unwrap();
    flood(up.child.id(), addr, &format!("{}/healthz", up.base)).await;
    up.stop();
}

/// Finding 3 against an agent's host API.
#[tokio::test]
async fn half_sent_requests_do_not_lock_out_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = loopback_pair(dir.path());
    let file = &hosts[0].config;
    let mut cfg: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
    cfg.insert(
        "http".into(),
        toml::Value::Table(toml::toml! { header_timeout_ms = 1000 }),
    );
    std::fs::write(file, cfg.to_string()).unwrap();
    let a = AgentProc::start(&hosts[0], None);
    let url = format!("{}/api/v1/host", hosts[0].api_url);
    let addr: std::net::SocketAddr = hosts[0]
        .api_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    flood(a.0.pid() as u32, addr, &url).await;
}

/// Sends `offer` to `to`'s migration listener as `as_host` (its certificate).
async fn send_offer(
    dir: &Path,
    as_host: &str,
    to: &tern_agent::AgentConfig,
    offer: tern_migrate::protocol::Offer,
) {
    use tern_migrate::protocol::{hello_frame, SessionHello};
    use tern_transport::{Security, Sender, SessionConfig, TlsIdentity};
    let tls = dir.join("tls");
    let target = TlsIdentity::load(
        &tls.join(format!("{}.pem", to.name)),
        &tls.join(format!("{}.key", to.name)),
        &tls.join("ca.pem"),
        &[],
    )
    .unwrap();
    let me = TlsIdentity::load(
        &tls.join(format!("{as_host}.pem")),
        &tls.join(format!("{as_host}.key")),
        &tls.join("ca.pem"),
        &[target.own_pin().unwrap()],
    )
    .unwrap();
    let security = Security::Tls {
        config: me.client_config().unwrap(),
        server_name: to.name.clone(),
    };
    let cfg = SessionConfig {
        streams: 1,
        ..Default::default()
    };
    let s = Sender::connect(to.migrate_addr, security, cfg, None)
        .await
        .unwrap();
    s.send(hello_frame(&SessionHello::Data(offer)))
        .await
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.finish()).await;
}

/// Finding 4: a pinned peer is who its certificate says, whatever its
/// messages claim; the host dials only configured addresses; a name a
/// peer sends never becomes a path outside the data dir.
#[tokio::test]
async fn a_peer_cannot_claim_another_name_or_choose_paths() {
    use tern_migrate::protocol::{Offer, PROTOCOL_VERSION};
    let dir = tempfile::tempdir().unwrap();
    let plans: Vec<_> = ["host-a", "host-b", "host-c"]
        .iter()
        .map(|n| tern_testbed::HostPlan::new(n, LO).unwrap())
        .collect();
    let hosts = tern_testbed::write(dir.path(), &plans).unwrap();
    let b_cfg = tern_agent::AgentConfig::load(&hosts[1].config).unwrap();
    let b = AgentProc::start(&hosts[1], None);
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let offer = |vm: &str, migration: &str| Offer {
        version: PROTOCOL_VERSION,
        migration: migration.into(),
        source_host: "host-a".into(),
        reply_to: trap.local_addr().unwrap().to_string(),
        vm: vm.into(),
        epoch: 1,
        spec: serde_json::to_value(spec()).unwrap(),
    };
    // host-c, pinned and trusted, claims to be host-a.
    send_offer(dir.path(), "host-c", &b_cfg, offer("vm-forged", "m-forged")).await;
    // host-a itself, naming a VM and a migration that climb out of the data dir.
    send_offer(
        dir.path(),
        "host-a",
        &b_cfg,
        offer("../../../escaped", "m-1"),
    )
    .await;
    send_offer(
        dir.path(),
        "host-a",
        &b_cfg,
        offer("vm-2", "../../escaped-m"),
    )
    .await;
    let dialed = tokio::time::timeout(Duration::from_secs(2), trap.accept()).await;
    assert!(
        dialed.is_err(),
        "the host dialed the address an offer named"
    );
    let vms: Vec<String> = std::fs::read_dir(b_cfg.data_dir.join("vms"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        vms.is_empty(),
        "a refused offer left guest directories: {vms:?}"
    );
    for p in [dir.path().join("escaped"), dir.path().join("escaped-m")] {
        assert!(!p.exists(), "{} was created", p.display());
    }
    let found: Vec<String> = walk(dir.path())
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        !found
            .iter()
            .any(|n| n.contains("escaped") || n.contains("vm-forged")),
        "{found:?}"
    );
    assert!(b.client().migrations_list().await.unwrap().is_empty());
}

/// Finding 8: refused logins and metrics scrapes are in the structured log
/// (JSON lines here), with the reason and never the token.
#[tokio::test]
async fn refusals_are_logged_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("up.log");
    let alice = token(&data, "alice");
    let up = Up::start_logged(
        &data,
        "mock",
        &[
            ("TERN_LOG_FORMAT", "json"),
            ("TERN_LOG", "info"),
            ("TERN_POOL_SIZE", "0"),
        ],
        &log,
    );
    let http = reqwest::Client::new();
    let forged = format!("{}x", &alice[..alice.len() - 1]);
    let r = http
        .get(format!("{}/api/v1/vms", up.base))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{}/api/v1/vms", up.base))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"spec": {"image": "/etc/shadow"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/metrics", up.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "metrics need their token");
    let metrics_token = std::fs::read_to_string(data.join("metrics-token")).unwrap();
    let r = http
        .get(format!("{}/metrics", up.base))
        .bearer_auth(metrics_token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    up.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let login = lines
        .iter()
        .find(|l| l["message"] == "rejected login")
        .unwrap_or_else(|| panic!("no rejected login in\n{text}"));
    assert_eq!(login["level"], "WARN");
    assert_eq!(login["path"], "/api/v1/vms");
    assert!(login["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "refused a metrics scrape: missing or wrong metrics token"),
        "{text}"
    );
    let signature = alice.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "a token reached the log");
    assert!(
        !text.contains(metrics_token.trim()),
        "the metrics token reached the log"
    );
}

/// The live guest process of `vm` under `data_dir` (its directory is
/// `<vm>` where it booted, `<vm>.<migration>` where it arrived): its
/// directory and pid.
async fn guest_proc(data_dir: &Path, vm: &str) -> (PathBuf, u32) {
    for e in std::fs::read_dir(data_dir.join("vms")).unwrap() {
        let d = e.unwrap().path();
        if !d.file_name().unwrap().to_string_lossy().starts_with(vm) {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(d.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            continue;
        };
        // A moved-away copy's process may linger a while; the one asked for runs.
        let said = tern_agent::control::call::<serde_json::Value>(
            &d.join("control.sock"),
            &tern_agent::control::Request::Status,
            Duration::from_secs(5),
        )
        .await;
        if !said.is_ok_and(|s| s["state"] == "running") {
            continue;
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            return (d, pid);
        }
    }
    panic!("no running process of {vm} under {}", data_dir.display())
}

/// Finding 7: a test guest's process runs jailed (an unprivileged uid, no
/// capabilities, `no_new_privs`, a seccomp filter, a root holding only its
/// own directory), still migrates both ways (pre-copy, then post-copy
/// through userfaultfd), and a call outside its filter kills it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agent processes"]
async fn a_jailed_guest_process_is_unprivileged_filtered_and_still_migrates() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Nobody's uid (the default), test hooks on.
    let jail = tern_jail::JailConfig {
        test_hooks: true,
        ..Default::default()
    };
    let hosts = loopback_pair_jailed(dir.path(), Some(jail));
    let a = AgentProc::start(&hosts[0], None);
    let b = AgentProc::start(&hosts[1], None);
    let (ac, bc) = (a.client(), b.client());
    let vm = ac.create_vm(&spec()).await.unwrap();
    assert_runs(&ac, &vm.id, 1).await;
    let id = vm.id.to_string();
    let (vm_dir, pid) = guest_proc(&hosts[0].data_dir, &id).await;
    procstatus::assert_jailed(pid, 65534);
    // Its root is its jail: its own directory, the shared one, two devices.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["dev", "shared", "vms"], "the jail shows more");
    let vms: Vec<_> = std::fs::read_dir(root.join("vms")).unwrap().collect();
    assert_eq!(vms.len(), 1, "another VM's directory is visible");
    assert!(root.join("vms").join(&id).join("journal.jsonl").exists());
    assert_eq!(vm_dir, hosts[0].data_dir.join("vms").join(&id));
    assert!(!root.join("etc").exists() && !root.join("shared/host.key").exists());
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("tern/{id}")), "{cgroup}");

    // It migrates, jailed at both ends: pre-copy there, post-copy back.
    let m = ac.migrate(&vm.id, &precopy_to("host-b")).await.unwrap();
    let done = wait_end(&ac, &m.id, Duration::from_secs(120)).await;
    let logs = |d: &Path| {
        walk(d)
            .into_iter()
            .filter(|p| p.ends_with("guest.log"))
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        done.state,
        tern_agent::MigrationPhase::Committed,
        "{done:?}\n{}",
        logs(&hosts[1].data_dir)
    );
    assert_runs(&bc, &vm.id, 2).await;
    let (_, on_b) = guest_proc(&hosts[1].data_dir, &id).await;
    assert_eq!(procstatus::field(on_b, "Seccomp"), "2");
    let m = bc
        .migrate(&vm.id, &mode_to("host-a", "postcopy"))
        .await
        .unwrap();
    let done = wait_end(&bc, &m.id, Duration::from_secs(120)).await;
    assert_eq!(
        done.state,
        tern_agent::MigrationPhase::Committed,
        "{done:?}"
    );
    assert!(done.report.as_ref().unwrap().postcopy);
    assert_runs(&ac, &vm.id, 3).await;

    // A call outside the filter kills the process (SIGSYS), and the agent
    // says the guest is gone, not running.
    let (vm_dir, pid) = guest_proc(&hosts[0].data_dir, &id).await;
    let control = vm_dir.join("control.sock");
    let r = tern_agent::control::call::<()>(
        &control,
        &tern_agent::control::Request::ForbiddenCall,
        Duration::from_secs(5),
    )
    .await;
    assert!(r.is_err(), "the process answered: {r:?}");
    let t = std::time::Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "it still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(vm_dir.join("guest.log")).unwrap();
    assert!(!log.contains("the forbidden call"), "{log}");
    // The kernel's audit record names the process, the signal (SIGSYS, 31)
    // and the call (chroot, 161).
    let dmesg = Command::new("dmesg").output().unwrap();
    let dmesg = String::from_utf8_lossy(&dmesg.stdout);
    let killed = dmesg
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains(&format!(" pid={pid} ")))
        .collect::<Vec<_>>();
    eprintln!("{killed:?}");
    assert!(
        killed
            .iter()
            .any(|l| l.contains("sig=31") && l.contains("syscall=161")),
        "no seccomp kill of {pid} in the kernel log"
    );
    let v = ac.vm(&vm.id).await.unwrap();
    assert_ne!(v.status, tern_proto::GuestStatus::Running, "{v:?}");
    // Its jail and cgroup are gone with it.
    let t = std::time::Instant::now();
    let name = vm_dir.file_name().unwrap().to_string_lossy().into_owned();
    let jail = hosts[0].data_dir.join("jail").join(&name);
    while jail.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} left",
            jail.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/tern/{name}")).exists());
}
