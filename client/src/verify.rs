//! The verifier's side: checks an indicium read off a mail piece.
//!
//! - **Signature**, offline with the vPSD's published key (one PEM file, or a directory of
//!   them named `<vpsd id>-<key serial>.pem`, as `indiciactl pubkey --out-dir` writes
//!   them), or online by asking the appliance.
//! - **Data digest**: when the indicium carries one and the verifier has the data it
//!   should bind (a recipient address, a ticket holder), SHA-256 of the data must match.
//! - **Duplicates**: a verifier store (a text file) remembers every valid piece seen; the
//!   same vPSD id and piece number seen again is a duplicate (a copied indicium), whether
//!   in the same run or an earlier one.
//!
//! The store's format, one line per piece: `<vpsd id> <piece number> <SHA-256 of the
//! indicium's bytes, hex> <unix seconds first seen> <where it was seen>`; lines starting
//! with `#` are comments.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine as _;
use indicia_proto::{Algorithm, Indicium};

/// What a verifier concludes about one indicium. The order of checks: it must decode,
/// its key must be known, its signature must hold, its data must match, and it must not
/// have been seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    /// The bytes are not an indicium.
    Malformed(String),
    /// No key for this vPSD and serial.
    UnknownKey,
    BadSignature,
    /// The online verifier: the signature holds but the piece number was never issued.
    NotIssued,
    /// The data given does not match the indicium's digest (or it has none).
    DataMismatch(String),
    /// This vPSD's piece was seen before: where and when.
    Duplicate(String),
}

impl Outcome {
    /// The stable name scripts match on.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::Malformed(_) => "malformed",
            Self::UnknownKey => "unknown-key",
            Self::BadSignature => "bad-signature",
            Self::NotIssued => "not-issued",
            Self::DataMismatch(_) => "data-mismatch",
            Self::Duplicate(_) => "duplicate",
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Malformed(detail) | Self::DataMismatch(detail) | Self::Duplicate(detail) => {
                Some(detail)
            }
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The DER of a PEM "PUBLIC KEY" (SubjectPublicKeyInfo) file.
pub fn load_public_key_pem(path: &Path) -> Result<Vec<u8>, VerifyError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let malformed = |what: &str| VerifyError::Malformed {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    let body = text
        .split("-----BEGIN PUBLIC KEY-----")
        .nth(1)
        .and_then(|rest| rest.split("-----END PUBLIC KEY-----").next())
        .ok_or_else(|| malformed("not a PEM public key (BEGIN/END PUBLIC KEY)"))?;
    let joined: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(joined)
        .map_err(|err| malformed(&format!("bad base64: {err}")))
}

/// The PEM text of a SubjectPublicKeyInfo: what [`load_public_key_pem`] reads.
pub fn spki_pem(der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// The file name of a vPSD's key of one serial in a key directory.
pub fn key_file_name(vpsd_id: u64, key_serial: u32) -> String {
    format!("{vpsd_id}-{key_serial}.pem")
}

/// Where the verifier finds public keys.
#[derive(Debug)]
pub enum Keys {
    /// One key, for whatever vPSD the indicium names.
    Single(Vec<u8>),
    /// `<vpsd id>-<key serial>.pem` files, read when first needed.
    Directory {
        dir: PathBuf,
        loaded: HashMap<(u64, u32), Option<Vec<u8>>>,
    },
}

impl Keys {
    pub fn directory(dir: &Path) -> Result<Self, VerifyError> {
        if !dir.is_dir() {
            return Err(VerifyError::Malformed {
                path: dir.to_owned(),
                what: "not a directory".into(),
            });
        }
        Ok(Self::Directory {
            dir: dir.to_owned(),
            loaded: HashMap::new(),
        })
    }

    /// The key for this vPSD and serial, if there is one. A key file that exists but does
    /// not parse is an error, not an unknown key.
    pub fn get(&mut self, vpsd_id: u64, key_serial: u32) -> Result<Option<&[u8]>, VerifyError> {
        match self {
            Self::Single(der) => Ok(Some(der)),
            Self::Directory { dir, loaded } => {
                let entry = match loaded.entry((vpsd_id, key_serial)) {
                    std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        let path = dir.join(key_file_name(vpsd_id, key_serial));
                        let key = if path.exists() {
                            Some(load_public_key_pem(&path)?)
                        } else {
                            None
                        };
                        entry.insert(key)
                    }
                };
                Ok(entry.as_deref())
            }
        }
    }
}

/// Whether the indicium's signature holds under `spki` (SubjectPublicKeyInfo DER).
pub fn signature_holds(indicium: &Indicium, spki: &[u8]) -> bool {
    let algorithm: &dyn signature::VerificationAlgorithm = match indicium.payload.algorithm {
        Algorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
        Algorithm::Ed25519 => &signature::ED25519,
    };
    UnparsedPublicKey::new(algorithm, spki)
        .verify(
            indicium.payload.signed_bytes().as_ref(),
            &indicium.signature,
        )
        .is_ok()
}

/// SHA-256 of the data a caller binds to a piece (what `sign --data` puts in the indicium).
pub fn data_digest(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, data).as_ref());
    out
}

/// Checks the data a verifier holds against the indicium's digest.
pub fn check_data(indicium: &Indicium, data: &[u8]) -> Result<(), String> {
    match &indicium.payload.data_digest {
        None => Err("the indicium carries no data digest".into()),
        Some(expected) if *expected == data_digest(data) => Ok(()),
        Some(_) => Err("SHA-256 of the data given differs from the indicium's digest".into()),
    }
}

/// The pieces a verifier has seen; see the module documentation for the file format.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    seen: HashMap<(u64, u64), String>,
    file: std::fs::File,
}

impl Store {
    /// Opens (or creates) the store at `path` and reads what it holds.
    pub fn open(path: &Path) -> Result<Self, VerifyError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_error(path))?;
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let mut seen = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(5, ' ');
            let parsed = (|| {
                let vpsd_id: u64 = fields.next()?.parse().ok()?;
                let piece: u64 = fields.next()?.parse().ok()?;
                let _digest = fields.next()?;
                let at: u64 = fields.next()?.parse().ok()?;
                let place = fields.next().unwrap_or("").to_owned();
                Some((vpsd_id, piece, at, place))
            })();
            let Some((vpsd_id, piece, at, place)) = parsed else {
                return Err(VerifyError::Malformed {
                    path: path.to_owned(),
                    what: format!(
                        "line {}: expected `VPSD PIECE SHA256 UNIX WHERE`",
                        number + 1
                    ),
                });
            };
            seen.entry((vpsd_id, piece))
                .or_insert_with(|| format!("first seen at unix {at} in {place}"));
        }
        Ok(Self {
            path: path.to_owned(),
            seen,
            file,
        })
    }

    /// Records a valid piece; returns where it was seen before if it was.
    pub fn record(
        &mut self,
        indicium: &Indicium,
        at_unix: u64,
        place: &str,
    ) -> Result<Option<String>, VerifyError> {
        let key = (indicium.payload.vpsd_id, indicium.payload.piece_number);
        if let Some(first) = self.seen.get(&key) {
            return Ok(Some(first.clone()));
        }
        // One line per write, so that a line is never split between two verifiers.
        let place: String = place
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let line = format!(
            "{} {} {} {at_unix} {place}\n",
            key.0,
            key.1,
            hex::encode(digest(&SHA256, indicium.to_bytes().as_ref()))
        );
        self.file
            .write_all(line.as_bytes())
            .map_err(io_error(&self.path))?;
        self.seen
            .insert(key, format!("first seen at unix {at_unix} in {place}"));
        Ok(None)
    }

    /// Makes what was recorded durable.
    pub fn sync(&self) -> Result<(), VerifyError> {
        self.file.sync_data().map_err(io_error(&self.path))
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The indicia to check from a text source: one hex indicium per line (what
/// `indiciactl sign` writes); blank lines and `#` comments are skipped. Each comes with
/// its line number, and with the decode error if it is not an indicium.
pub fn read_hex_lines(text: &str) -> Vec<(usize, Result<Indicium, String>)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        })
        .map(|(number, line)| {
            let parsed = hex::decode(line.trim())
                .map_err(|err| format!("not hex: {err}"))
                .and_then(|bytes| Indicium::decode(&bytes).map_err(|err| err.to_string()));
            (number + 1, parsed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_finds_a_piece_seen_in_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.txt");
        let indicium = Indicium::decode(&hex::decode(SAMPLE).unwrap()).unwrap();
        {
            let mut store = Store::open(&path).unwrap();
            assert_eq!(store.record(&indicium, 100, "batch-1.txt:3").unwrap(), None);
            // The same run: a duplicate already.
            let again = store
                .record(&indicium, 101, "batch-1.txt:9")
                .unwrap()
                .unwrap();
            assert!(again.contains("batch-1.txt:3"), "{again}");
            store.sync().unwrap();
        }
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.len(), 1);
        let later = store
            .record(&indicium, 200, "batch-2.txt:1")
            .unwrap()
            .unwrap();
        assert!(
            later.contains("unix 100") && later.contains("batch-1.txt:3"),
            "{later}"
        );
        // A line that is not a record is an error, not silently skipped.
        std::fs::write(&path, "12 x\n").unwrap();
        assert!(Store::open(&path).is_err());
    }

    /// An ECDSA P-256 indicium (with a destination ZIP) signed by the appliance.
    const SAMPLE: &str = "01010101000000591b0000000000009387000000000000da020000000000002e99820100000000d2477304000000006626406e130c1108f6050100000171f6dc0f980c787c9ccf98f0cc21c8743573dd5b5a58af430185794287277f11e29f38f1d7c3888119a9d018b3426d27ce5eb46a365abd5e7c8525b4380db982";

    #[test]
    fn data_must_match_the_digest() {
        let mut indicium = Indicium::decode(&hex::decode(SAMPLE).unwrap()).unwrap();
        indicium.payload.data_digest = Some(data_digest(b"J. Smith, 1 Main St"));
        assert_eq!(check_data(&indicium, b"J. Smith, 1 Main St"), Ok(()));
        assert!(check_data(&indicium, b"J. Smith, 2 Main St").is_err());
        indicium.payload.data_digest = None;
        assert!(check_data(&indicium, b"J. Smith, 1 Main St").is_err());
    }

    #[test]
    fn hex_lines_skip_comments_and_report_bad_lines() {
        let text = format!("# batch\n\n{SAMPLE}\nzz\n0101\n");
        let read = read_hex_lines(&text);
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0, 3);
        assert!(read[0].1.is_ok());
        assert!(read[1].1.as_ref().unwrap_err().starts_with("not hex"));
        assert!(read[2].1.is_err());
    }
}
