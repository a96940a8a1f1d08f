//! Hosts joining the control plane: one-time join tokens, certificates
//! signed by the control plane's CA, heartbeats, and the peer list every
//! agent configures its migration peers from.
//!
//! A host joins with a join token an admin made (`POST
//! /api/v1/hosts/join-tokens`); the token is used up. It sends a certificate
//! signing request (its key never leaves it) and gets back its certificate,
//! the CA, a host token for its heartbeats, and its peers. Heartbeats carry
//! its load and answer with the current peers, so a host removed or down is
//! dropped by every peer at its next beat. Tokens are stored only as hashes.

use crate::auth::{AuthKeys, Caller, Permission};
use crate::body::{json_body, MAX_BODY};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;
pub use tern_proto::{
    Heartbeat, HeartbeatResponse, JoinRequest, JoinResponse, JoinToken, PeerView, RunningGuest,
};
use tern_proto::{HostId, HostLoad, HostRecord, HostState};
use tern_store::Store;

/// Largest certificate signing request accepted.
pub const MAX_CSR: usize = 16 << 10;

/// What the host endpoints need.
#[derive(Clone)]
pub struct FleetApi {
    /// The store (hosts, join tokens).
    pub store: Arc<dyn Store>,
    /// Token keys (admins make join tokens and list hosts).
    pub auth: Arc<AuthKeys>,
    /// The control plane's CA (`ca.pem`, `ca.key`).
    pub ca_dir: std::path::PathBuf,
    /// How long issued host certificates are valid.
    pub cert_validity: Duration,
    /// How long a join token is valid.
    pub join_token_ttl: Duration,
    /// The lease each heartbeat grants its host (`Duration::ZERO`: none):
    /// shorter than the silence after which the host is down, so a host
    /// cut off has paused its guests before they run elsewhere.
    pub host_lease: Duration,
}

impl FromRef<FleetApi> for Arc<AuthKeys> {
    fn from_ref(s: &FleetApi) -> Self {
        s.auth.clone()
    }
}

/// The host endpoints, to merge into the API's router.
pub fn hosts_router(api: FleetApi) -> Router {
    Router::new()
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/join-tokens", post(new_join_token))
        .route("/api/v1/hosts/join", post(join))
        .route("/api/v1/hosts/{id}", delete(remove_host))
        .route("/api/v1/hosts/{id}/heartbeat", post(heartbeat))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "host endpoint failure");
    ApiError::Internal(e.to_string())
}

fn hash(token: &str) -> String {
    hex::encode(tern_transport::tls::sha256(token.as_bytes()))
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Every host but `except` that peers may talk to (not down).
async fn peers(store: &dyn Store, except: Option<&HostId>) -> Result<Vec<PeerView>, ApiError> {
    Ok(store
        .list_hosts()
        .await
        .map_err(internal)?
        .into_iter()
        .filter(|h| Some(&h.id) != except && h.state != HostState::Down)
        .map(|h| PeerView {
            id: h.id,
            migrate_addr: h.migrate_addr,
            cert_pin: h.cert_pin,
            manifest_key: h.manifest_key,
        })
        .collect())
}

/// Most guests one heartbeat may report.
pub const MAX_REPORTED_GUESTS: usize = 4096;

/// The guests `host` runs that it must stop: the store destroyed them, or
/// gave them to another host at an epoch at least the one `host` runs.
/// (A guest that arrived by a migration runs at a newer epoch than the
/// store's until the control plane records the move: not fenced.) Guests
/// the store never knew (made through the agent's own API) are not the
/// control plane's to stop.
async fn fenced(
    store: &dyn Store,
    host: &HostId,
    running: &[RunningGuest],
) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for g in running {
        let Ok(id) = g.id.parse::<tern_proto::VmId>() else {
            continue;
        };
        let Some(rec) = store.get_vm(id).await.map_err(internal)? else {
            continue;
        };
        let moved_on = &rec.host != host && rec.owner_epoch.0 >= g.epoch;
        if !rec.status.is_live() || moved_on {
            tracing::warn!(host = %host, vm = %id, epoch = g.epoch, owner = %rec.host, owner_epoch = rec.owner_epoch.0, "fencing a stale copy");
            out.push(g.id.clone());
        }
    }
    Ok(out)
}

async fn list_hosts(
    State(s): State<FleetApi>,
    caller: Caller,
) -> Result<Json<Vec<HostRecord>>, ApiError> {
    caller.require(Permission::PlatformAdmin)?;
    Ok(Json(s.store.list_hosts().await.map_err(internal)?))
}

/// Removes a host: down, its token revoked, dropped by its peers at their
/// next heartbeat. (Its VMs are not moved: drain it first.)
async fn remove_host(
    State(s): State<FleetApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HostRecord>, ApiError> {
    caller.require(Permission::PlatformAdmin)?;
    let missing = || ApiError::NotFound(format!("host {id}"));
    let hid = HostId::new(id.clone()).map_err(|_| missing())?;
    match s.store.remove_host(&hid).await {
        Ok(h) => {
            tracing::info!(host = %hid, tenant = %caller.tenant, "host removed from the fleet");
            Ok(Json(h))
        }
        Err(tern_store::StoreError::HostNotFound(_)) => Err(missing()),
        Err(e) => Err(internal(e)),
    }
}

async fn new_join_token(
    State(s): State<FleetApi>,
    caller: Caller,
) -> Result<(StatusCode, Json<JoinToken>), ApiError> {
    caller.require(Permission::PlatformAdmin)?;
    let token = random_token();
    s.store
        .add_join_token(&hash(&token), s.join_token_ttl)
        .await
        .map_err(internal)?;
    tracing::info!(tenant = %caller.tenant, "join token issued");
    Ok((
        StatusCode::CREATED,
        Json(JoinToken {
            token,
            expires_in_secs: s.join_token_ttl.as_secs(),
        }),
    ))
}

/// Checks what a joining host says about itself before anything is stored.
fn check_join(req: &JoinRequest) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    if req.csr_pem.len() > MAX_CSR {
        return bad(format!("csr_pem is larger than {MAX_CSR} bytes"));
    }
    let key_ok = req.manifest_key.len() == 64 && hex::decode(&req.manifest_key).is_ok();
    if !key_ok {
        return bad("manifest_key must be 32 bytes of hex (an Ed25519 public key)".into());
    }
    if !(req.api_url.starts_with("http://") || req.api_url.starts_with("https://"))
        || req.api_url.len() > 256
    {
        return bad("api_url must be an http:// or https:// URL".into());
    }
    if req.api_token.len() < 16 || req.api_token.len() > 256 {
        return bad("api_token must be 16 to 256 characters".into());
    }
    if req.capacity.memory_mib == 0 || req.capacity.vcpus == 0 {
        return bad("capacity must name memory_mib and vcpus above zero".into());
    }
    Ok(())
}

async fn join(
    State(s): State<FleetApi>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<JoinResponse>), ApiError> {
    let req: JoinRequest = json_body(&headers, body)?
        .ok_or_else(|| ApiError::BadRequest("a join request needs a body".into()))?;
    check_join(&req)?;
    // Signing stores nothing: a bad request is refused before the token is used.
    let signed = tern_transport::certs::sign_host_csr(
        &s.ca_dir,
        req.id.as_str(),
        &req.csr_pem,
        s.cert_validity,
    )
    .map_err(|e| match e {
        tern_transport::certs::CertError::Gen(e) => {
            ApiError::BadRequest(format!("csr_pem is not a certificate signing request: {e}"))
        }
        other => internal(other),
    })?;
    if !s
        .store
        .redeem_join_token(&hash(&req.token), &req.id)
        .await
        .map_err(internal)?
    {
        tracing::warn!(host = %req.id, "refused a join: unknown, used or expired join token");
        return Err(ApiError::Unauthorized(
            "the join token is unknown, used or expired".into(),
        ));
    }
    let host_token = random_token();
    let record = HostRecord {
        id: req.id.clone(),
        migrate_addr: req.migrate_addr.to_string(),
        api_url: req.api_url,
        cert_pin: signed.spki_sha256.clone(),
        manifest_key: req.manifest_key.to_lowercase(),
        labels: req.labels,
        capacity: req.capacity,
        state: HostState::Active,
        load: HostLoad::default(),
        last_heartbeat: None,
        joined_at: chrono::Utc::now(),
    };
    s.store
        .upsert_host(&record, &hash(&host_token), &req.api_token)
        .await
        .map_err(internal)?;
    tracing::info!(host = %req.id, pin = %signed.spki_sha256, "host joined");
    Ok((
        StatusCode::CREATED,
        Json(JoinResponse {
            cert_pem: signed.cert_pem,
            ca_pem: signed.ca_pem,
            cert_pin: signed.spki_sha256,
            host_token,
            peers: peers(&*s.store, Some(&req.id)).await?,
        }),
    ))
}

async fn heartbeat(
    State(s): State<FleetApi>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let refuse = || ApiError::Unauthorized("a heartbeat needs its host's token".into());
    let id = HostId::new(id).map_err(|_| refuse())?;
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(refuse)?;
    let stored = s.store.host_token_hash(&id).await.map_err(internal)?;
    let matches = stored.is_some_and(|h| {
        use subtle::ConstantTimeEq;
        bool::from(h.as_bytes().ct_eq(hash(given).as_bytes()))
    });
    if !matches {
        tracing::warn!(host = %id, "refused a heartbeat: wrong host token");
        return Err(refuse());
    }
    let beat: Heartbeat = json_body(&headers, body)?.unwrap_or_default();
    if beat.running.len() > MAX_REPORTED_GUESTS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_REPORTED_GUESTS} running guests per heartbeat"
        )));
    }
    let mut h = s.store.heartbeat(&id, &beat.load).await.map_err(internal)?;
    // Fencing first: a host back from being down stops its stale copies in
    // this answer, before it takes work again.
    let fenced = fenced(&*s.store, &id, &beat.running).await?;
    if h.state == HostState::Down {
        match s
            .store
            .set_host_state(&id, HostState::Down, HostState::Active)
            .await
        {
            Ok(back) => {
                tracing::info!(host = %id, fenced = fenced.len(), "host back: active again");
                h = back;
            }
            Err(e) => tracing::debug!(host = %id, error = %e, "host state changed meanwhile"),
        }
    }
    Ok(Json(HeartbeatResponse {
        state: h.state,
        peers: peers(&*s.store, Some(&id)).await?,
        fenced,
        lease_ms: u64::try_from(s.host_lease.as_millis()).unwrap_or(u64::MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{Capacity, Labels};

    fn req() -> JoinRequest {
        JoinRequest {
            token: "t".into(),
            id: HostId::new("h1").unwrap(),
            migrate_addr: "127.0.0.1:7001".parse().unwrap(),
            api_url: "http://127.0.0.1:7000".into(),
            api_token: "t".repeat(32),
            csr_pem: "x".into(),
            manifest_key: "ab".repeat(32),
            labels: Labels::new(),
            capacity: Capacity {
                memory_mib: 1024,
                vcpus: 2,
            },
        }
    }

    #[test]
    fn join_requests_are_checked_before_anything_is_stored() {
        assert!(check_join(&req()).is_ok());
        let mut r = req();
        r.manifest_key = "zz".repeat(32);
        assert!(check_join(&r).is_err());
        let mut r = req();
        r.csr_pem = "x".repeat(MAX_CSR + 1);
        assert!(check_join(&r).is_err());
        let mut r = req();
        r.api_url = "file:///etc/passwd".into();
        assert!(check_join(&r).is_err());
        let mut r = req();
        r.capacity.vcpus = 0;
        assert!(check_join(&r).is_err());
    }
}
