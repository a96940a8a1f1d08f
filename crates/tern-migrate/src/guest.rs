//! What the engine needs from a guest: the `MigratableGuest` halves.
//!
//! The engine is written against these traits, so a KVM microVM, a QEMU
//! guest or a process image migrate through the same code. tern-vmm's
//! [`Machine`] implements both halves.

use serde::{Deserialize, Serialize};
use tern_vmm::{DirtyBitmap, Machine, MachineShape};

/// A guest operation failed.
#[derive(Debug, thiserror::Error)]
#[error("guest: {0}")]
pub struct GuestError(pub String);

impl From<tern_vmm::VmmError> for GuestError {
    fn from(e: tern_vmm::VmmError) -> Self {
        GuestError(e.to_string())
    }
}

/// Memory size and vCPUs: what the destination must be able to host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestShape {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// The source half: read pages, track what changes, stop and save.
pub trait SourceGuest: Send {
    /// Shape of the guest.
    fn shape(&self) -> GuestShape;
    /// Starts tracking written pages (what was written before is not reported).
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError>;
    /// Pages written since the last call (or since tracking started).
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError>;
    /// Stops tracking.
    fn stop_dirty_tracking(&mut self) -> Result<(), GuestError>;
    /// Copies `out.len()` bytes of guest RAM from `addr` (a consistent copy
    /// of each page as it was at some moment; the dirty log catches changes).
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestError>;
    /// Stops the guest.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets it run again (rollback).
    fn resume(&mut self) -> Result<(), GuestError>;
    /// Its device and vCPU state, paused.
    fn device_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// Ends it for good (after commit).
    fn discard(&mut self);
    /// Auto-converge: slows the guest to (100 - `percent`) % of its speed
    /// (0: full speed again), so it dirties memory slower than the link sends it.
    fn throttle(&mut self, percent: u8) -> Result<(), GuestError>;
}

/// Guest RAM filled on demand after the guest started (post-copy).
pub trait PostcopyMemory: Send + Sync {
    /// The next page the guest touched and lacks, waiting up to `timeout`.
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, GuestError>;
    /// Places a page (waking the guest if it waits on it); false if it was there.
    fn fill(&self, page: u64, data: &[u8]) -> Result<bool, GuestError>;
}

impl PostcopyMemory for tern_vmm::uffd::MissingPages {
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, GuestError> {
        Ok(tern_vmm::uffd::MissingPages::next_fault(self, timeout)?)
    }
    fn fill(&self, page: u64, data: &[u8]) -> Result<bool, GuestError> {
        Ok(tern_vmm::uffd::MissingPages::fill(self, page, data)?)
    }
}

/// The destination half: receive RAM and state, then run.
pub trait DestinationGuest: Send {
    /// Guest RAM to fill, before it runs.
    fn ram_mut(&mut self) -> Result<&mut [u8], GuestError>;
    /// Loads device and vCPU state.
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// Starts the guest.
    fn start(&mut self) -> Result<(), GuestError>;
    /// Post-copy: before [`DestinationGuest::start`], forget the `stale`
    /// pages (and any never filled) and serve the guest's accesses to them
    /// through the returned memory. Bulk writes through `ram_mut` end here.
    fn enter_postcopy(&mut self, stale: &[u64]) -> Result<Box<dyn PostcopyMemory>, GuestError>;
}

impl SourceGuest for Machine {
    fn shape(&self) -> GuestShape {
        let s = Machine::shape(self);
        GuestShape {
            memory_bytes: s.memory_bytes,
            vcpus: s.vcpus,
        }
    }
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError> {
        Ok(self.start_dirty_log()?)
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        Ok(self.sync_dirty_log()?)
    }
    fn stop_dirty_tracking(&mut self) -> Result<(), GuestError> {
        Ok(self.stop_dirty_log()?)
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestError> {
        Ok(self.read_memory(addr, out)?)
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        Machine::pause(self).map(|_| ()).map_err(Into::into)
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        Ok(Machine::resume(self)?)
    }
    fn device_state(&mut self) -> Result<Vec<u8>, GuestError> {
        let st = self.save_state()?;
        serde_json::to_vec(&st).map_err(|e| GuestError(e.to_string()))
    }
    fn discard(&mut self) {
        self.stop("migrated away");
    }
    fn throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        self.set_throttle(percent);
        Ok(())
    }
}

impl DestinationGuest for Machine {
    fn ram_mut(&mut self) -> Result<&mut [u8], GuestError> {
        Ok(Machine::ram_mut(self)?)
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let st: tern_vmm::state::MachineState =
            serde_json::from_slice(state).map_err(|e| GuestError(format!("device state: {e}")))?;
        Ok(self.load_state(&st)?)
    }
    fn start(&mut self) -> Result<(), GuestError> {
        self.start_vcpus()?;
        Ok(Machine::resume(self)?)
    }
    fn enter_postcopy(&mut self, stale: &[u64]) -> Result<Box<dyn PostcopyMemory>, GuestError> {
        Ok(Box::new(self.postcopy_ram(stale.iter().copied())?))
    }
}

/// Builds the destination machine for an accepted request.
pub fn incoming_machine(shape: &GuestShape) -> Result<Machine, GuestError> {
    Ok(tern_vmm::incoming(
        tern_vmm::MachineConfig::default(),
        &MachineShape {
            memory_bytes: shape.memory_bytes,
            vcpus: shape.vcpus,
        },
    )?)
}
