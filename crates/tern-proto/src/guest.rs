//! What a host runs: the kind of guest, its workload, and where it stands
//! as its host sees it. The agent's API, its guest processes and the
//! control plane all speak these; the control plane maps its image-based
//! [`VmSpec`](crate::VmSpec) onto a [`GuestSpec`] in one place
//! ([`VmSpec::guest_spec`](crate::VmSpec::guest_spec)).

use serde::{Deserialize, Serialize};

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
    /// A container under runc running tern's counter workload (the agent's
    /// `[container]` rootfs); migrates as a CRIU checkpoint in one signed
    /// archive carried over tern's channels.
    Container,
}

/// What a host runs in one VM slot: the kind of guest and its workload.
/// The control plane's [`VmSpec`](crate::VmSpec) names an image; a host
/// runs this ([`VmSpec::guest_spec`](crate::VmSpec::guest_spec)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestSpec {
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
    /// Linux guests and containers: the workload's working set, MiB
    /// (containers write it at `dirty_mib_per_sec`).
    pub ws_mib: u64,
    /// Containers: the TCP port the counter answers on (0: none).
    pub listen_port: u16,
    /// Containers: an IPv4 address the container keeps wherever it runs
    /// (its host answers for it on its uplink); none: no network.
    pub address: Option<std::net::Ipv4Addr>,
}

impl Default for GuestSpec {
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
            listen_port: 0,
            address: None,
        }
    }
}

impl GuestSpec {
    /// Checks the values against real limits before anything is sized from
    /// them. Every bound is checked on its own first, and derived sizes use
    /// only bounded values, so no product can overflow (a `ws_pages` of
    /// 2^52 + 1 once wrapped the check and aborted the agent).
    pub fn validate(&self) -> Result<(), String> {
        let max = match self.kind {
            GuestKind::TestGuest => 3072,
            GuestKind::Process => 65536,
            GuestKind::Linux => 65536,
            GuestKind::Container => 65536,
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
        if self.kind == GuestKind::Container && (self.memory_mib < 16 || self.ws_mib > half_mib) {
            return Err(format!(
                "a container needs memory_mib >= 16 and ws_mib in 0..={half_mib}"
            ));
        }
        if let Some(a) = self.address {
            if self.kind != GuestKind::Container {
                return Err("only containers take an address".into());
            }
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
                return Err(format!("address {a} cannot be a container's own"));
            }
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

/// Where a guest is, as the host that has (or had) it sees it. The
/// control plane's record has its own lifecycle ([`VmStatus`](crate::VmStatus)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestStatus {
    /// Its process is booting it.
    Starting,
    /// Runs here.
    Running,
    /// Here and alive, but not advancing (its QEMU process is stopped).
    Stalled,
    /// Paused by its own host, which lost the control plane for longer
    /// than its lease (another host may run the VM by now). It runs again
    /// when the host hears back, unless the control plane moved it on;
    /// then it is stopped.
    Fenced,
    /// Being migrated away (it runs until switchover).
    Migrating,
    /// Runs on another host now (see `moved_to`).
    MovedAway,
    /// Its guest process ended (or stopped answering) while it ran here.
    Lost,
    /// Stopped on request.
    Stopped,
}

/// The image names every fleet offers besides the operator's catalogue:
/// `test` is tern's test guest (in `tern-vmm`), `process` a process
/// workload (no hypervisor: hosts without KVM take it); any other image is
/// a Linux guest, which the host boots with its kernel.
pub const BUILT_IN_IMAGES: [&str; 2] = ["test", "process"];

/// The image name the control plane maps to a [`GuestKind::Container`]
/// (hosts with a `[container]` rootfs run it).
pub const CONTAINER_IMAGE: &str = "container";

impl crate::VmSpec {
    /// What a host runs for this spec.
    pub fn guest_spec(&self) -> GuestSpec {
        let kind = match self.image.as_str() {
            "test" => GuestKind::TestGuest,
            "process" => GuestKind::Process,
            CONTAINER_IMAGE => GuestKind::Container,
            _ => GuestKind::Linux,
        };
        let memory_mib = u64::from(self.memory_mib);
        GuestSpec {
            kind,
            memory_mib,
            vcpus: self.vcpus,
            // A Linux guest's workload takes an eighth of its RAM.
            ws_mib: (memory_mib / 8).max(1),
            ..GuestSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_that_would_overflow_are_refused_not_wrapped() {
        assert!(GuestSpec::default().validate().is_ok());
        let huge = GuestSpec {
            ws_pages: (1 << 52) + 1,
            ..GuestSpec::default()
        };
        assert!(huge.validate().unwrap_err().contains("ws_pages"));
        let linux = GuestSpec {
            kind: GuestKind::Linux,
            memory_mib: 256,
            ws_mib: u64::MAX / 2 + 1,
            ..GuestSpec::default()
        };
        assert!(linux.validate().unwrap_err().contains("ws_mib"));
        let fast = GuestSpec {
            dirty_mib_per_sec: u64::MAX,
            ..GuestSpec::default()
        };
        assert!(fast.validate().unwrap_err().contains("dirty_mib_per_sec"));
        let ticks = GuestSpec {
            pages_per_tick: u64::MAX,
            ..GuestSpec::default()
        };
        assert!(ticks.validate().is_err());
    }

    #[test]
    fn every_image_maps_to_a_spec_a_host_accepts() {
        for (image, memory) in [("test", 64), ("process", 256), ("debian", 512)] {
            let s = crate::VmSpec {
                memory_mib: memory,
                image: image.into(),
                ..crate::VmSpec::default()
            };
            let g = s.guest_spec();
            g.validate().unwrap_or_else(|e| panic!("{image}: {e}"));
            assert_eq!(g.memory_mib, u64::from(memory));
        }
        assert_eq!(
            crate::VmSpec::default().guest_spec().kind,
            GuestKind::TestGuest
        );
    }
}
