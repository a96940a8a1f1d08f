//! Partitions without resets: the link between two agents holds every
//! packet (a black hole: no RST, nothing forwarded, new connections reach
//! nothing). Heartbeats on every stream notice the silence; within the
//! resume deadline the migration resumes, past it both sides end it the
//! same way, while the hole is still there. Slow: `#[ignore]`d;
//! `scripts/test.sh` runs them.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tern_agent::{AgentClient, MigrationPhase};
use tern_transport::SILENCE_LIMIT;

/// Starts a pre-copy of a fresh process VM a → b and returns once its
/// first pages are on the way.
async fn early_precopy(ca: &AgentClient) -> (tern_proto::VmId, tern_proto::MigrationId) {
    let vm = ca.create_vm(&process_spec()).await.unwrap();
    assert_runs(ca, &vm.id, 1).await;
    let m = ca.migrate(&vm.id, &precopy_to("host-b")).await.unwrap();
    let t = Instant::now();
    while ca.migration(&m.id).await.unwrap().progress.pages_sent == 0 {
        assert!(t.elapsed() < Duration::from_secs(30), "no pages sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (vm.id, m.id)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents and a black hole"]
async fn a_black_hole_past_the_deadline_in_early_precopy_ends_on_both_sides() {
    const DEADLINE: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let (bed, to_b, to_a) = pair_via_emulator(dir.path(), 1 << 20, DEADLINE).await;
    let a = AgentProc::start(&bed[0], None);
    let b = AgentProc::start(&bed[1], None);
    let (ca, cb) = (a.client(), b.client());
    let (vm, mig) = early_precopy(&ca).await;
    // Far longer than the deadline: the outcome must not wait for the link.
    let hole = Duration::from_secs(120);
    to_b.hold(hole);
    to_a.hold(hole);
    let t = Instant::now();
    // Silence limit, the deadline, a connect attempt, slack for a loaded machine.
    let bound = SILENCE_LIMIT + Duration::from_secs(DEADLINE + 25);
    let src = wait_end(&ca, &mig, bound).await;
    let src_at = t.elapsed();
    let dst = wait_end(&cb, &mig, bound.saturating_sub(t.elapsed())).await;
    eprintln!(
        "black hole in pre-copy: source ended {:?} after {src_at:?} ({}), destination {:?} after {:?}",
        src.state,
        src.error.clone().unwrap_or_default(),
        dst.state,
        t.elapsed()
    );
    assert_eq!(src.state, MigrationPhase::RolledBack, "{src:?}");
    assert_eq!(dst.state, MigrationPhase::RolledBack, "{dst:?}");
    assert!(cb.vm(&vm).await.is_err(), "host-b lists the VM");
    assert_runs(&ca, &vm, 1).await;
    let copies = running_copies(&[&bed[0].data_dir, &bed[1].data_dir], &vm).await;
    assert_eq!(copies.len(), 1, "running copies: {copies:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents and a black hole"]
async fn a_black_hole_within_the_deadline_in_precopy_is_resumed() {
    const DEADLINE: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let (bed, to_b, to_a) = pair_via_emulator(dir.path(), 1 << 20, DEADLINE).await;
    let a = AgentProc::start(&bed[0], None);
    let b = AgentProc::start(&bed[1], None);
    let (ca, cb) = (a.client(), b.client());
    let (vm, mig) = early_precopy(&ca).await;
    let before = to_b.connections();
    let hole = Duration::from_secs(8);
    to_b.hold(hole);
    to_a.hold(hole);
    let done = wait_end(&ca, &mig, Duration::from_secs(180)).await;
    assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
    assert_eq!(
        wait_end(&cb, &mig, Duration::from_secs(30)).await.state,
        MigrationPhase::Committed
    );
    assert!(
        to_b.connections() > before,
        "the silent streams were not resumed"
    );
    assert_runs(&cb, &vm, 2).await;
    let copies = running_copies(&[&bed[0].data_dir, &bed[1].data_dir], &vm).await;
    assert_eq!(copies.len(), 1, "running copies: {copies:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: two agents, a post-copy that waits out its deadline"]
async fn a_stalled_postcopy_is_redirected_to_a_new_address_and_completes() {
    const DEADLINE: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let (bed, to_b, _to_a, b_addr) = pair_via_emulator_at(dir.path(), 1 << 20, DEADLINE).await;
    let a = AgentProc::start(&bed[0], None);
    let b = AgentProc::start(&bed[1], None);
    let (ca, cb) = (a.client(), b.client());
    // 8 MiB written behind a 1 MiB/s link: post-copy lasts seconds.
    let spec = tern_proto::GuestSpec {
        ws_pages: 2048,
        ..process_spec()
    };
    let vm = ca.create_vm(&spec).await.unwrap().id;
    assert_runs(&ca, &vm, 1).await;
    let m = ca
        .migrate(&vm, &mode_to("host-b", "postcopy"))
        .await
        .unwrap();
    let t = Instant::now();
    while ca.migration(&m.id).await.unwrap().state != MigrationPhase::Postcopy {
        assert!(t.elapsed() < Duration::from_secs(60), "never in post-copy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The route to host-b is gone for good.
    to_b.cut(Duration::from_secs(3600));
    tokio::time::sleep(SILENCE_LIMIT + Duration::from_secs(DEADLINE + 2)).await;
    // Past the deadline post-copy still waits, on both hosts.
    let src = ca.migration(&m.id).await.unwrap();
    assert_eq!(src.state, MigrationPhase::Postcopy, "{src:?}");
    let dst = cb.migration(&m.id).await.unwrap();
    assert_eq!(dst.state, MigrationPhase::Postcopy, "{dst:?}");
    assert!(dst.progress.pages_remaining > 0, "{dst:?}");
    // An operator gives host-b's new address.
    let new_route = tern_testkit::LinkEmulator::start(b_addr, link(1 << 20))
        .await
        .unwrap();
    let v = ca
        .redirect_migration(&m.id, new_route.addr())
        .await
        .unwrap();
    assert_eq!(v.state, MigrationPhase::Postcopy);
    let src = wait_end(&ca, &m.id, Duration::from_secs(90)).await;
    let dst = wait_end(&cb, &m.id, Duration::from_secs(30)).await;
    eprintln!(
        "stalled post-copy redirected: source {:?}, destination {:?}, {} connections on the new route, {:.1} s in all",
        src.state,
        dst.state,
        new_route.connections(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(src.state, MigrationPhase::Committed, "{src:?}");
    assert!(src.error.is_none(), "{src:?}");
    assert_eq!(dst.state, MigrationPhase::Committed, "{dst:?}");
    assert!(new_route.connections() >= 1);
    assert_runs(&cb, &vm, 2).await;
    let copies = running_copies(&[&bed[0].data_dir, &bed[1].data_dir], &vm).await;
    assert_eq!(copies.len(), 1, "running copies: {copies:?}");
    // Nothing to redirect once it ended.
    assert!(ca
        .redirect_migration(&m.id, new_route.addr())
        .await
        .is_err());
}
