//! Bounded little-endian readers and writers over borrowed buffers.
//!
//! Every multi-byte integer on the wire and in an indicium is little-endian. A [`Reader`]
//! never reads past its slice and never allocates more than the bytes it was given; a
//! [`Writer`] never writes past the caller's buffer.

use crate::error::{DecodeError, EncodeError};

/// A cursor over a byte slice that decodes primitives or fails with a typed error.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < len {
            return Err(DecodeError::Truncated {
                offset: self.pos,
                needed: len,
                available: self.remaining(),
            });
        }
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A byte string with a u16 length prefix, at most `len_max` bytes.
    pub fn bytes16(
        &mut self,
        field: &'static str,
        len_max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let offset = self.pos;
        let len = usize::from(self.u16()?);
        if len > len_max {
            return Err(DecodeError::TooLong {
                field,
                offset,
                len,
                len_max,
            });
        }
        self.take(len)
    }

    /// A UTF-8 string with a u16 length prefix, at most `len_max` bytes.
    pub fn string16(&mut self, field: &'static str, len_max: usize) -> Result<String, DecodeError> {
        let offset = self.pos;
        let raw = self.bytes16(field, len_max)?;
        match std::str::from_utf8(raw) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err(DecodeError::InvalidUtf8 { field, offset }),
        }
    }

    /// A byte that must be 0 (false) or 1 (true).
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidValue {
                field,
                offset,
                value: u64::from(value),
            }),
        }
    }

    /// Fails unless every byte has been consumed: trailing bytes are an error, not padding.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                offset: self.pos,
                count: self.remaining(),
            })
        }
    }
}

/// A cursor that encodes primitives into a caller-provided buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(EncodeError::BufferTooSmall {
                needed: usize::MAX,
                capacity: self.buf.len(),
            })?;
        if end > self.buf.len() {
            return Err(EncodeError::BufferTooSmall {
                needed: end,
                capacity: self.buf.len(),
            });
        }
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    pub fn u8(&mut self, value: u8) -> Result<(), EncodeError> {
        self.put(&[value])
    }

    pub fn u16(&mut self, value: u16) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    pub fn u32(&mut self, value: u32) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    pub fn u64(&mut self, value: u64) -> Result<(), EncodeError> {
        self.put(&value.to_le_bytes())
    }

    pub fn bool(&mut self, value: bool) -> Result<(), EncodeError> {
        self.u8(u8::from(value))
    }

    /// A byte string with a u16 length prefix; fails if longer than `len_max`.
    pub fn bytes16(
        &mut self,
        field: &'static str,
        bytes: &[u8],
        len_max: usize,
    ) -> Result<(), EncodeError> {
        if bytes.len() > len_max {
            return Err(EncodeError::TooLong {
                field,
                len: bytes.len(),
                len_max,
            });
        }
        let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::TooLong {
            field,
            len: bytes.len(),
            len_max: usize::from(u16::MAX),
        })?;
        self.u16(len)?;
        self.put(bytes)
    }

    pub fn string16(
        &mut self,
        field: &'static str,
        text: &str,
        len_max: usize,
    ) -> Result<(), EncodeError> {
        self.bytes16(field, text.as_bytes(), len_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reports_truncation_with_offsets() {
        let mut reader = Reader::new(&[1, 2, 3]);
        assert_eq!(reader.u16().unwrap(), 0x0201);
        let err = reader.u32().unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                offset: 2,
                needed: 4,
                available: 1
            }
        );
    }

    #[test]
    fn reader_rejects_over_long_and_non_utf8_strings() {
        let mut reader = Reader::new(&[3, 0, b'a', b'b', b'c']);
        assert!(matches!(
            reader.bytes16("name", 2),
            Err(DecodeError::TooLong {
                len: 3,
                len_max: 2,
                ..
            })
        ));
        let mut reader = Reader::new(&[2, 0, 0xff, 0xfe]);
        assert!(matches!(
            reader.string16("name", 8),
            Err(DecodeError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn bool_must_be_zero_or_one() {
        assert!(!Reader::new(&[0]).bool("flag").unwrap());
        assert!(Reader::new(&[1]).bool("flag").unwrap());
        assert!(Reader::new(&[2]).bool("flag").is_err());
    }

    #[test]
    fn writer_never_overruns_its_buffer() {
        let mut buf = [0u8; 3];
        let mut writer = Writer::new(&mut buf);
        writer.u16(7).unwrap();
        assert_eq!(
            writer.u16(9),
            Err(EncodeError::BufferTooSmall {
                needed: 4,
                capacity: 3
            })
        );
        assert_eq!(writer.position(), 2);
    }

    #[test]
    fn finish_rejects_trailing_bytes() {
        let mut reader = Reader::new(&[1, 2]);
        reader.u8().unwrap();
        assert!(matches!(
            reader.finish(),
            Err(DecodeError::TrailingBytes {
                offset: 1,
                count: 1
            })
        ));
    }
}
