//! docs/ must agree with the code: every record kind of docs/JOURNAL.md is listed with its
//! number and name, and the fixed sizes it states are the code's; the markers a real
//! journal writes have the form the doc gives; the checkpoint's layout and sizes, and the
//! rotation's sizing, are what the encoder and a real rotation produce; the files of
//! docs/FILES.md are the ones written; every statistic the appliance reports is in
//! docs/OPERATIONS.md, and nothing else is; the connection rules check frames in the order
//! of docs/PROTOCOL.md section 4.2.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::Instant;

use aws_lc_rs::rand::SystemRandom;
use indicia_proto::frame::{encode_frame, HEADER_BYTES};
use indicia_proto::message::{opcode, CLIENT_PROOF_LABEL, NONCE_BYTES};
use indicia_proto::{Algorithm, ErrorCode, Request, Response, Role, Zip};
use indiciad::config::ServerConfig;
use indiciad::server::conn_rules::{Action, ConnectionRules, Limits, Next};
use indiciad::server::handshake::{proof, ClientDirectory, ClientEntry, Connection};

use indiciad::engine::{
    Checkpoint, EngineConfig, KeyBinding, KeyEntry, MasterKey, Registers, StoredState, Vpsd,
};
use indiciad::journal::format::{
    record_len, RECORD_HEADER_BYTES, RECORD_MAGIC, RECORD_TRAILER_BYTES, SEGMENT_HEADER_BYTES,
    SEGMENT_MAGIC,
};
use indiciad::journal::{
    segment, ChainKey, Damage, GoodRecord, Journal, JournalConfig, Visitor, CHECKPOINT_ROOM_FACTOR,
    CLOSED_FILE, OPEN_FILE,
};
use indiciad::server::metrics::{Metrics, Received, RequestKind};
use indiciad::server::shard::ShardStats;
use indiciad::store::codec::{decode_checkpoint, encode_checkpoint, kind, Encoder};

fn journal_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/JOURNAL.md")).unwrap()
}

#[test]
fn every_record_kind_is_documented_once() {
    let text = journal_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "| kind | name | payload |");
    assert!(lines.next().is_some(), "no kind table in docs/JOURNAL.md");
    let mut rows = BTreeMap::new();
    for line in lines.skip(1).take_while(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let number: u8 = cells[1].parse().unwrap();
        assert!(
            rows.insert(number, cells[2].to_owned()).is_none(),
            "kind {number} listed twice"
        );
    }
    let expected: BTreeMap<u8, String> = [
        (kind::PROVISION, "provision"),
        (kind::PROVIDER, "provider"),
        (kind::STATE_CHANGE, "state-change"),
        (kind::WITHDRAW, "withdraw"),
        (kind::ROTATE_KEY, "rotate-key"),
        (kind::SESSION, "session"),
        (kind::CHECKPOINT, "checkpoint"),
        (kind::RESET, "reset"),
        (kind::RELEASE, "release"),
    ]
    .into_iter()
    .map(|(number, name)| (number, name.to_owned()))
    .collect();
    assert_eq!(rows, expected);
}

#[test]
fn the_fixed_sizes_and_magics_in_the_doc_are_the_codes() {
    let text = journal_md();
    assert_eq!(SEGMENT_HEADER_BYTES, 64);
    assert_eq!(RECORD_HEADER_BYTES, 40);
    assert_eq!(RECORD_TRAILER_BYTES, 68);
    for needle in [
        format!("`{}`", std::str::from_utf8(SEGMENT_MAGIC).unwrap()),
        format!("`{}`", std::str::from_utf8(RECORD_MAGIC).unwrap()),
        "The first 64 bytes of every segment file".to_owned(),
        "40-byte **header**".to_owned(),
        "68-byte".to_owned(),
    ] {
        assert!(
            text.contains(&needle),
            "docs/JOURNAL.md does not say {needle}"
        );
    }
}

/// docs/JOURNAL.md with every run of whitespace made one space, so that a phrase can be
/// found across line breaks.
fn journal_md_flat() -> String {
    journal_md()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `n` with a comma between groups of three digits, as the docs write figures.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A visitor that gives the records no meaning: the journal's own behaviour is tested.
struct Bytes;

impl Visitor for Bytes {
    fn accepts_checkpoint(&mut self, _payload: &[u8]) -> Option<u64> {
        Some(0)
    }
    fn record(&mut self, _record: GoodRecord<'_>) {}
    fn damage(&mut self, _damage: Damage) {}
}

fn open_journal(dir: &std::path::Path, segment_bytes: usize) -> Journal {
    Journal::open(
        dir,
        0,
        ChainKey::derive(&[0x11; 32], 0),
        JournalConfig { segment_bytes },
        &mut Bytes,
    )
    .unwrap()
    .0
}

/// The markers a real journal writes: `OPEN` at the open, `CLOSED` (and no `OPEN`) after a
/// clean close, each in the form section 1.1 and the table of section 6.6 give.
#[test]
fn the_markers_in_the_doc_are_the_ones_a_journal_writes() {
    let text = journal_md();
    let dir = tempfile::tempdir().unwrap();
    let mut journal = open_journal(dir.path(), 64 << 10);
    assert_eq!((OPEN_FILE, CLOSED_FILE), ("OPEN", "CLOSED"));
    let open = std::fs::read_to_string(dir.path().join(OPEN_FILE)).unwrap();
    let (open_magic, rest) = open.split_once(' ').unwrap();
    assert_eq!(rest, "0\n", "an empty journal's OPEN says 0");
    let sequence = journal.append(1, 1001, 0, b"opaque").unwrap();
    assert_eq!(journal.close_cleanly().unwrap(), sequence);
    assert!(
        !dir.path().join(OPEN_FILE).exists(),
        "a clean close removes OPEN"
    );
    let closed = std::fs::read_to_string(dir.path().join(CLOSED_FILE)).unwrap();
    let fields: Vec<&str> = closed.strip_suffix('\n').unwrap().split(' ').collect();
    assert_eq!(fields.len(), 3, "{closed:?}");
    assert_eq!(fields[1], sequence.to_string());
    assert!(
        fields[2].len() == 64
            && fields[2]
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "the chain value is 64 lowercase hex digits: {closed:?}"
    );
    for needle in [
        format!("`{open_magic} <sequence>\\n`"),
        format!("`{} <sequence> <chain>\\n`", fields[0]),
        format!("| `{OPEN_FILE}` | `{open_magic} <sequence>\\n` |"),
        format!(
            "| `{CLOSED_FILE}` | `{} <sequence> <chain>\\n` |",
            fields[0]
        ),
    ] {
        assert!(
            text.contains(&needle),
            "docs/JOURNAL.md does not say {needle}"
        );
    }
}

/// Section 6.4: the factor, and its example worked by a real rotation.
#[test]
fn the_rotation_sizing_in_the_doc_is_the_codes() {
    let text = journal_md_flat();
    let says = format!("`CHECKPOINT_ROOM_FACTOR` = {CHECKPOINT_ROOM_FACTOR}");
    assert!(text.contains(&says), "docs/JOURNAL.md should say {says}");
    let needed = format!(
        "needed = {SEGMENT_HEADER_BYTES} + max({CHECKPOINT_ROOM_FACTOR} x checkpoint, checkpoint + room)"
    );
    assert!(
        text.contains(&needed),
        "docs/JOURNAL.md should say {needed}"
    );

    // The example: 64 KiB segments, a 100,000-byte checkpoint payload.
    let (segment_bytes, payload) = (64 << 10, 100_000);
    let dir = tempfile::tempdir().unwrap();
    let mut journal = open_journal(dir.path(), segment_bytes);
    journal.rotate(&vec![0; payload], 0, 200).unwrap();
    let made = std::fs::metadata(dir.path().join(segment::file_name(2)))
        .unwrap()
        .len() as usize;
    for needle in [
        format!(
            "a checkpoint payload of {} bytes is a record of {} bytes",
            thousands(payload),
            thousands(record_len(payload))
        ),
        format!(
            "the new segment is {} bytes, not {}",
            thousands(made),
            thousands(segment_bytes)
        ),
    ] {
        assert!(
            text.contains(&needle),
            "docs/JOURNAL.md does not say {needle}"
        );
    }

    // With the default segments, checkpoints up to a quarter of a segment.
    let default = JournalConfig::default().segment_bytes;
    let quarter = (default - SEGMENT_HEADER_BYTES) / CHECKPOINT_ROOM_FACTOR;
    let says = format!("a checkpoint of up to {} bytes", thousands(quarter));
    assert!(text.contains(&says), "docs/JOURNAL.md should say {says}");
}

/// A checkpoint of one active vPSD with an owner of `owner_bytes` and `older_keys` keys
/// before its current one: the bytes of its vPSD entry.
fn vpsd_entry_bytes(algorithm: Algorithm, owner_bytes: usize, older_keys: u32) -> usize {
    let master = MasterKey::new(&[1; 32]).unwrap();
    let mut keys = Vec::new();
    for serial in 1..=older_keys + 1 {
        let binding = KeyBinding {
            vpsd_id: 1,
            key_serial: serial,
            sealed_version: u64::from(serial),
        };
        let (sealed, public) = master.generate(algorithm, binding).unwrap();
        keys.push(KeyEntry {
            serial,
            sealed_version: u64::from(serial),
            public,
            sealed: (serial == older_keys + 1).then_some(sealed),
        });
    }
    let vpsd = Vpsd {
        id: 1,
        owner: "o".repeat(owner_bytes),
        algorithm,
        origin_zip: Zip::new(20260, None).unwrap(),
        keys: keys.into(),
        registers: Registers::default(),
        state: StoredState::Active,
        last_contact_unix: 0,
        provider_sequence: 0,
        version: u64::from(older_keys) + 1,
    };
    let checkpoint = Checkpoint {
        vpsds: vec![vpsd],
        ..Checkpoint::default()
    };
    let mut out = Encoder::default();
    encode_checkpoint(&checkpoint, 0, &mut out).unwrap();
    out.bytes.len() - empty_checkpoint_bytes()
}

fn empty_checkpoint_bytes() -> usize {
    let mut out = Encoder::default();
    encode_checkpoint(&Checkpoint::default(), 0, &mut out).unwrap();
    out.bytes.len()
}

/// Section 5.8: `window_from` ends the payload, an empty state is 18 bytes, and the vPSD
/// sizes the doc computes (and section 6.4 builds on) are the encoder's.
#[test]
fn the_checkpoint_layout_and_sizes_in_the_doc_are_the_encoders() {
    let text = journal_md();
    assert!(
        text.lines()
            .any(|line| line.starts_with("| ... | 8 | `u64` | window_from |")),
        "docs/JOURNAL.md section 5.8 has no `window_from` row"
    );
    let window_from: u64 = 0x0102_0304_0506_0708;
    let mut out = Encoder::default();
    encode_checkpoint(&Checkpoint::default(), window_from, &mut out).unwrap();
    assert_eq!(out.bytes.len(), 18);
    assert_eq!(
        &out.bytes[10..],
        &window_from.to_le_bytes()[..],
        "window_from comes last"
    );
    assert_eq!(
        decode_checkpoint(&out.bytes).unwrap().window_from,
        window_from
    );
    let flat = journal_md_flat();
    assert!(flat.contains("provisioning allowed is 18 bytes"));

    let owner = 16;
    let ed25519 = vpsd_entry_bytes(Algorithm::Ed25519, owner, 0);
    let p256 = vpsd_entry_bytes(Algorithm::EcdsaP256, owner, 0);
    let older_ed25519 = vpsd_entry_bytes(Algorithm::Ed25519, owner, 1) - ed25519;
    let older_p256 = vpsd_entry_bytes(Algorithm::EcdsaP256, owner, 1) - p256;
    for needle in [
        format!(
            "one Ed25519 key (m = 32) takes {} + n bytes",
            ed25519 - owner
        ),
        format!("one P-256 key (m = 65) {} + n", p256 - owner),
        format!("each older key adds {older_ed25519} (Ed25519) or {older_p256} (P-256)"),
        format!(
            "a 16-byte owner on one shard (computed from the sizes above, {ed25519} bytes each)"
        ),
    ] {
        assert!(
            flat.contains(&needle),
            "docs/JOURNAL.md does not say {needle}"
        );
    }

    // Section 6.4's shard at the default vpsds_max.
    let vpsds = EngineConfig::default().vpsds_max;
    let record = record_len(empty_checkpoint_bytes() + vpsds * ed25519);
    let segment = (SEGMENT_HEADER_BYTES + CHECKPOINT_ROOM_FACTOR * record).next_multiple_of(4096);
    let says = format!(
        "A shard at the default `engine.vpsds_max` of {} such vPSDs has a checkpoint record of {} bytes, and its new segments are {} bytes",
        thousands(vpsds),
        thousands(record),
        thousands(segment)
    );
    assert!(flat.contains(&says), "docs/JOURNAL.md should say {says}");
}

fn files_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/FILES.md")).unwrap()
}

/// The first column of the markdown table that starts with `header`.
fn first_column(text: &str, header: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|line| line.trim() != header);
    assert!(lines.next().is_some(), "no table `{header}` in the doc");
    lines
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            line.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_owned()
        })
        .collect()
}

/// The `[engine]` table of OPERATIONS.md (section 4.2) gives each key's default as the
/// code has it, and JOURNAL.md states the idempotency window's default bound as the code's.
#[test]
fn the_engine_defaults_in_the_docs_are_the_codes() {
    let defaults = indiciad::engine::EngineConfig::default();
    let expected = [
        (
            "session_indicia_max",
            defaults.session_indicia_max.to_string(),
        ),
        ("postage_mills_max", defaults.postage_mills_max.to_string()),
        ("contact_days_max", defaults.contact_days_max.to_string()),
        ("mailing_days_back", defaults.mailing_days_back.to_string()),
        (
            "mailing_days_ahead",
            defaults.mailing_days_ahead.to_string(),
        ),
        ("software_id", defaults.software_id.to_string()),
        (
            "idempotency_indicia_max",
            defaults.idempotency_indicia_max.to_string(),
        ),
        ("vpsds_max", defaults.vpsds_max.to_string()),
        ("keys_per_vpsd_max", defaults.keys_per_vpsd_max.to_string()),
        ("key_cache_keys", defaults.key_cache_keys.to_string()),
    ];
    let text = operations_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "### 4.2 `[engine]`")
        .skip_while(|line| !line.starts_with("| key |"))
        .skip(2);
    let mut rows = BTreeMap::new();
    for line in lines.by_ref().take_while(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        rows.insert(cells[1].trim_matches('`').to_owned(), cells[2].to_owned());
    }
    for (key, value) in &expected {
        let cell = rows
            .get(*key)
            .unwrap_or_else(|| panic!("`{key}` is not in OPERATIONS.md 4.2"));
        assert!(
            cell.starts_with(&format!("`{value}`")),
            "`{key}`: the doc says {cell}, the code {value}"
        );
    }
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    assert!(journal_md_flat().contains(&format!(
        "`idempotency_indicia_max` (default {})",
        thousands(defaults.idempotency_indicia_max)
    )));
}

#[test]
fn the_ledger_columns_in_the_doc_are_the_codes_in_order() {
    let documented = first_column(&files_md(), "| column | meaning |");
    assert_eq!(documented, indiciad::store::ledger::LEDGER_COLUMNS);
    // The CSV example's header is the same list.
    let text = files_md();
    assert!(text.contains(&indiciad::store::ledger::LEDGER_COLUMNS.join(",")));
}

#[test]
fn the_authorization_file_keys_in_the_doc_are_the_ones_written() {
    let documented = first_column(&files_md(), "| key | JSON type | meaning |");
    let key = aws_lc_rs::signature::Ed25519KeyPair::from_seed_unchecked(&[3; 32]).unwrap();
    let authorization = indicia_client::provider::authorize(
        &key,
        indicia_proto::AuthorizationKind::Refill,
        1,
        2,
        3,
        4,
    );
    let written = indicia_client::provider::authorization_json(&authorization);
    let mut keys: Vec<String> = written.as_object().unwrap().keys().cloned().collect();
    let mut documented_sorted = documented.clone();
    keys.sort();
    documented_sorted.sort();
    assert_eq!(documented_sorted, keys);
    assert_eq!(
        written["format"],
        indicia_client::provider::AUTHORIZATION_FORMAT
    );
}

fn operations_md() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/OPERATIONS.md"
    ))
    .unwrap()
}

/// The stats names in the first column of docs/OPERATIONS.md's statistics table, one
/// pattern each: `N` stands for a shard number, `<code>` for an error code name, `<kind>`
/// for a request kind. A cell may list several (`a.mean`, `.p50`: the second is `a.p50`).
fn documented_stats() -> Vec<String> {
    let text = operations_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "| name | meaning |");
    assert!(
        lines.next().is_some(),
        "no statistics table in docs/OPERATIONS.md"
    );
    let mut names = Vec::new();
    for line in lines.skip(1).take_while(|line| line.starts_with('|')) {
        let cell = line.split('|').nth(1).unwrap();
        let mut last = String::new();
        for name in cell.split(", ").map(|name| name.trim().trim_matches('`')) {
            let name = match name.strip_prefix('.') {
                Some(suffix) => {
                    let stem = last.rsplit_once('.').unwrap().0;
                    format!("{stem}.{suffix}")
                }
                None => name.to_owned(),
            };
            names.push(name.clone());
            last = name;
        }
    }
    names
}

fn stat_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let name: Vec<&str> = name.split('.').collect();
    pattern.len() == name.len()
        && pattern
            .iter()
            .zip(&name)
            .all(|(pattern, name)| match *pattern {
                "N" => name.parse::<u16>().is_ok(),
                "<code>" => indicia_proto::ErrorCode::from_name(name).is_some(),
                "<kind>" => RequestKind::ALL.iter().any(|kind| kind.name() == *name),
                literal => literal == *name,
            })
}

/// Metrics in which every entry there can be is present: every error code, every
/// histogram recorded.
fn full_metrics(shards: usize) -> std::sync::Arc<Metrics> {
    let metrics = Metrics::new(shards);
    let shard = &metrics.shards[0];
    for code in ErrorCode::all() {
        shard.connection_error(code);
    }
    let mut stats = ShardStats {
        session_sizes: vec![3],
        ..ShardStats::default()
    };
    shard.publish(&mut stats, 0, 0);
    shard.record_commit(500);
    shard.record_replica(700);
    let now = std::time::Instant::now();
    let requests: Vec<Received> = RequestKind::ALL
        .iter()
        .map(|&kind| Received { kind, at: now })
        .collect();
    shard.record_answered(now + std::time::Duration::from_micros(70), &requests);
    metrics
}

#[test]
fn every_stats_name_the_appliance_emits_is_documented_and_every_documented_one_emitted() {
    let documented = documented_stats();
    let emitted: Vec<String> = full_metrics(3)
        .report()
        .into_iter()
        .map(|entry| entry.name)
        .collect();
    for name in &emitted {
        assert!(
            documented.iter().any(|pattern| stat_matches(pattern, name)),
            "the stats entry `{name}` is not in docs/OPERATIONS.md section 7"
        );
    }
    for pattern in &documented {
        assert!(
            emitted.iter().any(|name| stat_matches(pattern, name)),
            "docs/OPERATIONS.md section 7 lists `{pattern}`, which the appliance never emits"
        );
    }
    // The kinds, as the doc lists them.
    let kinds: Vec<String> = RequestKind::ALL
        .iter()
        .map(|kind| format!("`{}`", kind.name()))
        .collect();
    assert!(
        operations_md().contains(&kinds.join(", ")),
        "docs/OPERATIONS.md section 7 does not list the request kinds {}",
        kinds.join(", ")
    );
}

#[test]
fn the_number_of_shards_whose_entries_always_fit_is_the_documented_one() {
    let report = full_metrics(indiciad::config::SHARDS_MAX).report();
    assert!(report.len() <= indicia_proto::message::STATS_ENTRIES_MAX);
    let shards = report
        .iter()
        .filter(|entry| entry.name.starts_with("shard.") && entry.name.ends_with(".requests"))
        .count();
    let says = format!("up to {shards} shards always fit");
    assert!(
        operations_md().replace('\n', " ").contains(&says),
        "docs/OPERATIONS.md section 7 should say `{says}`"
    );
}

fn protocol_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md")).unwrap()
}

/// The rows of the table of checks in docs/PROTOCOL.md section 4.2: the error code names
/// a check refuses with, the request id column, and whether the connection then closes.
fn documented_checks() -> Vec<(Vec<String>, String, bool)> {
    let text = protocol_md();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "| # | check | refused with | request id | then |");
    assert!(
        lines.next().is_some(),
        "no table of checks in docs/PROTOCOL.md"
    );
    lines
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .enumerate()
        .map(|(index, line)| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cells[1], (index + 1).to_string(), "rows in order");
            let codes = cells[3]
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|name| ErrorCode::from_name(name).is_some())
                .map(str::to_owned)
                .collect();
            (codes, cells[4].to_owned(), cells[5].starts_with("closed"))
        })
        .collect()
}

/// A connection's rules, and the handshake that takes them past `welcome`.
struct Rules {
    rules: ConnectionRules,
    directory: ClientDirectory,
    rng: SystemRandom,
}

impl Rules {
    fn new() -> Self {
        let mut directory = ClientDirectory::default();
        directory.insert(ClientEntry::new(
            "station-7",
            zeroize::Zeroizing::new([7; 32]),
            Role::User,
            [1001],
        ));
        let limits = Limits {
            inflight_per_shard: 10,
            ..Limits::of(&ServerConfig::default())
        };
        Self {
            rules: ConnectionRules::new(Connection::new(), limits, Instant::now()),
            directory,
            rng: SystemRandom::new(),
        }
    }

    fn authenticated() -> Self {
        let mut rules = Self::new();
        let hello = Request::Hello {
            version_min: 1,
            version_max: 1,
            client_id: "station-7".into(),
            client_nonce: [1; NONCE_BYTES],
        };
        let (_, Response::Challenge { server_nonce, .. }, _) = rules.outcome(&frame(&hello, 1), 1)
        else {
            panic!("challenge expected");
        };
        let proof = proof(
            &[7; 32],
            CLIENT_PROOF_LABEL,
            1,
            "station-7",
            &[1; NONCE_BYTES],
            &server_nonce,
        );
        let (_, welcome, _) = rules.outcome(&frame(&Request::Authenticate { proof }, 2), 1);
        assert!(matches!(welcome, Response::Welcome { .. }), "{welcome:?}");
        rules
    }

    /// What the rules answer to one frame: request id, answer, whether the connection
    /// closes. A dispatched request is answered `None`.
    fn outcome(&mut self, bytes: &[u8], shard_inflight: usize) -> (u64, Response, bool) {
        let frame = match self.rules.next_frame(bytes) {
            Next::Frame(frame) => frame,
            Next::Close(answer) => return (answer.request_id, answer.response, true),
            Next::Incomplete { needed } => panic!("{needed} bytes missing"),
        };
        match self.rules.on_frame(
            frame,
            Instant::now(),
            &self.directory,
            &self.rng,
            shard_inflight,
        ) {
            Action::Reply(answer) => (answer.request_id, answer.response, false),
            Action::ReplyAndClose(answer) => (answer.request_id, answer.response, true),
            Action::Dispatch { request, .. } => panic!("{request:?} went through"),
        }
    }
}

fn frame(request: &Request, request_id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let len = request.encode_frame(1, request_id, &mut buf).unwrap();
    buf.truncate(len);
    buf
}

/// A frame of any opcode, flags, reserved bytes and body, checksums made good.
fn raw(opcode: u8, flags: u16, request_id: u64, body: &[u8], reserved: u8) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_BYTES + body.len()];
    encode_frame(&mut buf, 1, opcode, flags, request_id, |w| w.put(body)).unwrap();
    buf[24] = reserved;
    let sum = crc32c::crc32c(&buf[0..28]);
    buf[28..32].copy_from_slice(&sum.to_le_bytes());
    buf
}

fn sign(vpsd_id: u64) -> Request {
    Request::Sign {
        vpsd_id,
        item: indicia_proto::SignItem {
            postage_mills: 730,
            mailing_date: indicia_proto::MailingDate::from_days_since_2000(9_830),
            rate_category: 1,
            destination_zip: None,
            data_digest: None,
        },
    }
}

/// Drives the real connection rules with, for each documented check, a frame that fails
/// it and as many of the later checks as it can: the answer must be that check's.
#[test]
fn the_order_of_the_checks_in_the_protocol_doc_is_the_codes() {
    let checks = documented_checks();
    assert_eq!(checks.len(), 9, "{checks:?}");
    let over_limit = 11;
    let response_flag = 0x0001;
    let bad_body = [1u8];
    let mut corrupt_body = raw(opcode::SIGN, response_flag, 0, &bad_body, 0);
    corrupt_body[HEADER_BYTES] ^= 0xFF;
    // (check number, connection state, frame, the header's request id)
    let cases: Vec<(usize, Rules, Vec<u8>, u64)> = vec![
        // Reserved bytes, response flag, id 0, a bad body.
        (
            1,
            Rules::authenticated(),
            raw(opcode::SIGN, response_flag, 0, &bad_body, 1),
            0,
        ),
        (2, Rules::authenticated(), corrupt_body, 0),
        // (3: no frame of another version passes check 1 while version 1 is all there is.)
        (
            4,
            Rules::authenticated(),
            raw(opcode::SIGN, response_flag, 0, &bad_body, 0),
            0,
        ),
        (
            5,
            Rules::authenticated(),
            raw(opcode::SIGN, 0, 0, &bad_body, 0),
            0,
        ),
        // Before welcome: an unknown opcode, and a bad body, are not not-authenticated.
        (6, Rules::new(), raw(0x7E, 0, 6, &[], 0), 6),
        (6, Rules::new(), raw(opcode::SIGN, 0, 7, &bad_body, 0), 7),
        (7, Rules::new(), frame(&sign(1002), 8), 8),
        (8, Rules::authenticated(), frame(&sign(1002), 9), 9),
        (9, Rules::authenticated(), frame(&sign(1001), 10), 10),
    ];
    for (number, mut rules, bytes, header_id) in cases {
        let (codes, request_id_column, closes) = &checks[number - 1];
        let (request_id, response, closed) = rules.outcome(&bytes, over_limit);
        let Response::Error(body) = response else {
            panic!("check {number}: refused, not {response:?}");
        };
        assert!(
            codes.contains(&body.code.name()),
            "check {number}: refused with {}, the doc says {codes:?}",
            body.code.name()
        );
        assert_eq!(closed, *closes, "check {number}: {body:?}");
        if request_id_column == "0" {
            assert_eq!(request_id, 0, "check {number}");
        } else if request_id_column == "the header's" {
            assert_eq!(request_id, header_id, "check {number}");
        }
    }
    let (codes, _, closes) = &checks[2];
    assert_eq!(codes, &["unsupported-version"]);
    assert!(closes);
}

fn cluster_md() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CLUSTER.md")).unwrap()
}

/// The rows of the table of OPERATIONS.md's section `heading`: key -> default cell.
fn config_rows(heading: &str) -> BTreeMap<String, String> {
    let text = operations_md();
    let mut rows = BTreeMap::new();
    for line in text
        .lines()
        .skip_while(|line| line.trim() != heading)
        .skip_while(|line| !line.starts_with("| key |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        rows.insert(cells[1].trim_matches('`').to_owned(), cells[2].to_owned());
    }
    rows
}

/// The `[hsm]` section's keys and defaults in OPERATIONS.md 4.8 are what a config with only
/// the required keys gets.
#[test]
fn the_hsm_defaults_in_the_doc_are_the_codes() {
    let config = indiciad::config::Config::parse(
        "[hsm]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken = \"indicia\"\n",
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let hsm = config.hsm.unwrap();
    let rows = config_rows("### 4.8 `[hsm]`");
    let keys: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(keys, ["key_label", "module", "pin_credential", "token"]);
    for key in ["module", "token"] {
        assert_eq!(rows[key], "required", "{key}");
    }
    assert_eq!(rows["key_label"], format!("`\"{}\"`", hsm.key_label));
    assert_eq!(
        rows["pin_credential"],
        format!("`\"{}\"`", hsm.pin_credential)
    );
}

/// The `[metrics]` section in OPERATIONS.md 4.9: one required key, and off without it.
#[test]
fn the_metrics_section_in_the_doc_is_the_codes() {
    let rows = config_rows("### 4.9 `[metrics]`");
    let keys: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(keys, ["listen"]);
    assert_eq!(rows["listen"], "required");
    let path = std::path::Path::new("test.toml");
    assert!(indiciad::config::Config::parse("[metrics]\n", path).is_err());
    assert_eq!(
        indiciad::config::Config::parse("", path).unwrap().metrics,
        None
    );
    let config =
        indiciad::config::Config::parse("[metrics]\nlisten = \"127.0.0.1:9750\"\n", path).unwrap();
    assert_eq!(
        config.metrics.unwrap().listen,
        "127.0.0.1:9750".parse().unwrap()
    );
}

/// The `[cluster]` section's keys and defaults in OPERATIONS.md 4.7 are what a config with
/// only the required keys gets.
#[cfg(feature = "cluster")]
#[test]
fn the_cluster_defaults_in_the_doc_are_the_codes() {
    let config = indiciad::config::Config::parse(
        "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nappliance = \"a1\"\n\
         advertise = \"127.0.0.1:7450\"\n",
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let cluster = config.cluster.unwrap();
    let rows = config_rows("### 4.7 `[cluster]`");
    let keys: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "advertise",
            "appliance",
            "etcd",
            "forward_timeout_ms",
            "lease_ttl_s",
            "peer_ca",
            "peer_certificate",
            "peer_private_key",
            "prefix",
            "rebalance"
        ]
    );
    for key in ["etcd", "appliance", "advertise"] {
        assert_eq!(rows[key], "required", "{key}");
    }
    assert_eq!(rows["lease_ttl_s"], format!("`{}`", cluster.lease_ttl_s));
    assert_eq!(rows["prefix"], format!("`\"{}\"`", cluster.prefix));
    assert_eq!(rows["rebalance"], format!("`{}`", cluster.rebalance));
    for key in ["peer_certificate", "peer_private_key", "peer_ca"] {
        assert_eq!(rows[key], "none", "{key}");
    }
    assert!(cluster.peer_tls().is_none());
    assert_eq!(
        rows["forward_timeout_ms"],
        format!("`{}`", cluster.forward_timeout_ms)
    );
}

/// The sizes of etcd's values that docs/CLUSTER.md section 8 states are what the encoders
/// make: an active vPSD with a 10-byte owner written by `a1`, its keys (one P-256 key), and
/// what each remembered request adds.
#[test]
fn the_cluster_value_sizes_in_the_doc_are_the_encoders() {
    use indiciad::engine::{ClientTag, PublicKey, RecentAnswer, RecentRequest, SealedKey};
    use indiciad::store::codec::{encode_replica_keys, encode_replica_state, Origin};
    let vpsd = Vpsd {
        id: 7,
        owner: "0123456789".into(),
        algorithm: Algorithm::EcdsaP256,
        origin_zip: "02134".parse().unwrap(),
        keys: vec![KeyEntry {
            serial: 1,
            sealed_version: 1,
            public: PublicKey {
                algorithm: Algorithm::EcdsaP256,
                bytes: vec![4; 65],
            },
            sealed: Some(SealedKey([0; indiciad::engine::keys::SEALED_KEY_BYTES])),
        }]
        .into(),
        registers: Registers::default(),
        state: StoredState::Active,
        last_contact_unix: 0,
        provider_sequence: 0,
        version: 1,
    };
    let origin = Origin {
        appliance: "a1".into(),
        ..Origin::default()
    };
    let mut out = Encoder::default();
    let state_bytes = |recent: &[RecentRequest], out: &mut Encoder| {
        encode_replica_state(&vpsd, &origin, recent, out).unwrap();
        out.bytes.len()
    };
    let bare = state_bytes(&[], &mut out);
    encode_replica_keys(&vpsd, &mut out).unwrap();
    let keys = out.bytes.len();
    let request = |answer| RecentRequest {
        client: ClientTag(1),
        request_id: 1,
        fingerprint: [0; 16],
        version: 1,
        answer,
    };
    let sign = state_bytes(
        &[request(RecentAnswer::Signed {
            key_serial: 1,
            before: Registers::default(),
            outcomes: vec![None],
        })],
        &mut out,
    ) - bare;
    let refill = state_bytes(&[request(RecentAnswer::Provider)], &mut out) - bare;
    let text = cluster_md();
    for needle in [
        format!("**{bare}** for an active vPSD with a 10-byte owner written by `a1`"),
        format!("each remembered request adds {sign} bytes for a one-item `sign`"),
        format!("{refill} for a `refill` or `contact`"),
        format!("**{keys}** for one P-256 key"),
    ] {
        assert!(
            text.contains(&needle),
            "docs/CLUSTER.md section 8 should say `{needle}`"
        );
    }
}
