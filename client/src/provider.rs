//! The postage provider's side: its Ed25519 key pair, and signed authorizations (refills
//! and contact acknowledgments) written to a file, so that the provider who signs them and
//! the operator who submits them to the appliance can be different people on different
//! machines.
//!
//! An authorization file is one JSON object (docs/FILES.md, section 2):
//!
//! ```json
//! {"amount_mills":100000,"expires_unix":1798675200,"format":"indicia-authorization-v1",
//!  "kind":"refill","sequence":3,"signature":"<128 hex digits>","vpsd_id":7001}
//! ```
//!
//! The fields are those of the wire's provider authorization (docs/PROTOCOL.md), read and
//! written by its serde derives (indicia-proto's `serde` feature); the signature covers
//! them. The appliance checks it against `provider.pub`, the sequence
//! against the vPSD's last accepted one, and the expiry against its clock.

use std::io::Write;
use std::path::Path;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{AuthorizationKind, ProviderAuthorization};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::{ClientError, FileError};

/// The `format` field of an authorization file.
pub const AUTHORIZATION_FORMAT: &str = "indicia-authorization-v1";

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::File {
        path: path.to_owned(),
        source,
    }
}

fn malformed(path: &Path, what: impl Into<String>) -> ClientError {
    FileError::malformed(path, what).into()
}

/// Creates a provider key pair: the seed (64 hex digits, mode 0600, never overwritten) in
/// `key_path`, the public key (64 hex digits, what the appliance's `provider.pub` holds)
/// in `key_path` + `.pub`. Returns the public key's hex.
pub fn generate_key(key_path: &Path) -> Result<String, ClientError> {
    let seed = indicia_files::random32()?;
    let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
        .map_err(|_| ClientError::Protocol("could not build an Ed25519 key".into()))?;
    let public = hex::encode(pair.public_key().as_ref());
    let text = Zeroizing::new(format!("{}\n", hex::encode(seed.as_ref())));
    indicia_files::write_private(key_path, text.as_bytes())?;
    let mut public_path = key_path.as_os_str().to_owned();
    public_path.push(".pub");
    indicia_files::write_durable(
        &std::path::PathBuf::from(public_path),
        format!("{public}\n").as_bytes(),
    )?;
    Ok(public)
}

/// Loads a provider key file: 64 hex digits of Ed25519 seed, owner-readable only.
pub fn load_provider_key(path: &Path) -> Result<Ed25519KeyPair, ClientError> {
    let seed = indicia_files::load_secret(path)?;
    Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
        .map_err(|_| malformed(path, "not an Ed25519 seed"))
}

/// A provider authorization signed with `key` (what the provider's systems issue).
pub fn authorize(
    key: &Ed25519KeyPair,
    kind: AuthorizationKind,
    vpsd_id: u64,
    amount_mills: u64,
    sequence: u64,
    expires_unix: u64,
) -> ProviderAuthorization {
    sign_authorization(
        key,
        ProviderAuthorization {
            kind,
            vpsd_id,
            amount_mills,
            sequence,
            expires_unix,
            signature: [0; 64],
        },
    )
}

/// `authorization` with its signature made by `key` over
/// [`ProviderAuthorization::signed_bytes`] (also to re-sign an altered one, in tests).
pub fn sign_authorization(
    key: &Ed25519KeyPair,
    mut authorization: ProviderAuthorization,
) -> ProviderAuthorization {
    let signature = key.sign(&authorization.signed_bytes());
    authorization.signature.copy_from_slice(signature.as_ref());
    authorization
}

/// The `format` member of an authorization file: written as [`AUTHORIZATION_FORMAT`],
/// and nothing else is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FormatV1;

impl Serialize for FormatV1 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(AUTHORIZATION_FORMAT)
    }
}

impl<'de> Deserialize<'de> for FormatV1 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let format = String::deserialize(deserializer)?;
        if format == AUTHORIZATION_FORMAT {
            Ok(Self)
        } else {
            Err(serde::de::Error::custom(format!(
                "`format` is \"{format}\", not \"{AUTHORIZATION_FORMAT}\""
            )))
        }
    }
}

/// An authorization file: the format tag beside the wire authorization's fields, which
/// its serde derives name and encode (`kind` as `refill`/`contact`, `signature` as hex).
/// Unknown members are ignored.
#[derive(Debug, Serialize, Deserialize)]
struct AuthorizationFile {
    format: FormatV1,
    #[serde(flatten)]
    authorization: ProviderAuthorization,
}

/// An authorization as the JSON object of an authorization file. Its members are in
/// alphabetical order when written (serde_json's map is sorted), as docs/FILES.md says.
// Serializing integers and strings into a JSON value cannot fail: an invariant, not input.
#[allow(clippy::expect_used)]
pub fn authorization_json(authorization: &ProviderAuthorization) -> Value {
    serde_json::to_value(AuthorizationFile {
        format: FormatV1,
        authorization: *authorization,
    })
    .expect("an authorization is integers and strings, which JSON always represents")
}

pub fn kind_name(kind: AuthorizationKind) -> &'static str {
    match kind {
        AuthorizationKind::Refill => "refill",
        AuthorizationKind::Contact => "contact",
    }
}

pub fn parse_kind(text: &str) -> Option<AuthorizationKind> {
    match text {
        "refill" => Some(AuthorizationKind::Refill),
        "contact" => Some(AuthorizationKind::Contact),
        _ => None,
    }
}

/// Writes an authorization file (refusing to overwrite one: each is issued once), synced
/// with its directory.
pub fn write_authorization(
    path: &Path,
    authorization: &ProviderAuthorization,
) -> Result<(), ClientError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(file_error(path))?;
    file.write_all(format!("{}\n", authorization_json(authorization)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(file_error(path))?;
    Ok(indicia_files::sync_dir(indicia_files::directory_of(path))?)
}

/// Reads an authorization file. The signature is not checked here: the appliance does.
pub fn read_authorization(path: &Path) -> Result<ProviderAuthorization, ClientError> {
    let text = std::fs::read_to_string(path).map_err(file_error(path))?;
    let file: AuthorizationFile = serde_json::from_str(&text)
        .map_err(|err| malformed(path, format!("not an authorization file: {err}")))?;
    Ok(file.authorization)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authorization_file_reads_back_exactly_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("provider.key");
        let public = generate_key(&key_path).unwrap();
        assert_eq!(public.len(), 64);
        assert!(generate_key(&key_path).is_err(), "an existing key is kept");
        let key = load_provider_key(&key_path).unwrap();
        assert_eq!(hex::encode(key.public_key().as_ref()), public);
        let authorization = authorize(
            &key,
            AuthorizationKind::Refill,
            7001,
            100_000,
            3,
            1_900_000_000,
        );
        let path = dir.path().join("refill-3.json");
        write_authorization(&path, &authorization).unwrap();
        assert_eq!(read_authorization(&path).unwrap(), authorization);
        assert!(write_authorization(&path, &authorization).is_err());
        std::fs::write(
            &path,
            "{\"format\":\"indicia-authorization-v1\",\"kind\":\"gift\"}",
        )
        .unwrap();
        let err = read_authorization(&path).unwrap_err().to_string();
        assert!(err.contains("unknown variant `gift`"), "{err}");
    }

    #[test]
    fn a_reader_takes_any_order_and_case_ignores_unknown_members_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let read = |text: &str| {
            std::fs::write(&path, text).unwrap();
            read_authorization(&path).map_err(|err| err.to_string())
        };
        let signature = "AB".repeat(64);
        let fields = format!(
            "\"signature\": \"{signature}\", \"vpsd_id\": 18446744073709551615, \
             \"kind\": \"contact\", \"amount_mills\": 0, \"sequence\": 2, \
             \"expires_unix\": 9, \"issued_by\": \"acme\""
        );
        assert_eq!(
            read(&format!(
                "{{ {fields}, \"format\": \"indicia-authorization-v1\" }}"
            )),
            Ok(ProviderAuthorization {
                kind: AuthorizationKind::Contact,
                vpsd_id: u64::MAX,
                amount_mills: 0,
                sequence: 2,
                expires_unix: 9,
                signature: [0xab; 64],
            })
        );
        for (text, needle) in [
            (
                format!("{{ {fields}, \"format\": \"indicia-authorization-v2\" }}"),
                "indicia-authorization-v2",
            ),
            (format!("{{ {fields} }}"), "missing field `format`"),
            (
                format!("{{ {fields}, \"format\": \"indicia-authorization-v1\" }}")
                    .replace("\"sequence\": 2", "\"sequence\": -2"),
                "-2",
            ),
            (
                format!("{{ {fields}, \"format\": \"indicia-authorization-v1\" }}")
                    .replace(&signature, "abcd"),
                "expected 64 bytes",
            ),
            ("[]".to_owned(), "not an authorization file"),
        ] {
            let err = read(&text).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    #[test]
    fn an_authorization_file_is_byte_for_byte_the_documented_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refill-1.json");
        let authorization = ProviderAuthorization {
            kind: AuthorizationKind::Refill,
            vpsd_id: 301,
            amount_mills: 120_500,
            sequence: 1,
            expires_unix: 1_796_630_400,
            signature: [0x9f; 64],
        };
        write_authorization(&path, &authorization).unwrap();
        let expected = format!(
            "{{\"amount_mills\":120500,\"expires_unix\":1796630400,\
             \"format\":\"indicia-authorization-v1\",\"kind\":\"refill\",\"sequence\":1,\
             \"signature\":\"{}\",\"vpsd_id\":301}}\n",
            "9f".repeat(64)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
    }
}
