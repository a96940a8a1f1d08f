//! `tern up` as a user runs it: a real process, a real port, tokens from
//! `tern token`, the API walk, and a restart that keeps the VMs.

mod common;

use common::up::{token, Up};
use std::process::Command;
use std::time::Duration;

#[tokio::test]
async fn walk_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let alice = token(data, "alice");
    let bob = token(data, "bob");
    let up = Up::start(data, "mock", &[]);
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
    let up = Up::start(data, "mock", &[]);
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
