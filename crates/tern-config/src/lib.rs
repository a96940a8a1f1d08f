//! Configuration: defaults, then a TOML file, then `TERN_*` environment
//! variables, then command-line flags. Every error names the key that is wrong
//! (and the environment variable, when that is where the value came from).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_drivers::images::{ImageCatalogue, ImageDef};
use tern_drivers::mock::MockFaults;
use tern_proto::{HostId, Quotas, TenantId, VmSpec};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key has a bad value (or is unknown).
    #[error("config key `{key}`{origin}: {message}")]
    Key {
        /// Dotted key path.
        key: String,
        /// ` (from TERN_X)` when set from the environment.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Which hypervisor driver runs VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// In-memory VMs with fault injection.
    Mock,
    /// tern's own KVM monitor, one `tern-vmm` process per VM.
    Kvm,
    /// The hosts that joined this control plane (`tern agent --join`):
    /// each VM is placed by the scheduler and runs under a host's agent.
    Agents,
    /// Containers of the local Docker Engine (`[docker]`), one per VM.
    Docker,
}

/// Settings of the kvm driver.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvmConfig {
    /// The `tern-vmm` monitor binary; default: beside `tern`, else on PATH.
    pub monitor: Option<PathBuf>,
    /// Jail each monitor (`[kvm.jail]`): its own room, a cgroup, an
    /// unprivileged uid, seccomp. Off when left out.
    pub jail: Option<tern_jail::JailConfig>,
}

/// A duration written as `500ms`, `30s`, `10m`, `1h` or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 30s, 10m, 1h)"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => {
                return Err(format!(
                    "`{s}` has unknown unit `{unit}` (use ms, s, m or h)"
                ))
            }
        };
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Text(s) => Dur::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }
}

/// Warm pool settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Warm VMs to keep ready.
    pub size: usize,
    /// Warm VMs idle longer than this are recycled.
    pub idle_ttl: Dur,
    /// How often the pool is reconciled.
    pub reconcile_interval: Dur,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size: 2,
            idle_ttl: Dur(Duration::from_secs(3600)),
            reconcile_interval: Dur(Duration::from_secs(30)),
        }
    }
}

/// Health check settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often running VMs are probed.
    pub interval: Dur,
    /// Probes in flight at once.
    pub concurrency: usize,
    /// Failures in a row before a VM is replaced.
    pub max_consecutive_failures: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Dur(Duration::from_secs(10)),
            concurrency: 10,
            max_consecutive_failures: 3,
        }
    }
}

/// The fleet (`driver = "agents"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A host whose heartbeats stop for this long is down: its VMs restart
    /// on other hosts (and its own copies are fenced if it comes back).
    pub host_down_after: Dur,
    /// Bandwidth cap of each migration a drain makes, MB/s (default none):
    /// a maintenance drain need not take the whole link from the guests.
    pub drain_bandwidth_mbps: Option<u64>,
    /// Bandwidth cap of each migration the load policy makes, MB/s.
    pub rebalance_bandwidth_mbps: Option<u64>,
    /// How often the load policy looks for hot hosts to relieve (`0s`:
    /// never).
    pub rebalance_interval: Dur,
    /// A host above this pressure (the highest of its memory and vCPU
    /// allocation and its CPU use, 0..1) sheds VMs to the least loaded
    /// hosts that fit.
    pub rebalance_threshold: f64,
    /// Migrations a host takes part in at once, as source or target:
    /// more wait in the queue, most urgent first.
    pub max_migrations_per_host: u32,
    /// Migrations at once between one pair of hosts.
    pub max_migrations_per_link: u32,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            host_down_after: Dur(Duration::from_secs(15)),
            drain_bandwidth_mbps: None,
            rebalance_bandwidth_mbps: None,
            rebalance_interval: Dur(Duration::from_secs(30)),
            rebalance_threshold: 0.85,
            max_migrations_per_host: 2,
            max_migrations_per_link: 1,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Hypervisor driver.
    pub driver: DriverKind,
    /// API listen address.
    pub listen: String,
    /// Where the store, secrets and driver state live.
    pub data_dir: PathBuf,
    /// Store URL; default `sqlite://<data_dir>/tern.db`.
    pub store_url: Option<String>,
    /// HS256 secret for API tokens; default: generated once into `<data_dir>/jwt-secret`.
    pub jwt_secret: Option<String>,
    /// This host's id in owner records.
    pub host_id: String,
    /// Warm pool.
    pub pool: PoolConfig,
    /// Health checks.
    pub health: HealthConfig,
    /// The fleet of joined hosts.
    pub fleet: FleetConfig,
    /// Spec of warm-pool VMs (and the default for new VMs).
    pub spec: VmSpec,
    /// Faults the mock driver injects.
    pub mock: MockFaults,
    /// The kvm driver.
    pub kvm: KvmConfig,
    /// The docker driver: the engine's socket and its own image catalogue
    /// (`[docker.images.NAME]`, container images by name).
    pub docker: tern_drivers::docker::DockerConfig,
    /// The API's connection limits and timeouts.
    pub http: tern_httpd::Limits,
    /// What each tenant may hold (`[quota.default]`, `[quota.tenants.NAME]`).
    pub quota: Quotas,
    /// Serve `/metrics` on this address of its own (and not on the API).
    pub metrics_listen: Option<String>,
    /// The bearer token `/metrics` on the API asks for; default generated
    /// once into `<data_dir>/metrics-token`.
    pub metrics_token: Option<String>,
    /// Directory holding the catalogue's files; default `<data_dir>/images`.
    pub image_dir: Option<PathBuf>,
    /// The host CA (`ca.pem`, `ca.key`) that signs joining hosts'
    /// certificates; default `<data_dir>/ca`, made on first start. Replicas
    /// of one control plane must share it.
    pub ca_dir: Option<PathBuf>,
    /// The image catalogue: what tenants may boot, by name (`test`, tern's
    /// test guest, is always there). Files are relative to `image_dir`.
    pub images: BTreeMap<String, ImageDef>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            driver: DriverKind::Mock,
            listen: "127.0.0.1:7070".into(),
            data_dir: PathBuf::from("/var/lib/tern"),
            store_url: None,
            jwt_secret: None,
            host_id: "local".into(),
            pool: PoolConfig::default(),
            health: HealthConfig::default(),
            fleet: FleetConfig::default(),
            spec: VmSpec::default(),
            mock: MockFaults::default(),
            kvm: KvmConfig::default(),
            docker: tern_drivers::docker::DockerConfig::default(),
            image_dir: None,
            ca_dir: None,
            images: BTreeMap::new(),
            http: tern_httpd::Limits::default(),
            quota: Quotas::default(),
            metrics_listen: None,
            metrics_token: None,
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
}

/// Environment variables that override keys.
const ENV: &[(&str, &str, Kind)] = &[
    ("TERN_DRIVER", "driver", Kind::Text),
    ("TERN_KVM_MONITOR", "kvm.monitor", Kind::Text),
    ("TERN_DOCKER_SOCKET", "docker.socket", Kind::Text),
    ("TERN_DOCKER_INSTANCE", "docker.instance", Kind::Text),
    ("TERN_IMAGE_DIR", "image_dir", Kind::Text),
    ("TERN_CA_DIR", "ca_dir", Kind::Text),
    ("TERN_LISTEN", "listen", Kind::Text),
    ("TERN_DATA", "data_dir", Kind::Text),
    ("TERN_STORE_URL", "store_url", Kind::Text),
    ("TERN_JWT_SECRET", "jwt_secret", Kind::Text),
    ("TERN_HOST_ID", "host_id", Kind::Text),
    ("TERN_METRICS_LISTEN", "metrics_listen", Kind::Text),
    ("TERN_METRICS_TOKEN", "metrics_token", Kind::Text),
    ("TERN_POOL_SIZE", "pool.size", Kind::Int),
    ("TERN_POOL_IDLE_TTL", "pool.idle_ttl", Kind::Text),
    (
        "TERN_POOL_RECONCILE_INTERVAL",
        "pool.reconcile_interval",
        Kind::Text,
    ),
    ("TERN_HEALTH_INTERVAL", "health.interval", Kind::Text),
    (
        "TERN_FLEET_HOST_DOWN_AFTER",
        "fleet.host_down_after",
        Kind::Text,
    ),
    (
        "TERN_FLEET_REBALANCE_INTERVAL",
        "fleet.rebalance_interval",
        Kind::Text,
    ),
    (
        "TERN_FLEET_DRAIN_BANDWIDTH_MBPS",
        "fleet.drain_bandwidth_mbps",
        Kind::Int,
    ),
    (
        "TERN_FLEET_REBALANCE_BANDWIDTH_MBPS",
        "fleet.rebalance_bandwidth_mbps",
        Kind::Int,
    ),
    (
        "TERN_FLEET_MAX_MIGRATIONS_PER_HOST",
        "fleet.max_migrations_per_host",
        Kind::Int,
    ),
    (
        "TERN_FLEET_MAX_MIGRATIONS_PER_LINK",
        "fleet.max_migrations_per_link",
        Kind::Int,
    ),
    (
        "TERN_HTTP_MAX_CONNECTIONS",
        "http.max_connections",
        Kind::Int,
    ),
    (
        "TERN_HTTP_HEADER_TIMEOUT_MS",
        "http.header_timeout_ms",
        Kind::Int,
    ),
    (
        "TERN_HTTP_REQUEST_TIMEOUT_MS",
        "http.request_timeout_ms",
        Kind::Int,
    ),
    ("TERN_HEALTH_CONCURRENCY", "health.concurrency", Kind::Int),
    (
        "TERN_HEALTH_MAX_FAILURES",
        "health.max_consecutive_failures",
        Kind::Int,
    ),
];

/// Values given on the command line; they win over everything else.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--config`.
    pub config_file: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--driver`.
    pub driver: Option<String>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--store-url`.
    pub store_url: Option<String>,
}

fn set(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("key has a part");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_owned(), value);
}

fn parse_table(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_owned(),
        })
}

impl Config {
    /// Loads the configuration from file, environment and flags, and validates it.
    pub fn load(
        over: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let data_dir_hint = over
            .data_dir
            .clone()
            .or_else(|| env("TERN_DATA").map(PathBuf::from));
        let file = over
            .config_file
            .clone()
            .or_else(|| env("TERN_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let p = data_dir_hint.as_ref()?.join("tern.toml");
                p.exists().then_some(p)
            });
        let table = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_table(path, &text)?
            }
            None => toml::Table::new(),
        };
        Self::from_sources(table, over, env)
    }

    /// Checks a configuration file's text alone (no environment, no flags),
    /// as the `configs` fuzz target reads it.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::from_sources(parse_table(path, text)?, &Overrides::default(), |_| None)
    }

    /// The file's table with the environment's and the flags' values laid
    /// over it, deserialized and validated.
    fn from_sources(
        mut table: toml::Table,
        over: &Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut from_env: Vec<(&str, &str)> = vec![];
        for (var, key, kind) in ENV {
            let Some(raw) = env(var) else { continue };
            let value = match kind {
                Kind::Text => toml::Value::String(raw),
                Kind::Int => {
                    toml::Value::Integer(raw.trim().parse().map_err(|_| ConfigError::Key {
                        key: key.to_string(),
                        origin: format!(" (from {var})"),
                        message: format!("`{raw}` is not an integer"),
                    })?)
                }
            };
            set(&mut table, key, value);
            from_env.push((key, var));
        }
        let cli = [
            (
                "data_dir",
                over.data_dir.as_ref().map(|p| p.display().to_string()),
            ),
            ("driver", over.driver.clone()),
            ("listen", over.listen.clone()),
            ("store_url", over.store_url.clone()),
        ];
        for (key, v) in cli {
            if let Some(v) = v {
                set(&mut table, key, toml::Value::String(v));
                from_env.retain(|(k, _)| *k != key);
            }
        }
        let origin = |key: &str| {
            from_env
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, var)| format!(" (from {var})"))
                .unwrap_or_default()
        };
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.inner().to_string();
                ConfigError::Key {
                    origin: origin(&key),
                    key,
                    message,
                }
            })?;
        cfg.validate().map_err(|(key, message)| ConfigError::Key {
            origin: origin(key),
            key: key.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        self.listen.parse::<SocketAddr>().map_err(|_| {
            (
                "listen",
                format!("`{}` is not an address like 127.0.0.1:7070", self.listen),
            )
        })?;
        HostId::new(self.host_id.clone()).map_err(|e| ("host_id", e.to_string()))?;
        if let Some(j) = &self.kvm.jail {
            j.validate().map_err(|e| ("kvm.jail", e))?;
        }
        let t = self.fleet.rebalance_threshold;
        if !(t > 0.0 && t <= 1.0) {
            return Err((
                "fleet.rebalance_threshold",
                format!("{t} must be above 0 and at most 1"),
            ));
        }
        if self.fleet.rebalance_bandwidth_mbps == Some(0) {
            return Err((
                "fleet.rebalance_bandwidth_mbps",
                "must be above 0 (leave it out for no cap)".into(),
            ));
        }
        if self.fleet.max_migrations_per_host == 0 {
            return Err(("fleet.max_migrations_per_host", "must be at least 1".into()));
        }
        if self.fleet.max_migrations_per_link == 0 {
            return Err(("fleet.max_migrations_per_link", "must be at least 1".into()));
        }
        if self.fleet.drain_bandwidth_mbps == Some(0) {
            return Err((
                "fleet.drain_bandwidth_mbps",
                "must be above 0 (leave it out for no cap)".into(),
            ));
        }
        if let Some(url) = &self.store_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return Err((
                    "store_url",
                    format!("`{url}` is neither sqlite://PATH nor postgres://..."),
                ));
            }
        }
        if let Some(s) = &self.jwt_secret {
            if s.len() < 16 {
                return Err(("jwt_secret", "must be at least 16 characters".into()));
            }
        }
        if let Some(s) = &self.metrics_token {
            if s.len() < 16 {
                return Err(("metrics_token", "must be at least 16 characters".into()));
            }
        }
        if let Some(a) = &self.metrics_listen {
            a.parse::<SocketAddr>().map_err(|_| {
                (
                    "metrics_listen",
                    format!("`{a}` is not an address like 127.0.0.1:9464"),
                )
            })?;
        }
        if self.pool.size > 10_000 {
            return Err((
                "pool.size",
                format!("{} is more than 10000", self.pool.size),
            ));
        }
        if self.pool.reconcile_interval.0 < Duration::from_millis(10) {
            return Err(("pool.reconcile_interval", "must be at least 10ms".into()));
        }
        if self.pool.idle_ttl.0.is_zero() {
            return Err(("pool.idle_ttl", "must be more than 0".into()));
        }
        if self.health.interval.0 < Duration::from_millis(10) {
            return Err(("health.interval", "must be at least 10ms".into()));
        }
        if !(1..=1000).contains(&self.health.concurrency) {
            return Err(("health.concurrency", "must be between 1 and 1000".into()));
        }
        if self.health.max_consecutive_failures == 0 {
            return Err((
                "health.max_consecutive_failures",
                "must be at least 1".into(),
            ));
        }
        self.spec.validate().map_err(|e| ("spec", e))?;
        self.http.validate().map_err(|e| ("http", e))?;
        for name in self.quota.tenants.keys() {
            TenantId::new(name.clone()).map_err(|e| ("quota.tenants", e.to_string()))?;
        }
        let images = self.image_names().map_err(|e| ("images", e.to_string()))?;
        if !images.contains(&self.spec.image) {
            return Err((
                "spec.image",
                format!(
                    "`{}` is not in the image catalogue (offered: {})",
                    self.spec.image,
                    images.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        self.docker.validate().map_err(|e| ("docker", e))?;
        Ok(())
    }

    /// The image catalogue, every entry checked against `image_dir`.
    pub fn catalogue(&self) -> Result<ImageCatalogue, tern_drivers::images::ImageError> {
        if self.images.is_empty() {
            return Ok(ImageCatalogue::builtin());
        }
        let dir = self
            .image_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"));
        ImageCatalogue::new(&dir, self.images.clone())
    }

    /// The image names tenants may ask for: the docker driver's own
    /// catalogue, or the file catalogue (with the built-in images for a
    /// fleet, whose hosts offer them).
    pub fn image_names(
        &self,
    ) -> Result<std::collections::BTreeSet<String>, tern_drivers::images::ImageError> {
        if self.driver == DriverKind::Docker {
            return Ok(self.docker.names().into_iter().collect());
        }
        let mut names: std::collections::BTreeSet<String> =
            self.catalogue()?.names().into_iter().collect();
        if self.driver == DriverKind::Agents {
            names.extend(tern_proto::BUILT_IN_IMAGES.map(String::from));
            // Hosts with a [container] run it; others refuse it at start.
            names.insert(tern_proto::CONTAINER_IMAGE.to_string());
        }
        Ok(names)
    }

    /// The store URL, defaulting to a SQLite file in the data dir.
    pub fn store_url(&self) -> String {
        self.store_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("tern.db").display()))
    }

    /// The API token secret: configured, or read from (created once in) the data dir.
    pub fn jwt_secret(&self) -> std::io::Result<Vec<u8>> {
        match &self.jwt_secret {
            Some(s) => Ok(s.as_bytes().to_vec()),
            None => secret_file(&self.data_dir.join("jwt-secret")).map(String::into_bytes),
        }
    }

    /// The host CA's directory, with a CA made there on first use.
    pub fn host_ca(&self) -> Result<PathBuf, tern_transport::certs::CertError> {
        let dir = self
            .ca_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca"));
        if !dir.join("ca.pem").exists() {
            tern_transport::certs::init_ca(&dir)?;
        }
        Ok(dir)
    }

    /// The token `/metrics` asks for: configured, or read from (created
    /// once in) `<data_dir>/metrics-token`.
    pub fn metrics_token(&self) -> std::io::Result<String> {
        match &self.metrics_token {
            Some(t) => Ok(t.clone()),
            None => secret_file(&self.data_dir.join("metrics-token")),
        }
    }
}

/// A secret kept in a file: read, or generated once (32 random bytes, hex)
/// when the file is missing.
fn secret_file(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        // A short key makes forgeable tokens (an empty one signs anything
        // the empty key checks): refuse to start rather than trust it.
        Ok(s) if s.trim().len() < 16 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds {} characters; a secret needs at least 16 (delete the file to have one generated)",
                path.display(),
                s.trim().len()
            ),
        )),
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            let text = hex::encode(secret);
            write_private(path, text.as_bytes())?;
            Ok(text)
        }
        Err(e) => Err(e),
    }
}

/// Writes a file only its owner can read, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let mut over = Overrides::default();
        if let Some(text) = file {
            let p = dir.path().join("tern.toml");
            std::fs::write(&p, text).unwrap();
            over.config_file = Some(p);
        }
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(&over, |k| env.get(k).cloned())
    }

    /// Issue 14, finding 1: the catalogue's files stay inside its directory.
    #[test]
    fn image_entries_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("jwt-secret"), b"0123456789abcdef").unwrap();
        let cfg = |kernel: &str| {
            format!(
                "image_dir = \"{}\"\n[images.debian]\nkernel = \"{kernel}\"\n",
                images.display()
            )
        };
        let c = load(Some(&cfg("vmlinuz")), &[]).unwrap();
        assert_eq!(c.image_names().unwrap().len(), 2);
        for bad in ["../jwt-secret", "/etc/passwd", "missing"] {
            let e = load(Some(&cfg(bad)), &[]).unwrap_err().to_string();
            assert!(e.contains("config key `images`"), "{bad}: {e}");
        }
        let e = load(Some("[spec]\nimage = \"linux\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.image"), "{e}");
    }

    /// Issue 14, finding 6: an empty or short secret file refuses to start.
    #[test]
    fn a_short_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "\n", "short"] {
            std::fs::write(dir.path().join("jwt-secret"), text).unwrap();
            let c = Config {
                data_dir: dir.path().to_path_buf(),
                ..Config::default()
            };
            let e = c.jwt_secret().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn defaults() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.pool.size, 2);
        assert_eq!(c.pool.reconcile_interval.0, Duration::from_secs(30));
        assert_eq!(c.health.interval.0, Duration::from_secs(10));
        assert_eq!(c.health.concurrency, 10);
        assert_eq!(c.health.max_consecutive_failures, 3);
        assert_eq!(c.driver, DriverKind::Mock);
    }

    #[test]
    fn a_fleet_offers_the_built_in_images_and_containers() {
        let c = load(Some("driver = \"agents\"\n"), &[]).unwrap();
        let names = c.image_names().unwrap();
        for n in ["test", "process", "container"] {
            assert!(names.contains(n), "{names:?}");
        }
        let mock = load(None, &[]).unwrap().image_names().unwrap();
        assert!(!mock.contains("container"), "{mock:?}");
    }

    #[test]
    fn file_then_env() {
        let c = load(
            Some("listen = \"0.0.0.0:9000\"\n[pool]\nsize = 5\nidle_ttl = \"10m\"\n[health]\ninterval = \"500ms\"\n"),
            &[("TERN_POOL_SIZE", "7")],
        )
        .unwrap();
        assert_eq!(c.pool.size, 7, "env wins over file");
        assert_eq!(c.pool.idle_ttl.0, Duration::from_secs(600));
        assert_eq!(c.health.interval.0, Duration::from_millis(500));
        assert_eq!(c.listen, "0.0.0.0:9000");
    }

    #[test]
    fn errors_name_the_key() {
        let e = load(Some("[pool]\nsise = 3\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool") && e.contains("sise"), "{e}");
        let e = load(Some("[pool]\nsize = \"many\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`pool.size`"), "{e}");
        let e = load(Some("[health]\ninterval = \"10 parsecs\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`health.interval`"), "{e}");
        let e = load(None, &[("TERN_HEALTH_CONCURRENCY", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`health.concurrency` (from TERN_HEALTH_CONCURRENCY)"),
            "{e}"
        );
        let e = load(None, &[("TERN_POOL_SIZE", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`pool.size` (from TERN_POOL_SIZE)"), "{e}");
        let e = load(None, &[("TERN_DRIVER", "xen")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`driver`") && e.contains("xen"), "{e}");
        let e = load(Some("listen = \"nowhere\""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`listen`"), "{e}");
        let e = load(Some("not toml ["), &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn text_alone_parses_as_the_file_would() {
        let p = Path::new("tern.toml");
        let c = Config::parse(p, "[pool]\nsize = 3\n").unwrap();
        assert_eq!(c.pool.size, 3);
        let e = Config::parse(p, "[pool]\nsise = 3\n").unwrap_err();
        assert!(e.to_string().contains("sise"), "{e}");
        let e = Config::parse(p, "not toml [").unwrap_err();
        assert!(e.to_string().contains("tern.toml"), "{e}");
    }

    #[test]
    fn secret_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let a = c.jwt_secret().unwrap();
        let b = c.jwt_secret().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("jwt-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "secret is private");
    }
}
