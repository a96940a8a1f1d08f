//! A control-plane VM spec as an agent runs it.
//!
//! The control plane names an image; an agent runs a kind of guest. `test`
//! is tern's test guest (in `tern-vmm`), `process` a process workload
//! (no hypervisor: hosts without KVM take it), and any other image of the
//! catalogue a Linux guest, which the agent boots with its own kernel.

use tern_agent::{GuestKind, VmSpec as AgentSpec};
use tern_proto::VmSpec;

/// The image names every fleet offers besides the operator's catalogue.
pub const BUILT_IN: [&str; 2] = ["test", "process"];

/// The agent's spec for `spec`.
pub fn agent_spec(spec: &VmSpec) -> AgentSpec {
    let kind = match spec.image.as_str() {
        "test" => GuestKind::TestGuest,
        "process" => GuestKind::Process,
        _ => GuestKind::Linux,
    };
    let memory_mib = u64::from(spec.memory_mib);
    AgentSpec {
        kind,
        memory_mib,
        vcpus: spec.vcpus,
        // A Linux guest's workload takes an eighth of its RAM.
        ws_mib: (memory_mib / 8).max(1),
        ..AgentSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_image_maps_to_a_spec_the_agent_accepts() {
        for (image, memory) in [("test", 64), ("process", 256), ("debian", 512)] {
            let s = VmSpec {
                memory_mib: memory,
                image: image.into(),
                ..VmSpec::default()
            };
            let a = agent_spec(&s);
            a.validate().unwrap_or_else(|e| panic!("{image}: {e}"));
            assert_eq!(a.memory_mib, u64::from(memory));
        }
        assert_eq!(agent_spec(&VmSpec::default()).kind, GuestKind::TestGuest);
    }
}
