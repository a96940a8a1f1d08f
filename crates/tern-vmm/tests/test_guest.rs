//! The test guest on real KVM: it boots to its ready line, its counter
//! advances, its checksum reports arrive, and the dirty log sees its writes.

use std::path::Path;
use std::time::Duration;
use tern_vmm::{RunOutcome, TestGuestConfig, Vm, TEST_GUEST_ELF};

fn kvm_available() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        true
    } else {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        false
    }
}

#[test]
fn boots_to_ready_and_counts() {
    if !kvm_available() {
        return;
    }
    let cfg = TestGuestConfig::default();
    let mut vm = Vm::boot_test_guest(&cfg, Path::new(TEST_GUEST_ELF)).unwrap();
    let out = vm
        .run_until(Duration::from_secs(20), |vm| {
            vm.agent.counter >= 40 && vm.agent.checksum.is_some()
        })
        .unwrap();
    assert_eq!(out, RunOutcome::Stopped, "console: {}", vm.console());
    assert!(
        vm.console().contains("tern-guest: ready"),
        "{}",
        vm.console()
    );
    assert!(vm.agent.reports >= 40);
}

#[test]
fn dirty_log_sees_the_pages_the_guest_writes() {
    if !kvm_available() {
        return;
    }
    let cfg = TestGuestConfig {
        ws_pages: 64,
        pages_per_tick: 8,
        ticks_per_sum: 0,
        ..Default::default()
    };
    let mut vm = Vm::boot_test_guest(&cfg, Path::new(TEST_GUEST_ELF)).unwrap();
    vm.start_dirty_log().unwrap();
    vm.run_until(Duration::from_secs(20), |vm| vm.agent.counter >= 2)
        .unwrap();
    vm.sync_dirty_log().unwrap(); // clear what boot dirtied
    let start = vm.agent.counter;
    // Run exactly 4 ticks: 32 working-set pages, round robin.
    vm.run_until(Duration::from_secs(20), |vm| vm.agent.counter >= start + 4)
        .unwrap();
    let (bitmap, n) = vm.sync_dirty_log().unwrap();
    let ws_first = (tern_vmm::WORKING_SET_ADDR / 4096) as usize;
    let ws_dirty = (ws_first..ws_first + 64)
        .filter(|p| bitmap[p / 64] & (1 << (p % 64)) != 0)
        .count();
    eprintln!("dirty after 4 ticks of 8 pages: {ws_dirty} working-set pages, {n} pages in all (stack and params included)");
    // 4 ticks x 8 pages, plus at most one tick in flight when we stopped.
    assert!((32..=40).contains(&ws_dirty), "{ws_dirty}");
}
