//! A running machine: KVM VM, guest RAM, vCPUs on their own threads,
//! devices, and the pause/resume protocol the snapshot and migration code
//! relies on.
//!
//! Pausing is a handshake: the controller sets the wanted state to paused
//! and kicks every vCPU thread out of `KVM_RUN` with a real-time signal,
//! re-kicking every millisecond until each thread has parked (a kick can land
//! just before a thread enters `KVM_RUN`). Parked threads hold no vCPU lock,
//! so the controller can then read or write any vCPU's state.

use crate::devices::{ConsoleSink, Devices, SerialSection, SERIAL_IRQ};
use crate::memory::{self, Backing, DirtyBitmap, GuestMem, PAGE_SIZE};
use crate::state::{readable_msrs, MachineState, VcpuState, VmState};
use crate::{x86, VmmError};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// The shape of a machine: what must match between a snapshot and the VM it
/// is restored into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

/// How a machine is built, apart from what runs in it.
pub struct MachineConfig {
    /// Guest RAM in MiB (a multiple of 2, at most 3072).
    pub memory_mib: u64,
    /// vCPUs (1..=32).
    pub vcpus: u8,
    /// Back guest RAM with huge pages.
    pub hugepages: bool,
    /// Also append console output to this file.
    pub console_log: Option<PathBuf>,
    /// Also copy console output here as it arrives (e.g. a terminal).
    pub console_tee: Option<Box<dyn std::io::Write + Send>>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            vcpus: 1,
            hugepages: false,
            console_log: None,
            console_tee: None,
        }
    }
}

impl MachineConfig {
    fn validate(&self) -> Result<(), VmmError> {
        if !(2..=3072).contains(&self.memory_mib) || !self.memory_mib.is_multiple_of(2) {
            return Err(VmmError::Config(format!(
                "memory must be an even number of MiB from 2 to 3072, not {}",
                self.memory_mib
            )));
        }
        if !(1..=32).contains(&self.vcpus) {
            return Err(VmmError::Config(format!(
                "vcpus must be 1..=32, not {}",
                self.vcpus
            )));
        }
        Ok(())
    }
}

/// Where the machine is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum RunState {
    /// vCPUs run (or wait for an interrupt in KVM).
    Running,
    /// Every vCPU is parked outside KVM; state may be read and written.
    Paused,
    /// The guest ended (reset, power-off, fault) or the machine was stopped.
    Exited(String),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Run,
    Pause,
    Exit,
}

#[derive(Clone, Copy, Default)]
struct VcpuSlot {
    /// Parked (paused or exiting) outside KVM_RUN.
    parked: bool,
    /// Returned from its thread function (its pthread may be joined).
    done: bool,
    thread: Option<libc::pthread_t>,
}

struct RunControl {
    want: Want,
    /// The controller paused the machine (pause/resume); the throttle never
    /// overrides that.
    held: bool,
    /// Auto-converge: percent of each throttle period the vCPUs are parked.
    throttle: u8,
    throttler_running: bool,
    exit_reason: Option<String>,
    slots: Vec<VcpuSlot>,
}

struct Shared {
    run: Mutex<RunControl>,
    run_cv: Condvar,
    devices: Mutex<Devices>,
    dev_cv: Condvar,
    exited: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking vCPU thread must not take the controller down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Ends the machine (first reason wins) and kicks every vCPU out of KVM.
    fn request_exit(&self, reason: String) {
        let mut rc = lock(&self.run);
        if rc.exit_reason.is_none() {
            tracing::info!(%reason, "machine exiting");
            rc.exit_reason = Some(reason);
        }
        rc.want = Want::Exit;
        self.exited.store(true, Ordering::SeqCst);
        kick_unparked(&rc);
        drop(rc);
        self.run_cv.notify_all();
        let _d = lock(&self.devices);
        self.dev_cv.notify_all();
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Sends the kick signal to every vCPU thread still inside (or about to
/// enter) KVM_RUN. Called with the run lock held, so no thread can finish
/// and be joined while it is being signalled.
fn kick_unparked(rc: &RunControl) {
    for s in rc.slots.iter().filter(|s| !s.parked && !s.done) {
        if let Some(t) = s.thread {
            // SAFETY: `t` is the pthread of a vCPU thread that has not
            // returned (`done` is set under this same lock before it
            // returns), so it has not been joined and the handle is valid.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VmmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Config(format!("cannot install the vCPU kick handler: {e}")));
    });
    result
}

/// What a wait ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The condition held.
    Satisfied,
    /// The deadline passed first.
    TimedOut,
    /// The machine exited first.
    Exited(String),
}

/// Waits on a machine's devices and exit (see [`Machine::watch`]).
#[derive(Clone)]
pub struct Watch(Arc<Shared>);

impl Watch {
    /// Waits until `pred` holds for the devices, the machine exits, or the
    /// timeout passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Devices) -> bool,
    ) -> WaitOutcome {
        let shared = &self.0;
        let deadline = Instant::now() + timeout;
        let mut d = lock(&shared.devices);
        loop {
            if pred(&d) {
                return WaitOutcome::Satisfied;
            }
            if shared.exited.load(Ordering::SeqCst) {
                drop(d);
                let reason = lock(&shared.run).exit_reason.clone();
                return WaitOutcome::Exited(reason.unwrap_or_else(|| "stopped".into()));
            }
            let now = Instant::now();
            if now >= deadline {
                return WaitOutcome::TimedOut;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            d = shared
                .dev_cv
                .wait_timeout(d, step)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The exit reason, once the machine has exited.
    pub fn exit_reason(&self) -> Option<String> {
        if self.0.exited.load(Ordering::SeqCst) {
            Some(
                lock(&self.0.run)
                    .exit_reason
                    .clone()
                    .unwrap_or_else(|| "stopped".into()),
            )
        } else {
            None
        }
    }
}

/// One microVM.
pub struct Machine {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMem,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    msr_indices: Vec<u32>,
    serial_irq: EventFd,
    dirty_logging: bool,
    /// The last snapshot taken, which an incremental snapshot builds on.
    pub(crate) snapshot_parent: Option<String>,
    /// RAM is a private mapping of a snapshot's file: an untouched page
    /// holds the file's bytes, so the page map cannot say which are zero.
    pub(crate) ram_from_file: bool,
    created: Instant,
}

impl Machine {
    /// Builds the VM (TSS, irqchip, PIT, RAM slots, vCPUs with CPUID, the
    /// serial interrupt) around `mem`, with no vCPU thread yet.
    pub(crate) fn create(cfg: MachineConfig, mem: GuestMem) -> Result<Machine, VmmError> {
        cfg.validate()?;
        install_kick_handler()?;
        let created = Instant::now();
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        vm.set_tss_address(x86::TSS_ADDR as usize)?;
        vm.set_identity_map_address(x86::IDENTITY_MAP_ADDR)?;
        vm.create_irq_chip()?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::Io)?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for id in 0..cfg.vcpus {
            let fd = vm.create_vcpu(u64::from(id))?;
            fd.set_cpuid2(&x86::cpuid_for(&supported, id, cfg.vcpus))?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let msr_indices = readable_msrs(&kvm, &lock(&vcpus[0]))?;

        let log = match &cfg.console_log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| VmmError::Config(format!("console log {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let devices = Devices::new(
            serial_irq.try_clone().map_err(VmmError::Io)?,
            ConsoleSink::new(log, cfg.console_tee),
        );
        let shared = Arc::new(Shared {
            run: Mutex::new(RunControl {
                want: Want::Pause,
                held: true,
                throttle: 0,
                throttler_running: false,
                exit_reason: None,
                slots: vec![VcpuSlot::default(); cfg.vcpus as usize],
            }),
            run_cv: Condvar::new(),
            devices: Mutex::new(devices),
            dev_cv: Condvar::new(),
            exited: AtomicBool::new(false),
        });
        let machine = Machine {
            kvm,
            vm,
            mem,
            vcpus,
            threads: Vec::new(),
            shared,
            msr_indices,
            serial_irq,
            dirty_logging: false,
            snapshot_parent: None,
            ram_from_file: false,
            created,
        };
        machine.register_memory(0)?;
        Ok(machine)
    }

    /// Fresh anonymous guest RAM for `cfg`.
    pub(crate) fn fresh_memory(cfg: &MachineConfig) -> Result<GuestMem, VmmError> {
        cfg.validate()?;
        memory::create(
            cfg.memory_mib << 20,
            Backing::Anonymous {
                hugepages: cfg.hugepages,
            },
        )
    }

    fn register_memory(&self, flags: u32) -> Result<(), VmmError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the region is a live mapping owned by `self.mem`, which
            // is dropped only after every vCPU thread is joined (see Drop),
            // and slots do not overlap.
            unsafe { self.vm.set_user_memory_region(r)? };
        }
        Ok(())
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The machine's shape.
    pub fn shape(&self) -> MachineShape {
        MachineShape {
            memory_bytes: memory::total_bytes(&self.mem),
            vcpus: self.vcpus.len() as u8,
        }
    }

    /// The boot vCPU, for loaders that set its registers before start.
    pub(crate) fn vcpu(&self, i: usize) -> MutexGuard<'_, VcpuFd> {
        lock(&self.vcpus[i])
    }

    /// Time since the machine was created.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Spawns the vCPU threads, paused; call [`Machine::resume`] to run.
    pub(crate) fn spawn_vcpus(&mut self) -> Result<(), VmmError> {
        for (i, fd) in self.vcpus.iter().enumerate() {
            let (fd, shared) = (fd.clone(), self.shared.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_loop(i, fd, shared))
                .map_err(VmmError::Io)?;
            lock(&self.shared.run).slots[i].thread = Some(t.as_pthread_t());
            self.threads.push(t);
        }
        // Wait until every thread has parked, so pause/resume start from a known state.
        let mut rc = lock(&self.shared.run);
        while rc.slots.iter().any(|s| !s.parked) {
            rc = self
                .shared
                .run_cv
                .wait(rc)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Where the machine is.
    pub fn run_state(&self) -> RunState {
        let rc = lock(&self.shared.run);
        match (rc.want, &rc.exit_reason) {
            (_, Some(r)) => RunState::Exited(r.clone()),
            (Want::Exit, None) => RunState::Exited("stopped".into()),
            (Want::Pause, _) if rc.slots.iter().all(|s| s.parked) => RunState::Paused,
            _ => RunState::Running,
        }
    }

    /// Parks every vCPU outside KVM. Returns how long the handshake took.
    pub fn pause(&self) -> Result<Duration, VmmError> {
        let t0 = Instant::now();
        let mut rc = lock(&self.shared.run);
        if let Some(r) = &rc.exit_reason {
            return Err(VmmError::NotRunning(r.clone()));
        }
        rc.want = Want::Pause;
        rc.held = true;
        while rc.slots.iter().any(|s| !s.parked) {
            kick_unparked(&rc);
            rc = self
                .shared
                .run_cv
                .wait_timeout(rc, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if let Some(r) = &rc.exit_reason {
                return Err(VmmError::NotRunning(r.clone()));
            }
        }
        Ok(t0.elapsed())
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) -> Result<(), VmmError> {
        let mut rc = lock(&self.shared.run);
        if let Some(r) = &rc.exit_reason {
            return Err(VmmError::NotRunning(r.clone()));
        }
        rc.want = Want::Run;
        rc.held = false;
        drop(rc);
        self.shared.run_cv.notify_all();
        Ok(())
    }

    /// Auto-converge: parks the vCPUs for `percent` % of every 20 ms (0
    /// ends throttling), so a guest that dirties memory faster than a
    /// migration can send it slows down. A `pause` still wins: while the
    /// machine is paused the throttle leaves it alone.
    pub fn set_throttle(&self, percent: u8) {
        let mut rc = lock(&self.shared.run);
        rc.throttle = percent.min(95);
        if rc.throttle == 0 || rc.throttler_running {
            return;
        }
        rc.throttler_running = true;
        drop(rc);
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                const PERIOD: Duration = Duration::from_millis(20);
                loop {
                    let parked_for = {
                        let mut rc = lock(&shared.run);
                        if rc.throttle == 0 || rc.exit_reason.is_some() {
                            rc.throttler_running = false;
                            return;
                        }
                        if !rc.held {
                            rc.want = Want::Pause;
                            kick_unparked(&rc);
                        }
                        PERIOD * u32::from(rc.throttle) / 100
                    };
                    std::thread::sleep(parked_for);
                    let run_for = {
                        let mut rc = lock(&shared.run);
                        if !rc.held && rc.exit_reason.is_none() {
                            rc.want = Want::Run;
                        }
                        PERIOD - PERIOD * u32::from(rc.throttle) / 100
                    };
                    shared.run_cv.notify_all();
                    std::thread::sleep(run_for);
                }
            });
        if spawned.is_err() {
            lock(&self.shared.run).throttler_running = false;
            tracing::warn!("could not start the vCPU throttle thread");
        }
    }

    fn require_paused(&self) -> Result<(), VmmError> {
        match self.run_state() {
            RunState::Paused => Ok(()),
            RunState::Running => Err(VmmError::Config("pause the machine first".into())),
            RunState::Exited(r) => Err(VmmError::NotRunning(r)),
        }
    }

    /// Ends the machine: vCPU threads stop and are joined.
    pub fn stop(&mut self, reason: &str) {
        self.shared.request_exit(reason.to_string());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Waits until `pred` holds for the devices, the machine exits, or the
    /// timeout passes. `pred` sees every agent report and console write.
    pub fn wait_until(&self, timeout: Duration, pred: impl FnMut(&Devices) -> bool) -> WaitOutcome {
        self.watch().wait_until(timeout, pred)
    }

    /// A handle that waits on the machine's devices and exit without
    /// holding the machine (so a control thread can use it meanwhile).
    pub fn watch(&self) -> Watch {
        Watch(self.shared.clone())
    }

    /// Runs `f` on the devices (agent report, console).
    pub fn with_devices<T>(&self, f: impl FnOnce(&Devices) -> T) -> T {
        f(&lock(&self.shared.devices))
    }

    /// The whole machine state (vCPUs, VM-wide chips, devices). Paused only.
    pub fn save_state(&self) -> Result<MachineState, VmmError> {
        self.require_paused()?;
        let mut st = MachineState::new();
        st.put("machine", &self.shape())?;
        for (i, v) in self.vcpus.iter().enumerate() {
            st.put(
                &format!("vcpu.{i}"),
                &VcpuState::save(&lock(v), &self.msr_indices)?,
            )?;
        }
        st.put("vm", &VmState::save(&self.vm)?)?;
        let d = lock(&self.shared.devices);
        st.put("device.serial", &d.serial_state())?;
        st.put("device.agent", &d.agent)?;
        Ok(st)
    }

    /// Guest RAM as one mutable slice, for a machine whose vCPU threads do
    /// not exist yet (an incoming migration fills RAM before it starts).
    pub fn ram_mut(&mut self) -> Result<&mut [u8], VmmError> {
        if !self.threads.is_empty() {
            return Err(VmmError::Config(
                "guest RAM is writable in bulk only before the vCPUs start".into(),
            ));
        }
        match memory::host_regions(&self.mem).as_slice() {
            [(0, ptr, len)] => {
                // SAFETY: the mapping of `len` bytes at `ptr` is owned by
                // `self.mem` and lives as long as `self`; no vCPU thread exists
                // (checked above) and `&mut self` excludes every other access
                // for the lifetime of the returned slice.
                Ok(unsafe { std::slice::from_raw_parts_mut(*ptr, *len) })
            }
            _ => Err(VmmError::Memory("expected one RAM region at 0".into())),
        }
    }

    /// Post-copy: drops the `stale` pages of guest RAM and routes the guest's
    /// accesses to missing pages through userfaultfd, before the vCPUs start.
    /// Pages never filled in this machine are missing too (fresh RAM).
    pub fn postcopy_ram(
        &mut self,
        stale: &[(u64, u64)],
    ) -> Result<crate::uffd::MissingPages, VmmError> {
        let ram = self.ram_mut()?;
        let (base, len) = (ram.as_mut_ptr() as usize, ram.len());
        crate::uffd::MissingPages::register(base, len, stale)
    }

    /// Whether the vCPU threads exist (parked or running).
    pub fn vcpus_started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Creates the vCPU threads (paused) of a machine built by
    /// [`crate::incoming`] once its RAM and state are in place.
    pub fn start_vcpus(&mut self) -> Result<(), VmmError> {
        if !self.threads.is_empty() {
            return Err(VmmError::Config("the vCPUs already run".into()));
        }
        self.spawn_vcpus()
    }

    /// Loads a saved state into this (fresh, paused) machine.
    pub fn load_state(&self, st: &MachineState) -> Result<(), VmmError> {
        let shape: MachineShape = st.get("machine")?;
        if shape != self.shape() {
            return Err(VmmError::State(format!(
                "the snapshot is of a machine with {} bytes and {} vCPUs, this one has {} and {}",
                shape.memory_bytes,
                shape.vcpus,
                self.shape().memory_bytes,
                self.shape().vcpus
            )));
        }
        let known = |n: &str| {
            matches!(n, "machine" | "vm" | "device.serial" | "device.agent")
                || n.strip_prefix("vcpu.")
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i < self.vcpus.len())
        };
        for name in st.sections.keys().filter(|n| !known(n)) {
            tracing::warn!(section = %name, "ignoring a snapshot section this monitor does not know");
        }
        // Decode everything before touching KVM, so a bad section changes nothing.
        let vcpu_states: Vec<VcpuState> = (0..self.vcpus.len())
            .map(|i| st.get(&format!("vcpu.{i}")))
            .collect::<Result<_, _>>()?;
        let vm_state: VmState = st.get("vm")?;
        let serial: SerialSection = st.get("device.serial")?;
        let agent = st.get_optional("device.agent")?.unwrap_or_default();

        vm_state.restore(&self.vm)?;
        for (v, s) in self.vcpus.iter().zip(&vcpu_states) {
            s.restore(&lock(v))?;
        }
        let mut d = lock(&self.shared.devices);
        d.restore_serial(&serial, self.serial_irq.try_clone().map_err(VmmError::Io)?)?;
        d.agent = agent;
        Ok(())
    }

    /// Starts KVM's dirty log on every slot (and clears the monitor's own
    /// write bitmap), so later syncs report pages written from now on.
    pub fn start_dirty_log(&mut self) -> Result<(), VmmError> {
        self.register_memory(KVM_MEM_LOG_DIRTY_PAGES)?;
        let _ = memory::take_monitor_writes(&self.mem);
        self.dirty_logging = true;
        Ok(())
    }

    /// Stops the dirty log.
    pub fn stop_dirty_log(&mut self) -> Result<(), VmmError> {
        self.register_memory(0)?;
        self.dirty_logging = false;
        Ok(())
    }

    /// Whether the dirty log runs.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Pages written since the last sync (by the guest, per KVM's log, and by
    /// the monitor, per vm-memory's bitmap). Reading clears both.
    pub fn sync_dirty_log(&self) -> Result<DirtyBitmap, VmmError> {
        if !self.dirty_logging {
            return Err(VmmError::Config("the dirty log is not started".into()));
        }
        let mut out = memory::take_monitor_writes(&self.mem);
        for (slot, region) in self.mem.iter().enumerate() {
            let first = region.start_addr().0 / PAGE_SIZE;
            let words = self.vm.get_dirty_log(slot as u32, region.len() as usize)?;
            for (i, &w) in words.iter().enumerate().filter(|(_, w)| **w != 0) {
                out.insert_word(first + i as u64 * 64, w);
            }
        }
        Ok(out)
    }

    /// The pages of RAM ever written ([`memory::populated`]); `None` when
    /// RAM maps a snapshot's file (then every page may hold data) or the
    /// page map cannot be read.
    pub fn populated_pages(&self) -> Option<DirtyBitmap> {
        if self.ram_from_file {
            return None;
        }
        memory::populated(&self.mem)
    }

    /// Reads guest memory (checksums and tests).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        use vm_memory::Bytes;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(e.to_string()))
    }

    /// The KVM system handle (for capability checks).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop("machine dropped");
        }
    }
}

/// What every vCPU thread runs first (a jailed monitor installs its vCPU
/// seccomp filter there); set once per process, before the first machine.
static VCPU_THREAD_HOOK: std::sync::OnceLock<fn() -> Result<(), String>> =
    std::sync::OnceLock::new();

/// Sets the hook every vCPU thread runs before its first `KVM_RUN`. A
/// hook that fails stops that machine (it must not run unconfined).
pub fn set_vcpu_thread_hook(hook: fn() -> Result<(), String>) {
    let _ = VCPU_THREAD_HOOK.set(hook);
}

fn vcpu_loop(idx: usize, fd: Arc<Mutex<VcpuFd>>, shared: Arc<Shared>) {
    if let Some(hook) = VCPU_THREAD_HOOK.get() {
        if let Err(e) = hook() {
            let mut rc = lock(&shared.run);
            rc.exit_reason = Some(format!("vcpu{idx} thread hook: {e}"));
            rc.want = Want::Exit;
            rc.slots[idx].parked = true;
            rc.slots[idx].done = true;
            shared.run_cv.notify_all();
            return;
        }
    }
    loop {
        {
            let mut rc = lock(&shared.run);
            loop {
                match rc.want {
                    Want::Run => {
                        if rc.slots[idx].parked {
                            rc.slots[idx].parked = false;
                        }
                        break;
                    }
                    Want::Pause => {
                        if !rc.slots[idx].parked {
                            rc.slots[idx].parked = true;
                            shared.run_cv.notify_all();
                        }
                        rc = shared.run_cv.wait(rc).unwrap_or_else(|p| p.into_inner());
                    }
                    Want::Exit => {
                        rc.slots[idx].parked = true;
                        rc.slots[idx].done = true;
                        shared.run_cv.notify_all();
                        return;
                    }
                }
            }
        }
        let mut vcpu = lock(&fd);
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                drop(vcpu);
                shared.request_exit(format!("vCPU {idx}: KVM_RUN failed: {e}"));
                continue;
            }
        };
        let mut end: Option<String> = None;
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut d = lock(&shared.devices);
                if d.pio_write(port, data) {
                    shared.dev_cv.notify_all();
                }
                if d.reset_requested() {
                    end = Some("the guest reset the machine (i8042)".into());
                }
            }
            VcpuExit::IoIn(port, data) => lock(&shared.devices).pio_read(port, data),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            VcpuExit::Hlt => end = Some("the guest halted".into()),
            VcpuExit::Shutdown => end = Some("the guest shut down (triple fault or reset)".into()),
            VcpuExit::SystemEvent(kind, _) => {
                end = Some(format!(
                    "the guest asked for system event {kind} (power-off or reset)"
                ))
            }
            VcpuExit::FailEntry(reason, cpu) => {
                end = Some(format!(
                    "vCPU entry failed: reason {reason:#x} on cpu {cpu}"
                ))
            }
            VcpuExit::InternalError => end = Some("KVM internal error".into()),
            other => tracing::debug!(vcpu = idx, exit = ?other, "unhandled vCPU exit"),
        }
        drop(vcpu);
        if let Some(reason) = end {
            shared.request_exit(reason);
        }
    }
}
