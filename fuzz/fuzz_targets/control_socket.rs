//! The local control sockets' messages on arbitrary bytes: what a guest
//! process (`tern guest`) and a monitor (`tern-vmm`) decode from whoever
//! reaches their sockets, and what the agent and the driver decode from
//! them. Refusing is fine; panicking is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<tern_agent::control::Request>(data);
    let _ = serde_json::from_slice::<tern_agent::control::Answer<serde_json::Value>>(data);
    let _ = serde_json::from_slice::<tern_agent::control::Answer<tern_agent::control::WatchEvent>>(data);
    let _ = serde_json::from_slice::<tern_vmm::control::Request>(data);
    let _ = serde_json::from_slice::<tern_vmm::control::Response>(data);
});
