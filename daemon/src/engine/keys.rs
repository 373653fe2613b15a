//! vPSD signing keys: generation inside the engine, sealing under the master key, and the
//! short-lived unsealed form used by one signing session.
//!
//! A sealed key is AES-256-GCM of the raw private key (the P-256 scalar or the Ed25519
//! seed, 32 bytes) with a random 96-bit nonce. The associated data binds it to its vPSD, its
//! key serial and the vPSD version of the record that created it (provision or rotation),
//! so a sealed key copied onto another vPSD, presented under another serial, or spliced
//! into another record does not open. The unsealed bytes live in a zeroizing buffer for the
//! length of one session.

use aws_lc_rs::aead::{Aad, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::encoding::{AsBigEndian, AsDer};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use indicia_proto::Algorithm;
use thiserror::Error;
use zeroize::Zeroizing;

/// Raw private key length for both algorithms.
pub const PRIVATE_KEY_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
/// Length of a sealed key: nonce, ciphertext, tag.
pub const SEALED_KEY_BYTES: usize = NONCE_LEN + PRIVATE_KEY_BYTES + TAG_BYTES;
/// Length of the master key (AES-256).
pub const MASTER_KEY_BYTES: usize = 32;
const SEAL_LABEL: &[u8] = b"indicia vpsd key v1";

/// Why a key operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error(
        "sealed key of vPSD {vpsd_id} serial {key_serial} does not open under this master key"
    )]
    Unseal { vpsd_id: u64, key_serial: u32 },
    #[error("the unsealed key of vPSD {vpsd_id} does not match its public key")]
    Mismatch { vpsd_id: u64 },
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// The appliance's key-encryption key.
pub struct MasterKey {
    key: RandomizedNonceKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// A private key sealed under the master key; safe to store and journal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealedKey(pub [u8; SEALED_KEY_BYTES]);

impl std::fmt::Debug for SealedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedKey(..)")
    }
}

/// A public key as stored and journaled: the uncompressed P-256 point (65 bytes) or the
/// Ed25519 key (32 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub algorithm: Algorithm,
    pub bytes: Vec<u8>,
}

/// What a sealed key is bound to (its associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyBinding {
    pub vpsd_id: u64,
    pub key_serial: u32,
    /// The vPSD version of the record that created the key.
    pub sealed_version: u64,
}

/// label (19 bytes) || vpsd_id u64 LE || key_serial u32 LE || sealed_version u64 LE.
fn associated_data(binding: KeyBinding) -> [u8; 39] {
    let mut aad = [0u8; 39];
    aad[..19].copy_from_slice(SEAL_LABEL);
    aad[19..27].copy_from_slice(&binding.vpsd_id.to_le_bytes());
    aad[27..31].copy_from_slice(&binding.key_serial.to_le_bytes());
    aad[31..39].copy_from_slice(&binding.sealed_version.to_le_bytes());
    aad
}

impl MasterKey {
    pub fn new(bytes: &[u8; MASTER_KEY_BYTES]) -> Result<Self, KeyError> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map_err(|_| KeyError::Crypto("master key"))?;
        Ok(Self { key })
    }

    /// A fresh random master key (for first start and for tests).
    pub fn generate_bytes() -> Result<Zeroizing<[u8; MASTER_KEY_BYTES]>, KeyError> {
        let mut bytes = Zeroizing::new([0u8; MASTER_KEY_BYTES]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| KeyError::Crypto("random"))?;
        Ok(bytes)
    }

    fn seal(
        &self,
        binding: KeyBinding,
        private: &[u8; PRIVATE_KEY_BYTES],
    ) -> Result<SealedKey, KeyError> {
        let mut buf = Zeroizing::new(Vec::with_capacity(PRIVATE_KEY_BYTES + TAG_BYTES));
        buf.extend_from_slice(private);
        let nonce = self
            .key
            .seal_in_place_append_tag(Aad::from(associated_data(binding)), &mut *buf)
            .map_err(|_| KeyError::Crypto("seal"))?;
        let mut sealed = [0u8; SEALED_KEY_BYTES];
        sealed[..NONCE_LEN].copy_from_slice(nonce.as_ref());
        sealed[NONCE_LEN..].copy_from_slice(&buf);
        Ok(SealedKey(sealed))
    }

    fn unseal(
        &self,
        binding: KeyBinding,
        sealed: &SealedKey,
    ) -> Result<Zeroizing<[u8; PRIVATE_KEY_BYTES]>, KeyError> {
        let failed = KeyError::Unseal {
            vpsd_id: binding.vpsd_id,
            key_serial: binding.key_serial,
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed.0[..NONCE_LEN]);
        let mut buf = Zeroizing::new(sealed.0[NONCE_LEN..].to_vec());
        let plain = self
            .key
            .open_in_place(
                aws_lc_rs::aead::Nonce::from(&nonce),
                Aad::from(associated_data(binding)),
                &mut buf,
            )
            .map_err(|_| failed.clone())?;
        let mut out = Zeroizing::new([0u8; PRIVATE_KEY_BYTES]);
        if plain.len() != PRIVATE_KEY_BYTES {
            return Err(failed);
        }
        out.copy_from_slice(plain);
        Ok(out)
    }

    /// Generates a key pair for a vPSD inside the engine and returns it sealed, with its
    /// public key. The private key exists in the clear only inside this call.
    pub fn generate(
        &self,
        algorithm: Algorithm,
        binding: KeyBinding,
    ) -> Result<(SealedKey, PublicKey), KeyError> {
        let (private, public) = match algorithm {
            Algorithm::EcdsaP256 => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| KeyError::Crypto("generate"))?;
                let scalar = pair
                    .private_key()
                    .as_be_bytes()
                    .map_err(|_| KeyError::Crypto("export"))?;
                let mut private = Zeroizing::new([0u8; PRIVATE_KEY_BYTES]);
                if scalar.as_ref().len() != PRIVATE_KEY_BYTES {
                    return Err(KeyError::Crypto("scalar length"));
                }
                private.copy_from_slice(scalar.as_ref());
                (private, pair.public_key().as_ref().to_vec())
            }
            Algorithm::Ed25519 => {
                let pair = Ed25519KeyPair::generate().map_err(|_| KeyError::Crypto("generate"))?;
                let seed = pair.seed().map_err(|_| KeyError::Crypto("export"))?;
                let seed = seed.as_be_bytes().map_err(|_| KeyError::Crypto("export"))?;
                let mut private = Zeroizing::new([0u8; PRIVATE_KEY_BYTES]);
                if seed.as_ref().len() != PRIVATE_KEY_BYTES {
                    return Err(KeyError::Crypto("seed length"));
                }
                private.copy_from_slice(seed.as_ref());
                (private, pair.public_key().as_ref().to_vec())
            }
        };
        let sealed = self.seal(binding, &private)?;
        Ok((
            sealed,
            PublicKey {
                algorithm,
                bytes: public,
            },
        ))
    }

    /// Loads a vPSD's key for one session: unseals it and checks it against the public key.
    pub fn load(
        &self,
        binding: KeyBinding,
        sealed: &SealedKey,
        public: &PublicKey,
    ) -> Result<SigningKey, KeyError> {
        let private = self.unseal(binding, sealed)?;
        let mismatch = KeyError::Mismatch {
            vpsd_id: binding.vpsd_id,
        };
        let inner = match public.algorithm {
            Algorithm::EcdsaP256 => SigningKeyInner::Ecdsa(
                EcdsaKeyPair::from_private_key_and_public_key(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &*private,
                    &public.bytes,
                )
                .map_err(|_| mismatch)?,
            ),
            Algorithm::Ed25519 => SigningKeyInner::Ed25519(
                Ed25519KeyPair::from_seed_and_public_key(&*private, &public.bytes)
                    .map_err(|_| mismatch)?,
            ),
        };
        Ok(SigningKey { inner })
    }
}

enum SigningKeyInner {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// An unsealed key, alive for one session. aws-lc clears the key material when it is
/// dropped (EVP_PKEY_free), and the raw bytes it was loaded from were zeroized already.
pub struct SigningKey {
    inner: SigningKeyInner,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Signs `message`, returning the fixed 64-byte signature.
    pub fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Result<[u8; 64], KeyError> {
        let mut out = [0u8; 64];
        match &self.inner {
            SigningKeyInner::Ecdsa(pair) => {
                let signature = pair
                    .sign(rng, message)
                    .map_err(|_| KeyError::Crypto("sign"))?;
                if signature.as_ref().len() != 64 {
                    return Err(KeyError::Crypto("signature length"));
                }
                out.copy_from_slice(signature.as_ref());
            }
            SigningKeyInner::Ed25519(pair) => {
                let signature = pair
                    .try_sign(message)
                    .map_err(|_| KeyError::Crypto("sign"))?;
                out.copy_from_slice(signature.as_ref());
            }
        }
        Ok(out)
    }
}

impl PublicKey {
    /// Whether `signature` is a valid signature of `message` under this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn signature::VerificationAlgorithm = match self.algorithm {
            Algorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
            Algorithm::Ed25519 => &signature::ED25519,
        };
        UnparsedPublicKey::new(algorithm, &self.bytes)
            .verify(message, signature)
            .is_ok()
    }

    /// The key as an X.509 SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Result<Vec<u8>, KeyError> {
        let der = match self.algorithm {
            Algorithm::EcdsaP256 => {
                let key = signature::ParsedPublicKey::new(
                    &signature::ECDSA_P256_SHA256_FIXED,
                    &self.bytes,
                )
                .map_err(|_| KeyError::Crypto("public key"))?;
                key.as_der()
                    .map_err(|_| KeyError::Crypto("spki"))?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::Ed25519 => {
                let key = signature::ParsedPublicKey::new(&signature::ED25519, &self.bytes)
                    .map_err(|_| KeyError::Crypto("public key"))?;
                key.as_der()
                    .map_err(|_| KeyError::Crypto("spki"))?
                    .as_ref()
                    .to_vec()
            }
        };
        Ok(der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(vpsd_id: u64, key_serial: u32, sealed_version: u64) -> KeyBinding {
        KeyBinding {
            vpsd_id,
            key_serial,
            sealed_version,
        }
    }

    fn master() -> MasterKey {
        MasterKey::new(&MasterKey::generate_bytes().unwrap()).unwrap()
    }

    #[test]
    fn generated_keys_sign_and_verify_for_both_algorithms() {
        let master = master();
        let rng = SystemRandom::new();
        for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
            let (sealed, public) = master.generate(algorithm, bound(7, 1, 1)).unwrap();
            let key = master.load(bound(7, 1, 1), &sealed, &public).unwrap();
            let signature = key.sign(&rng, b"payload").unwrap();
            assert!(public.verify(b"payload", &signature));
            assert!(!public.verify(b"payloae", &signature));
            let spki = public.spki_der().unwrap();
            assert_eq!(spki[0], 0x30, "DER SEQUENCE");
        }
    }

    #[test]
    fn sealed_key_is_bound_to_vpsd_serial_and_master() {
        let master = master();
        let (sealed, public) = master
            .generate(Algorithm::EcdsaP256, bound(7, 1, 1))
            .unwrap();
        assert_eq!(
            master.load(bound(8, 1, 1), &sealed, &public).unwrap_err(),
            KeyError::Unseal {
                vpsd_id: 8,
                key_serial: 1
            }
        );
        assert!(matches!(
            master.load(bound(7, 2, 1), &sealed, &public),
            Err(KeyError::Unseal { .. })
        ));
        assert!(matches!(
            master.load(bound(7, 1, 2), &sealed, &public),
            Err(KeyError::Unseal { .. })
        ));
        let other = MasterKey::new(&MasterKey::generate_bytes().unwrap()).unwrap();
        assert!(matches!(
            other.load(bound(7, 1, 1), &sealed, &public),
            Err(KeyError::Unseal { .. })
        ));
        let mut flipped = sealed;
        flipped.0[20] ^= 1;
        assert!(matches!(
            master.load(bound(7, 1, 1), &flipped, &public),
            Err(KeyError::Unseal { .. })
        ));
    }

    #[test]
    fn a_key_loaded_against_the_wrong_public_key_is_refused() {
        let master = master();
        let (sealed, _) = master.generate(Algorithm::Ed25519, bound(7, 1, 1)).unwrap();
        let (_, other_public) = master.generate(Algorithm::Ed25519, bound(7, 1, 1)).unwrap();
        assert_eq!(
            master
                .load(bound(7, 1, 1), &sealed, &other_public)
                .unwrap_err(),
            KeyError::Mismatch { vpsd_id: 7 }
        );
    }
}
