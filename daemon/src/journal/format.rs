//! The journal's framing: segment headers, record headers and trailers. A record's
//! payload is opaque here (the store above gives the kinds their meaning); the journal
//! knows only which kind is a checkpoint. docs/JOURNAL.md describes each byte; the two must
//! agree.

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

/// The record kinds this format version knows (the header's kind byte). The store gives
/// 1 to 6, 8 and 9 their meaning; 7 is a checkpoint, which starts a segment.
pub const KINDS: std::ops::RangeInclusive<u8> = 1..=KIND_MAX;
/// The highest kind this format version knows.
pub const KIND_MAX: u8 = 9;
/// The kind of a checkpoint record: a whole state, opaque here, from which recovery can
/// start without reading older segments.
pub const CHECKPOINT: u8 = 7;

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
    /// What the record is about (the store writes its vPSD id); 0 for a checkpoint.
    pub subject: u64,
    pub at_unix: u64,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[0..4].copy_from_slice(RECORD_MAGIC);
        out[4] = self.kind;
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        out[24..32].copy_from_slice(&self.subject.to_le_bytes());
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
        if !KINDS.contains(&bytes[4]) {
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
            subject: u64_at(bytes, 24),
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
