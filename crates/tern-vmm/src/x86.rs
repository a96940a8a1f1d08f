//! x86-64 boot plumbing: ELF loading and long-mode entry.

use crate::VmmError;
use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GDT_ADDR: u64 = 0x500;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn mem_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// Loads an ELF64 image into guest memory; returns its entry point.
pub fn load_elf(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, VmmError> {
    use linux_loader::loader::{elf::Elf, KernelLoader};
    let err = |reason: String| VmmError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let res = Elf::load(mem, None, &mut f, None).map_err(|e| err(e.to_string()))?;
    Ok(res.kernel_load.0)
}

/// Writes a GDT and identity page tables for the first GiB, and puts the
/// vCPU in 64-bit mode at `entry` with the stack at `stack_top`.
pub fn setup_long_mode(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: u64,
    stack_top: u64,
) -> Result<(), VmmError> {
    // Null, 64-bit code, data.
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err)?;
    }
    // PML4[0] -> PDPT, PDPT[0] -> PD, PD: 512 x 2 MiB pages (present, writable, huge).
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(mem_err)?;
    mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + 8 * i))
            .map_err(mem_err)?;
    }

    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
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
        selector: 0x10,
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
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)?;
    Ok(())
}
