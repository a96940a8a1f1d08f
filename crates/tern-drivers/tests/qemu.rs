//! The qemu driver against real QEMU: Debian's kernel with tern's busybox
//! initramfs and workload (TCG here; KVM where the host has hardware
//! virtualization). Slow (a Linux boot each), so `#[ignore]`d; `.ci/run` runs them.

use std::path::Path;
use std::time::Duration;
use tern_drivers::conformance::local_request;
use tern_drivers::images::ImageCatalogue;
use tern_drivers::qemu::load::{LoadParams, LoadReport};
use tern_drivers::qemu::{testing::guest_or_skip, Accel, QemuConfig, QemuDriver, QemuVm};
use tern_drivers::VmDriver;
use tern_proto::{VmId, VmSpec};

fn vm_spec() -> VmSpec {
    VmSpec {
        image: "linux".into(),
        memory_mib: 256,
        ..VmSpec::default()
    }
}

/// The driver with the test kernel and initramfs as image `linux`.
fn driver(run_dir: &Path, kernel: &Path, initrd: &Path, cmdline: &str) -> QemuDriver {
    let images = ImageCatalogue::single("linux", kernel, Some(initrd), Some(cmdline)).unwrap();
    QemuDriver::new(QemuConfig::default(), run_dir.to_path_buf(), images).unwrap()
}

#[tokio::test]
#[ignore = "slow: boots Linux under QEMU"]
async fn the_qemu_driver_keeps_the_driver_contract() {
    let Some((kernel, initrd)) = guest_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cmdline = LoadParams::default().cmdline();
    let d = driver(dir.path(), &kernel, &initrd, &cmdline);
    tern_drivers::conformance::run(&d, vm_spec(), local_request, Some("windows")).await;
}

#[tokio::test]
#[ignore = "slow: boots Linux under QEMU"]
async fn boots_a_linux_guest_reports_health_and_leaves_nothing_behind() {
    let Some((kernel, initrd)) = guest_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let params = LoadParams {
        ws_mib: 8,
        dirty_mib: 4,
        ..Default::default()
    };
    let driver = driver(dir.path(), &kernel, &initrd, &params.cmdline());
    let id = VmId::new();
    let h = driver.start(&local_request(id, vm_spec())).await.unwrap();
    let accel = Accel::detect();
    assert!(
        h.detail.contains(&format!(
            "accel {}",
            if accel == Accel::Kvm { "kvm" } else { "tcg" }
        )),
        "{}",
        h.detail
    );
    assert!(driver.is_healthy(id).await.unwrap());
    assert_eq!(driver.list().await.unwrap(), vec![id]);
    let pid: i32 = h
        .detail
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(',')
        .parse()
        .unwrap();
    // The workload runs and its checks pass (expected sums computed here).
    let vm_dir = dir.path().join(id.to_string());
    let t = std::time::Instant::now();
    let report = loop {
        let text = std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
        let r = LoadReport::from_console(&text, &params);
        if r.good_checks >= 1 || t.elapsed() > Duration::from_secs(60) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(report.ready, "{report:?}");
    assert!(
        report.good_checks >= 1 && report.bad_checks.is_empty(),
        "{report:?}"
    );
    assert!(report.gaps.is_empty(), "{report:?}");

    driver.stop(id).await.unwrap();
    assert!(!driver.is_healthy(id).await.unwrap());
    driver.cleanup(id).await.unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU still runs"
    );
    assert!(
        !vm_dir.exists(),
        "the VM's directory (sockets, logs) is gone"
    );
    assert!(driver.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn an_image_not_in_the_catalogue_is_a_clear_error_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Ok(driver) = QemuDriver::new(
        QemuConfig::default(),
        dir.path().to_path_buf(),
        ImageCatalogue::builtin(),
    ) else {
        eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
        return;
    };
    let id = VmId::new();
    let e = driver
        .start(&local_request(id, vm_spec()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown image `linux`"), "{e}");
    assert!(driver.list().await.unwrap().is_empty());
    // A bad spec handed to the VM layer directly is refused the same way.
    let bad = QemuVm::launch(
        &QemuConfig::default(),
        &dir.path().join("x"),
        &tern_drivers::qemu::QemuSpec {
            memory_mib: 1,
            vcpus: 1,
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
        },
        tern_drivers::qemu::Launch::Boot,
    )
    .await;
    assert!(bad.is_err());
}

#[tokio::test]
#[ignore = "slow: boots Linux under QEMU"]
async fn disks_are_made_with_qemu_img_and_attached() {
    let Some((kernel, initrd)) = guest_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = tern_drivers::qemu::QemuSpec {
        memory_mib: 128,
        vcpus: 1,
        kernel,
        initrd: Some(initrd),
        cmdline: "TERN_HOLD=1".into(),
        disks: vec![
            tern_drivers::qemu::DiskSpec {
                size_mib: 64,
                format: tern_drivers::qemu::DiskFormat::Qcow2,
            },
            tern_drivers::qemu::DiskSpec {
                size_mib: 8,
                format: tern_drivers::qemu::DiskFormat::Raw,
            },
        ],
    };
    let vm = QemuVm::launch(
        &QemuConfig::default(),
        &dir.path().join("vm"),
        &spec,
        tern_drivers::qemu::Launch::Boot,
    )
    .await
    .unwrap();
    vm.wait_console(Duration::from_secs(60), |c| c.contains("tern-ready"))
        .await
        .unwrap();
    let raw = dir.path().join("vm/disk1.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 << 20);
    assert!(dir.path().join("vm/disk0.qcow2").exists());
    let mut q = vm.qmp().await.unwrap();
    let blocks = q
        .execute_value("query-block", serde_json::json!({}))
        .await
        .unwrap();
    let files: Vec<String> = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["inserted"]["file"].as_str().map(String::from))
        .collect();
    assert_eq!(files.len(), 2, "{blocks}");
    assert!(
        files[0].ends_with("disk0.qcow2") && files[1].ends_with("disk1.raw"),
        "{files:?}"
    );
    drop(q);
    let pid = vm.pid();
    vm.remove();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.path().join("vm").exists());
}
