//! A cluster moved from a file master key to HSM keys without downtime (docs/OPERATIONS.md
//! 5.7): two appliances and etcd on loopback, each with a SoftHSM2 token of its own. One
//! appliance at a time is drained, rewrapped while it runs (`indiciad rewrap`), restarted on
//! its HSM and given its vPSDs back, while signers keep signing through the client library
//! and see no error at all. Then the checker: no piece number twice, the registers exact.
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicia_client::Pool;
use indicia_proto::Algorithm;
use support::cluster::{wait_until, Acknowledged, Appliance, Signers};
use support::etcd::EtcdCluster;
use support::item;
use support::softhsm::{hsm_section, text, SoftHsm, TOKEN};

const FUNDS: u64 = 100_000_000;
const VPSDS: [u64; 6] = [201, 202, 203, 204, 205, 206];

/// Drains `this` (its vPSDs go to `other`), moves its master key into an HSM of its own
/// with `indiciad rewrap` while it runs, restarts it on the HSM and ends the drain; the
/// signers must keep signing all the while.
fn rewrap_rolling(name: &str, this: &mut Appliance, other: &Appliance, signers: &Signers) {
    // Its vPSDs go to the other appliance; signing goes on there.
    let mut other_admin = other.daemon().admin();
    other_admin.cluster_drain(name, false).unwrap();
    wait_until("drained", || this.stat("cluster.vpsds_owned") == 0);
    signers.wait_for(100);

    // Its master key into its own HSM, while it runs; then a restart on the HSM.
    let hsm = SoftHsm::new(&this.dir.join("hsm"));
    let file_config = std::fs::read_to_string(&this.config).unwrap();
    let hsm_config = this.dir.join("indiciad-hsm.toml");
    std::fs::write(
        &hsm_config,
        format!("{file_config}\n{}", hsm_section(TOKEN, "indicia-master")),
    )
    .unwrap();
    let made = hsm.tool(&this.dir, &hsm_config, &["hsm-keygen"]);
    assert!(made.status.success(), "{}", text(&made));
    let rewrap = hsm.tool(&this.dir, &hsm_config, &["rewrap"]);
    assert!(rewrap.status.success(), "{}", text(&rewrap));
    assert!(!this.data().join("master.key").exists());
    assert!(this.daemon.take().unwrap().terminate().success());
    this.config = hsm_config;
    this.env = hsm
        .env()
        .iter()
        .map(|(name, value)| (*name, value.to_path_buf()))
        .collect();
    this.start();
    // The cluster's master key check in etcd matched: it serves its vPSDs again.
    other_admin.cluster_drain(name, true).unwrap();
    wait_until("vPSDs back after the drain", || {
        this.stat("cluster.vpsds_owned") > 0
    });
    signers.wait_for(100);
}

#[test]
fn a_rolling_rewrap_moves_the_cluster_into_the_hsms_while_it_signs() {
    let etcd = EtcdCluster::start(1);
    let root = tempfile::tempdir().unwrap();
    let (mut a1, mut a2) = Appliance::started_pair(root.path(), &etcd);
    for vpsd in VPSDS {
        a1.daemon()
            .provision_funded(vpsd, Algorithm::EcdsaP256, FUNDS);
    }

    // Signers through the client library, which routes to the owners and sends again
    // (same request id) when a vPSD moved or its appliance went away.
    let seeds = [a1.daemon().addr.to_string(), a2.daemon().addr.to_string()];
    let pool = Arc::new(
        Pool::builder(&seeds, &a1.daemon().admin_credential())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    );
    let acked = Arc::new(Mutex::new(Acknowledged::default()));
    let signers = Signers::start(4, &acked, |signer| {
        let pool = Arc::clone(&pool);
        move |turn| {
            let vpsd = VPSDS[(turn % VPSDS.len() as u64) as usize];
            pool.sign(vpsd, item(100 + turn % 50))
                .unwrap_or_else(|err| panic!("signer {signer}: vPSD {vpsd}: {err}"))
        }
    });
    signers.wait_for(200);

    rewrap_rolling("a1", &mut a1, &a2, &signers);
    rewrap_rolling("a2", &mut a2, &a1, &signers);
    let signed = signers.stop();
    assert!(signed >= 600, "{signed}");

    // Both on their HSMs now: every indicium charged once, the registers exact.
    let mut admin = a2.daemon().admin();
    let acked = acked.lock().unwrap();
    for vpsd in VPSDS {
        acked.check(&mut admin, vpsd, FUNDS);
    }
    for appliance in [&a1, &a2] {
        assert!(appliance.data().join("master.key.hsm").exists());
        assert!(!appliance.data().join("master.key").exists());
    }
}
