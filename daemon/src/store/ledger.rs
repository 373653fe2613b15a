//! The ledger: one [`LedgerLine`] per money movement (refill, session, withdrawal) the
//! journal holds, which `indiciad export-ledger` writes (JSON lines or CSV) for the
//! provider's accounting, and which [`reconcile`] compares with such a file.
//! docs/FILES.md (section 6) describes the columns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::engine::{Engine, Record};

/// What a ledger line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// One money movement, as the journal holds it. Fields that do not apply are 0. Its JSON
/// form has the column names as keys (serde), its CSV form the values in
/// [`LEDGER_COLUMNS`] order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Every column but `kind`, in [`LEDGER_COLUMNS`] order.
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

    /// The JSON object (keys in alphabetical order: serde_json's map is sorted).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    pub fn to_csv(&self) -> String {
        let mut values: Vec<String> = self.numbers().iter().map(u64::to_string).collect();
        values.insert(2, self.kind.name().to_owned());
        values.join(",")
    }

    /// Builds a line from CSV values in [`LEDGER_COLUMNS`] order.
    fn from_csv(values: &[&str]) -> Result<Self, String> {
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
            serde_json::from_str(text).map_err(|err| format!("not a ledger line: {err}"))
        } else {
            Self::from_csv(&text.split(',').collect::<Vec<_>>())
        }
    }

    /// The fields in which two lines differ.
    pub fn differences(&self, other: &Self) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.kind != other.kind {
            differ.push("kind");
        }
        let columns = LEDGER_COLUMNS
            .iter()
            .copied()
            .filter(|name| *name != "kind");
        for ((name, a), b) in columns.zip(self.numbers()).zip(other.numbers()) {
            if a != b {
                differ.push(name);
            }
        }
        differ
    }
}

/// The ledger line a record makes, if it moves money. `engine` holds the state after it.
pub fn ledger_line(
    shard: u16,
    sequence: u64,
    engine: &Engine,
    record: &Record,
) -> Option<LedgerLine> {
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

/// A ledger file that does not parse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {what}")]
    Line {
        path: PathBuf,
        line: usize,
        what: String,
    },
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
pub fn read_ledger(path: &Path) -> Result<Vec<(usize, LedgerLine)>, LedgerError> {
    let text = std::fs::read_to_string(path).map_err(|source| LedgerError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("shard,") {
            continue;
        }
        let parsed = LedgerLine::parse(trimmed).map_err(|what| LedgerError::Line {
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
