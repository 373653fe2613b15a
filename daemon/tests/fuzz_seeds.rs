//! The journal fuzz targets' committed seeds (`fuzz/corpus/journal_record`,
//! `fuzz/corpus/journal_recovery`) are real records and a real journal in today's format:
//! a seed the decoders reject would start the fuzzer from nothing.
//!
//! `INDICIA_WRITE_FUZZ_SEEDS=1 cargo test -p indiciad --test fuzz_seeds` rewrites them
//! from a journal written here (after a format change), then checks them as always.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};

use common::{open_with, Workload, NOW};
use indiciad::journal::format::{record_len, RecordHeader, SEGMENT_HEADER_BYTES};
use indiciad::store::fuzz;

/// Records in the recovery seed; kept small so the fuzzer mutates it quickly.
const RECORDS: usize = 24;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<_> = std::fs::read_dir(corpus(target))
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("seed-"))
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect();
    seeds.sort();
    seeds
}

/// Writes a journal of `RECORDS` records under the fuzz master key and returns its
/// segment after the header, cut at the end of the last record.
fn journal_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open_with(dir.path(), 1 << 20, &fuzz::MASTER);
    let mut workload = Workload::new(5, 3);
    let mut written = 0;
    while written < RECORDS {
        if let Some(record) = workload.next_record(&store.engine) {
            store.commit(record, NOW).unwrap();
            written += 1;
        }
    }
    store.flush().unwrap();
    let (segment, end) = store.journal.position();
    assert_eq!(segment, 1, "the seed journal rotated");
    drop(store);
    let bytes = std::fs::read(dir.path().join(indiciad::journal::segment::file_name(1))).unwrap();
    bytes[SEGMENT_HEADER_BYTES..end].to_vec()
}

/// Splits a segment body into its records (header, payload and trailer each).
fn records(mut body: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(header) = RecordHeader::decode(body) {
        let len = record_len(header.payload_len as usize);
        out.push(body[..len].to_vec());
        body = &body[len..];
    }
    assert!(
        body.is_empty(),
        "{} bytes after the last record",
        body.len()
    );
    out
}

fn write_seeds() {
    let body = journal_bytes();
    for target in ["journal_record", "journal_recovery"] {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, _) in seeds(target) {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
    }
    std::fs::write(corpus("journal_recovery").join("seed-journal"), &body).unwrap();
    for (i, record) in records(&body).iter().enumerate() {
        let kind = RecordHeader::decode(record).unwrap().kind;
        let name = format!("seed-{i:02}-kind-{kind}");
        std::fs::write(corpus("journal_record").join(name), record).unwrap();
    }
}

#[test]
fn the_journal_seeds_are_records_and_a_journal_the_decoders_accept() {
    if std::env::var_os("INDICIA_WRITE_FUZZ_SEEDS").is_some() {
        write_seeds();
    }
    let journals = seeds("journal_recovery");
    assert_eq!(journals.len(), 1, "one journal seed");
    let (name, body) = &journals[0];
    let (report, vpsds) = fuzz::recover_segment(body).unwrap();
    assert!(report.is_clean(), "{name}: {:?}", report.findings);
    assert_eq!(report.torn_tail, None, "{name}");
    assert_eq!(report.last_sequence, RECORDS as u64, "{name}");
    assert!(vpsds > 0, "{name} provisions no vPSD");

    let records = seeds("journal_record");
    assert_eq!(records.len(), RECORDS, "one record seed per journal record");
    let mut kinds = std::collections::BTreeSet::new();
    for (name, record) in &records {
        assert!(fuzz::decodes(record), "{name} does not decode");
        kinds.insert(RecordHeader::decode(record).unwrap().kind);
        let mut damaged = record.clone();
        damaged[0] ^= 1;
        assert!(!fuzz::decodes(&damaged), "{name} decodes with a bad magic");
    }
    assert!(
        kinds.len() >= 3,
        "the record seeds cover only kinds {kinds:?}"
    );
}
