//! x86-64 boot plumbing: CPUID, ELF and bzImage loading, boot parameters,
//! and long-mode entry.

use crate::memory::GuestMem;
use crate::VmmError;
use kvm_bindings::{kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// KVM's TSS for real-mode emulation (three pages below 4 GiB, outside RAM).
pub const TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation (just below the TSS).
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
/// Four page directories (0xb000..0xf000) map the first 4 GiB in 2 MiB pages.
const PD_ADDR: u64 = 0xb000;
/// Linux boot parameters ("zero page").
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Linux command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line we pass.
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel's protected-mode part loads.
const HIMEM_START: u64 = 0x10_0000;
/// End of conventional memory below the EBDA.
const EBDA_START: u64 = 0x9_fc00;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn mem_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// KVM's supported CPUID, made per-vCPU: APIC ids, logical CPU count, and
/// the hypervisor bit.
pub fn cpuid_for(supported: &CpuId, vcpu: u8, vcpus: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpus) << 16) | (u32::from(vcpu) << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = u32::from(vcpu),
            _ => {}
        }
    }
    c
}

/// Loads an ELF64 image into guest memory; returns its entry point.
pub fn load_elf(mem: &GuestMem, path: &Path) -> Result<u64, VmmError> {
    let mut f = std::fs::File::open(path).map_err(|e| VmmError::Load {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    load_elf_image(mem, &path.display().to_string(), &mut f)
}

/// Loads an ELF image read from `image` (`name` names it in errors).
pub fn load_elf_image<R: std::io::Read + std::io::Seek + vm_memory::ReadVolatile>(
    mem: &GuestMem,
    name: &str,
    image: &mut R,
) -> Result<u64, VmmError> {
    use linux_loader::loader::{elf::Elf, KernelLoader};
    let res = Elf::load(mem, None, image, None).map_err(|e| VmmError::Load {
        path: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(res.kernel_load.0)
}

/// What a Linux guest boots from.
#[derive(Clone, Debug)]
pub struct LinuxBoot<'a> {
    /// A bzImage.
    pub kernel: &'a Path,
    /// An initramfs, optional.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
}

/// Loads a bzImage, initramfs and command line, and writes the boot
/// parameters (e820 map included). Returns the 64-bit entry point.
pub fn load_linux(mem: &GuestMem, boot: &LinuxBoot<'_>) -> Result<u64, VmmError> {
    use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
    use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
    let err = |path: &Path, reason: String| VmmError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(boot.kernel).map_err(|e| err(boot.kernel, e.to_string()))?;
    let loaded = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| err(boot.kernel, format!("not a loadable bzImage: {e}")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| err(boot.kernel, "no setup header".into()))?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| VmmError::Config(e.to_string()))?;
    cmdline
        .insert_str(boot.cmdline)
        .map_err(|e| VmmError::Config(format!("kernel command line: {e}")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| VmmError::Config(format!("kernel command line: {e}")))?;

    let mem_end = crate::memory::total_bytes(mem);
    if let Some(initrd) = boot.initrd {
        let data = std::fs::read(initrd).map_err(|e| err(initrd, e.to_string()))?;
        let size = data.len() as u64;
        // As high as possible, page aligned, below the end of RAM and 4 GiB.
        let top = mem_end.min(1 << 32);
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a > loaded.kernel_end)
            .ok_or_else(|| {
                err(
                    initrd,
                    format!("{size} bytes do not fit in guest RAM above the kernel"),
                )
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(mem_err)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params::default();
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = boot.cmdline.len() as u32 + 1;
    hdr.kernel_alignment = 0x0100_0000;
    params.hdr = hdr;
    let e820 = [(0, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)];
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: 1, // usable RAM
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(BOOT_PARAMS_ADDR))
        .map_err(mem_err)?;
    // The 64-bit entry sits 0x200 past the protected-mode start.
    Ok(loaded.kernel_load.0 + 0x200)
}

/// Routes the local APIC's LINT0 to ExtINT (the PIC) and LINT1 to NMI, as
/// firmware would before handing over to Linux.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(LVT_LINT0, 7u32), (LVT_LINT1, 4u32)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

/// Writes a GDT and identity page tables for the first 4 GiB, and puts the
/// vCPU in 64-bit mode at `entry` with the stack at `stack_top` and `rsi`
/// (Linux's boot-parameter pointer).
pub fn setup_long_mode(
    mem: &GuestMem,
    vcpu: &VcpuFd,
    entry: u64,
    stack_top: u64,
    rsi: u64,
) -> Result<(), VmmError> {
    // Null, 64-bit code, data.
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err)?;
    }
    // PML4[0] -> PDPT, PDPT[0..4] -> four PDs of 512 x 2 MiB pages each.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(mem_err)?;
    for g in 0..4u64 {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + 8 * g))
            .map_err(mem_err)?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + 8 * i))
                .map_err(mem_err)?;
        }
    }

    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x10,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x18,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;

    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rsp: stack_top,
        rsi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}
