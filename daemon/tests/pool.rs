//! The client library's [`Pool`] against the real `indiciad` on loopback: batching of many
//! callers, routing to the owning shard, a connection cut while answers are on their way
//! (retried with the same ids, charged once), `busy`, and the async API on tokio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicia_client::{ClientError, Pool};
use indicia_proto::{Algorithm, ErrorCode, Indicium};
use support::{item, verifies, Daemon};

const POSTAGE: u64 = 730;

fn stat(daemon: &Daemon, name: &str) -> u64 {
    daemon
        .admin()
        .stats()
        .unwrap()
        .into_iter()
        .find(|entry| entry.name == name)
        .map_or_else(|| panic!("no stat {name}"), |entry| entry.value)
}

/// The pieces of `indicia`, checked to be the contiguous run `first..first + len`.
fn assert_contiguous(mut pieces: Vec<u64>, first: u64) {
    pieces.sort_unstable();
    let expected: Vec<u64> = (first..first + pieces.len() as u64).collect();
    assert_eq!(
        pieces, expected,
        "piece numbers are not contiguous and unique"
    );
}

#[test]
fn many_threads_signing_for_one_vpsd_share_frames_and_each_gets_its_own_result() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(1001, Algorithm::EcdsaP256, 50_000_000);
    let spki = daemon.admin().public_key(1001).unwrap().2;
    let pool = Pool::connect(&[daemon.addr.to_string()], &daemon.admin_credential()).unwrap();
    let threads = 48;
    let per_thread = 25;
    // Every fifth caller asks for postage over the appliance's limit: its own call fails,
    // and the others in the same frame are signed.
    let results: Vec<(usize, Result<Indicium, ClientError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let pool = pool.clone();
                scope.spawn(move || {
                    (0..per_thread)
                        .map(|call| {
                            let bad = (thread * per_thread + call) % 5 == 0;
                            let postage = if bad { 1_000_000 } else { POSTAGE };
                            (usize::from(bad), pool.sign(1001, item(postage)))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect()
    });
    let mut pieces = Vec::new();
    for (bad, result) in &results {
        match (bad, result) {
            (0, Ok(indicium)) => {
                assert_eq!(indicium.payload.postage_mills, POSTAGE);
                assert!(verifies(indicium, &spki));
                pieces.push(indicium.payload.piece_number);
            }
            (1, Err(err)) => assert_eq!(
                err.refusal().map(|body| body.code),
                Some(ErrorCode::PostageOutOfRange),
                "{err}"
            ),
            (_, other) => panic!("caller with bad = {bad} got {other:?}"),
        }
    }
    let good = pieces.len() as u64;
    assert_eq!(good, (threads * per_thread) as u64 * 4 / 5);
    assert_contiguous(pieces, 1);
    let status = pool.status(1001).unwrap();
    assert_eq!(status.piece_count, good);
    assert_eq!(status.ascending_mills, good * POSTAGE);
    let stats = pool.stats();
    assert_eq!(stats.calls, (threads * per_thread) as u64 + 1);
    assert!(stats.batches > 0, "{stats:?}");
    assert!(
        stats.frames_sent < stats.calls,
        "calls waiting together did not share frames: {stats:?}"
    );
    // One connection for the vPSD's shard, one for the main port.
    assert_eq!(stats.connections, 2, "{stats:?}");
    assert_eq!(stats.resends, 0, "{stats:?}");
}

#[test]
fn a_routing_pool_sends_every_vpsd_to_its_shard_and_nothing_crosses_shards() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let vpsds: Vec<u64> = (2001..2009).collect();
    for &vpsd in &vpsds {
        daemon.provision_funded(vpsd, Algorithm::Ed25519, 1_000_000);
    }
    let crossed_before = stat(&daemon, "cross_shard.requests");
    let pool = Pool::connect(&[daemon.addr.to_string()], &daemon.admin_credential()).unwrap();
    let topology = pool
        .topology(&daemon.addr.to_string())
        .unwrap()
        .expect("the appliance has shard ports by default");
    assert_eq!(topology.shards, 2);
    assert_eq!(topology.ports.len(), 2);
    let mut shards_used = BTreeSet::new();
    for &vpsd in &vpsds {
        let (address, shard) = pool.route_of(vpsd).unwrap();
        assert_eq!(address, daemon.addr.to_string());
        let shard = shard.expect("routed to a shard");
        assert_eq!(shard, indicia_proto::shard_of(vpsd, 2));
        shards_used.insert(shard);
        for _ in 0..5 {
            pool.sign(vpsd, item(POSTAGE)).unwrap();
        }
        assert_eq!(pool.status(vpsd).unwrap().piece_count, 5);
    }
    assert_eq!(shards_used.len(), 2, "the 8 vPSDs fall on both shards");
    assert_eq!(stat(&daemon, "cross_shard.requests"), crossed_before);
    // The counter counts: one plain connection lands on one shard, and signs for all 8.
    let mut plain = daemon.admin();
    for &vpsd in &vpsds {
        plain.sign(vpsd, item(POSTAGE)).unwrap();
    }
    assert!(stat(&daemon, "cross_shard.requests") > crossed_before);
    // Without shard ports, the same pool still works through the main port.
    let routed_plain = Pool::builder(&[daemon.addr.to_string()], &daemon.admin_credential())
        .shard_aware(false)
        .build()
        .unwrap();
    assert_eq!(routed_plain.route_of(2001).unwrap().1, None);
    routed_plain.sign(2001, item(POSTAGE)).unwrap();
}

/// A TCP proxy in front of the appliance's main port that can drop the next answers on
/// their way back and cut the connection: the requests reached the appliance and were
/// carried out, the client never saw the answers.
struct Proxy {
    addr: std::net::SocketAddr,
    cut_next_answer: Arc<AtomicBool>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections accepted so far; the answers of those numbered below `silenced` are
    /// dropped, their connections left open (a peer that stops answering).
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    silenced: Arc<std::sync::atomic::AtomicUsize>,
    /// How long each chunk of answers is held before it is passed on, in ms.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut_next_answer = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let silenced = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let delay_ms = Arc::clone(&delay_ms);
            let cut_next_answer = Arc::clone(&cut_next_answer);
            let cuts = Arc::clone(&cuts);
            let (accepted, silenced) = (Arc::clone(&accepted), Arc::clone(&silenced));
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { return };
                    let number = accepted.fetch_add(1, Ordering::AcqRel);
                    let server = TcpStream::connect(upstream).unwrap();
                    let (client_in, server_out) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    // Requests: straight through.
                    std::thread::spawn(move || pump(client_in, server_out, None));
                    let cut = Cut {
                        armed: Arc::clone(&cut_next_answer),
                        cuts: Arc::clone(&cuts),
                        number,
                        silenced: Arc::clone(&silenced),
                        delay_ms: Arc::clone(&delay_ms),
                    };
                    std::thread::spawn(move || pump(server, client, Some(cut)));
                }
            });
        }
        Self {
            addr,
            cut_next_answer,
            cuts,
            accepted,
            silenced,
            delay_ms,
        }
    }
}

/// An appliance without shard ports (every request then goes through the proxy), with
/// `vpsd` provisioned and funded, and a proxy in front of it.
fn behind_proxy(dir: &std::path::Path, vpsd: u64, funds: u64) -> (Daemon, Proxy) {
    let config = support::write_config(dir, "[server]\nshard_ports = false\n", &[]);
    let daemon = Daemon::start(dir, Some(&config));
    daemon.provision_funded(vpsd, Algorithm::Ed25519, funds);
    let proxy = Proxy::start(daemon.addr);
    (daemon, proxy)
}

/// What the answers' pump of one connection may do to them.
struct Cut {
    armed: Arc<AtomicBool>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    number: usize,
    silenced: Arc<std::sync::atomic::AtomicUsize>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: Option<Cut>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let read = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if let Some(cut) = &cut {
            if cut.number < cut.silenced.load(Ordering::Acquire) {
                // Swallowed; the connection stays open.
                continue;
            }
            let delay = cut.delay_ms.load(Ordering::Acquire);
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if cut.armed.swap(false, Ordering::AcqRel) {
                // These answers are lost, and so is the connection.
                cut.cuts.fetch_add(1, Ordering::AcqRel);
                break;
            }
        }
        if to.write_all(&buf[..read]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[test]
fn a_connection_cut_before_the_answers_is_retried_with_the_same_ids_and_charged_once() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, proxy) = behind_proxy(dir.path(), 3001, 10_000_000);
    let pool = Pool::connect(&[proxy.addr.to_string()], &daemon.admin_credential()).unwrap();
    assert_eq!(pool.topology(&proxy.addr.to_string()).unwrap(), None);
    pool.sign(3001, item(POSTAGE)).unwrap();
    let mut pieces = Vec::new();
    for _round in 0..3 {
        proxy.cut_next_answer.store(true, Ordering::Release);
        let results: Vec<Indicium> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| scope.spawn(|| pool.sign(3001, item(POSTAGE)).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        pieces.extend(results.iter().map(|indicium| indicium.payload.piece_number));
    }
    assert_eq!(
        proxy.cuts.load(Ordering::Acquire),
        3,
        "every round lost answers"
    );
    assert_contiguous(pieces, 2);
    let status = pool.status(3001).unwrap();
    // 1 + 3 x 16 indicia charged, each once, although 3 rounds of answers were lost.
    assert_eq!(status.piece_count, 49);
    assert_eq!(status.ascending_mills, 49 * POSTAGE);
    let stats = pool.stats();
    assert!(stats.resends >= 3, "{stats:?}");
    assert!(stats.connections >= 4, "{stats:?}");
}

#[test]
fn a_connection_that_stops_answering_is_replaced_after_a_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, proxy) = behind_proxy(dir.path(), 3501, 1_000_000);
    let pool = Pool::builder(&[proxy.addr.to_string()], &daemon.admin_credential())
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let first = pool.sign(3501, item(POSTAGE)).unwrap();
    // From now on the connection open now brings no answer back, and is not closed.
    proxy
        .silenced
        .store(proxy.accepted.load(Ordering::Acquire), Ordering::Release);
    let err = pool.sign(3501, item(POSTAGE)).unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { sent: true }), "{err}");
    // The pool gave the silent connection up: the next call goes on a new one, and the
    // one that timed out was charged (its request reached the appliance).
    let third = pool.sign(3501, item(POSTAGE)).unwrap();
    assert_eq!(third.payload.piece_number, first.payload.piece_number + 2);
    assert_eq!(pool.status(3501).unwrap().piece_count, 3);
    assert!(pool.stats().connections >= 2, "{:?}", pool.stats());
}

#[test]
fn a_caller_that_times_out_in_a_sent_batch_leaves_its_batch_mates_their_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, proxy) = behind_proxy(dir.path(), 3601, 1_000_000);
    // One frame of the vPSD's calls in flight at a time: calls made meanwhile wait together.
    let pool = Pool::builder(&[proxy.addr.to_string()], &daemon.admin_credential())
        .timeout(Duration::from_millis(1500))
        .frames_per_vpsd_max(1)
        .build()
        .unwrap();
    // Every answer now takes 1 s to come back.
    proxy.delay_ms.store(1000, Ordering::Release);
    let (first, early, late) = std::thread::scope(|scope| {
        let first = scope.spawn(|| pool.sign(3601, item(POSTAGE)));
        // Both join the next frame, written when the first is answered (~1 s), and answered
        // ~1 s later: after the early caller's time limit (~1.6 s), before the late one's
        // (~2.25 s).
        std::thread::sleep(Duration::from_millis(100));
        let early = scope.spawn(|| pool.sign(3601, item(POSTAGE)));
        std::thread::sleep(Duration::from_millis(650));
        let late = scope.spawn(|| pool.sign(3601, item(POSTAGE)));
        (
            first.join().unwrap(),
            early.join().unwrap(),
            late.join().unwrap(),
        )
    });
    let first = first.unwrap();
    let early = early.unwrap_err();
    assert!(
        matches!(early, ClientError::TimedOut { sent: true }),
        "{early}"
    );
    // The late caller gets its own item's indicium: the early one's was signed before it.
    let late = late.unwrap();
    assert_eq!(late.payload.piece_number, first.payload.piece_number + 2);
    assert!(pool.stats().batches >= 1, "{:?}", pool.stats());
    proxy.delay_ms.store(0, Ordering::Release);
    assert_eq!(pool.status(3601).unwrap().piece_count, 3);
}

#[test]
fn busy_answers_are_retried_until_every_caller_is_signed() {
    let dir = tempfile::tempdir().unwrap();
    // One request in flight per shard, and no batching: most frames meet `busy`.
    let config = support::write_config(dir.path(), "[server]\ninflight_per_shard = 1\n", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(4001, Algorithm::Ed25519, 10_000_000);
    let pool = Pool::builder(&[daemon.addr.to_string()], &daemon.admin_credential())
        .batching(false)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let pieces: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|_| {
                scope.spawn(|| {
                    (0..5)
                        .map(|_| pool.sign(4001, item(POSTAGE)).unwrap().payload.piece_number)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_contiguous(pieces, 1);
    let stats = pool.stats();
    assert!(stats.busy > 0, "nothing met busy: {stats:?}");
    assert_eq!(stats.batches, 0, "{stats:?}");
    assert_eq!(pool.status(4001).unwrap().ascending_mills, 160 * POSTAGE);
    assert!(stat(&daemon, "errors") >= stats.busy);
}

#[test]
fn the_async_api_serves_many_tasks_on_tokio() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(5001, Algorithm::EcdsaP256, 10_000_000);
    daemon.provision_funded(5002, Algorithm::Ed25519, 10_000_000);
    let pool = Pool::connect(&[daemon.addr.to_string()], &daemon.admin_credential()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pieces = runtime.block_on(async {
        let tasks: Vec<_> = (0..200u64)
            .map(|task| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let vpsd = 5001 + task % 2;
                    let indicium = pool.sign_async(vpsd, item(POSTAGE)).await.unwrap();
                    (vpsd, indicium.payload.piece_number)
                })
            })
            .collect();
        let mut pieces = Vec::new();
        for task in tasks {
            pieces.push(task.await.unwrap());
        }
        pieces
    });
    for vpsd in [5001, 5002] {
        let own: Vec<u64> = pieces
            .iter()
            .filter(|(of, _)| *of == vpsd)
            .map(|(_, piece)| *piece)
            .collect();
        assert_eq!(own.len(), 100);
        assert_contiguous(own, 1);
    }
    assert!(pool.stats().frames_sent < 200, "{:?}", pool.stats());
}

#[test]
fn a_pool_whose_appliance_is_gone_times_out_and_says_whether_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(6001, Algorithm::Ed25519, 1_000_000);
    let pool = Pool::builder(&[daemon.addr.to_string()], &daemon.admin_credential())
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    pool.sign(6001, item(POSTAGE)).unwrap();
    daemon.kill();
    // The first call may have been written before the pool saw the connection end (then
    // its outcome is unknown); by the end of its time limit the pool knows, and the next
    // call is never written.
    let err = pool.sign(6001, item(POSTAGE)).unwrap_err();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{err}");
    let err = pool.sign(6001, item(POSTAGE)).unwrap_err();
    assert!(
        matches!(err, ClientError::TimedOut { sent: false }),
        "expected a time-out before sending, got {err}"
    );
    // A bad credential is refused at once, not retried.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let stranger = indicia_client::Credential::new("stranger", [7u8; 32]);
    let err = Pool::connect(&[daemon.addr.to_string()], &stranger).unwrap_err();
    assert!(err.refusal().is_some(), "{err}");
}

#[test]
fn a_pool_follows_an_appliance_that_restarts_on_other_shard_ports() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let addr = daemon.addr.to_string();
    daemon.provision_funded(7001, Algorithm::Ed25519, 1_000_000);
    let pool = Pool::connect(&[addr.as_str()], &daemon.admin_credential()).unwrap();
    let first = pool.sign(7001, item(POSTAGE)).unwrap();
    let ports = pool.topology(&addr).unwrap().unwrap().ports;
    assert!(daemon.terminate().success());
    // The same main port; the shard ports are the system's pick again.
    let daemon = Daemon::start_on(dir.path(), None, &addr);
    let second = pool.sign(7001, item(POSTAGE)).unwrap();
    assert_eq!(second.payload.piece_number, first.payload.piece_number + 1);
    let now = pool.topology(&addr).unwrap().unwrap().ports;
    assert_eq!(now.len(), ports.len());
    let stats = pool.stats();
    assert!(
        stats.connections >= 4,
        "reconnected to both ports: {stats:?}"
    );
    assert_eq!(pool.status(7001).unwrap().piece_count, 2);
    drop(daemon);
}
