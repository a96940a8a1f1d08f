//! The example actors shipped with tern (WebAssembly text, compiled when an
//! actor is deployed) and builders for their messages.

/// Adds each message (a little-endian i64) to a total; replies the total.
pub const COUNTER: &str = include_str!("../actors/counter.wat");
/// A key-value table that can also grow and write patterns (see the file).
pub const KV: &str = include_str!("../actors/kv.wat");

/// Appends each 16-byte message to a log it can be asked for (see the file).
pub const LOG: &str = include_str!("../actors/log.wat");

/// Messages of the [`LOG`] actor.
pub mod log {
    /// Appends `(a, b)` to the log; the reply is the number of entries.
    pub fn append(a: u64, b: u64) -> Vec<u8> {
        let mut m = a.to_le_bytes().to_vec();
        m.extend_from_slice(&b.to_le_bytes());
        m
    }

    /// Asks for up to `count` entries (at most 4000) from `start`.
    pub fn read(start: u32, count: u32) -> Vec<u8> {
        let mut m = start.to_le_bytes().to_vec();
        m.extend_from_slice(&count.to_le_bytes());
        m
    }

    /// The entries of a reply to [`read`].
    pub fn entries(reply: &[u8]) -> Vec<(u64, u64)> {
        reply
            .chunks_exact(16)
            .map(|c| {
                let n = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
                (n(&c[..8]), n(&c[8..]))
            })
            .collect()
    }
}

/// Messages of the [`KV`] actor.
pub mod kv {
    fn op(code: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len];
        m[0] = code;
        m
    }

    /// Sets `key` (not 0) to `value`.
    pub fn put(key: u64, value: u64) -> Vec<u8> {
        let mut m = op(1, 24);
        m[8..16].copy_from_slice(&key.to_le_bytes());
        m[16..24].copy_from_slice(&value.to_le_bytes());
        m
    }

    /// Reads `key`; the reply is its value.
    pub fn get(key: u64) -> Vec<u8> {
        let mut m = op(2, 16);
        m[8..16].copy_from_slice(&key.to_le_bytes());
        m
    }

    /// Grows linear memory by `pages` of 64 KiB.
    pub fn grow(pages: u32) -> Vec<u8> {
        let mut m = op(3, 8);
        m[4..8].copy_from_slice(&pages.to_le_bytes());
        m
    }

    /// Writes `byte` at `offset`, then `count - 1` more times `stride` apart.
    pub fn touch(offset: u32, count: u32, stride: u32, byte: u8) -> Vec<u8> {
        let mut m = op(4, 17);
        m[4..8].copy_from_slice(&offset.to_le_bytes());
        m[8..12].copy_from_slice(&count.to_le_bytes());
        m[12..16].copy_from_slice(&stride.to_le_bytes());
        m[16] = byte;
        m
    }

    /// Reads the byte at `offset`.
    pub fn peek(offset: u32) -> Vec<u8> {
        let mut m = op(5, 8);
        m[4..8].copy_from_slice(&offset.to_le_bytes());
        m
    }
}

/// The bank ledger actor, written in C (`actors/ledger.c`): it is built by
/// `scripts/build-actors.sh` (clang for wasm32), so it is found, not
/// embedded: in `$TERN_ACTORS_WASM_DIR`, else `target/actors` of the
/// workspace. `None` where it has not been built.
pub fn ledger_wasm() -> Option<Vec<u8>> {
    let dir = std::env::var_os("TERN_ACTORS_WASM_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/actors")
        });
    std::fs::read(dir.join("ledger.wasm")).ok()
}

/// Messages of the ledger actor (see `actors/ledger.c`).
pub mod ledger {
    fn op(code: u8, words: &[u64]) -> Vec<u8> {
        let mut m = vec![0u8; 8];
        m[0] = code;
        for w in words {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m
    }

    /// Adds `amount` to `account` (1 to 1024); the reply is its balance.
    pub fn deposit(account: u64, amount: i64) -> Vec<u8> {
        op(1, &[account, amount as u64])
    }

    /// Moves `amount` from one account to another; the reply is the
    /// payer's balance, or the actor's error -2 when it has too little.
    pub fn transfer(from: u64, to: u64, amount: i64) -> Vec<u8> {
        op(2, &[from, to, amount as u64])
    }

    /// The balance of `account`.
    pub fn balance(account: u64) -> Vec<u8> {
        op(3, &[account])
    }

    /// The sum of all balances and the number of transfers made.
    pub fn audit() -> Vec<u8> {
        vec![4]
    }

    /// An `i64` reply.
    pub fn amount(reply: &[u8]) -> i64 {
        i64::from_le_bytes(reply[..8].try_into().expect("8 bytes"))
    }
}
