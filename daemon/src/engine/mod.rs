//! The engine: one shard's vPSDs, their registers and signing sessions, as a deterministic
//! state machine with no runtime, no sockets and no clock (time is passed in).
//!
//! Every operation has two halves. `prepare_*` validates a request against the current
//! state and returns the [`Record`] that would carry it out, plus the answer, changing
//! nothing. [`Engine::apply`] is the only place where state changes: the server applies a
//! record after the journal has accepted it, and recovery applies the journal's records
//! in order. So a failure before the commit applies nothing, and a replayed history yields
//! exactly the state that was live.

pub mod error;
pub mod idempotency;
mod keycache;
pub mod keys;
pub mod record;
pub mod registers;
pub mod session;
pub mod vpsd;

use std::collections::HashMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{UnparsedPublicKey, ED25519};
use indicia_proto::{
    Algorithm, AuthorizationKind, Indicium, LockReason, ProviderAuthorization, Verdict, VpsdState,
    VpsdStatus, Zip,
};

pub use error::{ApplyError, EngineError};
pub use idempotency::{IdempotencyWindow, Remembered, RememberedAnswer, WindowSnapshot};
pub use keys::{KeyBinding, MasterKey, PublicKey, SealedKey};
pub use record::{
    ClientTag, Fingerprint, ItemOutcome, JobRecord, RecentAnswer, RecentRequest, Record,
    ResetCause, SessionRecord,
};
pub use registers::Registers;
pub use session::{JobAnswer, PreparedSession, SessionMismatch, SignJob};
pub use vpsd::{KeyEntry, StoredState, Vpsd};

/// The most keys a vPSD can have whatever the configuration: the journal's encoding holds
/// a vPSD's key count in 16 bits.
pub const KEYS_PER_VPSD_LIMIT: usize = u16::MAX as usize;

/// Longest integrity-lock or quarantine reason kept (the journal's bound for such texts).
pub const REASON_JOURNAL_BYTES_MAX: usize = 1024;

/// Seconds in a day, for the watchdog and the mailing-date window.
pub const DAY_SECONDS: u64 = 86_400;

/// Limits and policies of one shard's engine (the `[engine]` section of the config file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Most indicia one signing session signs (the sum over its requests).
    pub session_indicia_max: usize,
    /// Largest postage of one indicium, in mills.
    pub postage_mills_max: u64,
    /// A vPSD without provider contact for longer than this is locked by the watchdog.
    pub contact_days_max: u64,
    /// How many days before today a mailing date may be.
    pub mailing_days_back: u16,
    /// How many days after today a mailing date may be.
    pub mailing_days_ahead: u16,
    /// Software id written into every indicium.
    pub software_id: u16,
    /// Bound of the idempotency window, in remembered indicia.
    pub idempotency_indicia_max: usize,
    /// Most vPSDs this shard holds.
    pub vpsds_max: usize,
    /// Signing keys kept loaded between sessions, for the vPSDs used most recently (0:
    /// every session loads its vPSD's key and drops it at its end).
    pub key_cache_keys: usize,
    /// Most key generations one vPSD has: a rotation beyond is refused. Old keys are kept
    /// (indicia they signed still verify), so this bounds a vPSD's size in memory and in
    /// every checkpoint; the journal's encoding holds at most 65 535.
    pub keys_per_vpsd_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            session_indicia_max: 256,
            postage_mills_max: 100_000,
            contact_days_max: 90,
            mailing_days_back: 1,
            mailing_days_ahead: 30,
            software_id: 0x0100,
            idempotency_indicia_max: 262_144,
            vpsds_max: 100_000,
            keys_per_vpsd_max: 1024,
            key_cache_keys: 4096,
        }
    }
}

/// The answer to a provider authorization: fresh, or the original one for a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The change to journal and apply; None when nothing changes (a retry, a no-op).
    pub record: Option<Record>,
}

/// The state of a shard's vPSDs, as a checkpoint record holds it. The idempotency window is
/// not in it: recovery rebuilds it from the records it remembers (see [`Engine::remember`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Every vPSD, ordered by id.
    pub vpsds: Vec<Vpsd>,
    /// Ids whose history was lost to journal damage: never to be provisioned again.
    pub quarantine: Vec<(u64, String)>,
    /// Set when journal damage lost records that no vPSD accounts for: any id may have been
    /// lost, so no new vPSD may be provisioned on this shard until the damage is resolved.
    pub provisioning_blocked: Option<String>,
}

/// One shard's state.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    master: MasterKey,
    provider_public_key: [u8; 32],
    vpsds: HashMap<u64, Vpsd>,
    /// vPSD ids whose provisioning was lost to journal damage, with the finding.
    quarantine: HashMap<u64, String>,
    /// See [`Checkpoint::provisioning_blocked`].
    provisioning_blocked: Option<String>,
    window: IdempotencyWindow,
    rng: SystemRandom,
    /// Signing keys kept loaded between sessions ([`keycache`]).
    keys: std::cell::RefCell<keycache::KeyCache>,
}

impl Engine {
    pub fn new(config: EngineConfig, master: MasterKey, provider_public_key: [u8; 32]) -> Self {
        let window = IdempotencyWindow::new(config.idempotency_indicia_max);
        let keys = std::cell::RefCell::new(keycache::KeyCache::new(config.key_cache_keys));
        Self {
            config,
            master,
            provider_public_key,
            vpsds: HashMap::new(),
            quarantine: HashMap::new(),
            provisioning_blocked: None,
            window,
            rng: SystemRandom::new(),
            keys,
        }
    }

    /// The whole state, for a checkpoint record.
    pub fn checkpoint(&self) -> Checkpoint {
        let mut vpsds: Vec<Vpsd> = self.vpsds.values().cloned().collect();
        vpsds.sort_by_key(|vpsd| vpsd.id);
        let mut quarantine: Vec<(u64, String)> = self
            .quarantine
            .iter()
            .map(|(id, reason)| (*id, reason.clone()))
            .collect();
        quarantine.sort();
        Checkpoint {
            vpsds,
            quarantine,
            provisioning_blocked: self.provisioning_blocked.clone(),
        }
    }

    /// Replaces the state of the vPSDs with a checkpoint's (at recovery). The idempotency
    /// window stays as it is: recovery rebuilds it with [`Engine::remember`].
    pub fn restore(&mut self, checkpoint: Checkpoint) {
        self.vpsds = checkpoint
            .vpsds
            .into_iter()
            .map(|vpsd| (vpsd.id, vpsd))
            .collect();
        self.quarantine = checkpoint.quarantine.into_iter().collect();
        self.provisioning_blocked = checkpoint.provisioning_blocked;
    }

    /// Locks a vPSD whose history does not reconcile (found by recovery or the audit); an
    /// id with no vPSD is quarantined so that it can never be provisioned afresh. Not a
    /// record: recovery finds the same damage again, and checkpoints carry the lock.
    pub fn lock_integrity(&mut self, vpsd_id: u64, reason: &str) {
        // Bounded like every text the journal holds (checkpoints store it), and by what a
        // status answer may carry.
        let mut cut = reason
            .len()
            .min(REASON_JOURNAL_BYTES_MAX)
            .min(indicia_proto::message::REASON_BYTES_MAX);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason[..cut];
        match self.vpsds.get_mut(&vpsd_id) {
            Some(vpsd) => {
                if !matches!(
                    vpsd.state,
                    StoredState::Locked(LockReason::Integrity(_)) | StoredState::Withdrawn
                ) {
                    vpsd.state = StoredState::Locked(LockReason::Integrity(reason.to_owned()));
                }
            }
            None => {
                self.quarantine
                    .entry(vpsd_id)
                    .or_insert_with(|| reason.to_owned());
            }
        }
    }

    /// Refuses every new provisioning (journal damage may have lost any id's history).
    pub fn block_provisioning(&mut self, reason: &str) {
        self.provisioning_blocked
            .get_or_insert_with(|| reason.to_owned());
    }

    /// Ids whose provisioning was lost, with the finding.
    pub fn quarantined(&self) -> impl Iterator<Item = (u64, &str)> {
        self.quarantine
            .iter()
            .map(|(id, reason)| (*id, reason.as_str()))
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn vpsd(&self, vpsd_id: u64) -> Option<&Vpsd> {
        self.vpsds.get(&vpsd_id)
    }

    pub fn vpsds(&self) -> impl Iterator<Item = &Vpsd> {
        self.vpsds.values()
    }

    pub fn window(&self) -> &IdempotencyWindow {
        &self.window
    }

    fn contact_seconds_max(&self) -> u64 {
        self.config.contact_days_max.saturating_mul(DAY_SECONDS)
    }

    fn get(&self, vpsd_id: u64) -> Result<&Vpsd, EngineError> {
        self.vpsds
            .get(&vpsd_id)
            .ok_or(EngineError::UnknownVpsd { vpsd_id })
    }

    pub fn status(&self, now_unix: u64, vpsd_id: u64) -> Result<VpsdStatus, EngineError> {
        Ok(self
            .get(vpsd_id)?
            .status(now_unix, self.contact_seconds_max()))
    }

    /// The public key of the given serial (or the current one) as SubjectPublicKeyInfo DER.
    pub fn public_key(
        &self,
        vpsd_id: u64,
        key_serial: Option<u32>,
    ) -> Result<(Algorithm, u32, Vec<u8>), EngineError> {
        let vpsd = self.get(vpsd_id)?;
        let key = match key_serial {
            None => vpsd.current_key(),
            Some(serial) => vpsd.key(serial).ok_or(EngineError::UnknownKey {
                vpsd_id,
                key_serial: serial,
            })?,
        };
        Ok((vpsd.algorithm, key.serial, key.public.spki_der()?))
    }

    /// Prepares one signing session for `vpsd_id` over `jobs`, changing nothing (see
    /// [`session`]): the record to journal and one answer per job.
    pub fn prepare_session(
        &self,
        now_unix: u64,
        vpsd_id: u64,
        jobs: &[SignJob],
    ) -> PreparedSession {
        let vpsd = match self.get(vpsd_id) {
            Ok(vpsd) => vpsd,
            Err(err) => return PreparedSession::refuse_all(jobs, &err),
        };
        let context = session::SessionContext {
            config: &self.config,
            master: &self.master,
            rng: &self.rng,
            window: &self.window,
            keys: &self.keys,
            contact_seconds_max: self.contact_seconds_max(),
        };
        session::prepare(&context, now_unix, vpsd, jobs)
    }

    /// Online verification of an indicium against the keys this shard holds.
    pub fn verify(&self, bytes: &[u8]) -> (Verdict, u64, u64) {
        let Ok(indicium) = Indicium::decode(bytes) else {
            return (Verdict::Malformed, 0, 0);
        };
        let payload = &indicium.payload;
        let verdict = match self.vpsds.get(&payload.vpsd_id) {
            None => Verdict::UnknownKey,
            Some(vpsd) => match vpsd.key(payload.key_serial) {
                None => Verdict::UnknownKey,
                Some(key) if key.public.algorithm != payload.algorithm => Verdict::BadSignature,
                Some(key) => {
                    if !key
                        .public
                        .verify(payload.signed_bytes().as_ref(), &indicium.signature)
                    {
                        Verdict::BadSignature
                    } else if payload.piece_number == 0
                        || payload.piece_number > vpsd.registers.piece_count
                    {
                        Verdict::NotIssued
                    } else {
                        Verdict::Valid
                    }
                }
            },
        };
        (verdict, payload.vpsd_id, payload.piece_number)
    }

    pub fn prepare_provision(
        &self,
        now_unix: u64,
        vpsd_id: u64,
        owner: &str,
        algorithm: Algorithm,
        origin_zip: Zip,
    ) -> Result<Record, EngineError> {
        if self.vpsds.contains_key(&vpsd_id) {
            return Err(EngineError::VpsdExists { vpsd_id });
        }
        if let Some(reason) = self.quarantine.get(&vpsd_id) {
            return Err(EngineError::Integrity(format!(
                "vPSD {vpsd_id} is quarantined: {reason}"
            )));
        }
        if let Some(reason) = &self.provisioning_blocked {
            return Err(EngineError::Integrity(format!(
                "provisioning is blocked on this shard: {reason}"
            )));
        }
        if self.vpsds.len() >= self.config.vpsds_max {
            return Err(EngineError::Capacity {
                vpsds_max: self.config.vpsds_max,
            });
        }
        if owner.is_empty() || owner.len() > indicia_proto::message::OWNER_BYTES_MAX {
            return Err(EngineError::InvalidArgument(format!(
                "owner must be 1 to {} bytes",
                indicia_proto::message::OWNER_BYTES_MAX
            )));
        }
        let binding = keys::KeyBinding {
            vpsd_id,
            key_serial: 1,
            sealed_version: 1,
        };
        let (sealed_key, public_key) = self.master.generate(algorithm, binding)?;
        Ok(Record::Provision {
            vpsd_id,
            owner: owner.to_owned(),
            algorithm,
            origin_zip,
            public_key,
            sealed_key,
            at_unix: now_unix,
        })
    }

    /// A refill or contact acknowledgment. A retry of an applied authorization (same
    /// client, same request id, same content) changes nothing and answers the status.
    pub fn prepare_provider(
        &self,
        now_unix: u64,
        client: ClientTag,
        request_id: u64,
        vpsd_id: u64,
        authorization: &ProviderAuthorization,
    ) -> Result<Prepared, EngineError> {
        let fingerprint = provider_fingerprint(vpsd_id, authorization);
        if let Some(remembered) = self.window.get(client, vpsd_id, request_id) {
            if remembered.fingerprint == fingerprint
                && remembered.answer == RememberedAnswer::Provider
            {
                return Ok(Prepared { record: None });
            }
            return Err(EngineError::RequestIdReused { request_id });
        }
        let signature_ok = UnparsedPublicKey::new(&ED25519, &self.provider_public_key)
            .verify(&authorization.signed_bytes(), &authorization.signature)
            .is_ok();
        if !signature_ok {
            return Err(EngineError::AuthorizationInvalid);
        }
        if authorization.vpsd_id != vpsd_id {
            return Err(EngineError::AuthorizationWrongVpsd {
                authorized: authorization.vpsd_id,
                requested: vpsd_id,
            });
        }
        if authorization.expires_unix < now_unix {
            return Err(EngineError::AuthorizationExpired {
                expires_unix: authorization.expires_unix,
                now_unix,
            });
        }
        // Only now, after the provider's signature: an unsigned or altered authorization
        // does not tell its sender whether a vPSD exists.
        let vpsd = self.get(vpsd_id)?;
        if authorization.sequence <= vpsd.provider_sequence {
            return Err(EngineError::AuthorizationReplayed {
                sequence: authorization.sequence,
                last_sequence: vpsd.provider_sequence,
            });
        }
        match &vpsd.state {
            StoredState::Withdrawn => return Err(EngineError::Withdrawn { vpsd_id }),
            // Its history does not reconcile: nothing may be added to it until repaired.
            StoredState::Locked(LockReason::Integrity(text)) => {
                return Err(EngineError::Integrity(text.clone()))
            }
            StoredState::Active | StoredState::Locked(_) => {}
        }
        let amount_mills = match authorization.kind {
            AuthorizationKind::Refill if authorization.amount_mills == 0 => {
                return Err(EngineError::InvalidArgument(
                    "a refill must credit more than 0".into(),
                ));
            }
            AuthorizationKind::Refill => authorization.amount_mills,
            AuthorizationKind::Contact => 0,
        };
        vpsd.registers
            .credit(amount_mills)
            .map_err(|_| EngineError::RegisterOverflow)?;
        Ok(Prepared {
            record: Some(Record::Provider {
                vpsd_id,
                version: vpsd.version + 1,
                kind: authorization.kind,
                amount_mills,
                sequence: authorization.sequence,
                at_unix: now_unix,
                client,
                request_id,
                fingerprint,
            }),
        })
    }

    /// Operator lock with a reason. Locking a locked vPSD replaces the reason.
    pub fn prepare_lock(
        &self,
        now_unix: u64,
        vpsd_id: u64,
        reason: &str,
    ) -> Result<Record, EngineError> {
        let vpsd = self.get(vpsd_id)?;
        if reason.len() > indicia_proto::message::REASON_BYTES_MAX {
            return Err(EngineError::InvalidArgument(format!(
                "lock reason longer than {} bytes",
                indicia_proto::message::REASON_BYTES_MAX
            )));
        }
        match &vpsd.state {
            StoredState::Withdrawn => Err(EngineError::Withdrawn { vpsd_id }),
            StoredState::Locked(LockReason::Integrity(text)) => {
                Err(EngineError::Integrity(text.clone()))
            }
            StoredState::Active | StoredState::Locked(_) => Ok(Record::StateChange {
                vpsd_id,
                version: vpsd.version + 1,
                state: StoredState::Locked(LockReason::Operator(reason.to_owned())),
                at_unix: now_unix,
            }),
        }
    }

    /// Lifts an operator lock; None when the vPSD is not locked by an operator (nothing to
    /// do). An integrity lock is not lifted this way, and a watchdog lock lifts only with
    /// provider contact.
    pub fn prepare_unlock(
        &self,
        now_unix: u64,
        vpsd_id: u64,
    ) -> Result<Option<Record>, EngineError> {
        let vpsd = self.get(vpsd_id)?;
        match &vpsd.state {
            StoredState::Withdrawn => Err(EngineError::Withdrawn { vpsd_id }),
            StoredState::Locked(LockReason::Integrity(text)) => {
                Err(EngineError::Integrity(text.clone()))
            }
            StoredState::Active => Ok(None),
            StoredState::Locked(_) => Ok(Some(Record::StateChange {
                vpsd_id,
                version: vpsd.version + 1,
                state: StoredState::Active,
                at_unix: now_unix,
            })),
        }
    }

    /// Withdrawal: the descending register is refunded and the vPSD retired for good.
    pub fn prepare_withdraw(&self, now_unix: u64, vpsd_id: u64) -> Result<Record, EngineError> {
        let vpsd = self.get(vpsd_id)?;
        match &vpsd.state {
            StoredState::Withdrawn => Err(EngineError::Withdrawn { vpsd_id }),
            StoredState::Locked(LockReason::Integrity(text)) => {
                Err(EngineError::Integrity(text.clone()))
            }
            StoredState::Active | StoredState::Locked(_) => Ok(Record::Withdraw {
                vpsd_id,
                version: vpsd.version + 1,
                refund_mills: vpsd.registers.descending_mills,
                at_unix: now_unix,
            }),
        }
    }

    /// A new key generation; indicia signed with older keys still verify under their serial.
    pub fn prepare_rotate_key(&self, now_unix: u64, vpsd_id: u64) -> Result<Record, EngineError> {
        let vpsd = self.get(vpsd_id)?;
        match &vpsd.state {
            StoredState::Withdrawn => return Err(EngineError::Withdrawn { vpsd_id }),
            StoredState::Locked(LockReason::Integrity(text)) => {
                return Err(EngineError::Integrity(text.clone()))
            }
            StoredState::Active | StoredState::Locked(_) => {}
        }
        if vpsd.keys.len() >= self.config.keys_per_vpsd_max {
            return Err(EngineError::KeyLimit {
                vpsd_id,
                keys_max: self.config.keys_per_vpsd_max,
            });
        }
        let key_serial = vpsd
            .current_key()
            .serial
            .checked_add(1)
            .ok_or_else(|| EngineError::InvalidArgument("key serials exhausted".into()))?;
        let binding = keys::KeyBinding {
            vpsd_id,
            key_serial,
            sealed_version: vpsd.version + 1,
        };
        let (sealed_key, public_key) = self.master.generate(vpsd.algorithm, binding)?;
        Ok(Record::RotateKey {
            vpsd_id,
            version: vpsd.version + 1,
            key_serial,
            public_key,
            sealed_key,
            at_unix: now_unix,
        })
    }

    /// Applies a record to the state: the only way state changes. Checks that the record
    /// follows the current state (version, registers, piece numbers, sums) and changes
    /// nothing if it does not.
    pub fn apply(&mut self, record: &Record) -> Result<(), ApplyError> {
        let next = self.successor(record)?;
        self.install(record, next);
        Ok(())
    }

    /// The vPSD as it would be after `record`, or why the record does not follow the
    /// current state. Changes nothing: a caller can check a record before journaling it.
    pub fn successor(&self, record: &Record) -> Result<Vpsd, ApplyError> {
        let vpsd_id = record.vpsd_id();
        if let Record::Provision {
            owner,
            algorithm,
            origin_zip,
            public_key,
            sealed_key,
            at_unix,
            ..
        } = record
        {
            if self.vpsds.contains_key(&vpsd_id) || self.quarantine.contains_key(&vpsd_id) {
                return Err(ApplyError::AlreadyProvisioned { vpsd_id });
            }
            if public_key.algorithm != *algorithm {
                return Err(ApplyError::Mismatch {
                    vpsd_id,
                    what: "public key algorithm differs from the vPSD's",
                });
            }
            return Ok(Vpsd {
                id: vpsd_id,
                owner: owner.clone(),
                algorithm: *algorithm,
                origin_zip: *origin_zip,
                keys: vec![KeyEntry {
                    serial: 1,
                    sealed_version: 1,
                    public: public_key.clone(),
                    sealed: Some(*sealed_key),
                }]
                .into(),
                registers: Registers::default(),
                state: StoredState::Active,
                last_contact_unix: *at_unix,
                provider_sequence: 0,
                version: 1,
            });
        }
        if let Record::Reset { vpsd, .. } = record {
            // The cluster's state stands whatever the local one was (or whether there was
            // one); it must be whole.
            if self.quarantine.contains_key(&vpsd_id) {
                return Err(ApplyError::AlreadyProvisioned { vpsd_id });
            }
            if vpsd.keys.is_empty() || !vpsd.registers.balanced() {
                return Err(ApplyError::Mismatch {
                    vpsd_id,
                    what: "a replicated state without keys or with unbalanced registers",
                });
            }
            return Ok((**vpsd).clone());
        }
        let vpsd = self
            .vpsds
            .get(&vpsd_id)
            .ok_or(ApplyError::UnknownVpsd { vpsd_id })?;
        if let Record::Release { version, .. } = record {
            if *version != vpsd.version {
                return Err(ApplyError::Version {
                    vpsd_id,
                    current: vpsd.version,
                    found: *version,
                });
            }
            // Installing a release removes the vPSD (see `install`).
            return Ok(vpsd.clone());
        }
        if record.version() != vpsd.version + 1 {
            return Err(ApplyError::Version {
                vpsd_id,
                current: vpsd.version,
                found: record.version(),
            });
        }
        let mismatch = |what: &'static str| ApplyError::Mismatch { vpsd_id, what };
        if vpsd.state == StoredState::Withdrawn {
            return Err(mismatch("record after withdrawal"));
        }
        // Compute the new state fully before touching anything. (The keys are shared, not
        // copied: a session's cost does not grow with the number of old keys.)
        let mut next = vpsd.clone();
        next.version = record.version();
        match record {
            Record::Provision { .. } | Record::Reset { .. } | Record::Release { .. } => {
                unreachable!("handled above")
            }
            Record::Provider {
                kind,
                amount_mills,
                sequence,
                at_unix,
                ..
            } => {
                if *sequence <= vpsd.provider_sequence {
                    return Err(mismatch("provider sequence does not increase"));
                }
                if *kind == AuthorizationKind::Contact && *amount_mills != 0 {
                    return Err(mismatch("contact with an amount"));
                }
                next.registers = vpsd
                    .registers
                    .credit(*amount_mills)
                    .map_err(|_| mismatch("refill overflows the registers"))?;
                next.provider_sequence = *sequence;
                next.last_contact_unix = next.last_contact_unix.max(*at_unix);
            }
            Record::StateChange { state, .. } => {
                if *state == StoredState::Withdrawn {
                    return Err(mismatch("withdrawal as a state change"));
                }
                next.state = state.clone();
            }
            Record::Withdraw { refund_mills, .. } => {
                let (registers, refund) = vpsd.registers.refund_all();
                if refund != *refund_mills {
                    return Err(mismatch("refund differs from the descending register"));
                }
                next.registers = registers;
                next.state = StoredState::Withdrawn;
                next.keys = vpsd.keys.iter().map(KeyEntry::retired).collect();
            }
            Record::RotateKey {
                key_serial,
                public_key,
                sealed_key,
                ..
            } => {
                if *key_serial != vpsd.current_key().serial + 1
                    || public_key.algorithm != vpsd.algorithm
                {
                    return Err(mismatch("rotated key does not follow the current one"));
                }
                if vpsd.keys.len() >= KEYS_PER_VPSD_LIMIT {
                    return Err(mismatch("more keys than a vPSD may have"));
                }
                next.keys = vpsd
                    .keys
                    .iter()
                    .map(KeyEntry::retired)
                    .chain(std::iter::once(KeyEntry {
                        serial: *key_serial,
                        sealed_version: record.version(),
                        public: public_key.clone(),
                        sealed: Some(*sealed_key),
                    }))
                    .collect();
            }
            Record::Session(session) => {
                session::check_session(vpsd, session)
                    .map_err(|mismatch| ApplyError::Session { vpsd_id, mismatch })?;
                next.registers = session.after;
            }
        }
        next.registers.assert_invariants();
        Ok(next)
    }

    /// Installs a successor computed by [`Engine::successor`] for `record`, and remembers
    /// the answers the record carries in the idempotency window.
    pub fn install(&mut self, record: &Record, next: Vpsd) {
        self.remember(record);
        if let Record::Release { vpsd_id, .. } = record {
            self.vpsds.remove(vpsd_id);
            self.keys.get_mut().forget(*vpsd_id);
        } else {
            let changed = self
                .vpsds
                .get(&next.id)
                .is_some_and(|before| before.current_key().serial != next.current_key().serial);
            if changed || next.current_key().sealed.is_none() {
                // Rotated, or withdrawn: the key loaded for it is not its key any more.
                self.keys.get_mut().forget(next.id);
            }
            self.vpsds.insert(record.vpsd_id(), next);
        }
    }

    /// Enters the answers a record carries (a session's signed requests, an applied
    /// provider authorization) into the idempotency window, and nothing else. Recovery
    /// rebuilds the window this way from the records before its start checkpoint.
    pub fn remember(&mut self, record: &Record) {
        let vpsd_id = record.vpsd_id();
        match record {
            Record::Session(session) => {
                for job in &session.jobs {
                    if job.signed().next().is_some() {
                        self.window.insert(
                            job.client,
                            job.request_id,
                            Remembered {
                                vpsd_id,
                                version: session.version,
                                fingerprint: job.fingerprint,
                                answer: RememberedAnswer::Items(job.outcomes.clone().into()),
                            },
                        );
                    }
                }
            }
            Record::Provider {
                client,
                request_id,
                fingerprint,
                ..
            } => self.window.insert(
                *client,
                *request_id,
                Remembered {
                    vpsd_id,
                    version: record.version(),
                    fingerprint: *fingerprint,
                    answer: RememberedAnswer::Provider,
                },
            ),
            // The vPSD left: none of its answers may be given here again (if it comes back,
            // its state and remembered requests come from the cluster).
            Record::Release { .. } => self.window.forget_after(vpsd_id, 0),
            // The records after the state set here are void, and so are their answers; the
            // requests the cluster remembers are answered from here on.
            Record::Reset { vpsd, recent, .. } => {
                self.window.forget_after(vpsd_id, vpsd.version);
                for request in recent {
                    let answer = match &request.answer {
                        RecentAnswer::Signed {
                            key_serial,
                            before,
                            outcomes,
                        } => RememberedAnswer::Resign {
                            key_serial: *key_serial,
                            before: *before,
                            outcomes: outcomes.clone().into(),
                        },
                        RecentAnswer::Provider => RememberedAnswer::Provider,
                    };
                    self.window.insert(
                        request.client,
                        request.request_id,
                        Remembered {
                            vpsd_id,
                            version: request.version,
                            fingerprint: request.fingerprint,
                            answer,
                        },
                    );
                }
            }
            _ => {}
        }
        self.window.end_record();
    }

    /// Prepares and applies in one step, for callers without a journal (tests, benches).
    pub fn commit(&mut self, record: Record) -> Record {
        if let Err(err) = self.apply(&record) {
            // The record was prepared against this very state: not applying is a bug.
            panic!("a freshly prepared record does not apply: {err}");
        }
        record
    }
}

/// Fingerprint of a provider request: vPSD id and the whole authorization.
fn provider_fingerprint(vpsd_id: u64, authorization: &ProviderAuthorization) -> Fingerprint {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(&vpsd_id.to_le_bytes());
    context.update(&authorization.to_bytes());
    truncate(context.finish())
}

pub(crate) fn truncate(digest: aws_lc_rs::digest::Digest) -> Fingerprint {
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest.as_ref()[..16]);
    out
}

/// Why a vPSD in this state refuses to sign, if it does.
pub(crate) fn refusal(state: &VpsdState, vpsd_id: u64) -> Option<EngineError> {
    match state {
        VpsdState::Active => None,
        VpsdState::Locked(reason) => Some(EngineError::Locked {
            vpsd_id,
            reason: reason.clone(),
        }),
        VpsdState::Withdrawn => Some(EngineError::Withdrawn { vpsd_id }),
    }
}

#[cfg(test)]
mod tests;
