//! The bodies both HTTP APIs decode, on arbitrary bytes: `tern up`'s create
//! and configure bodies (the `tern-proto` types its extractor decodes) and
//! the host agent's VM specs, migrate and redirect requests. Refusing is fine;
//! panicking, or passing validation with a size past its limit, is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{CreateVmRequest, VmConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<CreateVmRequest>(data) {
        if let Some(spec) = req.spec {
            if spec.validate().is_ok() {
                assert!((16..=1024 * 1024).contains(&spec.memory_mib));
                assert!(tern_proto::is_image_name(&spec.image));
            }
        }
        let _ = req.config.validate();
    }
    if let Ok(c) = serde_json::from_slice::<VmConfig>(data) {
        if c.validate().is_ok() {
            assert!(c.settings.len() <= 256);
        }
    }
    if let Ok(spec) = serde_json::from_slice::<tern_proto::GuestSpec>(data) {
        if spec.validate().is_ok() {
            // A valid spec's sizes fit the memory it asks for.
            let bytes = u64::from(spec.memory_mib as u32) << 20;
            assert!(bytes > 0);
        }
    }
    if let Ok(req) = serde_json::from_slice::<tern_agent::MigrateRequest>(data) {
        // Its policy is checked or refused, never a panic.
        let _ = req.policy();
    }
    let _ = serde_json::from_slice::<tern_proto::HeartbeatResponse>(data);
    let _ = serde_json::from_slice::<tern_agent::api::RedirectRequest>(data);
});
