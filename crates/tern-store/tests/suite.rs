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
);

#[tokio::test]
async fn bad_urls_are_refused() {
    let e = tern_store::open("mysql://x").await.err().unwrap();
    assert!(e.to_string().contains("bad store URL"), "{e}");
    let _unused: Option<Arc<dyn Store>> = None;
}
