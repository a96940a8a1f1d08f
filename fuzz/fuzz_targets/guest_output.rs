//! What a guest and QEMU say, on arbitrary bytes: the workload's console
//! lines (a guest writes whatever it likes) and QMP messages. Refusing is
//! fine; panicking is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_drivers::qemu::load::parse_line;
use tern_drivers::qemu::qmp::{classify, MigrateInfo, Status};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let _ = parse_line(line);
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = serde_json::from_value::<Status>(v.clone());
        let _ = serde_json::from_value::<MigrateInfo>(v.clone());
        let _ = classify(v);
    }
});
