//! Shared by the journal tests: a shard store in a directory, and a deterministic random
//! workload that drives it the way the server does (prepare, journal, apply).
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses part of this

use std::collections::BTreeMap;
use std::path::Path;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{Algorithm, AuthorizationKind, MailingDate, ProviderAuthorization, SignItem};
use indiciad::engine::{Checkpoint, ClientTag, Engine, EngineConfig, MasterKey, Record, SignJob};
use indiciad::journal::{ChainKey, JournalConfig};
use indiciad::store::{RecoveryReport, Store};

pub const NOW: u64 = 1_795_996_800;
pub const MASTER: [u8; 32] = [0x11; 32];

/// xorshift64*: small, deterministic, good enough to pick operations.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn provider() -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap()
}

pub fn open(dir: &Path, segment_bytes: usize) -> (Store, RecoveryReport) {
    open_with(dir, segment_bytes, &MASTER)
}

/// [`open`] under another master key.
pub fn open_with(dir: &Path, segment_bytes: usize, master: &[u8; 32]) -> (Store, RecoveryReport) {
    open_configured(dir, segment_bytes, master, EngineConfig::default())
}

/// [`open_with`] with an engine configuration.
pub fn open_configured(
    dir: &Path,
    segment_bytes: usize,
    master: &[u8; 32],
    config: EngineConfig,
) -> (Store, RecoveryReport) {
    let provider = provider();
    let mut public = [0u8; 32];
    public.copy_from_slice(provider.public_key().as_ref());
    let engine = Engine::new(config, MasterKey::new(master).unwrap(), public);
    Store::open(
        dir,
        0,
        ChainKey::derive(master, 0),
        JournalConfig { segment_bytes },
        engine,
    )
    .unwrap()
}

/// Appends a record to the journal directly, past the engine (nothing checks that it
/// follows the state): how a test writes a history that does not reconcile.
pub fn append_raw(
    journal: &mut indiciad::journal::Journal,
    record: &Record,
) -> Result<u64, indiciad::journal::JournalError> {
    let mut payload = indiciad::store::codec::Encoder::default();
    indiciad::store::codec::encode_record(record, &mut payload).unwrap();
    let (kind, subject, at_unix) = indiciad::store::codec::header_fields(record, NOW);
    journal.append(kind, subject, at_unix, &payload.bytes)
}

/// A random workload over a few vPSDs.
pub struct Workload {
    pub rng: Rng,
    provider: Ed25519KeyPair,
    sequence: u64,
    request_id: u64,
    pub vpsds: u64,
}

impl Workload {
    pub fn new(seed: u64, vpsds: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            provider: provider(),
            sequence: 0,
            request_id: 0,
            vpsds,
        }
    }

    fn authorization(
        &mut self,
        kind: AuthorizationKind,
        vpsd_id: u64,
        amount_mills: u64,
    ) -> ProviderAuthorization {
        self.sequence += 1;
        indicia_client::provider::authorize(
            &self.provider,
            kind,
            vpsd_id,
            amount_mills,
            self.sequence,
            NOW + 3_600,
        )
    }

    /// A refill record of a vPSD at version 1 (records carry no signature: the engine
    /// checks the provider's when it prepares one).
    pub fn refill(&mut self, vpsd_id: u64, amount_mills: u64) -> Record {
        self.sequence += 1;
        Record::Provider {
            vpsd_id,
            version: 2,
            kind: AuthorizationKind::Refill,
            amount_mills,
            sequence: self.sequence,
            at_unix: NOW,
            client: ClientTag(9),
            request_id: self.sequence,
            fingerprint: [0; 16],
        }
    }

    /// One single-item sign job.
    pub fn sign_job(&mut self, request_id: u64, client: u64) -> SignJob {
        SignJob {
            client: ClientTag(client),
            request_id,
            items: vec![SignItem {
                postage_mills: 1 + self.rng.below(2_000),
                mailing_date: MailingDate::from_unix_seconds(NOW).unwrap(),
                rate_category: 1,
                destination_zip: None,
                data_digest: None,
            }],
        }
    }

    /// Prepares one random operation against the engine; None if it changes nothing.
    pub fn next_record(&mut self, engine: &Engine) -> Option<Record> {
        let vpsd_id = 1 + self.rng.below(self.vpsds);
        if engine.vpsd(vpsd_id).is_none() {
            let algorithm = if self.rng.below(2) == 0 {
                Algorithm::EcdsaP256
            } else {
                Algorithm::Ed25519
            };
            return engine
                .prepare_provision(
                    NOW,
                    vpsd_id,
                    "crash-test",
                    algorithm,
                    "02134".parse().unwrap(),
                )
                .ok();
        }
        match self.rng.below(20) {
            0..=2 => {
                let amount = 1_000 + self.rng.below(50_000);
                let authorization = self.authorization(AuthorizationKind::Refill, vpsd_id, amount);
                self.request_id += 1;
                engine
                    .prepare_provider(NOW, ClientTag(9), self.request_id, vpsd_id, &authorization)
                    .ok()?
                    .record
            }
            3 => engine.prepare_lock(NOW, vpsd_id, "test").ok(),
            4 => engine.prepare_unlock(NOW, vpsd_id).ok().flatten(),
            5 if self.rng.below(4) == 0 => engine.prepare_rotate_key(NOW, vpsd_id).ok(),
            6 if self.rng.below(10) == 0 => engine.prepare_withdraw(NOW, vpsd_id).ok(),
            _ => {
                let jobs: Vec<SignJob> = (0..1 + self.rng.below(4))
                    .map(|_| {
                        self.request_id += 1;
                        let items = (0..1 + self.rng.below(3))
                            .map(|_| SignItem {
                                postage_mills: 1 + self.rng.below(2_000),
                                mailing_date: MailingDate::from_unix_seconds(NOW).unwrap(),
                                rate_category: 1,
                                destination_zip: None,
                                data_digest: None,
                            })
                            .collect();
                        SignJob {
                            client: ClientTag(self.rng.below(3)),
                            request_id: self.request_id,
                            items,
                        }
                    })
                    .collect();
                engine
                    .prepare_session(NOW, vpsd_id, &jobs)
                    .record
                    .map(Record::Session)
            }
        }
    }
}

/// The state to compare after recovery: everything but the (derived) window order.
pub fn state(engine: &Engine) -> State {
    State {
        checkpoint: engine.checkpoint(),
        window: engine.window().snapshot(),
    }
}

/// The state of the vPSDs and the idempotency window (which recovery rebuilds from records,
/// not from a checkpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub checkpoint: Checkpoint,
    pub window: indiciad::engine::WindowSnapshot,
}

impl std::ops::Deref for State {
    type Target = Checkpoint;

    fn deref(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

/// Contents of every file in a directory, by name.
pub fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

pub fn write_dir(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
