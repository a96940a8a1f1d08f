//! The machine's architectural state as plain, versioned, serde-encoded data.
//!
//! Every KVM structure the monitor saves has a mirror here with named fields,
//! converted both ways. The snapshot format therefore depends on the meaning
//! of each register, never on the memory layout of a kernel structure, and a
//! reader can tell exactly what a file holds. The whole state is a tree of
//! named sections (one per vCPU, one per VM-wide chip, one per device), so a
//! device added later brings a new section without breaking old snapshots.

use crate::VmmError;
use kvm_bindings as kb;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Declares a plain mirror of a KVM structure with the same scalar fields,
/// and conversions both ways (unnamed padding and reserved fields stay zero).
macro_rules! mirror {
    ($(#[$m:meta])* $name:ident <=> $kvm:ty { $($f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[allow(missing_docs)]
        pub struct $name { $(pub $f: $t),* }
        impl From<&$kvm> for $name {
            fn from(k: &$kvm) -> Self { Self { $($f: k.$f),* } }
        }
        impl From<&$name> for $kvm {
            fn from(s: &$name) -> Self {
                #[allow(clippy::needless_update)]
                Self { $($f: s.$f,)* ..Default::default() }
            }
        }
    };
}

mirror!(
    /// General-purpose registers, instruction pointer and flags.
    Regs <=> kb::kvm_regs {
    rax: u64, rbx: u64, rcx: u64, rdx: u64, rsi: u64, rdi: u64, rsp: u64, rbp: u64,
    r8: u64, r9: u64, r10: u64, r11: u64, r12: u64, r13: u64, r14: u64, r15: u64,
    rip: u64, rflags: u64,
});

mirror!(
    /// One segment register, hidden part included.
    Segment <=> kb::kvm_segment {
    base: u64, limit: u32, selector: u16, type_: u8, present: u8, dpl: u8, db: u8,
    s: u8, l: u8, g: u8, avl: u8, unusable: u8,
});

/// A descriptor table register (GDTR, IDTR).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes minus one.
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// Pending external interrupt (only without an in-kernel irqchip).
    pub interrupt_bitmap: [u64; 4],
}

impl From<&kb::kvm_sregs> for Sregs {
    fn from(k: &kb::kvm_sregs) -> Self {
        let dt = |d: &kb::kvm_dtable| DescriptorTable {
            base: d.base,
            limit: d.limit,
        };
        Self {
            cs: (&k.cs).into(),
            ds: (&k.ds).into(),
            es: (&k.es).into(),
            fs: (&k.fs).into(),
            gs: (&k.gs).into(),
            ss: (&k.ss).into(),
            tr: (&k.tr).into(),
            ldt: (&k.ldt).into(),
            gdt: dt(&k.gdt),
            idt: dt(&k.idt),
            cr0: k.cr0,
            cr2: k.cr2,
            cr3: k.cr3,
            cr4: k.cr4,
            cr8: k.cr8,
            efer: k.efer,
            apic_base: k.apic_base,
            interrupt_bitmap: k.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kb::kvm_sregs {
    fn from(s: &Sregs) -> Self {
        let dt = |d: &DescriptorTable| kb::kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        };
        Self {
            cs: (&s.cs).into(),
            ds: (&s.ds).into(),
            es: (&s.es).into(),
            fs: (&s.fs).into(),
            gs: (&s.gs).into(),
            ss: (&s.ss).into(),
            tr: (&s.tr).into(),
            ldt: (&s.ldt).into(),
            gdt: dt(&s.gdt),
            idt: dt(&s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

/// x87 and SSE state (the part KVM_GET_FPU reports; XSAVE holds the rest).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kb::kvm_fpu> for Fpu {
    fn from(k: &kb::kvm_fpu) -> Self {
        Self {
            fpr: k.fpr,
            fcw: k.fcw,
            fsw: k.fsw,
            ftwx: k.ftwx,
            last_opcode: k.last_opcode,
            last_ip: k.last_ip,
            last_dp: k.last_dp,
            xmm: k.xmm,
            mxcsr: k.mxcsr,
        }
    }
}

impl From<&Fpu> for kb::kvm_fpu {
    fn from(s: &Fpu) -> Self {
        Self {
            fpr: s.fpr,
            fcw: s.fcw,
            fsw: s.fsw,
            ftwx: s.ftwx,
            last_opcode: s.last_opcode,
            last_ip: s.last_ip,
            last_dp: s.last_dp,
            xmm: s.xmm,
            mxcsr: s.mxcsr,
            ..Default::default()
        }
    }
}

/// Debug registers DR0-DR3, DR6, DR7.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub flags: u64,
}

/// Pending and injected events (exceptions, interrupts, NMI, SMI, SIPI).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    pub flags: u32,
    pub smi_smm: u8,
    pub smi_pending: u8,
    pub smi_smm_inside_nmi: u8,
    pub smi_latched_init: u8,
    pub triple_fault_pending: u8,
}

impl From<&kb::kvm_vcpu_events> for VcpuEvents {
    fn from(k: &kb::kvm_vcpu_events) -> Self {
        Self {
            exception_injected: k.exception.injected,
            exception_nr: k.exception.nr,
            exception_has_error_code: k.exception.has_error_code,
            exception_pending: k.exception.pending,
            exception_error_code: k.exception.error_code,
            exception_has_payload: k.exception_has_payload,
            exception_payload: k.exception_payload,
            interrupt_injected: k.interrupt.injected,
            interrupt_nr: k.interrupt.nr,
            interrupt_soft: k.interrupt.soft,
            interrupt_shadow: k.interrupt.shadow,
            nmi_injected: k.nmi.injected,
            nmi_pending: k.nmi.pending,
            nmi_masked: k.nmi.masked,
            sipi_vector: k.sipi_vector,
            flags: k.flags,
            smi_smm: k.smi.smm,
            smi_pending: k.smi.pending,
            smi_smm_inside_nmi: k.smi.smm_inside_nmi,
            smi_latched_init: k.smi.latched_init,
            triple_fault_pending: k.triple_fault.pending,
        }
    }
}

impl From<&VcpuEvents> for kb::kvm_vcpu_events {
    fn from(s: &VcpuEvents) -> Self {
        let mut k = kb::kvm_vcpu_events::default();
        k.exception.injected = s.exception_injected;
        k.exception.nr = s.exception_nr;
        k.exception.has_error_code = s.exception_has_error_code;
        k.exception.pending = s.exception_pending;
        k.exception.error_code = s.exception_error_code;
        k.exception_has_payload = s.exception_has_payload;
        k.exception_payload = s.exception_payload;
        k.interrupt.injected = s.interrupt_injected;
        k.interrupt.nr = s.interrupt_nr;
        k.interrupt.soft = s.interrupt_soft;
        k.interrupt.shadow = s.interrupt_shadow;
        k.nmi.injected = s.nmi_injected;
        k.nmi.pending = s.nmi_pending;
        k.nmi.masked = s.nmi_masked;
        k.sipi_vector = s.sipi_vector;
        k.flags = s.flags;
        k.smi.smm = s.smi_smm;
        k.smi.pending = s.smi_pending;
        k.smi.smm_inside_nmi = s.smi_smm_inside_nmi;
        k.smi.latched_init = s.smi_latched_init;
        k.triple_fault.pending = s.triple_fault_pending;
        k
    }
}

/// Everything one vCPU holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// KVM_MP_STATE (runnable, halted, waiting for SIPI, ...).
    pub mp_state: u32,
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment and control registers.
    pub sregs: Sregs,
    /// x87/SSE.
    pub fpu: Fpu,
    /// The XSAVE area, in the architectural XSAVE layout (4 KiB).
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0, ...), as (index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// The local APIC's register page (1 KiB, architectural layout).
    pub lapic: Vec<u8>,
    /// Every model-specific register KVM lists that could be read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending events.
    pub events: VcpuEvents,
    /// The guest TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM lists that this vCPU can actually read, in KVM's order.
/// Some listed MSRs are not readable for a given CPU model; probing once
/// keeps save fast.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VmmError> {
    let list = kvm.get_msr_index_list()?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    let mut readable = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let entries: Vec<kb::kvm_msr_entry> = candidates
            .iter()
            .map(|&index| kb::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = kb::Msrs::from_entries(&entries)
            .map_err(|e| VmmError::State(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs)?;
        readable.extend_from_slice(&candidates[..n]);
        // KVM stops at the first MSR it cannot read: skip it and go on.
        candidates.drain(..(n + 1).min(candidates.len()));
    }
    Ok(readable)
}

impl VcpuState {
    /// Reads the whole state of a vCPU that is not running.
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VmmError> {
        // MP state first: reading it settles pending INIT/SIPI into the state.
        let mp_state = vcpu.get_mp_state()?.mp_state;
        let regs = (&vcpu.get_regs()?).into();
        let sregs = (&vcpu.get_sregs()?).into();
        let fpu = (&vcpu.get_fpu()?).into();
        let xsave = vcpu.get_xsave()?.region.to_vec();
        let x = vcpu.get_xcrs()?;
        let xcrs = x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
            .iter()
            .map(|c| (c.xcr, c.value))
            .collect();
        let d = vcpu.get_debug_regs()?;
        let debug_regs = DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
        };
        let lapic = vcpu.get_lapic()?.regs.iter().map(|&b| b as u8).collect();
        let entries: Vec<kb::kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kb::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = kb::Msrs::from_entries(&entries)
            .map_err(|e| VmmError::State(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut m)?;
        if n != entries.len() {
            return Err(VmmError::State(format!(
                "MSR {:#x} could not be read",
                entries[n].index
            )));
        }
        let msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
        let tsc_khz = vcpu.get_tsc_khz().ok();
        // Events last, after everything that could still raise one.
        let events = (&vcpu.get_vcpu_events()?).into();
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Loads the state into a freshly created vCPU (CPUID already set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        if self.xsave.len() != 1024 || self.lapic.len() != 1024 || self.xcrs.len() > 16 {
            return Err(VmmError::State(format!(
                "vCPU state has an XSAVE area of {} words, a LAPIC page of {} bytes and {} XCRs \
                 (want 1024, 1024, at most 16)",
                self.xsave.len(),
                self.lapic.len(),
                self.xcrs.len()
            )));
        }
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz)
                    .map_err(|e| VmmError::State(format!("TSC frequency {khz} kHz: {e}")))?;
            }
        }
        vcpu.set_mp_state(kb::kvm_mp_state {
            mp_state: self.mp_state,
        })?;
        vcpu.set_sregs(&(&self.sregs).into())?;
        vcpu.set_regs(&(&self.regs).into())?;
        vcpu.set_fpu(&(&self.fpu).into())?;
        let mut xsave = kb::kvm_xsave::default();
        xsave.region.copy_from_slice(&self.xsave);
        vcpu.set_xsave(&xsave)?;
        let mut xcrs = kb::kvm_xcrs {
            nr_xcrs: self.xcrs.len() as u32,
            ..Default::default()
        };
        for (slot, &(xcr, value)) in xcrs.xcrs.iter_mut().zip(&self.xcrs) {
            slot.xcr = xcr;
            slot.value = value;
        }
        vcpu.set_xcrs(&xcrs)?;
        vcpu.set_debug_regs(&kb::kvm_debugregs {
            db: self.debug_regs.db,
            dr6: self.debug_regs.dr6,
            dr7: self.debug_regs.dr7,
            flags: self.debug_regs.flags,
            ..Default::default()
        })?;
        let mut lapic = kb::kvm_lapic_state::default();
        for (d, &s) in lapic.regs.iter_mut().zip(&self.lapic) {
            *d = s as _;
        }
        vcpu.set_lapic(&lapic)?;
        let entries: Vec<kb::kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kb::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = kb::Msrs::from_entries(&entries)
            .map_err(|e| VmmError::State(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&m)?;
        if n != entries.len() {
            return Err(VmmError::State(format!(
                "MSR {:#x} = {:#x} was refused by KVM",
                entries[n].index, entries[n].data
            )));
        }
        vcpu.set_vcpu_events(&(&self.events).into())?;
        Ok(())
    }
}

mirror!(
    /// One 8259 PIC.
    PicState <=> kb::kvm_pic_state {
    last_irr: u8, irr: u8, imr: u8, isr: u8, priority_add: u8, irq_base: u8,
    read_reg_select: u8, poll: u8, special_mask: u8, init_state: u8, auto_eoi: u8,
    rotate_on_auto_eoi: u8, special_fully_nested_mode: u8, init4: u8, elcr: u8, elcr_mask: u8,
});

/// The IOAPIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// MMIO base.
    pub base_address: u64,
    /// Selected register.
    pub ioregsel: u32,
    /// APIC id.
    pub id: u32,
    /// Interrupt request register.
    pub irr: u32,
    /// The 24 redirection-table entries, as the architectural 64-bit values.
    pub redirtbl: Vec<u64>,
}

mirror!(
    /// One 8254 PIT channel.
    PitChannel <=> kb::kvm_pit_channel_state {
    count: u32, latched_count: u16, count_latched: u8, status_latched: u8, status: u8,
    read_state: u8, write_state: u8, write_latch: u8, rw_mode: u8, mode: u8, bcd: u8,
    gate: u8, count_load_time: i64,
});

/// VM-wide state held in KVM: interrupt controllers, PIT, clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: PicState,
    /// Slave 8259.
    pub pic_slave: PicState,
    /// IOAPIC.
    pub ioapic: IoapicState,
    /// The three PIT channels.
    pub pit_channels: Vec<PitChannel>,
    /// PIT flags (speaker, HPET legacy mode).
    pub pit_flags: u32,
    /// The guest's kvmclock in ns.
    pub clock_ns: u64,
}

const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

impl VmState {
    /// Reads the VM-wide state (vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<VmState, VmmError> {
        let chip = |id: u32| -> Result<kb::kvm_irqchip, VmmError> {
            let mut c = kb::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)?;
            Ok(c)
        };
        let (m, s, io) = (chip(PIC_MASTER)?, chip(PIC_SLAVE)?, chip(IOAPIC)?);
        // SAFETY: KVM filled the union member that matches `chip_id`: the
        // PIC state for chips 0 and 1, the IOAPIC state for chip 2.
        let (pic_master, pic_slave, ioa) = unsafe { (m.chip.pic, s.chip.pic, io.chip.ioapic) };
        let redirtbl = ioa
            .redirtbl
            .iter()
            // SAFETY: every bit pattern is a valid u64; `bits` views the whole entry.
            .map(|e| unsafe { e.bits })
            .collect();
        let pit = vm.get_pit2()?;
        Ok(VmState {
            pic_master: (&pic_master).into(),
            pic_slave: (&pic_slave).into(),
            ioapic: IoapicState {
                base_address: ioa.base_address,
                ioregsel: ioa.ioregsel,
                id: ioa.id,
                irr: ioa.irr,
                redirtbl,
            },
            pit_channels: pit.channels.iter().map(Into::into).collect(),
            pit_flags: pit.flags,
            clock_ns: vm.get_clock()?.clock,
        })
    }

    /// Loads it into a fresh VM that has its irqchip and PIT created.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmmError> {
        if self.pit_channels.len() != 3 || self.ioapic.redirtbl.len() != 24 {
            return Err(VmmError::State(format!(
                "VM state has {} PIT channels and {} IOAPIC entries (want 3 and 24)",
                self.pit_channels.len(),
                self.ioapic.redirtbl.len()
            )));
        }
        let mut pit = kb::kvm_pit_state2 {
            flags: self.pit_flags,
            ..Default::default()
        };
        for (d, s) in pit.channels.iter_mut().zip(&self.pit_channels) {
            *d = s.into();
        }
        vm.set_pit2(&pit)?;
        vm.set_clock(&kb::kvm_clock_data {
            clock: self.clock_ns,
            ..Default::default()
        })?;
        for (id, pic) in [(PIC_MASTER, &self.pic_master), (PIC_SLAVE, &self.pic_slave)] {
            let mut c = kb::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            c.chip.pic = pic.into();
            vm.set_irqchip(&c)?;
        }
        let mut io = kb::kvm_ioapic_state {
            base_address: self.ioapic.base_address,
            ioregsel: self.ioapic.ioregsel,
            id: self.ioapic.id,
            irr: self.ioapic.irr,
            ..Default::default()
        };
        for (d, &bits) in io.redirtbl.iter_mut().zip(&self.ioapic.redirtbl) {
            d.bits = bits;
        }
        let mut c = kb::kvm_irqchip {
            chip_id: IOAPIC,
            ..Default::default()
        };
        c.chip.ioapic = io;
        vm.set_irqchip(&c)?;
        Ok(())
    }
}

/// The format version this monitor writes. Readers accept this version only;
/// a later format bumps it and keeps a reader for the older ones.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// The whole machine state: a tree of named sections.
///
/// Section names: `machine` (shape), `vm` (VM-wide chips), `vcpu.N`, and
/// `device.NAME` for each device. A reader ignores sections it does not know
/// (with a warning) and refuses a snapshot that lacks one it needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// Format version of the section tree.
    pub version: u32,
    /// Sections by name.
    pub sections: BTreeMap<String, serde_json::Value>,
}

impl MachineState {
    /// An empty tree at the current version.
    pub fn new() -> Self {
        Self {
            version: STATE_FORMAT_VERSION,
            sections: BTreeMap::new(),
        }
    }

    /// Adds a section.
    pub fn put<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), VmmError> {
        let v = serde_json::to_value(value)
            .map_err(|e| VmmError::State(format!("encoding section {name}: {e}")))?;
        self.sections.insert(name.to_string(), v);
        Ok(())
    }

    /// Reads a section the caller cannot do without.
    pub fn get<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, VmmError> {
        let v = self
            .sections
            .get(name)
            .ok_or_else(|| VmmError::State(format!("the snapshot has no section {name}")))?;
        T::deserialize(v).map_err(|e| VmmError::State(format!("section {name}: {e}")))
    }

    /// Reads a section that older snapshots may lack.
    pub fn get_optional<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
    ) -> Result<Option<T>, VmmError> {
        match self.sections.get(name) {
            None => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| VmmError::State(format!("section {name}: {e}"))),
        }
    }
}

impl Default for MachineState {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_round_trip() {
        let k = kb::kvm_regs {
            rax: 1,
            r15: 2,
            rip: 3,
            rflags: 0x202,
            ..Default::default()
        };
        let p = Regs::from(&k);
        assert_eq!(kb::kvm_regs::from(&p), k);
        let mut e = kb::kvm_vcpu_events::default();
        e.exception.nr = 14;
        e.nmi.masked = 1;
        e.sipi_vector = 7;
        let p = VcpuEvents::from(&e);
        assert_eq!(kb::kvm_vcpu_events::from(&p), e);
    }

    #[test]
    fn sections_are_named_and_checked() {
        let mut s = MachineState::new();
        s.put("vm.x", &Regs::default()).unwrap();
        assert!(s.get::<Regs>("vm.x").is_ok());
        let err = s.get::<Regs>("vcpu.0").unwrap_err().to_string();
        assert!(err.contains("no section vcpu.0"), "{err}");
        assert!(s.get::<Sregs>("vm.x").is_err());
        assert_eq!(s.get_optional::<Regs>("device.new").unwrap(), None);
    }
}
