//! `tern`: run the control plane, mint API tokens, inspect configuration.

mod actorcmd;
mod agentcmd;

mod demo;
mod executor;
mod fleetcmd;
mod logging;
mod up;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tern_api::{AuthKeys, Permission};
use tern_config::{Config, Dur, Overrides};
use tern_proto::TenantId;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Run, heal and live-migrate isolated workloads"
)]
struct Cli {
    /// Configuration file (TOML). Default: <data-dir>/tern.toml if present.
    #[arg(long, global = true, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store, secrets, driver state).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the control plane: API, orchestrator and host agent in one process.
    Up {
        /// VM driver: mock, kvm, docker or agents (the joined fleet).
        #[arg(long)]
        driver: Option<String>,
        /// API listen address, e.g. 127.0.0.1:7070 (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Store URL (sqlite://PATH or postgres://...).
        #[arg(long)]
        store_url: Option<String>,
    },
    /// Print an API token signed with the configured secret.
    Token {
        /// Tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// Comma-separated permissions: vms:read, vms:write, platform:admin.
        #[arg(long, default_value = "vms:read,vms:write")]
        permissions: String,
        /// Lifetime, e.g. 1h, 30d is written 720h.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Print the effective configuration (secrets redacted) after validating it.
    Config,
    /// Run a microVM in the foreground with tern's own monitor.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Run this host's agent: hosts VMs, sends and accepts live migrations.
    Agent {
        /// The agent's configuration (TOML; see the README).
        file: PathBuf,
        /// Join the control plane at this URL (once; later starts find
        /// the membership in the data dir). Sets `[control_plane] url`;
        /// more URLs after commas are its other replicas, which heartbeats
        /// fall back to.
        #[arg(long)]
        join: Option<String>,
        /// The one-time join token an admin made
        /// (`POST /api/v1/hosts/join-tokens`).
        #[arg(long, env = "TERN_JOIN_TOKEN", hide_env_values = true)]
        join_token: Option<String>,
    },
    /// Run one guest in this process (the agent starts it; it outlives the agent).
    #[command(hide = true)]
    Guest {
        /// The guest's directory (`<data_dir>/vms/<name>`, holding `launch.json`).
        dir: PathBuf,
    },
    /// Live-migrate a VM from the agent it runs on to another host.
    Migrate(agentcmd::MigrateArgs),
    /// The fleet on this machine: a control plane, three agents joined,
    /// six VMs placed, one host drained live.
    Demo,
    /// The fleet's hosts, through the control plane: list, join tokens,
    /// drain, evacuate, remove.
    Host {
        #[command(subcommand)]
        cmd: fleetcmd::HostCmd,
    },
    /// Run this host's actor executor: WebAssembly actors, their moves,
    /// gossip with its peers, restores after a peer dies, the actor API.
    Executor {
        /// The executor's configuration (TOML; see the README).
        file: PathBuf,
        /// Print this executor's public checkpoint key (for its peers'
        /// configs) and exit.
        #[arg(long)]
        print_key: bool,
    },
    /// WebAssembly actors, through an executor's API.
    Actor {
        #[command(subcommand)]
        cmd: actorcmd::ActorCmd,
    },
    /// Make the host CA and host certificates for migration channels (mTLS).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a guest, stream its console, report the time to its ready line.
    Boot(VmBoot),
    #[command(flatten)]
    Remote(agentcmd::RemoteVm),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a CA (ca.pem, ca.key) in DIR (default <data-dir>/tls).
    Init {
        /// Where the CA goes.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Issue a certificate for a host, signed by the CA; prints its SPKI pin.
    Issue {
        /// Host name (also a subject alternative name).
        #[arg(long)]
        name: String,
        /// Directory of the CA and of the new files (default <data-dir>/tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

fn main() -> ExitCode {
    // Everything tern and its children write is its owner's alone (data
    // dirs 0700, files 0600): stores, tokens, tenant settings, guest memory.
    tern_agent::keys::private_umask();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut over = Overrides {
        config_file: cli.config,
        data_dir: cli.data_dir,
        ..Default::default()
    };
    let env = |k: &str| std::env::var(k).ok();
    match cli.cmd {
        Cmd::Up {
            driver,
            listen,
            store_url,
        } => {
            over.driver = driver;
            over.listen = listen;
            over.store_url = store_url;
            let cfg = Config::load(&over, env)?;
            up::run(cfg)
        }
        Cmd::Token {
            tenant,
            permissions,
            ttl,
        } => {
            let cfg = Config::load(&over, env)?;
            let tenant = TenantId::new(tenant)?;
            let perms = permissions
                .split(',')
                .map(|p| p.trim().parse::<Permission>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            let ttl: Dur = serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(&ttl))
            .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
            std::fs::create_dir_all(&cfg.data_dir)?;
            let keys = AuthKeys::from_secret(&cfg.jwt_secret()?);
            println!("{}", keys.issue(&tenant, &perms, ttl.0)?);
            Ok(())
        }
        Cmd::Vm {
            cmd: VmCmd::Boot(b),
        } => vm_boot(b),
        Cmd::Vm {
            cmd: VmCmd::Remote(r),
        } => agentcmd::vm_remote(r),
        Cmd::Executor { file, print_key } => {
            if print_key {
                executor::print_key(&file)
            } else {
                executor::run(&file)
            }
        }
        Cmd::Actor { cmd } => actorcmd::run(cmd),
        Cmd::Agent {
            file,
            join,
            join_token,
        } => agentcmd::agent(&file, join, join_token),
        Cmd::Guest { dir } => agentcmd::guest(&dir),
        Cmd::Migrate(a) => agentcmd::migrate(a),
        Cmd::Demo => demo::demo(),
        Cmd::Host { cmd } => {
            crate::logging::init();
            fleetcmd::host(cmd)
        }
        Cmd::Certs { cmd } => {
            let cfg = Config::load(&over, env)?;
            let default_dir = cfg.data_dir.join("tls");
            match cmd {
                CertsCmd::Init { dir } => {
                    let dir = dir.unwrap_or(default_dir);
                    let ca = tern_transport::certs::init_ca(&dir)?;
                    println!("CA certificate: {}", ca.display());
                    println!(
                        "CA key:         {} (keep it private)",
                        dir.join("ca.key").display()
                    );
                }
                CertsCmd::Issue { name, dir, days } => {
                    tern_proto::HostId::new(name.clone())?;
                    let dir = dir.unwrap_or(default_dir);
                    let valid = std::time::Duration::from_secs(days * 86400);
                    let out = tern_transport::certs::issue(&dir, &name, &dir, valid, false)?;
                    println!("certificate: {}", out.cert.display());
                    println!("key:         {}", out.key.display());
                    println!("spki pin:    {}", out.spki_sha256);
                }
            }
            Ok(())
        }
        Cmd::Config => {
            let mut cfg = Config::load(&over, env)?;
            if cfg.jwt_secret.is_some() {
                cfg.jwt_secret = Some("<redacted>".into());
            }
            print!("{}", toml::to_string_pretty(&cfg)?);
            Ok(())
        }
    }
}

/// What `tern vm boot` was asked to do.
#[derive(clap::Args)]
struct VmBoot {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest: `test` (tern's freestanding test guest) or `linux` (a
    /// bzImage; needs hardware virtualization to boot in useful time).
    #[arg(long, value_enum, default_value_t = tern_vmm::monitor::GuestKind::Test)]
    guest: tern_vmm::monitor::GuestKind,
    /// Linux: the bzImage (default: the newest /boot/vmlinuz-*).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Linux: the initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Linux: the kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// The console line that means ready (default: the test guest's, or
    /// "tern-ready" for Linux).
    #[arg(long)]
    ready_line: Option<String>,
    /// Keep running this long after ready, printing the agent's reports.
    #[arg(long, default_value = "2s")]
    run_for: String,
}

/// The newest Debian kernel in /boot, for `--guest linux` without `--kernel`.
fn default_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// `tern vm boot`: launch to ready line, then a few seconds of agent reports.
fn vm_boot(b: VmBoot) -> anyhow::Result<()> {
    let run_for: Dur = serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<
        serde::de::value::Error,
    >::new(&b.run_for))
    .map_err(|e| anyhow::anyhow!("--run-for: {e}"))?;
    let run_for = run_for.0;
    use std::time::{Duration, Instant};
    use tern_vmm::monitor::GuestKind;
    use tern_vmm::WaitOutcome;
    let t0 = Instant::now();
    let cfg = tern_vmm::MachineConfig {
        memory_mib: b.memory,
        vcpus: b.vcpus,
        console_tee: Some(Box::new(std::io::stdout())),
        ..Default::default()
    };
    let (machine, ready_line) = match b.guest {
        GuestKind::Test => (
            tern_vmm::boot_test_guest(
                cfg,
                &tern_vmm::TestGuestConfig::default(),
                std::path::Path::new(tern_vmm::TEST_GUEST_ELF),
            )?,
            b.ready_line
                .unwrap_or_else(|| tern_vmm::TEST_GUEST_READY.to_string()),
        ),
        GuestKind::Linux => {
            let kernel = b.kernel.or_else(default_kernel).ok_or_else(|| {
                anyhow::anyhow!("--guest linux: no --kernel given and no /boot/vmlinuz-* found")
            })?;
            if !tern_vmm::has_hardware_virtualization() {
                eprintln!(
                    "warning: this host's KVM has no hardware virtualization (no vmx/svm flag); \
                     a Linux kernel will not boot in useful time here"
                );
            }
            (
                tern_vmm::boot_linux(
                    cfg,
                    &tern_vmm::x86::LinuxBoot {
                        kernel: &kernel,
                        initrd: b.initrd.as_deref(),
                        cmdline: &b.cmdline,
                    },
                )?,
                b.ready_line.unwrap_or_else(|| "tern-ready".to_string()),
            )
        }
    };
    let created = t0.elapsed();
    machine.resume()?;
    let outcome = machine.wait_until(Duration::from_secs(60), |d| {
        d.console().recent_contains(&ready_line)
    });
    let ready = t0.elapsed();
    println!();
    if outcome != WaitOutcome::Satisfied {
        anyhow::bail!("guest did not print {ready_line:?}: {outcome:?}");
    }
    println!(
        "boot: {:.2} ms to ready line (monitor set-up {:.2} ms, guest {:.2} ms)",
        ready.as_secs_f64() * 1e3,
        created.as_secs_f64() * 1e3,
        (ready - created).as_secs_f64() * 1e3
    );
    let start = Instant::now();
    while start.elapsed() < run_for {
        let step = Duration::from_millis(500).min(run_for.saturating_sub(start.elapsed()));
        if let WaitOutcome::Exited(r) = machine.wait_until(step, |_| false) {
            println!("guest exited: {r}");
            return Ok(());
        }
        let a = machine.with_devices(|d| d.agent.clone());
        match a.checksum {
            Some((at, sum)) => println!(
                "agent: counter {} (checksum {sum:#018x} at {at})",
                a.counter
            ),
            None => println!("agent: counter {}", a.counter),
        }
    }
    let counter = machine.with_devices(|d| d.agent.counter);
    println!(
        "ran {:.1} s after ready: counter {counter} ({:.0} reports/s)",
        start.elapsed().as_secs_f64(),
        counter as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
