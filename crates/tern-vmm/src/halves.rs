//! tern-vmm's [`Machine`] as a migratable guest: both halves of
//! `tern_guest`, implemented beside the machine they drive.

use crate::{Machine, MachineShape};
use tern_guest::{
    DestinationGuest, DirtyBitmap, GuestError, GuestShape, PostcopyMemory, SourceGuest,
};

impl From<crate::VmmError> for GuestError {
    fn from(e: crate::VmmError) -> Self {
        GuestError(e.to_string())
    }
}

impl PostcopyMemory for crate::uffd::MissingPages {
    fn next_fault(&self, timeout: std::time::Duration) -> Result<Option<u64>, GuestError> {
        Ok(crate::uffd::MissingPages::next_fault(self, timeout)?)
    }
    fn fill(&self, page: u64, data: &[u8]) -> Result<bool, GuestError> {
        Ok(crate::uffd::MissingPages::fill(self, page, data)?)
    }
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
    fn populated(&self) -> Result<Option<DirtyBitmap>, GuestError> {
        Ok(self.populated_pages())
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
    fn prefault(&mut self, first: u64, pages: u64) {
        if let Ok(ram) = Machine::ram_mut(self) {
            crate::memory::prefault(ram, first, pages);
        }
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let st: crate::state::MachineState =
            serde_json::from_slice(state).map_err(|e| GuestError(format!("device state: {e}")))?;
        Ok(self.load_state(&st)?)
    }
    fn start(&mut self) -> Result<(), GuestError> {
        if !self.vcpus_started() {
            self.start_vcpus()?;
        }
        Ok(Machine::resume(self)?)
    }
    fn prepare_to_start(&mut self) -> Result<(), GuestError> {
        // Spawning the threads (each installs its seccomp filter) took
        // ~0.2 ms of the downtime after `Commit`; parked, they touch nothing.
        Ok(self.start_vcpus()?)
    }
    fn enter_postcopy(
        &mut self,
        stale: &[(u64, u64)],
    ) -> Result<Box<dyn PostcopyMemory>, GuestError> {
        Ok(Box::new(self.postcopy_ram(stale)?))
    }
}

/// Builds the destination machine for an accepted request.
pub fn incoming_machine(shape: &GuestShape) -> Result<Machine, GuestError> {
    Ok(crate::incoming(
        crate::MachineConfig::default(),
        &MachineShape {
            memory_bytes: shape.memory_bytes,
            vcpus: shape.vcpus,
        },
    )?)
}
