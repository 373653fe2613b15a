//! The replicated half of a shard's durability (cluster mode): which of its vPSDs still
//! have records that etcd does not hold, what each commit round writes, and what its
//! outcomes mean (docs/CLUSTER.md).
//!
//! For every vPSD it owns, the book keeps the fencing epoch (its owner key's revision), the
//! revision of its state key as last written or read, the state etcd holds (to fall back
//! to when a write is refused), and the sequence of its first local record etcd does not
//! hold yet. The shard answers a request only once the journal is durable up to it *and*
//! every vPSD's records up to it are in etcd: [`ReplicaBook::replicated_through`].
//!
//! A write whose outcome is unknown (a timeout, a lost connection) may or may not be in
//! etcd: it is sent again, the very same bytes, until etcd says which (the fenced compare
//! then finds its value there, or not). Until then nothing of its vPSD is voided, even if
//! a later attempt is refused, and the records that came after it wait for the next write.

use std::collections::{BTreeSet, HashMap};

use crate::cluster::fence::{Outcome, StateWrite};
use crate::engine::{Engine, RecentRequest, Record, Vpsd};

use super::codec::{encode_replica_keys, encode_replica_state, CodecError, Encoder, Origin};

/// The most requests a replicated state remembers: those of the vPSD's last two writes, at
/// most this many (the newest).
pub const RECENT_REQUESTS_MAX: usize = 1024;

/// A write sent to etcd whose outcome is not known yet.
#[derive(Debug, Clone)]
struct Sent {
    vpsd: Vpsd,
    /// The requests of the records it covers (remembered with the next write too).
    recent: Vec<RecentRequest>,
    state: Vec<u8>,
    keys: Option<Vec<u8>>,
    /// Attempts so far (more than one: an earlier one's outcome was unknown).
    attempts: u32,
    in_flight: bool,
}

/// What the book knows of one vPSD this appliance owns.
#[derive(Debug, Clone)]
struct Entry {
    /// The owner key's revision when this appliance became the owner (0: not yet in etcd;
    /// the first write creates the owner key).
    epoch: i64,
    /// The state key's revision last written or read (0: none).
    last: i64,
    /// The state etcd holds (None before the first write).
    replicated: Option<Vpsd>,
    /// The sequence of the first local record etcd is not known to hold.
    pending_since: Option<u64>,
    /// Whether the keys changed since they were last sent.
    keys_dirty: bool,
    /// The last local record of the vPSD.
    origin: Origin,
    /// The write sent and not known to be in etcd yet.
    sent: Option<Sent>,
    /// The first record appended after `sent` was made (it does not cover it).
    after_sent: Option<u64>,
    /// A vPSD of the appliance's single-node past, written to etcd at its first cluster
    /// start: a refusal does not void it, it is sent again.
    imported: bool,
    /// The requests of the last write etcd holds, and of the records since.
    recent_written: Vec<RecentRequest>,
    recent_new: Vec<RecentRequest>,
}

/// How a write ended, for the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Another appliance owns the vPSD (or etcd holds a state this appliance did not
    /// write): every local record from `since` on is void, and so are the answers that
    /// depend on them. The vPSD leaves this appliance.
    Moved {
        vpsd_id: u64,
        since: u64,
        owner: Option<String>,
    },
    /// etcd refused the write (no lease, too large) at its first attempt: the records from
    /// `since` on are void and the vPSD goes back to the state etcd holds (`None`: it never
    /// had one, and the vPSD leaves this appliance).
    Refused {
        vpsd_id: u64,
        since: u64,
        replicated: Option<Box<Vpsd>>,
    },
}

/// The book of one shard.
#[derive(Debug)]
pub struct ReplicaBook {
    appliance: String,
    shard: u16,
    vpsds: HashMap<u64, Entry>,
    /// (pending_since, vPSD) of every vPSD with records etcd is not known to hold.
    pending: BTreeSet<(u64, u64)>,
    /// The vPSDs of the round in flight, in the order of its writes.
    round: Vec<u64>,
    scratch: Encoder,
    /// vPSDs found owned by another appliance at start, and by whom.
    departed: Vec<(u64, String)>,
    /// Imported vPSDs not yet in etcd.
    imports_left: usize,
}

/// A vPSD's ownership as etcd shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub epoch: i64,
    pub last: i64,
}

impl ReplicaBook {
    pub fn new(appliance: &str, shard: u16) -> Self {
        Self {
            appliance: appliance.to_owned(),
            shard,
            vpsds: HashMap::new(),
            pending: BTreeSet::new(),
            round: Vec::new(),
            scratch: Encoder::default(),
            departed: Vec::new(),
            imports_left: 0,
        }
    }

    /// How many vPSDs of a first cluster start are not in etcd yet: until none is, the
    /// data directory must not be recorded as a member (a restart then imports them again).
    pub fn imports_left(&self) -> usize {
        self.imports_left
    }

    /// The vPSDs found owned by another appliance at start (for `vpsd-moved` answers).
    pub fn take_departed(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.departed)
    }

    pub fn appliance(&self) -> &str {
        &self.appliance
    }

    /// vPSDs this shard owns in the cluster.
    pub fn owned(&self) -> usize {
        self.vpsds.len()
    }

    /// The vPSD's epoch and last revision, if this shard owns it.
    pub fn ownership(&self, vpsd_id: u64) -> Option<Owned> {
        self.vpsds.get(&vpsd_id).map(|entry| Owned {
            epoch: entry.epoch,
            last: entry.last,
        })
    }

    /// The vPSD's ownership if etcd holds every record of it and no write of it is under
    /// way or of unknown outcome (it may be handed over as it is).
    pub fn settled(&self, vpsd_id: u64) -> Option<Owned> {
        self.vpsds
            .get(&vpsd_id)
            .filter(|entry| {
                entry.epoch != 0 && entry.pending_since.is_none() && entry.sent.is_none()
            })
            .map(|entry| Owned {
                epoch: entry.epoch,
                last: entry.last,
            })
    }

    /// The sequence of the vPSD's first record etcd is not known to hold, if any.
    pub fn pending_since(&self, vpsd_id: u64) -> Option<u64> {
        self.vpsds
            .get(&vpsd_id)
            .and_then(|entry| entry.pending_since)
    }

    /// The requests remembered with the state etcd holds of the vPSD.
    pub fn recent_written(&self, vpsd_id: u64) -> Vec<RecentRequest> {
        self.vpsds
            .get(&vpsd_id)
            .map_or_else(Vec::new, |entry| entry.recent_written.clone())
    }

    /// Whether this shard owns the vPSD in the cluster (or is creating it).
    pub fn owns(&self, vpsd_id: u64) -> bool {
        self.vpsds.contains_key(&vpsd_id)
    }

    /// Every local record up to this sequence is in etcd (or void).
    pub fn replicated_through(&self) -> u64 {
        self.pending
            .first()
            .map_or(u64::MAX, |(since, _)| since.saturating_sub(1))
    }

    /// Whether a round has writes to make.
    pub fn has_writes(&self) -> bool {
        self.round.is_empty() && !self.pending.is_empty()
    }

    fn fresh(appliance: &str, shard: u16, sequence: u64) -> Entry {
        Entry {
            epoch: 0,
            last: 0,
            replicated: None,
            pending_since: None,
            keys_dirty: true,
            origin: Origin {
                appliance: appliance.to_owned(),
                shard,
                sequence,
                digest: [0; 16],
            },
            sent: None,
            after_sent: None,
            imported: false,
            recent_written: Vec::new(),
            recent_new: Vec::new(),
        }
    }

    /// A vPSD whose state etcd holds as `replicated`, owned under `owned` (at start, or
    /// taken over): nothing to write.
    pub fn adopt(&mut self, vpsd: &Vpsd, owned: &Owned, recent: Vec<RecentRequest>, sequence: u64) {
        self.forget(vpsd.id);
        let mut entry = Self::fresh(&self.appliance, self.shard, sequence);
        entry.epoch = owned.epoch;
        entry.last = owned.last;
        entry.replicated = Some(vpsd.clone());
        entry.keys_dirty = false;
        entry.recent_written = recent;
        self.vpsds.insert(vpsd.id, entry);
    }

    /// A local vPSD etcd does not know yet (a first cluster start imports the appliance's
    /// vPSDs): its first write creates it.
    pub fn import(&mut self, vpsd_id: u64, sequence: u64) {
        self.forget(vpsd_id);
        let mut entry = Self::fresh(&self.appliance, self.shard, sequence);
        entry.imported = true;
        self.imports_left += 1;
        self.vpsds.insert(vpsd_id, entry);
        self.mark(vpsd_id, sequence, true, [0; 16]);
    }

    /// Drops a vPSD (released, or about to be adopted anew).
    pub fn forget(&mut self, vpsd_id: u64) {
        if let Some(entry) = self.vpsds.remove(&vpsd_id) {
            if entry.imported {
                self.imports_left = self.imports_left.saturating_sub(1);
            }
            if let Some(since) = entry.pending_since {
                self.pending.remove(&(since, vpsd_id));
            }
        }
    }

    /// A record was appended at `sequence` (its payload's digest): etcd must get the
    /// vPSD's new state.
    pub fn appended(&mut self, record: &Record, sequence: u64, digest: [u8; 16]) {
        let vpsd_id = record.vpsd_id();
        let keys = matches!(
            record,
            Record::Provision { .. } | Record::RotateKey { .. } | Record::Withdraw { .. }
        );
        if matches!(record, Record::Provision { .. }) && !self.vpsds.contains_key(&vpsd_id) {
            self.vpsds
                .insert(vpsd_id, Self::fresh(&self.appliance, self.shard, sequence));
        }
        if let Some(entry) = self.vpsds.get_mut(&vpsd_id) {
            entry.recent_new.extend(RecentRequest::of_record(record));
        }
        self.mark(vpsd_id, sequence, keys, digest);
    }

    fn mark(&mut self, vpsd_id: u64, sequence: u64, keys: bool, digest: [u8; 16]) {
        let Some(entry) = self.vpsds.get_mut(&vpsd_id) else {
            return;
        };
        entry.origin.sequence = sequence;
        entry.origin.digest = digest;
        entry.keys_dirty |= keys;
        if entry.sent.is_some() {
            entry.after_sent.get_or_insert(sequence);
        }
        if entry.pending_since.is_none() {
            entry.pending_since = Some(sequence);
            self.pending.insert((sequence, vpsd_id));
        }
    }

    /// The writes of a round: every vPSD with records etcd is not known to hold, at its
    /// state in `engine` now (or, after an unknown outcome, the same write again). Empty
    /// while a round is in flight.
    pub fn round(&mut self, engine: &Engine) -> Result<Vec<StateWrite>, CodecError> {
        if !self.round.is_empty() {
            return Ok(Vec::new());
        }
        let mut writes = Vec::with_capacity(self.pending.len());
        for &(_, vpsd_id) in &self.pending {
            let Some(entry) = self.vpsds.get_mut(&vpsd_id) else {
                continue;
            };
            let sent = match entry.sent.take() {
                Some(sent) => sent,
                None => {
                    let Some(vpsd) = engine.vpsd(vpsd_id) else {
                        continue;
                    };
                    let covered = std::mem::take(&mut entry.recent_new);
                    let mut recent: Vec<RecentRequest> = entry
                        .recent_written
                        .iter()
                        .chain(&covered)
                        .cloned()
                        .collect();
                    if recent.len() > RECENT_REQUESTS_MAX {
                        recent.drain(..recent.len() - RECENT_REQUESTS_MAX);
                    }
                    encode_replica_state(vpsd, &entry.origin, &recent, &mut self.scratch)?;
                    let state = self.scratch.bytes.clone();
                    let keys = if entry.keys_dirty {
                        encode_replica_keys(vpsd, &mut self.scratch)?;
                        Some(self.scratch.bytes.clone())
                    } else {
                        None
                    };
                    entry.keys_dirty = false;
                    entry.after_sent = None;
                    Sent {
                        vpsd: vpsd.clone(),
                        recent: covered,
                        state,
                        keys,
                        attempts: 0,
                        in_flight: false,
                    }
                }
            };
            writes.push(StateWrite {
                vpsd_id,
                epoch: entry.epoch,
                last: entry.last,
                state: sent.state.clone(),
                keys: sent.keys.clone(),
            });
            entry.sent = Some(Sent {
                attempts: sent.attempts + 1,
                in_flight: true,
                ..sent
            });
            self.round.push(vpsd_id);
        }
        Ok(writes)
    }

    /// The outcome of the round in flight: `Ok` with one outcome per write, or the error
    /// that failed it as a whole (`Err(true)`: a refusal, surely not applied). Returns what
    /// the shard must void; writes whose outcome is unknown are sent again next round.
    pub fn settle(&mut self, outcomes: Result<Vec<Outcome>, bool>) -> Vec<Settled> {
        let round = std::mem::take(&mut self.round);
        let mut voided = Vec::new();
        for (index, vpsd_id) in round.into_iter().enumerate() {
            let outcome = match &outcomes {
                Ok(outcomes) => outcomes.get(index).cloned().unwrap_or(Outcome::Retry),
                Err(true) => Outcome::Refused,
                Err(false) => Outcome::Retry,
            };
            let Some(entry) = self.vpsds.get_mut(&vpsd_id) else {
                continue;
            };
            let Some(mut sent) = entry.sent.take() else {
                continue;
            };
            let since = entry.pending_since.unwrap_or(0);
            // A refusal voids only a first attempt: an earlier one may have been applied.
            let refused = outcome == Outcome::Refused && sent.attempts == 1 && !entry.imported;
            match outcome {
                Outcome::Written { revision, epoch } => {
                    entry.epoch = epoch;
                    entry.last = revision;
                    entry.replicated = Some(sent.vpsd);
                    entry.recent_written = sent.recent;
                    if entry.imported {
                        entry.imported = false;
                        self.imports_left = self.imports_left.saturating_sub(1);
                    }
                    self.pending.remove(&(since, vpsd_id));
                    entry.pending_since = entry.after_sent.take();
                    if let Some(later) = entry.pending_since {
                        self.pending.insert((later, vpsd_id));
                    }
                }
                Outcome::Refused if refused => {
                    let replicated = entry.replicated.clone().map(Box::new);
                    if replicated.is_none() {
                        self.forget(vpsd_id);
                    } else {
                        self.clear_pending(vpsd_id);
                    }
                    voided.push(Settled::Refused {
                        vpsd_id,
                        since,
                        replicated,
                    });
                }
                Outcome::Retry | Outcome::Refused => {
                    // Unknown (or refused after an unknown attempt, or an import): the same
                    // bytes go again next round.
                    sent.in_flight = false;
                    entry.sent = Some(sent);
                }
                Outcome::Fenced { owner } => {
                    self.forget(vpsd_id);
                    voided.push(Settled::Moved {
                        vpsd_id,
                        since,
                        owner,
                    });
                }
                Outcome::Stale { revision } => {
                    tracing::error!(
                        vpsd = vpsd_id,
                        revision,
                        "etcd holds a state of this vPSD that this appliance did not write: \
                         another process uses this appliance's id? The vPSD leaves it"
                    );
                    self.forget(vpsd_id);
                    voided.push(Settled::Moved {
                        vpsd_id,
                        since,
                        owner: None,
                    });
                }
            }
        }
        voided
    }

    /// Forgets the records etcd does not hold (they were voided): the vPSD is back at its
    /// replicated state.
    fn clear_pending(&mut self, vpsd_id: u64) {
        if let Some(entry) = self.vpsds.get_mut(&vpsd_id) {
            if let Some(since) = entry.pending_since.take() {
                self.pending.remove(&(since, vpsd_id));
            }
            entry.sent = None;
            entry.after_sent = None;
            entry.keys_dirty = false;
            entry.recent_new.clear();
        }
    }
}

/// What the start found when it checked a shard's journal against etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// vPSDs whose local state is etcd's.
    pub agreed: usize,
    /// (vPSD, local version, etcd's version): local records past etcd's state were never
    /// acknowledged and are void.
    pub voided: Vec<(u64, u64, u64)>,
    /// (vPSD, local version, etcd's version): etcd is ahead (a torn tail, a replaced disk,
    /// a restored backup; local version 0: the vPSD was not here at all); the vPSD goes on
    /// from etcd's state and the local history misses the versions between.
    pub behind: Vec<(u64, u64, u64)>,
    /// (vPSD, owner): vPSDs another appliance owns now, or that were never replicated
    /// (owner empty), released here.
    pub released: Vec<(u64, String)>,
    /// vPSDs etcd did not know, written to it (the first start in cluster mode).
    pub imported: usize,
    /// (vPSD, reason): the local journal disagrees with etcd at the same version.
    pub locked: Vec<(u64, String)>,
}

/// Why the start could not check a shard against etcd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconcileError {
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Store(#[from] super::StoreError),
    #[error("vPSD {vpsd_id}: the state etcd holds does not decode: {source}")]
    Decode {
        vpsd_id: u64,
        source: indicia_proto::DecodeError,
    },
}

/// Checks a shard's vPSDs against etcd at start (cluster mode; the store's replica book is
/// enabled): each one this appliance owns continues from the state etcd holds; the others
/// leave. `here` says whether a vPSD id belongs to this shard; `import` (the data
/// directory's first start in cluster mode) writes the vPSDs etcd does not know to it
/// instead of releasing them. Everything it journals is durable when it returns.
pub fn reconcile(
    store: &mut super::Store,
    replicator: &dyn crate::cluster::Replicator,
    import: bool,
    here: impl Fn(u64) -> bool,
    now_unix: u64,
) -> Result<Reconciled, ReconcileError> {
    use crate::engine::ResetCause;
    let me = replicator.appliance().to_owned();
    let mut local: Vec<u64> = store.engine.vpsds().map(|vpsd| vpsd.id).collect();
    local.sort_unstable();
    let missing: Vec<u64> = replicator
        .owned()?
        .into_iter()
        .filter(|id| here(*id) && local.binary_search(id).is_err())
        .collect();
    let ids: Vec<u64> = local.iter().chain(&missing).copied().collect();
    let stored = replicator.load(ids.clone())?;
    let mut report = Reconciled::default();
    for (vpsd_id, stored) in ids.into_iter().zip(stored) {
        let local_version = store.engine.vpsd(vpsd_id).map_or(0, |vpsd| vpsd.version);
        match (stored.owner, stored.state, stored.keys) {
            (Some((owner, epoch)), Some((state, revision)), Some(keys)) if owner == me => {
                let super::codec::Replicated {
                    vpsd: replicated,
                    recent,
                    ..
                } = super::codec::decode_replica(vpsd_id, &state, &keys)
                    .map_err(|source| ReconcileError::Decode { vpsd_id, source })?;
                let owned = Owned {
                    epoch,
                    last: revision,
                };
                let theirs = replicated.version;
                match store.engine.vpsd(vpsd_id) {
                    Some(mine) if mine.version == theirs => {
                        if *mine != replicated {
                            let reason = format!(
                                "the local journal disagrees with the cluster's state at \
                                 version {theirs}"
                            );
                            store.engine.lock_integrity(vpsd_id, &reason);
                            report.locked.push((vpsd_id, reason));
                        } else {
                            report.agreed += 1;
                        }
                        let sequence = store.journal.last_sequence();
                        if let Some(book) = store.replica_mut() {
                            book.adopt(&replicated, &owned, recent, sequence);
                        }
                    }
                    Some(mine) if mine.version > theirs => {
                        store.commit_reset(
                            replicated,
                            ResetCause::Voided { local_version },
                            recent,
                            &owned,
                            now_unix,
                        )?;
                        report.voided.push((vpsd_id, local_version, theirs));
                    }
                    _ => {
                        store.commit_reset(
                            replicated,
                            ResetCause::Behind { local_version },
                            recent,
                            &owned,
                            now_unix,
                        )?;
                        report.behind.push((vpsd_id, local_version, theirs));
                    }
                }
            }
            (Some((owner, epoch)), _, _) if owner == me => {
                // Claimed but never written: its provisioning was never acknowledged.
                replicator.release(vpsd_id, epoch)?;
                store.commit_release(vpsd_id, "", 0, now_unix)?;
                report.released.push((vpsd_id, String::new()));
            }
            (Some((owner, _)), _, _) => {
                let replicated_version = 0;
                store.commit_release(vpsd_id, &owner, replicated_version, now_unix)?;
                if let Some(book) = store.replica_mut() {
                    book.departed.push((vpsd_id, owner.clone()));
                }
                report.released.push((vpsd_id, owner));
            }
            (None, _, _) if import && store.engine.vpsd(vpsd_id).is_some() => {
                let sequence = store.journal.last_sequence();
                if let Some(book) = store.replica_mut() {
                    book.import(vpsd_id, sequence.max(1));
                }
                report.imported += 1;
            }
            (None, _, _) => {
                store.commit_release(vpsd_id, "", 0, now_unix)?;
                report.released.push((vpsd_id, String::new()));
            }
        }
    }
    store.flush()?;
    Ok(report)
}
