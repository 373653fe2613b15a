//! Files that hold a secret. They are created new (never over an existing file) with mode
//! 0600, synced, and their directory synced, so that a secret that was reported written
//! survives a crash. A reader refuses a file that the group or others may access at all:
//! such a secret may have leaked, and the operator must know.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::{directory_of, parse_hex32, sync_dir, FileError};

/// Reads a file that holds a secret, refusing it if the group or others have any access.
pub fn read_private(path: &Path) -> Result<Zeroizing<String>, FileError> {
    let file = File::open(path).map_err(FileError::io(path))?;
    let mode = file
        .metadata()
        .map_err(FileError::io(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(FileError::Permissions {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    let text = std::io::read_to_string(file).map_err(FileError::io(path))?;
    Ok(Zeroizing::new(text))
}

/// Writes a new file readable by its owner only (0600), then syncs it and its directory.
/// Fails, writing nothing, if the file exists: a secret is never overwritten.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(FileError::io(path))?;
    file.write_all(bytes).map_err(FileError::io(path))?;
    file.sync_all().map_err(FileError::io(path))?;
    sync_dir(directory_of(path))
}

/// A secret of 32 bytes: 64 hex digits in a private file (a client secret, the master
/// key, a provider's Ed25519 seed). An HMAC key made from it is the 32 decoded bytes, not
/// the hex text.
pub fn load_secret(path: &Path) -> Result<Zeroizing<[u8; 32]>, FileError> {
    parse_hex32(path, &read_private(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_private_file_is_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"hello\n").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_private(&path).unwrap().as_str(), "hello\n");
    }

    #[test]
    fn write_private_refuses_an_existing_file_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"first").unwrap();
        let err = write_private(&path, b"second").unwrap_err();
        assert!(
            matches!(&err, FileError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(read_private(&path).unwrap().as_str(), "first");
    }

    #[test]
    fn a_file_the_group_may_read_is_refused_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        write_private(&path, "ab".repeat(32).as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_private(&path).unwrap_err();
        assert!(
            matches!(err, FileError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{} may be read by group or others (mode 640); it must be 0600 or stricter",
                path.display()
            )
        );
        assert!(load_secret(&path).is_err());
    }

    #[test]
    fn a_secret_is_64_hex_digits_and_a_malformed_one_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.secret");
        write_private(&good, format!("{}\n", "0f".repeat(32)).as_bytes()).unwrap();
        assert_eq!(*load_secret(&good).unwrap(), [0x0f; 32]);
        let short = dir.path().join("short.secret");
        write_private(&short, b"abc\n").unwrap();
        let err = load_secret(&short).unwrap_err();
        assert!(matches!(err, FileError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}
