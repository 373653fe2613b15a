//! A Jepsen-style fault test of cluster mode, all on loopback, started and stopped by the
//! test and bounded in time and count: 3 etcd members, 3 appliances, clients sending random
//! signs (single and two-item batches) and refills, and a nemesis that, in random order,
//! kills the owner of the most vPSDs with SIGKILL (and restarts it), kills the etcd leader
//! (and restarts it), stops an owner with SIGSTOP past its lease and lets it go on (the
//! zombie that must be fenced), and deletes an appliance's data directory (and restarts it
//! with its keys).
//!
//! Every operation's outcome is recorded: ok, refused (an error answer: nothing charged)
//! or unknown (no answer). After the faults, with everything healed, a checker proves:
//! - no (vPSD, piece number) was acknowledged twice, and every acknowledged piece is within
//!   the vPSD's piece count;
//! - for every vPSD, AR + DR = CS;
//! - AR is the postage of every acknowledged indicium plus that of a set of operations with
//!   unknown outcome, each wholly in or wholly out (a two-item batch counts both items or
//!   neither), and their number of items is the rest of the piece count;
//! - CS is the funding plus every acknowledged refill plus a set of refills with unknown
//!   outcome;
//! - the fence refused at least one stale commit in the zombie runs (`cluster.fenced`).
//!
//! `INDICIA_FAULTS` sets the number of faults (default 8, what `.ci/run` runs); the long
//! run in docs/CLUSTER.md used 100. `INDICIA_FAULTS_SEED` picks the random sequence.
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rng;
use indicia_client::provider::{authorize, load_provider_key};
use indicia_client::Client;
use indicia_proto::{
    Algorithm, AuthorizationKind, ErrorCode, Indicium, ItemResult, Request, Response,
};
use support::cluster::{Appliance, LEASE_TTL_S};
use support::etcd::EtcdCluster;
use support::{item, now_unix};

const VPSDS: [u64; 6] = [101, 102, 103, 104, 105, 106];
/// Enough for every sign of a long run (postage up to 10 000 mills each).
const FUNDS: u64 = 1_000_000_000_000;
const APPLIANCES: usize = 3;

/// What happened to one operation.
#[derive(Debug, Clone)]
enum Outcome {
    /// Signed: the indicia.
    Signed(Vec<Indicium>),
    /// Refused with an error answer: nothing was charged.
    Refused(ErrorCode),
    /// No answer: charged wholly or not at all.
    Unknown,
}

/// The history of every operation.
#[derive(Default)]
struct History {
    /// Signs: (vPSD, postage of each item, outcome).
    signs: Vec<(u64, Vec<u64>, Outcome)>,
    /// Refills: (vPSD, amount, acknowledged: Some(true), refused: Some(false), unknown).
    refills: Vec<(u64, u64, Option<bool>)>,
}

/// The appliances' addresses, shared with the client threads; None while one is down.
type Directory = Arc<Mutex<Vec<Option<std::net::SocketAddr>>>>;

fn connect(
    directory: &Directory,
    index: usize,
    credential: &indicia_client::Credential,
) -> Option<Client> {
    let addr = directory.lock().unwrap()[index]?;
    let client = Client::connect(addr, credential).ok()?;
    client.set_timeout(Some(Duration::from_secs(3))).ok()?;
    Some(client)
}

/// A client thread: random signs, each sent to the appliance that served its vPSD last
/// (or the next one when refused), until told to stop.
fn signer(
    seed: u64,
    directory: Directory,
    credential: indicia_client::Credential,
    postage: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let mut rng = Rng::new(seed);
    let mut clients: Vec<Option<Client>> = (0..APPLIANCES).map(|_| None).collect();
    let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let vpsd = VPSDS[rng.below(VPSDS.len() as u64) as usize];
        let items = 1 + rng.below(2) as usize;
        // Amounts that differ from one request to the next (the checker looks for the set of
        // unknown operations that makes up the registers).
        let postages: Vec<u64> = (0..items)
            .map(|_| 1 + postage.fetch_add(1, Ordering::Relaxed) % 9_999)
            .collect();
        let request = if items == 1 {
            Request::Sign {
                vpsd_id: vpsd,
                item: item(postages[0]),
            }
        } else {
            Request::SignBatch {
                vpsd_id: vpsd,
                items: postages.iter().map(|&mills| item(mills)).collect(),
            }
        };
        let start = *owner
            .get(&vpsd)
            .unwrap_or(&(rng.below(APPLIANCES as u64) as usize));
        let mut outcome = Outcome::Refused(ErrorCode::UnknownVpsd);
        for attempt in 0..APPLIANCES {
            let index = (start + attempt) % APPLIANCES;
            if clients[index].is_none() {
                clients[index] = connect(&directory, index, &credential);
            }
            let Some(client) = clients[index].as_mut() else {
                continue;
            };
            match client.call(&request) {
                Ok(Response::Signed { indicium }) => {
                    outcome = Outcome::Signed(vec![indicium]);
                }
                Ok(Response::BatchSigned { results }) => {
                    let signed: Vec<Indicium> = results
                        .iter()
                        .filter_map(|result| match result {
                            ItemResult::Signed(indicium) => Some(*indicium),
                            ItemResult::Failed(_) => None,
                        })
                        .collect();
                    assert_eq!(signed.len(), results.len(), "{results:?}");
                    outcome = Outcome::Signed(signed);
                }
                // Forwarded to the owner, whose answer was lost: like a lost connection.
                Ok(Response::Error(body))
                    if matches!(
                        body.code,
                        ErrorCode::ForwardFailed | ErrorCode::OutcomeUnknown
                    ) =>
                {
                    outcome = Outcome::Unknown;
                }
                Ok(Response::Error(body)) => {
                    outcome = Outcome::Refused(body.code);
                    if matches!(
                        body.code,
                        ErrorCode::VpsdMoved
                            | ErrorCode::UnknownVpsd
                            | ErrorCode::ClusterUnavailable
                            | ErrorCode::ShuttingDown
                            | ErrorCode::Busy
                    ) {
                        continue;
                    }
                    panic!("vPSD {vpsd}: refused with {}: {}", body.code, body.message);
                }
                Ok(other) => panic!("unexpected answer {other:?}"),
                Err(_) => {
                    // No answer: the outcome is unknown; the connection is gone.
                    clients[index] = None;
                    outcome = Outcome::Unknown;
                }
            }
            if !matches!(outcome, Outcome::Refused(_)) {
                owner.insert(vpsd, index);
                break;
            }
        }
        history
            .lock()
            .unwrap()
            .signs
            .push((vpsd, postages, outcome));
        if matches!(
            history.lock().unwrap().signs.last(),
            Some((_, _, Outcome::Refused(_)))
        ) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The refill thread: now and then a refill of a random vPSD, with a unique amount and the
/// next provider sequence (sequences only have to increase, so an unknown one is skipped).
fn treasurer(
    seed: u64,
    directory: Directory,
    credential: indicia_client::Credential,
    provider_key: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) {
    let key = load_provider_key(&provider_key).unwrap();
    let mut rng = Rng::new(seed);
    let mut sequences: BTreeMap<u64, u64> = VPSDS.iter().map(|&vpsd| (vpsd, 1)).collect();
    let mut next_amount = 1_000_000u64;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200 + rng.below(300)));
        let vpsd = VPSDS[rng.below(VPSDS.len() as u64) as usize];
        let sequence = sequences.get_mut(&vpsd).unwrap();
        *sequence += 1;
        next_amount += 1;
        let authorization = authorize(
            &key,
            AuthorizationKind::Refill,
            vpsd,
            next_amount,
            *sequence,
            now_unix() + 3600,
        );
        let request = Request::Refill {
            vpsd_id: vpsd,
            authorization,
        };
        let mut outcome = Some(false);
        for index in 0..APPLIANCES {
            let Some(mut client) = connect(&directory, index, &credential) else {
                continue;
            };
            match client.call(&request) {
                Ok(Response::VpsdStatus(_)) => outcome = Some(true),
                Ok(Response::Error(body)) if body.code == ErrorCode::AuthorizationReplayed => {
                    panic!("refill of vPSD {vpsd} replayed: sequences only increase here")
                }
                Ok(Response::Error(body))
                    if matches!(
                        body.code,
                        ErrorCode::ForwardFailed | ErrorCode::OutcomeUnknown
                    ) =>
                {
                    outcome = None;
                }
                Ok(Response::Error(_)) => continue,
                Ok(other) => panic!("unexpected answer {other:?}"),
                Err(_) => outcome = None,
            }
            break;
        }
        history
            .lock()
            .unwrap()
            .refills
            .push((vpsd, next_amount, outcome));
    }
}

/// Whether some subset of `candidates` (each a list of amounts, counted whole) has exactly
/// `count` items summing to `sum`.
fn whole_subset(candidates: &[Vec<u64>], count: usize, sum: u64) -> bool {
    // States reachable: (items, sum), bounded by the target.
    let mut reachable: BTreeSet<(usize, u64)> = BTreeSet::from([(0, 0)]);
    for amounts in candidates {
        let (items, total) = (amounts.len(), amounts.iter().sum::<u64>());
        let next: Vec<(usize, u64)> = reachable
            .iter()
            .map(|(have, so_far)| (have + items, so_far + total))
            .filter(|(have, so_far)| *have <= count && *so_far <= sum)
            .collect();
        reachable.extend(next);
    }
    reachable.contains(&(count, sum))
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillOwner,
    KillEtcdLeader,
    Zombie,
    LoseData,
}

#[test]
fn the_history_under_faults_is_consistent() {
    let faults: usize = std::env::var("INDICIA_FAULTS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("INDICIA_FAULTS_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20261205);
    eprintln!("fault test: {faults} faults, seed {seed}");
    let started = Instant::now();
    let mut etcd = EtcdCluster::start(3);
    let root = tempfile::tempdir().unwrap();
    let mut appliances: Vec<Appliance> = Vec::new();
    appliances.push(Appliance::new(root.path(), "a1", &etcd));
    appliances[0].start();
    for id in ["a2", "a3"] {
        let mut joining = Appliance::joining(root.path(), id, &etcd, &appliances[0]);
        joining.start();
        appliances.push(joining);
    }
    let credential = appliances[0].daemon().admin_credential();
    let provider_key = appliances[0].data().join("provider.key");
    for (index, vpsd) in VPSDS.iter().enumerate() {
        appliances[index % APPLIANCES]
            .daemon()
            .provision_funded(*vpsd, Algorithm::Ed25519, FUNDS);
    }
    let directory: Directory = Arc::new(Mutex::new(
        appliances
            .iter()
            .map(|appliance| Some(appliance.daemon().addr))
            .collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let postage = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for worker in 0..2 {
        let (directory, credential, postage, stop, history) = (
            Arc::clone(&directory),
            credential.clone(),
            Arc::clone(&postage),
            Arc::clone(&stop),
            Arc::clone(&history),
        );
        threads.push(std::thread::spawn(move || {
            signer(seed + worker, directory, credential, postage, stop, history)
        }));
    }
    {
        let (directory, credential, stop, history) = (
            Arc::clone(&directory),
            credential.clone(),
            Arc::clone(&stop),
            Arc::clone(&history),
        );
        threads.push(std::thread::spawn(move || {
            treasurer(
                seed + 99,
                directory,
                credential,
                provider_key,
                stop,
                history,
            )
        }));
    }

    // The nemesis.
    let mut rng = Rng::new(seed);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut fenced = 0u64;
    let mut zombie_owned = 0u64;
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let set_address = |index: usize, appliance: &Appliance| {
        directory.lock().unwrap()[index] = appliance.daemon.as_ref().map(|daemon| daemon.addr);
    };
    for _ in 0..faults {
        std::thread::sleep(Duration::from_millis(500 + rng.below(1000)));
        let fault = match rng.below(4) {
            0 => Fault::KillOwner,
            1 => Fault::KillEtcdLeader,
            2 => Fault::Zombie,
            _ => Fault::LoseData,
        };
        // The appliance that owns the most vPSDs now.
        let target = (0..APPLIANCES)
            .max_by_key(|&index| appliances[index].stat("cluster.vpsds_owned"))
            .unwrap();
        match fault {
            Fault::KillOwner | Fault::LoseData => {
                fenced += appliances[target].stat("cluster.fenced");
                appliances[target].kill();
                set_address(target, &appliances[target]);
                std::thread::sleep(Duration::from_millis(rng.below(2 * ttl.as_millis() as u64)));
                if let Fault::LoseData = fault {
                    appliances[target].lose_data();
                }
                appliances[target].start();
                set_address(target, &appliances[target]);
            }
            Fault::KillEtcdLeader => {
                if let Some(leader) = etcd.leader() {
                    etcd.kill(leader);
                    std::thread::sleep(Duration::from_millis(500 + rng.below(1500)));
                    etcd.restart(leader);
                }
            }
            Fault::Zombie => {
                let owned = appliances[target].stat("cluster.vpsds_owned");
                let mut client = appliances[target].daemon().admin();
                appliances[target].signal(nix::sys::signal::Signal::SIGSTOP);
                std::thread::sleep(ttl * 2 + Duration::from_millis(rng.below(1000)));
                appliances[target].signal(nix::sys::signal::Signal::SIGCONT);
                if owned > 0 {
                    zombie_owned += owned;
                    // It believes it owns its vPSDs: sign on it until it learns otherwise.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    'vpsds: for vpsd in VPSDS {
                        loop {
                            match client.call(&Request::Sign {
                                vpsd_id: vpsd,
                                item: item(1),
                            }) {
                                Ok(Response::Error(body))
                                    if body.code == ErrorCode::ClusterUnavailable =>
                                {
                                    assert!(Instant::now() < deadline, "the zombie never woke");
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                                Ok(Response::Error(body))
                                    if matches!(
                                        body.code,
                                        ErrorCode::VpsdMoved | ErrorCode::UnknownVpsd
                                    ) =>
                                {
                                    continue 'vpsds;
                                }
                                Ok(Response::Error(body))
                                    if matches!(
                                        body.code,
                                        ErrorCode::ForwardFailed | ErrorCode::OutcomeUnknown
                                    ) =>
                                {
                                    history.lock().unwrap().signs.push((
                                        vpsd,
                                        vec![1],
                                        Outcome::Unknown,
                                    ));
                                    continue 'vpsds;
                                }
                                // It still owns this one (nobody took it yet), or it
                                // forwarded the request to the owner: a real signature,
                                // recorded like any other.
                                Ok(Response::Signed { indicium }) => {
                                    history.lock().unwrap().signs.push((
                                        vpsd,
                                        vec![1],
                                        Outcome::Signed(vec![indicium]),
                                    ));
                                    continue 'vpsds;
                                }
                                Ok(other) => panic!("unexpected answer {other:?}"),
                                Err(_) => {
                                    history.lock().unwrap().signs.push((
                                        vpsd,
                                        vec![1],
                                        Outcome::Unknown,
                                    ));
                                    break 'vpsds;
                                }
                            }
                        }
                    }
                }
            }
        }
        *counts
            .entry(match fault {
                Fault::KillOwner => "kill -9 owner",
                Fault::KillEtcdLeader => "kill -9 etcd leader",
                Fault::Zombie => "SIGSTOP owner past its lease",
                Fault::LoseData => "data directory lost",
            })
            .or_default() += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    for appliance in &appliances {
        fenced += appliance.stat("cluster.fenced");
    }
    eprintln!(
        "faults: {counts:?}; fenced commits: {fenced}; {:?} so far",
        started.elapsed()
    );

    // Healed: every vPSD served by its owner. The checker.
    let history = history.lock().unwrap();
    let mut admins: Vec<Client> = appliances.iter().map(|a| a.daemon().admin()).collect();
    let mut acknowledged: BTreeMap<(u64, u64), Indicium> = BTreeMap::new();
    let (mut ok, mut unknown) = (0, 0);
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, outcome) in &history.signs {
        match outcome {
            Outcome::Signed(indicia) => {
                ok += 1;
                for indicium in indicia {
                    let key = (indicium.payload.vpsd_id, indicium.payload.piece_number);
                    if let Some(earlier) = acknowledged.insert(key, *indicium) {
                        panic!("piece {key:?} acknowledged twice: {earlier:?} and {indicium:?}");
                    }
                }
            }
            Outcome::Refused(code) => *refused.entry(code.name()).or_default() += 1,
            Outcome::Unknown => unknown += 1,
        }
    }
    eprintln!(
        "signs: {ok} ok, refused {refused:?}, {unknown} unknown; refills: {} ok, {} refused, \
         {} unknown",
        history.refills.iter().filter(|r| r.2 == Some(true)).count(),
        history
            .refills
            .iter()
            .filter(|r| r.2 == Some(false))
            .count(),
        history.refills.iter().filter(|r| r.2.is_none()).count(),
    );
    assert!(ok > 0, "nothing was signed");
    for vpsd in VPSDS {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = admins.iter_mut().find_map(|admin| admin.status(vpsd).ok()) {
                break status;
            }
            assert!(Instant::now() < deadline, "vPSD {vpsd} is served nowhere");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills,
            "vPSD {vpsd}: AR + DR = CS"
        );
        let acked: Vec<(&(u64, u64), &Indicium)> =
            acknowledged.range((vpsd, 0)..=(vpsd, u64::MAX)).collect();
        let acked_postage: u64 = acked.iter().map(|(_, i)| i.payload.postage_mills).sum();
        let last = acked.last().map_or(0, |((_, piece), _)| *piece);
        assert!(
            last <= status.piece_count,
            "vPSD {vpsd}: piece {last} beyond the count"
        );
        let unknown_signs: Vec<Vec<u64>> = history
            .signs
            .iter()
            .filter(|(id, _, outcome)| *id == vpsd && matches!(outcome, Outcome::Unknown))
            .map(|(_, postages, _)| postages.clone())
            .collect();
        let missing_items = usize::try_from(status.piece_count).unwrap() - acked.len();
        let extra_postage = status
            .ascending_mills
            .checked_sub(acked_postage)
            .unwrap_or_else(|| panic!("vPSD {vpsd}: AR below the acknowledged postage"));
        assert!(
            whole_subset(&unknown_signs, missing_items, extra_postage),
            "vPSD {vpsd}: {missing_items} pieces and {extra_postage} mills beyond what was \
             acknowledged are not a set of whole operations with unknown outcome \
             ({unknown_signs:?})"
        );
        let acked_refills: u64 = history
            .refills
            .iter()
            .filter(|(id, _, outcome)| *id == vpsd && *outcome == Some(true))
            .map(|(_, amount, _)| amount)
            .sum();
        let unknown_refills: Vec<Vec<u64>> = history
            .refills
            .iter()
            .filter(|(id, _, outcome)| *id == vpsd && outcome.is_none())
            .map(|(_, amount, _)| vec![*amount])
            .collect();
        let extra_funds = status
            .control_total_mills
            .checked_sub(FUNDS + acked_refills)
            .unwrap_or_else(|| panic!("vPSD {vpsd}: CS below the acknowledged funds"));
        let count = (0..=unknown_refills.len())
            .find(|&count| whole_subset(&unknown_refills, count, extra_funds));
        assert!(
            count.is_some(),
            "vPSD {vpsd}: {extra_funds} mills of CS beyond what was acknowledged are not a set \
             of refills with unknown outcome"
        );
    }
    if zombie_owned > 0 {
        assert!(
            fenced >= 1,
            "no stale commit was refused by the fence in the zombie runs"
        );
    }
    eprintln!("fault test passed in {:?}", started.elapsed());
}
