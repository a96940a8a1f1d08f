//! `tern-bench migrate-qemu`: tern against QEMU itself, on one Linux guest
//! and workload, alternating, on loopback and across an emulated WAN link.
//!
//! - **qemu**: QEMU's native migration over plain TCP, source QEMU straight
//!   to destination QEMU (through the link emulator, which only forwards on
//!   loopback and adds delay and a rate cap on the WAN).
//! - **tern**: two `tern agent` processes; QEMU's stream carried over mutual
//!   TLS, compressed with zstd on the WAN, with tern's commit and the guest's
//!   own check after switchover.
//!
//! With `--tern-guest process` the tern path moves a process guest of the
//! same shape instead (memory, working set, write rate) with tern's own
//! engine (compression `auto`): the side-by-side of tern's engine and
//! QEMU's. A TCG guest dirties memory slower than a process asked for the
//! same rate, so both guests' measured dirty rates are printed (QEMU's from
//! its `dirty-pages-rate`, tern's from its progress), each the highest seen.
//!
//! Downtime is the source's STOP event to the destination running (QEMU:
//! its RESUME event; tern: `Running` back at the source), wall clock.
//! Bytes are what crossed the link emulator towards the destination. CPU is
//! user+system time of the processes involved (QEMUs; for tern also both
//! agents and the guest processes) over the migration, sampled from /proc. A run whose guest fails
//! its own check after switchover counts as corrupted: a result, not a crash.

use anyhow::{bail, Context};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_agent::{MigrateRequest, MigrationPhase};
use tern_drivers::qemu::load::{last_complete_tick, verify_after_switchover, LoadParams};
use tern_drivers::qemu::{Launch, QemuConfig, QemuSpec, QemuVm};
use tern_proto::{GuestKind, GuestSpec};
use tern_testbed::{self as testbed, AgentProcess, HostPlan};
use tern_testkit::{LinkConfig, LinkEmulator};

/// `tern-bench migrate-qemu` options.
#[derive(clap::Args, Clone)]
pub struct QemuBenchArgs {
    /// Runs of each path per link (they alternate).
    #[arg(long, default_value_t = 2)]
    pub runs: u32,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Working set the guest rewrites, MiB.
    #[arg(long, default_value_t = 16)]
    pub ws_mib: u64,
    /// MiB/s the guest writes.
    #[arg(long, default_value_t = 2)]
    pub dirty_mib: u64,
    /// Downtime budget given to both, ms.
    #[arg(long, default_value_t = 300)]
    pub max_downtime: u64,
    /// WAN round trip, ms.
    #[arg(long, default_value_t = 20)]
    pub wan_rtt_ms: u64,
    /// WAN rate, Mbit/s.
    #[arg(long, default_value_t = 200)]
    pub wan_mbit: u64,
    /// Guest kernel (default: TERN_GUEST_KERNEL, else the one
    /// scripts/guest-kernel.sh fetched).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs with tern's workload (default: TERN_GUEST_INITRD, or
    /// the script's).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// What tern moves: the same Linux guest through its QEMU relay, or a
    /// process guest of the same shape through tern's own engine.
    #[arg(long, value_enum, default_value_t = TernGuest::Linux)]
    pub tern_guest: TernGuest,
    /// Throttle a guest that pre-copy cannot catch up with, on both paths
    /// (QEMU's `auto-converge`; tern's own).
    #[arg(long)]
    pub auto_converge: bool,
    /// The links to run on.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Link::Loopback, Link::Wan])]
    pub links: Vec<Link>,
    /// The paths to run (`qemu`: QEMU's own migration; `tern`).
    #[arg(long, value_delimiter = ',', default_values_t = ["qemu".to_string(), "tern".to_string()])]
    pub paths: Vec<String>,
}

/// The guest on tern's path.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum TernGuest {
    /// The same Linux guest under QEMU, through tern's relay.
    Linux,
    /// A process guest of the same shape, through tern's engine.
    Process,
}

/// A link between the two hosts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Link {
    /// Loopback through the link emulator (it only forwards).
    Loopback,
    /// `--wan-rtt-ms` and `--wan-mbit`.
    Wan,
}

struct Row {
    link: Link,
    path: &'static str,
    total_ms: f64,
    downtime_ms: f64,
    wire_mb: f64,
    cpu_s: f64,
    /// The highest dirty rate measured during the migration, MiB/s.
    dirty_mib_s: f64,
    verdict: String,
    ok: bool,
}

/// Pages per second as MiB/s.
fn mib_s(pages_per_sec: f64) -> f64 {
    pages_per_sec * 4096.0 / f64::from(1u32 << 20)
}

fn guest_files(a: &QemuBenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cache = Path::new("/var/cache/tern/guest");
    let kernel = a
        .kernel
        .clone()
        .or_else(|| std::env::var_os("TERN_GUEST_KERNEL").map(PathBuf::from))
        .or_else(|| {
            let mut k: Vec<PathBuf> = std::fs::read_dir(cache.join("root/boot"))
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("vmlinuz-"))
                .collect();
            k.sort();
            k.pop()
        })
        .context("no guest kernel: run scripts/guest-kernel.sh or pass --kernel")?;
    let initrd = a
        .initrd
        .clone()
        .or_else(|| std::env::var_os("TERN_GUEST_INITRD").map(PathBuf::from))
        .unwrap_or_else(|| cache.join("initramfs.cpio"));
    if !initrd.is_file() {
        bail!(
            "no initramfs at {}: run scripts/guest-kernel.sh",
            initrd.display()
        );
    }
    Ok((kernel, initrd))
}

/// user+system seconds of a process so far (None once it is gone).
fn cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Per-process CPU over a window: first and latest sample of each pid.
#[derive(Default)]
struct CpuMeter(std::collections::HashMap<i32, (f64, f64)>);

impl CpuMeter {
    fn sample(&mut self, pids: &[i32]) {
        for &p in pids {
            if let Some(c) = cpu_secs(p) {
                self.0.entry(p).or_insert((c, c)).1 = c;
            }
        }
    }
    fn total(&self) -> f64 {
        self.0.values().map(|(a, b)| b - a).sum()
    }
}

fn link_config(link: Link, a: &QemuBenchArgs) -> LinkConfig {
    match link {
        Link::Loopback => LinkConfig {
            one_way_delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bytes_per_sec: 0,
            queue_bytes: 4 << 20,
        },
        Link::Wan => LinkConfig {
            one_way_delay: Duration::from_millis(a.wan_rtt_ms / 2),
            jitter: Duration::ZERO,
            rate_bytes_per_sec: a.wan_mbit * 1_000_000 / 8,
            queue_bytes: 1 << 20,
        },
    }
}

async fn native_run(
    a: &QemuBenchArgs,
    link: Link,
    spec: &QemuSpec,
    load: &LoadParams,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let cfg = QemuConfig {
        die_with_parent: true,
        ..QemuConfig::default()
    };
    let src = QemuVm::launch(&cfg, &dir.path().join("src"), spec, Launch::Boot)
        .await
        .map_err(anyhow::Error::msg)?;
    src.wait_console(Duration::from_secs(120), |c| {
        c.contains("tern-load tick=10 ")
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let dst = QemuVm::launch(
        &cfg,
        &dir.path().join("dst"),
        spec,
        Launch::IncomingAutostart,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let port = testbed::free_port()?;
    let mut qd = dst.qmp().await?;
    qd.set_capabilities(&[("events", true)]).await?;
    qd.run(
        "migrate-incoming",
        json!({ "uri": format!("tcp:127.0.0.1:{port}") }),
    )
    .await?;
    let emu =
        LinkEmulator::start(format!("127.0.0.1:{port}").parse()?, link_config(link, a)).await?;
    let mut qs = src.qmp().await?;
    qs.set_capabilities(&[("events", true), ("auto-converge", a.auto_converge)])
        .await?;
    qs.set_parameters(json!({
        "downtime-limit": a.max_downtime,
        "max-bandwidth": 1u64 << 40,
    }))
    .await?;
    let pids = [src.pid(), dst.pid()];
    let mut cpu = CpuMeter::default();
    cpu.sample(&pids);
    let t0 = Instant::now();
    qs.run("migrate", json!({ "uri": format!("tcp:{}", emu.addr()) }))
        .await?;
    let mut dirty = 0.0f64;
    let info = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        cpu.sample(&pids);
        let m = qs.query_migrate().await?;
        if let Some(r) = &m.ram {
            dirty = dirty.max(mib_s(r.dirty_pages_rate as f64));
        }
        match m.status.as_str() {
            "completed" => break m,
            "failed" | "cancelled" => bail!(
                "QEMU's migration {}: {}",
                m.status,
                m.error_desc.unwrap_or_default()
            ),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("QEMU's migration did not complete in 300 s");
        }
    };
    let total_ms = info
        .total_time
        .filter(|&t| t > 0)
        .map(|t| t as f64)
        .unwrap_or_else(|| t0.elapsed().as_secs_f64() * 1e3);
    let source_last = last_complete_tick(&src.console());
    // Downtime: the source's STOP to the destination's RESUME.
    let stop = qs
        .events
        .iter()
        .rev()
        .find(|e| e.event == "STOP")
        .and_then(|e| e.timestamp);
    let mut resume = None;
    let t = Instant::now();
    while resume.is_none() && t.elapsed() < Duration::from_secs(30) {
        let _ = qd.status().await?;
        resume = qd
            .events
            .iter()
            .find(|e| e.event == "RESUME")
            .and_then(|e| e.timestamp);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cpu.sample(&pids);
    let downtime_ms = match (stop, resume) {
        (Some(s), Some(r)) => r.unix_micros().saturating_sub(s.unix_micros()) as f64 / 1e3,
        _ => info.downtime.unwrap_or(0) as f64,
    };
    let wire = emu.bytes_up();
    let (ok, verdict) = verify(&dst, source_last, load).await;
    Ok(Row {
        link,
        path: "qemu",
        total_ms,
        downtime_ms,
        wire_mb: wire as f64 / 1e6,
        cpu_s: cpu.total(),
        dirty_mib_s: dirty,
        verdict,
        ok,
    })
}

/// Waits for the destination guest's first check after switchover.
async fn verify(dst: &QemuVm, source_last: u64, load: &LoadParams) -> (bool, String) {
    let t = Instant::now();
    loop {
        if let Some(v) = verify_after_switchover(&dst.console(), source_last, load) {
            return v;
        }
        if !dst.is_alive() || t.elapsed() > Duration::from_secs(20) {
            let c = dst.console();
            let tail: Vec<&str> = c.lines().rev().take(2).collect();
            return (
                false,
                format!("no check after switchover; console: {}", tail.join(" | ")),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tern_run(
    a: &QemuBenchArgs,
    link: Link,
    kernel: &Path,
    initrd: &Path,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let lo: std::net::IpAddr = [127, 0, 0, 1].into();
    let mut ha = HostPlan::new("host-a", lo)?;
    let mut hb = HostPlan::new("host-b", lo)?;
    let to_b = LinkEmulator::start(hb.migrate_addr(), link_config(link, a)).await?;
    let to_a = LinkEmulator::start(ha.migrate_addr(), link_config(link, a)).await?;
    ha.reached_at = Some(to_a.addr());
    hb.reached_at = Some(to_b.addr());
    for h in [&mut ha, &mut hb] {
        h.guest = Some((kernel.to_path_buf(), initrd.to_path_buf()));
    }
    let bed = testbed::write(dir.path(), &[ha, hb]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exe = tern_binary()?;
    let pa = AgentProcess::start(&exe, &bed[0], None)?;
    let pb = AgentProcess::start(&exe, &bed[1], None)?;
    let ca = pa.client()?;
    let spec = match a.tern_guest {
        TernGuest::Linux => GuestSpec {
            kind: GuestKind::Linux,
            memory_mib: a.memory,
            ws_mib: a.ws_mib,
            dirty_mib_per_sec: a.dirty_mib,
            ..Default::default()
        },
        TernGuest::Process => GuestSpec {
            kind: GuestKind::Process,
            memory_mib: a.memory,
            ws_pages: a.ws_mib * 256,
            dirty_mib_per_sec: a.dirty_mib,
            ..Default::default()
        },
    };
    let vm = ca.create_vm(&spec).await?;
    let t = Instant::now();
    // The Linux guest counts once its workload runs; a process guest has
    // written its working set when it is listed (a second to settle).
    let ticks = match a.tern_guest {
        TernGuest::Linux => 10,
        TernGuest::Process => 0,
    };
    if a.tern_guest == TernGuest::Process {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    while ca.vm(&vm.id).await?.counter.unwrap_or(0) < ticks {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the guest on host-a does not count");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agents = [pa.pid(), pb.pid()];
    let id = vm.id.to_string();
    // QEMUs, and each host's guest process (which runs a process guest
    // and its migration; it is where tern's engine spends its CPU).
    let pids = |d: &[PathBuf]| -> Vec<i32> {
        let mut p: Vec<i32> = agents.to_vec();
        for x in d {
            p.extend(tern_drivers::qemu::pids_under(x));
            p.extend(tern_agent::vmdir::VmDir::new(x, &id).live_pid());
        }
        p.sort_unstable();
        p.dedup();
        p
    };
    let dirs = [bed[0].data_dir.clone(), bed[1].data_dir.clone()];
    let mut cpu = CpuMeter::default();
    cpu.sample(&pids(&dirs));
    let before = to_b.bytes_up();
    let m = ca
        .migrate(
            &vm.id,
            &MigrateRequest {
                to: tern_proto::HostId::new("host-b").expect("a host name"),
                mode: "precopy".into(),
                max_downtime_ms: Some(a.max_downtime),
                bandwidth_mbps: None,
                deadline_secs: None,
                max_bandwidth_mbps: None,
                auto_converge: Some(a.auto_converge),
                compress: Some(
                    match (a.tern_guest, link) {
                        (TernGuest::Process, _) => "auto",
                        (_, Link::Wan) => "zstd",
                        _ => "none",
                    }
                    .into(),
                ),
                id: None,
                reason: None,
            },
        )
        .await?;
    let mut dirty = 0.0f64;
    let done = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        cpu.sample(&pids(&dirs));
        let v = ca.migration(&m.id).await?;
        if v.state.is_final() {
            break v;
        }
        dirty = dirty.max(mib_s(v.progress.dirty_pages_per_sec));
        if t.elapsed() > Duration::from_secs(400) {
            bail!("tern's migration did not end");
        }
    };
    let wire = to_b.bytes_up() - before;
    let r = done.report.clone();
    if let Some(r) = &r {
        for x in r.rounds.iter().filter(|x| x.seconds > 0.0) {
            dirty = dirty.max(mib_s(x.dirtied as f64 / x.seconds));
        }
    }
    let (ok, verdict) = match done.state {
        MigrationPhase::Committed => (true, "counter continued, checksum matches".to_string()),
        s => (false, format!("{s:?}: {}", done.error.unwrap_or_default())),
    };
    if std::env::var_os("TERN_BENCH_KEEP").is_some() {
        // The guest processes' logs (vms/<id>/guest.log under each data dir).
        eprintln!("kept the agents' data dirs in {}", dir.keep().display());
    }
    Ok(Row {
        link,
        path: "tern",
        total_ms: r.as_ref().map_or(0.0, |r| r.total_ms),
        downtime_ms: r.as_ref().map_or(0.0, |r| r.downtime_ms),
        wire_mb: wire as f64 / 1e6,
        cpu_s: cpu.total(),
        dirty_mib_s: dirty,
        verdict,
        ok,
    })
}

/// Runs the benchmark and prints the tables.
pub fn run(a: QemuBenchArgs) -> anyhow::Result<()> {
    let (kernel, initrd) = guest_files(&a)?;
    let load = LoadParams {
        ws_mib: a.ws_mib,
        dirty_mib: a.dirty_mib,
        tick_ms: 100,
        verify_every: 10,
    };
    let spec = QemuSpec {
        memory_mib: a.memory,
        vcpus: 1,
        kernel: kernel.clone(),
        initrd: Some(initrd.clone()),
        cmdline: load.cmdline(),
        disks: Vec::new(),
    };
    let accel = QemuConfig::default().accel;
    println!(
        "migrate-qemu: {} MiB Linux guest (Debian kernel + tern-load, {} MiB working set, {} MiB/s), accel {:?}, {} runs per path per link, downtime budget {} ms, auto-converge {}",
        a.memory, a.ws_mib, a.dirty_mib, accel, a.runs, a.max_downtime, a.auto_converge
    );
    if a.tern_guest == TernGuest::Process {
        println!(
            "tern's path: a process guest of the same shape, tern's own engine (compression auto)"
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for &link in &a.links {
        for i in 0..a.runs {
            for path in ["qemu", "tern"]
                .into_iter()
                .filter(|p| a.paths.iter().any(|x| x == p))
            {
                let r = rt.block_on(async {
                    match path {
                        "qemu" => native_run(&a, link, &spec, &load).await,
                        _ => tern_run(&a, link, &kernel, &initrd).await,
                    }
                });
                match r {
                    Ok(row) => {
                        println!(
                            "  {:?} run {} {:<4}: total {:>7.0} ms, downtime {:>6.1} ms, wire {:>7.1} MB, cpu {:>5.2} s, dirtied up to {:>5.1} MiB/s, {}",
                            link, i + 1, path, row.total_ms, row.downtime_ms, row.wire_mb, row.cpu_s, row.dirty_mib_s,
                            if row.ok { "ok".to_string() } else { format!("CORRUPTED/FAILED: {}", row.verdict) }
                        );
                        rows.push(row);
                    }
                    Err(e) => println!("  {link:?} run {} {path}: error: {e:#}", i + 1),
                }
            }
        }
    }
    let wan = format!("wan ({} ms RTT, {} Mbit/s)", a.wan_rtt_ms, a.wan_mbit);
    println!();
    println!(
        "{:<28} {:<5} {:>5} {:>10} {:>12} {:>9} {:>7} {:>10} {:>10}",
        "link",
        "path",
        "runs",
        "total ms",
        "downtime ms",
        "wire MB",
        "cpu s",
        "dirty MiB/s",
        "corrupted"
    );
    for link in [Link::Loopback, Link::Wan] {
        let mut means = Vec::new();
        for path in ["qemu", "tern"] {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.link == link && r.path == path)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let good: Vec<&&Row> = rs.iter().filter(|r| r.ok).collect();
            let n = good.len().max(1) as f64;
            let mean = |f: fn(&Row) -> f64| good.iter().map(|r| f(r)).sum::<f64>() / n;
            let m = (
                mean(|r| r.total_ms),
                mean(|r| r.downtime_ms),
                mean(|r| r.wire_mb),
                mean(|r| r.cpu_s),
            );
            let dirty = mean(|r| r.dirty_mib_s);
            println!(
                "{:<28} {:<5} {:>5} {:>10.0} {:>12.1} {:>9.1} {:>7.2} {:>10.1} {:>10}",
                if link == Link::Wan {
                    wan.as_str()
                } else {
                    "loopback"
                },
                path,
                rs.len(),
                m.0,
                m.1,
                m.2,
                m.3,
                dirty,
                rs.len() - good.len()
            );
            means.push(m);
        }
        if means.len() == 2 && means[0].0 > 0.0 {
            let (q, t) = (means[0], means[1]);
            println!(
                "{:<28} {:<5} {:>5} {:>10.2} {:>12.2} {:>9.2} {:>7.2}",
                "",
                "t/q",
                "",
                t.0 / q.0,
                t.1 / q.1.max(1e-9),
                t.2 / q.2.max(1e-9),
                t.3 / q.3.max(1e-9)
            );
        }
    }
    println!(
        "(means over runs whose guest passed its own check after switchover; t/q = tern / qemu)"
    );
    Ok(())
}

/// The `tern` binary beside this one (`cargo build --release` builds both
/// into one directory), or `TERN_BIN`.
pub(crate) fn tern_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TERN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    let tern = me.with_file_name("tern");
    if !tern.exists() {
        bail!(
            "no tern binary at {} (build it: cargo build --release -p tern; or set TERN_BIN)",
            tern.display()
        );
    }
    Ok(tern)
}
