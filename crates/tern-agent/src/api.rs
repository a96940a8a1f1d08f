//! The host API (axum): VMs, migrations and a server-sent-events progress
//! stream, behind a bearer token kept in the data directory.

use crate::agent::{Agent, AgentError, MigrateRequest};
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::Stream;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use tern_proto::GuestSpec;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let code = match &self {
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            // Peers learned from a control plane may lag a heartbeat behind.
            AgentError::UnknownPeer { joined: true, .. } => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::UnknownPeer { joined: false, .. } => StatusCode::BAD_REQUEST,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Guest(_) => StatusCode::BAD_GATEWAY,
        };
        (code, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

#[derive(Clone)]
struct Ctx {
    agent: Agent,
    token: Arc<str>,
}

async fn auth(State(c): State<Ctx>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| {
            use subtle::ConstantTimeEq;
            // Constant time: how much of a guess matched must not show in
            // how long the answer takes.
            bool::from(t.as_bytes().ct_eq(c.token.as_bytes()))
        });
    if ok {
        next.run(req).await
    } else {
        let remote = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        tracing::warn!(method = %req.method(), path = req.uri().path(), remote, "rejected login: missing or wrong API token");
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "missing or wrong bearer token (see the agent's data_dir/api-token)" })),
        )
            .into_response()
    }
}

/// The router, with `token` required on every request.
pub fn router(agent: Agent, token: &str) -> Router {
    let ctx = Ctx {
        agent,
        token: token.into(),
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/host", get(host))
        .route("/api/v1/vms", get(list_vms).post(create_vm))
        .route("/api/v1/vms/{id}", get(get_vm).put(put_vm).delete(stop_vm))
        .route("/api/v1/vms/{id}/config", put(put_config))
        .route("/api/v1/vms/{id}/migrate", post(migrate))
        .route("/api/v1/migrations", get(list_migrations))
        .route(
            "/api/v1/migrations/{id}",
            get(get_migration).delete(cancel_migration),
        )
        .route("/api/v1/migrations/{id}/events", get(events))
        .route("/api/v1/migrations/{id}/redirect", post(redirect_migration))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), auth))
        .with_state(ctx)
}

/// The agent's recorder, installed once per process.
pub fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let b = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("migration_duration_seconds".into()),
                    &[
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("migration_checkpoint_size_bytes".into()),
                        &[1e6, 1e7, 1e8, 1e9, 1e10, 1e11],
                    )
                })
                .expect("static bucket lists are non-empty");
            b.install_recorder()
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle())
        })
        .clone()
}

/// Prometheus text: migrations (initiated, accepted, rejected, completed,
/// failed, duration, wire bytes), those active, the guests running, and
/// the host load of the last heartbeat.
async fn metrics(State(c): State<Ctx>) -> impl IntoResponse {
    metrics::gauge!("migrations_active").set(f64::from(c.agent.active_migrations()));
    metrics::gauge!("host_vms").set(f64::from(c.agent.running_vms()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
}

async fn host(State(c): State<Ctx>) -> Json<serde_json::Value> {
    Json(json!({
        "name": c.agent.name(),
        "migrate_addr": c.agent.migrate_addr().to_string(),
        "public_key": c.agent.public_key(),
        "peers": c.agent.peers().iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
    }))
}

async fn list_vms(State(c): State<Ctx>) -> impl IntoResponse {
    Json(c.agent.vms().await)
}

async fn create_vm(
    State(c): State<Ctx>,
    body: Result<Json<GuestSpec>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, AgentError> {
    let Json(spec) = body.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok((StatusCode::CREATED, Json(c.agent.create_vm(spec).await?)))
}

/// A VM the control plane names: its id is the path, its epoch the owner
/// epoch the control plane recorded.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PutVm {
    spec: GuestSpec,
    epoch: u64,
}

async fn put_vm(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    body: Result<Json<PutVm>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, AgentError> {
    let Json(req) = body.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    Ok((
        StatusCode::CREATED,
        Json(c.agent.create_vm_as(&id, req.epoch, req.spec).await?),
    ))
}

async fn put_config(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, AgentError> {
    let Json(config) = body.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    c.agent.set_config(&id, &config).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_vm(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(c.agent.vm(&id).await?))
}

async fn stop_vm(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    c.agent.stop_vm(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn migrate(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    body: Result<Json<MigrateRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, AgentError> {
    let Json(req) = body.map_err(|e| AgentError::BadRequest(e.body_text()))?;
    let mid = c.agent.migrate(&id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(c.agent.migration(&mid)?)))
}

async fn list_migrations(State(c): State<Ctx>) -> impl IntoResponse {
    Json(c.agent.migrations())
}

async fn cancel_migration(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    c.agent.cancel_migration(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(c.agent.migration(&id)?)))
}

/// Body of `POST /api/v1/migrations/{id}/redirect`.
#[derive(serde::Deserialize, serde::Serialize)]
pub struct RedirectRequest {
    /// The destination agent's migration address (`ip:port`).
    pub addr: std::net::SocketAddr,
}

async fn redirect_migration(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Json(r): Json<RedirectRequest>,
) -> Result<impl IntoResponse, AgentError> {
    c.agent.redirect_migration(&id, r.addr).await?;
    Ok((StatusCode::ACCEPTED, Json(c.agent.migration(&id)?)))
}

async fn get_migration(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, AgentError> {
    Ok(Json(c.agent.migration(&id)?))
}

/// Progress as server-sent events: one `progress` event per change, then a
/// final `end` event carrying the whole migration view.
async fn events(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AgentError> {
    let rx = c.agent.progress(&id)?;
    let agent = c.agent.clone();
    let stream = futures::stream::unfold(
        (rx, agent, id, false),
        |(mut rx, agent, id, done)| async move {
            if done {
                return None;
            }
            let view = agent.migration(&id).ok()?;
            if view.state.is_final() {
                let ev = Event::default().event("end").json_data(&view).ok()?;
                return Some((Ok(ev), (rx, agent, id, true)));
            }
            // Wake on a change, or every 500 ms to notice the end.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), rx.changed()).await;
            let p = rx.borrow_and_update().clone();
            let ev = Event::default().event("progress").json_data(&p).ok()?;
            Some((Ok(ev), (rx, agent, id, false)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
