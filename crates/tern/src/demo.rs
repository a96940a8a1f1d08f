//! `tern demo`: the fleet on one machine. A control plane (`tern up
//! --driver agents`, SQLite), three host agents that join it, six VMs the
//! scheduler places across them, one host drained live with a progress bar
//! per migration, and a summary of where everything went, each guest
//! checked on arrival.

use crate::fleetcmd::{Api, ApiConn};
use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use reqwest::Method;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;
use tern_agent::layout::{self, LocalAgent};
use tern_agent::AgentClient;
use tern_api::{AuthKeys, Permission};
use tern_proto::TenantId;

/// A `tern up` child, killed when dropped.
struct ControlPlane {
    child: std::process::Child,
    url: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_control_plane(dir: &Path, secret: &str) -> anyhow::Result<ControlPlane> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["up", "--driver", "agents"])
        .env("TERN_DATA", dir)
        .env("TERN_LISTEN", "127.0.0.1:0")
        .env("TERN_POOL_SIZE", "0")
        .env("TERN_JWT_SECRET", secret)
        .env("TERN_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let out = child.stdout.take().context("tern up's stdout")?;
    std::io::BufReader::new(out).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("tern: API listening on ")
        .with_context(|| format!("tern up said {line:?}"))?
        .to_string();
    Ok(ControlPlane { child, url })
}

fn token(keys: &AuthKeys, tenant: &str, perms: &[Permission]) -> anyhow::Result<String> {
    Ok(keys.issue(&TenantId::new(tenant)?, perms, Duration::from_secs(3600))?)
}

/// `tern demo`.
pub fn demo() -> anyhow::Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("the demo needs /dev/kvm");
    }
    let dir = tempfile::tempdir()?;
    let secret = hex::encode(rand::random::<[u8; 24]>());
    let keys = AuthKeys::from_secret(secret.as_bytes());
    let admin = token(&keys, "ops", &[Permission::PlatformAdmin])?;
    let tenant = token(&keys, "acme", &[Permission::VmsRead, Permission::VmsWrite])?;
    println!(
        "== a control plane (tern up --driver agents, SQLite) in {}",
        dir.path().display()
    );
    let cp = start_control_plane(&dir.path().join("cp"), &secret)?;
    println!("   {}", cp.url);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let ops = Api::new(&ApiConn {
            url: cp.url.clone(),
            token: admin,
        });
        let acme = Api::new(&ApiConn {
            url: cp.url.clone(),
            token: tenant,
        });
        println!("== three host agents join it (one-time tokens; the control plane's CA signs their certificates)");
        let lo: std::net::IpAddr = [127, 0, 0, 1].into();
        let names = ["host-a", "host-b", "host-c"];
        let plans = names
            .iter()
            .map(|n| layout::HostPlan::new(n, lo))
            .collect::<Result<Vec<_>, _>>()?;
        let hosts = layout::write_joined(&dir.path().join("hosts"), &plans, &[&cp.url], &|_| {
            Default::default()
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut agents: Vec<LocalAgent> = Vec::new();
        let mut clients: BTreeMap<String, AgentClient> = BTreeMap::new();
        for (h, name) in hosts.iter().zip(names) {
            let t = ops.call(Method::POST, "/api/v1/hosts/join-tokens", None).await?;
            let join = t["token"].as_str().context("a join token")?.to_string();
            let bin = std::env::current_exe()?;
            let env = [("TERN_JOIN_TOKEN", join.as_str()), ("TERN_LOG", "warn")];
            let a = LocalAgent::start_with_env(&bin, h, &env)?;
            println!("   {}", a.ready_line);
            clients.insert(name.to_string(), a.client()?);
            agents.push(a);
        }
        println!("== six test guests through the API; the scheduler places them");
        let mut placed: BTreeMap<String, String> = BTreeMap::new();
        for _ in 0..6 {
            let body = serde_json::json!({"spec": {"image": "test", "memory_mib": 64}});
            let vm = acme.call(Method::POST, "/api/v1/vms", Some(body)).await?;
            let (id, host) = (vm["id"].as_str().unwrap_or("?"), vm["host"].as_str().unwrap_or("?"));
            println!("   {id} on {host}");
            placed.insert(id.into(), host.into());
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // peers learned at the next beat
        println!("== drain host-a: every VM it runs moves away live");
        ops.call(Method::POST, "/api/v1/hosts/host-a/drain", None).await?;
        let moves = follow_drain(&acme, "host-a").await?;
        println!("== where everything went");
        let vms = acme.call(Method::GET, "/api/v1/vms", None).await?;
        for v in vms.as_array().into_iter().flatten() {
            let id = v["id"].as_str().unwrap_or("?");
            let host = v["host"].as_str().unwrap_or("?");
            let vm: tern_proto::VmId = id.parse()?;
            let g = clients[host].vm(&vm).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let g2 = clients[host].vm(&vm).await?;
            let how = match moves.get(id) {
                Some(d) => format!("moved live from host-a, downtime {d:.1} ms"),
                None => "stayed".into(),
            };
            println!(
                "   {id}  {} -> {host:<6}  epoch {}  counter {} -> {}  checksum ok: {:?}  ({how})",
                placed.get(id).map(String::as_str).unwrap_or("?"),
                g2.epoch,
                g.counter.unwrap_or(0),
                g2.counter.unwrap_or(0),
                g2.checksum_ok,
            );
        }
        drop(agents);
        Ok(())
    })
}

/// Follows a drain with one progress bar per migration; returns each moved
/// VM's downtime.
async fn follow_drain(api: &Api, host: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>40} [{bar:30}] {pos}/{len} pages {msg}")
        .expect("template")
        .progress_chars("=> ");
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut moved = BTreeMap::new();
    let started = std::time::Instant::now();
    loop {
        let ms = api.call(Method::GET, "/api/v1/migrations", None).await?;
        let ms: Vec<serde_json::Value> = ms
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["from"] == host)
            .cloned()
            .collect();
        for m in &ms {
            let id = m["id"].as_str().unwrap_or("?").to_string();
            let bar = bars.entry(id.clone()).or_insert_with(|| {
                let b = multi.add(ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(format!(
                    "{} -> {}",
                    m["vm"].as_str().unwrap_or("?"),
                    m["to"].as_str().unwrap_or("?")
                ));
                b
            });
            if bar.is_finished() {
                continue;
            }
            let d = api
                .call(Method::GET, &format!("/api/v1/migrations/{id}"), None)
                .await?;
            let p = &d["progress"]["progress"];
            let pages = (p["memory_bytes"].as_u64().unwrap_or(0) / 4096).max(1);
            bar.set_length(pages);
            bar.set_position(p["pages_sent"].as_u64().unwrap_or(0).min(pages));
            bar.set_message(d["phase"].as_str().unwrap_or("?").to_string());
            if matches!(
                d["phase"].as_str(),
                Some("committed" | "rolled_back" | "corrupted")
            ) {
                bar.set_position(pages);
                let downtime = d["report"]["downtime_ms"].as_f64().unwrap_or(0.0);
                bar.finish_with_message(format!(
                    "{} (downtime {downtime:.1} ms)",
                    d["phase"].as_str().unwrap_or("?")
                ));
                if d["phase"] == "committed" {
                    moved.insert(d["vm"].as_str().unwrap_or("?").to_string(), downtime);
                }
            }
        }
        let vms = api.call(Method::GET, "/api/v1/vms", None).await?;
        let left = vms
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["host"] == host)
            .count();
        if left == 0 && bars.values().all(|b| b.is_finished()) {
            return Ok(moved);
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the drain did not finish in 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}
