//! tern's KVM microVM monitor, built on the rust-vmm crates.
//!
//! A [`Machine`] is one microVM: guest RAM as a vm-memory region registered
//! with KVM (optionally on huge pages), an in-kernel irqchip and PIT, vCPUs
//! on their own threads with a pause/resume handshake, and port-I/O devices
//! (a vm-superio 16550 console, an i8042 whose reset line ends the VM, and
//! the tern guest agent). Guests are tern's freestanding test guest (an ELF
//! entered in 64-bit mode) or a Linux bzImage with an initramfs.
//!
//! For migration and snapshots the machine offers KVM's dirty log merged
//! with the monitor's own writes ([`Machine::sync_dirty_log`]), a complete
//! state tree ([`state`]), and snapshot files, full or incremental, that a
//! new process restores ([`snapshot`]). [`control`] is the per-VM control
//! socket the `kvm` driver talks to, and [`monitor`] the process that hosts
//! one machine.

pub mod control;
pub mod devices;
pub mod halves;
pub mod machine;
pub mod memory;
pub mod monitor;
pub mod process;
pub mod procmem;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod x86;

pub use devices::{AgentReport, Devices};
pub use machine::{
    set_vcpu_thread_hook, Machine, MachineConfig, MachineShape, RunState, WaitOutcome,
};
pub use memory::DirtyBitmap;
pub use snapshot::{RestoreOptions, SnapshotInfo, SnapshotKind};

use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// The test guest ELF built by this crate's build step.
pub const TEST_GUEST_ELF: &str = env!("TERN_TEST_GUEST_ELF");
/// The same image, built into this binary: a monitor boots it without
/// reading the build directory (which a jailed monitor cannot see, and an
/// installed one does not have).
pub const TEST_GUEST_IMAGE: &[u8] = include_bytes!(env!("TERN_TEST_GUEST_ELF"));
/// Where the test guest reads its parameters.
pub const PARAMS_ADDR: u64 = 0x6000;
/// Where the test guest's working set starts (guest physical).
pub const WORKING_SET_ADDR: u64 = 16 << 20;
/// The line the test guest prints when it is ready.
pub const TEST_GUEST_READY: &str = "tern-guest: ready";
const TEST_GUEST_STACK: u64 = 0x8_0000;

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
    /// Saved state could not be read or applied.
    #[error("machine state: {0}")]
    State(String),
    /// A snapshot file is missing, malformed or corrupted.
    #[error("snapshot refused: {0}")]
    Snapshot(String),
    /// The machine has exited.
    #[error("the machine is not running: {0}")]
    NotRunning(String),
    /// An operating-system call failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the test guest does.
#[derive(Clone, Debug)]
pub struct TestGuestConfig {
    /// Working-set size in 4 KiB pages.
    pub ws_pages: u64,
    /// Pages dirtied between counter reports.
    pub pages_per_tick: u64,
    /// Counter reports between checksum reports (0: never).
    pub ticks_per_sum: u64,
    /// Ask for a reset through the i8042 after this many reports (0: never).
    pub exit_after: u64,
}

impl Default for TestGuestConfig {
    fn default() -> Self {
        Self {
            ws_pages: 64,
            pages_per_tick: 4,
            ticks_per_sum: 16,
            exit_after: 0,
        }
    }
}

impl TestGuestConfig {
    /// The checksum the test guest reports at `counter`, computed from its
    /// deterministic writes (page `p` last written at tick `c` holds
    /// `c ^ p << 32` in its first word and `!c` in its last). A guest whose
    /// report matches proves every working-set page holds what it last wrote,
    /// across snapshots, restores and migrations.
    pub fn expected_checksum(&self, counter: u64) -> u64 {
        let n = self.ws_pages.max(1);
        let mut last = vec![0u64; n as usize];
        let mut next = 0u64;
        // Only the last `n` page writes matter.
        let writes = counter.saturating_mul(self.pages_per_tick);
        let skip = writes.saturating_sub(n);
        next = (next + skip) % n;
        for w in skip..writes {
            last[next as usize] = w / self.pages_per_tick + 1;
            next = (next + 1) % n;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (p, &c) in last.iter().enumerate() {
            let (first, last_word) = if c == 0 {
                (0, 0)
            } else {
                (c ^ ((p as u64) << 32), !c)
            };
            h ^= first;
            h = h.wrapping_mul(0x100_0000_01b3);
            h ^= last_word;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }
}

/// Closes every descriptor above stderr this process inherited. A monitor
/// (or a guest's process) calls it first thing, so nothing its starter had
/// open (a socket, a key file) follows it into its jail.
pub fn close_inherited_fds() -> std::io::Result<()> {
    // SAFETY: called before this process opened any descriptor of its own,
    // so no descriptor that Rust code owns is closed under it; close_range
    // takes plain integers and touches nothing else.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this host's KVM runs guest kernel code in hardware (VMX/SVM).
/// On PVM hosts it does not, and a Linux guest cannot boot in useful time.
pub fn has_hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Builds a machine, loads the test guest into it and points the boot vCPU
/// at its entry in 64-bit mode. The machine is paused; resume it to run.
pub fn boot_test_guest(
    cfg: MachineConfig,
    guest: &TestGuestConfig,
    elf: &Path,
) -> Result<Machine, VmmError> {
    boot_test_guest_with(cfg, guest, |m| x86::load_elf(m, elf))
}

/// [`boot_test_guest`] with the test guest built into this binary
/// ([`TEST_GUEST_IMAGE`]).
pub fn boot_builtin_test_guest(
    cfg: MachineConfig,
    guest: &TestGuestConfig,
) -> Result<Machine, VmmError> {
    boot_test_guest_with(cfg, guest, |m| {
        x86::load_elf_image(
            m,
            "built-in test guest",
            &mut std::io::Cursor::new(TEST_GUEST_IMAGE),
        )
    })
}

fn boot_test_guest_with(
    cfg: MachineConfig,
    guest: &TestGuestConfig,
    load: impl FnOnce(&memory::GuestMem) -> Result<u64, VmmError>,
) -> Result<Machine, VmmError> {
    let mem_bytes = cfg.memory_mib << 20;
    let ws_end = WORKING_SET_ADDR + guest.ws_pages * 4096;
    if ws_end > mem_bytes || cfg.memory_mib < 32 {
        return Err(VmmError::Config(format!(
            "the test guest needs at least 32 MiB of memory and room for its working set (ends at {ws_end:#x})"
        )));
    }
    if guest.ws_pages == 0 || guest.pages_per_tick == 0 {
        return Err(VmmError::Config(
            "working set and pages per tick must be non-zero".into(),
        ));
    }
    let mem = Machine::fresh_memory(&cfg)?;
    let mut m = Machine::create(cfg, mem)?;
    let entry = load(m.memory())?;
    let params: [u64; 6] = [
        0x7465_726e_6775_6573,
        WORKING_SET_ADDR,
        guest.ws_pages,
        guest.pages_per_tick,
        guest.ticks_per_sum,
        guest.exit_after,
    ];
    for (i, v) in params.iter().enumerate() {
        m.memory()
            .write_obj(*v, GuestAddress(PARAMS_ADDR + 8 * i as u64))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
    }
    x86::setup_long_mode(m.memory(), &m.vcpu(0), entry, TEST_GUEST_STACK, 0)?;
    m.spawn_vcpus()?;
    Ok(m)
}

/// Builds an empty machine of the given shape for an incoming migration:
/// RAM is zero, no vCPU thread exists. Fill RAM with [`Machine::ram_mut`],
/// load the state with [`Machine::load_state`], then [`Machine::start_vcpus`]
/// and [`Machine::resume`].
pub fn incoming(mut cfg: MachineConfig, shape: &MachineShape) -> Result<Machine, VmmError> {
    if !shape.memory_bytes.is_multiple_of(2 << 20) {
        return Err(VmmError::Config(format!(
            "incoming guest RAM of {} bytes is not a multiple of 2 MiB",
            shape.memory_bytes
        )));
    }
    cfg.memory_mib = shape.memory_bytes >> 20;
    cfg.vcpus = shape.vcpus;
    let mem = Machine::fresh_memory(&cfg)?;
    Machine::create(cfg, mem)
}

/// Builds a machine and loads a Linux bzImage (and initramfs) for a 64-bit
/// direct boot. The machine is paused; resume it to run. Booting needs
/// hardware virtualization to be useful (see [`has_hardware_virtualization`]).
pub fn boot_linux(cfg: MachineConfig, boot: &x86::LinuxBoot<'_>) -> Result<Machine, VmmError> {
    let mem = Machine::fresh_memory(&cfg)?;
    let mut m = Machine::create(cfg, mem)?;
    let entry = x86::load_linux(m.memory(), boot)?;
    x86::setup_long_mode(m.memory(), &m.vcpu(0), entry, 0, x86::BOOT_PARAMS_ADDR)?;
    for i in 0..usize::from(m.shape().vcpus) {
        x86::set_lint(&m.vcpu(i))?;
    }
    m.spawn_vcpus()?;
    Ok(m)
}

/// Helpers for tests and benchmarks that need a real KVM.
pub mod testing {
    /// Whether `/dev/kvm` can be opened; when it cannot, says `SKIPPED` and
    /// why on stderr, so a skipped test is never mistaken for a pass.
    pub fn kvm_or_skip() -> bool {
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if !ok {
            eprintln!("SKIPPED: /dev/kvm is not available on this host");
        }
        ok
    }
}
