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
/// Puts of one write at most: the state, the keys (when they changed) and, when the write
/// creates the vPSD, its owner key and its entry in the owners' index.
pub const PUTS_PER_WRITE_MAX: usize = 4;
/// Reads of one write in a failed transaction's else-branch: its owner and its state.
pub const READS_PER_WRITE: usize = 2;
/// The most writes one transaction holds.
pub const WRITES_PER_TXN_MAX: usize = TXN_OPS_MAX / PUTS_PER_WRITE_MAX;
// Within the limit: the compares, the puts and the else-branch's reads.
const _: () = assert!(WRITES_PER_TXN_MAX * COMPARES_PER_WRITE <= TXN_OPS_MAX);
const _: () = assert!(WRITES_PER_TXN_MAX * PUTS_PER_WRITE_MAX <= TXN_OPS_MAX);
const _: () = assert!(WRITES_PER_TXN_MAX * READS_PER_WRITE <= TXN_OPS_MAX);

/// One vPSD's new state, to be written if this appliance still owns it and nobody else
/// wrote its state since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub vpsd_id: u64,
    /// The owner key's `mod_revision` when this appliance became the vPSD's owner; 0 for
    /// the vPSD's first write, which creates its owner key (it must not exist).
    pub epoch: i64,
    /// The state key's `mod_revision` this appliance last wrote or read (0: absent).
    pub last: i64,
    pub state: Vec<u8>,
    /// The vPSD's sealed keys, when they changed (provision, rotation, withdrawal).
    pub keys: Option<Vec<u8>>,
}

/// What a failed transaction's else-branch read of one vPSD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The owner key's value and `mod_revision`, if it exists.
    pub owner: Option<(String, i64)>,
    /// The state key's value and `mod_revision`, if it exists.
    pub state: Option<(Vec<u8>, i64)>,
}

/// The outcome of one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Durable in etcd at `revision` (the vPSD's new `last`), owned under `epoch` (for the
    /// first write, the revision that created its owner key).
    Written { revision: i64, epoch: i64 },
    /// The owner key moved, or (first write) already existed: this appliance does not own
    /// the vPSD (`owner` does, if any). Nothing of the session may be delivered.
    Fenced { owner: Option<String> },
    /// The owner key holds, but the state was written by someone else since `last` (a bug,
    /// or a second process with this appliance's id): nothing may be delivered.
    Stale { revision: i64 },
    /// Its own compares hold: it failed only with the transaction it shared; send it again.
    /// Also a write whose outcome is unknown (a timeout, a lost connection).
    Retry,
    /// etcd refused its transaction before applying anything (out of space, too large).
    Refused,
}

/// The most value bytes one transaction carries: etcd refuses a request over 1.5 MiB
/// (`--max-request-bytes`); keys, compares and framing fit in the rest.
pub const TXN_VALUE_BYTES_MAX: usize = 1 << 20;

/// The value bytes one write puts.
fn value_bytes(write: &StateWrite) -> usize {
    write.state.len() + write.keys.as_ref().map_or(0, Vec::len)
}

/// The transactions of a round, as indices into `writes`: consecutive groups of at most
/// [`WRITES_PER_TXN_MAX`] writes and [`TXN_VALUE_BYTES_MAX`] value bytes (a single larger
/// write goes alone).
pub fn batches(writes: &[StateWrite], indices: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for &index in indices {
        let size = value_bytes(&writes[index]);
        let full = out.last().is_none_or(|batch| {
            batch.len() >= WRITES_PER_TXN_MAX || bytes + size > TXN_VALUE_BYTES_MAX
        });
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(batch) = out.last_mut() {
            batch.push(index);
        }
    }
    out
}

/// What a failed transaction means for `write` of `appliance`, from what its else-branch
/// read. A write whose value is already there was applied by an earlier attempt whose
/// answer was lost (a timeout): it is written, at the revision etcd shows.
pub fn judge(write: &StateWrite, appliance: &str, seen: &Seen) -> Outcome {
    let epoch = match &seen.owner {
        Some((owner, revision))
            if owner == appliance && (write.epoch == 0 || *revision == write.epoch) =>
        {
            *revision
        }
        // A first write while nobody owns the vPSD: only the shared transaction failed.
        None if write.epoch == 0 => {
            return match &seen.state {
                None => Outcome::Retry,
                Some((_, revision)) => Outcome::Stale {
                    revision: *revision,
                },
            }
        }
        other => {
            return Outcome::Fenced {
                owner: other.as_ref().map(|(owner, _)| owner.clone()),
            }
        }
    };
    match &seen.state {
        Some((value, revision)) if *value == write.state => Outcome::Written {
            revision: *revision,
            epoch,
        },
        // A first write whose owner key is ours but whose state is not: an earlier attempt
        // of it was applied, and the state moved on since (not by us).
        _ if write.epoch == 0 => Outcome::Stale {
            revision: seen.state.as_ref().map_or(0, |(_, revision)| *revision),
        },
        Some((_, revision)) if *revision != write.last => Outcome::Stale {
            revision: *revision,
        },
        None if write.last != 0 => Outcome::Stale { revision: 0 },
        _ => Outcome::Retry,
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
            keys: None,
        }
    }

    fn seen(owner: Option<(&str, i64)>, state: Option<(&[u8], i64)>) -> Seen {
        Seen {
            owner: owner.map(|(name, revision)| (name.to_owned(), revision)),
            state: state.map(|(value, revision)| (value.to_vec(), revision)),
        }
    }

    #[test]
    fn a_round_is_split_within_the_transaction_limits() {
        let writes: Vec<StateWrite> = (0..100).map(|id| write(id, 5, 0)).collect();
        let all: Vec<usize> = (0..100).collect();
        let sizes: Vec<usize> = batches(&writes, &all).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![32, 32, 32, 4], "by count");
        // vPSDs with many rotated keys: 82 KB of keys each.
        let big: Vec<StateWrite> = (0..30)
            .map(|id| StateWrite {
                keys: Some(vec![0; 82_000]),
                ..write(id, 5, 0)
            })
            .collect();
        let all: Vec<usize> = (0..30).collect();
        let sizes: Vec<usize> = batches(&big, &all).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![12, 12, 6], "by bytes");
        let huge = vec![StateWrite {
            keys: Some(vec![0; 2 << 20]),
            ..write(1, 5, 0)
        }];
        assert_eq!(batches(&huge, &[0]), vec![vec![0]], "alone");
    }

    #[test]
    fn a_failed_transaction_is_judged_write_by_write() {
        let ours = write(7, 10, 12);
        let other: &[u8] = b"other";
        assert_eq!(
            judge(&ours, "a1", &seen(Some(("a2", 15)), Some((other, 12)))),
            Outcome::Fenced {
                owner: Some("a2".into())
            },
            "another appliance took it over"
        );
        assert_eq!(
            judge(&ours, "a1", &seen(None, Some((other, 12)))),
            Outcome::Fenced { owner: None },
            "its owner key is gone"
        );
        assert_eq!(
            judge(&ours, "a1", &seen(Some(("a1", 9)), Some((other, 12)))),
            Outcome::Fenced {
                owner: Some("a1".into())
            },
            "owned again by this appliance, but under another epoch: this write is stale"
        );
        assert_eq!(
            judge(&ours, "a1", &seen(Some(("a1", 10)), Some((other, 14)))),
            Outcome::Stale { revision: 14 }
        );
        assert_eq!(
            judge(&ours, "a1", &seen(Some(("a1", 10)), Some((other, 12)))),
            Outcome::Retry,
            "its own compares hold: another write failed the transaction"
        );
        assert_eq!(
            judge(&ours, "a1", &seen(Some(("a1", 10)), Some((&[1, 2, 3], 14)))),
            Outcome::Written {
                revision: 14,
                epoch: 10
            },
            "an earlier attempt was applied and its answer lost"
        );
    }

    #[test]
    fn a_first_write_creates_the_owner_unless_someone_has_it() {
        let first = write(7, 0, 0);
        assert_eq!(
            judge(&first, "a1", &seen(Some(("a2", 3)), None)),
            Outcome::Fenced {
                owner: Some("a2".into())
            }
        );
        assert_eq!(
            judge(&first, "a1", &seen(None, None)),
            Outcome::Retry,
            "nobody has it: only the shared transaction failed"
        );
        assert_eq!(
            judge(
                &first,
                "a1",
                &seen(Some(("a1", 20)), Some((&[1, 2, 3], 20)))
            ),
            Outcome::Written {
                revision: 20,
                epoch: 20
            },
            "an earlier attempt created it"
        );
    }
}
