//! Cost per indicium of a whole signing session of 1, 4, 16, 64 and 256 indicia
//! (unseal the key, validate, sign, build the record, apply it; no disk), beside the raw
//! aws-lc-rs signing cost measured in the same run.
// Benchmark setup: a failed expect is a broken benchmark, not an operating error.
#![allow(clippy::expect_used)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use indicia_benches::{funded_engine, jobs, run_session, sample_item, NOW};
use indicia_proto::{Algorithm, IndiciumPayload};

fn payload(algorithm: Algorithm) -> IndiciumPayload {
    let item = sample_item();
    IndiciumPayload {
        algorithm,
        key_serial: 1,
        vpsd_id: 1,
        piece_number: 1,
        postage_mills: item.postage_mills,
        ascending_mills: 730,
        descending_mills: 1 << 40,
        mailing_date: item.mailing_date,
        origin_zip: indicia_proto::Zip::new(2_134, None).unwrap_or_else(|_| unreachable!()),
        destination_zip: item.destination_zip,
        rate_category: 1,
        software_id: 0x100,
        data_digest: item.data_digest,
    }
}

fn raw_sign(c: &mut Criterion) {
    let mut group = c.benchmark_group("raw_sign");
    group.throughput(Throughput::Elements(1));
    let rng = SystemRandom::new();
    let ecdsa = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key generation");
    let message = payload(Algorithm::EcdsaP256).signed_bytes();
    group.bench_function("ecdsa-p256", |b| {
        b.iter(|| ecdsa.sign(&rng, message.as_ref()).expect("sign"));
    });
    let ed25519 = Ed25519KeyPair::generate().expect("key generation");
    let message = payload(Algorithm::Ed25519).signed_bytes();
    group.bench_function("ed25519", |b| b.iter(|| ed25519.sign(message.as_ref())));
    group.finish();
}

fn session(c: &mut Criterion) {
    for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
        let mut group = c.benchmark_group(format!("session/{algorithm}"));
        for size in [1usize, 4, 16, 64, 256] {
            group.throughput(Throughput::Elements(size as u64));
            let mut engine = funded_engine(algorithm, size).expect("engine");
            let mut next_request_id = 1_000;
            group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
                b.iter_batched(
                    || jobs(size, &mut next_request_id),
                    |jobs| {
                        let signed = run_session(&mut engine, &jobs);
                        assert_eq!(signed, size);
                    },
                    criterion::BatchSize::SmallInput,
                );
            });
        }
        group.finish();
    }
}

fn load_unload(c: &mut Criterion) {
    // What a session pays once whatever its size: unseal + key parse (load) and drop.
    let engine = funded_engine(Algorithm::EcdsaP256, 1).expect("engine");
    let mut group = c.benchmark_group("session_overhead");
    group.bench_function("prepare_empty_session", |b| {
        b.iter(|| engine.prepare_session(NOW, 1, &[]));
    });
    group.finish();
}

criterion_group!(benches, raw_sign, session, load_unload);
criterion_main!(benches);
