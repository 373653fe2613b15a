//! The journal directory's two markers, which say how far the journal is known to be
//! durable beyond what its bytes say (docs/JOURNAL.md, "Markers"):
//!
//! - `OPEN` (`indicia-open-v1 <sequence>`), written when the appliance opens the journal,
//!   after recovery made everything it kept durable: records up to `<sequence>` were
//!   durable, so damage there is corruption, also for an audit run beside the appliance
//!   and for the recovery after a crash.
//! - `CLOSED` (`indicia-closed-v1 <sequence> <chain hex>`), written by a clean stop after
//!   the last flush: every record up to it was durable, none may follow, and the last one
//!   has that chain value.
//!
//! Each is written to a temporary file, synced, renamed into place, and the directory is
//! synced (`indicia_files::write_durable`), so a crash leaves the old marker or the new
//! one, never half of one.

use std::io;
use std::path::Path;

use super::format::CHAIN_BYTES;
use super::history::Expected;
use super::segment::sync_dir;
use super::JournalError;

/// The marker a clean close leaves in the journal directory (removed when it is opened).
pub const CLOSED_FILE: &str = "CLOSED";
const CLOSED_MAGIC: &str = "indicia-closed-v1";
/// The marker an open journal carries.
pub const OPEN_FILE: &str = "OPEN";
const OPEN_MAGIC: &str = "indicia-open-v1";

/// The markers found in a journal directory.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Markers {
    pub closed: Option<Expected>,
    pub open: Option<Expected>,
}

impl Markers {
    /// What the journal is known to hold: a clean close says the most.
    pub fn expected(&self) -> Option<Expected> {
        self.closed.or(self.open)
    }
}

/// What the markers of the journal in `dir` say is durable (None: nothing is known).
pub fn read_expected(dir: &Path) -> Result<Option<Expected>, JournalError> {
    Ok(read(dir)?.expected())
}

pub(super) fn read(dir: &Path) -> Result<Markers, JournalError> {
    Ok(Markers {
        closed: read_one(dir, CLOSED_FILE, CLOSED_MAGIC, true)?,
        open: read_one(dir, OPEN_FILE, OPEN_MAGIC, false)?,
    })
}

fn read_one(
    dir: &Path,
    name: &str,
    magic: &str,
    with_chain: bool,
) -> Result<Option<Expected>, JournalError> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let malformed = || JournalError::Marker {
        path: path.clone(),
        what: if with_chain {
            format!("not a `{magic} <sequence> <chain>` marker")
        } else {
            format!("not a `{magic} <sequence>` marker")
        },
    };
    let mut fields = text.split_whitespace();
    if fields.next() != Some(magic) {
        return Err(malformed());
    }
    let sequence: u64 = fields
        .next()
        .and_then(|field| field.parse().ok())
        .ok_or_else(malformed)?;
    let closed_chain = if with_chain {
        let mut chain = [0u8; CHAIN_BYTES];
        hex::decode_to_slice(fields.next().unwrap_or_default(), &mut chain)
            .map_err(|_| malformed())?;
        Some(chain)
    } else {
        None
    };
    if fields.next().is_some() {
        return Err(malformed());
    }
    Ok(Some(Expected {
        sequence,
        closed_chain,
    }))
}

/// Writes `text` to `dir/name` atomically and durably (temporary file, sync, rename,
/// directory sync: indicia-files' durable write).
fn write(dir: &Path, name: &str, text: &str) -> Result<(), JournalError> {
    Ok(indicia_files::write_durable(
        &dir.join(name),
        text.as_bytes(),
    )?)
}

/// The journal is open, durable up to `durable`: the `OPEN` marker says so, and a `CLOSED`
/// marker (when `was_closed`) is removed.
pub(super) fn open(dir: &Path, durable: u64, was_closed: bool) -> Result<(), JournalError> {
    write(dir, OPEN_FILE, &format!("{OPEN_MAGIC} {durable}\n"))?;
    if was_closed {
        std::fs::remove_file(dir.join(CLOSED_FILE))?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// The journal is closed cleanly at `durable` with the last chain value `chain`.
pub(super) fn close(
    dir: &Path,
    durable: u64,
    chain: &[u8; CHAIN_BYTES],
) -> Result<(), JournalError> {
    write(
        dir,
        CLOSED_FILE,
        &format!("{CLOSED_MAGIC} {durable} {}\n", hex::encode(chain)),
    )?;
    match std::fs::remove_file(dir.join(OPEN_FILE)) {
        Ok(()) => sync_dir(dir)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_a_clean_close_says_the_most() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_expected(dir.path()).unwrap().is_none());
        open(dir.path(), 7, false).unwrap();
        assert_eq!(
            read_expected(dir.path()).unwrap(),
            Some(Expected {
                sequence: 7,
                closed_chain: None
            })
        );
        close(dir.path(), 9, &[3; CHAIN_BYTES]).unwrap();
        assert!(!dir.path().join(OPEN_FILE).exists());
        assert_eq!(
            read_expected(dir.path()).unwrap(),
            Some(Expected {
                sequence: 9,
                closed_chain: Some([3; CHAIN_BYTES])
            })
        );
        open(dir.path(), 9, true).unwrap();
        assert!(!dir.path().join(CLOSED_FILE).exists());
        std::fs::write(dir.path().join(OPEN_FILE), "indicia-open-v1 x\n").unwrap();
        assert!(matches!(
            read_expected(dir.path()),
            Err(JournalError::Marker { .. })
        ));
    }
}
