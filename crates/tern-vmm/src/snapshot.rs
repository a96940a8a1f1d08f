//! Snapshots on disk: a state file and a memory file per snapshot directory.
//!
//! `state.tern` is a 56-byte header (magic `TERNSNAP`, format version, body
//! length, BLAKE3 of the body) and a JSON body: the machine's state tree and
//! a manifest of the memory file (kind, size, BLAKE3). A snapshot's id is the
//! BLAKE3 of its body.
//!
//! `memory.tern` is either the whole guest RAM, byte for byte (a *full*
//! snapshot; restore maps it copy-on-write, so no page is read until the
//! guest touches it; zero pages are left as holes), or an *incremental*
//! page set: magic `TERNMEMI`, page count, ascending page numbers, padding to
//! 4 KiB, then the pages. An incremental snapshot names its parent's id;
//! restore takes a full snapshot and the incrementals after it, in order, and
//! checks that each names the one before.
//!
//! Everything is checked before anything is loaded: magic, version, lengths,
//! hashes, page numbers, chain links, machine shape. A file that fails any
//! check is refused with an error that says which and why.

use crate::machine::{Machine, MachineConfig, MachineShape, RunState};
use crate::memory::{self, Backing, DirtyBitmap, PAGE_SIZE};
use crate::state::MachineState;
use crate::VmmError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "state.tern";
/// Memory file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.tern";
/// Snapshot file format version this monitor reads and writes.
pub const SNAPSHOT_VERSION: u32 = 1;

const STATE_MAGIC: &[u8; 8] = b"TERNSNAP";
const INCR_MAGIC: &[u8; 8] = b"TERNMEMI";
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// Refuse state bodies beyond this (a state tree is tens of KiB per vCPU).
const MAX_BODY: u64 = 64 << 20;

/// Full or incremental.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// All of guest RAM.
    Full,
    /// Pages written since the previous snapshot of this machine.
    Incremental,
}

/// What the memory file of a snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryManifest {
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// The snapshot this one builds on (incremental only).
    pub parent: Option<String>,
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// Pages the file holds.
    pub pages: u64,
    /// Size of the memory file in bytes.
    pub file_bytes: u64,
    /// BLAKE3 of the memory file, hex.
    pub blake3: String,
}

/// The JSON body of a state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotBody {
    /// When it was taken (Unix ms).
    pub created_unix_ms: u64,
    /// The memory file.
    pub memory: MemoryManifest,
    /// The machine state tree.
    pub state: MachineState,
}

/// What taking a snapshot did and cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot's id (BLAKE3 of its state body).
    pub id: String,
    /// Full or incremental.
    pub kind: SnapshotKind,
    /// Pages written to the memory file (full: pages that are not zero).
    pub pages: u64,
    /// Memory file size (apparent).
    pub file_bytes: u64,
    /// Pausing the vCPUs.
    pub pause_us: u64,
    /// Saving the state tree (after pause).
    pub save_state_us: u64,
    /// The guest was stopped for this long in all.
    pub downtime_us: u64,
}

/// A snapshot read from disk and checked.
#[derive(Clone, Debug)]
pub struct LoadedSnapshot {
    /// Its directory.
    pub dir: PathBuf,
    /// Its id.
    pub id: String,
    /// Its body.
    pub body: SnapshotBody,
}

fn snap_err(path: &Path, why: impl std::fmt::Display) -> VmmError {
    VmmError::Snapshot(format!("{}: {why}", path.display()))
}

/// Reads and checks a state file (header, length, hash, JSON).
pub fn read_state_file(dir: &Path) -> Result<LoadedSnapshot, VmmError> {
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(|e| snap_err(&path, e))?;
    let mut bytes = Vec::new();
    f.take(HEADER_LEN as u64 + MAX_BODY + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| snap_err(&path, e))?;
    let (id, body) = decode_state(&bytes).map_err(|why| snap_err(&path, why))?;
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        id,
        body,
    })
}

/// Checks and decodes the bytes of a state file: returns the snapshot id
/// and body, or why the bytes are refused. Never panics on any input (it is
/// fuzzed: `fuzz/fuzz_targets/snapshot_state.rs`).
pub fn decode_state(bytes: &[u8]) -> Result<(String, SnapshotBody), String> {
    let hdr: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or("truncated: shorter than the state header")?;
    if &hdr[..8] != STATE_MAGIC {
        return Err("not a tern state file (bad magic)".into());
    }
    let version = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if version != SNAPSHOT_VERSION {
        return Err(format!(
            "format version {version}; this monitor reads version {SNAPSHOT_VERSION}"
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&hdr[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_BODY {
        return Err(format!("claims a {len}-byte body"));
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(format!(
            "body is {} bytes, the header says {len} (truncated or padded)",
            body.len()
        ));
    }
    let hash = blake3::hash(body);
    if hash.as_bytes() != &hdr[24..56] {
        return Err("body checksum mismatch (corrupted)".into());
    }
    let body: SnapshotBody = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    if body.state.version != crate::state::STATE_FORMAT_VERSION {
        return Err(format!(
            "state tree version {} is not supported",
            body.state.version
        ));
    }
    Ok((hash.to_hex().to_string(), body))
}

fn write_state_file(dir: &Path, body: &SnapshotBody) -> Result<String, VmmError> {
    let json = serde_json::to_vec(body).map_err(|e| VmmError::State(e.to_string()))?;
    let hash = blake3::hash(&json);
    let mut out = Vec::with_capacity(HEADER_LEN + json.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(&json);
    // Write then rename, so a crash never leaves a half state file in place.
    let tmp = dir.join(".state.tern.tmp");
    let path = dir.join(STATE_FILE);
    std::fs::write(&tmp, &out).map_err(|e| snap_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| snap_err(&path, e))?;
    Ok(hash.to_hex().to_string())
}

/// Guest RAM as one byte slice (the machine has a single region at 0).
fn guest_bytes(m: &Machine) -> Result<&[u8], VmmError> {
    let regions = memory::host_regions(m.memory());
    match regions.as_slice() {
        [(0, ptr, len)] => {
            // SAFETY: the mapping is owned by the machine's GuestMem and lives as
            // long as `m`; the vCPUs are paused while snapshots read it.
            Ok(unsafe { std::slice::from_raw_parts(*ptr as *const u8, *len) })
        }
        _ => Err(VmmError::Memory("expected one RAM region at 0".into())),
    }
}

fn write_full_memory(m: &Machine, path: &Path) -> Result<(u64, MemoryManifest), VmmError> {
    let ram = guest_bytes(m)?;
    let f = File::create(path).map_err(|e| snap_err(path, e))?;
    f.set_len(ram.len() as u64).map_err(|e| snap_err(path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut written = 0u64;
    // Write runs of non-zero pages; zero pages stay holes.
    let page = PAGE_SIZE as usize;
    let mut run_start: Option<usize> = None;
    let pages = ram.len() / page;
    for i in 0..=pages {
        let nonzero = i < pages && !tern_pagecodec::is_zero_page(&ram[i * page..(i + 1) * page]);
        match (nonzero, run_start) {
            (true, None) => run_start = Some(i),
            (false, Some(s)) => {
                f.write_all_at(&ram[s * page..i * page], (s * page) as u64)
                    .map_err(|e| snap_err(path, e))?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    hasher.update(ram);
    Ok((
        written,
        MemoryManifest {
            kind: SnapshotKind::Full,
            parent: None,
            guest_bytes: ram.len() as u64,
            pages: written,
            file_bytes: ram.len() as u64,
            blake3: hasher.finalize().to_hex().to_string(),
        },
    ))
}

fn write_incremental_memory(
    m: &Machine,
    path: &Path,
    dirty: &DirtyBitmap,
    parent: String,
) -> Result<(u64, MemoryManifest), VmmError> {
    let ram = guest_bytes(m)?;
    let pages: Vec<u64> = dirty.pages().collect();
    let mut head = Vec::with_capacity(24 + pages.len() * 8);
    head.extend_from_slice(INCR_MAGIC);
    head.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in &pages {
        head.extend_from_slice(&p.to_le_bytes());
    }
    head.resize(head.len().next_multiple_of(PAGE_SIZE as usize), 0);
    let mut hasher = blake3::Hasher::new();
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        File::create(path).map_err(|e| snap_err(path, e))?,
    );
    f.write_all(&head).map_err(|e| snap_err(path, e))?;
    hasher.update(&head);
    for &p in &pages {
        let at = (p * PAGE_SIZE) as usize;
        let page = ram
            .get(at..at + PAGE_SIZE as usize)
            .ok_or_else(|| VmmError::Memory(format!("dirty page {p} is outside guest RAM")))?;
        f.write_all(page).map_err(|e| snap_err(path, e))?;
        hasher.update(page);
    }
    f.flush().map_err(|e| snap_err(path, e))?;
    let file_bytes = head.len() as u64 + pages.len() as u64 * PAGE_SIZE;
    Ok((
        pages.len() as u64,
        MemoryManifest {
            kind: SnapshotKind::Incremental,
            parent: Some(parent),
            guest_bytes: ram.len() as u64,
            pages: pages.len() as u64,
            file_bytes,
            blake3: hasher.finalize().to_hex().to_string(),
        },
    ))
}

impl Machine {
    /// Takes a snapshot into `dir` (created if missing). The guest is paused
    /// for state and memory, then resumed if it was running. A full snapshot
    /// starts the dirty log so the next one can be incremental; an
    /// incremental one needs an earlier snapshot of this machine.
    pub fn snapshot(&mut self, dir: &Path, kind: SnapshotKind) -> Result<SnapshotInfo, VmmError> {
        let parent = match (kind, &self.snapshot_parent) {
            (SnapshotKind::Incremental, None) => {
                return Err(VmmError::Config(
                    "an incremental snapshot needs an earlier snapshot of this machine".into(),
                ))
            }
            (SnapshotKind::Incremental, Some(p)) => Some(p.clone()),
            (SnapshotKind::Full, _) => None,
        };
        std::fs::create_dir_all(dir).map_err(|e| snap_err(dir, e))?;
        let was_running = self.run_state() == RunState::Running;
        let t0 = Instant::now();
        let pause = if was_running {
            self.pause()?
        } else {
            Duration::ZERO
        };
        let result = self.snapshot_paused(dir, parent);
        if was_running {
            self.resume()?;
        }
        let (id, pages, file_bytes, save_state) = result?;
        Ok(SnapshotInfo {
            id,
            kind,
            pages,
            file_bytes,
            pause_us: pause.as_micros() as u64,
            save_state_us: save_state.as_micros() as u64,
            downtime_us: t0.elapsed().as_micros() as u64,
        })
    }

    fn snapshot_paused(
        &mut self,
        dir: &Path,
        parent: Option<String>,
    ) -> Result<(String, u64, u64, Duration), VmmError> {
        let t = Instant::now();
        let state = self.save_state()?;
        let save_state = t.elapsed();
        let mem_path = dir.join(MEMORY_FILE);
        let (pages, manifest) = match parent {
            None => {
                let r = write_full_memory(self, &mem_path)?;
                // From here on, track writes for the next incremental snapshot.
                if self.dirty_logging() {
                    self.sync_dirty_log()?;
                } else {
                    self.start_dirty_log()?;
                }
                r
            }
            Some(p) => {
                let dirty = self.sync_dirty_log()?;
                write_incremental_memory(self, &mem_path, &dirty, p)?
            }
        };
        let file_bytes = manifest.file_bytes;
        let body = SnapshotBody {
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            memory: manifest,
            state,
        };
        let id = write_state_file(dir, &body)?;
        self.snapshot_parent = Some(id.clone());
        Ok((id, pages, file_bytes, save_state))
    }
}

/// How a restore goes.
pub struct RestoreOptions {
    /// Check every memory file's BLAKE3 before loading (reads each file once).
    pub verify_memory: bool,
    /// Devices and RAM backing for the new machine (memory and vCPUs come
    /// from the snapshot; the values here are ignored).
    pub config: MachineConfig,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            verify_memory: true,
            config: MachineConfig::default(),
        }
    }
}

fn hash_file(path: &Path) -> Result<String, VmmError> {
    let mut f = File::open(path).map_err(|e| snap_err(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| snap_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Reads and checks an incremental memory file; returns its page numbers and
/// where the page data starts. Every size comes from files a forger may
/// have written, so the arithmetic is checked and nothing is allocated
/// before the file's length agrees with its page count.
pub fn read_incremental_index(
    path: &Path,
    m: &MemoryManifest,
) -> Result<(Vec<u64>, u64), VmmError> {
    let mut f = File::open(path).map_err(|e| snap_err(path, e))?;
    let len = f.metadata().map_err(|e| snap_err(path, e))?.len();
    if len != m.file_bytes {
        return Err(snap_err(
            path,
            format!("is {len} bytes, the manifest says {}", m.file_bytes),
        ));
    }
    let mut head = [0u8; 24];
    f.read_exact(&mut head)
        .map_err(|_| snap_err(path, "truncated page-set header"))?;
    if &head[..8] != INCR_MAGIC {
        return Err(snap_err(path, "not a tern page set (bad magic)"));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != SNAPSHOT_VERSION {
        return Err(snap_err(
            path,
            format!("page-set version {version} is not supported"),
        ));
    }
    let count = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    let guest_pages = m.guest_bytes / PAGE_SIZE;
    if count != m.pages || count > guest_pages {
        return Err(snap_err(
            path,
            format!(
                "holds {count} pages, the manifest says {} (guest has {guest_pages})",
                m.pages
            ),
        ));
    }
    let data_start = count
        .checked_mul(8)
        .and_then(|b| b.checked_add(24))
        .and_then(|b| b.checked_next_multiple_of(PAGE_SIZE));
    let expected = data_start.and_then(|d| d.checked_add(count.checked_mul(PAGE_SIZE)?));
    let (Some(data_start), Some(expected)) = (data_start, expected) else {
        return Err(snap_err(path, "page count overflows"));
    };
    if expected != len {
        return Err(snap_err(path, "length does not match its page count"));
    }
    let mut idx = vec![0u8; (count * 8) as usize];
    f.read_exact(&mut idx).map_err(|e| snap_err(path, e))?;
    let pages: Vec<u64> = idx
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if pages.windows(2).any(|w| w[0] >= w[1]) || pages.last().is_some_and(|&p| p >= guest_pages) {
        return Err(snap_err(
            path,
            "page numbers out of order or outside guest RAM",
        ));
    }
    Ok((pages, data_start))
}

/// Checks a snapshot chain (a full snapshot, then incrementals each naming
/// the one before) without loading anything.
pub fn check_chain(dirs: &[PathBuf]) -> Result<Vec<LoadedSnapshot>, VmmError> {
    let first = dirs
        .first()
        .ok_or_else(|| VmmError::Config("no snapshot given".into()))?;
    let snaps: Vec<LoadedSnapshot> = dirs
        .iter()
        .map(|d| read_state_file(d))
        .collect::<Result<_, _>>()?;
    if snaps[0].body.memory.kind != SnapshotKind::Full {
        return Err(snap_err(
            first,
            "the first snapshot of a chain must be full",
        ));
    }
    for w in snaps.windows(2) {
        let m = &w[1].body.memory;
        if m.kind != SnapshotKind::Incremental || m.parent.as_deref() != Some(w[0].id.as_str()) {
            return Err(snap_err(
                &w[1].dir,
                format!("is not an incremental snapshot of {}", w[0].dir.display()),
            ));
        }
        if m.guest_bytes != w[0].body.memory.guest_bytes {
            return Err(snap_err(
                &w[1].dir,
                "guest RAM size differs from its parent",
            ));
        }
    }
    Ok(snaps)
}

/// Restores a machine from a snapshot chain into this process. The machine
/// comes back paused; call [`Machine::resume`] to let the guest carry on.
pub fn restore(dirs: &[PathBuf], opts: RestoreOptions) -> Result<Machine, VmmError> {
    let snaps = check_chain(dirs)?;
    let last = snaps.last().expect("check_chain returns at least one");
    let shape: MachineShape = last.body.state.get("machine")?;
    let base = &snaps[0];
    let base_mem = base.dir.join(MEMORY_FILE);
    let mut incrementals = Vec::new();
    for s in &snaps {
        let path = s.dir.join(MEMORY_FILE);
        if s.body.memory.guest_bytes != shape.memory_bytes {
            return Err(snap_err(
                &s.dir,
                "guest RAM size differs from the machine state",
            ));
        }
        if s.body.memory.kind == SnapshotKind::Incremental {
            incrementals.push((path.clone(), read_incremental_index(&path, &s.body.memory)?));
        }
        if opts.verify_memory {
            let h = hash_file(&path)?;
            if h != s.body.memory.blake3 {
                return Err(snap_err(&path, "memory checksum mismatch (corrupted)"));
            }
        }
    }
    let file = File::open(&base_mem).map_err(|e| snap_err(&base_mem, e))?;
    let mem = memory::create(shape.memory_bytes, Backing::SnapshotFile(&file))?;
    // Apply incrementals in order, straight into the private mapping.
    let regions = memory::host_regions(&mem);
    let (_, ptr, len) = regions[0];
    for (path, (pages, data_start)) in &incrementals {
        let f = File::open(path).map_err(|e| snap_err(path, e))?;
        for (i, &p) in pages.iter().enumerate() {
            let at = (p * PAGE_SIZE) as usize;
            if at + PAGE_SIZE as usize > len {
                return Err(snap_err(path, "page outside guest RAM"));
            }
            // SAFETY: `at..at + PAGE_SIZE` lies inside the single mapping of
            // `len` bytes at `ptr` (checked above), which `mem` owns; no vCPU
            // exists yet, so nothing else touches it.
            let page = unsafe { std::slice::from_raw_parts_mut(ptr.add(at), PAGE_SIZE as usize) };
            f.read_exact_at(page, data_start + i as u64 * PAGE_SIZE)
                .map_err(|e| snap_err(path, e))?;
        }
    }
    let mut cfg = opts.config;
    cfg.memory_mib = shape.memory_bytes >> 20;
    cfg.vcpus = shape.vcpus;
    let mut m = Machine::create(cfg, mem)?;
    m.ram_from_file = true;
    m.load_state(&last.body.state)?;
    // Writes are not tracked across processes: the next snapshot of the
    // restored machine starts a new chain with a full one.
    m.snapshot_parent = None;
    m.spawn_vcpus()?;
    Ok(m)
}
