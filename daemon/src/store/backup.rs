//! Hot backups (docs/OPERATIONS.md 8.2): while the appliance serves, every shard's journal
//! is copied up to the durable point the shard had when the backup began
//! ([`crate::journal::copy::copy_durable`]: cut there, closed as a clean stop would), beside
//! the data directory's public files, and the copy is audited. `backup.toml` in the copy
//! says what it covers. No secret is copied: the master key (file or HSM) and the
//! credentials are backed up apart (docs/OPERATIONS.md 8.1).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use indicia_proto::{BackupReport, ShardCopy};
use zeroize::Zeroizing;

use crate::engine::EngineConfig;
use crate::journal::copy::copy_durable;
use crate::journal::{ChainKey, JournalError};

/// The manifest a backup writes last: what it covers.
pub const MANIFEST_FILE: &str = "backup.toml";
/// Files of the data directory copied as they are when present: the shard layout, the
/// provider's public key, the cluster membership and the HSM-sealed master key (useless
/// without the HSM's key).
const PUBLIC_FILES: [&str; 4] = [
    "layout.toml",
    crate::datadir::PROVIDER_PUBLIC_KEY_FILE,
    "cluster-member",
    crate::hsm::SEALED_MASTER_KEY_FILE,
];

/// Why a backup failed. A failed backup leaves what it wrote in place, without
/// `backup.toml`: only a copy with its manifest is a backup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    #[error("{0}: the backup directory must be an absolute path")]
    NotAbsolute(PathBuf),
    #[error("{0} exists and is not empty: a backup goes to a new or empty directory")]
    NotEmpty(PathBuf),
    #[error("{0} is inside the data directory: a backup goes elsewhere")]
    InsideDataDir(PathBuf),
    #[error("another backup is running")]
    Running,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shard {shard}: {source}")]
    Journal { shard: u16, source: JournalError },
    #[error("the audit of the copy could not run: {0}")]
    Audit(#[from] super::audit::AuditError),
    #[error("backup manifest: {0}")]
    Manifest(indicia_files::FileError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a running appliance needs to take a backup: where its data is and its master key
/// (the chain keys of the copy, and the audit). One backup at a time.
pub struct BackupSource {
    pub data_dir: PathBuf,
    master_key: Zeroizing<[u8; 32]>,
    engine_config: EngineConfig,
    running: AtomicBool,
}

impl std::fmt::Debug for BackupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSource")
            .field("data_dir", &self.data_dir)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

/// Clears the running flag however the backup ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl BackupSource {
    pub fn new(data_dir: PathBuf, master_key: &[u8; 32], engine_config: EngineConfig) -> Self {
        Self {
            data_dir,
            master_key: Zeroizing::new(*master_key),
            engine_config,
            running: AtomicBool::new(false),
        }
    }

    /// Claims the one backup slot, or says another backup runs.
    pub fn claim(&self) -> Result<(), BackupError> {
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(BackupError::Running);
        }
        Ok(())
    }

    /// Frees the slot of a claim whose backup never ran.
    pub fn release(&self) {
        self.running.store(false, Ordering::Release);
    }

    /// Takes the backup claimed with [`BackupSource::claim`]: every shard's journal up to
    /// `durable[shard]` into `out`, then the audit of the copy, then the manifest. Blocking
    /// (file copies): run it on a thread of its own.
    pub fn take(
        &self,
        out: &Path,
        durable: &[u64],
        taken_unix: u64,
    ) -> Result<BackupReport, BackupError> {
        let _running = Running(&self.running);
        if !out.is_absolute() {
            return Err(BackupError::NotAbsolute(out.to_owned()));
        }
        let inside = |dir: &Path| {
            // Compared as the file system resolves them, where they exist.
            let resolve = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_owned());
            resolve(out).starts_with(resolve(dir))
        };
        if inside(&self.data_dir) {
            return Err(BackupError::InsideDataDir(out.to_owned()));
        }
        match std::fs::read_dir(out) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(BackupError::NotEmpty(out.to_owned()));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(out).map_err(io(out))?;
            }
            Err(err) => return Err(io(out)(err)),
        }
        // The journals hold everything in the clear but the sealed keys.
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700)).map_err(io(out))?;
        let mut shards = Vec::with_capacity(durable.len());
        for (index, &sequence) in durable.iter().enumerate() {
            let shard = u16::try_from(index).unwrap_or(u16::MAX);
            let name = format!("shard-{shard:03}");
            let copied = copy_durable(
                &self.data_dir.join(&name),
                &out.join(&name),
                &ChainKey::derive(&self.master_key, shard),
                sequence,
            )
            .map_err(|source| BackupError::Journal { shard, source })?;
            shards.push(ShardCopy {
                sequence: copied.sequence,
                segments: copied.segments,
                bytes: copied.bytes,
            });
        }
        for name in PUBLIC_FILES {
            let from = self.data_dir.join(name);
            if from.exists() {
                let to = out.join(name);
                std::fs::copy(&from, &to).map_err(io(&to))?;
            }
        }
        let audit = super::audit::audit_data_dir(out, &self.master_key, &self.engine_config)?;
        let report = BackupReport {
            taken_unix,
            clean: audit.is_clean(),
            shards,
        };
        let manifest = out.join(MANIFEST_FILE);
        indicia_files::write_durable(&manifest, manifest_text(&report).as_bytes())
            .map_err(BackupError::Manifest)?;
        Ok(report)
    }
}

/// `backup.toml` (docs/FILES.md, "Hot backup").
pub fn manifest_text(report: &BackupReport) -> String {
    let mut text = format!(
        "# A hot backup of an indicia appliance: every shard's journal up to the sequence\n\
         # below (docs/OPERATIONS.md 8.2). Restore: docs/OPERATIONS.md 9.10.\n\
         format = 1\n\
         appliance_version = \"{}\"\n\
         taken_unix = {}\n\
         audit_clean = {}\n",
        env!("CARGO_PKG_VERSION"),
        report.taken_unix,
        report.clean
    );
    for (index, shard) in report.shards.iter().enumerate() {
        let _ = write!(
            text,
            "\n[[shards]]\nshard = {index}\nsequence = {}\nsegments = {}\nbytes = {}\n",
            shard.sequence, shard.segments, shard.bytes
        );
    }
    text
}
