//! Live migrations between the fleet's hosts, tenant-scoped like VMs: a
//! tenant asks to move its own VMs and sees only their migrations (another
//! tenant's migration is a 404, as if it did not exist). Admins also drain
//! hosts (`POST /api/v1/hosts/{id}/drain`): every VM moves away live.

use crate::auth::{AuthKeys, Caller, Permission};
use crate::body::{json_body, MAX_BODY};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::convert::Infallible;
use std::sync::Arc;
use tern_fleet::{Ask, MigrationError, Migrations};
use tern_proto::{HostId, HostRecord, HostState, MigrationId, MigrationReason, MigrationRecord};
use tern_store::Store;

/// What the migration endpoints need.
#[derive(Clone)]
pub struct MigrationsApi {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Token keys.
    pub auth: Arc<AuthKeys>,
    /// The fleet's migrations.
    pub migrations: Arc<Migrations>,
}

impl FromRef<MigrationsApi> for Arc<AuthKeys> {
    fn from_ref(s: &MigrationsApi) -> Self {
        s.auth.clone()
    }
}

/// The migration endpoints, to merge into the API's router.
pub fn migrations_router(api: MigrationsApi) -> Router {
    Router::new()
        .route("/api/v1/vms/{id}/migrate", post(migrate))
        .route("/api/v1/migrations", get(list))
        .route("/api/v1/migrations/{id}", get(one).delete(cancel))
        .route("/api/v1/migrations/{id}/events", get(events))
        .route("/api/v1/hosts/{id}/drain", post(drain))
        .route("/api/v1/hosts/{id}/evacuate", post(evacuate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "migration endpoint failure");
    ApiError::Internal(e.to_string())
}

impl From<MigrationError> for ApiError {
    fn from(e: MigrationError) -> Self {
        let msg = e.to_string();
        match e {
            MigrationError::NotFound(_) | MigrationError::NoMigration(_) => ApiError::NotFound(msg),
            MigrationError::NotRunning { .. }
            | MigrationError::Busy(_)
            | MigrationError::Ended(_)
            | MigrationError::TooLate(_)
            | MigrationError::SameHost { .. } => ApiError::Conflict(msg),
            MigrationError::Refused { .. } | MigrationError::Options(_) => {
                ApiError::BadRequest(msg)
            }
            MigrationError::Store(_) | MigrationError::Driver(_) => internal(msg),
        }
    }
}

/// The migration `id`, if `caller` may see its VM.
async fn visible(
    s: &MigrationsApi,
    caller: &Caller,
    id: &str,
) -> Result<MigrationRecord, ApiError> {
    let missing = || ApiError::NotFound(format!("migration {id} not found"));
    let mid = MigrationId::new(id).map_err(|_| missing())?;
    let m = s
        .store
        .get_migration(&mid)
        .await
        .map_err(internal)?
        .ok_or_else(missing)?;
    let vm = s.store.get_vm(m.vm).await.map_err(internal)?;
    match vm {
        Some(v) if caller.can_see(v.tenant.as_ref()) => Ok(m),
        _ => Err(missing()),
    }
}

async fn migrate(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<MigrationRecord>), ApiError> {
    caller.require(Permission::VmsWrite)?;
    let missing = || ApiError::NotFound(format!("VM {id} not found"));
    let vm = id.parse().map_err(|_| missing())?;
    let rec = s
        .store
        .get_vm(vm)
        .await
        .map_err(internal)?
        .ok_or_else(missing)?;
    if !caller.can_see(rec.tenant.as_ref()) {
        return Err(missing());
    }
    let mut options: serde_json::Value =
        json_body(&headers, body)?.unwrap_or_else(|| serde_json::json!({}));
    let to = match options.as_object_mut().and_then(|o| o.remove("to")) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(t)) => {
            Some(HostId::new(t).map_err(|e| ApiError::BadRequest(format!("to: {e}")))?)
        }
        Some(_) => return Err(ApiError::BadRequest("to must be a host id".into())),
    };
    let m = s
        .migrations
        .request(Ask {
            vm,
            to,
            reason: MigrationReason::Manual,
            options,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

async fn list(
    State(s): State<MigrationsApi>,
    caller: Caller,
) -> Result<Json<Vec<MigrationRecord>>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let all = s.store.list_migrations(false).await.map_err(internal)?;
    let mut out = Vec::new();
    for m in all {
        let vm = s.store.get_vm(m.vm).await.map_err(internal)?;
        if vm.is_some_and(|v| caller.can_see(v.tenant.as_ref())) {
            out.push(m);
        }
    }
    Ok(Json(out))
}

/// One migration, with its progress as the source's agent has it while it
/// runs.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MigrationDetail {
    /// The record.
    #[serde(flatten)]
    pub record: MigrationRecord,
    /// Pages sent and remaining, throughput, predicted downtime, ETA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<tern_agent::views::MigrationView>,
}

async fn one(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MigrationDetail>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let record = visible(&s, &caller, &id).await?;
    let progress = if record.phase.is_final() {
        None
    } else {
        s.migrations.live_view(&record).await
    };
    Ok(Json(MigrationDetail { record, progress }))
}

/// Cancels a migration before its switchover; it rolls back.
async fn cancel(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<MigrationRecord>), ApiError> {
    caller.require(Permission::VmsWrite)?;
    let m = visible(&s, &caller, &id).await?;
    let m = s.migrations.cancel(&m.id).await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

/// Server-sent events: a `progress` event with the source agent's view
/// every 500 ms while the migration runs, then an `end` event with the
/// record.
async fn events(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let first = visible(&s, &caller, &id).await?;
    let stream = futures::stream::unfold((s, first.id, false), |(s, mid, done)| async move {
        if done {
            return None;
        }
        let m = s.store.get_migration(&mid).await.ok().flatten()?;
        if m.phase.is_final() {
            let ev = Event::default().event("end").json_data(&m).ok()?;
            return Some((Ok(ev), (s, mid, true)));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let view = s.migrations.live_view(&m).await;
        let data = serde_json::json!({ "phase": m.phase, "agent": view });
        let ev = Event::default().event("progress").json_data(&data).ok()?;
        Some((Ok(ev), (s, mid, false)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Marks a host `draining`: it takes nothing new and the fleet's runner
/// moves its VMs away live, two at a time.
async fn drain(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HostRecord>, ApiError> {
    empty_host(&s, &caller, &id, HostState::Draining).await
}

/// Marks a host `evacuating`: like a drain, but its moves go first and
/// preempt the rebalancing migrations in their way.
async fn evacuate(
    State(s): State<MigrationsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<HostRecord>, ApiError> {
    empty_host(&s, &caller, &id, HostState::Evacuating).await
}

async fn empty_host(
    s: &MigrationsApi,
    caller: &Caller,
    id: &str,
    to: HostState,
) -> Result<Json<HostRecord>, ApiError> {
    caller.require(Permission::PlatformAdmin)?;
    let missing = || ApiError::NotFound(format!("host {id}"));
    let hid = HostId::new(id).map_err(|_| missing())?;
    let h = s
        .store
        .get_host(&hid)
        .await
        .map_err(internal)?
        .ok_or_else(missing)?;
    if h.state == to {
        return Ok(Json(h));
    }
    // An evacuation may overtake a drain; nothing else changes course.
    let from = match (h.state, to) {
        (HostState::Active, _) => HostState::Active,
        (HostState::Draining, HostState::Evacuating) => HostState::Draining,
        (state, _) => {
            return Err(ApiError::Conflict(format!(
                "host {id} is {}: cannot make it {}",
                state.as_str(),
                to.as_str()
            )))
        }
    };
    match s.store.set_host_state(&hid, from, to).await {
        Ok(h) => {
            tracing::info!(host = %hid, state = to.as_str(), "emptying a host");
            Ok(Json(h))
        }
        Err(e @ tern_store::StoreError::HostConflict { .. }) => {
            Err(ApiError::Conflict(e.to_string()))
        }
        Err(e) => Err(internal(e)),
    }
}
