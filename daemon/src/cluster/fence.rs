//! The fenced commit, sans-io: how a commit round's state writes go to etcd, and what a
//! failed transaction means for each of them.
//!
//! Each write is guarded by two compares: the vPSD's owner key still has the revision it
//! had when this appliance became its owner (the fencing epoch), and its state key still
//! has the revision this appliance last wrote (0: none yet). Writes that finish in the same
//! round share transactions; etcd refuses a transaction with more than `--max-txn-ops`
//! (128 by default) compares, or operations in a branch, so one holds at most
//! [`WRITES_PER_TXN_MAX`] writes. One failed compare fails the whole transaction: its
//! else-branch reads every owner and state key of the batch, and [`judge`] says for each
//! write whether this appliance was fenced off, the state moved under it, or it only shared
//! the transaction with one that failed and is to be sent again.

/// etcd's default `--max-txn-ops`: the most compares, and the most operations in each
/// branch, of one transaction.
pub const TXN_OPS_MAX: usize = 128;
/// Compares guarding one write: the owner's revision and the state's.
pub const COMPARES_PER_WRITE: usize = 2;
/// The most writes one transaction holds.
pub const WRITES_PER_TXN_MAX: usize = TXN_OPS_MAX / COMPARES_PER_WRITE;
// Within the limit: the compares, the puts (one per write) and the reads of a failed
// transaction's else-branch (the owner and the state of each write).
const _: () = assert!(WRITES_PER_TXN_MAX * COMPARES_PER_WRITE <= TXN_OPS_MAX);
const _: () = assert!(WRITES_PER_TXN_MAX * 2 <= TXN_OPS_MAX);

/// One vPSD's new state, to be written if this appliance still owns it and nobody else
/// wrote its state since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub vpsd_id: u64,
    /// The owner key's `mod_revision` when this appliance claimed the vPSD.
    pub epoch: i64,
    /// The state key's `mod_revision` this appliance last wrote or read (0: absent).
    pub last: i64,
    pub state: Vec<u8>,
}

/// What a failed transaction's else-branch read of one vPSD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The owner key's value and `mod_revision`, if it exists.
    pub owner: Option<(String, i64)>,
    /// The state key's `mod_revision` (0: absent).
    pub state_revision: i64,
}

/// The outcome of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in etcd at this revision: the vPSD's new `last`.
    Written { revision: i64 },
    /// The owner key moved: this appliance no longer owns the vPSD (`owner` does, if any).
    /// Nothing of the session may be delivered.
    Fenced { owner: Option<String> },
    /// The owner key holds, but the state was written by someone else since `last` (a bug,
    /// or a second process with this appliance's id): nothing may be delivered.
    Stale { revision: i64 },
    /// Its own compares hold: it failed only with the transaction it shared; send it again.
    Retry,
}

/// The transactions of a round: consecutive groups of at most [`WRITES_PER_TXN_MAX`].
pub fn batches(writes: &[StateWrite]) -> std::slice::Chunks<'_, StateWrite> {
    writes.chunks(WRITES_PER_TXN_MAX)
}

/// What a failed transaction means for `write`, from what its else-branch read.
pub fn judge(write: &StateWrite, seen: &Seen) -> Outcome {
    match &seen.owner {
        Some((_, revision)) if *revision == write.epoch => {}
        other => {
            return Outcome::Fenced {
                owner: other.as_ref().map(|(owner, _)| owner.clone()),
            }
        }
    }
    if seen.state_revision != write.last {
        Outcome::Stale {
            revision: seen.state_revision,
        }
    } else {
        Outcome::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(vpsd_id: u64, epoch: i64, last: i64) -> StateWrite {
        StateWrite {
            vpsd_id,
            epoch,
            last,
            state: vec![1, 2, 3],
        }
    }

    #[test]
    fn a_round_is_split_within_the_transaction_limit() {
        let writes: Vec<StateWrite> = (0..150).map(|id| write(id, 5, 0)).collect();
        let sizes: Vec<usize> = batches(&writes).map(<[StateWrite]>::len).collect();
        assert_eq!(sizes, vec![64, 64, 22]);
    }

    #[test]
    fn a_failed_transaction_is_judged_write_by_write() {
        let ours = write(7, 10, 12);
        let seen = |owner: Option<(&str, i64)>, state_revision| Seen {
            owner: owner.map(|(name, revision)| (name.to_owned(), revision)),
            state_revision,
        };
        assert_eq!(
            judge(&ours, &seen(Some(("a2", 15)), 12)),
            Outcome::Fenced {
                owner: Some("a2".into())
            },
            "another appliance took it over"
        );
        assert_eq!(
            judge(&ours, &seen(None, 12)),
            Outcome::Fenced { owner: None },
            "its owner key is gone"
        );
        assert_eq!(
            judge(&ours, &seen(Some(("a1", 10)), 14)),
            Outcome::Stale { revision: 14 }
        );
        assert_eq!(
            judge(&ours, &seen(Some(("a1", 10)), 12)),
            Outcome::Retry,
            "its own compares hold: another write failed the transaction"
        );
    }
}
