//! Hosts joining the control plane through the API: one-time join tokens,
//! certificates signed by the control plane's CA over the host's own key,
//! heartbeats with the host's token, and the peer list.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tern_api::{hosts_router, AuthKeys, FleetApi, Permission};
use tern_proto::TenantId;
use tern_store::testing;
use tower::ServiceExt;

struct Cp {
    app: axum::Router,
    admin: String,
    tenant: String,
    _t: testing::TestStore,
    _ca: tempfile::TempDir,
}

async fn cp() -> Cp {
    let t = testing::sqlite().await;
    let ca = tempfile::tempdir().unwrap();
    tern_transport::certs::init_ca(ca.path()).unwrap();
    let keys = Arc::new(AuthKeys::from_secret(b"test-secret-for-hosts"));
    let token = |perms: &[Permission]| {
        keys.issue(
            &TenantId::new("ops").unwrap(),
            perms,
            Duration::from_secs(600),
        )
        .unwrap()
    };
    let (admin, tenant) = (
        token(&[Permission::PlatformAdmin]),
        token(&[Permission::VmsWrite]),
    );
    let app = hosts_router(FleetApi {
        store: t.store.clone(),
        auth: keys,
        ca_dir: ca.path().to_owned(),
        cert_validity: Duration::from_secs(86400),
        join_token_ttl: Duration::from_secs(600),
        host_lease: Duration::from_secs(10),
    });
    Cp {
        app,
        admin,
        tenant,
        _t: t,
        _ca: ca,
    }
}

impl Cp {
    async fn call(
        &self,
        uri: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let method = if body.is_some() || !uri.ends_with("/hosts") {
            "POST"
        } else {
            "GET"
        };
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
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    async fn join_token(&self) -> String {
        let (st, body) = self
            .call("/api/v1/hosts/join-tokens", Some(&self.admin), None)
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

fn join_body(token: &str, id: &str, port: u16, csr: &str) -> serde_json::Value {
    serde_json::json!({
        "token": token,
        "id": id,
        "migrate_addr": format!("127.0.0.1:{port}"),
        "api_url": "http://127.0.0.1:7000",
        "api_token": "a".repeat(32),
        "csr_pem": csr,
        "manifest_key": "ab".repeat(32),
        "labels": {"region": "eu"},
        "capacity": {"memory_mib": 65536, "vcpus": 32},
    })
}

#[tokio::test]
async fn hosts_join_once_beat_with_their_token_and_learn_their_peers() {
    let cp = cp().await;
    // Only admins make join tokens.
    let (st, _) = cp
        .call("/api/v1/hosts/join-tokens", Some(&cp.tenant), None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    let (key1, csr1) = tern_transport::certs::host_csr("h1").unwrap();
    let t1 = cp.join_token().await;
    let (st, j1) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t1, "h1", 7001, &csr1)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{j1}");
    // The certificate carries the host's own key: its pin is that key's.
    let key = rcgen::KeyPair::from_pem(&key1).unwrap();
    let pin = hex::encode(tern_transport::tls::sha256(&key.public_key_der()));
    assert_eq!(j1["cert_pin"], pin.as_str());
    assert!(j1["peers"].as_array().unwrap().is_empty());
    // The token is used up.
    let (st, e) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t1, "h9", 7009, &csr1)),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{e}");

    let (_, csr2) = tern_transport::certs::host_csr("h2").unwrap();
    let t2 = cp.join_token().await;
    let (st, j2) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t2, "h2", 7002, &csr2)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{j2}");
    assert_eq!(j2["peers"][0]["id"], "h1");
    assert_eq!(j2["peers"][0]["cert_pin"], pin.as_str());

    // Heartbeats need the host's own token, and answer with the peers.
    let h1_token = j1["host_token"].as_str().unwrap();
    // h1 runs a VM the store gave h2 (at the epoch h1 runs it at: h1's copy
    // is stale), one the store has on h1, and one it never knew.
    let store = cp._t.store.clone();
    let mut ids = Vec::new();
    for host in ["h2", "h1"] {
        let rec = store
            .insert_vm(tern_store::NewVm {
                id: tern_proto::VmId::new(),
                tenant: None,
                status: tern_proto::VmStatus::Provisioning,
                host: tern_proto::HostId::new(host).unwrap(),
                spec: Default::default(),
                config: Default::default(),
            })
            .await
            .unwrap();
        ids.push(rec.id.to_string());
    }
    let load = serde_json::json!({"load": {"cpu": 0.4, "memory_used_mib": 1000, "memory_free_mib": 60000,
        "net_bytes_per_sec": 0, "disk_bytes_per_sec": 0, "vms": 2, "migrations": 0},
        "running": [{"id": ids[0], "epoch": 1}, {"id": ids[1], "epoch": 1}, {"id": "vm-local", "epoch": 1}]});
    let (st, beat) = cp
        .call(
            "/api/v1/hosts/h1/heartbeat",
            Some(h1_token),
            Some(load.clone()),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{beat}");
    assert_eq!(beat["state"], "active");
    assert_eq!(beat["peers"][0]["id"], "h2");
    assert_eq!(
        beat["fenced"],
        serde_json::json!([ids[0]]),
        "only the stale copy"
    );
    let h2_token = j2["host_token"].as_str().unwrap();
    let (st, _) = cp
        .call("/api/v1/hosts/h1/heartbeat", Some(h2_token), Some(load))
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "h2's token is not h1's");

    let (st, hosts) = cp.call("/api/v1/hosts", Some(&cp.admin), None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(hosts.as_array().unwrap().len(), 2);
    assert_eq!(hosts[0]["load"]["vms"], 2);
    let (st, _) = cp.call("/api/v1/hosts", Some(&cp.tenant), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_bad_join_changes_nothing() {
    let cp = cp().await;
    let t = cp.join_token().await;
    let (_, csr) = tern_transport::certs::host_csr("h1").unwrap();
    let mut bad = join_body(&t, "h1", 7001, &csr);
    bad["manifest_key"] = "not hex".into();
    let (st, e) = cp.call("/api/v1/hosts/join", None, Some(bad)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    let (st, e) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t, "../etc", 7001, &csr)),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    let (st, e) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t, "h1", 7001, "garbage")),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
    // None used the token up.
    let (st, e) = cp
        .call(
            "/api/v1/hosts/join",
            None,
            Some(join_body(&t, "h1", 7001, &csr)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{e}");
    let (st, _) = cp.call("/api/v1/hosts", Some(&cp.admin), None).await;
    assert_eq!(st, StatusCode::OK);
}
