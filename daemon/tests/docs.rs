//! docs/JOURNAL.md must agree with the code: every record kind is listed with its number
//! and name, and the fixed sizes it states are the code's.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;

use indiciad::journal::format::{
    kind, RECORD_HEADER_BYTES, RECORD_MAGIC, RECORD_TRAILER_BYTES, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};

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
    let authorization = indicia_client::provider::authorize(
        &key,
        indicia_proto::AuthorizationKind::Refill,
        1,
        2,
        3,
        4,
    );
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
