//! The journal on real files: reopening, rotation with checkpoints, torn tails at every
//! byte, and tampering (an edited byte, a deleted record, two swapped records).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use common::{open, read_dir, state, write_dir, Workload, MASTER, NOW};
use indicia_proto::{LockReason, VpsdState};
use indiciad::engine::EngineConfig;
use indiciad::journal::format::{
    record_len, RecordHeader, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};

fn fill(store: &mut indiciad::store::Store, workload: &mut Workload, records: usize) -> Vec<u64> {
    let mut sequences = Vec::new();
    for _ in 0..records * 50 {
        if sequences.len() == records {
            return sequences;
        }
        if let Some(record) = workload.next_record(&store.engine) {
            sequences.push(store.commit(record, NOW).unwrap());
        }
    }
    panic!(
        "the workload produced only {} of {records} records",
        sequences.len()
    );
}

#[test]
fn a_reopened_journal_yields_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean() && report.last_sequence == 0);
    let mut workload = Workload::new(1, 4);
    fill(&mut store, &mut workload, 60);
    store.flush().unwrap();
    let before = state(&store.engine);
    let last = store.journal.last_sequence();
    drop(store);
    let (store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.last_sequence, last);
    assert_eq!(report.torn_tail, None);
    assert_eq!(state(&store.engine), before);
}

#[test]
fn a_second_process_cannot_open_the_same_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = open(dir.path(), 1 << 20);
    let engine = indiciad::engine::Engine::new(
        Default::default(),
        indiciad::engine::MasterKey::new(&common::MASTER).unwrap(),
        [0; 32],
    );
    let err = indiciad::store::Store::open(
        dir.path(),
        0,
        indiciad::journal::ChainKey::derive(&common::MASTER, 0),
        Default::default(),
        engine,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        indiciad::store::StoreError::Journal(indiciad::journal::JournalError::Locked(_))
    ));
}

/// Recovery starts from the newest checkpoint, and reads older segments only as far back
/// as the idempotency window's oldest record (here a small window: at most the segment
/// before), from which it rebuilds the window.
#[test]
fn rotation_starts_each_segment_with_a_checkpoint_that_recovery_starts_from() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        idempotency_indicia_max: 64,
        ..EngineConfig::default()
    };
    let (mut store, _) = common::open_configured(dir.path(), 64 << 10, &MASTER, config.clone());
    let mut workload = Workload::new(2, 5);
    fill(&mut store, &mut workload, 400);
    store.flush().unwrap();
    let (segment, _) = store.journal.position();
    assert!(
        segment >= 4,
        "only {segment} segments for 400 records of 64 KiB segments"
    );
    let before = state(&store.engine);
    assert!(!before.window.current.is_empty() || !before.window.previous.is_empty());
    drop(store);
    let (store, report) = common::open_configured(dir.path(), 64 << 10, &MASTER, config);
    assert!(report.is_clean(), "{:?}", report.findings);
    let (checkpoint_segment, _) = report.checkpoint.expect("recovery starts at a checkpoint");
    assert_eq!(checkpoint_segment, segment);
    assert!(
        report.segments_scanned <= 2,
        "{} segments read: older segments are read only for the window",
        report.segments_scanned
    );
    let after = state(&store.engine);
    assert_eq!(after, before, "the window is rebuilt whole");
    // The old segments are kept as the audit trail.
    assert_eq!(
        read_dir(dir.path())
            .keys()
            .filter(|name| name.starts_with("segment-"))
            .count() as u64,
        segment
    );
}

/// Reading back for the idempotency window may start at a segment that recovery created
/// (after damage at the end of a cleanly closed journal: no checkpoint at its start). Its
/// first record is anchored by the segment header, so nothing counts as lost there: only
/// the damaged record's vPSD is locked, as before, and provisioning is not blocked.
#[test]
fn reading_back_from_a_segment_recovery_created_finds_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        idempotency_indicia_max: 16,
        ..EngineConfig::default()
    };
    let open = || common::open_configured(dir.path(), 64 << 10, &MASTER, config.clone());
    let (mut store, _) = open();
    let mut workload = Workload::new(21, 12);
    fill(&mut store, &mut workload, 40);
    store.close().unwrap();
    drop(store);
    // Damage the last record of segment 1: it was durable (CLOSED says so).
    let segment = dir.path().join(indiciad::journal::segment::file_name(1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut last = (offset, 0u64);
    while let Some(header) = RecordHeader::decode(&bytes[offset..]) {
        last = (offset, header.subject);
        offset += record_len(header.payload_len as usize);
    }
    bytes[last.0 + RECORD_HEADER_BYTES + 2] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();
    let (mut store, report) = open();
    assert_eq!(
        report.locked.keys().copied().collect::<Vec<_>>(),
        vec![last.1]
    );
    assert!(report.provisioning_blocked.is_none());
    // Segment 2 is the one recovery created; fill it until the journal rotates past it.
    assert_eq!(store.journal.position().0, 2);
    while store.journal.position().0 < 3 {
        fill(&mut store, &mut workload, 1);
    }
    fill(&mut store, &mut workload, 5);
    store.flush().unwrap();
    let before = state(&store.engine);
    drop(store);
    let (store, report) = open();
    assert_eq!(report.checkpoint.map(|(segment, _)| segment), Some(3));
    assert_eq!(
        report.segments_scanned, 2,
        "read back into segment 2 for the window"
    );
    assert!(
        !report
            .findings
            .iter()
            .any(|finding| finding.what.contains("lost")),
        "{:?}",
        report.findings
    );
    assert!(report.provisioning_blocked.is_none(), "{report:?}");
    // Nothing newly locked; the earlier lock stands in the state the checkpoint carries.
    assert!(report.locked.is_empty(), "{:?}", report.locked);
    assert_eq!(state(&store.engine), before);
}

/// Bytes the journal holds in `dir`: every record and segment header written, summed over
/// the segment files (not their preallocated length).
fn journal_bytes(dir: &std::path::Path) -> usize {
    let mut total = 0;
    for (name, bytes) in read_dir(dir) {
        if !name.starts_with("segment-") {
            continue;
        }
        let mut offset = SEGMENT_HEADER_BYTES;
        while let Some(header) = RecordHeader::decode(&bytes[offset..]) {
            offset += record_len(header.payload_len as usize);
        }
        total += offset;
    }
    total
}

/// Journal bytes per indicium after `indicia` signed by single-item requests in sessions
/// of 16 (every request remembered by the idempotency window), with `segment_bytes`.
fn bytes_per_indicium(segment_bytes: usize, indicia: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), segment_bytes);
    let mut workload = Workload::new(11, 1);
    let provision = store
        .engine
        .prepare_provision(
            NOW,
            1,
            "load",
            indicia_proto::Algorithm::Ed25519,
            "02134".parse().unwrap(),
        )
        .unwrap();
    store.commit(provision, NOW).unwrap();
    store.commit(workload.refill(1, u64::MAX / 4), NOW).unwrap();
    let mut request_id = 0;
    let mut signed = 0;
    while signed < indicia {
        let jobs: Vec<indiciad::engine::SignJob> = (0..16)
            .map(|_| {
                request_id += 1;
                workload.sign_job(request_id, 1)
            })
            .collect();
        let record = store.engine.prepare_session(NOW, 1, &jobs).record.unwrap();
        signed += record.indicia().count() as u64;
        store
            .commit(indiciad::engine::Record::Session(record), NOW)
            .unwrap();
    }
    store.flush().unwrap();
    drop(store);
    journal_bytes(dir.path()) as f64 / signed as f64
}

/// Under sustained load the journal at the smallest accepted segment size (64 KiB) holds
/// at most twice the bytes per indicium of the default (64 MiB). Checkpoints carry the
/// vPSDs' state, not the idempotency window, and a segment holds four times its
/// checkpoint: before, a checkpoint restating the window outgrew the segments, and every
/// session opened a new segment with a whole checkpoint (778 files, 2.29 GiB, where 64 MiB
/// segments needed one file).
#[test]
fn journal_bytes_per_indicium_at_the_smallest_segments_stay_within_twice_the_default() {
    let indicia = 20_000;
    let small = bytes_per_indicium(64 << 10, indicia);
    let default = bytes_per_indicium(
        indiciad::journal::JournalConfig::default().segment_bytes,
        indicia,
    );
    assert!(
        small <= 2.0 * default,
        "{small:.0} bytes per indicium with 64 KiB segments, {default:.0} with the default"
    );
}

/// Where each record lies in the (single) segment: (offset, length).
fn records(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    while let Some(header) = RecordHeader::decode(&segment[offset..]) {
        let len = record_len(header.payload_len as usize);
        out.push((offset, len));
        offset += len;
    }
    out
}

const SEGMENT: &str = "segment-000000000001.idj";

#[test]
fn a_torn_last_record_is_cut_at_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 32 << 10);
    let mut workload = Workload::new(3, 2);
    fill(&mut store, &mut workload, 8);
    store.flush().unwrap();
    let durable_state = state(&store.engine);
    let durable = store.journal.last_sequence();
    fill(&mut store, &mut workload, 1);
    let full_state = state(&store.engine);
    drop(store);
    let files = read_dir(dir.path());
    let (offset, len) = *records(&files[SEGMENT]).last().unwrap();
    for cut in offset..=offset + len {
        let mut crashed = files.clone();
        let segment = crashed.get_mut(SEGMENT).unwrap();
        // Zeroing only zero bytes (padding, a zero in the trailer) leaves the record whole.
        let intact = segment[cut..offset + len].iter().all(|b| *b == 0);
        segment[cut..offset + len].fill(0);
        let crash_dir = tempfile::tempdir().unwrap();
        write_dir(crash_dir.path(), &crashed);
        let (store, report) = open(crash_dir.path(), 32 << 10);
        assert!(report.is_clean(), "cut at {cut}: {:?}", report.findings);
        if intact {
            assert_eq!(report.last_sequence, durable + 1);
            assert_eq!(state(&store.engine), full_state);
        } else {
            assert_eq!(report.last_sequence, durable, "cut at {cut}");
            assert_eq!(state(&store.engine), durable_state, "cut at {cut}");
            assert_eq!(report.torn_tail.is_some(), cut > offset);
        }
    }
}

/// Builds a journal of `n` records over two vPSDs, flushed, and returns its files and the
/// record positions.
fn journal_of(
    n: usize,
    seed: u64,
) -> (
    tempfile::TempDir,
    std::collections::BTreeMap<String, Vec<u8>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(seed, 2);
    fill(&mut store, &mut workload, n);
    store.flush().unwrap();
    drop(store);
    let files = read_dir(dir.path());
    (dir, files)
}

fn recover(
    files: &std::collections::BTreeMap<String, Vec<u8>>,
) -> (indiciad::store::Store, indiciad::store::RecoveryReport) {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), files);
    let opened = open(dir.path(), 1 << 20);
    // Keep the directory alive as long as the store: leak it into the test's lifetime.
    std::mem::forget(dir);
    opened
}

#[test]
fn an_edited_byte_is_found_even_with_its_checksums_recomputed() {
    let (_dir, files) = journal_of(20, 4);
    let positions = records(&files[SEGMENT]);
    let (offset, len) = positions[8];
    let mut edited = files.clone();
    let segment = edited.get_mut(SEGMENT).unwrap();
    // Edit a payload byte, then recompute both checksums as a forger would.
    let payload_len = len; // upper bound; recompute precisely from the header
    let header = RecordHeader::decode(&segment[offset..]).unwrap();
    let payload_start = offset + RECORD_HEADER_BYTES;
    let payload_end = payload_start + header.payload_len as usize;
    assert!(payload_end <= offset + payload_len);
    segment[payload_start + 9] ^= 0x40;
    let prev: [u8; 32] = segment[payload_end..payload_end + 32].try_into().unwrap();
    let chain: [u8; 32] = segment[payload_end + 32..payload_end + 64]
        .try_into()
        .unwrap();
    let crc = indiciad::journal::format::body_checksum(
        &segment[payload_start..payload_end],
        &prev,
        &chain,
    );
    segment[payload_end + 64..payload_end + 68].copy_from_slice(&crc.to_le_bytes());
    let (store, report) = recover(&edited);
    assert!(!report.is_clean());
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.what.contains("MAC") && f.sequence == Some(header.sequence)),
        "{:?}",
        report.findings
    );
    // The altered record is not applied and its vPSD (or, unattributed, every vPSD) is locked.
    assert!(!report.locked.is_empty());
    for vpsd_id in report.locked.keys() {
        if let Ok(status) = store.engine.status(NOW, *vpsd_id) {
            assert!(matches!(
                status.state,
                VpsdState::Locked(LockReason::Integrity(_))
            ));
        }
    }
}

#[test]
fn a_deleted_record_is_found() {
    let (_dir, files) = journal_of(20, 5);
    let positions = records(&files[SEGMENT]);
    let (offset, len) = positions[7];
    let mut edited = files.clone();
    let segment = edited.get_mut(SEGMENT).unwrap();
    segment.copy_within(offset + len.., offset);
    let (_store, report) = recover(&edited);
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.what.contains("lost") || f.what.contains("chain")),
        "{:?}",
        report.findings
    );
    assert!(!report.locked.is_empty());
}

#[test]
fn two_swapped_records_are_found() {
    let (_dir, files) = journal_of(20, 6);
    let positions = records(&files[SEGMENT]);
    let (first, first_len) = positions[5];
    let (second, second_len) = positions[6];
    let mut edited = files.clone();
    let segment = edited.get_mut(SEGMENT).unwrap();
    let a = segment[first..first + first_len].to_vec();
    let b = segment[second..second + second_len].to_vec();
    segment[first..first + second_len].copy_from_slice(&b);
    segment[first + second_len..first + second_len + first_len].copy_from_slice(&a);
    let (_store, report) = recover(&edited);
    assert!(!report.is_clean(), "swap not found");
    assert!(!report.locked.is_empty());
}

#[test]
fn a_failed_flush_poisons_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(7, 2);
    fill(&mut store, &mut workload, 3);
    let ticket = store.journal.flush_ticket().expect("records are pending");
    assert!(
        store.journal.flush_ticket().is_none(),
        "one ticket at a time"
    );
    let durable = store.journal.durable_sequence();
    let failed = store
        .journal
        .complete(&ticket, Err(std::io::Error::other("injected EIO")));
    assert!(failed.is_err());
    assert!(store.journal.is_poisoned());
    assert_eq!(
        store.journal.durable_sequence(),
        durable,
        "nothing acknowledged"
    );
    let record = loop {
        if let Some(record) = workload.next_record(&store.engine) {
            break record;
        }
    };
    assert!(matches!(
        common::append_raw(&mut store.journal, &record),
        Err(indiciad::journal::JournalError::Poisoned)
    ));
    assert!(matches!(
        store.flush(),
        Err(indiciad::store::StoreError::Journal(
            indiciad::journal::JournalError::Poisoned
        ))
    ));
}

#[test]
fn tickets_complete_in_order_and_advance_the_durable_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(8, 2);
    let sequences = fill(&mut store, &mut workload, 4);
    let ticket = store.journal.flush_ticket().unwrap();
    // Appends go on while the flush runs elsewhere; they are not covered by it.
    let later = fill(&mut store, &mut workload, 2);
    let result = ticket.execute();
    assert_eq!(
        store.journal.complete(&ticket, result).unwrap(),
        *sequences.last().unwrap()
    );
    let ticket = store.journal.flush_ticket().unwrap();
    let result = ticket.execute();
    assert_eq!(
        store.journal.complete(&ticket, result).unwrap(),
        *later.last().unwrap()
    );
    assert!(
        store.journal.flush_ticket().is_none(),
        "nothing left to flush"
    );
}

#[test]
fn an_empty_first_segment_left_by_a_crash_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // A crash after the file was created, before it was allocated or got its header.
    std::fs::write(dir.path().join(SEGMENT), b"").unwrap();
    let (mut store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean(), "{:?}", report.findings);
    let mut workload = Workload::new(9, 2);
    fill(&mut store, &mut workload, 5);
    store.flush().unwrap();
    let before = state(&store.engine);
    drop(store);
    let (store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(state(&store.engine), before);
}

#[test]
fn a_record_that_does_not_follow_the_state_never_reaches_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(10, 1);
    fill(&mut store, &mut workload, 3);
    // Two records prepared from the same state: the second is stale once the first is in.
    let (first, second) = (0..100)
        .find_map(|_| {
            Some((
                workload.next_record(&store.engine)?,
                workload.next_record(&store.engine)?,
            ))
        })
        .expect("the workload yields two records");
    store.commit(first, NOW).unwrap();
    let last = store.journal.last_sequence();
    assert!(matches!(
        store.commit(second, NOW),
        Err(indiciad::store::StoreError::Rejected(_))
    ));
    assert_eq!(store.journal.last_sequence(), last, "nothing appended");
}

#[test]
fn a_journal_opened_under_another_master_key_is_refused_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(9, 3);
    fill(&mut store, &mut workload, 20);
    store.flush().unwrap();
    drop(store);
    let before = read_dir(dir.path());
    let other = [0x22; 32];
    let engine = indiciad::engine::Engine::new(
        indiciad::engine::EngineConfig::default(),
        indiciad::engine::MasterKey::new(&other).unwrap(),
        [0; 32],
    );
    let err = indiciad::store::Store::open(
        dir.path(),
        0,
        indiciad::journal::ChainKey::derive(&other, 0),
        indiciad::journal::JournalConfig {
            segment_bytes: 1 << 20,
        },
        engine,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            indiciad::store::StoreError::Journal(indiciad::journal::JournalError::Foreign {
                count: 20,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("another master key"), "{err}");
    assert_eq!(read_dir(dir.path()), before, "nothing was cut");
    // With the right key it is all there.
    let (store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean());
    assert_eq!(report.last_sequence, 20);
    drop(store);
}
