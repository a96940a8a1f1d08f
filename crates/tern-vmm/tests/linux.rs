//! Linux guests: Debian's stock bzImage and a busybox initramfs
//! (`scripts/guest-kernel.sh` fetches both and `scripts/test.sh` passes their
//! paths in TERN_GUEST_KERNEL and TERN_GUEST_INITRD).
//!
//! Loading (bzImage, initramfs, command line, boot parameters, e820, entry
//! registers) is checked on any host with /dev/kvm. Booting to userspace is
//! checked only where KVM has hardware virtualization; on a PVM host guest
//! kernel code runs in KVM's emulator and a stock kernel does not boot in
//! useful time, so that test says SKIPPED and why.

use std::path::PathBuf;
use std::time::Duration;
use tern_vmm::x86::{LinuxBoot, BOOT_PARAMS_ADDR, CMDLINE_ADDR};
use tern_vmm::{MachineConfig, WaitOutcome};

fn guest_files() -> Option<(PathBuf, PathBuf)> {
    let from_env = std::env::var_os("TERN_GUEST_KERNEL")
        .map(PathBuf::from)
        .zip(std::env::var_os("TERN_GUEST_INITRD").map(PathBuf::from));
    let found = from_env.filter(|(k, i)| k.exists() && i.exists());
    if found.is_none() {
        if std::env::var("TERN_REQUIRE_GUEST_KERNEL").as_deref() == Ok("1") {
            panic!("TERN_REQUIRE_GUEST_KERNEL=1 but TERN_GUEST_KERNEL/TERN_GUEST_INITRD do not name files");
        }
        eprintln!("SKIPPED: no guest kernel (run scripts/guest-kernel.sh and set TERN_GUEST_KERNEL, TERN_GUEST_INITRD)");
    }
    found
}

use tern_vmm::testing::kvm_or_skip as kvm_available;

#[test]
fn bzimage_initramfs_and_boot_params_are_laid_out() {
    let Some((kernel, initrd)) = guest_files() else {
        return;
    };
    if !kvm_available() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k panic=1";
    let m = tern_vmm::boot_linux(
        MachineConfig {
            memory_mib: 256,
            vcpus: 2,
            ..Default::default()
        },
        &LinuxBoot {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline,
        },
    )
    .unwrap();
    let mut zp = vec![0u8; 4096];
    m.read_memory(BOOT_PARAMS_ADDR, &mut zp).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(zp[o..o + 4].try_into().unwrap());
    // setup_header: boot_flag 0x1fe, header "HdrS" 0x202, type_of_loader 0x210,
    // ramdisk_image 0x218, ramdisk_size 0x21c, cmd_line_ptr 0x228.
    assert_eq!(u16::from_le_bytes([zp[0x1fe], zp[0x1ff]]), 0xaa55);
    assert_eq!(u32_at(0x202), 0x5372_6448, "HdrS");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    let (rd_addr, rd_size) = (u64::from(u32_at(0x218)), u64::from(u32_at(0x21c)));
    assert_eq!(rd_size, std::fs::metadata(&initrd).unwrap().len());
    assert!(rd_addr + rd_size <= 256 << 20 && rd_addr % 4096 == 0);
    let mut rd_head = [0u8; 6];
    m.read_memory(rd_addr, &mut rd_head).unwrap();
    assert_eq!(&rd_head, b"070701", "the initramfs (cpio newc) is in place");
    assert_eq!(u64::from(u32_at(0x228)), CMDLINE_ADDR);
    let mut cl = vec![0u8; cmdline.len() + 1];
    m.read_memory(CMDLINE_ADDR, &mut cl).unwrap();
    assert_eq!(&cl[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cl[cmdline.len()], 0);
    // e820: entries at 0x1e8 (count), table at 0x2d0 (20 bytes each).
    assert_eq!(zp[0x1e8], 2);
    let e = |i: usize, o: usize| {
        u64::from_le_bytes(
            zp[0x2d0 + 20 * i + o..0x2d0 + 20 * i + o + 8]
                .try_into()
                .unwrap(),
        )
    };
    assert_eq!(
        (e(1, 0), e(1, 0) + e(1, 8)),
        (1 << 20, 256 << 20),
        "RAM above 1 MiB to the end"
    );
    // The boot vCPU enters 64-bit code at the kernel's startup_64 with RSI
    // pointing at the boot parameters.
    let st = m.save_state().unwrap();
    let v: tern_vmm::state::VcpuState = st.get("vcpu.0").unwrap();
    assert_eq!(v.regs.rsi, BOOT_PARAMS_ADDR);
    assert_eq!(
        v.regs.rip,
        0x10_0000 + 0x200,
        "64-bit entry of the kernel loaded at 1 MiB"
    );
    assert_ne!(v.sregs.efer & (1 << 10), 0, "long mode active");

    // A missing or bogus kernel is refused with the path in the error.
    let err = tern_vmm::boot_linux(
        MachineConfig::default(),
        &LinuxBoot {
            kernel: &initrd,
            initrd: None,
            cmdline,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not a loadable bzImage"), "{err}");
}

#[test]
fn linux_boots_to_userspace_with_hardware_virtualization() {
    let Some((kernel, initrd)) = guest_files() else {
        return;
    };
    if !kvm_available() {
        return;
    }
    if !tern_vmm::has_hardware_virtualization() {
        eprintln!(
            "SKIPPED: this host's KVM has no hardware virtualization (no vmx/svm in /proc/cpuinfo; \
             PVM emulates guest ring 0), so a stock Linux kernel cannot boot here; \
             Linux boot is verified only on hosts with VMX/SVM"
        );
        return;
    }
    let m = tern_vmm::boot_linux(
        MachineConfig {
            memory_mib: 256,
            vcpus: 1,
            ..Default::default()
        },
        &LinuxBoot {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 reboot=k panic=1",
        },
    )
    .unwrap();
    m.resume().unwrap();
    let out = m.wait_until(Duration::from_secs(60), |d| {
        d.console().recent_contains("tern-ready")
    });
    let console = m.with_devices(|d| d.console().text());
    assert_eq!(out, WaitOutcome::Satisfied, "console:\n{console}");
}
