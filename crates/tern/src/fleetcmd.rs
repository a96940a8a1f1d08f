//! `tern host` and `tern migrate --api`: the fleet, through the control
//! plane's API.

use anyhow::{bail, Context};
use std::time::Duration;
use tern_agent::{MigrationPhase, Report};

/// How to reach the control plane.
#[derive(clap::Args, Clone)]
pub struct ApiConn {
    /// The control plane's API URL.
    #[arg(
        long = "api",
        env = "TERN_API",
        default_value = "http://127.0.0.1:7070"
    )]
    pub url: String,
    /// An API token (`tern token`; admin for `tern host`).
    #[arg(long = "api-token", env = "TERN_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// `--api` on commands that talk to an agent otherwise (`tern vm`,
/// `tern migrate`): the fleet's control plane answers instead.
#[derive(clap::Args, Clone)]
pub struct FleetOpt {
    /// Ask the control plane at this URL instead of an agent (the fleet:
    /// `tern up --driver agents`).
    #[arg(long, env = "TERN_API")]
    pub api: Option<String>,
    /// The control plane's API token (`tern token`).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

impl FleetOpt {
    /// The control plane to ask, if one was named.
    pub fn conn(&self) -> anyhow::Result<Option<ApiConn>> {
        let Some(url) = &self.api else {
            return Ok(None);
        };
        let token = self
            .api_token
            .clone()
            .context("--api needs --api-token (or TERN_TOKEN): make one with `tern token`")?;
        Ok(Some(ApiConn {
            url: url.clone(),
            token,
        }))
    }
}

/// `tern host`.
#[derive(clap::Subcommand)]
pub enum HostCmd {
    /// Every host: state, labels, capacity, load.
    List {
        #[command(flatten)]
        api: ApiConn,
    },
    /// A one-time join token for `tern agent --join`.
    JoinToken {
        #[command(flatten)]
        api: ApiConn,
    },
    /// Move every VM of a host away live (maintenance).
    Drain {
        /// The host.
        id: String,
        /// Wait until the host is empty, showing the moves.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiConn,
    },
    /// Empty a failing host now: as drain, preempting rebalancing.
    Evacuate {
        /// The host.
        id: String,
        #[command(flatten)]
        api: ApiConn,
    },
    /// Remove a host from the fleet (its peers refuse it from then on).
    Remove {
        /// The host.
        id: String,
        #[command(flatten)]
        api: ApiConn,
    },
}

pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub(crate) fn new(c: &ApiConn) -> Self {
        Self {
            base: c.url.trim_end_matches('/').into(),
            token: c.token.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client builds"),
        }
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let msg = v["error"].as_str().unwrap_or(&text).to_string();
            bail!("the control plane answered {status}: {msg}");
        }
        Ok(v)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// `tern host ...`.
pub fn host(cmd: HostCmd) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        match cmd {
            HostCmd::List { api } => {
                let hosts = Api::new(&api)
                    .call(reqwest::Method::GET, "/api/v1/hosts", None)
                    .await?;
                println!(
                    "{:<16} {:<10} {:>8} {:>6} {:>5} {:>6}  labels",
                    "host", "state", "mem MiB", "vcpus", "vms", "cpu %"
                );
                for h in hosts.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<10} {:>8} {:>6} {:>5} {:>6.0}  {}",
                        h["id"].as_str().unwrap_or("?"),
                        h["state"].as_str().unwrap_or("?"),
                        h["capacity"]["memory_mib"],
                        h["capacity"]["vcpus"],
                        h["load"]["vms"],
                        h["load"]["cpu"].as_f64().unwrap_or(0.0) * 100.0,
                        h["labels"]
                    );
                }
            }
            HostCmd::JoinToken { api } => {
                let t = Api::new(&api)
                    .call(reqwest::Method::POST, "/api/v1/hosts/join-tokens", None)
                    .await?;
                println!("{}", t["token"].as_str().unwrap_or_default());
            }
            HostCmd::Drain { id, wait, api } => {
                let a = Api::new(&api);
                let path = format!("/api/v1/hosts/{id}/drain");
                a.call(reqwest::Method::POST, &path, None).await?;
                println!("host {id} is draining");
                if wait {
                    wait_empty(&a, &id).await?;
                }
            }
            HostCmd::Evacuate { id, api } => {
                let path = format!("/api/v1/hosts/{id}/evacuate");
                Api::new(&api)
                    .call(reqwest::Method::POST, &path, None)
                    .await?;
                println!("host {id} is evacuating");
            }
            HostCmd::Remove { id, api } => {
                let path = format!("/api/v1/hosts/{id}");
                Api::new(&api)
                    .call(reqwest::Method::DELETE, &path, None)
                    .await?;
                println!("host {id} removed: its peers refuse it from their next heartbeat");
            }
        }
        Ok(())
    })
}

fn is_final(m: &serde_json::Value) -> bool {
    matches!(
        m["phase"].as_str(),
        Some("committed" | "rolled_back" | "corrupted")
    )
}

/// Waits until no VM runs on `host` and no migration from it is open,
/// printing each move as it ends.
async fn wait_empty(a: &Api, host: &str) -> anyhow::Result<()> {
    // Moves that ended before the drain are not its own.
    let before = a
        .call(reqwest::Method::GET, "/api/v1/migrations", None)
        .await?;
    let mut shown: std::collections::BTreeSet<String> = before
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| is_final(m))
        .map(|m| m["id"].to_string())
        .collect();
    loop {
        let ms = a
            .call(reqwest::Method::GET, "/api/v1/migrations", None)
            .await?;
        let ms: Vec<&serde_json::Value> = ms
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["from"] == host)
            .collect();
        for m in ms.iter().filter(|m| is_final(m)) {
            if shown.insert(m["id"].to_string()) {
                println!(
                    "  {} {} -> {} {} (downtime {:.1} ms)",
                    m["vm"].as_str().unwrap_or("?"),
                    host,
                    m["to"].as_str().unwrap_or("?"),
                    m["phase"].as_str().unwrap_or("?"),
                    m["report"]["downtime_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
        let vms = a.call(reqwest::Method::GET, "/api/v1/vms", None).await?;
        let left = vms
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["host"] == host && v["status"] == "running")
            .count();
        if left == 0 && ms.iter().all(|m| is_final(m)) {
            println!("host {host} is empty");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `tern vm create|list|show|stop --api URL`: the caller's VMs in the fleet.
pub fn vm(cmd: crate::agentcmd::RemoteVm, api: &ApiConn) -> anyhow::Result<()> {
    use crate::agentcmd::RemoteVm;
    use reqwest::Method;
    runtime()?.block_on(async {
        let c = Api::new(api);
        match cmd {
            RemoteVm::Create { spec, .. } => {
                let body = serde_json::json!({ "spec": spec.fleet_spec()? });
                let v = c.call(Method::POST, "/api/v1/vms", Some(body)).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            RemoteVm::List { .. } => {
                let vms = c.call(Method::GET, "/api/v1/vms", None).await?;
                println!(
                    "{:<36}  {:<10} {:<12} {:>5}  {:<10} {:>7}",
                    "id", "status", "host", "epoch", "image", "mem MiB"
                );
                for v in vms.as_array().into_iter().flatten() {
                    println!(
                        "{:<36}  {:<10} {:<12} {:>5}  {:<10} {:>7}",
                        v["id"].as_str().unwrap_or("?"),
                        v["status"].as_str().unwrap_or("?"),
                        v["host"].as_str().unwrap_or("?"),
                        v["owner_epoch"],
                        v["spec"]["image"].as_str().unwrap_or("?"),
                        v["spec"]["memory_mib"],
                    );
                }
            }
            RemoteVm::Show { id, .. } => {
                let v = c
                    .call(Method::GET, &format!("/api/v1/vms/{id}"), None)
                    .await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            RemoteVm::Stop { id, .. } => {
                c.call(Method::DELETE, &format!("/api/v1/vms/{id}"), None)
                    .await?;
                println!("VM {id} stopped");
            }
        }
        Ok(())
    })
}

/// `tern migrate VM [--to HOST] --api URL`: asks the control plane, then
/// follows the migration with a progress bar and prints its report.
pub fn migrate(a: &crate::agentcmd::MigrateArgs, api: &ApiConn) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let c = Api::new(api);
        let mut body = serde_json::json!({
            "mode": a.mode,
            "max_downtime_ms": a.max_downtime,
            "auto_converge": !a.no_auto_converge,
        });
        let o = body.as_object_mut().expect("an object");
        if let Some(to) = &a.to {
            o.insert("to".into(), to.as_str().into());
        }
        if let Some(b) = a.bandwidth {
            o.insert("bandwidth_mbps".into(), b.into());
        }
        if let Some(b) = a.max_bandwidth {
            o.insert("max_bandwidth_mbps".into(), b.into());
        }
        if let Some(d) = a.deadline {
            o.insert("deadline_secs".into(), d.into());
        }
        if let Some(z) = &a.compress {
            o.insert("compress".into(), z.as_str().into());
        }
        let path = format!("/api/v1/vms/{}/migrate", a.vm);
        let m = c.call(reqwest::Method::POST, &path, Some(body)).await?;
        let id = m["id"].as_str().context("no migration id")?.to_string();
        let done = follow(&c, &id, !a.json).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&done)?);
        } else {
            println!(
                "migration {id} of {} from {} to {} ({}): {}",
                done["vm"].as_str().unwrap_or("?"),
                done["from"].as_str().unwrap_or("?"),
                done["to"].as_str().unwrap_or("?"),
                done["reason"].as_str().unwrap_or("?"),
                done["phase"].as_str().unwrap_or("?"),
            );
            if let Some(e) = done["error"].as_str() {
                println!("  error: {e}");
            }
            if let Ok(r) = serde_json::from_value::<Report>(done["report"].clone()) {
                crate::agentcmd::print_report_body(&r);
            }
        }
        if done["phase"] != "committed" {
            bail!(
                "migration {id} {}",
                done["phase"].as_str().unwrap_or("failed")
            );
        }
        Ok(())
    })
}

/// Polls a control-plane migration until it ends, drawing a bar of pages.
async fn follow(c: &Api, id: &str, show: bool) -> anyhow::Result<serde_json::Value> {
    let bar = crate::agentcmd::pages_bar(id, show);
    let path = format!("/api/v1/migrations/{id}");
    loop {
        let m = c.call(reqwest::Method::GET, &path, None).await?;
        if is_final(&m) {
            bar.finish_and_clear();
            return Ok(m);
        }
        let p = &m["progress"]["progress"];
        let pages = (p["memory_bytes"].as_u64().unwrap_or(0) / 4096).max(1);
        let sent = p["pages_sent"].as_u64().unwrap_or(0);
        bar.set_length(pages.max(sent));
        bar.set_position(sent.min(pages));
        let phase: MigrationPhase =
            serde_json::from_value(m["phase"].clone()).unwrap_or(MigrationPhase::Requesting);
        bar.set_message(format!(
            "{} {} -> {} | round {} | {:.1} MB on wire | {:.0} MB/s | eta {:.1} s",
            phase,
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            p["round"].as_u64().unwrap_or(0),
            p["wire_bytes"].as_f64().unwrap_or(0.0) / 1e6,
            p["throughput_bytes_per_sec"].as_f64().unwrap_or(0.0) / 1e6,
            p["eta_seconds"].as_f64().unwrap_or(0.0),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
