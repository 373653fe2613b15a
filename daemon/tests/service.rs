//! `indiciad` as a program: the embedded default, first-start files, flags, the data
//! directory's fixed shard count, and the systemd unit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Daemon, Reaped, BIN};

#[test]
fn with_no_arguments_it_runs_on_the_embedded_default_and_says_where_the_keys_are() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Reaped(
        Command::new(BIN)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut log = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains("listening on");
        log.push(line);
        if done {
            break;
        }
    }
    let log = log.join("\n");
    // Keep reading, so that the rest of its log goes somewhere.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    assert!(
        log.contains("listening on 127.0.0.1:7450"),
        "the embedded default listens on 127.0.0.1:7450 (is another appliance running?):\n{log}"
    );
    let data = dir.path().join("indicia-data");
    for file in ["master.key", "admin.credential", "provider.key"] {
        assert!(log.contains(&format!("indicia-data/{file}")), "{log}");
        let mode = std::fs::metadata(data.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(log.contains(&format!("with {cores} shards")), "{log}");
    // An admin can use it right away with the credential it created.
    let credential = indicia_client::Credential::load(&data.join("admin.credential")).unwrap();
    let mut client = indicia_client::Client::connect("127.0.0.1:7450", &credential).unwrap();
    assert_eq!(client.role(), indicia_proto::Role::Admin);
    assert!(client
        .stats()
        .unwrap()
        .iter()
        .any(|entry| entry.name == "shards"));
    drop(client);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let rest = rest.join().unwrap().join("\n");
    assert!(rest.contains("SIGINT: stopping"), "{rest}");
}

#[test]
fn a_data_directory_keeps_its_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(5, indicia_proto::Algorithm::Ed25519, 1_000);
    assert!(daemon.terminate().success());
    let output = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--shards", "3"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds 2 shards"), "{stderr}");
    // Shards = 0 (one per core) adopts what the directory holds.
    let mut config = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut config, b"shards = 0\n").unwrap();
    let daemon = Daemon::start(dir.path(), Some(config.path()));
    assert_eq!(daemon.admin().status(5).unwrap().control_total_mills, 1_000);
}

/// A `layout.toml` that cannot be read, or that is missing beside shard journals, stops the
/// start with a message saying what to do, and nothing is written (a new shard count would
/// place vPSDs on the wrong shards). It used to be overwritten with the configured count.
#[test]
fn an_unreadable_or_missing_layout_beside_journals_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(5, indicia_proto::Algorithm::Ed25519, 1_000);
    assert!(daemon.terminate().success());
    let data = dir.path().join("data");
    let layout = data.join("layout.toml");
    // A start that does not stop by itself (it started) is stopped after 30 s.
    let start = || {
        let child = Command::new(BIN)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--shards", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let watchdog = std::thread::spawn(move || {
            for _ in 0..300 {
                std::thread::sleep(Duration::from_millis(100));
                if nix::sys::signal::kill(pid, None).is_err() {
                    return;
                }
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        });
        let output = child.wait_with_output().unwrap();
        watchdog.join().unwrap();
        output
    };
    // Not UTF-8: the file cannot be read as text.
    std::fs::write(&layout, b"shards = \xff\xfe\n").unwrap();
    let output = start();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read") && stderr.contains("layout.toml"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&layout).unwrap(), b"shards = \xff\xfe\n");
    // Garbage that is text.
    std::fs::write(&layout, "shards = lots\n").unwrap();
    let stderr = String::from_utf8_lossy(&start().stderr).into_owned();
    assert!(stderr.contains("`shards = N`"), "{stderr}");
    // Missing beside the journals.
    std::fs::remove_file(&layout).unwrap();
    let output = start();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is missing but the data directory holds 2 shard journal(s)"),
        "{stderr}"
    );
    assert!(!layout.exists());
    // Restored as the message says: it starts, with everything there.
    std::fs::write(&layout, "shards = 2\n").unwrap();
    let daemon = Daemon::start(dir.path(), None);
    assert_eq!(daemon.admin().status(5).unwrap().control_total_mills, 1_000);
}

/// Right after kill -9 the appliance starts again on the same address at once: the dead
/// process's io_uring rings may hold its listening sockets for a moment, and the start
/// waits for them instead of failing with "Address already in use" (which it did in 5 of
/// 6 tries).
#[test]
fn a_start_right_after_kill_9_on_the_same_address_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(5, indicia_proto::Algorithm::Ed25519, 100_000);
    for round in 0..4 {
        let addr = daemon.addr;
        let mut client = daemon.admin();
        for _ in 0..20 {
            client
                .call(&indicia_proto::Request::Sign {
                    vpsd_id: 5,
                    item: support::item(100),
                })
                .unwrap();
        }
        drop(client);
        daemon.kill();
        daemon = Daemon::start_on(dir.path(), None, &addr.to_string());
        assert_eq!(daemon.addr, addr);
        assert_eq!(
            daemon.admin().status(5).unwrap().piece_count,
            20 * (round + 1)
        );
    }
}

/// The port accepts connections only once every shard serves: a start in which one shard
/// fails (its journal was written under another master key) never accepts one, and exits
/// with an error. It used to accept (and complete handshakes) on the shards that had
/// started, telling clients `shutting-down` before exiting.
#[test]
fn no_connection_is_accepted_before_every_shard_serves() {
    let dir = tempfile::tempdir().unwrap();
    // Shard 1 of another data directory (another master key), with many records.
    let other = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(other.path(), None);
    let vpsd = (1u64..)
        .find(|id| indiciad::server::shard_of(*id, 2) == 1)
        .unwrap();
    daemon.provision_funded(vpsd, indicia_proto::Algorithm::Ed25519, 10_000_000);
    let mut client = daemon.admin();
    for _ in 0..100 {
        client
            .call(&indicia_proto::Request::SignBatch {
                vpsd_id: vpsd,
                items: vec![support::item(100); 64],
            })
            .unwrap();
    }
    drop(client);
    assert!(daemon.terminate().success());
    let data = dir.path().join("data");
    let first = Daemon::start(dir.path(), None);
    let addr = first.addr;
    assert!(first.terminate().success());
    let foreign = other.path().join("data").join("shard-001");
    let target = data.join("shard-001");
    std::fs::remove_dir_all(&target).unwrap();
    std::fs::create_dir(&target).unwrap();
    for entry in std::fs::read_dir(&foreign).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &addr.to_string(), "--shards", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut accepted = 0;
    let mut attempts = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        attempts += 1;
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            accepted += 1;
        }
        assert!(attempts < 100_000, "indiciad neither started nor failed");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("shard 1"), "{stderr}");
    assert!(
        attempts > 1,
        "the start failed before a connection could be tried"
    );
    assert_eq!(accepted, 0, "{accepted} of {attempts} connections accepted");
}

/// `indiciad audit` beside the running appliance reports the findings it reports once the
/// appliance has stopped. Here a cleanly closed journal's last record is damaged: recovery
/// locks its vPSD (the record was durable), and the audit beside the appliance used to
/// take the damage for a record being written and print `audit: clean`.
#[test]
fn the_audit_beside_a_running_appliance_finds_what_it_finds_after_the_stop() {
    use indiciad::journal::format::{record_len, RecordHeader, RECORD_HEADER_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(5, indicia_proto::Algorithm::Ed25519, 100_000);
    let mut client = daemon.admin();
    for _ in 0..5 {
        client
            .call(&indicia_proto::Request::Sign {
                vpsd_id: 5,
                item: support::item(100),
            })
            .unwrap();
    }
    drop(client);
    assert!(daemon.terminate().success());
    let data = dir.path().join("data");
    let shard = data.join(format!("shard-{:03}", indiciad::server::shard_of(5, 2)));
    let segment = shard.join(indiciad::journal::segment::file_name(1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let mut offset = indiciad::journal::format::SEGMENT_HEADER_BYTES;
    let mut last = offset;
    while let Some(header) = RecordHeader::decode(&bytes[offset..]) {
        last = offset;
        offset += record_len(header.payload_len as usize);
    }
    bytes[last + RECORD_HEADER_BYTES + 3] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();

    let audit = || {
        let output = Command::new(BIN)
            .args(["audit", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    let daemon = Daemon::start(dir.path(), None);
    match daemon.admin().status(5).unwrap().state {
        indicia_proto::VpsdState::Locked(indicia_proto::LockReason::Integrity(_)) => {}
        state => panic!("vPSD 5 should be locked by recovery: {state:?}"),
    }
    let (live_code, live) = audit();
    assert!(daemon.terminate().success());
    let (stopped_code, stopped) = audit();
    assert_eq!(stopped_code, Some(1), "{stopped}");
    assert!(stopped.contains("FINDING"), "{stopped}");
    assert_eq!(live_code, Some(1), "beside the appliance: {live}");
    let findings = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| line.contains("FINDING"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(findings(&live), findings(&stopped));
}

#[test]
fn bad_flags_and_configs_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[server]\nlinger_us = 5000000\n").unwrap();
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("server.linger_us"), "{stderr}");
    let output = Command::new(BIN)
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // An address in use is reported, not shared (SO_REUSEPORT alone would share it).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let output = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", &taken.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}

#[test]
fn the_systemd_unit_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/indiciad.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/indiciad "));
    // verify checks that the program exists: point it at the binary just built.
    let path = dir.path().join("indiciad.service");
    std::fs::write(&path, unit.replace("/usr/bin/indiciad", BIN)).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed to check the unit");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
    // The example configuration the unit's header points to is valid.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/indiciad.toml");
    let config = indiciad::config::Config::load(&example).unwrap();
    assert!(
        config.server.drain_timeout_ms < 90_000,
        "below TimeoutStopSec"
    );
    assert!(unit.contains("TimeoutStopSec=90s"));
    for file in ["indiciad.sysusers", "indiciad.tmpfiles"] {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../systemd")
                .join(file),
        )
        .unwrap();
        assert!(text.contains("/var/lib/indicia"), "{file}");
    }
}

#[test]
fn a_wrong_master_key_is_refused_and_the_journals_survive_it() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), None);
    daemon.provision_funded(8, indicia_proto::Algorithm::EcdsaP256, 5_000);
    assert!(daemon.terminate().success());
    let key = dir.path().join("data/master.key");
    let original = std::fs::read(&key).unwrap();
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
    let output = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another master key"), "{stderr}");
    std::fs::write(&key, original).unwrap();
    let daemon = Daemon::start(dir.path(), None);
    assert_eq!(daemon.admin().status(8).unwrap().control_total_mills, 5_000);
}

#[test]
fn under_systemd_it_notifies_ready_stopping_and_pings_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--shards", "2"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let mut received = Vec::new();
    let next = || {
        let mut buf = [0u8; 512];
        let len = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..len]).trim_end().to_owned()
    };
    let ready = next();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving on 127.0.0.1:"), "{ready}");
    // Watchdog pings come at half the interval while the shards' loops turn.
    for _ in 0..3 {
        received.push(next());
    }
    assert!(received.iter().all(|m| m == "WATCHDOG=1"), "{received:?}");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopping = loop {
        let message = next();
        if message != "WATCHDOG=1" {
            break message;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    assert!(child.0.wait().unwrap().success());
}

#[test]
fn with_a_linger_sessions_still_sign_and_gather_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[server]\nlinger_us = 20000", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    daemon.provision_funded(9, indicia_proto::Algorithm::Ed25519, 1_000_000);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let mut client = daemon.admin();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    client.sign(9, support::item(10)).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let mut admin = daemon.admin();
    assert_eq!(admin.status(9).unwrap().piece_count, 80);
    let stats: std::collections::HashMap<String, u64> = admin
        .stats()
        .unwrap()
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect();
    assert_eq!(stats["indicia"], 80);
    // Eight clients, one request each in flight, a 20 ms wait before each turn: sessions
    // take several requests.
    assert!(stats["session_size.max"] > 1, "{stats:?}");
}
