//! What a host and the control plane say to each other when the host joins
//! and at every heartbeat (`POST /api/v1/hosts/join`,
//! `POST /api/v1/hosts/{id}/heartbeat`). Both sides build these types, so
//! the wire cannot drift between them.

use crate::{Capacity, HostId, HostLoad, HostState, Labels};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A host asking to join.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The one-time join token.
    pub token: String,
    /// The host's id (its name in the fleet and in its certificate).
    pub id: HostId,
    /// Where its migration listener is reached.
    pub migrate_addr: SocketAddr,
    /// Its agent API.
    pub api_url: String,
    /// The token the control plane calls its agent API with.
    pub api_token: String,
    /// Its certificate signing request, PEM.
    pub csr_pem: String,
    /// Its Ed25519 manifest key, hex.
    pub manifest_key: String,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
    /// What it may hand out.
    pub capacity: Capacity,
}

/// A peer as agents configure it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    /// Its id.
    pub id: HostId,
    /// Its migration listener.
    pub migrate_addr: String,
    /// Its certificate's SPKI pin, hex.
    pub cert_pin: String,
    /// Its manifest key, hex.
    pub manifest_key: String,
}

/// What a joined host gets back.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    /// Its certificate's SPKI pin, hex.
    pub cert_pin: String,
    /// The token its heartbeats carry (shown once).
    pub host_token: String,
    /// Its peers (every other active or draining host).
    pub peers: Vec<PeerView>,
}

/// A guest a host runs, at the owner epoch it runs it at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningGuest {
    /// The VM's id.
    pub id: String,
    /// Its owner epoch on this host.
    pub epoch: u64,
}

/// What a host says at each heartbeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Its load.
    pub load: HostLoad,
    /// The guests it runs.
    #[serde(default)]
    pub running: Vec<RunningGuest>,
}

/// What a heartbeat gets back.
#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// The host's state as the control plane sees it.
    pub state: HostState,
    /// Its peers now.
    pub peers: Vec<PeerView>,
    /// Guests it reported that it must stop now: the control plane moved
    /// them on (restarted elsewhere at a newer epoch while this host was
    /// away) or destroyed them. Running them would make a second copy.
    #[serde(default)]
    pub fenced: Vec<String>,
    /// How long, from when it sent this heartbeat, the host may run its
    /// guests without hearing from the control plane again (0: no lease).
    /// Shorter than the silence after which the control plane declares the
    /// host down and runs its VMs elsewhere, so a cut-off host has paused
    /// them by then.
    #[serde(default)]
    pub lease_ms: u64,
}

/// A new join token (shown once).
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinToken {
    /// The token.
    pub token: String,
    /// Seconds it stays valid.
    pub expires_in_secs: u64,
}
