//! Request and response messages: the bodies of frames. Each message type has one opcode;
//! requests use 0x01..=0x7F, responses 0x80..=0xFF, and every response frame also carries
//! [`FLAG_RESPONSE`](crate::frame::FLAG_RESPONSE). See docs/PROTOCOL.md for every body.

use crate::authorization::{AuthorizationKind, ProviderAuthorization};
use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};
use crate::error_code::ErrorCode;
use crate::frame::{encode_frame, FLAG_RESPONSE};
use crate::indicium::{zip, Indicium, DATA_DIGEST_BYTES, INDICIUM_BYTES_MAX};
use crate::types::{Algorithm, MailingDate, Zip};

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// Length of the handshake nonces and HMAC-SHA256 proofs.
pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// Longest client id (UTF-8 bytes).
pub const CLIENT_ID_BYTES_MAX: usize = 64;
/// Longest owner account name of a vPSD.
pub const OWNER_BYTES_MAX: usize = 64;
/// Longest lock reason.
pub const REASON_BYTES_MAX: usize = 256;
/// Longest error message.
pub const MESSAGE_BYTES_MAX: usize = 256;
/// Most items in one batch request.
pub const BATCH_ITEMS_MAX: usize = 256;
/// Longest SubjectPublicKeyInfo (DER) in a public-key response.
pub const SPKI_BYTES_MAX: usize = 128;
/// Most entries in a stats response, and the longest entry name.
pub const STATS_ENTRIES_MAX: usize = 1024;
pub const STAT_NAME_BYTES_MAX: usize = 64;
/// Longest appliance id of a cluster.
pub const APPLIANCE_ID_BYTES_MAX: usize = 64;
/// Longest appliance address in a cluster report.
pub const APPLIANCE_ADDRESS_BYTES_MAX: usize = 128;
/// Most appliances one cluster report lists.
pub const CLUSTER_APPLIANCES_MAX: usize = 1024;
/// Most vPSDs one cluster-placement request asks about (and its answer lists).
pub const PLACEMENT_VPSDS_MAX: usize = 1024;
/// The longest directory path a `backup` request names.
pub const BACKUP_PATH_BYTES_MAX: usize = 4096;
/// Most shards an appliance reports in `topology`.
pub const SHARDS_MAX: usize = 1024;
/// `topology.hash`: the shard of a vPSD is xxh3-64 of its id (8 bytes, little-endian)
/// modulo the shard count ([`crate::shard_of`]).
pub const SHARD_HASH_XXH3: u8 = 1;
/// The client id prefix of an appliance forwarding requests to another (role appliance).
pub const APPLIANCE_CLIENT_PREFIX: &str = "appliance:";
/// Domain-separation labels of the handshake proofs (see docs/PROTOCOL.md, "Handshake").
pub const CLIENT_PROOF_LABEL: &[u8] = b"indicia client proof v1";
pub const SERVER_PROOF_LABEL: &[u8] = b"indicia server proof v1";

/// Opcodes. A request's response comes back with the response opcode named beside it, or
/// [`opcode::ERROR`].
pub mod opcode {
    pub const HELLO: u8 = 0x01;
    pub const AUTHENTICATE: u8 = 0x02;
    pub const SIGN: u8 = 0x10;
    pub const SIGN_BATCH: u8 = 0x11;
    pub const STATUS: u8 = 0x12;
    pub const PUBLIC_KEY: u8 = 0x13;
    pub const VERIFY: u8 = 0x14;
    pub const PROVISION: u8 = 0x20;
    pub const REFILL: u8 = 0x21;
    pub const CONTACT: u8 = 0x22;
    pub const LOCK: u8 = 0x23;
    pub const UNLOCK: u8 = 0x24;
    pub const WITHDRAW: u8 = 0x25;
    pub const ROTATE_KEY: u8 = 0x26;
    pub const STATS: u8 = 0x30;
    pub const CLUSTER_STATUS: u8 = 0x31;
    pub const CLUSTER_TAKEOVER: u8 = 0x32;
    pub const FORWARDED: u8 = 0x33;
    pub const CLUSTER_PLACEMENT: u8 = 0x34;
    pub const CLUSTER_MOVE: u8 = 0x35;
    pub const CLUSTER_DRAIN: u8 = 0x36;
    pub const CLUSTER_PIN: u8 = 0x37;
    pub const CLUSTER_ADOPT: u8 = 0x38;
    pub const TOPOLOGY: u8 = 0x39;
    pub const BACKUP: u8 = 0x3A;

    pub const CHALLENGE: u8 = 0x81;
    pub const WELCOME: u8 = 0x82;
    pub const SIGNED: u8 = 0x90;
    pub const BATCH_SIGNED: u8 = 0x91;
    pub const VPSD_STATUS: u8 = 0x92;
    pub const PUBLIC_KEY_INFO: u8 = 0x93;
    pub const VERIFIED: u8 = 0x94;
    pub const WITHDRAWN: u8 = 0xA5;
    pub const STATS_REPORT: u8 = 0xB0;
    pub const CLUSTER_REPORT: u8 = 0xB1;
    pub const PLACEMENT: u8 = 0xB2;
    pub const TOPOLOGY_REPORT: u8 = 0xB3;
    pub const BACKUP_REPORT: u8 = 0xB4;
    pub const ERROR: u8 = 0xFF;
}

/// The role a client is granted at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Role {
    /// May sign and read status and public keys of the vPSDs listed for it.
    User,
    /// May also provision, lock, unlock, withdraw, rotate keys and read stats.
    Admin,
    /// Another appliance of the cluster: may only forward its clients' requests
    /// (`forwarded`) and hand over vPSDs (`cluster-adopt`).
    Appliance,
}

impl Role {
    pub const fn code(self) -> u8 {
        match self {
            Self::User => 1,
            Self::Admin => 2,
            Self::Appliance => 3,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::User),
            2 => Some(Self::Admin),
            3 => Some(Self::Appliance),
            _ => None,
        }
    }
}

/// Lifecycle state of a vPSD as reported by status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "kebab-case", tag = "state", content = "reason")
)]
pub enum VpsdState {
    Active,
    /// Refuses to sign until unlocked (operator), contacted (watchdog) or repaired (integrity).
    Locked(LockReason),
    /// Retired for good after its descending register was refunded.
    Withdrawn,
}

/// Why a vPSD is locked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "kebab-case", tag = "kind", content = "text")
)]
pub enum LockReason {
    /// Locked by an operator, with their stated reason.
    Operator(String),
    /// No provider contact for longer than the configured number of days.
    ContactOverdue,
    /// Its history does not reconcile; the text says what was found.
    Integrity(String),
}

/// Fields of one indicium to sign; the appliance fills in everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct SignItem {
    pub postage_mills: u64,
    pub mailing_date: MailingDate,
    pub rate_category: u16,
    pub destination_zip: Option<Zip>,
    #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::option_array"))]
    pub data_digest: Option<[u8; DATA_DIGEST_BYTES]>,
}

const ITEM_FLAG_DESTINATION_ZIP: u8 = 0x01;
const ITEM_FLAG_DATA_DIGEST: u8 = 0x02;

impl SignItem {
    fn encode(&self, writer: &mut Writer<'_>) -> Result<(), EncodeError> {
        let mut flags = 0;
        if self.destination_zip.is_some() {
            flags |= ITEM_FLAG_DESTINATION_ZIP;
        }
        if self.data_digest.is_some() {
            flags |= ITEM_FLAG_DATA_DIGEST;
        }
        writer.u64(self.postage_mills)?;
        writer.u16(self.mailing_date.days_since_2000())?;
        writer.u16(self.rate_category)?;
        writer.u8(flags)?;
        if let Some(destination) = self.destination_zip {
            writer.u32(destination.wire())?;
        }
        if let Some(digest) = &self.data_digest {
            writer.put(digest)?;
        }
        Ok(())
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let postage_mills = reader.u64()?;
        let mailing_date = MailingDate::from_days_since_2000(reader.u16()?);
        let rate_category = reader.u16()?;
        let offset = reader.position();
        let flags = reader.u8()?;
        if flags & !(ITEM_FLAG_DESTINATION_ZIP | ITEM_FLAG_DATA_DIGEST) != 0 {
            return Err(DecodeError::ReservedNotZero {
                field: "sign.flags",
                offset,
            });
        }
        let destination_zip = if flags & ITEM_FLAG_DESTINATION_ZIP != 0 {
            Some(zip(reader, "sign.destination_zip")?)
        } else {
            None
        };
        let data_digest = if flags & ITEM_FLAG_DATA_DIGEST != 0 {
            Some(reader.array()?)
        } else {
            None
        };
        Ok(Self {
            postage_mills,
            mailing_date,
            rate_category,
            destination_zip,
            data_digest,
        })
    }
}

/// Everything a client can ask. The frame's request id is the correlation id and, for
/// sign, batch sign and refill, the idempotency key (per client).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case", tag = "type"))]
#[non_exhaustive]
pub enum Request {
    /// First handshake message: the versions the client speaks and who it claims to be.
    Hello {
        version_min: u8,
        version_max: u8,
        client_id: String,
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
        client_nonce: [u8; NONCE_BYTES],
    },
    /// Second handshake message: HMAC-SHA256 proof of the client's secret.
    Authenticate {
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
        proof: [u8; PROOF_BYTES],
    },
    Sign {
        vpsd_id: u64,
        item: SignItem,
    },
    /// Up to [`BATCH_ITEMS_MAX`] indicia for one vPSD, answered with one result per item.
    SignBatch {
        vpsd_id: u64,
        items: Vec<SignItem>,
    },
    Status {
        vpsd_id: u64,
    },
    /// Public key of the given serial, or of the current key when `key_serial` is None.
    PublicKey {
        vpsd_id: u64,
        key_serial: Option<u32>,
    },
    Verify {
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::vec"))]
        indicium: Vec<u8>,
    },
    Provision {
        vpsd_id: u64,
        owner: String,
        algorithm: Algorithm,
        origin_zip: Zip,
    },
    /// Credit funds with a provider authorization of kind refill for this vPSD.
    Refill {
        vpsd_id: u64,
        authorization: ProviderAuthorization,
    },
    /// Record provider contact with an authorization of kind contact.
    Contact {
        vpsd_id: u64,
        authorization: ProviderAuthorization,
    },
    Lock {
        vpsd_id: u64,
        reason: String,
    },
    Unlock {
        vpsd_id: u64,
    },
    Withdraw {
        vpsd_id: u64,
    },
    RotateKey {
        vpsd_id: u64,
    },
    Stats,
    /// The cluster's appliances (cluster mode; admin).
    ClusterStatus,
    /// Takes over every vPSD the named appliance owns, now (cluster mode; admin).
    ClusterTakeover {
        from: String,
    },
    /// A client's request carried by the appliance it reached to the vPSD's owner (cluster
    /// mode; role appliance only): the owner handles `request` as `client_id`'s, with
    /// `request_id` as its idempotency key, and never forwards it again.
    Forwarded {
        client_id: String,
        request_id: u64,
        request: Box<Request>,
    },
    /// Which appliance owns each of these vPSDs, and where every live appliance is reached
    /// (cluster mode).
    ClusterPlacement {
        vpsd_ids: Vec<u64>,
    },
    /// Moves a vPSD to another appliance, under load (cluster mode; admin).
    ClusterMove {
        vpsd_id: u64,
        to: String,
    },
    /// Marks an appliance draining (its vPSDs move away, it takes none) or, with `undo`,
    /// not (cluster mode; admin).
    ClusterDrain {
        appliance: String,
        undo: bool,
    },
    /// Pins a vPSD, or every vPSD of an owner (customer), to an appliance; an empty
    /// `appliance` removes the pin (cluster mode; admin).
    ClusterPin {
        subject: PinSubject,
        appliance: String,
    },
    /// The owner key of this vPSD names the receiving appliance now (a planned move):
    /// serve it (cluster mode; role appliance only).
    ClusterAdopt {
        vpsd_id: u64,
    },
    /// How this appliance is sharded, and the port of each shard (any authenticated role):
    /// for a client that sends each vPSD's requests straight to the shard that owns it.
    Topology,
    /// A hot backup (admin): the appliance copies every shard's journal up to its durable
    /// point into `out`, a new directory on the appliance's host (an absolute path), and
    /// audits the copy.
    Backup {
        out: String,
    },
}

/// What a pin applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum PinSubject {
    Vpsd(u64),
    /// Every vPSD provisioned for this owner (customer) account.
    Owner(String),
}

/// Who owns one vPSD, as a placement answer lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct VpsdPlacement {
    pub vpsd_id: u64,
    /// The appliance that owns it; for one no appliance owns yet, the one a provision
    /// would go to (empty when no appliance is live).
    pub appliance: String,
    /// Whether `appliance` owns it (false: not provisioned, or provisioned and never
    /// acknowledged).
    pub owned: bool,
}

/// A single item's outcome within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum ItemResult {
    Signed(Indicium),
    Failed(ErrorBody),
}

/// A typed error: code plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MESSAGE_BYTES_MAX {
            let mut cut = MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// The registers and state of one vPSD.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct VpsdStatus {
    pub vpsd_id: u64,
    pub owner: String,
    pub algorithm: Algorithm,
    pub key_serial: u32,
    pub state: VpsdState,
    pub ascending_mills: u64,
    pub descending_mills: u64,
    pub control_total_mills: u64,
    pub piece_count: u64,
    pub origin_zip: Zip,
    /// Unix seconds of the last provider contact (provisioning counts).
    pub last_contact_unix: u64,
    /// Last provider authorization sequence accepted (0 before the first).
    pub provider_sequence: u64,
    /// Freshness counter: grows with every durable change of the vPSD record.
    pub version: u64,
}

/// Outcome of an online verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Verdict {
    Valid,
    BadSignature,
    /// No such vPSD, or no key with that serial.
    UnknownKey,
    /// The bytes are not an indicium.
    Malformed,
    /// The signature is good but the piece number was never issued (beyond the count).
    NotIssued,
}

impl Verdict {
    pub const fn code(self) -> u8 {
        match self {
            Self::Valid => 0,
            Self::BadSignature => 1,
            Self::UnknownKey => 2,
            Self::Malformed => 3,
            Self::NotIssued => 4,
        }
    }

    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::Valid),
            1 => Some(Self::BadSignature),
            2 => Some(Self::UnknownKey),
            3 => Some(Self::Malformed),
            4 => Some(Self::NotIssued),
            _ => None,
        }
    }
}

/// One appliance of a cluster, as a cluster report lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ApplianceEntry {
    pub id: String,
    /// Where it is reached (empty when it never said).
    pub address: String,
    /// Whether its lease is alive.
    pub alive: bool,
    /// How many vPSDs it owns.
    pub vpsds: u32,
    /// Whether it is draining: its vPSDs move away and it is given none.
    pub draining: bool,
}

/// One named counter or gauge of the appliance's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct StatEntry {
    pub name: String,
    pub value: u64,
}

/// Everything the appliance answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case", tag = "type"))]
#[non_exhaustive]
pub enum Response {
    Challenge {
        version: u8,
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
        server_nonce: [u8; NONCE_BYTES],
    },
    Welcome {
        role: Role,
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::array"))]
        server_proof: [u8; PROOF_BYTES],
    },
    /// One indicium (on the wire: its encoding, decoded and checked on receipt).
    Signed {
        indicium: Indicium,
    },
    BatchSigned {
        results: Vec<ItemResult>,
    },
    /// Answer to status, provision, refill, contact, lock, unlock and rotate-key.
    VpsdStatus(VpsdStatus),
    PublicKeyInfo {
        vpsd_id: u64,
        algorithm: Algorithm,
        key_serial: u32,
        #[cfg_attr(feature = "serde", serde(with = "crate::serde_hex::vec"))]
        spki_der: Vec<u8>,
    },
    Verified {
        verdict: Verdict,
        vpsd_id: u64,
        piece_number: u64,
    },
    Withdrawn {
        refund_mills: u64,
        status: VpsdStatus,
    },
    #[cfg_attr(feature = "serde", serde(rename = "stats-report"))]
    Stats {
        entries: Vec<StatEntry>,
    },
    /// Answer to cluster-status and cluster-takeover: how many vPSDs a takeover took (0
    /// for a status), and every appliance that ever joined, by id.
    #[cfg_attr(feature = "serde", serde(rename = "cluster-report"))]
    Cluster {
        taken: u32,
        appliances: Vec<ApplianceEntry>,
    },
    /// Answer to cluster-placement and cluster-move: the live appliances (id, address), by
    /// id, and the owner of each vPSD asked about, in the order asked.
    Placement {
        appliances: Vec<(String, String)>,
        vpsds: Vec<VpsdPlacement>,
    },
    /// Answer to topology.
    #[cfg_attr(feature = "serde", serde(rename = "topology-report"))]
    Topology(Topology),
    /// Answer to backup: what the copy holds.
    #[cfg_attr(feature = "serde", serde(rename = "backup-report"))]
    Backup(BackupReport),
    Error(ErrorBody),
}

/// What a hot backup copied (the `backup-report` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct BackupReport {
    /// When the durable points were taken, Unix seconds.
    pub taken_unix: u64,
    /// Whether the audit of the copy found nothing.
    pub clean: bool,
    /// By shard, 1..=[`SHARDS_MAX`] of them.
    pub shards: Vec<ShardCopy>,
}

/// One shard's journal in a hot backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ShardCopy {
    /// The last record copied: the shard's durable sequence when the backup began.
    pub sequence: u64,
    /// Segment files copied.
    pub segments: u32,
    /// Bytes of those files.
    pub bytes: u64,
}

impl BackupReport {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let taken_unix = r.u64()?;
        let offset = r.position();
        let clean = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(bad_value("backup_report.clean", offset, u64::from(other))),
        };
        let count = count16(r, "backup_report.shards", SHARDS_MAX, false)?;
        let mut shards = Vec::with_capacity(count);
        for _ in 0..count {
            shards.push(ShardCopy {
                sequence: r.u64()?,
                segments: r.u32()?,
                bytes: r.u64()?,
            });
        }
        Ok(Self {
            taken_unix,
            clean,
            shards,
        })
    }
}
/// How an appliance is sharded (the `topology-report` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Topology {
    /// The shard count, 1..=[`SHARDS_MAX`].
    pub shards: u16,
    /// The shard that serves the connection this answer came on.
    pub shard: u16,
    /// How a vPSD's shard is computed: [`SHARD_HASH_XXH3`].
    pub hash: u8,
    /// The most items this appliance takes in one `sign-batch` (1..=256).
    pub batch_items_max: u16,
    /// Each shard's own port, by shard (on the host the client reached): a connection
    /// there is served by that shard. Empty when the appliance has no shard ports.
    pub ports: Vec<u16>,
}

impl Topology {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let offset = r.position();
        let shards = r.u16()?;
        if shards == 0 || usize::from(shards) > SHARDS_MAX {
            return Err(bad_value("topology.shards", offset, u64::from(shards)));
        }
        let offset = r.position();
        let shard = r.u16()?;
        if shard >= shards {
            return Err(bad_value("topology.shard", offset, u64::from(shard)));
        }
        let offset = r.position();
        let hash = r.u8()?;
        if hash != SHARD_HASH_XXH3 {
            return Err(bad_value("topology.hash", offset, u64::from(hash)));
        }
        let offset = r.position();
        let batch_items_max = r.u16()?;
        if batch_items_max == 0 || usize::from(batch_items_max) > BATCH_ITEMS_MAX {
            return Err(bad_value(
                "topology.batch_items_max",
                offset,
                u64::from(batch_items_max),
            ));
        }
        let offset = r.position();
        let count = count16(r, "topology.ports", SHARDS_MAX, true)?;
        // Either no shard ports at all, or one per shard.
        if count != 0 && count != usize::from(shards) {
            return Err(bad_value("topology.ports", offset, count as u64));
        }
        let mut ports = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.position();
            let port = r.u16()?;
            if port == 0 {
                return Err(bad_value("topology.port", offset, 0));
            }
            ports.push(port);
        }
        Ok(Self {
            shards,
            shard,
            hash,
            batch_items_max,
            ports,
        })
    }

    /// The port that reaches the shard owning `vpsd_id`, if there are shard ports.
    pub fn port_of(&self, vpsd_id: u64) -> Option<u16> {
        self.ports
            .get(usize::from(crate::shard_of(vpsd_id, self.shards)))
            .copied()
    }
}

/// The bytes both handshake proofs are computed over (see docs/PROTOCOL.md, "Handshake"):
/// `label || version || len(client_id) as u16 || client_id || client_nonce || server_nonce`.
pub fn handshake_transcript(
    label: &[u8],
    version: u8,
    client_id: &str,
    client_nonce: &[u8; NONCE_BYTES],
    server_nonce: &[u8; NONCE_BYTES],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + 3 + client_id.len() + 2 * NONCE_BYTES);
    out.extend_from_slice(label);
    out.push(version);
    // client_id is bounded by CLIENT_ID_BYTES_MAX (64) wherever it was decoded.
    let len = u16::try_from(client_id.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(client_id.as_bytes());
    out.extend_from_slice(client_nonce);
    out.extend_from_slice(server_nonce);
    out
}

/// An indicium inside a response: u16 length, then its encoding, which must decode whole.
fn encode_indicium(w: &mut Writer<'_>, indicium: &Indicium) -> Result<(), EncodeError> {
    w.bytes16("indicium", indicium.to_bytes().as_ref(), INDICIUM_BYTES_MAX)
}

fn decode_indicium(r: &mut Reader<'_>, field: &'static str) -> Result<Indicium, DecodeError> {
    let offset = r.position();
    let bytes = r.bytes16(field, INDICIUM_BYTES_MAX)?;
    Indicium::decode(bytes).map_err(|err| match err {
        // Report where in the body the bad indicium starts.
        DecodeError::Truncated {
            needed, available, ..
        } => DecodeError::Truncated {
            offset: offset + 2,
            needed,
            available,
        },
        _ => bad_value(field, offset, bytes.len() as u64),
    })
}

fn bad_value(field: &'static str, offset: usize, value: u64) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        offset,
        value,
    }
}

fn algorithm(reader: &mut Reader<'_>, field: &'static str) -> Result<Algorithm, DecodeError> {
    let offset = reader.position();
    let code = reader.u8()?;
    Algorithm::from_code(code).ok_or(bad_value(field, offset, u64::from(code)))
}

/// A non-empty string: client ids and owners must name something.
fn name16(
    reader: &mut Reader<'_>,
    field: &'static str,
    len_max: usize,
) -> Result<String, DecodeError> {
    let offset = reader.position();
    let text = reader.string16(field, len_max)?;
    if text.is_empty() {
        return Err(bad_value(field, offset, 0));
    }
    Ok(text)
}

fn write_name16(
    w: &mut Writer<'_>,
    field: &'static str,
    text: &str,
    len_max: usize,
) -> Result<(), EncodeError> {
    if text.is_empty() {
        return Err(EncodeError::InvalidValue {
            field,
            reason: "must not be empty",
        });
    }
    w.string16(field, text, len_max)
}

fn authorization(
    reader: &mut Reader<'_>,
    expected: AuthorizationKind,
) -> Result<ProviderAuthorization, DecodeError> {
    let offset = reader.position();
    let authorization = ProviderAuthorization::decode(reader)?;
    if authorization.kind != expected {
        return Err(bad_value(
            "authorization.kind",
            offset,
            u64::from(authorization.kind.code()),
        ));
    }
    Ok(authorization)
}

/// Reads an item count (u16) that must be within `1..=max` (or `0..=max` if `allow_empty`).
fn count16(
    reader: &mut Reader<'_>,
    field: &'static str,
    max: usize,
    allow_empty: bool,
) -> Result<usize, DecodeError> {
    let offset = reader.position();
    let count = usize::from(reader.u16()?);
    if count > max || (count == 0 && !allow_empty) {
        return Err(bad_value(field, offset, count as u64));
    }
    Ok(count)
}

fn write_count16(
    writer: &mut Writer<'_>,
    field: &'static str,
    count: usize,
    max: usize,
    allow_empty: bool,
) -> Result<(), EncodeError> {
    if count == 0 && !allow_empty {
        return Err(EncodeError::InvalidValue {
            field,
            reason: "must hold at least one item",
        });
    }
    if count > max {
        return Err(EncodeError::TooLong {
            field,
            len: count,
            len_max: max,
        });
    }
    // count <= max <= u16::MAX for every list in the protocol.
    writer.u16(u16::try_from(count).map_err(|_| EncodeError::TooLong {
        field,
        len: count,
        len_max: usize::from(u16::MAX),
    })?)
}

impl Request {
    pub fn opcode(&self) -> u8 {
        match self {
            Self::Hello { .. } => opcode::HELLO,
            Self::Authenticate { .. } => opcode::AUTHENTICATE,
            Self::Sign { .. } => opcode::SIGN,
            Self::SignBatch { .. } => opcode::SIGN_BATCH,
            Self::Status { .. } => opcode::STATUS,
            Self::PublicKey { .. } => opcode::PUBLIC_KEY,
            Self::Verify { .. } => opcode::VERIFY,
            Self::Provision { .. } => opcode::PROVISION,
            Self::Refill { .. } => opcode::REFILL,
            Self::Contact { .. } => opcode::CONTACT,
            Self::Lock { .. } => opcode::LOCK,
            Self::Unlock { .. } => opcode::UNLOCK,
            Self::Withdraw { .. } => opcode::WITHDRAW,
            Self::RotateKey { .. } => opcode::ROTATE_KEY,
            Self::Stats => opcode::STATS,
            Self::ClusterStatus => opcode::CLUSTER_STATUS,
            Self::ClusterTakeover { .. } => opcode::CLUSTER_TAKEOVER,
            Self::Forwarded { .. } => opcode::FORWARDED,
            Self::ClusterPlacement { .. } => opcode::CLUSTER_PLACEMENT,
            Self::ClusterMove { .. } => opcode::CLUSTER_MOVE,
            Self::ClusterDrain { .. } => opcode::CLUSTER_DRAIN,
            Self::ClusterPin { .. } => opcode::CLUSTER_PIN,
            Self::ClusterAdopt { .. } => opcode::CLUSTER_ADOPT,
            Self::Topology => opcode::TOPOLOGY,
            Self::Backup { .. } => opcode::BACKUP,
        }
    }

    /// The vPSD a request is about, if any (used for routing and authorization).
    pub fn vpsd_id(&self) -> Option<u64> {
        match self {
            Self::Sign { vpsd_id, .. }
            | Self::SignBatch { vpsd_id, .. }
            | Self::Status { vpsd_id }
            | Self::PublicKey { vpsd_id, .. }
            | Self::Provision { vpsd_id, .. }
            | Self::Refill { vpsd_id, .. }
            | Self::Contact { vpsd_id, .. }
            | Self::Lock { vpsd_id, .. }
            | Self::Unlock { vpsd_id }
            | Self::Withdraw { vpsd_id }
            | Self::RotateKey { vpsd_id }
            | Self::ClusterMove { vpsd_id, .. }
            | Self::ClusterAdopt { vpsd_id } => Some(*vpsd_id),
            Self::Forwarded { request, .. } => request.vpsd_id(),
            Self::Hello { .. }
            | Self::ClusterPlacement { .. }
            | Self::ClusterDrain { .. }
            | Self::ClusterPin { .. }
            | Self::Authenticate { .. }
            | Self::Verify { .. }
            | Self::Stats
            | Self::Topology
            | Self::Backup { .. }
            | Self::ClusterStatus
            | Self::ClusterTakeover { .. } => None,
        }
    }

    pub fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Self::Hello {
                version_min,
                version_max,
                client_id,
                client_nonce,
            } => {
                w.u8(*version_min)?;
                w.u8(*version_max)?;
                write_name16(w, "hello.client_id", client_id, CLIENT_ID_BYTES_MAX)?;
                w.put(client_nonce)
            }
            Self::Authenticate { proof } => w.put(proof),
            Self::Sign { vpsd_id, item } => {
                w.u64(*vpsd_id)?;
                item.encode(w)
            }
            Self::SignBatch { vpsd_id, items } => {
                w.u64(*vpsd_id)?;
                write_count16(w, "sign_batch.count", items.len(), BATCH_ITEMS_MAX, false)?;
                items.iter().try_for_each(|item| item.encode(w))
            }
            Self::Status { vpsd_id }
            | Self::Unlock { vpsd_id }
            | Self::Withdraw { vpsd_id }
            | Self::RotateKey { vpsd_id } => w.u64(*vpsd_id),
            Self::PublicKey {
                vpsd_id,
                key_serial,
            } => {
                if *key_serial == Some(0) {
                    return Err(EncodeError::InvalidValue {
                        field: "public_key.key_serial",
                        reason: "serial 0 means the current key; use None",
                    });
                }
                w.u64(*vpsd_id)?;
                w.u32(key_serial.unwrap_or(0))
            }
            Self::Verify { indicium } => w.bytes16("verify.indicium", indicium, INDICIUM_BYTES_MAX),
            Self::Provision {
                vpsd_id,
                owner,
                algorithm,
                origin_zip,
            } => {
                w.u64(*vpsd_id)?;
                write_name16(w, "provision.owner", owner, OWNER_BYTES_MAX)?;
                w.u8(algorithm.code())?;
                w.u32(origin_zip.wire())
            }
            Self::Refill {
                vpsd_id,
                authorization,
            }
            | Self::Contact {
                vpsd_id,
                authorization,
            } => {
                w.u64(*vpsd_id)?;
                authorization.encode(w)
            }
            Self::Lock { vpsd_id, reason } => {
                w.u64(*vpsd_id)?;
                w.string16("lock.reason", reason, REASON_BYTES_MAX)
            }
            Self::Stats | Self::ClusterStatus | Self::Topology => Ok(()),
            Self::Backup { out } => w.string16("backup.out", out, BACKUP_PATH_BYTES_MAX),
            Self::ClusterTakeover { from } => {
                write_name16(w, "cluster_takeover.from", from, APPLIANCE_ID_BYTES_MAX)
            }
            Self::Forwarded {
                client_id,
                request_id,
                request,
            } => {
                write_name16(w, "forwarded.client_id", client_id, CLIENT_ID_BYTES_MAX)?;
                w.u64(*request_id)?;
                if !request.forwardable() {
                    return Err(EncodeError::InvalidValue {
                        field: "forwarded.opcode",
                        reason: "only a client's request about one vPSD is forwarded",
                    });
                }
                w.u8(request.opcode())?;
                request.encode_body(w)
            }
            Self::ClusterPlacement { vpsd_ids } => {
                write_count16(
                    w,
                    "cluster_placement.count",
                    vpsd_ids.len(),
                    PLACEMENT_VPSDS_MAX,
                    true,
                )?;
                for vpsd_id in vpsd_ids {
                    w.u64(*vpsd_id)?;
                }
                Ok(())
            }
            Self::ClusterMove { vpsd_id, to } => {
                w.u64(*vpsd_id)?;
                write_name16(w, "cluster_move.to", to, APPLIANCE_ID_BYTES_MAX)
            }
            Self::ClusterDrain { appliance, undo } => {
                write_name16(
                    w,
                    "cluster_drain.appliance",
                    appliance,
                    APPLIANCE_ID_BYTES_MAX,
                )?;
                w.u8(u8::from(*undo))
            }
            Self::ClusterPin { subject, appliance } => {
                match subject {
                    PinSubject::Vpsd(vpsd_id) => {
                        w.u8(1)?;
                        w.u64(*vpsd_id)?;
                    }
                    PinSubject::Owner(owner) => {
                        w.u8(2)?;
                        write_name16(w, "cluster_pin.owner", owner, OWNER_BYTES_MAX)?;
                    }
                }
                w.string16("cluster_pin.appliance", appliance, APPLIANCE_ID_BYTES_MAX)
            }
            Self::ClusterAdopt { vpsd_id } => w.u64(*vpsd_id),
        }
    }

    /// Decodes a request body. Unknown opcodes, response opcodes, out-of-range values and
    /// trailing bytes are errors.
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let request = match opcode {
            opcode::HELLO => {
                let version_min = r.u8()?;
                let version_max = r.u8()?;
                if version_min == 0 || version_min > version_max {
                    return Err(bad_value(
                        "hello.versions",
                        0,
                        u64::from(version_min) << 8 | u64::from(version_max),
                    ));
                }
                Self::Hello {
                    version_min,
                    version_max,
                    client_id: name16(&mut r, "hello.client_id", CLIENT_ID_BYTES_MAX)?,
                    client_nonce: r.array()?,
                }
            }
            opcode::AUTHENTICATE => Self::Authenticate { proof: r.array()? },
            opcode::SIGN => Self::Sign {
                vpsd_id: r.u64()?,
                item: SignItem::decode(&mut r)?,
            },
            opcode::SIGN_BATCH => {
                let vpsd_id = r.u64()?;
                let count = count16(&mut r, "sign_batch.count", BATCH_ITEMS_MAX, false)?;
                // The count is capped, so this allocation is bounded.
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(SignItem::decode(&mut r)?);
                }
                Self::SignBatch { vpsd_id, items }
            }
            opcode::STATUS => Self::Status { vpsd_id: r.u64()? },
            opcode::PUBLIC_KEY => Self::PublicKey {
                vpsd_id: r.u64()?,
                key_serial: Some(r.u32()?).filter(|serial| *serial != 0),
            },
            opcode::VERIFY => Self::Verify {
                indicium: r.bytes16("verify.indicium", INDICIUM_BYTES_MAX)?.to_vec(),
            },
            opcode::PROVISION => Self::Provision {
                vpsd_id: r.u64()?,
                owner: name16(&mut r, "provision.owner", OWNER_BYTES_MAX)?,
                algorithm: algorithm(&mut r, "provision.algorithm")?,
                origin_zip: zip(&mut r, "provision.origin_zip")?,
            },
            opcode::REFILL => Self::Refill {
                vpsd_id: r.u64()?,
                authorization: authorization(&mut r, AuthorizationKind::Refill)?,
            },
            opcode::CONTACT => Self::Contact {
                vpsd_id: r.u64()?,
                authorization: authorization(&mut r, AuthorizationKind::Contact)?,
            },
            opcode::LOCK => Self::Lock {
                vpsd_id: r.u64()?,
                reason: r.string16("lock.reason", REASON_BYTES_MAX)?,
            },
            opcode::UNLOCK => Self::Unlock { vpsd_id: r.u64()? },
            opcode::WITHDRAW => Self::Withdraw { vpsd_id: r.u64()? },
            opcode::ROTATE_KEY => Self::RotateKey { vpsd_id: r.u64()? },
            opcode::STATS => Self::Stats,
            opcode::TOPOLOGY => Self::Topology,
            opcode::BACKUP => Self::Backup {
                out: r.string16("backup.out", BACKUP_PATH_BYTES_MAX)?,
            },
            opcode::CLUSTER_STATUS => Self::ClusterStatus,
            opcode::CLUSTER_TAKEOVER => Self::ClusterTakeover {
                from: name16(&mut r, "cluster_takeover.from", APPLIANCE_ID_BYTES_MAX)?,
            },
            opcode::FORWARDED => {
                let client_id = name16(&mut r, "forwarded.client_id", CLIENT_ID_BYTES_MAX)?;
                let request_id = r.u64()?;
                let offset = r.position();
                let inner = r.u8()?;
                let body = r.take(r.remaining())?;
                // One level only: the inner opcode is checked before it is decoded.
                if !forwardable_opcode(inner) {
                    return Err(bad_value("forwarded.opcode", offset, u64::from(inner)));
                }
                Self::Forwarded {
                    client_id,
                    request_id,
                    request: Box::new(Self::decode(inner, body)?),
                }
            }
            opcode::CLUSTER_PLACEMENT => {
                let count = count16(&mut r, "cluster_placement.count", PLACEMENT_VPSDS_MAX, true)?;
                let mut vpsd_ids = Vec::with_capacity(count);
                for _ in 0..count {
                    vpsd_ids.push(r.u64()?);
                }
                Self::ClusterPlacement { vpsd_ids }
            }
            opcode::CLUSTER_MOVE => Self::ClusterMove {
                vpsd_id: r.u64()?,
                to: name16(&mut r, "cluster_move.to", APPLIANCE_ID_BYTES_MAX)?,
            },
            opcode::CLUSTER_DRAIN => {
                let appliance = name16(&mut r, "cluster_drain.appliance", APPLIANCE_ID_BYTES_MAX)?;
                let offset = r.position();
                let undo = match r.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(bad_value("cluster_drain.undo", offset, u64::from(other))),
                };
                Self::ClusterDrain { appliance, undo }
            }
            opcode::CLUSTER_PIN => {
                let offset = r.position();
                let subject = match r.u8()? {
                    1 => PinSubject::Vpsd(r.u64()?),
                    2 => PinSubject::Owner(name16(&mut r, "cluster_pin.owner", OWNER_BYTES_MAX)?),
                    other => return Err(bad_value("cluster_pin.kind", offset, u64::from(other))),
                };
                Self::ClusterPin {
                    subject,
                    appliance: r.string16("cluster_pin.appliance", APPLIANCE_ID_BYTES_MAX)?,
                }
            }
            opcode::CLUSTER_ADOPT => Self::ClusterAdopt { vpsd_id: r.u64()? },
            other if other >= 0x80 => return Err(DecodeError::WrongDirection { opcode: other }),
            other => return Err(DecodeError::UnknownOpcode { opcode: other }),
        };
        r.finish()?;
        Ok(request)
    }

    /// Whether an appliance may forward this request to the vPSD's owner: a client's
    /// request about one vPSD (not a handshake, not a cluster command, not a forward).
    pub fn forwardable(&self) -> bool {
        forwardable_opcode(self.opcode())
    }

    /// Encodes a whole request frame into `out`; returns its length.
    pub fn encode_frame(
        &self,
        version: u8,
        request_id: u64,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        encode_frame(out, version, self.opcode(), 0, request_id, |w| {
            self.encode_body(w)
        })
    }
}

/// The requests that `forwarded` may carry: those about one vPSD that a client sends.
fn forwardable_opcode(opcode: u8) -> bool {
    matches!(
        opcode,
        opcode::SIGN
            | opcode::SIGN_BATCH
            | opcode::STATUS
            | opcode::PUBLIC_KEY
            | opcode::PROVISION
            | opcode::REFILL
            | opcode::CONTACT
            | opcode::LOCK
            | opcode::UNLOCK
            | opcode::WITHDRAW
            | opcode::ROTATE_KEY
            | opcode::CLUSTER_MOVE
    )
}

fn encode_state(w: &mut Writer<'_>, state: &VpsdState) -> Result<(), EncodeError> {
    let (state_code, lock_code, text) = match state {
        VpsdState::Active => (0, 0, ""),
        VpsdState::Locked(LockReason::Operator(text)) => (1, 1, text.as_str()),
        VpsdState::Locked(LockReason::ContactOverdue) => (1, 2, ""),
        VpsdState::Locked(LockReason::Integrity(text)) => (1, 3, text.as_str()),
        VpsdState::Withdrawn => (2, 0, ""),
    };
    w.u8(state_code)?;
    w.u8(lock_code)?;
    w.string16("status.reason", text, REASON_BYTES_MAX)
}

fn decode_state(r: &mut Reader<'_>) -> Result<VpsdState, DecodeError> {
    let offset = r.position();
    let state_code = r.u8()?;
    let lock_code = r.u8()?;
    let text_offset = r.position();
    let text = r.string16("status.reason", REASON_BYTES_MAX)?;
    let no_text = |state: VpsdState| {
        if text.is_empty() {
            Ok(state)
        } else {
            Err(DecodeError::ReservedNotZero {
                field: "status.reason",
                offset: text_offset,
            })
        }
    };
    match (state_code, lock_code) {
        (0, 0) => no_text(VpsdState::Active),
        (1, 1) => Ok(VpsdState::Locked(LockReason::Operator(text))),
        (1, 2) => no_text(VpsdState::Locked(LockReason::ContactOverdue)),
        (1, 3) => Ok(VpsdState::Locked(LockReason::Integrity(text))),
        (2, 0) => no_text(VpsdState::Withdrawn),
        _ => Err(bad_value(
            "status.state",
            offset,
            u64::from(state_code) << 8 | u64::from(lock_code),
        )),
    }
}

impl VpsdStatus {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.vpsd_id)?;
        write_name16(w, "status.owner", &self.owner, OWNER_BYTES_MAX)?;
        w.u8(self.algorithm.code())?;
        w.u32(self.key_serial)?;
        encode_state(w, &self.state)?;
        w.u64(self.ascending_mills)?;
        w.u64(self.descending_mills)?;
        w.u64(self.control_total_mills)?;
        w.u64(self.piece_count)?;
        w.u32(self.origin_zip.wire())?;
        w.u64(self.last_contact_unix)?;
        w.u64(self.provider_sequence)?;
        w.u64(self.version)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            vpsd_id: r.u64()?,
            owner: name16(r, "status.owner", OWNER_BYTES_MAX)?,
            algorithm: algorithm(r, "status.algorithm")?,
            key_serial: r.u32()?,
            state: decode_state(r)?,
            ascending_mills: r.u64()?,
            descending_mills: r.u64()?,
            control_total_mills: r.u64()?,
            piece_count: r.u64()?,
            origin_zip: zip(r, "status.origin_zip")?,
            last_contact_unix: r.u64()?,
            provider_sequence: r.u64()?,
            version: r.u64()?,
        })
    }
}

impl ErrorBody {
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.code.wire())?;
        w.string16("error.message", &self.message, MESSAGE_BYTES_MAX)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            code: ErrorCode::from_wire(r.u16()?),
            message: r.string16("error.message", MESSAGE_BYTES_MAX)?,
        })
    }
}

impl Response {
    pub fn opcode(&self) -> u8 {
        match self {
            Self::Challenge { .. } => opcode::CHALLENGE,
            Self::Welcome { .. } => opcode::WELCOME,
            Self::Signed { .. } => opcode::SIGNED,
            Self::BatchSigned { .. } => opcode::BATCH_SIGNED,
            Self::VpsdStatus(_) => opcode::VPSD_STATUS,
            Self::PublicKeyInfo { .. } => opcode::PUBLIC_KEY_INFO,
            Self::Verified { .. } => opcode::VERIFIED,
            Self::Withdrawn { .. } => opcode::WITHDRAWN,
            Self::Stats { .. } => opcode::STATS_REPORT,
            Self::Cluster { .. } => opcode::CLUSTER_REPORT,
            Self::Placement { .. } => opcode::PLACEMENT,
            Self::Topology(_) => opcode::TOPOLOGY_REPORT,
            Self::Backup(_) => opcode::BACKUP_REPORT,
            Self::Error(_) => opcode::ERROR,
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorBody::new(code, message))
    }

    pub fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match self {
            Self::Challenge {
                version,
                server_nonce,
            } => {
                if *version == 0 {
                    return Err(EncodeError::InvalidValue {
                        field: "challenge.version",
                        reason: "version 0 does not exist",
                    });
                }
                w.u8(*version)?;
                w.put(server_nonce)
            }
            Self::Welcome { role, server_proof } => {
                w.u8(role.code())?;
                w.put(server_proof)
            }
            Self::Signed { indicium } => encode_indicium(w, indicium),
            Self::BatchSigned { results } => {
                write_count16(
                    w,
                    "batch_signed.count",
                    results.len(),
                    BATCH_ITEMS_MAX,
                    false,
                )?;
                for result in results {
                    match result {
                        ItemResult::Signed(indicium) => {
                            w.u8(0)?;
                            encode_indicium(w, indicium)?;
                        }
                        ItemResult::Failed(error) => {
                            w.u8(1)?;
                            error.encode(w)?;
                        }
                    }
                }
                Ok(())
            }
            Self::VpsdStatus(status) => status.encode(w),
            Self::PublicKeyInfo {
                vpsd_id,
                algorithm,
                key_serial,
                spki_der,
            } => {
                w.u64(*vpsd_id)?;
                w.u8(algorithm.code())?;
                w.u32(*key_serial)?;
                w.bytes16("public_key.spki_der", spki_der, SPKI_BYTES_MAX)
            }
            Self::Verified {
                verdict,
                vpsd_id,
                piece_number,
            } => {
                w.u8(verdict.code())?;
                w.u64(*vpsd_id)?;
                w.u64(*piece_number)
            }
            Self::Withdrawn {
                refund_mills,
                status,
            } => {
                w.u64(*refund_mills)?;
                status.encode(w)
            }
            Self::Stats { entries } => {
                write_count16(w, "stats.count", entries.len(), STATS_ENTRIES_MAX, true)?;
                for entry in entries {
                    write_name16(w, "stats.name", &entry.name, STAT_NAME_BYTES_MAX)?;
                    w.u64(entry.value)?;
                }
                Ok(())
            }
            Self::Cluster { taken, appliances } => {
                w.u32(*taken)?;
                write_count16(
                    w,
                    "cluster.count",
                    appliances.len(),
                    CLUSTER_APPLIANCES_MAX,
                    true,
                )?;
                for appliance in appliances {
                    write_name16(w, "cluster.id", &appliance.id, APPLIANCE_ID_BYTES_MAX)?;
                    w.string16(
                        "cluster.address",
                        &appliance.address,
                        APPLIANCE_ADDRESS_BYTES_MAX,
                    )?;
                    w.u8(u8::from(appliance.alive) | u8::from(appliance.draining) << 1)?;
                    w.u32(appliance.vpsds)?;
                }
                Ok(())
            }
            Self::Placement { appliances, vpsds } => {
                write_count16(
                    w,
                    "placement.appliances",
                    appliances.len(),
                    CLUSTER_APPLIANCES_MAX,
                    true,
                )?;
                for (id, address) in appliances {
                    write_name16(w, "placement.id", id, APPLIANCE_ID_BYTES_MAX)?;
                    w.string16("placement.address", address, APPLIANCE_ADDRESS_BYTES_MAX)?;
                }
                write_count16(w, "placement.vpsds", vpsds.len(), PLACEMENT_VPSDS_MAX, true)?;
                for vpsd in vpsds {
                    w.u64(vpsd.vpsd_id)?;
                    w.string16("placement.owner", &vpsd.appliance, APPLIANCE_ID_BYTES_MAX)?;
                    w.u8(u8::from(vpsd.owned))?;
                }
                Ok(())
            }
            Self::Backup(report) => {
                w.u64(report.taken_unix)?;
                w.u8(u8::from(report.clean))?;
                write_count16(
                    w,
                    "backup_report.shards",
                    report.shards.len(),
                    SHARDS_MAX,
                    false,
                )?;
                for shard in &report.shards {
                    w.u64(shard.sequence)?;
                    w.u32(shard.segments)?;
                    w.u64(shard.bytes)?;
                }
                Ok(())
            }
            Self::Topology(topology) => {
                w.u16(topology.shards)?;
                w.u16(topology.shard)?;
                w.u8(topology.hash)?;
                w.u16(topology.batch_items_max)?;
                write_count16(w, "topology.ports", topology.ports.len(), SHARDS_MAX, true)?;
                for port in &topology.ports {
                    w.u16(*port)?;
                }
                Ok(())
            }
            Self::Error(error) => error.encode(w),
        }
    }

    pub fn decode(opcode: u8, body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let response = match opcode {
            opcode::CHALLENGE => {
                let offset = r.position();
                let version = r.u8()?;
                if version == 0 {
                    return Err(bad_value("challenge.version", offset, 0));
                }
                Self::Challenge {
                    version,
                    server_nonce: r.array()?,
                }
            }
            opcode::WELCOME => {
                let offset = r.position();
                let code = r.u8()?;
                Self::Welcome {
                    role: Role::from_code(code).ok_or(bad_value(
                        "welcome.role",
                        offset,
                        u64::from(code),
                    ))?,
                    server_proof: r.array()?,
                }
            }
            opcode::SIGNED => Self::Signed {
                indicium: decode_indicium(&mut r, "signed.indicium")?,
            },
            opcode::BATCH_SIGNED => {
                let count = count16(&mut r, "batch_signed.count", BATCH_ITEMS_MAX, false)?;
                let mut results = Vec::with_capacity(count);
                for _ in 0..count {
                    let offset = r.position();
                    results.push(match r.u8()? {
                        0 => ItemResult::Signed(decode_indicium(&mut r, "batch_signed.indicium")?),
                        1 => ItemResult::Failed(ErrorBody::decode(&mut r)?),
                        other => {
                            return Err(bad_value("batch_signed.status", offset, u64::from(other)))
                        }
                    });
                }
                Self::BatchSigned { results }
            }
            opcode::VPSD_STATUS => Self::VpsdStatus(VpsdStatus::decode(&mut r)?),
            opcode::PUBLIC_KEY_INFO => Self::PublicKeyInfo {
                vpsd_id: r.u64()?,
                algorithm: algorithm(&mut r, "public_key.algorithm")?,
                key_serial: r.u32()?,
                spki_der: r.bytes16("public_key.spki_der", SPKI_BYTES_MAX)?.to_vec(),
            },
            opcode::VERIFIED => {
                let offset = r.position();
                let code = r.u8()?;
                Self::Verified {
                    verdict: Verdict::from_code(code).ok_or(bad_value(
                        "verified.verdict",
                        offset,
                        u64::from(code),
                    ))?,
                    vpsd_id: r.u64()?,
                    piece_number: r.u64()?,
                }
            }
            opcode::WITHDRAWN => Self::Withdrawn {
                refund_mills: r.u64()?,
                status: VpsdStatus::decode(&mut r)?,
            },
            opcode::STATS_REPORT => {
                let count = count16(&mut r, "stats.count", STATS_ENTRIES_MAX, true)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(StatEntry {
                        name: name16(&mut r, "stats.name", STAT_NAME_BYTES_MAX)?,
                        value: r.u64()?,
                    });
                }
                Self::Stats { entries }
            }
            opcode::CLUSTER_REPORT => {
                let taken = r.u32()?;
                let count = count16(&mut r, "cluster.count", CLUSTER_APPLIANCES_MAX, true)?;
                let mut appliances = Vec::with_capacity(count);
                for _ in 0..count {
                    let id = name16(&mut r, "cluster.id", APPLIANCE_ID_BYTES_MAX)?;
                    let address = r.string16("cluster.address", APPLIANCE_ADDRESS_BYTES_MAX)?;
                    let offset = r.position();
                    let flags = r.u8()?;
                    if flags & !0b11 != 0 {
                        return Err(DecodeError::ReservedNotZero {
                            field: "cluster.flags",
                            offset,
                        });
                    }
                    appliances.push(ApplianceEntry {
                        id,
                        address,
                        alive: flags & 1 != 0,
                        vpsds: r.u32()?,
                        draining: flags & 2 != 0,
                    });
                }
                Self::Cluster { taken, appliances }
            }
            opcode::PLACEMENT => {
                let count = count16(&mut r, "placement.appliances", CLUSTER_APPLIANCES_MAX, true)?;
                let mut appliances = Vec::with_capacity(count);
                for _ in 0..count {
                    let id = name16(&mut r, "placement.id", APPLIANCE_ID_BYTES_MAX)?;
                    let address = r.string16("placement.address", APPLIANCE_ADDRESS_BYTES_MAX)?;
                    appliances.push((id, address));
                }
                let count = count16(&mut r, "placement.vpsds", PLACEMENT_VPSDS_MAX, true)?;
                let mut vpsds = Vec::with_capacity(count);
                for _ in 0..count {
                    let vpsd_id = r.u64()?;
                    let appliance = r.string16("placement.owner", APPLIANCE_ID_BYTES_MAX)?;
                    let offset = r.position();
                    let owned = match r.u8()? {
                        0 => false,
                        1 => true,
                        other => {
                            return Err(bad_value("placement.owned", offset, u64::from(other)))
                        }
                    };
                    vpsds.push(VpsdPlacement {
                        vpsd_id,
                        appliance,
                        owned,
                    });
                }
                Self::Placement { appliances, vpsds }
            }
            opcode::TOPOLOGY_REPORT => Self::Topology(Topology::decode(&mut r)?),
            opcode::BACKUP_REPORT => Self::Backup(BackupReport::decode(&mut r)?),
            opcode::ERROR => Self::Error(ErrorBody::decode(&mut r)?),
            other if other < 0x80 => return Err(DecodeError::WrongDirection { opcode: other }),
            other => return Err(DecodeError::UnknownOpcode { opcode: other }),
        };
        r.finish()?;
        Ok(response)
    }

    /// Encodes a whole response frame (with [`FLAG_RESPONSE`]) into `out`; returns its length.
    pub fn encode_frame(
        &self,
        version: u8,
        request_id: u64,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        encode_frame(
            out,
            version,
            self.opcode(),
            FLAG_RESPONSE,
            request_id,
            |w| self.encode_body(w),
        )
    }
}
