//! The endpoints.

use crate::auth::{AuthKeys, Caller, Permission};
use crate::body::{json_body, MAX_BODY};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRef, Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_orchestrator::{Manager, ProvisionSource};
use tern_proto::{CreateVmRequest, VmConfig, VmId, VmRecord, VmStatus};

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The orchestrator.
    pub manager: Arc<Manager>,
    /// Token keys.
    pub auth: Arc<AuthKeys>,
    /// Who may scrape `/metrics` on this router.
    pub metrics: MetricsAccess,
}

/// How `/metrics` is reached: metrics name every tenant's VM counts and the
/// API's traffic, so they are not for anyone who can reach the API.
#[derive(Clone, Debug)]
pub enum MetricsAccess {
    /// With `Authorization: Bearer <this token>` (compared in constant time).
    Token(Arc<str>),
    /// By anyone who reaches the router: for a listener of its own on an
    /// address only the operator's scraper reaches.
    Open,
    /// Not on this router (served on another listener).
    Off,
}

impl FromRef<ApiState> for Arc<AuthKeys> {
    fn from_ref(s: &ApiState) -> Self {
        s.auth.clone()
    }
}

/// A VM as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    /// The record.
    #[serde(flatten)]
    pub vm: VmRecord,
    /// `warm` or `cold`, on creation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioned_from: Option<String>,
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    // Install the recorder before anything is counted, or early counts are lost.
    let _ = crate::prometheus();
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/vms", post(create_vm).get(list_vms))
        .route("/api/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/api/v1/vms/{id}/configure", post(configure_vm))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(crate::metrics_layer::track))
        .with_state(state)
}

/// `/metrics` alone, open to whoever reaches it: for a listener of its own
/// (`metrics_listen`) on an address only the operator's scraper reaches.
pub fn metrics_router(mut state: ApiState) -> Router {
    let _ = crate::prometheus();
    state.metrics = MetricsAccess::Open;
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
}

async fn healthz(State(s): State<ApiState>) -> impl IntoResponse {
    // Healthy means the store answers; the driver's VMs have their own checks.
    match s.manager.store().count_by_status().await {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "error": e.to_string()})),
        ),
    }
}

async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Result<String, ApiError> {
    match &s.metrics {
        MetricsAccess::Open => {}
        MetricsAccess::Off => return Err(ApiError::NotFound("no such endpoint".into())),
        MetricsAccess::Token(t) => {
            use subtle::ConstantTimeEq;
            let given = headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !bool::from(given.as_bytes().ct_eq(t.as_bytes())) {
                tracing::warn!("refused a metrics scrape: missing or wrong metrics token");
                return Err(ApiError::Unauthorized(
                    "/metrics needs `Authorization: Bearer <metrics token>`".into(),
                ));
            }
        }
    }
    let counts = s
        .manager
        .store()
        .count_by_status()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    for (status, n) in counts {
        metrics::gauge!("tern_vms", "status" => status.as_str()).set(n as f64);
        if status == VmStatus::Warm {
            metrics::gauge!("tern_warm_pool_size").set(n as f64);
        }
    }
    metrics::gauge!("tern_warm_pool_target").set(s.manager.config().warm_pool_size as f64);
    Ok(crate::prometheus().render())
}

fn parse_id(id: &str) -> Result<VmId, ApiError> {
    id.parse()
        .map_err(|e: tern_proto::IdError| ApiError::NotFound(e.to_string()))
}

/// Loads a VM the caller may see; anything else is indistinguishable from absence.
async fn visible_vm(s: &ApiState, caller: &Caller, id: &str) -> Result<VmRecord, ApiError> {
    let id = parse_id(id)?;
    let vm = s.manager.get(id).await?;
    if caller.can_see(vm.tenant.as_ref()) {
        Ok(vm)
    } else {
        Err(ApiError::NotFound(format!("VM {id} not found")))
    }
}

async fn create_vm(
    State(s): State<ApiState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    caller.require(Permission::VmsWrite)?;
    // An empty body is a request with every default.
    let req: CreateVmRequest = json_body(&headers, body)?.unwrap_or_default();
    let (vm, source) = s
        .manager
        .provision(&caller.tenant, req.spec, req.config)
        .await?;
    let source = match source {
        ProvisionSource::Warm => "warm",
        ProvisionSource::Cold => "cold",
    };
    Ok((
        StatusCode::CREATED,
        Json(VmView {
            vm,
            provisioned_from: Some(source.into()),
        }),
    ))
}

async fn list_vms(
    State(s): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<VmView>>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let tenant = (!caller.is_admin()).then_some(&caller.tenant);
    let vms = s.manager.list(tenant).await?;
    Ok(Json(
        vms.into_iter()
            .map(|vm| VmView {
                vm,
                provisioned_from: None,
            })
            .collect(),
    ))
}

async fn get_vm(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let vm = visible_vm(&s, &caller, &id).await?;
    Ok(Json(VmView {
        vm,
        provisioned_from: None,
    }))
}

async fn delete_vm(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let vm = visible_vm(&s, &caller, &id).await?;
    s.manager.destroy(vm.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn configure_vm(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VmView>, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let config: VmConfig = json_body(&headers, body)?
        .ok_or_else(|| ApiError::BadRequest("a configuration body is required".into()))?;
    let vm = visible_vm(&s, &caller, &id).await?;
    let vm = s.manager.configure(vm.id, config).await?;
    Ok(Json(VmView {
        vm,
        provisioned_from: None,
    }))
}
