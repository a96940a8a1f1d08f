//! p50/p99 latency of `POST /api/v1/vms` served from a warm pool, mock driver,
//! over real HTTP on loopback, on SQLite and on PostgreSQL.
//!
//! Run: `cargo bench -p tern-api --bench provision` (PostgreSQL rows need
//! TERN_TEST_POSTGRES_URL; `scripts/bench.sh` starts the server and sets it).
//! Each request is checked to have been served from the pool (`provisioned_from: warm`).

use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_api::{router, ApiState, AuthKeys, Permission};
use tern_drivers::mock::{MockDriver, MockFaults};
use tern_orchestrator::{Manager, ManagerConfig};
use tern_proto::TenantId;
use tern_store::testing::{self, TestStore};

const REQUESTS: usize = 400;
const WARMUP: usize = 20;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(name: &str, t: TestStore, clients: usize) {
    let driver = Arc::new(MockDriver::new(MockFaults::default()));
    let manager = Arc::new(Manager::new(
        t.store.clone(),
        driver,
        ManagerConfig {
            warm_pool_size: REQUESTS + WARMUP,
            start_concurrency: 16,
            ..ManagerConfig::default()
        },
    ));
    manager.reconcile_pool().await.unwrap();
    let keys = Arc::new(AuthKeys::from_secret(b"bench-secret-0123456789"));
    let token = keys
        .issue(
            &TenantId::new("bench").unwrap(),
            &[Permission::VmsRead, Permission::VmsWrite],
            Duration::from_secs(3600),
        )
        .unwrap();
    let app = router(ApiState {
        metrics: tern_api::MetricsAccess::Off,
        manager,
        auth: keys,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}/api/v1/vms");
    let http = reqwest::Client::new();

    let one = |http: reqwest::Client, url: String, token: String| async move {
        let t0 = Instant::now();
        let r = http.post(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: serde_json::Value = r.json().await.unwrap();
        let took = t0.elapsed();
        assert_eq!(v["provisioned_from"], "warm", "served from the pool");
        took
    };
    for _ in 0..WARMUP {
        one(http.clone(), url.clone(), token.clone()).await;
    }
    let wall = Instant::now();
    let per_client = REQUESTS / clients;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    lat.push(one(http.clone(), url.clone(), token.clone()).await);
                }
                lat
            })
        })
        .collect();
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = wall.elapsed();
    all.sort();
    println!(
        "{name:<10} {clients:>7} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.0}",
        all.len(),
        pct(&all, 0.50).as_secs_f64() * 1e3,
        pct(&all, 0.99).as_secs_f64() * 1e3,
        all.last().unwrap().as_secs_f64() * 1e3,
        all.len() as f64 / wall.as_secs_f64(),
    );
}

fn main() {
    // `cargo test --benches` passes --bench-less args; only run on `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("POST /api/v1/vms from a warm pool (mock driver, HTTP on loopback, {REQUESTS} requests after {WARMUP} warm-up)");
        println!("{:<10} {:>7} {:>6} {:>9} {:>9} {:>9} {:>9}", "store", "clients", "reqs", "p50 ms", "p99 ms", "max ms", "req/s");
        for clients in [1, 8] {
            run("sqlite", testing::sqlite().await, clients).await;
            match testing::postgres("provision bench").await {
                Some(t) => run("postgres", t, clients).await,
                None => println!("postgres   (skipped: TERN_TEST_POSTGRES_URL not set)"),
            }
        }
    });
}
