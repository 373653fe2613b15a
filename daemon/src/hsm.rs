//! The master key sealed by an HSM (PKCS#11).
//!
//! With `[hsm]` configured, the appliance's master key (in a cluster, the cluster master key)
//! is not a file: `master.key.hsm` in the data directory holds it sealed (AES-256-GCM) by a
//! non-extractable AES key that never leaves the HSM. At start the appliance logs in to the
//! token with a PIN from a systemd credential, asks the HSM to open the sealed master key
//! once, logs out, and from then on needs the HSM no more: every vPSD key, journal chain key
//! and appliance secret is derived from or sealed under the master key exactly as with a
//! file key, so the journals, the sealed vPSD keys and etcd's values are the same whichever
//! provider holds it. docs/BENCHMARKS.md ("The master key in an HSM") has the measurements
//! that chose this hierarchy over an HSM call per signing session, and docs/FILES.md the
//! file's format.

use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use indicia_files::FileError;
use thiserror::Error;
use zeroize::Zeroizing;

use serde::Deserialize;

/// The `[hsm]` section: which PKCS#11 module, token and key seal the master key, and which
/// systemd credential holds the token's PIN (never the configuration file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// The HSM vendor's PKCS#11 module (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// The label of the AES key that seals the master key.
    #[serde(default = "HsmConfig::default_key_label")]
    pub key_label: String,
    /// The systemd credential with the token's user PIN (`$CREDENTIALS_DIRECTORY/NAME`).
    #[serde(default = "HsmConfig::default_pin_credential")]
    pub pin_credential: String,
}

impl HsmConfig {
    fn default_key_label() -> String {
        "indicia-master".into()
    }

    fn default_pin_credential() -> String {
        "hsm-pin".into()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !self.module.is_absolute() {
            return Err(format!(
                "hsm.module = {:?} must be an absolute path (the PKCS#11 module)",
                self.module
            ));
        }
        // PKCS#11 labels are 32 bytes, blank-padded; printable ASCII without quotes or
        // backslashes keeps them as they are in master.key.hsm's TOML.
        for (key, value) in [("token", &self.token), ("key_label", &self.key_label)] {
            let printable = value
                .bytes()
                .all(|byte| (0x20..0x7f).contains(&byte) && byte != b'"' && byte != b'\\');
            if value.is_empty() || value.len() > 32 || value.ends_with(' ') || !printable {
                return Err(format!(
                    "hsm.{key} = {value:?}: 1 to 32 printable ASCII bytes (no quotes or \
                     backslashes), not ending in a space"
                ));
            }
        }
        let name = &self.pin_credential;
        if name.is_empty()
            || name.len() > 255
            || !name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
            || name.starts_with('.')
        {
            return Err(format!(
                "hsm.pin_credential = {name:?}: a credential name (letters, digits, '.', '_', '-')"
            ));
        }
        Ok(())
    }
}

/// The sealed master key's file in the data directory.
pub const SEALED_MASTER_KEY_FILE: &str = "master.key.hsm";
/// The associated data of the seal: a sealed master key opens as nothing else.
const SEAL_LABEL: &[u8] = b"indicia master key v1";
const IV_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// Ciphertext and tag of the 32-byte master key.
const SEALED_BYTES: usize = 32 + TAG_BYTES;
/// The format version written as `format = 1`.
const FORMAT: u32 = 1;

/// Why the HSM could not give the master key (or make its key).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HsmError {
    #[error("PKCS#11 module {module}: {source}")]
    Module {
        module: PathBuf,
        source: Pkcs11Error,
    },
    #[error("no token labelled {token:?} in PKCS#11 module {module} (tokens there: {found})")]
    NoToken {
        module: PathBuf,
        token: String,
        found: String,
    },
    #[error("the HSM PIN: {0}")]
    Pin(String),
    #[error("token {token:?} refused the PIN from {source_name}: it is not the token's user PIN")]
    WrongPin { token: String, source_name: String },
    #[error(
        "token {token:?}: its user PIN is locked after too many wrong tries; the security \
         officer must unlock it"
    )]
    PinLocked { token: String },
    #[error(
        "no AES key labelled {label:?} on token {token:?}; make one with `indiciad hsm-keygen` \
         (docs/OPERATIONS.md 5.7)"
    )]
    NoKey { token: String, label: String },
    #[error("{count} keys labelled {label:?} on token {token:?}; the label must name one AES key")]
    ManyKeys {
        token: String,
        label: String,
        count: usize,
    },
    #[error("a key labelled {label:?} is on token {token:?} already; it was not replaced")]
    KeyExists { token: String, label: String },
    #[error(
        "the key {label:?} on token {token:?} can leave the HSM (CKA_EXTRACTABLE true or \
         CKA_SENSITIVE false); the master key is sealed only by a key that cannot"
    )]
    Extractable { token: String, label: String },
    #[error(
        "{path} does not open under the key {label:?} on token {token:?}: another key sealed \
         it (or the file was changed)"
    )]
    Unseal {
        path: PathBuf,
        token: String,
        label: String,
    },
    #[error(
        "{path} was sealed by key {sealed_label:?} on token {sealed_token:?}, but [hsm] names \
         key {label:?} on token {token:?}"
    )]
    OtherKey {
        path: PathBuf,
        sealed_token: String,
        sealed_label: String,
        token: String,
        label: String,
    },
    #[error("token {token:?}, {operation}: {source}")]
    Operation {
        token: String,
        operation: &'static str,
        source: Pkcs11Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
}

/// Reads the token's user PIN: from `file` when given (the offline tools' `--pin-file`),
/// else from the systemd credential `[hsm] pin_credential` (`$CREDENTIALS_DIRECTORY/NAME`,
/// `LoadCredential=` or `LoadCredentialEncrypted=`). Never from the configuration file.
pub fn read_pin(config: &HsmConfig, file: Option<&Path>) -> Result<Pin, HsmError> {
    let path = match file {
        Some(file) => file.to_owned(),
        None => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                HsmError::Pin(format!(
                    "the credential {:?} is needed, but $CREDENTIALS_DIRECTORY is not set (run \
                     under systemd with LoadCredential={}:FILE, or give --pin-file to a tool)",
                    config.pin_credential, config.pin_credential
                ))
            })?;
            Path::new(&dir).join(&config.pin_credential)
        }
    };
    let text = indicia_files::read_private(&path)?;
    let secret = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
    if secret.is_empty() {
        return Err(HsmError::Pin(format!("{} is empty", path.display())));
    }
    let source = match file {
        Some(file) => file.display().to_string(),
        None => format!("the credential {:?}", config.pin_credential),
    };
    Ok(Pin { secret, source })
}

/// A token's user PIN, and where it came from (an error names it, never the PIN).
pub struct Pin {
    pub secret: Zeroizing<String>,
    pub source: String,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pin(from {})", self.source)
    }
}

/// The PIN read ([`read_pin`]), then the token's key found ([`Hsm::open`]): what the
/// appliance and its tools do to use the HSM.
pub fn unlock(config: &HsmConfig, pin_file: Option<&Path>) -> Result<Hsm, HsmError> {
    Hsm::open(config, &read_pin(config, pin_file)?)
}

/// A logged-in session on the configured token, and its AES key when it has one.
pub struct Hsm {
    session: Session,
    key: Option<ObjectHandle>,
    token: String,
    label: String,
    /// Kept until the session is closed (the library is finalized with the last handle).
    _pkcs11: Pkcs11,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hsm(token {:?}, key {:?})", self.token, self.label)
    }
}

/// The master key as `master.key.hsm` holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedMasterKey {
    /// The token and key label that sealed it (checked against `[hsm]` before opening).
    pub token: String,
    pub key_label: String,
    pub iv: [u8; IV_BYTES],
    /// AES-256-GCM ciphertext of the 32-byte master key, then its 16-byte tag.
    pub sealed: [u8; SEALED_BYTES],
}

impl SealedMasterKey {
    /// The file's text (docs/FILES.md, "master.key.hsm").
    pub fn to_text(&self) -> String {
        format!(
            "# The appliance's master key, sealed (AES-256-GCM) by an AES key inside an HSM.\n\
             # Useless without that HSM key; see docs/FILES.md.\n\
             format = {FORMAT}\n\
             token = {:?}\n\
             key_label = {:?}\n\
             iv = \"{}\"\n\
             sealed = \"{}\"\n",
            self.token,
            self.key_label,
            hex::encode(self.iv),
            hex::encode(self.sealed)
        )
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, FileError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            format: u32,
            token: String,
            key_label: String,
            iv: String,
            sealed: String,
        }
        let raw: Raw =
            toml::from_str(text).map_err(|err| FileError::malformed(path, err.to_string()))?;
        if raw.format != FORMAT {
            return Err(FileError::malformed(
                path,
                format!("format {} (this appliance reads {FORMAT})", raw.format),
            ));
        }
        let mut iv = [0u8; IV_BYTES];
        hex::decode_to_slice(&raw.iv, &mut iv).map_err(|err| {
            FileError::malformed(
                path,
                format!("iv: expected {} hex digits: {err}", IV_BYTES * 2),
            )
        })?;
        let mut sealed = [0u8; SEALED_BYTES];
        hex::decode_to_slice(&raw.sealed, &mut sealed).map_err(|err| {
            FileError::malformed(
                path,
                format!("sealed: expected {} hex digits: {err}", SEALED_BYTES * 2),
            )
        })?;
        Ok(Self {
            token: raw.token,
            key_label: raw.key_label,
            iv,
            sealed,
        })
    }

    /// Reads `master.key.hsm` (a private file: 0600 or stricter).
    pub fn read(path: &Path) -> Result<Self, FileError> {
        let text = indicia_files::read_private(path)?;
        Self::parse(path, &text)
    }
}

fn is_already_initialized(err: &Pkcs11Error) -> bool {
    matches!(
        err,
        Pkcs11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, Function::Initialize)
    )
}

impl Hsm {
    /// Loads the module, finds the token, logs in with `pin`, and finds the key (which must
    /// not be extractable).
    pub fn open(config: &HsmConfig, pin: &Pin) -> Result<Self, HsmError> {
        let mut hsm = Self::login(config, pin)?;
        let key = hsm.find_key()?.ok_or_else(|| HsmError::NoKey {
            token: hsm.token.clone(),
            label: hsm.label.clone(),
        })?;
        hsm.check_not_extractable(key)?;
        hsm.key = Some(key);
        Ok(hsm)
    }

    fn login(config: &HsmConfig, pin: &Pin) -> Result<Self, HsmError> {
        let module_error = |source| HsmError::Module {
            module: config.module.clone(),
            source,
        };
        let pkcs11 = Pkcs11::new(&config.module).map_err(module_error)?;
        if let Err(err) = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            if !is_already_initialized(&err) {
                return Err(module_error(err));
            }
        }
        let slot = find_token(&pkcs11, config)?;
        let token = config.token.clone();
        let operation = |operation| {
            let token = token.clone();
            move |source| HsmError::Operation {
                token,
                operation,
                source,
            }
        };
        let session = pkcs11
            .open_rw_session(slot)
            .map_err(operation("open a session"))?;
        let auth = AuthPin::new(pin.secret.as_str().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) => {}
            // Another session of this process (a tool that opens twice) is logged in already.
            Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Pkcs11Error::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                return Err(HsmError::WrongPin {
                    token,
                    source_name: pin.source.clone(),
                })
            }
            Err(Pkcs11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(HsmError::PinLocked { token })
            }
            Err(err) => return Err(operation("log in")(err)),
        }
        Ok(Self {
            session,
            key: None,
            token,
            label: config.key_label.clone(),
            _pkcs11: pkcs11,
        })
    }

    fn operation(&self, operation: &'static str) -> impl FnOnce(Pkcs11Error) -> HsmError {
        let token = self.token.clone();
        move |source| HsmError::Operation {
            token,
            operation,
            source,
        }
    }

    fn find_key(&self) -> Result<Option<ObjectHandle>, HsmError> {
        let found = self
            .session
            .find_objects(&[Attribute::Label(self.label.as_bytes().to_vec())])
            .map_err(self.operation("find the key"))?;
        match found.len() {
            0 => Ok(None),
            1 => {
                let key = found[0];
                let attributes = self
                    .session
                    .get_attributes(key, &[AttributeType::Class, AttributeType::KeyType])
                    .map_err(self.operation("read the key's attributes"))?;
                let aes = attributes
                    .iter()
                    .any(|attribute| matches!(attribute, Attribute::KeyType(KeyType::AES)));
                if !aes {
                    return Err(HsmError::NoKey {
                        token: self.token.clone(),
                        label: self.label.clone(),
                    });
                }
                Ok(Some(key))
            }
            count => Err(HsmError::ManyKeys {
                token: self.token.clone(),
                label: self.label.clone(),
                count,
            }),
        }
    }

    fn check_not_extractable(&self, key: ObjectHandle) -> Result<(), HsmError> {
        let attributes = self
            .session
            .get_attributes(key, &[AttributeType::Extractable, AttributeType::Sensitive])
            .map_err(self.operation("read the key's attributes"))?;
        let extractable = attributes
            .iter()
            .any(|attribute| matches!(attribute, Attribute::Extractable(true)));
        let sensitive = attributes
            .iter()
            .any(|attribute| matches!(attribute, Attribute::Sensitive(true)));
        if extractable || !sensitive {
            return Err(HsmError::Extractable {
                token: self.token.clone(),
                label: self.label.clone(),
            });
        }
        Ok(())
    }

    /// Makes the master key's sealing key on the token: AES-256, sensitive, never
    /// extractable, kept on the token, usable only to encrypt and decrypt. Refuses when the
    /// label names a key already.
    pub fn generate_key(config: &HsmConfig, pin: &Pin) -> Result<(), HsmError> {
        let hsm = Self::login(config, pin)?;
        if hsm.find_key()?.is_some() {
            return Err(HsmError::KeyExists {
                token: hsm.token.clone(),
                label: hsm.label.clone(),
            });
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Label(config.key_label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ];
        hsm.session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(hsm.operation("generate the key"))?;
        Ok(())
    }

    /// The sealing key ([`Hsm::open`] found it; a session made only to generate it has
    /// none).
    fn key(&self) -> Result<ObjectHandle, HsmError> {
        self.key.ok_or_else(|| HsmError::NoKey {
            token: self.token.clone(),
            label: self.label.clone(),
        })
    }

    /// Seals `master_key` under the HSM key (the HSM encrypts; a fresh random IV).
    pub fn seal(&self, master_key: &[u8; 32]) -> Result<SealedMasterKey, HsmError> {
        let mut iv = [0u8; IV_BYTES];
        self.session
            .generate_random_slice(&mut iv)
            .map_err(self.operation("random IV"))?;
        let mut params_iv = iv;
        let params = GcmParams::new(&mut params_iv, SEAL_LABEL, 128.into())
            .map_err(self.operation("GCM parameters"))?;
        let out = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key()?, master_key)
            .map_err(self.operation("seal the master key"))?;
        let sealed: [u8; SEALED_BYTES] = out
            .as_slice()
            .try_into()
            .map_err(|_| self.operation("seal the master key")(Pkcs11Error::InvalidValue))?;
        Ok(SealedMasterKey {
            token: self.token.clone(),
            key_label: self.label.clone(),
            iv,
            sealed,
        })
    }

    /// Opens a sealed master key inside the HSM. `path` names it in errors.
    pub fn unseal(
        &self,
        sealed: &SealedMasterKey,
        path: &Path,
    ) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        if sealed.token != self.token || sealed.key_label != self.label {
            return Err(HsmError::OtherKey {
                path: path.to_owned(),
                sealed_token: sealed.token.clone(),
                sealed_label: sealed.key_label.clone(),
                token: self.token.clone(),
                label: self.label.clone(),
            });
        }
        let mut iv = sealed.iv;
        let params = GcmParams::new(&mut iv, SEAL_LABEL, 128.into())
            .map_err(self.operation("GCM parameters"))?;
        let plain = Zeroizing::new(
            self.session
                .decrypt(&Mechanism::AesGcm(params), self.key()?, &sealed.sealed)
                .map_err(|err| match err {
                    Pkcs11Error::Pkcs11(
                        RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::FunctionFailed,
                        _,
                    ) => HsmError::Unseal {
                        path: path.to_owned(),
                        token: self.token.clone(),
                        label: self.label.clone(),
                    },
                    err => self.operation("open the master key")(err),
                })?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(HsmError::Unseal {
                path: path.to_owned(),
                token: self.token.clone(),
                label: self.label.clone(),
            });
        }
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

impl Drop for Hsm {
    fn drop(&mut self) {
        // The session closes when dropped; logging out first leaves the token as found.
        let _ = self.session.logout();
    }
}

/// The slot whose token has the configured label.
fn find_token(pkcs11: &Pkcs11, config: &HsmConfig) -> Result<Slot, HsmError> {
    let module_error = |source| HsmError::Module {
        module: config.module.clone(),
        source,
    };
    let mut found = Vec::new();
    for slot in pkcs11.get_slots_with_token().map_err(module_error)? {
        let info = pkcs11.get_token_info(slot).map_err(module_error)?;
        let label = info.label().trim_end().to_owned();
        if label == config.token {
            return Ok(slot);
        }
        found.push(format!("{label:?}"));
    }
    Err(HsmError::NoToken {
        module: config.module.clone(),
        token: config.token.clone(),
        found: if found.is_empty() {
            "none".into()
        } else {
            found.join(", ")
        },
    })
}
