//! Executors on loopback for the network tests and the benchmark: a CA,
//! a certificate per executor pinned by the others, a checkpoint store
//! each, every executor trusting the others' checkpoint keys.

use ed25519_dalek::SigningKey;
use std::time::Duration;
use tern_actors::gossip::GossipConfig;
use tern_actors::manager::{ActorMigrationManager, FailoverConfig, Handled, ManagerConfig};
use tern_actors::net::{ExecutorNode, NodeConfig, Peer};
use tern_actors::policy::DefaultMigrationPolicy;
use tern_actors::CheckpointStore;
use tern_proto::ExecutorId;
use tern_transport::certs;
use tern_transport::tls::{parse_pin, TlsIdentity};
use tokio::sync::mpsc::UnboundedReceiver;

/// Running executors and what their actors handled.
pub struct Cluster {
    pub nodes: Vec<ExecutorNode>,
    pub handled: Vec<UnboundedReceiver<Handled>>,
    _dir: tempfile::TempDir,
}

/// Starts `n` executors named `exec-0`.. on loopback, each with `state_limit`.
pub async fn cluster(n: usize, state_limit: u64) -> Cluster {
    cluster_with(n, state_limit, false).await
}

/// Like [`cluster`]; with `failover`, the executors gossip and replicate
/// their actors' checkpoints to restore them after a fault.
pub async fn cluster_with(n: usize, state_limit: u64, failover: bool) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::init_ca(&d.join("ca")).unwrap();
    let ca = d.join("ca/ca.pem");
    let names: Vec<String> = (0..n).map(|i| format!("exec-{i}")).collect();
    let issued: Vec<_> = names
        .iter()
        .map(|name| {
            certs::issue(&d.join("ca"), name, d, Duration::from_secs(86400), false).unwrap()
        })
        .collect();
    let pins: Vec<[u8; 32]> = issued
        .iter()
        .map(|i| parse_pin(&i.spki_sha256).unwrap())
        .collect();
    // Listeners first (ports are needed by everyone), on addresses the OS picks.
    let ports: Vec<std::net::SocketAddr> = (0..n)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        })
        .collect();
    let gossip_addrs: Vec<std::net::SocketAddr> = (0..n)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        })
        .collect();
    let ids: Vec<ExecutorId> = names
        .iter()
        .map(|n| ExecutorId::new(n.as_str()).unwrap())
        .collect();
    let key = |i: usize| SigningKey::from_bytes(&[i as u8 + 1; 32]);
    let mut nodes = Vec::new();
    let mut handled = Vec::new();
    for i in 0..n {
        let others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        let other_pins: Vec<[u8; 32]> = others.iter().map(|&j| pins[j]).collect();
        let tls = TlsIdentity::load(&issued[i].cert, &issued[i].key, &ca, &other_pins).unwrap();
        let store_dir = d.join(format!("store-{i}"));
        std::fs::create_dir_all(&store_dir).unwrap();
        let store = CheckpointStore::open(&store_dir, state_limit).unwrap();
        let mut cfg = ManagerConfig::new(ExecutorId::new(names[i].as_str()).unwrap());
        cfg.max_state_bytes = state_limit;
        if failover {
            cfg.failover = Some(FailoverConfig::new(ids.clone()));
        }
        let m = ActorMigrationManager::new(
            cfg,
            key(i),
            store,
            Box::new(DefaultMigrationPolicy::default()),
        )
        .unwrap();
        for &j in &others {
            m.trust_peer(
                ExecutorId::new(names[j].as_str()).unwrap(),
                key(j).verifying_key().to_bytes(),
            );
        }
        let peers = others
            .iter()
            .map(|&j| Peer {
                executor: ExecutorId::new(names[j].as_str()).unwrap(),
                addr: Some(ports[j]),
                pin: pins[j],
            })
            .collect();
        let (node, rx) = ExecutorNode::start(
            m,
            NodeConfig {
                tls,
                listen: ports[i],
                peers,
                tick: Duration::from_millis(10),
                budget: 64,
                gossip: failover.then(|| GossipConfig {
                    listen: gossip_addrs[i],
                    seeds: others.iter().map(|&j| gossip_addrs[j]).collect(),
                    interval: Duration::from_millis(100),
                    api: None,
                }),
            },
        )
        .await
        .unwrap();
        nodes.push(node);
        handled.push(rx);
    }
    Cluster {
        nodes,
        handled,
        _dir: dir,
    }
}
