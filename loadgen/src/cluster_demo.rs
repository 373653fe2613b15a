//! `indicia-loadgen cluster-demo` (feature `cluster`): in a temporary directory, 3 etcd
//! members (the Debian `etcd` binary) and 2 appliances of one cluster; vPSDs provisioned
//! and funded on the first, signed under load through both appliances (the second forwards
//! to the owner), one vPSD moved to the second under load (a planned move), then the first
//! killed with SIGKILL and the second taking its vPSDs over; then a check that every
//! acknowledged indicium is accounted for and no piece number was issued twice. Everything
//! is stopped at the end.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicia_client::{Client, Credential};
use indicia_proto::{Algorithm, ErrorCode, Indicium, MailingDate, Request, Response, SignItem};
use indiciad::cluster::local::LocalEtcd;

use crate::appliance::Appliance;
use crate::run::LoadError;

/// The vPSDs of the demo.
const VPSDS: std::ops::Range<u64> = 7_100_001..7_100_009;
/// The postage of every indicium of the demo, in mills.
const POSTAGE_MILLS: u64 = 73;
/// The lease's TTL: the survivor takes over about this long after the kill (and at most
/// twice it).
const LEASE_TTL_S: u64 = 2;
/// Client threads signing.
const SIGNERS: usize = 4;

/// What the demo found: the text to print, and whether every check held.
#[derive(Debug)]
pub struct DemoOutcome {
    pub text: String,
    pub valid: bool,
}

/// What the signers saw.
#[derive(Debug, Default)]
struct Seen {
    /// Acknowledged indicia by (vPSD, piece number).
    acknowledged: BTreeMap<(u64, u64), Indicium>,
    /// Indicia acknowledged twice for one (vPSD, piece number): must stay empty.
    twice: Vec<(u64, u64)>,
    /// Signs without an answer (the connection died), by vPSD: charged wholly or not.
    unknown: BTreeMap<u64, u64>,
    refused: BTreeMap<String, u64>,
    /// When each indicium was acknowledged, and its vPSD.
    times: Vec<(Instant, u64)>,
}

fn free_address() -> Result<SocketAddr, LoadError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn write_config(
    dir: &Path,
    id: &str,
    listen: SocketAddr,
    etcd: &LocalEtcd,
) -> Result<PathBuf, LoadError> {
    let path = dir.join(format!("{id}.toml"));
    let text = format!(
        "listen = \"{listen}\"\nshards = 2\n\n[cluster]\netcd = {:?}\nappliance = \"{id}\"\n\
         advertise = \"{listen}\"\nlease_ttl_s = {LEASE_TTL_S}\n\
         # vPSDs stay where they are provisioned (a1) unless moved\nrebalance = false\n",
        etcd.endpoints()
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The files every appliance of a cluster shares (docs/CLUSTER.md): copied from the first.
pub(crate) fn seed_member(from: &Path, to: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for name in [
        indiciad::datadir::MASTER_KEY_FILE,
        indiciad::datadir::PROVIDER_KEY_FILE,
        indiciad::datadir::PROVIDER_PUBLIC_KEY_FILE,
        indiciad::datadir::ADMIN_CREDENTIAL_FILE,
    ] {
        std::fs::copy(from.join(name), to.join(name))?;
    }
    Ok(())
}

pub(crate) fn item() -> SignItem {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    SignItem {
        postage_mills: POSTAGE_MILLS,
        mailing_date: MailingDate::from_unix_seconds(now)
            .unwrap_or(MailingDate::from_days_since_2000(0)),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

/// A client thread: signs through the two appliances in turn (the one that does not own a
/// vPSD forwards to the one that does), going to the other one when cut off, until told to
/// stop.
fn signer(
    index: usize,
    addresses: [SocketAddr; 2],
    credential: Credential,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let mut clients: [Option<Client>; 2] = [None, None];
    // Every other signer uses the client library's pool: each vPSD's requests go straight
    // to its owner, as the placement says, read again after a move.
    let seeds = addresses.map(|address| address.to_string());
    let routing = (index % 2 == 1)
        .then(|| {
            indicia_client::Pool::builder(&seeds, &credential)
                .timeout(Duration::from_secs(5))
                .build()
                .ok()
        })
        .flatten();
    let mut turn = index as u64;
    while !stop.load(Ordering::Relaxed) {
        let vpsd = VPSDS.start + turn % (VPSDS.end - VPSDS.start);
        let target = usize::from((turn / 8) % 2 == 1);
        turn += 1;
        let request = Request::Sign {
            vpsd_id: vpsd,
            item: item(),
        };
        let answer = match routing.as_ref() {
            Some(routing) => routing.call(request),
            None => {
                if clients[target].is_none() {
                    clients[target] = Client::connect(addresses[target], &credential).ok();
                    if let Some(client) = &clients[target] {
                        let _ = client.set_timeout(Some(Duration::from_secs(5)));
                    }
                }
                let Some(client) = clients[target].as_mut() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                client.call(&request)
            }
        };
        let mut seen = match seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        match answer {
            Ok(Response::Signed { indicium }) => {
                let key = (indicium.payload.vpsd_id, indicium.payload.piece_number);
                if seen.acknowledged.insert(key, indicium).is_some() {
                    seen.twice.push(key);
                }
                seen.times.push((Instant::now(), vpsd));
            }
            // Forwarded, or on its way to etcd, and its answer lost: charged or not.
            Ok(Response::Error(body))
                if matches!(
                    body.code,
                    ErrorCode::ForwardFailed | ErrorCode::OutcomeUnknown
                ) =>
            {
                *seen.unknown.entry(vpsd).or_default() += 1;
            }
            Ok(Response::Error(body)) => {
                *seen.refused.entry(body.code.name()).or_default() += 1;
                drop(seen);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => {
                *seen.refused.entry("unexpected answer".into()).or_default() += 1;
            }
            Err(_) => {
                *seen.unknown.entry(vpsd).or_default() += 1;
                clients[target] = None;
            }
        }
    }
}

/// Runs the demo with `seconds` of load before the kill and after it.
pub fn cluster_demo(seconds: f64) -> Result<DemoOutcome, LoadError> {
    let mut text = String::new();
    let mut say = |line: String| {
        #[allow(clippy::print_stdout)]
        {
            println!("{line}");
        }
        text.push_str(&line);
        text.push('\n');
    };
    let dir = tempfile::tempdir()?;
    let etcd = LocalEtcd::start(&dir.path().join("etcd"), 3, Duration::from_secs(60))
        .map_err(|err| LoadError::Protocol(err.to_string()))?;
    say(format!(
        "etcd: 3 members on {}",
        etcd.endpoints().join(", ")
    ));
    let exe = std::env::current_exe()?;
    let (addr1, addr2) = (free_address()?, free_address()?);
    let (data1, data2) = (dir.path().join("a1"), dir.path().join("a2"));
    let config1 = write_config(dir.path(), "a1", addr1, &etcd)?;
    let config2 = write_config(dir.path(), "a2", addr2, &etcd)?;
    let a1 = Appliance::spawn_on(&exe, &data1, Some(&config1), &addr1.to_string())?;
    seed_member(&data1, &data2)?;
    let a2 = Appliance::spawn_on(&exe, &data2, Some(&config2), &addr2.to_string())?;
    say(format!(
        "appliances: a1 on {addr1}, a2 on {addr2} (one master key; lease {LEASE_TTL_S} s)"
    ));
    let credential = a1.admin_credential()?;
    let mut admin = Client::connect(a1.addr, &credential)?;
    let funds = 100_000_000;
    crate::prepare_vpsds(
        &mut admin,
        VPSDS,
        Algorithm::Ed25519,
        funds,
        &a1.provider_key(),
    )?;
    say(format!(
        "provisioned and funded vPSDs {}..={} on a1 ({} each)",
        VPSDS.start,
        VPSDS.end - 1,
        indicia_proto::format_mills(funds)
    ));

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let signers: Vec<_> = (0..SIGNERS)
        .map(|index| {
            let (credential, stop, seen) =
                (credential.clone(), Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || signer(index, [addr1, addr2], credential, stop, seen))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let before = seen.lock().map_or(0, |seen| seen.acknowledged.len());
    let stat = |client: &mut Client, name: &str| -> Result<u64, LoadError> {
        Ok(client
            .stats()?
            .into_iter()
            .find(|entry| entry.name == name)
            .map_or(0, |entry| entry.value))
    };
    let mut on_a2 = Client::connect(a2.addr, &credential)?;
    say(format!(
        "signing under load: {before} indicia acknowledged in {seconds} s; half the clients \
         send through a1 and a2 in turn (a2 forwarded {} requests to a1, the owner), half \
         route each vPSD's requests to its owner (the client library's pool)",
        stat(&mut on_a2, "cluster.forwarded")?
    ));

    // A planned move under load: the running session commits, the requests that come
    // meanwhile wait and are forwarded to a2.
    let moved = VPSDS.start;
    let ordered = Instant::now();
    admin.cluster_move(moved, "a2")?;
    let handed_over = ordered.elapsed();
    let first_at_a2 = seen.lock().map(|seen| seen.times.len()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let first_signed = seen.lock().ok().and_then(|seen| {
        seen.times[first_at_a2..]
            .iter()
            .find(|(_, vpsd)| *vpsd == moved)
            .map(|(at, _)| at.saturating_duration_since(ordered))
    });
    say(format!(
        "cluster move --vpsd {moved} --to a2 under load: handed over in {} ms, first indicium \
         signed by a2 {} after the command; a1 moved {} vPSD away",
        handed_over.as_millis(),
        first_signed.map_or_else(|| "NEVER".into(), |at| format!("{} ms", at.as_millis())),
        stat(&mut admin, "cluster.moved_away")?
    ));
    drop(admin);
    a1.kill()?;
    let killed = Instant::now();
    say("kill -9 a1 (the owner of every other vPSD)".into());
    std::thread::sleep(Duration::from_secs_f64(
        seconds.max(LEASE_TTL_S as f64 * 3.0),
    ));
    stop.store(true, Ordering::Relaxed);
    for signer in signers {
        signer.join().map_err(|_| LoadError::Thread)?;
    }
    let seen = match Arc::try_unwrap(seen) {
        Ok(seen) => seen
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
        Err(_) => return Err(LoadError::Thread),
    };
    // The first indicium of a vPSD a1 owned, after the kill: a2 took it over.
    let failover = seen
        .times
        .iter()
        .find(|(at, vpsd)| *at > killed && *vpsd != moved)
        .map(|(at, _)| at.saturating_duration_since(killed));
    match failover {
        Some(failover) => say(format!(
            "a2 took over: the first indicium signed by a2 was acknowledged {} ms after the kill",
            failover.as_millis()
        )),
        None => say("a2 never signed: no takeover".into()),
    }
    let (_, members) = on_a2.cluster(None)?;
    for member in &members {
        say(format!(
            "  cluster member {:<4} {:<22} alive {:<5} owns {} vPSDs",
            member.id, member.address, member.alive, member.vpsds
        ));
    }

    // The check: every acknowledged indicium is in a2's registers, no piece number twice,
    // and what a2's registers hold beyond the acknowledged indicia is whole requests that
    // got no answer (at most that many).
    let mut valid = seen.twice.is_empty() && failover.is_some() && first_signed.is_some();
    for &(vpsd, piece) in &seen.twice {
        say(format!("  vPSD {vpsd}: piece {piece} acknowledged TWICE"));
    }
    for vpsd in VPSDS {
        let status = on_a2.status(vpsd)?;
        let acked: Vec<&Indicium> = seen
            .acknowledged
            .range((vpsd, 0)..=(vpsd, u64::MAX))
            .map(|(_, indicium)| indicium)
            .collect();
        let acked_mills: u64 = acked.iter().map(|i| i.payload.postage_mills).sum();
        let unknown = seen.unknown.get(&vpsd).copied().unwrap_or(0);
        let beyond = status.piece_count.saturating_sub(acked.len() as u64);
        let balanced =
            status.ascending_mills + status.descending_mills == status.control_total_mills;
        let accounted = status.ascending_mills == acked_mills + beyond * POSTAGE_MILLS
            && beyond <= unknown
            && acked
                .iter()
                .all(|indicium| indicium.payload.piece_number <= status.piece_count);
        valid &= balanced && accounted;
        say(format!(
            "  vPSD {vpsd}: {} acknowledged, piece count {}, AR {} = acknowledged {} + {beyond} \
             unanswered of {unknown}; AR + DR = CS: {} -> {}",
            acked.len(),
            status.piece_count,
            indicia_proto::format_mills(status.ascending_mills),
            indicia_proto::format_mills(acked_mills),
            if balanced { "yes" } else { "NO" },
            if balanced && accounted {
                "ok"
            } else {
                "MISMATCH"
            }
        ));
    }
    say(format!(
        "{} indicia acknowledged in all, refusals {:?}, no piece number issued twice: {}",
        seen.acknowledged.len(),
        seen.refused,
        if seen.twice.is_empty() { "yes" } else { "NO" }
    ));
    drop(on_a2);
    a2.stop()?;
    drop(etcd);
    say(format!(
        "stopped a2 and etcd; the demo {}",
        if valid {
            "checks out"
        } else {
            "FAILED its checks"
        }
    ));
    Ok(DemoOutcome { text, valid })
}
