//! A process-memory workload as a migratable guest: a region a thread
//! dirties at a set rate, tracked by the kernel (userfaultfd async
//! write-protect + `PAGEMAP_SCAN`). It runs the real codec, transport and
//! engine at GiB scale and full speed, where tern-vmm's test guest is
//! limited by KVM's emulator on hosts without hardware virtualization.

use crate::procmem::{Dirtier, Region};
use crate::uffd::WriteTracker;
use crate::DirtyBitmap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_guest::{DestinationGuest, GuestError, GuestShape, PostcopyMemory, SourceGuest};

/// What the workload is and where it is: its device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Pages of the working set it writes.
    pub ws_pages: u64,
    /// Bytes per second it dirties.
    pub dirty_bytes_per_sec: u64,
    /// Writes made so far (its progress counter).
    pub writes: u64,
}

/// The workload.
pub struct ProcessGuest {
    region: Arc<Region>,
    tracker: Option<WriteTracker>,
    dirtier: Option<Dirtier>,
    state: ProcessState,
}

impl ProcessGuest {
    /// A running workload of `memory_bytes` whose working set starts as
    /// incompressible data (written, so warm); the rest was never written,
    /// as in most real processes, and is not mapped.
    pub fn start(
        memory_bytes: u64,
        ws_pages: u64,
        dirty_bytes_per_sec: u64,
    ) -> Result<Self, GuestError> {
        Self::start_with(memory_bytes, ws_pages, dirty_bytes_per_sec, false)
    }

    /// [`ProcessGuest::start`], with the memory outside the working set
    /// pre-faulted (mapped, holding zeros: every page counts as written)
    /// or left untouched.
    pub fn start_with(
        memory_bytes: u64,
        ws_pages: u64,
        dirty_bytes_per_sec: u64,
        prefault: bool,
    ) -> Result<Self, GuestError> {
        let region = Arc::new(Region::new(memory_bytes as usize, prefault)?);
        region.fill_random(ws_pages, 0x7465_726e);
        let state = ProcessState {
            ws_pages,
            dirty_bytes_per_sec,
            writes: 0,
        };
        let dirtier = Dirtier::start(region.clone(), ws_pages, dirty_bytes_per_sec, 0);
        Ok(Self {
            region,
            tracker: None,
            dirtier: Some(dirtier),
            state,
        })
    }

    /// An empty copy to receive into. Not pre-faulted: pre-copy touches
    /// each page while the source still runs, and post-copy would only drop
    /// the pre-faulted pages again inside the downtime.
    pub fn incoming(shape: &GuestShape) -> Result<Self, GuestError> {
        Ok(Self {
            region: Arc::new(Region::new(shape.memory_bytes as usize, false)?),
            tracker: None,
            dirtier: None,
            state: ProcessState {
                ws_pages: 1,
                dirty_bytes_per_sec: 0,
                writes: 0,
            },
        })
    }

    /// Writes made so far.
    pub fn writes(&self) -> u64 {
        self.dirtier
            .as_ref()
            .map_or(self.state.writes, |d| d.writes())
    }

    /// Its memory (tests read it as the guest would).
    pub fn memory(&self) -> Arc<Region> {
        self.region.clone()
    }

    /// Whether it is writing.
    pub fn is_running(&self) -> bool {
        self.dirtier.is_some()
    }
}

impl SourceGuest for ProcessGuest {
    fn shape(&self) -> GuestShape {
        GuestShape {
            memory_bytes: self.region.len() as u64,
            vcpus: 1,
        }
    }
    fn start_dirty_tracking(&mut self) -> Result<(), GuestError> {
        self.tracker = Some(self.region.track_writes()?);
        Ok(())
    }
    fn populated(&self) -> Result<Option<DirtyBitmap>, GuestError> {
        Ok(self.region.populated())
    }
    fn take_dirty(&mut self) -> Result<DirtyBitmap, GuestError> {
        let mut bits = DirtyBitmap::with_pages((self.region.len() / 4096) as u64);
        let t = self
            .tracker
            .as_mut()
            .ok_or_else(|| GuestError("dirty tracking is not on".into()))?;
        t.take_written(|p| bits.insert(p))?;
        Ok(bits)
    }
    fn stop_dirty_tracking(&mut self) -> Result<(), GuestError> {
        self.tracker = None;
        Ok(())
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), GuestError> {
        Ok(self.region.read(addr as usize, out)?)
    }
    fn pause(&mut self) -> Result<(), GuestError> {
        if let Some(d) = &self.dirtier {
            d.pause();
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        if let Some(d) = &self.dirtier {
            d.resume();
        }
        Ok(())
    }
    fn device_state(&mut self) -> Result<Vec<u8>, GuestError> {
        let st = ProcessState {
            writes: self.writes(),
            ..self.state
        };
        serde_json::to_vec(&st).map_err(|e| GuestError(e.to_string()))
    }
    fn discard(&mut self) {
        self.state.writes = self.writes();
        self.dirtier = None;
        self.tracker = None;
    }
    fn throttle(&mut self, percent: u8) -> Result<(), GuestError> {
        if let Some(d) = &self.dirtier {
            d.set_throttle(percent);
        }
        Ok(())
    }
}

impl DestinationGuest for ProcessGuest {
    fn ram_mut(&mut self) -> Result<&mut [u8], GuestError> {
        Arc::get_mut(&mut self.region)
            .map(|r| r.as_mut_slice())
            .ok_or_else(|| {
                GuestError("memory is in use; it can no longer be filled in bulk".into())
            })
    }
    fn prefault(&mut self, first: u64, pages: u64) {
        if let Ok(ram) = DestinationGuest::ram_mut(self) {
            crate::memory::prefault(ram, first, pages);
        }
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        self.state =
            serde_json::from_slice(state).map_err(|e| GuestError(format!("process state: {e}")))?;
        Ok(())
    }
    fn start(&mut self) -> Result<(), GuestError> {
        let s = self.state;
        self.dirtier = Some(Dirtier::start(
            self.region.clone(),
            s.ws_pages,
            s.dirty_bytes_per_sec,
            s.writes,
        ));
        Ok(())
    }
    fn enter_postcopy(
        &mut self,
        stale: &[(u64, u64)],
    ) -> Result<Box<dyn PostcopyMemory>, GuestError> {
        Ok(Box::new(self.region.missing_pages(stale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_dirties_its_working_set_and_pauses() {
        let mut g = ProcessGuest::start(8 << 20, 128, 50 << 20).unwrap();
        if g.start_dirty_tracking().is_err() {
            eprintln!("SKIPPED: async write-protect not available");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
        g.pause().unwrap();
        let d = g.take_dirty().unwrap();
        assert!(d.count() > 0 && d.pages().all(|p| p < 128));
        let st: ProcessState = serde_json::from_slice(&g.device_state().unwrap()).unwrap();
        assert_eq!(st.writes, g.writes());
        assert!(g.take_dirty().unwrap().count() == 0, "paused but dirtying");
    }
}
