//! Shared set-up for the criterion benchmarks in `benches/`: a funded engine and sample
//! requests. The benchmarks themselves are in `benches/*.rs`; run them with
//! `cargo bench -p indicia-benches`.
// Benchmark setup: a failed expect is a broken benchmark, not an operating error.
#![allow(clippy::expect_used)]

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_client::provider::authorize;
use indicia_proto::{Algorithm, AuthorizationKind, MailingDate, SignItem};
use indiciad::engine::{ClientTag, Engine, EngineConfig, MasterKey, Record, SignJob};

/// 2026-11-30T00:00:00Z.
pub const NOW: u64 = 1_795_996_800;

/// An engine holding vPSD 1 with the given algorithm and (practically) unlimited funds.
pub fn funded_engine(
    algorithm: Algorithm,
    session_indicia_max: usize,
) -> Result<Engine, Box<dyn std::error::Error>> {
    funded_engine_with(
        algorithm,
        session_indicia_max,
        &*MasterKey::generate_bytes()?,
    )
}

/// The provision and refill records of vPSD 1 (to journal them elsewhere).
fn engine_history(engine: &Engine) -> Vec<Record> {
    let vpsd = engine.vpsd(1).expect("vPSD 1 is provisioned");
    let key = vpsd.current_key();
    vec![
        Record::Provision {
            vpsd_id: 1,
            owner: vpsd.owner.clone(),
            algorithm: vpsd.algorithm,
            origin_zip: vpsd.origin_zip,
            public_key: key.public.clone(),
            sealed_key: key.sealed.expect("an active vPSD has a sealed key"),
            at_unix: NOW,
        },
        Record::Provider {
            vpsd_id: 1,
            version: 2,
            kind: AuthorizationKind::Refill,
            amount_mills: vpsd.registers.descending_mills,
            sequence: vpsd.provider_sequence,
            at_unix: NOW,
            client: ClientTag(1),
            request_id: 1,
            fingerprint: [0; 16],
        },
    ]
}

fn funded_engine_with(
    algorithm: Algorithm,
    session_indicia_max: usize,
    master: &[u8; 32],
) -> Result<Engine, Box<dyn std::error::Error>> {
    let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32])?;
    let mut provider_public = [0u8; 32];
    provider_public.copy_from_slice(provider.public_key().as_ref());
    let config = EngineConfig {
        session_indicia_max,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, MasterKey::new(master)?, provider_public);
    let record = engine.prepare_provision(NOW, 1, "bench", algorithm, "02134".parse()?)?;
    engine.commit(record);
    let authorization = authorize(
        &provider,
        AuthorizationKind::Refill,
        1,
        1 << 60,
        1,
        NOW + 3_600,
    );
    let prepared = engine.prepare_provider(NOW, ClientTag(1), 1, 1, &authorization)?;
    if let Some(record) = prepared.record {
        engine.commit(record);
    }
    Ok(engine)
}

/// A typical single-indicium request.
pub fn sample_item() -> SignItem {
    SignItem {
        postage_mills: 730,
        mailing_date: MailingDate::from_unix_seconds(NOW)
            .unwrap_or(MailingDate::from_days_since_2000(0)),
        rate_category: 1,
        destination_zip: Some(
            indicia_proto::Zip::new(20_260, Some(1)).unwrap_or_else(|_| unreachable!()),
        ),
        data_digest: Some([0x5a; 32]),
    }
}

/// `count` single-indicium requests from distinct users, with fresh request ids.
pub fn jobs(count: usize, next_request_id: &mut u64) -> Vec<SignJob> {
    (0..count)
        .map(|user| {
            *next_request_id += 1;
            SignJob {
                client: ClientTag(user as u64),
                request_id: *next_request_id,
                items: vec![sample_item()],
            }
        })
        .collect()
}

/// One whole session as the server runs it, without the journal: prepare, then apply.
pub fn run_session(engine: &mut Engine, jobs: &[SignJob]) -> usize {
    let prepared = engine.prepare_session(NOW, 1, jobs);
    let signed = prepared
        .record
        .as_ref()
        .map_or(0, |record| record.indicia().count());
    if let Some(record) = prepared.record {
        engine.commit(Record::Session(record));
    }
    signed
}

/// A session record of `count` indicia for vPSD 1, consistent with the engine's state (so
/// the journal and `Engine::apply` accept it) but with zero signatures: for journal
/// benchmarks, which measure storage, not signing. One job (one user) per indicium.
pub fn synthetic_session(
    engine: &Engine,
    count: usize,
    next_request_id: &mut u64,
) -> indiciad::engine::SessionRecord {
    use indicia_proto::{Indicium, IndiciumPayload};
    use indiciad::engine::{ItemOutcome, JobRecord, SessionRecord};
    let vpsd = engine.vpsd(1).expect("vPSD 1 is provisioned");
    let key_serial = vpsd.current_key().serial;
    let before = vpsd.registers;
    let mut registers = before;
    let item = sample_item();
    let jobs = (0..count)
        .map(|user| {
            registers = registers
                .debit(item.postage_mills)
                .expect("funded for benchmarks");
            *next_request_id += 1;
            let payload = IndiciumPayload {
                algorithm: vpsd.algorithm,
                key_serial,
                vpsd_id: 1,
                piece_number: registers.piece_count,
                postage_mills: item.postage_mills,
                ascending_mills: registers.ascending_mills,
                descending_mills: registers.descending_mills,
                mailing_date: item.mailing_date,
                origin_zip: vpsd.origin_zip,
                destination_zip: item.destination_zip,
                rate_category: item.rate_category,
                software_id: 0x0100,
                data_digest: item.data_digest,
            };
            JobRecord {
                client: ClientTag(user as u64 % 1_000),
                request_id: *next_request_id,
                fingerprint: [0; 16],
                outcomes: vec![ItemOutcome::Signed(Indicium {
                    payload,
                    signature: [0; 64],
                })],
            }
        })
        .collect();
    SessionRecord {
        vpsd_id: 1,
        version: vpsd.version + 1,
        key_serial,
        before,
        after: registers,
        jobs,
    }
}

/// A store (engine + journal) in `dir` with vPSD 1 provisioned and funded.
pub fn funded_store(
    dir: &std::path::Path,
    segment_bytes: usize,
) -> Result<indiciad::store::Store, Box<dyn std::error::Error>> {
    let master = [0x11u8; 32];
    let engine = funded_engine_with(Algorithm::EcdsaP256, 256, &master)?;
    // Journal the two records that made the engine, by replaying them into a fresh one.
    let (mut store, _) = indiciad::store::Store::open(
        dir,
        0,
        indiciad::journal::ChainKey::derive(&master, 0),
        indiciad::journal::JournalConfig { segment_bytes },
        empty_engine(&master)?,
    )?;
    if store.engine.vpsd(1).is_none() {
        for record in engine_history(&engine) {
            store.commit(record, NOW)?;
        }
        store.flush()?;
    }
    Ok(store)
}

/// An empty engine with the benchmark's master and provider keys.
pub fn empty_engine(master: &[u8; 32]) -> Result<Engine, Box<dyn std::error::Error>> {
    let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32])?;
    let mut provider_public = [0u8; 32];
    provider_public.copy_from_slice(provider.public_key().as_ref());
    Ok(Engine::new(
        EngineConfig::default(),
        MasterKey::new(master)?,
        provider_public,
    ))
}
