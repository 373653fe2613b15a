//! One short end-to-end run of the load generator against the real `indiciad`: closed and
//! open loop, a batch workload over several vPSDs, offline verification, and a report whose
//! figures agree with the appliance's own statistics.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use indicia_loadgen::run::{Mode, RunConfig};
use indicia_loadgen::workload::{Distribution, VpsdPicker};
use indicia_proto::Algorithm;
use support::Daemon;

#[test]
fn the_load_generator_drives_the_appliance_and_reports_what_it_did() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    let credential = daemon.admin_credential();
    let picker = VpsdPicker::new(700, 4, Distribution::Zipf(1.0));
    let mut admin = daemon.admin();
    indicia_loadgen::prepare_vpsds(
        &mut admin,
        picker.ids(),
        Algorithm::Ed25519,
        10_000_000,
        &daemon.dir.join("provider.key"),
    )
    .unwrap();
    let pid = daemon.child.id();
    let mut config = RunConfig {
        addr: daemon.addr,
        credential: credential.clone(),
        connections: 3,
        mode: Mode::Closed { window: 4 },
        duration: Duration::from_millis(700),
        picker,
        batch: 1,
        postage_mills: 10,
        verify_every: 10,
        seed: 5,
    };
    let closed = indicia_loadgen::measure(
        "closed",
        &config,
        &credential,
        Algorithm::Ed25519,
        Some(pid),
    )
    .unwrap();
    assert!(closed.tally.indicia > 50, "{}", closed.to_table());
    assert_eq!(closed.tally.indicia, closed.tally.requests);
    assert!(closed.tally.errors.is_empty(), "{:?}", closed.tally.errors);
    assert!(closed.tally.verified > 0 && closed.tally.verify_failed == 0);
    assert_eq!(closed.tally.latency_us.len(), closed.tally.requests);
    // The appliance counted the same indicia the load generator received.
    let json = closed.to_json();
    assert_eq!(json["appliance"]["indicia"], closed.tally.indicia);
    assert!(json["appliance"]["cpu_per_indicium_us"].as_f64().unwrap() > 0.0);

    config.mode = Mode::Open { rate_per_s: 300.0 };
    config.batch = 8;
    let open =
        indicia_loadgen::measure("open", &config, &credential, Algorithm::Ed25519, None).unwrap();
    // 0.7 s at 100 requests/s on each of 3 connections: requests 0..70 are due before the
    // end on each, and every one was sent and answered, however late.
    assert_eq!(open.tally.requests, 210, "{}", open.to_table());
    assert_eq!(open.tally.indicia, open.tally.requests * 8);
    assert!(open.tally.errors.is_empty(), "{:?}", open.tally.errors);
    // Registers agree with everything both runs were told.
    let total: u64 = (700..704)
        .map(|vpsd| admin.status(vpsd).unwrap().ascending_mills)
        .sum();
    assert_eq!(total, (closed.tally.indicia + open.tally.indicia) * 10);
}
