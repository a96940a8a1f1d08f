//! What an agent hosts in a VM slot: a tern-vmm machine or a process
//! workload, behind the engine's two guest halves.

use std::time::Duration;
use tern_drivers::qemu::load::LoadReport;
use tern_drivers::qemu::QemuVm;
use tern_migrate::PostcopyMemory;
use tern_migrate::{DestinationGuest, GuestError, GuestShape, SourceGuest};
use tern_proto::{GuestKind, GuestSpec};
use tern_vmm::halves::incoming_machine;
use tern_vmm::process::ProcessGuest;
use tern_vmm::{DirtyBitmap, Machine, MachineConfig, TestGuestConfig, WaitOutcome};

/// A hosted guest.
pub enum Hosted {
    /// A KVM microVM.
    Kvm(Machine),
    /// A process-memory workload.
    Process(ProcessGuest),
    /// A Linux guest in its own QEMU process. It migrates by QEMU's stream
    /// (`crate::qemu_relay`), not through the page engine, so the engine's
    /// guest halves refuse it.
    Qemu(QemuVm),
    /// A container under runc. It migrates as a CRIU checkpoint
    /// (`crate::container_relay`), not through the page engine.
    Container(crate::container::ContainerGuest),
}

const QEMU_NOT_PAGED: &str = "a QEMU guest migrates by QEMU's own stream, not tern's page engine";
const CONTAINER_NOT_PAGED: &str =
    "a container migrates as a CRIU checkpoint, not by tern's page engine";

/// The test guest's settings in `spec`.
pub(crate) fn test_guest(spec: &GuestSpec) -> TestGuestConfig {
    TestGuestConfig {
        ws_pages: spec.ws_pages,
        pages_per_tick: spec.pages_per_tick,
        ticks_per_sum: spec.ticks_per_sum,
        exit_after: 0,
    }
}

/// The workload parameters of a Linux guest of `spec`.
pub(crate) fn load_params(spec: &GuestSpec) -> tern_drivers::qemu::load::LoadParams {
    tern_drivers::qemu::load::LoadParams {
        ws_mib: spec.ws_mib,
        dirty_mib: spec.dirty_mib_per_sec,
        tick_ms: 100,
        verify_every: 10,
    }
}

impl Hosted {
    /// Boots what `spec` asks for (blocking: call it off the async runtime).
    pub fn boot(spec: &GuestSpec) -> Result<Hosted, String> {
        match spec.kind {
            GuestKind::TestGuest => {
                let cfg = MachineConfig {
                    memory_mib: spec.memory_mib,
                    vcpus: spec.vcpus,
                    ..Default::default()
                };
                let m = tern_vmm::boot_builtin_test_guest(cfg, &test_guest(spec))
                    .map_err(|e| e.to_string())?;
                m.resume().map_err(|e| e.to_string())?;
                match m.wait_until(Duration::from_secs(60), |d| d.agent.counter >= 1) {
                    WaitOutcome::Satisfied => Ok(Hosted::Kvm(m)),
                    other => Err(format!("the guest did not start counting: {other:?}")),
                }
            }
            GuestKind::Process => ProcessGuest::start(
                spec.memory_mib << 20,
                spec.ws_pages,
                spec.dirty_mib_per_sec << 20,
            )
            .map(Hosted::Process)
            .map_err(|e| e.to_string()),
            GuestKind::Linux => Err("linux guests boot through the qemu driver (async)".into()),
            GuestKind::Container => {
                Err("containers boot in their guest process's directory".into())
            }
        }
    }

    /// An empty guest of `spec`'s kind to receive a migration into.
    pub fn incoming(spec: &GuestSpec, shape: &GuestShape) -> Result<Hosted, String> {
        match spec.kind {
            GuestKind::TestGuest => incoming_machine(shape)
                .map(Hosted::Kvm)
                .map_err(|e| e.to_string()),
            GuestKind::Process => ProcessGuest::incoming(shape)
                .map(Hosted::Process)
                .map_err(|e| e.to_string()),
            GuestKind::Linux => Err(QEMU_NOT_PAGED.into()),
            GuestKind::Container => Err(CONTAINER_NOT_PAGED.into()),
        }
    }

    /// Its progress counter and, for the test guest, whether its last
    /// working-set checksum is right.
    pub fn progress(&self, spec: &GuestSpec) -> (u64, Option<bool>) {
        match self {
            Hosted::Kvm(m) => {
                let (counter, sum) = m.with_devices(|d| (d.agent.counter, d.agent.checksum));
                let guest = test_guest(spec);
                (counter, sum.map(|(c, s)| s == guest.expected_checksum(c)))
            }
            Hosted::Process(p) => (p.writes(), None),
            Hosted::Qemu(q) => {
                // The guest's own report on its console: last tick, and
                // whether every check it made held.
                let r = LoadReport::from_console(&q.console(), &load_params(spec));
                let ok = (r.good_checks + r.bad_checks.len() as u64 > 0)
                    .then_some(r.bad_checks.is_empty() && r.gaps.is_empty());
                (r.last_tick.unwrap_or(0), ok)
            }
            Hosted::Container(c) => (c.counter(), Some(c.broken().is_none())),
        }
    }

    /// Whether it is a QEMU guest (it migrates by QEMU's stream).
    pub fn is_qemu(&self) -> bool {
        matches!(self, Hosted::Qemu(_))
    }

    /// Whether it still runs (a status never calls a dead or paused guest running).
    pub fn is_alive(&self) -> bool {
        match self {
            Hosted::Kvm(m) => m.run_state() == tern_vmm::RunState::Running,
            Hosted::Process(p) => p.is_running(),
            Hosted::Qemu(q) => q.is_alive(),
            Hosted::Container(c) => c.is_alive(),
        }
    }

    /// Whether it is alive but cannot advance (a stopped QEMU process, a
    /// frozen container).
    pub fn is_stalled(&self) -> bool {
        match self {
            Hosted::Qemu(q) => q.is_alive() && q.is_stopped(),
            Hosted::Container(c) => c.is_paused(),
            Hosted::Kvm(_) | Hosted::Process(_) => false,
        }
    }

    /// Pauses or resumes it where it runs (fencing): the test guest's
    /// vCPUs, the workload's writer, the QEMU process (SIGSTOP, SIGCONT).
    pub fn set_paused(&mut self, paused: bool) -> Result<(), String> {
        match self {
            Hosted::Kvm(_) | Hosted::Process(_) if paused => {
                SourceGuest::pause(self).map_err(|e| e.to_string())
            }
            Hosted::Kvm(_) | Hosted::Process(_) => {
                SourceGuest::resume(self).map_err(|e| e.to_string())
            }
            Hosted::Qemu(q) => {
                let pid = rustix::process::Pid::from_raw(q.pid()).ok_or("QEMU has no pid")?;
                let sig = if paused {
                    rustix::process::Signal::STOP
                } else {
                    rustix::process::Signal::CONT
                };
                rustix::process::kill_process(pid, sig).map_err(|e| e.to_string())
            }
            Hosted::Container(c) => c.set_paused(paused),
        }
    }

    /// Ends it.
    pub fn stop(&mut self) {
        match self {
            Hosted::Kvm(m) => m.stop("stopped on request"),
            Hosted::Process(p) => p.discard(),
            Hosted::Qemu(q) => q.kill(),
            Hosted::Container(c) => c.stop(),
        }
    }
}

macro_rules! both {
    ($self:ident, $g:ident => $e:expr) => {
        match $self {
            Hosted::Kvm($g) => $e,
            Hosted::Process($g) => $e,
            Hosted::Qemu(_) => Err(GuestError(QEMU_NOT_PAGED.into())),
            Hosted::Container(_) => Err(GuestError(CONTAINER_NOT_PAGED.into())),
        }
    };
}

impl SourceGuest for Hosted {
    fn shape(&self) -> GuestShape {
        match self {
            Hosted::Kvm(g) => SourceGuest::shape(g),
            Hosted::Process(g) => SourceGuest::shape(g),
            Hosted::Qemu(q) => GuestShape {
                memory_bytes: q.spec().memory_mib << 20,
                vcpus: q.spec().vcpus,
            },
            Hosted::Container(_) => GuestShape {
                memory_bytes: 0,
                vcpus: 1,
            },
        }
    }
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError> {
        both!(self, g => g.start_dirty_tracking())
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        both!(self, g => g.take_dirty())
    }
    fn stop_dirty_tracking(&mut self) -> Result<(), GuestError> {
        both!(self, g => g.stop_dirty_tracking())
    }
    fn populated(&self) -> Result<Option<DirtyBitmap>, GuestError> {
        both!(self, g => g.populated())
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestError> {
        both!(self, g => SourceGuest::read(g, addr, out))
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        both!(self, g => SourceGuest::pause(g))
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        both!(self, g => SourceGuest::resume(g))
    }
    fn device_state(&mut self) -> Result<Vec<u8>, GuestError> {
        both!(self, g => g.device_state())
    }
    fn discard(&mut self) {
        match self {
            Hosted::Kvm(g) => g.discard(),
            Hosted::Process(g) => g.discard(),
            Hosted::Qemu(q) => q.kill(),
            Hosted::Container(c) => c.discard(),
        }
    }
    fn throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        both!(self, g => g.throttle(percent))
    }
}

impl DestinationGuest for Hosted {
    fn ram_mut(&mut self) -> Result<&mut [u8], GuestError> {
        both!(self, g => DestinationGuest::ram_mut(g))
    }
    fn prefault(&mut self, first: u64, pages: u64) {
        match self {
            Hosted::Kvm(g) => g.prefault(first, pages),
            Hosted::Process(g) => g.prefault(first, pages),
            // Never filled page by page.
            Hosted::Qemu(_) | Hosted::Container(_) => {}
        }
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        both!(self, g => g.load_device_state(state))
    }
    fn start(&mut self) -> Result<(), GuestError> {
        both!(self, g => DestinationGuest::start(g))
    }
    fn prepare_to_start(&mut self) -> Result<(), GuestError> {
        both!(self, g => g.prepare_to_start())
    }
    fn enter_postcopy(
        &mut self,
        stale: &[(u64, u64)],
    ) -> Result<Box<dyn PostcopyMemory>, GuestError> {
        both!(self, g => g.enter_postcopy(stale))
    }
}
