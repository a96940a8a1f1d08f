//! Containers under runc, checkpointed and restored by a real CRIU (4.2,
//! built by scripts/criu-setup.sh where the distribution's fails `criu
//! check`), running tern's counter workload (scripts/workload-rootfs.sh):
//! two processes sharing memory, a pipe between them, an open log file.
//!
//! Skipped when runc, a working CRIU or the rootfs is missing, or when not
//! root, unless `TERN_REQUIRE_CRIU=1` (CI).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_drivers::runc::{Bundle, BundleSpec, CheckpointOptions, Criu, Runc, RuncError};

const ROOTFS: &str = "/var/cache/tern/workload/rootfs.tar";

fn setup_or_skip() -> Option<(Runc, PathBuf)> {
    let rootfs = std::env::var("TERN_WORKLOAD_ROOTFS").unwrap_or_else(|_| ROOTFS.into());
    let why = if !rustix::process::geteuid().is_root() {
        Some("not root".to_string())
    } else if !Path::new(&rootfs).exists() {
        Some(format!("{rootfs} missing (scripts/workload-rootfs.sh)"))
    } else {
        Criu::locate(std::env::var_os("TERN_CRIU").as_deref().map(Path::new))
            .err()
            .map(|e| e.to_string())
    };
    if let Some(why) = why {
        if std::env::var("TERN_REQUIRE_CRIU").as_deref() == Ok("1") {
            panic!("TERN_REQUIRE_CRIU=1 but {why}");
        }
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let criu = Criu::locate(std::env::var_os("TERN_CRIU").as_deref().map(Path::new)).unwrap();
    let state = tempfile::tempdir().unwrap().keep();
    Some((Runc::new(&state, criu), PathBuf::from(rootfs)))
}

/// Deletes the container however the test ends.
struct Gone<'a>(&'a Runc, String);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        let _ = self.0.delete(&self.1);
    }
}

fn counter(bundle: &Bundle) -> u64 {
    std::fs::read_to_string(bundle.rootfs().join("run/tern-counter"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_counter(bundle: &Bundle, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = counter(bundle);
        if n > above {
            return n;
        }
        assert!(Instant::now() < deadline, "the counter stayed at {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The workload's own verdict: no break recorded, and the log holds 1..=n
/// with nothing lost or repeated.
fn assert_continuous(bundle: &Bundle) {
    let broken = bundle.rootfs().join("run/tern-broken");
    assert!(
        !broken.exists(),
        "{}",
        std::fs::read_to_string(&broken).unwrap_or_default()
    );
    let log = std::fs::read_to_string(bundle.rootfs().join("run/tern-counter.log")).unwrap();
    for (i, line) in log.lines().enumerate() {
        assert_eq!(line, (i + 1).to_string(), "log line {}", i + 1);
    }
}

fn spec() -> BundleSpec {
    BundleSpec {
        args: vec!["/bin/tern-counter".into()],
        memory_mib: 64,
        netns: None,
    }
}

#[test]
fn a_container_is_restored_with_its_shared_memory_pipe_and_open_file() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::create(&dir.path().join("bundle"), &rootfs, &spec()).unwrap();
    let id = format!("tern-ct-{}", std::process::id());
    let _gone = Gone(&runc, id.clone());
    runc.run(&id, &bundle).unwrap();
    assert_eq!(runc.state(&id).unwrap().unwrap().status, "running");
    let before = wait_counter(&bundle, 5);

    let (images, work) = (dir.path().join("images"), dir.path().join("work"));
    runc.checkpoint(&id, &images, &work, &CheckpointOptions::default())
        .unwrap();
    assert!(
        runc.state(&id).unwrap().is_none(),
        "a checkpoint without leave-running stops it"
    );
    let at_dump = counter(&bundle);
    assert!(at_dump >= before);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counter(&bundle),
        at_dump,
        "nothing runs between dump and restore"
    );

    runc.restore(&id, &bundle, &images, &work, false).unwrap();
    assert_eq!(runc.state(&id).unwrap().unwrap().status, "running");
    wait_counter(&bundle, at_dump + 5);
    assert_continuous(&bundle);
    // Both processes came back (the counter needs the pair).
    let ps = String::from_utf8(runc.exec(&id, &["ps", "-o", "comm"]).unwrap()).unwrap();
    assert_eq!(ps.matches("tern-counter").count(), 2, "{ps}");
}

#[test]
fn a_damaged_image_is_refused_and_the_failure_names_criu() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = Bundle::create(&dir.path().join("bundle"), &rootfs, &spec()).unwrap();
    let id = format!("tern-ct-bad-{}", std::process::id());
    let _gone = Gone(&runc, id.clone());
    runc.run(&id, &bundle).unwrap();
    wait_counter(&bundle, 2);
    let (images, work) = (dir.path().join("images"), dir.path().join("work"));
    let leave = CheckpointOptions {
        leave_running: true,
        ..CheckpointOptions::default()
    };
    runc.checkpoint(&id, &images, &work, &leave).unwrap();
    assert_eq!(
        runc.state(&id).unwrap().unwrap().status,
        "running",
        "leave-running keeps it going"
    );
    runc.delete(&id).unwrap();

    // Truncate the process tree's core image: CRIU must refuse it.
    let core = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pstree")
        })
        .unwrap();
    std::fs::write(&core, b"\x01\x02").unwrap();
    match runc.restore(&id, &bundle, &images, &work, false) {
        Err(RuncError::Failed {
            op: "restore",
            stderr,
            ..
        }) => assert!(stderr.to_lowercase().contains("criu"), "{stderr}"),
        other => panic!("a damaged image restored: {other:?}"),
    }
    assert!(runc
        .state(&id)
        .unwrap()
        .is_none_or(|s| s.status != "running"));
}

/// Sends a line on `s` and reads the count that comes back.
fn ask(s: &mut std::net::TcpStream) -> u64 {
    use std::io::{BufRead, Write};
    s.write_all(b"?\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().parse().unwrap_or_else(|_| panic!("{line:?}"))
}

#[test]
fn an_established_tcp_connection_survives_checkpoint_and_restore() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let Some(ns) = tern_testkit::netns::Netns::create("ct", 233, 1) else {
        panic!("cannot make a network namespace as root");
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = BundleSpec {
        args: vec!["/bin/tern-counter".into(), "--listen".into(), "7000".into()],
        memory_mib: 64,
        netns: Some(PathBuf::from(format!("/var/run/netns/{}", ns.names[0]))),
    };
    let bundle = Bundle::create(&dir.path().join("bundle"), &rootfs, &spec).unwrap();
    let id = format!("tern-ct-tcp-{}", std::process::id());
    let _gone = Gone(&runc, id.clone());
    runc.run(&id, &bundle).unwrap();
    wait_counter(&bundle, 2);

    let addr = std::net::SocketAddr::new(ns.ips[0], 7000);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let local = s.local_addr().unwrap();
    let first = ask(&mut s);

    let (images, work) = (dir.path().join("images"), dir.path().join("work"));
    let opts = CheckpointOptions {
        tcp_established: true,
        ..CheckpointOptions::default()
    };
    runc.checkpoint(&id, &images, &work, &opts).unwrap();
    assert!(runc.state(&id).unwrap().is_none());
    std::thread::sleep(Duration::from_millis(500));
    runc.restore(&id, &bundle, &images, &work, true).unwrap();

    // The same socket, on the same connection, gets answers that carry on.
    let after = ask(&mut s);
    assert!(after >= first, "{after} < {first}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(ask(&mut s) > after, "the counter runs again");
    assert_eq!(s.local_addr().unwrap(), local);
    assert_continuous(&bundle);
}

/// Checkpoints the container (it stops) and packs its images and root
/// filesystem as a signed archive; returns the archive and its manifest.
fn checkpoint_archive(
    runc: &Runc,
    id: &str,
    bundle: &Bundle,
    work: &Path,
    key: &ed25519_dalek::SigningKey,
) -> (Vec<u8>, tern_drivers::checkpoint::SignedCheckpoint) {
    let images = work.join("images");
    runc.checkpoint(
        id,
        &images,
        &work.join("dump"),
        &CheckpointOptions::default(),
    )
    .unwrap();
    let mut archive = Vec::new();
    let parts = [("images", images.as_path()), ("rootfs", &bundle.rootfs())];
    let signed = tern_drivers::checkpoint::pack(id, &parts, &mut archive, key).unwrap();
    (archive, signed)
}

#[test]
fn a_signed_checkpoint_restores_in_another_bundle_and_a_damaged_one_leaves_the_source_to_resume() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("host-a"), dir.path().join("host-b"));
    let bundle = Bundle::create(&src.join("bundle"), &rootfs, &spec()).unwrap();
    let id = format!("tern-ct-move-{}", std::process::id());
    let _gone = Gone(&runc, id.clone());
    runc.run(&id, &bundle).unwrap();
    wait_counter(&bundle, 3);

    // Damaged in transit: the destination refuses it, and the source
    // restores its own images.
    let (mut archive, signed) = checkpoint_archive(&runc, &id, &bundle, &src.join("try1"), &key);
    let at_dump = counter(&bundle);
    let n = archive.len();
    archive[n / 3] ^= 0x40;
    let landing = dst.join("try1");
    let e = tern_drivers::checkpoint::unpack(&archive[..], &signed, &key.verifying_key(), &landing)
        .unwrap_err();
    assert!(!landing.exists(), "{e}");
    let images = src.join("try1/images");
    runc.restore(&id, &bundle, &images, &src.join("try1/back"), false)
        .unwrap();
    wait_counter(&bundle, at_dump + 3);

    // Intact: it lands in a bundle of its own on host-b and carries on there.
    let (archive, signed) = checkpoint_archive(&runc, &id, &bundle, &src.join("try2"), &key);
    let at_dump = counter(&bundle);
    let landing = dst.join("bundle");
    tern_drivers::checkpoint::unpack(&archive[..], &signed, &key.verifying_key(), &landing)
        .unwrap();
    let moved = Bundle::around_rootfs(&landing, &spec()).unwrap();
    let work = dst.join("work");
    runc.restore(&id, &moved, &landing.join("images"), &work, false)
        .unwrap();
    wait_counter(&moved, at_dump + 3);
    assert_continuous(&moved);
    assert_eq!(counter(&bundle), at_dump, "the source's copy stays stopped");
}
