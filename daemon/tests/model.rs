//! Model-based test of the engine: thousands of random sequences of provision, refill
//! (valid, forged, replayed, expired, for another vPSD), contact, sign, batch sign, retries,
//! lock, unlock, withdraw and clock jumps, run through the engine exactly as the server
//! runs it (prepare, then apply the record) and checked step by step against a small
//! reference model. Every indicium is decoded from its wire bytes and its signature
//! verified with the vPSD's public key.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

use std::collections::{BTreeMap, HashMap};

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use indicia_proto::{
    Algorithm, AuthorizationKind, ErrorCode, Indicium, LockReason, MailingDate,
    ProviderAuthorization, SignItem, VpsdState,
};
use indiciad::engine::{
    ClientTag, Engine, EngineConfig, EngineError, MasterKey, Record, DAY_SECONDS,
};
use proptest::prelude::*;

const START: u64 = 1_795_996_800; // 2026-11-30T00:00:00Z
const VPSDS: u64 = 3;

#[derive(Debug, Clone)]
enum RefillKind {
    Valid,
    Forged,
    Replayed,
    Expired,
    OtherVpsd,
}

#[derive(Debug, Clone)]
enum Op {
    Provision {
        vpsd: u64,
        ed25519: bool,
    },
    Refill {
        vpsd: u64,
        amount: u64,
        kind: RefillKind,
    },
    RetryRefill {
        pick: usize,
    },
    Contact {
        vpsd: u64,
    },
    Sign {
        client: u64,
        vpsd: u64,
        items: Vec<(u64, i8)>,
    },
    Retry {
        pick: usize,
    },
    /// An earlier (client, request id) with other content.
    Reuse {
        pick: usize,
    },
    /// An earlier (client, request id, items) for another vPSD: a request of its own,
    /// since the idempotency key is (client, vPSD, request id).
    OtherVpsd {
        pick: usize,
        vpsd: u64,
    },
    Lock {
        vpsd: u64,
    },
    Unlock {
        vpsd: u64,
    },
    Withdraw {
        vpsd: u64,
    },
    Advance {
        days: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let vpsd = 1..=VPSDS;
    prop_oneof![
        2 => (vpsd.clone(), any::<bool>()).prop_map(|(vpsd, ed25519)| Op::Provision { vpsd, ed25519 }),
        3 => (
            vpsd.clone(),
            1_000u64..50_000,
            prop_oneof![
                6 => Just(RefillKind::Valid),
                1 => Just(RefillKind::Forged),
                1 => Just(RefillKind::Replayed),
                1 => Just(RefillKind::Expired),
                1 => Just(RefillKind::OtherVpsd),
            ]
        )
            .prop_map(|(vpsd, amount, kind)| Op::Refill { vpsd, amount, kind }),
        1 => any::<usize>().prop_map(|pick| Op::RetryRefill { pick }),
        1 => vpsd.clone().prop_map(|vpsd| Op::Contact { vpsd }),
        8 => (
            0u64..3,
            vpsd.clone(),
            proptest::collection::vec(
                (
                    prop_oneof![20 => 1u64..1_500, 1 => Just(0u64), 1 => 100_001u64..200_000],
                    -3i8..34
                ),
                1..5
            )
        )
            .prop_map(|(client, vpsd, items)| Op::Sign { client, vpsd, items }),
        2 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Reuse { pick }),
        1 => (any::<usize>(), 1u64..4).prop_map(|(pick, vpsd)| Op::OtherVpsd { pick, vpsd }),
        1 => vpsd.clone().prop_map(|vpsd| Op::Lock { vpsd }),
        1 => vpsd.clone().prop_map(|vpsd| Op::Unlock { vpsd }),
        1 => vpsd.clone().prop_map(|vpsd| Op::Withdraw { vpsd }),
        1 => prop_oneof![0u64..3, 60u64..100].prop_map(|days| Op::Advance { days }),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active,
    Locked,
    Withdrawn,
}

#[derive(Debug, Clone)]
struct ModelVpsd {
    ascending: u64,
    descending: u64,
    control: u64,
    pieces: u64,
    state: State,
    last_contact: u64,
    sequence: u64,
    last_authorization: Option<ProviderAuthorization>,
}

/// What a remembered sign request answered: per item the indicium, or the refusal code.
type ItemsAnswer = Vec<Result<Indicium, ErrorCode>>;

struct Harness {
    engine: Engine,
    provider: Ed25519KeyPair,
    model: BTreeMap<u64, ModelVpsd>,
    now: u64,
    next_sequence: u64,
    next_request_id: u64,
    /// Every sign request sent, for retries: (client, request id, vPSD, items).
    sent: Vec<(ClientTag, u64, u64, Vec<SignItem>)>,
    /// Remembered answers of requests that signed at least one item.
    /// Keyed by (client, vPSD, request id), the idempotency key.
    answered: HashMap<(ClientTag, u64, u64), (Vec<SignItem>, ItemsAnswer)>,
    /// Accepted refills, for retries: (request id, vPSD, authorization).
    refills: Vec<(u64, u64, ProviderAuthorization)>,
}

const PROVIDER_CLIENT: ClientTag = ClientTag(1_000);

impl Harness {
    fn new() -> Self {
        let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap();
        let mut public = [0u8; 32];
        public.copy_from_slice(provider.public_key().as_ref());
        let master = MasterKey::new(&MasterKey::generate_bytes().unwrap()).unwrap();
        Self {
            engine: Engine::new(EngineConfig::default(), master, public),
            provider,
            model: BTreeMap::new(),
            now: START,
            next_sequence: 1,
            next_request_id: 1,
            sent: Vec::new(),
            answered: HashMap::new(),
            refills: Vec::new(),
        }
    }

    fn request_id(&mut self) -> u64 {
        self.next_request_id += 1;
        self.next_request_id
    }

    fn authorization(
        &mut self,
        kind: AuthorizationKind,
        vpsd_id: u64,
        amount_mills: u64,
    ) -> ProviderAuthorization {
        self.next_sequence += 1;
        indicia_client::provider::authorize(
            &self.provider,
            kind,
            vpsd_id,
            amount_mills,
            self.next_sequence,
            self.now + 600,
        )
    }

    fn overdue(&self, vpsd: &ModelVpsd) -> bool {
        self.now - vpsd.last_contact > 90 * DAY_SECONDS
    }

    fn commit(&mut self, record: Record) {
        self.engine.apply(&record).unwrap();
    }

    fn run(&mut self, op: &Op) {
        match op.clone() {
            Op::Provision { vpsd, ed25519 } => {
                let algorithm = if ed25519 {
                    Algorithm::Ed25519
                } else {
                    Algorithm::EcdsaP256
                };
                let result = self.engine.prepare_provision(
                    self.now,
                    vpsd,
                    "owner",
                    algorithm,
                    "02134".parse().unwrap(),
                );
                if self.model.contains_key(&vpsd) {
                    assert_eq!(
                        result.unwrap_err(),
                        EngineError::VpsdExists { vpsd_id: vpsd }
                    );
                } else {
                    self.commit(result.unwrap());
                    self.model.insert(
                        vpsd,
                        ModelVpsd {
                            ascending: 0,
                            descending: 0,
                            control: 0,
                            pieces: 0,
                            state: State::Active,
                            last_contact: self.now,
                            sequence: 0,
                            last_authorization: None,
                        },
                    );
                }
            }
            Op::Refill { vpsd, amount, kind } => self.refill(vpsd, amount, kind),
            Op::RetryRefill { pick } => {
                if self.refills.is_empty() {
                    return;
                }
                let (request_id, vpsd, authorization) = self.refills[pick % self.refills.len()];
                let before = self.model[&vpsd].clone();
                let prepared = self
                    .engine
                    .prepare_provider(self.now, PROVIDER_CLIENT, request_id, vpsd, &authorization)
                    .unwrap();
                assert_eq!(prepared.record, None, "a retried refill changes nothing");
                count("refill-retried");
                assert_eq!(self.model[&vpsd].descending, before.descending);
            }
            Op::Contact { vpsd } => {
                let authorization = self.authorization(AuthorizationKind::Contact, vpsd, 0);
                let request_id = self.request_id();
                let result = self.engine.prepare_provider(
                    self.now,
                    PROVIDER_CLIENT,
                    request_id,
                    vpsd,
                    &authorization,
                );
                match self.model.get_mut(&vpsd) {
                    None => assert!(matches!(result, Err(EngineError::UnknownVpsd { .. }))),
                    Some(model) if model.state == State::Withdrawn => {
                        assert!(matches!(result, Err(EngineError::Withdrawn { .. })));
                    }
                    Some(model) => {
                        model.last_contact = self.now;
                        model.sequence = authorization.sequence;
                        model.last_authorization = Some(authorization);
                        self.commit(result.unwrap().record.unwrap());
                    }
                }
            }
            Op::Sign {
                client,
                vpsd,
                items,
            } => {
                let today = MailingDate::from_unix_seconds(self.now)
                    .unwrap()
                    .days_since_2000();
                let items: Vec<SignItem> = items
                    .into_iter()
                    .map(|(postage_mills, offset)| SignItem {
                        postage_mills,
                        mailing_date: MailingDate::from_days_since_2000(
                            today.checked_add_signed(offset.into()).unwrap(),
                        ),
                        rate_category: 2,
                        destination_zip: None,
                        data_digest: Some([offset as u8; 32]),
                    })
                    .collect();
                let request_id = self.request_id();
                self.sign(ClientTag(client), request_id, vpsd, items);
            }
            Op::Retry { pick } => {
                if self.sent.is_empty() {
                    return;
                }
                let (client, request_id, vpsd, items) = self.sent[pick % self.sent.len()].clone();
                self.sign(client, request_id, vpsd, items);
            }
            Op::Reuse { pick } => {
                if self.sent.is_empty() {
                    return;
                }
                let (client, request_id, vpsd, mut items) =
                    self.sent[pick % self.sent.len()].clone();
                items[0].rate_category += 1;
                self.sign(client, request_id, vpsd, items);
            }
            Op::OtherVpsd { pick, vpsd } => {
                if self.sent.is_empty() {
                    return;
                }
                let (client, request_id, _, items) = self.sent[pick % self.sent.len()].clone();
                self.sign(client, request_id, vpsd, items);
            }
            Op::Lock { vpsd } => {
                let result = self.engine.prepare_lock(self.now, vpsd, "model says so");
                match self.model.get_mut(&vpsd) {
                    None => assert!(matches!(result, Err(EngineError::UnknownVpsd { .. }))),
                    Some(model) if model.state == State::Withdrawn => {
                        assert!(matches!(result, Err(EngineError::Withdrawn { .. })));
                    }
                    Some(model) => {
                        model.state = State::Locked;
                        self.commit(result.unwrap());
                    }
                }
            }
            Op::Unlock { vpsd } => {
                let result = self.engine.prepare_unlock(self.now, vpsd);
                match self.model.get_mut(&vpsd) {
                    None => assert!(matches!(result, Err(EngineError::UnknownVpsd { .. }))),
                    Some(model) if model.state == State::Withdrawn => {
                        assert!(matches!(result, Err(EngineError::Withdrawn { .. })));
                    }
                    Some(model) if model.state == State::Active => {
                        assert_eq!(result.unwrap(), None)
                    }
                    Some(model) => {
                        model.state = State::Active;
                        self.commit(result.unwrap().unwrap());
                    }
                }
            }
            Op::Withdraw { vpsd } => {
                let result = self.engine.prepare_withdraw(self.now, vpsd);
                match self.model.get_mut(&vpsd) {
                    None => assert!(matches!(result, Err(EngineError::UnknownVpsd { .. }))),
                    Some(model) if model.state == State::Withdrawn => {
                        assert!(matches!(result, Err(EngineError::Withdrawn { .. })));
                    }
                    Some(model) => {
                        let record = result.unwrap();
                        let Record::Withdraw { refund_mills, .. } = &record else {
                            panic!("withdraw record expected, got {record:?}");
                        };
                        assert_eq!(*refund_mills, model.descending);
                        model.control = model.ascending;
                        model.descending = 0;
                        model.state = State::Withdrawn;
                        count("withdrawn");
                        self.commit(record);
                    }
                }
            }
            Op::Advance { days } => self.now += days * DAY_SECONDS + 3_600,
        }
    }

    fn refill(&mut self, vpsd: u64, amount: u64, kind: RefillKind) {
        let request_id = self.request_id();
        let other = vpsd % VPSDS + 1;
        let authorization = match kind {
            RefillKind::Valid => self.authorization(AuthorizationKind::Refill, vpsd, amount),
            RefillKind::Forged => {
                let mut forged = self.authorization(AuthorizationKind::Refill, vpsd, amount);
                forged.amount_mills += 1_000_000;
                forged
            }
            RefillKind::Replayed => {
                match self.model.get(&vpsd).and_then(|m| m.last_authorization) {
                    Some(previous) => previous,
                    None => return,
                }
            }
            RefillKind::Expired => {
                let mut expired = self.authorization(AuthorizationKind::Refill, vpsd, amount);
                expired.expires_unix = self.now - 1;
                let signature = self.provider.sign(&expired.signed_bytes());
                expired.signature.copy_from_slice(signature.as_ref());
                expired
            }
            RefillKind::OtherVpsd => self.authorization(AuthorizationKind::Refill, other, amount),
        };
        let result = self.engine.prepare_provider(
            self.now,
            PROVIDER_CLIENT,
            request_id,
            vpsd,
            &authorization,
        );
        let Some(model) = self.model.get_mut(&vpsd) else {
            // The authorization is checked before the vPSD is looked up, so that an
            // unsigned one does not reveal whether the vPSD exists.
            let expected = match kind {
                RefillKind::Forged => ErrorCode::AuthorizationInvalid,
                RefillKind::OtherVpsd => ErrorCode::AuthorizationWrongVpsd,
                RefillKind::Expired => ErrorCode::AuthorizationExpired,
                _ if authorization.expires_unix < self.now => ErrorCode::AuthorizationExpired,
                _ => ErrorCode::UnknownVpsd,
            };
            assert_eq!(result.unwrap_err().code(), expected, "{kind:?}");
            return;
        };
        let expected = match kind {
            RefillKind::Forged => Some(ErrorCode::AuthorizationInvalid),
            RefillKind::OtherVpsd => Some(ErrorCode::AuthorizationWrongVpsd),
            RefillKind::Expired => Some(ErrorCode::AuthorizationExpired),
            RefillKind::Replayed if authorization.expires_unix < self.now => {
                Some(ErrorCode::AuthorizationExpired)
            }
            RefillKind::Replayed => Some(ErrorCode::AuthorizationReplayed),
            RefillKind::Valid if model.state == State::Withdrawn => Some(ErrorCode::VpsdWithdrawn),
            RefillKind::Valid => None,
        };
        match expected {
            Some(code) => {
                assert_eq!(result.unwrap_err().code(), code, "{kind:?}");
                count(code.name());
            }
            None => {
                count("refilled");
                model.descending += amount;
                model.control += amount;
                model.last_contact = self.now;
                model.sequence = authorization.sequence;
                model.last_authorization = Some(authorization);
                self.refills.push((request_id, vpsd, authorization));
                self.commit(result.unwrap().record.unwrap());
            }
        }
    }

    fn sign(&mut self, client: ClientTag, request_id: u64, vpsd: u64, items: Vec<SignItem>) {
        self.sent.push((client, request_id, vpsd, items.clone()));
        let job = indiciad::engine::SignJob {
            client,
            request_id,
            items: items.clone(),
        };
        let prepared = self.engine.prepare_session(self.now, vpsd, &[job]);
        let answer = prepared.answers.into_iter().next().unwrap();
        if let Some(record) = prepared.record {
            self.commit(Record::Session(record));
        }

        if let Some((first_items, first_answer)) = self.answered.get(&(client, vpsd, request_id)) {
            if *first_items == items {
                let got: ItemsAnswer = answer
                    .unwrap()
                    .into_iter()
                    .map(|item| item.map_err(|err| err.code))
                    .collect();
                assert_eq!(&got, first_answer, "a retry gets the original answer");
                count("retry-answered");
            } else {
                assert_eq!(answer.unwrap_err().code(), ErrorCode::RequestIdReused);
                count("request-id-reused");
            }
            return;
        }
        let Some(model) = self.model.get(&vpsd).cloned() else {
            assert_eq!(answer.unwrap_err().code(), ErrorCode::UnknownVpsd);
            count("unknown-vpsd");
            return;
        };
        match model.state {
            State::Withdrawn => {
                assert_eq!(answer.unwrap_err().code(), ErrorCode::VpsdWithdrawn);
                count("vpsd-withdrawn");
                return;
            }
            State::Locked => {
                assert_eq!(answer.unwrap_err().code(), ErrorCode::VpsdLocked);
                count("vpsd-locked");
                return;
            }
            State::Active if self.overdue(&model) => {
                let err = answer.unwrap_err();
                assert_eq!(
                    err,
                    EngineError::Locked {
                        vpsd_id: vpsd,
                        reason: LockReason::ContactOverdue
                    }
                );
                count("contact-overdue");
                return;
            }
            State::Active => {}
        }
        let answers = answer.unwrap();
        assert_eq!(answers.len(), items.len());
        let today = i32::from(
            MailingDate::from_unix_seconds(self.now)
                .unwrap()
                .days_since_2000(),
        );
        let public = self.engine.vpsd(vpsd).unwrap().current_key().public.clone();
        let mut model = model;
        let mut remembered = Vec::new();
        for (item, got) in items.iter().zip(answers) {
            let offset = i32::from(item.mailing_date.days_since_2000()) - today;
            let expected = if item.postage_mills == 0 || item.postage_mills > 100_000 {
                Err(ErrorCode::PostageOutOfRange)
            } else if !(-1..=30).contains(&offset) {
                Err(ErrorCode::MailingDateOutOfWindow)
            } else if model.descending < item.postage_mills {
                Err(ErrorCode::InsufficientFunds)
            } else {
                model.pieces += 1;
                model.ascending += item.postage_mills;
                model.descending -= item.postage_mills;
                Ok(model.pieces)
            };
            match (expected, got) {
                (Err(code), Err(err)) => {
                    assert_eq!(err.code, code);
                    count(code.name());
                    remembered.push(Err(code));
                }
                (Ok(piece), Ok(indicium)) => {
                    let bytes = indicium.to_bytes();
                    let decoded = Indicium::decode(bytes.as_ref()).unwrap();
                    let payload = decoded.payload;
                    assert_eq!(payload.vpsd_id, vpsd);
                    assert_eq!(payload.piece_number, piece);
                    assert_eq!(payload.postage_mills, item.postage_mills);
                    assert_eq!(payload.ascending_mills, model.ascending);
                    assert_eq!(payload.descending_mills, model.descending);
                    assert_eq!(payload.mailing_date, item.mailing_date);
                    assert_eq!(payload.data_digest, item.data_digest);
                    let (payload_bytes, signature) =
                        Indicium::split_signed(bytes.as_ref()).unwrap();
                    let algorithm: &dyn signature::VerificationAlgorithm = match payload.algorithm {
                        Algorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
                        Algorithm::Ed25519 => &signature::ED25519,
                    };
                    UnparsedPublicKey::new(algorithm, &public.bytes)
                        .verify(payload_bytes, signature)
                        .expect("every indicium verifies with the vPSD's public key");
                    count("signed");
                    remembered.push(Ok(decoded));
                }
                (expected, got) => panic!("item {item:?}: expected {expected:?}, got {got:?}"),
            }
        }
        if remembered.iter().any(Result::is_ok) {
            if self
                .sent
                .iter()
                .any(|(c, r, v, _)| (*c, *r) == (client, request_id) && *v != vpsd)
            {
                count("same-request-id-other-vpsd-signed");
            }
            self.answered
                .insert((client, vpsd, request_id), (items, remembered));
        }
        self.model.insert(vpsd, model);
    }

    /// After every step: the engine's registers and state are the model's, and balance.
    fn check(&self) {
        for (id, model) in &self.model {
            let status = self.engine.status(self.now, *id).unwrap();
            assert_eq!(status.ascending_mills, model.ascending, "vPSD {id} AR");
            assert_eq!(status.descending_mills, model.descending, "vPSD {id} DR");
            assert_eq!(status.control_total_mills, model.control, "vPSD {id} CS");
            assert_eq!(status.piece_count, model.pieces, "vPSD {id} pieces");
            assert_eq!(
                status.ascending_mills + status.descending_mills,
                status.control_total_mills
            );
            let state = match (&model.state, self.overdue(model)) {
                (State::Active, false) => VpsdState::Active,
                (State::Active, true) => VpsdState::Locked(LockReason::ContactOverdue),
                (State::Locked, _) => {
                    VpsdState::Locked(LockReason::Operator("model says so".into()))
                }
                (State::Withdrawn, _) => VpsdState::Withdrawn,
            };
            assert_eq!(status.state, state, "vPSD {id} state");
            assert_eq!(status.provider_sequence, model.sequence);
        }
        for id in 1..=VPSDS {
            if !self.model.contains_key(&id) {
                assert!(self.engine.status(self.now, id).is_err());
            }
        }
    }
}

/// How often each outcome was seen across all sequences, so the test can show that it
/// reached every branch it claims to check.
static OUTCOMES: std::sync::Mutex<BTreeMap<String, u64>> = std::sync::Mutex::new(BTreeMap::new());

fn count(outcome: impl Into<String>) {
    *OUTCOMES.lock().unwrap().entry(outcome.into()).or_default() += 1;
}

#[test]
fn the_engine_behaves_like_the_model() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(3_000));
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            let mut harness = Harness::new();
            // Most sequences should get to sign: start with two funded vPSDs, one of each
            // algorithm.
            for (vpsd, ed25519) in [(1, false), (2, true)] {
                harness.run(&Op::Provision { vpsd, ed25519 });
                harness.run(&Op::Refill {
                    vpsd,
                    amount: 100_000,
                    kind: RefillKind::Valid,
                });
            }
            for op in &ops {
                harness.run(op);
                harness.check();
            }
            Ok(())
        })
        .unwrap();
    let outcomes = OUTCOMES.lock().unwrap();
    for expected in [
        "signed",
        "retry-answered",
        "request-id-reused",
        "same-request-id-other-vpsd-signed",
        "refill-retried",
        "insufficient-funds",
        "postage-out-of-range",
        "mailing-date-out-of-window",
        "vpsd-locked",
        "contact-overdue",
        "vpsd-withdrawn",
        "unknown-vpsd",
        "authorization-invalid",
        "authorization-replayed",
        "authorization-expired",
        "authorization-wrong-vpsd",
        "refilled",
        "withdrawn",
    ] {
        assert!(
            outcomes.get(expected).copied().unwrap_or(0) > 0,
            "no sequence reached `{expected}`: {outcomes:?}"
        );
    }
    assert!(
        outcomes["signed"] > 15_000,
        "too few indicia signed: {outcomes:?}"
    );
}
