//! `tern-bench migrate-container`: a container's downtime moved by tern
//! between two agents against a plain `criu dump` + copy + `criu restore`
//! of the same workload, in turns in one run.
//!
//! The workload is tern's counter writing `--rate-mib` MiB/s across a
//! `--ws-mib` MiB buffer; each run waits until the whole buffer has been
//! written once, so every page of it is resident and in the checkpoint.
//! Memory: the workload's buffer is warm on the source (written all
//! along); the restore fills fresh memory on the destination (cold).
//!
//! - plain: `runc checkpoint` (CRIU dump) into a directory, the images and
//!   the root filesystem copied as one tar stream over a loopback TCP
//!   socket, `runc restore` in another bundle: downtime is dump start →
//!   restore returned (the container runs).
//! - tern: `POST /migrate` between two agents on loopback: the report's
//!   downtime (dump start → the destination's `Running`), which adds the
//!   signed manifest, the hashes and the journal records. Per mode
//!   (`--modes`): `precopy` dumps everything while frozen; `postcopy` dumps
//!   lazily, so the memory moves after the container runs again (its
//!   total time is printed too).

use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tern_agent::AgentClient;
use tern_drivers::runc::{Bundle, BundleSpec, CheckpointOptions, Criu, Runc};
use tern_proto::{GuestKind, GuestSpec};
use tern_testbed::{self as testbed, AgentProcess, HostPlan};

/// `tern-bench migrate-container` options.
#[derive(clap::Args, Clone)]
pub struct ContainerBenchArgs {
    /// The workload's buffer, MiB.
    #[arg(long, default_value_t = 512)]
    ws_mib: u64,
    /// How fast it writes across it, MiB/s.
    #[arg(long, default_value_t = 50)]
    rate_mib: u64,
    /// Runs per side.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// tern's modes, each measured in turn with the plain move.
    #[arg(long, value_delimiter = ',', default_value = "precopy,postcopy")]
    modes: Vec<String>,
}

fn spec(a: &ContainerBenchArgs) -> GuestSpec {
    GuestSpec {
        kind: GuestKind::Container,
        memory_mib: (a.ws_mib * 2).max(64),
        ws_mib: a.ws_mib,
        dirty_mib_per_sec: a.rate_mib,
        ..Default::default()
    }
}

/// Until the whole buffer was written once.
fn warm_up(a: &ContainerBenchArgs) -> Duration {
    Duration::from_millis(a.ws_mib * 1000 / a.rate_mib.max(1) + 1000)
}

fn rootfs() -> PathBuf {
    std::env::var_os("TERN_WORKLOAD_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/tern/workload/rootfs.tar".into())
}

/// One plain move: (dump, copy, restore) in ms.
fn plain_once(a: &ContainerBenchArgs, dir: &Path, i: usize) -> anyhow::Result<(f64, f64, f64)> {
    let criu = Criu::locate(std::env::var_os("TERN_CRIU").as_deref().map(Path::new))?;
    let runc = Runc::new(&dir.join("runc"), criu);
    let bs = BundleSpec {
        args: vec![
            "/bin/tern-counter".into(),
            "--dirty-mib".into(),
            a.ws_mib.to_string(),
            "--rate-mib".into(),
            a.rate_mib.to_string(),
        ],
        memory_mib: u32::try_from(spec(a).memory_mib)?,
        netns: None,
        cgroup: None,
    };
    let src = Bundle::create(&dir.join(format!("src-{i}")), &rootfs(), &bs)?;
    let id = format!("tern-bench-{}-{i}", std::process::id());
    runc.run(&id, &src)?;
    std::thread::sleep(warm_up(a));
    let stage = dir.join(format!("stage-{i}"));
    std::fs::create_dir_all(stage.join("images"))?;
    let t0 = Instant::now();
    let opts = CheckpointOptions {
        leave_running: false,
        tcp_established: true,
    };
    runc.checkpoint(&id, &stage.join("images"), &stage.join("work"), &opts)?;
    let dumped = t0.elapsed();
    let dst = dir.join(format!("dst-{i}"));
    std::fs::create_dir_all(&dst)?;
    copy_over_tcp(&[(&stage, "images"), (src.dir(), "rootfs")], &dst)?;
    let copied = t0.elapsed();
    let moved = Bundle::around_rootfs(&dst, &bs)?;
    runc.restore(&id, &moved, &dst.join("images"), &dst.join("work"), true)?;
    let restored = t0.elapsed();
    let counter = std::fs::read_to_string(moved.rootfs().join("run/tern-counter"))?;
    runc.delete(&id)?;
    if counter.trim().is_empty() {
        bail!("the restored workload wrote no counter");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(dumped), ms(copied - dumped), ms(restored - copied)))
}

/// Copies `parts` (a directory and the entry under it) into `dst` as one
/// tar stream over a loopback TCP connection.
fn copy_over_tcp(parts: &[(&Path, &str)], dst: &Path) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut tar = Command::new("tar")
            .arg("-xf")
            .arg("-")
            .arg("-C")
            .arg(&dst)
            .stdin(Stdio::piped())
            .spawn()?;
        std::io::copy(&mut conn, tar.stdin.as_mut().context("tar stdin")?)?;
        drop(tar.stdin.take());
        if !tar.wait()?.success() {
            bail!("tar -x failed");
        }
        Ok(())
    });
    let mut conn = std::net::TcpStream::connect(addr)?;
    let mut cmd = Command::new("tar");
    cmd.arg("-cf").arg("-");
    for (dir, entry) in parts {
        cmd.arg("-C").arg(dir).arg(entry);
    }
    let mut tar = cmd.stdout(Stdio::piped()).spawn()?;
    std::io::copy(tar.stdout.as_mut().context("tar stdout")?, &mut conn)?;
    if !tar.wait()?.success() {
        bail!("tar -c failed");
    }
    conn.flush()?;
    drop(conn);
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

/// One tern move between the agents in `mode`: the report's downtime and
/// total, ms, and the archive's size, MB.
async fn tern_once(
    a: &ContainerBenchArgs,
    (ca, cb): (&AgentClient, &AgentClient),
    mode: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let vm = ca.create_vm(&spec(a)).await.context("create")?;
    tokio::time::sleep(warm_up(a)).await;
    let limit = Duration::from_secs(300);
    let r = crate::agentrun::migrate_committed_in(ca, &vm.id, "host-b", mode, None, limit).await?;
    // Ended, so that no run shares the CPUs with the writers of earlier ones.
    cb.stop_vm(&vm.id).await.context("stop")?;
    let s = &r.switchover;
    println!(
        "  tern {mode}: dump {:.0} ms, pack and send {:.0} ms, destination unpacks {:.0} ms, commit record {:.1} ms, restore {:.0} ms; total {:.0} ms",
        s.pause_ms, s.send_ms, s.ready_ms, s.commit_record_ms, s.running_ms, r.total_ms
    );
    Ok((r.downtime_ms, r.total_ms, r.memory_bytes as f64 / 1e6))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints both sides and the ratio.
pub fn run(a: ContainerBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let lo: std::net::IpAddr = [127, 0, 0, 1].into();
    // The agents' [container] comes from the environment.
    std::env::set_var("TERN_WORKLOAD_ROOTFS", rootfs());
    let plans = [HostPlan::new("host-a", lo)?, HostPlan::new("host-b", lo)?];
    let bed =
        testbed::write(&dir.path().join("bed"), &plans).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exe = crate::tern_binary()?;
    let pa = AgentProcess::start(&exe, &bed[0], None)?;
    let pb = AgentProcess::start(&exe, &bed[1], None)?;
    let (ca, cb) = (pa.client()?, pb.client()?);
    let mut plain = Vec::new();
    let mut tern: Vec<(Vec<f64>, Vec<f64>, f64)> = a
        .modes
        .iter()
        .map(|_| (Vec::new(), Vec::new(), 0.0))
        .collect();
    for i in 0..a.runs {
        let (d, c, r) = plain_once(&a, &dir.path().join("plain"), i)?;
        println!("plain run {i}: dump {d:.0} ms, copy {c:.0} ms, restore {r:.0} ms");
        plain.push(d + c + r);
        for (mode, row) in a.modes.iter().zip(tern.iter_mut()) {
            let (t, total, mb) = rt.block_on(tern_once(&a, (&ca, &cb), mode))?;
            println!("tern {mode} run {i}: downtime {t:.0} ms ({mb:.0} MB archive)");
            row.0.push(t);
            row.1.push(total);
            row.2 = mb;
        }
    }
    let p = median(&mut plain);
    println!(
        "container move: {} MiB written at {} MiB/s (source memory warm, destination cold), loopback; medians of {} runs, ms",
        a.ws_mib, a.rate_mib, a.runs
    );
    println!(
        "{:<52} {:>10} {:>10} {:>8}",
        "", "downtime", "total", "ratio"
    );
    println!(
        "{:<52} {:>10} {:>10} {:>8}",
        "plain criu dump + copy + criu restore",
        format!("{p:.0}"),
        format!("{p:.0}"),
        "1.00"
    );
    for (mode, (mut down, mut total, mb)) in a.modes.iter().zip(tern) {
        let (t, tt) = (median(&mut down), median(&mut total));
        println!(
            "{:<52} {:>10} {:>10} {:>8.2}",
            format!("tern {mode} ({mb:.0} MB archive)"),
            format!("{t:.0}"),
            format!("{tt:.0}"),
            t / p
        );
    }
    println!("ratio: tern's downtime / plain's");
    Ok(())
}
