//! `indiciactl`'s commands that need no appliance, run as the real binary: the provider's
//! key and authorization files, and the checks made before anything is sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use indicia_proto::AuthorizationKind;

const CTL: &str = env!("CARGO_BIN_EXE_indiciactl");

fn run(args: &[&str]) -> Output {
    Command::new(CTL).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_provider_makes_a_key_and_signs_authorizations_that_read_back_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("acme.key");
    let made = run(&["provider", "keygen", "--out", path(&key)]);
    assert!(made.status.success(), "{}", text(&made));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the provider key is private");
    let public_hex = std::fs::read_to_string(dir.path().join("acme.key.pub")).unwrap();
    // A second keygen never overwrites the key.
    let again = run(&["provider", "keygen", "--out", path(&key)]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));

    let file = dir.path().join("refill.json");
    let issued = run(&[
        "provider",
        "authorize",
        "--key",
        path(&key),
        "--kind",
        "refill",
        "--vpsd",
        "42",
        "--amount",
        "250.5",
        "--sequence",
        "7",
        "--valid-for",
        "600",
        "--out",
        path(&file),
    ]);
    assert!(issued.status.success(), "{}", text(&issued));
    let authorization = indicia_client::provider::read_authorization(&file).unwrap();
    assert_eq!(authorization.kind, AuthorizationKind::Refill);
    assert_eq!(
        (
            authorization.vpsd_id,
            authorization.amount_mills,
            authorization.sequence
        ),
        (42, 250_500, 7)
    );
    // The signature holds under the published public key, over the documented bytes.
    let mut public = [0u8; 32];
    hex::decode_to_slice(public_hex.trim(), &mut public).unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, &public)
        .verify(&authorization.signed_bytes(), &authorization.signature)
        .unwrap();
    // Issued once: the file is not overwritten.
    let twice = run(&[
        "provider",
        "authorize",
        "--key",
        path(&key),
        "--kind",
        "refill",
        "--vpsd",
        "42",
        "--amount",
        "1",
        "--sequence",
        "8",
        "--out",
        path(&file),
    ]);
    assert_eq!(twice.status.code(), Some(1), "{}", text(&twice));
    assert_eq!(
        indicia_client::provider::read_authorization(&file).unwrap(),
        authorization
    );
}

#[test]
fn bad_arguments_are_refused_before_connecting() {
    for (args, needle) in [
        (vec!["verify", "--online"], "needs indicia"),
        (
            vec!["verify", "x.txt"],
            "--key FILE, --keys DIR or --online",
        ),
        (vec!["refill", "--vpsd", "1"], "--authorization FILE"),
        (vec!["contact"], "--authorization FILE"),
        (
            vec![
                "sign",
                "--vpsd",
                "1",
                "--postage",
                "1",
                "--barcode",
                "a.jpg",
            ],
            ".png or .svg",
        ),
        (
            vec![
                "sign",
                "--vpsd",
                "1",
                "--postage",
                "1",
                "--destination-zip",
                "1234",
            ],
            "--destination-zip",
        ),
    ] {
        // Nothing listens on this port: a usage error must come first.
        let mut full = vec!["--addr", "127.0.0.1:9"];
        full.extend(&args);
        let output = run(&full);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output));
        assert!(
            text(&output).contains(needle),
            "{args:?}: {}",
            text(&output)
        );
    }
}
