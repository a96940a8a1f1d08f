//! This host's membership of a control plane: joining once with a one-time
//! token, then a heartbeat every few seconds that reports the host's load
//! and brings back its peers.
//!
//! Joining sends a certificate signing request (the host's TLS key is made
//! here and never leaves it) and writes what comes back under
//! `<data_dir>/tls/` and `<data_dir>/fleet.json`, the last file written:
//! an agent that died halfway joins again with a new token rather than
//! starting with half an identity. A restarted agent finds `fleet.json`
//! and needs no token.

use crate::agent::Agent;
use crate::config::{AgentConfig, ControlPlane, Peer, TlsFiles};
use crate::hostload::{default_capacity, Sampler};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_proto::{
    Heartbeat, HeartbeatResponse, HostId, HostState, JoinRequest, JoinResponse, PeerView,
    RunningGuest,
};

/// How long one call to the control plane may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a host could not join or stay joined.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The host has not joined and no join token was given.
    #[error("this host has not joined {url} yet: run `tern agent CONFIG --join {url} --join-token TOKEN` (an admin makes tokens with POST /api/v1/hosts/join-tokens)")]
    NeedToken {
        /// The control plane.
        url: String,
    },
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {url}: {source}")]
    Unreachable {
        /// Its URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The control plane refused.
    #[error("the control plane answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
    /// A file of the membership could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// What the control plane or a file said does not parse.
    #[error("{what}: {message}")]
    Invalid {
        /// What was read.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// What a joined host keeps (`<data_dir>/fleet.json`, mode 0600).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Membership {
    /// The control plane it joined.
    pub url: String,
    /// Other replicas of the same control plane, tried in turn when one
    /// does not answer (from the configuration at each start).
    #[serde(default, skip)]
    pub replicas: Vec<String>,
    /// Its id there.
    pub host_id: HostId,
    /// The token its heartbeats carry.
    pub host_token: String,
}

fn membership_file(data_dir: &Path) -> PathBuf {
    data_dir.join("fleet.json")
}

/// Where a joined host keeps the certificate the control plane issued.
pub fn tls_files(data_dir: &Path) -> TlsFiles {
    let d = data_dir.join("tls");
    TlsFiles {
        cert: d.join("host.pem"),
        key: d.join("host.key"),
        ca: d.join("ca.pem"),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MembershipError + '_ {
    move |source| MembershipError::Io {
        path: path.into(),
        source,
    }
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), MembershipError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(path))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(io(path))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Turns the control plane's peers into this agent's.
pub fn peers_from(views: &[PeerView]) -> Result<Vec<Peer>, MembershipError> {
    views
        .iter()
        .map(|v| {
            Ok(Peer {
                name: v.id.to_string(),
                migrate_addr: v
                    .migrate_addr
                    .parse()
                    .map_err(|_| MembershipError::Invalid {
                        what: format!("peer {}", v.id),
                        message: format!("migrate_addr `{}` is not host:port", v.migrate_addr),
                    })?,
                key: v.manifest_key.clone(),
                tls_pin: Some(v.cert_pin.clone()),
            })
        })
        .collect()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .build()
        .expect("an HTTP client with a timeout builds")
}

async fn post<T: Serialize, R: serde::de::DeserializeOwned>(
    url: &str,
    bearer: Option<&str>,
    body: &T,
) -> Result<R, MembershipError> {
    let mut req = http().post(url).json(body);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|source| MembershipError::Unreachable {
            url: url.into(),
            source,
        })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(text);
        return Err(MembershipError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    serde_json::from_str(&text).map_err(|e| MembershipError::Invalid {
        what: format!("the answer of {url}"),
        message: e.to_string(),
    })
}

/// Joins the control plane `cfg` names (or finds this host joined before)
/// and points `cfg.tls` at the issued certificate.
pub async fn join_or_resume(
    cfg: &mut AgentConfig,
    join_token: Option<&str>,
) -> Result<Membership, MembershipError> {
    let Some(cp) = cfg.control_plane.clone() else {
        return Err(MembershipError::Invalid {
            what: "configuration".into(),
            message: "no [control_plane]".into(),
        });
    };
    let file = membership_file(&cfg.data_dir);
    if file.exists() {
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        let m: Membership = serde_json::from_str(&text).map_err(|e| MembershipError::Invalid {
            what: file.display().to_string(),
            message: e.to_string(),
        })?;
        if join_token.is_some() {
            tracing::info!(host = %m.host_id, url = %m.url, "already joined; the join token is not used");
        }
        cfg.tls = Some(tls_files(&cfg.data_dir));
        return Ok(Membership {
            replicas: replicas_of(&cp),
            ..m
        });
    }
    let token = join_token.ok_or_else(|| MembershipError::NeedToken {
        url: cp.url.clone(),
    })?;
    let m = join(cfg, &cp, token).await?;
    cfg.tls = Some(tls_files(&cfg.data_dir));
    Ok(Membership {
        replicas: replicas_of(&cp),
        ..m
    })
}

fn replicas_of(cp: &ControlPlane) -> Vec<String> {
    cp.replicas
        .iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect()
}

async fn join(
    cfg: &AgentConfig,
    cp: &ControlPlane,
    token: &str,
) -> Result<Membership, MembershipError> {
    let invalid = |what: &str, e: &dyn std::fmt::Display| MembershipError::Invalid {
        what: what.into(),
        message: e.to_string(),
    };
    let host_id = HostId::new(cfg.name.clone()).map_err(|e| invalid("name", &e))?;
    let (key_pem, csr_pem) = tern_transport::certs::host_csr(&cfg.name)
        .map_err(|e| invalid("certificate request", &e))?;
    let manifest_key = crate::keys::host_public_key(&cfg.data_dir).map_err(io(&cfg.data_dir))?;
    let req = JoinRequest {
        token: token.into(),
        id: host_id.clone(),
        migrate_addr: cfg.advertised(),
        api_url: cp
            .api_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.api_addr)),
        api_token: crate::keys::api_token(&cfg.data_dir).map_err(io(&cfg.data_dir))?,
        csr_pem,
        manifest_key,
        labels: cp.labels.clone(),
        capacity: cp.capacity.unwrap_or_else(default_capacity),
    };
    let url = format!("{}/api/v1/hosts/join", cp.url.trim_end_matches('/'));
    let answer: JoinResponse = post(&url, None, &req).await?;
    let files = tls_files(&cfg.data_dir);
    if let Some(d) = files.cert.parent() {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    write_file(&files.key, key_pem.as_bytes())?;
    write_file(&files.cert, answer.cert_pem.as_bytes())?;
    write_file(&files.ca, answer.ca_pem.as_bytes())?;
    let peers = peers_from(&answer.peers)?;
    let peers_json = serde_json::to_vec_pretty(&peers).expect("peers serialise");
    write_file(&crate::peerbook::peers_file(&cfg.data_dir), &peers_json)?;
    let m = Membership {
        url: cp.url.trim_end_matches('/').into(),
        host_id,
        host_token: answer.host_token,
        replicas: Vec::new(),
    };
    let file = membership_file(&cfg.data_dir);
    write_file(
        &file,
        &serde_json::to_vec_pretty(&m).expect("membership serialises"),
    )?;
    tracing::info!(host = %m.host_id, url = %m.url, pin = %answer.cert_pin, peers = peers.len(), "joined the control plane");
    Ok(m)
}

/// Sends the first heartbeat, before the agent serves its API: a host
/// back from an outage stops the guests the control plane restarted
/// elsewhere before anyone can see them running here.
pub async fn first_beat(agent: &Agent, m: &Membership) -> Sampler {
    let mut sampler = Sampler::new();
    if let Err(e) = beat(agent, m, &mut sampler, &mut 0).await {
        tracing::warn!(error = %e, "first heartbeat failed; guests keep running until one is answered");
    }
    sampler
}

/// Sends a heartbeat every `every` for as long as the agent runs: its
/// load and its running guests go up, its peers, its state as the control
/// plane sees it and the guests to fence come back.
pub fn spawn_heartbeats(
    agent: Agent,
    m: Membership,
    every: Duration,
    mut sampler: Sampler,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut state: Option<HostState> = None;
        let mut failing = false;
        let mut prefer = 0;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first beat was sent already
        loop {
            tick.tick().await;
            match beat(&agent, &m, &mut sampler, &mut prefer).await {
                Ok(answer) => {
                    if failing {
                        tracing::info!(url = %m.url, "heartbeats answered again");
                        failing = false;
                    }
                    if state != Some(answer.state) {
                        tracing::info!(
                            state = answer.state.as_str(),
                            "the control plane has this host as"
                        );
                        state = Some(answer.state);
                    }
                }
                // Logged once per outage, not at every beat.
                Err(e) if !failing => {
                    tracing::warn!(error = %e, "heartbeat failed");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    })
}

/// One heartbeat, to the replica that answered last, else to the others
/// in turn (`prefer` remembers which answered).
async fn beat(
    agent: &Agent,
    m: &Membership,
    sampler: &mut Sampler,
    prefer: &mut usize,
) -> Result<HeartbeatResponse, MembershipError> {
    let running: Vec<RunningGuest> = agent
        .vms()
        .await
        .into_iter()
        .filter(|v| {
            matches!(
                v.status,
                tern_proto::GuestStatus::Running
                    | tern_proto::GuestStatus::Stalled
                    | tern_proto::GuestStatus::Fenced
            )
        })
        .map(|v| RunningGuest {
            id: v.id.to_string(),
            epoch: v.epoch,
        })
        .collect();
    let migrations = agent.active_migrations();
    let load = sampler.sample(u32::try_from(running.len()).unwrap_or(u32::MAX), migrations);
    metrics::gauge!("host_cpu_busy_ratio").set(load.cpu);
    metrics::gauge!("host_memory_used_bytes").set((load.memory_used_mib << 20) as f64);
    metrics::gauge!("host_memory_free_bytes").set((load.memory_free_mib << 20) as f64);
    metrics::gauge!("host_network_bytes_per_second").set(load.net_bytes_per_sec as f64);
    metrics::gauge!("host_disk_bytes_per_second").set(load.disk_bytes_per_sec as f64);
    let urls: Vec<&String> = std::iter::once(&m.url).chain(&m.replicas).collect();
    let body = Heartbeat { load, running };
    let sent_ms = crate::lease::now_ms();
    let mut last = None;
    let mut answer = None;
    for i in 0..urls.len() {
        let at = (*prefer + i) % urls.len();
        let url = format!("{}/api/v1/hosts/{}/heartbeat", urls[at], m.host_id);
        match post::<_, HeartbeatResponse>(&url, Some(&m.host_token), &body).await {
            Ok(a) => {
                *prefer = at;
                answer = Some(a);
                break;
            }
            // Another replica may answer; a refusal would be the same there.
            Err(e @ MembershipError::Unreachable { .. }) => last = Some(e),
            Err(e @ MembershipError::Refused { status, .. }) if status >= 500 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    let Some(answer) = answer else {
        return Err(last.expect("at least one URL was tried"));
    };
    for id in &answer.fenced {
        // A second copy must never run: stop it before anything else.
        match agent.stop_vm(id).await {
            Ok(()) => {
                tracing::warn!(vm = %id, "stopped a stale copy: the control plane runs this VM elsewhere now")
            }
            Err(e) => tracing::error!(vm = %id, error = %e, "cannot stop a stale copy"),
        }
    }
    // Only now, with the stale copies stopped, may the others run on.
    let data_dir = &agent.config().data_dir;
    if answer.lease_ms == 0 {
        crate::lease::clear(data_dir);
    } else if let Err(e) = crate::lease::grant(data_dir, sent_ms.saturating_add(answer.lease_ms)) {
        tracing::error!(error = %e, "cannot write the lease: guests will fence");
    }
    let peers = peers_from(&answer.peers)?;
    let names: Vec<String> = peers.iter().map(|p| p.name.clone()).collect();
    match agent.set_peers(peers) {
        Ok(true) => tracing::info!(?names, "peers changed"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "cannot keep the new peers"),
    }
    Ok(answer)
}
