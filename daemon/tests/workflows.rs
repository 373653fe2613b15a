//! The provider's, operator's and verifier's workflows end to end through the real
//! binaries: `indiciad` (the appliance, `audit`, `export-ledger`) and `indiciactl`, on real
//! sockets and real journals, including the ways each can go wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use indicia_proto::Indicium;
use support::{Daemon, BIN};

/// Runs `indiciactl` against a daemon with the admin credential.
fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(support::indiciactl())
        .arg("--addr")
        .arg(daemon.addr.to_string())
        .arg("--credential")
        .arg(daemon.dir.join("admin.credential"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `indiciactl` for something that needs no appliance.
fn ctl_offline(args: &[&str]) -> Output {
    Command::new(support::indiciactl())
        .args(args)
        .output()
        .unwrap()
}

/// Runs an `indiciad` tool on a data directory.
fn tool(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns standard output.
#[track_caller]
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts the exit status and returns standard error and output together.
#[track_caller]
fn fails(output: Output, code: i32) -> String {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    format!("{}{}", stdout(&output), stderr(&output))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Provisions a vPSD and refills it with the development provider key, through the CLI.
fn fund(daemon: &Daemon, vpsd: &str, amount: &str) {
    let key = daemon.dir.join("provider.key");
    ok(ctl(daemon, &["provision", "--vpsd", vpsd]));
    ok(ctl(
        daemon,
        &[
            "refill",
            "--vpsd",
            vpsd,
            "--amount",
            amount,
            "--provider-key",
            path(&key),
        ],
    ));
}

/// Signs `count` indicia with the CLI into `out`, returning them decoded.
fn sign(daemon: &Daemon, vpsd: &str, count: &str, out: &Path, extra: &[&str]) -> Vec<Indicium> {
    let mut args = vec![
        "sign",
        "--vpsd",
        vpsd,
        "--postage",
        "0.73",
        "--count",
        count,
    ];
    args.extend(["--out", path(out)]);
    args.extend(extra);
    ok(ctl(daemon, &args));
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|line| Indicium::decode(&hex::decode(line).unwrap()).unwrap())
        .collect()
}

/// Flips one bit of the first journal copy of `needle` in the data directory's segments.
fn flip_in_journal(data: &Path, needle: &[u8]) {
    for shard in std::fs::read_dir(data).unwrap() {
        let shard = shard.unwrap().path();
        if !shard
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("shard-")
        {
            continue;
        }
        for segment in std::fs::read_dir(&shard).unwrap() {
            let segment = segment.unwrap().path();
            let bytes = std::fs::read(&segment).unwrap();
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                use std::os::unix::fs::FileExt;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&segment)
                    .unwrap();
                file.write_all_at(&[bytes[at + 10] ^ 0x01], (at + 10) as u64)
                    .unwrap();
                file.sync_all().unwrap();
                return;
            }
        }
    }
    panic!("the bytes are in no journal segment");
}

#[test]
fn a_separate_provider_issues_authorizations_and_forgeries_and_replays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The provider makes its key pair on its own machine; the operator installs only the
    // public half before the appliance's first start.
    let provider_key = dir.path().join("provider/acme.key");
    std::fs::create_dir_all(provider_key.parent().unwrap()).unwrap();
    let made = json(&ok(ctl_offline(&[
        "provider",
        "keygen",
        "--out",
        path(&provider_key),
        "--json",
    ])));
    let public = made["public_key"].as_str().unwrap().to_owned();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(
        dir.path().join("provider/acme.key.pub"),
        dir.path().join("data/provider.pub"),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path(), None);
    assert!(
        !daemon.dir.join("provider.key").exists(),
        "no development key when provider.pub is installed"
    );
    assert_eq!(
        std::fs::read_to_string(daemon.dir.join("provider.pub"))
            .unwrap()
            .trim(),
        public
    );
    ok(ctl(&daemon, &["provision", "--vpsd", "301"]));

    let authorize = |kind: &str, amount: Option<&str>, sequence: &str, out: &Path| {
        let mut args = vec![
            "provider",
            "authorize",
            "--key",
            path(&provider_key),
            "--kind",
            kind,
            "--vpsd",
            "301",
            "--sequence",
            sequence,
            "--out",
            path(out),
        ];
        if let Some(amount) = amount {
            args.extend(["--amount", amount]);
        }
        ok(ctl_offline(&args))
    };
    let refill = dir.path().join("refill-1.json");
    let said = authorize("refill", Some("120.50"), "1", &refill);
    assert!(
        said.contains("refill authorization for vPSD 301, sequence 1"),
        "{said}"
    );
    let status = json(&ok(ctl(
        &daemon,
        &["refill", "--authorization", path(&refill), "--json"],
    )));
    assert_eq!(status["descending_mills"], 120_500);
    assert_eq!(status["provider_sequence"], 1);

    // Submitted again: a replay, refused, nothing credited twice.
    let replay = fails(
        ctl(&daemon, &["refill", "--authorization", path(&refill)]),
        3,
    );
    assert!(replay.contains("authorization-replayed"), "{replay}");

    // Forged: the amount changed after the provider signed.
    let forged_path = dir.path().join("refill-2-forged.json");
    authorize("refill", Some("1.00"), "2", &forged_path);
    let text = std::fs::read_to_string(&forged_path).unwrap();
    std::fs::write(
        &forged_path,
        text.replace("\"amount_mills\":1000", "\"amount_mills\":9000000"),
    )
    .unwrap();
    let forged = fails(
        ctl(&daemon, &["refill", "--authorization", path(&forged_path)]),
        3,
    );
    assert!(forged.contains("authorization-invalid"), "{forged}");

    // Signed by someone else's key (the kind of key the development setup makes).
    let stranger = dir.path().join("stranger.key");
    ok(ctl_offline(&[
        "provider",
        "keygen",
        "--out",
        path(&stranger),
    ]));
    let foreign = fails(
        ctl(
            &daemon,
            &[
                "refill",
                "--vpsd",
                "301",
                "--amount",
                "5",
                "--provider-key",
                path(&stranger),
            ],
        ),
        3,
    );
    assert!(foreign.contains("authorization-invalid"), "{foreign}");

    // A contact authorization is not a refill, and a file for another vPSD is refused
    // before anything is sent.
    let contact = dir.path().join("contact-2.json");
    authorize("contact", None, "2", &contact);
    let wrong_kind = fails(
        ctl(&daemon, &["refill", "--authorization", path(&contact)]),
        2,
    );
    assert!(
        wrong_kind.contains("a contact authorization"),
        "{wrong_kind}"
    );
    let wrong_vpsd = fails(
        ctl(
            &daemon,
            &[
                "contact",
                "--vpsd",
                "302",
                "--authorization",
                path(&contact),
            ],
        ),
        2,
    );
    assert!(wrong_vpsd.contains("for vPSD 301"), "{wrong_vpsd}");
    let usage = fails(
        ctl_offline(&[
            "provider",
            "authorize",
            "--key",
            path(&provider_key),
            "--kind",
            "contact",
            "--vpsd",
            "301",
            "--sequence",
            "9",
            "--amount",
            "1",
            "--out",
            path(&dir.path().join("x.json")),
        ]),
        2,
    );
    assert!(usage.contains("no amount"), "{usage}");

    // The contact acknowledgment resets the watchdog and moves the sequence.
    let before = json(&ok(ctl(&daemon, &["status", "--vpsd", "301", "--json"])));
    std::thread::sleep(Duration::from_millis(1100));
    let after = json(&ok(ctl(
        &daemon,
        &["contact", "--authorization", path(&contact), "--json"],
    )));
    assert_eq!(after["provider_sequence"], 2);
    assert!(after["last_contact_unix"].as_u64() > before["last_contact_unix"].as_u64());
    assert_eq!(
        after["descending_mills"], 120_500,
        "a contact moves no money"
    );
    // The forged refill's sequence (2) is now used: even a genuine one is a replay.
    let late = dir.path().join("refill-2.json");
    authorize("refill", Some("1"), "2", &late);
    let late = fails(ctl(&daemon, &["refill", "--authorization", path(&late)]), 3);
    assert!(late.contains("authorization-replayed"), "{late}");
}

#[test]
fn an_operator_locks_unlocks_and_withdraws_and_a_withdrawn_vpsd_stays_retired() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let key = daemon.dir.join("provider.key");
    fund(&daemon, "401", "10");
    let out = dir.path().join("a.txt");
    sign(&daemon, "401", "2", &out, &[]);

    let locked = json(&ok(ctl(
        &daemon,
        &[
            "lock",
            "--vpsd",
            "401",
            "--reason",
            "meter inspection",
            "--json",
        ],
    )));
    assert_eq!(locked["state"], "locked");
    assert_eq!(locked["lock_reason"], "operator: meter inspection");
    let refused = fails(
        ctl(&daemon, &["sign", "--vpsd", "401", "--postage", "0.73"]),
        3,
    );
    assert!(refused.contains("vpsd-locked"), "{refused}");
    let unlocked = json(&ok(ctl(&daemon, &["unlock", "--vpsd", "401", "--json"])));
    assert_eq!(unlocked["state"], "active");
    sign(&daemon, "401", "1", &out, &[]);

    let withdrawn = json(&ok(ctl(&daemon, &["withdraw", "--vpsd", "401", "--json"])));
    assert_eq!(withdrawn["state"], "withdrawn");
    assert_eq!(withdrawn["refund_mills"], 10_000 - 3 * 730);
    assert_eq!(withdrawn["descending_mills"], 0);
    assert_eq!(withdrawn["ascending_mills"], 3 * 730);
    for args in [
        vec!["sign", "--vpsd", "401", "--postage", "0.73"],
        vec!["unlock", "--vpsd", "401"],
        vec!["withdraw", "--vpsd", "401"],
        vec!["rotate-key", "--vpsd", "401"],
        vec![
            "refill",
            "--vpsd",
            "401",
            "--amount",
            "1",
            "--provider-key",
            path(&key),
        ],
    ] {
        let refused = fails(ctl(&daemon, &args), 3);
        assert!(refused.contains("vpsd-withdrawn"), "{args:?}: {refused}");
    }
    // Retired for good: across a restart too.
    assert!(daemon.terminate().success());
    let daemon = Daemon::start(dir.path(), None);
    let status = json(&ok(ctl(&daemon, &["status", "--vpsd", "401", "--json"])));
    assert_eq!(status["state"], "withdrawn");
    assert_eq!(status["descending_mills"], 0);
}

#[test]
fn rotated_keys_verify_old_indicia_offline_and_online_and_the_verifier_flags_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    for vpsd in ["501", "502"] {
        fund(&daemon, vpsd, "20");
    }
    let first = dir.path().join("first.txt");
    let old = sign(&daemon, "501", "2", &first, &[]);
    assert!(old.iter().all(|indicium| indicium.payload.key_serial == 1));
    let rotated = json(&ok(ctl(
        &daemon,
        &["rotate-key", "--vpsd", "501", "--json"],
    )));
    assert_eq!(rotated["key_serial"], 2);
    let second = dir.path().join("second.txt");
    let new = sign(
        &daemon,
        "501",
        "2",
        &second,
        &[
            "--destination-zip",
            "10001",
            "--data",
            "Ada Lovelace, 12 St James's Sq",
        ],
    );
    assert!(new.iter().all(|indicium| indicium.payload.key_serial == 2));
    assert!(new[0].payload.data_digest.is_some());

    // The verifier's key directory: every serial of 501 (502's key is not there).
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    ok(ctl(
        &daemon,
        &[
            "pubkey",
            "--vpsd",
            "501",
            "--serial",
            "1",
            "--out-dir",
            path(&keys),
        ],
    ));
    ok(ctl(
        &daemon,
        &["pubkey", "--vpsd", "501", "--out-dir", path(&keys)],
    ));
    assert!(keys.join("501-1.pem").exists() && keys.join("501-2.pem").exists());

    let verified = json(&ok(ctl_offline(&[
        "verify",
        path(&first),
        path(&second),
        "--keys",
        path(&keys),
        "--json",
    ])));
    let verdicts: Vec<(u64, u64, String)> = verified
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["key_serial"].as_u64().unwrap(),
                v["piece_number"].as_u64().unwrap(),
                v["verdict"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (1, 1, "valid".to_owned()),
            (1, 2, "valid".to_owned()),
            (2, 3, "valid".to_owned()),
            (2, 4, "valid".to_owned())
        ]
    );
    // Online: the appliance knows every serial.
    let online = ok(ctl(
        &daemon,
        &["verify", path(&first), path(&second), "--online"],
    ));
    assert!(online.contains("4 indicia: 4 valid, 0 not"), "{online}");
    // The old indicia do not verify under the new key alone.
    let text = fails(
        ctl_offline(&[
            "verify",
            path(&first),
            "--key",
            path(&keys.join("501-2.pem")),
        ]),
        4,
    );
    assert!(
        text.contains("key #1 piece 1 postage 0.730: bad-signature"),
        "{text}"
    );

    // Data binding: the right recipient matches, another does not, and an indicium with
    // no digest cannot match.
    let recipient = "Ada Lovelace, 12 St James's Sq";
    ok(ctl_offline(&[
        "verify",
        path(&second),
        "--keys",
        path(&keys),
        "--data",
        recipient,
    ]));
    let text = fails(
        ctl_offline(&[
            "verify",
            path(&second),
            "--keys",
            path(&keys),
            "--data",
            "Charles Babbage, 1 Dorset St",
        ]),
        4,
    );
    assert!(text.contains("data-mismatch"), "{text}");
    let text = fails(
        ctl_offline(&[
            "verify",
            path(&first),
            "--keys",
            path(&keys),
            "--data",
            recipient,
        ]),
        4,
    );
    assert!(text.contains("carries no data digest"), "{text}");

    // The verifier store: a piece seen twice is a duplicate, within a run and across runs.
    let store = dir.path().join("seen.txt");
    let text = ok(ctl_offline(&[
        "verify",
        path(&first),
        "--keys",
        path(&keys),
        "--store",
        path(&store),
    ]));
    assert!(text.contains("2 indicia: 2 valid, 0 not"), "{text}");
    let copied = dir.path().join("copied.txt");
    let line = std::fs::read_to_string(&first).unwrap();
    let line = line.lines().next().unwrap();
    std::fs::write(&copied, format!("{line}\n{line}\n")).unwrap();
    let text = fails(
        ctl_offline(&[
            "verify",
            path(&copied),
            "--keys",
            path(&keys),
            "--store",
            path(&store),
            "--json",
        ]),
        4,
    );
    let verdicts = json(&text[..text.find('\n').unwrap()]);
    for verdict in verdicts.as_array().unwrap() {
        assert_eq!(verdict["verdict"], "duplicate", "{verdict}");
        assert!(verdict["detail"].as_str().unwrap().contains("first.txt:1"));
    }

    // Unknown key, bad signature, not an indicium.
    let other = dir.path().join("other.txt");
    sign(&daemon, "502", "1", &other, &[]);
    let mut tampered = hex::decode(line).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x40;
    let mixed = dir.path().join("mixed.txt");
    std::fs::write(
        &mixed,
        format!(
            "# a mail plant's scan\n{}\n{}\nnot-an-indicium\n",
            std::fs::read_to_string(&other).unwrap().trim(),
            hex::encode(&tampered)
        ),
    )
    .unwrap();
    let text = fails(
        ctl_offline(&["verify", path(&mixed), "--keys", path(&keys)]),
        4,
    );
    assert!(
        text.contains("mixed.txt:2: vPSD 502 key #1 piece 1"),
        "{text}"
    );
    assert!(text.contains(": unknown-key"), "{text}");
    assert!(
        text.contains("mixed.txt:3: vPSD 501 key #1 piece 1 postage 0.730: bad-signature"),
        "{text}"
    );
    assert!(text.contains("mixed.txt:4: -: malformed"), "{text}");
    assert!(text.contains("3 indicia: 0 valid, 3 not"), "{text}");
    // Online, the appliance knows 502's key.
    let text = fails(ctl(&daemon, &["verify", path(&mixed), "--online"]), 4);
    assert!(
        text.contains("mixed.txt:2: vPSD 502 key #1 piece 1 postage 0.730: valid"),
        "{text}"
    );
}

/// Reads the Data Matrix symbol in a grayscale raster with rxing (a ZXing port: a decoder
/// independent of the encoder) and returns its bytes.
fn read_data_matrix(luma: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
    let result = rxing::helpers::detect_in_luma(
        luma,
        width,
        height,
        Some(rxing::BarcodeFormat::DATA_MATRIX),
    )
    .unwrap_or_else(|err| panic!("no Data Matrix found: {err}"));
    // Binary data comes back as ISO-8859-1 text: one char per byte.
    result
        .getText()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).expect("a byte"))
        .collect()
}

fn decode_png(file: &Path) -> (Vec<u8>, u32, u32) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(file).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    pixels.truncate(info.buffer_size());
    (pixels, info.width, info.height)
}

/// Rasterizes the CLI's SVG (unit squares in module coordinates) at 4 px per module.
fn rasterize_svg(file: &Path) -> (Vec<u8>, u32, u32) {
    let text = std::fs::read_to_string(file).unwrap();
    let attr = |tag: &str, name: &str| -> usize {
        let start = tag.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
        tag[start..start + tag[start..].find('"').unwrap()]
            .parse()
            .unwrap()
    };
    let view = &text[text.find("viewBox=\"").unwrap() + 9..];
    let numbers: Vec<usize> = view[..view.find('"').unwrap()]
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    let (modules_w, modules_h) = (numbers[2], numbers[3]);
    let scale = 4;
    let (width, height) = (modules_w * scale, modules_h * scale);
    let mut pixels = vec![255u8; width * height];
    for tag in text.split("<rect").skip(1) {
        if !tag.contains("fill=\"#000\"") {
            continue;
        }
        let (x, y) = (attr(tag, "x"), attr(tag, "y"));
        for row in y * scale..(y + 1) * scale {
            pixels[row * width + x * scale..row * width + (x + 1) * scale].fill(0);
        }
    }
    (pixels, width as u32, height as u32)
}

#[test]
fn sign_renders_data_matrix_barcodes_that_an_independent_decoder_reads_and_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    fund(&daemon, "601", "5");
    let spki = daemon.admin().public_key(601).unwrap().2;

    // One indicium with every optional field (157 bytes), as PNG.
    let png_file = dir.path().join("label.png");
    let signed = sign(
        &daemon,
        "601",
        "1",
        &dir.path().join("one.txt"),
        &[
            "--destination-zip",
            "94105-1234",
            "--data",
            "Grace Hopper",
            "--barcode",
            path(&png_file),
        ],
    );
    let (luma, width, height) = decode_png(&png_file);
    let read = read_data_matrix(luma, width, height);
    assert_eq!(read.len(), 157);
    assert_eq!(read, signed[0].to_bytes().as_ref());
    let indicium = Indicium::decode(&read).unwrap();
    assert!(support::verifies(&indicium, &spki));

    // Several, as SVG: one file per piece.
    let svg = dir.path().join("batch.svg");
    let signed = sign(
        &daemon,
        "601",
        "3",
        &dir.path().join("three.txt"),
        &["--barcode", path(&svg)],
    );
    for indicium in &signed {
        let file = dir
            .path()
            .join(format!("batch-{}.svg", indicium.payload.piece_number));
        let (luma, width, height) = rasterize_svg(&file);
        let read = read_data_matrix(luma, width, height);
        let decoded = Indicium::decode(&read).unwrap();
        assert_eq!(&decoded, indicium);
        assert!(support::verifies(&decoded, &spki));
    }
    let usage = fails(
        ctl(
            &daemon,
            &[
                "sign",
                "--vpsd",
                "601",
                "--postage",
                "0.73",
                "--barcode",
                "label.gif",
            ],
        ),
        2,
    );
    assert!(usage.contains(".png or .svg"), "{usage}");
}

#[test]
fn audit_finds_a_tampered_journal_byte_and_the_ledger_reconciles_or_shows_each_difference() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let data = daemon.dir.clone();
    for vpsd in ["701", "702", "703"] {
        fund(&daemon, vpsd, "30");
    }
    let out = dir.path().join("s.txt");
    sign(&daemon, "701", "40", &out, &[]);
    let victims = sign(&daemon, "702", "3", &out, &[]);
    sign(&daemon, "703", "5", &out, &[]);
    ok(ctl(&daemon, &["withdraw", "--vpsd", "703"]));
    assert!(daemon.terminate().success());

    let data_dir = path(&data);
    let report = json(&ok(tool(&["audit", "--data-dir", data_dir, "--json"])));
    assert_eq!(report["clean"], true, "{report}");
    let checked: u64 = report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| shard["signatures_checked"].as_u64().unwrap())
        .sum();
    assert_eq!(checked, 48, "every indicium's signature is checked");

    // The ledger: 3 refills, 3 sessions (sign asks for one batch of up to 256), 1 withdrawal.
    let csv = dir.path().join("ledger.csv");
    let jsonl = dir.path().join("ledger.jsonl");
    ok(tool(&[
        "export-ledger",
        "--data-dir",
        data_dir,
        "--format",
        "csv",
        "--out",
        path(&csv),
    ]));
    let lines_jsonl = ok(tool(&["export-ledger", "--data-dir", data_dir]));
    std::fs::write(&jsonl, &lines_jsonl).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(
        rows[0],
        "shard,sequence,kind,vpsd_id,amount_mills,indicia,first_piece,last_piece,\
         ascending_mills,descending_mills,control_total_mills,provider_sequence,at_unix"
    );
    assert_eq!(rows.len(), 1 + 7, "{text}");
    let session_701 = rows
        .iter()
        .find(|row| row.contains(",session,701,"))
        .unwrap();
    assert!(
        session_701.contains(",session,701,29200,40,1,40,29200,800,30000,0,0"),
        "{session_701}"
    );
    let withdrawal = rows
        .iter()
        .find(|row| row.contains(",withdrawal,703,"))
        .unwrap();
    assert!(
        withdrawal.contains(",withdrawal,703,26350,0,0,0,3650,0,3650,0,"),
        "{withdrawal}"
    );
    for ledger in [&csv, &jsonl] {
        let text = ok(tool(&[
            "audit",
            "--data-dir",
            data_dir,
            "--ledger",
            path(ledger),
        ]));
        assert!(
            text.contains("ledger: 7 line(s) match, 0 missing, 0 extra, 0 different"),
            "{text}"
        );
    }

    // The provider's copy lost one line and has another altered.
    let edited: Vec<String> = rows
        .iter()
        .filter(|row| !row.contains(",refill,702,"))
        .map(|row| row.replace(",session,701,29200,", ",session,701,29000,"))
        .collect();
    let edited_path = dir.path().join("edited.csv");
    std::fs::write(&edited_path, edited.join("\n")).unwrap();
    let text = fails(
        tool(&[
            "audit",
            "--data-dir",
            data_dir,
            "--ledger",
            path(&edited_path),
        ]),
        1,
    );
    assert!(
        text.contains("MISSING from the ledger") && text.contains("refill vPSD 702"),
        "{text}"
    );
    assert!(text.contains("differs in amount_mills"), "{text}");
    assert!(
        text.contains("5 line(s) match, 1 missing, 0 extra, 1 different"),
        "{text}"
    );
    let reconciliation = json(
        stdout(&tool(&[
            "audit",
            "--data-dir",
            data_dir,
            "--ledger",
            path(&edited_path),
            "--json",
        ]))
        .trim(),
    );
    assert_eq!(reconciliation["ledger"]["missing"][0]["vpsd_id"], 702);
    assert_eq!(
        reconciliation["ledger"]["different"][0]["fields"][0],
        "amount_mills"
    );

    // One bit of an indicium in the journal: the audit names the record and the vPSD.
    flip_in_journal(&data, &victims[1].signature);
    let text = fails(tool(&["audit", "--data-dir", data_dir]), 1);
    assert!(
        text.contains("vPSD 702: record checksum does not match"),
        "{text}"
    );
    assert!(text.contains("vPSD 702 does not reconcile"), "{text}");
    // The appliance finds it too, keeps it as evidence, and signs no more for 702 only.
    let daemon = Daemon::start(dir.path(), None);
    let status = json(&ok(ctl(&daemon, &["status", "--vpsd", "702", "--json"])));
    assert_eq!(status["state"], "locked");
    assert!(
        status["lock_reason"]
            .as_str()
            .unwrap()
            .contains("integrity"),
        "{status}"
    );
    fails(
        ctl(&daemon, &["sign", "--vpsd", "702", "--postage", "0.73"]),
        3,
    );
    sign(&daemon, "701", "1", &out, &[]);
    assert!(daemon.terminate().success());
    let text = fails(tool(&["audit", "--data-dir", data_dir]), 1);
    assert!(
        text.contains("vPSD 702: record checksum does not match"),
        "{text}"
    );
}

#[test]
fn the_background_monitor_locks_a_vpsd_whose_journal_was_altered_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\naudit_interval_s = 1\n", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    for vpsd in ["801", "802"] {
        fund(&daemon, vpsd, "10");
    }
    let out = dir.path().join("s.txt");
    let signed = sign(&daemon, "801", "4", &out, &[]);
    sign(&daemon, "802", "4", &out, &[]);
    flip_in_journal(&daemon.dir, &signed[2].signature);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = json(&ok(ctl(&daemon, &["status", "--vpsd", "801", "--json"])));
        if status["state"] == "locked" {
            let reason = status["lock_reason"].as_str().unwrap();
            assert!(reason.contains("integrity monitor"), "{reason}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the monitor did not lock 801: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused = fails(
        ctl(&daemon, &["sign", "--vpsd", "801", "--postage", "0.73"]),
        3,
    );
    assert!(refused.contains("integrity"), "{refused}");
    // Everyone else goes on.
    sign(&daemon, "802", "2", &out, &[]);
    assert!(daemon.log_text().contains("integrity monitor"));
}

/// An operator sets up mutual TLS with the CLI alone: `indiciactl pki init` makes a CA and
/// the appliance's certificate, `pki client` a certificate per client, and every command
/// then runs over TLS with `--tls-ca --tls-cert --tls-key`; without them it gets nowhere.
#[test]
fn the_cli_makes_a_private_ca_and_works_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let written = ok(ctl_offline(&[
        "pki",
        "init",
        "--dir",
        path(&pki),
        "--server-name",
        "127.0.0.1",
        "--json",
    ]));
    assert_eq!(json(&written)["written"].as_array().unwrap().len(), 4);
    ok(ctl_offline(&[
        "pki",
        "client",
        "--dir",
        path(&pki),
        "--id",
        "admin",
    ]));
    for key in ["ca.key", "server.key", "clients/admin.key"] {
        let mode = std::fs::metadata(pki.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // A second init would overwrite the CA: refused.
    fails(
        ctl_offline(&["pki", "init", "--dir", path(&pki), "--server-name", "x"]),
        1,
    );
    // A client id that is not a safe file name is refused.
    fails(
        ctl_offline(&["pki", "client", "--dir", path(&pki), "--id", "../up"]),
        1,
    );
    let config = dir.path().join("indiciad.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n",
            path(&pki.join("server.pem")),
            path(&pki.join("server.key")),
            path(&pki.join("ca.pem")),
        ),
    )
    .unwrap();
    let daemon = Daemon::start(dir.path(), Some(&config));
    let (ca, cert, key) = (
        pki.join("ca.pem"),
        pki.join("clients/admin.pem"),
        pki.join("clients/admin.key"),
    );
    let tls = [
        "--tls-ca",
        path(&ca),
        "--tls-cert",
        path(&cert),
        "--tls-key",
        path(&key),
    ];
    let with_tls = |args: &[&str]| {
        let mut all = tls.to_vec();
        all.extend_from_slice(args);
        ctl(&daemon, &all)
    };
    ok(with_tls(&["provision", "--vpsd", "61"]));
    let provider_key = daemon.dir.join("provider.key");
    ok(with_tls(&[
        "refill",
        "--vpsd",
        "61",
        "--amount",
        "10",
        "--provider-key",
        path(&provider_key),
    ]));
    let out = dir.path().join("tls-indicia.hex");
    ok(with_tls(&[
        "sign",
        "--vpsd",
        "61",
        "--postage",
        "0.50",
        "--count",
        "3",
        "--out",
        path(&out),
    ]));
    let status = json(&ok(with_tls(&["status", "--vpsd", "61", "--json"])));
    assert_eq!(status["descending_mills"], 8_500);
    // Without TLS flags, or with only some of them.
    let plain = fails(ctl(&daemon, &["status", "--vpsd", "61"]), 1);
    assert!(!plain.contains("8.500"), "{plain}");
    let partial = fails(ctl(&daemon, &["--tls-ca", path(&ca), "stats"]), 2);
    assert!(partial.contains("--tls-cert"), "{partial}");
    drop(daemon);
}
