//! Issue 14's attacks, each reproduced against real processes, each asserting
//! the fix.

mod common;

use common::up::{token, Up};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every file and directory under `root` (and `root` itself) that group or
/// others can read, write or enter.
fn exposed(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = vec![];
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 && !meta.file_type().is_symlink() {
            out.push((p.clone(), format!("{mode:o}")));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                todo.push(e.path());
            }
        }
    }
    out
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
