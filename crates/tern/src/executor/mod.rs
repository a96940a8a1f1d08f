//! `tern executor FILE`: one host's actor executor. It runs WebAssembly
//! actors, moves them to and from its peers over mutual TLS, gossips its
//! load and actors, restores a dead peer's actors from their replicated
//! checkpoints, and serves the actor REST API (`api.rs`).

mod api;
mod config;

pub use config::ExecutorConfig;

use anyhow::Context;
use ed25519_dalek::SigningKey;
use std::path::Path;
use std::time::Duration;
use tern_actors::gossip::GossipConfig;
use tern_actors::manager::{ActorMigrationManager, FailoverConfig, ManagerConfig};
use tern_actors::net::{ExecutorNode, NodeConfig, Peer};
use tern_actors::policy::DefaultMigrationPolicy;
use tern_actors::CheckpointStore;
use tern_transport::tls::TlsIdentity;

/// This executor's checkpoint-signing key: made on first start, kept in
/// the data dir (0600), its public half printed for the peers' configs.
fn signing_key(dir: &Path) -> anyhow::Result<SigningKey> {
    let path = dir.join("executor.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let seed: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} is not a 32-byte key", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let seed: [u8; 32] = rand::random();
            std::fs::create_dir_all(dir)?;
            std::fs::write(&path, seed).with_context(|| format!("writing {}", path.display()))?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Prints this executor's public checkpoint key (making the key if needed).
pub fn print_key(file: &Path) -> anyhow::Result<()> {
    let cfg = ExecutorConfig::load(file)?;
    let key = signing_key(&cfg.data_dir)?;
    println!("{}", hex::encode(key.verifying_key().to_bytes()));
    Ok(())
}

/// Runs the executor until it is killed.
pub fn run(file: &Path) -> anyhow::Result<()> {
    crate::logging::init();
    let cfg = ExecutorConfig::load(file)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(cfg))
}

async fn serve(cfg: ExecutorConfig) -> anyhow::Result<()> {
    // The recorder first: what the manager counts from now on is kept.
    let _ = tern_api::prometheus();
    let key = signing_key(&cfg.data_dir)?;
    let store = CheckpointStore::open(&cfg.data_dir.join("checkpoints"), cfg.max_state_bytes)
        .context("opening the checkpoint store")?;
    let me = cfg.name.clone();
    let mut mcfg = ManagerConfig::new(me.clone());
    mcfg.capacity = cfg.capacity;
    mcfg.max_state_bytes = cfg.max_state_bytes;
    let cluster: Vec<_> = std::iter::once(me.clone())
        .chain(cfg.peers.iter().map(|p| p.name.clone()))
        .collect();
    if cfg.failover {
        mcfg.failover = Some(FailoverConfig::new(cluster));
    }
    let manager = ActorMigrationManager::new(
        mcfg,
        key.clone(),
        store,
        Box::new(DefaultMigrationPolicy::default()),
    )?;
    let mut peers = Vec::new();
    let mut pins = Vec::new();
    for p in &cfg.peers {
        manager.trust_peer(p.name.clone(), p.key()?);
        let pin = p.pin()?;
        pins.push(pin);
        peers.push(Peer {
            executor: p.name.clone(),
            addr: p.addr,
            pin,
        });
    }
    let tls = TlsIdentity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca, &pins)
        .context("loading the executor's TLS identity")?;
    let api_listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("binding the API on {}", cfg.api))?;
    let (node, handled) = ExecutorNode::start(
        manager,
        NodeConfig {
            tls,
            listen: cfg.listen,
            peers,
            tick: Duration::from_millis(20),
            budget: 256,
            gossip: cfg.gossip.as_ref().map(|g| GossipConfig {
                listen: g.listen,
                seeds: g.seeds.clone(),
                interval: Duration::from_millis(g.interval_ms),
                api: Some(cfg.api),
            }),
        },
    )
    .await
    .context("starting the executor")?;
    let secret = std::fs::read(&cfg.jwt_secret_file)
        .with_context(|| format!("reading {}", cfg.jwt_secret_file.display()))?;
    let state = api::State::new(node, tern_api::AuthKeys::from_secret(&secret), handled);
    println!(
        "executor {me} ready: protocol {}, api http://{}, key {}",
        state.node.local_addr(),
        cfg.api,
        hex::encode(key.verifying_key().to_bytes())
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tern_httpd::serve(
        api_listener,
        api::router(state),
        tern_httpd::Limits::default(),
        std::future::pending(),
    )
    .await;
    Ok(())
}
