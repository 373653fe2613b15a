//! The integrity monitor on real journals: it replays the whole history (across
//! checkpoints), checks every signature, and finds what recovery cannot: records written
//! with the right key that do not hold up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{open, Workload, MASTER, NOW};
use indiciad::engine::{EngineConfig, Record};
use indiciad::store::{audit::audit_shard, ledger::LedgerKind};

/// Commits `records` workload records; returns (records, indicia, money movements).
fn fill(
    store: &mut indiciad::store::Store,
    workload: &mut Workload,
    records: usize,
) -> (u64, u64, u64) {
    let (mut count, mut indicia, mut movements) = (0, 0, 0);
    // Bounded: once every vPSD is withdrawn the workload has nothing left to do.
    for _ in 0..records * 20 {
        if count == records as u64 {
            break;
        }
        let Some(record) = workload.next_record(&store.engine) else {
            continue;
        };
        match &record {
            Record::Session(session) => {
                indicia += session.indicia().count() as u64;
                movements += 1;
            }
            Record::Withdraw { .. } => movements += 1,
            Record::Provider { kind, .. } if *kind == indicia_proto::AuthorizationKind::Refill => {
                movements += 1;
            }
            _ => {}
        }
        store.commit(record, NOW).unwrap();
        count += 1;
    }
    store.flush().unwrap();
    (count, indicia, movements)
}

/// Provisions and funds vPSD 900 (committed), then prepares one session of three indicia
/// for it, not yet committed.
fn next_session(store: &mut indiciad::store::Store) -> indiciad::engine::SessionRecord {
    use indicia_proto::{Algorithm, AuthorizationKind, MailingDate, SignItem};
    use indiciad::engine::{ClientTag, SignJob};
    let provision = store
        .engine
        .prepare_provision(
            NOW,
            900,
            "audit-test",
            Algorithm::EcdsaP256,
            "02134".parse().unwrap(),
        )
        .unwrap();
    store.commit(provision, NOW).unwrap();
    let authorization = indicia_client::provider::authorize(
        &common::provider(),
        AuthorizationKind::Refill,
        900,
        50_000,
        1,
        NOW + 3_600,
    );
    let refill = store
        .engine
        .prepare_provider(NOW, ClientTag(1), 1, 900, &authorization)
        .unwrap()
        .record
        .unwrap();
    store.commit(refill, NOW).unwrap();
    let item = SignItem {
        postage_mills: 730,
        mailing_date: MailingDate::from_unix_seconds(NOW).unwrap(),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    };
    let jobs = [SignJob {
        client: ClientTag(1),
        request_id: 2,
        items: vec![item; 3],
    }];
    store
        .engine
        .prepare_session(NOW, 900, &jobs)
        .record
        .unwrap()
}

#[test]
fn the_audit_replays_every_segment_and_checks_every_signature() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 64 << 10);
    let mut workload = Workload::new(7, 5);
    let (records, indicia, movements) = fill(&mut store, &mut workload, 400);
    let (segments, _) = store.journal.position();
    assert!(segments >= 3, "rotation is exercised");
    drop(store);
    let audit = audit_shard(dir.path(), 0, &MASTER, EngineConfig::default(), None).unwrap();
    let report = &audit.report;
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(
        report.segments_scanned, segments,
        "from the first segment on"
    );
    // Every record, plus the checkpoint that starts each later segment.
    assert_eq!(report.records_replayed, records);
    assert_eq!(report.indicia_replayed, indicia);
    assert_eq!(audit.signatures_checked, indicia);
    assert_eq!(audit.ledger.len() as u64, movements);
    // Each session line's amount is its AR delta; the registers it states add up.
    for line in &audit.ledger {
        assert_eq!(
            line.ascending_mills + line.descending_mills,
            line.control_total_mills,
            "{line:?}"
        );
        if line.kind == LedgerKind::Session {
            assert_eq!(line.indicia, line.last_piece - line.first_piece + 1);
        }
    }
}

/// A session record whose first indicium's signature is altered: everything else (the
/// registers, the pieces, the checksums and the chain MAC, made with the right key) holds.
#[test]
fn a_bad_signature_written_with_the_right_key_is_found_by_the_audit_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(11, 2);
    fill(&mut store, &mut workload, 30);
    let mut forged = next_session(&mut store);
    let vpsd_id = forged.vpsd_id;
    let piece = {
        let first = forged
            .jobs
            .iter_mut()
            .flat_map(|job| job.outcomes.iter_mut())
            .find_map(|outcome| match outcome {
                indiciad::engine::ItemOutcome::Signed(indicium) => Some(indicium),
                indiciad::engine::ItemOutcome::Failed(_) => None,
            })
            .unwrap();
        first.signature[5] ^= 0x10;
        first.payload.piece_number
    };
    store.commit(Record::Session(forged), NOW).unwrap();
    fill(&mut store, &mut workload, 10);
    drop(store);
    // Recovery does not check signatures: it sees a sound journal.
    let (reopened, report) = open(dir.path(), 1 << 20);
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    drop(reopened);
    let audit = audit_shard(dir.path(), 0, &MASTER, EngineConfig::default(), None).unwrap();
    let findings = &audit.report.findings;
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].vpsd_id, Some(vpsd_id));
    assert_eq!(
        findings[0].what,
        format!("indicium piece {piece} does not verify under key #1")
    );
    assert!(audit.report.locked.contains_key(&vpsd_id));
}

/// A session record appended past the engine (so nothing checked it), claiming a smaller
/// AR delta than the postage of its indicia: the audit finds it and names the vPSD.
#[test]
fn a_session_whose_registers_do_not_add_up_is_found_and_its_vpsd_named() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(5, 1);
    fill(&mut store, &mut workload, 20);
    let mut short = next_session(&mut store);
    short.after.ascending_mills -= 1;
    short.after.descending_mills += 1;
    let vpsd_id = short.vpsd_id;
    common::append_raw(&mut store.journal, &Record::Session(short)).unwrap();
    store.journal.flush().unwrap();
    drop(store);
    let audit = audit_shard(dir.path(), 0, &MASTER, EngineConfig::default(), None).unwrap();
    let findings = &audit.report.findings;
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].vpsd_id, Some(vpsd_id));
    assert!(
        findings[0].what.starts_with("history does not reconcile"),
        "{}",
        findings[0].what
    );
    assert!(audit.report.locked.contains_key(&vpsd_id));
    // Read-only: the journal is byte for byte what it was.
    let before = common::read_dir(dir.path());
    audit_shard(dir.path(), 0, &MASTER, EngineConfig::default(), None).unwrap();
    assert_eq!(common::read_dir(dir.path()), before);
}

/// The background monitor reads no further than the shard's durable sequence, in later
/// segments either. When a rotation's checkpoint follows records still being flushed, it
/// used to be read, and the records between counted as lost: every vPSD of a healthy
/// shard was locked.
#[test]
fn a_live_audit_stops_at_the_durable_sequence_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 64 << 10);
    let mut workload = Workload::new(31, 4);
    while store.journal.position().0 < 2 {
        fill(&mut store, &mut workload, 1);
    }
    let checkpoint = {
        use indiciad::journal::format::RecordHeader;
        let bytes =
            std::fs::read(dir.path().join(indiciad::journal::segment::file_name(2))).unwrap();
        RecordHeader::decode(&bytes[indiciad::journal::format::SEGMENT_HEADER_BYTES..])
            .unwrap()
            .sequence
    };
    drop(store);
    // As the monitor sees it while the last records before the rotation are being flushed.
    let audit = indiciad::store::audit::audit_shard_with(
        dir.path(),
        0,
        &MASTER,
        EngineConfig::default(),
        Some(checkpoint - 3),
        None,
    )
    .unwrap();
    assert!(audit.report.is_clean(), "{:?}", audit.report.findings);
    assert!(audit.report.locked.is_empty());
    assert!(audit.report.provisioning_blocked.is_none());
    assert_eq!(audit.report.last_sequence, checkpoint - 3);
}
