//! What the host API takes and returns (shared by the server and the client).

use serde::{Deserialize, Serialize};
use tern_migrate::{MigrationPhase, Progress, Report};

/// What runs in a VM slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// tern-vmm's test guest on KVM: counts and keeps a checksum of a
    /// working set it rewrites, so a migration's correctness is visible.
    #[default]
    TestGuest,
    /// A process-memory workload (a region a thread dirties at
    /// `dirty_mib_per_sec`, tracked by userfaultfd): GiB-scale migrations
    /// at full speed, whatever the host's virtualization.
    Process,
    /// A Linux guest in QEMU (the qemu driver) running tern's workload
    /// (`guest/tern-load.c`): boots the agent's `guest_kernel`; migrates as
    /// QEMU's own stream carried over tern's channels.
    Linux,
}

/// A VM to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmSpec {
    /// What runs.
    pub kind: GuestKind,
    /// Process workloads: MiB per second written across the working set.
    pub dirty_mib_per_sec: u64,
    /// Guest RAM, MiB (a multiple of 2).
    pub memory_mib: u64,
    /// vCPUs (the test guest uses the first).
    pub vcpus: u8,
    /// Pages the guest keeps rewriting.
    pub ws_pages: u64,
    /// Pages written per tick.
    pub pages_per_tick: u64,
    /// Ticks between checksums.
    pub ticks_per_sum: u64,
    /// Linux guests: the workload's working set, MiB.
    pub ws_mib: u64,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            kind: GuestKind::TestGuest,
            dirty_mib_per_sec: 100,
            memory_mib: 64,
            vcpus: 1,
            ws_pages: 256,
            pages_per_tick: 4,
            ticks_per_sum: 16,
            ws_mib: 16,
        }
    }
}

impl VmSpec {
    /// The workload parameters of a Linux guest.
    pub fn load_params(&self) -> tern_drivers::qemu::load::LoadParams {
        tern_drivers::qemu::load::LoadParams {
            ws_mib: self.ws_mib,
            dirty_mib: self.dirty_mib_per_sec,
            tick_ms: 100,
            verify_every: 10,
        }
    }

    /// Checks the values against real limits before anything is sized from
    /// them. Every bound is checked on its own first, and derived sizes use
    /// only bounded values, so no product can overflow (a `ws_pages` of
    /// 2^52 + 1 once wrapped the check and aborted the agent).
    pub fn validate(&self) -> Result<(), String> {
        let max = match self.kind {
            GuestKind::TestGuest => 3072,
            GuestKind::Process => 65536,
            GuestKind::Linux => 65536,
        };
        if self.memory_mib < 4 || !self.memory_mib.is_multiple_of(2) || self.memory_mib > max {
            return Err(format!(
                "memory_mib {} must be even and in 4..={max}",
                self.memory_mib
            ));
        }
        let half_mib = self.memory_mib / 2;
        if self.kind == GuestKind::Linux
            && (self.memory_mib < 128 || self.ws_mib == 0 || self.ws_mib > half_mib)
        {
            return Err(format!(
                "a linux guest needs memory_mib >= 128 and ws_mib in 1..={half_mib}"
            ));
        }
        if self.vcpus == 0 || self.vcpus > 8 {
            return Err(format!("vcpus {} must be in 1..=8", self.vcpus));
        }
        let max_ws_pages = half_mib * 256; // 4 KiB pages in half the RAM
        if self.ws_pages == 0 || self.ws_pages > max_ws_pages {
            return Err(format!(
                "ws_pages {} must be in 1..={max_ws_pages} (half the guest RAM)",
                self.ws_pages
            ));
        }
        if self.pages_per_tick == 0 || self.pages_per_tick > self.ws_pages {
            return Err(format!(
                "pages_per_tick {} must be in 1..={} (the working set)",
                self.pages_per_tick, self.ws_pages
            ));
        }
        if self.ticks_per_sum == 0 || self.ticks_per_sum > 1_000_000 {
            return Err(format!(
                "ticks_per_sum {} must be in 1..=1000000",
                self.ticks_per_sum
            ));
        }
        if self.dirty_mib_per_sec > MAX_DIRTY_MIB_PER_SEC {
            return Err(format!(
                "dirty_mib_per_sec {} must be at most {MAX_DIRTY_MIB_PER_SEC}",
                self.dirty_mib_per_sec
            ));
        }
        Ok(())
    }
}

/// The fastest a workload may be asked to write (MiB/s): far beyond what
/// memory bandwidth allows, far below any overflow of bytes per second.
pub const MAX_DIRTY_MIB_PER_SEC: u64 = 1 << 20;

/// Where a VM is, as this host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Its process is booting it.
    Starting,
    /// Runs here.
    Running,
    /// Here and alive, but not advancing (its QEMU process is stopped).
    Stalled,
    /// Being migrated away (it runs until switchover).
    Migrating,
    /// Runs on another host now (see `moved_to`).
    MovedAway,
    /// Its guest process ended (or stopped answering) while it ran here.
    Lost,
    /// Stopped on request.
    Stopped,
}

/// One VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    /// Its id (the same on every host it moves to).
    pub id: String,
    /// Its status here.
    pub status: VmStatus,
    /// Owner epoch: +1 at every committed migration.
    pub epoch: u64,
    /// What it is.
    pub spec: VmSpec,
    /// The guest's progress counter (when running here).
    pub counter: Option<u64>,
    /// Whether its last working-set checksum is right (when it made one).
    pub checksum_ok: Option<bool>,
    /// The host it moved to.
    pub moved_to: Option<String>,
    /// More about the status.
    pub detail: Option<String>,
}

/// Which end of a migration this host is (tern-proto's vocabulary).
pub use tern_migrate::MigrationRole as Role;

/// One migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationView {
    /// Its id.
    pub id: String,
    /// The VM.
    pub vm: String,
    /// This host's end.
    pub role: Role,
    /// The other host.
    pub peer: String,
    /// How it stands (the same phases on both ends; `is_final` once ended).
    pub state: MigrationPhase,
    /// The latest progress.
    pub progress: Progress,
    /// The final report (source, once ended).
    pub report: Option<Report>,
    /// Why it failed.
    pub error: Option<String>,
    /// Source, while it runs under a host cap: its share of the host's
    /// migration bandwidth now, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_share_bytes_per_sec: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_would_overflow_are_refused_not_wrapped() {
        assert!(VmSpec::default().validate().is_ok());
        let huge = VmSpec {
            ws_pages: (1 << 52) + 1,
            ..VmSpec::default()
        };
        assert!(huge.validate().unwrap_err().contains("ws_pages"));
        let linux = VmSpec {
            kind: GuestKind::Linux,
            memory_mib: 256,
            ws_mib: u64::MAX / 2 + 1,
            ..VmSpec::default()
        };
        assert!(linux.validate().unwrap_err().contains("ws_mib"));
        let fast = VmSpec {
            dirty_mib_per_sec: u64::MAX,
            ..VmSpec::default()
        };
        assert!(fast.validate().unwrap_err().contains("dirty_mib_per_sec"));
        let ticks = VmSpec {
            pages_per_tick: u64::MAX,
            ..VmSpec::default()
        };
        assert!(ticks.validate().is_err());
    }
}
