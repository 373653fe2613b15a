//! The replicated half of a commit round, sans-io (store/replica.rs): what each round
//! writes and what its outcomes do to the vPSD, the pending records and the idempotency
//! window. (The same logic against a real etcd: tests/cluster.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{open, Workload, NOW};
use indicia_proto::{Algorithm, AuthorizationKind};
use indiciad::cluster::fence::Outcome;
use indiciad::engine::SignJob;
use indiciad::engine::{ClientTag, Record, ResetCause};
use indiciad::store::codec::decode_replica;
use indiciad::store::replica::{Owned, Settled};
use indiciad::store::Store;

fn provision(store: &mut Store, vpsd_id: u64) -> u64 {
    let record = store
        .engine
        .prepare_provision(
            NOW,
            vpsd_id,
            "owner",
            Algorithm::Ed25519,
            "02134".parse().unwrap(),
        )
        .unwrap();
    store.commit(record, NOW).unwrap()
}

fn refill(store: &mut Store, vpsd_id: u64, sequence: u64, amount: u64) -> u64 {
    let authorization = indicia_client::provider::authorize(
        &common::provider(),
        AuthorizationKind::Refill,
        vpsd_id,
        amount,
        sequence,
        NOW + 3600,
    );
    let prepared = store
        .engine
        .prepare_provider(NOW, ClientTag(9), 1000 + sequence, vpsd_id, &authorization)
        .unwrap();
    store.commit(prepared.record.unwrap(), NOW).unwrap()
}

fn sign(store: &mut Store, workload: &mut Workload, vpsd_id: u64, request_id: u64) -> u64 {
    let job = workload.sign_job(request_id, 1);
    let record = store
        .engine
        .prepare_session(NOW, vpsd_id, &[job])
        .record
        .unwrap();
    store.commit(Record::Session(record), NOW).unwrap()
}

fn written(revision: i64) -> Result<Vec<Outcome>, bool> {
    Ok(vec![Outcome::Written {
        revision,
        epoch: 10,
    }])
}

fn replicated_through(store: &Store) -> u64 {
    store.replica().unwrap().replicated_through()
}

#[test]
fn an_unknown_outcome_is_resent_as_it_was_and_never_voided_by_a_later_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    store.enable_replica("a1", 0);
    let mut workload = Workload::new(3, 1);

    let provisioned = provision(&mut store, 1);
    assert_eq!(replicated_through(&store), provisioned - 1);
    let first = store.replica_round().unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].epoch, 0, "the first write creates the owner key");
    assert!(first[0].keys.is_some(), "and carries the keys");
    assert!(store.settle(written(10)).is_empty());
    assert_eq!(replicated_through(&store), u64::MAX);

    let refilled = refill(&mut store, 1, 1, 50_000);
    let sent = store.replica_round().unwrap();
    assert_eq!((sent[0].epoch, sent[0].last), (10, 10));
    assert!(sent[0].keys.is_none(), "the keys did not change");
    // etcd did not answer: maybe applied, maybe not.
    assert!(store.settle(Err(false)).is_empty());
    assert_eq!(replicated_through(&store), refilled - 1);

    // A session meanwhile; the next round sends the same write again, not the new state.
    let signed = sign(&mut store, &mut workload, 1, 7);
    let again = store.replica_round().unwrap();
    assert_eq!(again, sent, "the unknown write is sent again as it was");
    // Refused now (no lease): the earlier attempt may be in etcd, so nothing is voided.
    assert!(store.settle(Err(true)).is_empty());
    assert_eq!(replicated_through(&store), refilled - 1);

    let again = store.replica_round().unwrap();
    assert_eq!(again, sent);
    assert!(store.settle(written(12)).is_empty());
    assert_eq!(
        replicated_through(&store),
        signed - 1,
        "the refill is in etcd; the session, which came after that write, is not"
    );
    let next = store.replica_round().unwrap();
    assert_ne!(next[0].state, sent[0].state, "the state with the session");
    assert_eq!(next[0].last, 12);
    assert!(store.settle(written(13)).is_empty());
    assert_eq!(replicated_through(&store), u64::MAX);
}

#[test]
fn a_refused_first_attempt_voids_the_records_and_their_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    store.enable_replica("a1", 0);
    let mut workload = Workload::new(4, 1);
    provision(&mut store, 1);
    store.replica_round().unwrap();
    store.settle(written(10));
    refill(&mut store, 1, 1, 50_000);
    store.replica_round().unwrap();
    store.settle(written(11));
    let before = store.engine.vpsd(1).unwrap().clone();

    let signed = sign(&mut store, &mut workload, 1, 7);
    assert!(store.engine.window().get(ClientTag(1), 1, 7).is_some());
    store.replica_round().unwrap();
    let settled = store.settle(Err(true));
    let [Settled::Refused {
        vpsd_id: 1,
        since,
        replicated: Some(replicated),
    }] = settled.as_slice()
    else {
        panic!("{settled:?}")
    };
    assert_eq!(*since, signed);
    assert_eq!(**replicated, before, "back to the state etcd holds");
    assert_eq!(replicated_through(&store), u64::MAX, "nothing pending");

    // The shard journals the void as a reset to that state: the session's answer is
    // forgotten, so a retry signs anew instead of handing out voided piece numbers.
    let owned = store.replica().unwrap().ownership(1).unwrap();
    assert_eq!(
        owned,
        Owned {
            epoch: 10,
            last: 11
        }
    );
    store
        .commit_reset(
            (**replicated).clone(),
            ResetCause::Voided {
                local_version: before.version + 1,
            },
            Vec::new(),
            &owned,
            NOW,
        )
        .unwrap();
    assert_eq!(store.engine.vpsd(1).unwrap(), &before);
    assert!(store.engine.window().get(ClientTag(1), 1, 7).is_none());
    assert_eq!(
        replicated_through(&store),
        u64::MAX,
        "a reset is not replicated"
    );
    store.flush().unwrap();
    drop(store);

    // Recovery replays the void the same way.
    let (store, report) = open(dir.path(), 1 << 20);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(store.engine.vpsd(1).unwrap(), &before);
    assert!(store.engine.window().get(ClientTag(1), 1, 7).is_none());
}

#[test]
fn a_fenced_write_moves_the_vpsd_and_a_refused_import_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    provision(&mut store, 1);
    provision(&mut store, 2);
    store.enable_replica("a1", 0);
    let last = store.last_sequence();
    store.replica_mut().unwrap().import(1, last);
    store.replica_mut().unwrap().import(2, last);
    let writes = store.replica_round().unwrap();
    assert_eq!(writes.len(), 2);
    let settled = store.settle(Ok(vec![
        Outcome::Refused,
        Outcome::Fenced {
            owner: Some("a2".into()),
        },
    ]));
    assert_eq!(
        settled,
        vec![Settled::Moved {
            vpsd_id: 2,
            since: last,
            owner: Some("a2".into())
        }]
    );
    assert!(store.replica().unwrap().owns(1), "an import is sent again");
    assert!(!store.replica().unwrap().owns(2));
    assert_eq!(store.replica_round().unwrap().len(), 1);
}

/// A retry after a takeover: the new owner knows the request from the state etcd holds
/// (without its indicia) and answers it with the original payloads, signed again (Ed25519:
/// the very same bytes), charging nothing.
#[test]
fn the_next_owner_answers_a_retry_with_the_original_indicia_and_charges_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut owner, _) = open(dir.path(), 1 << 20);
    owner.enable_replica("a1", 0);
    let mut workload = Workload::new(5, 1);
    provision(&mut owner, 1);
    refill(&mut owner, 1, 1, 500_000);
    let mut jobs: Vec<SignJob> = (0..3).map(|id| workload.sign_job(100 + id, 1)).collect();
    let extra = jobs[0].items[0];
    jobs[1].items.push(extra);
    jobs[1].items[1].postage_mills = 999_999_999; // refused: above the postage limit
    let prepared = owner.engine.prepare_session(NOW, 1, &jobs);
    let original = prepared.answers.clone();
    owner
        .commit(Record::Session(prepared.record.unwrap()), NOW)
        .unwrap();
    let writes = owner.replica_round().unwrap();
    let replicated = decode_replica(1, &writes[0].state, writes[0].keys.as_ref().unwrap()).unwrap();
    assert_eq!(replicated.vpsd, *owner.engine.vpsd(1).unwrap());
    assert_eq!(
        replicated.recent.len(),
        4,
        "the refill and the three signs are remembered with the state"
    );

    let other = tempfile::tempdir().unwrap();
    let (mut next, _) = open(other.path(), 1 << 20);
    next.enable_replica("a2", 0);
    next.commit_reset(
        replicated.vpsd.clone(),
        ResetCause::Adopted {
            from: "a1".into(),
            epoch: 10,
        },
        replicated.recent,
        &Owned {
            epoch: 20,
            last: 21,
        },
        NOW,
    )
    .unwrap();
    let retried = next.engine.prepare_session(NOW, 1, &jobs);
    assert!(retried.record.is_none(), "nothing is charged again");
    for (first, again) in original.iter().zip(&retried.answers) {
        let (first, again) = (first.as_ref().unwrap(), again.as_ref().unwrap());
        assert_eq!(first.len(), again.len());
        for (first, again) in first.iter().zip(again) {
            match (first, again) {
                (Ok(first), Ok(again)) => assert_eq!(first, again, "Ed25519: the same bytes"),
                (Err(first), Err(again)) => assert_eq!(first.code, again.code),
                other => panic!("{other:?}"),
            }
        }
    }
    // Another request id with the same items is a new request; a reused id with other
    // items is refused.
    let mut reused = jobs[0].clone();
    reused.items[0].postage_mills += 1;
    let answers = next.engine.prepare_session(NOW, 1, &[reused]).answers;
    assert!(matches!(
        answers[0],
        Err(indiciad::engine::EngineError::RequestIdReused { .. })
    ));
    drop(next);
    // Recovery remembers them the same way.
    let (next, _) = open(other.path(), 1 << 20);
    let retried_again = next.engine.prepare_session(NOW, 1, &jobs);
    assert!(retried_again.record.is_none());
    assert_eq!(retried_again.answers, retried.answers);
}
