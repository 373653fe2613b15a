//! The typed error codes carried by an error response and by failed batch items.
//! docs/PROTOCOL.md lists them with their meaning; the two must agree.

use std::fmt;

/// Why a request (or one item of a batch) failed. Codes are grouped by their high byte:
/// 0x01 protocol, 0x02 authentication, 0x03 vPSD, 0x04 signing, 0x05 provider
/// authorization, 0x06 appliance. A code this build does not know decodes as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    Malformed,
    UnknownOpcode,
    UnsupportedVersion,
    FrameTooLarge,
    BatchTooLarge,
    NotAuthenticated,
    AuthenticationFailed,
    Forbidden,
    HandshakeOutOfOrder,
    UnknownVpsd,
    VpsdExists,
    VpsdLocked,
    VpsdWithdrawn,
    UnknownKey,
    IntegrityFault,
    /// Another appliance of the cluster owns the vPSD now; nothing was applied here.
    VpsdMoved,
    InsufficientFunds,
    PostageOutOfRange,
    MailingDateOutOfWindow,
    RequestIdReused,
    RegisterOverflow,
    InvalidArgument,
    AuthorizationInvalid,
    AuthorizationReplayed,
    AuthorizationExpired,
    AuthorizationWrongVpsd,
    Busy,
    ShuttingDown,
    Internal,
    /// The appliance cannot commit to the cluster now; nothing was applied.
    ClusterUnavailable,
    /// The request was forwarded to the vPSD's owner, whose answer did not come back in
    /// time: it may have been carried out there; retry with the same request id.
    ForwardFailed,
    /// The appliance lost etcd while the request's change was on its way there: it may
    /// have been carried out; retry with the same request id.
    OutcomeUnknown,
    /// A code from a newer peer.
    Unknown(u16),
}

/// Every known code with its wire value and name, in wire order.
const TABLE: &[(ErrorCode, u16, &str)] = &[
    (ErrorCode::Malformed, 0x0101, "malformed"),
    (ErrorCode::UnknownOpcode, 0x0102, "unknown-opcode"),
    (ErrorCode::UnsupportedVersion, 0x0103, "unsupported-version"),
    (ErrorCode::FrameTooLarge, 0x0104, "frame-too-large"),
    (ErrorCode::BatchTooLarge, 0x0105, "batch-too-large"),
    (ErrorCode::NotAuthenticated, 0x0201, "not-authenticated"),
    (
        ErrorCode::AuthenticationFailed,
        0x0202,
        "authentication-failed",
    ),
    (ErrorCode::Forbidden, 0x0203, "forbidden"),
    (
        ErrorCode::HandshakeOutOfOrder,
        0x0204,
        "handshake-out-of-order",
    ),
    (ErrorCode::UnknownVpsd, 0x0301, "unknown-vpsd"),
    (ErrorCode::VpsdExists, 0x0302, "vpsd-exists"),
    (ErrorCode::VpsdLocked, 0x0303, "vpsd-locked"),
    (ErrorCode::VpsdWithdrawn, 0x0304, "vpsd-withdrawn"),
    (ErrorCode::UnknownKey, 0x0305, "unknown-key"),
    (ErrorCode::IntegrityFault, 0x0306, "integrity-fault"),
    (ErrorCode::VpsdMoved, 0x0307, "vpsd-moved"),
    (ErrorCode::InsufficientFunds, 0x0401, "insufficient-funds"),
    (ErrorCode::PostageOutOfRange, 0x0402, "postage-out-of-range"),
    (
        ErrorCode::MailingDateOutOfWindow,
        0x0403,
        "mailing-date-out-of-window",
    ),
    (ErrorCode::RequestIdReused, 0x0404, "request-id-reused"),
    (ErrorCode::RegisterOverflow, 0x0405, "register-overflow"),
    (ErrorCode::InvalidArgument, 0x0406, "invalid-argument"),
    (
        ErrorCode::AuthorizationInvalid,
        0x0501,
        "authorization-invalid",
    ),
    (
        ErrorCode::AuthorizationReplayed,
        0x0502,
        "authorization-replayed",
    ),
    (
        ErrorCode::AuthorizationExpired,
        0x0503,
        "authorization-expired",
    ),
    (
        ErrorCode::AuthorizationWrongVpsd,
        0x0504,
        "authorization-wrong-vpsd",
    ),
    (ErrorCode::Busy, 0x0601, "busy"),
    (ErrorCode::ShuttingDown, 0x0602, "shutting-down"),
    (ErrorCode::Internal, 0x0603, "internal"),
    (ErrorCode::ClusterUnavailable, 0x0604, "cluster-unavailable"),
    (ErrorCode::ForwardFailed, 0x0605, "forward-failed"),
    (ErrorCode::OutcomeUnknown, 0x0606, "outcome-unknown"),
];

impl ErrorCode {
    /// Every known code, for documentation checks and tests.
    pub fn all() -> impl Iterator<Item = Self> {
        TABLE.iter().map(|(code, _, _)| *code)
    }

    pub fn wire(self) -> u16 {
        match self {
            Self::Unknown(value) => value,
            known => TABLE
                .iter()
                .find(|(code, _, _)| *code == known)
                .map_or(0, |(_, value, _)| *value),
        }
    }

    pub fn from_wire(value: u16) -> Self {
        TABLE
            .iter()
            .find(|(_, wire, _)| *wire == value)
            .map_or(Self::Unknown(value), |(code, _, _)| *code)
    }

    /// The stable kebab-case name used in JSON output and the docs.
    pub fn name(self) -> String {
        match TABLE.iter().find(|(code, _, _)| *code == self) {
            Some((_, _, name)) => (*name).to_owned(),
            None => format!("code-{:#06x}", self.wire()),
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        if let Some((code, _, _)) = TABLE.iter().find(|(_, _, known)| *known == name) {
            return Some(*code);
        }
        let hex = name.strip_prefix("code-0x")?;
        u16::from_str_radix(hex, 16).ok().map(Self::from_wire)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(deserializer)?;
        Self::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::all() {
            assert!(seen.insert(code.wire()), "duplicate wire value for {code}");
            assert_eq!(ErrorCode::from_wire(code.wire()), code);
            assert_eq!(ErrorCode::from_name(&code.name()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire(0x7777), ErrorCode::Unknown(0x7777));
        assert_eq!(ErrorCode::Unknown(0x7777).name(), "code-0x7777");
        assert_eq!(
            ErrorCode::from_name("code-0x7777"),
            Some(ErrorCode::Unknown(0x7777))
        );
    }
}
