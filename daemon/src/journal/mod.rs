//! The journal: the appliance's only durable store. Per shard, a sequence of preallocated,
//! memory-mapped, append-only segment files holding checksummed records, each linked to
//! the previous one by a MAC chain under a key derived from the master key.
//!
//! - [`Journal::append`] writes a record at the end of the current segment with pwrite
//!   (not yet durable); the segment is mapped for reading.
//! - [`Journal::flush_ticket`] / [`FlushTicket::execute`] / [`Journal::complete`] make
//!   everything appended durable with one fdatasync per touched segment (group commit).
//!   The ticket owns what it needs, so the server can run `execute` off the shard's
//!   thread (a blocking pool, or io_uring fdatasync on the same file). A failed flush is
//!   fatal: the journal is poisoned and refuses all further work.
//! - [`Journal::open`] recovers: the history is read ([`history`]), every good record and
//!   every finding handed to a [`Visitor`] (the store, which gives records their meaning),
//!   and a torn tail is cut.
//!
//! Payloads are opaque bytes here: the journal imports nothing of the appliance above it.
//!
//! docs/JOURNAL.md describes the bytes and the recovery rules.

pub mod chain;
pub mod copy;
pub mod format;
pub mod history;
mod marker;
mod scan;
pub mod segment;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

pub use chain::ChainKey;
use format::{
    body_checksum, record_len, RecordHeader, SegmentHeader, CHAIN_BYTES, CHECKPOINT,
    PAYLOAD_BYTES_MAX, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
pub use history::{
    inspect, Damage, DamageKind, Expected, GoodRecord, ReadReport, TailNote, TornTail, Visitor,
};
pub use marker::{read_expected, CLOSED_FILE, OPEN_FILE};
pub use scan::TAIL_PROBE_BYTES;
use segment::Segment;

/// Limits of one shard's journal (the `[journal]` section of the config file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Size of each preallocated segment file. A segment started by a rotation is larger
    /// when its checkpoint needs it: it holds at least [`CHECKPOINT_ROOM_FACTOR`] times the
    /// checkpoint ([`Journal::rotate`]).
    pub segment_bytes: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("journal I/O: {0}")]
    Io(#[from] io::Error),
    #[error("journal directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("a flush failed earlier; the journal accepts nothing more (restart to recover)")]
    Poisoned,
    #[error("the current segment has no room for a record of {needed} bytes: rotate with a checkpoint first")]
    SegmentFull { needed: usize },
    #[error("record payload of {0} bytes is too large")]
    RecordTooLarge(usize),
    #[error(
        "{count} record(s) from segment {segment} offset {offset} on have intact checksums but \
         fail the chain MAC: this journal was written under another master key, or altered; \
         refusing to cut it as a torn tail (check the master key)"
    )]
    Foreign {
        segment: u64,
        offset: usize,
        count: usize,
    },
    #[error("record kind {0} cannot be appended (unknown, or a checkpoint outside a rotation)")]
    Kind(u8),
    #[error(transparent)]
    File(#[from] indicia_files::FileError),
    #[error("journal marker {path}: {what}")]
    Marker { path: PathBuf, what: String },
    #[error("journal of shard {found} found where shard {expected} was expected")]
    WrongShard { expected: u16, found: u16 },
    #[error("the copy in {dir} does not hold the journal up to its durable point: {what}")]
    CopyIncomplete { dir: PathBuf, what: String },
}

/// What one flush must make durable: the files written since the last flush, up to a
/// sequence number. Owns its file handles, so it can run on any thread.
#[derive(Debug)]
pub struct FlushTicket {
    files: Vec<Arc<File>>,
    pub up_to_sequence: u64,
}

impl FlushTicket {
    /// fdatasync of every file the ticket holds. Blocking: run it where blocking is fine.
    pub fn execute(&self) -> io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        Ok(())
    }

    /// The files to sync, for a caller that issues the fdatasync itself (io_uring).
    pub fn files(&self) -> &[Arc<File>] {
        &self.files
    }
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    shard: u16,
    key: ChainKey,
    config: JournalConfig,
    current: Segment,
    /// Where the next record goes in the current segment.
    offset: usize,
    next_sequence: u64,
    chain: [u8; CHAIN_BYTES],
    durable_sequence: u64,
    /// Files with appended but unflushed records (the current one and, after a rotation,
    /// the previous one).
    unflushed: Vec<Arc<File>>,
    poisoned: bool,
    /// A ticket is out: the next one waits for its completion, so durability is
    /// acknowledged strictly in order.
    flush_in_flight: bool,
    /// The record being appended, assembled before its one pwrite.
    record: Vec<u8>,
    _lock: Flock<File>,
}

impl Journal {
    /// Opens (or creates) the journal of a shard in `dir`, reads its history into
    /// `visitor`, and cuts a torn tail. The directory stays locked while it is open.
    ///
    /// Every segment recovery read is made durable (older ones were synced before the
    /// checkpoint that follows them was written, see [`Journal::rotate`]), then the `OPEN`
    /// marker records the
    /// sequence up to which the journal is durable: damage up to there is corruption to
    /// report (for recovery and for an audit beside the running appliance), never a tail to
    /// cut.
    pub fn open(
        dir: &Path,
        shard: u16,
        key: ChainKey,
        config: JournalConfig,
        visitor: &mut impl Visitor,
    ) -> Result<(Self, ReadReport), JournalError> {
        std::fs::create_dir_all(dir)?;
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Locked(dir.to_owned()))?;
        let markers = marker::read(dir)?;
        let recovered = history::recover(dir, shard, &key, markers.expected(), visitor)?;
        let (current, offset) = match recovered.tail {
            Some(tail) => (tail.segment, tail.offset),
            None => {
                let header = SegmentHeader {
                    shard,
                    index: recovered.next_index,
                    first_sequence: recovered.next_sequence,
                    prev_chain: recovered.last_chain,
                };
                (
                    Segment::create(dir, header, config.segment_bytes)?,
                    SEGMENT_HEADER_BYTES,
                )
            }
        };
        // Gone before anything new is written: from here on the journal is open.
        marker::open(dir, recovered.durable_sequence, markers.closed.is_some())?;
        let journal = Self {
            dir: dir.to_owned(),
            shard,
            key,
            config,
            current,
            offset,
            next_sequence: recovered.next_sequence,
            chain: recovered.last_chain,
            durable_sequence: recovered.durable_sequence,
            unflushed: Vec::new(),
            poisoned: false,
            flush_in_flight: false,
            record: Vec::new(),
            _lock: lock,
        };
        Ok((journal, recovered.report))
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The sequence number of the last record appended.
    pub fn last_sequence(&self) -> u64 {
        self.next_sequence - 1
    }

    /// The sequence number up to which everything is durable.
    pub fn durable_sequence(&self) -> u64 {
        self.durable_sequence
    }

    /// (segment index, byte offset) where the next record will be written.
    pub fn position(&self) -> (u64, usize) {
        (self.current.index, self.offset)
    }

    pub fn directory(&self) -> &Path {
        &self.dir
    }

    /// Appends a record of `kind` about `subject` (pwrite); durable only after the next
    /// flush. Returns its sequence number, or [`JournalError::SegmentFull`] if the caller
    /// must rotate first.
    pub fn append(
        &mut self,
        kind: u8,
        subject: u64,
        at_unix: u64,
        payload: &[u8],
    ) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if kind == CHECKPOINT || !format::KINDS.contains(&kind) {
            return Err(JournalError::Kind(kind));
        }
        self.write(kind, subject, at_unix, payload)
    }

    /// Starts a new segment whose first record is the checkpoint `payload` (a whole
    /// state), so that recovery never has to read further back than the newest segment.
    /// The segment has room for at least `room` more bytes of records after the
    /// checkpoint, and for at least [`CHECKPOINT_ROOM_FACTOR`] times the checkpoint's
    /// bytes in all: however large the state grows, checkpoints take at most a quarter of
    /// the journal, and a segment never fills with checkpoints (a checkpoint larger than
    /// `segment_bytes` gets a segment sized for it).
    pub fn rotate(
        &mut self,
        payload: &[u8],
        at_unix: u64,
        room: usize,
    ) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        // Refused before anything changes: a rotation that failed here would leave the
        // journal in a new segment without a checkpoint.
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(JournalError::RecordTooLarge(payload.len()));
        }
        let checkpoint_len = record_len(payload.len());
        let needed = SEGMENT_HEADER_BYTES
            + (checkpoint_len * CHECKPOINT_ROOM_FACTOR).max(checkpoint_len + room);
        let len = self.config.segment_bytes.max(needed.next_multiple_of(4096));
        let header = SegmentHeader {
            shard: self.shard,
            index: self.current.index + 1,
            first_sequence: self.next_sequence,
            prev_chain: self.chain,
        };
        // Everything before the checkpoint is durable before the checkpoint is written: a
        // checkpoint never outlives the records it follows (its state includes them, and
        // recovery reads back from it for the idempotency window). One fdatasync per
        // rotation, on this thread. A failure is fatal like any failed flush.
        if let Err(err) = self.current.file().sync_data() {
            self.poisoned = true;
            return Err(JournalError::Io(err));
        }
        let segment = Segment::create(&self.dir, header, len)?;
        // The old segment stays in `unflushed` by file handle until a flush completes (its
        // sync is then a cheap no-op).
        drop(std::mem::replace(&mut self.current, segment));
        self.offset = SEGMENT_HEADER_BYTES;
        self.write(CHECKPOINT, 0, at_unix, payload)
    }

    fn write(
        &mut self,
        kind: u8,
        subject: u64,
        at_unix: u64,
        payload: &[u8],
    ) -> Result<u64, JournalError> {
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(JournalError::RecordTooLarge(payload.len()));
        }
        let len = record_len(payload.len());
        if self.offset + len > self.current.len() {
            return Err(JournalError::SegmentFull { needed: len });
        }
        let sequence = self.next_sequence;
        let header = RecordHeader {
            kind,
            // Bounded by PAYLOAD_BYTES_MAX (1 GiB) just above.
            payload_len: u32::try_from(payload.len())
                .map_err(|_| JournalError::RecordTooLarge(payload.len()))?,
            sequence,
            subject,
            at_unix,
        }
        .encode();
        let prev_chain = self.chain;
        let chain = self.key.chain(&prev_chain, &header, payload);
        let crc = body_checksum(payload, &prev_chain, &chain);
        let at = self.offset;
        let mut out = std::mem::take(&mut self.record);
        out.clear();
        out.resize(len, 0);
        let (head, rest) = out.split_at_mut(RECORD_HEADER_BYTES);
        head.copy_from_slice(&header);
        let (body, trailer) = rest.split_at_mut(payload.len());
        body.copy_from_slice(payload);
        trailer[..CHAIN_BYTES].copy_from_slice(&prev_chain);
        trailer[CHAIN_BYTES..2 * CHAIN_BYTES].copy_from_slice(&chain);
        trailer[2 * CHAIN_BYTES..2 * CHAIN_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
        let written = self.current.write_at(at, &out);
        self.record = out;
        if let Err(err) = written {
            // What reached the file is unknown: like a failed flush, nothing more.
            self.poisoned = true;
            return Err(JournalError::Io(err));
        }
        self.offset += len;
        self.chain = chain;
        self.next_sequence += 1;
        let file = self.current.file();
        if !self
            .unflushed
            .iter()
            .any(|pending| Arc::ptr_eq(pending, &file))
        {
            self.unflushed.push(file);
        }
        Ok(sequence)
    }

    /// What the next flush must do, or None if everything appended is durable already or
    /// a ticket is still out (complete it first: one flush at a time keeps the durable
    /// sequence honest).
    pub fn flush_ticket(&mut self) -> Option<FlushTicket> {
        if self.unflushed.is_empty() || self.poisoned || self.flush_in_flight {
            return None;
        }
        self.flush_in_flight = true;
        Some(FlushTicket {
            files: std::mem::take(&mut self.unflushed),
            up_to_sequence: self.last_sequence(),
        })
    }

    /// Records the outcome of a ticket. A failed flush poisons the journal: what it held
    /// may or may not be on disk, so nothing may be acknowledged and nothing more written.
    pub fn complete(
        &mut self,
        ticket: &FlushTicket,
        result: io::Result<()>,
    ) -> Result<u64, JournalError> {
        self.flush_in_flight = false;
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        match result {
            Ok(()) => {
                self.durable_sequence = self.durable_sequence.max(ticket.up_to_sequence);
                Ok(self.durable_sequence)
            }
            Err(err) => {
                self.poisoned = true;
                Err(JournalError::Io(err))
            }
        }
    }

    /// Makes everything appended durable, on this thread. Returns the durable sequence.
    pub fn flush(&mut self) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        debug_assert!(!self.flush_in_flight, "flush() while a ticket is out");
        match self.flush_ticket() {
            None => Ok(self.durable_sequence),
            Some(ticket) => {
                let result = ticket.execute();
                self.complete(&ticket, result)
            }
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Makes everything durable and writes the `CLOSED` marker (last sequence and chain
    /// value): the next recovery, and the audit, then know that every record up to it was
    /// durable, so that damage there is corruption to report, never a torn tail to cut.
    /// Nothing may be appended after it.
    pub fn close_cleanly(&mut self) -> Result<u64, JournalError> {
        let durable = self.flush()?;
        marker::close(&self.dir, durable, &self.chain)?;
        self.poisoned = true;
        Ok(durable)
    }

    /// Bytes of records and segment headers written to the current segment so far.
    pub fn current_segment_used(&self) -> usize {
        self.offset
    }
}

/// A new segment holds at least this many times its checkpoint's bytes (see
/// [`Journal::rotate`]).
pub const CHECKPOINT_ROOM_FACTOR: usize = 4;
