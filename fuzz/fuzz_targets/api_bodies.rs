//! The bodies both HTTP APIs decode, on arbitrary bytes: `tern up`'s create
//! and configure bodies (through the same extractor the API uses) and the
//! host agent's VM specs and migrate requests. Refusing is fine; panicking,
//! or passing validation with a size past its limit, is not.
#![no_main]

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tern_api::body::json_body;
use tern_api::CreateVmRequest;
use tern_proto::VmConfig;

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(Some(req)) = json_body::<CreateVmRequest>(&h, Ok(Bytes::copy_from_slice(data))) {
        if let Some(spec) = req.spec {
            if spec.validate().is_ok() {
                assert!((16..=1024 * 1024).contains(&spec.memory_mib));
                assert!(tern_proto::is_image_name(&spec.image));
            }
        }
        let _ = req.config.validate();
    }
    if let Ok(Some(c)) = json_body::<VmConfig>(&h, Ok(Bytes::copy_from_slice(data))) {
        if c.validate().is_ok() {
            assert!(c.settings.len() <= 256);
        }
    }
    if let Ok(spec) = serde_json::from_slice::<tern_agent::VmSpec>(data) {
        if spec.validate().is_ok() {
            // A valid spec's sizes fit the memory it asks for.
            let bytes = u64::from(spec.memory_mib as u32) << 20;
            assert!(bytes > 0);
        }
    }
    let _ = serde_json::from_slice::<tern_agent::MigrateRequest>(data);
});
