//! One fleet: hosts join a control plane (`tern agent --join`), whose CA
//! issues their certificates and whose heartbeat answers name their peers
//! (no peer written by hand; a removed host is refused by its peers from
//! their next heartbeat on), and `tern up --driver agents` places tenants'
//! VMs on them.

mod common;

use common::up::Up;
use common::{assert_runs, precopy_to, process_spec, wait_end, AgentProc, LO};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrationPhase};
use tern_testbed::{AgentProcess, HostPlan, LocalHost};
use tern_testkit::netns::Netns;
use tern_testkit::LinkEmulator;

fn admin_token(data: &Path) -> String {
    common::up::token_with(data, "ops", "platform:admin")
}

async fn join_token(http: &reqwest::Client, base: &str, admin: &str) -> String {
    let r = http
        .post(format!("{base}/api/v1/hosts/join-tokens"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// A control plane in `dir/cp`: `tern up` with `driver` and `env`, and
/// tokens of an admin and of tenant alice.
struct ControlPlane {
    cp: std::path::PathBuf,
    admin: String,
    tenant: String,
    up: Up,
}

fn control_plane(dir: &Path, driver: &str, env: &[(&str, &str)]) -> ControlPlane {
    let cp = dir.join("cp");
    std::fs::create_dir_all(&cp).unwrap();
    let admin = admin_token(&cp);
    let tenant = common::up::token(&cp, "alice");
    let up = Up::start(&cp, driver, env);
    ControlPlane {
        cp,
        admin,
        tenant,
        up,
    }
}

async fn joined_fleet(
    dir: &Path,
    urls: &[&str],
    admin: &str,
    names: &[&str],
    labels: &dyn Fn(&str) -> tern_proto::Labels,
) -> (Vec<LocalHost>, Vec<AgentProc>) {
    let plans: Vec<HostPlan> = names
        .iter()
        .map(|n| HostPlan::new(n, LO).unwrap())
        .collect();
    join_plans(dir, urls, admin, &plans, None, labels).await
}

/// Agents for `plans` (in namespace `netns[i]` if given) joined to the
/// control plane at `urls`.
async fn join_plans(
    dir: &Path,
    urls: &[&str],
    admin: &str,
    plans: &[HostPlan],
    netns: Option<&[String]>,
    labels: &dyn Fn(&str) -> tern_proto::Labels,
) -> (Vec<LocalHost>, Vec<AgentProc>) {
    let http = reqwest::Client::new();
    let hosts = tern_testbed::write_joined(&dir.join("hosts"), plans, urls, labels).unwrap();
    let mut agents = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let t = join_token(&http, urls[0], admin).await;
        let ns = netns.map(|n| n[i].as_str());
        agents.push(start_joining_in(h, Some(&t), ns));
    }
    (hosts, agents)
}

fn start_joining(host: &LocalHost, token: Option<&str>) -> AgentProc {
    start_joining_in(host, token, None)
}

fn start_joining_in(host: &LocalHost, token: Option<&str>, netns: Option<&str>) -> AgentProc {
    let env: Vec<(&str, &str)> = token.map(|t| ("TERN_JOIN_TOKEN", t)).into_iter().collect();
    let p = AgentProcess::start_with_env(Path::new(env!("CARGO_BIN_EXE_tern")), host, netns, &env)
        .unwrap();
    eprintln!("{}", p.ready_line);
    AgentProc(p)
}

/// Waits until the agent's peers are exactly `want`.
async fn wait_peers(c: &AgentClient, want: &[&str]) {
    let t = Instant::now();
    loop {
        let h = c.host().await.unwrap();
        let mut got: Vec<String> = serde_json::from_value(h["peers"].clone()).unwrap();
        got.sort();
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "peers {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
#[ignore = "starts tern up and two agents; run by .ci/run"]
async fn joined_hosts_learn_their_peers_and_a_removed_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cp");
    std::fs::create_dir_all(&cp).unwrap();
    let admin = admin_token(&cp);
    let up = Up::start(&cp, "mock", &[("TERN_POOL_SIZE", "0")]);
    let http = reqwest::Client::new();
    let plans = [
        HostPlan::new("host-a", LO).unwrap(),
        HostPlan::new("host-b", LO).unwrap(),
    ];
    let hosts = tern_testbed::write_joined(
        &dir.path().join("hosts"),
        &plans,
        &[up.base.as_str()],
        &|_| Default::default(),
    )
    .unwrap();

    // Without a token a host that never joined says how to join.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("agent")
        .arg(&hosts[0].config)
        .env_remove("TERN_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join-token"), "{err}");

    let ta = join_token(&http, &up.base, &admin).await;
    let tb = join_token(&http, &up.base, &admin).await;
    let mut a = start_joining(&hosts[0], Some(&ta));
    let b = start_joining(&hosts[1], Some(&tb));
    let (ca, cb) = (a.client(), b.client());
    wait_peers(&ca, &["host-b"]).await;
    wait_peers(&cb, &["host-a"]).await;

    // A used token joins nobody.
    let r = http
        .post(format!("{}/api/v1/hosts/join", up.base))
        .json(&serde_json::json!({
            "token": ta, "id": "host-x", "migrate_addr": "127.0.0.1:1",
            "api_url": "http://127.0.0.1:1", "api_token": "x".repeat(32),
            "csr_pem": tern_transport::certs::host_csr("host-x").unwrap().1,
            "manifest_key": "ab".repeat(32),
            "capacity": {"memory_mib": 1024, "vcpus": 1}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A migration over mutual TLS with certificates and pins from the
    // control plane alone.
    let vm = ca.create_vm(&process_spec()).await.unwrap();
    assert_runs(&ca, &vm.id, 1).await;
    let m = ca.migrate(&vm.id, &precopy_to("host-b")).await.unwrap();
    let done = wait_end(&ca, &m.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    assert_runs(&cb, &vm.id, 2).await;

    // Each agent counts its side in Prometheus metrics.
    let scrape = |h: &LocalHost| {
        let http = http.clone();
        let h = h.clone();
        async move {
            http.get(format!("{}/metrics", h.api_url))
                .bearer_auth(h.token().unwrap())
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let ma = scrape(&hosts[0]).await;
    // The destination records its end when its guest process reports it.
    let t = Instant::now();
    let mb = loop {
        let mb = scrape(&hosts[1]).await;
        if mb.contains("migrations_completed_total{role=\"destination\"} 1") {
            break mb;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{mb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ma.contains("migrations_initiated_total 1"), "{ma}");
    assert!(
        ma.contains("migrations_completed_total{role=\"source\"} 1"),
        "{ma}"
    );
    assert!(mb.contains("migrations_accepted_total 1"), "{mb}");
    assert!(ma.contains("migration_duration_seconds_bucket"), "{ma}");
    assert!(mb.contains("host_cpu_busy_ratio"), "{mb}");

    // Heartbeats carry the load: the control plane sees b's VM.
    let t = Instant::now();
    loop {
        let hosts: serde_json::Value = http
            .get(format!("{}/api/v1/hosts", up.base))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let b_rec = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == "host-b")
            .unwrap()
            .clone();
        if b_rec["load"]["vms"] == 1 {
            assert!(b_rec["load"]["memory_free_mib"].as_u64().unwrap() > 0);
            assert_eq!(b_rec["state"], "active");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A restarted agent finds its membership: no token needed.
    a.kill();
    let a = start_joining(&hosts[0], None);
    let ca = a.client();
    wait_peers(&ca, &["host-b"]).await;

    // Remove b: a drops it at its next heartbeat and refuses it both ways.
    let r = http
        .delete(format!("{}/api/v1/hosts/host-b", up.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_peers(&ca, &[]).await;
    let vm2 = ca.create_vm(&process_spec()).await.unwrap();
    let e = ca
        .migrate(&vm2.id, &precopy_to("host-b"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a configured peer"), "{e}");
    // b still knows a (its heartbeats are refused now), but a's TLS no
    // longer accepts b's certificate: the VM stays on b, running.
    let m = cb.migrate(&vm.id, &precopy_to("host-a")).await.unwrap();
    let done = wait_end(&cb, &m.id, Duration::from_secs(90)).await;
    assert_eq!(done.state, MigrationPhase::RolledBack, "{done:?}");
    assert_runs(&cb, &vm.id, 2).await;
    assert!(
        ca.vm(&vm.id).await.is_err()
            || ca.vm(&vm.id).await.unwrap().status != tern_proto::GuestStatus::Running
    );
    drop(up);
}

#[tokio::test]
#[ignore = "starts tern up and three agents; run by .ci/run"]
async fn the_control_plane_places_migrates_and_drains_vms_across_joined_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let ControlPlane {
        cp,
        admin,
        tenant,
        up,
    } = control_plane(dir.path(), "agents", &[("TERN_POOL_SIZE", "0")]);
    let region = |n: &str| -> tern_proto::Labels {
        let r = if n == "host-c" { "us" } else { "eu" };
        [("region".to_string(), r.to_string())].into()
    };
    let (_hosts, agents) = joined_fleet(
        dir.path(),
        &[up.base.as_str()],
        &admin,
        &["host-a", "host-b", "host-c"],
        &region,
    )
    .await;
    let http = reqwest::Client::new();
    let create = |labels: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}/api/v1/vms", up.base);
        let tenant = tenant.clone();
        async move {
            http.post(url)
                .bearer_auth(tenant)
                .json(&serde_json::json!({"spec": {"image": "process", "memory_mib": 64, "labels": labels}}))
                .send()
                .await
                .unwrap()
        }
    };

    // Six VMs land on at least two hosts, each running where the store says.
    let mut placed = std::collections::BTreeMap::<String, Vec<String>>::new();
    for _ in 0..6 {
        let r = create(serde_json::json!({})).await;
        assert_eq!(r.status(), 201);
        let vm: serde_json::Value = r.json().await.unwrap();
        assert_eq!(vm["status"], "running", "{vm}");
        placed
            .entry(vm["host"].as_str().unwrap().to_owned())
            .or_default()
            .push(vm["id"].as_str().unwrap().to_owned());
    }
    eprintln!("placed: {placed:?}");
    assert!(placed.len() >= 2, "{placed:?}");
    for (host, vms) in &placed {
        let i = ["host-a", "host-b", "host-c"]
            .iter()
            .position(|h| h == host)
            .unwrap();
        for vm in vms {
            assert_runs(&agents[i].client(), vm, 1).await;
        }
    }

    // Data residency: a VM that requires region=us lands on host-c only,
    // and one that requires a region no host has is refused clearly.
    for _ in 0..2 {
        let r = create(serde_json::json!({"region": "us"})).await;
        assert_eq!(r.status(), 201);
        let vm: serde_json::Value = r.json().await.unwrap();
        assert_eq!(vm["host"], "host-c", "{vm}");
    }
    let r = create(serde_json::json!({"region": "mars"})).await;
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        status.is_server_error() || status.is_client_error(),
        "{status}"
    );
    assert!(
        body["error"].as_str().unwrap().contains("region=mars"),
        "{body}"
    );
    // A VM pinned to region=us is never sent to a region=eu host.
    let us_vm = {
        let r = create(serde_json::json!({"region": "us"})).await;
        let v: serde_json::Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    refused_for_residency(&http, &up.base, &tenant, &us_vm, "host-a", "region=us").await;

    // A user's migration through the control plane: live, verified on
    // arrival, the owner moved in the store at the next epoch.
    let (from, vm) = placed
        .iter()
        .find(|(h, _)| *h != "host-c")
        .map(|(h, v)| (h.clone(), v[0].clone()))
        .unwrap();
    let to = if from == "host-a" { "host-b" } else { "host-a" };
    let r = http
        .post(format!("{}/api/v1/vms/{vm}/migrate", up.base))
        .bearer_auth(&tenant)
        .json(&serde_json::json!({"to": to, "mode": "precopy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let m: serde_json::Value = r.json().await.unwrap();
    let mid = m["id"].as_str().unwrap().to_owned();
    let bob = common::up::token(&cp, "bob");
    let r = http
        .get(format!("{}/api/v1/migrations/{mid}", up.base))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another tenant's migration");
    let done = wait_migration(&http, &up.base, &tenant, &mid).await;
    assert_eq!(done["phase"], "committed", "{done}");
    assert!(done["report"]["downtime_ms"].is_number(), "{done}");
    let rec = get_vm(&http, &up.base, &tenant, &vm).await;
    assert_eq!(rec["host"], to);
    assert_eq!(rec["owner_epoch"], 2);
    assert_runs(&agents[host_index(to)].client(), &vm, 2).await;

    // The CLI: the scheduler picks a target for a VM of host-b, with a
    // progress bar and the report; the hosts are listed.
    let cli = |args: &[&str], token: &str| tern_cli(&up.base, token, args);
    let now = get_json(&http, &format!("{}/api/v1/vms", up.base), &tenant).await;
    // (Not one pinned to region=us: host-c is the only host it may use.)
    let movable = now
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["spec"]["labels"].is_null() && v["host"] != "host-c")
        .unwrap_or_else(|| panic!("no VM to move: {now}"));
    let vm_m = movable["id"].as_str().unwrap();
    let report = cli(&["migrate", vm_m, "--json"], &tenant);
    let m: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["from"], movable["host"]);
    // `tern vm` through the control plane: create (with a label), list,
    // show, stop.
    let made = cli(
        &[
            "vm",
            "create",
            "--kind",
            "process",
            "--memory",
            "64",
            "--label",
            "region=us",
        ],
        &tenant,
    );
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    assert_eq!(made["host"], "host-c", "{made}");
    let made_id = made["id"].as_str().unwrap();
    let listed = cli(&["vm", "list"], &tenant);
    assert!(
        listed.contains(made_id) && listed.contains("host-c"),
        "{listed}"
    );
    let shown = cli(&["vm", "show", made_id], &tenant);
    assert!(shown.contains("\"running\""), "{shown}");
    cli(&["vm", "stop", made_id], &tenant);
    let gone = get_vm(&http, &up.base, &tenant, made_id).await;
    assert_ne!(gone["status"], "running", "{gone}");
    let listed = cli(&["host", "list"], &admin);
    assert!(
        listed.contains("host-a") && listed.contains("active"),
        "{listed}"
    );

    // Drain host-a (`tern host drain --wait`): every VM it runs moves away
    // live; the store agrees.
    let drained = cli(&["host", "drain", "host-a", "--wait"], &admin);
    eprintln!("{drained}");
    assert!(drained.contains("host host-a is empty"), "{drained}");
    let t = Instant::now();
    loop {
        let vms = get_json(&http, &format!("{}/api/v1/vms", up.base), &tenant).await;
        let migrations = get_json(&http, &format!("{}/api/v1/migrations", up.base), &tenant).await;
        let left = vms
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["host"] == "host-a")
            .count();
        let open = migrations
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !is_final(m))
            .count();
        if left == 0 && open == 0 {
            for m in migrations.as_array().unwrap() {
                eprintln!(
                    "{} {} {} -> {} {} downtime {} ms",
                    m["id"],
                    m["reason"],
                    m["from"],
                    m["to"],
                    m["phase"],
                    m["report"]["downtime_ms"]
                );
                assert_eq!(m["phase"], "committed", "{m}");
            }
            assert_owners_run(&vms, &agents).await;
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "drain stuck: {vms} {migrations}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let still: Vec<_> = agents[0]
        .client()
        .vms()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.status == tern_proto::GuestStatus::Running)
        .collect();
    assert!(still.is_empty(), "host-a still runs {still:?}");
    // The control plane's metrics count the moves and the queue.
    let metrics_token = std::fs::read_to_string(cp.join("metrics-token")).unwrap();
    let text = http
        .get(format!("{}/metrics", up.base))
        .bearer_auth(metrics_token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "migrations_initiated_total",
        "migrations_accepted_total",
        "migrations_rejected_total",
        "migrations_completed_total",
        "migration_reason_total{reason=\"maintenance\"}",
        "migrations_active 0",
        "migrations_pending 0",
        "migration_duration_seconds",
    ] {
        assert!(text.contains(name), "no {name} in\n{text}");
    }
    drop(agents);
}

/// Asks to move `vm` to `to` and checks the control plane refuses it,
/// naming the label `to` lacks.
async fn refused_for_residency(
    http: &reqwest::Client,
    base: &str,
    tenant: &str,
    vm: &str,
    to: &str,
    label: &str,
) {
    let r = http
        .post(format!("{base}/api/v1/vms/{vm}/migrate"))
        .bearer_auth(tenant)
        .json(&serde_json::json!({ "to": to }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains(label), "{body}");
}

/// Every VM of `vms` (the control plane's list) runs on the host the store
/// says, at the owner epoch it says, checked on arrival.
async fn assert_owners_run(vms: &serde_json::Value, agents: &[AgentProc]) {
    for v in vms.as_array().unwrap() {
        let host = v["host"].as_str().unwrap();
        let epoch = v["owner_epoch"].as_u64().unwrap();
        assert_runs(
            &agents[host_index(host)].client(),
            v["id"].as_str().unwrap(),
            epoch,
        )
        .await;
    }
}

/// Runs the tern CLI against the control plane at `base` as `token`;
/// returns what it printed, failing the test when it fails.
fn tern_cli(base: &str, token: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .args(["--api", base, "--api-token", token])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn host_index(name: &str) -> usize {
    ["host-a", "host-b", "host-c"]
        .iter()
        .position(|h| *h == name)
        .unwrap()
}

fn is_final(m: &serde_json::Value) -> bool {
    matches!(
        m["phase"].as_str(),
        Some("committed" | "rolled_back" | "corrupted")
    )
}

async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> serde_json::Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn get_vm(http: &reqwest::Client, base: &str, token: &str, id: &str) -> serde_json::Value {
    get_json(http, &format!("{base}/api/v1/vms/{id}"), token).await
}

async fn wait_migration(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let m = get_json(http, &format!("{base}/api/v1/migrations/{id}"), token).await;
        if is_final(&m) {
            return m;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
#[ignore = "starts tern up and three agents; run by .ci/run"]
async fn a_silent_hosts_vms_restart_elsewhere_and_its_stale_copies_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let ControlPlane {
        cp: _,
        admin,
        tenant,
        up,
    } = control_plane(
        dir.path(),
        "agents",
        &[
            ("TERN_POOL_SIZE", "0"),
            ("TERN_FLEET_HOST_DOWN_AFTER", "3s"),
            ("TERN_HEALTH_INTERVAL", "1s"),
        ],
    );
    let names = ["host-a", "host-b", "host-c"];
    let (hosts, mut agents) =
        joined_fleet(dir.path(), &[up.base.as_str()], &admin, &names, &|_| {
            Default::default()
        })
        .await;
    let http = reqwest::Client::new();
    let mut vms = Vec::new();
    for _ in 0..4 {
        let r = http
            .post(format!("{}/api/v1/vms", up.base))
            .bearer_auth(&tenant)
            .json(
                &serde_json::json!({"spec": {"image": "process", "memory_mib": 64},
                "config": {"settings": {"k": "v"}}}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: serde_json::Value = r.json().await.unwrap();
        vms.push(v);
    }
    // The agent of the host with the most VMs dies; its guests run on,
    // unmanaged, as on a host cut off from the fleet.
    let victim = names
        .iter()
        .max_by_key(|n| vms.iter().filter(|v| v["host"] == **n).count())
        .unwrap()
        .to_string();
    let orphans: Vec<String> = vms
        .iter()
        .filter(|v| v["host"] == victim.as_str())
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!orphans.is_empty());
    let vi = host_index(&victim);
    agents[vi].0.release_guests();
    agents[vi].kill();

    // After the heartbeat timeout they run again elsewhere, same ids,
    // owner epoch 2, their config kept; the stale copies paused themselves
    // first (their host's lease ran out), so two copies never run at once.
    let dirs: Vec<&Path> = hosts.iter().map(|h| h.data_dir.as_path()).collect();
    let t = Instant::now();
    for id in &orphans {
        loop {
            let copies = common::running_copies(&dirs, id).await;
            assert!(copies.len() <= 1, "two copies of {id} run: {copies:?}");
            let v = get_vm(&http, &up.base, &tenant, id).await;
            let moved = v["host"] != victim.as_str() && v["owner_epoch"] == 2;
            let host = v["host"].as_str().unwrap();
            // The owner moves first (fencing the old copy), then the new
            // host boots it.
            let there = moved
                && agents[host_index(host)]
                    .client()
                    .vm(&id.parse().unwrap())
                    .await
                    .is_ok_and(|g| g.status == tern_proto::GuestStatus::Running);
            if there {
                assert_eq!(v["status"], "running", "{v}");
                assert_eq!(v["config"]["settings"]["k"], "v", "{v}");
                assert_runs(&agents[host_index(host)].client(), id, 2).await;
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "not restarted: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let hosts_now = get_json(&http, &format!("{}/api/v1/hosts", up.base), &admin).await;
    let rec = hosts_now
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == victim.as_str())
        .unwrap()
        .clone();
    assert_eq!(rec["state"], "down", "{rec}");

    // The stale copies are alive but paused (fenced).
    for id in &orphans {
        let copies = common::running_copies(&dirs, id).await;
        assert_eq!(copies.len(), 1, "{id}: {copies:?}");
        let stale = tern_agent::vmdir::VmDir::new(&hosts[vi].data_dir, id);
        let st = tern_agent::control::call::<tern_agent::control::ProcStatus>(
            &stale.control(),
            &tern_agent::control::Request::Status,
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        assert_eq!(st.state, tern_agent::control::ProcState::Fenced, "{st:?}");
    }

    // The host comes back: before its API answers, its stale copies stop.
    let back = start_joining(&hosts[vi], None);
    let views = back.client().vms().await.unwrap();
    for id in &orphans {
        let v = views
            .iter()
            .find(|v| v.id.to_string() == *id)
            .expect("still listed");
        assert_ne!(
            v.status,
            tern_proto::GuestStatus::Running,
            "stale copy runs: {v:?}"
        );
    }
    // Exactly one copy of each runs, where the store says.
    for id in &orphans {
        let v = get_vm(&http, &up.base, &tenant, id).await;
        let mut running = 0;
        for (i, a) in agents.iter().enumerate() {
            let client = if i == vi { back.client() } else { a.client() };
            if let Ok(g) = client.vm(&id.parse().unwrap()).await {
                if g.status == tern_proto::GuestStatus::Running {
                    running += 1;
                    assert_eq!(names[i], v["host"].as_str().unwrap());
                }
            }
        }
        assert_eq!(running, 1, "{id}");
    }
    // And the host is active again.
    let t = Instant::now();
    loop {
        let hs = get_json(&http, &format!("{}/api/v1/hosts", up.base), &admin).await;
        let h = hs
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["id"] == victim.as_str())
            .unwrap()
            .clone();
        if h["state"] == "active" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(back);
}

/// The fleet of issue 11's bar, in one run: PostgreSQL, two control-plane
/// replicas, three agents in network namespaces whose migration streams
/// cross 20 ms RTT link emulators. VMs made through both replicas land on
/// every host; a drain moves host-a's VMs live (each checked on arrival)
/// while the replica running the migrations is killed and the other
/// finishes; a region=eu VM is never sent to the region=us host; a dead
/// agent's VMs run again elsewhere and its stale copies stop when it comes
/// back; the store's owners match where VMs run. (The preemption of a
/// rebalance by an evacuation is its own test below.)
#[tokio::test]
#[ignore = "two tern up replicas on PostgreSQL and three agents; run by .ci/run"]
async fn a_fleet_of_two_replicas_drains_through_a_replica_kill_keeps_residency_and_heals() {
    if !common::kvm() {
        return;
    }
    let Some(pg) = tern_store::testing::postgres("fleet_replicas").await else {
        return;
    };
    // Three hosts in network namespaces; every migration stream crosses a
    // link emulator (10 ms each way: 20 ms RTT).
    let Some(ns) = Netns::create("fleet", 232, 3) else {
        eprintln!("SKIPPED: cannot create network namespaces here (need root and iproute2)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca").display().to_string();
    let secret = "replicas-share-this-secret-0123456789";
    let env = |id: &'static str| {
        vec![
            ("TERN_STORE_URL", pg.url.clone()),
            ("TERN_JWT_SECRET", secret.to_string()),
            ("TERN_CA_DIR", ca.clone()),
            ("TERN_POOL_SIZE", "0".to_string()),
            ("TERN_HOST_ID", id.to_string()),
            // Drains slow enough to kill a replica in the middle of one.
            ("TERN_FLEET_DRAIN_BANDWIDTH_MBPS", "1".to_string()),
            ("TERN_FLEET_HOST_DOWN_AFTER", "6s".to_string()),
        ]
    };
    let start = |id: &'static str| {
        let data = dir.path().join(id);
        std::fs::create_dir_all(&data).unwrap();
        let e = env(id);
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Up::start_on(&data, "agents", &e, ns.bridge_ip)
    };
    let token = |tenant: &str, perms: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["token", "--tenant", tenant, "--permissions", perms])
            .env("TERN_DATA", dir.path().join("r1"))
            .env("TERN_JWT_SECRET", secret)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    // r1 starts first and takes the runner's lease; r2 waits behind it.
    let mut r1 = start("r1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r2 = start("r2");
    let admin = token("ops", "platform:admin");
    let tenant = token("alice", "vms:read,vms:write");
    let names = ["host-a", "host-b", "host-c"];
    let urls = [r1.base.as_str(), r2.base.as_str()];
    let mut plans = Vec::new();
    let mut links = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut p = HostPlan::new(n, ns.ips[i]).unwrap();
        let emu = LinkEmulator::start_on(
            std::net::SocketAddr::new(ns.bridge_ip, 0),
            p.migrate_addr(),
            common::link(0),
        )
        .await
        .unwrap();
        p.reached_at = Some(emu.addr());
        links.push(emu);
        plans.push(p);
    }
    // host-c is in another region.
    let region = |n: &str| -> tern_proto::Labels {
        let r = if n == "host-c" { "us" } else { "eu" };
        [("region".to_string(), r.to_string())].into()
    };
    let (hosts, mut agents) =
        join_plans(dir.path(), &urls, &admin, &plans, Some(&ns.names), &region).await;
    let http = reqwest::Client::new();
    // VMs made through both replicas land on every host.
    for i in 0..6 {
        let r = http
            .post(format!("{}/api/v1/vms", urls[i % 2]))
            .bearer_auth(&tenant)
            // Test guests: each checks its working set on arrival.
            .json(&serde_json::json!({"spec": {"image": "test", "memory_mib": 64}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
    }
    let vms = get_json(&http, &format!("{}/api/v1/vms", r2.base), &tenant).await;
    let on_a = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["host"] == "host-a")
        .count();
    assert!(on_a >= 1, "{vms}");
    let used: std::collections::BTreeSet<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["host"].as_str().unwrap())
        .collect();
    assert!(used.len() >= 2, "six VMs on one host: {vms}");

    // Drain host-a through r2; kill r1, which runs the migrations, once
    // the first is under way. r2 takes the lease over and finishes.
    let r = http
        .post(format!("{}/api/v1/hosts/host-a/drain", r2.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    loop {
        let ms = get_json(&http, &format!("{}/api/v1/migrations", r2.base), &tenant).await;
        let started = ms
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["phase"] == "precopy");
        if started {
            eprintln!("killing r1 mid-drain: {ms}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no drain migration started: {ms}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = r1.child.kill();
    let _ = r1.child.wait();
    let t = Instant::now();
    loop {
        let vms = get_json(&http, &format!("{}/api/v1/vms", r2.base), &tenant).await;
        let ms = get_json(&http, &format!("{}/api/v1/migrations", r2.base), &tenant).await;
        let left = vms
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["host"] == "host-a")
            .count();
        let open = ms
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !is_final(m))
            .count();
        if left == 0 && open == 0 {
            let mut moved_off_a = std::collections::BTreeSet::new();
            for m in ms.as_array().unwrap() {
                eprintln!(
                    "{} {} -> {} {} {}",
                    m["id"], m["from"], m["to"], m["reason"], m["phase"]
                );
                // A rebalance the pool started may be preempted by the
                // drain (rolled back); every evacuation commits.
                if m["reason"] == "rebalance" && m["phase"] == "rolled_back" {
                    continue;
                }
                assert_eq!(m["phase"], "committed", "{m}");
                if m["from"] == "host-a" {
                    moved_off_a.insert(m["vm"].as_str().unwrap().to_owned());
                }
            }
            assert!(moved_off_a.len() >= on_a, "{on_a} VMs on host-a: {ms}");
            // The store's owners match where the VMs really run.
            assert_owners_run(&vms, &agents).await;
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "drain stuck: {vms} {ms}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The hosts kept beating to r2: none of them went down.
    let states = get_json(&http, &format!("{}/api/v1/hosts", r2.base), &admin).await;
    for h in states.as_array().unwrap() {
        assert_ne!(h["state"], "down", "{h}");
    }

    // Data residency: a VM pinned to region=eu lands on host-b (host-a
    // drains) and is never sent to host-c (region=us).
    let r = http
        .post(format!("{}/api/v1/vms", r2.base))
        .bearer_auth(&tenant)
        .json(
            &serde_json::json!({"spec": {"image": "test", "memory_mib": 64,
            "labels": {"region": "eu"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pinned: serde_json::Value = r.json().await.unwrap();
    assert_eq!(pinned["host"], "host-b", "{pinned}");
    let pinned_id = pinned["id"].as_str().unwrap();
    refused_for_residency(&http, &r2.base, &tenant, pinned_id, "host-c", "region=eu").await;

    // host-c's agent dies; its guests run on, unmanaged. After the
    // heartbeat timeout its VMs run again on host-b; when it comes back its
    // stale copies stop, and exactly one copy of each runs.
    let vms = get_json(&http, &format!("{}/api/v1/vms", r2.base), &tenant).await;
    let orphans: Vec<String> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["host"] == "host-c" && v["status"] == "running")
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!orphans.is_empty(), "host-c runs nothing: {vms}");
    agents[2].0.release_guests();
    agents[2].kill();
    let t = Instant::now();
    for id in &orphans {
        loop {
            let v = get_vm(&http, &r2.base, &tenant, id).await;
            if v["host"] == "host-b" && v["owner_epoch"].as_u64() > Some(1) {
                let epoch = v["owner_epoch"].as_u64().unwrap();
                let b = agents[1].client();
                if b.vm(&id.parse().unwrap())
                    .await
                    .is_ok_and(|g| g.status == tern_proto::GuestStatus::Running)
                {
                    assert_runs(&b, id, epoch).await;
                    break;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(60), "not restarted: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    agents[2] = start_joining_in(&hosts[2], None, Some(&ns.names[2]));
    for id in &orphans {
        let v = get_vm(&http, &r2.base, &tenant, id).await;
        let mut running = Vec::new();
        for (i, a) in agents.iter().enumerate() {
            if let Ok(g) = a.client().vm(&id.parse().unwrap()).await {
                if g.status == tern_proto::GuestStatus::Running {
                    running.push(names[i]);
                }
            }
        }
        assert_eq!(running, ["host-b"], "{id}: {v}");
        assert_eq!(v["host"], "host-b", "{v}");
    }
    // At the end the store's owners match where every VM really runs.
    let vms = get_json(&http, &format!("{}/api/v1/vms", r2.base), &tenant).await;
    assert_owners_run(&vms, &agents).await;
    drop(agents);
    drop(links);
}

#[tokio::test]
#[ignore = "starts tern up and two agents; run by .ci/run"]
async fn the_load_policy_moves_vms_off_a_hot_host() {
    // One host takes four VMs of 1000 MiB: 98% of its 4096 MiB. A second
    // host joins: the policy moves VMs until host-a is below the
    // threshold, and no further.
    let HotFleet {
        _dir,
        up,
        admin,
        tenant,
        agents,
        http,
    } = hot_host_then_a_second(&[], 4, 1000).await;
    let t = Instant::now();
    loop {
        let ms = get_json(&http, &format!("{}/api/v1/migrations", up.base), &tenant).await;
        let done: Vec<&serde_json::Value> = ms
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["reason"] == "rebalance" && m["phase"] == "committed")
            .collect();
        if !done.is_empty() && ms.as_array().unwrap().iter().all(is_final) {
            break;
        }
        let hosts = get_json(&http, &format!("{}/api/v1/hosts", up.base), &admin).await;
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rebalancing: {ms} {hosts}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Two more passes change nothing: host-a is below the threshold now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ms = get_json(&http, &format!("{}/api/v1/migrations", up.base), &tenant).await;
    let vms = get_json(&http, &format!("{}/api/v1/vms", up.base), &tenant).await;
    let on_a = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["host"] == "host-a")
        .count();
    eprintln!("migrations: {ms}");
    assert_eq!(on_a, 3, "{vms}");
    assert_eq!(ms.as_array().unwrap().len(), 1, "{ms}");
    for v in vms.as_array().unwrap() {
        let i = if v["host"] == "host-a" { 0 } else { 1 };
        let epoch = v["owner_epoch"].as_u64().unwrap();
        assert_runs(&agents[i].client(), v["id"].as_str().unwrap(), epoch).await;
    }
}

#[tokio::test]
#[ignore = "starts tern up and two agents; run by .ci/run"]
async fn an_evacuation_preempts_a_rebalancing_migration_which_rolls_back() {
    // Rebalancing crawls, so the evacuation finds it under way.
    let slow = [("TERN_FLEET_REBALANCE_BANDWIDTH_MBPS", "1")];
    let HotFleet {
        _dir,
        up,
        admin,
        tenant,
        agents,
        http,
    } = hot_host_then_a_second(&slow, 3, 1200).await;
    // Wait for the load policy's move to be under way.
    let t = Instant::now();
    let rebalance = loop {
        let ms = get_json(&http, &format!("{}/api/v1/migrations", up.base), &tenant).await;
        let running = ms
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["reason"] == "rebalance" && m["phase"] == "precopy")
            .cloned();
        if let Some(m) = running {
            break m;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no rebalancing: {ms}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // host-a fails: evacuate it. The rebalance holds its migration slot
    // and link: it is cancelled and rolls back; every VM leaves host-a.
    let r = http
        .post(format!("{}/api/v1/hosts/host-a/evacuate", up.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    loop {
        let vms = get_json(&http, &format!("{}/api/v1/vms", up.base), &tenant).await;
        let ms = get_json(&http, &format!("{}/api/v1/migrations", up.base), &tenant).await;
        let left = vms
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["host"] == "host-a")
            .count();
        let open = ms
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !is_final(m))
            .count();
        if left == 0 && open == 0 {
            for m in ms.as_array().unwrap() {
                eprintln!(
                    "{} {} {} -> {} {} {}",
                    m["id"], m["reason"], m["from"], m["to"], m["phase"], m["error"]
                );
                if m["id"] == rebalance["id"] {
                    assert_eq!(m["phase"], "rolled_back", "{m}");
                } else {
                    assert_eq!(m["reason"], "evacuation", "{m}");
                    assert_eq!(m["phase"], "committed", "{m}");
                }
            }
            for v in vms.as_array().unwrap() {
                let epoch = v["owner_epoch"].as_u64().unwrap();
                assert_runs(&agents[1].client(), v["id"].as_str().unwrap(), epoch).await;
            }
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "evacuation stuck: {vms} {ms}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[test]
#[ignore = "the README's demo: a control plane, three agents, test guests on KVM; run by .ci/run"]
fn the_demo_drains_a_host_and_every_guest_checks_out() {
    if !common::kvm() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("where everything went"))
        .skip(1)
        .collect();
    assert_eq!(summary.len(), 6, "{stdout}");
    let moved = summary
        .iter()
        .filter(|l| l.contains("moved live from host-a"))
        .count();
    assert!(moved >= 1, "{stdout}");
    for l in &summary {
        assert!(l.contains("checksum ok: Some(true)"), "{l}");
        assert!(!l.contains("-> host-a"), "a VM is still on host-a: {l}");
    }
}

/// A fleet whose one host, host-a, is made hot, then a second host joins.
struct HotFleet {
    _dir: tempfile::TempDir,
    up: Up,
    admin: String,
    tenant: String,
    agents: Vec<AgentProc>,
    http: reqwest::Client,
}

/// `tern up` rebalancing every second (`env` added), host-a with `vms`
/// process VMs of `memory_mib` each, then host-b joined.
async fn hot_host_then_a_second(env: &[(&str, &str)], vms: usize, memory_mib: u32) -> HotFleet {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![
        ("TERN_POOL_SIZE", "0"),
        ("TERN_FLEET_REBALANCE_INTERVAL", "1s"),
        ("TERN_LOG", "warn,tern_fleet=info"),
    ];
    all.extend_from_slice(env);
    let ControlPlane {
        cp: _,
        admin,
        tenant,
        up,
    } = control_plane(dir.path(), "agents", &all);
    let urls = [up.base.as_str()];
    let no_labels = |_: &str| Default::default();
    let a = dir.path().join("a");
    let (_, mut agents) = joined_fleet(&a, &urls, &admin, &["host-a"], &no_labels).await;
    let http = reqwest::Client::new();
    for _ in 0..vms {
        let r = http
            .post(format!("{}/api/v1/vms", up.base))
            .bearer_auth(&tenant)
            .json(&serde_json::json!({"spec": {"image": "process", "memory_mib": memory_mib}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let b = dir.path().join("b");
    let (_, more) = joined_fleet(&b, &urls, &admin, &["host-b"], &no_labels).await;
    agents.extend(more);
    HotFleet {
        _dir: dir,
        up,
        admin,
        tenant,
        agents,
        http,
    }
}

/// The warm pool works across the fleet: its VMs are placed on joined
/// hosts, and a tenant asking for the pool's spec claims one (no boot).
#[tokio::test]
#[ignore = "tern up and two agents; run by .ci/run"]
async fn a_tenant_claims_a_warm_vm_the_pool_placed_on_a_joined_host() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ControlPlane {
        cp: _,
        admin,
        tenant,
        up,
    } = control_plane(
        dir.path(),
        "agents",
        &[
            ("TERN_POOL_SIZE", "2"),
            ("TERN_POOL_RECONCILE_INTERVAL", "1s"),
        ],
    );
    let names = ["host-a", "host-b"];
    let (_hosts, agents) = joined_fleet(dir.path(), &[up.base.as_str()], &admin, &names, &|_| {
        Default::default()
    })
    .await;
    // The pool fills on the joined hosts.
    let t = Instant::now();
    loop {
        let mut warm = 0;
        for a in &agents {
            warm += a
                .client()
                .vms()
                .await
                .unwrap()
                .iter()
                .filter(|v| v.status == tern_proto::GuestStatus::Running)
                .count();
        }
        if warm == 2 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the pool never filled: {warm}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v1/vms", up.base))
        .bearer_auth(&tenant)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["provisioned_from"], "warm", "{v}");
    assert_eq!(v["status"], "running", "{v}");
    let host = v["host"].as_str().unwrap();
    let i = names.iter().position(|n| *n == host).unwrap();
    assert_runs(
        &agents[i].client(),
        v["id"].as_str().unwrap(),
        v["owner_epoch"].as_u64().unwrap(),
    )
    .await;
}

/// A tenant's container through the control plane and its CLI: placed on
/// a joined host (`tern vm create --kind container`), moved lazily by
/// `tern migrate --mode postcopy`, running at the next epoch where the
/// store says, and stopped.
#[tokio::test]
#[ignore = "tern up, two agents and runc containers; run by .ci/run"]
async fn a_tenants_container_is_placed_and_moved_through_the_control_plane() {
    if !common::containers_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ControlPlane {
        admin, tenant, up, ..
    } = control_plane(dir.path(), "agents", &[("TERN_POOL_SIZE", "0")]);
    let no_labels = |_: &str| tern_proto::Labels::default();
    let names = ["host-a", "host-b"];
    let (_hosts, agents) =
        joined_fleet(dir.path(), &[up.base.as_str()], &admin, &names, &no_labels).await;
    let cli = |args: &[&str]| tern_cli(&up.base, &tenant, args);
    let made: serde_json::Value = serde_json::from_str(&cli(&[
        "vm",
        "create",
        "--kind",
        "container",
        "--memory",
        "64",
    ]))
    .unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    let from = made["host"].as_str().unwrap().to_owned();
    assert_eq!(made["status"], "running", "{made}");
    assert_runs(&agents[host_index(&from)].client(), &id, 1).await;

    let to = if from == "host-a" { "host-b" } else { "host-a" };
    let report = cli(&["migrate", &id, "--to", to, "--mode", "postcopy", "--json"]);
    let m: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(m["phase"], "committed", "{m}");
    eprintln!("container {from} -> {to} (lazy): {}", m["report"]);
    let http = reqwest::Client::new();
    let rec = get_vm(&http, &up.base, &tenant, &id).await;
    assert_eq!(rec["host"], to, "{rec}");
    assert_eq!(rec["owner_epoch"], 2, "{rec}");
    assert_runs(&agents[host_index(to)].client(), &id, 2).await;
    let left = agents[host_index(&from)]
        .client()
        .vm(&id.parse().unwrap())
        .await;
    assert!(
        left.as_ref()
            .map_or(true, |v| v.status != tern_proto::GuestStatus::Running),
        "{left:?}"
    );
    cli(&["vm", "stop", &id]);
    let gone = get_vm(&http, &up.base, &tenant, &id).await;
    assert_ne!(gone["status"], "running", "{gone}");
}
