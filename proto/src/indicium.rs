//! The indicium, format version 1: a signed record of one postage payment, at most 157
//! bytes so that it fits a small Data Matrix symbol. See docs/INDICIUM.md.
//!
//! The signature covers exactly the payload bytes (everything before the signature).

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};
use crate::types::{Algorithm, MailingDate, Zip};

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

pub const INDICIUM_VERSION: u8 = 1;
/// Payload bytes without the optional data digest.
pub const PAYLOAD_BYTES_BASE: usize = 61;
pub const DATA_DIGEST_BYTES: usize = 32;
pub const PAYLOAD_BYTES_MAX: usize = PAYLOAD_BYTES_BASE + DATA_DIGEST_BYTES;
pub const SIGNATURE_BYTES: usize = 64;
/// The largest indicium: 157 bytes.
pub const INDICIUM_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + SIGNATURE_BYTES;
pub const INDICIUM_BYTES_MIN: usize = PAYLOAD_BYTES_BASE + SIGNATURE_BYTES;
// The whole indicium must fit a small Data Matrix symbol.
const _: () = assert!(INDICIUM_BYTES_MAX <= 160);

const FLAG_DESTINATION_ZIP: u8 = 0x01;
const FLAG_DATA_DIGEST: u8 = 0x02;
const FLAGS_KNOWN: u8 = FLAG_DESTINATION_ZIP | FLAG_DATA_DIGEST;

/// Everything an indicium states; the signature is over its encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct IndiciumPayload {
    pub algorithm: Algorithm,
    /// Serial of the vPSD key (and certificate) that signed this indicium.
    pub key_serial: u32,
    pub vpsd_id: u64,
    /// 1 for the first piece a vPSD ever signs, then contiguous.
    pub piece_number: u64,
    pub postage_mills: u64,
    /// Ascending register after this piece.
    pub ascending_mills: u64,
    /// Descending register after this piece.
    pub descending_mills: u64,
    pub mailing_date: MailingDate,
    pub origin_zip: Zip,
    pub destination_zip: Option<Zip>,
    pub rate_category: u16,
    pub software_id: u16,
    /// SHA-256 of caller-supplied data (recipient address, ticket holder) bound to the piece.
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::option_array"))]
    pub data_digest: Option<[u8; DATA_DIGEST_BYTES]>,
}

/// An encoded payload on the stack: the exact bytes that are signed.
#[derive(Debug, Clone, Copy)]
pub struct PayloadBytes {
    buf: [u8; PAYLOAD_BYTES_MAX],
    len: usize,
}

impl AsRef<[u8]> for PayloadBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl IndiciumPayload {
    /// Length of the encoded payload: 61, or 93 with a data digest.
    pub fn encoded_len(&self) -> usize {
        PAYLOAD_BYTES_BASE
            + if self.data_digest.is_some() {
                DATA_DIGEST_BYTES
            } else {
                0
            }
    }

    pub fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        let mut flags = 0;
        if self.destination_zip.is_some() {
            flags |= FLAG_DESTINATION_ZIP;
        }
        if self.data_digest.is_some() {
            flags |= FLAG_DATA_DIGEST;
        }
        writer.u8(INDICIUM_VERSION)?;
        writer.u8(self.algorithm.code())?;
        writer.u8(flags)?;
        writer.u32(self.key_serial)?;
        writer.u64(self.vpsd_id)?;
        writer.u64(self.piece_number)?;
        writer.u64(self.postage_mills)?;
        writer.u64(self.ascending_mills)?;
        writer.u64(self.descending_mills)?;
        writer.u16(self.mailing_date.days_since_2000())?;
        writer.u32(self.origin_zip.wire())?;
        writer.u32(self.destination_zip.map_or(0, Zip::wire))?;
        writer.u16(self.rate_category)?;
        writer.u16(self.software_id)?;
        if let Some(digest) = &self.data_digest {
            writer.put(digest)?;
        }
        Ok(())
    }

    /// The bytes to sign (and to verify against).
    pub fn signed_bytes(&self) -> PayloadBytes {
        let mut buf = [0u8; PAYLOAD_BYTES_MAX];
        let mut writer = Writer::new(&mut buf);
        let len = match self.encode(&mut writer) {
            Ok(()) => writer.position(),
            // PAYLOAD_BYTES_MAX is the encoding's largest size by construction.
            Err(err) => unreachable!("payload larger than PAYLOAD_BYTES_MAX: {err}"),
        };
        PayloadBytes { buf, len }
    }

    pub fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let offset = reader.position();
        let version = reader.u8()?;
        if version != INDICIUM_VERSION {
            return Err(DecodeError::InvalidValue {
                field: "indicium.version",
                offset,
                value: u64::from(version),
            });
        }
        let offset = reader.position();
        let code = reader.u8()?;
        let algorithm = Algorithm::from_code(code).ok_or(DecodeError::InvalidValue {
            field: "indicium.algorithm",
            offset,
            value: u64::from(code),
        })?;
        let offset = reader.position();
        let flags = reader.u8()?;
        if flags & !FLAGS_KNOWN != 0 {
            return Err(DecodeError::ReservedNotZero {
                field: "indicium.flags",
                offset,
            });
        }
        let key_serial = reader.u32()?;
        let vpsd_id = reader.u64()?;
        let piece_number = reader.u64()?;
        let postage_mills = reader.u64()?;
        let ascending_mills = reader.u64()?;
        let descending_mills = reader.u64()?;
        let mailing_date = MailingDate::from_days_since_2000(reader.u16()?);
        let origin_zip = zip(reader, "indicium.origin_zip")?;
        let offset = reader.position();
        let destination_raw = reader.u32()?;
        let destination_zip = if flags & FLAG_DESTINATION_ZIP != 0 {
            Some(
                Zip::from_wire(destination_raw).map_err(|_| DecodeError::InvalidValue {
                    field: "indicium.destination_zip",
                    offset,
                    value: u64::from(destination_raw),
                })?,
            )
        } else if destination_raw != 0 {
            return Err(DecodeError::ReservedNotZero {
                field: "indicium.destination_zip",
                offset,
            });
        } else {
            None
        };
        let rate_category = reader.u16()?;
        let software_id = reader.u16()?;
        let data_digest = if flags & FLAG_DATA_DIGEST != 0 {
            Some(reader.array()?)
        } else {
            None
        };
        Ok(Self {
            algorithm,
            key_serial,
            vpsd_id,
            piece_number,
            postage_mills,
            ascending_mills,
            descending_mills,
            mailing_date,
            origin_zip,
            destination_zip,
            rate_category,
            software_id,
            data_digest,
        })
    }
}

pub(crate) fn zip(reader: &mut Reader<'_>, field: &'static str) -> Result<Zip, DecodeError> {
    let offset = reader.position();
    let raw = reader.u32()?;
    Zip::from_wire(raw).map_err(|_| DecodeError::InvalidValue {
        field,
        offset,
        value: u64::from(raw),
    })
}

/// A payload and its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Indicium {
    pub payload: IndiciumPayload,
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
    pub signature: [u8; SIGNATURE_BYTES],
}

/// An encoded indicium on the stack.
#[derive(Debug, Clone, Copy)]
pub struct IndiciumBytes {
    buf: [u8; INDICIUM_BYTES_MAX],
    len: usize,
}

impl AsRef<[u8]> for IndiciumBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Indicium {
    pub fn encoded_len(&self) -> usize {
        self.payload.encoded_len() + SIGNATURE_BYTES
    }

    pub fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.payload.encode(writer)?;
        writer.put(&self.signature)
    }

    pub fn to_bytes(&self) -> IndiciumBytes {
        let mut buf = [0u8; INDICIUM_BYTES_MAX];
        let mut writer = Writer::new(&mut buf);
        let len = match self.encode(&mut writer) {
            Ok(()) => writer.position(),
            // INDICIUM_BYTES_MAX is the encoding's largest size by construction.
            Err(err) => unreachable!("indicium larger than INDICIUM_BYTES_MAX: {err}"),
        };
        IndiciumBytes { buf, len }
    }

    /// Decodes a whole indicium; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let payload = IndiciumPayload::decode(&mut reader)?;
        let signature = reader.array()?;
        reader.finish()?;
        Ok(Self { payload, signature })
    }

    /// Splits an encoded indicium into the signed bytes and the signature, after checking
    /// that it decodes.
    pub fn split_signed(bytes: &[u8]) -> Result<(&[u8], &[u8; SIGNATURE_BYTES]), DecodeError> {
        let indicium = Self::decode(bytes)?;
        let payload_len = indicium.payload.encoded_len();
        let (payload, signature) = bytes.split_at(payload_len);
        let signature = signature.try_into().map_err(|_| DecodeError::Truncated {
            offset: payload_len,
            needed: SIGNATURE_BYTES,
            available: signature.len(),
        })?;
        Ok((payload, signature))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(digest: bool, destination: bool) -> IndiciumPayload {
        IndiciumPayload {
            algorithm: Algorithm::EcdsaP256,
            key_serial: 7,
            vpsd_id: 0x0102_0304_0506_0708,
            piece_number: 42,
            postage_mills: 730,
            ascending_mills: 100_730,
            descending_mills: 899_270,
            mailing_date: "2026-11-30".parse().unwrap(),
            origin_zip: "02134".parse().unwrap(),
            destination_zip: destination.then(|| "20260-0001".parse().unwrap()),
            rate_category: 3,
            software_id: 0x0101,
            data_digest: digest.then_some([0xAB; 32]),
        }
    }

    #[test]
    fn sizes_fit_a_small_data_matrix() {
        let full = Indicium {
            payload: payload(true, true),
            signature: [9; 64],
        };
        assert_eq!(full.to_bytes().as_ref().len(), 157);
        let bare = Indicium {
            payload: payload(false, false),
            signature: [9; 64],
        };
        assert_eq!(bare.to_bytes().as_ref().len(), INDICIUM_BYTES_MIN);
    }

    #[test]
    fn round_trips_and_splits_at_the_payload() {
        for (digest, destination) in [(false, false), (true, false), (false, true), (true, true)] {
            let indicium = Indicium {
                payload: payload(digest, destination),
                signature: [5; 64],
            };
            let bytes = indicium.to_bytes();
            assert_eq!(Indicium::decode(bytes.as_ref()).unwrap(), indicium);
            let (signed, signature) = Indicium::split_signed(bytes.as_ref()).unwrap();
            assert_eq!(signed, indicium.payload.signed_bytes().as_ref());
            assert_eq!(signature, &[5; 64]);
        }
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        let bytes = Indicium {
            payload: payload(false, true),
            signature: [0; 64],
        }
        .to_bytes();
        let b = bytes.as_ref();
        assert_eq!(b[0], 1, "version");
        assert_eq!(b[1], 1, "algorithm");
        assert_eq!(b[2], 0x01, "flags");
        assert_eq!(&b[3..7], &7u32.to_le_bytes());
        assert_eq!(&b[7..15], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[15..23], &42u64.to_le_bytes());
        assert_eq!(&b[23..31], &730u64.to_le_bytes());
        assert_eq!(&b[31..39], &100_730u64.to_le_bytes());
        assert_eq!(&b[39..47], &899_270u64.to_le_bytes());
        assert_eq!(&b[47..49], &9_830u16.to_le_bytes());
        assert_eq!(&b[49..53], &21_340_000u32.to_le_bytes());
        assert_eq!(&b[53..57], &202_600_001u32.to_le_bytes());
        assert_eq!(&b[57..59], &3u16.to_le_bytes());
        assert_eq!(&b[59..61], &0x0101u16.to_le_bytes());
    }

    #[test]
    fn rejects_bad_versions_flags_and_lengths() {
        let good = Indicium {
            payload: payload(true, false),
            signature: [1; 64],
        }
        .to_bytes();
        let mut version = good.as_ref().to_vec();
        version[0] = 2;
        assert!(Indicium::decode(&version).is_err());
        let mut algorithm = good.as_ref().to_vec();
        algorithm[1] = 9;
        assert!(Indicium::decode(&algorithm).is_err());
        let mut flags = good.as_ref().to_vec();
        flags[2] |= 0x80;
        assert!(Indicium::decode(&flags).is_err());
        let mut stray_destination = good.as_ref().to_vec();
        stray_destination[53] = 1;
        assert!(Indicium::decode(&stray_destination).is_err());
        let mut longer = good.as_ref().to_vec();
        longer.push(0);
        assert!(matches!(
            Indicium::decode(&longer),
            Err(DecodeError::TrailingBytes { .. })
        ));
        let shorter = &good.as_ref()[..good.as_ref().len() - 1];
        assert!(matches!(
            Indicium::decode(shorter),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
