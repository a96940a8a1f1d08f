//! The executor's configuration file (TOML).
//!
//! ```toml
//! name = "exec-a"
//! data_dir = "/var/lib/tern/executor"
//! listen = "10.0.0.2:7400"        # actor protocol, mutual TLS
//! api = "10.0.0.2:7402"           # REST API
//! jwt_secret_file = "/etc/tern/jwt.secret"
//! # failover = true               # replicate checkpoints, restore after faults
//! # capacity = 1024               # actors at most
//! # max_state_bytes = 268435456   # largest actor state taken
//!
//! [tls]
//! cert = "tls/exec-a.pem"
//! key = "tls/exec-a.key"
//! ca = "tls/ca.pem"
//!
//! [gossip]
//! listen = "10.0.0.2:7401"
//! seeds = ["10.0.0.3:7401"]
//! # interval_ms = 100
//!
//! [[peers]]
//! name = "exec-b"
//! pin = "<SPKI SHA-256 of its certificate, hex>"   # tern certs issue prints it
//! key = "<its checkpoint key, hex>"                # tern executor --print-key
//! # addr = "10.0.0.3:7400"                         # else learnt by gossip
//! ```

use anyhow::Context;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tern_proto::ExecutorId;

/// See the module docs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    pub name: ExecutorId,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub api: SocketAddr,
    pub jwt_secret_file: PathBuf,
    #[serde(default = "yes")]
    pub failover: bool,
    #[serde(default = "default_capacity")]
    pub capacity: usize,
    #[serde(default = "default_max_state")]
    pub max_state_bytes: u64,
    pub tls: TlsFiles,
    pub gossip: Option<Gossip>,
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
}

/// The executor's certificate, key and CA.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Where to gossip and with whom to start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gossip {
    pub listen: SocketAddr,
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
}

/// A trusted peer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub name: ExecutorId,
    pin: String,
    key: String,
    pub addr: Option<SocketAddr>,
}

impl PeerEntry {
    pub fn pin(&self) -> anyhow::Result<[u8; 32]> {
        tern_transport::tls::parse_pin(&self.pin)
            .with_context(|| format!("peer {}: pin", self.name))
    }

    pub fn key(&self) -> anyhow::Result<[u8; 32]> {
        let bytes = hex::decode(self.key.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .with_context(|| format!("peer {}: key is not 32 bytes of hex", self.name))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .with_context(|| format!("peer {}: key is not an Ed25519 public key", self.name))?;
        Ok(bytes)
    }
}

fn yes() -> bool {
    true
}

fn default_capacity() -> usize {
    1024
}

fn default_max_state() -> u64 {
    256 << 20
}

fn default_interval() -> u64 {
    100
}

impl ExecutorConfig {
    /// Reads and checks `file`; paths in it are relative to its directory.
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let de = toml::Deserializer::new(&text);
        let mut cfg: Self = serde_path_to_error::deserialize(de)
            .with_context(|| format!("in {}", file.display()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.jwt_secret_file,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
            &mut cfg.tls.ca,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if cfg.peers.iter().any(|p| p.name == cfg.name) {
            anyhow::bail!(
                "{}: `{}` is listed among its own peers",
                file.display(),
                cfg.name
            );
        }
        for p in &cfg.peers {
            p.pin()?;
            p.key()?;
        }
        if let Some(g) = &cfg.gossip {
            if !(10..=10_000).contains(&g.interval_ms) {
                anyhow::bail!("{}: gossip interval_ms must be 10 to 10000", file.display());
            }
        }
        Ok(cfg)
    }
}
