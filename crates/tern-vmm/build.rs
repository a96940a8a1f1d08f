//! Builds the freestanding test guest with the host's gcc (no extra targets).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/test-guest.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("test-guest.elf");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-nostdlib",
            "-static",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-Wl,-Ttext=0x100000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc must be installed to build the test guest");
    assert!(status.success(), "building the test guest failed");
    println!("cargo:rustc-env=TERN_TEST_GUEST_ELF={}", out.display());
}
