//! Recovery: rebuild a shard's state from its journal.
//!
//! 1. Find the newest segment that starts with an authentic checkpoint (or segment 1);
//!    earlier segments are kept as the audit trail but not read.
//! 2. Scan from there: every record's header checksum, body checksum and chain MAC.
//!    A record is *good* when all three hold. A bad header is skipped by searching for the
//!    next header whose checksum holds.
//! 3. Everything after the last good record is a torn tail (a crash cut the last, unflushed
//!    writes): it is zeroed, and segments holding nothing good are removed.
//! 4. Damage before the last good record is corruption in the middle of history. It is
//!    never skipped silently: each finding is reported, and the vPSDs it touches are
//!    locked with the reason. A damaged record whose header checksum holds names its
//!    vPSD. Records lost without a readable header are counted (sequence numbers are
//!    contiguous) and attributed through the version gaps they leave in later records of
//!    their vPSD; if some remain unattributed, every vPSD of the shard is locked, because
//!    none can be shown to be complete.
//! 5. Good records are applied to the engine in order; the engine checks that each one
//!    follows its vPSD's state (version, registers, piece numbers), and a record that does
//!    not is a finding too.

use std::collections::BTreeMap;
use std::path::Path;

use super::format::{
    body_checksum, decode_checkpoint, decode_record, kind, record_len, RecordHeader, CHAIN_BYTES,
    PAYLOAD_BYTES_MAX, RECORD_ALIGN, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use super::segment::{self, Segment};
use super::{ChainKey, JournalError};
use crate::engine::{ApplyError, Engine};

/// One thing recovery found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub segment: u64,
    pub offset: usize,
    /// The sequence number concerned, when it could be read.
    pub sequence: Option<u64>,
    /// The vPSD concerned, when it is known.
    pub vpsd_id: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {} offset {}", self.segment, self.offset)?;
        if let Some(sequence) = self.sequence {
            write!(f, " seq {sequence}")?;
        }
        if let Some(vpsd_id) = self.vpsd_id {
            write!(f, " vPSD {vpsd_id}")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// Where the tail was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub segment: u64,
    pub offset: usize,
    /// Bytes zeroed in that segment.
    pub bytes: usize,
    /// Later segments removed because they held nothing good.
    pub segments_removed: Vec<u64>,
}

/// What recovery did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment index and sequence of the checkpoint recovery started from (None: genesis).
    pub checkpoint: Option<(u64, u64)>,
    pub segments_scanned: u64,
    pub records_replayed: u64,
    pub indicia_replayed: u64,
    pub last_sequence: u64,
    pub torn_tail: Option<TornTail>,
    pub findings: Vec<Finding>,
    /// vPSDs locked (or quarantined) by recovery, with the reason.
    pub locked: BTreeMap<u64, String>,
    /// Set when losses could not be attributed: provisioning is refused on the shard.
    pub provisioning_blocked: Option<String>,
    /// The audit only: what lies after the last good record (not a finding).
    pub tail_note: Option<String>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

pub(super) struct Tail {
    pub segment: Segment,
    pub offset: usize,
}

pub(super) struct Recovered {
    pub tail: Option<Tail>,
    /// Index for a new segment when there is no tail to append to.
    pub next_index: u64,
    /// Sequence number for the next record.
    pub next_sequence: u64,
    pub last_sequence: u64,
    pub last_chain: [u8; CHAIN_BYTES],
    pub report: RecoveryReport,
}

enum Entry {
    Good {
        offset: usize,
        end: usize,
        header: RecordHeader,
        payload: std::ops::Range<usize>,
        prev_chain: [u8; CHAIN_BYTES],
        chain: [u8; CHAIN_BYTES],
    },
    /// Checksum failed, header readable: random damage in a known record.
    Damaged { offset: usize, header: RecordHeader },
    /// Checksums hold but the MAC does not: altered, its header cannot be trusted.
    Forged { offset: usize, sequence: u64 },
    /// Bytes that are not a readable record, up to the next readable header (or the end).
    Unreadable { offset: usize, end: usize },
}

fn array32(bytes: &[u8]) -> [u8; CHAIN_BYTES] {
    let mut out = [0u8; CHAIN_BYTES];
    out.copy_from_slice(&bytes[..CHAIN_BYTES]);
    out
}

/// A header at `offset` that parses and whose record fits in the segment.
fn header_at(bytes: &[u8], offset: usize) -> Option<RecordHeader> {
    let header = RecordHeader::decode(bytes.get(offset..)?)?;
    let len = header.payload_len as usize;
    (len <= PAYLOAD_BYTES_MAX && offset + record_len(len) <= bytes.len()).then_some(header)
}

/// How far past a blank header recovery looks for the garbage of torn writes.
pub const TAIL_PROBE_BYTES: usize = 8 << 20;

/// Reads the records of one segment, from `start`, at most `limit` entries, stopping after
/// a good record of sequence `until` or later (the live audit: what comes after the durable
/// sequence is being written, and may be seen half-written). Returns them and the offset up
/// to which anything was found (the extent to zero if it is cut).
fn scan(
    bytes: &[u8],
    start: usize,
    key: &ChainKey,
    limit: usize,
    until: u64,
) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut offset = start;
    while offset + RECORD_HEADER_BYTES <= bytes.len() && entries.len() < limit {
        let Some(header) = header_at(bytes, offset) else {
            let blank = bytes[offset..offset + RECORD_HEADER_BYTES]
                .iter()
                .all(|b| *b == 0);
            // A blank header is normally the end of what was written. A torn write leaves
            // bytes beyond it only within what was appended after the last flush, so only
            // a bounded stretch is searched; damage (a non-blank bad header) is searched to
            // the end of the segment.
            let search_end = if blank {
                (offset + TAIL_PROBE_BYTES).min(bytes.len())
            } else {
                bytes.len()
            };
            let Some(last) = bytes[offset..search_end].iter().rposition(|b| *b != 0) else {
                // Nothing but zeros: the clean end of what was written.
                break;
            };
            // Every byte offset, not just aligned ones: bytes cut out of the middle shift
            // the records after them off the 8-byte grid.
            // Nothing can start past the last non-zero byte.
            let resync = (offset + 1..(offset + last + 1).saturating_sub(RECORD_HEADER_BYTES - 1))
                .find(|at| header_at(bytes, *at).is_some());
            if let Some(next) = resync {
                entries.push(Entry::Unreadable { offset, end: next });
                offset = next;
                continue;
            }
            let end = (offset + last + 1)
                .next_multiple_of(RECORD_ALIGN)
                .min(bytes.len());
            entries.push(Entry::Unreadable { offset, end });
            offset = end;
            break;
        };
        let payload_len = header.payload_len as usize;
        let end = offset + record_len(payload_len);
        let payload = offset + RECORD_HEADER_BYTES..offset + RECORD_HEADER_BYTES + payload_len;
        let trailer = &bytes[payload.end..];
        let prev_chain = array32(trailer);
        let chain = array32(&trailer[CHAIN_BYTES..]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&trailer[2 * CHAIN_BYTES..2 * CHAIN_BYTES + 4]);
        let padding_clean = trailer[2 * CHAIN_BYTES + 4..end - payload.end]
            .iter()
            .all(|b| *b == 0);
        if body_checksum(&bytes[payload.clone()], &prev_chain, &chain) != u32::from_le_bytes(crc)
            || !padding_clean
        {
            entries.push(Entry::Damaged { offset, header });
            // Its length cannot be trusted either (bytes may have been cut out of it): go
            // on at the next readable header, wherever it is.
            // (Searched up to the last non-zero byte only: nothing starts in zeros.)
            let written_end = bytes[offset..]
                .iter()
                .rposition(|b| *b != 0)
                .map_or(offset, |last| offset + last + 1);
            offset = (offset + 1..written_end.saturating_sub(RECORD_HEADER_BYTES - 1))
                .find(|at| header_at(bytes, *at).is_some())
                .unwrap_or(end);
            continue;
        } else if key.chain(
            &prev_chain,
            &bytes[offset..offset + RECORD_HEADER_BYTES],
            &bytes[payload.clone()],
        ) != chain
        {
            entries.push(Entry::Forged {
                offset,
                sequence: header.sequence,
            });
        } else {
            let sequence = header.sequence;
            entries.push(Entry::Good {
                offset,
                end,
                header,
                payload,
                prev_chain,
                chain,
            });
            if sequence >= until {
                offset = end;
                break;
            }
        }
        offset = end;
    }
    (entries, offset)
}

/// The segment files in `dir`, by index.
fn list(dir: &Path) -> Result<Vec<(u64, std::path::PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            out.push((index, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a segment begins with an authentic checkpoint matching its header.
fn starts_with_checkpoint(segment: &Segment, key: &ChainKey) -> bool {
    let Some(header) = segment.header else {
        return false;
    };
    match scan(segment.bytes(), SEGMENT_HEADER_BYTES, key, 1, u64::MAX)
        .0
        .first()
    {
        Some(Entry::Good {
            header: record,
            prev_chain,
            payload,
            ..
        }) => {
            record.kind == kind::CHECKPOINT
                && record.sequence == header.first_sequence
                && *prev_chain == header.prev_chain
                && decode_checkpoint(&segment.bytes()[payload.clone()]).is_ok()
        }
        _ => false,
    }
}

/// What the journal is known to hold, beyond what its bytes say: damage at or before
/// `sequence` is corruption, never a torn tail to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Records up to this sequence were durable.
    pub sequence: u64,
    /// Set when the appliance closed the journal cleanly (its `CLOSED` marker): then no
    /// record may follow `sequence`, and the last record's chain value must be this.
    pub closed_chain: Option<[u8; CHAIN_BYTES]>,
}

/// The audit's look at each record recovery applied: it gets the state after the record
/// and returns what it found wrong (each becomes a finding and locks the vPSD).
pub type Observer<'o> = dyn FnMut(&Engine, u64, &crate::engine::Record) -> Vec<String> + 'o;

struct Replay<'a, 'o> {
    engine: &'a mut Engine,
    observer: Option<&'a mut Observer<'o>>,
    report: RecoveryReport,
    /// Records lost without a trustworthy header.
    unattributed: u64,
    /// Records found missing from a vPSD's versions.
    attributed: u64,
    /// An authentic checkpoint could not be read: any vPSD may be missing.
    state_lost: bool,
}

impl Replay<'_, '_> {
    fn finding(
        &mut self,
        segment: u64,
        offset: usize,
        sequence: Option<u64>,
        vpsd_id: Option<u64>,
        what: String,
    ) {
        self.report.findings.push(Finding {
            segment,
            offset,
            sequence,
            vpsd_id,
            what,
        });
    }

    fn lock(&mut self, vpsd_id: u64, reason: String) {
        self.engine.lock_integrity(vpsd_id, &reason);
        self.report.locked.entry(vpsd_id).or_insert(reason);
    }

    fn apply(
        &mut self,
        segment: u64,
        offset: usize,
        header: &RecordHeader,
        payload: &[u8],
        is_start: bool,
    ) {
        let sequence = header.sequence;
        if header.kind == kind::CHECKPOINT {
            match decode_checkpoint(payload) {
                Ok(checkpoint) => {
                    // A later checkpoint must agree with the replay up to it (unless damage
                    // already made them differ); the start checkpoint is the state itself.
                    if !is_start
                        && self.report.findings.is_empty()
                        && checkpoint != self.engine.checkpoint()
                    {
                        self.finding(
                            segment,
                            offset,
                            Some(sequence),
                            None,
                            "checkpoint differs from the replayed state".into(),
                        );
                    }
                    // The checkpoint is authentic; keep recovery's locks on top of it.
                    self.engine.restore(checkpoint);
                    if let Some(reason) = &self.report.provisioning_blocked {
                        self.engine.block_provisioning(reason);
                    }
                    let locked: Vec<(u64, String)> = self
                        .report
                        .locked
                        .iter()
                        .map(|(id, reason)| (*id, reason.clone()))
                        .collect();
                    for (vpsd_id, reason) in locked {
                        self.engine.lock_integrity(vpsd_id, &reason);
                    }
                }
                Err(err) => {
                    self.finding(
                        segment,
                        offset,
                        Some(sequence),
                        None,
                        format!("checkpoint does not decode: {err}"),
                    );
                    // The whole state it carried is unknown now.
                    self.state_lost = true;
                }
            }
            return;
        }
        let vpsd_id = header.vpsd_id;
        if self.report.locked.contains_key(&vpsd_id) {
            return;
        }
        let record = match decode_record(header, payload, |id| {
            self.engine.vpsd(id).map(|vpsd| vpsd.algorithm)
        }) {
            Ok(record) => record,
            Err(err) => {
                let what = format!("record does not decode: {err}");
                self.finding(segment, offset, Some(sequence), Some(vpsd_id), what.clone());
                self.lock(vpsd_id, format!("journal seq {sequence}: {what}"));
                return;
            }
        };
        match self.engine.apply(&record) {
            Ok(()) => {
                self.report.records_replayed += 1;
                if let crate::engine::Record::Session(session) = &record {
                    self.report.indicia_replayed += session.indicia().count() as u64;
                }
                let problems = match self.observer.as_mut() {
                    Some(observer) => observer(&*self.engine, sequence, &record),
                    None => Vec::new(),
                };
                for what in problems {
                    self.finding(segment, offset, Some(sequence), Some(vpsd_id), what.clone());
                    self.lock(vpsd_id, format!("journal seq {sequence}: {what}"));
                }
            }
            Err(err) => {
                match &err {
                    ApplyError::Version { current, found, .. } if found > current => {
                        self.attributed += found - current - 1;
                    }
                    ApplyError::UnknownVpsd { .. } => {
                        self.attributed += record.version().saturating_sub(1)
                    }
                    _ => {}
                }
                let what = format!("history does not reconcile: {err}");
                self.finding(segment, offset, Some(sequence), Some(vpsd_id), what.clone());
                self.lock(vpsd_id, format!("journal seq {sequence}: {what}"));
            }
        }
    }
}

/// Damage seen but not yet known to be in the middle of history: if a good record follows
/// it is corruption, otherwise it is the torn tail.
enum Pending {
    Damaged {
        segment: u64,
        offset: usize,
        header: RecordHeader,
    },
    Forged {
        segment: u64,
        offset: usize,
        sequence: u64,
    },
    Unreadable {
        segment: u64,
        offset: usize,
        end: usize,
    },
    SegmentMissing {
        segment: u64,
    },
    SegmentHeader {
        segment: u64,
        what: String,
    },
}

impl Replay<'_, '_> {
    /// Turns pending damage into findings (a good record follows it). Returns the highest
    /// sequence number the damage accounts for by a readable header.
    fn confirm(&mut self, pending: &mut Vec<Pending>) -> u64 {
        let mut accounted = 0;
        for damage in pending.drain(..) {
            match damage {
                Pending::Damaged {
                    segment,
                    offset,
                    header,
                } => {
                    let what = "record checksum does not match".to_owned();
                    self.finding(
                        segment,
                        offset,
                        Some(header.sequence),
                        Some(header.vpsd_id),
                        what.clone(),
                    );
                    if header.kind == kind::CHECKPOINT {
                        // A checkpoint changes nothing by itself; the state stands without it.
                    } else {
                        self.lock(
                            header.vpsd_id,
                            format!("journal seq {}: {what}", header.sequence),
                        );
                    }
                    accounted = accounted.max(header.sequence);
                }
                Pending::Forged {
                    segment,
                    offset,
                    sequence,
                } => {
                    self.finding(
                        segment,
                        offset,
                        Some(sequence),
                        None,
                        "record MAC does not match: altered or foreign".into(),
                    );
                }
                Pending::Unreadable {
                    segment,
                    offset,
                    end,
                } => {
                    self.finding(
                        segment,
                        offset,
                        None,
                        None,
                        format!("{} unreadable bytes", end - offset),
                    );
                }
                Pending::SegmentMissing { segment } => {
                    self.finding(
                        segment,
                        0,
                        None,
                        None,
                        format!("segment {segment} is missing"),
                    );
                }
                Pending::SegmentHeader { segment, what } => {
                    self.finding(segment, 0, None, None, what)
                }
            }
        }
        accounted
    }

    /// At the end: records lost without a readable header that no vPSD's version gap
    /// accounts for leave every vPSD in doubt.
    fn settle(&mut self) {
        if self.unattributed > self.attributed || self.state_lost {
            let reason = if self.state_lost {
                "an authentic checkpoint could not be read: any vPSD's state may be lost".to_owned()
            } else {
                format!(
                    "journal damage lost {} record(s) that no vPSD's history accounts for",
                    self.unattributed - self.attributed
                )
            };
            let ids: Vec<u64> = self.engine.vpsds().map(|vpsd| vpsd.id).collect();
            for vpsd_id in ids {
                self.lock(vpsd_id, reason.clone());
            }
            // The lost records may have provisioned ids nobody knows of now.
            self.engine.block_provisioning(&reason);
            self.report.provisioning_blocked = Some(reason);
        }
    }
}

/// Recovers the journal in `dir` into `engine`; see the module documentation.
pub(super) fn recover(
    dir: &Path,
    shard: u16,
    key: &ChainKey,
    engine: &mut Engine,
    expected: Option<Expected>,
) -> Result<Recovered, JournalError> {
    replay_journal(dir, shard, key, engine, expected, None)
}

/// The audit: the same scan and replay as recovery, read-only and from the first segment
/// (the whole history, every later checkpoint checked against the replay), with
/// `observer` looking at every record applied. Nothing is cut or written: damage after
/// the last good record is reported in [`RecoveryReport::tail_note`] (on a live journal
/// it is a record being written), and records that fail the MAC are findings.
pub fn audit(
    dir: &Path,
    shard: u16,
    key: &ChainKey,
    engine: &mut Engine,
    expected: Option<Expected>,
    observer: &mut Observer<'_>,
) -> Result<RecoveryReport, JournalError> {
    replay_journal(dir, shard, key, engine, expected, Some(observer))
        .map(|recovered| recovered.report)
}

fn replay_journal(
    dir: &Path,
    shard: u16,
    key: &ChainKey,
    engine: &mut Engine,
    expected: Option<Expected>,
    observer: Option<&mut Observer<'_>>,
) -> Result<Recovered, JournalError> {
    let audit = observer.is_some();
    let files = list(dir)?;
    if files.is_empty() {
        return Ok(Recovered {
            tail: None,
            next_index: 1,
            next_sequence: 1,
            last_sequence: 0,
            last_chain: key.genesis(),
            report: RecoveryReport::default(),
        });
    }
    // 1. The newest segment that starts with an authentic checkpoint (the audit reads
    // everything).
    let mut start = 0;
    for position in (0..files.len()).rev().filter(|_| !audit) {
        let (index, path) = &files[position];
        let segment = Segment::open(path, *index)?;
        if let Some(header) = segment.header {
            if header.shard != shard {
                return Err(JournalError::WrongShard {
                    expected: shard,
                    found: header.shard,
                });
            }
        }
        if starts_with_checkpoint(&segment, key) {
            start = position;
            break;
        }
    }

    // 2. Scan and replay.
    let mut replay = Replay {
        engine,
        observer,
        report: RecoveryReport::default(),
        unattributed: 0,
        attributed: 0,
        state_lost: false,
    };
    // (position in `segments`, end offset, sequence, chain) of the last good record.
    let mut last_good: Option<(usize, usize, u64, [u8; CHAIN_BYTES])> = None;
    let mut accounted = 0u64;
    let mut pending: Vec<Pending> = Vec::new();
    let mut expected_index = files[start].0;
    let mut segments = Vec::new();
    // Per scanned segment: how far anything was written (the bytes a tail cut zeroes).
    let mut extents = Vec::new();
    if audit && files[0].0 != 1 {
        let first = files[0].0;
        let segment = Segment::open_read_only(&files[0].1, first)?;
        if !starts_with_checkpoint(&segment, key) {
            replay.finding(
                first,
                0,
                None,
                None,
                format!("segments before {first} are gone and {first} starts with no checkpoint"),
            );
        }
    }
    // How many segments were scanned before this one.
    let mut position = 0usize;
    for (index, path) in files.iter().skip(start) {
        let index = *index;
        let segment = if audit {
            Segment::open_read_only(path, index)?
        } else {
            Segment::open(path, index)?
        };
        replay.report.segments_scanned += 1;
        if index != expected_index {
            pending.push(Pending::SegmentMissing {
                segment: expected_index,
            });
        }
        expected_index = index + 1;
        // Only a finding if something good follows: a crash while a segment was being
        // created leaves a header that never became durable, at the tail.
        match segment.header {
            None => pending.push(Pending::SegmentHeader {
                segment: index,
                what: "segment header does not parse".into(),
            }),
            Some(header) if header.index != index => pending.push(Pending::SegmentHeader {
                segment: index,
                what: format!("segment header says index {}", header.index),
            }),
            Some(_) => {}
        }
        // The live audit (a durable sequence known, no clean close) reads no further.
        let until = match expected {
            Some(Expected {
                sequence,
                closed_chain: None,
            }) if audit => sequence.max(1),
            _ => u64::MAX,
        };
        let (entries, extent) = scan(
            segment.bytes(),
            SEGMENT_HEADER_BYTES,
            key,
            usize::MAX,
            until,
        );
        extents.push(extent);
        for entry in entries {
            match entry {
                Entry::Good {
                    offset,
                    end,
                    header,
                    payload,
                    prev_chain,
                    chain,
                } => {
                    let sequence = header.sequence;
                    let damaged_before = !pending.is_empty();
                    accounted = accounted.max(replay.confirm(&mut pending));
                    let is_start = position == 0
                        && offset == SEGMENT_HEADER_BYTES
                        && header.kind == kind::CHECKPOINT;
                    if sequence <= accounted {
                        replay.finding(
                            index,
                            offset,
                            Some(sequence),
                            None,
                            format!("record out of order after seq {accounted}"),
                        );
                        replay.unattributed += 1;
                        // Not applied, but the tail is cut after it, never before: the
                        // damage stays on disk and is found again at the next recovery.
                        if let Some((_, _, last_sequence, last_chain)) = last_good {
                            last_good = Some((position, end, last_sequence, last_chain));
                        }
                        continue;
                    }
                    let missing = match last_good {
                        None if is_start || sequence == 1 => 0,
                        // accounted < sequence here (checked above).
                        _ => sequence - accounted - 1,
                    };
                    if missing > 0 {
                        replay.unattributed += missing;
                        replay.finding(
                            index,
                            offset,
                            Some(sequence),
                            None,
                            format!("{missing} record(s) before this one are lost"),
                        );
                    } else if let Some((_, _, _, last_chain)) = last_good {
                        if prev_chain != last_chain && !damaged_before {
                            replay.unattributed += 1;
                            replay.finding(
                                index,
                                offset,
                                Some(sequence),
                                None,
                                "chain does not link to the previous record".into(),
                            );
                        }
                    }
                    if is_start {
                        replay.report.checkpoint = Some((index, sequence));
                    }
                    replay.apply(index, offset, &header, &segment.bytes()[payload], is_start);
                    accounted = sequence;
                    last_good = Some((position, end, sequence, chain));
                }
                Entry::Damaged { offset, header, .. } => pending.push(Pending::Damaged {
                    segment: index,
                    offset,
                    header,
                }),
                Entry::Forged {
                    offset, sequence, ..
                } => pending.push(Pending::Forged {
                    segment: index,
                    offset,
                    sequence,
                }),
                Entry::Unreadable { offset, end } => pending.push(Pending::Unreadable {
                    segment: index,
                    offset,
                    end,
                }),
            }
        }
        position += 1;
        if !audit {
            segments.push(segment);
        }
    }
    // A crash does not leave records whose checksums hold but whose MAC fails. Several of
    // them, or one with nothing good before it, mean a journal written under another
    // master key (or altered): cutting them as a torn tail would destroy it.
    let forged: Vec<(u64, usize)> = pending
        .iter()
        .filter_map(|damage| match damage {
            Pending::Forged {
                segment, offset, ..
            } => Some((*segment, *offset)),
            _ => None,
        })
        .collect();
    if let Some(&(segment, offset)) = forged.first() {
        // The audit reports an altered tail after good records as findings; with nothing
        // good at all, it is the wrong master key there too.
        if last_good.is_none() || (!audit && forged.len() > 1) {
            return Err(JournalError::Foreign {
                segment,
                offset,
                count: forged.len(),
            });
        }
    }

    // What the journal is known to hold decides whether damage at the end is a torn tail.
    let last_good_sequence = last_good.map_or(0, |(_, _, sequence, _)| sequence);
    let mut damage_at_end = false;
    if let Some(expected) = expected {
        let (last_segment, last_offset) = files.last().map_or((0, 0), |(index, _)| (*index, 0));
        if last_good_sequence < expected.sequence {
            // Durable records are damaged or gone: corruption, reported and kept on disk.
            let named = pending
                .iter()
                .filter(|damage| matches!(damage, Pending::Damaged { .. }))
                .count() as u64;
            accounted = accounted.max(replay.confirm(&mut pending));
            let lost = expected.sequence - last_good_sequence;
            replay.unattributed += lost.saturating_sub(named);
            replay.finding(
                last_segment,
                last_offset,
                Some(expected.sequence),
                None,
                format!(
                    "records up to seq {} were durable but the readable history ends at seq \
                     {last_good_sequence}: {lost} record(s) damaged or lost",
                    expected.sequence
                ),
            );
            damage_at_end = true;
        } else if let Some(chain) = expected.closed_chain {
            let last_chain = last_good.map_or(key.genesis(), |(_, _, _, chain)| chain);
            if last_good_sequence > expected.sequence {
                replay.unattributed += last_good_sequence - expected.sequence;
                replay.finding(
                    last_segment,
                    last_offset,
                    Some(last_good_sequence),
                    None,
                    format!(
                        "{} record(s) after the clean close at seq {}",
                        last_good_sequence - expected.sequence,
                        expected.sequence
                    ),
                );
            } else if last_chain != chain {
                replay.unattributed += 1;
                replay.finding(
                    last_segment,
                    last_offset,
                    Some(last_good_sequence),
                    None,
                    "the last record is not the one the journal was closed with".into(),
                );
            }
        }
    }
    if audit {
        // Records failing the MAC are findings wherever they are; the rest of what is
        // pending after the last good record is the tail, left as it is.
        let (mut forged, tail): (Vec<Pending>, Vec<Pending>) = pending
            .into_iter()
            .partition(|damage| matches!(damage, Pending::Forged { .. }));
        replay.confirm(&mut forged);
        replay.settle();
        let mut report = std::mem::take(&mut replay.report);
        if !tail.is_empty() {
            report.tail_note = Some(format!(
                "{} unreadable entr{} after seq {}: a record being written, or writes a \
                 crash cut short (never acknowledged; the appliance cuts them when it starts)",
                tail.len(),
                if tail.len() == 1 { "y" } else { "ies" },
                last_good.map_or(0, |(_, _, sequence, _)| sequence)
            ));
        }
        report.last_sequence = last_good.map_or(0, |(_, _, sequence, _)| sequence);
        return Ok(Recovered {
            tail: None,
            next_index: 0,
            next_sequence: 0,
            last_sequence: report.last_sequence,
            last_chain: key.genesis(),
            report,
        });
    }
    // What is still pending lies after the last good record: the torn tail.
    replay.settle();
    let mut report = std::mem::take(&mut replay.report);

    if damage_at_end {
        // Nothing is cut: the damaged records stay as evidence (their vPSDs are locked),
        // and new records go to a fresh segment after them (the one an earlier start made
        // for them, if nothing was written to it yet).
        report.last_sequence = last_good_sequence;
        let next_sequence = last_good_sequence
            .max(accounted)
            .max(expected.map_or(0, |expected| expected.sequence))
            + 1;
        let last_chain = last_good.map_or(key.genesis(), |(_, _, _, chain)| chain);
        let empty_last = extents.last() == Some(&SEGMENT_HEADER_BYTES);
        let tail = segments.pop().filter(|segment| {
            empty_last
                && segment.header.is_some_and(|header| {
                    header.first_sequence == next_sequence && header.prev_chain == last_chain
                })
        });
        return Ok(Recovered {
            tail: tail.map(|segment| Tail {
                segment,
                offset: SEGMENT_HEADER_BYTES,
            }),
            next_index: files.last().map_or(1, |(index, _)| index + 1),
            next_sequence,
            // Everything up to the expected sequence was durable (damaged or not): a clean
            // close must say so again, or the next start would take the damage for a tail.
            last_sequence: last_good_sequence.max(expected.map_or(0, |expected| expected.sequence)),
            last_chain: last_good.map_or(key.genesis(), |(_, _, _, chain)| chain),
            report,
        });
    }
    // 3. Cut the torn tail after the last good record.
    let (keep, offset, last_sequence, last_chain) = match last_good {
        Some((position, end, sequence, chain)) => (position, end, sequence, chain),
        None => (0, SEGMENT_HEADER_BYTES, 0, key.genesis()),
    };
    report.last_sequence = last_sequence;
    let extent = extents.get(keep).copied().unwrap_or(offset);
    // Nothing good at all and no readable segment header (a crash while the very first
    // segment was being created): nothing is worth keeping, start afresh.
    let keep = if last_good.is_none()
        && segments
            .first()
            .is_some_and(|segment| segment.header.is_none())
    {
        usize::MAX
    } else {
        keep
    };
    let kept = cut_tail(dir, segments, keep, offset, extent, &mut report)?;
    let next_index = kept
        .as_ref()
        .map_or(files[start].0, |segment| segment.index + 1);
    let tail = kept
        .filter(|segment| segment.header.is_some())
        .map(|segment| Tail { segment, offset });
    Ok(Recovered {
        tail,
        next_index,
        // Past every sequence number still on disk before the cut, damaged ones included,
        // so that a new record never reuses one.
        next_sequence: last_sequence.max(accounted) + 1,
        last_sequence,
        last_chain,
        report,
    })
}

/// Zeroes everything after `offset` in the kept segment and removes the later segments,
/// which hold nothing good. Returns the kept segment, to append to.
fn cut_tail(
    dir: &Path,
    segments: Vec<Segment>,
    keep: usize,
    offset: usize,
    extent: usize,
    report: &mut RecoveryReport,
) -> Result<Option<Segment>, JournalError> {
    let mut kept = None;
    let mut removed = Vec::new();
    let mut zeroed = 0;
    let mut kept_index = 0;
    for (position, mut segment) in segments.into_iter().enumerate() {
        if position < keep && keep != usize::MAX {
            continue;
        }
        if position > keep || keep == usize::MAX {
            removed.push(segment.index);
            let path = segment.path.clone();
            drop(segment);
            std::fs::remove_file(&path)?;
            continue;
        }
        kept_index = segment.index;
        let bytes = segment.bytes_mut();
        // A segment file shorter than its header (cut short by a crash) has nothing to zero.
        let start = offset.min(bytes.len());
        let extent = extent.clamp(start, bytes.len());
        if let Some(last) = bytes[start..extent].iter().rposition(|b| *b != 0) {
            zeroed = last + 1;
            bytes[start..start + zeroed].fill(0);
            segment.sync_range(start, zeroed)?;
        }
        kept = Some(segment);
    }
    if !removed.is_empty() {
        segment::sync_dir(dir)?;
    }
    if zeroed > 0 || !removed.is_empty() {
        report.torn_tail = Some(TornTail {
            segment: kept_index,
            offset,
            bytes: zeroed,
            segments_removed: removed,
        });
    }
    Ok(kept)
}
