//! The bzImage and initramfs loader on arbitrary files: a kernel that is
//! not one, a setup header that lies, an initramfs too big for RAM. The
//! loader refuses or writes inside guest RAM; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use tern_vmm::memory::{create, Backing};
use tern_vmm::x86::{load_linux, LinuxBoot};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| b as usize * 64).min(data.len());
    let (kernel, initrd) = data.split_at(split);
    let dir = std::env::temp_dir();
    let k = dir.join(format!("tern-fuzz-kernel-{}", std::process::id()));
    let i = dir.join(format!("tern-fuzz-initrd-{}", std::process::id()));
    std::fs::File::create(&k).unwrap().write_all(kernel).unwrap();
    std::fs::File::create(&i).unwrap().write_all(initrd).unwrap();
    let mem = create(32 << 20, Backing::Anonymous { hugepages: false }).unwrap();
    let _ = load_linux(
        &mem,
        &LinuxBoot {
            kernel: &k,
            initrd: Some(&i),
            cmdline: "console=ttyS0",
        },
    );
});
