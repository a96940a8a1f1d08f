//! `tern up --driver docker` against a real Docker Engine: a warm pool of
//! containers, a tenant's VM claimed from it, a container whose workload dies
//! replaced after three failed probes, and no container left after delete.
//!
//! Skipped when no engine answers, unless `TERN_REQUIRE_DOCKER=1` (CI).

mod common;

use common::up::{token, Up};
use std::process::Command;
use std::time::{Duration, Instant};

/// The engine's containers of this instance: (name, running).
fn containers(instance: &str) -> Vec<(String, bool)> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}} {{.State}}"])
        .args(["--filter", &format!("label=tern.instance={instance}")])
        .output()
        .expect("docker ps");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, s)| (n.to_string(), s == "running"))
        .collect()
}

fn engine_answers() -> bool {
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("TERN_REQUIRE_DOCKER").as_deref() == Ok("1") {
        panic!("TERN_REQUIRE_DOCKER=1 but no Docker Engine answers");
    }
    if !ok {
        eprintln!("SKIPPED: no Docker Engine answers");
    }
    ok
}

/// Removes this instance's containers however the test ends.
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        for (name, _) in containers(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        }
    }
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn tern_up_runs_a_warm_pool_of_containers_heals_and_cleans_up() {
    if !engine_answers() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let instance = format!("tern-up-{}", std::process::id());
    let _sweep = Sweep(instance.clone());
    let alice = token(data, "alice");
    let env = [
        ("TERN_DOCKER_INSTANCE", instance.as_str()),
        ("TERN_HEALTH_INTERVAL", "300ms"),
        ("TERN_POOL_RECONCILE_INTERVAL", "300ms"),
    ];
    let up = Up::start(data, "docker", &env);
    let http = reqwest::Client::new();
    let b = up.base.clone();

    // The warm pool (size 2) fills with running containers.
    until("two warm containers", async || {
        let c = containers(&instance);
        (c.len() == 2 && c.iter().all(|(_, up)| *up)).then_some(())
    })
    .await;

    // A tenant's VM is one of them, or a new one, and runs.
    let r = http
        .post(format!("{b}/api/v1/vms"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let vm: serde_json::Value = r.json().await.unwrap();
    let id = vm["id"].as_str().unwrap().to_owned();
    let name = format!("{instance}-{id}");
    assert!(containers(&instance).contains(&(name.clone(), true)));

    // Its workload dies: three failed probes later it is replaced by a new
    // VM of the same tenant, and the dead container is gone.
    let out = Command::new("docker")
        .args(["kill", &name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_id = until("a replacement", async || {
        let list: serde_json::Value = http
            .get(format!("{b}/api/v1/vms"))
            .bearer_auth(&alice)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let vms = list.as_array()?;
        let other = vms.iter().find(|v| v["id"] != id.as_str())?;
        (vms.len() == 1 && other["status"] == "running")
            .then(|| other["id"].as_str().map(String::from))?
    })
    .await;
    let new_name = format!("{instance}-{new_id}");
    until("the dead container removed", async || {
        let c = containers(&instance);
        (!c.iter().any(|(n, _)| *n == name) && c.contains(&(new_name.clone(), true))).then_some(())
    })
    .await;

    // Deleting the VM removes its container.
    let r = http
        .delete(format!("{b}/api/v1/vms/{new_id}"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 204, "{}", r.text().await.unwrap_or_default());
    assert!(!containers(&instance).iter().any(|(n, _)| *n == new_name));
    up.stop();
}
