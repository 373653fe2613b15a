//! The cluster (milestone 2, in progress): every vPSD's state replicated and fenced on
//! etcd, so that no money is lost when an appliance or its disk dies.
//!
//! - [`keys`]: where things live in etcd (under a prefix): each appliance's key under its
//!   lease, each vPSD's owner key (its `mod_revision` is the vPSD's fencing epoch) and
//!   state key.
//! - [`fence`]: the fenced commit, sans-io: a commit round's state writes grouped into
//!   transactions within etcd's operation limit, and what a failed transaction means for
//!   each write.
//! - [`etcd`]: the connection to etcd, on a thread of its own (the client runs on tokio;
//!   nothing outside this module sees tokio): the appliance's lease and its keep-alive,
//!   self-fencing, owner claims and fenced commits, as blocking calls for the shards'
//!   blocking pools.
//!
//! Safety never rests on timing: a stale owner is refused by the transaction's compare on
//! the owner key's revision. The lease only tells the others when an appliance is gone.

pub mod etcd;
pub mod fence;
pub mod keys;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot start the etcd thread: {0}")]
    Thread(std::io::Error),
    #[error("the etcd thread has stopped")]
    Stopped,
    #[error("etcd answered a transaction of {sent} operations with {received} responses")]
    Answer { sent: usize, received: usize },
    #[error("this appliance's lease is lost (keep-alive failed for {silent_ms} ms): it commits nothing until it has a lease again")]
    LeaseLost { silent_ms: u64 },
}
