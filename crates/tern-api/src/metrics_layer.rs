//! Request latency and count per route, for `/metrics`.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;

/// Records `tern_http_request_duration_seconds{method, route, status}`.
pub(crate) async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!(
        "tern_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => status
    )
    .record(start.elapsed().as_secs_f64());
    resp
}
