//! One test suite, run against both back ends: every test exists as
//! `sqlite_<name>` and `postgres_<name>`.

use std::collections::HashSet;
use std::sync::Arc;
use tern_proto::{HostId, TenantId, VmConfig, VmId, VmSpec, VmStatus};
use tern_store::testing::{self, TestStore};
use tern_store::{NewVm, Store, StoreError, VmFilter};

fn host() -> HostId {
    HostId::new("host-a").unwrap()
}

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}

async fn insert(
    store: &dyn Store,
    status: VmStatus,
    tenant: Option<TenantId>,
) -> tern_proto::VmRecord {
    store
        .insert_vm(NewVm {
            id: VmId::new(),
            tenant,
            status,
            host: host(),
            spec: VmSpec::default(),
            config: VmConfig::default(),
        })
        .await
        .unwrap()
}

async fn warm(store: &dyn Store) -> tern_proto::VmRecord {
    let r = insert(store, VmStatus::Creating, None).await;
    store
        .transition(r.id, VmStatus::Creating, VmStatus::Warm)
        .await
        .unwrap()
}

async fn insert_and_get(t: TestStore) {
    let s = &*t.store;
    let r = insert(s, VmStatus::Provisioning, Some(tenant("t1"))).await;
    let got = s.get_vm(r.id).await.unwrap().unwrap();
    assert_eq!(got, r);
    assert_eq!(got.owner_epoch.0, 1);
    assert_eq!(got.host, host());
    assert!(s.get_vm(VmId::new()).await.unwrap().is_none());
    let err = s
        .insert_vm(NewVm {
            id: VmId::new(),
            tenant: None,
            status: VmStatus::Running,
            host: host(),
            spec: VmSpec::default(),
            config: VmConfig::default(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotInitial(VmStatus::Running)));
}

async fn cids_from_three_and_reused(t: TestStore) {
    let s = &*t.store;
    let a = insert(s, VmStatus::Creating, None).await;
    let b = insert(s, VmStatus::Creating, None).await;
    let c = insert(s, VmStatus::Creating, None).await;
    let cids: Vec<u32> = [&a, &b, &c]
        .iter()
        .map(|r| r.vsock_cid.unwrap().get())
        .collect();
    assert_eq!(cids, vec![3, 4, 5]);
    s.transition(b.id, VmStatus::Creating, VmStatus::Destroying)
        .await
        .unwrap();
    let gone = s
        .transition(b.id, VmStatus::Destroying, VmStatus::Destroyed)
        .await
        .unwrap();
    assert_eq!(gone.vsock_cid, None, "destroyed VMs release their CID");
    let d = insert(s, VmStatus::Creating, None).await;
    assert_eq!(d.vsock_cid.unwrap().get(), 4, "lowest free CID is reused");
}

async fn concurrent_inserts_get_unique_cids(t: TestStore) {
    let s = t.store.clone();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { insert(&*s, VmStatus::Creating, None).await })
        })
        .collect();
    let mut cids = HashSet::new();
    for task in tasks {
        let r = task.await.unwrap();
        assert!(
            cids.insert(r.vsock_cid.unwrap()),
            "duplicate CID {:?}",
            r.vsock_cid
        );
    }
    assert_eq!(cids.len(), 40);
}

async fn transitions_are_checked(t: TestStore) {
    let s = &*t.store;
    let r = warm(s).await;
    // Illegal edge.
    let e = s
        .transition(r.id, VmStatus::Warm, VmStatus::Running)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Illegal(_)), "{e}");
    // Stale expectation.
    let e = s
        .transition(r.id, VmStatus::Running, VmStatus::Unhealthy)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Conflict {
                actual: VmStatus::Warm,
                ..
            }
        ),
        "{e}"
    );
    // Unknown VM.
    let e = s
        .transition(VmId::new(), VmStatus::Warm, VmStatus::Destroying)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
    // Nothing changed.
    assert_eq!(
        s.get_vm(r.id).await.unwrap().unwrap().status,
        VmStatus::Warm
    );
}

async fn claim_takes_oldest_first(t: TestStore) {
    let s = &*t.store;
    assert!(s
        .claim_warm(&tenant("t1"), &VmConfig::default())
        .await
        .unwrap()
        .is_none());
    let a = warm(s).await;
    let b = warm(s).await;
    let c = warm(s).await;
    let cfg = VmConfig {
        allowed_tools: vec!["git".into()],
        ..Default::default()
    };
    let first = s.claim_warm(&tenant("t1"), &cfg).await.unwrap().unwrap();
    let second = s.claim_warm(&tenant("t2"), &cfg).await.unwrap().unwrap();
    let third = s.claim_warm(&tenant("t1"), &cfg).await.unwrap().unwrap();
    assert_eq!([first.id, second.id, third.id], [a.id, b.id, c.id]);
    assert_eq!(first.status, VmStatus::Provisioning);
    assert_eq!(first.tenant, Some(tenant("t1")));
    assert_eq!(first.config, cfg);
    assert!(s.claim_warm(&tenant("t1"), &cfg).await.unwrap().is_none());
}

async fn concurrent_claims_never_share(t: TestStore) {
    let s = t.store.clone();
    for _ in 0..20 {
        warm(&*s).await;
    }
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let t = tenant(&format!("tenant-{i}"));
                s.claim_warm(&t, &VmConfig::default())
                    .await
                    .unwrap()
                    .map(|r| (r.id, t))
            })
        })
        .collect();
    let mut claimed = std::collections::HashMap::new();
    for task in tasks {
        if let Some((id, t)) = task.await.unwrap() {
            assert!(
                claimed.insert(id, t.clone()).is_none(),
                "VM {id} handed out twice"
            );
        }
    }
    assert_eq!(claimed.len(), 20, "every warm VM claimed exactly once");
    for (id, t) in claimed {
        let r = s.get_vm(id).await.unwrap().unwrap();
        assert_eq!(r.tenant, Some(t), "the stored tenant is the claimer's");
    }
}

async fn list_filters_and_counts(t: TestStore) {
    let s = &*t.store;
    let a = insert(s, VmStatus::Provisioning, Some(tenant("t1"))).await;
    let _b = insert(s, VmStatus::Provisioning, Some(tenant("t2"))).await;
    let _w = warm(s).await;
    let mine = s
        .list_vms(&VmFilter {
            tenant: Some(tenant("t1")),
            statuses: vec![],
        })
        .await
        .unwrap();
    assert_eq!(mine.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a.id]);
    let warm_only = s
        .list_vms(&VmFilter::statuses(&[VmStatus::Warm]))
        .await
        .unwrap();
    assert_eq!(warm_only.len(), 1);
    assert_eq!(s.list_vms(&VmFilter::default()).await.unwrap().len(), 3);
    let counts = s.count_by_status().await.unwrap();
    let get = |st| counts.iter().find(|(s, _)| *s == st).unwrap().1;
    assert_eq!(get(VmStatus::Provisioning), 2);
    assert_eq!(get(VmStatus::Warm), 1);
    assert_eq!(get(VmStatus::Running), 0);
}

async fn health_counts(t: TestStore) {
    let s = &*t.store;
    let r = insert(s, VmStatus::Provisioning, Some(tenant("t1"))).await;
    assert_eq!(
        s.record_health(r.id, false)
            .await
            .unwrap()
            .consecutive_failures,
        1
    );
    let r2 = s.record_health(r.id, false).await.unwrap();
    assert_eq!(r2.consecutive_failures, 2);
    assert!(r2.last_health_check.is_some());
    assert_eq!(
        s.record_health(r.id, true)
            .await
            .unwrap()
            .consecutive_failures,
        0
    );
    assert!(matches!(
        s.record_health(VmId::new(), true).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn config_is_replaced(t: TestStore) {
    let s = &*t.store;
    let r = insert(s, VmStatus::Provisioning, Some(tenant("t1"))).await;
    let mut cfg = VmConfig::default();
    cfg.settings.insert("MODE".into(), "fast".into());
    assert_eq!(s.set_config(r.id, &cfg).await.unwrap().config, cfg);
    assert!(matches!(
        s.set_config(VmId::new(), &cfg).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn reopen_keeps_data_and_schema(t: TestStore) {
    let r = insert(&*t.store, VmStatus::Provisioning, Some(tenant("t1"))).await;
    let again = tern_store::open(&t.url).await.unwrap();
    assert_eq!(again.get_vm(r.id).await.unwrap().unwrap(), r);
}

async fn corrupt_rows_are_reported(t: TestStore) {
    let r = insert(&*t.store, VmStatus::Provisioning, Some(tenant("t1"))).await;
    // Damage the row behind the store's back, as a hand edit would.
    let url = t.url.clone();
    let sql = format!(
        "UPDATE vm_instances SET status = 'zombie' WHERE id = '{}'",
        r.id
    );
    if url.starts_with("sqlite") {
        let s = tern_store::SqliteStore::open(&url).await.unwrap();
        sqlx::query(&sql).execute(s.pool()).await.unwrap();
        let e = s.get_vm(r.id).await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
    } else {
        let s = tern_store::PostgresStore::open(&url).await.unwrap();
        sqlx::query(&sql).execute(s.pool()).await.unwrap();
        let e = s.get_vm(r.id).await.unwrap_err();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
    }
}

fn host_record(id: &str) -> tern_proto::HostRecord {
    tern_proto::HostRecord {
        id: HostId::new(id).unwrap(),
        migrate_addr: "10.0.0.1:7001".into(),
        api_url: "http://10.0.0.1:7000".into(),
        cert_pin: "ab".repeat(32),
        manifest_key: "cd".repeat(32),
        labels: [("region".to_string(), "eu".to_string())].into(),
        capacity: tern_proto::Capacity {
            memory_mib: 65536,
            vcpus: 32,
        },
        state: tern_proto::HostState::Active,
        load: tern_proto::HostLoad::default(),
        last_heartbeat: None,
        joined_at: chrono::Utc::now(),
    }
}

async fn hosts_join_beat_and_go_down(t: TestStore) {
    use tern_proto::HostState::*;
    let s = &*t.store;
    let h = s
        .upsert_host(&host_record("h1"), "hash-1", "api-1")
        .await
        .unwrap();
    assert_eq!(h.state, Active);
    assert_eq!(
        s.get_host(&h.id).await.unwrap().unwrap().labels["region"],
        "eu"
    );
    let load = tern_proto::HostLoad {
        cpu: 0.5,
        vms: 3,
        ..Default::default()
    };
    let beat = s.heartbeat(&h.id, &load).await.unwrap();
    assert_eq!(beat.load, load);
    assert!(beat.last_heartbeat.is_some());
    let e = s
        .heartbeat(&HostId::new("ghost").unwrap(), &load)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::HostNotFound(_)), "{e}");
    s.set_host_state(&h.id, Active, Draining).await.unwrap();
    let e = s.set_host_state(&h.id, Active, Down).await.unwrap_err();
    assert_eq!(e.to_string(), "host h1 is draining, expected active");
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let down = s
        .mark_silent_hosts_down(std::time::Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(down, std::slice::from_ref(&h.id));
    assert!(s
        .mark_silent_hosts_down(std::time::Duration::from_millis(10))
        .await
        .unwrap()
        .is_empty());
    // Re-joining makes it active again, keeping when it first joined.
    let again = s
        .upsert_host(&host_record("h1"), "hash-1", "api-1")
        .await
        .unwrap();
    assert_eq!(again.state, Active);
    assert_eq!(again.joined_at, h.joined_at);
    assert_eq!(s.list_hosts().await.unwrap().len(), 1);
    assert_eq!(
        s.host_token_hash(&h.id).await.unwrap().as_deref(),
        Some("hash-1")
    );
    assert_eq!(
        s.host_api_token(&h.id).await.unwrap().as_deref(),
        Some("api-1")
    );
    // Removed: down, and its token no longer matches anything.
    let gone = s.remove_host(&h.id).await.unwrap();
    assert_eq!(gone.state, Down);
    assert_eq!(s.host_token_hash(&h.id).await.unwrap().as_deref(), Some(""));
    let e = s
        .remove_host(&HostId::new("ghost").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::HostNotFound(_)), "{e}");
}

async fn join_tokens_are_used_once(t: TestStore) {
    let s = &*t.store;
    let h1 = HostId::new("h1").unwrap();
    s.add_join_token("t-1", std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert!(s.redeem_join_token("t-1", &h1).await.unwrap());
    assert!(!s.redeem_join_token("t-1", &h1).await.unwrap(), "used up");
    assert!(!s.redeem_join_token("nope", &h1).await.unwrap());
    s.add_join_token("t-2", std::time::Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(!s.redeem_join_token("t-2", &h1).await.unwrap(), "expired");
}

fn migration(id: &str, vm: VmId) -> tern_proto::MigrationRecord {
    tern_proto::MigrationRecord {
        id: tern_proto::MigrationId::new(id).unwrap(),
        vm,
        from: HostId::new("h1").unwrap(),
        to: HostId::new("h2").unwrap(),
        reason: tern_proto::MigrationReason::Maintenance,
        phase: tern_proto::MigrationPhase::Requesting,
        error: None,
        report: None,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
        options: serde_json::json!({"mode": "precopy"}),
    }
}

async fn one_open_migration_per_vm(t: TestStore) {
    use tern_proto::MigrationPhase::*;
    let s = &*t.store;
    let vm = VmId::new();
    let m1 = s.insert_migration(&migration("m1", vm)).await.unwrap();
    assert_eq!(m1.options["mode"], "precopy", "options kept");
    assert_eq!(m1.phase, Requesting);
    let e = s.insert_migration(&migration("m2", vm)).await.unwrap_err();
    assert!(matches!(e, StoreError::VmMigrating(v) if v == vm), "{e}");
    s.update_migration(&m1.id, Requesting, Precopy, None, None)
        .await
        .unwrap();
    let e = s
        .update_migration(&m1.id, Requesting, Precopy, None, None)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "migration m1 is precopy, expected requesting"
    );
    let report = serde_json::json!({"downtime_ms": 7.5});
    let done = s
        .update_migration(&m1.id, Precopy, Committed, None, Some(&report))
        .await
        .unwrap();
    assert_eq!(done.report, Some(report));
    // Ended: the VM may migrate again; ids stay unique.
    s.insert_migration(&migration("m2", vm)).await.unwrap();
    let e = s
        .insert_migration(&migration("m1", VmId::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::MigrationExists(_)), "{e}");
    let active = s.list_migrations(true).await.unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id.as_str(), "m2");
    assert_eq!(s.list_migrations(false).await.unwrap().len(), 2);
}

async fn ownership_moves_by_compare_and_swap(t: TestStore) {
    let s = &*t.store;
    let r = insert(s, VmStatus::Provisioning, Some(tenant("t1"))).await;
    let b = HostId::new("host-b").unwrap();
    let moved = s
        .move_owner(r.id, &host(), r.owner_epoch, &b)
        .await
        .unwrap();
    assert_eq!((moved.host.clone(), moved.owner_epoch.0), (b.clone(), 2));
    // The old owner's claim is stale: refused, saying who owns it.
    let e = s
        .move_owner(
            r.id,
            &host(),
            r.owner_epoch,
            &HostId::new("host-c").unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "VM {} is owned by host-b at epoch 2, not host-a at epoch 1",
            r.id
        )
    );
}

async fn a_lease_has_one_holder(t: TestStore) {
    let s = t.store.clone();
    let ttl = std::time::Duration::from_secs(30);
    assert!(s.try_lease("health", "r1", ttl).await.unwrap());
    assert!(!s.try_lease("health", "r2", ttl).await.unwrap());
    assert!(s.try_lease("health", "r1", ttl).await.unwrap(), "renewal");
    s.release_lease("health", "r1").await.unwrap();
    assert!(s
        .try_lease("health", "r2", std::time::Duration::ZERO)
        .await
        .unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(
        s.try_lease("health", "r3", ttl).await.unwrap(),
        "expired lease taken over"
    );
    // Many replicas at once: exactly one wins a fresh lease.
    let tries: Vec<_> = (0..8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.try_lease("drain", &format!("r{i}"), ttl).await.unwrap() })
        })
        .collect();
    let mut won = 0;
    for t in tries {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::testing::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(t) = super::testing::postgres(stringify!($name)).await {
                        super::$name(t).await;
                    }
                }
            )*
        }
    };
}

both_backends!(
    insert_and_get,
    cids_from_three_and_reused,
    concurrent_inserts_get_unique_cids,
    transitions_are_checked,
    claim_takes_oldest_first,
    concurrent_claims_never_share,
    list_filters_and_counts,
    health_counts,
    config_is_replaced,
    reopen_keeps_data_and_schema,
    corrupt_rows_are_reported,
    hosts_join_beat_and_go_down,
    one_open_migration_per_vm,
    ownership_moves_by_compare_and_swap,
    a_lease_has_one_holder,
    join_tokens_are_used_once,
);

#[tokio::test]
async fn bad_urls_are_refused() {
    let e = tern_store::open("mysql://x").await.err().unwrap();
    assert!(e.to_string().contains("bad store URL"), "{e}");
    let _unused: Option<Arc<dyn Store>> = None;
}
