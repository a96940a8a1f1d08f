//! tern-vmm on this host's real KVM with the test guest: boot, vCPU threads,
//! pause/resume, dirty log, state save/restore, snapshots (full and
//! incremental) and refusal of malformed snapshot files.
//!
//! Restoring in a *new process* is tested with the monitor binary in
//! `tern-drivers` (tests/kvm.rs); here a restore builds a new machine (new
//! VM, new vCPUs, new memory) in the same process.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_vmm::snapshot::{self, RestoreOptions, MEMORY_FILE, STATE_FILE};
use tern_vmm::{
    Machine, MachineConfig, RunState, SnapshotKind, TestGuestConfig, WaitOutcome, TEST_GUEST_ELF,
    WORKING_SET_ADDR,
};

const WAIT: Duration = Duration::from_secs(60);

use tern_vmm::testing::kvm_or_skip as kvm_available;

fn boot(vcpus: u8, guest: &TestGuestConfig) -> Machine {
    let m = tern_vmm::boot_test_guest(
        MachineConfig {
            memory_mib: 64,
            vcpus,
            ..Default::default()
        },
        guest,
        Path::new(TEST_GUEST_ELF),
    )
    .unwrap();
    m.resume().unwrap();
    m
}

fn counter(m: &Machine) -> u64 {
    m.with_devices(|d| d.agent.counter)
}

fn wait_counter(m: &Machine, at_least: u64) {
    let out = m.wait_until(WAIT, |d| d.agent.counter >= at_least);
    assert_eq!(
        out,
        WaitOutcome::Satisfied,
        "waiting for counter {at_least}"
    );
}

fn ws_hash(m: &Machine, g: &TestGuestConfig) -> blake3::Hash {
    let mut buf = vec![0u8; (g.ws_pages * 4096) as usize];
    m.read_memory(WORKING_SET_ADDR, &mut buf).unwrap();
    blake3::hash(&buf)
}

/// Waits for the next checksum report after `after` and checks it against the model.
fn check_next_checksum(m: &Machine, g: &TestGuestConfig, after: u64) -> u64 {
    let out = m.wait_until(WAIT, |d| d.agent.checksum.is_some_and(|(at, _)| at > after));
    assert_eq!(out, WaitOutcome::Satisfied);
    let (at, sum) = m.with_devices(|d| d.agent.checksum).unwrap();
    assert_eq!(
        sum,
        g.expected_checksum(at),
        "guest checksum at counter {at}"
    );
    at
}

#[test]
fn boots_to_ready_and_counts() {
    if !kvm_available() {
        return;
    }
    let g = TestGuestConfig::default();
    let m = boot(1, &g);
    wait_counter(&m, 40);
    assert!(m.with_devices(|d| d.console().text().contains(tern_vmm::TEST_GUEST_READY)));
    check_next_checksum(&m, &g, 0);
}

#[test]
fn two_vcpus_pause_and_resume() {
    if !kvm_available() {
        return;
    }
    let m = boot(2, &TestGuestConfig::default());
    wait_counter(&m, 5);
    let took = m.pause().unwrap();
    assert_eq!(m.run_state(), RunState::Paused);
    let c = counter(&m);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&m), c, "a paused guest must not run");
    eprintln!("pause handshake with 2 vCPUs (one waiting for SIPI): {took:?}");
    m.resume().unwrap();
    wait_counter(&m, c + 5);
    // Both vCPUs' state can be read while paused.
    m.pause().unwrap();
    let st = m.save_state().unwrap();
    assert!(st.sections.contains_key("vcpu.0") && st.sections.contains_key("vcpu.1"));
    assert!(m.save_state().is_ok());
    m.resume().unwrap();
    assert!(m.save_state().is_err(), "state is read only while paused");
}

#[test]
fn dirty_log_counts_the_pages_the_guest_writes() {
    if !kvm_available() {
        return;
    }
    let g = TestGuestConfig {
        ws_pages: 2048,
        pages_per_tick: 8,
        ticks_per_sum: 0,
        exit_after: 0,
    };
    let mut m = boot(1, &g);
    wait_counter(&m, 2);
    m.start_dirty_log().unwrap();
    for round in 0..3 {
        m.pause().unwrap();
        m.sync_dirty_log().unwrap();
        let c0 = counter(&m);
        m.resume().unwrap();
        wait_counter(&m, c0 + 4);
        m.pause().unwrap();
        let ticks = counter(&m) - c0;
        let b = m.sync_dirty_log().unwrap();
        let first = WORKING_SET_ADDR / 4096;
        let ws = (first..first + g.ws_pages)
            .filter(|&p| b.contains(p))
            .count() as u64;
        let expected = ticks * g.pages_per_tick;
        eprintln!(
            "round {round}: {ticks} ticks of {} pages -> {ws} working-set pages dirty ({} in all)",
            g.pages_per_tick,
            b.count()
        );
        // Exact up to the ticks under way at either pause: the one at the
        // first pause had written some of its pages already (cleared by the
        // sync), the one at the second pause some of its own.
        let k = g.pages_per_tick;
        assert!(
            (expected.saturating_sub(k)..=expected + k).contains(&ws),
            "{ws} dirty, expected {expected} ± {k} (a tick in flight at each pause)"
        );
        m.resume().unwrap();
    }
    // Pages the monitor writes land in the same bitmap.
    m.pause().unwrap();
    m.sync_dirty_log().unwrap();
    use vm_memory::Bytes;
    m.memory()
        .write_obj(1u64, vm_memory::GuestAddress(0x300_0000))
        .unwrap();
    assert!(m.sync_dirty_log().unwrap().contains(0x3000));
}

#[test]
fn i8042_reset_ends_the_machine() {
    if !kvm_available() {
        return;
    }
    let m = boot(
        1,
        &TestGuestConfig {
            exit_after: 10,
            ..Default::default()
        },
    );
    let out = m.wait_until(WAIT, |_| false);
    match out {
        WaitOutcome::Exited(r) => assert!(r.contains("i8042"), "{r}"),
        other => panic!("expected an exit, got {other:?}"),
    }
    assert!(matches!(m.run_state(), RunState::Exited(_)));
    assert!(m.pause().is_err());
}

fn snap_guest() -> TestGuestConfig {
    // Pages are rewritten every 64 ticks and summed every 16, so the first
    // checksum after a restore covers pages written before the snapshot.
    TestGuestConfig {
        ws_pages: 256,
        pages_per_tick: 4,
        ticks_per_sum: 16,
        exit_after: 0,
    }
}

#[test]
fn full_snapshot_restores_into_a_new_machine_and_carries_on() {
    if !kvm_available() {
        return;
    }
    let g = snap_guest();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("full");
    let mut m = boot(1, &g);
    wait_counter(&m, 40);
    m.pause().unwrap();
    let info = m.snapshot(&snap, SnapshotKind::Full).unwrap();
    eprintln!("full snapshot: {info:?}");
    let (hash, at) = (ws_hash(&m, &g), counter(&m));
    m.stop("replaced by its snapshot");
    drop(m);

    let r = snapshot::restore(std::slice::from_ref(&snap), RestoreOptions::default()).unwrap();
    assert_eq!(r.run_state(), RunState::Paused);
    assert_eq!(counter(&r), at, "the restored agent state");
    assert_eq!(ws_hash(&r, &g), hash, "the working set as snapshotted");
    r.resume().unwrap();
    wait_counter(&r, at + 20);
    check_next_checksum(&r, &g, at);
}

#[test]
fn incremental_snapshot_restores_from_the_pair() {
    if !kvm_available() {
        return;
    }
    let g = snap_guest();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut m = boot(1, &g);
    wait_counter(&m, 30);
    let full = m.snapshot(&a, SnapshotKind::Full).unwrap();
    let c = counter(&m);
    wait_counter(&m, c + 30);
    // Paused first, so nothing runs between the snapshot and the readings
    // below (a snapshot of a running machine resumes it at once).
    m.pause().unwrap();
    let inc = m.snapshot(&b, SnapshotKind::Incremental).unwrap();
    let hash_at_b = ws_hash(&m, &g);
    let counter_at_b = counter(&m);
    m.stop("replaced by its snapshot");
    eprintln!("full: {full:?}\nincremental: {inc:?}");
    assert!(
        inc.file_bytes * 20 < full.file_bytes,
        "an incremental snapshot holds only what changed"
    );
    // `c` was read after the full snapshot resumed the guest, so tick c + 1
    // may have written some of its pages before it: ticks c + 2 ..= c + 30
    // are wholly after, 29 ticks of distinct pages (116 < 256, no wrap).
    assert!(
        inc.pages >= 29 * g.pages_per_tick,
        "{} pages in the incremental snapshot, expected at least {}",
        inc.pages,
        29 * g.pages_per_tick
    );

    let r = snapshot::restore(&[a.clone(), b.clone()], RestoreOptions::default()).unwrap();
    assert_eq!(counter(&r), counter_at_b);
    assert_eq!(
        ws_hash(&r, &g),
        hash_at_b,
        "working set as it was at the second snapshot"
    );
    r.resume().unwrap();
    check_next_checksum(&r, &g, counter_at_b);
    drop(r);

    // An incremental alone, or a chain out of order, is refused.
    let err = snapshot::restore(std::slice::from_ref(&b), RestoreOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("must be full"), "{err}");
    let err = snapshot::restore(&[b.clone(), a.clone()], RestoreOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("must be full"), "{err}");
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn refused(dir: &Path, verify: bool) -> String {
    match snapshot::restore(
        &[dir.to_path_buf()],
        RestoreOptions {
            verify_memory: verify,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("{} was loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_snapshots_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let mut m = boot(1, &TestGuestConfig::default());
    wait_counter(&m, 5);
    m.snapshot(&good, SnapshotKind::Full).unwrap();
    m.stop("done");
    let case = |name: &str, damage: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.path().join(name);
        copy_snapshot(&good, &d);
        damage(&d);
        d
    };
    let state = |d: &Path| d.join(STATE_FILE);
    let memf = |d: &Path| d.join(MEMORY_FILE);

    let d = case("truncated", &|d| {
        let b = std::fs::read(state(d)).unwrap();
        std::fs::write(state(d), &b[..b.len() / 2]).unwrap();
    });
    let e = refused(&d, true);
    assert!(e.contains("truncated"), "{e}");

    let d = case("short-header", &|d| {
        std::fs::write(state(d), b"TERNSNAP").unwrap()
    });
    let e = refused(&d, true);
    assert!(e.contains("truncated"), "{e}");

    let d = case("version", &|d| {
        let mut b = std::fs::read(state(d)).unwrap();
        b[8] = 99;
        std::fs::write(state(d), &b).unwrap();
    });
    let e = refused(&d, true);
    assert!(e.contains("format version 99"), "{e}");

    let d = case("magic", &|d| {
        let mut b = std::fs::read(state(d)).unwrap();
        b[0] = b'X';
        std::fs::write(state(d), &b).unwrap();
    });
    let e = refused(&d, true);
    assert!(e.contains("bad magic"), "{e}");

    let d = case("flipped-state", &|d| {
        let mut b = std::fs::read(state(d)).unwrap();
        let i = b.len() - 100;
        b[i] ^= 0x01;
        std::fs::write(state(d), &b).unwrap();
    });
    let e = refused(&d, true);
    assert!(e.contains("checksum mismatch"), "{e}");

    let d = case("flipped-memory", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(memf(d))
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x5a], WORKING_SET_ADDR + 8).unwrap();
    });
    let e = refused(&d, true);
    assert!(e.contains("memory checksum mismatch"), "{e}");

    let d = case("memory-size", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(memf(d))
            .unwrap();
        f.set_len(32 << 20).unwrap();
    });
    // Refused even without the checksum pass: the size is checked first.
    let e = refused(&d, false);
    assert!(e.contains("memory file holds"), "{e}");

    let d = case("missing-memory", &|d| {
        std::fs::remove_file(memf(d)).unwrap()
    });
    let e = refused(&d, true);
    assert!(e.contains("memory.tern"), "{e}");

    // The good one still loads.
    let r = snapshot::restore(&[good], RestoreOptions::default()).unwrap();
    assert_eq!(r.run_state(), RunState::Paused);
}

#[test]
fn state_survives_a_round_trip_through_a_new_machine() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("s");
    let mut m = boot(2, &TestGuestConfig::default());
    wait_counter(&m, 5);
    m.pause().unwrap();
    m.snapshot(&snap, SnapshotKind::Full).unwrap();
    let saved = m.save_state().unwrap();
    m.stop("done");
    let r = snapshot::restore(&[snap], RestoreOptions::default()).unwrap();
    let again = r.save_state().unwrap();
    // Every vCPU register, the interrupt controllers and the devices come
    // back exactly (the clock moves on, so compare all but it).
    for name in ["vcpu.0", "vcpu.1"] {
        let (a, b): (tern_vmm::state::VcpuState, tern_vmm::state::VcpuState) =
            (saved.get(name).unwrap(), again.get(name).unwrap());
        assert_eq!(a.regs, b.regs, "{name} regs");
        assert_eq!(a.sregs, b.sregs, "{name} sregs");
        assert_eq!(a.fpu, b.fpu, "{name} fpu");
        assert_eq!(a.xcrs, b.xcrs, "{name} xcrs");
        assert_eq!(a.lapic.len(), b.lapic.len());
        assert_eq!(a.mp_state, b.mp_state, "{name} mp state");
        assert_eq!(a.events, b.events, "{name} events");
    }
    let (a, b): (tern_vmm::state::VmState, tern_vmm::state::VmState) =
        (saved.get("vm").unwrap(), again.get("vm").unwrap());
    assert_eq!(a.pic_master, b.pic_master);
    assert_eq!(a.ioapic, b.ioapic);
    assert_eq!(
        saved.sections["device.serial"],
        again.sections["device.serial"]
    );
    assert_eq!(
        saved.sections["device.agent"],
        again.sections["device.agent"]
    );
}

/// Reserves `pages` 2 MiB huge pages if fewer are free; false if the host cannot.
fn reserve_hugepages(pages: u64) -> bool {
    let free = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    if free("free_hugepages").unwrap_or(0) >= pages {
        return true;
    }
    let total = free("nr_hugepages").unwrap_or(0);
    let _ = std::fs::write(
        "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
        (total + pages).to_string(),
    );
    free("free_hugepages").unwrap_or(0) >= pages
}

#[test]
fn huge_page_backed_guest_runs() {
    if !kvm_available() {
        return;
    }
    if !reserve_hugepages(32) {
        eprintln!("SKIPPED: cannot reserve 32 huge pages of 2 MiB on this host (not root?)");
        return;
    }
    let m = tern_vmm::boot_test_guest(
        MachineConfig {
            memory_mib: 64,
            hugepages: true,
            ..Default::default()
        },
        &TestGuestConfig::default(),
        Path::new(TEST_GUEST_ELF),
    )
    .unwrap();
    m.resume().unwrap();
    wait_counter(&m, 20);
    check_next_checksum(&m, &TestGuestConfig::default(), 0);
}
