//! Live-migration benchmark: two `tern agent` processes on loopback with
//! mutual TLS; each guest in its own process, which runs its migration. For each mode it migrates (1) a 1 GiB process-memory workload
//! dirtying 100 MiB/s of a 256 MiB working set (written at start, so warm;
//! the other three quarters never written, as in most processes),
//! (2) the same workload idle, and (3) tern-vmm's test guest at its own pace,
//! and prints downtime, total time and bytes on the wire as a table, the
//! CPU time the two guest processes spent on it, and
//! the ETA the source agent gave at 25 % of each run's bytes against the
//! time really left (the agents keep an ETA history, so later runs use the
//! earlier ones).
//!
//! `cargo bench -p tern --bench migration` (needs /dev/kvm for the test guest;
//! `TERN_BENCH_MIB` changes the 1 GiB; `TERN_BENCH_ROUNDS=1` prints every
//! pre-copy round; `TERN_BENCH_RUNS=N` migrates each row N times, in turn,
//! and adds each row's median; `TERN_BENCH_KEEP=1` keeps the agents' data
//! dirs, with each guest process's log; `TERN_BENCH_COMPRESS=none|lz4|zstd`
//! fixes the compression, which is `auto` otherwise;
//! `TERN_BENCH_WORKLOADS=busy,idle,guest` picks the rows;
//! `TERN_BENCH_MODES=precopy,postcopy,hybrid` the modes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::{MigrateRequest, MigrationPhase};
use tern_proto::{GuestKind, GuestSpec};
use tern_testbed::{self as testbed, AgentProcess, HostPlan};

struct Row {
    workload: String,
    mode: String,
    downtime_ms: f64,
    /// What the engine predicted when it chose to switch over (pre-copy).
    predicted_ms: Option<f64>,
    total_ms: f64,
    wire_mb: f64,
    ram_mb: f64,
    rounds: usize,
    faults: u64,
    steps: tern_agent::SwitchoverTimes,
    /// Peak resident memory of the source guest's process (VmHWM), MB.
    source_peak_mb: f64,
    /// Its VmHWM when the migration began (the guest at rest), MB.
    source_rest_mb: f64,
    /// The ETA the source agent gave at 25 % of the bytes, and the time
    /// that was really left then, seconds.
    eta: Option<(f64, f64)>,
    /// CPU seconds the source and the destination guest processes spent
    /// on the migration (every thread but the workload's dirtier).
    cpu: Option<(f64, f64)>,
}

/// CPU nanoseconds each of a process's threads has run, but for its
/// workload's `dirtier` (the guest itself): the scheduler's own count
/// (`/proc/PID/task/TID/schedstat`), not 10 ms ticks.
fn thread_cpu_ns(pid: i32) -> Option<HashMap<String, u64>> {
    let mut by_thread = HashMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "dirtier" {
            continue;
        }
        let st = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let ns = st
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        by_thread.insert(t.file_name().to_string_lossy().into_owned(), ns);
    }
    Some(by_thread)
}

/// CPU seconds run between two readings of [`thread_cpu_ns`], thread by
/// thread: a thread that ended meanwhile (an idle runtime thread) must
/// not take its earlier time out of the sum, as a plain difference of
/// totals would (it once gave a negative figure). What such a thread ran
/// within the window is not counted.
fn cpu_between(before: &HashMap<String, u64>, after: &HashMap<String, u64>) -> f64 {
    after
        .iter()
        .map(|(t, &ns)| ns.saturating_sub(before.get(t).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

/// The first ETA given once a quarter of the migration's `wire` bytes
/// went out, and the time really left then (until `ended`, when the
/// agent said it ended).
fn eta_at_quarter(seen: &[(Instant, u64, f64)], wire: u64, ended: Instant) -> Option<(f64, f64)> {
    seen.iter()
        .find(|&&(_, w, eta)| w >= wire / 4 && eta > 0.0)
        .map(|&(t, _, eta)| (eta, ended.duration_since(t).as_secs_f64()))
}

/// Follows a process's peak resident memory (VmHWM) until it exits or
/// `stop` is set; returns the first reading and the peak.
fn peak_rss(
    pid: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut first = None;
        let mut peak = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                break;
            };
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                first.get_or_insert(kb << 10);
                peak = peak.max(kb << 10);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (first.unwrap_or(0), peak)
    })
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lo: IpAddr = [127, 0, 0, 1].into();
    let bed = testbed::write(
        dir.path(),
        &[
            HostPlan::new("host-a", lo).unwrap(),
            HostPlan::new("host-b", lo).unwrap(),
        ],
    )
    .unwrap();
    let mib: u64 = std::env::var("TERN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    // Agents admit guests up to 4 GiB by default: make room for bigger ones.
    for h in &bed {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        let room = format!("max_memory_mib = {}", (mib + 256).max(4096));
        assert!(cfg.contains("max_memory_mib = 4096"), "{cfg}");
        std::fs::write(&h.config, cfg.replace("max_memory_mib = 4096", &room)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_tern"));
    let a = AgentProcess::start(bin, &bed[0], None).unwrap();
    let b = AgentProcess::start(bin, &bed[1], None).unwrap();
    let (ca, cb) = (a.client().unwrap(), b.client().unwrap());
    let busy = GuestSpec {
        kind: GuestKind::Process,
        memory_mib: mib,
        ws_pages: (mib / 4).max(1) * 256, // a quarter of RAM
        dirty_mib_per_sec: 100,
        ..Default::default()
    };
    let idle = GuestSpec {
        dirty_mib_per_sec: 0,
        ..busy.clone()
    };
    let mut workloads = vec![
        (
            format!("process {mib} MiB, 100 MiB/s over {} MiB", mib / 4),
            busy,
        ),
        (format!("process {mib} MiB, idle"), idle),
    ];
    if Path::new("/dev/kvm").exists() {
        workloads.push((
            "tern-vmm test guest 256 MiB, 8 MiB working set".into(),
            GuestSpec {
                memory_mib: 256,
                ws_pages: 2048,
                pages_per_tick: 16,
                ..Default::default()
            },
        ));
    } else {
        eprintln!("SKIPPED: the tern-vmm test-guest rows (no /dev/kvm)");
    }
    // `TERN_BENCH_WORKLOADS=busy,idle,guest` picks rows (all by default).
    if let Ok(only) = std::env::var("TERN_BENCH_WORKLOADS") {
        let keys: Vec<&str> = only.split(',').map(str::trim).collect();
        let mut i = 0;
        workloads.retain(|_| {
            i += 1;
            keys.contains(&["busy", "idle", "guest"][i - 1])
        });
    }
    let mut rows = Vec::new();
    rt.block_on(async {
        for (name, spec) in &workloads {
            let modes = std::env::var("TERN_BENCH_MODES")
                .unwrap_or_else(|_| "precopy,postcopy,hybrid".into());
            let runs: usize = std::env::var("TERN_BENCH_RUNS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let modes: Vec<String> = modes.split(',').map(|m| m.trim().to_string()).collect();
            for mode in (0..runs).flat_map(|_| modes.iter()) {
                let mode = mode.as_str();
                // Alternate direction so each run starts from a fresh VM on a.
                let vm = ca.create_vm(spec).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
                let src_pid = tern_agent::vmdir::VmDir::new(&bed[0].data_dir, &vm.id.to_string())
                    .live_pid()
                    .expect("the source guest's process");
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let sampler = peak_rss(src_pid, stop.clone());
                let src_cpu0 = thread_cpu_ns(src_pid);
                let m = ca
                    .migrate(
                        &vm.id,
                        &MigrateRequest {
                            to: tern_proto::HostId::new("host-b").unwrap(),
                            mode: mode.into(),
                            max_downtime_ms: Some(30),
                            bandwidth_mbps: None,
                            deadline_secs: None,
                            max_bandwidth_mbps: None,
                            auto_converge: None,
                            compress: std::env::var("TERN_BENCH_COMPRESS").ok(),
                            id: None,
                            reason: None,
                        },
                    )
                    .await
                    .unwrap();
                let t = Instant::now();
                // When, the bytes sent by then, and the ETA the agent gave.
                let mut seen: Vec<(Instant, u64, f64)> = Vec::new();
                let done = loop {
                    let v = ca.migration(&m.id).await.unwrap();
                    if v.state.is_final() {
                        break v;
                    }
                    let p = &v.progress;
                    seen.push((Instant::now(), p.wire_bytes, p.eta_seconds));
                    assert!(t.elapsed() < Duration::from_secs(300), "stuck: {v:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                let ended = Instant::now();
                assert_eq!(done.state, MigrationPhase::Committed, "{done:?}");
                // The source's process lingers 2 s after the commit; the
                // destination's was started for this migration, in a
                // directory named for it until the agent adopts it.
                let dst_pid = [format!("{}.{}", vm.id, m.id), vm.id.to_string()]
                    .iter()
                    .find_map(|d| tern_agent::vmdir::VmDir::new(&bed[1].data_dir, d).live_pid());
                let cpu = src_cpu0
                    .zip(thread_cpu_ns(src_pid))
                    .zip(dst_pid.and_then(thread_cpu_ns))
                    // The destination's process was started for this migration.
                    .map(|((s0, s1), d)| {
                        (cpu_between(&s0, &s1), d.values().sum::<u64>() as f64 / 1e9)
                    });
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let (rest, peak) = sampler.join().unwrap();
                let (source_rest_mb, source_peak_mb) = (rest as f64 / 1e6, peak as f64 / 1e6);
                let r = done.report.unwrap();
                let eta = eta_at_quarter(&seen, r.wire_bytes, ended);
                if std::env::var_os("TERN_BENCH_ROUNDS").is_some() {
                    for x in &r.rounds {
                        eprintln!("{name} {mode}: {x:?}");
                    }
                }
                rows.push(Row {
                    workload: name.clone(),
                    mode: mode.to_string(),
                    downtime_ms: r.downtime_ms,
                    predicted_ms: r.rounds.last().map(|x| x.predicted_downtime_ms),
                    total_ms: r.total_ms,
                    wire_mb: r.wire_bytes as f64 / 1e6,
                    ram_mb: r.memory_bytes as f64 / 1e6,
                    rounds: r.rounds.len(),
                    faults: r.faults_served,
                    steps: r.switchover.clone(),
                    source_peak_mb,
                    source_rest_mb,
                    eta,
                    cpu,
                });
                cb.stop_vm(&vm.id).await.unwrap();
            }
        }
    });
    println!("\nlive migration between two agent processes, loopback, mutual TLS (working sets warm; process memory outside them never written)");
    println!(
        "{:<48} {:<9} {:>12} {:>10} {:>10} {:>10} {:>9} {:>6} {:>7}",
        "workload",
        "mode",
        "downtime ms",
        "predicted",
        "total ms",
        "wire MB",
        "wire/RAM",
        "rounds",
        "faults"
    );
    for r in &rows {
        println!(
            "{:<48} {:<9} {:>12.1} {:>10} {:>10.1} {:>10.1} {:>9.3} {:>6} {:>7}",
            r.workload,
            r.mode,
            r.downtime_ms,
            r.predicted_ms.map_or("-".into(), |p| format!("{p:.1}")),
            r.total_ms,
            r.wire_mb,
            r.wire_mb / r.ram_mb,
            r.rounds,
            r.faults
        );
    }
    print_medians(&rows);
    print_etas(&rows);
    if let Ok(h) = std::fs::read_to_string(bed[0].data_dir.join("eta-history.json")) {
        println!("the source agent's ETA history (truth ÷ estimate, per destination/mode): {h}");
    }
    if std::env::var_os("TERN_BENCH_KEEP").is_some() {
        // The guests' own logs (vms/<id>/guest.log under each data dir).
        eprintln!("kept the agents' data dirs in {}", dir.keep().display());
    }
    println!("\npeak resident memory of the source guest's process during the migration (VmHWM; at rest: when it began)");
    for r in &rows {
        println!(
            "{:<48} {:<9} {:>8.1} MB  ({:.3} x guest RAM; at rest {:.1} MB, the migration added {:.1} MB)",
            r.workload,
            r.mode,
            r.source_peak_mb,
            r.source_peak_mb / r.ram_mb,
            r.source_rest_mb,
            r.source_peak_mb - r.source_rest_mb
        );
    }
    println!("\nCPU the migration cost (the guest processes' threads but the workload's; the destination's since it started)");
    for r in &rows {
        if let Some((src, dst)) = r.cpu {
            println!(
                "{:<48} {:<9} source {:>5.0} ms  destination {:>5.0} ms  together {:>5.0} ms ({:.2} ms per MB on the wire)",
                r.workload,
                r.mode,
                src * 1e3,
                dst * 1e3,
                (src + dst) * 1e3,
                (src + dst) * 1e3 / r.wire_mb
            );
        }
    }
    println!("\nwhere the downtime went, ms: pause + final scan | last pages, state, manifest (of it: pages, state) | until Ready | Commit -> Running || the source's commit record (written before the pause, not in the downtime)");
    for r in &rows {
        let s = &r.steps;
        println!(
            "{:<48} {:<9} {:>6.1} | {:>6.1} ({:>4.1}, {:>4.1}) | {:>6.1} | {:>6.1} || {:>6.1}",
            r.workload,
            r.mode,
            s.pause_ms,
            s.send_ms,
            s.last_pages_ms,
            s.device_state_ms,
            s.ready_ms,
            s.running_ms,
            s.commit_record_ms
        );
    }
}

/// With `TERN_BENCH_RUNS` > 1: each row's median downtime and total time,
/// with the spread of its runs (this machine's run-to-run spread is wide).
fn print_medians(rows: &[Row]) {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.workload.as_str(), r.mode.as_str())) {
            keys.push((&r.workload, &r.mode));
        }
    }
    if keys.len() == rows.len() {
        return;
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1], v.len())
    };
    println!("\nmedians (min-max) over the runs, ms");
    println!(
        "{:<48} {:<9} {:>24} {:>28}",
        "workload", "mode", "downtime", "total"
    );
    for (w, m) in keys {
        let of = |f: fn(&Row) -> f64| {
            stats(
                rows.iter()
                    .filter(|r| r.workload == w && r.mode == m)
                    .map(f)
                    .collect(),
            )
        };
        let (d, dl, dh, n) = of(|r| r.downtime_ms);
        let (t, tl, th, _) = of(|r| r.total_ms);
        println!(
            "{:<48} {:<9} {:>9.1} ({:>5.1}-{:>5.1}) {:>10.0} ({:>6.0}-{:>6.0})  {n} runs",
            w, m, d, dl, dh, t, tl, th
        );
    }
}

/// The ETA at a quarter of each run's bytes against the time really left,
/// run by run (each later run of a mode has the earlier ones as history),
/// and how many landed within ±25 %.
fn print_etas(rows: &[Row]) {
    println!("\nETA at 25 % of the bytes on the wire vs the time really left (the agents' history grows run by run)");
    println!(
        "{:<48} {:<9} {:>8} {:>8} {:>8}",
        "workload", "mode", "ETA s", "left s", "error"
    );
    let (mut within, mut all) = (0, 0);
    for r in rows {
        let Some((eta, left)) = r.eta else {
            println!("{:<48} {:<9} {:>8}", r.workload, r.mode, "-");
            continue;
        };
        let err = (eta - left) / left;
        all += 1;
        if err.abs() <= 0.25 {
            within += 1;
        }
        println!(
            "{:<48} {:<9} {:>8.3} {:>8.3} {:>+7.0}%",
            r.workload,
            r.mode,
            eta,
            left,
            err * 100.0
        );
    }
    println!("ETA within ±25 % of the time left: {within} of {all} runs");
}
