//! Writes valid page frames (every encoding) as seeds for the fuzzer:
//! `cargo run -p tern-pagecodec --example fuzz_seeds -- fuzz/seeds/page_frame`.

use tern_pagecodec::{Compression, Encoder, EncoderConfig, PAGE_SIZE};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds/page_frame".into());
    std::fs::create_dir_all(&dir).expect("seed dir");
    let mut mem = vec![0u8; 16 * PAGE_SIZE];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = match (i / PAGE_SIZE) % 4 {
            0 => 0,
            1 => (i * 31 % 251) as u8,
            _ => b"tern page codec "[i % 16],
        };
    }
    for (n, comp) in [Compression::None, Compression::Lz4, Compression::Zstd(1)]
        .into_iter()
        .enumerate()
    {
        let mut enc = Encoder::new(EncoderConfig {
            compression: comp,
            ..Default::default()
        });
        let mut f = Vec::new();
        enc.encode_frame(
            (0..16u64)
                .step_by(2)
                .map(|p| (p, &mem[p as usize * PAGE_SIZE..][..PAGE_SIZE])),
            &mut f,
        );
        std::fs::write(format!("{dir}/first-{n}"), &f).expect("write seed");
        mem[2 * PAGE_SIZE + 5] ^= 0xff;
        let mut f = Vec::new();
        enc.encode_frame(
            [0u64, 2, 4].map(|p| (p, &mem[p as usize * PAGE_SIZE..][..PAGE_SIZE])),
            &mut f,
        );
        std::fs::write(format!("{dir}/second-{n}"), &f).expect("write seed");
    }
}
