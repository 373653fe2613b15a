//! What `indiciactl` prints: text for people, or JSON (`--json`) for scripts. The JSON
//! fields are an interface: scripts rely on them.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicia_proto::{
    format_mills, AuthorizationKind, Indicium, LockReason, ProviderAuthorization, StatEntry,
    VpsdState, VpsdStatus,
};
use serde_json::{json, Value};

use super::CliError;
use crate::verify::Outcome;

/// Where a command's result goes, and in which form.
pub(super) struct Output<'a> {
    pub json: bool,
    out: &'a mut dyn Write,
}

impl std::fmt::Debug for Output<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl<'a> Output<'a> {
    pub fn new(json: bool, out: &'a mut dyn Write) -> Self {
        Self { json, out }
    }

    /// Prints `text` on the command's output.
    pub fn print(&mut self, text: &str) -> Result<(), CliError> {
        self.out
            .write_all(text.as_bytes())
            .map_err(|source| CliError::Output {
                path: PathBuf::from("<stdout>"),
                source,
            })
    }

    /// Writes `text` to `path`, or prints it when there is none.
    pub fn write_to(&mut self, path: Option<&Path>, text: &str) -> Result<(), CliError> {
        match path {
            Some(path) => std::fs::write(path, text).map_err(|source| CliError::Output {
                path: path.to_owned(),
                source,
            }),
            None => self.print(text),
        }
    }

    /// A vPSD's status, as text or JSON.
    pub fn status(&mut self, status: &VpsdStatus) -> Result<(), CliError> {
        let text = if self.json {
            format!("{}\n", status_json(status))
        } else {
            status_text(status)
        };
        self.print(&text)
    }

    /// One JSON value on a line, or `text` for people.
    pub fn either(
        &mut self,
        value: impl FnOnce() -> Value,
        text: impl FnOnce() -> String,
    ) -> Result<(), CliError> {
        let text = if self.json {
            format!("{}\n", value())
        } else {
            text()
        };
        self.print(&text)
    }
}

fn state_name(state: &VpsdState) -> (&'static str, Option<String>) {
    match state {
        VpsdState::Active => ("active", None),
        VpsdState::Locked(LockReason::Operator(reason)) => {
            ("locked", Some(format!("operator: {reason}")))
        }
        VpsdState::Locked(LockReason::ContactOverdue) => {
            ("locked", Some("provider contact overdue".into()))
        }
        VpsdState::Locked(LockReason::Integrity(reason)) => {
            ("locked", Some(format!("integrity: {reason}")))
        }
        VpsdState::Withdrawn => ("withdrawn", None),
    }
}

/// A vPSD's status as JSON (the fields scripts rely on are stable).
pub fn status_json(status: &VpsdStatus) -> Value {
    let (state, reason) = state_name(&status.state);
    json!({
        "vpsd_id": status.vpsd_id,
        "owner": status.owner,
        "algorithm": status.algorithm.name(),
        "key_serial": status.key_serial,
        "state": state,
        "lock_reason": reason,
        "ascending_mills": status.ascending_mills,
        "descending_mills": status.descending_mills,
        "control_total_mills": status.control_total_mills,
        "piece_count": status.piece_count,
        "origin_zip": status.origin_zip.to_string(),
        "last_contact_unix": status.last_contact_unix,
        "provider_sequence": status.provider_sequence,
        "version": status.version,
    })
}

/// A vPSD's status for people.
pub fn status_text(status: &VpsdStatus) -> String {
    let (state, reason) = state_name(&status.state);
    let state = match reason {
        Some(reason) => format!("{state} ({reason})"),
        None => state.to_owned(),
    };
    format!(
        "vPSD {}  owner {}  {} key #{}\n\
         state:          {state}\n\
         ascending:      {}\n\
         descending:     {}\n\
         control total:  {}\n\
         pieces:         {}\n\
         origin ZIP:     {}\n\
         provider seq:   {} (the next authorization needs {})\n\
         last contact:   {} (unix seconds)\n\
         version:        {}\n",
        status.vpsd_id,
        status.owner,
        status.algorithm.name(),
        status.key_serial,
        format_mills(status.ascending_mills),
        format_mills(status.descending_mills),
        format_mills(status.control_total_mills),
        status.piece_count,
        status.origin_zip,
        status.provider_sequence,
        status.provider_sequence + 1,
        status.last_contact_unix,
        status.version,
    )
}

/// What `withdraw` prints: the refund and the retired vPSD's status.
pub fn withdrawn(
    output: &mut Output<'_>,
    refund_mills: u64,
    status: &VpsdStatus,
) -> Result<(), CliError> {
    output.either(
        || {
            let mut value = status_json(status);
            value["refund_mills"] = refund_mills.into();
            value
        },
        || {
            format!(
                "refund {} (the descending register), vPSD retired\n{}",
                format_mills(refund_mills),
                status_text(status)
            )
        },
    )
}

/// Signed indicia: one hex line each, or a JSON array.
pub fn indicia(signed: &[Indicium], json: bool) -> String {
    if json {
        let list: Vec<Value> = signed
            .iter()
            .map(|indicium| {
                json!({
                    "piece_number": indicium.payload.piece_number,
                    "postage_mills": indicium.payload.postage_mills,
                    "indicium": hex::encode(indicium.to_bytes()),
                })
            })
            .collect();
        format!("{}\n", Value::Array(list))
    } else {
        signed
            .iter()
            .map(|indicium| format!("{}\n", hex::encode(indicium.to_bytes())))
            .collect()
    }
}

/// What a hot backup copied: a JSON object, or a line per shard.
pub fn backup(out: &str, report: &indicia_proto::BackupReport, json: bool) -> String {
    if json {
        let shards: Vec<serde_json::Value> = report
            .shards
            .iter()
            .enumerate()
            .map(|(shard, copy)| {
                serde_json::json!({
                    "shard": shard,
                    "sequence": copy.sequence,
                    "segments": copy.segments,
                    "bytes": copy.bytes,
                })
            })
            .collect();
        let value = serde_json::json!({
            "out": out,
            "taken_unix": report.taken_unix,
            "audit_clean": report.clean,
            "shards": shards,
        });
        return format!("{value}\n");
    }
    let mut text = format!(
        "backup in {out}, taken at unix {}; audit of the copy: {}\n",
        report.taken_unix,
        if report.clean { "clean" } else { "FINDINGS" }
    );
    for (shard, copy) in report.shards.iter().enumerate() {
        text.push_str(&format!(
            "  shard {shard}: up to sequence {}, {} segment(s), {} bytes\n",
            copy.sequence, copy.segments, copy.bytes
        ));
    }
    text
}

/// The appliance's counters: a JSON object, or one aligned line each.
pub fn stats(entries: &[StatEntry], json: bool) -> String {
    if json {
        let map: serde_json::Map<String, Value> = entries
            .iter()
            .map(|entry| (entry.name.clone(), Value::from(entry.value)))
            .collect();
        format!("{}\n", Value::Object(map))
    } else {
        entries
            .iter()
            .map(|entry| format!("{:<40} {}\n", entry.name, entry.value))
            .collect()
    }
}

/// The cluster's appliances, and how many vPSDs a takeover took (None: a status).
pub fn cluster(
    taken: Option<u32>,
    appliances: &[indicia_proto::ApplianceEntry],
    json: bool,
) -> String {
    if json {
        let list: Vec<Value> = appliances
            .iter()
            .map(|appliance| {
                json!({
                    "id": appliance.id,
                    "address": appliance.address,
                    "alive": appliance.alive,
                    "draining": appliance.draining,
                    "vpsds": appliance.vpsds,
                })
            })
            .collect();
        let mut value = json!({ "appliances": list });
        if let Some(taken) = taken {
            value["taken_over"] = Value::from(taken);
        }
        format!("{value}\n")
    } else {
        let mut text = String::new();
        if let Some(taken) = taken {
            text.push_str(&format!("took over {taken} vPSDs\n"));
        }
        text.push_str(&format!(
            "{:<20} {:<24} {:<6} {:<9} {}\n",
            "appliance", "address", "alive", "draining", "vpsds"
        ));
        for appliance in appliances {
            text.push_str(&format!(
                "{:<20} {:<24} {:<6} {:<9} {}\n",
                appliance.id,
                appliance.address,
                if appliance.alive { "yes" } else { "no" },
                if appliance.draining { "yes" } else { "no" },
                appliance.vpsds
            ));
        }
        text
    }
}

/// Who owns which vPSD, and where the live appliances are.
pub fn placement(placement: &crate::Placement, json: bool) -> String {
    let (appliances, vpsds) = (&placement.appliances, &placement.vpsds);
    if json {
        let live: Vec<Value> = appliances
            .iter()
            .map(|(id, address)| json!({"id": id, "address": address}))
            .collect();
        let placed: Vec<Value> = vpsds
            .iter()
            .map(|vpsd| {
                json!({"vpsd": vpsd.vpsd_id, "appliance": vpsd.appliance, "owned": vpsd.owned})
            })
            .collect();
        format!("{}\n", json!({"appliances": live, "vpsds": placed}))
    } else {
        let mut text = format!("{:<20} {:<20} {}\n", "vpsd", "appliance", "owned");
        for vpsd in vpsds {
            text.push_str(&format!(
                "{:<20} {:<20} {}\n",
                vpsd.vpsd_id,
                vpsd.appliance,
                if vpsd.owned { "yes" } else { "no (placement)" }
            ));
        }
        text.push_str(&format!("\n{:<20} {}\n", "live appliance", "address"));
        for (id, address) in appliances {
            text.push_str(&format!("{id:<20} {address}\n"));
        }
        text
    }
}

/// What `provider keygen` made.
pub fn provider_key(output: &mut Output<'_>, path: &Path, public: &str) -> Result<(), CliError> {
    output.either(
        || json!({"key": path.display().to_string(), "public_key": public}),
        || {
            format!(
                "provider key written to {} (keep it secret); public key {public} in {}.pub: \
                 install it as the appliance's provider.pub\n",
                path.display(),
                path.display()
            )
        },
    )
}

/// What `provider authorize` issued: the file's JSON object, or a sentence.
pub fn authorization_issued(
    output: &mut Output<'_>,
    authorization: &ProviderAuthorization,
    path: &Path,
) -> Result<(), CliError> {
    output.either(
        || crate::provider::authorization_json(authorization),
        || {
            format!(
                "{} authorization for vPSD {}, sequence {}{}, expires at unix {}, written to {}\n",
                crate::provider::kind_name(authorization.kind),
                authorization.vpsd_id,
                authorization.sequence,
                if authorization.kind == AuthorizationKind::Refill {
                    format!(", amount {}", format_mills(authorization.amount_mills))
                } else {
                    String::new()
                },
                authorization.expires_unix,
                path.display()
            )
        },
    )
}

/// The files `pki` wrote.
pub fn written(output: &mut Output<'_>, paths: &[PathBuf]) -> Result<(), CliError> {
    let names: Vec<String> = paths
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    output.either(
        || json!({ "written": names }),
        || format!("wrote {}\n", names.join(", ")),
    )
}

/// One verdict of `verify`: where the indicium was read, what it decoded to, the outcome.
pub type Verdict = (String, Option<Indicium>, Outcome);

/// `verify`'s report: one line (or JSON object) per indicium, then the count.
pub fn verdicts(results: &[Verdict], failed: u64, json: bool) -> String {
    if json {
        let list: Vec<Value> = results
            .iter()
            .map(|(place, indicium, outcome)| {
                json!({
                    "source": place,
                    "vpsd_id": indicium.as_ref().map(|i| i.payload.vpsd_id),
                    "key_serial": indicium.as_ref().map(|i| i.payload.key_serial),
                    "piece_number": indicium.as_ref().map(|i| i.payload.piece_number),
                    "postage_mills": indicium.as_ref().map(|i| i.payload.postage_mills),
                    "verdict": outcome.name(),
                    "detail": outcome.detail(),
                })
            })
            .collect();
        return format!("{}\n", Value::Array(list));
    }
    let mut text = String::new();
    for (place, indicium, outcome) in results {
        let what = match indicium {
            Some(indicium) => format!(
                "vPSD {} key #{} piece {} postage {}",
                indicium.payload.vpsd_id,
                indicium.payload.key_serial,
                indicium.payload.piece_number,
                format_mills(indicium.payload.postage_mills)
            ),
            None => "-".to_owned(),
        };
        let detail = outcome
            .detail()
            .map_or(String::new(), |detail| format!(" ({detail})"));
        text.push_str(&format!("{place}: {what}: {}{detail}\n", outcome.name()));
    }
    text.push_str(&format!(
        "{} indicia: {} valid, {failed} not\n",
        results.len(),
        results.len() as u64 - failed
    ));
    text
}
