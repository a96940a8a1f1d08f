//! A container's checkpoint as one signed archive: CRIU's images and the
//! container's root filesystem, every entry named and hashed (BLAKE3) in a
//! manifest the source host signs (Ed25519).
//!
//! The archive is what crosses the network when a container moves, so its
//! reader trusts nothing it has not checked: the signature is verified
//! against the signer the caller expects before a byte is unpacked; every
//! entry must be in the manifest, no larger than it says, of the kind it
//! says, at a plain relative path; files are hashed as they are written;
//! and the whole lands in a scratch directory that becomes the destination
//! only when every entry has arrived and matched. A forged, corrupted,
//! truncated or padded archive leaves nothing behind.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// Most entries one archive may hold.
pub const MAX_ENTRIES: usize = 1 << 20;

/// What one archive entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes with this BLAKE3 hash (hex).
    File {
        /// Its length.
        size: u64,
        /// BLAKE3 of its content, hex.
        blake3: String,
    },
    /// A symbolic link to `target` (never followed while unpacking).
    Symlink {
        /// Where it points.
        target: String,
    },
}

/// One entry: its kind, and the mode and owner it must have (CRIU checks
/// the modes of what it reopens, the workload its owners).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// What it is.
    #[serde(flatten)]
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

/// What the source signs: which container, and every entry by path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// The container (its VM id).
    pub container: String,
    /// Entries by path relative to the archive's root.
    pub entries: BTreeMap<String, Entry>,
}

/// A manifest, its signer's public key and the signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// The manifest.
    pub manifest: CheckpointManifest,
    /// The signer's Ed25519 public key, hex.
    pub signer: String,
    /// The signature over the manifest's canonical JSON, hex.
    pub signature: String,
}

/// Why an archive was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not signed by the expected host, or not at all.
    #[error("the checkpoint's signature does not verify: {0}")]
    Signature(&'static str),
    /// The archive does not match its manifest.
    #[error("the checkpoint does not match its manifest: {0}")]
    Mismatch(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let what = what.into();
    move |source| CheckpointError::Io { what, source }
}

impl CheckpointManifest {
    fn signed_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serializes")
    }

    /// Signs the manifest as `key`'s host.
    pub fn sign(self, key: &SigningKey) -> SignedCheckpoint {
        let signature = hex::encode(key.sign(&self.signed_bytes()).to_bytes());
        SignedCheckpoint {
            signer: hex::encode(key.verifying_key().to_bytes()),
            manifest: self,
            signature,
        }
    }
}

impl SignedCheckpoint {
    /// Checks that `expected` signed this manifest.
    pub fn verify(&self, expected: &VerifyingKey) -> Result<(), CheckpointError> {
        if self.signer != hex::encode(expected.to_bytes()) {
            return Err(CheckpointError::Signature("signed by another host"));
        }
        let raw = hex::decode(&self.signature)
            .ok()
            .and_then(|r| <[u8; 64]>::try_from(r).ok())
            .ok_or(CheckpointError::Signature("not a 64-byte hex signature"))?;
        expected
            .verify(&self.manifest.signed_bytes(), &Signature::from_bytes(&raw))
            .map_err(|_| CheckpointError::Signature("forged or altered manifest"))
    }
}

/// A path relative to the archive root with plain components only.
fn plain(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Lists `root` (recursively) under the archive prefix `prefix`.
fn walk(
    root: &Path,
    prefix: &str,
    out: &mut Vec<(PathBuf, String)>,
) -> Result<(), CheckpointError> {
    let mut names: Vec<_> = std::fs::read_dir(root)
        .map_err(io(format!("read {}", root.display())))?
        .collect::<Result<_, _>>()
        .map_err(io(format!("read {}", root.display())))?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}/{name}");
        let ty = e.file_type().map_err(io(format!("stat {rel}")))?;
        out.push((e.path(), rel.clone()));
        if ty.is_dir() {
            walk(&e.path(), &rel, out)?;
        }
    }
    Ok(())
}

/// Every file of `parts` (archive prefix, directory), in archive order.
fn listing(parts: &[(&str, &Path)]) -> Result<Vec<(PathBuf, String)>, CheckpointError> {
    let mut files = Vec::new();
    for (prefix, dir) in parts {
        files.push((dir.to_path_buf(), (*prefix).to_string()));
        walk(dir, prefix, &mut files)?;
    }
    Ok(files)
}

/// BLAKE3 of a file, read in blocks (never whole into memory).
fn hash_file(path: &Path, rel: &str) -> Result<(u64, String), CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(io(format!("open {rel}")))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(format!("read {rel}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finalize().to_hex().to_string()))
}

/// The manifest of `parts` (archive prefix, directory) as
/// [`write_archive`] will write them: every entry's kind, size, hash, mode
/// and owner. Sockets, devices and FIFOs are left out (a container's rootfs
/// has none that a restore needs; CRIU recreates what it saved).
pub fn manifest(
    container: &str,
    parts: &[(&str, &Path)],
) -> Result<CheckpointManifest, CheckpointError> {
    use std::os::unix::fs::MetadataExt;
    let mut entries = BTreeMap::new();
    for (path, rel) in listing(parts)? {
        let meta = std::fs::symlink_metadata(&path).map_err(io(format!("stat {rel}")))?;
        let kind = if meta.is_dir() {
            EntryKind::Dir
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io(format!("readlink {rel}")))?;
            EntryKind::Symlink {
                target: target.to_string_lossy().into_owned(),
            }
        } else if meta.is_file() {
            let (size, blake3) = hash_file(&path, &rel)?;
            EntryKind::File { size, blake3 }
        } else {
            continue;
        };
        let entry = Entry {
            kind,
            mode: meta.mode() & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
        };
        entries.insert(rel, entry);
    }
    Ok(CheckpointManifest {
        container: container.to_string(),
        entries,
    })
}

/// The most bytes the archive of `manifest` takes (headers, long-name
/// extensions and padding included): what a receiver may bound it by.
pub fn archive_bound(manifest: &CheckpointManifest) -> u64 {
    let per_entry: u64 = manifest
        .entries
        .iter()
        .map(|(rel, e)| {
            let body = match &e.kind {
                EntryKind::File { size, .. } => size.div_ceil(512) * 512,
                _ => 0,
            };
            // A header, and for long names or link targets a GNU extension
            // header with the name in blocks of its own.
            let long = match &e.kind {
                EntryKind::Symlink { target } => target.len() as u64,
                _ => 0,
            } + rel.len() as u64;
            512 + 2 * (512 + long.div_ceil(512) * 512) + body
        })
        .sum();
    per_entry + 10240
}

/// Writes the entries of `manifest` from `parts` as one tar stream to
/// `out` (the files must not change between [`manifest`] and this: the
/// receiver checks every one against it).
pub fn write_archive(
    parts: &[(&str, &Path)],
    manifest: &CheckpointManifest,
    out: impl Write,
) -> Result<(), CheckpointError> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    for (path, rel) in listing(parts)? {
        if !manifest.entries.contains_key(&rel) {
            continue;
        }
        tar.append_path_with_name(&path, &rel)
            .map_err(io(format!("archive {rel}")))?;
    }
    tar.into_inner()
        .map_err(io("finish the archive"))?
        .flush()
        .map_err(io("flush the archive"))
}

/// Writes the directories `parts` (archive prefix, directory) as one tar
/// stream to `out`, and returns the manifest of what was written, signed by
/// `key` ([`manifest`], then [`write_archive`]).
pub fn pack(
    container: &str,
    parts: &[(&str, &Path)],
    out: impl Write,
    key: &SigningKey,
) -> Result<SignedCheckpoint, CheckpointError> {
    let m = manifest(container, parts)?;
    write_archive(parts, &m, out)?;
    Ok(m.sign(key))
}

/// Unpacks an archive into `dest` (which must not exist yet) after checking
/// that `expected` signed its manifest; every entry is checked against the
/// manifest on the way. On any error nothing is left at `dest`.
pub fn unpack(
    archive: impl Read,
    signed: &SignedCheckpoint,
    expected: &VerifyingKey,
    dest: &Path,
) -> Result<(), CheckpointError> {
    signed.verify(expected)?;
    if signed.manifest.entries.len() > MAX_ENTRIES {
        return Err(CheckpointError::Mismatch("too many entries".into()));
    }
    let scratch = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io(format!("create {}", scratch.display())))?;
    match unpack_into(archive, &signed.manifest, &scratch) {
        Ok(()) => {
            std::fs::rename(&scratch, dest).map_err(io(format!("rename to {}", dest.display())))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Err(e)
        }
    }
}

fn unpack_into(
    archive: impl Read,
    manifest: &CheckpointManifest,
    scratch: &Path,
) -> Result<(), CheckpointError> {
    let mut seen = std::collections::BTreeSet::new();
    // Directories this archive made: every entry's parent must be one, so
    // no entry is ever written through a symlink an earlier entry made.
    let mut dirs = std::collections::BTreeSet::from([String::new()]);
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().map_err(io("read the archive"))? {
        let mut entry = entry.map_err(io("read the archive"))?;
        let path = entry
            .path()
            .map_err(io("read an entry's path"))?
            .into_owned();
        let rel = plain(&path)
            .ok_or_else(|| CheckpointError::Mismatch(format!("unsafe path {}", path.display())))?;
        let want = manifest
            .entries
            .get(&rel)
            .ok_or_else(|| CheckpointError::Mismatch(format!("{rel} is not in the manifest")))?;
        if !seen.insert(rel.clone()) {
            return Err(CheckpointError::Mismatch(format!("{rel} appears twice")));
        }
        let parent = rel.rsplit_once('/').map_or("", |(p, _)| p);
        if !dirs.contains(parent) {
            return Err(CheckpointError::Mismatch(format!(
                "{rel} comes before its directory, or under something else"
            )));
        }
        let target = scratch.join(&rel);
        let ty = entry.header().entry_type();
        check_header(entry.header(), want, &rel)?;
        match &want.kind {
            EntryKind::Dir if ty.is_dir() => {
                std::fs::create_dir(&target).map_err(io(format!("create {rel}")))?;
                set_mode(&target, want.mode, &rel)?;
                dirs.insert(rel.clone());
            }
            EntryKind::Symlink { target: to } if ty.is_symlink() => {
                let link = entry.link_name().map_err(io(format!("read link {rel}")))?;
                if link.as_deref().map(|l| l.to_string_lossy().into_owned()) != Some(to.clone()) {
                    return Err(CheckpointError::Mismatch(format!("{rel} points elsewhere")));
                }
                std::os::unix::fs::symlink(to, &target).map_err(io(format!("link {rel}")))?;
            }
            EntryKind::File { size, blake3: hash } if ty.is_file() => {
                if entry
                    .header()
                    .size()
                    .map_err(io(format!("size of {rel}")))?
                    != *size
                {
                    return Err(CheckpointError::Mismatch(format!(
                        "{rel} has the wrong size"
                    )));
                }
                copy_hashed(&mut entry, &target, &rel, *size, hash)?;
                set_mode(&target, want.mode, &rel)?;
            }
            kind => {
                return Err(CheckpointError::Mismatch(format!(
                    "{rel} is not a {kind:?}"
                )))
            }
        }
        let (uid, gid) = (u32::try_from(want.uid).ok(), u32::try_from(want.gid).ok());
        std::os::unix::fs::lchown(&target, uid, gid).map_err(io(format!("chown {rel}")))?;
    }
    if let Some(missing) = manifest.entries.keys().find(|k| !seen.contains(*k)) {
        return Err(CheckpointError::Mismatch(format!("{missing} is missing")));
    }
    Ok(())
}

/// The tar header must say what the manifest says of mode and owner.
fn check_header(h: &tar::Header, want: &Entry, rel: &str) -> Result<(), CheckpointError> {
    let mode = h.mode().map_err(io(format!("mode of {rel}")))? & 0o7777;
    let uid = h.uid().map_err(io(format!("owner of {rel}")))?;
    let gid = h.gid().map_err(io(format!("group of {rel}")))?;
    let symlink = matches!(want.kind, EntryKind::Symlink { .. });
    if (!symlink && mode != want.mode) || uid != want.uid || gid != want.gid {
        return Err(CheckpointError::Mismatch(format!(
            "{rel} has another mode or owner than the manifest's"
        )));
    }
    Ok(())
}

fn set_mode(target: &Path, mode: u32, rel: &str) -> Result<(), CheckpointError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {rel}")))
}

/// Copies exactly `size` bytes into a new file at `target` (its parent is
/// a directory this archive made), checking their hash.
fn copy_hashed(
    from: &mut impl Read,
    target: &Path,
    rel: &str,
    size: u64,
    want: &str,
) -> Result<(), CheckpointError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(io(format!("create {rel}")))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = from
            .read(&mut buf[..left.min(64 * 1024) as usize])
            .map_err(io(format!("read {rel}")))?;
        if n == 0 {
            return Err(CheckpointError::Mismatch(format!("{rel} is truncated")));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(io(format!("write {rel}")))?;
        left -= n as u64;
    }
    if hasher.finalize().to_hex().as_str() != want {
        return Err(CheckpointError::Mismatch(format!(
            "{rel} has the wrong hash"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// A small tree: a file, a nested file, a symlink, an empty dir.
    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("run/empty")).unwrap();
        std::fs::write(root.join("pages-1.img"), vec![7u8; 100_000]).unwrap();
        std::fs::write(root.join("run/counter"), b"42\n").unwrap();
        std::os::unix::fs::symlink("counter", root.join("run/link")).unwrap();
    }

    fn packed(dir: &Path) -> (Vec<u8>, SignedCheckpoint) {
        let src = dir.join("src");
        tree(&src);
        let mut bytes = Vec::new();
        let signed = pack("vm-1", &[("images", src.as_path())], &mut bytes, &key(1)).unwrap();
        (bytes, signed)
    }

    #[test]
    fn a_packed_checkpoint_unpacks_whole_for_its_signer() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, signed) = packed(dir.path());
        assert!(signed.manifest.entries.contains_key("images/run/link"));
        let dest = dir.path().join("out");
        unpack(&bytes[..], &signed, &key(1).verifying_key(), &dest).unwrap();
        let d = dest.join("images");
        assert_eq!(
            std::fs::read(d.join("pages-1.img")).unwrap(),
            vec![7u8; 100_000]
        );
        assert_eq!(std::fs::read(d.join("run/link")).unwrap(), b"42\n");
        assert!(d.join("run/empty").is_dir());
    }

    fn refused(bytes: &[u8], signed: &SignedCheckpoint, signer: u8, dir: &Path) -> String {
        let dest = dir.join(format!("out-{}", rand_name()));
        let e = unpack(bytes, signed, &key(signer).verifying_key(), &dest).unwrap_err();
        assert!(!dest.exists(), "nothing at the destination after {e}");
        assert!(!dest.with_extension("partial").exists());
        e.to_string()
    }

    fn rand_name() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        N.fetch_add(1, Ordering::Relaxed).to_string()
    }

    #[test]
    fn forged_altered_and_damaged_checkpoints_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, signed) = packed(dir.path());
        let d = dir.path();

        // Another host's key, or a manifest changed after signing.
        assert!(refused(&bytes, &signed, 2, d).contains("another host"));
        let mut altered = signed.clone();
        altered.manifest.container = "vm-2".into();
        assert!(refused(&bytes, &altered, 1, d).contains("forged"));
        // Re-signed by an impostor claiming to be host 1.
        let mut impostor = signed.manifest.clone().sign(&key(3));
        impostor.signer = signed.signer.clone();
        assert!(refused(&bytes, &impostor, 1, d).contains("forged"));

        // One flipped byte in a file's content.
        let mut flipped = bytes.clone();
        let at = flipped.windows(4).position(|w| w == [7, 7, 7, 7]).unwrap() + 100;
        flipped[at] ^= 1;
        assert!(refused(&flipped, &signed, 1, d).contains("wrong hash"));

        // Cut short.
        let cut = &bytes[..bytes.len() / 2];
        let e = refused(cut, &signed, 1, d);
        assert!(
            e.contains("truncated") || e.contains("missing") || e.contains("read"),
            "{e}"
        );

        // An entry the manifest does not name.
        let mut extra = Vec::new();
        {
            let mut t = tar::Builder::new(&mut extra);
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            t.append_data(&mut h, "images/evil", &b"bad"[..]).unwrap();
            t.finish().unwrap();
        }
        assert!(refused(&extra, &signed, 1, d).contains("not in the manifest"));
    }

    fn root_owned(kind: EntryKind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn nothing_is_written_through_a_symlink_even_one_the_signer_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        let mut entries = BTreeMap::new();
        {
            let mut t = tar::Builder::new(&mut bytes);
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            t.append_data(&mut h.clone(), "images", std::io::empty())
                .unwrap();
            entries.insert("images".to_string(), root_owned(EntryKind::Dir, 0o755));
            let mut l = tar::Header::new_gnu();
            l.set_entry_type(tar::EntryType::Symlink);
            l.set_size(0);
            l.set_mode(0o777);
            l.set_uid(0);
            l.set_gid(0);
            t.append_link(&mut l, "images/out", dir.path()).unwrap();
            let target = dir.path().to_string_lossy().into_owned();
            entries.insert(
                "images/out".into(),
                root_owned(EntryKind::Symlink { target }, 0),
            );
            let mut f = tar::Header::new_gnu();
            f.set_size(3);
            f.set_mode(0o644);
            f.set_uid(0);
            f.set_gid(0);
            t.append_data(&mut f, "images/out/planted", &b"bad"[..])
                .unwrap();
            let blake3 = blake3::hash(b"bad").to_hex().to_string();
            let file = EntryKind::File { size: 3, blake3 };
            entries.insert("images/out/planted".into(), root_owned(file, 0o644));
            t.finish().unwrap();
        }
        let signed = CheckpointManifest {
            container: "vm-1".into(),
            entries,
        }
        .sign(&key(1));
        let e = refused(&bytes, &signed, 1, dir.path());
        assert!(e.contains("under something else"), "{e}");
        assert!(!dir.path().join("planted").exists());
    }

    #[test]
    fn the_archive_stays_within_its_bound_with_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        tree(&src);
        let deep = src.join("d".repeat(120)).join("e".repeat(120));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f".repeat(200)), vec![7u8; 5000]).unwrap();
        std::os::unix::fs::symlink("t".repeat(300), deep.join("link")).unwrap();
        let mut bytes = Vec::new();
        let signed = pack("vm-1", &[("images", src.as_path())], &mut bytes, &key(1)).unwrap();
        assert!(bytes.len() as u64 <= archive_bound(&signed.manifest));
        let out = dir.path().join("out");
        unpack(&bytes[..], &signed, &key(1).verifying_key(), &out).unwrap();
    }

    #[test]
    fn paths_that_leave_the_archive_are_refused() {
        assert_eq!(
            plain(Path::new("images/a/b")).as_deref(),
            Some("images/a/b")
        );
        assert_eq!(plain(Path::new("./images/a")).as_deref(), Some("images/a"));
        assert!(plain(Path::new("../etc/passwd")).is_none());
        assert!(plain(Path::new("/etc/passwd")).is_none());
        assert!(plain(Path::new("images/../../x")).is_none());
        assert!(plain(Path::new("")).is_none());
    }
}
