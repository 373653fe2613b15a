//! docs/ must agree with the code: every record kind of docs/JOURNAL.md is listed with its
//! number and name, and the fixed sizes it states are the code's; the files of
//! docs/FILES.md are the ones written; every statistic the appliance reports is in
//! docs/OPERATIONS.md, and nothing else is.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;

use indiciad::journal::format::{
    kind, RECORD_HEADER_BYTES, RECORD_MAGIC, RECORD_TRAILER_BYTES, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};
use indiciad::server::metrics::{Metrics, Received, RequestKind};
use indiciad::server::shard::ShardStats;

fn journal_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/JOURNAL.md")).unwrap()
}

#[test]
fn every_record_kind_is_documented_once() {
    let text = journal_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "| kind | name | payload |");
    assert!(lines.next().is_some(), "no kind table in docs/JOURNAL.md");
    let mut rows = BTreeMap::new();
    for line in lines.skip(1).take_while(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let number: u8 = cells[1].parse().unwrap();
        assert!(
            rows.insert(number, cells[2].to_owned()).is_none(),
            "kind {number} listed twice"
        );
    }
    let expected: BTreeMap<u8, String> = [
        (kind::PROVISION, "provision"),
        (kind::PROVIDER, "provider"),
        (kind::STATE_CHANGE, "state-change"),
        (kind::WITHDRAW, "withdraw"),
        (kind::ROTATE_KEY, "rotate-key"),
        (kind::SESSION, "session"),
        (kind::CHECKPOINT, "checkpoint"),
    ]
    .into_iter()
    .map(|(number, name)| (number, name.to_owned()))
    .collect();
    assert_eq!(rows, expected);
}

#[test]
fn the_fixed_sizes_and_magics_in_the_doc_are_the_codes() {
    let text = journal_md();
    assert_eq!(SEGMENT_HEADER_BYTES, 64);
    assert_eq!(RECORD_HEADER_BYTES, 40);
    assert_eq!(RECORD_TRAILER_BYTES, 68);
    for needle in [
        format!("`{}`", std::str::from_utf8(SEGMENT_MAGIC).unwrap()),
        format!("`{}`", std::str::from_utf8(RECORD_MAGIC).unwrap()),
        "The first 64 bytes of every segment file".to_owned(),
        "40-byte **header**".to_owned(),
        "68-byte".to_owned(),
    ] {
        assert!(
            text.contains(&needle),
            "docs/JOURNAL.md does not say {needle}"
        );
    }
}

fn files_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FILES.md")).unwrap()
}

/// The first column of the markdown table that starts with `header`.
fn first_column(text: &str, header: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|line| line.trim() != header);
    assert!(lines.next().is_some(), "no table `{header}` in the doc");
    lines
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            line.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_owned()
        })
        .collect()
}

#[test]
fn the_ledger_columns_in_the_doc_are_the_codes_in_order() {
    let documented = first_column(&files_md(), "| column | meaning |");
    assert_eq!(documented, indiciad::audit::LEDGER_COLUMNS);
    // The CSV example's header is the same list.
    let text = files_md();
    assert!(text.contains(&indiciad::audit::LEDGER_COLUMNS.join(",")));
}

#[test]
fn the_authorization_file_keys_in_the_doc_are_the_ones_written() {
    let documented = first_column(&files_md(), "| key | JSON type | meaning |");
    let key = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
    let authorization =
        indicia_client::cli::authorize(&key, indicia_proto::AuthorizationKind::Refill, 1, 2, 3, 4);
    let written = indicia_client::provider::authorization_json(&authorization);
    let mut keys: Vec<String> = written.as_object().unwrap().keys().cloned().collect();
    let mut documented_sorted = documented.clone();
    keys.sort();
    documented_sorted.sort();
    assert_eq!(documented_sorted, keys);
    assert_eq!(
        written["format"],
        indicia_client::provider::AUTHORIZATION_FORMAT
    );
}

fn operations_md() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/OPERATIONS.md"
    ))
    .unwrap()
}

/// The stats names in the first column of docs/OPERATIONS.md's statistics table, one
/// pattern each: `N` stands for a shard number, `<code>` for an error code name, `<kind>`
/// for a request kind. A cell may list several (`a.mean`, `.p50`: the second is `a.p50`).
fn documented_stats() -> Vec<String> {
    let text = operations_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "| name | meaning |");
    assert!(
        lines.next().is_some(),
        "no statistics table in docs/OPERATIONS.md"
    );
    let mut names = Vec::new();
    for line in lines.skip(1).take_while(|line| line.starts_with('|')) {
        let cell = line.split('|').nth(1).unwrap();
        let mut last = String::new();
        for name in cell.split(", ").map(|name| name.trim().trim_matches('`')) {
            let name = match name.strip_prefix('.') {
                Some(suffix) => {
                    let stem = last.rsplit_once('.').unwrap().0;
                    format!("{stem}.{suffix}")
                }
                None => name.to_owned(),
            };
            names.push(name.clone());
            last = name;
        }
    }
    names
}

fn stat_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let name: Vec<&str> = name.split('.').collect();
    pattern.len() == name.len()
        && pattern
            .iter()
            .zip(&name)
            .all(|(pattern, name)| match *pattern {
                "N" => name.parse::<u16>().is_ok(),
                "<code>" => indicia_proto::ErrorCode::from_name(name).is_some(),
                "<kind>" => RequestKind::ALL.iter().any(|kind| kind.name() == *name),
                literal => literal == *name,
            })
}

/// Metrics in which every entry there can be is present: every error code, every
/// histogram recorded.
fn full_metrics(shards: usize) -> std::sync::Arc<Metrics> {
    let metrics = Metrics::new(shards);
    let shard = &metrics.shards[0];
    for code in indicia_proto::ErrorCode::all() {
        shard.connection_error(code);
    }
    let mut stats = ShardStats {
        session_sizes: vec![3],
        ..ShardStats::default()
    };
    shard.publish(&mut stats, 0, 0);
    shard.record_commit(500);
    let now = std::time::Instant::now();
    let requests: Vec<Received> = RequestKind::ALL
        .iter()
        .map(|&kind| Received { kind, at: now })
        .collect();
    shard.record_answered(now + std::time::Duration::from_micros(70), &requests);
    metrics
}

#[test]
fn every_stats_name_the_appliance_emits_is_documented_and_every_documented_one_emitted() {
    let documented = documented_stats();
    let emitted: Vec<String> = full_metrics(3)
        .report()
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    for name in &emitted {
        assert!(
            documented.iter().any(|pattern| stat_matches(pattern, name)),
            "the stats entry `{name}` is not in docs/OPERATIONS.md section 7"
        );
    }
    for pattern in &documented {
        assert!(
            emitted.iter().any(|name| stat_matches(pattern, name)),
            "docs/OPERATIONS.md section 7 lists `{pattern}`, which the appliance never emits"
        );
    }
    // The kinds, as the doc lists them.
    let kinds: Vec<String> = RequestKind::ALL
        .iter()
        .map(|kind| format!("`{}`", kind.name()))
        .collect();
    assert!(
        operations_md().contains(&kinds.join(", ")),
        "docs/OPERATIONS.md section 7 does not list the request kinds {}",
        kinds.join(", ")
    );
}

#[test]
fn the_number_of_shards_whose_entries_always_fit_is_the_documented_one() {
    let report = full_metrics(indiciad::config::SHARDS_MAX).report();
    assert!(report.len() <= indicia_proto::message::STATS_ENTRIES_MAX);
    let shards = report
        .iter()
        .filter(|entry| entry.name.starts_with("shard.") && entry.name.ends_with(".requests"))
        .count();
    let says = format!("up to {shards} shards always fit");
    assert!(
        operations_md().replace('\n', " ").contains(&says),
        "docs/OPERATIONS.md section 7 should say `{says}`"
    );
}
