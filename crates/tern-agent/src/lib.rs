//! tern's host agent.
//!
//! Every host runs one. Each guest it hosts lives in a process of its own
//! ([`guestproc`], `tern guest DIR`) that outlives the agent and runs the
//! guest's migrations itself; the agent starts, asks and re-adopts those
//! processes, serves the host API the CLI uses, and routes migration
//! sessions over mutual TLS with the peers its configuration names
//! ([`peering`]). Each guest journals its migrations' decisive steps in its
//! own directory ([`vmdir`], [`journal`]) so that, after any crash, a VM
//! that moved away is never started again here.

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod container;
pub mod container_net;
pub mod container_relay;
pub mod control;
pub mod guestproc;
pub mod hosted;
pub mod hostload;
pub mod journal;
pub mod keys;
pub mod layout;
pub mod lease;
pub mod membership;
pub mod peerbook;
mod peering;
pub mod qemu_relay;
pub mod views;
pub mod vmdir;

pub use agent::{Agent, AgentError, MigrateRequest};
pub use client::{AgentClient, ClientError};
pub use config::{AgentConfig, ConfigError, ControlPlane, Peer, TlsFiles};
pub use tern_migrate::MigrationPhase;
/// A migration's final report, as clients of the agent API read it.
pub use tern_migrate::{Report, SwitchoverTimes};
pub use views::{MigrationView, VmView};

/// Starts an agent and serves its API until the process ends. A host with
/// a `[control_plane]` joins it first (with `join_token`, once) and then
/// sends it heartbeats.
pub async fn serve(mut cfg: AgentConfig, join_token: Option<&str>) -> Result<(), AgentError> {
    keys::private_dir(&cfg.data_dir)
        .map_err(|e| AgentError::Internal(format!("data dir {}: {e}", cfg.data_dir.display())))?;
    let joined = match &cfg.control_plane {
        Some(cp) => {
            let every = std::time::Duration::from_secs(cp.heartbeat_secs);
            let m = membership::join_or_resume(&mut cfg, join_token)
                .await
                .map_err(|e| AgentError::BadRequest(e.to_string()))?;
            Some((m, every))
        }
        None => None,
    };
    let token = keys::api_token(&cfg.data_dir).map_err(|e| AgentError::Internal(e.to_string()))?;
    // Before anything is counted, or early counts are lost.
    let _ = api::prometheus();
    let api_addr = cfg.api_addr;
    let limits = cfg.http;
    let agent = Agent::start(cfg).await?;
    if let Some((m, every)) = joined {
        let sampler = membership::first_beat(&agent, &m).await;
        membership::spawn_heartbeats(agent.clone(), m, every, sampler);
    }
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .map_err(|e| AgentError::Internal(format!("cannot listen on {api_addr}: {e}")))?;
    tracing::info!(
        host = agent.name(),
        api = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        migrate = %agent.migrate_addr(),
        "agent ready"
    );
    // A line scripts and tests wait for.
    println!(
        "agent {} ready api={} migrate={} key={}",
        agent.name(),
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        agent.migrate_addr(),
        agent.public_key()
    );
    tern_httpd::serve(
        listener,
        api::router(agent, &token),
        limits,
        std::future::pending(),
    )
    .await;
    Ok(())
}
