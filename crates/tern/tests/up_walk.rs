//! `tern up` as a user runs it: a real process, a real port, tokens from
//! `tern token`, the API walk, and a restart that keeps the VMs.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Up {
    child: Child,
    base: String,
}

impl Up {
    fn start(data: &Path) -> Up {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["up", "--driver", "mock", "--listen", "127.0.0.1:0"])
            .env("TERN_DATA", data)
            .env("TERN_POOL_SIZE", "2")
            .env("TERN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tern up");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("tern: API listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Up { child, base }
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tern up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(data: &Path, tenant: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "token",
            "--tenant",
            tenant,
            "--permissions",
            "vms:read,vms:write",
        ])
        .env("TERN_DATA", data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn walk_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let alice = token(data, "alice");
    let bob = token(data, "bob");
    let up = Up::start(data);
    let http = reqwest::Client::new();
    let b = up.base.clone();

    // Wait until the pool has filled once (the reconciler runs at start-up).
    for _ in 0..50 {
        if http
            .get(format!("{b}/healthz"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let r = http.get(format!("{b}/api/v1/vms")).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].is_string());

    let r = http
        .post(format!("{b}/api/v1/vms"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"config": {"settings": {"k": "v"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let vm: serde_json::Value = r.json().await.unwrap();
    let id = vm["id"].as_str().unwrap().to_owned();
    let url = format!("{b}/api/v1/vms/{id}");

    let r = http.get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(&url).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(r.status(), 404, "another tenant");
    let list: serde_json::Value = http
        .get(format!("{b}/api/v1/vms"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let r = http
        .post(format!("{url}/configure"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"allowed_tools": ["git"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A second VM that will be deleted after the restart.
    let r = http
        .post(format!("{b}/api/v1/vms"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let second: serde_json::Value = r.json().await.unwrap();
    let second_url = format!("{b}/api/v1/vms/{}", second["id"].as_str().unwrap());

    up.stop();
    let up = Up::start(data);
    let b = up.base.clone();
    let url = url.replace(&url[..url.find("/api").unwrap()], &b);
    let second_url = second_url.replace(&second_url[..second_url.find("/api").unwrap()], &b);

    let r = http.get(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200, "VM survives a restart of tern up");
    let vm: serde_json::Value = r.json().await.unwrap();
    assert_eq!(vm["status"], "running");
    assert_eq!(vm["config"]["allowed_tools"][0], "git");

    let r = http
        .delete(&second_url)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = http
        .get(&second_url)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    up.stop();
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tern.toml"), "[health]\nconcurency = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["up"])
        .env("TERN_DATA", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("health") && err.contains("concurency"),
        "{err}"
    );
}
