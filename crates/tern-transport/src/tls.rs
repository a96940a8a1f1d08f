//! TLS 1.3 with mutual authentication and SPKI pinning.
//!
//! Both sides present certificates from the host CA, and both check that the
//! peer's certificate chains to that CA *and* that its public key (SHA-256 of
//! the SubjectPublicKeyInfo) is one of the pins they were given: a host talks
//! only to the peers it was told about, even if the CA signed others.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A TLS set-up problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file did not hold what it should.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A pin is not 64 hex digits.
    #[error("bad SPKI pin `{0}`: expected 64 hex digits (SHA-256)")]
    BadPin(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] TlsError),
    /// The CA could not be used for verification.
    #[error("CA verifier: {0}")]
    Verifier(String),
}

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo: what a pin is.
pub fn spki_sha256(cert_der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(sha256(cert.public_key().raw))
}

/// Parses a pin written as 64 hex digits.
pub fn parse_pin(s: &str) -> Result<[u8; 32], TlsSetupError> {
    let v = hex::decode(s.trim()).map_err(|_| TlsSetupError::BadPin(s.to_owned()))?;
    v.try_into()
        .map_err(|_| TlsSetupError::BadPin(s.to_owned()))
}

/// This host's identity and whom it trusts.
#[derive(Clone)]
pub struct TlsIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    pins: Pins,
}

/// The peers' pins, shared by an identity and every configuration made
/// from it: a host that learns its peers while it runs (from a control
/// plane) trusts a new peer, and stops trusting a removed one, in every
/// listener and client at once.
#[derive(Clone, Debug, Default)]
struct Pins(Arc<std::sync::RwLock<BTreeSet<[u8; 32]>>>);

impl Pins {
    fn contains(&self, pin: &[u8; 32]) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(pin)
    }
}

fn pem_items(path: &Path) -> Result<Vec<rustls_pemfile::Item>, TlsSetupError> {
    let data = std::fs::read(path).map_err(|source| TlsSetupError::Io {
        path: path.to_owned(),
        source,
    })?;
    rustls_pemfile::read_all(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::Pem {
            path: path.to_owned(),
            what: e.to_string(),
        })
}

fn certs_in(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = pem_items(path)?
        .into_iter()
        .filter_map(|i| match i {
            rustls_pemfile::Item::X509Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            path: path.to_owned(),
            what: "no certificate in file".into(),
        });
    }
    Ok(certs)
}

/// ring's provider with AES-128-GCM first: a standard TLS 1.3 suite that costs
/// about a third less CPU per byte than AES-256-GCM, which matters when the
/// cipher is the bottleneck of a multi-GB migration.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsIdentity {
    /// Loads this host's certificate and key, the CA, and the peers' pins.
    pub fn load(
        cert: &Path,
        key: &Path,
        ca: &Path,
        pins: &[[u8; 32]],
    ) -> Result<Self, TlsSetupError> {
        let certs = certs_in(cert)?;
        let key_der = pem_items(key)?
            .into_iter()
            .find_map(|i| match i {
                rustls_pemfile::Item::Pkcs8Key(k) => Some(PrivateKeyDer::Pkcs8(k)),
                rustls_pemfile::Item::Sec1Key(k) => Some(PrivateKeyDer::Sec1(k)),
                rustls_pemfile::Item::Pkcs1Key(k) => Some(PrivateKeyDer::Pkcs1(k)),
                _ => None,
            })
            .ok_or_else(|| TlsSetupError::Pem {
                path: key.to_owned(),
                what: "no private key in file".into(),
            })?;
        let mut roots = RootCertStore::empty();
        for c in certs_in(ca)? {
            roots.add(c).map_err(|e| TlsSetupError::Pem {
                path: ca.to_owned(),
                what: e.to_string(),
            })?;
        }
        Ok(Self {
            certs,
            key: Arc::new(key_der),
            roots: Arc::new(roots),
            pins: Pins(Arc::new(std::sync::RwLock::new(
                pins.iter().copied().collect(),
            ))),
        })
    }

    /// Replaces the peers' pins, for this identity, its clones and every
    /// configuration made from them (handshakes already done stand).
    pub fn set_pins(&self, pins: &[[u8; 32]]) {
        *self.pins.0.write().unwrap_or_else(|p| p.into_inner()) = pins.iter().copied().collect();
    }

    /// The pin of this host's own certificate (give it to peers).
    pub fn own_pin(&self) -> Option<[u8; 32]> {
        spki_sha256(&self.certs[0])
    }

    /// Server side: TLS 1.3 only, client certificate required, CA-checked and pinned.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
        let verifier = Arc::new(PinnedClientVerifier {
            inner,
            pins: self.pins.clone(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        cfg.max_early_data_size = 0;
        Ok(Arc::new(cfg))
    }

    /// Client side: TLS 1.3 only, server certificate CA-checked and pinned, our certificate presented.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
        let verifier = Arc::new(PinnedServerVerifier {
            inner,
            pins: self.pins.clone(),
        });
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }
}

fn check_pin(pins: &Pins, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let pin = spki_sha256(cert)
        .ok_or_else(|| TlsError::General("peer certificate does not parse".into()))?;
    if pins.contains(&pin) {
        Ok(())
    } else {
        Err(TlsError::General(format!(
            "peer certificate is not pinned (SPKI SHA-256 {}); this host was not told to trust it",
            hex::encode(pin)
        )))
    }
}

#[derive(Debug)]
struct PinnedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    pins: Pins,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_pin(&self.pins, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct PinnedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Pins,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_pin(&self.pins, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
