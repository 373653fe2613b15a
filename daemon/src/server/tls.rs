//! Mutual TLS on the client port: rustls, TLS 1.3 only, on the aws-lc-rs provider.
//!
//! The appliance presents `[tls] certificate`; every client must present a certificate that
//! chains to `[tls] client_ca` (no certificate, or one from another issuer, ends the
//! connection in the TLS handshake). The certificate names the client: its subject common
//! name is the client id, and the protocol handshake that follows must be for that id
//! (docs/SECURITY.md, docs/PROTOCOL.md section 5.2). The role and the vPSDs allowed are the
//! client's, from the configuration.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use thiserror::Error;

use crate::config::TlsConfig;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        message: String,
    },
    #[error("[tls]: {0}")]
    Setup(String),
}

fn file_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(String) -> TlsError + 'a {
    move |message| TlsError::File {
        what,
        path: path.to_owned(),
        message,
    }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |message: String| file_error(what, path)(message);
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| fail(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| fail(err.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// The private key file must be readable by its owner only, like the master key.
fn private_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let fail = file_error(what, path);
    let text = crate::datadir::read_private(path).map_err(|err| match err {
        crate::datadir::DataDirError::Permissions { mode, .. } => {
            format!("may be read by group or others (mode {mode:o}); it must be 0600 or stricter")
        }
        other => other.to_string(),
    });
    let text = text.map_err(file_error("private_key", path))?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|err| fail(err.to_string()))
}

/// The CA certificates of a PEM file, as the roots a peer's certificate must chain to.
fn root_store(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for authority in certificates(what, path)? {
        roots
            .add(authority)
            .map_err(|err| file_error(what, path)(err.to_string()))?;
    }
    Ok(roots)
}

/// The server side of mutual TLS, from the `[tls]` section (None: plaintext).
pub fn server_config(tls: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let (Some(certificate), Some(key), Some(client_ca)) =
        (&tls.certificate, &tls.private_key, &tls.client_ca)
    else {
        return Ok(None);
    };
    let chain = certificates("[tls] certificate", certificate)?;
    let key = private_key("[tls] private_key", key)?;
    let roots = root_store("[tls] client_ca", client_ca)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // Every connection must present a client certificate from these roots.
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|err| TlsError::Setup(format!("client verifier: {err}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| TlsError::Setup(err.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|err| file_error("[tls] certificate", certificate)(err.to_string()))?;
    // Clients reconnect rarely and hold connections long: no session tickets to manage.
    config.send_tls13_tickets = 0;
    if cfg!(feature = "fips") && !config.fips() {
        return Err(TlsError::Setup(
            "built for FIPS, but the TLS configuration is not FIPS-approved".into(),
        ));
    }
    Ok(Some(Arc::new(config)))
}

/// The client side of mutual TLS toward the other appliances of the cluster: this
/// appliance's client certificate (`[cluster] peer_certificate`, its common name
/// `appliance:<id>`) and the CAs that issue the appliances' server certificates
/// (`peer_ca`).
pub fn peer_client_config(
    certificate: &Path,
    key: &Path,
    ca: &Path,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let chain = certificates("[cluster] peer_certificate", certificate)?;
    let key = private_key("[cluster] peer_private_key", key)?;
    let roots = root_store("[cluster] peer_ca", ca)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| TlsError::Setup(err.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|err| file_error("[cluster] peer_certificate", certificate)(err.to_string()))?;
    if cfg!(feature = "fips") && !config.fips() {
        return Err(TlsError::Setup(
            "built for FIPS, but the TLS configuration toward the other appliances is not \
             FIPS-approved"
                .into(),
        ));
    }
    Ok(Arc::new(config))
}

/// Why a connection's TLS handshake did not give a client id.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AcceptError {
    #[error("the TLS handshake did not complete in time")]
    Timeout,
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client certificate does not parse: {0}")]
    Certificate(String),
    #[error("the client certificate has no subject common name")]
    NoCommonName,
    #[error("the client certificate has more than one subject common name")]
    SeveralCommonNames,
    #[error("the client certificate's common name is not UTF-8")]
    CommonNameNotUtf8,
}

/// The client id a verified client certificate names: its subject common name.
pub fn peer_identity(connection: &ServerConnection) -> Result<String, AcceptError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(AcceptError::NoCertificate)?;
    identity_of(leaf.as_ref())
}

/// The subject common name of a DER certificate (exactly one, UTF-8).
pub fn identity_of(der: &[u8]) -> Result<String, AcceptError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|err| AcceptError::Certificate(err.to_string()))?;
    let mut names = certificate.subject().iter_common_name();
    let name = names.next().ok_or(AcceptError::NoCommonName)?;
    if names.next().is_some() {
        return Err(AcceptError::SeveralCommonNames);
    }
    let name = name.as_str().map_err(|_| AcceptError::CommonNameNotUtf8)?;
    Ok(name.to_owned())
}
