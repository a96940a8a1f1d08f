//! tern's host agent.
//!
//! Every host runs one. It boots microVMs (tern-vmm machines inside the
//! agent process), serves the host API the CLI uses, and sends and accepts
//! live migrations over mutual TLS with the peers its configuration names.
//! Each side journals a migration's decisive steps ([`journal`]) so that,
//! after a crash, a VM that moved away is never started again here.

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod hosted;
pub mod journal;
pub mod keys;
pub mod qemu_relay;
pub mod testbed;
pub mod views;

pub use agent::{Agent, AgentError, MigrateRequest};
pub use client::{AgentClient, ClientError};
pub use config::{AgentConfig, ConfigError, Peer, TlsFiles};
/// A migration's final report, as clients of the agent API read it.
pub use tern_migrate::{Report, SwitchoverTimes};
pub use views::{GuestKind, MigrationState, MigrationView, Role, VmSpec, VmStatus, VmView};

/// Starts an agent and serves its API until the process ends.
pub async fn serve(cfg: AgentConfig) -> Result<(), AgentError> {
    let token = keys::api_token(&cfg.data_dir).map_err(|e| AgentError::Internal(e.to_string()))?;
    let api_addr = cfg.api_addr;
    let agent = Agent::start(cfg).await?;
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
    axum::serve(listener, api::router(agent, &token))
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))
}
