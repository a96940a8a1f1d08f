//! Manager behaviour with the mock driver: claim order, cold-start fallback,
//! pool fill and recycling, three strikes and replacement, restart
//! reconciliation, and concurrent claims on both store back ends.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tern_drivers::mock::{MockDriver, MockFaults};
use tern_drivers::VmDriver;
use tern_orchestrator::{Manager, ManagerConfig, ManagerError, ProvisionSource};
use tern_proto::{TenantId, VmConfig, VmSpec, VmStatus};
use tern_store::testing::{self, TestStore};
use tern_store::VmFilter;

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

fn cfg(pool: usize) -> ManagerConfig {
    ManagerConfig {
        warm_pool_size: pool,
        ..ManagerConfig::default()
    }
}

fn manager(t: &TestStore, driver: Arc<MockDriver>, cfg: ManagerConfig) -> Manager {
    Manager::new(t.store.clone(), driver, cfg)
}

fn tools(list: &[&str]) -> VmConfig {
    VmConfig {
        allowed_tools: list.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn claims_oldest_warm_vm_first() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(
        &t,
        d.clone(),
        ManagerConfig {
            start_concurrency: 1,
            ..cfg(3)
        },
    );
    let report = m.reconcile_pool().await.unwrap();
    assert_eq!(report.started, 3);
    let pool: Vec<_> = t
        .store
        .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut got = vec![];
    for i in 0..3 {
        let (rec, src) = m
            .provision(&tenant(&format!("t{i}")), None, tools(&["git"]))
            .await
            .unwrap();
        assert_eq!(src, ProvisionSource::Warm);
        assert_eq!(rec.status, VmStatus::Running);
        assert_eq!(
            d.config_of(rec.id).unwrap(),
            tools(&["git"]),
            "config injected"
        );
        got.push(rec.id);
    }
    assert_eq!(got, pool, "claimed in order of age");
}

#[tokio::test]
async fn cold_starts_when_pool_is_empty_or_spec_differs() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(&t, d.clone(), cfg(1));
    let (rec, src) = m
        .provision(&tenant("t1"), None, VmConfig::default())
        .await
        .unwrap();
    assert_eq!(src, ProvisionSource::Cold);
    assert_eq!(rec.status, VmStatus::Running);
    assert!(d.is_running(rec.id));

    m.reconcile_pool().await.unwrap();
    let big = VmSpec {
        memory_mib: 1024,
        ..VmSpec::default()
    };
    let (rec, src) = m
        .provision(&tenant("t1"), Some(big.clone()), VmConfig::default())
        .await
        .unwrap();
    assert_eq!(
        src,
        ProvisionSource::Cold,
        "a warm VM of another spec is not handed out"
    );
    assert_eq!(rec.spec, big);
    assert_eq!(
        t.store
            .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn failed_cold_start_is_cleaned_up_and_reported() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults {
        fail_start_after: Some(0),
        ..Default::default()
    }));
    let m = manager(&t, d.clone(), cfg(0));
    let e = m
        .provision(&tenant("t1"), None, VmConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::Driver(_)), "{e}");
    assert!(
        m.list(None).await.unwrap().is_empty(),
        "nothing half-made left behind"
    );
    assert_eq!(d.vm_count(), 0);
}

#[tokio::test]
async fn reconcile_fills_and_recycles_the_pool() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(
        &t,
        d.clone(),
        ManagerConfig {
            warm_idle_ttl: Duration::from_millis(300),
            ..cfg(3)
        },
    );
    let r = m.reconcile_pool().await.unwrap();
    assert_eq!((r.started, r.recycled, r.warm), (3, 0, 3));
    let first: HashSet<_> = m
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    // Within the TTL nothing changes.
    let r = m.reconcile_pool().await.unwrap();
    assert_eq!((r.started, r.recycled, r.warm), (0, 0, 3));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = m.reconcile_pool().await.unwrap();
    assert_eq!((r.started, r.recycled, r.warm), (3, 3, 3));
    let second: HashSet<_> = m
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(
        first.is_disjoint(&second),
        "idle VMs replaced by fresh ones"
    );
    assert_eq!(d.vm_count(), 3, "recycled VMs are gone from the driver");
    // A claimed VM leaves the pool and the next pass tops it up.
    m.provision(&tenant("t1"), None, VmConfig::default())
        .await
        .unwrap();
    let r = m.reconcile_pool().await.unwrap();
    assert_eq!((r.started, r.warm), (1, 3));
}

#[tokio::test]
async fn pool_start_failures_leave_no_records() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults {
        fail_start_after: Some(1),
        ..Default::default()
    }));
    let m = manager(
        &t,
        d.clone(),
        ManagerConfig {
            start_concurrency: 1,
            ..cfg(3)
        },
    );
    let r = m.reconcile_pool().await.unwrap();
    assert_eq!((r.started, r.start_failures, r.warm), (1, 2, 1));
    assert_eq!(m.list(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn three_strikes_replace_then_destroy() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(&t, d.clone(), cfg(0));
    let config = tools(&["python", "curl"]);
    let (sick, _) = m
        .provision(&tenant("acme"), None, config.clone())
        .await
        .unwrap();
    let (fine, _) = m
        .provision(&tenant("other"), None, VmConfig::default())
        .await
        .unwrap();
    d.make_unhealthy(sick.id).unwrap();

    for strike in 1..=2 {
        let r = m.health_pass().await.unwrap();
        assert_eq!((r.checked, r.failures, r.replaced), (2, 1, 0));
        let rec = t.store.get_vm(sick.id).await.unwrap().unwrap();
        assert_eq!(rec.status, VmStatus::Running);
        assert_eq!(rec.consecutive_failures, strike);
    }
    let r = m.health_pass().await.unwrap();
    assert_eq!((r.failures, r.replaced), (1, 1));

    let old = t.store.get_vm(sick.id).await.unwrap().unwrap();
    assert_eq!(old.status, VmStatus::Destroyed);
    assert!(!d.is_running(sick.id));
    let acme: Vec<_> = m.list(Some(&tenant("acme"))).await.unwrap();
    assert_eq!(acme.len(), 1);
    let new = &acme[0];
    assert_ne!(new.id, sick.id);
    assert_eq!(new.status, VmStatus::Running);
    assert_eq!(new.config, config);
    assert_eq!(
        d.config_of(new.id).unwrap(),
        config,
        "replacement got the same config"
    );
    let other = t.store.get_vm(fine.id).await.unwrap().unwrap();
    assert_eq!(
        (other.status, other.consecutive_failures),
        (VmStatus::Running, 0)
    );
}

#[tokio::test]
async fn a_healthy_probe_resets_the_count() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(&t, d.clone(), cfg(0));
    let (vm, _) = m
        .provision(&tenant("t"), None, VmConfig::default())
        .await
        .unwrap();
    t.store.record_health(vm.id, false).await.unwrap();
    t.store.record_health(vm.id, false).await.unwrap();
    m.health_pass().await.unwrap();
    assert_eq!(
        t.store
            .get_vm(vm.id)
            .await
            .unwrap()
            .unwrap()
            .consecutive_failures,
        0
    );
}

#[tokio::test]
async fn restart_reconciles_store_with_driver() {
    let t = testing::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("mock.json");
    let (kept, lost, warm_lost) = {
        let d = Arc::new(MockDriver::with_state_file(MockFaults::default(), &state).unwrap());
        let m = manager(&t, d.clone(), cfg(2));
        m.reconcile_pool().await.unwrap();
        let (kept, _) = m
            .provision(&tenant("t1"), None, tools(&["a"]))
            .await
            .unwrap();
        let (lost, _) = m
            .provision(&tenant("t2"), None, tools(&["b"]))
            .await
            .unwrap();
        m.reconcile_pool().await.unwrap();
        let warm_lost = t
            .store
            .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
            .await
            .unwrap()[0]
            .id;
        (kept.id, lost.id, warm_lost)
        // the manager "exits" here; VMs keep running in the driver's state file
    };
    let d = Arc::new(MockDriver::with_state_file(MockFaults::default(), &state).unwrap());
    d.vanish(lost).unwrap();
    d.vanish(warm_lost).unwrap();
    let orphan = tern_proto::VmId::new();
    d.inject_orphan(orphan).unwrap();

    let m = manager(&t, d.clone(), cfg(2));
    let r = m.reconcile_startup().await.unwrap();
    assert_eq!(r.missing_replaced, 1);
    assert_eq!(r.stale_destroyed, 1);
    assert_eq!(r.orphans_cleaned, 1);
    assert!(!d.is_running(orphan));
    assert_eq!(
        t.store.get_vm(kept).await.unwrap().unwrap().status,
        VmStatus::Running
    );
    assert!(d.is_running(kept), "VMs that survived are left alone");
    assert_eq!(
        t.store.get_vm(lost).await.unwrap().unwrap().status,
        VmStatus::Destroyed
    );
    let t2 = m.list(Some(&tenant("t2"))).await.unwrap();
    assert_eq!(t2.len(), 1);
    assert_eq!(t2[0].config, tools(&["b"]));
    assert!(d.is_running(t2[0].id));
    // Every live record is backed by a driver VM and vice versa.
    let live: HashSet<_> = m
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let running: HashSet<_> = d.list().await.unwrap().into_iter().collect();
    assert_eq!(live, running);
}

#[tokio::test]
async fn graceful_shutdown_leaves_vms_running() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = Arc::new(manager(
        &t,
        d.clone(),
        ManagerConfig {
            reconcile_interval: Duration::from_millis(20),
            health_interval: Duration::from_millis(20),
            ..cfg(2)
        },
    ));
    let (vm, _) = m
        .provision(&tenant("t"), None, VmConfig::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let loops = m.spawn_loops(rx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(true).unwrap();
    for l in loops {
        tokio::time::timeout(Duration::from_secs(5), l)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(d.is_running(vm.id));
    assert_eq!(
        d.vm_count(),
        3,
        "the tenant VM and the two warm VMs still run"
    );
    let rec = t.store.get_vm(vm.id).await.unwrap().unwrap();
    assert!(rec.last_health_check.is_some(), "the health loop ran");
}

#[tokio::test]
async fn illegal_operations_are_refused() {
    let t = testing::sqlite().await;
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = manager(&t, d.clone(), cfg(1));
    m.reconcile_pool().await.unwrap();
    let warm = m.list(None).await.unwrap()[0].clone();
    let e = m.configure(warm.id, VmConfig::default()).await.unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::WrongStatus {
                status: VmStatus::Warm,
                ..
            }
        ),
        "{e}"
    );
    m.destroy(warm.id).await.unwrap();
    assert!(matches!(
        m.destroy(warm.id).await,
        Err(ManagerError::NotFound(_))
    ));
    let e = m
        .provision(
            &tenant("t"),
            Some(VmSpec {
                vcpus: 0,
                ..VmSpec::default()
            }),
            VmConfig::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::Invalid(_)));
}

async fn fifty_concurrent_claims(t: TestStore) {
    let d = Arc::new(MockDriver::new(MockFaults::default()));
    let m = Arc::new(manager(&t, d.clone(), cfg(20)));
    m.reconcile_pool().await.unwrap();
    let warm: HashSet<_> = m
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(warm.len(), 20);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let m = m.clone();
            tokio::spawn(async move {
                let t = tenant(&format!("tenant-{i}"));
                let (rec, src) = m.provision(&t, None, VmConfig::default()).await.unwrap();
                (rec, src, t)
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let mut from_pool = 0;
    for task in tasks {
        let (rec, src, t) = task.await.unwrap();
        assert!(seen.insert(rec.id), "VM {} given to two tenants", rec.id);
        assert_eq!(rec.tenant.as_ref(), Some(&t));
        if src == ProvisionSource::Warm {
            assert!(warm.contains(&rec.id));
            from_pool += 1;
        }
    }
    assert_eq!(
        from_pool, 20,
        "every warm VM claimed once, the rest cold-started"
    );
    assert_eq!(seen.len(), 50);
    for id in seen {
        let stored = t.store.get_vm(id).await.unwrap().unwrap();
        assert_eq!(stored.status, VmStatus::Running);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_fifty_concurrent_claims() {
    fifty_concurrent_claims(testing::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fifty_concurrent_claims() {
    if let Some(t) = testing::postgres("fifty_concurrent_claims").await {
        fifty_concurrent_claims(t).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_three_strikes_and_restart() {
    let Some(t) = testing::postgres("three_strikes_and_restart").await else {
        return;
    };
    let d = Arc::new(MockDriver::new(MockFaults {
        fail_health_after: Some(0),
        ..Default::default()
    }));
    let m = manager(&t, d.clone(), cfg(0));
    let (vm, _) = m
        .provision(&tenant("t"), None, VmConfig::default())
        .await
        .unwrap();
    for _ in 0..3 {
        m.health_pass().await.unwrap();
    }
    assert_eq!(
        t.store.get_vm(vm.id).await.unwrap().unwrap().status,
        VmStatus::Destroyed
    );
    assert_eq!(m.list(Some(&tenant("t"))).await.unwrap().len(), 1);
}

/// Two replicas (two managers, one store) create VMs for one tenant at
/// once: the quota holds across them, because the admission window is a
/// store lease, not only a lock in each process.
async fn replicas_share_the_quota(t: TestStore) {
    use tern_orchestrator::{Quota, Quotas};
    let quotas = Quotas {
        default: Quota {
            max_vms: 3,
            ..Quota::default()
        },
        tenants: Default::default(),
    };
    let replica = || {
        Arc::new(manager(
            &t,
            Arc::new(MockDriver::new(MockFaults::default())),
            ManagerConfig {
                quotas: quotas.clone(),
                ..cfg(0)
            },
        ))
    };
    let (r1, r2) = (replica(), replica());
    let alice = tenant("alice");
    let creates = (0..10).map(|i| {
        let m = if i % 2 == 0 { r1.clone() } else { r2.clone() };
        let alice = alice.clone();
        tokio::spawn(async move { m.provision(&alice, None, VmConfig::default()).await })
    });
    let results = futures::future::join_all(creates).await;
    let made = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    let refused = results
        .iter()
        .filter(|r| matches!(r.as_ref().unwrap(), Err(ManagerError::Quota(_))))
        .count();
    assert_eq!((made, refused), (3, 7), "{results:?}");
    let live = r1.list(Some(&alice)).await.unwrap();
    assert_eq!(live.len(), 3);
}

#[tokio::test]
async fn replicas_share_the_quota_on_sqlite() {
    replicas_share_the_quota(testing::sqlite().await).await;
}

#[tokio::test]
async fn replicas_share_the_quota_on_postgres() {
    if let Some(t) = testing::postgres("replicas_share_the_quota").await {
        replicas_share_the_quota(t).await;
    }
}
