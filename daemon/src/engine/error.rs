//! The engine's typed errors: what a request gets when it is refused ([`EngineError`]),
//! and why a record does not fit the state it is applied to ([`ApplyError`]).

use indicia_proto::{ErrorCode, LockReason, MailingDate};
use thiserror::Error;

use super::keys::KeyError;

/// Why a request was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("no vPSD {vpsd_id}")]
    UnknownVpsd { vpsd_id: u64 },
    #[error("vPSD {vpsd_id} already exists")]
    VpsdExists { vpsd_id: u64 },
    #[error("vPSD {vpsd_id} is locked: {}", describe_lock(.reason))]
    Locked { vpsd_id: u64, reason: LockReason },
    #[error("vPSD {vpsd_id} is withdrawn")]
    Withdrawn { vpsd_id: u64 },
    #[error("vPSD {vpsd_id} has no key with serial {key_serial}")]
    UnknownKey { vpsd_id: u64, key_serial: u32 },
    #[error("postage of {postage_mills} mills is outside 1..={postage_mills_max}")]
    PostageOutOfRange {
        postage_mills: u64,
        postage_mills_max: u64,
    },
    #[error("mailing date {date} is outside {earliest}..={latest}")]
    MailingDateOutOfWindow {
        date: MailingDate,
        earliest: MailingDate,
        latest: MailingDate,
    },
    #[error("insufficient funds: postage {postage_mills} mills, {descending_mills} mills left")]
    InsufficientFunds {
        postage_mills: u64,
        descending_mills: u64,
    },
    #[error("register overflow")]
    RegisterOverflow,
    #[error("request id {request_id} was already used for a different request")]
    RequestIdReused { request_id: u64 },
    #[error("provider authorization signature is invalid")]
    AuthorizationInvalid,
    #[error(
        "provider authorization sequence {sequence} is not above the last accepted {last_sequence}"
    )]
    AuthorizationReplayed { sequence: u64, last_sequence: u64 },
    #[error("provider authorization expired at {expires_unix} (now {now_unix})")]
    AuthorizationExpired { expires_unix: u64, now_unix: u64 },
    #[error("provider authorization is for vPSD {authorized}, not {requested}")]
    AuthorizationWrongVpsd { authorized: u64, requested: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("this shard already holds its maximum of {vpsds_max} vPSDs")]
    Capacity { vpsds_max: usize },
    #[error("integrity fault: {0}")]
    Integrity(String),
    #[error("vPSD {vpsd_id} has {keys_max} keys, the most a vPSD may have (engine.keys_per_vpsd_max): withdraw it and provision a new one")]
    KeyLimit { vpsd_id: u64, keys_max: usize },
    /// The clock is outside what a mailing date can express (before 2000 or after 2179).
    #[error("the appliance's clock ({now_unix} s since 1970) is outside the mailing-date range")]
    Clock { now_unix: u64 },
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

fn describe_lock(reason: &LockReason) -> String {
    match reason {
        LockReason::Operator(text) => format!("by operator ({text})"),
        LockReason::ContactOverdue => "provider contact overdue".to_owned(),
        LockReason::Integrity(text) => format!("integrity ({text})"),
    }
}

impl From<KeyError> for EngineError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::Unseal { .. } | KeyError::Mismatch { .. } => Self::Integrity(err.to_string()),
            KeyError::Crypto(what) => Self::Crypto(what),
        }
    }
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownVpsd { .. } => ErrorCode::UnknownVpsd,
            Self::VpsdExists { .. } => ErrorCode::VpsdExists,
            Self::Locked { .. } => ErrorCode::VpsdLocked,
            Self::Withdrawn { .. } => ErrorCode::VpsdWithdrawn,
            Self::UnknownKey { .. } => ErrorCode::UnknownKey,
            Self::PostageOutOfRange { .. } => ErrorCode::PostageOutOfRange,
            Self::MailingDateOutOfWindow { .. } => ErrorCode::MailingDateOutOfWindow,
            Self::InsufficientFunds { .. } => ErrorCode::InsufficientFunds,
            Self::RegisterOverflow => ErrorCode::RegisterOverflow,
            Self::RequestIdReused { .. } => ErrorCode::RequestIdReused,
            Self::AuthorizationInvalid => ErrorCode::AuthorizationInvalid,
            Self::AuthorizationReplayed { .. } => ErrorCode::AuthorizationReplayed,
            Self::AuthorizationExpired { .. } => ErrorCode::AuthorizationExpired,
            Self::AuthorizationWrongVpsd { .. } => ErrorCode::AuthorizationWrongVpsd,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::Capacity { .. } => ErrorCode::Busy,
            Self::Integrity(_) => ErrorCode::IntegrityFault,
            Self::KeyLimit { .. } => ErrorCode::InvalidArgument,
            Self::Clock { .. } | Self::Crypto(_) => ErrorCode::Internal,
        }
    }

    /// The wire form: code plus this error's message.
    pub fn to_body(&self) -> indicia_proto::ErrorBody {
        indicia_proto::ErrorBody::new(self.code(), self.to_string())
    }
}

/// Why a record cannot be applied to the current state: at recovery, a history that does
/// not reconcile; live, a bug (the engine prepared the record against this very state).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("record for unknown vPSD {vpsd_id}")]
    UnknownVpsd { vpsd_id: u64 },
    #[error("provision of vPSD {vpsd_id}, which already exists")]
    AlreadyProvisioned { vpsd_id: u64 },
    #[error("vPSD {vpsd_id}: record version {found} does not follow {current}")]
    Version {
        vpsd_id: u64,
        current: u64,
        found: u64,
    },
    #[error("vPSD {vpsd_id}: {what}")]
    Mismatch { vpsd_id: u64, what: &'static str },
    #[error("vPSD {vpsd_id}: {mismatch}")]
    Session {
        vpsd_id: u64,
        mismatch: super::session::SessionMismatch,
    },
}
