//! `tern`: run the control plane, mint API tokens, inspect configuration.

mod config;
mod up;

use clap::{Parser, Subcommand};
use config::{Config, Dur, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;
use tern_api::{AuthKeys, Permission};
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
        /// VM driver (mock).
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
    /// Make the host CA and host certificates for migration channels (mTLS).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
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
