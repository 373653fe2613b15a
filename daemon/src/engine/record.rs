//! Records: everything that changes a vPSD, as a value. The engine prepares a record
//! without changing anything, the journal makes it durable, and [`Engine::apply`]
//! (live or at recovery) is the only place where state changes.
//!
//! [`Engine::apply`]: super::Engine::apply

use indicia_proto::{Algorithm, AuthorizationKind, ErrorCode, Indicium, Zip};

use super::keys::{PublicKey, SealedKey};
use super::registers::Registers;
use super::vpsd::{StoredState, Vpsd};

/// Who sent a request: the first 8 bytes of SHA-256 of the client id. With the request id
/// it keys the idempotency window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientTag(pub u64);

impl ClientTag {
    pub fn of(client_id: &str) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, client_id.as_bytes());
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&digest.as_ref()[..8]);
        Self(u64::from_le_bytes(tag))
    }
}

/// A digest of a request's content (XXH3-128 for sign jobs, truncated SHA-256 for provider
/// authorizations): a retry must match it.
pub type Fingerprint = [u8; 16];

/// What happened to one requested indicium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    Signed(Indicium),
    /// Refused; nothing was charged for it.
    Failed(ErrorCode),
}

/// One client request (a sign or a batch) within a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub client: ClientTag,
    pub request_id: u64,
    pub fingerprint: Fingerprint,
    pub outcomes: Vec<ItemOutcome>,
}

impl JobRecord {
    pub fn signed(&self) -> impl Iterator<Item = &Indicium> {
        self.outcomes.iter().filter_map(|outcome| match outcome {
            ItemOutcome::Signed(indicium) => Some(indicium),
            ItemOutcome::Failed(_) => None,
        })
    }
}

/// One signing session: the register change and every indicium it produced, in piece order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub vpsd_id: u64,
    /// The vPSD version this record produces (the previous one plus one).
    pub version: u64,
    pub key_serial: u32,
    pub before: Registers,
    pub after: Registers,
    pub jobs: Vec<JobRecord>,
}

impl SessionRecord {
    pub fn indicia(&self) -> impl Iterator<Item = &Indicium> {
        self.jobs.iter().flat_map(JobRecord::signed)
    }
}

/// A durable change of one vPSD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Provision {
        vpsd_id: u64,
        owner: String,
        algorithm: Algorithm,
        origin_zip: Zip,
        public_key: PublicKey,
        sealed_key: SealedKey,
        at_unix: u64,
    },
    /// A refill (credits funds) or a contact acknowledgment (amount 0), both authorized by
    /// the provider, both counting as provider contact.
    Provider {
        vpsd_id: u64,
        version: u64,
        kind: AuthorizationKind,
        amount_mills: u64,
        sequence: u64,
        at_unix: u64,
        client: ClientTag,
        request_id: u64,
        fingerprint: Fingerprint,
    },
    StateChange {
        vpsd_id: u64,
        version: u64,
        state: StoredState,
        at_unix: u64,
    },
    Withdraw {
        vpsd_id: u64,
        version: u64,
        refund_mills: u64,
        at_unix: u64,
    },
    RotateKey {
        vpsd_id: u64,
        version: u64,
        key_serial: u32,
        public_key: PublicKey,
        sealed_key: SealedKey,
        at_unix: u64,
    },
    Session(SessionRecord),
    /// The vPSD's state set from the cluster's replicated copy (cluster mode): the state
    /// etcd holds replaces the local one, whatever its version.
    Reset {
        vpsd: Box<Vpsd>,
        cause: ResetCause,
        at_unix: u64,
        /// The vPSD's most recent requests as the cluster holds them: their answers enter
        /// the idempotency window (a retry after a takeover gets the original answer).
        recent: Vec<RecentRequest>,
    },
    /// The vPSD left this appliance (cluster mode): another one owns it now, or it was
    /// never replicated. Its local state is dropped.
    Release {
        vpsd_id: u64,
        /// Who owns it now, as far as this appliance knows (empty: nobody).
        owner: String,
        /// The local version at release: records up to it stay history; those the
        /// cluster never had are void.
        version: u64,
        /// The version the cluster holds (0: none): local records after it are void.
        replicated_version: u64,
        at_unix: u64,
    },
}

/// A request the cluster remembers with a vPSD's state, so that whichever appliance owns
/// the vPSD next answers its retry as the original was answered, and charges it once.
/// A sign is remembered without its indicia: the retry carries the same items (its
/// fingerprint says so), so the same payloads follow from the registers before it, and
/// they are signed again (docs/PROTOCOL.md section 5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentRequest {
    pub client: ClientTag,
    pub request_id: u64,
    pub fingerprint: Fingerprint,
    /// The vPSD version of the record that carried it.
    pub version: u64,
    pub answer: RecentAnswer,
}

/// What a remembered request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecentAnswer {
    /// A sign or batch: the key that signed, the registers before its first item, and
    /// each item's outcome (None: signed).
    Signed {
        key_serial: u32,
        before: Registers,
        outcomes: Vec<Option<ErrorCode>>,
    },
    /// An applied provider authorization.
    Provider,
}

impl RecentRequest {
    /// The requests a record answered, as the cluster remembers them.
    pub fn of_record(record: &Record) -> Vec<Self> {
        match record {
            Record::Session(session) => {
                let mut registers = session.before;
                session
                    .jobs
                    .iter()
                    .map(|job| {
                        let before = registers;
                        let outcomes = job
                            .outcomes
                            .iter()
                            .map(|outcome| match outcome {
                                ItemOutcome::Signed(indicium) => {
                                    registers.ascending_mills = indicium.payload.ascending_mills;
                                    registers.descending_mills = indicium.payload.descending_mills;
                                    registers.piece_count = indicium.payload.piece_number;
                                    None
                                }
                                ItemOutcome::Failed(code) => Some(*code),
                            })
                            .collect();
                        Self {
                            client: job.client,
                            request_id: job.request_id,
                            fingerprint: job.fingerprint,
                            version: session.version,
                            answer: RecentAnswer::Signed {
                                key_serial: session.key_serial,
                                before,
                                outcomes,
                            },
                        }
                    })
                    .collect()
            }
            Record::Provider {
                client,
                request_id,
                fingerprint,
                version,
                ..
            } => vec![Self {
                client: *client,
                request_id: *request_id,
                fingerprint: *fingerprint,
                version: *version,
                answer: RecentAnswer::Provider,
            }],
            _ => Vec::new(),
        }
    }
}

/// Why a vPSD's state was set from the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetCause {
    /// Taken over from another appliance, whose lease expired (or by hand).
    Adopted { from: String, epoch: i64 },
    /// The local records after `replicated_version` never reached the cluster: they were
    /// never acknowledged, and are void; the state is the cluster's again.
    Voided { local_version: u64 },
    /// The cluster is ahead of the local journal (a torn tail, a replaced disk, a restored
    /// backup): the local history misses the versions after `local_version`.
    Behind { local_version: u64 },
}

impl ResetCause {
    pub fn code(&self) -> u8 {
        match self {
            Self::Adopted { .. } => 1,
            Self::Voided { .. } => 2,
            Self::Behind { .. } => 3,
        }
    }
}

impl Record {
    pub fn vpsd_id(&self) -> u64 {
        match self {
            Self::Provision { vpsd_id, .. }
            | Self::Provider { vpsd_id, .. }
            | Self::StateChange { vpsd_id, .. }
            | Self::Withdraw { vpsd_id, .. }
            | Self::RotateKey { vpsd_id, .. }
            | Self::Release { vpsd_id, .. } => *vpsd_id,
            Self::Session(session) => session.vpsd_id,
            Self::Reset { vpsd, .. } => vpsd.id,
        }
    }

    /// The vPSD version after this record.
    pub fn version(&self) -> u64 {
        match self {
            Self::Provision { .. } => 1,
            Self::Provider { version, .. }
            | Self::StateChange { version, .. }
            | Self::Withdraw { version, .. }
            | Self::RotateKey { version, .. }
            | Self::Release { version, .. } => *version,
            Self::Session(session) => session.version,
            Self::Reset { vpsd, .. } => vpsd.version,
        }
    }
}
