//! `indiciad`: the indicia appliance.
//!
//! - [`engine`]: one shard's vPSDs, registers and signing sessions; deterministic, no I/O.
#![deny(unsafe_code)]

pub mod engine;
