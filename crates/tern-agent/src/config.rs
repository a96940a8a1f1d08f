//! The agent's configuration: who this host is, where it listens, which
//! hosts it trusts. Read from a TOML file; every field has a sane default
//! except the host name.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A bad configuration, named by key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Mutual TLS material (from `tern certs`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This host's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The fleet CA (PEM) that signs every host's certificate.
    pub ca: PathBuf,
}

/// Another host this agent migrates to or accepts migrations from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its host name (also the name in its TLS certificate).
    pub name: String,
    /// Its migration listener.
    pub migrate_addr: SocketAddr,
    /// Its Ed25519 host key (hex), which signs its migration manifests.
    pub key: String,
    /// The SHA-256 pin (hex) of its TLS certificate's public key, as
    /// `tern certs issue` prints it: TLS accepts only pinned peers.
    #[serde(default)]
    pub tls_pin: Option<String>,
}

/// The control plane this host joins (`[control_plane]`): it issues the
/// host's certificate and names its peers, so neither is configured here.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// The control plane's API (`http://host:port`).
    pub url: String,
    /// Other replicas of the control plane (sharing its database): a
    /// heartbeat that `url` does not answer goes to them in turn.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Seconds between heartbeats. Default 5.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// This host's labels (`region = "eu"`): VMs that require a label are
    /// placed and migrated only where it is.
    #[serde(default)]
    pub labels: tern_proto::Labels,
    /// The URL the control plane reaches this host's API at (default:
    /// `http://` + `api_addr`).
    #[serde(default)]
    pub api_url: Option<String>,
    /// Guest memory (MiB) and vCPUs this host offers (default: its
    /// memory less 1 GiB, and its cores).
    #[serde(default)]
    pub capacity: Option<tern_proto::Capacity>,
}

impl ControlPlane {
    /// Defaults for everything but the URL.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.into(),
            replicas: Vec::new(),
            heartbeat_secs: default_heartbeat(),
            labels: Default::default(),
            api_url: None,
            capacity: None,
        }
    }
}

fn default_heartbeat() -> u64 {
    5
}

/// The whole agent configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name (unique in the fleet; in its TLS certificate).
    pub name: String,
    /// The host API (the CLI talks to it). Default 127.0.0.1:7070.
    #[serde(default = "default_api")]
    pub api_addr: SocketAddr,
    /// Where migrations arrive. Default 127.0.0.1:7071.
    #[serde(default = "default_migrate")]
    pub migrate_addr: SocketAddr,
    /// Address peers dial to reach `migrate_addr` (default: `migrate_addr`).
    #[serde(default)]
    pub advertise_addr: Option<SocketAddr>,
    /// Host key, API token and the migration journal live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Mutual TLS for migrations; required unless `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Carry migrations over plain TCP. Only for tests on one machine.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Hosts this one trusts (none when it joins a control plane, which
    /// names them).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// The control plane this host joined or joins (`tern agent --join`).
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Largest guest RAM accepted from a peer, MiB. Default 4096.
    #[serde(default = "default_max_memory")]
    pub max_memory_mib: u64,
    /// Most vCPUs accepted from a peer. Default 8.
    #[serde(default = "default_max_vcpus")]
    pub max_vcpus: u8,
    /// The host's bandwidth for outgoing migrations, MB/s (default: no
    /// cap). Shared by class (evacuation, maintenance, manual, rebalance,
    /// by weight 8:4:2:1), then evenly within a class, each migration
    /// under its own cap as well.
    #[serde(default)]
    pub host_bandwidth_mbps: Option<u64>,
    /// How long a migration session waits for a dropped link, seconds. Default 30.
    #[serde(default = "default_resume")]
    pub resume_deadline_secs: u64,
    /// Kernel that Linux guests boot (`scripts/guest-kernel.sh` fetches
    /// Debian's). Without it the agent hosts no Linux guests.
    #[serde(default)]
    pub guest_kernel: Option<PathBuf>,
    /// Initramfs of Linux guests (with tern's workload).
    #[serde(default)]
    pub guest_initrd: Option<PathBuf>,
    /// The host API's connection limits and timeouts.
    #[serde(default)]
    pub http: tern_httpd::Limits,
    /// Jail test guests' processes (`[jail]`): a chroot of their own
    /// directory, a cgroup, an unprivileged uid, a seccomp filter. Off when
    /// the table is left out.
    #[serde(default)]
    pub jail: Option<tern_jail::JailConfig>,
    /// Containers (`[container]`): the root filesystem they run and the
    /// CRIU that checkpoints them. Without it the agent hosts no containers.
    #[serde(default)]
    pub container: Option<ContainerHost>,
}

/// What a host needs to run and move containers (`[container]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerHost {
    /// The root filesystem tarball containers start from (with tern's
    /// counter: `scripts/workload-rootfs.sh` builds one).
    pub rootfs: PathBuf,
    /// A CRIU that passes `criu check` (default: `criu` on PATH, then the
    /// cached build of `scripts/criu-setup.sh`).
    #[serde(default)]
    pub criu: Option<PathBuf>,
    /// The interface neighbours reach this host on: the host answers ARP
    /// there for its containers' addresses and announces one that arrives
    /// (gratuitous ARP with `arping`). None: addresses are routed here
    /// by the operator's own means.
    #[serde(default)]
    pub uplink: Option<String>,
}

fn default_api() -> SocketAddr {
    "127.0.0.1:7070".parse().expect("literal")
}
fn default_migrate() -> SocketAddr {
    "127.0.0.1:7071".parse().expect("literal")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/tern/agent")
}
fn default_max_memory() -> u64 {
    4096
}
fn default_max_vcpus() -> u8 {
    8
}
fn default_resume() -> u64 {
    30
}

impl AgentConfig {
    /// A configuration with defaults for everything but the name.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            api_addr: default_api(),
            migrate_addr: default_migrate(),
            advertise_addr: None,
            data_dir: default_data_dir(),
            tls: None,
            insecure_plaintext: false,
            peers: Vec::new(),
            control_plane: None,
            max_memory_mib: default_max_memory(),
            max_vcpus: default_max_vcpus(),
            resume_deadline_secs: default_resume(),
            host_bandwidth_mbps: None,
            guest_kernel: None,
            guest_initrd: None,
            http: tern_httpd::Limits::default(),
            jail: None,
            container: None,
        }
    }

    /// Reads and checks a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks a configuration's text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return bad("name", format!("`{}` is not a host name", self.name));
        }
        if let Err(e) = self.http.validate() {
            return bad("http", e);
        }
        if self.host_bandwidth_mbps == Some(0) {
            return bad(
                "host_bandwidth_mbps",
                "must be above 0 (leave it out for no cap)".into(),
            );
        }
        if let Some(Err(e)) = self.jail.as_ref().map(tern_jail::JailConfig::validate) {
            return bad("jail", e);
        }
        if let Some(c) = &self.container {
            let bad_if = |i: &String| {
                i.is_empty()
                    || i == "."
                    || i == ".."
                    || i.len() > 15
                    || !i
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            };
            if c.uplink.as_ref().is_some_and(bad_if) {
                return bad("container", "uplink must be an interface name".into());
            }
            if !c.rootfs.is_absolute() || c.criu.as_ref().is_some_and(|p| !p.is_absolute()) {
                return bad("container", "rootfs and criu must be absolute paths".into());
            }
        }
        if let Some(cp) = &self.control_plane {
            return self.validate_joined(cp);
        }
        if self.tls.is_none() && !self.insecure_plaintext {
            return bad(
                "tls",
                "migrations need mutual TLS (cert, key, ca); set insecure_plaintext = true only for tests".into(),
            );
        }
        for (i, p) in self.peers.iter().enumerate() {
            if crate::keys::parse_public(&p.key).is_err() {
                return bad(
                    &format!("peers[{i}].key"),
                    format!("`{}` is not a hex Ed25519 public key", p.key),
                );
            }
            if self.tls.is_some() {
                match &p.tls_pin {
                    None => {
                        return bad(
                            &format!("peers[{i}].tls_pin"),
                            "required with tls (see `tern certs issue`)".into(),
                        )
                    }
                    Some(pin) if tern_transport::tls::parse_pin(pin).is_err() => {
                        return bad(
                            &format!("peers[{i}].tls_pin"),
                            format!("`{pin}` is not 64 hex digits"),
                        )
                    }
                    Some(_) => {}
                }
            }
            if p.name == self.name {
                return bad(
                    &format!("peers[{i}].name"),
                    "a host cannot be its own peer".into(),
                );
            }
        }
        if self.max_vcpus == 0 || self.max_memory_mib == 0 {
            return bad("max_vcpus/max_memory_mib", "must be above zero".into());
        }
        Ok(())
    }

    /// A host that joins a control plane gets its certificate and peers
    /// from it, and always speaks TLS.
    fn validate_joined(&self, cp: &ControlPlane) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        let http =
            |u: &str| (u.starts_with("http://") || u.starts_with("https://")) && u.len() <= 256;
        if !http(&cp.url) {
            return bad("control_plane.url", "must be an http:// or https:// URL");
        }
        if let Some(u) = cp.replicas.iter().find(|u| !http(u)) {
            return bad(
                "control_plane.replicas",
                &format!("`{u}` is not an http:// or https:// URL"),
            );
        }
        if cp.api_url.as_deref().is_some_and(|u| !http(u)) {
            return bad(
                "control_plane.api_url",
                "must be an http:// or https:// URL",
            );
        }
        if !(1..=300).contains(&cp.heartbeat_secs) {
            return bad("control_plane.heartbeat_secs", "must be in 1..=300");
        }
        if self.insecure_plaintext || !self.peers.is_empty() {
            return bad(
                "control_plane",
                "a joined host gets its certificate and peers from the control plane: drop `insecure_plaintext` and `peers`",
            );
        }
        if self.max_vcpus == 0 || self.max_memory_mib == 0 {
            return bad("max_vcpus/max_memory_mib", "must be above zero");
        }
        self.http.validate().or_else(|e| bad("http", &e))
    }

    /// What peers dial.
    pub fn advertised(&self) -> SocketAddr {
        self.advertise_addr.unwrap_or(self.migrate_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tls_is_refused_by_key() {
        let cfg = AgentConfig::new("host-a");
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("`tls`"), "{e}");
    }

    #[test]
    fn bad_peer_key_is_named() {
        let mut cfg = AgentConfig::new("host-a");
        cfg.insecure_plaintext = true;
        cfg.peers.push(Peer {
            name: "host-b".into(),
            migrate_addr: "127.0.0.1:1".parse().unwrap(),
            key: "xyz".into(),
            tls_pin: None,
        });
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("peers[0].key"), "{e}");
    }

    #[test]
    fn toml_round_trips_with_defaults() {
        let cfg: AgentConfig =
            toml::from_str("name = \"h1\"\ninsecure_plaintext = true\n").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.api_addr, default_api());
        assert!(toml::from_str::<AgentConfig>("name = \"h1\"\nbogus = 1\n").is_err());
    }
}
