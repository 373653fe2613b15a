//! The network side of the appliance. So far: the per-connection handshake and access
//! control, sans-io ([`handshake`]). The thread-per-core server (glommio executors,
//! listeners, routing between shards, coalescing, group commit) builds on it.

pub mod handshake;
