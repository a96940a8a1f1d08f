//! The HTTP API against a real store and the mock driver, request by request.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tern_api::{router, ApiState, AuthKeys, Permission};
use tern_drivers::mock::{MockDriver, MockFaults};
use tern_orchestrator::{Manager, ManagerConfig};
use tern_proto::TenantId;
use tern_store::testing;
use tower::ServiceExt;

struct Api {
    app: axum::Router,
    keys: Arc<AuthKeys>,
    manager: Arc<Manager>,
    _t: testing::TestStore,
}

async fn api(pool: usize, faults: MockFaults) -> Api {
    api_with(
        ManagerConfig {
            warm_pool_size: pool,
            ..ManagerConfig::default()
        },
        faults,
    )
    .await
}

async fn api_with(cfg: ManagerConfig, faults: MockFaults) -> Api {
    let t = testing::sqlite().await;
    let driver = Arc::new(MockDriver::new(faults));
    let manager = Arc::new(Manager::new(t.store.clone(), driver, cfg));
    manager.reconcile_pool().await.unwrap();
    let keys = Arc::new(AuthKeys::from_secret(b"test-secret"));
    let app = router(ApiState {
        manager: manager.clone(),
        auth: keys.clone(),
        metrics: tern_api::MetricsAccess::Token(METRICS_TOKEN.into()),
    });
    Api {
        app,
        keys,
        manager,
        _t: t,
    }
}

impl Api {
    fn token(&self, tenant: &str, perms: &[Permission]) -> String {
        self.keys
            .issue(
                &TenantId::new(tenant).unwrap(),
                perms,
                Duration::from_secs(600),
            )
            .unwrap()
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
                String::from_utf8_lossy(&bytes).into_owned(),
            ))
        };
        (status, json)
    }
}

const METRICS_TOKEN: &str = "metrics-token-for-tests";

const RW: &[Permission] = &[Permission::VmsRead, Permission::VmsWrite];

#[tokio::test]
async fn walk_create_get_list_configure_delete() {
    let a = api(2, MockFaults::default()).await;
    let alice = a.token("alice", RW);
    let bob = a.token("bob", RW);

    let (st, vm) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&alice),
            Some(serde_json::json!({"config": {"allowed_tools": ["git"]}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["status"], "running");
    assert_eq!(vm["tenant"], "alice");
    assert_eq!(vm["provisioned_from"], "warm");
    assert_eq!(vm["config"]["allowed_tools"][0], "git");
    let id = vm["id"].as_str().unwrap().to_owned();
    let url = format!("/api/v1/vms/{id}");

    let (st, got) = a.call("GET", &url, Some(&alice), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["id"], id.as_str());

    // An empty body is a default request.
    let (st, vm2) = a.call("POST", "/api/v1/vms", Some(&bob), None).await;
    assert_eq!(st, StatusCode::CREATED, "{vm2}");

    let (st, list) = a.call("GET", "/api/v1/vms", Some(&alice), None).await;
    assert_eq!(st, StatusCode::OK);
    let ids: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![serde_json::Value::String(id.clone())],
        "only alice's VMs"
    );

    // Another tenant cannot see, configure or delete it.
    for (m, u, b) in [
        ("GET", url.clone(), None),
        ("DELETE", url.clone(), None),
        (
            "POST",
            format!("{url}/configure"),
            Some(serde_json::json!({})),
        ),
    ] {
        let (st, err) = a.call(m, &u, Some(&bob), b).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{m} {u}");
        assert!(err["error"].as_str().unwrap().contains("not found"));
    }

    let (st, conf) = a
        .call(
            "POST",
            &format!("{url}/configure"),
            Some(&alice),
            Some(
                serde_json::json!({"settings": {"MODE": "fast"}, "allowed_tools": ["git", "curl"]}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{conf}");
    assert_eq!(conf["config"]["settings"]["MODE"], "fast");
    assert_eq!(conf["config"]["allowed_tools"][1], "curl");

    let (st, body) = a.call("DELETE", &url, Some(&alice), None).await;
    assert_eq!(
        (st, body),
        (StatusCode::NO_CONTENT, serde_json::Value::Null)
    );
    let (st, _) = a.call("GET", &url, Some(&alice), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = a.call("DELETE", &url, Some(&alice), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn auth_errors_are_401_and_403_with_json() {
    let a = api(0, MockFaults::default()).await;
    let (st, e) = a.call("GET", "/api/v1/vms", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(e["error"].as_str().unwrap().contains("missing"));
    let (st, e) = a.call("GET", "/api/v1/vms", Some("not.a.jwt"), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(e["error"].is_string());
    let forged = AuthKeys::from_secret(b"wrong")
        .issue(
            &TenantId::new("alice").unwrap(),
            RW,
            Duration::from_secs(60),
        )
        .unwrap();
    let (st, _) = a.call("GET", "/api/v1/vms", Some(&forged), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);

    let reader = a.token("alice", &[Permission::VmsRead]);
    let (st, e) = a.call("POST", "/api/v1/vms", Some(&reader), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert!(e["error"].as_str().unwrap().contains("vms:write"));
    let writer = a.token("alice", &[Permission::VmsWrite]);
    let (st, _) = a.call("GET", "/api/v1/vms", Some(&writer), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn admin_sees_every_tenant() {
    let a = api(1, MockFaults::default()).await;
    let alice = a.token("alice", RW);
    let admin = a.token("ops", &[Permission::PlatformAdmin]);
    let (_, vm) = a.call("POST", "/api/v1/vms", Some(&alice), None).await;
    a.manager.reconcile_pool().await.unwrap();
    let (st, list) = a.call("GET", "/api/v1/vms", Some(&admin), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "alice's VM and the warm one"
    );
    let (st, _) = a
        .call(
            "GET",
            &format!("/api/v1/vms/{}", vm["id"].as_str().unwrap()),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn driver_failure_is_502_and_illegal_transition_409() {
    let a = api(
        0,
        MockFaults {
            fail_start_after: Some(0),
            ..Default::default()
        },
    )
    .await;
    let alice = a.token("alice", RW);
    let (st, e) = a.call("POST", "/api/v1/vms", Some(&alice), None).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY, "{e}");
    assert!(e["error"].as_str().unwrap().contains("failed to start"));

    let b = api(1, MockFaults::default()).await;
    let admin = b.token("ops", &[Permission::PlatformAdmin]);
    let warm = b.manager.list(None).await.unwrap()[0].id;
    let (st, e) = b
        .call(
            "POST",
            &format!("/api/v1/vms/{warm}/configure"),
            Some(&admin),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert!(e["error"].as_str().unwrap().contains("warm"));
}

#[tokio::test]
async fn bad_input_is_400_or_404_with_json() {
    let a = api(0, MockFaults::default()).await;
    let alice = a.token("alice", RW);
    let (st, e) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&alice),
            Some(serde_json::json!({"spec": {"vcpus": 0}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(e["error"].as_str().unwrap().contains("spec.vcpus"), "{e}");
    let (st, e) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&alice),
            Some(serde_json::json!({"specc": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(e["error"].as_str().unwrap().contains("specc"), "{e}");
    let (st, e) = a
        .call("GET", "/api/v1/vms/not-a-uuid", Some(&alice), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(e["error"].is_string());
    let (st, e) = a.call("GET", "/nope", None, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(e["error"].is_string());
    assert!(
        a.manager.list(None).await.unwrap().is_empty(),
        "nothing was created"
    );
}

/// Issue 14, finding 1: a tenant picks an image by name and never a host
/// path; whether a file exists is not revealed (every refusal reads alike).
#[tokio::test]
async fn a_tenant_cannot_make_the_monitor_open_a_host_file() {
    let a = api(0, MockFaults::default()).await;
    let alice = a.token("alice", RW);
    for field in ["kernel", "initrd", "cmdline"] {
        let (st, e) = a
            .call(
                "POST",
                "/api/v1/vms",
                Some(&alice),
                Some(serde_json::json!({"spec": {"image": "linux", field: "/var/lib/tern/jwt-secret"}})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        assert!(
            e["error"].as_str().unwrap().contains("unknown field"),
            "{e}"
        );
    }
    let mut answers = vec![];
    for image in ["/etc/passwd", "/nonexistent", "../../etc/passwd"] {
        let (st, e) = a
            .call(
                "POST",
                "/api/v1/vms",
                Some(&alice),
                Some(serde_json::json!({"spec": {"image": image}})),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        answers.push(e["error"].as_str().unwrap().replace(image, "X"));
    }
    assert_eq!(
        answers[0], answers[1],
        "an existing and a missing path answer alike"
    );
    let (st, e) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&alice),
            Some(serde_json::json!({"spec": {"image": "linux"}})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown image `linux`"),
        "{e}"
    );
    assert!(
        a.manager.list(None).await.unwrap().is_empty(),
        "nothing was created"
    );
}

/// Issue 14, finding 6: bodies are JSON (415 otherwise) and bounded (413).
#[tokio::test]
async fn bodies_must_be_json_and_small() {
    let a = api(0, MockFaults::default()).await;
    let alice = a.token("alice", RW);
    let raw = |ct: Option<&str>, body: Vec<u8>| {
        let mut req = Request::builder()
            .method("POST")
            .uri("/api/v1/vms")
            .header("authorization", format!("Bearer {alice}"));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let req = req.body(Body::from(body)).unwrap();
        let app = a.app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let st = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error");
            (st, json)
        }
    };
    let (st, e) = raw(Some("text/plain"), b"{}".to_vec()).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{e}");
    let (st, e) = raw(None, b"{\"spec\": {}}".to_vec()).await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{e}");
    let huge = format!(
        "{{\"config\": {{\"settings\": {{\"k\": \"{}\"}}}}}}",
        "x".repeat(3 << 20)
    );
    let (st, e) = raw(Some("application/json"), huge.into_bytes()).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{e}");
    assert!(
        a.manager.list(None).await.unwrap().is_empty(),
        "nothing was created"
    );
}

/// Issue 14, finding 8: per-tenant quotas hold at create, warm or cold.
#[tokio::test]
async fn quotas_are_enforced_at_create() {
    use tern_orchestrator::{Quota, Quotas};
    let quotas = Quotas {
        default: Quota {
            max_vms: 2,
            ..Quota::default()
        },
        tenants: [(
            "small".to_string(),
            Quota {
                max_vms: 5,
                max_memory_mib: 300,
                max_vcpus: 1,
            },
        )]
        .into(),
    };
    let a = api_with(
        ManagerConfig {
            warm_pool_size: 1,
            quotas,
            ..ManagerConfig::default()
        },
        MockFaults::default(),
    )
    .await;
    let alice = a.token("alice", RW);
    for _ in 0..2 {
        let (st, e) = a.call("POST", "/api/v1/vms", Some(&alice), None).await;
        assert_eq!(st, StatusCode::CREATED, "{e}");
    }
    let (st, e) = a.call("POST", "/api/v1/vms", Some(&alice), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("quota"), "{e}");
    let small = a.token("small", RW);
    let (st, e) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&small),
            Some(serde_json::json!({"spec": {"memory_mib": 512}})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("memory"), "{e}");
    let (st, e) = a
        .call(
            "POST",
            "/api/v1/vms",
            Some(&small),
            Some(serde_json::json!({"spec": {"memory_mib": 256, "vcpus": 2}})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
    assert!(e["error"].as_str().unwrap().contains("vCPUs"), "{e}");
    let mine = |t| {
        let m = a.manager.clone();
        async move {
            m.list(Some(&TenantId::new(t).unwrap()))
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(mine("alice").await, 2);
    assert_eq!(mine("small").await, 0);
}

#[tokio::test]
async fn healthz_and_metrics() {
    let a = api(2, MockFaults::default()).await;
    let (st, h) = a.call("GET", "/healthz", None, None).await;
    assert_eq!((st, h["status"].as_str()), (StatusCode::OK, Some("ok")));
    let alice = a.token("alice", RW);
    a.call("POST", "/api/v1/vms", Some(&alice), None).await;
    // Issue 14, finding 8: metrics are not for whoever reaches the API.
    for t in [None, Some(alice.as_str()), Some("metrics-token-for-test")] {
        let (st, e) = a.call("GET", "/metrics", t, None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{t:?}");
        assert!(e["error"].is_string());
    }
    let (st, m) = a.call("GET", "/metrics", Some(METRICS_TOKEN), None).await;
    assert_eq!(st, StatusCode::OK);
    let text = m.as_str().unwrap();
    for needle in [
        "tern_warm_pool_size",
        "tern_warm_pool_target",
        "tern_provisions_total",
        "tern_http_request_duration_seconds_bucket",
        "tern_vms{status=\"running\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}
