//! tern's HTTP API.
//!
//! Every request but `/healthz` and `/metrics` carries `Authorization: Bearer <JWT>`
//! (HS256) naming a tenant and permissions. A tenant sees only its own VMs:
//! another tenant's VM answers 404, exactly like a VM that does not exist, so
//! ids leak nothing. Every error is a JSON body `{"error": "..."}` with the
//! status the failure deserves (see [`error::ApiError`]).

pub mod auth;
pub mod body;
pub mod error;
pub mod hosts;
mod metrics_layer;
pub mod migrations;
mod routes;

pub use auth::{AuthKeys, Claims, Permission};
pub use error::ApiError;
pub use hosts::{hosts_router, FleetApi};
pub use migrations::{migrations_router, MigrationsApi};
pub use routes::{metrics_router, router, ApiState, MetricsAccess, VmView};
pub use tern_proto::CreateVmRequest;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// The process-wide Prometheus recorder (the `metrics` facade has one global
/// recorder, so every router in a process shares it).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("tern_http_request_duration_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .expect("static bucket list is non-empty")
                .set_buckets_for_metric(
                    Matcher::Full("migration_duration_seconds".into()),
                    &[
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    ],
                )
                .expect("static bucket list is non-empty")
                .set_buckets_for_metric(
                    Matcher::Full("migration_checkpoint_size_bytes".into()),
                    &[1e6, 1e7, 1e8, 1e9, 1e10, 1e11],
                )
                .expect("static bucket list is non-empty")
                .install_recorder()
                .unwrap_or_else(|_| {
                    // Another recorder is installed (a host program chose its own);
                    // render ours anyway so /metrics still answers.
                    PrometheusBuilder::new().build_recorder().handle()
                })
        })
        .clone()
}
