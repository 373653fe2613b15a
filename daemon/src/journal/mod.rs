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
//! - [`Journal::open`] recovers: see [`recovery`].
//!
//! docs/JOURNAL.md describes the bytes and the recovery rules.

pub mod format;
pub mod recovery;
pub mod segment;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::hmac;
use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

use crate::engine::{Checkpoint, Engine, Record};
use format::{
    body_checksum, encode_checkpoint, encode_record, header_fields, kind, record_len, Encoder,
    RecordHeader, SegmentHeader, CHAIN_BYTES, PAYLOAD_BYTES_MAX, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
};
pub use recovery::{Finding, RecoveryReport, TornTail};
use segment::Segment;

/// Limits of one shard's journal (the `[journal]` section of the config file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Size of each preallocated segment file. A record larger than this (a checkpoint of a
    /// big shard) gets a segment of its own size.
    pub segment_bytes: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
        }
    }
}

/// The chain MAC key of one shard: HMAC-SHA256 keyed with HMAC-SHA256(master key,
/// "indicia journal chain v1" || shard as u16 LE).
#[derive(Debug, Clone)]
pub struct ChainKey {
    key: hmac::Key,
    genesis: [u8; CHAIN_BYTES],
}

impl ChainKey {
    pub fn derive(master_key: &[u8; 32], shard: u16) -> Self {
        let kdf = hmac::Key::new(hmac::HMAC_SHA256, master_key);
        let mut context = hmac::Context::with_key(&kdf);
        context.update(b"indicia journal chain v1");
        context.update(&shard.to_le_bytes());
        let derived = context.sign();
        let key = hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref());
        let mut genesis = [0u8; CHAIN_BYTES];
        genesis.copy_from_slice(hmac::sign(&key, b"indicia journal genesis").as_ref());
        Self { key, genesis }
    }

    /// The chain value before the first record of the shard.
    pub fn genesis(&self) -> [u8; CHAIN_BYTES] {
        self.genesis
    }

    /// chain = HMAC(prev_chain || header || payload).
    pub fn chain(
        &self,
        prev_chain: &[u8; CHAIN_BYTES],
        header: &[u8],
        payload: &[u8],
    ) -> [u8; CHAIN_BYTES] {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(prev_chain);
        context.update(header);
        context.update(payload);
        let mut out = [0u8; CHAIN_BYTES];
        out.copy_from_slice(context.sign().as_ref());
        out
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
    #[error("record does not follow the current state: {0}")]
    Rejected(crate::engine::ApplyError),
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
    #[error("journal of shard {found} found where shard {expected} was expected")]
    WrongShard { expected: u16, found: u16 },
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
    scratch: Encoder,
    /// The record being appended, assembled before its one pwrite.
    record: Vec<u8>,
    _lock: Flock<File>,
}

impl Journal {
    /// Opens (or creates) the journal of a shard in `dir`, recovers it into `engine` (which
    /// must be empty), and cuts a torn tail. The directory stays locked while it is open.
    pub fn open(
        dir: &Path,
        shard: u16,
        key: ChainKey,
        config: JournalConfig,
        engine: &mut Engine,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        std::fs::create_dir_all(dir)?;
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("LOCK"))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Locked(dir.to_owned()))?;
        let closed = read_closed(dir)?;
        let recovered = recovery::recover(dir, shard, &key, engine, closed)?;
        if closed.is_some() {
            // Gone before anything new is written: from here on the journal is open.
            std::fs::remove_file(dir.join(CLOSED_FILE))?;
            segment::sync_dir(dir)?;
        }
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
        let journal = Self {
            dir: dir.to_owned(),
            shard,
            key,
            config,
            current,
            offset,
            next_sequence: recovered.next_sequence,
            chain: recovered.last_chain,
            durable_sequence: recovered.last_sequence,
            unflushed: Vec::new(),
            poisoned: false,
            flush_in_flight: false,
            scratch: Encoder::default(),
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

    /// Appends a record (pwrite); durable only after the next flush. Returns its
    /// sequence number, or [`JournalError::SegmentFull`] if the caller must rotate first.
    pub fn append(&mut self, record: &Record, now_unix: u64) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        let (kind, vpsd_id, at_unix) = header_fields(record, now_unix);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.bytes.clear();
        encode_record(record, &mut scratch);
        let result = self.write(kind, vpsd_id, at_unix, &scratch.bytes);
        self.scratch = scratch;
        result
    }

    /// Starts a new segment whose first record is a checkpoint of `checkpoint`, so that
    /// recovery never has to read further back than the newest segment. The segment has
    /// room for at least `room` more bytes of records after the checkpoint.
    pub fn rotate(
        &mut self,
        checkpoint: &Checkpoint,
        now_unix: u64,
        room: usize,
    ) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        let mut payload = Encoder::default();
        encode_checkpoint(checkpoint, &mut payload);
        let needed = SEGMENT_HEADER_BYTES + record_len(payload.bytes.len()) + room;
        let len = self.config.segment_bytes.max(needed.next_multiple_of(4096));
        let header = SegmentHeader {
            shard: self.shard,
            index: self.current.index + 1,
            first_sequence: self.next_sequence,
            prev_chain: self.chain,
        };
        let segment = Segment::create(&self.dir, header, len)?;
        // The old segment's unflushed records, if any, stay in `unflushed` by file handle.
        drop(std::mem::replace(&mut self.current, segment));
        self.offset = SEGMENT_HEADER_BYTES;
        self.write(kind::CHECKPOINT, 0, now_unix, &payload.bytes)
    }

    fn write(
        &mut self,
        kind: u8,
        vpsd_id: u64,
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
            vpsd_id,
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
        let text = format!("{CLOSED_MAGIC} {durable} {}\n", hex::encode(self.chain));
        let path = self.dir.join(CLOSED_FILE);
        let mut file = std::fs::File::create(&path)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()?;
        segment::sync_dir(&self.dir)?;
        self.poisoned = true;
        Ok(durable)
    }
}

/// The marker a clean close leaves in the journal directory (removed when it is opened).
pub const CLOSED_FILE: &str = "CLOSED";
const CLOSED_MAGIC: &str = "indicia-closed-v1";

/// Reads the `CLOSED` marker, if there is one: `indicia-closed-v1 <sequence> <chain hex>`.
pub fn read_closed(dir: &Path) -> Result<Option<recovery::Expected>, JournalError> {
    let path = dir.join(CLOSED_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let malformed = || {
        JournalError::Io(io::Error::other(format!(
            "{}: not a `{CLOSED_MAGIC} <sequence> <chain>` marker",
            path.display()
        )))
    };
    let mut fields = text.split_whitespace();
    if fields.next() != Some(CLOSED_MAGIC) {
        return Err(malformed());
    }
    let sequence: u64 = fields
        .next()
        .and_then(|field| field.parse().ok())
        .ok_or_else(malformed)?;
    let mut chain = [0u8; CHAIN_BYTES];
    hex::decode_to_slice(fields.next().unwrap_or_default(), &mut chain).map_err(|_| malformed())?;
    Ok(Some(recovery::Expected {
        sequence,
        closed_chain: Some(chain),
    }))
}

/// A shard's engine and journal together: every change goes to the journal first, then
/// into the engine.
#[derive(Debug)]
pub struct Store {
    pub engine: Engine,
    pub journal: Journal,
}

impl Store {
    /// Opens and recovers a shard's journal into a fresh engine.
    pub fn open(
        dir: &Path,
        shard: u16,
        key: ChainKey,
        config: JournalConfig,
        mut engine: Engine,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        let (journal, report) = Journal::open(dir, shard, key, config, &mut engine)?;
        Ok((Self { engine, journal }, report))
    }

    /// Journals a prepared record (rotating to a new segment with a checkpoint when the
    /// current one is full), then applies it. Returns its sequence number; it is durable
    /// once a flush covers it.
    pub fn commit(&mut self, record: Record, now_unix: u64) -> Result<u64, JournalError> {
        // Checked before it is journaled: a record that does not follow the state (a bug
        // in the caller, e.g. two sessions prepared from the same state) must not reach
        // the disk, where the next recovery would take it for damage.
        let next = self
            .engine
            .successor(&record)
            .map_err(JournalError::Rejected)?;
        let sequence = match self.journal.append(&record, now_unix) {
            Err(JournalError::SegmentFull { needed }) => {
                self.journal
                    .rotate(&self.engine.checkpoint(), now_unix, needed)?;
                self.journal.append(&record, now_unix)?
            }
            other => other?,
        };
        self.engine.install(&record, next);
        Ok(sequence)
    }

    pub fn flush(&mut self) -> Result<u64, JournalError> {
        self.journal.flush()
    }
}

/// Entry points for the fuzz targets (`fuzz/`): arbitrary bytes through the journal's
/// decoders and through a whole recovery. They panic only if the code breaks its contract.
pub mod fuzz {
    use super::format::{decode_checkpoint, decode_record, RecordHeader, RECORD_HEADER_BYTES};
    use super::{ChainKey, JournalConfig, Store};
    use crate::engine::{Engine, EngineConfig, MasterKey};

    /// The master key of the journal [`recovery`] builds around its input; the committed
    /// seeds in `fuzz/corpus/journal_recovery` are journals written under it.
    pub const MASTER: [u8; 32] = [7u8; 32];

    /// Decodes `data` as a record header followed by its payload, and as a checkpoint.
    pub fn record(data: &[u8]) {
        let _ = decodes(data);
    }

    /// Whether `data` is a record header followed by a payload that decodes as its kind
    /// (the record decoder or, for a checkpoint, the checkpoint decoder).
    pub fn decodes(data: &[u8]) -> bool {
        let checkpoint = decode_checkpoint(data).is_ok();
        let Some(header) = RecordHeader::decode(data) else {
            return checkpoint;
        };
        let payload = &data[RECORD_HEADER_BYTES..];
        let Some(payload) = payload.get(..header.payload_len as usize) else {
            return checkpoint;
        };
        if header.kind == super::format::kind::CHECKPOINT {
            return decode_checkpoint(payload).is_ok();
        }
        decode_record(&header, payload, |_| {
            Some(indicia_proto::Algorithm::Ed25519)
        })
        .is_ok()
            || checkpoint
    }

    /// Recovers a journal whose only segment holds `data` after a valid segment header.
    /// Whatever the bytes, recovery must finish without panicking and leave a state whose
    /// registers balance.
    pub fn recovery(data: &[u8]) {
        let _ = recover_segment(data);
    }

    /// [`recovery`], returning the report and the number of vPSDs recovered; None where
    /// the scratch directory could not be written or the journal was refused outright.
    pub fn recover_segment(data: &[u8]) -> Option<(super::RecoveryReport, usize)> {
        let dir = tempfile_dir().ok()?;
        let key = ChainKey::derive(&MASTER, 0);
        let header = super::format::SegmentHeader {
            shard: 0,
            index: 1,
            first_sequence: 1,
            prev_chain: key.genesis(),
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().max(64 << 10), 0);
        let mut outcome = None;
        if std::fs::write(dir.join(super::segment::file_name(1)), &bytes).is_ok() {
            if let Ok(master_key) = MasterKey::new(&MASTER) {
                let engine = Engine::new(EngineConfig::default(), master_key, [0; 32]);
                let config = JournalConfig {
                    segment_bytes: 64 << 10,
                };
                if let Ok((store, report)) = Store::open(&dir, 0, key, config, engine) {
                    let mut vpsds = 0;
                    for vpsd in store.engine.vpsds() {
                        assert!(
                            vpsd.registers.balanced(),
                            "recovered registers do not balance"
                        );
                        vpsds += 1;
                    }
                    outcome = Some((report, vpsds));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        outcome
    }

    fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "indicia-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}
