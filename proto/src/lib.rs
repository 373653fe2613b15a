//! `indicia-proto`: the wire protocol of the indicia appliance and the indicium format,
//! as a sans-io codec. Nothing here does I/O, spawns, or reads a clock: bytes in, typed
//! values or typed errors out, and typed values into caller-provided buffers.
//!
//! - [`frame`]: the 32-byte frame header and the incremental frame decoder.
//! - [`message`]: request and response bodies, one opcode each.
//! - [`indicium`]: the signed postage record, format version 1.
//! - [`authorization`]: provider-signed refill and contact authorizations.
//! - [`types`]: algorithms, ZIP codes, mailing dates, amounts in mills.
//!
//! docs/PROTOCOL.md and docs/INDICIUM.md describe every byte; the golden vectors under
//! `proto/tests/vectors/` pin the encoding.
#![forbid(unsafe_code)]

/// The shard of an appliance with `shards` shards that owns a vPSD: xxh3-64 of the id's 8
/// little-endian bytes, modulo the shard count (`topology.hash` 1, docs/PROTOCOL.md). Fixed
/// for the life of a data directory.
pub fn shard_of(vpsd_id: u64, shards: u16) -> u16 {
    let hash = xxhash_rust::xxh3::xxh3_64(&vpsd_id.to_le_bytes());
    // hash % shards < shards <= u16::MAX.
    (hash % u64::from(shards.max(1))) as u16
}

pub mod authorization;
pub mod codec;
pub mod error;
pub mod error_code;
pub mod frame;
pub mod fuzz;
pub mod indicium;
pub mod message;
#[cfg(feature = "serde")]
pub(crate) mod serde_hex;
pub mod types;

pub use authorization::{AuthorizationKind, ProviderAuthorization};
pub use error::{DecodeError, EncodeError, FrameError};
pub use error_code::ErrorCode;
pub use frame::{Decoded, Frame, FrameDecoder, FrameHeader};
pub use indicium::{Indicium, IndiciumPayload};
pub use message::{
    ApplianceEntry, ErrorBody, ItemResult, LockReason, PinSubject, Request, Response, Role,
    SignItem, StatEntry, Verdict, VpsdPlacement, VpsdState, VpsdStatus,
};
pub use message::{BackupReport, ShardCopy, Topology};
pub use types::{format_mills, parse_amount_mills, Algorithm, MailingDate, Zip};
