//! The cluster (milestone 2): every vPSD's state replicated and fenced on etcd, so that no
//! money is lost when an appliance or its disk dies (docs/CLUSTER.md).
//!
//! Like the journal, this layer moves bytes: it knows etcd's keys and transactions, never
//! what a vPSD is (the store encodes the values, `store::replica`).
//!
//! - [`keys`]: where things live in etcd (under a prefix).
//! - [`fence`]: the fenced commit, sans-io: a round's state writes grouped into
//!   transactions within etcd's operation limit, and what a failed transaction means for
//!   each write.
//! - `etcd` (feature `cluster`): the connection to etcd, on a thread of its own (the client
//!   runs on tokio; nothing outside that module sees tokio): the lease and its keep-alive,
//!   self-fencing, fenced commits, the takeover of dead appliances' vPSDs.
//! - [`Replicator`]: what a shard's commit round sees of all this: a future per round.
//! - [`local`]: a local etcd cluster on loopback (the Debian binary), for the cluster demo
//!   and the tests.
//!
//! Safety never rests on timing: a stale owner is refused by the transaction's compare on
//! the owner key's revision. The lease only tells the others when an appliance is gone.

#[cfg(feature = "cluster")]
pub mod etcd;
pub mod fence;
pub mod keys;
pub mod local;
pub mod placement;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fence::{Outcome, StateWrite};
use placement::Placement;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[cfg(feature = "cluster")]
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot start the etcd thread: {0}")]
    Thread(std::io::Error),
    #[error("the etcd thread has stopped")]
    Stopped,
    /// A failure of a transaction this round shared with other shards' (its outcome is
    /// unknown).
    #[error("{0}")]
    Shared(String),
    #[error("etcd answered a transaction of {sent} operations with {received} responses")]
    Answer { sent: usize, received: usize },
    #[error("this appliance's lease is lost (keep-alive failed for {silent_ms} ms): it commits nothing until it has a lease again")]
    LeaseLost { silent_ms: u64 },
    #[error("etcd refused a transaction as too large ({0}): its vPSDs' writes are refused")]
    TooLarge(String),
    #[error("this appliance's master key is not the cluster's (etcd holds another check value under {key}): copy master.key from a member of the cluster (docs/CLUSTER.md)")]
    MasterKeyMismatch { key: String },
    #[error("the appliance does not serve yet: it takes nothing over before it serves")]
    NotServing,
    #[error("appliance id {0:?} is already alive in the cluster: each appliance needs its own id")]
    DuplicateAppliance(String),
}

impl ClusterError {
    /// Whether the failed writes surely did not reach etcd and never will (a refusal), as
    /// opposed to an outcome that is unknown (a timeout, a lost connection).
    pub fn refused(&self) -> bool {
        matches!(self, Self::LeaseLost { .. } | Self::TooLarge(_))
    }
}

/// One appliance of the cluster, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Its address (as it announced it when it joined).
    pub address: String,
    /// Whether its lease is alive.
    pub alive: bool,
    /// How many vPSDs it owns (by the owners' index).
    pub vpsds: u32,
    /// Whether an operator drains it.
    pub draining: bool,
}

/// An etcd answer on its way.
pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T, ClusterError>> + Send>>;

/// How a handover of a vPSD to another appliance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandOver {
    /// The target owns it now, at this epoch.
    Done { epoch: i64 },
    /// This appliance did not own it any more (another does; empty: nobody).
    Fenced { owner: String },
    /// Its state in etcd is not the one this appliance last wrote (a write is under way).
    Stale,
    /// The target is not live.
    NotLive,
    /// A rebalancing move that placement, read again, no longer asks for (a snapshot was
    /// stale): nothing was written.
    Misplaced,
}

/// A handover to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    pub vpsd_id: u64,
    /// This appliance's epoch and the state's revision it last wrote.
    pub epoch: i64,
    pub last: i64,
    pub to: String,
    /// For rebalancing: the vPSD's owner account. The move is then made only if placement,
    /// read again from etcd, puts the vPSD on `to` (two appliances with snapshots of
    /// different ages would otherwise move it back and forth).
    pub rebalancing: Option<String>,
}

/// What a pin applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinKey {
    Vpsd(u64),
    /// Every vPSD of this owner (customer) account.
    Owner(String),
}

/// An operator's change to placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Drain {
        appliance: String,
        undo: bool,
    },
    /// Pins to `appliance`, or removes the pin (None).
    Pin {
        key: PinKey,
        appliance: Option<String>,
    },
}

/// A cluster report on its way: (vPSDs taken over, every member by id).
pub type ReportFuture =
    Pin<Box<dyn Future<Output = Result<(u32, Vec<Member>), ClusterError>> + Send>>;

/// A commit round's writes on their way to etcd.
pub type CommitFuture = Pin<Box<dyn Future<Output = Result<Vec<Outcome>, ClusterError>> + Send>>;

/// The replicated half of a shard's commit round: the shard starts it beside its local
/// flush and delivers answers only when both are done.
pub trait Replicator: Send + Sync + std::fmt::Debug {
    /// Writes a round's states, each fenced by its owner's epoch and its last revision;
    /// one outcome per write, in order. Refused as a whole while this appliance's lease
    /// may have expired.
    fn commit(&self, writes: Vec<StateWrite>) -> CommitFuture;
    /// Whether commits are allowed now (the lease cannot have expired).
    fn may_commit(&self) -> bool;
    /// Whether new changes are taken now: commits are allowed and etcd is not out of space
    /// (then only the writes under way are sent, until etcd takes them).
    fn may_change(&self) -> bool;
    /// This appliance's id.
    fn appliance(&self) -> &str;
    /// What etcd holds of these vPSDs, in order. Blocking: for the start, before the
    /// shard serves.
    fn load(&self, vpsd_ids: Vec<u64>) -> Result<Vec<Stored>, ClusterError>;
    /// The vPSDs the owners' index gives this appliance. Blocking, like `load`.
    fn owned(&self) -> Result<Vec<u64>, ClusterError>;
    /// Gives up a vPSD owned at `epoch` whose first write never happened (its provisioning
    /// was never acknowledged). Blocking, like `load`.
    fn release(&self, vpsd_id: u64, epoch: i64) -> Result<bool, ClusterError>;
    /// The cluster's members; with `take_over_from`, after taking over every vPSD that
    /// appliance owns (by hand: `indiciactl cluster takeover`).
    fn report(&self, take_over_from: Option<String>) -> ReportFuture;
    /// What placement is made of, as last read (every sweep, and after an operator's
    /// change).
    fn placement(&self) -> Arc<Placement>;
    /// The owner key of each vPSD, read now: its owner's id, or None.
    fn locate(&self, vpsd_ids: Vec<u64>) -> Pending<Vec<Option<String>>>;
    /// What etcd holds of one vPSD, read now (an adoption on demand).
    fn fetch(&self, vpsd_id: u64) -> Pending<Stored>;
    /// Hands a vPSD this appliance owns over to another appliance.
    fn hand_over(&self, handover: Handover) -> Pending<HandOver>;
    /// Applies an operator's change to placement, then reports the members.
    fn operate(&self, operation: Operation) -> ReportFuture;
}

/// A vPSD this appliance just took over: its owner key now names this appliance at
/// `epoch`; the shard that holds it continues from `state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adoption {
    pub vpsd_id: u64,
    pub epoch: i64,
    /// The state's value and `mod_revision`.
    pub state: (Vec<u8>, i64),
    /// The sealed keys' value.
    pub keys: Vec<u8>,
    /// The appliance it was taken from.
    pub from: String,
}

/// What etcd holds of one vPSD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    /// The owner key's value and `mod_revision`.
    pub owner: Option<(String, i64)>,
    /// The state's value and `mod_revision`.
    pub state: Option<(Vec<u8>, i64)>,
    pub keys: Option<Vec<u8>>,
}

/// Rendezvous hashing: of the live appliances, the one that takes over `vpsd_id` (the same
/// answer on every appliance that sees the same live set).
pub fn successor(vpsd_id: u64, live: &[String]) -> Option<&str> {
    live.iter()
        .max_by_key(|appliance| {
            let mut bytes = vpsd_id.to_le_bytes().to_vec();
            bytes.extend_from_slice(appliance.as_bytes());
            (xxhash_rust::xxh3::xxh3_64(&bytes), appliance.as_str())
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_appliance_picks_the_same_successor_and_the_load_spreads() {
        let live: Vec<String> = ["a1", "a2", "a3"].map(String::from).to_vec();
        let mut reversed = live.clone();
        reversed.reverse();
        let mut counts = std::collections::HashMap::new();
        for vpsd in 0..3000u64 {
            let chosen = successor(vpsd, &live).unwrap();
            assert_eq!(successor(vpsd, &reversed), Some(chosen));
            *counts.entry(chosen).or_insert(0) += 1;
        }
        for appliance in ["a1", "a2", "a3"] {
            assert!(counts[appliance] > 800, "{counts:?}");
        }
        assert_eq!(successor(1, &[]), None);
    }
}
