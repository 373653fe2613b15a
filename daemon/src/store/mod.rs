//! The store: one shard's engine and its durable history together. Every change goes to
//! the journal first, then into the engine; at start the journal's history is replayed
//! into a fresh engine.
//!
//! - [`codec`]: what each record kind's payload holds (the journal frames them unread).
//! - [`Store::commit`]: the engine's successor state for a prepared record, the record
//!   encoded and appended, then the successor installed. Durability is the journal's group
//!   commit ([`Journal::flush_ticket`]); a second durability target (the cluster's
//!   replicated commit) joins here, beside the local append and flush.
//! - [`recovery`]: the replay of the history into the engine, with the findings.
//! - [`audit`]: the integrity monitor's read-only driver over the same replay, and
//!   [`ledger`]: the money movements it yields.
//!
//! The layers point one way: the server uses the store, the store uses the engine and the
//! journal, and the journal knows nothing above it.

pub mod audit;
pub mod backup;
pub mod codec;
pub mod fuzz;
pub mod ledger;
pub mod recovery;
pub mod replica;
pub mod window;

use std::path::Path;

use thiserror::Error;

use crate::cluster::fence::{Outcome, StateWrite};
use crate::engine::{ApplyError, Engine, RecentRequest, Record, ResetCause, Vpsd};
use crate::journal::{ChainKey, Journal, JournalConfig};
/// What one commit round must make durable, and the journal's errors (a failed flush is
/// fatal): the server's view of durability, through the store.
pub use crate::journal::{FlushTicket, JournalError};
use codec::{encode_checkpoint, encode_record, header_fields, CodecError, Encoder};
pub use recovery::{Finding, RecoveryReport};
use replica::{Owned, ReplicaBook, Settled};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A record that does not follow the current state (a bug in its caller, e.g. two
    /// sessions prepared from the same state): refused before it reaches the disk, where
    /// the next recovery would take it for damage.
    #[error("record does not follow the current state: {0}")]
    Rejected(ApplyError),
    /// A value the journal's encoding cannot hold; nothing was journaled.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A shard's engine and journal together.
#[derive(Debug)]
pub struct Store {
    pub engine: Engine,
    pub journal: Journal,
    /// The payload being encoded, reused from record to record.
    scratch: Encoder,
    /// Where the idempotency window's records begin (written into every checkpoint).
    window: window::WindowOrigin,
    /// Cluster mode: what etcd holds of this shard's vPSDs.
    replica: Option<ReplicaBook>,
}

impl Store {
    /// Opens and recovers a shard's journal into `engine`, which must be empty.
    pub fn open(
        dir: &Path,
        shard: u16,
        key: ChainKey,
        config: JournalConfig,
        mut engine: Engine,
    ) -> Result<(Self, RecoveryReport), StoreError> {
        let mut replay = recovery::Replay::new(&mut engine);
        let (journal, read) = Journal::open(dir, shard, key, config, &mut replay)?;
        let (report, window) = replay.finish(read);
        Ok((
            Self {
                engine,
                journal,
                scratch: Encoder::default(),
                window,
                replica: None,
            },
            report,
        ))
    }

    /// Opens shard `shard`'s store in `dir`, with the journal's chain key derived from the
    /// master key.
    pub fn open_shard(
        dir: &Path,
        shard: u16,
        master_key: &[u8; 32],
        config: JournalConfig,
        engine: Engine,
    ) -> Result<(Self, RecoveryReport), StoreError> {
        Self::open(
            dir,
            shard,
            ChainKey::derive(master_key, shard),
            config,
            engine,
        )
    }

    /// The sequence number of the last record committed (durable or not).
    pub fn last_sequence(&self) -> u64 {
        self.journal.last_sequence()
    }

    /// The sequence up to which everything committed is durable.
    pub fn durable_sequence(&self) -> u64 {
        self.journal.durable_sequence()
    }

    /// What the next commit round must make durable (group commit), if anything: see
    /// [`Journal::flush_ticket`]. Every durability target of a round joins here.
    pub fn flush_ticket(&mut self) -> Option<FlushTicket> {
        self.journal.flush_ticket()
    }

    /// Records a round's outcome; returns the durable sequence. A failure is fatal.
    pub fn complete(
        &mut self,
        ticket: &FlushTicket,
        result: std::io::Result<()>,
    ) -> Result<u64, JournalError> {
        self.journal.complete(ticket, result)
    }

    /// Makes everything durable and marks the journal closed cleanly; nothing more may be
    /// committed.
    pub fn close(&mut self) -> Result<u64, JournalError> {
        self.journal.close_cleanly()
    }

    /// Journals a prepared record (rotating to a new segment with a checkpoint when the
    /// current one is full), then applies it. Returns its sequence number; it is durable
    /// once a flush covers it.
    pub fn commit(&mut self, record: Record, now_unix: u64) -> Result<u64, StoreError> {
        // Checked before it is journaled: a record that does not follow the state must not
        // reach the disk.
        let next = self
            .engine
            .successor(&record)
            .map_err(StoreError::Rejected)?;
        let (kind, subject, at_unix) = header_fields(&record, now_unix);
        encode_record(&record, &mut self.scratch)?;
        let sequence = match self
            .journal
            .append(kind, subject, at_unix, &self.scratch.bytes)
        {
            Err(JournalError::SegmentFull { needed }) => {
                let mut checkpoint = Encoder::default();
                encode_checkpoint(
                    &self.engine.checkpoint(),
                    self.window.from(),
                    &mut checkpoint,
                )?;
                self.journal.rotate(&checkpoint.bytes, now_unix, needed)?;
                self.journal
                    .append(kind, subject, at_unix, &self.scratch.bytes)?
            }
            other => other?,
        };
        let entered_before = self.engine.window().entered();
        if let Some(book) = &mut self.replica {
            if !matches!(record, Record::Reset { .. } | Record::Release { .. }) {
                let digest = xxhash_rust::xxh3::xxh3_128(&self.scratch.bytes).to_le_bytes();
                book.appended(&record, sequence, digest);
            }
        }
        self.engine.install(&record, next);
        self.window
            .note(sequence, entered_before, self.engine.window());
        Ok(sequence)
    }

    /// Cluster mode: from now on every commit is also replicated (see [`replica`]).
    pub fn enable_replica(&mut self, appliance: &str, shard: u16) {
        self.replica = Some(ReplicaBook::new(appliance, shard));
    }

    /// What etcd holds of this shard's vPSDs (cluster mode).
    pub fn replica(&self) -> Option<&ReplicaBook> {
        self.replica.as_ref()
    }

    /// Mutable access to the book, for the reconciliation at start.
    pub fn replica_mut(&mut self) -> Option<&mut ReplicaBook> {
        self.replica.as_mut()
    }

    /// The sequence up to which every record is durable here and, in cluster mode, in etcd
    /// too: what answers wait for.
    pub fn acknowledged_sequence(&self) -> u64 {
        let durable = self.durable_sequence();
        match &self.replica {
            Some(book) => durable.min(book.replicated_through()),
            None => durable,
        }
    }

    /// The writes of the next replicated round (empty outside cluster mode, while a round
    /// is in flight, or when etcd holds everything).
    pub fn replica_round(&mut self) -> Result<Vec<StateWrite>, StoreError> {
        match &mut self.replica {
            Some(book) => Ok(book.round(&self.engine)?),
            None => Ok(Vec::new()),
        }
    }

    /// Whether the next round has replicated writes to make.
    pub fn replica_pending(&self) -> bool {
        self.replica.as_ref().is_some_and(ReplicaBook::has_writes)
    }

    /// The outcome of the replicated round in flight (`Err(refused)` when it failed as a
    /// whole). Returns what must be voided.
    pub fn settle(&mut self, outcomes: Result<Vec<Outcome>, bool>) -> Vec<Settled> {
        match &mut self.replica {
            Some(book) => book.settle(outcomes),
            None => Vec::new(),
        }
    }

    /// Sets a vPSD's state from the cluster (a reset record, with the requests the cluster
    /// remembers of it) and records it as owned under `owned`, with nothing to write.
    pub fn commit_reset(
        &mut self,
        vpsd: Vpsd,
        cause: ResetCause,
        recent: Vec<RecentRequest>,
        owned: &Owned,
        now_unix: u64,
    ) -> Result<u64, StoreError> {
        let remembered = recent.clone();
        let record = Record::Reset {
            vpsd: Box::new(vpsd.clone()),
            cause,
            at_unix: now_unix,
            recent,
        };
        let sequence = self.commit(record, now_unix)?;
        if let Some(book) = &mut self.replica {
            book.adopt(&vpsd, owned, remembered, sequence);
        }
        Ok(sequence)
    }

    /// Drops a vPSD that left this appliance (a release record), if it has it.
    pub fn commit_release(
        &mut self,
        vpsd_id: u64,
        owner: &str,
        replicated_version: u64,
        now_unix: u64,
    ) -> Result<Option<u64>, StoreError> {
        if let Some(book) = &mut self.replica {
            book.forget(vpsd_id);
        }
        let Some(vpsd) = self.engine.vpsd(vpsd_id) else {
            return Ok(None);
        };
        let record = Record::Release {
            vpsd_id,
            owner: owner.to_owned(),
            version: vpsd.version,
            replicated_version,
            at_unix: now_unix,
        };
        self.commit(record, now_unix).map(Some)
    }

    /// Makes everything appended durable, on this thread. Returns the durable sequence.
    pub fn flush(&mut self) -> Result<u64, StoreError> {
        Ok(self.journal.flush()?)
    }
}
