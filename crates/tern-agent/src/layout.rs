//! Lays out agents that are peers of each other on one machine: a CA and
//! host certificates, host keys, and one configuration file per host, and
//! runs them. `tern demo` uses it; so can an operator trying tern (the
//! test harness, `tern-testbed`, builds on it).

use crate::config::{AgentConfig, Peer, TlsFiles};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where one host of the layout listens and how its peer is reached.
#[derive(Clone, Debug)]
pub struct HostPlan {
    /// Host name.
    pub name: String,
    /// Address the agent binds (API and migrations).
    pub ip: IpAddr,
    /// API port.
    pub api_port: u16,
    /// Migration port.
    pub migrate_port: u16,
    /// How the other host dials this one's migration listener (default:
    /// `ip:migrate_port`; a link emulator's address to put one in between).
    pub reached_at: Option<SocketAddr>,
    /// How long its migration sessions wait for a dropped link, seconds.
    pub resume_deadline_secs: u64,
    /// Kernel and initramfs for Linux guests (default: `TERN_GUEST_KERNEL`
    /// and `TERN_GUEST_INITRD` from the environment).
    pub guest: Option<(PathBuf, PathBuf)>,
    /// Its `[jail]` (none: guests run unjailed).
    pub jail: Option<tern_jail::JailConfig>,
    /// Its `[container]` (default: `TERN_WORKLOAD_ROOTFS` and `TERN_CRIU`
    /// from the environment, when the rootfs is set).
    pub container: Option<crate::config::ContainerHost>,
}

impl HostPlan {
    /// A host on `ip` with free ports (probed on loopback when `ip` is not local yet).
    pub fn new(name: &str, ip: IpAddr) -> std::io::Result<Self> {
        Ok(Self {
            name: name.into(),
            ip,
            api_port: free_port()?,
            migrate_port: free_port()?,
            reached_at: None,
            resume_deadline_secs: 30,
            guest: std::env::var_os("TERN_GUEST_KERNEL")
                .map(PathBuf::from)
                .zip(std::env::var_os("TERN_GUEST_INITRD").map(PathBuf::from)),
            jail: None,
            container: std::env::var_os("TERN_WORKLOAD_ROOTFS").map(|r| {
                crate::config::ContainerHost {
                    rootfs: PathBuf::from(r),
                    criu: std::env::var_os("TERN_CRIU").map(PathBuf::from),
                    uplink: None,
                }
            }),
        })
    }

    /// Its migration listener.
    pub fn migrate_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.migrate_port)
    }

    /// Its API URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.ip, self.api_port))
    }
}

/// A free TCP port on loopback, below the kernel's ephemeral range
/// (32768-60999): a port probed there could be handed to some outgoing
/// connection before the agent binds it (CI saw `Address already in use`).
/// Never the same port twice in one process: hosts are planned before their
/// agents bind, so a probe cannot see a port another plan already holds
/// (CI saw two hosts of one test given the same API port).
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20000..32000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port in 20000-32000"))
}

/// One written host.
#[derive(Clone, Debug)]
pub struct LocalHost {
    /// Its configuration file.
    pub config: PathBuf,
    /// Its API URL.
    pub api_url: String,
    /// Its data directory (holds `api-token` once the agent started).
    pub data_dir: PathBuf,
}

impl LocalHost {
    /// The API token (the agent writes it at start-up).
    pub fn token(&self) -> std::io::Result<String> {
        crate::keys::api_token(&self.data_dir)
    }
}

/// What every host of a layout is configured with: its addresses, data
/// directory, resume deadline and guest kernel.
fn base_config(dir: &Path, h: &HostPlan) -> AgentConfig {
    let mut cfg = AgentConfig::new(&h.name);
    cfg.api_addr = SocketAddr::new(h.ip, h.api_port);
    cfg.migrate_addr = h.migrate_addr();
    cfg.advertise_addr = h.reached_at;
    cfg.data_dir = dir.join(&h.name);
    cfg.resume_deadline_secs = h.resume_deadline_secs;
    if let Some((k, i)) = &h.guest {
        cfg.guest_kernel = Some(k.clone());
        cfg.guest_initrd = Some(i.clone());
    }
    cfg.jail = h.jail.clone();
    cfg.container = h.container.clone();
    cfg
}

/// Checks `cfg` and writes it to `<dir>/<host>.toml`.
fn save(
    dir: &Path,
    h: &HostPlan,
    cfg: &AgentConfig,
) -> Result<LocalHost, Box<dyn std::error::Error>> {
    cfg.validate()?;
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{}.toml", h.name));
    std::fs::write(&file, toml::to_string_pretty(cfg)?)?;
    Ok(LocalHost {
        config: file,
        api_url: h.api_url(),
        data_dir: cfg.data_dir.clone(),
    })
}

/// Writes TLS material, host keys and configurations for `hosts` (each a
/// peer of every other) under `dir`.
pub fn write(dir: &Path, hosts: &[HostPlan]) -> Result<Vec<LocalHost>, Box<dyn std::error::Error>> {
    let tls = dir.join("tls");
    tern_transport::certs::init_ca(&tls)?;
    let year = Duration::from_secs(365 * 86400);
    let mut peers = Vec::new();
    for h in hosts {
        let issued = tern_transport::certs::issue(&tls, &h.name, &tls, year, false)?;
        peers.push(Peer {
            name: h.name.clone(),
            migrate_addr: h.reached_at.unwrap_or(h.migrate_addr()),
            key: crate::keys::host_public_key(&dir.join(&h.name))?,
            tls_pin: Some(issued.spki_sha256),
        });
    }
    let mut out = Vec::new();
    for h in hosts {
        let mut cfg = base_config(dir, h);
        cfg.tls = Some(TlsFiles {
            cert: tls.join(format!("{}.pem", h.name)),
            key: tls.join(format!("{}.key", h.name)),
            ca: tls.join("ca.pem"),
        });
        cfg.peers = peers.iter().filter(|p| p.name != h.name).cloned().collect();
        out.push(save(dir, h, &cfg)?);
    }
    Ok(out)
}

/// Writes configurations for `hosts` that join the control plane at
/// `urls[0]` (its other replicas after it; labels per host from `labels`):
/// no CA, certificates or peers here, the control plane issues and names
/// them. Heartbeats every second.
pub fn write_joined(
    dir: &Path,
    hosts: &[HostPlan],
    urls: &[&str],
    labels: &dyn Fn(&str) -> tern_proto::Labels,
) -> Result<Vec<LocalHost>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for h in hosts {
        let mut cfg = base_config(dir, h);
        let mut cp = crate::config::ControlPlane::new(urls.first().copied().unwrap_or_default());
        cp.replicas = urls.iter().skip(1).map(|u| u.to_string()).collect();
        cp.heartbeat_secs = 1;
        cp.labels = labels(&h.name);
        cp.capacity = Some(tern_proto::Capacity {
            memory_mib: 4096,
            vcpus: 8,
        });
        cfg.control_plane = Some(cp);
        out.push(save(dir, h, &cfg)?);
    }
    Ok(out)
}

/// A local `tern agent` process of a layout, ended with its guests when
/// dropped (a layout is a trial: it leaves no process behind).
pub struct LocalAgent {
    child: std::process::Child,
    host: LocalHost,
    /// Its ready line (name, addresses, public key).
    pub ready_line: String,
}

impl LocalAgent {
    /// Runs `bin agent CONFIG` and waits up to 30 s for its ready line.
    pub fn start(bin: &Path, host: &LocalHost) -> std::io::Result<Self> {
        Self::start_with_env(bin, host, &[])
    }

    /// [`LocalAgent::start`] with `env` added (a join token, say).
    pub fn start_with_env(
        bin: &Path,
        host: &LocalHost,
        env: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        let mut child = std::process::Command::new(bin)
            .envs(env.iter().copied())
            .arg("agent")
            .arg(&host.config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        let ready_line = match wait_ready(&mut child, host) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child,
            host: host.clone(),
            ready_line,
        })
    }

    /// A client of its API.
    pub fn client(&self) -> std::io::Result<crate::AgentClient> {
        Ok(crate::AgentClient::new(
            &self.host.api_url,
            &self.host.token()?,
        ))
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_guests(&self.host.data_dir);
    }
}

/// Reads a starting agent's stdout until its ready line (30 s at most),
/// then keeps draining it so the agent never blocks on a full pipe (its
/// other lines are echoed to stderr when `TERN_BED_LOGS` is set).
pub fn wait_ready(child: &mut std::process::Child, host: &LocalHost) -> std::io::Result<String> {
    use std::io::BufRead;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("the agent's stdout is not piped"))?;
    let name = host
        .config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains(" ready ") {
                let _ = tx.send(l);
            } else if std::env::var_os("TERN_BED_LOGS").is_some() {
                eprintln!("[{name}] {l}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        std::io::Error::other(format!(
            "the agent for {} printed no ready line within 30 s",
            host.config.display()
        ))
    })
}

/// Kills every guest process under `data_dir` (they outlive their agent).
pub fn kill_guests(data_dir: &Path) {
    for pid in guest_pids(data_dir) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    // Containers run under runc, beside their guest process, and a confined
    // QEMU outlives it (`-runas` clears its parent-death signal): end them too.
    if let Ok(list) = std::fs::read_dir(data_dir.join("vms")) {
        for d in list.flatten() {
            crate::container::reap(&d.path());
            tern_drivers::qemu::kill_stray(&crate::vmdir::VmDir(d.path()).qemu());
        }
    }
}

/// The live guest processes under `data_dir`.
pub fn guest_pids(data_dir: &Path) -> Vec<i32> {
    let Ok(list) = std::fs::read_dir(data_dir.join("vms")) else {
        return Vec::new();
    };
    list.flatten()
        .filter_map(|d| crate::vmdir::VmDir(d.path()).live_pid())
        .collect()
}
