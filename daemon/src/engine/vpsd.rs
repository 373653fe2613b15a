//! The state of one virtual PSD.

use std::sync::Arc;

use indicia_proto::{Algorithm, LockReason, VpsdState, VpsdStatus, Zip};

use super::keys::{PublicKey, SealedKey};
use super::registers::Registers;

/// The lifecycle state as recorded. The watchdog lock is not recorded: it follows from the
/// time of the last provider contact, see [`Vpsd::effective_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredState {
    Active,
    Locked(LockReason),
    Withdrawn,
}

/// One key generation of a vPSD. Only the current key is kept sealed; older ones keep
/// their public key so that indicia they signed still verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub serial: u32,
    /// The vPSD version of the record that created this key (bound into its sealing).
    pub sealed_version: u64,
    pub public: PublicKey,
    pub sealed: Option<SealedKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vpsd {
    pub id: u64,
    pub owner: String,
    pub algorithm: Algorithm,
    pub origin_zip: Zip,
    /// Every key generation, oldest first; the last is current. Shared between a vPSD and
    /// its successors until a rotation or a withdrawal changes them, so that a session,
    /// which copies the vPSD, costs the same however many old keys it has.
    pub keys: Arc<[KeyEntry]>,
    pub registers: Registers,
    pub state: StoredState,
    pub last_contact_unix: u64,
    pub provider_sequence: u64,
    /// Freshness counter: the number of records applied to this vPSD.
    pub version: u64,
}

impl KeyEntry {
    /// This key as an older generation: its public key only.
    pub fn retired(&self) -> Self {
        Self {
            sealed: None,
            ..self.clone()
        }
    }
}

impl Vpsd {
    /// What the current key's sealing is bound to.
    pub fn key_binding(&self, key: &KeyEntry) -> super::keys::KeyBinding {
        super::keys::KeyBinding {
            vpsd_id: self.id,
            key_serial: key.serial,
            sealed_version: key.sealed_version,
        }
    }

    // An invariant, not input: a vPSD is created with one key, keys are only ever added,
    // and a checkpoint with a keyless vPSD does not decode.
    #[allow(clippy::expect_used)]
    pub fn current_key(&self) -> &KeyEntry {
        self.keys
            .last()
            .expect("a vPSD always has at least one key")
    }

    pub fn key(&self, serial: u32) -> Option<&KeyEntry> {
        self.keys.iter().find(|key| key.serial == serial)
    }

    pub fn contact_overdue(&self, now_unix: u64, contact_seconds_max: u64) -> bool {
        now_unix.saturating_sub(self.last_contact_unix) > contact_seconds_max
    }

    /// The state that decides what the vPSD may do now: an active vPSD whose last provider
    /// contact is too old is locked by the watchdog until the next contact.
    pub fn effective_state(&self, now_unix: u64, contact_seconds_max: u64) -> VpsdState {
        match &self.state {
            StoredState::Active if self.contact_overdue(now_unix, contact_seconds_max) => {
                VpsdState::Locked(LockReason::ContactOverdue)
            }
            StoredState::Active => VpsdState::Active,
            StoredState::Locked(reason) => VpsdState::Locked(reason.clone()),
            StoredState::Withdrawn => VpsdState::Withdrawn,
        }
    }

    pub fn status(&self, now_unix: u64, contact_seconds_max: u64) -> VpsdStatus {
        VpsdStatus {
            vpsd_id: self.id,
            owner: self.owner.clone(),
            algorithm: self.algorithm,
            key_serial: self.current_key().serial,
            state: self.effective_state(now_unix, contact_seconds_max),
            ascending_mills: self.registers.ascending_mills,
            descending_mills: self.registers.descending_mills,
            control_total_mills: self.registers.control_total_mills,
            piece_count: self.registers.piece_count,
            origin_zip: self.origin_zip,
            last_contact_unix: self.last_contact_unix,
            provider_sequence: self.provider_sequence,
            version: self.version,
        }
    }
}
