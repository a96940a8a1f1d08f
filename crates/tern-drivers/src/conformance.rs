//! The contract every [`VmDriver`] keeps, as one test suite that each
//! driver's tests run against a real instance of it (the mock here, the kvm
//! driver with real monitors, the docker driver with a real engine).
//!
//! The orchestrator relies on exactly these answers: an unknown VM is
//! `NotFound` to probes and a no-op to cleanup; a started VM is listed and
//! becomes healthy; a stopped one is never healthy; after cleanup nothing of
//! it is listed; a start that cannot be honoured fails clearly and leaves
//! nothing behind. Compiled for the crate's own tests and, behind the
//! `conformance` feature, for other crates' tests.

use crate::{DriverError, StartRequest, VmDriver};
use std::time::{Duration, Instant};
use tern_proto::{VmConfig, VmId, VmSpec};

/// A start of VM `id` with `spec` on this host (`local`), at epoch 1: what
/// every driver's tests ask for.
pub fn local_request(id: VmId, spec: VmSpec) -> StartRequest {
    StartRequest {
        id,
        spec,
        vsock_cid: None,
        host: tern_proto::HostId::new("local").expect("a valid host id"),
        epoch: tern_proto::OwnerEpoch(1),
    }
}

/// How long a started VM may take to report healthy.
const READY: Duration = Duration::from_secs(60);

/// Runs the whole suite. `req` makes a start request for an id and a spec;
/// `good_spec` is a spec this driver boots; `bad_image` is an image name it
/// must refuse (`None` for a driver that boots no images: the mock).
pub async fn run(
    d: &dyn VmDriver,
    good_spec: VmSpec,
    req: impl Fn(VmId, VmSpec) -> StartRequest,
    bad_image: Option<&str>,
) {
    unknown_vms(d).await;
    lifecycle(d, &req, &good_spec).await;
    if let Some(bad) = bad_image {
        refused_starts(d, &req, &good_spec, bad).await;
    }
}

/// An id the driver never saw: probes say `NotFound`, cleanup succeeds.
async fn unknown_vms(d: &dyn VmDriver) {
    let id = VmId::new();
    assert!(
        matches!(d.is_healthy(id).await, Err(DriverError::NotFound(i)) if i == id),
        "{}: health of an unknown VM must be NotFound",
        d.name()
    );
    assert!(
        matches!(
            d.configure(id, &VmConfig::default()).await,
            Err(DriverError::NotFound(_))
        ),
        "{}: configuring an unknown VM must be NotFound",
        d.name()
    );
    match d.stop(id).await {
        Ok(()) | Err(DriverError::NotFound(_)) => {}
        Err(e) => panic!("{}: stopping an unknown VM: {e}", d.name()),
    }
    d.cleanup(id)
        .await
        .expect("cleanup of an unknown VM succeeds");
    assert!(!d.list().await.expect("list").contains(&id));
}

/// Start, list, health, configure, stop, cleanup, each idempotent where the
/// trait says so.
async fn lifecycle(d: &dyn VmDriver, req: &impl Fn(VmId, VmSpec) -> StartRequest, spec: &VmSpec) {
    let id = VmId::new();
    let h = d.start(&req(id, spec.clone())).await.expect("start");
    assert_eq!(h.id, id);
    assert_eq!(h.driver, d.name());
    assert!(
        d.list().await.expect("list").contains(&id),
        "a started VM is listed"
    );
    wait_healthy(d, id).await;

    let config = VmConfig {
        settings: [("greeting".to_string(), "hello".to_string())].into(),
        allowed_tools: vec!["search".into()],
    };
    d.configure(id, &config).await.expect("configure");

    d.stop(id).await.expect("stop");
    d.stop(id).await.expect("a second stop succeeds");
    match d.is_healthy(id).await {
        Ok(false) | Err(DriverError::NotFound(_)) => {}
        other => panic!("{}: a stopped VM must not be healthy: {other:?}", d.name()),
    }
    d.cleanup(id).await.expect("cleanup");
    d.cleanup(id).await.expect("a second cleanup succeeds");
    assert!(
        !d.list().await.expect("list").contains(&id),
        "cleaned up, not listed"
    );
    assert!(matches!(
        d.is_healthy(id).await,
        Err(DriverError::NotFound(_))
    ));
}

/// Starts the driver cannot honour fail with `StartFailed` naming the
/// problem, and leave nothing listed.
async fn refused_starts(
    d: &dyn VmDriver,
    req: &impl Fn(VmId, VmSpec) -> StartRequest,
    spec: &VmSpec,
    bad_image: &str,
) {
    let before = d.list().await.expect("list");
    let id = VmId::new();
    let bad = VmSpec {
        image: bad_image.into(),
        ..spec.clone()
    };
    match d.start(&req(id, bad)).await {
        Err(DriverError::StartFailed { id: i, reason }) => {
            assert_eq!(i, id);
            assert!(reason.contains(bad_image), "{}: {reason}", d.name());
        }
        other => panic!(
            "{}: image `{bad_image}` must be refused: {other:?}",
            d.name()
        ),
    }
    d.cleanup(id).await.expect("cleanup after a refused start");
    assert_eq!(
        d.list().await.expect("list"),
        before,
        "a refused start leaves nothing"
    );
}

async fn wait_healthy(d: &dyn VmDriver, id: VmId) {
    let deadline = Instant::now() + READY;
    loop {
        match d.is_healthy(id).await {
            Ok(true) => return,
            Ok(false) if Instant::now() < deadline => {}
            other => panic!("{}: VM {id} never became healthy: {other:?}", d.name()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
