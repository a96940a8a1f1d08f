//! The host's Ed25519 key (signs migration manifests) and the API token.
//! Both are created on first start and kept in the data directory, readable
//! by root only.

use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Parses a hex Ed25519 public key.
pub fn parse_public(hex_key: &str) -> Result<VerifyingKey, String> {
    let raw = hex::decode(hex_key.trim()).map_err(|_| "not hex".to_string())?;
    let raw: [u8; 32] = raw.try_into().map_err(|_| "not 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&raw).map_err(|e| e.to_string())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Creates `dir` (and its parents) and makes it private to its owner (0700),
/// tightening an existing one: a data dir holds keys, tokens, tenant
/// settings and guest memory images.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Sets this process's file-creation mask to 0077, so every file and
/// directory it (or any child: monitors, QEMU, SQLite's WAL) creates is
/// private to its owner.
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Loads `dir/host.key`, creating it (and `dir/host.pub`) if missing.
pub fn host_key(dir: &Path) -> std::io::Result<SigningKey> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("host.key");
    if !path.exists() {
        let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        write_private(&path, &hex::encode(key.to_bytes()))?;
        std::fs::write(
            dir.join("host.pub"),
            hex::encode(key.verifying_key().to_bytes()),
        )?;
    }
    let text = std::fs::read_to_string(&path)?;
    let raw = hex::decode(text.trim())
        .ok()
        .and_then(|r| <[u8; 32]>::try_from(r).ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a hex Ed25519 key", path.display()),
            )
        })?;
    Ok(SigningKey::from_bytes(&raw))
}

/// The hex public half of `dir/host.key` (creating the key if missing):
/// what peers put in their configuration.
pub fn host_public_key(dir: &Path) -> std::io::Result<String> {
    Ok(hex::encode(host_key(dir)?.verifying_key().to_bytes()))
}

/// Loads `dir/api-token`, creating a random one if missing.
pub fn api_token(dir: &Path) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("api-token");
    if !path.exists() {
        write_private(&path, &hex::encode(rand::random::<[u8; 24]>()))?;
    }
    let token = std::fs::read_to_string(&path)?.trim().to_string();
    if token.len() < 16 {
        // A short token is guessable, an empty one matches an empty header.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds {} characters; the API token needs at least 16 (delete the file to have one generated)",
                path.display(),
                token.len()
            ),
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        let a = host_key(d.path()).unwrap();
        let b = host_key(d.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let public = std::fs::read_to_string(d.path().join("host.pub")).unwrap();
        assert_eq!(parse_public(&public).unwrap(), a.verifying_key());
        assert_eq!(api_token(d.path()).unwrap(), api_token(d.path()).unwrap());
        assert!(parse_public("00").is_err());
    }
}
