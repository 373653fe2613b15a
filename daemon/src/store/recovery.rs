//! Replay: the journal's history applied to an engine, in order.
//!
//! The journal ([`crate::journal::history`]) reads the records and says where it is
//! damaged; [`Replay`] gives each record its meaning. A record is decoded
//! ([`super::codec`]) and applied with [`Engine::apply`], which checks that it follows its
//! vPSD's state (version, registers, piece numbers) and changes nothing when it does not.
//! What does not decode, does not follow, or was lost to damage is a [`Finding`], and the
//! vPSD it concerns is locked with the reason. Records lost without a readable header are
//! counted and attributed through the version gaps they leave in later records of their
//! vPSD; when some remain unattributed (or a checkpoint could not be read), every vPSD of
//! the shard is locked and provisioning is blocked, because none can be shown complete.

use std::collections::BTreeMap;

use crate::engine::{ApplyError, Engine, Record};
use crate::journal::{Damage, GoodRecord, ReadReport, TornTail, Visitor};

use super::codec::{self, kind};
use super::window::WindowOrigin;

/// One thing recovery (or the audit) found wrong.
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

/// What recovery (or the audit) did and found.
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
    /// Set when the idempotency window could not be rebuilt whole because the records it
    /// needs are gone (not a finding: no register is in doubt, but retries of the requests
    /// they answered are not recognized).
    pub window_note: Option<String>,
    /// Cluster mode: what checking the journal against etcd found.
    pub cluster: Option<super::replica::Reconciled>,
}

impl RecoveryReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// A record the replay applied: its sequence number and the record itself.
#[derive(Debug)]
pub struct Applied {
    pub segment: u64,
    pub offset: usize,
    pub sequence: u64,
    pub record: Record,
}

/// The replay of one shard's history into an engine (the [`Visitor`] of a journal read).
#[derive(Debug)]
pub struct Replay<'e> {
    engine: &'e mut Engine,
    report: RecoveryReport,
    /// Records lost without a trustworthy header.
    unattributed: u64,
    /// Records found missing from a vPSD's versions.
    attributed: u64,
    /// An authentic checkpoint could not be read: any vPSD may be missing.
    state_lost: bool,
    /// Where the idempotency window's records begin, as the replay goes.
    window: WindowOrigin,
    /// The start checkpoint needs the answers of the records from this sequence on.
    window_needed_from: u64,
    /// The first record read before the start checkpoint.
    first_before_start: Option<u64>,
}

impl<'e> Replay<'e> {
    pub fn new(engine: &'e mut Engine) -> Self {
        Self {
            engine,
            report: RecoveryReport::default(),
            unattributed: 0,
            attributed: 0,
            state_lost: false,
            window: WindowOrigin::default(),
            window_needed_from: 0,
            first_before_start: None,
        }
    }

    /// The state as replayed so far.
    pub fn engine(&self) -> &Engine {
        self.engine
    }

    /// A finding that concerns a vPSD's history: reported, and the vPSD locked.
    pub fn problem(
        &mut self,
        segment: u64,
        offset: usize,
        sequence: u64,
        vpsd_id: u64,
        what: String,
    ) {
        self.finding(segment, offset, Some(sequence), Some(vpsd_id), what.clone());
        self.lock(vpsd_id, format!("journal seq {sequence}: {what}"));
    }

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

    /// Restores the start checkpoint, or checks a later one against the replayed state.
    fn checkpoint(&mut self, record: &GoodRecord<'_>) {
        let sequence = record.header.sequence;
        let stored = match codec::decode_checkpoint(record.payload) {
            Ok(checkpoint) => checkpoint,
            Err(err) => {
                self.finding(
                    record.segment,
                    record.offset,
                    Some(sequence),
                    None,
                    format!("checkpoint does not decode: {err}"),
                );
                // The whole state it carried is unknown now.
                self.state_lost = true;
                return;
            }
        };
        if record.start
            && self.window_needed_from > 0
            && self
                .first_before_start
                .is_none_or(|first| first > self.window_needed_from)
        {
            // The window cannot be rebuilt whole: retries of the requests whose answers
            // are gone are not recognized (no register is in doubt).
            self.report.window_note = Some(format!(
                "the idempotency window's records from seq {} are gone: retries of requests \
                 answered before seq {} are not recognized",
                self.window_needed_from,
                self.first_before_start.unwrap_or(sequence)
            ));
        }
        let checkpoint = stored.state;
        // A later checkpoint must agree with the replay up to it (unless damage already
        // made them differ); the start checkpoint is the state itself. (Its window_from is
        // not compared: it depends on the window's configured bound, and says nothing of
        // the registers.)
        if !record.start
            && self.report.findings.is_empty()
            && checkpoint != self.engine.checkpoint()
        {
            self.finding(
                record.segment,
                record.offset,
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
        for (vpsd_id, reason) in &self.report.locked {
            self.engine.lock_integrity(*vpsd_id, reason);
        }
    }

    /// A record before the start checkpoint: its answers enter the idempotency window
    /// (the state comes from the checkpoint).
    fn remember(&mut self, record: &GoodRecord<'_>) {
        let header = record.header;
        self.first_before_start.get_or_insert(header.sequence);
        // (Its segment may begin before the window does.)
        if header.sequence < self.window_needed_from
            || !matches!(
                header.kind,
                kind::SESSION | kind::PROVIDER | kind::RESET | kind::RELEASE
            )
            || self.report.locked.contains_key(&header.subject)
        {
            return;
        }
        match codec::decode_record(
            header.kind,
            header.subject,
            header.at_unix,
            record.payload,
            |_| None,
        ) {
            Ok(decoded) => {
                let entered_before = self.engine.window().entered();
                self.engine.remember(&decoded);
                self.window
                    .note(header.sequence, entered_before, self.engine.window());
            }
            Err(err) => self.problem(
                record.segment,
                record.offset,
                header.sequence,
                header.subject,
                format!("record does not decode: {err}"),
            ),
        }
    }

    /// Decodes and applies one good record. Returns it when it was applied.
    pub fn apply(&mut self, record: GoodRecord<'_>) -> Option<Applied> {
        let header = record.header;
        if record.before_start {
            self.remember(&record);
            return None;
        }
        if header.kind == kind::CHECKPOINT {
            self.checkpoint(&record);
            return None;
        }
        let (segment, offset, sequence, vpsd_id) = (
            record.segment,
            record.offset,
            header.sequence,
            header.subject,
        );
        if self.report.locked.contains_key(&vpsd_id) {
            return None;
        }
        let decoded =
            codec::decode_record(header.kind, vpsd_id, header.at_unix, record.payload, |id| {
                self.engine.vpsd(id).map(|vpsd| vpsd.algorithm)
            });
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(err) => {
                self.problem(
                    segment,
                    offset,
                    sequence,
                    vpsd_id,
                    format!("record does not decode: {err}"),
                );
                return None;
            }
        };
        let entered_before = self.engine.window().entered();
        match self.engine.apply(&decoded) {
            Ok(()) => {
                self.window
                    .note(sequence, entered_before, self.engine.window());
                self.report.records_replayed += 1;
                if let Record::Session(session) = &decoded {
                    self.report.indicia_replayed += session.indicia().count() as u64;
                }
                Some(Applied {
                    segment,
                    offset,
                    sequence,
                    record: decoded,
                })
            }
            Err(err) => {
                match &err {
                    ApplyError::Version { current, found, .. } if found > current => {
                        self.attributed += found - current - 1;
                    }
                    ApplyError::UnknownVpsd { .. } => {
                        self.attributed += decoded.version().saturating_sub(1)
                    }
                    _ => {}
                }
                self.problem(
                    segment,
                    offset,
                    sequence,
                    vpsd_id,
                    format!("history does not reconcile: {err}"),
                );
                None
            }
        }
    }

    /// Damage the journal found within history.
    pub fn damage(&mut self, damage: Damage) {
        self.unattributed += damage.unattributed;
        let what = damage.kind.to_string();
        self.finding(
            damage.segment,
            damage.offset,
            damage.sequence,
            damage.subject,
            what.clone(),
        );
        if let (true, Some(vpsd_id), Some(sequence)) =
            (damage.breaks_subject, damage.subject, damage.sequence)
        {
            self.lock(vpsd_id, format!("journal seq {sequence}: {what}"));
        }
    }

    /// At the end: records lost without a readable header that no vPSD's version gap
    /// accounts for leave every vPSD in doubt. Returns the report, with what the journal's
    /// read found, and where the idempotency window's records begin.
    pub fn finish(mut self, read: ReadReport) -> (RecoveryReport, WindowOrigin) {
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
        let mut report = self.report;
        report.checkpoint = read.checkpoint;
        report.segments_scanned = read.segments_scanned;
        report.last_sequence = read.last_sequence;
        report.torn_tail = read.torn_tail;
        report.tail_note = read.tail.map(|tail| tail.to_string());
        (report, self.window)
    }
}

impl Visitor for Replay<'_> {
    fn accepts_checkpoint(&mut self, payload: &[u8]) -> Option<u64> {
        let stored = codec::decode_checkpoint(payload).ok()?;
        self.window_needed_from = stored.window_from;
        Some(stored.window_from)
    }

    fn record(&mut self, record: GoodRecord<'_>) {
        self.apply(record);
    }

    fn damage(&mut self, damage: Damage) {
        Replay::damage(self, damage);
    }
}
