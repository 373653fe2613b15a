//! Hot backups (docs/OPERATIONS.md 8.2): a backup taken while signers keep signing, audited
//! clean by `indiciad audit`, restored into a fresh data directory that serves, with every
//! vPSD's registers at the backup's point: exactly those the original journals record at
//! the sequence the backup holds (their ledger), no indicium acknowledged before the backup
//! began missing, none answered after it ended there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicia_client::ClientError;
use indicia_proto::{Algorithm, ErrorCode};
use support::{item, Daemon, BIN};

const VPSDS: [u64; 4] = [11, 12, 13, 14];
const FUNDS: u64 = 1_000_000;
const POSTAGE: u64 = 10;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn refused_with(err: &ClientError) -> Option<ErrorCode> {
    match err {
        ClientError::Refused(body) => Some(body.code),
        _ => None,
    }
}

#[test]
fn a_backup_under_load_audits_clean_and_restores_at_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    for (n, vpsd) in VPSDS.iter().enumerate() {
        let algorithm = if n % 2 == 0 {
            Algorithm::EcdsaP256
        } else {
            Algorithm::Ed25519
        };
        daemon.provision_funded(*vpsd, algorithm, FUNDS);
    }

    // Signers, one per vPSD, each counting its acknowledged indicia.
    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let signers: Vec<_> = VPSDS
        .iter()
        .map(|&vpsd| {
            let mut client = daemon.admin();
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    client.sign(vpsd, item(POSTAGE)).unwrap();
                    *acked.lock().unwrap().entry(vpsd).or_default() += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let out = dir.path().join("backup");
    let before = acked.lock().unwrap().clone();
    let report = daemon.admin().backup(out.to_str().unwrap()).unwrap();
    let after = acked.lock().unwrap().clone();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for signer in signers {
        signer.join().unwrap();
    }
    assert!(report.clean, "{report:?}");
    assert_eq!(report.shards.len(), 2);
    assert!(report
        .shards
        .iter()
        .all(|shard| shard.sequence > 0 && shard.segments >= 1));
    let signed_during: u64 = VPSDS.iter().map(|v| after[v] - before[v]).sum();
    let signed_total: u64 = acked.lock().unwrap().values().sum();
    eprintln!(
        "backup: {report:?}; {signed_during} indicia acknowledged while it ran, {signed_total} in all"
    );

    // What the copy covers is written into it.
    let manifest = std::fs::read_to_string(out.join("backup.toml")).unwrap();
    for shard in &report.shards {
        assert!(
            manifest.contains(&format!("sequence = {}\n", shard.sequence)),
            "{manifest}"
        );
    }
    assert!(manifest.contains(&format!("taken_unix = {}", report.taken_unix)));
    assert!(!out.join("master.key").exists(), "no secret in the backup");
    assert!(
        !out.join("admin.credential").exists(),
        "no secret in the backup"
    );

    // The integrity monitor, run on the copy, finds nothing.
    let data = dir.path().join("data");
    let audit = Command::new(BIN)
        .arg("--data-dir")
        .arg(&out)
        .arg("audit")
        .arg("--master-key")
        .arg(data.join("master.key"))
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );

    // A second backup into the same directory, or a relative one, is refused; the
    // appliance still serves.
    let mut admin = daemon.admin();
    let again = admin.backup(out.to_str().unwrap()).unwrap_err();
    assert_eq!(
        refused_with(&again),
        Some(ErrorCode::InvalidArgument),
        "{again}"
    );
    let relative = admin.backup("backup-here").unwrap_err();
    assert_eq!(
        refused_with(&relative),
        Some(ErrorCode::InvalidArgument),
        "{relative}"
    );
    let inside = admin
        .backup(data.join("backup").to_str().unwrap())
        .unwrap_err();
    assert_eq!(
        refused_with(&inside),
        Some(ErrorCode::InvalidArgument),
        "{inside}"
    );
    assert!(!data.join("backup").exists());
    admin.sign(VPSDS[0], item(POSTAGE)).unwrap();
    assert!(daemon.terminate().success());

    // The registers at the backup's point, from the original journals: for each vPSD the
    // last ledger line of its shard at or before the sequence the backup holds.
    let ledger = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["export-ledger", "--format", "jsonl"])
        .output()
        .unwrap();
    assert!(ledger.status.success());
    let mut at_point: HashMap<u64, serde_json::Value> = HashMap::new();
    for line in String::from_utf8(ledger.stdout).unwrap().lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let shard = line["shard"].as_u64().unwrap() as usize;
        if line["sequence"].as_u64().unwrap() > report.shards[shard].sequence {
            continue;
        }
        let vpsd = line["vpsd_id"].as_u64().unwrap();
        let later = at_point
            .get(&vpsd)
            .is_none_or(|seen| seen["sequence"].as_u64() < line["sequence"].as_u64());
        if later {
            at_point.insert(vpsd, line);
        }
    }

    // Restored into a fresh data directory (with the master key, kept apart): it serves,
    // each vPSD at the backup's point.
    let restored = tempfile::tempdir().unwrap();
    let restored_data = restored.path().join("data");
    copy_dir(&out, &restored_data);
    std::fs::copy(data.join("master.key"), restored_data.join("master.key")).unwrap();
    std::fs::set_permissions(
        restored_data.join("master.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let restored_daemon = Daemon::start(restored.path(), None);
    let mut admin = restored_daemon.admin();
    for vpsd in VPSDS {
        let status = admin.status(vpsd).unwrap();
        assert!(
            (before[&vpsd]..=after[&vpsd]).contains(&status.piece_count),
            "vPSD {vpsd}: {} pieces in the backup, {} acknowledged before it began, {} when it \
             ended",
            status.piece_count,
            before[&vpsd],
            after[&vpsd]
        );
        assert_eq!(
            status.descending_mills,
            FUNDS - POSTAGE * status.piece_count
        );
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills
        );
        let expected = &at_point[&vpsd];
        assert_eq!(
            (
                status.ascending_mills,
                status.descending_mills,
                status.piece_count
            ),
            (
                expected["ascending_mills"].as_u64().unwrap(),
                expected["descending_mills"].as_u64().unwrap(),
                expected["last_piece"].as_u64().unwrap()
            ),
            "vPSD {vpsd} restored at the backup's point"
        );
        // It signs on from there: the next piece number.
        let indicium = admin.sign(vpsd, item(POSTAGE)).unwrap();
        assert_eq!(indicium.payload.piece_number, status.piece_count + 1);
    }
}
