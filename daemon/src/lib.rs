//! `indiciad`: the indicia appliance.
//!
//! - [`engine`]: one shard's vPSDs, registers and signing sessions; deterministic, no I/O.
//! - [`journal`]: memory-mapped, chained, checksummed segments of opaque records; bytes
//!   only, it imports nothing of the layers above.
//! - [`store`]: the engine and the journal together: the record codec, commit, recovery,
//!   the audit and the ledger.
//! - [`cluster`] (milestone 2): the vPSDs' state replicated and fenced on etcd; bytes only,
//!   like the journal. Its connection to etcd is behind the feature `cluster`.
//! - [`config`]: the TOML configuration and its embedded default.
//! - [`datadir`]: master key, credentials and provider key in the data directory.
//! - [`hsm`]: the master key sealed by an AES key inside an HSM (PKCS#11).
//! - [`server`]: the thread-per-core server: connections, routing, coalescing, stats.
//! - [`service`]: the `indiciad` program around it: flags, signals, systemd.
#![deny(unsafe_code)]

pub mod cluster;
pub mod config;
pub mod datadir;
pub mod engine;
pub mod hsm;
pub mod journal;
pub mod server;
pub mod service;
pub mod store;
