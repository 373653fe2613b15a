//! A shard's request handling on a real journal: answers leave only after the flush that
//! makes them durable, sign requests coalesce into sessions, retries are answered once,
//! a full queue answers busy, and a failed flush is fatal.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use common::{open, NOW};
use indicia_client::provider::authorize;
use indicia_proto::{
    Algorithm, AuthorizationKind, ErrorCode, Indicium, ItemResult, MailingDate, Request, Response,
    Role, SignItem, Verdict,
};
use indiciad::server::handshake::ClientEntry;
use indiciad::server::shard::{Arrival, ShardCore};
use zeroize::Zeroizing;

fn admin() -> Arc<ClientEntry> {
    Arc::new(ClientEntry::new(
        "admin",
        Zeroizing::new([9; 32]),
        Role::Admin,
        [],
    ))
}

fn user(id: &str) -> Arc<ClientEntry> {
    Arc::new(ClientEntry::new(
        id,
        Zeroizing::new([7; 32]),
        Role::User,
        [1],
    ))
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

/// Flushes and returns what became ready.
fn flush(shard: &mut ShardCore<u64>) -> Vec<(u64, Response)> {
    if let Some(ticket) = shard.flush_ticket() {
        let result = ticket.execute();
        shard.complete(&ticket, result).unwrap();
    }
    let mut ready = shard.take_ready();
    ready.sort_by_key(|(reply, _)| *reply);
    ready
}

/// One turn of the shard's loop for one request: handle, run sessions, flush.
fn round(
    shard: &mut ShardCore<u64>,
    client: &Arc<ClientEntry>,
    request_id: u64,
    request: Request,
    reply: u64,
) -> Vec<(u64, Response)> {
    shard
        .handle(NOW, client, request_id, request, reply, Arrival::Here)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    flush(shard)
}

/// A shard with vPSD 1 provisioned and funded.
fn funded(dir: &std::path::Path) -> ShardCore<u64> {
    let (store, _) = open(dir, 1 << 20);
    let mut shard = ShardCore::new(store, 10_000);
    let request = Request::Provision {
        vpsd_id: 1,
        owner: "acme".into(),
        algorithm: Algorithm::EcdsaP256,
        origin_zip: "02134".parse().unwrap(),
    };
    shard
        .handle(NOW, &admin(), 1, request, 0, Arrival::Here)
        .unwrap();
    let authorization = authorize(
        &common::provider(),
        AuthorizationKind::Refill,
        1,
        1_000_000,
        1,
        NOW + 600,
    );
    shard
        .handle(
            NOW,
            &admin(),
            2,
            Request::Refill {
                vpsd_id: 1,
                authorization,
            },
            0,
            Arrival::Here,
        )
        .unwrap();
    flush(&mut shard);
    shard
}

#[test]
fn no_answer_leaves_before_its_record_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 1 << 20);
    let mut shard: ShardCore<u64> = ShardCore::new(store, 10_000);
    let request = Request::Provision {
        vpsd_id: 5,
        owner: "acme".into(),
        algorithm: Algorithm::Ed25519,
        origin_zip: "02134".parse().unwrap(),
    };
    shard
        .handle(NOW, &admin(), 1, request, 77, Arrival::Here)
        .unwrap();
    // A read behind it waits too: it would show state that is not durable yet.
    shard
        .handle(
            NOW,
            &admin(),
            2,
            Request::Status { vpsd_id: 5 },
            78,
            Arrival::Here,
        )
        .unwrap();
    assert!(shard.take_ready().is_empty(), "answered before the flush");
    let ready = flush(&mut shard);
    assert_eq!(ready.len(), 2);
    assert!(matches!(&ready[0], (77, Response::VpsdStatus(status)) if status.vpsd_id == 5));
    assert!(matches!(&ready[1], (78, Response::VpsdStatus(_))));
    // Nothing pending: a read is answered at once.
    shard
        .handle(
            NOW,
            &admin(),
            3,
            Request::Status { vpsd_id: 5 },
            79,
            Arrival::Here,
        )
        .unwrap();
    assert_eq!(shard.take_ready().len(), 1);
}

#[test]
fn sign_requests_from_many_users_coalesce_into_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = funded(dir.path());
    let sessions_before = shard.stats().sessions;
    for n in 0..40u64 {
        let request = Request::Sign {
            vpsd_id: 1,
            item: item(730),
        };
        shard
            .handle(
                NOW,
                &user(&format!("user-{n}")),
                100,
                request,
                n,
                Arrival::Here,
            )
            .unwrap();
    }
    assert!(shard.take_ready().is_empty(), "signs wait for a session");
    shard.run_sessions(NOW).unwrap();
    assert_eq!(
        shard.stats().sessions - sessions_before,
        1,
        "one session for 40 requests"
    );
    assert!(shard.take_ready().is_empty(), "answered before the flush");
    let ready = flush(&mut shard);
    assert_eq!(ready.len(), 40);
    let mut pieces = Vec::new();
    for (_, response) in &ready {
        let Response::Signed { indicium } = response else {
            panic!("signed expected, got {response:?}");
        };
        let bytes = indicium.to_bytes();
        assert_eq!(
            shard.store().engine.verify(bytes.as_ref()).0,
            Verdict::Valid
        );
        pieces.push(
            Indicium::decode(bytes.as_ref())
                .unwrap()
                .payload
                .piece_number,
        );
    }
    pieces.sort_unstable();
    assert_eq!(pieces, (1..=40).collect::<Vec<u64>>());
    let status = shard.store().engine.status(NOW, 1).unwrap();
    assert_eq!(status.ascending_mills, 40 * 730);
}

#[test]
fn a_retry_is_answered_with_the_original_and_charged_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = funded(dir.path());
    let station = user("station-1");
    let first = round(
        &mut shard,
        &station,
        42,
        Request::Sign {
            vpsd_id: 1,
            item: item(500),
        },
        1,
    );
    let retry = round(
        &mut shard,
        &station,
        42,
        Request::Sign {
            vpsd_id: 1,
            item: item(500),
        },
        2,
    );
    assert_eq!(
        first[0].1, retry[0].1,
        "the same indicium, signature and all"
    );
    assert_eq!(
        shard.store().engine.status(NOW, 1).unwrap().ascending_mills,
        500
    );
    let reused = round(
        &mut shard,
        &station,
        42,
        Request::Sign {
            vpsd_id: 1,
            item: item(501),
        },
        3,
    );
    assert!(
        matches!(&reused[0].1, Response::Error(body) if body.code == ErrorCode::RequestIdReused)
    );
}

#[test]
fn a_batch_gets_one_result_per_item() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = funded(dir.path());
    let request = Request::SignBatch {
        vpsd_id: 1,
        items: vec![item(100), item(0), item(200)],
    };
    let ready = round(&mut shard, &user("station-2"), 7, request, 1);
    let Response::BatchSigned { results } = &ready[0].1 else {
        panic!("batch-signed expected");
    };
    assert!(matches!(results[0], ItemResult::Signed(_)));
    assert!(
        matches!(&results[1], ItemResult::Failed(body) if body.code == ErrorCode::PostageOutOfRange)
    );
    assert!(matches!(results[2], ItemResult::Signed(_)));
}

#[test]
fn a_full_queue_answers_busy_and_charges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 1 << 20);
    let mut shard: ShardCore<u64> = ShardCore::new(store, 2);
    for n in 0..3u64 {
        shard
            .handle(
                NOW,
                &user("station-3"),
                n,
                Request::Sign {
                    vpsd_id: 1,
                    item: item(1),
                },
                n,
                Arrival::Here,
            )
            .unwrap();
    }
    let ready = flush(&mut shard);
    assert_eq!(ready.len(), 1);
    assert!(matches!(&ready[0], (2, Response::Error(body)) if body.code == ErrorCode::Busy));
    assert_eq!(shard.stats().busy, 1);
}

#[test]
fn a_failed_flush_is_fatal_and_releases_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = funded(dir.path());
    shard
        .handle(
            NOW,
            &user("station-4"),
            1,
            Request::Sign {
                vpsd_id: 1,
                item: item(10),
            },
            1,
            Arrival::Here,
        )
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    let ticket = shard.flush_ticket().unwrap();
    assert!(shard
        .complete(&ticket, Err(std::io::Error::other("EIO")))
        .is_err());
    assert!(
        shard.take_ready().is_empty(),
        "nothing acknowledged after a failed flush"
    );
}

#[test]
fn a_vpsd_takes_its_next_session_only_once_the_last_one_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = funded(dir.path());
    let sessions_before = shard.stats().sessions;
    let sign = |shard: &mut ShardCore<u64>, n: u64| {
        let request = Request::Sign {
            vpsd_id: 1,
            item: item(100),
        };
        shard
            .handle(
                NOW,
                &user(&format!("user-{n}")),
                500 + n,
                request,
                n,
                Arrival::Here,
            )
            .unwrap();
    };
    sign(&mut shard, 0);
    shard.run_sessions(NOW).unwrap();
    assert_eq!(shard.stats().sessions - sessions_before, 1);
    // While the first session's record is not durable, what arrives waits for it.
    let ticket = shard.flush_ticket().unwrap();
    for n in 1..=5 {
        sign(&mut shard, n);
        shard.run_sessions(NOW).unwrap();
    }
    assert_eq!(
        shard.stats().sessions - sessions_before,
        1,
        "no second session before the first is durable"
    );
    let result = ticket.execute();
    shard.complete(&ticket, result).unwrap();
    assert_eq!(
        shard.take_ready().len(),
        1,
        "the first answer, once durable"
    );
    assert!(shard.has_sessions());
    shard.run_sessions(NOW).unwrap();
    assert_eq!(
        shard.stats().sessions - sessions_before,
        2,
        "the five that waited share one session"
    );
    assert_eq!(flush(&mut shard).len(), 5);
    assert_eq!(
        shard.store().engine.vpsd(1).unwrap().registers.piece_count,
        6
    );
}

#[test]
fn a_signing_key_that_does_not_unseal_locks_its_vpsd() {
    let dir = tempfile::tempdir().unwrap();
    let shard = funded(dir.path());
    drop(shard);
    // The same journal, with the sealed key altered in the recovered state (as a damaged
    // key record that still passed every check would leave it).
    let (mut store, _) = open(dir.path(), 1 << 20);
    let mut checkpoint = store.engine.checkpoint();
    let mut keys = checkpoint.vpsds[0].keys.to_vec();
    keys[0].sealed.as_mut().unwrap().0[20] ^= 0x01;
    checkpoint.vpsds[0].keys = keys.into();
    store.engine.restore(checkpoint);
    let mut shard = ShardCore::new(store, 10_000);
    let ready = round(
        &mut shard,
        &admin(),
        10,
        Request::Sign {
            vpsd_id: 1,
            item: item(730),
        },
        1,
    );
    assert!(
        matches!(&ready[0], (1, Response::Error(body)) if body.code == ErrorCode::IntegrityFault),
        "{ready:?}"
    );
    let ready = round(&mut shard, &admin(), 11, Request::Status { vpsd_id: 1 }, 2);
    let Response::VpsdStatus(status) = &ready[0].1 else {
        panic!("{ready:?}")
    };
    assert!(
        matches!(&status.state, indicia_proto::VpsdState::Locked(indicia_proto::LockReason::Integrity(reason)) if reason.starts_with("signing key:")),
        "{status:?}"
    );
    assert_eq!(status.piece_count, 0, "nothing was charged");
}

/// One commit round in cluster mode (sans-io): the local flush, and etcd's outcomes as
/// given (None: the writes stay in flight, as if etcd had not answered yet).
fn cluster_round(
    shard: &mut ShardCore<u64>,
    outcomes: Option<Vec<indiciad::cluster::fence::Outcome>>,
) -> Vec<indiciad::cluster::fence::StateWrite> {
    let round = shard.round().unwrap().unwrap();
    let writes = round.writes.clone();
    let result = round
        .ticket
        .as_ref()
        .map_or(Ok(()), |ticket| ticket.execute());
    if let Some(outcomes) = outcomes {
        shard
            .complete_round(NOW, round.ticket.as_ref(), result, Some(Ok(outcomes)))
            .unwrap();
    } else if let Some(ticket) = &round.ticket {
        shard.complete(ticket, result).unwrap();
    }
    writes
}

/// A vPSD taken back from another appliance while this shard still held records of it that
/// etcd never got (it lost etcd, and was taken over meanwhile): those records are void, and
/// the answers waiting on them leave as `vpsd-moved`, never as the indicia they carried;
/// the vPSD goes on from the other appliance's state.
#[test]
fn a_takeover_voids_what_the_shard_held_of_the_vpsd_and_etcd_never_got() {
    use indiciad::cluster::fence::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let (mut store, _) = open(dir.path(), 1 << 20);
    store.enable_replica("a1", 0);
    let mut shard: ShardCore<u64> = ShardCore::with_replicator(store, 10_000, None);
    let provision = Request::Provision {
        vpsd_id: 1,
        owner: "acme".into(),
        algorithm: Algorithm::Ed25519,
        origin_zip: "02134".parse().unwrap(),
    };
    shard
        .handle(NOW, &admin(), 1, provision, 0, Arrival::Here)
        .unwrap();
    let first = cluster_round(
        &mut shard,
        Some(vec![Outcome::Written {
            revision: 10,
            epoch: 10,
        }]),
    );
    assert_eq!(first.len(), 1);
    assert!(matches!(
        &shard.take_ready()[..],
        [(0, Response::VpsdStatus(_))]
    ));
    let authorization = authorize(
        &common::provider(),
        AuthorizationKind::Refill,
        1,
        1_000_000,
        1,
        NOW + 600,
    );
    let refill = Request::Refill {
        vpsd_id: 1,
        authorization,
    };
    shard
        .handle(NOW, &admin(), 2, refill, 0, Arrival::Here)
        .unwrap();
    let funded = cluster_round(
        &mut shard,
        Some(vec![Outcome::Written {
            revision: 11,
            epoch: 10,
        }]),
    );
    shard.take_ready();

    // A session whose write never gets an answer: its indicium waits.
    shard
        .handle(
            NOW,
            &user("u1"),
            7,
            Request::Sign {
                vpsd_id: 1,
                item: item(500),
            },
            70,
            Arrival::Here,
        )
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    cluster_round(&mut shard, None);
    assert!(shard.take_ready().is_empty(), "answered before etcd had it");

    // Taken back from a2, which held it at the funded state (version 2, no piece yet).
    let adoption = indiciad::cluster::Adoption {
        vpsd_id: 1,
        epoch: 30,
        state: (funded[0].state.clone(), 31),
        keys: first[0].keys.clone().unwrap(),
        from: "a2".into(),
    };
    shard.adopt(NOW, adoption).unwrap();
    // etcd's late answer to the stale write: fenced (the owner key moved twice since).
    shard
        .complete_round(
            NOW,
            None,
            Ok(()),
            Some(Ok(vec![Outcome::Fenced {
                owner: Some("a2".into()),
            }])),
        )
        .unwrap();
    let round = shard.round().unwrap().unwrap();
    let result = round.ticket.as_ref().unwrap().execute();
    shard
        .complete_round(NOW, round.ticket.as_ref(), result, None)
        .unwrap();
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(70, Response::Error(body))] if body.code == ErrorCode::VpsdMoved),
        "{ready:?} awaiting {} durable {} acknowledged {} last {}",
        shard.awaiting(),
        shard.store().durable_sequence(),
        shard.store().acknowledged_sequence(),
        shard.store().last_sequence()
    );
    assert_eq!(
        shard.store().engine.vpsd(1).unwrap().registers.piece_count,
        0
    );
    // Served again from a2's state: the next piece is 1, and the retry of the voided
    // request is carried out afresh, once.
    shard
        .handle(
            NOW,
            &user("u1"),
            7,
            Request::Sign {
                vpsd_id: 1,
                item: item(500),
            },
            71,
            Arrival::Here,
        )
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    cluster_round(
        &mut shard,
        Some(vec![Outcome::Written {
            revision: 32,
            epoch: 30,
        }]),
    );
    let ready = shard.take_ready();
    let [(71, Response::Signed { indicium })] = &ready[..] else {
        panic!("{ready:?}")
    };
    assert_eq!(indicium.payload.piece_number, 1);
}

/// etcd as a shard sees it, for the sans-io tests of routing and moves: this appliance is
/// `a1`, and it may commit while the test says so. Nothing here reaches a network; the
/// futures the runtime would await are never polled by these tests.
#[derive(Debug)]
struct FakeEtcd {
    committing: std::sync::atomic::AtomicBool,
}

impl FakeEtcd {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            committing: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn set_committing(&self, committing: bool) {
        self.committing
            .store(committing, std::sync::atomic::Ordering::Release);
    }
}

fn refused<T: Send + 'static>() -> indiciad::cluster::Pending<T> {
    Box::pin(async { Err(indiciad::cluster::ClusterError::Stopped) })
}

impl indiciad::cluster::Replicator for FakeEtcd {
    fn commit(
        &self,
        _writes: Vec<indiciad::cluster::fence::StateWrite>,
    ) -> indiciad::cluster::CommitFuture {
        refused()
    }
    fn may_commit(&self) -> bool {
        self.committing.load(std::sync::atomic::Ordering::Acquire)
    }
    fn may_change(&self) -> bool {
        self.may_commit()
    }
    fn appliance(&self) -> &str {
        "a1"
    }
    fn load(
        &self,
        vpsd_ids: Vec<u64>,
    ) -> Result<Vec<indiciad::cluster::Stored>, indiciad::cluster::ClusterError> {
        Ok(vec![Default::default(); vpsd_ids.len()])
    }
    fn owned(&self) -> Result<Vec<u64>, indiciad::cluster::ClusterError> {
        Ok(Vec::new())
    }
    fn release(&self, _vpsd_id: u64, _epoch: i64) -> Result<bool, indiciad::cluster::ClusterError> {
        Ok(true)
    }
    fn report(&self, _take_over_from: Option<String>) -> indiciad::cluster::ReportFuture {
        refused()
    }
    fn placement(&self) -> Arc<indiciad::cluster::placement::Placement> {
        Arc::default()
    }
    fn locate(&self, _vpsd_ids: Vec<u64>) -> indiciad::cluster::Pending<Vec<Option<String>>> {
        refused()
    }
    fn fetch(&self, _vpsd_id: u64) -> indiciad::cluster::Pending<indiciad::cluster::Stored> {
        refused()
    }
    fn hand_over(
        &self,
        _handover: indiciad::cluster::Handover,
    ) -> indiciad::cluster::Pending<indiciad::cluster::HandOver> {
        refused()
    }
    fn operate(&self, _operation: indiciad::cluster::Operation) -> indiciad::cluster::ReportFuture {
        refused()
    }
}

/// A cluster shard (appliance a1) with vPSD 1 provisioned and funded, both in etcd.
fn cluster_funded(dir: &std::path::Path, etcd: &Arc<FakeEtcd>) -> ShardCore<u64> {
    use indiciad::cluster::fence::Outcome;
    let (mut store, _) = open(dir, 1 << 20);
    store.enable_replica("a1", 0);
    let replicator: Arc<dyn indiciad::cluster::Replicator> = Arc::clone(etcd) as _;
    let mut shard: ShardCore<u64> = ShardCore::with_replicator(store, 10_000, Some(replicator));
    let provision = Request::Provision {
        vpsd_id: 1,
        owner: "acme".into(),
        algorithm: Algorithm::Ed25519,
        origin_zip: "02134".parse().unwrap(),
    };
    shard
        .handle(NOW, &admin(), 1, provision, 0, Arrival::Here)
        .unwrap();
    let written = |revision| {
        Some(vec![Outcome::Written {
            revision,
            epoch: 10,
        }])
    };
    cluster_round(&mut shard, written(10));
    let authorization = authorize(
        &common::provider(),
        AuthorizationKind::Refill,
        1,
        1_000_000,
        1,
        NOW + 600,
    );
    let refill = Request::Refill {
        vpsd_id: 1,
        authorization,
    };
    shard
        .handle(NOW, &admin(), 2, refill, 0, Arrival::Here)
        .unwrap();
    cluster_round(&mut shard, written(11));
    assert_eq!(shard.take_ready().len(), 2);
    shard
}

fn sign(vpsd_id: u64, postage: u64) -> Request {
    Request::Sign {
        vpsd_id,
        item: item(postage),
    }
}

#[test]
fn in_cluster_mode_a_request_for_a_vpsd_not_here_is_routed_not_answered() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = FakeEtcd::new();
    let mut shard = cluster_funded(dir.path(), &etcd);
    shard
        .handle(NOW, &user("u1"), 40, sign(9, 100), 400, Arrival::Direct)
        .unwrap();
    shard
        .handle(NOW, &user("u2"), 41, sign(9, 100), 401, Arrival::Forwarded)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    assert!(shard.take_ready().is_empty(), "answered instead of routed");
    let routed = shard.take_elsewhere();
    let seen: Vec<(u64, u64, Arrival)> = routed
        .iter()
        .map(|item| (item.reply, item.request_id, item.arrival))
        .collect();
    assert_eq!(
        seen,
        [(400, 40, Arrival::Direct), (401, 41, Arrival::Forwarded)],
        "the client's request id and how it came are kept"
    );
    assert_eq!(routed[0].client.id, "u1");
    // Routed back here (no owner anywhere): the engine answers, and it is not routed again.
    shard
        .handle(NOW, &user("u1"), 40, sign(9, 100), 400, Arrival::Here)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    assert!(shard.take_elsewhere().is_empty(), "routed again");
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(400, Response::Error(body))] if body.code == ErrorCode::UnknownVpsd),
        "{ready:?}"
    );
}

/// A planned move: the running session ends and commits first; a request that comes
/// meanwhile waits, and leaves for the new owner once the vPSD is handed over; nothing
/// of it was signed here.
#[test]
fn a_move_waits_for_the_running_session_then_sends_what_waited_to_the_new_owner() {
    use indiciad::cluster::fence::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let etcd = FakeEtcd::new();
    let mut shard = cluster_funded(dir.path(), &etcd);
    shard
        .handle(NOW, &user("u1"), 50, sign(1, 100), 500, Arrival::Direct)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    let move_to_a2 = Request::ClusterMove {
        vpsd_id: 1,
        to: "a2".into(),
    };
    shard
        .handle(NOW, &admin(), 51, move_to_a2, 510, Arrival::Direct)
        .unwrap();
    let moves = shard.take_moves();
    assert_eq!(moves.len(), 1);
    assert_eq!(
        (moves[0].vpsd_id, moves[0].to.as_str(), moves[0].reply),
        (1, "a2", Some(510))
    );
    assert!(shard.quiet(1).is_none(), "its session is not in etcd yet");
    // Meanwhile: waits, neither signed nor answered.
    shard
        .handle(NOW, &user("u1"), 52, sign(1, 100), 520, Arrival::Direct)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    assert!(shard.take_elsewhere().is_empty());
    let writes = cluster_round(
        &mut shard,
        Some(vec![Outcome::Written {
            revision: 12,
            epoch: 10,
        }]),
    );
    assert_eq!(writes.len(), 1, "only the running session's state");
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(500, Response::Signed { indicium })] if indicium.payload.piece_number == 1),
        "{ready:?}"
    );
    let owned = shard.quiet(1).expect("quiet once etcd holds its session");
    assert_eq!((owned.epoch, owned.last), (10, 12));
    shard.depart(NOW, 1, "a2", true).unwrap();
    assert!(!shard.holds(1));
    let waited = shard.take_elsewhere();
    assert_eq!(waited.len(), 1);
    assert_eq!((waited[0].reply, waited[0].request_id), (520, 52));
    assert_eq!(shard.store().engine.vpsds().count(), 0);
}

/// A move that does not happen (etcd refused it): what waited is handled here after all.
#[test]
fn a_move_that_does_not_happen_handles_here_what_waited() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = FakeEtcd::new();
    let mut shard = cluster_funded(dir.path(), &etcd);
    assert!(shard.begin_move(1, "a2"));
    assert!(!shard.begin_move(1, "a3"), "one move at a time");
    assert_eq!(shard.take_moves()[0].account.as_deref(), Some("acme"));
    shard
        .handle(NOW, &user("u1"), 60, sign(1, 100), 600, Arrival::Direct)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    assert!(shard.round_pending() || shard.take_ready().is_empty());
    shard.stay(NOW, 1).unwrap();
    shard.run_sessions(NOW).unwrap();
    cluster_round(
        &mut shard,
        Some(vec![indiciad::cluster::fence::Outcome::Written {
            revision: 12,
            epoch: 10,
        }]),
    );
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(600, Response::Signed { .. })]),
        "{ready:?}"
    );
}

/// Cut off from etcd: once it may not commit, the answers waiting for etcd leave as
/// `outcome-unknown` (their writes are still sent), queued requests and new ones are
/// refused `cluster-unavailable`, never signed.
#[test]
fn once_it_may_not_commit_waiting_answers_leave_and_queued_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = FakeEtcd::new();
    let mut shard = cluster_funded(dir.path(), &etcd);
    shard
        .handle(NOW, &user("u1"), 70, sign(1, 100), 700, Arrival::Direct)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    cluster_round(&mut shard, None);
    // Queued behind the session whose write etcd has not answered.
    shard
        .handle(NOW, &user("u1"), 71, sign(1, 100), 710, Arrival::Direct)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    shard.give_up_waiting();
    assert!(shard.take_ready().is_empty(), "gave up while it may commit");
    etcd.set_committing(false);
    shard.give_up_waiting();
    let mut ready = shard.take_ready();
    ready.sort_by_key(|(reply, _)| *reply);
    let codes: Vec<(u64, ErrorCode)> = ready
        .iter()
        .map(|(reply, response)| match response {
            Response::Error(body) => (*reply, body.code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [
            (700, ErrorCode::OutcomeUnknown),
            (710, ErrorCode::ClusterUnavailable)
        ]
    );
    assert_eq!(shard.stats().outcome_unknown, 1);
    shard
        .handle(NOW, &user("u1"), 72, sign(1, 100), 720, Arrival::Direct)
        .unwrap();
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(720, Response::Error(body))] if body.code == ErrorCode::ClusterUnavailable),
        "{ready:?}"
    );
    // The write is still there to be sent, as it was.
    assert!(
        shard.round_pending()
            || shard
                .store()
                .replica()
                .is_some_and(|book| book.has_writes() || book.pending_since(1).is_some())
    );
}

/// A stale view of who owns a vPSD is harmless: a client's sign that this shard signed
/// while another appliance had taken the vPSD over is voided by the fence and goes to the
/// owner with its request id, not answered `vpsd-moved`; a forwarded one is answered
/// `vpsd-moved` (it is never sent on: the appliance that forwarded it routes it again).
#[test]
fn a_fenced_session_sends_its_clients_requests_to_the_owner() {
    use indiciad::cluster::fence::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let etcd = FakeEtcd::new();
    let mut shard = cluster_funded(dir.path(), &etcd);
    shard
        .handle(NOW, &user("u1"), 80, sign(1, 100), 800, Arrival::Direct)
        .unwrap();
    shard
        .handle(NOW, &user("u2"), 81, sign(1, 100), 810, Arrival::Forwarded)
        .unwrap();
    shard.run_sessions(NOW).unwrap();
    cluster_round(
        &mut shard,
        Some(vec![Outcome::Fenced {
            owner: Some("a2".into()),
        }]),
    );
    // The release record of the void is made durable by the next round.
    while shard.round_pending() {
        cluster_round(&mut shard, Some(Vec::new()));
    }
    let ready = shard.take_ready();
    assert!(
        matches!(&ready[..], [(810, Response::Error(body))] if body.code == ErrorCode::VpsdMoved),
        "{ready:?}"
    );
    let rerouted = shard.take_elsewhere();
    assert_eq!(rerouted.len(), 1);
    assert_eq!(
        (
            rerouted[0].reply,
            rerouted[0].request_id,
            rerouted[0].arrival
        ),
        (800, 80, Arrival::Direct)
    );
    assert!(
        matches!(&rerouted[0].request, Request::Sign { vpsd_id: 1, item } if item.postage_mills == 100)
    );
    assert!(!shard.holds(1), "released");
    assert_eq!(shard.stats().fenced, 1);
}
