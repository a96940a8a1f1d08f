//! Guests outlive their agent: every guest runs in a process of its own
//! (`tern guest`), so an agent restarted (SIGTERM) or killed (SIGKILL) at
//! any moment, migrating or not, leaves exactly one running copy of each
//! guest, and the agent that comes back serves them and reports what
//! really happened. Slow (agents and guests): `#[ignore]`d; `scripts/test.sh` runs them.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::control::{self, ProcState, ProcStatus, Request};
use tern_agent::vmdir::VmDir;
use tern_agent::{AgentClient, MigrationPhase};
use tern_proto::{GuestKind, GuestSpec, GuestStatus, MigrationId, VmId};
use tern_testbed as testbed;

/// Asks every guest process directly (no agent) and checks that each
/// advances: nothing paused while its agent was away.
async fn advance_without_agent(data_dir: &Path, vms: &[VmId]) {
    let status = |id: &VmId| {
        let sock = VmDir::new(data_dir, &id.to_string()).control();
        async move {
            control::call::<ProcStatus>(&sock, &Request::Status, Duration::from_secs(3))
                .await
                .unwrap()
        }
    };
    let mut before = Vec::new();
    for id in vms {
        let s = status(id).await;
        assert_eq!(s.state, ProcState::Running, "{id}: {s:?}");
        before.push(s.counter.unwrap_or(0));
    }
    let t = Instant::now();
    for (id, b) in vms.iter().zip(before) {
        loop {
            let s = status(id).await;
            assert_eq!(s.state, ProcState::Running, "{id}: {s:?}");
            if s.counter.unwrap_or(0) > b {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{id} stopped: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn pids(data_dir: &Path, vms: &[VmId]) -> Vec<i32> {
    vms.iter()
        .map(|id| {
            VmDir::new(data_dir, &id.to_string())
                .live_pid()
                .expect("a live guest process")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: an agent and five guests"]
async fn five_guests_of_mixed_kinds_run_through_agent_restarts() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bed = loopback_pair(dir.path());
    let data = bed[0].data_dir.clone();
    let mut a = AgentProc::start(&bed[0], None);
    let c = a.client();
    let mut specs = vec![spec(), spec(), process_spec(), process_spec()];
    match tern_drivers::qemu::testing::guest_or_skip() {
        Some(_) => specs.push(GuestSpec {
            kind: GuestKind::Linux,
            memory_mib: 256,
            ws_mib: 16,
            dirty_mib_per_sec: 4,
            ..Default::default()
        }),
        None => specs.push(spec()),
    }
    let mut vms = Vec::new();
    for s in &specs {
        let v = c.create_vm(s).await.unwrap();
        assert_runs(&c, &v.id, 1).await;
        vms.push(v.id);
    }
    let first = pids(&data, &vms);
    for how in ["SIGTERM", "SIGKILL"] {
        match how {
            "SIGTERM" => a.0.terminate(),
            _ => a.kill(),
        }
        advance_without_agent(&data, &vms).await;
        a.0.release_guests();
        a = AgentProc::start(&bed[0], None);
        let c = a.client();
        for id in &vms {
            assert_runs(&c, id, 1).await;
        }
        assert_eq!(pids(&data, &vms), first, "a guest process was replaced");
        assert_eq!(c.vms().await.unwrap().len(), vms.len());
        eprintln!(
            "after {how}: all {} guests kept running and are served",
            vms.len()
        );
    }
    // The agent still controls them: one is stopped through it.
    let c = a.client();
    c.stop_vm(&vms[0]).await.unwrap();
    assert_eq!(c.vm(&vms[0]).await.unwrap().status, GuestStatus::Stopped);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    EarlyPrecopy,
    LaterRound,
    Switchover,
    AfterCommitRecord,
    MidPostcopy,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Source,
    Destination,
}

fn commit_recorded(data_dir: &Path, vm: &str) -> bool {
    std::fs::read_to_string(VmDir::new(data_dir, vm).0.join("journal.jsonl"))
        .is_ok_and(|t| t.contains("\"commit_decided\""))
}

/// Polls the source's view until the migration is at `phase`.
async fn reach(c: &AgentClient, mig: &MigrationId, phase: Phase, data: &Path, vm: &VmId) -> bool {
    let vm = &vm.to_string();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        let v = c.migration(mig).await.unwrap();
        if v.state.is_final() {
            return false;
        }
        let p = &v.progress;
        let at = match phase {
            Phase::EarlyPrecopy => {
                p.phase == MigrationPhase::Precopy && p.round == 1 && p.pages_sent > 0
            }
            Phase::LaterRound => p.phase == MigrationPhase::Precopy && p.round >= 2,
            // Paused, the last pages on their way (the commit record is
            // written as switchover begins, before the pause).
            Phase::Switchover => p.phase == MigrationPhase::Switchover && !p.destination_ready,
            // The destination is ready, `Commit` is held back.
            Phase::AfterCommitRecord => p.destination_ready && commit_recorded(data, vm),
            Phase::MidPostcopy => p.phase == MigrationPhase::Postcopy,
        };
        if at {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: twenty migrations, each with an agent killed"]
async fn an_agent_killed_at_any_phase_of_a_migration_leaves_one_running_copy() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bed, _to_b, _to_a) = pair_via_emulator(dir.path(), 256 << 10, 10).await;
    let (da, db) = (bed[0].data_dir.clone(), bed[1].data_dir.clone());
    // Commit is held back 1 s after the source's record: the window exists.
    let env = [("TERN_FAULT_HOLD_AFTER_COMMIT_RECORD_MS", "1000")];
    let mut agents = [
        AgentProc::start_env(&bed[0], &env),
        AgentProc::start_env(&bed[1], &env),
    ];
    let mut outcomes = Vec::new();
    for kind in [GuestKind::TestGuest, GuestKind::Process] {
        for phase in [
            Phase::EarlyPrecopy,
            Phase::LaterRound,
            Phase::Switchover,
            Phase::AfterCommitRecord,
            Phase::MidPostcopy,
        ] {
            for side in [Side::Source, Side::Destination] {
                // A phase missed (the poll came too late on a loaded
                // machine) is tried again; each try still checks the end.
                for _try in 0..3 {
                    let s = match kind {
                        GuestKind::Process => process_spec(),
                        _ => spec(),
                    };
                    let ca = agents[0].client();
                    let vm = ca.create_vm(&s).await.unwrap().id;
                    assert_runs(&ca, &vm, 1).await;
                    let mut req = mode_to(
                        "host-b",
                        if phase == Phase::MidPostcopy {
                            "postcopy"
                        } else {
                            "precopy"
                        },
                    );
                    // A budget a later round meets: a tight one, or the
                    // first round is enough (it sends only the pages the
                    // guest wrote, so it is short and little is dirtied).
                    req.max_downtime_ms = Some(match phase {
                        Phase::LaterRound => 100,
                        _ => 1000,
                    });
                    let m = ca.migrate(&vm, &req).await.unwrap().id;
                    let hit = reach(&ca, &m, phase, &da, &vm).await;
                    let k = match side {
                        Side::Source => 0,
                        Side::Destination => 1,
                    };
                    agents[k].kill();
                    agents[k].0.release_guests();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    agents[k] = AgentProc::start_env(&bed[k], &env);
                    let (ca, cb) = (agents[0].client(), agents[1].client());
                    let src = wait_end(&ca, &m, Duration::from_secs(120)).await;
                    let dst = wait_end(&cb, &m, Duration::from_secs(60)).await;
                    let copies = running_copies(&[&da, &db], &vm.to_string()).await;
                    assert_eq!(
                        copies.len(),
                        1,
                        "{kind:?} {phase:?} {side:?}: copies {copies:?}"
                    );
                    match src.state {
                        MigrationPhase::Committed => {
                            assert_eq!(dst.state, MigrationPhase::Committed, "{dst:?}");
                            assert_runs(&cb, &vm, 2).await;
                            assert_eq!(ca.vm(&vm).await.unwrap().status, GuestStatus::MovedAway);
                            cb.stop_vm(&vm).await.unwrap();
                        }
                        MigrationPhase::RolledBack => {
                            assert_eq!(dst.state, MigrationPhase::RolledBack, "{dst:?}");
                            assert_runs(&ca, &vm, 1).await;
                            ca.stop_vm(&vm).await.unwrap();
                        }
                        other => panic!("{kind:?} {phase:?} {side:?}: ended {other:?}: {src:?}"),
                    }
                    eprintln!(
                        "{kind:?} {phase:?} ({}) {side:?} agent killed: {:?}",
                        if hit { "hit" } else { "MISSED" },
                        src.state
                    );
                    outcomes.push((kind, phase, side, hit, src.state));
                    if hit {
                        break;
                    }
                }
            }
        }
    }
    let reached = |k: GuestKind, p: Phase, s: Side| {
        outcomes
            .iter()
            .any(|o| o.0 == k && o.1 == p && o.2 == s && o.3)
    };
    let missed: Vec<_> = outcomes
        .iter()
        .filter(|o| !reached(o.0, o.1, o.2))
        .collect();
    assert!(
        missed.is_empty(),
        "phases not reached in three tries: {missed:?}"
    );
    drop(agents);
    testbed::kill_guests(&da);
    testbed::kill_guests(&db);
}
