//! Shared set-up for the criterion benchmarks in `benches/`: a funded engine and sample
//! requests. The benchmarks themselves are in `benches/*.rs`; run them with
//! `cargo bench -p indicia-benches`.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{Algorithm, AuthorizationKind, MailingDate, ProviderAuthorization, SignItem};
use indiciad::engine::{ClientTag, Engine, EngineConfig, MasterKey, Record, SignJob};

/// 2026-11-30T00:00:00Z.
pub const NOW: u64 = 1_795_996_800;

/// An engine holding vPSD 1 with the given algorithm and (practically) unlimited funds.
pub fn funded_engine(
    algorithm: Algorithm,
    session_indicia_max: usize,
) -> Result<Engine, Box<dyn std::error::Error>> {
    let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32])?;
    let mut provider_public = [0u8; 32];
    provider_public.copy_from_slice(provider.public_key().as_ref());
    let master = MasterKey::new(&*MasterKey::generate_bytes()?)?;
    let config = EngineConfig {
        session_indicia_max,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config, master, provider_public);
    let record = engine.prepare_provision(NOW, 1, "bench", algorithm, "02134".parse()?)?;
    engine.commit(record);
    let mut authorization = ProviderAuthorization {
        kind: AuthorizationKind::Refill,
        vpsd_id: 1,
        amount_mills: 1 << 60,
        sequence: 1,
        expires_unix: NOW + 3_600,
        signature: [0; 64],
    };
    let signature = provider.sign(&authorization.signed_bytes());
    authorization.signature.copy_from_slice(signature.as_ref());
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
