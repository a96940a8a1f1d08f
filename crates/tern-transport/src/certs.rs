//! Making a host CA and host certificates (what `tern certs init/issue` runs).
//!
//! Files, all PEM: `ca.pem` + `ca.key` (the CA), `<name>.pem` + `<name>.key`
//! (a host). Host certificates carry the name (and `localhost`, 127.0.0.1) as
//! subject alternative names and are valid for both server and client auth,
//! since every agent both sends and receives migrations.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A certificate-making failure.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused.
    #[error("certificate generation failed: {0}")]
    Gen(#[from] rcgen::Error),
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Refusing to overwrite.
    #[error("{0} already exists; remove it first to make a new one")]
    Exists(PathBuf),
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_owned())
            } else {
                io(e)
            }
        })?;
    f.write_all(text.as_bytes()).map_err(io)
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates `dir/ca.pem` and `dir/ca.key`, valid for ten years.
pub fn init_ca(dir: &Path) -> Result<PathBuf, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "tern host CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(3650);
    let cert = p.self_signed(&key)?;
    let pem = dir.join("ca.pem");
    write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
    write(&pem, &cert.pem(), false)?;
    Ok(pem)
}

/// What [`issue`] made.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Certificate file.
    pub cert: PathBuf,
    /// Key file.
    pub key: PathBuf,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex: what peers pin.
    pub spki_sha256: String,
}

/// Issues a host certificate `out_dir/<name>.pem` (+ `.key`) signed by the CA in
/// `ca_dir`. `valid_for` may be negative-free only; `expired` makes a
/// certificate that expired a day ago (for tests of refusal).
pub fn issue(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
    valid_for: Duration,
    expired: bool,
) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let ca_params = CertificateParams::from_ca_cert_pem(&read(&ca_dir.join("ca.pem"))?)?;
    let ca = ca_params.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let p = host_params(name, valid_for, expired)?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io {
        path: out_dir.to_owned(),
        source,
    })?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        spki_sha256: hex::encode(crate::tls::sha256(&key.public_key_der())),
    })
}

/// What every host certificate says: the name (and `localhost`,
/// 127.0.0.1) as subject alternative names, server and client auth.
fn host_params(
    name: &str,
    valid_for: Duration,
    expired: bool,
) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(vec![name.to_owned(), "localhost".to_owned()])?;
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::hours(1);
        p.not_after =
            now + time::Duration::try_from(valid_for).unwrap_or(time::Duration::days(365));
    }
    Ok(p)
}

/// The CA in `ca_dir`, ready to sign, and its certificate as PEM.
fn load_ca(ca_dir: &Path) -> Result<(Certificate, KeyPair, String), CertError> {
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    Ok((ca, ca_key, ca_pem))
}

/// A new host key and a certificate signing request for `name`: what a
/// host joining a control plane sends (its key never leaves it).
pub fn host_csr(name: &str) -> Result<(String, String), CertError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// What [`sign_host_csr`] made.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The host's certificate, PEM.
    pub cert_pem: String,
    /// The CA's certificate, PEM (what the host trusts).
    pub ca_pem: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex: what peers pin.
    pub spki_sha256: String,
}

/// Signs a joining host's request with the CA in `ca_dir`, as host `name`.
/// Only the request's public key is used: names, usages and validity are
/// the control plane's, whatever the request asked for.
pub fn sign_host_csr(
    ca_dir: &Path,
    name: &str,
    csr_pem: &str,
    valid_for: Duration,
) -> Result<Signed, CertError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let (ca, ca_key, ca_pem) = load_ca(ca_dir)?;
    let cert = host_params(name, valid_for, false)?.signed_by(&csr.public_key, &ca, &ca_key)?;
    let pin = crate::tls::spki_sha256(cert.der()).ok_or(rcgen::Error::CouldNotParseCertificate)?;
    Ok(Signed {
        cert_pem: cert.pem(),
        ca_pem,
        spki_sha256: hex::encode(pin),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_request_keeps_the_hosts_key_and_the_control_planes_terms() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let (key_pem, csr_pem) = host_csr("host-7").unwrap();
        let signed =
            sign_host_csr(dir.path(), "host-7", &csr_pem, Duration::from_secs(86400)).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            signed.spki_sha256,
            hex::encode(crate::tls::sha256(&key.public_key_der())),
            "the certificate carries the requester's key"
        );
        assert!(signed.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(matches!(
            sign_host_csr(dir.path(), "host-7", "not a csr", Duration::from_secs(1)),
            Err(CertError::Gen(_))
        ));
    }
}
