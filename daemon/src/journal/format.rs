//! The journal's bytes: segment headers, record headers and trailers, and the payload of
//! every record kind. docs/JOURNAL.md describes each byte; the two must agree.

use indicia_proto::codec::Reader;
use indicia_proto::{
    Algorithm, AuthorizationKind, DecodeError, ErrorCode, Indicium, LockReason, Zip,
};

use crate::engine::keys::SEALED_KEY_BYTES;
use crate::engine::WindowSnapshot;
use crate::engine::{
    Checkpoint, ClientTag, ItemOutcome, JobRecord, KeyEntry, PublicKey, Record, Registers,
    Remembered, RememberedAnswer, SealedKey, SessionRecord, StoredState, Vpsd,
};

pub const SEGMENT_MAGIC: &[u8; 8] = b"INDJSEG1";
pub const SEGMENT_HEADER_BYTES: usize = 64;
pub const FORMAT_VERSION: u16 = 1;
pub const RECORD_MAGIC: &[u8; 4] = b"IREC";
pub const RECORD_HEADER_BYTES: usize = 40;
pub const CHAIN_BYTES: usize = 32;
/// prev_chain, chain, body checksum.
pub const RECORD_TRAILER_BYTES: usize = CHAIN_BYTES * 2 + 4;
/// Records start on 8-byte boundaries.
pub const RECORD_ALIGN: usize = 8;
/// The largest payload a record may have (a checkpoint of a full shard fits).
pub const PAYLOAD_BYTES_MAX: usize = 1 << 30;

/// Record kinds.
pub mod kind {
    pub const PROVISION: u8 = 1;
    pub const PROVIDER: u8 = 2;
    pub const STATE_CHANGE: u8 = 3;
    pub const WITHDRAW: u8 = 4;
    pub const ROTATE_KEY: u8 = 5;
    pub const SESSION: u8 = 6;
    pub const CHECKPOINT: u8 = 7;
}

/// Bytes a record with this payload occupies, padding included.
pub fn record_len(payload_len: usize) -> usize {
    (RECORD_HEADER_BYTES + payload_len + RECORD_TRAILER_BYTES).next_multiple_of(RECORD_ALIGN)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u16,
    pub index: u64,
    pub first_sequence: u64,
    pub prev_chain: [u8; CHAIN_BYTES],
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(SEGMENT_MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&self.shard.to_le_bytes());
        out[16..24].copy_from_slice(&self.index.to_le_bytes());
        out[24..32].copy_from_slice(&self.first_sequence.to_le_bytes());
        out[32..64].copy_from_slice(&self.prev_chain);
        let crc = crc32c::crc32c(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; SEGMENT_HEADER_BYTES] =
            bytes.get(..SEGMENT_HEADER_BYTES)?.try_into().ok()?;
        if &bytes[0..8] != SEGMENT_MAGIC || u16_at(bytes, 8) != FORMAT_VERSION {
            return None;
        }
        let mut zeroed = *bytes;
        zeroed[12..16].fill(0);
        if crc32c::crc32c(&zeroed) != u32_at(bytes, 12) {
            return None;
        }
        let mut prev_chain = [0u8; CHAIN_BYTES];
        prev_chain.copy_from_slice(&bytes[32..64]);
        Some(Self {
            shard: u16_at(bytes, 10),
            index: u64_at(bytes, 16),
            first_sequence: u64_at(bytes, 24),
            prev_chain,
        })
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(out)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(out)
}

/// A record header whose own checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub payload_len: u32,
    pub sequence: u64,
    /// The vPSD the record is about; 0 for a checkpoint.
    pub vpsd_id: u64,
    pub at_unix: u64,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[0..4].copy_from_slice(RECORD_MAGIC);
        out[4] = self.kind;
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        out[24..32].copy_from_slice(&self.vpsd_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.at_unix.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out[12..16].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a header; None unless magic, reserved bytes, kind and checksum all hold.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; RECORD_HEADER_BYTES] =
            bytes.get(..RECORD_HEADER_BYTES)?.try_into().ok()?;
        if &bytes[0..4] != RECORD_MAGIC || bytes[5..8] != [0, 0, 0] {
            return None;
        }
        if !(kind::PROVISION..=kind::CHECKPOINT).contains(&bytes[4]) {
            return None;
        }
        let mut zeroed = *bytes;
        zeroed[12..16].fill(0);
        if crc32c::crc32c(&zeroed) != u32_at(bytes, 12) {
            return None;
        }
        Some(Self {
            kind: bytes[4],
            payload_len: u32_at(bytes, 8),
            sequence: u64_at(bytes, 16),
            vpsd_id: u64_at(bytes, 24),
            at_unix: u64_at(bytes, 32),
        })
    }
}

/// Writes the body checksum over payload and both chain values.
pub fn body_checksum(
    payload: &[u8],
    prev_chain: &[u8; CHAIN_BYTES],
    chain: &[u8; CHAIN_BYTES],
) -> u32 {
    let crc = crc32c::crc32c(payload);
    let crc = crc32c::crc32c_append(crc, prev_chain);
    crc32c::crc32c_append(crc, chain)
}

/// A growable little-endian encoder for payloads.
#[derive(Debug, Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }
    pub fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }
    pub fn put(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }
    /// u16 length, then the bytes. Every caller passes a bounded field (names, keys,
    /// reasons, indicia), all far below 64 KiB.
    pub fn bytes16(&mut self, bytes: &[u8]) {
        let len =
            u16::try_from(bytes.len()).expect("journal byte fields are bounded well below 64 KiB");
        self.u16(len);
        self.put(bytes);
    }
    pub fn count32(&mut self, count: usize) {
        let count = u32::try_from(count).expect("journal lists are bounded well below 4 billion");
        self.u32(count);
    }
    fn registers(&mut self, registers: &Registers) {
        self.u64(registers.ascending_mills);
        self.u64(registers.descending_mills);
        self.u64(registers.control_total_mills);
        self.u64(registers.piece_count);
    }
    fn state(&mut self, state: &StoredState) {
        let (code, text) = match state {
            StoredState::Active => (0, ""),
            StoredState::Locked(LockReason::Operator(text)) => (1, text.as_str()),
            StoredState::Locked(LockReason::ContactOverdue) => (2, ""),
            StoredState::Locked(LockReason::Integrity(text)) => (3, text.as_str()),
            StoredState::Withdrawn => (4, ""),
        };
        self.u8(code);
        self.bytes16(text.as_bytes());
    }
    fn outcomes(&mut self, outcomes: &[ItemOutcome]) {
        let count = u16::try_from(outcomes.len()).expect("a job holds at most 256 items");
        self.u16(count);
        for outcome in outcomes {
            match outcome {
                ItemOutcome::Signed(indicium) => {
                    self.u8(0);
                    self.bytes16(indicium.to_bytes().as_ref());
                }
                ItemOutcome::Failed(code) => {
                    self.u8(1);
                    self.u16(code.wire());
                }
            }
        }
    }
}

/// The header fields a record implies (kind, vPSD, time).
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
    }
}

/// Encodes a record's payload (everything but what the header carries).
pub fn encode_record(record: &Record, out: &mut Encoder) {
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
            out.bytes16(owner.as_bytes());
            out.bytes16(&public_key.bytes);
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
            out.state(state);
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
            out.bytes16(&public_key.bytes);
            out.put(&sealed_key.0);
        }
        Record::Session(session) => {
            out.u64(session.version);
            out.u32(session.key_serial);
            out.registers(&session.before);
            out.registers(&session.after);
            out.count32(session.jobs.len());
            for job in &session.jobs {
                out.u64(job.client.0);
                out.u64(job.request_id);
                out.put(&job.fingerprint);
                out.outcomes(&job.outcomes);
            }
        }
    }
}

/// Encodes a checkpoint: the whole state of a shard.
pub fn encode_checkpoint(checkpoint: &Checkpoint, out: &mut Encoder) {
    out.count32(checkpoint.vpsds.len());
    for vpsd in &checkpoint.vpsds {
        out.u64(vpsd.id);
        out.bytes16(vpsd.owner.as_bytes());
        out.u8(vpsd.algorithm.code());
        out.u32(vpsd.origin_zip.wire());
        out.registers(&vpsd.registers);
        out.state(&vpsd.state);
        out.u64(vpsd.last_contact_unix);
        out.u64(vpsd.provider_sequence);
        out.u64(vpsd.version);
        let keys = u16::try_from(vpsd.keys.len()).expect("key serials are bounded by rotations");
        out.u16(keys);
        for key in &vpsd.keys {
            out.u32(key.serial);
            out.u64(key.sealed_version);
            out.bytes16(&key.public.bytes);
            match &key.sealed {
                Some(sealed) => {
                    out.u8(1);
                    out.put(&sealed.0);
                }
                None => out.u8(0),
            }
        }
    }
    out.count32(checkpoint.quarantine.len());
    for (vpsd_id, reason) in &checkpoint.quarantine {
        out.u64(*vpsd_id);
        out.bytes16(reason.as_bytes());
    }
    out.bytes16(
        checkpoint
            .provisioning_blocked
            .as_deref()
            .unwrap_or("")
            .as_bytes(),
    );
    for generation in [&checkpoint.window.previous, &checkpoint.window.current] {
        out.count32(generation.len());
        for (client, request_id, remembered) in generation {
            out.u64(client.0);
            out.u64(*request_id);
            out.u64(remembered.vpsd_id);
            out.put(&remembered.fingerprint);
            match &remembered.answer {
                RememberedAnswer::Items(outcomes) => {
                    out.u8(0);
                    out.outcomes(outcomes);
                }
                RememberedAnswer::Provider => out.u8(1),
            }
        }
    }
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
    let text = r.string16("state.reason", 1024)?;
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
        bytes: r.bytes16("public_key", 128)?.to_vec(),
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
            0 => ItemOutcome::Signed(Indicium::decode(r.bytes16("indicium", 160)?)?),
            1 => ItemOutcome::Failed(ErrorCode::from_wire(r.u16()?)),
            other => return Err(bad("outcome", offset, u64::from(other))),
        });
    }
    Ok(out)
}

/// Decodes a record payload. `algorithm_of` gives the algorithm of an existing vPSD (a
/// rotated key has the vPSD's algorithm, which the payload does not repeat).
pub fn decode_record(
    header: &RecordHeader,
    payload: &[u8],
    algorithm_of: impl Fn(u64) -> Option<Algorithm>,
) -> Result<Record, DecodeError> {
    let mut r = Reader::new(payload);
    let vpsd_id = header.vpsd_id;
    let at_unix = header.at_unix;
    let record = match header.kind {
        kind::PROVISION => {
            let version = r.u64()?;
            if version != 1 {
                return Err(bad("provision.version", 0, version));
            }
            let algorithm = algorithm(&mut r)?;
            let origin_zip = zip(&mut r)?;
            let owner = r.string16("owner", 64)?;
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
        other => return Err(bad("kind", 4, u64::from(other))),
    };
    r.finish()?;
    Ok(record)
}

/// Decodes a checkpoint payload.
pub fn decode_checkpoint(payload: &[u8]) -> Result<Checkpoint, DecodeError> {
    // Capacities below are bounded by the bytes left, so a corrupt count cannot make a
    // large allocation.
    let mut r = Reader::new(payload);
    let count = r.u32()? as usize;
    let mut vpsds = Vec::with_capacity(count.min(r.remaining() / 64));
    for _ in 0..count {
        let id = r.u64()?;
        let owner = r.string16("owner", 64)?;
        let algorithm = algorithm(&mut r)?;
        let origin_zip = zip(&mut r)?;
        let registers = registers(&mut r)?;
        let state = state(&mut r)?;
        let last_contact_unix = r.u64()?;
        let provider_sequence = r.u64()?;
        let version = r.u64()?;
        let key_count = r.u16()?;
        let mut keys = Vec::with_capacity(usize::from(key_count));
        for _ in 0..key_count {
            let serial = r.u32()?;
            let sealed_version = r.u64()?;
            let public = public_key(&mut r, algorithm)?;
            let offset = r.position();
            let sealed = match r.u8()? {
                0 => None,
                1 => Some(sealed(&mut r)?),
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
        vpsds.push(Vpsd {
            id,
            owner,
            algorithm,
            origin_zip,
            keys,
            registers,
            state,
            last_contact_unix,
            provider_sequence,
            version,
        });
    }
    let count = r.u32()? as usize;
    let mut quarantine = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        quarantine.push((r.u64()?, r.string16("quarantine.reason", 1024)?));
    }
    let blocked = r.string16("provisioning_blocked", 1024)?;
    let provisioning_blocked = (!blocked.is_empty()).then_some(blocked);
    let previous = window_generation(&mut r)?;
    let current = window_generation(&mut r)?;
    r.finish()?;
    Ok(Checkpoint {
        vpsds,
        quarantine,
        provisioning_blocked,
        window: WindowSnapshot { previous, current },
    })
}

fn window_generation(r: &mut Reader<'_>) -> Result<Vec<(ClientTag, u64, Remembered)>, DecodeError> {
    let count = r.u32()? as usize;
    let mut window = Vec::with_capacity(count.min(r.remaining() / 41));
    for _ in 0..count {
        let client = ClientTag(r.u64()?);
        let request_id = r.u64()?;
        let vpsd_id = r.u64()?;
        let fingerprint = r.array()?;
        let offset = r.position();
        let answer = match r.u8()? {
            0 => RememberedAnswer::Items(outcomes(r)?.into()),
            1 => RememberedAnswer::Provider,
            other => return Err(bad("window.answer", offset, u64::from(other))),
        };
        window.push((
            client,
            request_id,
            Remembered {
                vpsd_id,
                fingerprint,
                answer,
            },
        ));
    }
    Ok(window)
}
