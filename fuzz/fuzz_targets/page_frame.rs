//! The page-frame decoder on arbitrary bytes: it must never panic, and a frame
//! it refuses must leave guest memory exactly as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_pagecodec::{Decoder, PAGE_SIZE};

const PAGES: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new(PAGES);
    // Half the pages "received" so deltas and duplicates have bases to use.
    for p in (0..PAGES).step_by(2) {
        dec.mark_received(p);
    }
    let mut mem: Vec<u8> = (0..PAGES as usize * PAGE_SIZE).map(|i| (i / 7) as u8).collect();
    let before = mem.clone();
    if dec.decode_frame(data, &mut mem).is_err() {
        assert!(mem == before, "refused frame wrote memory");
    }
});
