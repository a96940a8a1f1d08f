//! The docker driver against a real Docker Engine (scripts/docker-up.sh
//! starts one and builds tern's workload image): the driver contract, the
//! spec's resources and confinement, configuration inside the container, a
//! crashed workload, and clear errors for images the host does not have.
//!
//! Skipped when no engine answers, unless `TERN_REQUIRE_DOCKER=1` (CI).

use futures::TryStreamExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tern_drivers::conformance::local_request as start_req;
use tern_drivers::docker::{ContainerImage, DockerConfig, DockerDriver, CONFIG_PATH};
use tern_drivers::{conformance, DriverError, VmDriver};
use tern_proto::{VmConfig, VmId, VmSpec};

/// A driver with its own instance label (tests run side by side on one
/// engine), or `None` (skipped) when no engine answers.
async fn driver(images: &[(&str, &str)]) -> Option<DockerDriver> {
    let mut cfg = DockerConfig {
        instance: format!("tern-test-{}", &VmId::new().to_string()[..8]),
        ..DockerConfig::default()
    };
    if let Ok(s) = std::env::var("TERN_DOCKER_SOCKET") {
        cfg.socket = PathBuf::from(s);
    }
    for (name, image) in images {
        let entry = ContainerImage {
            image: (*image).into(),
            cmd: None,
            health: None,
        };
        cfg.images.insert((*name).into(), entry);
    }
    match DockerDriver::connect(cfg).await {
        Ok(d) => Some(d),
        Err(e) if std::env::var("TERN_REQUIRE_DOCKER").as_deref() == Ok("1") => {
            panic!("TERN_REQUIRE_DOCKER=1 but {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

fn spec() -> VmSpec {
    VmSpec {
        memory_mib: 64,
        vcpus: 1,
        image: "test".into(),
        ..VmSpec::default()
    }
}

#[tokio::test]
async fn the_docker_driver_keeps_the_driver_contract() {
    let Some(d) = driver(&[]).await else { return };
    conformance::run(&d, spec(), start_req, Some("windows")).await;
    assert!(d.list().await.unwrap().is_empty());
}

/// Reads one file out of a container through the engine's archive API.
async fn read_file(d: &DockerDriver, id: VmId, path: &str) -> Vec<u8> {
    let opts = bollard::query_parameters::DownloadFromContainerOptionsBuilder::new()
        .path(path)
        .build();
    let chunks: Vec<_> = d
        .engine()
        .download_from_container(&d.container_name(id), Some(opts))
        .try_collect()
        .await
        .unwrap();
    let tar = chunks.concat();
    let mut archive = tar::Archive::new(&tar[..]);
    let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut out).unwrap();
    out
}

#[tokio::test]
async fn a_container_gets_its_spec_its_config_and_no_privileges() {
    let Some(d) = driver(&[]).await else { return };
    let id = VmId::new();
    let want = VmSpec {
        memory_mib: 96,
        vcpus: 2,
        ..spec()
    };
    let h = d.start(&start_req(id, want)).await.unwrap();
    assert!(h.detail.contains("pid"), "{h:?}");
    let c = d
        .engine()
        .inspect_container(&d.container_name(id), None)
        .await
        .unwrap();
    let hc = c.host_config.unwrap();
    assert_eq!(hc.memory, Some(96 << 20));
    assert_eq!(
        hc.memory_swap,
        Some(96 << 20),
        "no swap beyond the spec's memory"
    );
    assert_eq!(hc.nano_cpus, Some(2_000_000_000));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
    assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_string()]));
    assert_eq!(hc.pids_limit, Some(512));

    let config = VmConfig {
        settings: [("mode".to_string(), "fast".to_string())].into(),
        allowed_tools: vec![],
    };
    d.configure(id, &config).await.unwrap();
    let back: VmConfig = serde_json::from_slice(&read_file(&d, id, CONFIG_PATH).await).unwrap();
    assert_eq!(back, config);

    // The workload's own health check runs: healthy once it counts.
    wait_for(&d, id, true).await;
    let n: u64 = String::from_utf8(read_file(&d, id, "/run/tern-counter").await)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(n > 0);

    // A workload that dies is unhealthy at once, and still there to clean up.
    d.engine()
        .kill_container(&d.container_name(id), None)
        .await
        .unwrap();
    wait_for(&d, id, false).await;
    assert_eq!(d.list().await.unwrap(), vec![id]);
    d.cleanup(id).await.unwrap();
    assert!(d.list().await.unwrap().is_empty());
    assert!(matches!(
        d.is_healthy(id).await,
        Err(DriverError::NotFound(_))
    ));
}

async fn wait_for(d: &DockerDriver, id: VmId, healthy: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.is_healthy(id).await.unwrap() != healthy {
        assert!(Instant::now() < deadline, "never became healthy={healthy}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_image_missing_from_the_host_is_reported_and_nothing_is_left() {
    let Some(d) = driver(&[("ghost", "tern-ghost:404")]).await else {
        return;
    };
    let id = VmId::new();
    let err = d
        .start(&start_req(
            id,
            VmSpec {
                image: "ghost".into(),
                ..spec()
            },
        ))
        .await
        .unwrap_err();
    let DriverError::StartFailed { reason, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        reason.contains("tern-ghost:404") && reason.contains("not on this host"),
        "{reason}"
    );
    // Unknown names list what the host offers, and bad specs fail before the engine.
    let err = d
        .start(&start_req(
            id,
            VmSpec {
                image: "nginx".into(),
                ..spec()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("offers: test, ghost"), "{err}");
    let err = d
        .start(&start_req(
            id,
            VmSpec {
                memory_mib: 3,
                ..spec()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
    assert!(d.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn no_engine_makes_the_driver_unavailable() {
    let cfg = DockerConfig {
        socket: PathBuf::from("/nonexistent/docker.sock"),
        ..DockerConfig::default()
    };
    match DockerDriver::connect(cfg).await {
        Err(DriverError::Unavailable(m)) => assert!(m.contains("/nonexistent/docker.sock"), "{m}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("connected to nothing"),
    }
}
