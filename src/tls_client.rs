//! rustls client configurations for the connections the service opens itself (the
//! PostgreSQL store, the anomaly webhook): ring as the only provider, rustls' safe default
//! protocol versions, and only the CA the operator names (no OS roots), so what the service
//! trusts is written in its configuration.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The certificates of the PEM file `path` as trust anchors. FAILED_PRECONDITION naming
/// `what` and the file when it cannot be read, holds no certificate, or one is invalid.
pub fn roots_from_pem_file(what: &str, path: &Path) -> Result<rustls::RootCertStore> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let bad = |e: &dyn std::fmt::Display| {
        Error::FailedPrecondition(format!("cannot read {what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no certificate in it"));
    }
    Ok(roots)
}

/// A client configuration that trusts `roots` only and presents no client certificate.
pub fn client_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::internal)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = roots_from_pem_file("the webhook CA", &path).unwrap_err();
        assert!(err.to_string().contains("the webhook CA"), "{err}");
        assert!(err.to_string().contains("no certificate"), "{err}");
        let missing = roots_from_pem_file("the store CA", &dir.path().join("nope.pem"));
        assert!(missing.is_err());
    }
}
