//! tern's KVM microVM monitor, built on the rust-vmm crates.
//!
//! This first part boots tern's freestanding test guest: guest RAM as a
//! vm-memory region registered with KVM, the guest ELF loaded by linux-loader,
//! the vCPU put straight into 64-bit long mode (GDT, identity-mapped page
//! tables, control registers), and a run loop that serves the guest's port I/O
//! devices: a serial console (text) and the tern agent (counter and
//! working-set checksum reports). KVM's dirty-page log is enabled per slot so
//! the migration engine can ask which pages changed.
//!
//! Still to come (issue: tern-vmm): Linux bzImage boot, vm-superio 16550,
//! i8042 reset, several vCPUs on their own threads, full state save/restore
//! and snapshots.

mod x86;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::path::Path;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// The test guest ELF built by this crate's build step.
pub const TEST_GUEST_ELF: &str = env!("TERN_TEST_GUEST_ELF");

/// Serial console data port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Agent ports: counter lo, counter hi (commits), checksum lo, checksum hi (commits).
pub const AGENT_PORTS: [u16; 4] = [0x510, 0x511, 0x512, 0x513];
/// Where the guest reads its parameters.
pub const PARAMS_ADDR: u64 = 0x6000;
/// Where the working set starts (guest physical).
pub const WORKING_SET_ADDR: u64 = 16 << 20;

/// Why the monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` could not be opened or an ioctl failed.
    #[error("KVM: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest image could not be loaded.
    #[error("loading {path}: {reason}")]
    Load {
        /// The image.
        path: String,
        /// Why.
        reason: String,
    },
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What the test guest does.
#[derive(Clone, Debug)]
pub struct TestGuestConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Working-set size in 4 KiB pages.
    pub ws_pages: u64,
    /// Pages dirtied between counter reports.
    pub pages_per_tick: u64,
    /// Counter reports between checksum reports (0: never).
    pub ticks_per_sum: u64,
}

impl Default for TestGuestConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            ws_pages: 64,
            pages_per_tick: 4,
            ticks_per_sum: 16,
        }
    }
}

/// The latest reports of the guest agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// Last committed counter.
    pub counter: u64,
    /// Last committed working-set checksum, with the counter it was taken at.
    pub checksum: Option<(u64, u64)>,
    /// Counter reports received.
    pub reports: u64,
    lo: u32,
    sum_lo: u32,
}

/// Why a run loop returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The caller's condition held.
    Stopped,
    /// The deadline passed.
    TimedOut,
    /// The guest halted or shut down.
    GuestExited(String),
}

/// One VM with one vCPU, run on the caller's thread.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    /// Everything the guest wrote to its serial port.
    pub serial: Vec<u8>,
    /// What the guest agent reported.
    pub agent: AgentReport,
    dirty_logging: bool,
}

impl Vm {
    /// Creates the VM, loads the test guest and prepares the vCPU to enter it.
    pub fn boot_test_guest(cfg: &TestGuestConfig, elf: &Path) -> Result<Vm, VmmError> {
        let mem_bytes = cfg.memory_mib << 20;
        let ws_end = WORKING_SET_ADDR + cfg.ws_pages * 4096;
        if cfg.memory_mib < 32 || ws_end > mem_bytes || mem_bytes > (1 << 30) {
            return Err(VmmError::Config(format!(
                "memory must be 32..=1024 MiB and hold the working set (ends at {ws_end:#x})"
            )));
        }
        if cfg.ws_pages == 0 || cfg.pages_per_tick == 0 {
            return Err(VmmError::Config(
                "working set and pages per tick must be non-zero".into(),
            ));
        }
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        vm.set_tss_address(0xfffb_d000)?;
        vm.create_irq_chip()?;
        vm.create_pit2(kvm_pit_config {
            flags: 0,
            ..Default::default()
        })?;

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_bytes as usize)])
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let this_vm = Vm {
            vcpu: vm.create_vcpu(0)?,
            _kvm: kvm,
            vm,
            mem,
            serial: Vec::new(),
            agent: AgentReport::default(),
            dirty_logging: false,
        };
        this_vm.register_memory(0)?;
        let cpuid = this_vm._kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        this_vm.vcpu.set_cpuid2(&cpuid)?;

        let entry = x86::load_elf(&this_vm.mem, elf)?;
        let params: [u64; 5] = [
            0x7465_726e_6775_6573,
            WORKING_SET_ADDR,
            cfg.ws_pages,
            cfg.pages_per_tick,
            cfg.ticks_per_sum,
        ];
        for (i, v) in params.iter().enumerate() {
            this_vm
                .mem
                .write_obj(*v, GuestAddress(PARAMS_ADDR + 8 * i as u64))
                .map_err(|e| VmmError::Memory(e.to_string()))?;
        }
        x86::setup_long_mode(&this_vm.mem, &this_vm.vcpu, entry, 0x8_0000)?;
        Ok(this_vm)
    }

    fn register_memory(&self, flags: u32) -> Result<(), VmmError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags,
            };
            // SAFETY: the region is a live mapping owned by `self.mem`, which
            // outlives the VM fd (both are fields of `self`, and the mapping is
            // only dropped with `self`), and slots do not overlap.
            unsafe { self.vm.set_user_memory_region(r)? };
        }
        Ok(())
    }

    /// Starts KVM's dirty-page log on every memory slot.
    pub fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        self.register_memory(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.dirty_logging = true;
        Ok(())
    }

    /// Pages written since the last call (or since logging started), as a
    /// bitmap of 64-page words per slot, and their count. Reading clears it.
    pub fn sync_dirty_log(&mut self) -> Result<(Vec<u64>, u64), VmmError> {
        if !self.dirty_logging {
            return Err(VmmError::Config("dirty logging is not started".into()));
        }
        let mut all = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            all.extend(self.vm.get_dirty_log(slot as u32, region.len() as usize)?);
        }
        let n = all.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok((all, n))
    }

    /// Reads guest memory (for checksums and tests).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    /// Runs the vCPU until `stop` holds, the deadline passes, or the guest exits.
    pub fn run_until(
        &mut self,
        timeout: Duration,
        mut stop: impl FnMut(&Vm) -> bool,
    ) -> Result<RunOutcome, VmmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if stop(self) {
                return Ok(RunOutcome::Stopped);
            }
            if Instant::now() > deadline {
                return Ok(RunOutcome::TimedOut);
            }
            // Copy what an exit carries, so the vCPU borrow ends before devices run.
            let mut out: Option<(u16, [u8; 8], usize)> = None;
            match self.vcpu.run()? {
                VcpuExit::IoOut(port, data) => {
                    let mut b = [0u8; 8];
                    let n = data.len().min(8);
                    b[..n].copy_from_slice(&data[..n]);
                    out = Some((port, b, n));
                }
                VcpuExit::IoIn(port, data) => {
                    // Serial line status: transmitter empty; everything else reads as zero.
                    let v = if port == SERIAL_PORT + 5 { 0x60 } else { 0 };
                    data.iter_mut().for_each(|b| *b = v);
                }
                VcpuExit::Hlt => return Ok(RunOutcome::GuestExited("halted".into())),
                VcpuExit::Shutdown => {
                    return Ok(RunOutcome::GuestExited(
                        "shutdown (triple fault or reset)".into(),
                    ))
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Ok(RunOutcome::GuestExited(format!(
                        "entry failed: reason {reason:#x} on cpu {cpu}"
                    )))
                }
                VcpuExit::InternalError => {
                    return Ok(RunOutcome::GuestExited("KVM internal error".into()))
                }
                other => {
                    tracing::debug!(exit = ?other, "unhandled vCPU exit");
                }
            }
            if let Some((port, b, n)) = out {
                self.io_out(port, &b[..n]);
            }
        }
    }

    fn io_out(&mut self, port: u16, data: &[u8]) {
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            SERIAL_PORT => self.serial.extend_from_slice(data),
            p if p == AGENT_PORTS[0] => self.agent.lo = word(),
            p if p == AGENT_PORTS[1] => {
                self.agent.counter = u64::from(word()) << 32 | u64::from(self.agent.lo);
                self.agent.reports += 1;
            }
            p if p == AGENT_PORTS[2] => self.agent.sum_lo = word(),
            p if p == AGENT_PORTS[3] => {
                let sum = u64::from(word()) << 32 | u64::from(self.agent.sum_lo);
                self.agent.checksum = Some((self.agent.counter, sum));
            }
            _ => tracing::trace!(port, "write to an unclaimed port"),
        }
    }

    /// The serial console as text.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}
