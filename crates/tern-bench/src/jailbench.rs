//! `tern-bench jail`: what the jail costs. Two pairs of agents on loopback,
//! one plain and one with `[jail]`, measured in turns in one run:
//! - guest process start → guest ready (the agent's create answers once the
//!   test guest counts), `--runs` times each;
//! - pre-copy migration downtime and total time of a 64 MiB test guest,
//!   `--migrations` times each.
//!
//! Memory: each VM is fresh (cold guest RAM, first touch in the guest).

use anyhow::Context;
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::AgentClient;
use tern_proto::GuestSpec;
use tern_testbed::{self as testbed, AgentProcess, HostPlan};

/// `tern-bench jail` options.
#[derive(clap::Args, Clone)]
pub struct JailBenchArgs {
    /// Starts measured per side.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Migrations measured per side.
    #[arg(long, default_value_t = 10)]
    migrations: usize,
    /// The jail's uid and gid.
    #[arg(long, default_value_t = 65534)]
    uid: u32,
}

/// One side: two agents (host-a, host-b) and their clients.
struct Side {
    _agents: [AgentProcess; 2],
    a: AgentClient,
    b: AgentClient,
}

fn side(dir: &Path, jail: Option<u32>) -> anyhow::Result<Side> {
    let lo: std::net::IpAddr = [127, 0, 0, 1].into();
    let mut plans = [HostPlan::new("host-a", lo)?, HostPlan::new("host-b", lo)?];
    for p in &mut plans {
        p.jail = jail.map(|uid| tern_jail::JailConfig {
            uid,
            gid: uid,
            ..Default::default()
        });
    }
    let bed = testbed::write(dir, &plans).map_err(|e| anyhow::anyhow!("{e}"))?;
    let exe = crate::tern_binary()?;
    let pa = AgentProcess::start(&exe, &bed[0], None)?;
    let pb = AgentProcess::start(&exe, &bed[1], None)?;
    Ok(Side {
        a: pa.client()?,
        b: pb.client()?,
        _agents: [pa, pb],
    })
}

fn spec() -> GuestSpec {
    GuestSpec {
        memory_mib: 64,
        ws_pages: 2048,
        pages_per_tick: 16,
        ..Default::default()
    }
}

/// Boots a VM on host-a and stops it: how long the boot took, ms.
async fn start_once(s: &Side) -> anyhow::Result<f64> {
    let t = Instant::now();
    let vm = s.a.create_vm(&spec()).await.context("create")?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    s.a.stop_vm(&vm.id).await.context("stop")?;
    Ok(ms)
}

/// Boots a VM on host-a, migrates it to host-b and stops it: (downtime,
/// total) in ms.
async fn migrate_once(s: &Side) -> anyhow::Result<(f64, f64)> {
    let vm = s.a.create_vm(&spec()).await.context("create")?;
    let r = crate::agentrun::migrate_committed(
        &s.a,
        &vm.id,
        "host-b",
        Some(50),
        Duration::from_secs(120),
    )
    .await?;
    s.b.stop_vm(&vm.id).await.context("stop")?;
    Ok((r.downtime_ms, r.total_ms))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the benchmark and prints a table with the jail's ratios.
pub fn run(a: JailBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (d0, d1) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let sides = [side(d0.path(), None)?, side(d1.path(), Some(a.uid))?];
        let mut start = [Vec::new(), Vec::new()];
        let mut down = [Vec::new(), Vec::new()];
        let mut total = [Vec::new(), Vec::new()];
        // Turns alternate which side goes first, so neither always has the
        // warmer machine.
        for i in 0..a.runs.max(a.migrations) {
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                if i < a.runs {
                    start[k].push(start_once(&sides[k]).await?);
                }
                if i < a.migrations {
                    let (d, t) = migrate_once(&sides[k]).await?;
                    down[k].push(d);
                    total[k].push(t);
                }
            }
        }
        let row = |name: &str, v: &mut [Vec<f64>; 2]| {
            let (p, j) = (median(&mut v[0]), median(&mut v[1]));
            println!("{name:<34} {p:>10.1} {j:>10.1} {:>8.3}", j / p);
        };
        println!("jail cost: test guests, 64 MiB, cold guest RAM, loopback (medians, ms)");
        println!("{:<34} {:>10} {:>10} {:>8}", "", "plain", "jailed", "ratio");
        row(&format!("start -> guest ready (n={})", a.runs), &mut start);
        row(
            &format!("pre-copy downtime (n={})", a.migrations),
            &mut down,
        );
        row(&format!("pre-copy total (n={})", a.migrations), &mut total);
        Ok(())
    })
}
