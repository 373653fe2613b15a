//! `indicia-files`: the files the appliance and its tools share.
//!
//! - [`private`]: files that hold a secret (keys, client secrets, credentials): created
//!   new with mode 0600, synced with their directory, and refused on reading when the
//!   group or others have any access.
//! - [`durable`]: files others may read (public keys, the shard layout): replaced
//!   atomically and synced with their directory.
//! - [`credential`]: a client id and its HMAC secret, as TOML.
//!
//! One error type, [`FileError`], for all of them: the daemon and the client wrap it.

pub mod credential;
pub mod durable;
pub mod private;

use std::path::{Path, PathBuf};

pub use credential::Credential;
pub use durable::{directory_of, sync_dir, write_durable};
pub use private::{load_secret, read_private, write_private};

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} may be read by group or others (mode {mode:o}); it must be 0600 or stricter")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("random number generator failed")]
    Random,
}

impl FileError {
    /// Wraps an I/O error on `path`: `.map_err(FileError::io(path))`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub fn malformed(path: &Path, what: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.to_owned(),
            what: what.into(),
        }
    }
}

/// 32 bytes from the system's random generator.
pub fn random32() -> Result<zeroize::Zeroizing<[u8; 32]>, FileError> {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| FileError::Random)?;
    Ok(bytes)
}

/// 32 bytes written as 64 hex digits (surrounding whitespace allowed).
pub fn parse_hex32(path: &Path, text: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, FileError> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), out.as_mut())
        .map_err(|err| FileError::malformed(path, format!("expected 64 hex digits: {err}")))?;
    Ok(out)
}
