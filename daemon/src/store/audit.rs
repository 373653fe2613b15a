//! The integrity monitor: a read-only audit of one shard's journal.
//!
//! [`audit_shard`] reads the whole history, from the first segment, with the journal's
//! read-only driver ([`crate::journal::inspect`]) and the same replay as recovery
//! ([`Replay`]): every record's checksums and chain MAC, every invariant the engine checks
//! when a record is applied (versions, registers, `AR + DR == CS`, contiguous and unique
//! piece numbers, each session's AR delta against the postage of its indicia, provider
//! sequences), every later checkpoint against the replayed state, and on top of recovery
//! **every indicium's signature** under the vPSD's public key of the indicium's serial.
//! Each problem is a [`Finding`], and the vPSD it concerns is what the running appliance
//! locks. The same replay yields the [`ledger`](super::ledger).
//!
//! Nothing is written: the segments are mapped copy-on-write from read-only descriptors,
//! and the engine the replay fills is thrown away.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::ledger::{ledger_line, LedgerError, LedgerLine};
use super::recovery::{Finding, RecoveryReport, Replay};
use crate::engine::{Engine, EngineConfig, MasterKey, Record};
use crate::journal::{self, ChainKey, Damage, Expected, GoodRecord, JournalError, Visitor};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error("master key: {0}")]
    MasterKey(#[from] crate::engine::keys::KeyError),
    #[error("shard {shard}: {source}")]
    Journal { shard: u16, source: JournalError },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0} holds no shard journal (shard-NNN directories)")]
    NoJournals(PathBuf),
}

/// Every signature of a session record that does not hold, as findings.
fn check_signatures(engine: &Engine, record: &Record, checked: &mut u64) -> Vec<String> {
    let Record::Session(session) = record else {
        return Vec::new();
    };
    let Some(vpsd) = engine.vpsd(session.vpsd_id) else {
        return vec!["session of an unknown vPSD".into()];
    };
    let mut problems = Vec::new();
    for indicium in session.indicia() {
        *checked += 1;
        let payload = &indicium.payload;
        let holds = vpsd.key(payload.key_serial).is_some_and(|key| {
            key.public
                .verify(payload.signed_bytes().as_ref(), &indicium.signature)
        });
        if !holds {
            problems.push(format!(
                "indicium piece {} does not verify under key #{}",
                payload.piece_number, payload.key_serial
            ));
        }
    }
    problems
}

/// The audit's visitor: the replay, and on each record it applied the ledger line and
/// the signature checks.
struct Audit<'e> {
    replay: Replay<'e>,
    shard: u16,
    ledger: Vec<LedgerLine>,
    /// Signatures of records after this sequence are checked (None: none).
    signatures_after: Option<u64>,
    signatures_checked: u64,
}

impl Visitor for Audit<'_> {
    fn accepts_checkpoint(&mut self, payload: &[u8]) -> Option<u64> {
        self.replay.accepts_checkpoint(payload)
    }

    fn record(&mut self, record: GoodRecord<'_>) {
        let Some(applied) = self.replay.apply(record) else {
            return;
        };
        let engine = self.replay.engine();
        if let Some(line) = ledger_line(self.shard, applied.sequence, engine, &applied.record) {
            self.ledger.push(line);
        }
        let problems = match self.signatures_after {
            Some(after) if applied.sequence > after => {
                check_signatures(engine, &applied.record, &mut self.signatures_checked)
            }
            _ => Vec::new(),
        };
        for what in problems {
            self.replay.problem(
                applied.segment,
                applied.offset,
                applied.sequence,
                applied.record.vpsd_id(),
                what,
            );
        }
    }

    fn damage(&mut self, damage: Damage) {
        self.replay.damage(damage);
    }
}

/// One shard's audit.
#[derive(Debug, Clone)]
pub struct ShardAudit {
    pub shard: u16,
    pub report: RecoveryReport,
    pub signatures_checked: u64,
    pub ledger: Vec<LedgerLine>,
}

/// Audits one shard's journal directory, read-only, every signature included.
/// `durable_up_to`: the sequence the running appliance knows to be durable (the background
/// audit); without it, the `CLOSED` marker a clean stop left, if any, says the same.
pub fn audit_shard(
    dir: &Path,
    shard: u16,
    master_key: &[u8; 32],
    engine_config: EngineConfig,
    durable_up_to: Option<u64>,
) -> Result<ShardAudit, AuditError> {
    audit_shard_with(
        dir,
        shard,
        master_key,
        engine_config,
        durable_up_to,
        Some(0),
    )
}

/// [`audit_shard`], checking the signatures of the records after `signatures_after` only
/// (None: none). Verifying a signature costs about three times as much as making it, so
/// the background monitor checks each one once at most, and only when configured to.
pub fn audit_shard_with(
    dir: &Path,
    shard: u16,
    master_key: &[u8; 32],
    engine_config: EngineConfig,
    durable_up_to: Option<u64>,
    signatures_after: Option<u64>,
) -> Result<ShardAudit, AuditError> {
    // The running appliance's durable sequence: everything up to it must be there, and
    // nothing after it is read.
    let expected = match durable_up_to {
        Some(sequence) => Some(Expected {
            sequence,
            closed_chain: None,
        }),
        // Without it, the markers say what is known: a clean close, or how far the
        // journal was durable when the running appliance opened it.
        None => {
            journal::read_expected(dir).map_err(|source| AuditError::Journal { shard, source })?
        }
    };
    let master = MasterKey::new(master_key)?;
    // The replay never signs nor checks provider signatures: no provider key is needed.
    let mut engine = Engine::new(engine_config, master, [0; 32]);
    let key = ChainKey::derive(master_key, shard);
    let mut audit = Audit {
        replay: Replay::new(&mut engine),
        shard,
        ledger: Vec::new(),
        signatures_after,
        signatures_checked: 0,
    };
    let read = journal::inspect(dir, &key, expected, durable_up_to, &mut audit)
        .map_err(|source| AuditError::Journal { shard, source })?;
    let Audit {
        replay,
        ledger,
        signatures_checked,
        ..
    } = audit;
    Ok(ShardAudit {
        shard,
        report: replay.finish(read).0,
        signatures_checked,
        ledger,
    })
}

/// The whole appliance's audit.
#[derive(Debug, Clone)]
pub struct AuditReport {
    pub shards: Vec<ShardAudit>,
}

impl AuditReport {
    pub fn findings(&self) -> impl Iterator<Item = (u16, &Finding)> {
        self.shards
            .iter()
            .flat_map(|shard| shard.report.findings.iter().map(move |f| (shard.shard, f)))
    }

    pub fn is_clean(&self) -> bool {
        self.findings().next().is_none()
    }

    /// Every ledger line, by shard and sequence.
    pub fn ledger(&self) -> Vec<&LedgerLine> {
        self.shards.iter().flat_map(|shard| &shard.ledger).collect()
    }

    pub fn to_json(&self) -> Value {
        let shards: Vec<Value> = self
            .shards
            .iter()
            .map(|shard| {
                let report = &shard.report;
                json!({
                    "shard": shard.shard,
                    "segments": report.segments_scanned,
                    "records": report.records_replayed,
                    "indicia": report.indicia_replayed,
                    "signatures_checked": shard.signatures_checked,
                    "last_sequence": report.last_sequence,
                    "findings": report.findings.iter().map(|finding| json!({
                        "segment": finding.segment,
                        "offset": finding.offset,
                        "sequence": finding.sequence,
                        "vpsd_id": finding.vpsd_id,
                        "what": finding.what,
                    })).collect::<Vec<_>>(),
                    "locked": report.locked.iter().map(|(id, reason)| json!({
                        "vpsd_id": id,
                        "reason": reason,
                    })).collect::<Vec<_>>(),
                    "provisioning_blocked": report.provisioning_blocked,
                    "tail_note": report.tail_note,
                    "window_note": report.window_note,
                })
            })
            .collect();
        json!({
            "clean": self.is_clean(),
            "findings": self.findings().count(),
            "shards": shards,
        })
    }

    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for shard in &self.shards {
            let report = &shard.report;
            text.push_str(&format!(
                "shard {}: {} segment(s), {} records, {} indicia, {} signatures checked, last seq {}\n",
                shard.shard,
                report.segments_scanned,
                report.records_replayed,
                report.indicia_replayed,
                shard.signatures_checked,
                report.last_sequence
            ));
            for finding in &report.findings {
                text.push_str(&format!("  FINDING {finding}\n"));
            }
            for (id, reason) in &report.locked {
                text.push_str(&format!("  vPSD {id} does not reconcile: {reason}\n"));
            }
            if let Some(reason) = &report.provisioning_blocked {
                text.push_str(&format!("  provisioning would be blocked: {reason}\n"));
            }
            if let Some(note) = &report.window_note {
                text.push_str(&format!("  note: {note}\n"));
            }
            if let Some(note) = &report.tail_note {
                text.push_str(&format!("  note: {note}\n"));
            }
        }
        let findings = self.findings().count();
        text.push_str(&if findings == 0 {
            "audit: clean\n".to_owned()
        } else {
            format!("audit: {findings} finding(s)\n")
        });
        text
    }
}

/// The shards of a data directory: `shard-NNN` directories.
pub fn shard_dirs(data_dir: &Path) -> Result<Vec<(u16, PathBuf)>, AuditError> {
    let io = |source| AuditError::Io {
        path: data_dir.to_owned(),
        source,
    };
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(data_dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(index) = name
            .strip_prefix("shard-")
            .and_then(|digits| digits.parse::<u16>().ok())
        {
            shards.push((index, entry.path()));
        }
    }
    shards.sort();
    if shards.is_empty() {
        return Err(AuditError::NoJournals(data_dir.to_owned()));
    }
    Ok(shards)
}

/// Audits every shard of a data directory, read-only, under its master key
/// ([`crate::datadir::read_master_key`]).
pub fn audit_data_dir(
    data_dir: &Path,
    master_key: &[u8; 32],
    engine_config: &EngineConfig,
) -> Result<AuditReport, AuditError> {
    let mut shards = Vec::new();
    for (shard, dir) in shard_dirs(data_dir)? {
        shards.push(audit_shard(
            &dir,
            shard,
            master_key,
            engine_config.clone(),
            None,
        )?);
    }
    Ok(AuditReport { shards })
}
