//! Journal costs on this machine's disk: append + flush (fdatasync) of one session record
//! of 1 and of 64 indicia, and recovery of a journal holding one million indicia, both
//! from the newest checkpoint (64 MiB segments) and by replaying everything (one segment).
//! The directory is `INDICIA_BENCH_DIR` if set, else the system temp dir.
// Benchmark setup: a failed expect is a broken benchmark, not an operating error.
#![allow(clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use indicia_benches::{empty_engine, funded_store, synthetic_session, NOW};
use indiciad::engine::Record;
use indiciad::journal::{ChainKey, JournalConfig};
use indiciad::store::Store;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("INDICIA_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

fn append_flush(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_append_flush");
    for size in [1usize, 64] {
        let dir = bench_dir();
        // One large segment: rotations (a checkpoint each) are not what this measures.
        let mut store = funded_store(dir.path(), 1 << 30).expect("store");
        let mut next_request_id = 1_000;
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(
            BenchmarkId::new("session_indicia", size),
            &size,
            |b, &size| {
                // Only commit + flush are timed; building the record is not.
                b.iter_custom(|iterations| {
                    let mut elapsed = std::time::Duration::ZERO;
                    for _ in 0..iterations {
                        let record = Record::Session(synthetic_session(
                            &store.engine,
                            size,
                            &mut next_request_id,
                        ));
                        let start = std::time::Instant::now();
                        store.commit(record, NOW).expect("commit");
                        store.flush().expect("flush");
                        elapsed += start.elapsed();
                    }
                    elapsed
                });
            },
        );
    }
    group.finish();
}

const INDICIA: usize = 1_000_000;
const PER_SESSION: usize = 256;

/// A journal holding a million indicia in sessions of 256, one user each.
fn million(segment_bytes: usize) -> tempfile::TempDir {
    let dir = bench_dir();
    let mut store = funded_store(dir.path(), segment_bytes).expect("store");
    let mut next_request_id = 1_000;
    for _ in 0..INDICIA.div_ceil(PER_SESSION) {
        let record = Record::Session(synthetic_session(
            &store.engine,
            PER_SESSION,
            &mut next_request_id,
        ));
        store.commit(record, NOW).expect("commit");
    }
    store.flush().expect("flush");
    dir
}

fn recovery(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_recovery_1m_indicia");
    group.sample_size(10);
    group.throughput(Throughput::Elements(INDICIA as u64));
    for (name, segment_bytes) in [
        ("checkpointed_64MiB_segments", 64usize << 20),
        ("full_replay", 1usize << 30),
    ] {
        let dir = million(segment_bytes);
        let master = [0x11u8; 32];
        group.bench_function(name, |b| {
            b.iter(|| {
                let (store, report) = Store::open(
                    dir.path(),
                    0,
                    ChainKey::derive(&master, 0),
                    JournalConfig { segment_bytes },
                    empty_engine(&master).expect("engine"),
                )
                .expect("recover");
                assert!(report.is_clean());
                assert!(
                    store.engine.vpsd(1).expect("vPSD 1").registers.piece_count >= INDICIA as u64
                );
                report.indicia_replayed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, append_flush, recovery);
criterion_main!(benches);
