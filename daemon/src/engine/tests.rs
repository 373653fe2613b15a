use std::sync::Arc;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use indicia_proto::{
    AuthorizationKind, ErrorCode, Indicium, LockReason, MailingDate, ProviderAuthorization,
    SignItem, Verdict, VpsdState,
};

use super::*;

const NOW: u64 = 1_795_996_800; // 2026-11-30T00:00:00Z
const CLIENT: ClientTag = ClientTag(77);

struct Fixture {
    engine: Engine,
    provider: Ed25519KeyPair,
    sequence: u64,
}

impl Fixture {
    fn new(config: EngineConfig) -> Self {
        let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap();
        let mut public = [0u8; 32];
        public.copy_from_slice(provider.public_key().as_ref());
        let master = MasterKey::new(&MasterKey::generate_bytes().unwrap()).unwrap();
        Self {
            engine: Engine::new(config, master, public),
            provider,
            sequence: 0,
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

    fn resign(&self, authorization: &mut ProviderAuthorization) {
        *authorization =
            indicia_client::provider::sign_authorization(&self.provider, *authorization);
    }

    fn provision(&mut self, vpsd_id: u64, algorithm: Algorithm) {
        let record = self
            .engine
            .prepare_provision(NOW, vpsd_id, "acme", algorithm, "02134".parse().unwrap())
            .unwrap();
        self.engine.commit(record);
    }

    fn refill(
        &mut self,
        vpsd_id: u64,
        amount_mills: u64,
        request_id: u64,
    ) -> Result<Prepared, EngineError> {
        let authorization = self.authorization(AuthorizationKind::Refill, vpsd_id, amount_mills);
        self.provider_request(request_id, vpsd_id, &authorization)
    }

    fn provider_request(
        &mut self,
        request_id: u64,
        vpsd_id: u64,
        authorization: &ProviderAuthorization,
    ) -> Result<Prepared, EngineError> {
        let prepared =
            self.engine
                .prepare_provider(NOW, CLIENT, request_id, vpsd_id, authorization)?;
        if let Some(record) = &prepared.record {
            self.engine.commit(record.clone());
        }
        Ok(prepared)
    }

    fn session(&mut self, now: u64, vpsd_id: u64, jobs: &[SignJob]) -> Vec<JobAnswer> {
        let prepared = self.engine.prepare_session(now, vpsd_id, jobs);
        if let Some(record) = prepared.record {
            self.engine.commit(Record::Session(record));
        }
        prepared.answers
    }

    fn registers(&self, vpsd_id: u64) -> Registers {
        self.engine.vpsd(vpsd_id).unwrap().registers
    }
}

fn item(postage_mills: u64) -> SignItem {
    SignItem {
        postage_mills,
        mailing_date: MailingDate::from_unix_seconds(NOW).unwrap(),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

fn job(request_id: u64, items: Vec<SignItem>) -> SignJob {
    SignJob {
        client: CLIENT,
        request_id,
        items,
    }
}

fn signed(answer: &JobAnswer) -> Vec<Indicium> {
    answer
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_ref().ok().copied())
        .collect()
}

fn funded(algorithm: Algorithm, mills: u64) -> Fixture {
    let mut fixture = Fixture::new(EngineConfig::default());
    fixture.provision(1, algorithm);
    fixture.refill(1, mills, 9_000).unwrap();
    fixture
}

#[test]
fn a_session_signs_contiguous_pieces_that_verify() {
    for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
        let mut f = funded(algorithm, 10_000);
        let answers = f.session(
            NOW,
            1,
            &[
                job(1, vec![item(730), item(1_000)]),
                job(2, vec![item(500)]),
            ],
        );
        let indicia: Vec<Indicium> = answers.iter().flat_map(signed).collect();
        assert_eq!(indicia.len(), 3);
        let (_, serial, _) = f.engine.public_key(1, None).unwrap();
        let key = &f.engine.vpsd(1).unwrap().key(serial).unwrap().public;
        let mut ascending = 0;
        for (index, indicium) in indicia.iter().enumerate() {
            // Decode what would go on the wire, then verify it.
            let decoded = Indicium::decode(indicium.to_bytes().as_ref()).unwrap();
            assert_eq!(decoded.payload.piece_number, index as u64 + 1);
            ascending += decoded.payload.postage_mills;
            assert_eq!(decoded.payload.ascending_mills, ascending);
            assert_eq!(decoded.payload.descending_mills, 10_000 - ascending);
            assert!(key.verify(decoded.payload.signed_bytes().as_ref(), &decoded.signature));
            assert_eq!(
                f.engine.verify(indicium.to_bytes().as_ref()).0,
                Verdict::Valid
            );
        }
        let registers = f.registers(1);
        assert_eq!(registers.ascending_mills, 2_230);
        assert_eq!(registers.descending_mills, 7_770);
        assert_eq!(registers.piece_count, 3);
        assert_eq!(
            f.engine.vpsd(1).unwrap().version,
            3,
            "provision, refill, one session"
        );
    }
}

#[test]
fn a_refused_item_does_not_stop_the_others() {
    let mut f = funded(Algorithm::EcdsaP256, 1_000);
    let mut late = item(100);
    late.mailing_date = MailingDate::from_days_since_2000(late.mailing_date.days_since_2000() + 31);
    let answers = f.session(
        NOW,
        1,
        &[job(1, vec![item(600), item(600), item(0), late, item(400)])],
    );
    let items = answers[0].as_ref().unwrap();
    let codes: Vec<Option<ErrorCode>> = items
        .iter()
        .map(|a| a.as_ref().err().map(|e| e.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(ErrorCode::InsufficientFunds),
            Some(ErrorCode::PostageOutOfRange),
            Some(ErrorCode::MailingDateOutOfWindow),
            None
        ]
    );
    assert_eq!(f.registers(1).descending_mills, 0);
    assert_eq!(f.registers(1).piece_count, 2);
}

#[test]
fn a_session_that_cannot_unseal_applies_nothing() {
    let mut f = funded(Algorithm::EcdsaP256, 1_000);
    let before = f.engine.vpsd(1).unwrap().clone();
    // Corrupt the sealed key in place, as a damaged record would.
    let vpsd = f.engine.vpsds.get_mut(&1).unwrap();
    let mut keys = vpsd.keys.to_vec();
    keys[0].sealed.as_mut().unwrap().0[30] ^= 0x01;
    vpsd.keys = keys.into();
    let prepared =
        f.engine
            .prepare_session(NOW, 1, &[job(1, vec![item(100)]), job(2, vec![item(100)])]);
    assert!(prepared.record.is_none());
    for answer in &prepared.answers {
        assert_eq!(
            answer.as_ref().unwrap_err().code(),
            ErrorCode::IntegrityFault
        );
    }
    assert_eq!(f.engine.vpsd(1).unwrap().registers, before.registers);
    assert_eq!(f.engine.vpsd(1).unwrap().version, before.version);
    assert!(f.engine.window().get(CLIENT, 1, 1).is_none());
}

#[test]
fn refills_need_a_valid_fresh_authorization_for_this_vpsd() {
    let mut f = Fixture::new(EngineConfig::default());
    f.provision(1, Algorithm::Ed25519);
    f.provision(2, Algorithm::Ed25519);
    let good = f.authorization(AuthorizationKind::Refill, 1, 5_000);

    let mut forged = good;
    forged.amount_mills = 50_000;
    assert_eq!(
        f.provider_request(1, 1, &forged).unwrap_err(),
        EngineError::AuthorizationInvalid
    );
    assert!(matches!(
        f.provider_request(2, 2, &good),
        Err(EngineError::AuthorizationWrongVpsd {
            authorized: 1,
            requested: 2
        })
    ));
    // Without the provider's signature nobody learns which vPSDs exist: a forgery for a
    // vPSD that does not exist gets the same answer as one for a vPSD that does.
    let mut forged_for_nobody = f.authorization(AuthorizationKind::Refill, 77, 5_000);
    forged_for_nobody.amount_mills += 1;
    assert_eq!(
        f.provider_request(20, 77, &forged_for_nobody).unwrap_err(),
        EngineError::AuthorizationInvalid
    );
    let genuine_for_nobody = f.authorization(AuthorizationKind::Refill, 77, 5_000);
    assert!(matches!(
        f.provider_request(21, 77, &genuine_for_nobody),
        Err(EngineError::UnknownVpsd { vpsd_id: 77 })
    ));
    let mut expired = f.authorization(AuthorizationKind::Refill, 1, 5_000);
    expired.expires_unix = NOW - 1;
    f.resign(&mut expired);
    assert!(matches!(
        f.provider_request(3, 1, &expired),
        Err(EngineError::AuthorizationExpired { .. })
    ));
    assert_eq!(
        f.registers(1).descending_mills,
        0,
        "nothing credited so far"
    );

    f.provider_request(4, 1, &good).unwrap();
    assert_eq!(f.registers(1).descending_mills, 5_000);
    assert_eq!(f.registers(1).control_total_mills, 5_000);
    // The same authorization under a new request id is a replay.
    assert!(matches!(
        f.provider_request(5, 1, &good),
        Err(EngineError::AuthorizationReplayed {
            sequence: 1,
            last_sequence: 1
        })
    ));
    // The same request retried is answered without a second credit.
    assert_eq!(f.provider_request(4, 1, &good).unwrap().record, None);
    assert_eq!(f.registers(1).descending_mills, 5_000);

    let huge = f.authorization(AuthorizationKind::Refill, 1, u64::MAX);
    assert_eq!(
        f.provider_request(6, 1, &huge).unwrap_err(),
        EngineError::RegisterOverflow
    );
    assert_eq!(f.registers(1).control_total_mills, 5_000);
}

#[test]
fn the_watchdog_locks_until_provider_contact() {
    let mut f = funded(Algorithm::EcdsaP256, 10_000);
    let late = NOW + 91 * DAY_SECONDS;
    let mut late_item = item(100);
    late_item.mailing_date = MailingDate::from_unix_seconds(late).unwrap();
    let answers = f.session(late, 1, &[job(1, vec![late_item])]);
    assert_eq!(
        answers[0].as_ref().unwrap_err().code(),
        ErrorCode::VpsdLocked
    );
    assert_eq!(
        f.engine.status(late, 1).unwrap().state,
        VpsdState::Locked(LockReason::ContactOverdue)
    );
    // Still fine at exactly 90 days.
    assert_eq!(
        f.engine.status(NOW + 90 * DAY_SECONDS, 1).unwrap().state,
        VpsdState::Active
    );

    let contact = f.authorization(AuthorizationKind::Contact, 1, 0);
    let mut contact_late = contact;
    contact_late.expires_unix = late + 60;
    f.resign(&mut contact_late);
    let prepared = f
        .engine
        .prepare_provider(late, CLIENT, 50, 1, &contact_late)
        .unwrap();
    f.engine.commit(prepared.record.unwrap());
    assert_eq!(f.engine.status(late, 1).unwrap().state, VpsdState::Active);
    let answers = f.session(late, 1, &[job(1, vec![late_item])]);
    assert_eq!(signed(&answers[0]).len(), 1);
}

#[test]
fn a_retry_gets_the_original_answer_and_is_charged_once() {
    let mut f = funded(Algorithm::EcdsaP256, 10_000);
    let first = f.session(NOW, 1, &[job(7, vec![item(300), item(20_000)])]);
    let retry = f.session(NOW, 1, &[job(7, vec![item(300), item(20_000)])]);
    assert_eq!(
        signed(&first[0]),
        signed(&retry[0]),
        "same indicium, same signature"
    );
    assert_eq!(
        retry[0].as_ref().unwrap()[1].as_ref().unwrap_err().code,
        ErrorCode::InsufficientFunds
    );
    assert_eq!(f.registers(1).ascending_mills, 300);
    // Same id, other content.
    let reused = f.session(NOW, 1, &[job(7, vec![item(301)])]);
    assert_eq!(
        reused[0].as_ref().unwrap_err().code(),
        ErrorCode::RequestIdReused
    );
    // Another client may use the same request id.
    let other = f.session(
        NOW,
        1,
        &[SignJob {
            client: ClientTag(78),
            request_id: 7,
            items: vec![item(300)],
        }],
    );
    assert_eq!(signed(&other[0]).len(), 1);
    // A duplicate inside one session is answered once and charged once.
    let both = f.session(NOW, 1, &[job(8, vec![item(10)]), job(8, vec![item(10)])]);
    assert_eq!(signed(&both[0]), signed(&both[1]));
    assert_eq!(f.registers(1).ascending_mills, 610);
    assert_eq!(f.registers(1).piece_count, 3);
}

#[test]
fn a_request_refused_as_a_whole_may_be_retried_later() {
    let mut f = funded(Algorithm::Ed25519, 100);
    let answers = f.session(NOW, 1, &[job(3, vec![item(500)])]);
    assert_eq!(signed(&answers[0]).len(), 0);
    f.refill(1, 1_000, 9_001).unwrap();
    let answers = f.session(NOW, 1, &[job(3, vec![item(500)])]);
    assert_eq!(signed(&answers[0]).len(), 1);
}

#[test]
fn lock_unlock_withdraw_and_rotate() {
    let mut f = funded(Algorithm::EcdsaP256, 10_000);
    let before_rotation = signed(&f.session(NOW, 1, &[job(1, vec![item(100)])])[0])[0];

    let record = f.engine.prepare_lock(NOW, 1, "audit").unwrap();
    f.engine.commit(record);
    let answers = f.session(NOW, 1, &[job(2, vec![item(100)])]);
    assert_eq!(
        answers[0].as_ref().unwrap_err().code(),
        ErrorCode::VpsdLocked
    );
    let record = f.engine.prepare_unlock(NOW, 1).unwrap().unwrap();
    f.engine.commit(record);
    assert_eq!(
        f.engine.prepare_unlock(NOW, 1).unwrap(),
        None,
        "unlocking an active vPSD is a no-op"
    );

    let record = f.engine.prepare_rotate_key(NOW, 1).unwrap();
    f.engine.commit(record);
    let after_rotation = signed(&f.session(NOW, 1, &[job(3, vec![item(100)])])[0])[0];
    assert_eq!(before_rotation.payload.key_serial, 1);
    assert_eq!(after_rotation.payload.key_serial, 2);
    assert_eq!(
        f.engine.verify(before_rotation.to_bytes().as_ref()).0,
        Verdict::Valid
    );
    assert_eq!(
        f.engine.verify(after_rotation.to_bytes().as_ref()).0,
        Verdict::Valid
    );
    assert_eq!(f.engine.public_key(1, Some(1)).unwrap().1, 1);
    assert_eq!(f.engine.public_key(1, None).unwrap().1, 2);

    let record = f.engine.prepare_withdraw(NOW, 1).unwrap();
    let Record::Withdraw { refund_mills, .. } = record else {
        panic!("withdraw record expected");
    };
    assert_eq!(refund_mills, 9_800);
    f.engine.commit(record);
    let registers = f.registers(1);
    assert_eq!(
        (registers.descending_mills, registers.control_total_mills),
        (0, 200)
    );
    let answers = f.session(NOW, 1, &[job(4, vec![item(100)])]);
    assert_eq!(
        answers[0].as_ref().unwrap_err().code(),
        ErrorCode::VpsdWithdrawn
    );
    assert!(matches!(
        f.refill(1, 100, 9_002),
        Err(EngineError::Withdrawn { .. })
    ));
    assert!(matches!(
        f.engine.prepare_withdraw(NOW, 1),
        Err(EngineError::Withdrawn { .. })
    ));
    // Old indicia still verify after withdrawal.
    assert_eq!(
        f.engine.verify(after_rotation.to_bytes().as_ref()).0,
        Verdict::Valid
    );
}

/// Keys per vPSD are bounded: a rotation past `keys_per_vpsd_max` is refused with a typed
/// error before anything changes (it used to add keys until a checkpoint could not encode
/// them and the process aborted on every start).
#[test]
fn a_rotation_past_the_key_limit_is_refused_and_changes_nothing() {
    let mut f = Fixture::new(EngineConfig {
        keys_per_vpsd_max: 4,
        ..EngineConfig::default()
    });
    f.provision(1, Algorithm::Ed25519);
    for _ in 0..3 {
        let record = f.engine.prepare_rotate_key(NOW, 1).unwrap();
        f.engine.commit(record);
    }
    let before = f.engine.vpsd(1).unwrap().clone();
    assert_eq!(before.keys.len(), 4);
    let err = f.engine.prepare_rotate_key(NOW, 1).unwrap_err();
    assert_eq!(
        err,
        EngineError::KeyLimit {
            vpsd_id: 1,
            keys_max: 4
        }
    );
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(err.to_string().contains("keys_per_vpsd_max"), "{err}");
    assert_eq!(f.engine.vpsd(1).unwrap(), &before);
}

/// A session's successor state shares the vPSD's keys instead of copying them, so its cost
/// does not grow with the number of old keys.
#[test]
fn a_session_shares_the_keys_of_its_vpsd() {
    let mut f = funded(Algorithm::Ed25519, 10_000);
    for _ in 0..50 {
        let record = f.engine.prepare_rotate_key(NOW, 1).unwrap();
        f.engine.commit(record);
    }
    let prepared = f.engine.prepare_session(NOW, 1, &[job(1, vec![item(100)])]);
    let record = Record::Session(prepared.record.unwrap());
    let next = f.engine.successor(&record).unwrap();
    let vpsd = f.engine.vpsd(1).unwrap();
    assert_eq!(next.keys.len(), 51);
    assert!(std::sync::Arc::ptr_eq(&next.keys, &vpsd.keys));
}

#[test]
fn verify_tells_forgeries_and_unissued_pieces() {
    let mut f = funded(Algorithm::Ed25519, 1_000);
    let indicium = signed(&f.session(NOW, 1, &[job(1, vec![item(100)])])[0])[0];
    let mut forged = indicium;
    forged.payload.postage_mills = 1;
    assert_eq!(
        f.engine.verify(forged.to_bytes().as_ref()).0,
        Verdict::BadSignature
    );
    let mut other_vpsd = indicium;
    other_vpsd.payload.vpsd_id = 99;
    assert_eq!(
        f.engine.verify(other_vpsd.to_bytes().as_ref()).0,
        Verdict::UnknownKey
    );
    // The key exists but is of another algorithm: not unknown, a bad signature
    // (docs/INDICIUM.md section 3).
    let mut other_algorithm = indicium;
    other_algorithm.payload.algorithm = Algorithm::EcdsaP256;
    assert_eq!(
        f.engine.verify(other_algorithm.to_bytes().as_ref()).0,
        Verdict::BadSignature
    );
    let mut other_serial = indicium;
    other_serial.payload.key_serial = 2;
    assert_eq!(
        f.engine.verify(other_serial.to_bytes().as_ref()).0,
        Verdict::UnknownKey
    );
    assert_eq!(f.engine.verify(&[1, 2, 3]).0, Verdict::Malformed);
}

#[test]
fn records_apply_only_in_order() {
    let mut f = funded(Algorithm::Ed25519, 1_000);
    let prepared = f.engine.prepare_session(NOW, 1, &[job(1, vec![item(100)])]);
    let record = Record::Session(prepared.record.unwrap());
    f.engine.commit(record.clone());
    // The same record again: its version no longer follows.
    assert!(matches!(
        f.engine.apply(&record),
        Err(ApplyError::Version { .. })
    ));
    // A record whose registers do not add up is refused and changes nothing.
    let prepared = f.engine.prepare_session(NOW, 1, &[job(2, vec![item(100)])]);
    let mut session = prepared.record.unwrap();
    session.after.ascending_mills += 1;
    session.after.control_total_mills += 1;
    let before = f.engine.vpsd(1).unwrap().clone();
    assert!(matches!(
        f.engine.apply(&Record::Session(session)),
        Err(ApplyError::Session { .. })
    ));
    assert_eq!(f.engine.vpsd(1).unwrap(), &before);
    assert!(f.engine.window().get(CLIENT, 1, 2).is_none());
}

#[test]
fn provision_refuses_duplicates_and_capacity() {
    let mut f = Fixture::new(EngineConfig {
        vpsds_max: 1,
        ..EngineConfig::default()
    });
    f.provision(1, Algorithm::EcdsaP256);
    let zip = "02134".parse().unwrap();
    assert_eq!(
        f.engine
            .prepare_provision(NOW, 1, "x", Algorithm::EcdsaP256, zip)
            .unwrap_err(),
        EngineError::VpsdExists { vpsd_id: 1 }
    );
    assert!(matches!(
        f.engine
            .prepare_provision(NOW, 2, "x", Algorithm::EcdsaP256, zip),
        Err(EngineError::Capacity { .. })
    ));
    assert_eq!(
        f.session(NOW, 5, &[job(1, vec![item(1)])])[0]
            .as_ref()
            .unwrap_err()
            .code(),
        ErrorCode::UnknownVpsd
    );
}

#[test]
fn loaded_keys_are_kept_between_sessions_and_dropped_when_they_change() {
    let mut f = funded(Algorithm::EcdsaP256, 10_000);
    assert_eq!(
        f.engine.keys.borrow().len(),
        0,
        "nothing loaded before a session"
    );
    let first = signed(&f.session(NOW, 1, &[job(1, vec![item(100)])])[0])[0];
    assert_eq!(f.engine.keys.borrow().len(), 1);
    let public = f.engine.vpsd(1).unwrap().current_key().public.bytes.clone();
    let cached = f.engine.keys.borrow_mut().get(1, 1, &public).unwrap();
    // The next session signs with the very key object the first one loaded.
    let second = signed(&f.session(NOW, 1, &[job(2, vec![item(100)])])[0])[0];
    let again = f.engine.keys.borrow_mut().get(1, 1, &public).unwrap();
    assert!(Arc::ptr_eq(&cached, &again));
    assert_eq!(second.payload.piece_number, first.payload.piece_number + 1);
    // Another public key for the same serial is not this key (and it is dropped: a
    // lookup only ever asks for the vPSD's current key).
    assert!(f.engine.keys.borrow_mut().get(1, 1, &[0u8; 65]).is_none());
    assert_eq!(f.engine.keys.borrow().len(), 0);
    let second = signed(&f.session(NOW, 1, &[job(3, vec![item(100)])])[0])[0];
    assert_eq!(
        f.engine.verify(second.to_bytes().as_ref()).0,
        Verdict::Valid
    );

    // A rotation: the next session loads the new key; the old one is gone.
    let record = f.engine.prepare_rotate_key(NOW, 1).unwrap();
    f.engine.commit(record);
    let rotated = signed(&f.session(NOW, 1, &[job(4, vec![item(100)])])[0])[0];
    assert_eq!(rotated.payload.key_serial, 2);
    assert_eq!(
        f.engine.verify(rotated.to_bytes().as_ref()).0,
        Verdict::Valid
    );
    assert_eq!(f.engine.keys.borrow().len(), 1);
    let public_2 = f.engine.vpsd(1).unwrap().current_key().public.bytes.clone();
    assert!(f.engine.keys.borrow_mut().get(1, 2, &public_2).is_some());
    assert!(f.engine.keys.borrow_mut().get(1, 1, &public).is_none());

    // A withdrawal drops it.
    let record = f.engine.prepare_withdraw(NOW, 1).unwrap();
    f.engine.commit(record);
    assert_eq!(f.engine.keys.borrow().len(), 0);

    // Bounded: with room for 2 keys, 3 vPSDs keep 2 loaded; with 0, none stays.
    for (capacity, kept) in [(2, 2), (0, 0)] {
        let mut f = Fixture::new(EngineConfig {
            key_cache_keys: capacity,
            ..EngineConfig::default()
        });
        for vpsd in 1..=3 {
            f.provision(vpsd, Algorithm::Ed25519);
            f.refill(vpsd, 1_000, 9_000 + vpsd).unwrap();
            let indicium = signed(&f.session(NOW, vpsd, &[job(vpsd, vec![item(100)])])[0])[0];
            assert_eq!(
                f.engine.verify(indicium.to_bytes().as_ref()).0,
                Verdict::Valid
            );
        }
        assert_eq!(f.engine.keys.borrow().len(), kept);
    }
}
