//! A guest's journal on arbitrary bytes (a crash, a full disk or an editor
//! may have left anything): parsing and replay never panic, and whatever
//! they return folds into one fate per VM.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tern_agent::journal::{fold, parse_records};

fuzz_target!(|data: &[u8]| {
    let records = parse_records(Path::new("fuzz.jsonl"), data);
    let fates = fold(&records);
    assert!(fates.len() <= records.len());
});
