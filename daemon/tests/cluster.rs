//! Cluster mode end to end: real `indiciad` appliances replicating to a real 3-member etcd
//! on loopback (the Debian binary), all started and stopped by the test, bounded in time.
//!
//! - The owner is killed with SIGKILL: the survivor takes its vPSDs over and goes on from
//!   the state in etcd; no piece number is issued twice and the registers account for
//!   every acknowledged indicium.
//! - A stopped owner (SIGSTOP past its lease) comes back as a zombie: it first refuses
//!   (its lease may have expired), then, with a new lease, its commits are refused by the
//!   fence; nothing it did after the takeover is acknowledged or charged.
//! - The last acknowledged record of a killed owner is damaged, so that recovery cuts it
//!   as a torn tail: the appliance notices that etcd is ahead and goes on from etcd's
//!   piece count instead of issuing those piece numbers again.
//! - A data directory lost whole: the appliance comes back empty and continues every vPSD
//!   it owns from etcd.
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicia_client::Client;
use indicia_proto::{Algorithm, ErrorCode, Indicium, Request, Response};
use support::cluster::{Acknowledged, Appliance};
use support::etcd::EtcdCluster;
use support::item;

/// How long anything the tests wait for may take.
const PATIENCE: Duration = Duration::from_secs(60);

fn sign(client: &mut Client, vpsd_id: u64, postage: u64) -> Result<Indicium, ErrorCode> {
    match client.call(&Request::Sign {
        vpsd_id,
        item: item(postage),
    }) {
        Ok(Response::Signed { indicium }) => Ok(indicium),
        Ok(Response::Error(body)) => Err(body.code),
        other => panic!("unexpected answer {other:?}"),
    }
}

/// Signs once; anything but an indicium fails the test, saying what came.
fn must_sign(client: &mut Client, vpsd_id: u64, postage: u64) -> Indicium {
    let answer = client.call(&Request::Sign {
        vpsd_id,
        item: item(postage),
    });
    match answer {
        Ok(Response::Signed { indicium }) => indicium,
        other => panic!("vPSD {vpsd_id}: {other:?}"),
    }
}

/// Signs on `client` until `vpsd_id` answers, through the refusals a moving vPSD gives;
/// always with the same request id, so that a forward whose answer was lost (the owner
/// killed under it) is not charged twice.
fn sign_when_served(client: &mut Client, vpsd_id: u64, postage: u64) -> Indicium {
    let deadline = Instant::now() + PATIENCE;
    let request_id = client.next_request_id();
    let request = Request::Sign {
        vpsd_id,
        item: item(postage),
    };
    loop {
        match client.call_with_id(request_id, &request) {
            Ok(Response::Signed { indicium }) => return indicium,
            Ok(Response::Error(body))
                if matches!(
                    body.code,
                    ErrorCode::UnknownVpsd
                        | ErrorCode::VpsdMoved
                        | ErrorCode::ClusterUnavailable
                        | ErrorCode::ForwardFailed
                ) =>
            {
                assert!(
                    Instant::now() < deadline,
                    "vPSD {vpsd_id} not served within {PATIENCE:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!("vPSD {vpsd_id}: {other:?}"),
        }
    }
}

const FUNDS: u64 = 10_000_000;

#[test]
fn a_killed_owner_is_taken_over_and_a_zombie_is_fenced() {
    let etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Appliance::new(root.path(), "a1", &etcd);
    a1.start();
    let mut a2 = Appliance::joining(root.path(), "a2", &etcd, &a1);
    a2.start();
    let vpsds = [11u64, 12, 13, 14];
    for vpsd in vpsds {
        a1.daemon()
            .provision_funded(vpsd, Algorithm::EcdsaP256, FUNDS);
    }
    let mut acked = Acknowledged::default();
    let mut client = a1.daemon().admin();
    let quiet = |appliance: &Appliance| {
        assert_eq!(
            appliance.stat("cluster.fenced"),
            0,
            "{}",
            appliance.daemon().log_text()
        );
    };
    for round in 0..5u64 {
        for vpsd in vpsds {
            acked.record(sign(&mut client, vpsd, 100 + round).unwrap());
        }
    }
    assert!(
        a1.stat("cluster.writes") >= 20 + 8,
        "every change went to etcd"
    );
    assert_eq!(a1.stat("cluster.vpsds_owned"), 4);
    // a2 does not own them: it forwards their requests to a1 (step 3).
    let mut on_a2 = a2.daemon().admin();
    acked.record(must_sign(&mut on_a2, 11, 1));
    assert_eq!(a2.stat("cluster.forwarded"), 1);
    assert_eq!(a2.stat("cluster.vpsds_owned"), 0);

    // The last request before the crash: its answer may never reach the client, which
    // retries it at the next owner.
    let last = Request::Sign {
        vpsd_id: 11,
        item: item(150),
    };
    let Ok(Response::Signed { indicium: original }) = client.call_with_id(4242, &last) else {
        panic!("not signed")
    };
    acked.record(original);

    // kill -9 the owner: a2 takes over and goes on from etcd's state.
    a1.kill();
    let killed = Instant::now();
    acked.record(sign_when_served(&mut on_a2, 11, 200));
    let failover = killed.elapsed();
    eprintln!("failover: {failover:?} from kill -9 to the first acknowledged sign");
    for vpsd in vpsds {
        acked.record(sign_when_served(&mut on_a2, vpsd, 201));
        acked.check(&mut on_a2, vpsd, FUNDS);
    }
    assert_eq!(a2.stat("cluster.adopted"), 4);
    // Requests that came before the takeover's hand-off adopted on demand; the hand-off
    // then changed nothing (adopting twice would void what was signed meanwhile).
    quiet(&a2);
    // The retry, at the new owner: the original indicium's payload (ECDSA signs again, so
    // only the signature differs, and it verifies), charged once (`check` above and below).
    let Ok(Response::Signed { indicium: again }) = on_a2.call_with_id(4242, &last) else {
        panic!("the retry was not answered with an indicium")
    };
    assert_eq!(again.payload, original.payload);
    let (_, _, spki) = on_a2.public_key(11).unwrap();
    assert!(support::verifies(&again, &spki));
    acked.check(&mut on_a2, 11, FUNDS);

    // The old owner comes back: its local vPSDs belong to a2 now; it releases them and
    // forwards their requests to a2.
    a1.start();
    let mut on_a1 = a1.daemon().admin();
    acked.record(must_sign(&mut on_a1, 12, 1));
    assert!(a1.daemon().log_text().contains("released"));
    assert_eq!(a1.stat("cluster.vpsds_owned"), 0);
    quiet(&a1);
    quiet(&a2);

    // The zombie: a2 stops past its lease; a1 takes everything over meanwhile.
    a2.signal(nix::sys::signal::Signal::SIGSTOP);
    for vpsd in vpsds {
        acked.record(sign_when_served(&mut on_a1, vpsd, 300));
    }
    a2.signal(nix::sys::signal::Signal::SIGCONT);
    // On waking, a2 believes it owns the vPSDs. It refuses while its lease may have
    // expired; once it has a new lease, its commit is refused by the fence, and the
    // session it signed is void: nothing acknowledged or charged by a2. The voided request
    // is forwarded to the owner, a1, which signs it: an indicium a2 acknowledged itself
    // would fail the checker (a piece twice, or registers that do not add up).
    let deadline = Instant::now() + PATIENCE;
    let mut refusals = BTreeSet::new();
    while a2.stat("cluster.fenced") == 0 {
        match sign(&mut on_a2, 13, 7) {
            Ok(indicium) => acked.record(indicium),
            Err(code @ (ErrorCode::ClusterUnavailable | ErrorCode::VpsdMoved)) => {
                refusals.insert(code.name());
            }
            Err(code) => panic!("{code}"),
        }
        assert!(Instant::now() < deadline, "the zombie was never fenced");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("the zombie refused with {refusals:?} before it was fenced");
    acked.record(must_sign(&mut on_a2, 13, 7));
    for vpsd in vpsds {
        acked.record(sign(&mut on_a1, vpsd, 400).unwrap());
        acked.check(&mut on_a1, vpsd, FUNDS);
    }
}

/// The offset of the last record in a journal segment (its header's magic).
fn last_record(segment: &[u8]) -> usize {
    segment
        .windows(4)
        .rposition(|window| window == b"IREC")
        .unwrap()
}

#[test]
fn etcd_ahead_of_a_damaged_or_lost_journal_is_where_the_vpsd_goes_on() {
    let etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Appliance::new(root.path(), "a1", &etcd);
    a1.start();
    let vpsd = 21u64;
    a1.daemon()
        .provision_funded(vpsd, Algorithm::Ed25519, FUNDS);
    let mut acked = Acknowledged::default();
    let mut client = a1.daemon().admin();
    for postage in 1..=10 {
        acked.record(sign(&mut client, vpsd, postage).unwrap());
    }
    drop(client);

    // kill -9, then damage the last acknowledged record (a session of the vPSD): recovery
    // cuts it as a torn tail, and the local history ends one session early.
    a1.kill();
    let shard = indiciad::server::shard_of(vpsd, 2);
    let shard_dir = a1.data().join(format!("shard-{shard:03}"));
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&shard_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "idj"))
        .collect();
    segments.sort();
    let newest = segments.last().unwrap();
    let mut bytes = std::fs::read(newest).unwrap();
    let at = last_record(&bytes);
    bytes[at + 48] ^= 0xff;
    std::fs::write(newest, &bytes).unwrap();

    a1.start();
    let log = a1.daemon().log_text();
    assert!(log.contains("torn tail"), "{log}");
    assert!(log.contains("etcd is ahead"), "{log}");
    let mut client = a1.daemon().admin();
    acked.check(&mut client, vpsd, FUNDS);
    let next = sign(&mut client, vpsd, 50).unwrap();
    assert_eq!(
        next.payload.piece_number, 11,
        "no acknowledged piece number again"
    );
    acked.record(next);
    drop(client);

    // The whole data directory lost (the keys restored, as an operator would): the
    // appliance comes back empty and goes on from etcd.
    a1.kill();
    for entry in std::fs::read_dir(a1.data()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else if ![
            "master.key",
            "provider.key",
            "provider.pub",
            "admin.credential",
        ]
        .iter()
        .any(|keep| path.ends_with(keep))
        {
            std::fs::remove_file(&path).unwrap();
        }
    }
    a1.start();
    assert!(a1.daemon().log_text().contains("etcd is ahead"));
    let mut client = a1.daemon().admin();
    acked.check(&mut client, vpsd, FUNDS);
    let next = sign(&mut client, vpsd, 60).unwrap();
    assert_eq!(next.payload.piece_number, 12);
    acked.record(next);
    acked.check(&mut client, vpsd, FUNDS);
}

/// A single appliance turned into a cluster member: its first start in cluster mode writes
/// its vPSDs to etcd (an import) and records the membership once they are there; another
/// appliance can then take them over and go on from their registers.
#[test]
fn a_single_node_joins_the_cluster_with_its_vpsds() {
    let etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Appliance::new(root.path(), "a1", &etcd);
    let single = support::write_config(&root.path().join("single"), "", &[]);
    let daemon =
        support::Daemon::start_on(&a1.dir, Some(&single), &format!("127.0.0.1:{}", a1.port));
    let vpsd = 31u64;
    daemon.provision_funded(vpsd, Algorithm::Ed25519, FUNDS);
    let mut acked = Acknowledged::default();
    let mut client = daemon.admin();
    for postage in 1..=5 {
        acked.record(sign(&mut client, vpsd, postage).unwrap());
    }
    drop(client);
    assert!(daemon.terminate().success());
    let member = a1.data().join("cluster-member");
    assert!(!member.exists());

    a1.start();
    let deadline = Instant::now() + PATIENCE;
    while !member.exists() {
        assert!(
            Instant::now() < deadline,
            "the membership was never recorded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        a1.daemon().log_text().contains("1 imported"),
        "{}",
        a1.daemon().log_text()
    );
    let mut client = a1.daemon().admin();
    acked.check(&mut client, vpsd, FUNDS);
    acked.record(sign(&mut client, vpsd, 6).unwrap());
    drop(client);

    let mut a2 = Appliance::joining(root.path(), "a2", &etcd, &a1);
    a2.start();
    a1.kill();
    let mut on_a2 = a2.daemon().admin();
    let next = sign_when_served(&mut on_a2, vpsd, 7);
    assert_eq!(next.payload.piece_number, 7);
    acked.record(next);
    acked.check(&mut on_a2, vpsd, FUNDS);
}

/// etcd at its space quota: the write that crossed it was applied (etcd 3.4 answers it
/// with the quota error all the same), so its outcome is unknown and it is sent again until
/// etcd answers; meanwhile the appliance takes no new change (`cluster-unavailable`, a
/// clear refusal). Once an operator compacts, defragments and disarms the alarm
/// (docs/CLUSTER.md 9.3), the waiting answer leaves, signing goes on from where it was,
/// and every acknowledged indicium is in the registers: nothing lost, nothing charged
/// twice.
#[test]
fn at_etcds_space_quota_changes_are_refused_and_nothing_acknowledged_is_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let etcd = EtcdCluster::start_with(3, &["--quota-backend-bytes=1048576"]);
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Appliance::new(root.path(), "a1", &etcd);
    a1.start();
    let (busy, idle) = (41u64, 42u64);
    a1.daemon()
        .provision_funded(busy, Algorithm::Ed25519, FUNDS);
    a1.daemon()
        .provision_funded(idle, Algorithm::Ed25519, FUNDS);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let signer = {
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        let mut client = a1.daemon().admin();
        std::thread::spawn(move || {
            let mut refused = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match sign(&mut client, busy, 3) {
                    Ok(indicium) => acked.lock().unwrap().record(indicium),
                    Err(ErrorCode::ClusterUnavailable) => {
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(code) => panic!("{code}"),
                }
            }
            refused
        })
    };
    // etcd fills up: the appliance says so, and takes no change.
    let deadline = Instant::now() + Duration::from_secs(120);
    while a1.stat("cluster.committing_shards") != 0 {
        assert!(
            Instant::now() < deadline,
            "etcd never reached its quota; the appliance's log:\n{}",
            a1.daemon().log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a1.daemon().log_text().contains("etcd is out of space"));
    let mut client = a1.daemon().admin();
    assert_eq!(
        sign(&mut client, idle, 5),
        Err(ErrorCode::ClusterUnavailable)
    );

    // The operator's way out: compact the history, defragment every member, disarm the
    // alarms; again until the appliance takes changes (a member may raise the alarm again
    // before its defragmentation, on a loaded machine).
    let deadline = Instant::now() + PATIENCE;
    while a1.stat("cluster.committing_shards") == 0 {
        recover_from_nospace(&etcd);
        assert!(
            Instant::now() < deadline,
            "still out of space {PATIENCE:?} after the recovery; alarms: {:?}; the \
             appliance's log:\n{}",
            etcd.gateway("/v3/maintenance/alarm", r#"{"action":"GET"}"#),
            a1.daemon().log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut acked_idle = Acknowledged::default();
    acked_idle.record(sign_when_served(&mut client, idle, 5));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    signer.join().unwrap();
    let acked = acked.lock().unwrap();
    assert!(acked.pieces.len() > 100, "{}", acked.pieces.len());
    acked.check(&mut client, busy, FUNDS);
    acked_idle.check(&mut client, idle, FUNDS);
}

/// etcd's own recovery from its space quota: compact the history, defragment every member,
/// deactivate every alarm (docs/CLUSTER.md 9.3), through its JSON gateway.
fn recover_from_nospace(etcd: &EtcdCluster) {
    let Some(range) = etcd.gateway("/v3/kv/range", r#"{"key":"AA=="}"#) else {
        return;
    };
    let status: serde_json::Value = serde_json::from_str(&range).unwrap();
    let revision = status["header"]["revision"]
        .as_str()
        .unwrap_or("0")
        .to_owned();
    etcd.gateway(
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    );
    etcd.gateway_each("/v3/maintenance/defragment", "{}");
    let Some(alarms) = etcd.gateway("/v3/maintenance/alarm", r#"{"action":"GET"}"#) else {
        return;
    };
    let alarms: serde_json::Value = serde_json::from_str(&alarms).unwrap();
    for alarm in alarms["alarms"].as_array().into_iter().flatten() {
        etcd.gateway(
            "/v3/maintenance/alarm",
            &format!(
                r#"{{"action":"DEACTIVATE","memberID":"{}","alarm":"NOSPACE"}}"#,
                alarm["memberID"].as_str().unwrap_or("0")
            ),
        );
    }
}
