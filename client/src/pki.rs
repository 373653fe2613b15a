//! A private certificate authority for the appliance's mutual TLS (`indiciactl pki`).
//!
//! One CA issues the appliance's certificate and every client's. A client certificate's
//! subject common name is its client id: the appliance takes the client's identity (and so
//! its role and vPSDs) from it. Keys are ECDSA P-256, written owner-readable only (0600);
//! certificates are PEM. An operator with a PKI of their own uses it instead: the appliance
//! needs only the three PEM files of `[tls]`.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::{ClientError, Result};

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const CLIENTS_DIR: &str = "clients";

fn pki_error(what: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(format!("certificate authority: {what}"))
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A certificate authority that can issue.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    validity_days: i64,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("validity_days", &self.validity_days)
            .finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back, for clocks a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "indicia");
    name.push(DnType::CommonName, common_name);
    name
}

/// A client id usable as a certificate name and a file name; or an appliance's
/// (`appliance:<id>`, the peer certificate of a cluster member, docs/CLUSTER.md).
fn check_client_id(client_id: &str) -> Result<()> {
    if let Some(appliance) = client_id.strip_prefix(indicia_proto::message::APPLIANCE_CLIENT_PREFIX)
    {
        let fine = !appliance.is_empty()
            && client_id.len() <= indicia_proto::message::CLIENT_ID_BYTES_MAX
            && appliance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        return if fine {
            Ok(())
        } else {
            Err(pki_error(format!(
                "client id `{client_id}`: an appliance's is `appliance:` and its id (A-Z a-z \
                 0-9 - _ .), at most 64 bytes in all"
            )))
        };
    }
    let fine = !client_id.is_empty()
        && client_id.len() <= indicia_proto::message::CLIENT_ID_BYTES_MAX
        && !client_id.starts_with('.')
        && client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if fine {
        Ok(())
    } else {
        Err(pki_error(format!(
            "client id `{client_id}`: 1 to 64 of A-Z a-z 0-9 - _ . @, not starting with a dot"
        )))
    }
}

impl Authority {
    /// A new CA, valid for `validity_days`; what it issues is valid as long.
    pub fn new(common_name: &str, validity_days: u32) -> Result<Self> {
        let days = i64::from(validity_days.max(1));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, days);
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            validity_days: days,
        })
    }

    /// The CA in `dir` (`ca.pem`, `ca.key`).
    pub fn load(dir: &Path, validity_days: u32) -> Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(|source| ClientError::File {
            path: cert_path.clone(),
            source,
        })?;
        let key_pem = indicia_files::read_private(&dir.join(CA_KEY_FILE))?;
        let key = KeyPair::from_pem(&key_pem).map_err(pki_error)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(pki_error)?;
        Ok(Self {
            issuer,
            cert_pem,
            validity_days: i64::from(validity_days.max(1)),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(&self, params: &mut CertificateParams) -> Result<Issued> {
        validity(params, self.validity_days);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The appliance's certificate, for these DNS names and IP addresses.
    pub fn server(&self, names: &[String]) -> Result<Issued> {
        if names.is_empty() {
            return Err(pki_error("the appliance's certificate needs a name"));
        }
        let mut params = CertificateParams::new(names.to_vec()).map_err(pki_error)?;
        params.distinguished_name = name(&names[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&mut params)
    }

    /// A client's certificate: its subject common name is `client_id`.
    pub fn client(&self, client_id: &str) -> Result<Issued> {
        check_client_id(client_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(client_id);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&mut params)
    }
}

/// A private key: a new file, 0600, synced with its directory.
fn create_key(path: PathBuf, pem: &str) -> Result<PathBuf> {
    indicia_files::write_private(&path, pem.as_bytes())?;
    Ok(path)
}

/// A certificate: public, written durably.
fn create_certificate(path: PathBuf, pem: &str) -> Result<PathBuf> {
    indicia_files::write_durable(&path, pem.as_bytes())?;
    Ok(path)
}

/// Nothing is written if any of the files to be written is already there.
fn refuse_existing(paths: &[PathBuf]) -> Result<()> {
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(ClientError::File {
            path: path.clone(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        }),
        None => Ok(()),
    }
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| ClientError::File {
            path: path.to_owned(),
            source,
        })
}

/// Makes a CA and the appliance's certificate in `dir`: `ca.pem`, `ca.key`, `server.pem`,
/// `server.key` (keys 0600). Refuses to overwrite any of them. Returns the files written.
pub fn init(dir: &Path, server_names: &[String], validity_days: u32) -> Result<Vec<PathBuf>> {
    create_dir(dir)?;
    refuse_existing(&[
        dir.join(CA_KEY_FILE),
        dir.join(CA_CERT_FILE),
        dir.join(SERVER_KEY_FILE),
        dir.join(SERVER_CERT_FILE),
    ])?;
    let authority = Authority::new("indicia CA", validity_days)?;
    let server = authority.server(server_names)?;
    let key_pem = authority.issuer.key().serialize_pem();
    Ok(vec![
        create_key(dir.join(CA_KEY_FILE), &key_pem)?,
        create_certificate(dir.join(CA_CERT_FILE), authority.cert_pem())?,
        create_key(dir.join(SERVER_KEY_FILE), &server.key_pem)?,
        create_certificate(dir.join(SERVER_CERT_FILE), &server.cert_pem)?,
    ])
}

/// Issues a client's certificate from the CA in `dir`: `clients/<id>.pem` and
/// `clients/<id>.key` (0600). Returns (certificate, key).
pub fn issue_client(dir: &Path, client_id: &str, validity_days: u32) -> Result<(PathBuf, PathBuf)> {
    check_client_id(client_id)?;
    let authority = Authority::load(dir, validity_days)?;
    let issued = authority.client(client_id)?;
    let clients = dir.join(CLIENTS_DIR);
    create_dir(&clients)?;
    refuse_existing(&[
        clients.join(format!("{client_id}.key")),
        clients.join(format!("{client_id}.pem")),
    ])?;
    let key = create_key(clients.join(format!("{client_id}.key")), &issued.key_pem)?;
    let cert = create_certificate(clients.join(format!("{client_id}.pem")), &issued.cert_pem)?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn a_client_certificate_names_its_client_and_a_server_certificate_its_names() {
        let authority = Authority::new("test CA", 1).unwrap_or_else(|err| panic!("{err}"));
        let client = authority
            .client("station-7")
            .unwrap_or_else(|err| panic!("{err}"));
        let der = rustls::pki_types::CertificateDer::from_pem_slice(client.cert_pem.as_bytes())
            .unwrap_or_else(|err| panic!("{err}"));
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).unwrap_or_else(|err| panic!("{err}"));
        let names: Vec<_> = parsed
            .subject()
            .iter_common_name()
            .filter_map(|name| name.as_str().ok())
            .collect();
        assert_eq!(names, ["station-7"]);
        assert!(!parsed.is_ca());
        let server = authority
            .server(&["127.0.0.1".into(), "indicia.example".into()])
            .unwrap_or_else(|err| panic!("{err}"));
        let der = rustls::pki_types::CertificateDer::from_pem_slice(server.cert_pem.as_bytes())
            .unwrap_or_else(|err| panic!("{err}"));
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&der).unwrap_or_else(|err| panic!("{err}"));
        let san = parsed
            .subject_alternative_name()
            .unwrap_or_else(|err| panic!("{err}"))
            .map(|ext| format!("{:?}", ext.value.general_names))
            .unwrap_or_default();
        assert!(
            san.contains("127.0.0.1") || san.contains("[127, 0, 0, 1]"),
            "{san}"
        );
        assert!(san.contains("indicia.example"), "{san}");
        for bad in ["", "../up", ".hidden", "a b", &"x".repeat(65)] {
            assert!(authority.client(bad).is_err(), "{bad:?}");
        }
    }
}
