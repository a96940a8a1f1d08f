//! `tern up`: the single-node control plane.

use anyhow::Context;
use std::sync::Arc;
use tern_api::{ApiState, AuthKeys, MetricsAccess};
use tern_config::{Config, DriverKind};
use tern_drivers::mock::MockDriver;
use tern_drivers::VmDriver;
use tern_orchestrator::{Manager, ManagerConfig};

/// Runs until SIGINT or SIGTERM. VMs keep running after it exits.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    crate::logging::init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let _ = tern_api::prometheus();
    tern_agent::keys::private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let store_url = cfg.store_url();
    let store = tern_store::open(&store_url)
        .await
        .with_context(|| format!("cannot open store {store_url}"))?;
    let mut agents: Option<Arc<tern_fleet::AgentsDriver>> = None;
    let driver: Arc<dyn VmDriver> = match cfg.driver {
        DriverKind::Mock => Arc::new(MockDriver::with_state_file(
            cfg.mock.clone(),
            &cfg.data_dir.join("mock-driver.json"),
        )?),
        DriverKind::Kvm => {
            let mut k = tern_drivers::kvm::KvmDriverConfig::new(cfg.data_dir.join("vms"));
            k.images = cfg.catalogue()?;
            if let Some(m) = &cfg.kvm.monitor {
                k.monitor = m.clone();
            }
            k.jail = cfg.kvm.jail.clone();
            tern_drivers::kvm::check_monitor(&k.monitor)?;
            Arc::new(tern_drivers::kvm::KvmDriver::new(k)?)
        }
        DriverKind::Docker => {
            Arc::new(tern_drivers::docker::DockerDriver::connect(cfg.docker.clone()).await?)
        }
        DriverKind::Agents => {
            let d = Arc::new(tern_fleet::AgentsDriver::new(store.clone()));
            agents = Some(d.clone());
            d
        }
    };
    let secret = cfg
        .jwt_secret()
        .context("cannot read or create the JWT secret")?;
    let manager = Arc::new(Manager::new(
        store.clone(),
        driver.clone(),
        manager_config(&cfg),
    ));

    let report = manager
        .reconcile_startup()
        .await
        .context("start-up reconciliation failed")?;
    tracing::info!(?report, "reconciled store with driver");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = manager.spawn_loops(stop_rx.clone());
    // The fleet's migrations: one runner per replica, the lease lets one run.
    let migrations = agents.map(|d| {
        let holder = format!("{}-{}", cfg.host_id, std::process::id());
        let m = Arc::new(
            tern_fleet::Migrations::new(store.clone(), d, &holder, cfg.fleet.host_down_after.0)
                .with_drain_options(capped(cfg.fleet.drain_bandwidth_mbps))
                .with_rebalance_options(capped(cfg.fleet.rebalance_bandwidth_mbps))
                .with_limits(tern_scheduler::Limits {
                    per_host: cfg.fleet.max_migrations_per_host,
                    per_link: cfg.fleet.max_migrations_per_link,
                })
                .with_policy(
                    Box::new(tern_scheduler::LoadBalance {
                        threshold: cfg.fleet.rebalance_threshold,
                        ..Default::default()
                    }),
                    cfg.fleet.rebalance_interval.0,
                ),
        );
        loops.push(m.clone().spawn(stop_rx.clone()));
        m
    });

    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let mut state = ApiState {
        manager: manager.clone(),
        auth: Arc::new(AuthKeys::from_secret(&secret)),
        metrics: MetricsAccess::Off,
    };
    match &cfg.metrics_listen {
        Some(m) => {
            let l = tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("cannot listen on {m} (metrics_listen)"))?;
            tracing::info!(addr = %l.local_addr()?, "metrics on a listener of their own");
            let app = tern_api::metrics_router(state.clone());
            tokio::spawn(tern_httpd::serve(l, app, cfg.http, std::future::pending()));
        }
        None => {
            let token = cfg
                .metrics_token()
                .context("cannot read or create the metrics token")?;
            state.metrics = MetricsAccess::Token(token.into());
        }
    }
    let fleet = tern_api::FleetApi {
        store: store.clone(),
        auth: state.auth.clone(),
        ca_dir: cfg.host_ca().context("cannot read or create the host CA")?,
        cert_validity: std::time::Duration::from_secs(365 * 86400),
        join_token_ttl: std::time::Duration::from_secs(3600),
        // Two thirds of the silence after which a host is down.
        host_lease: cfg.fleet.host_down_after.0 * 2 / 3,
    };
    let auth = state.auth.clone();
    let mut app = tern_api::router(state).merge(tern_api::hosts_router(fleet));
    if let Some(m) = migrations {
        app = app.merge(tern_api::migrations_router(tern_api::MigrationsApi {
            store: store.clone(),
            auth,
            migrations: m,
        }));
    }
    tracing::info!(
        %addr, driver = driver.name(), store = store.backend(), data_dir = %cfg.data_dir.display(),
        "tern is up"
    );
    // One machine-readable line on stdout so scripts can find a port-0 listener.
    println!("tern: API listening on http://{addr}");
    tern_httpd::serve(listener, app, cfg.http, shutdown_signal()).await;
    tracing::info!("shutting down; VMs are left running");
    let _ = stop_tx.send(true);
    for l in loops {
        let _ = l.await;
    }
    Ok(())
}

/// Migration options with an optional bandwidth cap.
fn capped(mbps: Option<u64>) -> serde_json::Value {
    match mbps {
        Some(b) => serde_json::json!({ "bandwidth_mbps": b }),
        None => serde_json::json!({}),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The manager's settings, from the configuration.
fn manager_config(cfg: &Config) -> ManagerConfig {
    ManagerConfig {
        host: tern_proto::HostId::new(cfg.host_id.clone()).expect("validated"),
        warm_pool_size: cfg.pool.size,
        warm_idle_ttl: cfg.pool.idle_ttl.0,
        reconcile_interval: cfg.pool.reconcile_interval.0,
        health_interval: cfg.health.interval.0,
        health_concurrency: cfg.health.concurrency,
        max_consecutive_failures: cfg.health.max_consecutive_failures,
        default_spec: cfg.spec.clone(),
        quotas: cfg.quota.clone(),
        images: cfg.image_names().unwrap_or_default(),
        ..ManagerConfig::default()
    }
}
