//! Serving an axum router as an exposed daemon must.
//!
//! `axum::serve` has no header timeout, no connection cap and retries a
//! failing `accept` at once: 300 half-sent requests held every descriptor of
//! a 256-descriptor API, and an agent out of descriptors spun at 92 % CPU.
//! [`serve`] bounds all three:
//! - each connection must finish its request headers within
//!   [`Limits::header_timeout`], and each request must be read and answered
//!   (up to the first byte of its response; streamed bodies such as
//!   server-sent events run on) within [`Limits::request_timeout`];
//! - at most [`Limits::max_connections`] connections are open at once, and
//!   never more than half the descriptors the process may hold; at the cap,
//!   new connections wait in the kernel's backlog instead of being accepted;
//! - an `accept` that fails for want of descriptors or memory is retried
//!   after a pause that doubles up to a second.

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How much one client may hold. In configuration files, the `[http]` table:
/// `max_connections`, `header_timeout_ms`, `request_timeout_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections open at once (further capped by the descriptor limit).
    pub max_connections: usize,
    /// From connection (or the previous response) to a request's last header.
    #[serde(rename = "header_timeout_ms", with = "millis")]
    pub header_timeout: Duration,
    /// From a request's headers to its response's headers.
    #[serde(rename = "request_timeout_ms", with = "millis")]
    pub request_timeout: Duration,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
        }
    }
}

impl Limits {
    /// Refuses limits that would lock everyone out or hold slots forever.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err("http.max_connections must be between 1 and 1000000".into());
        }
        let ok = |d: Duration| (Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&d);
        if !ok(self.header_timeout) || !ok(self.request_timeout) {
            return Err(
                "http.header_timeout_ms and http.request_timeout_ms must be 10 to 3600000".into(),
            );
        }
        Ok(())
    }

    /// The cap in force: `max_connections`, but no more than half of the
    /// process's descriptor limit (the rest is for VMs, stores, sockets).
    pub fn effective_connections(&self) -> usize {
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let half = usize::try_from(nofile / 2).unwrap_or(usize::MAX);
        self.max_connections.min(half).max(1)
    }
}

/// Serves `app` on `listener` until `shutdown` completes; connections still
/// open then are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.effective_connections()));
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(c) => {
                backoff = Duration::ZERO;
                c
            }
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                if backoff == Duration::from_millis(10) {
                    tracing::warn!(error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let app = app.clone();
        conns.spawn(async move {
            connection(stream, remote, app, limits).await;
            drop(permit);
        });
    }
    conns.shutdown().await;
}

/// Errors that end one connection, not the listener's ability to accept.
fn per_connection(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

/// Serves one connection; each request carries the client's address as
/// axum's `ConnectInfo` (for logs of refused requests).
async fn connection(
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    app: Router,
    limits: Limits,
) {
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let app = app.clone();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(remote));
        async move {
            let answer =
                tokio::time::timeout(limits.request_timeout, app.oneshot(req.map(Body::new)));
            Ok::<_, std::convert::Infallible>(match answer.await {
                Ok(Ok(resp)) => resp,
                Ok(Err(never)) => match never {},
                Err(_) => timed_out(limits.request_timeout),
            })
        }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let _ = b.serve_connection(TokioIo::new(stream), svc).await;
}

fn timed_out(after: Duration) -> Response<Body> {
    let body = format!(
        "{{\"error\":\"request not completed within {} s\"}}",
        after.as_secs()
    );
    Response::builder()
        .status(StatusCode::REQUEST_TIMEOUT)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: Limits) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hi" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
        tokio::spawn(serve(l, app, limits, std::future::pending()));
        addr
    }

    async fn get_ok(addr: std::net::SocketAddr) -> bool {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.starts_with("HTTP/1.1 200")
    }

    /// Half-sent requests are cut at the header timeout, so a full cap of
    /// them locks nobody out for longer than that.
    #[tokio::test]
    async fn half_sent_requests_are_cut_and_free_their_slot() {
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
        };
        let addr = server(limits).await;
        let mut held = vec![];
        for _ in 0..8 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
            held.push(s);
        }
        let t = Instant::now();
        assert!(get_ok(addr).await, "served once the slow clients were cut");
        // The first four were cut; the next four got slots and were cut too.
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        let mut buf = [0u8; 64];
        let n = held[0].read(&mut buf).await.unwrap_or(0);
        assert!(
            n == 0 || buf.starts_with(b"HTTP/1.1 408"),
            "the server closed it"
        );
    }

    #[tokio::test]
    async fn slow_answers_are_a_408() {
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let addr = server(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    }

    #[test]
    fn the_cap_respects_the_descriptor_limit() {
        let l = Limits {
            max_connections: usize::MAX,
            ..Limits::default()
        };
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        assert!(l.effective_connections() as u64 <= nofile / 2 + 1);
    }
}
