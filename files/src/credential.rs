//! A client's credential: its id and its HMAC secret, in a private TOML file:
//!
//! ```toml
//! client_id = "station-7"
//! secret = "<64 hex digits>"
//! ```
//!
//! The appliance writes `admin.credential` this way at first start; `indiciactl
//! --credential` and the load generator read it. The file is TOML, written through the
//! `toml` crate, so an id holding `"` or `\` is quoted as TOML requires and reads back
//! exactly. The HMAC key is the 32 bytes the hex digits decode to.

use std::path::Path;

use indicia_proto::message::CLIENT_ID_BYTES_MAX;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::{random32, read_private, write_private, FileError};

/// A client id and its secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct Credential {
    #[serde(deserialize_with = "deserialize_client_id")]
    pub client_id: String,
    #[serde(serialize_with = "serialize_secret")]
    #[serde(deserialize_with = "deserialize_secret")]
    pub secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// What the protocol accepts as a client id: 1 to [`CLIENT_ID_BYTES_MAX`] bytes.
fn client_id_fits(client_id: &str) -> bool {
    (1..=CLIENT_ID_BYTES_MAX).contains(&client_id.len())
}

fn client_id_error() -> String {
    format!("`client_id` must be 1 to {CLIENT_ID_BYTES_MAX} bytes")
}

fn deserialize_client_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let client_id = String::deserialize(deserializer)?;
    if client_id_fits(&client_id) {
        Ok(client_id)
    } else {
        Err(serde::de::Error::custom(client_id_error()))
    }
}

fn serialize_secret<S: Serializer>(secret: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&Zeroizing::new(hex::encode(secret)))
}

fn deserialize_secret<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Zeroizing<[u8; 32]>, D::Error> {
    /// Decodes the hex straight into the zeroized array, without an owned copy of the text.
    struct Hex32;
    impl serde::de::Visitor<'_> for Hex32 {
        type Value = Zeroizing<[u8; 32]>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("64 hex digits")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let mut secret = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(text.trim(), secret.as_mut())
                .map_err(|err| E::custom(format!("`secret`: expected 64 hex digits: {err}")))?;
            Ok(secret)
        }
    }
    deserializer.deserialize_str(Hex32)
}

/// A TOML error in words, with its line but never the text around it: that text may be
/// the secret.
fn describe(err: &toml::de::Error, text: &str) -> String {
    match err.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!("line {line}: {}", err.message())
        }
        None => err.message().to_owned(),
    }
}

impl Credential {
    pub fn new(client_id: &str, secret: [u8; 32]) -> Self {
        Self {
            client_id: client_id.to_owned(),
            secret: Zeroizing::new(secret),
        }
    }

    /// Reads a credential file, refusing it if the group or others have any access.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let text = read_private(path)?;
        toml::from_str(&text).map_err(|err| FileError::malformed(path, describe(&err, &text)))
    }

    /// Writes this credential to a new private file (never over an existing one).
    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        if !client_id_fits(&self.client_id) {
            return Err(FileError::malformed(path, client_id_error()));
        }
        let text = toml::to_string(self)
            .map_err(|err| FileError::malformed(path, format!("cannot write TOML: {err}")))?;
        write_private(path, Zeroizing::new(text).as_bytes())
    }

    /// A new credential for `client_id` with a random secret, written to `path`.
    pub fn create(path: &Path, client_id: &str) -> Result<Self, FileError> {
        let credential = Self {
            client_id: client_id.to_owned(),
            secret: random32()?,
        };
        credential.write(path)?;
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_with_quotes_and_backslashes_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.credential");
        let id = "a \"quoted\" \\ id = 'x'\nsecret = \"00\"";
        let written = Credential::new(id, [0x5a; 32]);
        written.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let read = Credential::load(&path).unwrap();
        assert_eq!(read.client_id, id, "{text}");
        assert_eq!(*read.secret, [0x5a; 32]);
        // Still two keys: the id could not inject a line of its own.
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table.len(), 2, "{text}");
    }

    #[test]
    fn the_written_form_is_the_documented_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.credential");
        Credential::new("admin", [0xab; 32]).write(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("client_id = \"admin\"\nsecret = \"{}\"\n", "ab".repeat(32))
        );
        let created = Credential::create(&dir.path().join("new.credential"), "station-7").unwrap();
        assert_ne!(*created.secret, [0; 32]);
        assert!(
            Credential::create(&path, "admin").is_err(),
            "never overwritten"
        );
    }

    #[test]
    fn a_malformed_secret_says_what_is_wrong_without_quoting_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.credential");
        let secret = "c3".repeat(31);
        write_private(
            &path,
            format!("client_id = \"x\"\nsecret = \"{secret}\"\n").as_bytes(),
        )
        .unwrap();
        let err = Credential::load(&path).unwrap_err();
        assert!(matches!(err, FileError::Malformed { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("`secret`: expected 64 hex digits"), "{text}");
        assert!(!text.contains(&secret), "the secret leaked: {text}");
    }

    #[test]
    fn an_id_out_of_bounds_or_a_missing_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "00".repeat(32);
        for (name, text, needle) in [
            (
                "empty",
                format!("client_id = \"\"\nsecret = \"{secret}\"\n"),
                "1 to 64 bytes",
            ),
            (
                "long",
                format!(
                    "client_id = \"{}\"\nsecret = \"{secret}\"\n",
                    "x".repeat(65)
                ),
                "1 to 64 bytes",
            ),
            ("no-secret", "client_id = \"x\"\n".to_owned(), "secret"),
        ] {
            let path = dir.path().join(name);
            write_private(&path, text.as_bytes()).unwrap();
            let err = Credential::load(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
        let long = Credential::new(&"x".repeat(65), [0; 32]);
        assert!(long.write(&dir.path().join("long.credential")).is_err());
        assert!(!dir.path().join("long.credential").exists());
    }

    #[test]
    fn a_credential_the_group_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.credential");
        Credential::new("admin", [1; 32]).write(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Credential::load(&path).unwrap_err();
        assert!(
            matches!(err, FileError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
    }
}
