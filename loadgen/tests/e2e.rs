//! One short end-to-end run: the load generator starts the real appliance (its
//! `appliance` subcommand runs `indiciad`'s code) in a temporary directory and drives it in
//! closed and open loop, with offline verification; the report agrees with the appliance's
//! own statistics and registers; the appliance stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use indicia_client::{Client, Credential};
use indicia_loadgen::appliance::Appliance;
use indicia_loadgen::run::{ClientKind, Mode, RunConfig, Validity};
use indicia_loadgen::workload::{Distribution, VpsdPicker};
use indicia_proto::Algorithm;

const EXE: &str = env!("CARGO_BIN_EXE_indicia-loadgen");

/// Funds the run's vPSDs (Ed25519) for all it can spend, then measures it as `label`
/// (with the appliance's CPU time when `pid` is given).
fn funded_run(
    appliance: &Appliance,
    admin: &mut Client,
    config: &RunConfig,
    label: &str,
    pid: Option<u32>,
) -> indicia_loadgen::report::Report {
    indicia_loadgen::fund(admin, config, Algorithm::Ed25519, &appliance.provider_key()).unwrap();
    indicia_loadgen::measure(label, config, &config.credential, Algorithm::Ed25519, pid).unwrap()
}

/// A short run of single-indicium signs at 10 mills in closed loop, raw frames over 3
/// connections with 4 in flight each, every 10th indicium verified; each test changes what
/// it is about.
fn config(appliance: &Appliance, credential: &Credential, picker: VpsdPicker) -> RunConfig {
    RunConfig {
        addr: appliance.addr,
        credential: credential.clone(),
        tls: None,
        connections: 3,
        mode: Mode::Closed { window: 4 },
        duration: Duration::from_millis(700),
        picker,
        batch: 1,
        frames_per_write: 4,
        postage_mills: 10,
        verify_every: 10,
        seed: 5,
        expected_errors: Vec::new(),
        client: ClientKind::Raw,
    }
}

#[test]
fn the_load_generator_drives_the_appliance_and_reports_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let appliance = Appliance::spawn_with(Path::new(EXE), &dir.path().join("data"), None).unwrap();
    let credential = appliance.admin_credential().unwrap();
    let picker = VpsdPicker::new(700, 4, Distribution::Zipf(1.0));
    let mut admin = Client::connect(appliance.addr, &credential).unwrap();
    let mut config = config(&appliance, &credential, picker);
    // Provisioned and funded for all the run can spend.
    let closed = funded_run(
        &appliance,
        &mut admin,
        &config,
        "closed",
        Some(appliance.pid()),
    );
    assert!(closed.tally.indicia > 50, "{}", closed.to_table());
    assert_eq!(closed.tally.indicia, closed.tally.requests);
    assert!(closed.tally.errors.is_empty(), "{:?}", closed.tally.errors);
    assert!(closed.tally.verified > 0 && closed.tally.verify_failed == 0);
    assert_eq!(closed.tally.latency_us.len(), closed.tally.requests);
    assert_eq!(closed.tally.requests_ok, closed.tally.requests);
    assert!(closed.validity().is_valid(), "{}", closed.to_table());
    // The appliance counted the same indicia the load generator received.
    let json = closed.to_json();
    assert_eq!(json["appliance"]["indicia"], closed.tally.indicia);
    assert!(json["appliance"]["cpu_per_indicium_us"].as_f64().unwrap() > 0.0);

    config.mode = Mode::Open { rate_per_s: 300.0 };
    config.batch = 8;
    let open = funded_run(&appliance, &mut admin, &config, "open", None);
    // 0.7 s at 100 requests/s on each of 3 connections: requests 0..70 are due before the
    // end on each, and every one was sent and answered, however late.
    assert_eq!(open.tally.requests, 210, "{}", open.to_table());
    assert_eq!(open.tally.indicia, open.tally.requests * 8);
    assert!(open.tally.errors.is_empty(), "{:?}", open.tally.errors);
    assert!(open.validity().is_valid(), "{}", open.to_table());
    // Registers agree with everything both runs were told.
    let total: u64 = (700..704)
        .map(|vpsd| admin.status(vpsd).unwrap().ascending_mills)
        .sum();
    assert_eq!(total, (closed.tally.indicia + open.tally.indicia) * 10);
    drop(admin);
    assert!(appliance.stop().unwrap().success());
}

/// Through the client library: callers share one pool, which batches their calls into
/// `sign-batch` frames and sends each vPSD's to its shard; closed and open loop, both
/// counted exactly against the registers.
#[test]
fn the_load_generator_drives_the_appliance_through_the_client_library() {
    let dir = tempfile::tempdir().unwrap();
    let appliance = Appliance::spawn_with(Path::new(EXE), &dir.path().join("data"), None).unwrap();
    let credential = appliance.admin_credential().unwrap();
    let picker = VpsdPicker::new(800, 3, Distribution::Uniform);
    let mut admin = Client::connect(appliance.addr, &credential).unwrap();
    let mut config = RunConfig {
        seed: 7,
        client: ClientKind::Library {
            callers: 24,
            batching: true,
        },
        ..config(&appliance, &credential, picker)
    };
    let closed = funded_run(
        &appliance,
        &mut admin,
        &config,
        "closed, library",
        Some(appliance.pid()),
    );
    assert!(closed.validity().is_valid(), "{}", closed.to_table());
    assert!(closed.tally.indicia > 50, "{}", closed.to_table());
    assert_eq!(closed.tally.indicia, closed.tally.requests);
    assert!(closed.tally.verified > 0 && closed.tally.verify_failed == 0);
    let pool = closed.tally.library.expect("the pool's figures");
    assert_eq!(pool.calls, closed.tally.requests);
    assert!(pool.frames_sent < pool.calls, "{pool:?}");
    let json = closed.to_json();
    assert_eq!(json["client_library"]["calls"], pool.calls);
    assert_eq!(json["appliance"]["indicia"], closed.tally.indicia);

    config.mode = Mode::Open { rate_per_s: 400.0 };
    let open = funded_run(&appliance, &mut admin, &config, "open, library", None);
    // 0.7 s at 400 calls/s: calls 0..280 are due before the end, each made, however late.
    assert_eq!(open.tally.requests, 280, "{}", open.to_table());
    assert!(open.validity().is_valid(), "{}", open.to_table());
    let total: u64 = (800..803)
        .map(|vpsd| admin.status(vpsd).unwrap().ascending_mills)
        .sum();
    assert_eq!(total, (closed.tally.indicia + open.tally.indicia) * 10);
    // The library's calls went to their vPSDs' shards (the admin's plain connection, which
    // funded them, is another matter).
    assert_eq!(closed.delta("cross_shard.requests"), 0);
    assert_eq!(open.delta("cross_shard.requests"), 0);
    drop(admin);
    assert!(appliance.stop().unwrap().success());
}

/// The same over mutual TLS: each connection's reader and writer threads share one TLS
/// session, requests pipelined in batches of frames, answers verified.
#[test]
fn the_load_generator_signs_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (section, tls) = indicia_loadgen::tls_files(dir.path()).unwrap();
    let config_path = dir.path().join("indiciad.toml");
    std::fs::write(&config_path, section).unwrap();
    let appliance =
        Appliance::spawn_with(Path::new(EXE), &dir.path().join("data"), Some(&config_path))
            .unwrap();
    let credential = appliance.admin_credential().unwrap();
    // The appliance refuses a plaintext client outright.
    assert!(Client::connect(appliance.addr, &credential).is_err());
    let picker = VpsdPicker::new(800, 2, Distribution::Uniform);
    let mut admin = Client::connect_with(appliance.addr, &credential, Some(&tls)).unwrap();
    indicia_loadgen::prepare_vpsds(
        &mut admin,
        picker.ids(),
        Algorithm::EcdsaP256,
        10_000_000,
        &appliance.provider_key(),
    )
    .unwrap();
    let config = RunConfig {
        tls: Some(tls),
        mode: Mode::Closed { window: 32 },
        frames_per_write: 16,
        verify_every: 5,
        seed: 9,
        ..config(&appliance, &credential, picker)
    };
    let report = indicia_loadgen::measure(
        "closed, TLS",
        &config,
        &credential,
        Algorithm::EcdsaP256,
        Some(appliance.pid()),
    )
    .unwrap();
    assert!(report.tally.indicia > 50, "{}", report.to_table());
    assert_eq!(report.tally.indicia, report.tally.requests);
    assert!(report.tally.errors.is_empty(), "{:?}", report.tally.errors);
    assert!(report.validity().is_valid(), "{}", report.to_table());
    assert!(report.tally.verified > 0 && report.tally.verify_failed == 0);
    assert_eq!(
        report.to_json()["appliance"]["indicia"],
        report.tally.indicia
    );
    let total: u64 = (800..802)
        .map(|vpsd| admin.status(vpsd).unwrap().ascending_mills)
        .sum();
    assert_eq!(total, report.tally.indicia * 10);
    drop(admin);
    assert!(appliance.stop().unwrap().success());
}

/// A vPSD funded for only 300 indicia, driven past that: the run is invalid, with the
/// `insufficient-funds` refusals counted apart; its throughput is the indicia signed over
/// its duration (the vPSD's own piece count agrees), and its latency histogram holds the
/// successful requests only. The CLI's `run` says so and exits with status 2.
#[test]
fn a_run_that_spends_more_than_its_vpsd_holds_is_invalid_and_counts_only_what_was_signed() {
    const VPSD: u64 = 900;
    const FUNDED_INDICIA: u64 = 300;
    const POSTAGE_MILLS: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let appliance = Appliance::spawn_with(Path::new(EXE), &dir.path().join("data"), None).unwrap();
    let credential = appliance.admin_credential().unwrap();
    let mut admin = Client::connect(appliance.addr, &credential).unwrap();
    indicia_loadgen::prepare_vpsds(
        &mut admin,
        std::iter::once(VPSD),
        Algorithm::Ed25519,
        FUNDED_INDICIA * POSTAGE_MILLS,
        &appliance.provider_key(),
    )
    .unwrap();
    let config = RunConfig {
        connections: 2,
        duration: Duration::from_millis(600),
        postage_mills: POSTAGE_MILLS,
        seed: 3,
        ..config(
            &appliance,
            &credential,
            VpsdPicker::new(VPSD, 1, Distribution::Uniform),
        )
    };
    let report = indicia_loadgen::measure(
        "underfunded",
        &config,
        &credential,
        Algorithm::Ed25519,
        Some(appliance.pid()),
    )
    .unwrap();
    let table = report.to_table();
    let tally = &report.tally;
    let status = admin.status(VPSD).unwrap();
    // Everything the vPSD held was spent, and only that was signed.
    assert_eq!(status.descending_mills, 0, "{table}");
    assert_eq!(status.piece_count, FUNDED_INDICIA, "{table}");
    assert_eq!(tally.indicia, status.piece_count, "{table}");
    assert_eq!(tally.requests_ok, FUNDED_INDICIA, "{table}");
    // The refusals that followed are counted by code, apart.
    let refused = tally.errors["insufficient-funds"];
    assert!(refused > 0, "{table}");
    assert_eq!(tally.errors.len(), 1, "{:?}", tally.errors);
    assert_eq!(tally.requests, tally.requests_ok + refused);
    assert!(tally.transport_failures.is_empty() && tally.unanswered == 0);
    assert_eq!(tally.verify_failed, 0);
    // The appliance counted the same refusals.
    assert_eq!(report.after["errors.insufficient-funds"], refused);
    // Neither the throughput nor the latency histogram contains them.
    assert_eq!(
        report.indicia_per_s(),
        FUNDED_INDICIA as f64 / report.seconds
    );
    assert_eq!(tally.latency_us.len(), FUNDED_INDICIA);
    let cpu_s = report.appliance_cpu.unwrap().as_secs_f64();
    let cpu_per_indicium = report.cpu_per_indicium_us().unwrap();
    assert!((cpu_per_indicium - cpu_s * 1e6 / FUNDED_INDICIA as f64).abs() < 1e-6);
    // The point is invalid, with the reason and its count.
    assert_eq!(
        report.validity(),
        Validity::Invalid([("insufficient-funds".to_owned(), refused)].into())
    );
    let json = report.to_json();
    assert_eq!(json["validity"], "invalid");
    assert_eq!(json["invalid_reasons"]["insufficient-funds"], refused);
    assert_eq!(json["errors"]["insufficient-funds"], refused);
    assert_eq!(json["indicia"], FUNDED_INDICIA);
    assert_eq!(json["latency_us"]["count"], FUNDED_INDICIA);
    assert!(
        table.starts_with(&format!(
            "*** underfunded: INVALID: insufficient-funds {refused} "
        )),
        "{table}"
    );

    // The CLI, against the now empty vPSD and without a provider key to fund it: a
    // warning first, the invalid report, exit status 2.
    let output = std::process::Command::new(EXE)
        .args(["run", "--addr", &appliance.addr.to_string(), "--credential"])
        .arg(appliance.data_dir.join("admin.credential"))
        .args(["--first-vpsd", &VPSD.to_string(), "--vpsds", "1"])
        .args(["--connections", "1", "--window", "2", "--duration", "0.2"])
        .args(["--postage", "0.010", "--algorithm", "ed25519"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("vPSD 900 holds 0.000"), "{stderr}");
    assert!(stdout.contains("INVALID: insufficient-funds"), "{stdout}");
    assert!(stdout.contains("0 indicia signed"), "{stdout}");
    drop(admin);
    assert!(appliance.stop().unwrap().success());
}
