//! Frames: a fixed 32-byte header followed by a body of at most [`BODY_BYTES_MAX`] bytes.
//!
//! The decoder works on whatever prefix of the stream has arrived: it reports how many more
//! bytes it needs, validates the header (magic, checksum, version, reserved bytes, flags,
//! length cap) as soon as the 32 header bytes are there, before any body byte is looked at,
//! and only then waits for the body. It borrows from the caller's buffer and never
//! allocates. See docs/PROTOCOL.md for the byte layout.

use crate::codec::Writer;
use crate::error::{EncodeError, FrameError};

/// `"INDI"` on the wire (bytes 0x49 0x4E 0x44 0x49), read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"INDI");
/// Size of every frame header.
pub const HEADER_BYTES: usize = 32;
/// The hard cap on a body, whatever a decoder is configured with.
pub const BODY_BYTES_MAX: u32 = 128 * 1024;
/// The hard cap on a whole frame.
pub const FRAME_BYTES_MAX: usize = HEADER_BYTES + BODY_BYTES_MAX as usize;
/// Oldest and newest protocol versions this codec speaks.
pub const PROTOCOL_VERSION_MIN: u8 = 1;
pub const PROTOCOL_VERSION_MAX: u8 = 1;
/// Flag bit set on every frame sent by the appliance, clear on every frame sent by a client.
pub const FLAG_RESPONSE: u16 = 0x0001;
const FLAGS_KNOWN: u16 = FLAG_RESPONSE;

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
    pub body_len: u32,
    pub body_checksum: u32,
}

impl FrameHeader {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    /// Writes the 32 header bytes, computing the header checksum.
    pub fn encode(&self, out: &mut [u8; HEADER_BYTES]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = self.version;
        out[5] = self.opcode;
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.body_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.body_checksum.to_le_bytes());
        out[24..28].copy_from_slice(&[0; 4]);
        let checksum = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Parses and validates the 32 header bytes. Nothing about the body is checked here
    /// except that its declared length is within `body_bytes_max`.
    pub fn decode(bytes: &[u8; HEADER_BYTES], body_bytes_max: u32) -> Result<Self, FrameError> {
        let field = |range: std::ops::Range<usize>| -> [u8; 4] {
            let mut out = [0u8; 4];
            out.copy_from_slice(&bytes[range]);
            out
        };
        let magic = u32::from_le_bytes(field(0..4));
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let expected = u32::from_le_bytes(field(28..32));
        let computed = crc32c::crc32c(&bytes[0..28]);
        if expected != computed {
            return Err(FrameError::HeaderChecksum { expected, computed });
        }
        // The checksum holds: from here on every error names the request it refuses.
        let mut request_id = [0u8; 8];
        request_id.copy_from_slice(&bytes[8..16]);
        let request_id = u64::from_le_bytes(request_id);
        let version = bytes[4];
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
            return Err(FrameError::UnsupportedVersion {
                version,
                request_id,
            });
        }
        if field(24..28) != [0; 4] {
            return Err(FrameError::ReservedNotZero { request_id });
        }
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags & !FLAGS_KNOWN != 0 {
            return Err(FrameError::UnknownFlags { flags, request_id });
        }
        let body_len = u32::from_le_bytes(field(16..20));
        let len_max = body_bytes_max.min(BODY_BYTES_MAX);
        if body_len > len_max {
            return Err(FrameError::BodyTooLarge {
                len: body_len,
                len_max,
                request_id,
            });
        }
        Ok(Self {
            version,
            opcode: bytes[5],
            flags,
            request_id,
            body_len,
            body_checksum: u32::from_le_bytes(field(20..24)),
        })
    }
}

/// A complete frame borrowed from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Bytes of input this frame occupies (header plus body).
    pub fn len(&self) -> usize {
        HEADER_BYTES + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The result of feeding the decoder what has arrived so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// At least this many more bytes are needed before anything more can be said.
    Incomplete { needed: usize },
    /// A whole, valid frame at the start of the input; drop `frame.len()` bytes to go on.
    Frame(Frame<'a>),
}

/// Decodes frames from the front of a byte buffer, with a configurable body cap.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    body_bytes_max: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(BODY_BYTES_MAX)
    }
}

impl FrameDecoder {
    /// A decoder that refuses bodies above `body_bytes_max` (clamped to [`BODY_BYTES_MAX`]).
    pub fn new(body_bytes_max: u32) -> Self {
        Self {
            body_bytes_max: body_bytes_max.min(BODY_BYTES_MAX),
        }
    }

    pub fn body_bytes_max(&self) -> u32 {
        self.body_bytes_max
    }

    /// Looks at the front of `input`. A bad header is reported as soon as its 32 bytes are
    /// present, so a caller never buffers the body of a frame it is going to reject.
    pub fn decode<'a>(&self, input: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        let Some(header_bytes) = input.first_chunk::<HEADER_BYTES>() else {
            return Ok(Decoded::Incomplete {
                needed: HEADER_BYTES - input.len(),
            });
        };
        let header = FrameHeader::decode(header_bytes, self.body_bytes_max)?;
        // The cap above bounds body_len to 128 KiB, so this cannot overflow.
        let frame_len = HEADER_BYTES + header.body_len as usize;
        if input.len() < frame_len {
            return Ok(Decoded::Incomplete {
                needed: frame_len - input.len(),
            });
        }
        let body = &input[HEADER_BYTES..frame_len];
        let computed = crc32c::crc32c(body);
        if computed != header.body_checksum {
            return Err(FrameError::BodyChecksum {
                expected: header.body_checksum,
                computed,
                request_id: header.request_id,
            });
        }
        Ok(Decoded::Frame(Frame { header, body }))
    }
}

/// Writes one frame into `out`: the body is produced by `write_body` directly after the
/// header, then the header (with both checksums) is filled in. Returns the frame's length.
pub fn encode_frame(
    out: &mut [u8],
    version: u8,
    opcode: u8,
    flags: u16,
    request_id: u64,
    write_body: impl FnOnce(&mut Writer<'_>) -> Result<(), EncodeError>,
) -> Result<usize, EncodeError> {
    if out.len() < HEADER_BYTES {
        return Err(EncodeError::BufferTooSmall {
            needed: HEADER_BYTES,
            capacity: out.len(),
        });
    }
    let (header_bytes, body_buf) = out.split_at_mut(HEADER_BYTES);
    let body_cap = body_buf.len().min(BODY_BYTES_MAX as usize);
    let body_len = {
        let mut writer = Writer::new(&mut body_buf[..body_cap]);
        write_body(&mut writer).map_err(|err| match err {
            EncodeError::BufferTooSmall { needed, .. } if body_cap == BODY_BYTES_MAX as usize => {
                EncodeError::FrameTooLarge {
                    len: needed,
                    len_max: BODY_BYTES_MAX as usize,
                }
            }
            EncodeError::BufferTooSmall { needed, .. } => EncodeError::BufferTooSmall {
                needed: HEADER_BYTES + needed,
                capacity: HEADER_BYTES + body_cap,
            },
            other => other,
        })?;
        writer.position()
    };
    let header = FrameHeader {
        version,
        opcode,
        flags,
        request_id,
        // body_len <= BODY_BYTES_MAX, which fits in u32.
        body_len: u32::try_from(body_len).map_err(|_| EncodeError::FrameTooLarge {
            len: body_len,
            len_max: BODY_BYTES_MAX as usize,
        })?,
        body_checksum: crc32c::crc32c(&body_buf[..body_len]),
    };
    let header_array: &mut [u8; HEADER_BYTES] =
        header_bytes
            .try_into()
            .map_err(|_| EncodeError::BufferTooSmall {
                needed: HEADER_BYTES,
                capacity: 0,
            })?;
    header.encode(header_array);
    Ok(HEADER_BYTES + body_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_frame(body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_BYTES + body.len()];
        let len = encode_frame(&mut buf, 1, 0x10, 0, 42, |w| w.put(body)).unwrap();
        buf.truncate(len);
        buf
    }

    #[test]
    fn decodes_a_frame_fed_one_byte_at_a_time() {
        let bytes = sample_frame(b"hello");
        let decoder = FrameDecoder::default();
        for cut in 0..bytes.len() {
            match decoder.decode(&bytes[..cut]).unwrap() {
                Decoded::Incomplete { needed } => {
                    assert!(needed >= 1);
                    assert!(cut + needed <= bytes.len());
                }
                Decoded::Frame(_) => panic!("frame complete at {cut} of {}", bytes.len()),
            }
        }
        let Decoded::Frame(frame) = decoder.decode(&bytes).unwrap() else {
            panic!("whole frame not decoded");
        };
        assert_eq!(frame.body, b"hello");
        assert_eq!(frame.header.request_id, 42);
        assert_eq!(frame.header.opcode, 0x10);
        assert_eq!(frame.len(), bytes.len());
    }

    #[test]
    fn header_needs_exactly_what_is_missing() {
        let bytes = sample_frame(b"0123456789");
        let decoder = FrameDecoder::default();
        assert_eq!(
            decoder.decode(&bytes[..5]).unwrap(),
            Decoded::Incomplete { needed: 27 }
        );
        assert_eq!(
            decoder.decode(&bytes[..HEADER_BYTES]).unwrap(),
            Decoded::Incomplete { needed: 10 }
        );
    }

    #[test]
    fn bad_header_is_rejected_before_the_body_arrives() {
        let mut bytes = sample_frame(b"body");
        bytes[4] = 9; // the version byte, changed without resealing the header checksum
        let decoder = FrameDecoder::default();
        // Only the header is offered: the error comes anyway.
        assert!(matches!(
            decoder.decode(&bytes[..HEADER_BYTES]),
            Err(FrameError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn each_header_check_has_its_own_error() {
        let decoder = FrameDecoder::new(16);
        let reseal = |bytes: &mut Vec<u8>| {
            let sum = crc32c::crc32c(&bytes[0..28]);
            bytes[28..32].copy_from_slice(&sum.to_le_bytes());
        };
        let mut bad_magic = sample_frame(b"x");
        bad_magic[0] = b'X';
        assert!(matches!(
            decoder.decode(&bad_magic),
            Err(FrameError::BadMagic { .. })
        ));

        let mut version = sample_frame(b"x");
        version[4] = 2;
        reseal(&mut version);
        assert_eq!(
            decoder.decode(&version),
            Err(FrameError::UnsupportedVersion {
                version: 2,
                request_id: 42
            })
        );

        let mut reserved = sample_frame(b"x");
        reserved[25] = 1;
        reseal(&mut reserved);
        assert_eq!(
            decoder.decode(&reserved),
            Err(FrameError::ReservedNotZero { request_id: 42 })
        );

        let mut flags = sample_frame(b"x");
        flags[6] = 0x02;
        reseal(&mut flags);
        assert_eq!(
            decoder.decode(&flags),
            Err(FrameError::UnknownFlags {
                flags: 2,
                request_id: 42
            })
        );

        let big = sample_frame(&[7u8; 17]);
        assert_eq!(
            decoder.decode(&big[..HEADER_BYTES]),
            Err(FrameError::BodyTooLarge {
                len: 17,
                len_max: 16,
                request_id: 42
            })
        );

        let mut body = sample_frame(b"abc");
        body[HEADER_BYTES] ^= 1;
        assert!(matches!(
            decoder.decode(&body),
            Err(FrameError::BodyChecksum { request_id: 42, .. })
        ));
    }

    #[test]
    fn an_error_names_the_request_only_once_the_header_checksum_holds() {
        let decoder = FrameDecoder::new(16);
        let mut bad_magic = sample_frame(b"x");
        bad_magic[0] = b'X';
        let mut bad_checksum = sample_frame(b"x");
        bad_checksum[8] ^= 1; // the request id, changed without resealing
        for input in [bad_magic, bad_checksum] {
            let err = decoder.decode(&input).unwrap_err();
            assert_eq!(err.request_id(), None, "{err}");
        }
        let big = sample_frame(&[7u8; 17]);
        let err = decoder.decode(&big).unwrap_err();
        assert_eq!(err.request_id(), Some(42), "{err}");
    }

    #[test]
    fn encode_refuses_small_buffers_and_oversized_bodies() {
        let mut small = [0u8; 40];
        assert!(matches!(
            encode_frame(&mut small, 1, 1, 0, 1, |w| w.put(&[0u8; 9])),
            Err(EncodeError::BufferTooSmall {
                needed: 41,
                capacity: 40
            })
        ));
        let mut huge = vec![0u8; FRAME_BYTES_MAX + 10];
        let too_big = vec![0u8; BODY_BYTES_MAX as usize + 1];
        assert!(matches!(
            encode_frame(&mut huge, 1, 1, 0, 1, |w| w.put(&too_big)),
            Err(EncodeError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn two_frames_back_to_back_decode_in_order() {
        let mut stream = sample_frame(b"first");
        stream.extend_from_slice(&sample_frame(b"second"));
        let decoder = FrameDecoder::default();
        let Decoded::Frame(first) = decoder.decode(&stream).unwrap() else {
            panic!("first frame");
        };
        assert_eq!(first.body, b"first");
        let Decoded::Frame(second) = decoder.decode(&stream[first.len()..]).unwrap() else {
            panic!("second frame");
        };
        assert_eq!(second.body, b"second");
    }
}
