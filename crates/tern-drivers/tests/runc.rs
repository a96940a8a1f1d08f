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
        cgroup: None,
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
        cgroup: None,
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

fn writer_spec(cgroup: &str) -> BundleSpec {
    BundleSpec {
        args: ["/bin/tern-counter", "--dirty-mib", "32", "--rate-mib", "20"]
            .map(String::from)
            .to_vec(),
        memory_mib: 128,
        netns: None,
        cgroup: Some(cgroup.into()),
    }
}

/// A container `id` in `dir` writing across its memory, counting.
fn writing(runc: &Runc, rootfs: &Path, dir: &Path, id: &str) -> Bundle {
    let a = Bundle::create(dir, rootfs, &writer_spec(&format!("/tern-test/a/{id}"))).unwrap();
    runc.run(id, &a).unwrap();
    wait_counter(&a, 20);
    a
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// CRIU's post-copy for containers, as a migration uses it: the source's
/// lazy dump leaves the memory to its page server, a restore on another
/// runc root (another cgroup, as another host) runs the container at once
/// and pulls the memory, and the source's container ends with the
/// transfer.
#[test]
fn a_lazy_checkpoint_runs_the_container_elsewhere_before_its_memory_moved() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let id = format!("tern-lazy-{}", std::process::id());
    let a = writing(&runc, &rootfs, &dir.path().join("a"), &id);
    let _gone = Gone(&runc, id.clone());

    let t = Instant::now();
    let dump = runc
        .checkpoint_lazy(
            &id,
            &dir.path().join("images"),
            &dir.path().join("work"),
            false,
        )
        .unwrap();
    let dump_ms = ms(t);
    let at_dump = counter(&a);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&a), at_dump, "the dumped container is frozen");

    // The destination: its own copy of the rootfs and images, its own
    // runc state and cgroup.
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&b_dir).unwrap();
    copy_dir(&a.rootfs(), &b_dir.join("rootfs"));
    copy_dir(&dir.path().join("images"), &dir.path().join("images-b"));
    let b = Bundle::around_rootfs(&b_dir, &writer_spec(&format!("/tern-test/b/{id}"))).unwrap();
    let state_b = tempfile::tempdir().unwrap();
    let runc_b = Runc::new(state_b.path(), runc_criu());
    let _gone_b = Gone(&runc_b, id.clone());
    let t = Instant::now();
    let mut daemon = runc_b
        .restore_lazy(
            &id,
            &b,
            &dir.path().join("images-b"),
            &dir.path().join("work-b"),
            dump.page_server(),
        )
        .unwrap();
    let restore_ms = ms(t);
    assert_eq!(runc_b.state(&id).unwrap().unwrap().status, "running");
    let t = Instant::now();
    dump.finish().expect("every page went over");
    let transfer_ms = ms(t);
    assert!(daemon.wait().unwrap().success(), "the lazy-pages daemon");
    assert!(
        runc.state(&id).unwrap().is_none(),
        "the source's container ended"
    );
    wait_counter(&b, at_dump + 5);
    assert_continuous(&b);
    eprintln!(
        "lazy move of a 128 MiB container writing 20 MiB/s over 32 MiB: dump {dump_ms:.0} ms, \
         restore {restore_ms:.0} ms (frozen until then), rest of the memory {transfer_ms:.0} ms later"
    );
}

/// A lazy dump given up before any restore pulled a page lets the
/// container run on where it was, its state intact.
#[test]
fn a_cancelled_lazy_checkpoint_lets_the_container_run_on() {
    let Some((runc, rootfs)) = setup_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let id = format!("tern-lazy-cancel-{}", std::process::id());
    let a = writing(&runc, &rootfs, &dir.path().join("a"), &id);
    let _gone = Gone(&runc, id.clone());
    let dump = runc
        .checkpoint_lazy(
            &id,
            &dir.path().join("images"),
            &dir.path().join("work"),
            false,
        )
        .unwrap();
    let at_dump = counter(&a);
    dump.cancel(None).unwrap();
    assert_eq!(runc.state(&id).unwrap().unwrap().status, "running");
    wait_counter(&a, at_dump + 5);
    assert_continuous(&a);
}

fn runc_criu() -> Criu {
    Criu::locate(std::env::var_os("TERN_CRIU").as_deref().map(Path::new)).unwrap()
}
