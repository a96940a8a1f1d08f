//! `tern agent`, `tern migrate`, the host-API `tern vm` commands and
//! `tern demo`: the command-line face of the host agent.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_agent::{AgentClient, AgentConfig, MigrateRequest, MigrationPhase, MigrationView};
use tern_proto::GuestSpec;

/// How to reach an agent's API.
#[derive(clap::Args, Clone)]
pub struct AgentConn {
    /// The agent's API URL.
    #[arg(long, env = "TERN_AGENT", default_value = "http://127.0.0.1:7070")]
    pub agent: String,
    /// Its API token (default: read from --token-file).
    #[arg(long, env = "TERN_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (the agent writes <data_dir>/api-token).
    #[arg(long, default_value = "/var/lib/tern/agent/api-token")]
    pub token_file: PathBuf,
}

impl AgentConn {
    fn client(&self) -> anyhow::Result<AgentClient> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(&self.token_file)
                .with_context(|| {
                    format!(
                        "no --token given and cannot read {}",
                        self.token_file.display()
                    )
                })?
                .trim()
                .to_string(),
        };
        Ok(AgentClient::new(&self.agent, &token))
    }
}

/// `tern migrate`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The VM to move.
    pub vm: String,
    /// Destination host (a peer in the agent's configuration; with --api,
    /// optional: the scheduler picks).
    #[arg(long)]
    pub to: Option<String>,
    #[command(flatten)]
    pub fleet: crate::fleetcmd::FleetOpt,
    /// precopy, postcopy or hybrid (pre-copy rounds, then post-copy).
    #[arg(long, default_value = "precopy")]
    pub mode: String,
    /// Downtime budget in ms.
    #[arg(long, default_value_t = 50)]
    pub max_downtime: u64,
    /// Bandwidth cap in MB/s (default: none).
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// Give up (roll back) if switchover has not begun after this many seconds.
    #[arg(long)]
    pub deadline: Option<u64>,
    /// When pre-copy stalls under --bandwidth, raise it up to this (MB/s)
    /// before throttling the guest.
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
    /// Do not throttle a guest whose pre-copy does not converge.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Compression on the wire: auto (default), none, lz4, zstd. Native
    /// guests: auto picks per frame from the link rate and the pages; Linux
    /// guests and containers: auto is zstd under --bandwidth, else none.
    #[arg(long)]
    pub compress: Option<String>,
    /// Print the final report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: AgentConn,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs an agent until it is killed.
pub fn agent(file: &Path, join: Option<String>, join_token: Option<String>) -> anyhow::Result<()> {
    crate::logging::init();
    let mut cfg = AgentConfig::load(file)?;
    if let Some(urls) = join {
        // `--join URL[,REPLICA...]`: join the first, beat to any.
        let mut urls = urls.split(',').map(str::trim).filter(|u| !u.is_empty());
        let url = urls.next().context("--join needs a URL")?;
        let replicas: Vec<String> = urls.map(String::from).collect();
        match &mut cfg.control_plane {
            Some(cp) => {
                cp.url = url.into();
                if !replicas.is_empty() {
                    cp.replicas = replicas;
                }
            }
            None => {
                let mut cp = tern_agent::ControlPlane::new(url);
                cp.replicas = replicas;
                cfg.control_plane = Some(cp);
            }
        }
        cfg.validate()?;
    }
    runtime()?.block_on(tern_agent::serve(cfg, join_token.as_deref()))?;
    Ok(())
}

/// Runs one guest process (see `tern_agent::guestproc`), logging to stderr
/// (the agent points it at the guest's `guest.log`).
pub fn guest(dir: &Path) -> anyhow::Result<()> {
    // Nothing the agent had open follows the guest (into its jail).
    tern_vmm::close_inherited_fds()?;
    crate::logging::init();
    tern_agent::guestproc::main(dir)?;
    Ok(())
}

/// Starts a migration and follows it to the end with a progress bar.
pub fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    if let Some(api) = a.fleet.conn()? {
        return crate::fleetcmd::migrate(&a, &api);
    }
    let to = a
        .to
        .clone()
        .context("--to names the destination host (or use --api to let the control plane pick)")?;
    let to = tern_proto::HostId::new(to)?;
    let vm: tern_proto::VmId = a.vm.parse()?;
    let client = a.conn.client()?;
    runtime()?.block_on(async {
        let req = MigrateRequest {
            to,
            mode: a.mode.clone(),
            max_downtime_ms: Some(a.max_downtime),
            bandwidth_mbps: a.bandwidth,
            deadline_secs: a.deadline,
            max_bandwidth_mbps: a.max_bandwidth,
            auto_converge: Some(!a.no_auto_converge),
            compress: a.compress.clone(),
            id: None,
            reason: None,
        };
        let started = client.migrate(&vm, &req).await?;
        let done = follow(&client, &started.id, !a.json).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&done)?);
        } else {
            print_report(&done);
        }
        if done.state != MigrationPhase::Committed {
            bail!(
                "migration {} {:?}: {}",
                done.id,
                done.state,
                done.error.unwrap_or_default()
            );
        }
        Ok(())
    })
}

/// How long `tern migrate` waits for an agent that stopped answering.
const AGENT_RESTART_WAIT: Duration = Duration::from_secs(60);

/// A bar of pages sent for migration `id` (hidden unless `show`).
pub(crate) fn pages_bar(id: &str, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:32}] {pos}/{len} pages {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix(id.to_string());
    bar
}

/// Polls a migration until it ends, drawing a bar of pages sent.
async fn follow(
    client: &AgentClient,
    id: &tern_proto::MigrationId,
    show: bool,
) -> anyhow::Result<MigrationView> {
    let bar = pages_bar(id.as_str(), show);
    let mut unreachable_since: Option<std::time::Instant> = None;
    loop {
        // An agent restarting mid-migration is waited for: the migration
        // runs on in the guest's process, and the agent that comes back
        // knows how it ended.
        let v = match client.migration(id).await {
            Ok(v) => {
                unreachable_since = None;
                v
            }
            Err(tern_agent::ClientError::Unreachable { .. })
                if unreachable_since
                    .get_or_insert_with(std::time::Instant::now)
                    .elapsed()
                    < AGENT_RESTART_WAIT =>
            {
                bar.set_message("the agent does not answer; waiting for it".to_string());
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let p = &v.progress;
        let pages = (p.memory_bytes / 4096).max(1);
        bar.set_length(pages.max(p.pages_sent));
        bar.set_position(p.pages_sent.min(bar.length().unwrap_or(pages)));
        bar.set_message(format!(
            "{} round {} | {:.1} MB on wire | {:.0} MB/s | dirty {:.0} pages/s | predicted downtime {:.1} ms | eta {:.1} s",
            p.phase,
            p.round,
            p.wire_bytes as f64 / 1e6,
            p.throughput_bytes_per_sec / 1e6,
            p.dirty_pages_per_sec,
            p.predicted_downtime_ms,
            p.eta_seconds
        ));
        if v.state.is_final() {
            bar.finish_and_clear();
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_report(v: &MigrationView) {
    println!(
        "migration {} of {} to {}: {:?}",
        v.id, v.vm, v.peer, v.state
    );
    if let Some(e) = &v.error {
        println!("  error: {e}");
    }
    if let Some(r) = &v.report {
        print_report_body(r);
    }
}

/// A migration report's rounds and figures.
pub(crate) fn print_report_body(r: &tern_agent::Report) {
    println!("  round  pages     wire MB   seconds  dirtied  predicted downtime ms");
    for s in &r.rounds {
        println!(
            "  {:>5}  {:>8}  {:>8.2}  {:>8.3}  {:>7}  {:>8.2}",
            s.round,
            s.pages,
            s.wire_bytes as f64 / 1e6,
            s.seconds,
            s.dirtied,
            s.predicted_downtime_ms
        );
    }
    let ram = r.memory_bytes.max(1) as f64;
    if r.bandwidth_raised_to > 0 {
        println!(
            "  pre-copy stalled: bandwidth raised to {:.0} MB/s",
            r.bandwidth_raised_to as f64 / 1e6
        );
    }
    if r.throttle_percent > 0 {
        println!(
            "  auto-converge: the guest was throttled up to {} %",
            r.throttle_percent
        );
    }
    if r.pages_never_written > 0 {
        println!(
            "  {} pages never written by the guest: not sent (zeros on both sides)",
            r.pages_never_written
        );
    }
    if r.postcopy {
        println!(
                "  post-copy: {:.1} ms after the guest started on the target, {} page faults served first",
                r.postcopy_ms, r.faults_served
            );
    }
    println!(
            "  total {:.1} ms | downtime {:.1} ms (pause → running on the target) | {} pages | {:.2} MB on the wire ({:.3}× guest RAM of {} MiB)",
            r.total_ms,
            r.downtime_ms,
            r.pages_sent,
            r.wire_bytes as f64 / 1e6,
            r.wire_bytes as f64 / ram,
            r.memory_bytes >> 20
        );
    let s = &r.switchover;
    if s.ready_ms > 0.0 {
        println!(
                "  downtime steps: pause {:.1} | last pages + state {:.1} | target verifies → ready {:.1} | commit record {:.1} | commit → running {:.1} ms",
                s.pause_ms, s.send_ms, s.ready_ms, s.commit_record_ms, s.running_ms
            );
    }
}

/// `tern vm create|list|show|stop` against an agent.
pub fn vm_remote(cmd: RemoteVm) -> anyhow::Result<()> {
    if let Some(api) = cmd.fleet().conn()? {
        return crate::fleetcmd::vm(cmd, &api);
    }
    runtime()?.block_on(async {
        match cmd {
            RemoteVm::Create { spec, conn, .. } => {
                let v = conn.client()?.create_vm(&spec.try_into()?).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            RemoteVm::List { conn, .. } => {
                for v in conn.client()?.vms().await? {
                    println!(
                        "{}  {:?}  epoch {}  counter {}  {}",
                        v.id,
                        v.status,
                        v.epoch,
                        v.counter.map(|c| c.to_string()).unwrap_or("-".into()),
                        v.moved_to
                            .map(|h| format!("moved to {h}"))
                            .unwrap_or_default()
                    );
                }
            }
            RemoteVm::Show { id, conn, .. } => {
                let v = conn.client()?.vm(&id.parse()?).await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            RemoteVm::Stop { id, conn, .. } => conn.client()?.stop_vm(&id.parse()?).await?,
        }
        Ok(())
    })
}

/// The guest to boot on an agent.
#[derive(clap::Args)]
pub struct SpecArgs {
    /// test-guest (KVM), process (a memory workload dirtied by a thread),
    /// linux (a Linux guest in QEMU running tern's workload; the agent needs
    /// guest_kernel in its config) or container (tern's counter under runc;
    /// the agent needs [container] in its config).
    #[arg(long, default_value = "test-guest")]
    kind: String,
    /// Linux guests and containers: the workload's working set, MiB.
    #[arg(long, default_value_t = 16)]
    ws_mib: u64,
    /// Containers: the TCP port the counter answers on (0: none).
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    /// Process, Linux and container workloads: MiB/s written across the working set.
    #[arg(long, default_value_t = 100)]
    dirty_mib_per_sec: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 64)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Pages the test guest keeps rewriting.
    #[arg(long, default_value_t = 256)]
    ws_pages: u64,
    /// Pages it writes per tick.
    #[arg(long, default_value_t = 4)]
    pages_per_tick: u64,
    /// With --api: the image (`test`, `process` or a catalogue name;
    /// default from --kind).
    #[arg(long)]
    pub image: Option<String>,
    /// With --api: a label the VM's host must have (`region=eu`), repeatable.
    #[arg(long = "label")]
    pub labels: Vec<String>,
}

impl SpecArgs {
    /// The control plane's spec of this VM.
    pub fn fleet_spec(&self) -> anyhow::Result<tern_proto::VmSpec> {
        let image = match (&self.image, self.kind.as_str()) {
            (Some(i), _) => i.clone(),
            (None, "test-guest") => "test".into(),
            (None, "process") => "process".into(),
            (None, "container") => tern_proto::CONTAINER_IMAGE.into(),
            (None, k) => bail!("--kind {k} through the control plane: name its image with --image"),
        };
        let mut labels = tern_proto::Labels::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label {l}: expected KEY=VALUE"))?;
            labels.insert(k.into(), v.into());
        }
        Ok(tern_proto::VmSpec {
            memory_mib: u32::try_from(self.memory).context("--memory is too large")?,
            vcpus: self.vcpus,
            image,
            labels,
        })
    }
}

impl TryFrom<SpecArgs> for GuestSpec {
    type Error = anyhow::Error;
    fn try_from(a: SpecArgs) -> anyhow::Result<Self> {
        let kind = match a.kind.as_str() {
            "test-guest" => tern_proto::GuestKind::TestGuest,
            "process" => tern_proto::GuestKind::Process,
            "linux" => tern_proto::GuestKind::Linux,
            "container" => tern_proto::GuestKind::Container,
            other => bail!("--kind {other}: expected test-guest, process, linux or container"),
        };
        Ok(GuestSpec {
            kind,
            dirty_mib_per_sec: a.dirty_mib_per_sec,
            memory_mib: a.memory,
            vcpus: a.vcpus,
            ws_pages: a.ws_pages,
            pages_per_tick: a.pages_per_tick,
            ws_mib: a.ws_mib,
            listen_port: a.listen_port,
            ..Default::default()
        })
    }
}

/// VM commands served by an agent, or with `--api` by the control plane.
#[derive(clap::Subcommand)]
pub enum RemoteVm {
    /// Boot a test-guest VM on an agent.
    Create {
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        conn: AgentConn,
        #[command(flatten)]
        fleet: crate::fleetcmd::FleetOpt,
    },
    /// List an agent's VMs.
    List {
        #[command(flatten)]
        conn: AgentConn,
        #[command(flatten)]
        fleet: crate::fleetcmd::FleetOpt,
    },
    /// Show one VM.
    Show {
        /// The VM.
        id: String,
        #[command(flatten)]
        conn: AgentConn,
        #[command(flatten)]
        fleet: crate::fleetcmd::FleetOpt,
    },
    /// Stop a VM.
    Stop {
        /// The VM.
        id: String,
        #[command(flatten)]
        conn: AgentConn,
        #[command(flatten)]
        fleet: crate::fleetcmd::FleetOpt,
    },
}

impl RemoteVm {
    fn fleet(&self) -> &crate::fleetcmd::FleetOpt {
        match self {
            RemoteVm::Create { fleet, .. }
            | RemoteVm::List { fleet, .. }
            | RemoteVm::Show { fleet, .. }
            | RemoteVm::Stop { fleet, .. } => fleet,
        }
    }
}
