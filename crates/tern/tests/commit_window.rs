//! The commit window: the source has journaled its commit decision and
//! `Commit` has not reached the destination. A fault there leaves the
//! commit in doubt; the source keeps the whole guest paused, asks the
//! destination host how it ended (asking fences a late `Commit`) and
//! resumes or discards it. Afterwards exactly one copy runs, and the CLI and
//! both agents' APIs say where. Slow: `#[ignore]`d; `scripts/test.sh` runs them.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_agent::vmdir::VmDir;
use tern_agent::MigrationPhase;
use tern_proto::GuestStatus;
use tern_testbed::LocalHost;
use tern_testkit::LinkEmulator;

/// The source holds this long between its commit record and `Commit`.
const HOLD_MS: &str = "3000";
/// Resume deadline of every session in these tests, seconds.
const DEADLINE: u64 = 3;

struct Window {
    a: AgentProc,
    b: AgentProc,
    bed: Vec<LocalHost>,
    to_b: LinkEmulator,
    to_a: LinkEmulator,
    vm: String,
    cli: tokio::process::Child,
    _dir: tempfile::TempDir,
}

/// Two agents across emulated links; a test guest on host-a migrating to
/// host-b through `tern migrate`, stopped in the commit window.
async fn in_commit_window() -> Option<Window> {
    in_commit_window_of("precopy").await
}

/// [`in_commit_window`] for a migration of `mode`.
async fn in_commit_window_of(mode: &str) -> Option<Window> {
    if !kvm() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bed, to_b, to_a) = pair_via_emulator(dir.path(), 8 << 20, DEADLINE).await;
    let env = [("TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS", HOLD_MS)];
    let a = AgentProc::start_env(&bed[0], &env);
    let b = AgentProc::start(&bed[1], None);
    let vm = a.client().create_vm(&spec()).await.unwrap().id;
    assert_runs(&a.client(), &vm, 1).await;
    let token = bed[0].data_dir.join("api-token");
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["migrate", &vm.to_string(), "--to", "host-b", "--mode", mode])
        .args(["--agent", &bed[0].api_url])
        .arg("--token-file")
        .arg(&token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let journal = VmDir::new(&bed[0].data_dir, &vm.to_string())
        .0
        .join("journal.jsonl");
    let t = Instant::now();
    while !std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("\"commit_decided\"")) {
        assert!(t.elapsed() < Duration::from_secs(60), "no commit record");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The record is written as switchover begins; the window opens when
    // the destination is ready and `Commit` is held back.
    let ca = a.client();
    loop {
        let ms = ca.migrations_list().await.unwrap();
        if ms.iter().any(|m| m.progress.destination_ready) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the destination never got ready"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Some(Window {
        a,
        b,
        bed,
        to_b,
        to_a,
        vm: vm.to_string(),
        cli,
        _dir: dir,
    })
}

/// The directory of the guest process receiving `vm` on host-b.
fn incoming_dir(data: &Path, vm: &str) -> PathBuf {
    std::fs::read_dir(data.join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{vm}.")))
        })
        .expect("an incoming guest directory")
}

/// After the fault: the CLI's verdict, both APIs and the running copies
/// agree, and exactly one copy runs where they say.
async fn one_copy_everyone_agrees(w: Window, expect: MigrationPhase) {
    let out = tokio::time::timeout(Duration::from_secs(120), w.cli.wait_with_output())
        .await
        .expect("the CLI ended")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(&format!("{expect:?}")),
        "the CLI said: {text}"
    );
    assert_eq!(out.status.success(), expect == MigrationPhase::Committed);
    let (ca, cb) = (w.a.client(), w.b.client());
    let mig = ca.migrations_list().await.unwrap()[0].clone();
    assert_eq!(mig.state, expect, "{mig:?}");
    let dst = wait_end(&cb, &mig.id, Duration::from_secs(60)).await;
    let copies = running_copies(&[&w.bed[0].data_dir, &w.bed[1].data_dir], &w.vm).await;
    assert_eq!(copies.len(), 1, "running copies: {copies:?}");
    if expect == MigrationPhase::Committed {
        assert_eq!(dst.state, MigrationPhase::Committed, "{dst:?}");
        assert_runs(&cb, &w.vm, 2).await;
        assert_eq!(
            ca.vm(&w.vm.parse().unwrap()).await.unwrap().status,
            GuestStatus::MovedAway
        );
    } else {
        assert_eq!(dst.state, MigrationPhase::RolledBack, "{dst:?}");
        assert_runs(&ca, &w.vm, 1).await;
        assert!(
            cb.vm(&w.vm.parse().unwrap()).await.is_err(),
            "host-b lists the VM"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a held commit"]
async fn the_target_agent_killed_in_the_commit_window() {
    let Some(mut w) = in_commit_window().await else {
        return;
    };
    // The destination's guest process holds the sessions: it takes Commit
    // without its agent, and the agent that comes back reports it.
    w.b.kill();
    w.b.0.release_guests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.b = AgentProc::start(&w.bed[1], None);
    one_copy_everyone_agrees(w, MigrationPhase::Committed).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a held commit"]
async fn the_target_guest_process_killed_in_the_commit_window() {
    let Some(w) = in_commit_window().await else {
        return;
    };
    let dir = VmDir(incoming_dir(&w.bed[1].data_dir, &w.vm));
    let pid = dir.live_pid().expect("the receiving process");
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    // Commit cannot arrive: the source settles with host-b (no commit
    // record there) and resumes its paused guest.
    one_copy_everyone_agrees(w, MigrationPhase::RolledBack).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a held commit"]
async fn the_link_cut_past_the_deadline_in_the_commit_window() {
    let Some(w) = in_commit_window().await else {
        return;
    };
    let down = Duration::from_secs(DEADLINE + 4);
    w.to_b.cut(down);
    w.to_a.cut(down);
    one_copy_everyone_agrees(w, MigrationPhase::RolledBack).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a held commit"]
async fn a_failed_handshake_on_reconnect_in_the_commit_window() {
    let Some(w) = in_commit_window().await else {
        return;
    };
    // The data streams drop; the first one back has a byte of its TLS
    // ClientHello flipped (past the route preamble): its handshake fails.
    w.to_b.corrupt_next_connection_at(40);
    w.to_b.cut(Duration::from_millis(200));
    let out = one_copy_everyone_agrees_any(w).await;
    eprintln!("a failed handshake in the commit window ended {out:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a held commit"]
async fn a_black_hole_past_the_deadline_in_the_commit_window() {
    for mode in ["precopy", "postcopy"] {
        let Some(w) = in_commit_window_of(mode).await else {
            return;
        };
        // Nothing crosses and nothing is reset: only heartbeats notice.
        let hole = Duration::from_secs(DEADLINE + 12);
        w.to_b.hold(hole);
        w.to_a.hold(hole);
        let t = Instant::now();
        let out = one_copy_everyone_agrees_any(w).await;
        eprintln!(
            "{mode}: a {hole:?} black hole in the commit window ended {out:?} after {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
}

/// Whichever way it ends, one copy runs and everyone agrees.
async fn one_copy_everyone_agrees_any(w: Window) -> MigrationPhase {
    let ca = w.a.client();
    let t = Instant::now();
    let state = loop {
        if let Some(m) = ca.migrations_list().await.unwrap().first() {
            if m.state.is_final() {
                break m.state;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(120), "never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    one_copy_everyone_agrees(w, state).await;
    state
}
