//! The real `indiciad` binary on loopback, driven through the real client: concurrency,
//! retries, hostile clients, access control, the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Rng;
use indicia_client::{Client, ClientError, Credential};
use indicia_proto::frame::{FrameHeader, HEADER_BYTES};
use indicia_proto::{
    Algorithm, Decoded, ErrorCode, FrameDecoder, Indicium, ItemResult, Request, Response, Role,
};
use support::{item, verifies, Daemon, User};

fn error_code(err: &ClientError) -> ErrorCode {
    err.refusal()
        .unwrap_or_else(|| panic!("expected a refusal, got {err}"))
        .code
}

#[test]
fn many_clients_sign_concurrently_for_shared_vpsds() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let vpsds = [
        (1001, Algorithm::EcdsaP256),
        (1002, Algorithm::Ed25519),
        (1003, Algorithm::EcdsaP256),
        (1004, Algorithm::Ed25519),
    ];
    for (vpsd, algorithm) in vpsds {
        daemon.provision_funded(vpsd, algorithm, 5_000_000);
    }
    let threads: Vec<_> = (0..8u64)
        .map(|thread| {
            let mut client = daemon.admin();
            std::thread::spawn(move || {
                let mut rng = Rng::new(thread + 1);
                let mut signed = Vec::new();
                for _round in 0..40 {
                    // A window of pipelined requests, single and batched, over all vPSDs.
                    let mut sent = HashMap::new();
                    for _ in 0..8 {
                        let vpsd_id = vpsds[rng.below(4) as usize].0;
                        let id = client.next_request_id();
                        let request = if rng.below(2) == 0 {
                            Request::Sign {
                                vpsd_id,
                                item: item(1 + rng.below(100)),
                            }
                        } else {
                            let items = (0..1 + rng.below(6))
                                .map(|_| item(1 + rng.below(100)))
                                .collect();
                            Request::SignBatch { vpsd_id, items }
                        };
                        client.send(id, &request).unwrap();
                        sent.insert(id, request);
                    }
                    for _ in 0..8 {
                        let (id, response) = client.recv().unwrap();
                        let request = sent.remove(&id).expect("an answer to a request sent");
                        match (request, response) {
                            (Request::Sign { item, .. }, Response::Signed { indicium }) => {
                                assert_eq!(indicium.payload.postage_mills, item.postage_mills);
                                signed.push(indicium);
                            }
                            (
                                Request::SignBatch { items, .. },
                                Response::BatchSigned { results },
                            ) => {
                                assert_eq!(results.len(), items.len());
                                for (item, result) in items.iter().zip(results) {
                                    let ItemResult::Signed(indicium) = result else {
                                        panic!("item refused: {result:?}");
                                    };
                                    assert_eq!(indicium.payload.postage_mills, item.postage_mills);
                                    signed.push(indicium);
                                }
                            }
                            (request, response) => panic!("{request:?} answered {response:?}"),
                        }
                    }
                }
                signed
            })
        })
        .collect();
    let mut by_vpsd: BTreeMap<u64, Vec<Indicium>> = BTreeMap::new();
    for thread in threads {
        for indicium in thread.join().unwrap() {
            by_vpsd
                .entry(indicium.payload.vpsd_id)
                .or_default()
                .push(indicium);
        }
    }
    let mut admin = daemon.admin();
    let mut total = 0;
    for (vpsd, algorithm) in vpsds {
        let indicia = by_vpsd.remove(&vpsd).unwrap_or_default();
        let status = admin.status(vpsd).unwrap();
        let (key_algorithm, _, spki) = admin.public_key(vpsd).unwrap();
        assert_eq!(key_algorithm, algorithm);
        let postage: u64 = indicia.iter().map(|i| i.payload.postage_mills).sum();
        assert_eq!(
            status.ascending_mills, postage,
            "vPSD {vpsd}: AR = acknowledged postage"
        );
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills
        );
        assert_eq!(status.control_total_mills, 5_000_000);
        let mut pieces: Vec<u64> = indicia.iter().map(|i| i.payload.piece_number).collect();
        pieces.sort_unstable();
        let expected: Vec<u64> = (1..=status.piece_count).collect();
        assert_eq!(
            pieces, expected,
            "vPSD {vpsd}: pieces contiguous and unique"
        );
        for indicium in &indicia {
            assert!(verifies(indicium, &spki), "vPSD {vpsd}: signature");
            assert_eq!(indicium.payload.algorithm, algorithm);
        }
        total += indicia.len();
    }
    assert!(total > 2000, "{total} indicia");
    // The stats agree, and they show sessions that took more than one request.
    let stats: HashMap<String, u64> = admin
        .stats()
        .unwrap()
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect();
    assert_eq!(stats["indicia"], total as u64);
    assert!(stats["sessions"] < stats["requests"], "{stats:?}");
    assert!(stats["session_size.max"] > 1, "{stats:?}");
    assert!(stats["cross_shard.requests"] > 0, "{stats:?}");
    assert_eq!(stats["shards"], 2);
}

#[test]
fn a_request_id_sent_twice_is_charged_once_also_across_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(7, Algorithm::EcdsaP256, 10_000);
    let mut client = daemon.admin();
    let id = client.next_request_id();
    let request = Request::Sign {
        vpsd_id: 7,
        item: item(730),
    };
    let first = client.call_with_id(id, &request).unwrap();
    let again = client.call_with_id(id, &request).unwrap();
    assert_eq!(first, again, "same connection: the same answer");
    drop(client);
    let mut reconnected = daemon.admin();
    let third = reconnected.call_with_id(id, &request).unwrap();
    assert_eq!(first, third, "new connection: the same answer");
    let batch = Request::SignBatch {
        vpsd_id: 7,
        items: vec![item(730)],
    };
    assert_eq!(
        reconnected.call_with_id(id, &batch).unwrap(),
        Response::BatchSigned {
            results: vec![match &first {
                Response::Signed { indicium } => ItemResult::Signed(*indicium),
                other => panic!("{other:?}"),
            }]
        },
        "a one-item batch with the same fields is the same request"
    );
    let status = reconnected.status(7).unwrap();
    assert_eq!(status.ascending_mills, 730);
    assert_eq!(status.piece_count, 1);
    // The same id with other content is refused and charges nothing.
    let other = Request::Sign {
        vpsd_id: 7,
        item: item(731),
    };
    match reconnected.call_with_id(id, &other).unwrap() {
        Response::Error(body) => assert_eq!(body.code, ErrorCode::RequestIdReused),
        response => panic!("{response:?}"),
    }
    assert_eq!(reconnected.status(7).unwrap(), status);
}

/// The idempotency key is (client, vPSD, request id), whatever shard holds the vPSD: the
/// same request id for vPSDs on the same shard and on the other shard is each a request of
/// its own (signed and charged once, a retry answered the same), and for the same vPSD with
/// other content it is `request-id-reused`. (It used to depend on the shard: on the first
/// vPSD's shard the id was taken, on the other it was not.)
#[test]
fn a_request_id_is_keyed_per_vpsd_on_every_shard_alike() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let shard = |vpsd_id: u64| indiciad::server::shard_of(vpsd_id, 2);
    let first: u64 = 100;
    let same_shard = (first + 1..).find(|id| shard(*id) == shard(first)).unwrap();
    let other_shard = (first + 1..).find(|id| shard(*id) != shard(first)).unwrap();
    for vpsd_id in [first, same_shard, other_shard] {
        daemon.provision_funded(vpsd_id, Algorithm::EcdsaP256, 10_000);
    }
    let mut client = daemon.admin();
    let id = client.next_request_id();
    let sign = |vpsd_id: u64, postage: u64| Request::Sign {
        vpsd_id,
        item: item(postage),
    };
    let mut answers = Vec::new();
    for (vpsd_id, postage) in [(first, 500), (same_shard, 600), (other_shard, 700)] {
        let answer = client.call_with_id(id, &sign(vpsd_id, postage)).unwrap();
        let Response::Signed { indicium } = &answer else {
            panic!("vPSD {vpsd_id} (shard {}): {answer:?}", shard(vpsd_id));
        };
        assert_eq!(indicium.payload.vpsd_id, vpsd_id);
        answers.push((vpsd_id, postage, answer));
    }
    // Retries, on a new connection: the same answers, charged once.
    let mut again = daemon.admin();
    for (vpsd_id, postage, answer) in &answers {
        assert_eq!(
            &again.call_with_id(id, &sign(*vpsd_id, *postage)).unwrap(),
            answer
        );
        let status = again.status(*vpsd_id).unwrap();
        assert_eq!(
            (status.ascending_mills, status.piece_count),
            (*postage, 1),
            "vPSD {vpsd_id} charged once"
        );
        // The same vPSD and id with other content: refused, nothing charged.
        match again
            .call_with_id(id, &sign(*vpsd_id, postage + 1))
            .unwrap()
        {
            Response::Error(body) => assert_eq!(body.code, ErrorCode::RequestIdReused),
            response => panic!("{response:?}"),
        }
        assert_eq!(again.status(*vpsd_id).unwrap(), status);
    }
}

/// Reads frames until the appliance closes the connection.
fn answers_until_closed(stream: &mut TcpStream) -> Vec<(u64, Response)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the appliance closes the connection");
    let decoder = FrameDecoder::default();
    let mut answers = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decoder.decode(&bytes[at..]).unwrap() {
            Decoded::Frame(frame) => {
                answers.push((
                    frame.header.request_id,
                    Response::decode(frame.header.opcode, frame.body).unwrap(),
                ));
                at += frame.len();
            }
            Decoded::Incomplete { .. } => panic!("a partial frame from the appliance"),
        }
    }
    answers
}

fn single_error(answers: &[(u64, Response)]) -> (u64, ErrorCode) {
    match answers {
        [(id, Response::Error(body))] => (*id, body.code),
        other => panic!("expected one error frame, got {other:?}"),
    }
}

#[test]
fn hostile_clients_are_cut_off_while_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(
        dir.path(),
        "[server]\nframe_timeout_ms = 300\nhandshake_timeout_ms = 600",
        &[],
    );
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(11, Algorithm::Ed25519, 1_000_000);
    let mut good = daemon.admin();
    let honest = std::thread::spawn(move || {
        let mut postage = 0;
        for n in 0..300u64 {
            let indicium = good.sign(11, item(1 + n % 50)).unwrap();
            postage += indicium.payload.postage_mills;
        }
        (postage, good.status(11).unwrap())
    });

    // Garbage: not even a header. Error with request id 0, then closed.
    let mut garbage = TcpStream::connect(daemon.addr).unwrap();
    garbage.write_all(&[0xAB; 100]).unwrap();
    assert_eq!(
        single_error(&answers_until_closed(&mut garbage)),
        (0, ErrorCode::Malformed)
    );

    // An intact header declaring a body over the cap: frame-too-large, its request id.
    let mut oversized = TcpStream::connect(daemon.addr).unwrap();
    let header = FrameHeader {
        version: 1,
        opcode: 0x10,
        flags: 0,
        request_id: 77,
        body_len: 1 << 20,
        body_checksum: 0,
    };
    let mut bytes = [0u8; HEADER_BYTES];
    header.encode(&mut bytes);
    oversized.write_all(&bytes).unwrap();
    assert_eq!(
        single_error(&answers_until_closed(&mut oversized)),
        (77, ErrorCode::FrameTooLarge)
    );

    // Half a frame, then silence: cut off after the frame timeout.
    let mut stalled = daemon.admin_credential_stream();
    let mut frame = vec![0u8; 4096];
    let len = Request::Status { vpsd_id: 11 }
        .encode_frame(1, 5, &mut frame)
        .unwrap();
    stalled.write_all(&frame[..len / 2]).unwrap();
    let (_, code) = single_error(&answers_until_closed(&mut stalled));
    assert_eq!(code, ErrorCode::Malformed);

    // A connection that never completes the handshake is closed too.
    let mut silent = TcpStream::connect(daemon.addr).unwrap();
    assert_eq!(
        single_error(&answers_until_closed(&mut silent)),
        (0, ErrorCode::Malformed)
    );

    // A body that does not decode in an intact frame: an error for that request, and the
    // connection stays usable.
    let mut intact = daemon.admin_credential_stream();
    let mut frame = vec![0u8; 4096];
    let len = indicia_proto::frame::encode_frame(&mut frame, 1, 0x12, 0, 31, |w| w.put(&[1, 2, 3]))
        .unwrap();
    let next = Request::Status { vpsd_id: 11 }
        .encode_frame(1, 32, &mut frame[len..])
        .unwrap();
    intact.write_all(&frame[..len + next]).unwrap();
    intact.shutdown(std::net::Shutdown::Write).unwrap();
    let answers = answers_until_closed(&mut intact);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        matches!(&answers[0], (31, Response::Error(body)) if body.code == ErrorCode::Malformed)
    );
    assert!(matches!(&answers[1], (32, Response::VpsdStatus(status)) if status.vpsd_id == 11));

    let mut client = daemon.admin();
    let (postage, status) = honest.join().unwrap();
    assert_eq!(status.ascending_mills, postage);
    assert_eq!(status.piece_count, 300);
    assert_eq!(client.status(11).unwrap(), status);
    let log = daemon.log_text();
    assert!(!log.contains("panic"), "{log}");
}

#[test]
fn request_id_0_is_reserved_refused_and_never_reaches_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(14, Algorithm::Ed25519, 10_000);
    let mut stream = daemon.admin_credential_stream();
    let mut frame = vec![0u8; 4096];
    let sign = Request::Sign {
        vpsd_id: 14,
        item: item(730),
    };
    let len = sign.encode_frame(1, 0, &mut frame).unwrap();
    let next = Request::Status { vpsd_id: 14 }
        .encode_frame(1, 5, &mut frame[len..])
        .unwrap();
    stream.write_all(&frame[..len + next]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let answers = answers_until_closed(&mut stream);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        matches!(&answers[0], (0, Response::Error(body)) if body.code == ErrorCode::Malformed
            && body.message.contains("request id 0 is reserved")),
        "{answers:?}"
    );
    // The connection went on, and nothing was signed.
    assert!(
        matches!(&answers[1], (5, Response::VpsdStatus(status)) if status.piece_count == 0),
        "{answers:?}"
    );
    assert_eq!(daemon.admin().status(14).unwrap().ascending_mills, 0);
}

#[test]
fn request_latency_is_measured_for_every_request_on_either_shard() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    // Two vPSDs on each of the two shards: whichever shard the connection lands on, half
    // of its requests run on the other.
    let mut vpsds = Vec::new();
    for shard in 0..2 {
        vpsds.extend(
            (40..)
                .filter(|&vpsd| indiciad::server::shard_of(vpsd, 2) == shard)
                .take(2),
        );
    }
    for &vpsd in &vpsds {
        daemon.provision_funded(vpsd, Algorithm::Ed25519, 1_000_000);
    }
    let mut client = daemon.admin();
    const SIGNS: u64 = 40;
    for n in 0..SIGNS {
        client.sign(vpsds[(n % 4) as usize], item(10)).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats: HashMap<String, u64> = client
            .stats()
            .unwrap()
            .into_iter()
            .map(|entry| (entry.name, entry.value))
            .collect();
        // An answer's latency is recorded once its write returned, which may be just
        // after the client read it.
        let count = stats["request_latency_us.sign.count"];
        assert!(count <= SIGNS, "{stats:?}");
        if count == SIGNS {
            break stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} of {SIGNS} signs timed: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(stats["cross_shard.requests"] >= SIGNS / 2, "{stats:?}");
    let latency = |name: &str| stats[&format!("request_latency_us.sign.{name}")];
    assert!(latency("p50") >= 1, "{stats:?}");
    assert!(latency("p50") <= latency("p90"), "{stats:?}");
    assert!(latency("p90") <= latency("p99"), "{stats:?}");
    assert!(latency("p99") <= latency("p999"), "{stats:?}");
    assert!(latency("p999") <= latency("max"), "{stats:?}");
    // Every connection's handshake is timed too; a kind not asked for has its count only.
    assert!(stats["request_latency_us.hello.count"] >= 1, "{stats:?}");
    assert!(
        stats["request_latency_us.authenticate.count"] >= 1,
        "{stats:?}"
    );
    assert_eq!(stats["request_latency_us.withdraw.count"], 0, "{stats:?}");
    assert!(!stats.contains_key("request_latency_us.withdraw.p50"));
}

trait HandshakenStream {
    fn admin_credential_stream(&self) -> TcpStream;
}

impl HandshakenStream for Daemon {
    /// A raw stream that has completed the handshake as admin (the client library does
    /// it, then hands the socket over).
    fn admin_credential_stream(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).unwrap();
        let twin = stream.try_clone().unwrap();
        let transport = indicia_client::Transport::plain(stream).unwrap();
        let client = Client::handshake(transport, &self.admin_credential()).unwrap();
        drop(client);
        twin
    }
}

#[test]
fn unauthenticated_and_unauthorized_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let user = User {
        id: "station-7",
        secret: [7; 32],
        vpsds: vec![21],
    };
    let config = support::write_config(dir.path(), "", &[user]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(21, Algorithm::EcdsaP256, 100_000);
    daemon.provision_funded(22, Algorithm::EcdsaP256, 100_000);
    let mut admin = daemon.admin();
    let before = (admin.status(21).unwrap(), admin.status(22).unwrap());

    // Before the handshake: not-authenticated, nothing runs, the connection stays.
    let mut raw = TcpStream::connect(daemon.addr).unwrap();
    let mut frame = vec![0u8; 4096];
    let len = Request::Sign {
        vpsd_id: 21,
        item: item(100),
    }
    .encode_frame(1, 9, &mut frame)
    .unwrap();
    raw.write_all(&frame[..len]).unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let answers = answers_until_closed(&mut raw);
    assert_eq!(single_error(&answers), (9, ErrorCode::NotAuthenticated));

    // A wrong secret, and an unknown client id, fail the same way.
    for credential in [
        Credential::new("station-7", [8; 32]),
        Credential::new("nobody", [7; 32]),
    ] {
        let err = Client::connect(daemon.addr, &credential).unwrap_err();
        assert_eq!(error_code(&err), ErrorCode::AuthenticationFailed, "{err}");
    }

    // A user: its own vPSD yes, another no, admin requests no.
    let mut station = daemon.connect(&Credential::new("station-7", [7; 32]));
    assert_eq!(station.role(), Role::User);
    let signed = station.sign(21, item(100)).unwrap();
    assert_eq!(signed.payload.vpsd_id, 21);
    let err = station.sign(22, item(100)).unwrap_err();
    assert_eq!(error_code(&err), ErrorCode::Forbidden);
    assert_eq!(
        error_code(&station.status(22).unwrap_err()),
        ErrorCode::Forbidden
    );
    for request in [
        Request::Lock {
            vpsd_id: 21,
            reason: "mine".into(),
        },
        Request::Withdraw { vpsd_id: 21 },
        Request::Provision {
            vpsd_id: 23,
            owner: "me".into(),
            algorithm: Algorithm::Ed25519,
            origin_zip: "12345".parse().unwrap(),
        },
    ] {
        let err = station.change(&request).unwrap_err();
        assert_eq!(error_code(&err), ErrorCode::Forbidden, "{request:?}");
    }
    assert_eq!(
        error_code(&station.stats().unwrap_err()),
        ErrorCode::Forbidden
    );
    let after = (admin.status(21).unwrap(), admin.status(22).unwrap());
    assert_eq!(after.1, before.1, "the forbidden vPSD is untouched");
    assert_eq!(after.0.ascending_mills, before.0.ascending_mills + 100);
    assert_eq!(after.0.piece_count, 1);
    assert_eq!(
        admin.status(23).map_err(|err| error_code(&err)),
        Err(ErrorCode::UnknownVpsd)
    );
}

#[test]
fn indiciactl_provisions_refills_signs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let base = [
        "indiciactl".to_string(),
        "--addr".into(),
        daemon.addr.to_string(),
        "--credential".into(),
        daemon.dir.join("admin.credential").display().to_string(),
    ];
    let run = |args: &[&str]| -> Result<String, indicia_client::cli::CliError> {
        let mut out = Vec::new();
        let argv = base
            .iter()
            .cloned()
            .chain(args.iter().map(|a| a.to_string()));
        indicia_client::cli::main_with(argv.map(Into::into), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    };
    let json = |text: &str| -> serde_json::Value { serde_json::from_str(text).unwrap() };
    let provisioned = json(
        &run(&[
            "provision",
            "--vpsd",
            "501",
            "--algorithm",
            "ed25519",
            "--origin-zip",
            "20260-0001",
            "--json",
        ])
        .unwrap(),
    );
    assert_eq!(provisioned["state"], "active");
    assert_eq!(provisioned["algorithm"], "ed25519");
    let key = daemon.dir.join("provider.key").display().to_string();
    let refilled = json(
        &run(&[
            "refill",
            "--vpsd",
            "501",
            "--amount",
            "250",
            "--provider-key",
            &key,
            "--json",
        ])
        .unwrap(),
    );
    assert_eq!(refilled["descending_mills"], 250_000);
    let out = dir.path().join("indicia.txt");
    run(&[
        "sign",
        "--vpsd",
        "501",
        "--postage",
        "0.73",
        "--count",
        "300",
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 300);
    let pem = run(&["pubkey", "--vpsd", "501"]).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    let mut admin = daemon.admin();
    let (_, _, spki) = admin.public_key(501).unwrap();
    for (n, line) in lines.iter().enumerate() {
        let indicium = Indicium::decode(&hex::decode(line).unwrap()).unwrap();
        assert_eq!(indicium.payload.piece_number, n as u64 + 1);
        assert_eq!(indicium.payload.postage_mills, 730);
        assert!(verifies(&indicium, &spki));
    }
    let status = json(&run(&["status", "--vpsd", "501", "--json"]).unwrap());
    assert_eq!(status["ascending_mills"], 219_000);
    assert_eq!(status["descending_mills"], 31_000);
    assert_eq!(status["control_total_mills"], 250_000);
    assert_eq!(status["piece_count"], 300);
    assert_eq!(status["state"], "active");
    // Not enough left for 50 more: the CLI signs what it can (42) and says what failed.
    let err = run(&[
        "sign",
        "--vpsd",
        "501",
        "--postage",
        "0.73",
        "--count",
        "50",
    ])
    .unwrap_err();
    assert_eq!(err.exit_code(), 3, "{err}");
    assert!(err.to_string().contains("8 of 50"), "{err}");
    assert!(err.to_string().contains("insufficient-funds"), "{err}");
    assert_eq!(admin.status(501).unwrap().piece_count, 342);
    let stats = json(&run(&["stats", "--json"]).unwrap());
    assert!(stats["indicia"].as_u64().unwrap() >= 300);
    let usage = run(&["sign", "--vpsd", "501", "--postage", "0.7301"]).unwrap_err();
    assert_eq!(usage.exit_code(), 2, "{usage}");
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\nidle_timeout_ms = 400", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(12, Algorithm::Ed25519, 10_000);
    // Authenticated, then silent: closed after the idle timeout, without an error frame.
    let mut idle = daemon.admin_credential_stream();
    let started = std::time::Instant::now();
    let answers = answers_until_closed(&mut idle);
    assert!(answers.is_empty(), "{answers:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    // One that asks something every 150 ms stays open well past it.
    let mut busy = daemon.admin();
    for _ in 0..10 {
        busy.status(12).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let stats = busy.stats().unwrap();
    let idle_closed = stats
        .iter()
        .find(|entry| entry.name == "connections.idle_closed")
        .unwrap();
    assert!(idle_closed.value >= 1, "{stats:?}");
}

#[test]
fn before_the_handshake_frames_are_small_and_time_is_short_whatever_the_client_sends() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\nhandshake_timeout_ms = 600", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    // A frame larger than any handshake frame, before the handshake: refused at once.
    let mut big = TcpStream::connect(daemon.addr).unwrap();
    let mut frame = vec![0u8; 16 << 10];
    let len =
        indicia_proto::frame::encode_frame(&mut frame, 1, 0x12, 0, 9, |w| w.put(&[0u8; 8 << 10]))
            .unwrap();
    big.write_all(&frame[..len]).unwrap();
    assert_eq!(
        single_error(&answers_until_closed(&mut big)),
        (0, ErrorCode::FrameTooLarge)
    );
    // Requests that keep coming without a handshake do not keep the connection open.
    let mut chatty = TcpStream::connect(daemon.addr).unwrap();
    let reader = chatty.try_clone().unwrap();
    let started = std::time::Instant::now();
    let writer = std::thread::spawn(move || {
        let mut frame = vec![0u8; 4096];
        for id in 1..=40u64 {
            let len = Request::Status { vpsd_id: 1 }
                .encode_frame(1, id, &mut frame)
                .unwrap();
            if chatty.write_all(&frame[..len]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut reader = reader;
    let answers = answers_until_closed(&mut reader);
    let elapsed = started.elapsed();
    writer.join().unwrap();
    assert!(
        elapsed < Duration::from_millis(2_500),
        "open for {elapsed:?}"
    );
    let (last_id, last) = answers.last().unwrap();
    assert_eq!(*last_id, 0);
    assert!(
        matches!(last, Response::Error(body) if body.code == ErrorCode::Malformed
            && body.message.contains("handshake did not complete in time")),
        "{last:?}"
    );
    assert!(
        answers.len() >= 3,
        "the early requests were refused one by one: {answers:?}"
    );
}

#[test]
fn past_the_shards_in_flight_limit_requests_are_answered_busy_and_charge_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\ninflight_per_shard = 4", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(13, Algorithm::Ed25519, 1_000_000);
    let mut client = daemon.admin();
    let mut pending: Vec<u64> = (0..64).map(|_| client.next_request_id()).collect();
    let mut signed = 0u64;
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(rounds < 200, "{} requests never got through", pending.len());
        // All at once, in one write: most exceed the shard's limit of 4 in flight.
        for &id in &pending {
            client
                .send(
                    id,
                    &Request::Sign {
                        vpsd_id: 13,
                        item: item(10),
                    },
                )
                .unwrap();
        }
        client.flush().unwrap();
        let mut busy = Vec::new();
        for _ in 0..pending.len() {
            match client.recv().unwrap() {
                (_, Response::Signed { indicium }) => {
                    assert_eq!(indicium.payload.postage_mills, 10);
                    signed += 1;
                }
                (id, Response::Error(body)) => {
                    assert_eq!(body.code, ErrorCode::Busy, "{body:?}");
                    assert!(body.message.contains("inflight_per_shard"), "{body:?}");
                    busy.push(id);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
        if rounds == 1 {
            assert!(
                !busy.is_empty(),
                "64 pipelined requests never exceeded 4 in flight"
            );
        }
        // The busy ones again, with the same request ids.
        pending = busy;
    }
    assert_eq!(signed, 64);
    let status = client.status(13).unwrap();
    assert_eq!(status.piece_count, 64, "each request charged exactly once");
    assert_eq!(status.ascending_mills, 640);
}

/// The largest request the protocol can express, a `sign-batch` of 256 items with every
/// option, fits the default `request_body_bytes_max`; a smaller configured cap refuses a
/// request beyond it as `frame-too-large` before reading its body, and charges nothing.
#[test]
fn the_request_size_limit_admits_every_valid_request_by_default_and_is_configurable() {
    let full_item = indicia_proto::SignItem {
        destination_zip: Some("10001-0001".parse().unwrap()),
        data_digest: Some([0x5a; indicia_proto::indicium::DATA_DIGEST_BYTES]),
        ..item(10)
    };
    let batch = |vpsd_id| Request::SignBatch {
        vpsd_id,
        items: vec![full_item; indicia_proto::message::BATCH_ITEMS_MAX],
    };
    let mut frame = vec![0u8; indicia_proto::frame::FRAME_BYTES_MAX];
    let largest = batch(1).encode_frame(1, 1, &mut frame).unwrap() - HEADER_BYTES;
    let default_cap = indiciad::config::ServerConfig::default().request_body_bytes_max;
    assert!(
        largest <= default_cap as usize,
        "the largest request body is {largest} bytes, the default cap {default_cap}"
    );

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(21, Algorithm::Ed25519, 10_000_000);
    let mut client = daemon.admin();
    match client.call(&batch(21)).unwrap() {
        Response::BatchSigned { results } => {
            assert_eq!(results.len(), 256);
            assert!(results.iter().all(|r| matches!(r, ItemResult::Signed(_))));
        }
        other => panic!("unexpected answer {other:?}"),
    }
    drop(client);
    daemon.terminate();

    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\nrequest_body_bytes_max = 4096", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(22, Algorithm::Ed25519, 10_000_000);
    let mut client = daemon.admin();
    match client.call_with_id(99, &batch(22)).unwrap() {
        Response::Error(body) => {
            assert_eq!(body.code, ErrorCode::FrameTooLarge, "{body:?}");
        }
        other => panic!("unexpected answer {other:?}"),
    }
    let mut admin = daemon.admin();
    let status = admin.status(22).unwrap();
    assert_eq!(status.piece_count, 0, "nothing was charged");
    // A batch within the cap still signs.
    let small = Request::SignBatch {
        vpsd_id: 22,
        items: vec![full_item; 50],
    };
    assert!(matches!(
        admin.call(&small).unwrap(),
        Response::BatchSigned { .. }
    ));
}
