//! `indiciad`: the indicia appliance.
//!
//! - [`engine`]: one shard's vPSDs, registers and signing sessions; deterministic, no I/O.
//! - [`journal`]: the durable store: memory-mapped, chained, checksummed segments.
//! - [`config`]: the TOML configuration and its embedded default.
//! - [`datadir`]: master key, credentials and provider key in the data directory.
//! - [`server`]: the thread-per-core server: connections, routing, coalescing, stats.
//! - [`service`]: the `indiciad` program around it: flags, signals, systemd.
#![deny(unsafe_code)]

pub mod audit;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod journal;
pub mod server;
pub mod service;
