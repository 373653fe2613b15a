//! `indicia-loadgen cluster-demo` end to end (feature `cluster`; etcd-server installed):
//! 3 etcd members and 2 appliances, requests forwarded to the owner, a planned move under
//! load, the owner killed under load, the survivor taking over, and the demo's own checks
//! holding (exit status 0, "checks out").
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_indicia-loadgen");

#[test]
fn the_cluster_demo_takes_over_and_accounts_for_every_indicium() {
    let output = Command::new(EXE)
        .args(["cluster-demo", "--duration", "1.5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("a2 took over"), "{stdout}");
    assert!(stdout.contains("requests to a1, the owner"), "{stdout}");
    assert!(stdout.contains("first indicium signed by a2"), "{stdout}");
    assert!(!stdout.contains("forwarded 0 requests"), "{stdout}");
    assert!(!stdout.contains("NEVER"), "{stdout}");
    assert!(
        stdout.contains("no piece number issued twice: yes"),
        "{stdout}"
    );
    assert!(stdout.contains("the demo checks out"), "{stdout}");
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
}
