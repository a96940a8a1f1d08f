//! tern-vmm figures on this host's KVM, with the test guest:
//!
//! - launch → monitor started → guest ready, through a real `tern-vmm`
//!   process (what the kvm driver does), median of N;
//! - pause handshake and full state save (in process, µs);
//! - restore → running, in process (verified and trusted) and in a new
//!   process;
//! - dirty-log sync of 1 GiB of guest RAM (µs).
//!
//! Run: `cargo bench -p tern-drivers --bench vmm` (TERN_BENCH_N sets N).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_vmm::snapshot::{self, RestoreOptions};
use tern_vmm::{MachineConfig, SnapshotKind, TestGuestConfig, WaitOutcome, TEST_GUEST_ELF};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn p90(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn boot(memory_mib: u64, vcpus: u8) -> tern_vmm::Machine {
    let m = tern_vmm::boot_test_guest(
        MachineConfig {
            memory_mib,
            vcpus,
            ..Default::default()
        },
        &TestGuestConfig::default(),
        Path::new(TEST_GUEST_ELF),
    )
    .unwrap();
    m.resume().unwrap();
    let out = m.wait_until(Duration::from_secs(60), |d| d.agent.counter >= 5);
    assert_eq!(out, WaitOutcome::Satisfied);
    m
}

/// Spawns a monitor and returns (ms to `started`, ms to `ready`), then stops it.
fn launch(args: &[&str], dir: &Path, ready: bool) -> (f64, f64) {
    let sock = dir.join("bench.sock");
    let t0 = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern-vmm"))
        .arg("--control")
        .arg(&sock)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut started = f64::NAN;
    let mut ready_ms = f64::NAN;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("\"started\"") {
            started = t0.elapsed().as_secs_f64() * 1e3;
            if !ready {
                break;
            }
        } else if line.contains("\"ready\"") {
            ready_ms = t0.elapsed().as_secs_f64() * 1e3;
            break;
        }
    }
    let mut c = tern_vmm::control::Client::connect(&sock, Duration::from_secs(10)).unwrap();
    let _ = c.call(&tern_vmm::control::Request::Stop);
    let _ = child.wait();
    (started, ready_ms)
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: /dev/kvm is not available");
        return;
    }
    let n: usize = std::env::var("TERN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let tmp = tempfile::tempdir().unwrap();
    println!("tern-vmm benchmark on this host's KVM (PVM: guest ring 0 is emulated), N = {n}");

    // 1. Launch through a real monitor process.
    let (mut st, mut rd) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (s, r) = launch(&["--memory", "256", "--vcpus", "1"], tmp.path(), true);
        st.push(s);
        rd.push(r);
    }
    println!(
        "launch -> monitor started (VM, 256 MiB RAM, vCPU, devices, control socket): median {:.2} ms, p90 {:.2} ms",
        median(st.clone()),
        p90(st)
    );
    println!(
        "launch -> guest ready line:                                              median {:.2} ms, p90 {:.2} ms",
        median(rd.clone()),
        p90(rd)
    );

    // 2. Pause and save, in process.
    for vcpus in [1u8, 2] {
        let m = boot(256, vcpus);
        let (mut pause, mut save, mut total) = (Vec::new(), Vec::new(), Vec::new());
        let mut bytes = 0;
        for _ in 0..n.max(20) {
            let t = Instant::now();
            let p = m.pause().unwrap();
            let t1 = Instant::now();
            let s = m.save_state().unwrap();
            let saved = t1.elapsed();
            let encoded = serde_json::to_vec(&s).unwrap();
            total.push(t.elapsed().as_secs_f64() * 1e6);
            bytes = encoded.len();
            pause.push(p.as_secs_f64() * 1e6);
            save.push(saved.as_secs_f64() * 1e6);
            m.resume().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        println!(
            "pause + full state save, {vcpus} vCPU(s): median {:.0} µs (pause handshake {:.0} µs, state {:.0} µs; encoded state {} KiB)",
            median(total),
            median(pause),
            median(save),
            bytes / 1024
        );
    }

    // 3. Restore.
    let snap = tmp.path().join("snap");
    {
        let mut m = boot(256, 1);
        let info = m.snapshot(&snap, SnapshotKind::Full).unwrap();
        println!(
            "full snapshot of 256 MiB: {:.1} ms guest downtime ({} non-zero pages written)",
            info.downtime_us as f64 / 1e3,
            info.pages
        );
        m.stop("bench");
    }
    for verify in [false, true] {
        let mut times = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let m = snapshot::restore(
                std::slice::from_ref(&snap),
                RestoreOptions {
                    verify_memory: verify,
                    ..Default::default()
                },
            )
            .unwrap();
            m.resume().unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            let c0 = m.with_devices(|d| d.agent.counter);
            let out = m.wait_until(Duration::from_secs(30), |d| d.agent.counter > c0);
            assert_eq!(out, WaitOutcome::Satisfied);
        }
        println!(
            "restore -> running, in process, 256 MiB, memory checksum {}: median {:.2} ms, p90 {:.2} ms",
            if verify { "verified" } else { "trusted " },
            median(times.clone()),
            p90(times)
        );
    }
    let snap_arg = snap.display().to_string();
    let mut times = Vec::new();
    for _ in 0..n {
        times.push(launch(&["--no-verify", "--restore", &snap_arg], tmp.path(), false).0);
    }
    println!(
        "restore -> running, new monitor process, 256 MiB (trusted): median {:.2} ms, p90 {:.2} ms",
        median(times.clone()),
        p90(times)
    );

    // 4. Dirty log sync over 1 GiB.
    let mut m = boot(1024, 1);
    m.start_dirty_log().unwrap();
    m.sync_dirty_log().unwrap();
    let mut times = Vec::new();
    let mut pages = 0;
    for _ in 0..n.max(20) {
        std::thread::sleep(Duration::from_millis(2));
        let t = Instant::now();
        let b = m.sync_dirty_log().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        pages = b.count();
    }
    println!(
        "dirty-log sync, 1 GiB guest RAM (KVM log + monitor bitmap, guest running): median {:.0} µs, p90 {:.0} µs (last sync: {pages} pages)",
        median(times.clone()),
        p90(times)
    );
}
