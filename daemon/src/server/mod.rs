//! The network side of the appliance. So far, sans-io: the per-connection handshake and
//! access control ([`handshake`]) and the per-vPSD natural batching ([`coalesce`]). The
//! thread-per-core server (glommio executors, listeners, routing between shards, group
//! commit) builds on them.

pub mod coalesce;
pub mod handshake;
pub mod shard;
