//! Many appliances serving together (milestone 2, step 3): three `indiciad` appliances and
//! three etcd members on loopback, all started and stopped by the test, bounded in time.
//!
//! - vPSDs are placed by rendezvous hashing: a provision sent to any appliance lands on the
//!   one placement names, and every appliance reports the same owners. When a third
//!   appliance joins, rebalancing moves to it the vPSDs hashing now puts there.
//! - Clients talk to any appliance: a request for another appliance's vPSD is forwarded
//!   to the owner and answered as the owner answers it; a retry with the same request id
//!   through another appliance gets the original indicium (idempotency is the owner's).
//! - Planned moves under load: `cluster-move`, a drain and its end, a pin; signers keep
//!   signing through random appliances all the while and see no error at all.
//! - The checker of step 2: no piece number issued twice, the registers exact.
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicia_client::Client;
use indicia_proto::{Algorithm, PinSubject, Request, Response};
use support::cluster::{wait_until, Acknowledged, Appliance, Signers};
use support::etcd::EtcdCluster;
use support::item;

const FUNDS: u64 = 100_000_000;
const VPSDS: [u64; 9] = [101, 102, 103, 104, 105, 106, 107, 108, 109];

/// The owner of each vPSD, as `client`'s appliance reads it from etcd.
fn owners(client: &mut Client) -> BTreeMap<u64, String> {
    client
        .placement(&VPSDS)
        .unwrap()
        .vpsds
        .into_iter()
        .map(|vpsd| {
            assert!(vpsd.owned, "vPSD {} is owned by nobody", vpsd.vpsd_id);
            (vpsd.vpsd_id, vpsd.appliance)
        })
        .collect()
}

/// Signers that sign on every vPSD, each through appliances picked at random, until told
/// to stop; every answer must be an indicium.
fn load(appliances: &[&Appliance], acked: &Arc<Mutex<Acknowledged>>, signers: u64) -> Signers {
    Signers::start(signers, acked, |signer| {
        let mut clients: Vec<Client> = appliances
            .iter()
            .map(|appliance| appliance.daemon().admin())
            .collect();
        move |turn| {
            let vpsd_id = VPSDS[(turn % VPSDS.len() as u64) as usize];
            // A pseudo-random entry appliance, differing between turns.
            let entry = (turn * 7 + signer) as usize % clients.len();
            let request = Request::Sign {
                vpsd_id,
                item: item(100 + turn % 50),
            };
            match clients[entry].call(&request) {
                Ok(Response::Signed { indicium }) => indicium,
                other => {
                    panic!("signer {signer}: vPSD {vpsd_id} through appliance {entry}: {other:?}")
                }
            }
        }
    })
}

/// Requests forwarded by all the appliances together.
fn forwarded(appliances: &[&Appliance]) -> u64 {
    counter(appliances, "cluster.forwarded")
}

/// A statistic summed over appliances.
fn counter(appliances: &[&Appliance], name: &str) -> u64 {
    appliances
        .iter()
        .map(|appliance| appliance.stat(name))
        .sum()
}

#[test]
fn any_appliance_serves_every_vpsd_and_planned_moves_lose_nothing() {
    let etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let (a1, a2) = Appliance::started_pair(root.path(), &etcd);
    let mut admin = a1.daemon().admin();

    // Placement: every provision through a1 lands where rendezvous hashing puts it.
    let planned = admin.placement(&VPSDS).unwrap().vpsds;
    for vpsd in VPSDS {
        a1.daemon()
            .provision_funded(vpsd, Algorithm::Ed25519, FUNDS);
    }
    let placed = owners(&mut admin);
    for vpsd in &planned {
        assert!(!vpsd.owned);
        assert_eq!(placed[&vpsd.vpsd_id], vpsd.appliance, "placed as planned");
    }

    // a3 joins: rebalancing moves to it the vPSDs rendezvous hashing now puts there.
    let mut a3 = Appliance::joining_configured(root.path(), "a3", &etcd, &a1, "");
    a3.start();
    let all = [&a1, &a2, &a3];
    let three: Vec<String> = ["a1", "a2", "a3"].map(String::from).to_vec();
    let expected: BTreeMap<u64, String> = VPSDS
        .iter()
        .map(|&vpsd| {
            let owner = indiciad::cluster::successor(vpsd, &three).unwrap();
            (vpsd, owner.to_owned())
        })
        .collect();
    assert!(
        expected.values().any(|owner| owner == "a3"),
        "no vPSD for a3: {expected:?}"
    );
    wait_until("rebalancing after a3 joined", || {
        owners(&mut admin) == expected
    });
    let placed = expected;
    let mut spread: Vec<&String> = placed.values().collect();
    spread.dedup();
    assert!(
        spread.len() >= 2,
        "9 vPSDs all on one appliance: {placed:?}"
    );
    for appliance in all {
        assert_eq!(owners(&mut appliance.daemon().admin()), placed);
    }
    let owned: u64 = all
        .iter()
        .map(|appliance| appliance.stat("cluster.vpsds_owned"))
        .sum();
    assert_eq!(owned, VPSDS.len() as u64);
    assert!(a3.stat("cluster.adopted") > 0);

    // Idempotency is the owner's: a retry through another appliance gets the original.
    let vpsd = VPSDS[0];
    let sign = Request::Sign {
        vpsd_id: vpsd,
        item: item(321),
    };
    let first = a1.daemon().admin().call_with_id(77_001, &sign).unwrap();
    let again = a2.daemon().admin().call_with_id(77_001, &sign).unwrap();
    let third = a3.daemon().admin().call_with_id(77_001, &sign).unwrap();
    assert!(matches!(first, Response::Signed { .. }), "{first:?}");
    assert_eq!(first, again);
    assert_eq!(first, third);
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    if let Response::Signed { indicium } = first {
        acked.lock().unwrap().record(indicium);
    }

    // The client library's pool sends each vPSD's requests straight to its owner, and to
    // the shard that holds it there: nothing is forwarded, nothing crosses shards.
    let forwarded_before = forwarded(&all);
    let crossed_before = counter(&all, "cross_shard.requests");
    let seeds = vec![format!("127.0.0.1:{}", a3.port)];
    let routed = indicia_client::Pool::connect(&seeds, &a1.daemon().admin_credential()).unwrap();
    for round in 0..3u64 {
        for vpsd in VPSDS {
            let indicium = routed.sign(vpsd, item(200 + round)).unwrap();
            acked.lock().unwrap().record(indicium);
            let (address, shard) = routed.route_of(vpsd).unwrap();
            let owner = ["a1", "a2", "a3"]
                .iter()
                .position(|id| *id == placed[&vpsd])
                .map(|index| all[index])
                .unwrap();
            assert_eq!(address, format!("127.0.0.1:{}", owner.port));
            assert_eq!(shard, Some(indicia_proto::shard_of(vpsd, 2)));
        }
    }
    assert_eq!(
        forwarded(&all),
        forwarded_before,
        "routed requests were forwarded"
    );
    assert_eq!(
        counter(&all, "cross_shard.requests"),
        crossed_before,
        "routed requests crossed shards"
    );

    // Signing through every appliance, forwarded to the owners.
    let load = load(&all, &acked, 3);
    load.wait_for(300);
    assert!(
        forwarded(&all) > forwarded_before,
        "no request was forwarded"
    );

    // A planned move under load.
    let moving = VPSDS[1];
    let from = placed[&moving].clone();
    let to = ["a1", "a2", "a3"]
        .into_iter()
        .find(|id| *id != from)
        .unwrap();
    let after = a3.daemon().admin().cluster_move(moving, to).unwrap().vpsds;
    assert_eq!(after[0].appliance, to);
    assert!(after[0].owned);
    load.wait_for(200);
    // The move pinned it: rebalancing leaves it there until the pin goes.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(owners(&mut admin)[&moving], to);
    // The old owner's handover notice was answered by the new one (once adopted, the
    // notice is not checked again and again).
    let new_owner = all
        .iter()
        .find(|appliance| appliance.dir.ends_with(to))
        .unwrap();
    wait_until("the handover notice answered", || {
        new_owner.stat("request_latency_us.cluster_adopt.count") >= 1
    });
    admin.cluster_pin(PinSubject::Vpsd(moving), None).unwrap();

    // A drain moves everything away from a3 while the load goes on; its end lets
    // rebalancing give a3 vPSDs again.
    a1.daemon().admin().cluster_drain("a3", false).unwrap();
    wait_until("a3 drained", || a3.stat("cluster.vpsds_owned") == 0);
    assert!(owners(&mut admin).values().all(|owner| owner != "a3"));
    load.wait_for(200);
    a1.daemon().admin().cluster_drain("a3", true).unwrap();
    wait_until("a3 given vPSDs again", || {
        a3.stat("cluster.vpsds_owned") > 0
    });

    // Pins: one vPSD, and the vPSDs of one owner account, to a1.
    let (pinned, account) = (VPSDS[4], VPSDS[5]);
    admin
        .cluster_pin(PinSubject::Vpsd(pinned), Some("a1"))
        .unwrap();
    let owner_pin = PinSubject::Owner(format!("owner-{account}"));
    admin.cluster_pin(owner_pin.clone(), Some("a1")).unwrap();
    wait_until("the pinned vPSDs on a1", || {
        let now = owners(&mut admin);
        now[&pinned] == "a1" && now[&account] == "a1"
    });
    load.wait_for(200);
    admin.cluster_pin(PinSubject::Vpsd(pinned), None).unwrap();
    admin.cluster_pin(owner_pin, None).unwrap();
    let signed = load.stop();
    eprintln!("signed {signed} indicia through three appliances");
    let moved: u64 = all
        .iter()
        .map(|appliance| appliance.stat("cluster.moved_away"))
        .sum();
    assert!(moved > 3, "moves: {moved}");

    // The checker: every acknowledged indicium is in the registers, nothing else is.
    let acked = acked.lock().unwrap();
    for vpsd in VPSDS {
        acked.check(&mut a1.daemon().admin(), vpsd, FUNDS);
    }
}

/// Writes `text` to `dir/name` (a private key: owner only).
fn write_pem(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn between_appliances_that_use_tls_forwarding_is_mutual_tls_with_peer_certificates() {
    let etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let pki = root.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let authority = indicia_client::pki::Authority::new("cluster CA", 1).unwrap();
    let ca = write_pem(&pki, "ca.pem", authority.cert_pem());
    let server = authority.server(&["127.0.0.1".into()]).unwrap();
    let server_cert = write_pem(&pki, "server.pem", &server.cert_pem);
    let server_key = write_pem(&pki, "server.key", &server.key_pem);
    let admin = authority.client("admin").unwrap();
    let admin_cert = write_pem(&pki, "admin.pem", &admin.cert_pem);
    let admin_key = write_pem(&pki, "admin.key", &admin.key_pem);
    let tls_section = format!(
        "[tls]\ncertificate = {server_cert:?}\nprivate_key = {server_key:?}\nclient_ca = {ca:?}\n"
    );
    // a1 and a2 have their peer certificates (`appliance:<id>`); a3 has none.
    let peer = |id: &str| {
        let issued = authority.client(&format!("appliance:{id}")).unwrap();
        let cert = write_pem(&pki, &format!("{id}-peer.pem"), &issued.cert_pem);
        let key = write_pem(&pki, &format!("{id}-peer.key"), &issued.key_pem);
        format!("peer_certificate = {cert:?}\npeer_private_key = {key:?}\npeer_ca = {ca:?}\n")
    };
    let with_tls = |cluster: String| format!("rebalance = false\n{cluster}{tls_section}");
    let mut a1 = Appliance::configured(root.path(), "a1", &etcd, &with_tls(peer("a1")));
    a1.start();
    let mut a2 =
        Appliance::joining_configured(root.path(), "a2", &etcd, &a1, &with_tls(peer("a2")));
    a2.start();
    let mut a3 =
        Appliance::joining_configured(root.path(), "a3", &etcd, &a1, &with_tls(String::new()));
    a3.start();
    let settings =
        indicia_client::TlsSettings::load(&ca, &admin_cert, &admin_key, "127.0.0.1").unwrap();
    let credential = a1.daemon().admin_credential();
    let connect = |appliance: &Appliance| {
        let client =
            Client::connect_with(appliance.daemon().addr, &credential, Some(&settings)).unwrap();
        assert!(client.is_tls());
        client
    };
    let (mut on_a1, mut on_a2, mut on_a3) = (connect(&a1), connect(&a2), connect(&a3));
    let vpsd = 301;
    on_a1
        .change(&Request::Provision {
            vpsd_id: vpsd,
            owner: "tls-customer".into(),
            algorithm: Algorithm::Ed25519,
            origin_zip: indicia_proto::Zip::new(20260, None).unwrap(),
        })
        .unwrap();
    a1.daemon().refill(&mut on_a1, vpsd, FUNDS);
    let sign = Request::Sign {
        vpsd_id: vpsd,
        item: item(42),
    };
    // Through a2: forwarded to a1 over mutual TLS, a1 authenticating a2 by its certificate.
    let answer = on_a2.call(&sign).unwrap();
    assert!(matches!(answer, Response::Signed { .. }), "{answer:?}");
    let stat = |client: &mut Client, name: &str| {
        client
            .stats()
            .unwrap()
            .into_iter()
            .find(|entry| entry.name == name)
            .map_or(0, |entry| entry.value)
    };
    assert_eq!(stat(&mut on_a2, "cluster.forwarded"), 1);
    // Through a3, which has no peer certificate: not forwarded; the client is sent on.
    let answer = on_a3.call(&sign).unwrap();
    let Response::Error(body) = answer else {
        panic!("a3 without a peer certificate answered {answer:?}")
    };
    assert_eq!(body.code, indicia_proto::ErrorCode::VpsdMoved);
    assert!(body.message.contains("a1"), "{}", body.message);
    assert_eq!(stat(&mut on_a3, "cluster.forwarded"), 0);
    let status = on_a1.status(vpsd).unwrap();
    assert_eq!(status.piece_count, 1, "signed once, through a2");
}
