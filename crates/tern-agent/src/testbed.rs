//! Lays out agents that are peers of each other on one machine: a CA and
//! host certificates, host keys, and one configuration file per host. The
//! demo and the end-to-end tests use it; so can an operator trying tern.

use crate::config::{AgentConfig, Peer, TlsFiles};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where one host of the bed listens and how its peer is reached.
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
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..1000 {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20000..32000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port in 20000-32000"))
}

/// One written host.
#[derive(Clone, Debug)]
pub struct BedHost {
    /// Its configuration file.
    pub config: PathBuf,
    /// Its API URL.
    pub api_url: String,
    /// Its data directory (holds `api-token` once the agent started).
    pub data_dir: PathBuf,
}

impl BedHost {
    /// The API token (the agent writes it at start-up).
    pub fn token(&self) -> std::io::Result<String> {
        crate::keys::api_token(&self.data_dir)
    }
}

/// Writes TLS material, host keys and configurations for `hosts` (each a
/// peer of every other) under `dir`.
pub fn write(dir: &Path, hosts: &[HostPlan]) -> Result<Vec<BedHost>, Box<dyn std::error::Error>> {
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
        cfg.tls = Some(TlsFiles {
            cert: tls.join(format!("{}.pem", h.name)),
            key: tls.join(format!("{}.key", h.name)),
            ca: tls.join("ca.pem"),
        });
        cfg.peers = peers.iter().filter(|p| p.name != h.name).cloned().collect();
        cfg.validate()?;
        let file = dir.join(format!("{}.toml", h.name));
        std::fs::write(&file, toml::to_string_pretty(&cfg)?)?;
        out.push(BedHost {
            config: file,
            api_url: h.api_url(),
            data_dir: cfg.data_dir.clone(),
        });
    }
    Ok(out)
}

/// A `tern agent` process of the bed, killed when dropped.
pub struct AgentProcess {
    child: std::process::Child,
    host: BedHost,
    /// Whether dropping it kills its guest processes too.
    owns_guests: bool,
    /// Its ready line (name, addresses, public key).
    pub ready_line: String,
}

impl AgentProcess {
    /// Runs `bin agent CONFIG` (inside network namespace `netns` if given)
    /// and waits up to 30 s for its ready line.
    pub fn start(bin: &Path, host: &BedHost, netns: Option<&str>) -> std::io::Result<Self> {
        Self::start_with_env(bin, host, netns, &[])
    }

    /// [`AgentProcess::start`] with extra environment variables (fault
    /// injection: its guest processes inherit them).
    pub fn start_with_env(
        bin: &Path,
        host: &BedHost,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        use std::io::BufRead;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => std::process::Command::new(bin),
        };
        let mut child = cmd
            .envs(env.iter().copied())
            .arg("agent")
            .arg(&host.config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().expect("piped");
        let name = host
            .config
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining stdout so the agent never blocks on a full pipe.
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if l.contains(" ready ") {
                    let _ = tx.send(l);
                } else if std::env::var_os("TERN_BED_LOGS").is_some() {
                    eprintln!("[{name}] {l}");
                }
            }
        });
        let mut proc = AgentProcess {
            child,
            host: host.clone(),
            owns_guests: true,
            ready_line: String::new(),
        };
        proc.ready_line = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            std::io::Error::other(format!(
                "the agent for {} printed no ready line within 30 s",
                host.config.display()
            ))
        })?;
        Ok(proc)
    }

    /// A client of its API.
    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn client(&self) -> std::io::Result<crate::AgentClient> {
        Ok(crate::AgentClient::new(
            &self.host.api_url,
            &self.host.token()?,
        ))
    }

    /// Sends SIGTERM and waits for it to exit (a clean shutdown).
    pub fn terminate(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.child.wait();
    }

    /// Leaves its guest processes running when it is dropped (another
    /// agent process of the same host adopts them).
    pub fn release_guests(&mut self) {
        self.owns_guests = false;
    }

    /// Its host.
    pub fn host(&self) -> &BedHost {
        &self.host
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every guest process under `data_dir` (they outlive their agent).
pub fn kill_guests(data_dir: &Path) {
    for pid in guest_pids(data_dir) {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
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

impl Drop for AgentProcess {
    /// Ends the agent and its guests: a test leaves no process behind.
    fn drop(&mut self) {
        self.kill();
        if self.owns_guests {
            kill_guests(&self.host.data_dir);
        }
    }
}
