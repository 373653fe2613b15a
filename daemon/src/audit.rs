//! The integrity monitor and the ledger.
//!
//! [`audit_shard`] reads one shard's journal read-only, from its first segment, with the
//! same scan and replay as recovery ([`crate::journal::recovery::audit`]): every record's
//! checksums and chain MAC, every invariant the engine checks when a record is applied
//! (versions, registers, `AR + DR == CS`, contiguous and unique piece numbers, each session's
//! AR delta against the postage of its indicia, provider sequences), every later
//! checkpoint against the replayed state, and on top of recovery **every indicium's
//! signature** under the vPSD's public key of the indicium's serial. Each problem is a
//! [`Finding`], and the vPSD it concerns is what the running appliance locks.
//!
//! The same replay yields the ledger: one [`LedgerLine`] per refill, session and
//! withdrawal, which `indiciad export-ledger` writes (JSON lines or CSV) for the
//! provider's accounting, and which [`reconcile`] compares with such a file.
//! docs/FILES.md (section 6) describes the columns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::engine::{Engine, EngineConfig, MasterKey, Record};
use crate::journal::recovery::{self, Finding, RecoveryReport};
use crate::journal::{ChainKey, JournalError};

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
    MasterKey(String),
    #[error("shard {shard}: {source}")]
    Journal { shard: u16, source: JournalError },
    #[error("{path} line {line}: {what}")]
    Ledger {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{0} holds no shard journal (shard-NNN directories)")]
    NoJournals(PathBuf),
}

/// What a ledger line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerKind {
    /// Funds credited by a provider authorization.
    Refill,
    /// A signing session: the postage of its indicia debited.
    Session,
    /// The descending register refunded; the vPSD retired.
    Withdrawal,
}

impl LedgerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Refill => "refill",
            Self::Session => "session",
            Self::Withdrawal => "withdrawal",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "refill" => Some(Self::Refill),
            "session" => Some(Self::Session),
            "withdrawal" => Some(Self::Withdrawal),
            _ => None,
        }
    }
}

/// One money movement, as the journal holds it. Fields that do not apply are 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerLine {
    pub shard: u16,
    /// The journal record's sequence number in its shard: with the shard, the line's key.
    pub sequence: u64,
    pub kind: LedgerKind,
    pub vpsd_id: u64,
    /// Refill: credited. Session: the postage of its indicia. Withdrawal: refunded.
    pub amount_mills: u64,
    /// Session: indicia signed.
    pub indicia: u64,
    pub first_piece: u64,
    pub last_piece: u64,
    /// The registers after the movement.
    pub ascending_mills: u64,
    pub descending_mills: u64,
    pub control_total_mills: u64,
    /// Refill: the provider authorization's sequence.
    pub provider_sequence: u64,
    /// Refill and withdrawal: when the appliance recorded it (unix seconds).
    pub at_unix: u64,
}

/// The CSV header in column order (JSON lines carry the same names as keys, written in
/// alphabetical order).
pub const LEDGER_COLUMNS: [&str; 13] = [
    "shard",
    "sequence",
    "kind",
    "vpsd_id",
    "amount_mills",
    "indicia",
    "first_piece",
    "last_piece",
    "ascending_mills",
    "descending_mills",
    "control_total_mills",
    "provider_sequence",
    "at_unix",
];

impl LedgerLine {
    fn numbers(&self) -> [u64; 12] {
        [
            u64::from(self.shard),
            self.sequence,
            self.vpsd_id,
            self.amount_mills,
            self.indicia,
            self.first_piece,
            self.last_piece,
            self.ascending_mills,
            self.descending_mills,
            self.control_total_mills,
            self.provider_sequence,
            self.at_unix,
        ]
    }

    /// The column values in [`LEDGER_COLUMNS`] order, as text.
    fn values(&self) -> Vec<String> {
        let numbers = self.numbers();
        let mut values: Vec<String> = numbers.iter().map(u64::to_string).collect();
        values.insert(2, self.kind.name().to_owned());
        values
    }

    pub fn to_json(&self) -> Value {
        let mut numbers = self.numbers().into_iter();
        let map: serde_json::Map<String, Value> = LEDGER_COLUMNS
            .iter()
            .map(|name| {
                let value = if *name == "kind" {
                    Value::from(self.kind.name())
                } else {
                    Value::from(numbers.next().unwrap_or_default())
                };
                ((*name).to_owned(), value)
            })
            .collect();
        Value::Object(map)
    }

    pub fn to_csv(&self) -> String {
        self.values().join(",")
    }

    /// Builds a line from column values in [`LEDGER_COLUMNS`] order.
    fn from_values(values: &[&str]) -> Result<Self, String> {
        if values.len() != LEDGER_COLUMNS.len() {
            return Err(format!(
                "{} columns where {} were expected",
                values.len(),
                LEDGER_COLUMNS.len()
            ));
        }
        let number = |index: usize| -> Result<u64, String> {
            values[index].trim().parse::<u64>().map_err(|_| {
                format!(
                    "`{}` is not a number: {:?}",
                    LEDGER_COLUMNS[index], values[index]
                )
            })
        };
        let kind = LedgerKind::parse(values[2].trim()).ok_or_else(|| {
            format!(
                "`kind` is not refill, session or withdrawal: {:?}",
                values[2]
            )
        })?;
        Ok(Self {
            shard: u16::try_from(number(0)?).map_err(|_| "`shard` is too large".to_owned())?,
            sequence: number(1)?,
            kind,
            vpsd_id: number(3)?,
            amount_mills: number(4)?,
            indicia: number(5)?,
            first_piece: number(6)?,
            last_piece: number(7)?,
            ascending_mills: number(8)?,
            descending_mills: number(9)?,
            control_total_mills: number(10)?,
            provider_sequence: number(11)?,
            at_unix: number(12)?,
        })
    }

    /// Reads one line of a ledger file: a JSON object (JSON lines) or CSV values.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.starts_with('{') {
            let value: Value =
                serde_json::from_str(text).map_err(|err| format!("not JSON: {err}"))?;
            let mut values = Vec::with_capacity(LEDGER_COLUMNS.len());
            for name in LEDGER_COLUMNS {
                let field = value
                    .get(name)
                    .ok_or_else(|| format!("no `{name}` field"))?;
                values.push(match field {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    other => return Err(format!("`{name}` is {other}")),
                });
            }
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            Self::from_values(&refs)
        } else {
            Self::from_values(&text.split(',').collect::<Vec<_>>())
        }
    }

    /// The fields in which two lines differ.
    pub fn differences(&self, other: &Self) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.kind != other.kind {
            differ.push("kind");
        }
        let columns: Vec<&'static str> = LEDGER_COLUMNS
            .iter()
            .copied()
            .filter(|name| *name != "kind")
            .collect();
        for ((name, a), b) in columns.iter().zip(self.numbers()).zip(other.numbers()) {
            if a != b {
                differ.push(name);
            }
        }
        differ
    }
}

/// The ledger line a record makes, if it moves money. `engine` holds the state after it.
fn ledger_line(shard: u16, sequence: u64, engine: &Engine, record: &Record) -> Option<LedgerLine> {
    let registers = engine.vpsd(record.vpsd_id())?.registers;
    let mut line = LedgerLine {
        shard,
        sequence,
        kind: LedgerKind::Session,
        vpsd_id: record.vpsd_id(),
        amount_mills: 0,
        indicia: 0,
        first_piece: 0,
        last_piece: 0,
        ascending_mills: registers.ascending_mills,
        descending_mills: registers.descending_mills,
        control_total_mills: registers.control_total_mills,
        provider_sequence: 0,
        at_unix: 0,
    };
    match record {
        Record::Provider {
            kind: indicia_proto::AuthorizationKind::Refill,
            amount_mills,
            sequence: provider_sequence,
            at_unix,
            ..
        } => {
            line.kind = LedgerKind::Refill;
            line.amount_mills = *amount_mills;
            line.provider_sequence = *provider_sequence;
            line.at_unix = *at_unix;
        }
        Record::Withdraw {
            refund_mills,
            at_unix,
            ..
        } => {
            line.kind = LedgerKind::Withdrawal;
            line.amount_mills = *refund_mills;
            line.at_unix = *at_unix;
        }
        Record::Session(session) => {
            line.amount_mills = session.after.ascending_mills - session.before.ascending_mills;
            line.indicia = session.after.piece_count - session.before.piece_count;
            line.first_piece = session.before.piece_count + 1;
            line.last_piece = session.after.piece_count;
        }
        _ => return None,
    }
    Some(line)
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
    let expected = match durable_up_to {
        Some(sequence) => Some(recovery::Expected {
            sequence,
            closed_chain: None,
        }),
        None => crate::journal::read_closed(dir)
            .map_err(|source| AuditError::Journal { shard, source })?,
    };
    let master =
        MasterKey::new(master_key).map_err(|err| AuditError::MasterKey(err.to_string()))?;
    // The replay never signs nor checks provider signatures: no provider key is needed.
    let mut engine = Engine::new(engine_config, master, [0; 32]);
    let key = ChainKey::derive(master_key, shard);
    let mut ledger = Vec::new();
    let mut signatures_checked = 0;
    let mut observer = |engine: &Engine, sequence: u64, record: &Record| {
        if let Some(line) = ledger_line(shard, sequence, engine, record) {
            ledger.push(line);
        }
        match signatures_after {
            Some(after) if sequence > after => {
                check_signatures(engine, record, &mut signatures_checked)
            }
            _ => Vec::new(),
        }
    };
    let report = recovery::audit(dir, shard, &key, &mut engine, expected, &mut observer)
        .map_err(|source| AuditError::Journal { shard, source })?;
    Ok(ShardAudit {
        shard,
        report,
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

/// Audits every shard of a data directory, read-only. The master key comes from
/// `master_key_file` when given (a systemd credential), else from the directory.
pub fn audit_data_dir(
    data_dir: &Path,
    master_key_file: Option<&Path>,
    engine_config: &EngineConfig,
) -> Result<AuditReport, AuditError> {
    let key_path = master_key_file
        .map(Path::to_owned)
        .unwrap_or_else(|| data_dir.join(crate::datadir::MASTER_KEY_FILE));
    let master_key = crate::datadir::load_secret(&key_path)?;
    let mut shards = Vec::new();
    for (shard, dir) in shard_dirs(data_dir)? {
        shards.push(audit_shard(
            &dir,
            shard,
            &master_key,
            engine_config.clone(),
            None,
        )?);
    }
    Ok(AuditReport { shards })
}

/// How a ledger file differs from the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// In the journal, not in the ledger.
    pub missing: Vec<LedgerLine>,
    /// In the ledger (with its line number), not in the journal, or there twice.
    pub extra: Vec<(usize, LedgerLine)>,
    /// The same shard and sequence, other values: (ledger line number, ledger's, journal's,
    /// fields that differ).
    pub different: Vec<(usize, LedgerLine, LedgerLine, Vec<&'static str>)>,
    /// Lines that matched.
    pub matched: usize,
}

impl Reconciliation {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "clean": self.is_clean(),
            "matched": self.matched,
            "missing": self.missing.iter().map(LedgerLine::to_json).collect::<Vec<_>>(),
            "extra": self.extra.iter().map(|(line, entry)| json!({
                "line": line, "entry": entry.to_json(),
            })).collect::<Vec<_>>(),
            "different": self.different.iter().map(|(line, ledger, journal, fields)| json!({
                "line": line,
                "ledger": ledger.to_json(),
                "journal": journal.to_json(),
                "fields": fields,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for line in &self.missing {
            text.push_str(&format!(
                "  MISSING from the ledger: shard {} seq {} {} vPSD {} amount {}\n",
                line.shard,
                line.sequence,
                line.kind.name(),
                line.vpsd_id,
                indicia_proto::format_mills(line.amount_mills)
            ));
        }
        for (number, line) in &self.extra {
            text.push_str(&format!(
                "  EXTRA ledger line {number}: shard {} seq {} {} vPSD {} is not in the journal\n",
                line.shard,
                line.sequence,
                line.kind.name(),
                line.vpsd_id
            ));
        }
        for (number, ledger, _, fields) in &self.different {
            text.push_str(&format!(
                "  DIFFERENT ledger line {number}: shard {} seq {} differs in {}\n",
                ledger.shard,
                ledger.sequence,
                fields.join(", ")
            ));
        }
        text.push_str(&format!(
            "ledger: {} line(s) match, {} missing, {} extra, {} different\n",
            self.matched,
            self.missing.len(),
            self.extra.len(),
            self.different.len()
        ));
        text
    }
}

/// Reads a ledger file (JSON lines, or CSV with or without its header line).
pub fn read_ledger(path: &Path) -> Result<Vec<(usize, LedgerLine)>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("shard,") {
            continue;
        }
        let parsed = LedgerLine::parse(trimmed).map_err(|what| AuditError::Ledger {
            path: path.to_owned(),
            line: index + 1,
            what,
        })?;
        lines.push((index + 1, parsed));
    }
    Ok(lines)
}

/// Compares a ledger with the journal's lines, keyed by shard and sequence.
pub fn reconcile(journal: &[&LedgerLine], ledger: &[(usize, LedgerLine)]) -> Reconciliation {
    let mut expected: BTreeMap<(u16, u64), &LedgerLine> = journal
        .iter()
        .map(|line| ((line.shard, line.sequence), *line))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut result = Reconciliation::default();
    for (number, line) in ledger {
        let key = (line.shard, line.sequence);
        if !seen.insert(key) {
            result.extra.push((*number, line.clone()));
            continue;
        }
        match expected.remove(&key) {
            None => result.extra.push((*number, line.clone())),
            Some(journal_line) => {
                let fields = line.differences(journal_line);
                if fields.is_empty() {
                    result.matched += 1;
                } else {
                    result
                        .different
                        .push((*number, line.clone(), journal_line.clone(), fields));
                }
            }
        }
    }
    result.missing = expected.into_values().cloned().collect();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(sequence: u64, amount: u64) -> LedgerLine {
        LedgerLine {
            shard: 1,
            sequence,
            kind: LedgerKind::Session,
            vpsd_id: 7,
            amount_mills: amount,
            indicia: 2,
            first_piece: 3,
            last_piece: 4,
            ascending_mills: 10,
            descending_mills: 90,
            control_total_mills: 100,
            provider_sequence: 0,
            at_unix: 0,
        }
    }

    #[test]
    fn lines_read_back_from_json_and_csv() {
        let original = line(5, 1460);
        assert_eq!(
            LedgerLine::parse(&original.to_json().to_string()),
            Ok(original.clone())
        );
        assert_eq!(LedgerLine::parse(&original.to_csv()), Ok(original.clone()));
        assert_eq!(
            original.to_csv(),
            "1,5,session,7,1460,2,3,4,10,90,100,0,0",
            "the column order is documented"
        );
        assert!(LedgerLine::parse("1,5,gift,7,1460,2,3,4,10,90,100,0,0").is_err());
        assert!(LedgerLine::parse("1,5,session,7").is_err());
        assert!(LedgerLine::parse("{\"shard\":1}").is_err());
    }

    #[test]
    fn reconciliation_finds_missing_extra_different_and_doubled_lines() {
        let journal = [line(1, 100), line(2, 200), line(3, 300)];
        let refs: Vec<&LedgerLine> = journal.iter().collect();
        let ledger = vec![
            (1, line(1, 100)),
            (2, line(3, 999)),
            (3, line(4, 400)),
            (4, line(1, 100)),
        ];
        let result = reconcile(&refs, &ledger);
        assert_eq!(result.matched, 1);
        assert_eq!(result.missing, vec![line(2, 200)]);
        assert_eq!(result.extra, vec![(3, line(4, 400)), (4, line(1, 100))]);
        assert_eq!(result.different.len(), 1);
        assert_eq!(result.different[0].0, 2);
        assert_eq!(result.different[0].3, vec!["amount_mills"]);
        assert!(!result.is_clean());
        assert!(reconcile(
            &refs,
            &[(1, line(1, 100)), (2, line(2, 200)), (3, line(3, 300))]
        )
        .is_clean());
    }
}
