//! Membership by gossip: executors find each other, learn each other's
//! load, queue depth and capacity, and which actors each one owns, through
//! chitchat (Scuttlebutt reconciliation and a phi-accrual failure detector
//! over UDP).
//!
//! Gossip is not authenticated, so it decides nothing that matters for
//! safety: who an executor is and what it signs come from the trusted peer
//! list and its TLS pins; an address learnt here is only used to dial, and
//! the TLS handshake checks the pin; a node gossip calls dead only makes the
//! others *look* at whether its actors may be claimed, which the leases and
//! votes over the authenticated links decide (see `manager::failover`).

use crate::policy::ExecutorLoad;
use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_proto::{ActorId, ExecutorId};

const CLUSTER: &str = "tern-actors";
const KEY_ADDR: &str = "addr";
const KEY_LOAD: &str = "load";
const KEY_QUEUE: &str = "queue_depth";
const KEY_ACTORS: &str = "actors";
const KEY_CAPACITY: &str = "capacity";
const KEY_OWNS: &str = "owns";
const KEY_API: &str = "api";

/// Where this executor gossips, and with whom it starts.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// The UDP address to gossip on (and advertise).
    pub listen: SocketAddr,
    /// Other executors' gossip addresses to start from.
    pub seeds: Vec<SocketAddr>,
    /// How often to gossip; failures are noticed after some 20 intervals.
    pub interval: Duration,
    /// This executor's REST API, told to the others (and so to clients
    /// asking them where an actor runs).
    pub api: Option<SocketAddr>,
}

/// Another executor as gossip sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Where its actor protocol listens.
    pub addr: SocketAddr,
    /// Its load report.
    pub load: ExecutorLoad,
    /// The actors it runs.
    pub owns: Vec<ActorId>,
    /// Its REST API, if it has one.
    pub api: Option<SocketAddr>,
}

/// This executor's gossip.
pub struct Membership {
    handle: ChitchatHandle,
}

/// Why gossip did not start.
#[derive(Debug, thiserror::Error)]
#[error("gossip on {addr}: {message}")]
pub struct GossipError {
    addr: SocketAddr,
    message: String,
}

impl Membership {
    /// Starts gossiping as `me`, whose actor protocol listens on `addr`.
    pub async fn start(
        me: &ExecutorId,
        addr: SocketAddr,
        cfg: &GossipConfig,
    ) -> Result<Self, GossipError> {
        // A new generation each start: peers tell a restarted executor from
        // the one that died.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(me.as_str(), generation, cfg.listen),
            cluster_id: CLUSTER.into(),
            gossip_interval: cfg.interval,
            listen_addr: cfg.listen,
            seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                initial_interval: cfg.interval,
                max_interval: cfg.interval * 20,
                dead_node_grace_period: Duration::from_secs(3600),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let mut initial = vec![(KEY_ADDR.to_string(), addr.to_string())];
        if let Some(api) = cfg.api {
            initial.push((KEY_API.to_string(), api.to_string()));
        }
        let handle = spawn_chitchat(config, initial, &UdpTransport)
            .await
            .map_err(|e| GossipError {
                addr: cfg.listen,
                message: format!("{e:#}"),
            })?;
        Ok(Self { handle })
    }

    /// Says what this executor carries and runs.
    pub async fn publish(&self, load: &ExecutorLoad, owns: &[ActorId]) {
        let owns = owns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        self.handle
            .with_chitchat(|c| {
                let s = c.self_node_state();
                s.set(KEY_LOAD, load.load);
                s.set(KEY_QUEUE, load.queue_depth);
                s.set(KEY_ACTORS, load.actors);
                s.set(KEY_CAPACITY, load.capacity);
                s.set(KEY_OWNS, &owns);
            })
            .await;
    }

    /// The other executors gossip says are alive (a node whose values do
    /// not parse is left out, and logged).
    pub async fn live(&self) -> BTreeMap<ExecutorId, Member> {
        self.handle
            .with_chitchat(|c| {
                let me = c.self_chitchat_id().clone();
                let mut out = BTreeMap::new();
                for id in c.live_nodes().filter(|id| **id != me) {
                    let Some(state) = c.node_state(id) else {
                        continue;
                    };
                    match member(&id.node_id, |k| state.get(k)) {
                        Some((e, m)) => {
                            out.insert(e, m);
                        }
                        None => tracing::debug!(node = %id.node_id, "gossip from a node with unreadable values"),
                    }
                }
                out
            })
            .await
    }

    /// Stops gossiping.
    pub fn shutdown(&self) {
        let _ = self.handle.initiate_shutdown();
    }
}

/// A member from its gossiped values, or `None` if any is missing or bad.
fn member<'a>(node: &str, get: impl Fn(&str) -> Option<&'a str>) -> Option<(ExecutorId, Member)> {
    let executor = ExecutorId::new(node).ok()?;
    let load: f64 = get(KEY_LOAD)?.parse().ok()?;
    if !(0.0..=1.0).contains(&load) {
        return None;
    }
    let owns = match get(KEY_OWNS)? {
        "" => Vec::new(),
        s => s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<ActorId>, _>>()
            .ok()?,
    };
    let m = Member {
        addr: get(KEY_ADDR)?.parse().ok()?,
        load: ExecutorLoad {
            executor: executor.clone(),
            load,
            queue_depth: get(KEY_QUEUE)?.parse().ok()?,
            actors: get(KEY_ACTORS)?.parse().ok()?,
            capacity: get(KEY_CAPACITY)?.parse().ok()?,
        },
        owns,
        api: match get(KEY_API) {
            Some(a) => Some(a.parse().ok()?),
            None => None,
        },
    };
    Some((executor, m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn gossiped_values_parse_or_the_member_is_left_out() {
        let actor = ActorId::from_bytes([3; 16]);
        let mut kv: HashMap<&str, String> = HashMap::from([
            (KEY_ADDR, "127.0.0.1:4000".to_string()),
            (KEY_LOAD, "0.25".to_string()),
            (KEY_QUEUE, "3".to_string()),
            (KEY_ACTORS, "1".to_string()),
            (KEY_CAPACITY, "10".to_string()),
            (KEY_OWNS, actor.to_string()),
        ]);
        let (e, m) = member("exec-b", |k| kv.get(k).map(String::as_str)).unwrap();
        assert_eq!(e.as_str(), "exec-b");
        assert_eq!(m.owns, [actor]);
        assert_eq!(m.load.queue_depth, 3);
        for (k, bad) in [
            (KEY_LOAD, "NaN"),
            (KEY_LOAD, "2"),
            (KEY_OWNS, "x,y"),
            (KEY_ADDR, "nowhere"),
        ] {
            let old = kv.insert(k, bad.to_string()).unwrap();
            assert!(
                member("exec-b", |k| kv.get(k).map(String::as_str)).is_none(),
                "{k}={bad}"
            );
            kv.insert(k, old);
        }
        assert!(member("not a name!", |k| kv.get(k).map(String::as_str)).is_none());
    }
}
