//! The appliance signing under load, on the embedded default configuration.
//!
//! `cargo run --release -p indiciad --example demo [-- SECONDS]`
//!
//! Starts the appliance exactly as `indiciad` with no arguments does (listen on
//! 127.0.0.1:7450, data in ./indicia-data, one shard per core; first start creates the
//! keys), provisions and funds a demo vPSD through the admin credential and the
//! development provider key, and drives it over TCP with many pipelining clients, all
//! signing for that one vPSD. Then it runs the same load again with coalescing off
//! (`session_indicia_max = 1`: one session, one key load and one register update per
//! indicium) and compares the two. Client and appliance share this machine's cores, so
//! the figures to compare are the ratios of one run: the appliance's CPU time per
//! indicium against the raw cost of one signature, measured here too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use hdrhistogram::Histogram;
use indicia_client::provider::{authorize, load_provider_key};
use indicia_client::{Client, ClientError, Credential};
use indicia_proto::{
    format_mills, Algorithm, AuthorizationKind, ErrorCode, Indicium, MailingDate, Request,
    Response, SignItem, Zip,
};
use indiciad::config::Config;
use indiciad::datadir::DataDir;
use indiciad::server::{self, Server};

const VPSD: u64 = 7_450_001;
const CLIENTS: usize = 24;
const WINDOW: usize = 4;
const POSTAGE_MILLS: u64 = 730;

type Error = Box<dyn std::error::Error>;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The indicium every demo request asks for: 0.73 mailed today.
fn demo_item() -> SignItem {
    SignItem {
        postage_mills: POSTAGE_MILLS,
        mailing_date: MailingDate::from_unix_seconds(now_unix())
            .unwrap_or(MailingDate::from_days_since_2000(0)),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

/// CPU time (user + system) of this process's threads whose name starts with one of
/// `prefixes`, from /proc (clock ticks of 10 ms).
fn cpu_of_threads(prefixes: &[&str]) -> Duration {
    let mut ticks = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|prefix| name.starts_with(prefix)) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesized name: state is field 3, utime 14, stime 15.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(14) + field(15);
    }
    Duration::from_millis(ticks * 10)
}

/// The appliance's threads: the shard executors and their blocking pools (fdatasync),
/// which inherit the executor's thread name.
fn appliance_cpu() -> Duration {
    cpu_of_threads(&["indicia-shard"])
}

/// Raw ECDSA P-256 signing cost on one thread, per signature.
fn raw_sign_cost(samples: u32) -> Result<Duration, Error> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())?;
    let message = [0x5A; 61];
    let started = Instant::now();
    for _ in 0..samples {
        std::hint::black_box(pair.sign(&rng, &message)?);
    }
    Ok(started.elapsed() / samples)
}

struct Phase {
    name: &'static str,
    seconds: f64,
    indicia: u64,
    sessions: u64,
    appliance_cpu: Duration,
    latency_us: Histogram<u64>,
}

fn stat(entries: &HashMap<String, u64>, name: &str) -> u64 {
    entries.get(name).copied().unwrap_or(0)
}

/// Keeps the demo vPSD provisioned and funded for the next phase.
fn prepare_vpsd(server: &Server, data: &DataDir) -> Result<Credential, Error> {
    let admin = Credential::load(&data.path.join(indiciad::datadir::ADMIN_CREDENTIAL_FILE))?;
    let mut client = Client::connect(server.local_addr(), &admin)?;
    match client.status(VPSD) {
        Ok(_) => {}
        Err(ClientError::Refused(body)) if body.code == ErrorCode::UnknownVpsd => {
            client.change(&Request::Provision {
                vpsd_id: VPSD,
                owner: "demo".into(),
                algorithm: Algorithm::EcdsaP256,
                origin_zip: Zip::new(20260, None)?,
            })?;
        }
        Err(err) => return Err(err.into()),
    }
    let status = client.status(VPSD)?;
    let key = load_provider_key(&data.path.join(indiciad::datadir::PROVIDER_KEY_FILE))?;
    let authorization = authorize(
        &key,
        AuthorizationKind::Refill,
        VPSD,
        100_000_000,
        status.provider_sequence + 1,
        now_unix() + 600,
    );
    let status = client.change(&Request::Refill {
        vpsd_id: VPSD,
        authorization,
    })?;
    println!(
        "  vPSD {VPSD}: {} pieces so far, {} available",
        status.piece_count,
        format_mills(status.descending_mills)
    );
    Ok(admin)
}

/// Many clients, each pipelining WINDOW single-indicium sign requests for the one vPSD.
fn run_load(
    name: &'static str,
    server: &Server,
    admin: &Credential,
    seconds: f64,
) -> Result<Phase, Error> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let mut client = Client::connect(server.local_addr(), admin)?;
        let stop = Arc::clone(&stop);
        clients.push(
            std::thread::Builder::new()
                .name(format!("demo-client-{n}"))
                .spawn(move || -> Result<(u64, Histogram<u64>), ClientError> {
                    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                        .unwrap_or_else(|_| unreachable!("constant bounds"));
                    let mut sent_at = HashMap::new();
                    let mut signed = 0;
                    let item = demo_item();
                    loop {
                        while sent_at.len() < WINDOW && !stop.load(Ordering::Relaxed) {
                            let id = client.next_request_id();
                            client.send(
                                id,
                                &Request::Sign {
                                    vpsd_id: VPSD,
                                    item,
                                },
                            )?;
                            sent_at.insert(id, Instant::now());
                        }
                        if sent_at.is_empty() {
                            return Ok((signed, latency));
                        }
                        let (id, response) = client.recv()?;
                        if let Some(sent) = sent_at.remove(&id) {
                            let micros = sent.elapsed().as_micros();
                            latency.saturating_record(u64::try_from(micros).unwrap_or(u64::MAX));
                        }
                        match response {
                            Response::Signed { .. } => signed += 1,
                            Response::Error(body) => return Err(ClientError::Refused(body)),
                            _ => {}
                        }
                    }
                })?,
        );
    }
    let before = stats(server, admin)?;
    let cpu_before = appliance_cpu();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for client in clients {
        let (_, histogram) = client.join().map_err(|_| "a client thread panicked")??;
        latency_us.add(&histogram)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let appliance_cpu = appliance_cpu().saturating_sub(cpu_before);
    let after = stats(server, admin)?;
    Ok(Phase {
        name,
        seconds: elapsed,
        indicia: stat(&after, "indicia") - stat(&before, "indicia"),
        sessions: stat(&after, "sessions") - stat(&before, "sessions"),
        appliance_cpu,
        latency_us,
    })
}

fn stats(server: &Server, admin: &Credential) -> Result<HashMap<String, u64>, Error> {
    let mut client = Client::connect(server.local_addr(), admin)?;
    Ok(client
        .stats()?
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect())
}

fn phase(
    config: &Config,
    data: &DataDir,
    name: &'static str,
    seconds: f64,
) -> Result<Phase, Error> {
    let server = Server::start(config, data)?;
    println!(
        "{name}: appliance on {} with {} shards, session_indicia_max = {}",
        server.local_addr(),
        server.shards(),
        config.engine.session_indicia_max
    );
    let admin = prepare_vpsd(&server, data)?;
    let result = run_load(name, &server, &admin, seconds);
    server.shutdown();
    server.join()?;
    result
}

fn main() -> Result<(), Error> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map_or(Ok(5.0), |text| text.parse())?;
    let config = Config::default();
    let data = server::open_data_dir(&config)?;
    if !data.created.is_empty() {
        println!("first start: created in {}:", data.path.display());
        for path in &data.created {
            println!("  {}", path.display());
        }
    }
    println!(
        "load: {CLIENTS} clients x {WINDOW} pipelined sign requests, all for vPSD {VPSD}, {seconds} s per phase\n"
    );
    let raw_before = raw_sign_cost(2_000)?;
    let on = phase(&config, &data, "coalescing on ", seconds)?;
    let mut off_config = config.clone();
    off_config.engine.session_indicia_max = 1;
    let off = phase(&off_config, &data, "coalescing off", seconds)?;
    let raw = (raw_before + raw_sign_cost(2_000)?) / 2;

    println!(
        "\n{:<15} {:>11} {:>11} {:>9} {:>16} {:>10} {:>10} {:>10}",
        "", "indicia/s", "sessions/s", "per sess", "CPU/indicium", "p50 ms", "p99 ms", "max ms"
    );
    for phase in [&on, &off] {
        let per_indicium = phase.appliance_cpu.as_secs_f64() / phase.indicia.max(1) as f64;
        println!(
            "{:<15} {:>11.0} {:>11.0} {:>9.1} {:>8.1} us {:>4.2}x {:>10.2} {:>10.2} {:>10.2}",
            phase.name,
            phase.indicia as f64 / phase.seconds,
            phase.sessions as f64 / phase.seconds,
            phase.indicia as f64 / phase.sessions.max(1) as f64,
            per_indicium * 1e6,
            per_indicium / raw.as_secs_f64(),
            phase.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
            phase.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            phase.latency_us.max() as f64 / 1000.0,
        );
    }
    println!(
        "\nraw ECDSA P-256 signature on one thread: {:.1} us. CPU/indicium is the appliance's \
         threads' CPU time (shards and their fdatasync pool) per indicium, and its ratio to that.",
        raw.as_secs_f64() * 1e6
    );
    show_one(&config, &data)?;
    Ok(())
}

/// Signs one more indicium after both phases and shows it decoded.
fn show_one(config: &Config, data: &DataDir) -> Result<(), Error> {
    let server = Server::start(config, data)?;
    let admin = Credential::load(&data.path.join(indiciad::datadir::ADMIN_CREDENTIAL_FILE))?;
    let mut client = Client::connect(server.local_addr(), &admin)?;
    let indicium: Indicium = client.sign(VPSD, demo_item())?;
    let status = client.status(VPSD)?;
    let payload = &indicium.payload;
    println!(
        "\none indicium ({} bytes): vPSD {} piece {} postage {} AR {} DR {}; the vPSD now: AR {} + DR {} = CS {}",
        indicium.to_bytes().as_ref().len(),
        payload.vpsd_id,
        payload.piece_number,
        format_mills(payload.postage_mills),
        format_mills(payload.ascending_mills),
        format_mills(payload.descending_mills),
        format_mills(status.ascending_mills),
        format_mills(status.descending_mills),
        format_mills(status.control_total_mills),
    );
    drop(client);
    server.shutdown();
    server.join()?;
    Ok(())
}
