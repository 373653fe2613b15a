//! docs/PROTOCOL.md must agree with the code: every opcode and every error code is listed
//! with the right value and name, and nothing else is.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;

use indicia_proto::message::opcode;
use indicia_proto::ErrorCode;

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap()
}

/// Rows of a markdown table whose first cell is a hex number of `digits` digits.
fn hex_rows(text: &str, digits: usize) -> BTreeMap<u16, String> {
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 3 || !cells[0].is_empty() {
            continue;
        }
        let Some(hex) = cells[1].strip_prefix("0x") else {
            continue;
        };
        if hex.len() != digits {
            continue;
        }
        let value = u16::from_str_radix(hex, 16).unwrap();
        let name = cells[2].trim_matches('`').to_owned();
        assert!(rows.insert(value, name).is_none(), "0x{hex} listed twice");
    }
    rows
}

#[test]
fn every_opcode_is_documented_once() {
    let expected: BTreeMap<u16, String> = [
        (opcode::HELLO, "hello"),
        (opcode::AUTHENTICATE, "authenticate"),
        (opcode::SIGN, "sign"),
        (opcode::SIGN_BATCH, "sign-batch"),
        (opcode::STATUS, "status"),
        (opcode::PUBLIC_KEY, "public-key"),
        (opcode::VERIFY, "verify"),
        (opcode::PROVISION, "provision"),
        (opcode::REFILL, "refill"),
        (opcode::CONTACT, "contact"),
        (opcode::LOCK, "lock"),
        (opcode::UNLOCK, "unlock"),
        (opcode::WITHDRAW, "withdraw"),
        (opcode::ROTATE_KEY, "rotate-key"),
        (opcode::STATS, "stats"),
        (opcode::CLUSTER_STATUS, "cluster-status"),
        (opcode::CLUSTER_TAKEOVER, "cluster-takeover"),
        (opcode::FORWARDED, "forwarded"),
        (opcode::CLUSTER_PLACEMENT, "cluster-placement"),
        (opcode::CLUSTER_MOVE, "cluster-move"),
        (opcode::CLUSTER_DRAIN, "cluster-drain"),
        (opcode::CLUSTER_PIN, "cluster-pin"),
        (opcode::CLUSTER_ADOPT, "cluster-adopt"),
        (opcode::TOPOLOGY, "topology"),
        (opcode::BACKUP, "backup"),
        (opcode::CHALLENGE, "challenge"),
        (opcode::WELCOME, "welcome"),
        (opcode::SIGNED, "signed"),
        (opcode::BATCH_SIGNED, "batch-signed"),
        (opcode::VPSD_STATUS, "vpsd-status"),
        (opcode::PUBLIC_KEY_INFO, "public-key-info"),
        (opcode::VERIFIED, "verified"),
        (opcode::WITHDRAWN, "withdrawn"),
        (opcode::STATS_REPORT, "stats-report"),
        (opcode::CLUSTER_REPORT, "cluster-report"),
        (opcode::PLACEMENT, "placement"),
        (opcode::TOPOLOGY_REPORT, "topology-report"),
        (opcode::BACKUP_REPORT, "backup-report"),
        (opcode::ERROR, "error"),
    ]
    .into_iter()
    .map(|(code, name)| (u16::from(code), name.to_owned()))
    .collect();
    assert_eq!(hex_rows(&protocol_md(), 2), expected);
}

#[test]
fn every_error_code_is_documented_once() {
    let expected: BTreeMap<u16, String> = ErrorCode::all()
        .map(|code| (code.wire(), code.name()))
        .collect();
    assert_eq!(hex_rows(&protocol_md(), 4), expected);
}
