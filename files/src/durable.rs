//! Files that others may read (a public key, the shard layout), written so that a crash
//! leaves either the old content or the new one: a temporary file in the same directory
//! is written and synced, renamed over the target, and the directory synced so that the
//! rename itself is durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::FileError;

/// The directory that holds `path` (`.` for a bare file name).
pub fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Makes the directory's entries durable: a file created or renamed there survives a
/// crash only once its directory is synced.
pub fn sync_dir(path: &Path) -> Result<(), FileError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(FileError::io(path))
}

/// Replaces `path` with `text` atomically and durably, mode 0644 less the umask: for files
/// others may read (secrets go through [`write_private`](crate::write_private)).
pub fn write_durable(path: &Path, text: &[u8]) -> Result<(), FileError> {
    let Some(name) = path.file_name() else {
        return Err(FileError::malformed(path, "not a file name"));
    };
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temporary)
        .map_err(FileError::io(&temporary))?;
    file.write_all(text).map_err(FileError::io(&temporary))?;
    file.sync_all().map_err(FileError::io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(FileError::io(path))?;
    sync_dir(directory_of(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.pub");
        write_durable(&path, b"first\n").unwrap();
        write_durable(&path, b"second\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["provider.pub"]);
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(directory_of(Path::new("layout.toml")), Path::new("."));
        assert_eq!(directory_of(Path::new("/a/b")), Path::new("/a"));
    }
}
