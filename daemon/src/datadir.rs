//! The data directory: the master key, the admin credential, the provider's public key
//! (and, on a development appliance, the provider's key pair), and one journal per shard.
//!
//! On first start in an empty directory the appliance creates the master key, an admin
//! credential and a development provider key, each readable by its owner only (mode 0600),
//! and says where they are. There is never unauthenticated access, not even by default. A
//! master key file that the group or others may read is refused.
//!
//! The master key is `master.key` (or its systemd credential), or, with `[hsm]`,
//! `master.key.hsm`: the same 32 bytes sealed by a key inside an HSM ([`crate::hsm`]).
//!
//! How each file is written and read (private, durable, the credential's TOML) is
//! `indicia-files`'s, shared with the client; its error type is this module's
//! [`DataDirError`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::hsm::HsmConfig;
use crate::hsm::{HsmError, SealedMasterKey, SEALED_MASTER_KEY_FILE};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_files::{parse_hex32, random32, write_durable, write_private};
use zeroize::Zeroizing;

pub use indicia_files::{load_secret, read_private, Credential, FileError as DataDirError};

pub const MASTER_KEY_FILE: &str = "master.key";
pub const ADMIN_CREDENTIAL_FILE: &str = "admin.credential";
pub const PROVIDER_KEY_FILE: &str = "provider.key";
pub const PROVIDER_PUBLIC_KEY_FILE: &str = "provider.pub";
/// The client id of the credential created at first start.
pub const ADMIN_CLIENT_ID: &str = "admin";

/// Writes a file that others may read, atomically and durably (the shard layout):
/// [`indicia_files::write_durable`] for text.
pub fn write_synced(path: &Path, text: &str) -> Result<(), DataDirError> {
    write_durable(path, text.as_bytes())
}

/// A new 32-byte secret as a private file of 64 hex digits.
fn create_secret(path: &Path) -> Result<Zeroizing<[u8; 32]>, DataDirError> {
    let secret = random32()?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(secret.as_ref())));
    write_private(path, text.as_bytes())?;
    Ok(secret)
}

/// Where the master key comes from.
#[derive(Debug, Clone, Copy)]
pub enum KeySource<'a> {
    /// `master.key` in the data directory, or this file instead (a systemd credential).
    File(Option<&'a Path>),
    /// `master.key.hsm` in the data directory, opened by the HSM; the PIN from this file
    /// (a tool's `--pin-file`) or else from the `[hsm] pin_credential` credential.
    Hsm {
        config: &'a HsmConfig,
        pin_file: Option<&'a Path>,
    },
}

/// Why the master key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyError {
    #[error(transparent)]
    File(#[from] DataDirError),
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    #[error(
        "{path}: the master key is sealed by an HSM here; configure [hsm] (docs/OPERATIONS.md \
         5.7)"
    )]
    SealedByHsm { path: PathBuf },
    #[error(
        "{path}: the data directory holds a file master key, but [hsm] is configured; move it \
         into the HSM with `indiciad rewrap` (docs/OPERATIONS.md 5.7)"
    )]
    FileKeyUnderHsm { path: PathBuf },
}

/// The master key of an existing data directory, read-only: nothing is created (the
/// offline tools, and an audit of a backup's copy).
pub fn read_master_key(
    path: &Path,
    source: KeySource<'_>,
) -> Result<Zeroizing<[u8; 32]>, MasterKeyError> {
    let file_path = path.join(MASTER_KEY_FILE);
    let sealed_path = path.join(SEALED_MASTER_KEY_FILE);
    match source {
        KeySource::File(Some(file)) => Ok(load_secret(file)?),
        KeySource::File(None) => {
            if !file_path.exists() && sealed_path.exists() {
                return Err(MasterKeyError::SealedByHsm { path: sealed_path });
            }
            Ok(load_secret(&file_path)?)
        }
        KeySource::Hsm { config, pin_file } => {
            if !sealed_path.exists() && file_path.exists() {
                return Err(MasterKeyError::FileKeyUnderHsm { path: file_path });
            }
            let sealed = SealedMasterKey::read(&sealed_path)?;
            let hsm = crate::hsm::unlock(config, pin_file)?;
            Ok(hsm.unseal(&sealed, &sealed_path)?)
        }
    }
}

/// The appliance's secrets and where its journals go.
#[derive(Debug)]
pub struct DataDir {
    pub path: PathBuf,
    master_key: Zeroizing<[u8; 32]>,
    pub provider_public_key: [u8; 32],
    pub admin: Credential,
    /// Files this start created (first start), to tell the operator.
    pub created: Vec<PathBuf>,
}

/// Whether the data directory already holds shard journals (or their layout).
fn has_journals(path: &Path) -> Result<bool, DataDirError> {
    if path.join("layout.toml").exists() {
        return Ok(true);
    }
    for entry in std::fs::read_dir(path).map_err(DataDirError::io(path))? {
        let entry = entry.map_err(DataDirError::io(path))?;
        if entry.file_name().to_string_lossy().starts_with("shard-") {
            return Ok(true);
        }
    }
    Ok(false)
}

impl DataDir {
    /// Opens the data directory, creating what is missing on first start.
    pub fn open_or_init(path: &Path) -> Result<Self, MasterKeyError> {
        Self::open_with(path, KeySource::File(None))
    }

    /// Like [`DataDir::open_or_init`], with the master key from `source`: a file in the data
    /// directory, a systemd credential (then none is created in the data directory), or the
    /// HSM (a new data directory gets a new master key sealed by it, `master.key.hsm`).
    pub fn open_with(path: &Path, source: KeySource<'_>) -> Result<Self, MasterKeyError> {
        std::fs::create_dir_all(path).map_err(DataDirError::io(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(DataDirError::io(path))?;
        let mut created = Vec::new();

        let master_path = match source {
            KeySource::Hsm { .. } => path.join(SEALED_MASTER_KEY_FILE),
            KeySource::File(_) => path.join(MASTER_KEY_FILE),
        };
        let fresh = match source {
            KeySource::File(Some(_)) => false,
            KeySource::File(None) => {
                !master_path.exists() && !path.join(SEALED_MASTER_KEY_FILE).exists()
            }
            KeySource::Hsm { .. } => !master_path.exists() && !path.join(MASTER_KEY_FILE).exists(),
        };
        let master_key = if !fresh {
            read_master_key(path, source)?
        } else if has_journals(path)? {
            // A new key could read none of the journals: never make one for them.
            return Err(DataDirError::Malformed {
                path: master_path,
                what: "missing, but the data directory holds journals written under it; \
                       restore the master key (or its systemd credential)"
                    .into(),
            }
            .into());
        } else if let KeySource::Hsm { config, pin_file } = source {
            let hsm = crate::hsm::unlock(config, pin_file)?;
            let key = random32()?;
            let sealed = hsm.seal(&key)?;
            write_private(&master_path, sealed.to_text().as_bytes())?;
            created.push(master_path);
            key
        } else {
            let key = create_secret(&master_path)?;
            created.push(master_path);
            key
        };

        let admin_path = path.join(ADMIN_CREDENTIAL_FILE);
        let admin = if admin_path.exists() {
            Credential::load(&admin_path)?
        } else {
            created.push(admin_path.clone());
            Credential::create(&admin_path, ADMIN_CLIENT_ID)?
        };

        let public_path = path.join(PROVIDER_PUBLIC_KEY_FILE);
        let provider_public_key = if public_path.exists() {
            let text =
                std::fs::read_to_string(&public_path).map_err(DataDirError::io(&public_path))?;
            *parse_hex32(&public_path, &text)?
        } else {
            // A development provider: in production the provider keeps its key pair and the
            // operator installs only provider.pub. A development key whose public half was
            // removed gets it back.
            let key_path = path.join(PROVIDER_KEY_FILE);
            let seed = if key_path.exists() {
                load_secret(&key_path)?
            } else {
                let seed = create_secret(&key_path)?;
                created.push(key_path);
                seed
            };
            let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|_| {
                DataDirError::Malformed {
                    path: path.join(PROVIDER_KEY_FILE),
                    what: "not an Ed25519 seed".into(),
                }
            })?;
            let mut public = [0u8; 32];
            public.copy_from_slice(pair.public_key().as_ref());
            write_durable(
                &public_path,
                format!("{}\n", hex::encode(public)).as_bytes(),
            )?;
            created.push(public_path);
            public
        };

        Ok(Self {
            path: path.to_owned(),
            master_key,
            provider_public_key,
            admin,
            created,
        })
    }

    pub fn master_key(&self) -> &[u8; 32] {
        &self.master_key
    }

    /// The journal directory of a shard.
    pub fn shard_dir(&self, shard: u16) -> PathBuf {
        self.path.join(format!("shard-{shard:03}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_start_creates_private_secrets_and_later_starts_reuse_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let first = DataDir::open_or_init(&path).unwrap();
        assert_eq!(first.created.len(), 4);
        for name in [MASTER_KEY_FILE, ADMIN_CREDENTIAL_FILE, PROVIDER_KEY_FILE] {
            assert_eq!(mode(&path.join(name)), 0o600, "{name}");
        }
        assert_eq!(mode(&path), 0o700);
        assert_eq!(first.admin.client_id, ADMIN_CLIENT_ID);
        let second = DataDir::open_or_init(&path).unwrap();
        assert!(second.created.is_empty());
        assert_eq!(second.master_key(), first.master_key());
        assert_eq!(*second.admin.secret, *first.admin.secret);
        assert_eq!(second.provider_public_key, first.provider_public_key);
        assert_ne!(first.master_key(), &[0u8; 32]);
    }

    #[test]
    fn a_master_key_from_a_credential_file_is_used_and_none_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("credential-master.key");
        write_private(&key_file, format!("{}\n", "ab".repeat(32)).as_bytes()).unwrap();
        let path = dir.path().join("data");
        let data = DataDir::open_with(&path, KeySource::File(Some(&key_file))).unwrap();
        assert_eq!(data.master_key(), &[0xab; 32]);
        assert!(!path.join(MASTER_KEY_FILE).exists());
        assert_eq!(data.created.len(), 3);
    }

    #[test]
    fn a_removed_provider_pub_is_derived_again_from_the_development_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let first = DataDir::open_or_init(&path).unwrap();
        std::fs::remove_file(path.join(PROVIDER_PUBLIC_KEY_FILE)).unwrap();
        let again = DataDir::open_or_init(&path).unwrap();
        assert_eq!(again.provider_public_key, first.provider_public_key);
        assert_eq!(again.created, vec![path.join(PROVIDER_PUBLIC_KEY_FILE)]);
    }

    #[test]
    fn a_lost_master_key_is_not_replaced_when_journals_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        DataDir::open_or_init(&path).unwrap();
        std::fs::create_dir(path.join("shard-000")).unwrap();
        std::fs::remove_file(path.join(MASTER_KEY_FILE)).unwrap();
        let err = DataDir::open_or_init(&path).unwrap_err();
        assert!(err.to_string().contains("restore the master key"), "{err}");
        assert!(!path.join(MASTER_KEY_FILE).exists());
    }

    #[test]
    fn a_master_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        DataDir::open_or_init(&path).unwrap();
        let key = path.join(MASTER_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = DataDir::open_or_init(&path).unwrap_err();
        assert!(
            matches!(
                err,
                MasterKeyError::File(DataDirError::Permissions { mode: 0o640, .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("master.key"));
    }
}
