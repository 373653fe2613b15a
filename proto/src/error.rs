//! Typed errors of the codec. Decoding never panics: every malformed input maps to one of
//! these, with the byte offset where the problem was found.

use thiserror::Error;

/// Why a body, an indicium or an authorization could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("truncated at byte {offset}: needed {needed} more bytes, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{count} unexpected trailing bytes at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },
    #[error("field `{field}` at byte {offset} is {len} bytes long, at most {len_max} allowed")]
    TooLong {
        field: &'static str,
        offset: usize,
        len: usize,
        len_max: usize,
    },
    #[error("field `{field}` at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },
    #[error("field `{field}` at byte {offset} has invalid value {value}")]
    InvalidValue {
        field: &'static str,
        offset: usize,
        value: u64,
    },
    #[error("reserved field `{field}` at byte {offset} must be zero")]
    ReservedNotZero { field: &'static str, offset: usize },
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode { opcode: u8 },
    #[error("opcode {opcode:#04x} is not valid in this direction")]
    WrongDirection { opcode: u8 },
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("buffer too small: {needed} bytes needed, capacity {capacity}")]
    BufferTooSmall { needed: usize, capacity: usize },
    #[error("field `{field}` is {len} long, at most {len_max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        len_max: usize,
    },
    #[error("field `{field}` has a value the format cannot carry: {reason}")]
    InvalidValue {
        field: &'static str,
        reason: &'static str,
    },
    #[error("frame body of {len} bytes exceeds the limit of {len_max}")]
    FrameTooLarge { len: usize, len_max: usize },
}

/// Why a frame header was rejected. Any of these ends the connection: after a bad header
/// the byte stream can no longer be trusted to be aligned on frames.
///
/// Once the header checksum holds, the header's request id can be trusted to be what the
/// sender wrote, and the error carries it ([`FrameError::request_id`]): the receiver can
/// say which request it refuses without reading header bytes itself.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("header checksum mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    HeaderChecksum { expected: u32, computed: u32 },
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion { version: u8, request_id: u64 },
    #[error("reserved header bytes are not zero")]
    ReservedNotZero { request_id: u64 },
    #[error("unknown flag bits {flags:#06x}")]
    UnknownFlags { flags: u16, request_id: u64 },
    #[error("body of {len} bytes exceeds the limit of {len_max}")]
    BodyTooLarge {
        len: u32,
        len_max: u32,
        request_id: u64,
    },
    #[error("body checksum mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    BodyChecksum {
        expected: u32,
        computed: u32,
        request_id: u64,
    },
}

impl FrameError {
    /// The rejected header's request id, when its checksum held (None: bad magic or header
    /// checksum, so no field of the header can be trusted).
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::BadMagic { .. } | Self::HeaderChecksum { .. } => None,
            Self::UnsupportedVersion { request_id, .. }
            | Self::ReservedNotZero { request_id }
            | Self::UnknownFlags { request_id, .. }
            | Self::BodyTooLarge { request_id, .. }
            | Self::BodyChecksum { request_id, .. } => Some(*request_id),
        }
    }
}
