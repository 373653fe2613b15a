//! The real `indiciad` killed with SIGKILL at random points during heavy signing, and
//! stopped with SIGTERM under load: after a restart, every acknowledged indicium is in the
//! journal and the registers are consistent.
//!
//! "In the journal" is checked through the idempotency window, which recovery rebuilds
//! from the journal alone: resending an acknowledged request with its request id must
//! return the very same bytes (ECDSA signatures are randomized, so equal bytes can only
//! come from the journal), and must not charge again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Rng;
use indicia_client::Client;
use indicia_proto::{Algorithm, Indicium, Request, Response};
use support::{item, Daemon};

const VPSDS: [u64; 3] = [31, 32, 33];

/// An acknowledged request: its id, what was asked, and the indicium returned.
type Acked = (u64, Request, Indicium);

/// Signs until told to stop or the connection breaks; records what was acknowledged.
fn sign_until_stopped(
    mut client: Client,
    seed: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let mut rng = Rng::new(seed);
    let mut in_flight = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        while in_flight.len() < 16 {
            let id = client.next_request_id();
            let request = Request::Sign {
                vpsd_id: VPSDS[rng.below(3) as usize],
                item: item(1 + rng.below(500)),
            };
            if client.send(id, &request).is_err() {
                return;
            }
            in_flight.insert(id, request);
        }
        match client.recv() {
            Ok((id, Response::Signed { indicium })) => {
                let request = in_flight.remove(&id).unwrap();
                acked.lock().unwrap().push((id, request, indicium));
            }
            Ok((_, other)) => panic!("unexpected answer {other:?}"),
            // Killed: whatever was not answered was not acknowledged.
            Err(_) => return,
        }
    }
}

/// A load in progress: its stop flag, what it has had acknowledged, its threads.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_load(daemon: &Daemon, clients: u64, seed: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let threads = (0..clients)
        .map(|n| {
            let client = daemon.admin();
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            std::thread::spawn(move || sign_until_stopped(client, seed * 100 + n, stop, acked))
        })
        .collect();
    Load {
        stop,
        acked,
        threads,
    }
}

/// After a restart: every acknowledged request answers again with the same bytes and
/// charges nothing more; registers hold together.
fn check_acknowledged(daemon: &Daemon, acked: &[Acked]) {
    let mut admin = daemon.admin();
    let before: Vec<_> = VPSDS
        .iter()
        .map(|vpsd| admin.status(*vpsd).unwrap())
        .collect();
    for (status, vpsd) in before.iter().zip(VPSDS) {
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills
        );
        let mine: Vec<&Indicium> = acked
            .iter()
            .map(|(_, _, indicium)| indicium)
            .filter(|indicium| indicium.payload.vpsd_id == vpsd)
            .collect();
        let postage: u64 = mine.iter().map(|i| i.payload.postage_mills).sum();
        assert!(
            status.ascending_mills >= postage,
            "vPSD {vpsd}: AR {} below the acknowledged {postage}",
            status.ascending_mills
        );
        let max_piece = mine
            .iter()
            .map(|i| i.payload.piece_number)
            .max()
            .unwrap_or(0);
        assert!(status.piece_count >= max_piece);
    }
    for chunk in acked.chunks(64) {
        for (id, request, _) in chunk {
            admin.send(*id, request).unwrap();
        }
        for _ in chunk {
            let (id, response) = admin.recv().unwrap();
            let (_, _, indicium) = chunk.iter().find(|(sent, _, _)| *sent == id).unwrap();
            assert_eq!(
                response,
                Response::Signed {
                    indicium: *indicium
                },
                "request {id}: the journal must hold the acknowledged indicium"
            );
        }
    }
    let after: Vec<_> = VPSDS
        .iter()
        .map(|vpsd| admin.status(*vpsd).unwrap())
        .collect();
    assert_eq!(before, after, "retries charge nothing");
}

#[test]
fn kill_9_during_heavy_signing_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), None);
    for vpsd in VPSDS {
        daemon.provision_funded(vpsd, Algorithm::EcdsaP256, 100_000_000);
    }
    let mut all_acked = Vec::new();
    let mut rng = Rng::new(0x5EED);
    for round in 0..5 {
        let Load {
            stop,
            acked,
            threads,
        } = start_load(&daemon, 4, round + 1);
        // A random kill point, while every client has requests in flight.
        std::thread::sleep(Duration::from_millis(100 + rng.below(400)));
        daemon.kill();
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            thread.join().unwrap();
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        assert!(
            !acked.is_empty(),
            "round {round}: the load signed something"
        );
        all_acked.extend(acked);
        daemon = Daemon::start(dir.path(), None);
        check_acknowledged(&daemon, &all_acked);
    }
    assert!(all_acked.len() > 500, "{} acknowledged", all_acked.len());
}

#[test]
fn sigterm_under_load_exits_zero_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    for vpsd in VPSDS {
        daemon.provision_funded(vpsd, Algorithm::Ed25519, 100_000_000);
    }
    let Load {
        stop,
        acked,
        threads,
    } = start_load(&daemon, 4, 77);
    std::thread::sleep(Duration::from_millis(400));
    let status = daemon.terminate();
    assert!(status.success(), "exit status {status:?}");
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() > 100, "{} acknowledged", acked.len());
    let daemon = Daemon::start(dir.path(), None);
    let log = daemon.log_text();
    assert!(
        !log.contains("torn"),
        "a graceful stop leaves no torn tail: {log}"
    );
    check_acknowledged(&daemon, &acked);
}
