//! One short end-to-end run: the load generator starts the real appliance (its
//! `appliance` subcommand runs `indiciad`'s code) in a temporary directory and drives it in
//! closed and open loop, with offline verification; the report agrees with the appliance's
//! own statistics and registers; the appliance stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use indicia_client::Client;
use indicia_loadgen::appliance::Appliance;
use indicia_loadgen::run::{Mode, RunConfig};
use indicia_loadgen::workload::{Distribution, VpsdPicker};
use indicia_proto::Algorithm;

const EXE: &str = env!("CARGO_BIN_EXE_indicia-loadgen");

#[test]
fn the_load_generator_drives_the_appliance_and_reports_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let appliance = Appliance::spawn_with(Path::new(EXE), &dir.path().join("data"), None).unwrap();
    let credential = appliance.admin_credential().unwrap();
    let picker = VpsdPicker::new(700, 4, Distribution::Zipf(1.0));
    let mut admin = Client::connect(appliance.addr, &credential).unwrap();
    let mut config = RunConfig {
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
    };
    // Provisioned and funded for all the run can spend.
    indicia_loadgen::fund(
        &mut admin,
        &config,
        Algorithm::Ed25519,
        &appliance.provider_key(),
    )
    .unwrap();
    let closed = indicia_loadgen::measure(
        "closed",
        &config,
        &credential,
        Algorithm::Ed25519,
        Some(appliance.pid()),
    )
    .unwrap();
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
    indicia_loadgen::fund(
        &mut admin,
        &config,
        Algorithm::Ed25519,
        &appliance.provider_key(),
    )
    .unwrap();
    let open =
        indicia_loadgen::measure("open", &config, &credential, Algorithm::Ed25519, None).unwrap();
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
        addr: appliance.addr,
        credential: credential.clone(),
        tls: Some(tls),
        connections: 3,
        mode: Mode::Closed { window: 32 },
        duration: Duration::from_millis(700),
        picker,
        batch: 1,
        frames_per_write: 16,
        postage_mills: 10,
        verify_every: 5,
        seed: 9,
        expected_errors: Vec::new(),
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
