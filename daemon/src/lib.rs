//! `indiciad`: the indicia appliance.
//!
//! - [`engine`]: one shard's vPSDs, registers and signing sessions; deterministic, no I/O.
//! - [`journal`]: the durable store: memory-mapped, chained, checksummed segments.
#![deny(unsafe_code)]

pub mod engine;
pub mod journal;
