//! The payloads of the journal's records: what each record kind holds (provision, provider
//! authorization, state change, withdrawal, key rotation, session, checkpoint), encoded
//! and decoded. The journal below frames, checksums and chains these bytes without reading
//! them. docs/JOURNAL.md describes each byte; the two must agree.
//!
//! Every variable-length field has a named bound, the same on both sides: the encoder
//! refuses a value the decoder would refuse ([`CodecError`]), so whatever is journaled
//! reads back.

use indicia_proto::codec::Reader;
use indicia_proto::{
    Algorithm, AuthorizationKind, DecodeError, ErrorCode, Indicium, LockReason, Zip,
};

use crate::engine::keys::SEALED_KEY_BYTES;
use crate::engine::{
    Checkpoint, ClientTag, ItemOutcome, JobRecord, KeyEntry, PublicKey, RecentAnswer,
    RecentRequest, Record, Registers, ResetCause, SealedKey, SessionRecord, StoredState, Vpsd,
};

/// What the record kinds (the header's kind byte) mean; 7 is the journal's checkpoint.
pub mod kind {
    pub const PROVISION: u8 = 1;
    pub const PROVIDER: u8 = 2;
    pub const STATE_CHANGE: u8 = 3;
    pub const WITHDRAW: u8 = 4;
    pub const ROTATE_KEY: u8 = 5;
    pub const SESSION: u8 = 6;
    pub use crate::journal::format::CHECKPOINT;
    /// The vPSD's state set from the cluster (cluster mode).
    pub const RESET: u8 = 8;
    /// The vPSD left this appliance (cluster mode).
    pub const RELEASE: u8 = 9;
}

/// Longest appliance id (the `[cluster]` section's bound).
pub const APPLIANCE_BYTES_MAX: usize = 64;
/// Longest owner (the protocol's bound).
pub const OWNER_BYTES_MAX: usize = indicia_proto::message::OWNER_BYTES_MAX;
/// Longest lock or quarantine reason.
pub const REASON_BYTES_MAX: usize = crate::engine::REASON_JOURNAL_BYTES_MAX;
/// Longest public key (an uncompressed P-256 point is 65 bytes).
pub const PUBLIC_KEY_BYTES_MAX: usize = 128;
/// Longest indicium.
pub const INDICIUM_BYTES_MAX: usize = 160;
/// Most keys of one vPSD in a checkpoint (a u16 count).
pub const KEYS_MAX: usize = u16::MAX as usize;
/// Most requests remembered with one vPSD's replicated state or reset (a u16 count).
pub const RECENT_MAX: usize = u16::MAX as usize;
/// Most item outcomes of one job (a u16 count).
pub const OUTCOMES_MAX: usize = u16::MAX as usize;
/// Most entries of any other list (a u32 count).
pub const LIST_MAX: usize = u32::MAX as usize;

/// A value the encoding cannot hold. Nothing is journaled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("journal field `{field}` of {len} bytes is longer than its bound of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("journal list `{field}` of {count} entries is longer than its bound of {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
}

/// A growable little-endian encoder for payloads.
#[derive(Debug, Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }
    fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    fn put(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    /// u16 length, then the bytes; at most `max` bytes.
    fn bytes16(&mut self, field: &'static str, bytes: &[u8], max: usize) -> Result<(), CodecError> {
        let len = u16::try_from(bytes.len())
            .ok()
            .filter(|len| usize::from(*len) <= max)
            .ok_or(CodecError::FieldTooLong {
                field,
                len: bytes.len(),
                max,
            })?;
        self.u16(len);
        self.put(bytes);
        Ok(())
    }
    fn count16(&mut self, field: &'static str, count: usize, max: usize) -> Result<(), CodecError> {
        let count16 = u16::try_from(count)
            .ok()
            .filter(|count| usize::from(*count) <= max)
            .ok_or(CodecError::TooMany { field, count, max })?;
        self.u16(count16);
        Ok(())
    }
    fn count32(&mut self, field: &'static str, count: usize) -> Result<(), CodecError> {
        let count32 = u32::try_from(count).map_err(|_| CodecError::TooMany {
            field,
            count,
            max: LIST_MAX,
        })?;
        self.u32(count32);
        Ok(())
    }
    fn registers(&mut self, registers: &Registers) {
        self.u64(registers.ascending_mills);
        self.u64(registers.descending_mills);
        self.u64(registers.control_total_mills);
        self.u64(registers.piece_count);
    }
    fn state(&mut self, state: &StoredState) -> Result<(), CodecError> {
        let (code, text) = match state {
            StoredState::Active => (0, ""),
            StoredState::Locked(LockReason::Operator(text)) => (1, text.as_str()),
            StoredState::Locked(LockReason::ContactOverdue) => (2, ""),
            StoredState::Locked(LockReason::Integrity(text)) => (3, text.as_str()),
            StoredState::Withdrawn => (4, ""),
        };
        self.u8(code);
        self.bytes16("state.reason", text.as_bytes(), REASON_BYTES_MAX)
    }
    fn outcomes(&mut self, outcomes: &[ItemOutcome]) -> Result<(), CodecError> {
        self.count16("outcomes", outcomes.len(), OUTCOMES_MAX)?;
        for outcome in outcomes {
            match outcome {
                ItemOutcome::Signed(indicium) => {
                    self.u8(0);
                    self.bytes16("indicium", indicium.to_bytes().as_ref(), INDICIUM_BYTES_MAX)?;
                }
                ItemOutcome::Failed(code) => {
                    self.u8(1);
                    self.u16(code.wire());
                }
            }
        }
        Ok(())
    }
    fn public_key(&mut self, key: &PublicKey) -> Result<(), CodecError> {
        self.bytes16("public_key", &key.bytes, PUBLIC_KEY_BYTES_MAX)
    }

    /// A vPSD without its keys.
    fn vpsd_head(&mut self, vpsd: &Vpsd) -> Result<(), CodecError> {
        self.u64(vpsd.id);
        self.bytes16("owner", vpsd.owner.as_bytes(), OWNER_BYTES_MAX)?;
        self.u8(vpsd.algorithm.code());
        self.u32(vpsd.origin_zip.wire());
        self.registers(&vpsd.registers);
        self.state(&vpsd.state)?;
        self.u64(vpsd.last_contact_unix);
        self.u64(vpsd.provider_sequence);
        self.u64(vpsd.version);
        Ok(())
    }

    /// A vPSD's keys, oldest first.
    fn keys(&mut self, keys: &[KeyEntry]) -> Result<(), CodecError> {
        self.count16("vpsd.keys", keys.len(), KEYS_MAX)?;
        for key in keys {
            self.u32(key.serial);
            self.u64(key.sealed_version);
            self.public_key(&key.public)?;
            match &key.sealed {
                Some(sealed) => {
                    self.u8(1);
                    self.put(&sealed.0);
                }
                None => self.u8(0),
            }
        }
        Ok(())
    }

    /// A whole vPSD (as a checkpoint or a reset holds it).
    fn vpsd(&mut self, vpsd: &Vpsd) -> Result<(), CodecError> {
        self.vpsd_head(vpsd)?;
        self.keys(&vpsd.keys)
    }

    /// The requests the cluster remembers with a vPSD (a reset, a replicated state).
    fn recent(&mut self, recent: &[RecentRequest]) -> Result<(), CodecError> {
        self.count16("recent", recent.len(), RECENT_MAX)?;
        for request in recent {
            self.u64(request.client.0);
            self.u64(request.request_id);
            self.put(&request.fingerprint);
            self.u64(request.version);
            match &request.answer {
                RecentAnswer::Signed {
                    key_serial,
                    before,
                    outcomes,
                } => {
                    self.u8(1);
                    self.u32(*key_serial);
                    self.registers(before);
                    self.count16("recent.outcomes", outcomes.len(), OUTCOMES_MAX)?;
                    for outcome in outcomes {
                        self.u16(outcome.map_or(0, ErrorCode::wire));
                    }
                }
                RecentAnswer::Provider => self.u8(2),
            }
        }
        Ok(())
    }
}

/// The header fields a record implies: kind, subject (its vPSD) and time.
pub fn header_fields(record: &Record, now_unix: u64) -> (u8, u64, u64) {
    match record {
        Record::Provision {
            vpsd_id, at_unix, ..
        } => (kind::PROVISION, *vpsd_id, *at_unix),
        Record::Provider {
            vpsd_id, at_unix, ..
        } => (kind::PROVIDER, *vpsd_id, *at_unix),
        Record::StateChange {
            vpsd_id, at_unix, ..
        } => (kind::STATE_CHANGE, *vpsd_id, *at_unix),
        Record::Withdraw {
            vpsd_id, at_unix, ..
        } => (kind::WITHDRAW, *vpsd_id, *at_unix),
        Record::RotateKey {
            vpsd_id, at_unix, ..
        } => (kind::ROTATE_KEY, *vpsd_id, *at_unix),
        Record::Session(session) => (kind::SESSION, session.vpsd_id, now_unix),
        Record::Reset { vpsd, at_unix, .. } => (kind::RESET, vpsd.id, *at_unix),
        Record::Release {
            vpsd_id, at_unix, ..
        } => (kind::RELEASE, *vpsd_id, *at_unix),
    }
}

/// Encodes a record's payload (everything but what the header carries) into `out`, which
/// is cleared first.
pub fn encode_record(record: &Record, out: &mut Encoder) -> Result<(), CodecError> {
    out.bytes.clear();
    match record {
        Record::Provision {
            owner,
            algorithm,
            origin_zip,
            public_key,
            sealed_key,
            ..
        } => {
            out.u64(record.version());
            out.u8(algorithm.code());
            out.u32(origin_zip.wire());
            out.bytes16("owner", owner.as_bytes(), OWNER_BYTES_MAX)?;
            out.public_key(public_key)?;
            out.put(&sealed_key.0);
        }
        Record::Provider {
            version,
            kind,
            amount_mills,
            sequence,
            client,
            request_id,
            fingerprint,
            ..
        } => {
            out.u64(*version);
            out.u8(kind.code());
            out.u64(*amount_mills);
            out.u64(*sequence);
            out.u64(client.0);
            out.u64(*request_id);
            out.put(fingerprint);
        }
        Record::StateChange { version, state, .. } => {
            out.u64(*version);
            out.state(state)?;
        }
        Record::Withdraw {
            version,
            refund_mills,
            ..
        } => {
            out.u64(*version);
            out.u64(*refund_mills);
        }
        Record::RotateKey {
            version,
            key_serial,
            public_key,
            sealed_key,
            ..
        } => {
            out.u64(*version);
            out.u32(*key_serial);
            out.public_key(public_key)?;
            out.put(&sealed_key.0);
        }
        Record::Session(session) => {
            out.u64(session.version);
            out.u32(session.key_serial);
            out.registers(&session.before);
            out.registers(&session.after);
            out.count32("session.jobs", session.jobs.len())?;
            for job in &session.jobs {
                out.u64(job.client.0);
                out.u64(job.request_id);
                out.put(&job.fingerprint);
                out.outcomes(&job.outcomes)?;
            }
        }
        Record::Reset {
            vpsd,
            cause,
            recent,
            ..
        } => {
            out.u8(cause.code());
            match cause {
                ResetCause::Adopted { from, epoch } => {
                    out.bytes16("reset.from", from.as_bytes(), APPLIANCE_BYTES_MAX)?;
                    out.u64(epoch.unsigned_abs());
                }
                ResetCause::Voided { local_version } | ResetCause::Behind { local_version } => {
                    out.u64(*local_version);
                }
            }
            out.vpsd(vpsd)?;
            out.recent(recent)?;
        }
        Record::Release {
            owner,
            version,
            replicated_version,
            ..
        } => {
            out.u64(*version);
            out.u64(*replicated_version);
            out.bytes16("release.owner", owner.as_bytes(), APPLIANCE_BYTES_MAX)?;
        }
    }
    Ok(())
}

/// A checkpoint record's payload: the state of the shard's vPSDs, and where the records
/// whose answers the idempotency window holds begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub state: Checkpoint,
    /// The sequence of the oldest record whose answers the window remembers (0: the window
    /// is empty); recovery enters the answers of the records from there on again.
    pub window_from: u64,
}

/// Encodes a checkpoint, the state of a shard's vPSDs and where its idempotency window
/// begins, into `out` (cleared first).
pub fn encode_checkpoint(
    checkpoint: &Checkpoint,
    window_from: u64,
    out: &mut Encoder,
) -> Result<(), CodecError> {
    out.bytes.clear();
    out.count32("checkpoint.vpsds", checkpoint.vpsds.len())?;
    for vpsd in &checkpoint.vpsds {
        out.vpsd(vpsd)?;
    }
    out.count32("checkpoint.quarantine", checkpoint.quarantine.len())?;
    for (vpsd_id, reason) in &checkpoint.quarantine {
        out.u64(*vpsd_id);
        out.bytes16("quarantine.reason", reason.as_bytes(), REASON_BYTES_MAX)?;
    }
    out.bytes16(
        "provisioning_blocked",
        checkpoint
            .provisioning_blocked
            .as_deref()
            .unwrap_or("")
            .as_bytes(),
        REASON_BYTES_MAX,
    )?;
    out.u64(window_from);
    Ok(())
}

fn bad(field: &'static str, offset: usize, value: u64) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        offset,
        value,
    }
}

fn algorithm(r: &mut Reader<'_>) -> Result<Algorithm, DecodeError> {
    let offset = r.position();
    let code = r.u8()?;
    Algorithm::from_code(code).ok_or(bad("algorithm", offset, u64::from(code)))
}

fn zip(r: &mut Reader<'_>) -> Result<Zip, DecodeError> {
    let offset = r.position();
    let raw = r.u32()?;
    Zip::from_wire(raw).map_err(|_| bad("zip", offset, u64::from(raw)))
}

fn registers(r: &mut Reader<'_>) -> Result<Registers, DecodeError> {
    Ok(Registers {
        ascending_mills: r.u64()?,
        descending_mills: r.u64()?,
        control_total_mills: r.u64()?,
        piece_count: r.u64()?,
    })
}

fn state(r: &mut Reader<'_>) -> Result<StoredState, DecodeError> {
    let offset = r.position();
    let code = r.u8()?;
    let text = r.string16("state.reason", REASON_BYTES_MAX)?;
    Ok(match code {
        0 => StoredState::Active,
        1 => StoredState::Locked(LockReason::Operator(text)),
        2 => StoredState::Locked(LockReason::ContactOverdue),
        3 => StoredState::Locked(LockReason::Integrity(text)),
        4 => StoredState::Withdrawn,
        other => return Err(bad("state", offset, u64::from(other))),
    })
}

fn public_key(r: &mut Reader<'_>, algorithm: Algorithm) -> Result<PublicKey, DecodeError> {
    Ok(PublicKey {
        algorithm,
        bytes: r.bytes16("public_key", PUBLIC_KEY_BYTES_MAX)?.to_vec(),
    })
}

fn sealed(r: &mut Reader<'_>) -> Result<SealedKey, DecodeError> {
    Ok(SealedKey(r.array::<SEALED_KEY_BYTES>()?))
}

fn outcomes(r: &mut Reader<'_>) -> Result<Vec<ItemOutcome>, DecodeError> {
    let count = usize::from(r.u16()?);
    let mut out = Vec::with_capacity(count.min(r.remaining() / 3));
    for _ in 0..count {
        let offset = r.position();
        out.push(match r.u8()? {
            0 => ItemOutcome::Signed(Indicium::decode(
                r.bytes16("indicium", INDICIUM_BYTES_MAX)?,
            )?),
            1 => ItemOutcome::Failed(ErrorCode::from_wire(r.u16()?)),
            other => return Err(bad("outcome", offset, u64::from(other))),
        });
    }
    Ok(out)
}

/// Decodes a record payload of kind `kind` about vPSD `vpsd_id`, written at `at_unix` (the
/// header's fields). `algorithm_of` gives the algorithm of an existing vPSD (a rotated key
/// has the vPSD's algorithm, which the payload does not repeat).
pub fn decode_record(
    kind: u8,
    vpsd_id: u64,
    at_unix: u64,
    payload: &[u8],
    algorithm_of: impl Fn(u64) -> Option<Algorithm>,
) -> Result<Record, DecodeError> {
    let mut r = Reader::new(payload);
    let record = match kind {
        kind::PROVISION => {
            let version = r.u64()?;
            if version != 1 {
                return Err(bad("provision.version", 0, version));
            }
            let algorithm = algorithm(&mut r)?;
            let origin_zip = zip(&mut r)?;
            let owner = r.string16("owner", OWNER_BYTES_MAX)?;
            let public_key = public_key(&mut r, algorithm)?;
            Record::Provision {
                vpsd_id,
                owner,
                algorithm,
                origin_zip,
                public_key,
                sealed_key: sealed(&mut r)?,
                at_unix,
            }
        }
        kind::PROVIDER => {
            let version = r.u64()?;
            let offset = r.position();
            let code = r.u8()?;
            let kind = AuthorizationKind::from_code(code).ok_or(bad(
                "provider.kind",
                offset,
                u64::from(code),
            ))?;
            Record::Provider {
                vpsd_id,
                version,
                kind,
                amount_mills: r.u64()?,
                sequence: r.u64()?,
                at_unix,
                client: ClientTag(r.u64()?),
                request_id: r.u64()?,
                fingerprint: r.array()?,
            }
        }
        kind::STATE_CHANGE => Record::StateChange {
            vpsd_id,
            version: r.u64()?,
            state: state(&mut r)?,
            at_unix,
        },
        kind::WITHDRAW => Record::Withdraw {
            vpsd_id,
            version: r.u64()?,
            refund_mills: r.u64()?,
            at_unix,
        },
        kind::ROTATE_KEY => {
            let version = r.u64()?;
            let key_serial = r.u32()?;
            let algorithm = algorithm_of(vpsd_id).ok_or(bad("rotate_key.vpsd", 0, vpsd_id))?;
            Record::RotateKey {
                vpsd_id,
                version,
                key_serial,
                public_key: public_key(&mut r, algorithm)?,
                sealed_key: sealed(&mut r)?,
                at_unix,
            }
        }
        kind::SESSION => {
            let version = r.u64()?;
            let key_serial = r.u32()?;
            let before = registers(&mut r)?;
            let after = registers(&mut r)?;
            let count = r.u32()? as usize;
            let mut jobs = Vec::with_capacity(count.min(r.remaining() / 34));
            for _ in 0..count {
                jobs.push(JobRecord {
                    client: ClientTag(r.u64()?),
                    request_id: r.u64()?,
                    fingerprint: r.array()?,
                    outcomes: outcomes(&mut r)?,
                });
            }
            Record::Session(SessionRecord {
                vpsd_id,
                version,
                key_serial,
                before,
                after,
                jobs,
            })
        }
        kind::RESET => {
            let offset = r.position();
            let cause = match r.u8()? {
                1 => ResetCause::Adopted {
                    from: r.string16("reset.from", APPLIANCE_BYTES_MAX)?,
                    epoch: i64::try_from(r.u64()?).map_err(|_| bad("reset.epoch", offset, 0))?,
                },
                2 => ResetCause::Voided {
                    local_version: r.u64()?,
                },
                3 => ResetCause::Behind {
                    local_version: r.u64()?,
                },
                other => return Err(bad("reset.cause", offset, u64::from(other))),
            };
            let vpsd = vpsd(&mut r)?;
            if vpsd.id != vpsd_id {
                return Err(bad("reset.vpsd", offset, vpsd.id));
            }
            Record::Reset {
                vpsd: Box::new(vpsd),
                cause,
                at_unix,
                recent: recent(&mut r)?,
            }
        }
        kind::RELEASE => Record::Release {
            vpsd_id,
            version: r.u64()?,
            replicated_version: r.u64()?,
            owner: r.string16("release.owner", APPLIANCE_BYTES_MAX)?,
            at_unix,
        },
        other => return Err(bad("kind", 4, u64::from(other))),
    };
    r.finish()?;
    Ok(record)
}

/// The format byte of the values the cluster keeps in etcd (docs/CLUSTER.md).
pub const REPLICA_FORMAT: u8 = 1;

/// Where a replicated state comes from: the appliance, shard and journal record that made
/// it, with a digest (XXH3-128) of that record's payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub appliance: String,
    pub shard: u16,
    pub sequence: u64,
    pub digest: [u8; 16],
}

/// A vPSD's replicated state (etcd's `state` value): the vPSD without its keys, how many
/// keys it has, and where the state comes from.
pub fn encode_replica_state(
    vpsd: &Vpsd,
    origin: &Origin,
    recent: &[RecentRequest],
    out: &mut Encoder,
) -> Result<(), CodecError> {
    out.bytes.clear();
    out.u8(REPLICA_FORMAT);
    out.vpsd_head(vpsd)?;
    out.count16("vpsd.keys", vpsd.keys.len(), KEYS_MAX)?;
    out.bytes16(
        "origin.appliance",
        origin.appliance.as_bytes(),
        APPLIANCE_BYTES_MAX,
    )?;
    out.u16(origin.shard);
    out.u64(origin.sequence);
    out.put(&origin.digest);
    out.recent(recent)
}

/// A vPSD's sealed keys (etcd's `keys` value).
pub fn encode_replica_keys(vpsd: &Vpsd, out: &mut Encoder) -> Result<(), CodecError> {
    out.bytes.clear();
    out.u8(REPLICA_FORMAT);
    out.u64(vpsd.id);
    out.u8(vpsd.algorithm.code());
    out.keys(&vpsd.keys)
}

/// A vPSD's replicated state, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    pub vpsd: Vpsd,
    pub origin: Origin,
    pub recent: Vec<RecentRequest>,
}

/// A vPSD from its replicated state and keys, with the state's origin and the requests
/// remembered with it. The values must be those of `vpsd_id` (the key they were read
/// from): a state of another vPSD is refused.
pub fn decode_replica(
    vpsd_id: u64,
    state: &[u8],
    sealed: &[u8],
) -> Result<Replicated, DecodeError> {
    let mut r = Reader::new(state);
    let format = r.u8()?;
    if format != REPLICA_FORMAT {
        return Err(bad("replica.format", 0, u64::from(format)));
    }
    let mut vpsd = vpsd_head(&mut r)?;
    if vpsd.id != vpsd_id {
        return Err(bad("replica.vpsd", 1, vpsd.id));
    }
    let key_count = r.u16()?;
    let origin = Origin {
        appliance: r.string16("origin.appliance", APPLIANCE_BYTES_MAX)?,
        shard: r.u16()?,
        sequence: r.u64()?,
        digest: r.array()?,
    };
    let recent = recent(&mut r)?;
    r.finish()?;
    let mut k = Reader::new(sealed);
    let format = k.u8()?;
    if format != REPLICA_FORMAT {
        return Err(bad("replica.keys.format", 0, u64::from(format)));
    }
    let id = k.u64()?;
    if id != vpsd.id {
        return Err(bad("replica.keys.vpsd", 1, id));
    }
    let offset = k.position();
    if algorithm(&mut k)? != vpsd.algorithm {
        return Err(bad("replica.keys.algorithm", offset, 0));
    }
    let keys = keys(&mut k, vpsd.algorithm)?;
    k.finish()?;
    if keys.len() != usize::from(key_count) {
        return Err(bad("replica.key_count", 0, u64::from(key_count)));
    }
    vpsd.keys = keys.into();
    Ok(Replicated {
        vpsd,
        origin,
        recent,
    })
}

/// The requests remembered with a vPSD.
fn recent(r: &mut Reader<'_>) -> Result<Vec<RecentRequest>, DecodeError> {
    let count = usize::from(r.u16()?);
    let mut out = Vec::with_capacity(count.min(r.remaining() / 41));
    for _ in 0..count {
        let client = ClientTag(r.u64()?);
        let request_id = r.u64()?;
        let fingerprint = r.array()?;
        let version = r.u64()?;
        let offset = r.position();
        let answer = match r.u8()? {
            1 => {
                let key_serial = r.u32()?;
                let before = registers(r)?;
                let items = usize::from(r.u16()?);
                let mut outcomes = Vec::with_capacity(items.min(r.remaining() / 2));
                for _ in 0..items {
                    outcomes.push(match r.u16()? {
                        0 => None,
                        code => Some(ErrorCode::from_wire(code)),
                    });
                }
                RecentAnswer::Signed {
                    key_serial,
                    before,
                    outcomes,
                }
            }
            2 => RecentAnswer::Provider,
            other => return Err(bad("recent.kind", offset, u64::from(other))),
        };
        out.push(RecentRequest {
            client,
            request_id,
            fingerprint,
            version,
            answer,
        });
    }
    Ok(out)
}

/// A vPSD without its keys (which it gets empty).
fn vpsd_head(r: &mut Reader<'_>) -> Result<Vpsd, DecodeError> {
    let id = r.u64()?;
    let owner = r.string16("owner", OWNER_BYTES_MAX)?;
    let algorithm = algorithm(r)?;
    let origin_zip = zip(r)?;
    let registers = registers(r)?;
    let state = state(r)?;
    Ok(Vpsd {
        id,
        owner,
        algorithm,
        origin_zip,
        keys: Vec::new().into(),
        registers,
        state,
        last_contact_unix: r.u64()?,
        provider_sequence: r.u64()?,
        version: r.u64()?,
    })
}

/// A vPSD's keys (at least one).
fn keys(r: &mut Reader<'_>, algorithm: Algorithm) -> Result<Vec<KeyEntry>, DecodeError> {
    let key_count = r.u16()?;
    let mut keys = Vec::with_capacity(usize::from(key_count).min(r.remaining() / 16));
    for _ in 0..key_count {
        let serial = r.u32()?;
        let sealed_version = r.u64()?;
        let public = public_key(r, algorithm)?;
        let offset = r.position();
        let sealed = match r.u8()? {
            0 => None,
            1 => Some(sealed(r)?),
            other => return Err(bad("key.sealed", offset, u64::from(other))),
        };
        keys.push(KeyEntry {
            serial,
            sealed_version,
            public,
            sealed,
        });
    }
    if keys.is_empty() {
        return Err(bad("vpsd.keys", r.position(), 0));
    }
    Ok(keys)
}

/// A whole vPSD.
fn vpsd(r: &mut Reader<'_>) -> Result<Vpsd, DecodeError> {
    let mut vpsd = vpsd_head(r)?;
    vpsd.keys = keys(r, vpsd.algorithm)?.into();
    Ok(vpsd)
}

/// Decodes a checkpoint payload.
pub fn decode_checkpoint(payload: &[u8]) -> Result<StoredCheckpoint, DecodeError> {
    // Capacities below are bounded by the bytes left, so a corrupt count cannot make a
    // large allocation.
    let mut r = Reader::new(payload);
    let count = r.u32()? as usize;
    let mut vpsds = Vec::with_capacity(count.min(r.remaining() / 64));
    for _ in 0..count {
        vpsds.push(vpsd(&mut r)?);
    }
    let count = r.u32()? as usize;
    let mut quarantine = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        quarantine.push((r.u64()?, r.string16("quarantine.reason", REASON_BYTES_MAX)?));
    }
    let blocked = r.string16("provisioning_blocked", REASON_BYTES_MAX)?;
    let provisioning_blocked = (!blocked.is_empty()).then_some(blocked);
    let window_from = r.u64()?;
    r.finish()?;
    Ok(StoredCheckpoint {
        state: Checkpoint {
            vpsds,
            quarantine,
            provisioning_blocked,
        },
        window_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // (the whole codec is exercised by the journal tests and the fuzz targets)

    #[test]
    fn a_checkpoint_with_more_keys_than_the_encoding_holds_is_a_typed_error() {
        use crate::engine::{MasterKey, PublicKey};
        let master = MasterKey::new(&[1; 32]).unwrap();
        let binding = crate::engine::KeyBinding {
            vpsd_id: 1,
            key_serial: 1,
            sealed_version: 1,
        };
        let (sealed, public): (SealedKey, PublicKey) =
            master.generate(Algorithm::Ed25519, binding).unwrap();
        let key = KeyEntry {
            serial: 1,
            sealed_version: 1,
            public,
            sealed: Some(sealed),
        };
        let vpsd = Vpsd {
            id: 1,
            owner: "o".into(),
            algorithm: Algorithm::Ed25519,
            origin_zip: Zip::new(20260, None).unwrap(),
            keys: vec![key; KEYS_MAX + 1].into(),
            registers: Registers::default(),
            state: StoredState::Active,
            last_contact_unix: 0,
            provider_sequence: 0,
            version: 1,
        };
        let checkpoint = Checkpoint {
            vpsds: vec![vpsd],
            ..Checkpoint::default()
        };
        let mut out = Encoder::default();
        assert_eq!(
            encode_checkpoint(&checkpoint, 0, &mut out),
            Err(CodecError::TooMany {
                field: "vpsd.keys",
                count: KEYS_MAX + 1,
                max: KEYS_MAX
            })
        );
    }

    #[test]
    fn an_encoder_refuses_what_the_decoder_would_refuse() {
        let mut out = Encoder::default();
        let record = Record::StateChange {
            vpsd_id: 1,
            version: 2,
            state: StoredState::Locked(LockReason::Operator("x".repeat(REASON_BYTES_MAX + 1))),
            at_unix: 0,
        };
        assert_eq!(
            encode_record(&record, &mut out),
            Err(CodecError::FieldTooLong {
                field: "state.reason",
                len: REASON_BYTES_MAX + 1,
                max: REASON_BYTES_MAX
            })
        );
        let record = Record::StateChange {
            vpsd_id: 1,
            version: 2,
            state: StoredState::Locked(LockReason::Operator("x".repeat(REASON_BYTES_MAX))),
            at_unix: 0,
        };
        encode_record(&record, &mut out).unwrap();
        let (kind, vpsd_id, at_unix) = header_fields(&record, 0);
        assert_eq!(
            decode_record(kind, vpsd_id, at_unix, &out.bytes, |_| None).unwrap(),
            record
        );
    }
}
