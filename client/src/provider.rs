//! The postage provider's side: its Ed25519 key pair, and signed authorizations (refills
//! and contact acknowledgments) written to a file, so that the provider who signs them and
//! the operator who submits them to the appliance can be different people on different
//! machines.
//!
//! An authorization file is one JSON object (docs/FILES.md, section 2):
//!
//! ```json
//! {"format":"indicia-authorization-v1","kind":"refill","vpsd_id":7001,
//!  "amount_mills":100000,"sequence":3,"expires_unix":1798675200,
//!  "signature":"<128 hex digits>"}
//! ```
//!
//! The fields are those of the wire's provider authorization (docs/PROTOCOL.md); the
//! signature covers them. The appliance checks it against `provider.pub`, the sequence
//! against the vPSD's last accepted one, and the expiry against its clock.

use std::io::Write;
use std::path::Path;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{AuthorizationKind, ProviderAuthorization};
use serde_json::{json, Value};
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

/// An authorization as the JSON object of an authorization file.
pub fn authorization_json(authorization: &ProviderAuthorization) -> Value {
    json!({
        "format": AUTHORIZATION_FORMAT,
        "kind": kind_name(authorization.kind),
        "vpsd_id": authorization.vpsd_id,
        "amount_mills": authorization.amount_mills,
        "sequence": authorization.sequence,
        "expires_unix": authorization.expires_unix,
        "signature": hex::encode(authorization.signature),
    })
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

/// Writes an authorization file (refusing to overwrite one: each is issued once).
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
        .map_err(file_error(path))
}

/// Reads an authorization file. The signature is not checked here: the appliance does.
pub fn read_authorization(path: &Path) -> Result<ProviderAuthorization, ClientError> {
    let text = std::fs::read_to_string(path).map_err(file_error(path))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|err| malformed(path, format!("not an authorization file: {err}")))?;
    let field = |name: &str| {
        value
            .get(name)
            .ok_or_else(|| malformed(path, format!("no `{name}` field")))
    };
    let number = |name: &str| {
        field(name)?
            .as_u64()
            .ok_or_else(|| malformed(path, format!("`{name}` is not an unsigned integer")))
    };
    if field("format")?.as_str() != Some(AUTHORIZATION_FORMAT) {
        return Err(malformed(
            path,
            format!("`format` is not \"{AUTHORIZATION_FORMAT}\""),
        ));
    }
    let kind = field("kind")?
        .as_str()
        .and_then(parse_kind)
        .ok_or_else(|| malformed(path, "`kind` is neither \"refill\" nor \"contact\""))?;
    let mut signature = [0u8; 64];
    hex::decode_to_slice(
        field("signature")?.as_str().unwrap_or_default(),
        &mut signature,
    )
    .map_err(|err| malformed(path, format!("`signature` is not 128 hex digits: {err}")))?;
    Ok(ProviderAuthorization {
        kind,
        vpsd_id: number("vpsd_id")?,
        amount_mills: number("amount_mills")?,
        sequence: number("sequence")?,
        expires_unix: number("expires_unix")?,
        signature,
    })
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
        assert!(err.contains("kind"), "{err}");
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
