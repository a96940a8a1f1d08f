//! Actor executors as processes (`tern executor`), each in its own network
//! namespace: they find each other by gossip, an actor deployed through the
//! REST API replicates its checkpoints, its executor is killed with
//! SIGKILL, and the actor runs again on exactly one survivor, from its
//! latest checkpoint, within 10 s. The CLI (`tern actor`) then reaches it
//! through either survivor and moves it between them.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tern_actors::examples::{self, kv};
use tern_api::{AuthKeys, Permission};
use tern_proto::TenantId;
use tern_testkit::netns::Netns;
use tern_transport::certs;

struct Executor {
    child: Child,
    api: String,
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes executor `i`'s configuration: certificates, keys, peers by pin
/// and key only (addresses come from gossip).
fn write_configs(dir: &Path, ips: &[IpAddr]) -> Vec<PathBuf> {
    certs::init_ca(&dir.join("ca")).unwrap();
    let n = ips.len();
    let issued: Vec<_> = (0..n)
        .map(|i| {
            certs::issue(
                &dir.join("ca"),
                &format!("exec-{i}"),
                dir,
                Duration::from_secs(86400),
                false,
            )
            .unwrap()
        })
        .collect();
    let keys: Vec<SigningKey> = (0..n)
        .map(|i| SigningKey::from_bytes(&[i as u8 + 40; 32]))
        .collect();
    std::fs::write(dir.join("jwt.secret"), [7u8; 32]).unwrap();
    (0..n)
        .map(|i| {
            let data = dir.join(format!("exec-{i}"));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("executor.key"), keys[i].to_bytes()).unwrap();
            let seeds: Vec<String> = (0..n).filter(|&j| j != i).map(|j| format!("\"{}:7401\"", ips[j])).collect();
            let mut cfg = format!(
                "name = \"exec-{i}\"\ndata_dir = \"{}\"\nlisten = \"{ip}:7400\"\napi = \"{ip}:7402\"\n\
                 jwt_secret_file = \"{}\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
                 [gossip]\nlisten = \"{ip}:7401\"\nseeds = [{}]\n",
                data.display(),
                dir.join("jwt.secret").display(),
                issued[i].cert.display(),
                issued[i].key.display(),
                dir.join("ca/ca.pem").display(),
                seeds.join(", "),
                ip = ips[i],
            );
            for j in (0..n).filter(|&j| j != i) {
                cfg += &format!(
                    "\n[[peers]]\nname = \"exec-{j}\"\npin = \"{}\"\nkey = \"{}\"\n",
                    issued[j].spki_sha256,
                    hex::encode(keys[j].verifying_key().to_bytes())
                );
            }
            let path = dir.join(format!("exec-{i}.toml"));
            std::fs::write(&path, cfg).unwrap();
            path
        })
        .collect()
}

/// Starts an executor in namespace `ns` and waits for its ready line.
fn start(ns: &str, cfg: &Path, ip: IpAddr) -> Executor {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tern"), "executor"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines
        .next()
        .expect("the executor exited before it was ready")
        .unwrap();
    assert!(line.contains("ready"), "{line}");
    std::thread::spawn(move || for _ in lines {});
    Executor {
        child,
        api: format!("http://{ip}:7402"),
    }
}

struct Api {
    http: reqwest::Client,
    token: String,
    admin: String,
}

impl Api {
    async fn call(
        &self,
        admin: bool,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
    ) -> (u16, Value) {
        let token = if admin { &self.admin } else { &self.token };
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(5));
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn send(&self, api: &str, actor: &str, seq: u64, payload: Vec<u8>) -> (u16, Value) {
        let body = json!({"sender": "client", "seq": seq, "payload_hex": hex::encode(payload)});
        self.call(
            false,
            reqwest::Method::POST,
            format!("{api}/api/v1/actors/{actor}/messages"),
            Some(body),
        )
        .await
    }

    async fn here(&self, api: &str, actor: &str) -> bool {
        let (s, v) = self
            .call(
                false,
                reqwest::Method::GET,
                format!("{api}/api/v1/actors/{actor}"),
                None,
            )
            .await;
        s == 200 && v["here"] == json!(true)
    }
}

fn tern(args: &[&str], token: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_TOKEN", token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: three executor processes in network namespaces"]
async fn a_killed_executors_actor_runs_again_on_one_survivor_within_10_s() {
    let Some(ns) = Netns::create("act", 235, 3) else {
        eprintln!(
            "SKIPPED: cannot create network namespaces and a bridge here (need root and iproute2)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfgs = write_configs(dir.path(), &ns.ips);
    let mut execs: Vec<Option<Executor>> = (0..3)
        .map(|i| Some(start(&ns.names[i], &cfgs[i], ns.ips[i])))
        .collect();
    let keys = AuthKeys::from_secret(&[7u8; 32]);
    let tenant = TenantId::new("acme").unwrap();
    let api = Api {
        http: reqwest::Client::new(),
        token: keys
            .issue(
                &tenant,
                &[Permission::VmsRead, Permission::VmsWrite],
                Duration::from_secs(3600),
            )
            .unwrap(),
        admin: keys
            .issue(
                &tenant,
                &[Permission::PlatformAdmin],
                Duration::from_secs(3600),
            )
            .unwrap(),
    };
    let urls: Vec<String> = execs
        .iter()
        .map(|e| e.as_ref().unwrap().api.clone())
        .collect();

    // Deploy on exec-0 once gossip made everyone known and leases hold.
    let body = json!({"wat": examples::KV, "checkpoint_interval_ms": 200});
    let start_at = Instant::now();
    let actor = loop {
        let (s, v) = api
            .call(
                false,
                reqwest::Method::POST,
                format!("{}/api/v1/actors", urls[0]),
                Some(body.clone()),
            )
            .await;
        assert!(s == 201 || s == 0, "deploy: {s} {v}");
        if s == 201 {
            break v["id"].as_str().unwrap().to_string();
        }
        assert!(start_at.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for k in 1..=20u64 {
        let (s, v) = api.send(&urls[0], &actor, k, kv::put(k, k * 100)).await;
        assert_eq!(s, 200, "put {k}: {v}");
    }
    // Both survivors-to-be hold a replica with the last put.
    let start_at = Instant::now();
    loop {
        let mut ok = true;
        for url in &urls[1..] {
            let (_, v) = api
                .call(
                    true,
                    reqwest::Method::GET,
                    format!("{url}/api/v1/actors"),
                    None,
                )
                .await;
            ok &= v["replicas"] == json!([actor.clone()]);
        }
        let (_, v) = api
            .call(
                false,
                reqwest::Method::GET,
                format!("{}/api/v1/actors/{actor}", urls[0]),
                None,
            )
            .await;
        if ok && v["queued"] == json!(0) && v["checkpoint_sequence"].as_u64().unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            start_at.elapsed() < Duration::from_secs(10),
            "no replicas: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A checkpoint interval more, so the last one (after every put) is out.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let killed = Instant::now();
    execs[0].as_mut().unwrap().child.kill().unwrap();
    execs[0].take();
    let owner = loop {
        let mut running = Vec::new();
        for (i, url) in urls.iter().enumerate().skip(1) {
            if api.here(url, &actor).await {
                running.push(i);
            }
        }
        assert!(running.len() <= 1, "two copies run: {running:?}");
        if let [i] = running[..] {
            break i;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "not running again within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = killed.elapsed();
    eprintln!("restored on exec-{owner} {took:?} after the kill");
    let (s, v) = api.send(&urls[owner], &actor, 21, kv::get(7)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["reply_hex"], json!(hex::encode(700u64.to_le_bytes())));

    // The CLI through the other survivor: it names the owner (once gossip
    // told it), the CLI follows.
    let other = 3 - owner;
    let start_at = Instant::now();
    loop {
        let (_, v) = api
            .call(
                false,
                reqwest::Method::GET,
                format!("{}/api/v1/actors/{actor}", urls[other]),
                None,
            )
            .await;
        if v["executor"] == json!(format!("exec-{owner}")) {
            break;
        }
        assert!(
            start_at.elapsed() < Duration::from_secs(10),
            "gossip does not tell: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tern(
        &[
            "actor",
            "send",
            &actor,
            "--sender",
            "client",
            "--seq",
            "22",
            "--payload-hex",
            &hex::encode(kv::get(20)),
            "--api",
            &urls[other],
        ],
        &api.token,
    );
    assert_eq!(out.trim(), hex::encode(2000u64.to_le_bytes()));
    let out = tern(
        &[
            "actor",
            "migrate",
            &actor,
            "--to",
            &format!("exec-{other}"),
            "--api",
            &urls[owner],
        ],
        &api.token,
    );
    assert!(out.contains("Complete"), "{out}");
    assert!(api.here(&urls[other], &actor).await && !api.here(&urls[owner], &actor).await);
    let metrics = reqwest::get(format!("{}/metrics", urls[owner]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("migrations_completed_total{workload=\"actor\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"Operator\""), "{metrics}");
    let out = tern(&["actor", "list", "--api", &urls[other]], &api.token);
    assert!(out.contains(&actor), "{out}");
    let (s, v) = api.send(&urls[other], &actor, 23, kv::get(7)).await;
    assert_eq!(
        (s, &v["reply_hex"]),
        (200, &json!(hex::encode(700u64.to_le_bytes()))),
        "{v}"
    );
    // Another tenant sees nothing of it, and cannot stop it.
    let stranger = keys
        .issue(
            &TenantId::new("other").unwrap(),
            &[Permission::VmsRead, Permission::VmsWrite],
            Duration::from_secs(60),
        )
        .unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}/api/v1/actors/{actor}", urls[other]))
        .bearer_auth(stranger)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status().as_u16(), 200);
    let stranger2 = keys
        .issue(
            &TenantId::new("other").unwrap(),
            &[Permission::VmsWrite],
            Duration::from_secs(60),
        )
        .unwrap();
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/actors/{actor}", urls[other]))
        .bearer_auth(stranger2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // A move through the API, followed as server-sent events to its end.
    let (s, v) = api
        .call(
            false,
            reqwest::Method::POST,
            format!("{}/api/v1/actors/{actor}/migrate", urls[other]),
            Some(json!({"to": format!("exec-{owner}")})),
        )
        .await;
    assert_eq!(s, 202, "{v}");
    let m = v["migration"].as_str().unwrap();
    let events = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/actor-migrations/{m}/events",
            urls[other]
        ))
        .bearer_auth(&api.token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(events.contains("event: end"), "{events}");
    assert!(events.contains("\"state\":\"Complete\""), "{events}");
    assert!(api.here(&urls[owner], &actor).await);
    // Its tenant stops it.
    let out = tern(
        &["actor", "stop", &actor, "--api", &urls[owner]],
        &api.token,
    );
    assert!(out.contains("stopped"), "{out}");
    assert!(!api.here(&urls[owner], &actor).await);
}
