//! The appliance's core at work, until the network daemon lands: a shard's engine and
//! journal in a temporary directory. Provisions and funds vPSDs, signs indicia for many
//! simulated users in coalesced sessions with group commit, restarts from the journal,
//! and shows one indicium decoded and verified.
//!
//! `cargo run --release -p indiciad --example demo`

use std::time::Instant;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{format_mills, Algorithm, AuthorizationKind, Indicium, MailingDate, SignItem};
use indiciad::engine::provider::authorize;
use indiciad::engine::{ClientTag, Engine, EngineConfig, MasterKey, Record, SignJob};
use indiciad::journal::{ChainKey, JournalConfig, Store};

const VPSDS: u64 = 4;
const USERS: u64 = 2_000;
const ROUNDS: usize = 40;
const SESSION_INDICIA_MAX: usize = 64;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn open(
    dir: &std::path::Path,
    master: &[u8; 32],
    provider: &Ed25519KeyPair,
) -> Result<Store, Box<dyn std::error::Error>> {
    let mut provider_public = [0u8; 32];
    provider_public.copy_from_slice(provider.public_key().as_ref());
    let config = EngineConfig {
        session_indicia_max: SESSION_INDICIA_MAX,
        ..EngineConfig::default()
    };
    let engine = Engine::new(config, MasterKey::new(master)?, provider_public);
    let (store, report) = Store::open(
        dir,
        0,
        ChainKey::derive(master, 0),
        JournalConfig::default(),
        engine,
    )?;
    println!(
        "journal opened: {} records replayed ({} indicia), last seq {}, {}",
        report.records_replayed,
        report.indicia_replayed,
        report.last_sequence,
        if report.is_clean() {
            "clean"
        } else {
            "FINDINGS"
        }
    );
    for finding in &report.findings {
        println!("  finding: {finding}");
    }
    Ok(store)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let master = MasterKey::generate_bytes()?;
    let provider = Ed25519KeyPair::generate()?;
    let now = now_unix();
    println!("data directory: {}", dir.path().display());
    let mut store = open(dir.path(), &master, &provider)?;

    for vpsd_id in 1..=VPSDS {
        let algorithm = if vpsd_id % 2 == 1 {
            Algorithm::EcdsaP256
        } else {
            Algorithm::Ed25519
        };
        let record = store.engine.prepare_provision(
            now,
            vpsd_id,
            "demo-mailer",
            algorithm,
            "02134".parse()?,
        )?;
        store.commit(record, now)?;
        let authorization = authorize(
            &provider,
            AuthorizationKind::Refill,
            vpsd_id,
            1_000_000_000,
            1,
            now + 3_600,
        );
        let prepared =
            store
                .engine
                .prepare_provider(now, ClientTag(0), vpsd_id, vpsd_id, &authorization)?;
        if let Some(record) = prepared.record {
            store.commit(record, now)?;
        }
    }
    store.flush()?;
    println!("provisioned and funded {VPSDS} vPSDs with 1,000,000.000 each");

    // Each round: every user asks for one indicium on one of the vPSDs; requests for the
    // same vPSD are coalesced into sessions of up to 64, and one flush commits the round.
    let today = MailingDate::from_unix_seconds(now).ok_or("clock out of range")?;
    let mut request_id = 1_000;
    let mut indicia = 0usize;
    let mut sessions = 0usize;
    let mut sample = None;
    let started = Instant::now();
    for round in 0..ROUNDS {
        for vpsd_id in 1..=VPSDS {
            let users = (0..USERS).filter(|user| (user + round as u64) % VPSDS + 1 == vpsd_id);
            let jobs: Vec<SignJob> = users
                .map(|user| {
                    request_id += 1;
                    SignJob {
                        client: ClientTag(user),
                        request_id,
                        items: vec![SignItem {
                            postage_mills: 730,
                            mailing_date: today,
                            rate_category: 1,
                            destination_zip: Some(
                                "20260-0001".parse().unwrap_or_else(|_| unreachable!()),
                            ),
                            data_digest: None,
                        }],
                    }
                })
                .collect();
            for chunk in jobs.chunks(SESSION_INDICIA_MAX) {
                let prepared = store.engine.prepare_session(now, vpsd_id, chunk);
                if let Some(record) = prepared.record {
                    indicia += record.indicia().count();
                    sample = record.indicia().last().copied().or(sample);
                    store.commit(Record::Session(record), now)?;
                    sessions += 1;
                }
            }
        }
        store.flush()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "signed {indicia} indicia in {sessions} sessions ({:.1} per session) in {elapsed:.2} s: {:.0} indicia/s on one core, each durable before it would be answered",
        indicia as f64 / sessions as f64,
        indicia as f64 / elapsed
    );

    let before: Vec<_> = (1..=VPSDS)
        .map(|id| store.engine.status(now, id))
        .collect::<Result<_, _>>()?;
    drop(store);
    println!("restarting from the journal ...");
    let store = open(dir.path(), &master, &provider)?;
    for status in &before {
        let after = store.engine.status(now, status.vpsd_id)?;
        assert_eq!(&after, status, "recovered state differs");
        println!(
            "vPSD {} ({}): AR {} DR {} CS {} pieces {}",
            after.vpsd_id,
            after.algorithm,
            format_mills(after.ascending_mills),
            format_mills(after.descending_mills),
            format_mills(after.control_total_mills),
            after.piece_count
        );
    }

    let indicium = sample.ok_or("nothing signed")?;
    let bytes = indicium.to_bytes();
    let decoded = Indicium::decode(bytes.as_ref())?;
    let p = decoded.payload;
    let (verdict, _, _) = store.engine.verify(bytes.as_ref());
    println!(
        "sample indicium ({} bytes): vPSD {} key {} piece {} postage {} AR {} DR {} mailed {} from {} to {} -> {:?}",
        bytes.as_ref().len(),
        p.vpsd_id,
        p.key_serial,
        p.piece_number,
        format_mills(p.postage_mills),
        format_mills(p.ascending_mills),
        format_mills(p.descending_mills),
        p.mailing_date,
        p.origin_zip,
        p.destination_zip.map_or_else(|| "-".to_owned(), |zip| zip.to_string()),
        verdict
    );
    let hex: String = bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    println!("  {hex}");
    Ok(())
}
