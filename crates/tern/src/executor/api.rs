//! The actor REST API of an executor, with tenant auth (the same bearer
//! tokens as the control plane; `vms:read` and `vms:write` cover actors).
//!
//! - `POST /api/v1/actors`: deploy a module (`wat` text or `module_hex`).
//! - `GET /api/v1/actors`: the caller's actors on this executor.
//! - `GET /api/v1/actors/{id}`: one actor, or where gossip says it runs.
//! - `DELETE /api/v1/actors/{id}`: stop it (its checkpoints stay).
//! - `POST /api/v1/actors/{id}/messages`: send; waits for the reply unless
//!   `wait` is false. An actor that runs elsewhere answers 409 naming the
//!   executor and its API, so the client can go there.
//! - `POST /api/v1/actors/{id}/migrate`: move it to another executor.
//! - `GET /api/v1/actor-migrations/{id}`: a migration's progress, and
//!   `.../{id}/events` the same as server-sent events until it ends.
//! - `GET /metrics`: Prometheus (`migrations_*_total{workload="actor"}`...).

use axum::extract::{FromRef, Path};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_actors::manager::{Handled, ManagerError, SendOutcome};
use tern_actors::net::ExecutorNode;
use tern_actors::policy::MigrationReason;
use tern_actors::runtime::{ActorConfig, ActorMode};
use tern_actors::{Delivery, Envelope};
use tern_api::auth::Caller;
use tern_api::{ApiError, AuthKeys, Permission};
use tern_proto::{ActorId, ExecutorId, MigrationId, SenderId};
use tokio::sync::{mpsc, oneshot};

/// How long a send waits for the actor's reply.
const REPLY_WAIT: Duration = Duration::from_secs(10);
/// The largest module a deploy takes.
const MAX_MODULE: usize = 16 << 20;

type Waiters = Mutex<HashMap<(ActorId, SenderId, u64), oneshot::Sender<Result<Vec<u8>, String>>>>;

/// What the handlers share.
#[derive(Clone)]
pub struct State {
    pub node: Arc<ExecutorNode>,
    keys: Arc<AuthKeys>,
    waiters: Arc<Waiters>,
}

impl FromRef<State> for Arc<AuthKeys> {
    fn from_ref(s: &State) -> Self {
        s.keys.clone()
    }
}

impl State {
    /// Serves `node`; replies its actors give go to the requests waiting.
    pub fn new(
        node: ExecutorNode,
        keys: AuthKeys,
        mut handled: mpsc::UnboundedReceiver<Handled>,
    ) -> Self {
        let waiters: Arc<Waiters> = Arc::default();
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Some(h) = handled.recv().await {
                let key = (h.actor, h.envelope.sender.clone(), h.envelope.seq);
                if let Some(tx) = w.lock().expect("waiters lock").remove(&key) {
                    let _ = tx.send(h.reply.map_err(|e| e.to_string()));
                }
            }
        });
        Self {
            node: Arc::new(node),
            keys: Arc::new(keys),
            waiters,
        }
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/api/v1/actors", post(deploy).get(list))
        .route("/api/v1/actors/{id}", get(show).delete(remove))
        .route("/api/v1/actors/{id}/messages", post(send))
        .route("/api/v1/actors/{id}/migrate", post(migrate))
        .route("/api/v1/actor-migrations/{id}", get(migration))
        .route(
            "/api/v1/actor-migrations/{id}/events",
            get(migration_events),
        )
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(2 * MAX_MODULE + 4096))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    wat: Option<String>,
    module_hex: Option<String>,
    #[serde(default = "yes")]
    stateful: bool,
    checkpoint_interval_ms: Option<u64>,
    max_state_size_bytes: Option<u64>,
    fuel_per_message: Option<u64>,
    mailbox_capacity: Option<usize>,
}

fn yes() -> bool {
    true
}

impl DeployRequest {
    fn module(&self) -> Result<Vec<u8>, ApiError> {
        let m = match (&self.wat, &self.module_hex) {
            (Some(w), None) => w.as_bytes().to_vec(),
            (None, Some(h)) => hex::decode(h.trim())
                .map_err(|e| ApiError::BadRequest(format!("module_hex: {e}")))?,
            _ => {
                return Err(ApiError::BadRequest(
                    "give the module as `wat` or as `module_hex`, one of them".into(),
                ))
            }
        };
        if m.len() > MAX_MODULE {
            return Err(ApiError::TooLarge(format!(
                "a module of {} bytes (at most {MAX_MODULE})",
                m.len()
            )));
        }
        Ok(m)
    }

    fn config(&self, caller: &Caller) -> Result<ActorConfig, ApiError> {
        let d = ActorConfig::default();
        let interval = self.checkpoint_interval_ms.unwrap_or(1000);
        if !(10..=3_600_000).contains(&interval) {
            return Err(ApiError::BadRequest(
                "checkpoint_interval_ms must be 10 to 3600000".into(),
            ));
        }
        let mode = if self.stateful {
            ActorMode::Stateful {
                checkpoint_interval: Duration::from_millis(interval),
                max_state_size_bytes: self.max_state_size_bytes.unwrap_or(64 << 20).min(256 << 20),
            }
        } else {
            ActorMode::Ephemeral
        };
        Ok(ActorConfig {
            mode,
            fuel_per_message: self.fuel_per_message.unwrap_or(d.fuel_per_message),
            mailbox_capacity: self
                .mailbox_capacity
                .unwrap_or(d.mailbox_capacity)
                .clamp(1, 1 << 16),
            tenant: Some(caller.tenant.clone()),
        })
    }
}

fn bad_id(s: &str) -> ApiError {
    ApiError::BadRequest(format!("`{s}` is not an actor id"))
}

fn manager_error(e: ManagerError) -> ApiError {
    match e {
        ManagerError::NotHere(a) => ApiError::NotFound(format!("actor {a} does not run here")),
        ManagerError::Migrating(_) | ManagerError::RateLimited(_) | ManagerError::Ephemeral(_) => {
            ApiError::Conflict(e.to_string())
        }
        ManagerError::Actor(_) => ApiError::BadRequest(e.to_string()),
        _ => ApiError::Internal(e.to_string()),
    }
}

async fn deploy(
    s: axum::extract::State<State>,
    caller: Caller,
    Json(r): Json<DeployRequest>,
) -> Result<Response, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let module = r.module()?;
    let config = r.config(&caller)?;
    let id = s
        .node
        .with(|m| m.deploy(&module, config))
        .map_err(manager_error)?;
    let executor = s.node.with(|m| m.id().clone());
    tracing::info!(actor = %id, tenant = %caller.tenant, "actor deployed");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id.to_string(), "executor": executor.as_str()})),
    )
        .into_response())
}

/// An actor here the caller may see, as JSON.
fn view(s: &State, caller: &Caller, id: ActorId) -> Option<Value> {
    let (me, info) = s.node.with(|m| (m.id().clone(), m.info(id)));
    let info = info.filter(|i| caller.can_see(i.tenant.as_ref()))?;
    Some(json!({
        "id": id.to_string(),
        "executor": me.as_str(),
        "here": true,
        "epoch": info.epoch.0,
        "checkpoint_sequence": info.sequence,
        "queued": info.queued,
        "paused": info.paused,
        "migrating": info.migrating,
        "stateful": info.stateful,
        "memory_bytes": info.memory_bytes,
        "tenant": info.tenant.map(|t| t.to_string()),
    }))
}

/// Where gossip says an actor runs, when not here.
fn elsewhere(s: &State, id: ActorId) -> Option<(ExecutorId, Option<String>)> {
    let e = s
        .node
        .locate(id)
        .filter(|e| *e != s.node.with(|m| m.id().clone()))?;
    let api = s.node.api_of(&e).map(|a| format!("http://{a}"));
    Some((e, api))
}

async fn list(s: axum::extract::State<State>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let mut ids = s.node.with(|m| m.actors());
    ids.sort();
    let actors: Vec<Value> = ids
        .into_iter()
        .filter_map(|id| view(&s, &caller, id))
        .collect();
    let mut out = json!({ "actors": actors });
    if caller.is_admin() {
        // Other executors' actors this one could restore.
        let mut replicas = s.node.with(|m| m.replicas());
        replicas.sort();
        out["replicas"] = json!(replicas.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    Ok(Json(out))
}

async fn show(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let actor: ActorId = id.parse().map_err(|_| bad_id(&id))?;
    if s.node.with(|m| m.info(actor)).is_some() {
        // Here: shown to its tenant, to others as if it did not exist.
        return view(&s, &caller, actor)
            .map(Json)
            .ok_or_else(|| ApiError::NotFound(format!("no actor {id} is known here")));
    }
    match elsewhere(&s, actor) {
        Some((e, api)) => Ok(Json(
            json!({"id": id, "executor": e.as_str(), "here": false, "api": api}),
        )),
        None => Err(ApiError::NotFound(format!("no actor {id} is known here"))),
    }
}

async fn remove(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let actor = match here_for(&s, &caller, &id) {
        Ok(a) => a,
        Err(answer) => return Ok(*answer),
    };
    s.node.with(|m| m.remove(actor)).map_err(manager_error)?;
    tracing::info!(actor = %actor, tenant = %caller.tenant, "actor stopped");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    sender: String,
    seq: u64,
    payload_hex: String,
    #[serde(default = "yes")]
    wait: bool,
}

/// Where a request for actor `id` goes: the actor, when it runs here and
/// the caller may see it; else the answer to give (409 naming where it
/// runs, 404, or 400 for an id that is not one).
fn here_for(s: &State, caller: &Caller, id: &str) -> Result<ActorId, Box<Response>> {
    let actor: ActorId = id
        .parse()
        .map_err(|_| Box::new(bad_id(id).into_response()))?;
    match s.node.with(|m| m.info(actor)) {
        Some(i) if caller.can_see(i.tenant.as_ref()) => Ok(actor),
        Some(_) => Err(Box::new(
            ApiError::NotFound(format!("no actor {id} is known here")).into_response(),
        )),
        None => Err(Box::new(not_here(s, actor))),
    }
}

/// 409 naming where the actor runs, or 404.
fn not_here(s: &State, actor: ActorId) -> Response {
    match elsewhere(s, actor) {
        Some((e, api)) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("actor {actor} runs on {e}"), "executor": e.as_str(), "api": api})),
        )
            .into_response(),
        None => ApiError::NotFound(format!("no actor {actor} is known here")).into_response(),
    }
}

async fn send(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
    Json(r): Json<SendRequest>,
) -> Result<Response, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let sender =
        SenderId::new(r.sender).map_err(|e| ApiError::BadRequest(format!("sender: {e}")))?;
    let payload = hex::decode(r.payload_hex.trim())
        .map_err(|e| ApiError::BadRequest(format!("payload_hex: {e}")))?;
    let actor = match here_for(&s, &caller, &id) {
        Ok(a) => a,
        Err(answer) => return Ok(*answer),
    };
    let key = (actor, sender.clone(), r.seq);
    let (tx, rx) = oneshot::channel();
    if r.wait {
        s.waiters
            .lock()
            .expect("waiters lock")
            .insert(key.clone(), tx);
    }
    let envelope = Envelope {
        sender,
        seq: r.seq,
        payload,
    };
    let outcome = s.node.with(|m| m.send(actor, envelope, None));
    let drop_waiter = || s.waiters.lock().expect("waiters lock").remove(&key);
    match outcome {
        Ok(SendOutcome::Accepted(Delivery::Queued)) if r.wait => {}
        Ok(SendOutcome::Accepted(Delivery::Queued)) => {
            return Ok((StatusCode::ACCEPTED, Json(json!({"queued": true}))).into_response())
        }
        Ok(SendOutcome::Accepted(Delivery::Duplicate)) => {
            drop_waiter();
            return Ok(Json(json!({"duplicate": true})).into_response());
        }
        Ok(_) => {
            drop_waiter();
            return Ok(not_here(&s, actor));
        }
        Err(e) => {
            drop_waiter();
            return Err(ApiError::Conflict(e.to_string()));
        }
    }
    match tokio::time::timeout(REPLY_WAIT, rx).await {
        Ok(Ok(Ok(reply))) => Ok(Json(json!({"reply_hex": hex::encode(reply)})).into_response()),
        Ok(Ok(Err(e))) => {
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error": e}))).into_response())
        }
        _ => {
            drop_waiter();
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"queued": true, "note": "no reply yet; the message stays queued"})),
            )
                .into_response())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    to: String,
}

async fn migrate(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
    Json(r): Json<MigrateRequest>,
) -> Result<Response, ApiError> {
    caller.require(Permission::VmsWrite)?;
    let actor = match here_for(&s, &caller, &id) {
        Ok(a) => a,
        Err(answer) => return Ok(*answer),
    };
    let to =
        ExecutorId::new(r.to.as_str()).map_err(|e| ApiError::BadRequest(format!("to: {e}")))?;
    if !s.node.members().contains(&to) {
        return Err(ApiError::BadRequest(format!(
            "`{to}` is not a live peer of this executor"
        )));
    }
    let m = s
        .node
        .with(|m| {
            m.initiate_migration(actor, to.clone(), MigrationReason::Operator, Instant::now())
        })
        .map_err(manager_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"migration": m.as_str(), "actor": id, "to": to.as_str()})),
    )
        .into_response())
}

/// A migration as JSON, if this executor knows it.
fn migration_view(s: &State, id: &MigrationId) -> Option<Value> {
    let m = s.node.with(|m| m.get_state(id).cloned())?;
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    Some(json!({
        "migration": id.as_str(),
        "actor": m.actor.to_string(),
        "side": format!("{:?}", m.side),
        "peer": m.peer.as_str(),
        "reason": m.reason.as_str(),
        "state": format!("{:?}", m.state),
        "done": m.state.is_final(),
        "checkpoint_bytes": m.checkpoint_bytes,
        "rounds": m.rounds,
        "pause_ms": ms(m.pause()),
        "total_ms": ms(m.total()),
    }))
}

fn migration_id(id: &str) -> Result<MigrationId, ApiError> {
    MigrationId::new(id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

async fn migration(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Permission::VmsRead)?;
    migration_view(&s, &migration_id(&id)?)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no migration {id} here")))
}

/// Progress as server-sent events: a `progress` event each time the
/// migration changes (state, rounds, bytes), then `end` with the outcome.
async fn migration_events(
    s: axum::extract::State<State>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Permission::VmsRead)?;
    let mid = migration_id(&id)?;
    let first = migration_view(&s, &mid)
        .ok_or_else(|| ApiError::NotFound(format!("no migration {id} here")))?;
    let stream = futures::stream::unfold(
        (s.0, mid, Some(first), Value::Null),
        |(s, mid, next, last)| async move {
            let mut view = next?;
            while view == last && view["done"] != json!(true) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                view = migration_view(&s, &mid)?;
            }
            let done = view["done"] == json!(true);
            let ev = Event::default()
                .event(if done { "end" } else { "progress" })
                .json_data(&view)
                .ok()?;
            let next = if done { None } else { migration_view(&s, &mid) };
            Some((Ok(ev), (s, mid, next, view)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        tern_api::prometheus().render(),
    )
}
