//! Golden vectors: checked-in bytes (hex) beside their decoded fields (JSON), for every
//! message type and for indicia of both algorithms with a public key and a valid signature.
//! An independent implementation can be checked against `proto/tests/vectors/*.json`; this
//! test checks that the codec reproduces them exactly, in both directions.
//!
//! To regenerate after a deliberate format change (and then update docs/):
//! `INDICIA_WRITE_VECTORS=1 cargo test -p indicia-proto --test vectors`
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use indicia_proto::frame::{Decoded, FrameDecoder, FLAG_RESPONSE, FRAME_BYTES_MAX};
use indicia_proto::message::opcode;
use indicia_proto::{
    Algorithm, ApplianceEntry, AuthorizationKind, BackupReport, ErrorBody, ErrorCode, Indicium,
    IndiciumPayload, ItemResult, LockReason, PinSubject, ProviderAuthorization, Request, Response,
    Role, ShardCopy, SignItem, StatEntry, Topology, Verdict, VpsdPlacement, VpsdState, VpsdStatus,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct FrameVector {
    description: String,
    request_id: u64,
    frame_hex: String,
    message: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndiciumVector {
    description: String,
    /// Raw public key: the uncompressed P-256 point (65 bytes) or the Ed25519 key (32 bytes).
    public_key_hex: String,
    payload_hex: String,
    signature_hex: String,
    indicium_hex: String,
    indicium: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct AuthorizationVector {
    description: String,
    /// The provider's Ed25519 public key.
    provider_public_key_hex: String,
    signed_bytes_hex: String,
    authorization_hex: String,
    authorization: serde_json::Value,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn writing() -> bool {
    std::env::var_os("INDICIA_WRITE_VECTORS").is_some()
}

fn encode_request(request_id: u64, request: &Request) -> Vec<u8> {
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    let len = request.encode_frame(1, request_id, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

fn encode_response(request_id: u64, response: &Response) -> Vec<u8> {
    let mut buf = vec![0u8; FRAME_BYTES_MAX];
    let len = response.encode_frame(1, request_id, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

fn item(postage_mills: u64) -> SignItem {
    SignItem {
        postage_mills,
        mailing_date: "2026-11-30".parse().unwrap(),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

fn sample_status() -> VpsdStatus {
    VpsdStatus {
        vpsd_id: 1001,
        owner: "acme-shipping".into(),
        algorithm: Algorithm::EcdsaP256,
        key_serial: 1,
        state: VpsdState::Active,
        ascending_mills: 7_300,
        descending_mills: 92_700,
        control_total_mills: 100_000,
        piece_count: 10,
        origin_zip: "02134".parse().unwrap(),
        last_contact_unix: 1_795_996_800,
        provider_sequence: 1,
        version: 12,
    }
}

fn sample_authorization(
    kind: AuthorizationKind,
    amount_mills: u64,
) -> (ProviderAuthorization, Ed25519KeyPair) {
    let provider = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap();
    let mut authorization = ProviderAuthorization {
        kind,
        vpsd_id: 1001,
        amount_mills,
        sequence: 2,
        expires_unix: 1_796_083_200,
        signature: [0; 64],
    };
    let signature = provider.sign(&authorization.signed_bytes());
    authorization.signature.copy_from_slice(signature.as_ref());
    (authorization, provider)
}

fn request_samples() -> Vec<(&'static str, Request)> {
    let full_item = SignItem {
        postage_mills: 730,
        mailing_date: "2026-12-01".parse().unwrap(),
        rate_category: 3,
        destination_zip: Some("20260-0001".parse().unwrap()),
        data_digest: Some([0x5a; 32]),
    };
    vec![
        (
            "hello: versions 1..=1, client id, nonce",
            Request::Hello {
                version_min: 1,
                version_max: 1,
                client_id: "station-7".into(),
                client_nonce: [0x11; 32],
            },
        ),
        (
            "authenticate: HMAC-SHA256 proof",
            Request::Authenticate { proof: [0x22; 32] },
        ),
        (
            "sign: minimal item",
            Request::Sign {
                vpsd_id: 1001,
                item: item(730),
            },
        ),
        (
            "sign: with destination ZIP+4 and data digest",
            Request::Sign {
                vpsd_id: 1001,
                item: full_item,
            },
        ),
        (
            "sign batch: three items",
            Request::SignBatch {
                vpsd_id: 1001,
                items: vec![item(730), full_item, item(1_200)],
            },
        ),
        ("status", Request::Status { vpsd_id: 1001 }),
        (
            "public key: current",
            Request::PublicKey {
                vpsd_id: 1001,
                key_serial: None,
            },
        ),
        (
            "public key: serial 2",
            Request::PublicKey {
                vpsd_id: 1001,
                key_serial: Some(2),
            },
        ),
        (
            "verify",
            Request::Verify {
                indicium: vec![0x01, 0x02, 0x03],
            },
        ),
        (
            "provision",
            Request::Provision {
                vpsd_id: 1001,
                owner: "acme-shipping".into(),
                algorithm: Algorithm::Ed25519,
                origin_zip: "02134-1234".parse().unwrap(),
            },
        ),
        (
            "refill with a signed provider authorization",
            Request::Refill {
                vpsd_id: 1001,
                authorization: sample_authorization(AuthorizationKind::Refill, 100_000).0,
            },
        ),
        (
            "contact acknowledgment",
            Request::Contact {
                vpsd_id: 1001,
                authorization: sample_authorization(AuthorizationKind::Contact, 0).0,
            },
        ),
        (
            "lock",
            Request::Lock {
                vpsd_id: 1001,
                reason: "audit".into(),
            },
        ),
        ("unlock", Request::Unlock { vpsd_id: 1001 }),
        ("withdraw", Request::Withdraw { vpsd_id: 1001 }),
        ("rotate key", Request::RotateKey { vpsd_id: 1001 }),
        ("stats", Request::Stats),
        ("cluster status", Request::ClusterStatus),
        (
            "cluster takeover",
            Request::ClusterTakeover { from: "a2".into() },
        ),
        (
            "forwarded (a status, for client station-7)",
            Request::Forwarded {
                client_id: "station-7".into(),
                request_id: 41,
                request: Box::new(Request::Status { vpsd_id: 1001 }),
            },
        ),
        (
            "cluster placement",
            Request::ClusterPlacement {
                vpsd_ids: vec![1001, 1002],
            },
        ),
        (
            "cluster move",
            Request::ClusterMove {
                vpsd_id: 1001,
                to: "a2".into(),
            },
        ),
        (
            "cluster drain",
            Request::ClusterDrain {
                appliance: "a3".into(),
                undo: false,
            },
        ),
        (
            "cluster pin (an owner account)",
            Request::ClusterPin {
                subject: PinSubject::Owner("acme".into()),
                appliance: "a1".into(),
            },
        ),
        ("cluster adopt", Request::ClusterAdopt { vpsd_id: 1001 }),
        ("topology", Request::Topology),
        (
            "backup",
            Request::Backup {
                out: "/var/backups/indicia/2026-12-06".into(),
            },
        ),
    ]
}

/// An Ed25519 indicium signed with a fixed key (Ed25519 is deterministic, so the bytes are
/// stable across regenerations).
fn sample_indicium(piece_number: u64, postage_mills: u64) -> Indicium {
    let key = Ed25519KeyPair::from_seed_unchecked(&[0x07; 32]).unwrap();
    let payload = IndiciumPayload {
        algorithm: Algorithm::Ed25519,
        piece_number,
        postage_mills,
        ..indicium_samples()[0].2
    };
    let mut signature = [0u8; 64];
    signature.copy_from_slice(key.sign(payload.signed_bytes().as_ref()).as_ref());
    Indicium { payload, signature }
}

fn response_samples() -> Vec<(&'static str, Response)> {
    let mut locked = sample_status();
    locked.state = VpsdState::Locked(LockReason::Operator("audit".into()));
    let mut overdue = sample_status();
    overdue.state = VpsdState::Locked(LockReason::ContactOverdue);
    let mut integrity = sample_status();
    integrity.state = VpsdState::Locked(LockReason::Integrity("chain break at seq 9".into()));
    let mut withdrawn = sample_status();
    withdrawn.state = VpsdState::Withdrawn;
    withdrawn.descending_mills = 0;
    withdrawn.control_total_mills = withdrawn.ascending_mills;
    vec![
        (
            "challenge",
            Response::Challenge {
                version: 1,
                server_nonce: [0x33; 32],
            },
        ),
        (
            "welcome",
            Response::Welcome {
                role: Role::User,
                server_proof: [0x44; 32],
            },
        ),
        (
            "signed",
            Response::Signed {
                indicium: sample_indicium(10, 730),
            },
        ),
        (
            "batch signed: one ok, one failed",
            Response::BatchSigned {
                results: vec![
                    ItemResult::Signed(sample_indicium(11, 1_200)),
                    ItemResult::Failed(ErrorBody::new(
                        ErrorCode::InsufficientFunds,
                        "needs 1.200, has 0.500",
                    )),
                ],
            },
        ),
        ("status: active", Response::VpsdStatus(sample_status())),
        ("status: locked by operator", Response::VpsdStatus(locked)),
        (
            "status: locked, contact overdue",
            Response::VpsdStatus(overdue),
        ),
        ("status: locked, integrity", Response::VpsdStatus(integrity)),
        (
            "public key info",
            Response::PublicKeyInfo {
                vpsd_id: 1001,
                algorithm: Algorithm::Ed25519,
                key_serial: 1,
                spki_der: vec![0x30, 0x2a],
            },
        ),
        (
            "verified",
            Response::Verified {
                verdict: Verdict::Valid,
                vpsd_id: 1001,
                piece_number: 10,
            },
        ),
        (
            "withdrawn",
            Response::Withdrawn {
                refund_mills: 92_700,
                status: withdrawn,
            },
        ),
        (
            "stats",
            Response::Stats {
                entries: vec![
                    StatEntry {
                        name: "requests".into(),
                        value: 12,
                    },
                    StatEntry {
                        name: "indicia".into(),
                        value: 10,
                    },
                ],
            },
        ),
        (
            "cluster report",
            Response::Cluster {
                taken: 3,
                appliances: vec![
                    ApplianceEntry {
                        id: "a1".into(),
                        address: "10.0.0.1:7450".into(),
                        alive: true,
                        vpsds: 7,
                        draining: false,
                    },
                    ApplianceEntry {
                        id: "a2".into(),
                        address: "10.0.0.2:7450".into(),
                        alive: false,
                        vpsds: 0,
                        draining: false,
                    },
                    ApplianceEntry {
                        id: "a3".into(),
                        address: "10.0.0.3:7450".into(),
                        alive: true,
                        vpsds: 2,
                        draining: true,
                    },
                ],
            },
        ),
        (
            "placement",
            Response::Placement {
                appliances: vec![
                    ("a1".into(), "10.0.0.1:7450".into()),
                    ("a3".into(), "10.0.0.3:7450".into()),
                ],
                vpsds: vec![
                    VpsdPlacement {
                        vpsd_id: 1001,
                        appliance: "a3".into(),
                        owned: true,
                    },
                    VpsdPlacement {
                        vpsd_id: 1002,
                        appliance: "a1".into(),
                        owned: false,
                    },
                ],
            },
        ),
        (
            "topology report (2 shards, shard ports)",
            Response::Topology(Topology {
                shards: 2,
                shard: 1,
                hash: 1,
                batch_items_max: 256,
                ports: vec![7451, 7452],
            }),
        ),
        (
            "backup report (2 shards, clean)",
            Response::Backup(BackupReport {
                taken_unix: 1_796_515_200,
                clean: true,
                shards: vec![
                    ShardCopy {
                        sequence: 1_204,
                        segments: 1,
                        bytes: 67_108_864,
                    },
                    ShardCopy {
                        sequence: 977,
                        segments: 2,
                        bytes: 134_217_728,
                    },
                ],
            }),
        ),
        (
            "error",
            Response::error(ErrorCode::VpsdLocked, "vPSD 1001 is locked: audit"),
        ),
    ]
}

fn indicium_samples() -> Vec<(&'static str, Algorithm, IndiciumPayload)> {
    let base = IndiciumPayload {
        algorithm: Algorithm::EcdsaP256,
        key_serial: 1,
        vpsd_id: 1001,
        piece_number: 10,
        postage_mills: 730,
        ascending_mills: 7_300,
        descending_mills: 92_700,
        mailing_date: "2026-11-30".parse().unwrap(),
        origin_zip: "02134".parse().unwrap(),
        destination_zip: None,
        rate_category: 1,
        software_id: 0x0100,
        data_digest: None,
    };
    let full = IndiciumPayload {
        destination_zip: Some("20260-0001".parse().unwrap()),
        data_digest: Some([0x5a; 32]),
        ..base
    };
    vec![
        (
            "ECDSA P-256, minimal (125 bytes)",
            Algorithm::EcdsaP256,
            base,
        ),
        (
            "ECDSA P-256, destination and digest (157 bytes)",
            Algorithm::EcdsaP256,
            full,
        ),
        ("Ed25519, minimal (125 bytes)", Algorithm::Ed25519, base),
        (
            "Ed25519, destination and digest (157 bytes)",
            Algorithm::Ed25519,
            full,
        ),
    ]
}

fn write_json<T: Serialize>(name: &str, value: &T) {
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    std::fs::write(dir().join(name), text).unwrap();
}

fn read_json<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = dir().join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn decode_frame(bytes: &[u8]) -> (u8, u16, u64, &[u8]) {
    match FrameDecoder::default().decode(bytes).unwrap() {
        Decoded::Frame(frame) => {
            assert_eq!(frame.len(), bytes.len(), "vector holds more than one frame");
            (
                frame.header.opcode,
                frame.header.flags,
                frame.header.request_id,
                frame.body,
            )
        }
        Decoded::Incomplete { needed } => panic!("vector frame incomplete, {needed} bytes missing"),
    }
}

#[test]
fn request_vectors_match_the_codec() {
    if writing() {
        let vectors: Vec<FrameVector> = request_samples()
            .into_iter()
            .enumerate()
            .map(|(i, (description, request))| FrameVector {
                description: description.into(),
                request_id: 100 + i as u64,
                frame_hex: hex::encode(encode_request(100 + i as u64, &request)),
                message: serde_json::to_value(&request).unwrap(),
            })
            .collect();
        write_json("requests.json", &vectors);
    }
    let vectors: Vec<FrameVector> = read_json("requests.json");
    let mut opcodes = BTreeSet::new();
    for vector in &vectors {
        let bytes = hex::decode(&vector.frame_hex).unwrap();
        let expected: Request = serde_json::from_value(vector.message.clone()).unwrap();
        let (opcode, flags, request_id, body) = decode_frame(&bytes);
        assert_eq!(flags, 0, "{}", vector.description);
        assert_eq!(request_id, vector.request_id, "{}", vector.description);
        assert_eq!(
            Request::decode(opcode, body).unwrap(),
            expected,
            "{}",
            vector.description
        );
        assert_eq!(
            hex::encode(encode_request(vector.request_id, &expected)),
            vector.frame_hex,
            "{}",
            vector.description
        );
        opcodes.insert(opcode);
    }
    let all: BTreeSet<u8> = [
        opcode::HELLO,
        opcode::AUTHENTICATE,
        opcode::SIGN,
        opcode::SIGN_BATCH,
        opcode::STATUS,
        opcode::PUBLIC_KEY,
        opcode::VERIFY,
        opcode::PROVISION,
        opcode::REFILL,
        opcode::CONTACT,
        opcode::LOCK,
        opcode::UNLOCK,
        opcode::WITHDRAW,
        opcode::ROTATE_KEY,
        opcode::STATS,
        opcode::CLUSTER_STATUS,
        opcode::CLUSTER_TAKEOVER,
        opcode::FORWARDED,
        opcode::CLUSTER_PLACEMENT,
        opcode::CLUSTER_MOVE,
        opcode::CLUSTER_DRAIN,
        opcode::CLUSTER_PIN,
        opcode::CLUSTER_ADOPT,
        opcode::TOPOLOGY,
        opcode::BACKUP,
    ]
    .into();
    assert_eq!(opcodes, all, "every request opcode has a vector");
}

#[test]
fn response_vectors_match_the_codec() {
    if writing() {
        let vectors: Vec<FrameVector> = response_samples()
            .into_iter()
            .enumerate()
            .map(|(i, (description, response))| FrameVector {
                description: description.into(),
                request_id: 200 + i as u64,
                frame_hex: hex::encode(encode_response(200 + i as u64, &response)),
                message: serde_json::to_value(&response).unwrap(),
            })
            .collect();
        write_json("responses.json", &vectors);
    }
    let vectors: Vec<FrameVector> = read_json("responses.json");
    let mut opcodes = BTreeSet::new();
    for vector in &vectors {
        let bytes = hex::decode(&vector.frame_hex).unwrap();
        let expected: Response = serde_json::from_value(vector.message.clone()).unwrap();
        let (opcode, flags, request_id, body) = decode_frame(&bytes);
        assert_eq!(flags, FLAG_RESPONSE, "{}", vector.description);
        assert_eq!(request_id, vector.request_id, "{}", vector.description);
        assert_eq!(
            Response::decode(opcode, body).unwrap(),
            expected,
            "{}",
            vector.description
        );
        assert_eq!(
            hex::encode(encode_response(vector.request_id, &expected)),
            vector.frame_hex,
            "{}",
            vector.description
        );
        opcodes.insert(opcode);
    }
    let all: BTreeSet<u8> = [
        opcode::CHALLENGE,
        opcode::WELCOME,
        opcode::SIGNED,
        opcode::BATCH_SIGNED,
        opcode::VPSD_STATUS,
        opcode::PUBLIC_KEY_INFO,
        opcode::VERIFIED,
        opcode::WITHDRAWN,
        opcode::STATS_REPORT,
        opcode::CLUSTER_REPORT,
        opcode::PLACEMENT,
        opcode::TOPOLOGY_REPORT,
        opcode::BACKUP_REPORT,
        opcode::ERROR,
    ]
    .into();
    assert_eq!(opcodes, all, "every response opcode has a vector");
}

fn verify(algorithm: Algorithm, public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let alg: &dyn signature::VerificationAlgorithm = match algorithm {
        Algorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_FIXED,
        Algorithm::Ed25519 => &signature::ED25519,
    };
    UnparsedPublicKey::new(alg, public_key)
        .verify(message, signature)
        .is_ok()
}

#[test]
fn indicium_vectors_match_the_codec_and_verify() {
    if writing() {
        let rng = SystemRandom::new();
        let ecdsa_pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        let ecdsa = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            ecdsa_pkcs8.as_ref(),
        )
        .unwrap();
        let ed25519 = Ed25519KeyPair::from_seed_unchecked(&[0x07; 32]).unwrap();
        let vectors: Vec<IndiciumVector> = indicium_samples()
            .into_iter()
            .map(|(description, algorithm, mut payload)| {
                payload.algorithm = algorithm;
                let signed = payload.signed_bytes();
                let (public_key, signature) = match algorithm {
                    Algorithm::EcdsaP256 => (
                        ecdsa.public_key().as_ref().to_vec(),
                        ecdsa.sign(&rng, signed.as_ref()).unwrap().as_ref().to_vec(),
                    ),
                    Algorithm::Ed25519 => (
                        ed25519.public_key().as_ref().to_vec(),
                        ed25519.sign(signed.as_ref()).as_ref().to_vec(),
                    ),
                };
                let indicium = Indicium {
                    payload,
                    signature: signature.as_slice().try_into().unwrap(),
                };
                IndiciumVector {
                    description: description.into(),
                    public_key_hex: hex::encode(public_key),
                    payload_hex: hex::encode(signed.as_ref()),
                    signature_hex: hex::encode(signature),
                    indicium_hex: hex::encode(indicium.to_bytes().as_ref()),
                    indicium: serde_json::to_value(indicium).unwrap(),
                }
            })
            .collect();
        write_json("indicia.json", &vectors);
    }
    let vectors: Vec<IndiciumVector> = read_json("indicia.json");
    let mut algorithms = BTreeSet::new();
    for vector in &vectors {
        let bytes = hex::decode(&vector.indicium_hex).unwrap();
        let expected: Indicium = serde_json::from_value(vector.indicium.clone()).unwrap();
        let decoded = Indicium::decode(&bytes).unwrap();
        assert_eq!(decoded, expected, "{}", vector.description);
        assert_eq!(
            hex::encode(expected.to_bytes().as_ref()),
            vector.indicium_hex
        );
        let (payload, signature) = Indicium::split_signed(&bytes).unwrap();
        assert_eq!(
            hex::encode(payload),
            vector.payload_hex,
            "{}",
            vector.description
        );
        assert_eq!(
            hex::encode(signature),
            vector.signature_hex,
            "{}",
            vector.description
        );
        let public_key = hex::decode(&vector.public_key_hex).unwrap();
        let algorithm = decoded.payload.algorithm;
        assert!(
            verify(algorithm, &public_key, payload, signature),
            "{}: signature does not verify",
            vector.description
        );
        // One flipped payload bit must break the signature.
        let mut tampered = payload.to_vec();
        tampered[23] ^= 1;
        assert!(!verify(algorithm, &public_key, &tampered, signature));
        algorithms.insert(algorithm.code());
    }
    assert_eq!(algorithms, [1, 2].into(), "both algorithms have vectors");
}

#[test]
fn authorization_vectors_match_the_codec_and_verify() {
    if writing() {
        let vectors: Vec<AuthorizationVector> = [
            ("refill of 100.000", AuthorizationKind::Refill, 100_000),
            ("contact acknowledgment", AuthorizationKind::Contact, 0),
        ]
        .into_iter()
        .map(|(description, kind, amount)| {
            let (authorization, provider) = sample_authorization(kind, amount);
            AuthorizationVector {
                description: description.into(),
                provider_public_key_hex: hex::encode(provider.public_key().as_ref()),
                signed_bytes_hex: hex::encode(authorization.signed_bytes()),
                authorization_hex: hex::encode(authorization.to_bytes()),
                authorization: serde_json::to_value(authorization).unwrap(),
            }
        })
        .collect();
        write_json("authorizations.json", &vectors);
    }
    let vectors: Vec<AuthorizationVector> = read_json("authorizations.json");
    assert!(vectors.len() >= 2);
    for vector in &vectors {
        let bytes = hex::decode(&vector.authorization_hex).unwrap();
        let expected: ProviderAuthorization =
            serde_json::from_value(vector.authorization.clone()).unwrap();
        let decoded = ProviderAuthorization::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, expected, "{}", vector.description);
        assert_eq!(hex::encode(expected.to_bytes()), vector.authorization_hex);
        assert_eq!(hex::encode(decoded.signed_bytes()), vector.signed_bytes_hex);
        let public_key = hex::decode(&vector.provider_public_key_hex).unwrap();
        assert!(verify(
            Algorithm::Ed25519,
            &public_key,
            &decoded.signed_bytes(),
            &decoded.signature
        ));
    }
}
