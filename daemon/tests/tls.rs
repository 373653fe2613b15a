//! Mutual TLS on the real daemon: a certificate from the configured CA admits its client in
//! that client's role only; an unknown certificate, no certificate, a plaintext client and
//! a certificate lent to another client's secret are all refused, while certified clients
//! keep signing. Plaintext is refused on a non-loopback address unless the config allows
//! it, and a TLS key file others may read is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failed unwrap is a failed test

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicia_client::pki::{Authority, Issued};
use indicia_client::{Client, ClientError, Credential, TlsSettings};
use indicia_proto::{Algorithm, ErrorCode, Request, Zip};
use support::{item, verifies, write_config, Daemon, User, BIN};

const STATION: u64 = 4_201;

fn station() -> User {
    User {
        id: "station-7",
        secret: [7; 32],
        vpsds: vec![STATION],
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Client settings for a certificate issued by some CA, trusting `ca`.
fn settings(dir: &Path, ca: &Path, name: &str, issued: &Issued, server_name: &str) -> TlsSettings {
    let cert = write(dir, &format!("{name}.pem"), &issued.cert_pem, 0o644);
    let key = write(dir, &format!("{name}.key"), &issued.key_pem, 0o600);
    TlsSettings::load(ca, &cert, &key, server_name).unwrap()
}

struct Pki {
    ca: PathBuf,
    authority: Authority,
    /// The `[tls]` section.
    section: String,
}

fn pki(dir: &Path) -> Pki {
    let authority = Authority::new("test CA", 2).unwrap();
    let server = authority
        .server(&["127.0.0.1".into(), "localhost".into()])
        .unwrap();
    let ca = write(dir, "ca.pem", authority.cert_pem(), 0o644);
    let cert = write(dir, "server.pem", &server.cert_pem, 0o644);
    let key = write(dir, "server.key", &server.key_pem, 0o600);
    let section = format!(
        "[tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string()
    );
    Pki {
        ca,
        authority,
        section,
    }
}

fn connect(
    daemon: &Daemon,
    credential: &Credential,
    tls: &TlsSettings,
) -> Result<Client, ClientError> {
    let client = Client::connect_with(daemon.addr, credential, Some(tls))?;
    client.set_timeout(Some(Duration::from_secs(30)))?;
    Ok(client)
}

fn refused_code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Refused(body)) => body.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn tls_failure(result: Result<impl std::fmt::Debug, ClientError>) -> String {
    match result {
        Err(ClientError::Tls(message)) => message,
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}

#[test]
fn mutual_tls_admits_certified_clients_in_their_own_role_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let config = write_config(dir.path(), &pki.section, &[station()]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    assert!(
        daemon.log_text().contains("mutual TLS"),
        "{}",
        daemon.log_text()
    );
    let admin_tls = settings(
        dir.path(),
        &pki.ca,
        "admin",
        &pki.authority.client("admin").unwrap(),
        "127.0.0.1",
    );
    let station_tls = settings(
        dir.path(),
        &pki.ca,
        "station-7",
        &pki.authority.client("station-7").unwrap(),
        "localhost",
    );

    // Good certificates: the admin provisions and funds, the station signs.
    let mut admin = connect(&daemon, &daemon.admin_credential(), &admin_tls).unwrap();
    assert!(admin.is_tls());
    admin
        .change(&Request::Provision {
            vpsd_id: STATION,
            owner: "station-7".into(),
            algorithm: Algorithm::EcdsaP256,
            origin_zip: Zip::new(20260, None).unwrap(),
        })
        .unwrap();
    daemon.refill(&mut admin, STATION, 1_000_000);
    let (_, _, spki) = admin.public_key(STATION).unwrap();
    let mut signer = connect(&daemon, &station().credential(), &station_tls).unwrap();
    // Pipelined, so that answers and requests cross on the one TLS session.
    let ids: Vec<u64> = (0..200).map(|_| signer.next_request_id()).collect();
    for &id in &ids {
        signer
            .send(
                id,
                &Request::Sign {
                    vpsd_id: STATION,
                    item: item(73),
                },
            )
            .unwrap();
    }
    let mut pieces = Vec::new();
    for _ in &ids {
        match signer.recv().unwrap() {
            (_, indicia_proto::Response::Signed { indicium }) => {
                assert!(verifies(&indicium, &spki));
                pieces.push(indicium.payload.piece_number);
            }
            (_, other) => panic!("unexpected answer {other:?}"),
        }
    }
    pieces.sort_unstable();
    assert_eq!(pieces, (1..=200).collect::<Vec<u64>>());

    // Wrong role: the station's certificate admits the station, a user, who may not
    // provision.
    let provision = signer.change(&Request::Provision {
        vpsd_id: STATION + 1,
        owner: "station-7".into(),
        algorithm: Algorithm::Ed25519,
        origin_zip: Zip::new(20260, None).unwrap(),
    });
    assert_eq!(refused_code(provision), ErrorCode::Forbidden);
    // Nor can the station's certificate carry the admin's secret.
    let borrowed = connect(&daemon, &daemon.admin_credential(), &station_tls);
    match borrowed {
        Err(ClientError::Refused(body)) => {
            assert_eq!(body.code, ErrorCode::AuthenticationFailed);
            assert!(body.message.contains("station-7"), "{}", body.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Unknown certificate: an `admin` certificate from another CA.
    let rogue = Authority::new("rogue CA", 2).unwrap();
    let rogue_tls = settings(
        dir.path(),
        &pki.ca,
        "rogue-admin",
        &rogue.client("admin").unwrap(),
        "127.0.0.1",
    );
    let unknown = tls_failure(connect(&daemon, &daemon.admin_credential(), &rogue_tls));
    assert!(
        unknown.contains("refused this client's TLS certificate"),
        "{unknown}"
    );

    // No certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let bare = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut connection = rustls::ClientConnection::new(
        Arc::new(bare),
        rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let mut tcp = TcpStream::connect(daemon.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut stream = rustls::Stream::new(&mut connection, &mut tcp);
    let _ = stream.write_all(b"anything");
    let mut buf = [0u8; 64];
    let err = stream.read(&mut buf).unwrap_err();
    assert!(
        err.to_string().contains("CertificateRequired"),
        "no certificate: {err}"
    );

    // A plaintext client on the TLS port gets nowhere.
    assert!(Client::connect(daemon.addr, &daemon.admin_credential()).is_err());

    // A client that does not trust the appliance's certificate for the name it dialled.
    let wrong_name = settings(
        dir.path(),
        &pki.ca,
        "admin-elsewhere",
        &pki.authority.client("admin").unwrap(),
        "indicia.example",
    );
    let untrusted = tls_failure(connect(&daemon, &daemon.admin_credential(), &wrong_name));
    assert!(untrusted.contains("not trusted"), "{untrusted}");

    // Through all of that the certified station kept signing, and the refusals are counted.
    signer
        .sign(STATION, item(73))
        .expect("the station still signs");
    let stats = admin.stats().unwrap();
    let failed = stats
        .iter()
        .find(|entry| entry.name == "connections.tls_failed")
        .map(|entry| entry.value)
        .unwrap();
    assert!(failed >= 3, "connections.tls_failed = {failed}");
    drop((admin, signer));
    daemon.terminate();
}

#[test]
fn plaintext_and_tls_key_files_are_refused_where_they_would_expose_the_appliance() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: Option<&Path>, listen: &str| {
        let mut command = std::process::Command::new(BIN);
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", listen]);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let output = command.output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // No TLS on an address others can reach: refused before anything starts.
    let (status, stderr) = run(None, "0.0.0.0:0");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("[tls]"),
        "{stderr}"
    );
    // A TLS key file that others may read is refused, like the master key.
    let pki = pki(dir.path());
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = write(dir.path(), "tls.toml", &pki.section, 0o644);
    let (status, stderr) = run(Some(&config), "127.0.0.1:0");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("server.key") && stderr.contains("0600"),
        "{stderr}"
    );
}
