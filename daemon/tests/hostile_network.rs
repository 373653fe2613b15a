//! A hostile network: thousands of connections that send garbage, half frames, wrong
//! versions, handshakes out of order or with a replayed proof, or close mid-frame, while
//! honest clients keep signing. Every honest indicium must be correct, the registers must
//! add up, and the appliance's memory must stay bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)] // the RSS figures are worth seeing with --nocapture

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicia_proto::message::NONCE_BYTES;
use indicia_proto::{Algorithm, Request};
use support::{item, verifies, Daemon};

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

fn frame(request: &Request, version: u8, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let len = request.encode_frame(version, id, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

fn hello() -> Request {
    Request::Hello {
        version_min: 1,
        version_max: 1,
        client_id: "admin".into(),
        client_nonce: [7; NONCE_BYTES],
    }
}

/// One hostile connection of kind `kind`; returns once the appliance has closed it or
/// the attacker gave up on it.
fn attack(addr: std::net::SocketAddr, kind: u64, n: u64) {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let bytes: Vec<u8> = match kind {
        // Garbage.
        0 => (0..200).map(|i| (i * 31 + n) as u8).collect(),
        // Half a frame, then close.
        1 => {
            let mut f = frame(&hello(), 1, n);
            f.truncate(f.len() / 2);
            f
        }
        // A frame of a version nobody speaks.
        2 => frame(&Request::Stats, 9, n),
        // Hello twice: the handshake out of order.
        3 => [frame(&hello(), 1, 1), frame(&hello(), 1, 2)].concat(),
        // A replayed proof: a hello, then an authenticate with a proof made for another
        // server nonce.
        4 => [
            frame(&hello(), 1, 1),
            frame(&Request::Authenticate { proof: [0x5A; 32] }, 1, 2),
        ]
        .concat(),
        // A request before any handshake.
        5 => frame(&Request::Status { vpsd_id: 1 }, 1, 3),
        // A header only, declaring a body, then close mid-frame.
        _ => frame(&Request::Status { vpsd_id: 1 }, 1, 4)[..32].to_vec(),
    };
    let _ = stream.write_all(&bytes);
    if kind == 1 || kind == 6 {
        // Close mid-frame without waiting.
        return;
    }
    // Read until the appliance closes (it answers with an error first).
    let mut sink = [0u8; 4096];
    while let Ok(read) = stream.read(&mut sink) {
        if read == 0 {
            break;
        }
    }
}

#[test]
fn thousands_of_hostile_connections_do_not_disturb_honest_signing() {
    // Room for the attackers' sockets (the appliance inherits the limit).
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(
        dir.path(),
        "[server]\nframe_timeout_ms = 500\nhandshake_timeout_ms = 1000",
        &[],
    );
    let daemon = Daemon::start(dir.path(), Some(&config));
    let pid = daemon.child.id();
    let vpsds = [21u64, 22, 23, 24];
    for vpsd in vpsds {
        daemon.provision_funded(vpsd, Algorithm::EcdsaP256, 1_000_000);
    }
    // Warm up, then take the baseline.
    daemon.admin().sign(21, item(1)).unwrap();
    let baseline = rss_kib(pid);

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (done, peak) = (Arc::clone(&done), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(rss_kib(pid), Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Honest clients: one per vPSD, signing throughout the attack.
    let honest: Vec<_> = vpsds
        .iter()
        .map(|&vpsd| {
            let mut client = daemon.admin();
            std::thread::spawn(move || {
                let (_, _, spki) = client.public_key(vpsd).unwrap();
                let mut signed = Vec::new();
                for n in 0..150u64 {
                    signed.push(client.sign(vpsd, item(1 + n % 90)).unwrap());
                }
                (vpsd, spki, signed, client.status(vpsd).unwrap())
            })
        })
        .collect();

    // The attackers: 16 threads, 2 400 connections in all, every kind.
    let attackers: Vec<_> = (0..16u64)
        .map(|thread| {
            let addr = daemon.addr;
            std::thread::spawn(move || {
                for n in 0..150u64 {
                    attack(addr, (thread + n) % 7, thread * 1000 + n);
                }
            })
        })
        .collect();
    for attacker in attackers {
        attacker.join().unwrap();
    }
    for thread in honest {
        let (vpsd, spki, signed, status) = thread.join().unwrap();
        assert_eq!(signed.len(), 150);
        let mut postage = 0;
        for (n, indicium) in signed.iter().enumerate() {
            assert!(verifies(indicium, &spki), "vPSD {vpsd} piece {n}");
            assert_eq!(indicium.payload.vpsd_id, vpsd);
            postage += indicium.payload.postage_mills;
        }
        // Contiguous pieces (21 had one warm-up indicium first).
        let first = signed[0].payload.piece_number;
        for (n, indicium) in signed.iter().enumerate() {
            assert_eq!(indicium.payload.piece_number, first + n as u64);
        }
        assert_eq!(status.piece_count, first + 149);
        let warm_up = if vpsd == 21 { 1 } else { 0 };
        assert_eq!(status.ascending_mills, postage + warm_up);
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills
        );
    }
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Acquire);
    // Every hostile connection was refused and closed; memory stayed bounded.
    let stats = daemon.admin().stats().unwrap();
    let value = |name: &str| {
        stats
            .iter()
            .find(|entry| entry.name == name)
            .map_or(0, |entry| entry.value)
    };
    assert!(value("connections.accepted") >= 2_400, "{stats:?}");
    assert!(value("connection_errors") >= 2_000, "{stats:?}");
    assert!(value("connections.open") <= 2, "{stats:?}");
    eprintln!("appliance RSS: {baseline} KiB before, {peak} KiB at the peak");
    assert!(
        peak < baseline + 128 * 1024,
        "memory grew from {baseline} KiB to {peak} KiB"
    );
    assert!(!daemon.log_text().contains("panic"));
}
