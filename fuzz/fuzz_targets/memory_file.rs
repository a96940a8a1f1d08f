//! A snapshot's incremental `memory.tern` on arbitrary bytes, with a
//! manifest that may lie about the guest's size: the index reader refuses
//! or returns ascending page numbers inside guest RAM and a data offset
//! inside the file; it never panics or allocates past the file's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use tern_vmm::snapshot::{read_incremental_index, MemoryManifest, SnapshotKind};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (guest, file) = data.split_at(8);
    let guest_bytes = u64::from_le_bytes(guest.try_into().unwrap());
    let pages = file
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let path = std::env::temp_dir().join(format!("tern-fuzz-memory-{}", std::process::id()));
    std::fs::File::create(&path).unwrap().write_all(file).unwrap();
    let m = MemoryManifest {
        kind: SnapshotKind::Incremental,
        parent: None,
        guest_bytes,
        pages,
        file_bytes: file.len() as u64,
        blake3: String::new(),
    };
    if let Ok((idx, start)) = read_incremental_index(&path, &m) {
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert!(idx.iter().all(|&p| p < guest_bytes / 4096));
        assert!(start <= file.len() as u64);
    }
});
