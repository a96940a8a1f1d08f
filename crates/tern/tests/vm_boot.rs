//! `tern vm boot` boots the test guest on this host's KVM and reports boot time.

use std::process::Command;

#[test]
fn vm_boot_prints_ready_line_and_boot_time() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "vm",
            "boot",
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--run-for",
            "600ms",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("tern-guest: ready\n"), "{text}");
    assert!(text.contains("ms to ready line"), "{text}");
    assert!(text.contains("agent: counter"), "{text}");
    let bad = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["vm", "boot", "--vcpus", "0"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("vcpus must be 1..=32"), "{err}");
}
