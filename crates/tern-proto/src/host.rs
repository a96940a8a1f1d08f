//! Hosts of a fleet and why migrations happen: the control plane, the
//! scheduler and the agents name them the same way.

use crate::{HostId, MigrationId, MigrationPhase, VmId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Labels of a host (`region=eu`), and the labels a VM requires of any
/// host it runs on (data residency: a VM that requires `region=eu` never
/// lands on a host without it).
pub type Labels = BTreeMap<String, String>;

/// Whether `host` carries every label `required` names, with its value.
pub fn labels_satisfy(host: &Labels, required: &Labels) -> bool {
    required.iter().all(|(k, v)| host.get(k) == Some(v))
}

/// A host's standing in the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Takes new VMs and incoming migrations.
    #[default]
    Active,
    /// Being emptied for maintenance: takes nothing new; its VMs move away.
    Draining,
    /// Failing, emptied now: like draining, but its moves go before every
    /// other migration and preempt the rebalancing ones in their way.
    Evacuating,
    /// Stopped sending heartbeats: its VMs are re-provisioned elsewhere,
    /// and whatever it still runs is fenced by epoch when it comes back.
    Down,
}

impl HostState {
    /// Whether new VMs and incoming migrations may land here.
    pub fn accepts_work(self) -> bool {
        self == HostState::Active
    }

    /// The name used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Active => "active",
            HostState::Draining => "draining",
            HostState::Evacuating => "evacuating",
            HostState::Down => "down",
        }
    }
}

/// What a host can hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Guest memory it may hand out, MiB.
    pub memory_mib: u64,
    /// vCPUs it may hand out.
    pub vcpus: u32,
}

/// A host's load, from its heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostLoad {
    /// Busy fraction of all its cores, 0..=1, averaged over about a
    /// minute (a burst does not make a host hot).
    pub cpu: f64,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// Memory free, MiB.
    pub memory_free_mib: u64,
    /// Network throughput, bytes/s (both directions).
    pub net_bytes_per_sec: u64,
    /// Disk I/O, bytes/s.
    pub disk_bytes_per_sec: u64,
    /// VMs it runs.
    pub vms: u32,
    /// Migrations it takes part in.
    pub migrations: u32,
}

/// Why a migration was asked for; the order is its priority: an evacuation
/// goes before maintenance, maintenance before a user's request, and those
/// before rebalancing, which may be preempted by any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationReason {
    /// The load policy moves a VM off a hot host.
    Rebalance,
    /// A user or operator asked for this VM to move.
    Manual,
    /// Its host is being drained.
    Maintenance,
    /// Its host is failing and must be emptied now.
    Evacuation,
}

impl MigrationReason {
    /// The name used in the API, the store and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationReason::Rebalance => "rebalance",
            MigrationReason::Manual => "manual",
            MigrationReason::Maintenance => "maintenance",
            MigrationReason::Evacuation => "evacuation",
        }
    }

    /// Its class's weight when a host's migration bandwidth is shared:
    /// each class gets a share by weight, split evenly among its
    /// migrations (an evacuation gets 8 times a rebalance's share).
    pub fn bandwidth_weight(self) -> f64 {
        match self {
            MigrationReason::Rebalance => 1.0,
            MigrationReason::Manual => 2.0,
            MigrationReason::Maintenance => 4.0,
            MigrationReason::Evacuation => 8.0,
        }
    }
}

/// A host that joined the control plane, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its id.
    pub id: HostId,
    /// Where its migration listener is reached (`host:port`).
    pub migrate_addr: String,
    /// Its agent API (`http://host:port`).
    pub api_url: String,
    /// SHA-256 pin of its certificate's public key (hex): what its peers
    /// accept on a migration stream.
    pub cert_pin: String,
    /// Its Ed25519 manifest key (hex): what its peers verify manifests with.
    pub manifest_key: String,
    /// Its labels.
    pub labels: Labels,
    /// What it may hand out.
    pub capacity: Capacity,
    /// Active, draining or down.
    pub state: HostState,
    /// Its last heartbeat's load.
    pub load: HostLoad,
    /// When its last heartbeat arrived.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// When it joined.
    pub joined_at: DateTime<Utc>,
}

/// A migration the control plane asked for, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// Its id (the same on both agents).
    pub id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Where the VM ran.
    pub from: HostId,
    /// Where it goes.
    pub to: HostId,
    /// Why, and so its priority.
    pub reason: MigrationReason,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The engine's report once it ended.
    pub report: Option<serde_json::Value>,
    /// When it was asked for.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// What it was asked with (mode, downtime budget, bandwidth), passed
    /// as is to the source host's agent.
    #[serde(default)]
    pub options: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn required_labels_must_all_match() {
        let host = labels(&[("region", "eu"), ("disk", "ssd")]);
        assert!(labels_satisfy(&host, &Labels::new()));
        assert!(labels_satisfy(&host, &labels(&[("region", "eu")])));
        assert!(!labels_satisfy(&host, &labels(&[("region", "us")])));
        assert!(!labels_satisfy(&host, &labels(&[("gpu", "yes")])));
    }

    #[test]
    fn evacuation_outranks_everything() {
        use MigrationReason::*;
        let mut v = vec![Manual, Evacuation, Rebalance, Maintenance];
        v.sort();
        assert_eq!(v, [Rebalance, Manual, Maintenance, Evacuation]);
        assert_eq!(
            serde_json::to_string(&Evacuation).unwrap(),
            "\"evacuation\""
        );
    }

    #[test]
    fn only_active_hosts_take_work() {
        assert!(HostState::Active.accepts_work());
        assert!(!HostState::Draining.accepts_work());
        assert!(!HostState::Down.accepts_work());
    }
}
