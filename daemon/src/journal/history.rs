//! Reading a shard's history: its segments in order, every record checked (header
//! checksum, body checksum, chain MAC), and the rules that say what damage means.
//!
//! The phases are shared by the two readers of a journal:
//! - **scan** ([`super::scan`]): one segment's bytes into good records, damaged or altered
//!   records and unreadable stretches;
//! - **classify** ([`Walk`]): good records in sequence order go to the [`Visitor`]; damage
//!   is held as *pending* until a good record follows it (then it lies within history and
//!   becomes a [`Damage`] finding), and gaps in the sequence or the chain are findings too;
//! - **decide**: what is still pending after the last good record is a torn tail (a crash
//!   cut the last, unflushed writes), unless the journal is known to have been durable
//!   further ([`Expected`]): then it is corruption;
//! - **cut**: only [`recover`], which the appliance runs when it opens a journal, zeroes a
//!   torn tail and removes segments that hold nothing good.
//!
//! [`recover`] reads from the newest segment that starts with a checkpoint the visitor
//! accepts, writes, and returns where to append. [`inspect`] (the audit) reads every
//! segment, read-only, changes nothing, and reports what lies after the last good record
//! as a note. Neither knows what a record means: the visitor does.

use std::path::Path;

use super::format::{RecordHeader, CHAIN_BYTES, CHECKPOINT, SEGMENT_HEADER_BYTES};
use super::scan::{list, scan, Entry};
use super::segment::{self, Segment};
use super::{ChainKey, JournalError};

/// A record whose checksums and chain MAC hold, handed to the visitor in sequence order.
#[derive(Debug)]
pub struct GoodRecord<'a> {
    pub segment: u64,
    pub offset: usize,
    pub header: RecordHeader,
    pub payload: &'a [u8],
    /// The checkpoint recovery starts from: the state itself, not a record to compare
    /// with the state.
    pub start: bool,
    /// A record before that checkpoint, read because the visitor asked for the records
    /// from an earlier sequence on ([`Visitor::accepts_checkpoint`]).
    pub before_start: bool,
}

/// What is wrong with the journal at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DamageKind {
    /// A readable header whose record fails its body checksum.
    Checksum,
    /// Checksums hold, the chain MAC does not: altered, or written under another key.
    Mac,
    /// Bytes that are no readable record.
    Unreadable {
        bytes: usize,
    },
    SegmentMissing {
        segment: u64,
    },
    SegmentHeaderUnreadable,
    SegmentHeaderIndex {
        found: u64,
    },
    /// A good record whose sequence number was seen already.
    OutOfOrder {
        after: u64,
    },
    /// Sequence numbers skipped before a good record.
    Lost {
        count: u64,
    },
    /// A good record whose previous chain value is not the last good record's.
    ChainBreak,
    /// Records known to be durable are damaged or gone at the end.
    DurableLost {
        durable: u64,
        readable_end: u64,
        lost: u64,
    },
    /// Records after a clean close.
    AfterClose {
        count: u64,
        closed_at: u64,
    },
    /// The last record is not the one the clean close recorded.
    CloseMismatch,
    /// The first segments were removed and the oldest left has no checkpoint.
    GoneBefore {
        first: u64,
    },
}

impl std::fmt::Display for DamageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Checksum => write!(f, "record checksum does not match"),
            Self::Mac => write!(f, "record MAC does not match: altered or foreign"),
            Self::Unreadable { bytes } => write!(f, "{bytes} unreadable bytes"),
            Self::SegmentMissing { segment } => write!(f, "segment {segment} is missing"),
            Self::SegmentHeaderUnreadable => write!(f, "segment header does not parse"),
            Self::SegmentHeaderIndex { found } => write!(f, "segment header says index {found}"),
            Self::OutOfOrder { after } => write!(f, "record out of order after seq {after}"),
            Self::Lost { count } => write!(f, "{count} record(s) before this one are lost"),
            Self::ChainBreak => write!(f, "chain does not link to the previous record"),
            Self::DurableLost {
                durable,
                readable_end,
                lost,
            } => write!(
                f,
                "records up to seq {durable} were durable but the readable history ends at seq \
                 {readable_end}: {lost} record(s) damaged or lost"
            ),
            Self::AfterClose { count, closed_at } => write!(
                f,
                "{count} record(s) after the clean close at seq {closed_at}"
            ),
            Self::CloseMismatch => {
                write!(
                    f,
                    "the last record is not the one the journal was closed with"
                )
            }
            Self::GoneBefore { first } => write!(
                f,
                "segments before {first} are gone and {first} starts with no checkpoint"
            ),
        }
    }
}

/// Damage found within history (never a torn tail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub segment: u64,
    pub offset: usize,
    /// The sequence number concerned, when it could be read.
    pub sequence: Option<u64>,
    /// The subject a readable header names.
    pub subject: Option<u64>,
    /// Set when a record of `subject` is lost (its history is broken). Not for a
    /// checkpoint, which changes nothing by itself.
    pub breaks_subject: bool,
    /// Records lost that no readable header names: whose history they broke is unknown.
    pub unattributed: u64,
    pub kind: DamageKind,
}

/// Whoever gives the records their meaning.
pub trait Visitor {
    /// Whether a checkpoint's payload can be a starting state: None if not; otherwise the
    /// sequence from which the visitor also needs the records before the checkpoint (0:
    /// none). Recovery starts from the newest segment whose first record is a checkpoint
    /// that is authentic and accepted, and reads from the segment that holds that earlier
    /// sequence.
    fn accepts_checkpoint(&mut self, payload: &[u8]) -> Option<u64>;
    /// A good record, in sequence order.
    fn record(&mut self, record: GoodRecord<'_>);
    /// Damage within history, in the order it was confirmed.
    fn damage(&mut self, damage: Damage);
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

/// What a read of the history found, besides what it told the visitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadReport {
    /// Segment index and sequence of the checkpoint the read started from (None: genesis).
    pub checkpoint: Option<(u64, u64)>,
    pub segments_scanned: u64,
    /// The last good record's sequence (recovery: the last sequence known durable).
    pub last_sequence: u64,
    /// Recovery only: where the torn tail was cut.
    pub torn_tail: Option<TornTail>,
    /// The audit only: what lies after the last good record (not a finding).
    pub tail: Option<TailNote>,
}

/// Unreadable entries after the last good record, as the audit sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailNote {
    pub entries: usize,
    pub after_sequence: u64,
}

impl std::fmt::Display for TailNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unreadable entr{} after seq {}: a record being written, or writes a crash cut \
             short (never acknowledged; the appliance cuts them when it starts)",
            self.entries,
            if self.entries == 1 { "y" } else { "ies" },
            self.after_sequence
        )
    }
}

pub(super) struct Tail {
    pub segment: Segment,
    pub offset: usize,
}

/// Where a recovered journal continues.
pub(super) struct Recovered {
    pub tail: Option<Tail>,
    /// Index for a new segment when there is no tail to append to.
    pub next_index: u64,
    /// Sequence number for the next record.
    pub next_sequence: u64,
    /// Everything up to here is durable (damaged records included).
    pub durable_sequence: u64,
    pub last_chain: [u8; CHAIN_BYTES],
    pub report: ReadReport,
}

/// Damage seen but not yet known to be within history: if a good record follows it is
/// corruption, otherwise it is the tail.
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
        kind: DamageKind,
    },
}

#[derive(Debug, Clone, Copy)]
struct LastGood {
    /// Position of its segment among those read.
    position: usize,
    end: usize,
    sequence: u64,
    chain: [u8; CHAIN_BYTES],
}

/// The classify phase over the segments of one read.
struct Walk<'a, V: Visitor> {
    key: &'a ChainKey,
    visitor: &'a mut V,
    last_good: Option<LastGood>,
    /// The highest sequence number accounted for, good or named by a damaged header.
    accounted: u64,
    pending: Vec<Pending>,
    expected_index: u64,
    /// Per segment read: how far anything was written (what a tail cut zeroes).
    extents: Vec<usize>,
    /// The segment whose first record is the checkpoint the state starts from (recovery;
    /// the audit starts from nothing and has none).
    state_start: Option<u64>,
    /// The sequence the first segment read begins with, by its header: nothing before it
    /// is missing.
    first_sequence: Option<u64>,
    report: ReadReport,
}

impl<'a, V: Visitor> Walk<'a, V> {
    fn new(key: &'a ChainKey, visitor: &'a mut V, first_index: u64) -> Self {
        Self {
            key,
            visitor,
            last_good: None,
            accounted: 0,
            pending: Vec::new(),
            expected_index: first_index,
            extents: Vec::new(),
            state_start: None,
            first_sequence: None,
            report: ReadReport::default(),
        }
    }

    fn damage(&mut self, damage: Damage) {
        self.visitor.damage(damage);
    }

    /// A finding at a place, with no subject.
    fn finding(
        &mut self,
        segment: u64,
        offset: usize,
        sequence: Option<u64>,
        unattributed: u64,
        kind: DamageKind,
    ) {
        self.damage(Damage {
            segment,
            offset,
            sequence,
            subject: None,
            breaks_subject: false,
            unattributed,
            kind,
        });
    }

    /// Turns pending damage into findings (a good record follows it). Returns the highest
    /// sequence number the damage accounts for by a readable header.
    fn confirm(&mut self, pending: Vec<Pending>) -> u64 {
        let mut accounted = 0;
        for damage in pending {
            match damage {
                Pending::Damaged {
                    segment,
                    offset,
                    header,
                } => {
                    self.damage(Damage {
                        segment,
                        offset,
                        sequence: Some(header.sequence),
                        subject: Some(header.subject),
                        breaks_subject: header.kind != CHECKPOINT,
                        unattributed: 0,
                        kind: DamageKind::Checksum,
                    });
                    accounted = accounted.max(header.sequence);
                }
                Pending::Forged {
                    segment,
                    offset,
                    sequence,
                } => self.finding(segment, offset, Some(sequence), 0, DamageKind::Mac),
                Pending::Unreadable {
                    segment,
                    offset,
                    end,
                } => self.finding(
                    segment,
                    offset,
                    None,
                    0,
                    DamageKind::Unreadable {
                        bytes: end - offset,
                    },
                ),
                Pending::SegmentMissing { segment } => {
                    self.finding(segment, 0, None, 0, DamageKind::SegmentMissing { segment })
                }
                Pending::SegmentHeader { segment, kind } => self.finding(segment, 0, None, 0, kind),
            }
        }
        accounted
    }

    fn confirm_pending(&mut self) -> u64 {
        let pending = std::mem::take(&mut self.pending);
        self.confirm(pending)
    }

    /// Classifies the entries of one segment, the `position`-th read, up to a good record
    /// of sequence `until` or later.
    fn read_segment(&mut self, position: usize, index: u64, segment: &Segment, until: u64) {
        self.report.segments_scanned += 1;
        if index != self.expected_index {
            self.pending.push(Pending::SegmentMissing {
                segment: self.expected_index,
            });
        }
        self.expected_index = index + 1;
        // Only a finding if something good follows: a crash while a segment was being
        // created leaves a header that never became durable, at the tail.
        match segment.header {
            None => self.pending.push(Pending::SegmentHeader {
                segment: index,
                kind: DamageKind::SegmentHeaderUnreadable,
            }),
            Some(header) if header.index != index => self.pending.push(Pending::SegmentHeader {
                segment: index,
                kind: DamageKind::SegmentHeaderIndex {
                    found: header.index,
                },
            }),
            Some(_) => {}
        }
        let (entries, extent) = scan(
            segment.bytes(),
            SEGMENT_HEADER_BYTES,
            self.key,
            usize::MAX,
            until,
        );
        self.extents.push(extent);
        for entry in entries {
            match entry {
                Entry::Good {
                    offset,
                    end,
                    header,
                    payload,
                    prev_chain,
                    chain,
                } => self.good(
                    position,
                    index,
                    offset,
                    end,
                    header,
                    &segment.bytes()[payload],
                    prev_chain,
                    chain,
                ),
                Entry::Damaged { offset, header, .. } => self.pending.push(Pending::Damaged {
                    segment: index,
                    offset,
                    header,
                }),
                Entry::Forged {
                    offset, sequence, ..
                } => self.pending.push(Pending::Forged {
                    segment: index,
                    offset,
                    sequence,
                }),
                Entry::Unreadable { offset, end } => self.pending.push(Pending::Unreadable {
                    segment: index,
                    offset,
                    end,
                }),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn good(
        &mut self,
        position: usize,
        index: u64,
        offset: usize,
        end: usize,
        header: RecordHeader,
        payload: &[u8],
        prev_chain: [u8; CHAIN_BYTES],
        chain: [u8; CHAIN_BYTES],
    ) {
        let sequence = header.sequence;
        let damaged_before = !self.pending.is_empty();
        let confirmed = self.confirm_pending();
        self.accounted = self.accounted.max(confirmed);
        let first = offset == SEGMENT_HEADER_BYTES && header.kind == CHECKPOINT;
        // The first record read anchors the sequence: nothing before it is missing.
        let anchor = position == 0 && first;
        let start = first && self.state_start == Some(index);
        let before_start = self.state_start.is_some_and(|start| index < start);
        if sequence <= self.accounted {
            let after = self.accounted;
            self.finding(
                index,
                offset,
                Some(sequence),
                1,
                DamageKind::OutOfOrder { after },
            );
            // Not visited, but the tail is cut after it, never before: the damage stays on
            // disk and is found again at the next recovery.
            if let Some(last) = &mut self.last_good {
                last.position = position;
                last.end = end;
            }
            return;
        }
        let missing = match self.last_good {
            None if anchor || sequence == 1 || Some(sequence) == self.first_sequence => 0,
            // accounted < sequence here (checked above).
            _ => sequence - self.accounted - 1,
        };
        if missing > 0 {
            self.finding(
                index,
                offset,
                Some(sequence),
                missing,
                DamageKind::Lost { count: missing },
            );
        } else if let Some(last) = self.last_good {
            if prev_chain != last.chain && !damaged_before {
                self.finding(index, offset, Some(sequence), 1, DamageKind::ChainBreak);
            }
        }
        if start {
            self.report.checkpoint = Some((index, sequence));
        }
        self.visitor.record(GoodRecord {
            segment: index,
            offset,
            header,
            payload,
            start,
            before_start,
        });
        self.accounted = sequence;
        self.last_good = Some(LastGood {
            position,
            end,
            sequence,
            chain,
        });
    }

    fn last_sequence(&self) -> u64 {
        self.last_good.map_or(0, |last| last.sequence)
    }

    fn last_chain(&self) -> [u8; CHAIN_BYTES] {
        self.last_good.map_or(self.key.genesis(), |last| last.chain)
    }

    /// Records that fail the MAC, among what is pending.
    fn forged(&self) -> Vec<(u64, usize)> {
        self.pending
            .iter()
            .filter_map(|damage| match damage {
                Pending::Forged {
                    segment, offset, ..
                } => Some((*segment, *offset)),
                _ => None,
            })
            .collect()
    }

    /// The decide phase against what the journal is known to hold: whether the damage at
    /// the end is corruption (durable records damaged or gone), and the clean close's
    /// checks. `last_segment` is the newest segment's index.
    fn check_expected(&mut self, expected: Option<Expected>, last_segment: u64) -> bool {
        let Some(expected) = expected else {
            return false;
        };
        let last_good = self.last_sequence();
        if last_good < expected.sequence {
            // Durable records are damaged or gone: corruption, reported and kept on disk.
            let named = self
                .pending
                .iter()
                .filter(|damage| matches!(damage, Pending::Damaged { .. }))
                .count() as u64;
            let confirmed = self.confirm_pending();
            self.accounted = self.accounted.max(confirmed);
            let lost = expected.sequence - last_good;
            self.finding(
                last_segment,
                0,
                Some(expected.sequence),
                lost.saturating_sub(named),
                DamageKind::DurableLost {
                    durable: expected.sequence,
                    readable_end: last_good,
                    lost,
                },
            );
            return true;
        }
        if let Some(chain) = expected.closed_chain {
            if last_good > expected.sequence {
                let count = last_good - expected.sequence;
                self.finding(
                    last_segment,
                    0,
                    Some(last_good),
                    count,
                    DamageKind::AfterClose {
                        count,
                        closed_at: expected.sequence,
                    },
                );
            } else if self.last_chain() != chain {
                self.finding(
                    last_segment,
                    0,
                    Some(last_good),
                    1,
                    DamageKind::CloseMismatch,
                );
            }
        }
        false
    }
}

/// Whether a segment begins with an authentic checkpoint matching its header that the
/// visitor accepts, and from which sequence on the visitor needs the records before it.
fn starts_with_checkpoint(
    segment: &Segment,
    key: &ChainKey,
    visitor: &mut impl Visitor,
) -> Option<u64> {
    let header = segment.header?;
    match scan(segment.bytes(), SEGMENT_HEADER_BYTES, key, 1, u64::MAX)
        .0
        .first()
    {
        Some(Entry::Good {
            header: record,
            prev_chain,
            payload,
            ..
        }) if record.kind == CHECKPOINT
            && record.sequence == header.first_sequence
            && *prev_chain == header.prev_chain =>
        {
            visitor.accepts_checkpoint(&segment.bytes()[payload.clone()])
        }
        _ => None,
    }
}

/// Recovery: reads the history from the newest segment that starts with an accepted
/// checkpoint, hands every good record and every damage within history to `visitor`, cuts
/// the torn tail, and says where to append.
pub(super) fn recover(
    dir: &Path,
    shard: u16,
    key: &ChainKey,
    expected: Option<Expected>,
    visitor: &mut impl Visitor,
) -> Result<Recovered, JournalError> {
    let files = list(dir)?;
    if files.is_empty() {
        return Ok(Recovered {
            tail: None,
            next_index: 1,
            next_sequence: 1,
            durable_sequence: 0,
            last_chain: key.genesis(),
            report: ReadReport::default(),
        });
    }
    // The newest segment that starts with an accepted checkpoint, and what the visitor
    // needs before it.
    let mut start = 0;
    let mut needed_from = 0;
    let mut state_start = None;
    for position in (0..files.len()).rev() {
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
        if let Some(from) = starts_with_checkpoint(&segment, key, visitor) {
            start = position;
            needed_from = from;
            state_start = Some(*index);
            break;
        }
    }
    // Back to the newest segment that begins at or before what the visitor needs.
    let mut first = start;
    let mut first_sequence = None;
    while needed_from > 0 && first > 0 {
        first -= 1;
        let (index, path) = &files[first];
        let header = Segment::open(path, *index)?.header;
        if let Some(header) = header {
            if header.shard != shard {
                return Err(JournalError::WrongShard {
                    expected: shard,
                    found: header.shard,
                });
            }
        }
        first_sequence = header.map(|header| header.first_sequence);
        if first_sequence.is_some_and(|begins| begins <= needed_from) {
            break;
        }
    }
    let mut walk = Walk::new(key, visitor, files[first].0);
    walk.state_start = state_start;
    walk.first_sequence = first_sequence;
    let mut segments = Vec::new();
    for (position, (index, path)) in files.iter().skip(first).enumerate() {
        let segment = Segment::open(path, *index)?;
        walk.read_segment(position, *index, &segment, u64::MAX);
        // What a crashed process wrote may still be only in the page cache: recovery builds
        // on it, so it is made durable now (the `OPEN` marker then says it is).
        segment.file().sync_data()?;
        segments.push(segment);
    }
    // A crash does not leave records whose checksums hold but whose MAC fails. Several of
    // them, or one with nothing good before it, mean a journal written under another
    // master key (or altered): cutting them as a torn tail would destroy it.
    let forged = walk.forged();
    if let Some(&(segment, offset)) = forged.first() {
        if walk.last_good.is_none() || forged.len() > 1 {
            return Err(JournalError::Foreign {
                segment,
                offset,
                count: forged.len(),
            });
        }
    }
    let last_segment = files.last().map_or(0, |(index, _)| *index);
    let damage_at_end = walk.check_expected(expected, last_segment);
    let last_good_sequence = walk.last_sequence();
    let last_chain = walk.last_chain();
    if damage_at_end {
        // Nothing is cut: the damaged records stay as evidence (their subjects are broken),
        // and new records go to a fresh segment after them (the one an earlier start made
        // for them, if nothing was written to it yet).
        let next_sequence = last_good_sequence
            .max(walk.accounted)
            .max(expected.map_or(0, |expected| expected.sequence))
            + 1;
        let empty_last = walk.extents.last() == Some(&SEGMENT_HEADER_BYTES);
        let tail = segments.pop().filter(|segment| {
            empty_last
                && segment.header.is_some_and(|header| {
                    header.first_sequence == next_sequence && header.prev_chain == last_chain
                })
        });
        let mut report = std::mem::take(&mut walk.report);
        report.last_sequence = last_good_sequence;
        return Ok(Recovered {
            tail: tail.map(|segment| Tail {
                segment,
                offset: SEGMENT_HEADER_BYTES,
            }),
            next_index: last_segment + 1,
            next_sequence,
            // Everything up to the expected sequence was durable (damaged or not): a clean
            // close must say so again, or the next start would take the damage for a tail.
            durable_sequence: last_good_sequence
                .max(expected.map_or(0, |expected| expected.sequence)),
            last_chain,
            report,
        });
    }
    // What is still pending lies after the last good record: the torn tail. Cut it.
    let (keep, offset) = match walk.last_good {
        Some(last) => (last.position, last.end),
        None => (0, SEGMENT_HEADER_BYTES),
    };
    let extent = walk.extents.get(keep).copied().unwrap_or(offset);
    // Nothing good at all and no readable segment header (a crash while the very first
    // segment was being created): nothing is worth keeping, start afresh.
    let keep = if walk.last_good.is_none()
        && segments
            .first()
            .is_some_and(|segment| segment.header.is_none())
    {
        None
    } else {
        Some(keep)
    };
    let accounted = walk.accounted;
    let mut report = std::mem::take(&mut walk.report);
    report.last_sequence = last_good_sequence;
    let (kept, torn_tail) = cut_tail(dir, segments, keep, offset, extent)?;
    report.torn_tail = torn_tail;
    let next_index = kept
        .as_ref()
        .map_or(files[first].0, |segment| segment.index + 1);
    let tail = kept
        .filter(|segment| segment.header.is_some())
        .map(|segment| Tail { segment, offset });
    Ok(Recovered {
        tail,
        next_index,
        // Past every sequence number still on disk before the cut, damaged ones included,
        // so that a new record never reuses one.
        next_sequence: last_good_sequence.max(accounted) + 1,
        durable_sequence: last_good_sequence,
        last_chain,
        report,
    })
}

/// The audit's read: every segment from the first, read-only (nothing is cut or written),
/// every later checkpoint handed over like any record. Damage after the last good record is
/// reported as a [`TailNote`] (on a live journal it is a record being written), except
/// records that fail the MAC, which are findings wherever they are. With `read_to`, nothing
/// past that sequence is read (the running appliance's durable sequence: what follows is
/// being written and may be seen half-written).
pub fn inspect(
    dir: &Path,
    key: &ChainKey,
    expected: Option<Expected>,
    read_to: Option<u64>,
    visitor: &mut impl Visitor,
) -> Result<ReadReport, JournalError> {
    let files = list(dir)?;
    let Some((first, first_path)) = files.first() else {
        return Ok(ReadReport::default());
    };
    let mut walk = Walk::new(key, visitor, *first);
    if *first != 1 {
        // The oldest segment left starts the state (its checkpoint), or history is lost.
        let segment = Segment::open_read_only(first_path, *first)?;
        match starts_with_checkpoint(&segment, key, walk.visitor) {
            Some(_) => walk.state_start = Some(*first),
            None => walk.finding(*first, 0, None, 0, DamageKind::GoneBefore { first: *first }),
        }
    }
    let until = read_to.map_or(u64::MAX, |sequence| sequence.max(1));
    for (position, (index, path)) in files.iter().enumerate() {
        let segment = Segment::open_read_only(path, *index)?;
        walk.read_segment(position, *index, &segment, until);
        // Nothing past `read_to` is read, in later segments either: a rotation's checkpoint
        // there follows records still being flushed, which are not missing.
        if walk.last_sequence() >= until {
            break;
        }
    }
    // With nothing good at all, records failing the MAC mean another master key.
    if let Some(&(segment, offset)) = walk.forged().first() {
        if walk.last_good.is_none() {
            return Err(JournalError::Foreign {
                segment,
                offset,
                count: walk.forged().len(),
            });
        }
    }
    let last_segment = files.last().map_or(0, |(index, _)| *index);
    walk.check_expected(expected, last_segment);
    // Records failing the MAC are findings wherever they are; the rest of what is pending
    // after the last good record is the tail, left as it is.
    let (forged, tail): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut walk.pending)
        .into_iter()
        .partition(|damage| matches!(damage, Pending::Forged { .. }));
    walk.confirm(forged);
    let mut report = std::mem::take(&mut walk.report);
    report.last_sequence = walk.last_sequence();
    if !tail.is_empty() {
        report.tail = Some(TailNote {
            entries: tail.len(),
            after_sequence: report.last_sequence,
        });
    }
    Ok(report)
}

/// The cut phase: zeroes everything after `offset` in the kept segment (the `keep`-th read;
/// None keeps nothing) and removes the later segments, which hold nothing good. Returns the
/// kept segment, to append to, and what was cut.
fn cut_tail(
    dir: &Path,
    segments: Vec<Segment>,
    keep: Option<usize>,
    offset: usize,
    extent: usize,
) -> Result<(Option<Segment>, Option<TornTail>), JournalError> {
    let mut kept = None;
    let mut removed = Vec::new();
    let mut zeroed = 0;
    let mut kept_index = 0;
    for (position, mut segment) in segments.into_iter().enumerate() {
        match keep {
            Some(keep) if position < keep => continue,
            Some(keep) if position == keep => {
                kept_index = segment.index;
                let bytes = segment.bytes_mut();
                // A segment file shorter than its header (cut short by a crash) has nothing
                // to zero.
                let start = offset.min(bytes.len());
                let extent = extent.clamp(start, bytes.len());
                if let Some(last) = bytes[start..extent].iter().rposition(|b| *b != 0) {
                    zeroed = last + 1;
                    bytes[start..start + zeroed].fill(0);
                    segment.sync_range(start, zeroed)?;
                }
                kept = Some(segment);
            }
            _ => {
                removed.push(segment.index);
                let path = segment.path.clone();
                drop(segment);
                std::fs::remove_file(&path)?;
            }
        }
    }
    if !removed.is_empty() {
        segment::sync_dir(dir)?;
    }
    let torn_tail = (zeroed > 0 || !removed.is_empty()).then_some(TornTail {
        segment: kept_index,
        offset,
        bytes: zeroed,
        segments_removed: removed,
    });
    Ok((kept, torn_tail))
}
