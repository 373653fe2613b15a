//! The master key in an HSM (docs/OPERATIONS.md 5.7), against a real SoftHSM2 token made in
//! a temporary directory: `indiciad hsm-keygen`, a first start that seals a new master key
//! by the token's key, provisioning and signing, a restart, the audit, starts refused with a
//! clear message (wrong token, key, PIN, no PIN, no [hsm] for a sealed key), and
//! `indiciad rewrap` moving a running appliance's file key into the HSM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use indicia_proto::Algorithm;
use support::softhsm::{hsm_section, indiciad, text, write_private, SoftHsm, TOKEN};
use support::{item, verifies, Daemon};

/// A config with `[hsm]` naming `token` and `key_label`.
fn hsm_config(dir: &Path, name: &str, token: &str, key_label: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, hsm_section(token, key_label)).unwrap();
    path
}

/// Signs `count` indicia of 10 mills on `vpsd`, each checked against the published key.
fn sign(daemon: &Daemon, vpsd: u64, count: usize) {
    let mut admin = daemon.admin();
    let (_, _, spki) = admin.public_key(vpsd).unwrap();
    for _ in 0..count {
        let indicium = admin.sign(vpsd, item(10)).unwrap();
        assert!(verifies(&indicium, &spki));
    }
}

/// Starts `indiciad` with `config` (and the token's environment, or none), which must fail;
/// returns its log.
fn refused_start(dir: &Path, config: &Path, env: &[(&str, &Path)]) -> String {
    let output = indiciad(
        dir,
        config,
        &["--listen", "127.0.0.1:0", "--shards", "2"],
        env,
    );
    assert!(!output.status.success(), "it started: {}", text(&output));
    text(&output)
}

/// A token with its sealing key, made by `indiciad hsm-keygen`, and a config naming it.
fn token_with_key(dir: &Path) -> (SoftHsm, PathBuf) {
    let hsm = SoftHsm::new(dir);
    let config = hsm_config(dir, "hsm.toml", TOKEN, "indicia-master");
    let made = hsm.tool(dir, &config, &["hsm-keygen"]);
    assert!(made.status.success(), "{}", text(&made));
    assert!(text(&made).contains("never extractable"), "{}", text(&made));
    (hsm, config)
}

#[test]
fn the_master_key_sealed_by_softhsm_signs_restarts_audits_and_refuses_wrong_settings() {
    let dir = tempfile::tempdir().unwrap();
    // The sealing key: made once; a second keygen refuses to replace it.
    let (hsm, config) = token_with_key(dir.path());
    let again = hsm.tool(dir.path(), &config, &["hsm-keygen"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("already"), "{}", text(&again));

    // First start: a new master key, sealed by the HSM; no file key anywhere.
    let daemon = hsm.start(dir.path(), &config);
    let data = dir.path().join("data");
    let sealed = std::fs::read_to_string(data.join("master.key.hsm")).unwrap();
    assert!(
        sealed.contains("key_label = \"indicia-master\""),
        "{sealed}"
    );
    assert!(!data.join("master.key").exists());
    let mode = std::fs::metadata(data.join("master.key.hsm"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "master.key.hsm is private");
    daemon.provision_funded(1, Algorithm::EcdsaP256, 10_000);
    daemon.provision_funded(2, Algorithm::Ed25519, 10_000);
    sign(&daemon, 1, 20);
    sign(&daemon, 2, 5);
    assert!(daemon.terminate().success());

    // Settings that cannot open the master key: each start refused with its reason, and
    // nothing in the data directory changed by it.
    let cases = [
        (
            hsm_config(dir.path(), "token.toml", "no-such-token", "indicia-master"),
            "no token labelled \"no-such-token\"",
        ),
        (
            hsm_config(dir.path(), "key.toml", TOKEN, "no-such-key"),
            "no AES key labelled \"no-such-key\"",
        ),
    ];
    for (config, expected) in &cases {
        let log = refused_start(dir.path(), config, &hsm.env());
        assert!(log.contains(expected), "{expected}: {log}");
    }
    let wrong_pin = dir.path().join("wrong-pin");
    std::fs::create_dir_all(&wrong_pin).unwrap();
    write_private(&wrong_pin.join("hsm-pin"), "0000-not-the-pin\n");
    let log = refused_start(
        dir.path(),
        &config,
        &[
            ("SOFTHSM2_CONF", &hsm.conf),
            ("CREDENTIALS_DIRECTORY", &wrong_pin),
        ],
    );
    assert!(log.contains("refused the PIN"), "{log}");
    let log = refused_start(dir.path(), &config, &[("SOFTHSM2_CONF", &hsm.conf)]);
    assert!(log.contains("$CREDENTIALS_DIRECTORY is not set"), "{log}");
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "").unwrap();
    let log = refused_start(dir.path(), &plain, &hsm.env());
    assert!(
        log.contains("sealed by an HSM here; configure [hsm]"),
        "{log}"
    );
    assert!(!data.join("master.key").exists(), "no file key was made");

    // A restart: the same master key opened by the HSM, the registers as they were.
    let daemon = hsm.start(dir.path(), &config);
    let mut admin = daemon.admin();
    let status = admin.status(1).unwrap();
    assert_eq!(status.piece_count, 20);
    assert_eq!(status.descending_mills, 10_000 - 200);
    sign(&daemon, 1, 10);
    sign(&daemon, 2, 5);
    assert!(daemon.terminate().success());

    // The integrity monitor opens the key through the HSM too, and finds nothing.
    let audit = hsm.tool(dir.path(), &config, &["audit"]);
    assert!(audit.status.success(), "{}", text(&audit));
}

#[test]
fn rewrap_moves_a_running_appliances_file_key_into_the_hsm() {
    let dir = tempfile::tempdir().unwrap();
    let (hsm, config) = token_with_key(dir.path());

    // An appliance on a file key, serving.
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(7, Algorithm::EcdsaP256, 5_000);
    sign(&daemon, 7, 10);
    let data = dir.path().join("data");
    let spki = daemon.admin().public_key(7).unwrap().2;

    // Rewrapped while it runs: it keeps signing (its key is in memory).
    let rewrap = hsm.tool(dir.path(), &config, &["rewrap"]);
    assert!(rewrap.status.success(), "{}", text(&rewrap));
    assert!(data.join("master.key.hsm").exists());
    assert!(!data.join("master.key").exists(), "{}", text(&rewrap));
    sign(&daemon, 7, 5);
    assert!(daemon.terminate().success());

    // Twice is refused; the sealed key is left as it is.
    let before = std::fs::read(data.join("master.key.hsm")).unwrap();
    let twice = hsm.tool(dir.path(), &config, &["rewrap"]);
    assert_eq!(twice.status.code(), Some(2), "{}", text(&twice));
    assert!(
        text(&twice).contains("sealed by an HSM already"),
        "{}",
        text(&twice)
    );
    assert_eq!(std::fs::read(data.join("master.key.hsm")).unwrap(), before);

    // The next start opens the same key by the HSM: the vPSD, its key and registers.
    let daemon = hsm.start(dir.path(), &config);
    let mut admin = daemon.admin();
    assert_eq!(admin.public_key(7).unwrap().2, spki);
    let status = admin.status(7).unwrap();
    assert_eq!(status.piece_count, 15);
    assert_eq!(status.descending_mills, 5_000 - 150);
    sign(&daemon, 7, 5);
    assert!(daemon.terminate().success());
    let audit = hsm.tool(dir.path(), &config, &["audit"]);
    assert!(audit.status.success(), "{}", text(&audit));
}
