//! Crash simulation over thousands of seeds, and random damage in the middle of history.
//!
//! Crash: random operations through engine + journal with flushes at random points, then a
//! crash image that keeps everything flushed and an arbitrary prefix, torn at any byte, of
//! what was not. Recovery must yield exactly the state after some prefix of the operations
//! that includes every flushed one, with all invariants holding and nothing reported.
//!
//! Damage: one random bit flipped, a span zeroed, or a span cut out, anywhere before the
//! last record. Recovery must report it, lock what it touched, never panic, and never show
//! a register value that was not real.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use common::{open, read_dir, state, write_dir, Rng, Workload, NOW};
use indicia_proto::{LockReason, VpsdState};
use indiciad::engine::{Checkpoint, Registers, StoredState};
use indiciad::journal::format::{record_len, RecordHeader, SEGMENT_HEADER_BYTES};

const SEGMENT_BYTES: usize = 8 << 10;

/// The number of seeds: the default, or more from the environment for a deeper run.
fn seeds(variable: &str, default: u64) -> u64 {
    std::env::var(variable)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A temporary directory, in memory where the machine has one: the crash is simulated on
/// the bytes, so the disk's speed adds nothing but time.
fn scratch_dir() -> tempfile::TempDir {
    if Path::new("/dev/shm").is_dir() {
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

fn check_invariants(checkpoint: &Checkpoint) {
    for vpsd in &checkpoint.vpsds {
        assert!(
            vpsd.registers.balanced(),
            "vPSD {} unbalanced: {:?}",
            vpsd.id,
            vpsd.registers
        );
    }
}

/// The bytes written since the durable image, in stream order (segment, then offset).
fn unflushed(
    durable: &BTreeMap<String, Vec<u8>>,
    current: &BTreeMap<String, Vec<u8>>,
) -> Vec<(String, usize)> {
    let mut stream = Vec::new();
    for (name, bytes) in current {
        let before: Vec<u8> = match durable.get(name) {
            Some(before) => before.clone(),
            // A segment created since the last flush: its header was made durable when it
            // was created, the rest was not.
            None => {
                let mut before = vec![0u8; bytes.len()];
                let header = SEGMENT_HEADER_BYTES.min(bytes.len());
                before[..header].copy_from_slice(&bytes[..header]);
                before
            }
        };
        assert_eq!(before.len(), bytes.len(), "{name} changed size");
        stream.extend(
            (0..bytes.len())
                .filter(|at| before[*at] != bytes[*at])
                .map(|at| (name.clone(), at)),
        );
    }
    stream
}

/// What one seed exercised.
#[derive(Default)]
struct Coverage {
    torn_tails: u64,
    rotations: u64,
    kept_unflushed: u64,
    lost_unflushed: u64,
}

fn crash_once(seed: u64, coverage: &mut Coverage) {
    let dir = scratch_dir();
    let (mut store, _) = open(dir.path(), SEGMENT_BYTES);
    let mut workload = Workload::new(seed, 3);
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    // Sequence number -> state after it. A rotation's checkpoint takes a sequence number
    // of its own and changes nothing.
    let mut snapshots = BTreeMap::from([(0u64, state(&store.engine))]);
    let mut durable_files = read_dir(dir.path());
    let mut durable_sequence = 0;
    let operations = 5 + rng.below(40);
    for _ in 0..operations {
        if let Some(record) = workload.next_record(&store.engine) {
            let before = store.journal.last_sequence();
            let unchanged = snapshots[&before].clone();
            let sequence = store.commit(record, NOW).unwrap();
            for checkpoint in before + 1..sequence {
                snapshots.insert(checkpoint, unchanged.clone());
            }
            snapshots.insert(sequence, state(&store.engine));
        }
        if rng.below(5) == 0 {
            durable_sequence = store.flush().unwrap();
            durable_files = read_dir(dir.path());
        }
    }
    let current = read_dir(dir.path());
    drop(store);

    let stream = unflushed(&durable_files, &current);
    let cut = rng.below(stream.len() as u64 + 1) as usize;
    let mut crashed = current.clone();
    for (name, at) in &stream[cut..] {
        let before = durable_files.get(name).map_or(0, |bytes| bytes[*at]);
        crashed.get_mut(name).unwrap()[*at] = before;
    }
    let crash_dir = scratch_dir();
    write_dir(crash_dir.path(), &crashed);
    let (mut store, report) = open(crash_dir.path(), SEGMENT_BYTES);
    assert!(report.is_clean(), "seed {seed}: {:?}", report.findings);
    let recovered = report.last_sequence;
    let last = *snapshots.keys().last().unwrap();
    coverage.torn_tails += u64::from(report.torn_tail.is_some());
    coverage.rotations += u64::from(current.len() > 2);
    coverage.kept_unflushed += u64::from(recovered > durable_sequence);
    coverage.lost_unflushed += u64::from(recovered < last);
    assert!(
        recovered >= durable_sequence,
        "seed {seed}: recovered up to {recovered}, but {durable_sequence} was flushed"
    );
    let recovered_state = state(&store.engine);
    assert_eq!(
        recovered_state, snapshots[&recovered],
        "seed {seed}: state after seq {recovered}"
    );
    check_invariants(&recovered_state);

    // The recovered journal takes new records and recovers them again.
    for _ in 0..3 {
        if let Some(record) = workload.next_record(&store.engine) {
            store.commit(record, NOW).unwrap();
        }
    }
    store.flush().unwrap();
    let after = state(&store.engine);
    drop(store);
    let (store, report) = open(crash_dir.path(), SEGMENT_BYTES);
    assert!(
        report.is_clean(),
        "seed {seed} after reuse: {:?}",
        report.findings
    );
    assert_eq!(state(&store.engine), after, "seed {seed} after reuse");
}

#[test]
fn recovery_after_a_crash_keeps_every_flushed_record_and_a_prefix_of_the_rest() {
    let mut coverage = Coverage::default();
    let seeds = seeds("INDICIA_CRASH_SEEDS", 2_000);
    for seed in 0..seeds {
        crash_once(seed, &mut coverage);
    }
    println!(
        "{seeds} seeds: {} torn tails, {} with rotations, {} kept unflushed records, {} lost unflushed records",
        coverage.torn_tails, coverage.rotations, coverage.kept_unflushed, coverage.lost_unflushed
    );
    // The seeds must reach every case the test claims to check.
    assert!(
        coverage.torn_tails > seeds / 4,
        "torn tails: {}",
        coverage.torn_tails
    );
    assert!(
        coverage.rotations > seeds / 10,
        "rotations: {}",
        coverage.rotations
    );
    assert!(
        coverage.kept_unflushed > seeds / 10,
        "kept unflushed: {}",
        coverage.kept_unflushed
    );
    assert!(
        coverage.lost_unflushed > seeds / 10,
        "lost unflushed: {}",
        coverage.lost_unflushed
    );
}

/// (vPSD, version) -> registers, for every state a vPSD ever had.
fn history(snapshots: &[common::State]) -> HashMap<(u64, u64), Registers> {
    let mut out = HashMap::new();
    for snapshot in snapshots {
        for vpsd in &snapshot.vpsds {
            out.insert((vpsd.id, vpsd.version), vpsd.registers);
        }
    }
    out
}

fn damage_once(seed: u64) {
    let dir = scratch_dir();
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut workload = Workload::new(seed, 4);
    let mut rng = Rng::new(seed ^ 0xBAD);
    let mut snapshots = vec![state(&store.engine)];
    let wanted = 20 + rng.below(40) as usize;
    // Bounded: a workload whose vPSDs are all withdrawn produces nothing more.
    for _ in 0..wanted * 50 {
        if snapshots.len() > wanted {
            break;
        }
        if let Some(record) = workload.next_record(&store.engine) {
            store.commit(record, NOW).unwrap();
            snapshots.push(state(&store.engine));
        }
    }
    let records = snapshots.len() - 1;
    if records < 3 {
        return;
    }
    store.flush().unwrap();
    let truth = state(&store.engine);
    drop(store);
    let history = history(&snapshots);

    let mut files = read_dir(dir.path());
    let segment = files.get_mut("segment-000000000001.idj").unwrap();
    let mut positions = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    while let Some(header) = RecordHeader::decode(&segment[offset..]) {
        let len = record_len(header.payload_len as usize);
        positions.push((offset, len));
        offset += len;
    }
    assert_eq!(positions.len(), records);
    // Damage that ends before the last record, so that it is in the middle of history:
    // a flipped bit, a zeroed span, or a span cut out (the rest moves up).
    let last_start = positions[records - 1].0;
    let (offset, len) = positions[rng.below(records as u64 - 1) as usize];
    let at = offset + rng.below(len as u64) as usize;
    let span = 1 + rng.below((last_start - at).min(300) as u64) as usize;
    let mode = rng.below(3);
    match mode {
        0 => segment[at] ^= 1 << rng.below(8),
        // Zeroing bytes that are zero already (padding) is no damage at all.
        1 if segment[at..at + span].iter().all(|b| *b == 0) => return,
        1 => segment[at..at + span].fill(0),
        _ => {
            let size = segment.len();
            segment.drain(at..at + span);
            segment.resize(size, 0);
        }
    }
    let what = ["bit flip", "zeroed span", "cut span"][mode as usize];

    let damaged_dir = scratch_dir();
    write_dir(damaged_dir.path(), &files);
    let (store, report) = open(damaged_dir.path(), 1 << 20);
    assert!(
        !report.findings.is_empty(),
        "seed {seed}: {what} of {span} at byte {at} not reported: {:?}",
        report.torn_tail
    );
    assert!(
        !report.locked.is_empty(),
        "seed {seed}: nothing locked: {:?}",
        report.findings
    );
    let recovered = state(&store.engine);
    check_invariants(&recovered);
    for vpsd in &recovered.vpsds {
        let real = history.get(&(vpsd.id, vpsd.version));
        assert_eq!(
            real,
            Some(&vpsd.registers),
            "seed {seed}: vPSD {} shows registers it never had",
            vpsd.id
        );
        let true_state = truth
            .vpsds
            .iter()
            .find(|candidate| candidate.id == vpsd.id)
            .unwrap();
        match &vpsd.state {
            StoredState::Locked(LockReason::Integrity(_)) => {
                assert!(report.locked.contains_key(&vpsd.id));
                let status = store.engine.status(NOW, vpsd.id).unwrap();
                assert!(matches!(
                    status.state,
                    VpsdState::Locked(LockReason::Integrity(_))
                ));
            }
            // Not locked by recovery: it must be exactly as it was.
            _ => assert_eq!(
                vpsd, true_state,
                "seed {seed}: unlocked vPSD {} differs",
                vpsd.id
            ),
        }
    }
    // A vPSD whose provisioning was lost is quarantined, or provisioning is blocked.
    for true_vpsd in &truth.vpsds {
        let present = recovered.vpsds.iter().any(|vpsd| vpsd.id == true_vpsd.id);
        let quarantined = recovered
            .quarantine
            .iter()
            .any(|(id, _)| *id == true_vpsd.id);
        // Whatever happened to it, its id can never be provisioned afresh (which would
        // restart its piece numbers under a new key).
        let blocked = store
            .engine
            .prepare_provision(
                NOW,
                true_vpsd.id,
                "again",
                indicia_proto::Algorithm::Ed25519,
                "02134".parse().unwrap(),
            )
            .is_err();
        assert!(
            blocked,
            "seed {seed}: vPSD {}'s id could be provisioned again: {report:#?}",
            true_vpsd.id
        );
        assert!(
            present || quarantined || report.provisioning_blocked.is_some(),
            "seed {seed}: vPSD {} vanished without a trace",
            true_vpsd.id
        );
    }
}

#[test]
fn damage_in_the_middle_is_reported_and_locks_only_with_real_registers() {
    for seed in 0..seeds("INDICIA_DAMAGE_SEEDS", 900) {
        damage_once(seed);
    }
}
