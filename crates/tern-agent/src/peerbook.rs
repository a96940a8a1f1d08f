//! Whom this host migrates with: its peers, from its configuration or,
//! for a host that joined a control plane, from the control plane.
//!
//! A joined agent keeps the peer list its last heartbeat answered in
//! `<data_dir>/shared/peers.json` (written whole, then renamed into place) and its
//! guest processes read that file whenever they look a peer up, so a peer
//! the control plane adds or removes is trusted, or refused, by the agent
//! and by every guest process of the host from the next heartbeat on. The
//! TLS pins follow the list: [`PeerBook::replace`] sets them on the shared
//! identity.

use crate::agent::lock;
use crate::config::{AgentConfig, Peer};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tern_transport::TlsIdentity;

/// The file a joined agent keeps its peers in.
pub fn peers_file(data_dir: &Path) -> PathBuf {
    crate::vmdir::shared_dir(data_dir).join("peers.json")
}

/// The peers of one process (the agent or a guest process).
pub struct PeerBook {
    peers: Mutex<Vec<Peer>>,
    /// Where the list comes from when the host joined a control plane.
    file: Option<PathBuf>,
    tls: Option<TlsIdentity>,
}

/// A peer list that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PeerBookError {
    /// The file could not be read or written.
    #[error("peers file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no valid peer list.
    #[error("peers file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl PeerBook {
    /// The peers `cfg` names, or, for a joined host, those of its peers file.
    pub fn open(cfg: &AgentConfig, tls: Option<TlsIdentity>) -> Result<Self, PeerBookError> {
        let file = cfg
            .control_plane
            .as_ref()
            .map(|_| peers_file(&cfg.data_dir));
        let peers = match &file {
            Some(f) => read(f)?,
            None => cfg.peers.clone(),
        };
        let book = Self {
            peers: Mutex::new(Vec::new()),
            file,
            tls,
        };
        book.set(peers);
        Ok(book)
    }

    /// Re-reads the peers file of a joined host (a guest process does this
    /// before each lookup: the agent rewrites it at every heartbeat).
    pub fn refresh(&self) {
        let Some(f) = &self.file else { return };
        match read(f) {
            Ok(p) => self.set(p),
            Err(e) => tracing::warn!(error = %e, "keeping the peers known before"),
        }
    }

    /// Replaces the list (and writes the file of a joined host). Returns
    /// whether anything changed.
    pub fn replace(&self, peers: Vec<Peer>) -> Result<bool, PeerBookError> {
        if *lock(&self.peers) == peers {
            return Ok(false);
        }
        if let Some(f) = &self.file {
            write(f, &peers)?;
        }
        self.set(peers);
        Ok(true)
    }

    fn set(&self, peers: Vec<Peer>) {
        if let Some(t) = &self.tls {
            let pins: Vec<[u8; 32]> = peers
                .iter()
                .filter_map(|p| p.tls_pin.as_deref())
                .filter_map(|p| tern_transport::tls::parse_pin(p).ok())
                .collect();
            t.set_pins(&pins);
        }
        *lock(&self.peers) = peers;
    }

    /// The peer called `name`.
    pub fn get(&self, name: &str) -> Option<Peer> {
        lock(&self.peers).iter().find(|p| p.name == name).cloned()
    }

    /// The peer whose certificate's public key has this SHA-256 pin.
    pub fn by_pin(&self, pin: &[u8; 32]) -> Option<Peer> {
        lock(&self.peers)
            .iter()
            .find(|p| {
                p.tls_pin
                    .as_deref()
                    .and_then(|t| tern_transport::tls::parse_pin(t).ok())
                    .is_some_and(|q| &q == pin)
            })
            .cloned()
    }

    /// Every peer.
    pub fn all(&self) -> Vec<Peer> {
        lock(&self.peers).clone()
    }
}

fn read(path: &Path) -> Result<Vec<Peer>, PeerBookError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // Joined, no heartbeat answered yet: no peers.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PeerBookError::Io {
                path: path.into(),
                source,
            })
        }
    };
    serde_json::from_str(&text).map_err(|e| PeerBookError::Invalid {
        path: path.into(),
        message: e.to_string(),
    })
}

fn write(path: &Path, peers: &[Peer]) -> Result<(), PeerBookError> {
    let io = |source| PeerBookError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(peers).expect("peers serialise");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> Peer {
        Peer {
            name: name.into(),
            migrate_addr: "127.0.0.1:1".parse().unwrap(),
            key: "ab".repeat(32),
            tls_pin: Some("cd".repeat(32)),
        }
    }

    #[test]
    fn a_joined_host_reads_and_writes_its_peers_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AgentConfig::new("h1");
        cfg.data_dir = dir.path().into();
        cfg.control_plane = Some(crate::config::ControlPlane::new("http://127.0.0.1:1"));
        let book = PeerBook::open(&cfg, None).unwrap();
        assert!(book.all().is_empty());
        assert!(book.replace(vec![peer("h2")]).unwrap());
        assert!(!book.replace(vec![peer("h2")]).unwrap());
        // A guest process opening the same directory sees the list.
        let other = PeerBook::open(&cfg, None).unwrap();
        assert_eq!(other.get("h2").unwrap().name, "h2");
        book.replace(vec![]).unwrap();
        other.refresh();
        assert!(other.get("h2").is_none());
        assert!(other.by_pin(&[0xcd; 32]).is_none());
    }

    #[test]
    fn a_damaged_peers_file_is_refused_not_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AgentConfig::new("h1");
        cfg.data_dir = dir.path().into();
        cfg.control_plane = Some(crate::config::ControlPlane::new("http://127.0.0.1:1"));
        std::fs::create_dir_all(crate::vmdir::shared_dir(dir.path())).unwrap();
        std::fs::write(peers_file(dir.path()), "{not json").unwrap();
        assert!(matches!(
            PeerBook::open(&cfg, None),
            Err(PeerBookError::Invalid { .. })
        ));
    }
}
