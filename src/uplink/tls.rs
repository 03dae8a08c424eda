//! TLS for the uplink: rustls with verification always on.
//!
//! Roots come from `ca_file`, or the system store when it is absent; the
//! server's name is checked against the URL's host; `cert_file` + `key_file`
//! turn on mutual TLS. There is no "insecure" switch: plaintext is the only
//! alternative, and only by explicit opt-in (`mqtt://` + `allow_plaintext`).

use super::config::UpstreamConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {what} {path}: {msg}")]
    File { what: &'static str, path: String, msg: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("no usable CA certificates: {0}")]
    NoRoots(String),
    #[error("{0:?} is not a valid TLS server name")]
    BadName(String),
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let err = |msg: String| TlsSetupError::File { what, path: path.display().to_string(), msg };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Build the client config once per uplink start (files are re-read when
/// the uplink is restarted, e.g. on reload).
pub fn client_config(cfg: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(ca) => {
            for c in certs(ca, "ca_file")? {
                roots.add(c)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c); // a system store has odd entries; skip them
            }
            if roots.is_empty() {
                return Err(TlsSetupError::NoRoots(format!(
                    "the system store is empty ({} errors); install ca-certificates or set upstream.ca_file",
                    found.errors.len()
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs(cert, "cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::File {
                what: "key_file",
                path: key.display().to_string(),
                msg: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsSetupError::BadName(host.to_string()))
}
