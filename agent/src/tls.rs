//! Mutual TLS: the collector's certificate must chain to our client CA *and* be pinned, by
//! fingerprint or SAN, because "signed by our CA" alone admits every certificate that CA ever
//! issued. Every refusal is logged with the identity that was presented.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::TlsConfig;

/// `sha256:` and the hex SHA-256 of a certificate's DER (as `collector certs` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// DNS names and IP addresses in a certificate's SAN extension.
fn sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[derive(Debug)]
struct PinnedClients {
    inner: Arc<dyn ClientCertVerifier>,
    fingerprints: HashSet<String>,
    sans: HashSet<String>,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        let names = sans(end_entity);
        let who = format!("{fp} (SANs: {})", if names.is_empty() { "none".into() } else { names.join(", ") });
        if let Err(e) = self.inner.verify_client_cert(end_entity, intermediates, now) {
            tracing::warn!("refused collector certificate {who}: {e}");
            return Err(e);
        }
        if self.fingerprints.contains(&fp) || names.iter().any(|n| self.sans.contains(&n.to_ascii_lowercase())) {
            tracing::info!("collector {who} connected");
            return Ok(ClientCertVerified::assertion());
        }
        tracing::warn!("refused collector certificate {who}: signed by our CA but not in tls.allowed_collectors");
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let v = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} holds an invalid certificate", path.display()))?;
    anyhow::ensure!(!v.is_empty(), "{} holds no certificate", path.display());
    Ok(v)
}

/// The server side of mutual TLS, from the `[tls]` section.
pub fn server_config(cfg: &TlsConfig) -> Result<rustls::ServerConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&cfg.client_ca)? {
        roots.add(c).with_context(|| format!("{}: not a usable CA certificate", cfg.client_ca.display()))?;
    }
    let inner = WebPkiClientVerifier::builder(Arc::new(roots)).build().context("client CA")?;
    let verifier = PinnedClients {
        inner,
        fingerprints: cfg
            .allowed_collectors
            .iter()
            .filter(|p| p.starts_with("sha256:"))
            .map(|p| p.to_ascii_lowercase())
            .collect(),
        sans: cfg
            .allowed_collectors
            .iter()
            .filter_map(|p| p.strip_prefix("san:"))
            .map(str::to_ascii_lowercase)
            .collect(),
    };
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("cannot read private key {}", cfg.key.display()))?;
    let mut sc = rustls::ServerConfig::builder()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(certs(&cfg.cert)?, key)
        .with_context(|| format!("{} and {} do not make a usable identity", cfg.cert.display(), cfg.key.display()))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(sc)
}
