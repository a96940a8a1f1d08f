//! The snapshot state decoder (also what a migration's device state goes
//! through) on arbitrary bytes: refusing is fine, panicking is not. Inputs
//! are wrapped in a valid header half the time so the fuzzer reaches the
//! JSON body and the per-section decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_vmm::snapshot::decode_state;
use tern_vmm::state::{VcpuState, VmState};

fuzz_target!(|data: &[u8]| {
    let wrapped;
    let bytes = if data.first().is_some_and(|b| b & 1 == 1) {
        let body = &data[1..];
        let mut v = Vec::with_capacity(56 + body.len());
        v.extend_from_slice(b"TERNSNAP");
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v.extend_from_slice(blake3::hash(body).as_bytes());
        v.extend_from_slice(body);
        wrapped = v;
        &wrapped[..]
    } else {
        data
    };
    if let Ok((_, body)) = decode_state(bytes) {
        for name in body.state.sections.keys() {
            let _ = body.state.get::<VcpuState>(name);
            let _ = body.state.get::<VmState>(name);
        }
    }
});
