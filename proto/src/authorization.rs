//! Provider authorizations: a refill (postage value download) or a contact acknowledgment,
//! signed by the provider's Ed25519 key. The appliance verifies the signature; this module
//! only fixes the bytes. See docs/PROTOCOL.md, "Provider authorization".

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// Domain-separation prefix of the signed bytes, so an authorization signature can never be
/// mistaken for a signature over anything else.
pub const AUTHORIZATION_CONTEXT: &[u8; 16] = b"INDICIA-AUTH-V1\0";
/// Encoded fields without the signature.
pub const AUTHORIZATION_FIELDS_BYTES: usize = 33;
pub const AUTHORIZATION_SIGNED_BYTES: usize =
    AUTHORIZATION_CONTEXT.len() + AUTHORIZATION_FIELDS_BYTES;
pub const AUTHORIZATION_BYTES: usize = AUTHORIZATION_FIELDS_BYTES + 64;

/// What an authorization allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum AuthorizationKind {
    /// Credit `amount_mills` to the descending register and the control total.
    Refill,
    /// Record provider contact (an audit upload was received); `amount_mills` must be 0.
    Contact,
}

impl AuthorizationKind {
    pub const fn code(self) -> u8 {
        match self {
            Self::Refill => 1,
            Self::Contact => 2,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Refill),
            2 => Some(Self::Contact),
            _ => None,
        }
    }
}

/// A provider's signed instruction for one vPSD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ProviderAuthorization {
    pub kind: AuthorizationKind,
    pub vpsd_id: u64,
    pub amount_mills: u64,
    /// Strictly increasing per vPSD: a sequence at or below the last accepted one is a replay.
    pub sequence: u64,
    /// Unix seconds (UTC) after which the authorization is refused.
    pub expires_unix: u64,
    /// Ed25519 signature over [`ProviderAuthorization::signed_bytes`].
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
    pub signature: [u8; 64],
}

impl ProviderAuthorization {
    fn encode_fields(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        writer.u8(self.kind.code())?;
        writer.u64(self.vpsd_id)?;
        writer.u64(self.amount_mills)?;
        writer.u64(self.sequence)?;
        writer.u64(self.expires_unix)
    }

    /// The bytes the provider signs: the context prefix, then the 33 field bytes.
    pub fn signed_bytes(&self) -> [u8; AUTHORIZATION_SIGNED_BYTES] {
        let mut out = [0u8; AUTHORIZATION_SIGNED_BYTES];
        out[..AUTHORIZATION_CONTEXT.len()].copy_from_slice(AUTHORIZATION_CONTEXT);
        let mut writer = Writer::new(&mut out[AUTHORIZATION_CONTEXT.len()..]);
        if let Err(err) = self.encode_fields(&mut writer) {
            // The buffer is sized for the fields by construction.
            unreachable!("authorization fields larger than their constant size: {err}");
        }
        out
    }

    pub fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.encode_fields(writer)?;
        writer.put(&self.signature)
    }

    pub fn to_bytes(&self) -> [u8; AUTHORIZATION_BYTES] {
        let mut out = [0u8; AUTHORIZATION_BYTES];
        let mut writer = Writer::new(&mut out);
        if let Err(err) = self.encode(&mut writer) {
            // The buffer is sized for an authorization by construction.
            unreachable!("authorization larger than its constant size: {err}");
        }
        out
    }

    pub fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let offset = reader.position();
        let code = reader.u8()?;
        let kind = AuthorizationKind::from_code(code).ok_or(DecodeError::InvalidValue {
            field: "authorization.kind",
            offset,
            value: u64::from(code),
        })?;
        let vpsd_id = reader.u64()?;
        let offset = reader.position();
        let amount_mills = reader.u64()?;
        if kind == AuthorizationKind::Contact && amount_mills != 0 {
            return Err(DecodeError::InvalidValue {
                field: "authorization.amount_mills",
                offset,
                value: amount_mills,
            });
        }
        Ok(Self {
            kind,
            vpsd_id,
            amount_mills,
            sequence: reader.u64()?,
            expires_unix: reader.u64()?,
            signature: reader.array()?,
        })
    }

    /// Decodes a stand-alone authorization (as written to a file); trailing bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let out = Self::decode(&mut reader)?;
        reader.finish()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_bytes_are_context_then_fields() {
        let auth = ProviderAuthorization {
            kind: AuthorizationKind::Refill,
            vpsd_id: 5,
            amount_mills: 100_000,
            sequence: 1,
            expires_unix: 1_800_000_000,
            signature: [3; 64],
        };
        let signed = auth.signed_bytes();
        assert_eq!(&signed[..16], AUTHORIZATION_CONTEXT);
        assert_eq!(
            &signed[16..],
            &auth.to_bytes()[..AUTHORIZATION_FIELDS_BYTES]
        );
        assert_eq!(
            ProviderAuthorization::from_bytes(&auth.to_bytes()).unwrap(),
            auth
        );
    }

    #[test]
    fn contact_with_an_amount_is_malformed() {
        let auth = ProviderAuthorization {
            kind: AuthorizationKind::Contact,
            vpsd_id: 5,
            amount_mills: 1,
            sequence: 1,
            expires_unix: 0,
            signature: [0; 64],
        };
        assert!(ProviderAuthorization::from_bytes(&auth.to_bytes()).is_err());
    }
}
