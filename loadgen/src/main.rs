//! `indicia-loadgen`: see the library's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicia_client::{Client, Credential, TlsSettings};
use indicia_loadgen::appliance::Appliance;
use indicia_loadgen::report;
use indicia_loadgen::run::{ClientKind, Mode, RunConfig};
use indicia_loadgen::workload::{Distribution, VpsdPicker};
use indicia_proto::{format_mills, parse_amount_mills, Algorithm};

#[derive(Debug, Parser)]
#[command(
    name = "indicia-loadgen",
    version,
    about = "Load generator of the indicia appliance"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sign under load against a running appliance and report.
    Run(Box<RunArgs>),
    /// Start the appliance on its embedded default in a temporary directory, provision and
    /// fund a few vPSDs, run a short load (closed loop, then open loop at half that rate),
    /// show one indicium decoded and verified, and stop the appliance.
    Demo {
        /// Seconds per phase.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
    },
    /// Cluster mode: in a temporary directory, 3 etcd members and 2 appliances; vPSDs
    /// signed under load through both (forwarded to the owner, or routed to it by the
    /// client library), one moved to the second under load, then the first killed with
    /// SIGKILL; the second takes its vPSDs over; every acknowledged indicium is checked
    /// against the registers, and no piece number may have been issued twice. Needs the
    /// Debian package etcd-server.
    #[cfg(feature = "cluster")]
    ClusterDemo {
        /// Seconds of load before the kill (and after it, at least three leases).
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
    },
    /// The amortization experiment: the same workload against a fresh appliance per point,
    /// with coalescing off (session_indicia_max = 1) and on at several caps and levels of
    /// concurrency; a table, and the JSON of every point.
    Sweep {
        /// Seconds per point.
        #[arg(long, default_value_t = 3.0)]
        duration: f64,
        /// Session caps to try (1 = coalescing off).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
        caps: Vec<usize>,
        /// Requests in flight in total, spread over 8 connections.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        in_flight: Vec<usize>,
        /// Where to write the JSON of every point.
        #[arg(long, default_value = "sweep.json")]
        out: PathBuf,
        /// Where to write the plot: throughput and p99 latency against mean session size.
        #[arg(long, default_value = "sweep.svg")]
        svg: PathBuf,
        /// Shards of each appliance (0: one per core, the embedded default).
        #[arg(long, default_value_t = 0)]
        shards: usize,
        /// `library`: callers of the client library's pool, one call each at a time, as
        /// many as requests in flight; `raw`: frames over 8 connections.
        #[arg(long, default_value = "library", value_parser = ["library", "raw"])]
        client: String,
    },
    /// Step 4's targets, in one run, each load against a fresh appliance, through the
    /// client library: many single-indicium callers (a hot vPSD among 101 zipf), a load
    /// spread over 100 vPSDs, coalescing on against off, and an open loop at half of
    /// saturation; the appliance's CPU per indicium against the raw signature measured in
    /// the same run, latency on both sides, and each target met or not.
    Targets {
        /// Seconds per load.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Where to write the JSON of every load.
        #[arg(long, default_value = "targets.json")]
        out: PathBuf,
    },
    /// Signatures per CPU-second: aws-lc-rs directly, SoftHSM2 through PKCS#11, and the
    /// appliance under load (signing, accounting, durable commit, TCP), in one run.
    #[cfg(feature = "softhsm")]
    Peer {
        #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
        module: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// What the master key's hierarchy costs with an HSM (SoftHSM2): opening a key in the
    /// HSM per session against in memory, a vPSD key load, a signature, and the one open at
    /// start; per session and per indicium at several session sizes.
    #[cfg(feature = "softhsm")]
    HsmCost {
        #[arg(long, default_value = "/usr/lib/softhsm/libsofthsm2.so")]
        module: PathBuf,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
    },
    /// What mutual TLS costs: the same loads against a fresh plaintext appliance and a
    /// fresh mutual-TLS one, alternately, with the appliance's CPU per indicium against
    /// the raw signature in each; and the time to open a connection (TCP, TLS, the
    /// protocol's handshake) both ways.
    TlsCost {
        /// Seconds per load.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Requests in flight in total, spread over 8 connections.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        in_flight: Vec<usize>,
        /// Rounds (each: plaintext then TLS at every level).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Where to write the JSON of every load.
        #[arg(long, default_value = "tls-cost.json")]
        out: PathBuf,
    },
    /// What cluster mode costs, in one run: the same loads (saturation, then an open loop
    /// at half the rate it reached) against a fresh single-node appliance and a fresh
    /// cluster appliance replicating to a local 3-member etcd, alternately; the
    /// appliance's CPU per indicium against the raw signature, etcd's CPU per indicium,
    /// the local commit's and etcd's latency, and the client's. Needs etcd-server.
    #[cfg(feature = "cluster")]
    ClusterCost {
        /// Seconds per load.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Requests in flight in total at saturation, over 8 connections.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Rounds (each: single node, then cluster).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// vPSDs signed for.
        #[arg(long, default_value_t = 8)]
        vpsds: u64,
        /// Where to write the JSON of every load.
        #[arg(long, default_value = "cluster-cost.json")]
        out: PathBuf,
    },
    /// Many appliances (step 3 of the cluster), in one run against 3 etcd members and 3
    /// appliances: a forwarded request against a direct one (CPU and latency), 1, 2 and 3
    /// appliances loaded at once (indicia/s, CPU per indicium), and a planned move under
    /// load (time to the new owner's first signature, client latency). Needs etcd-server.
    #[cfg(feature = "cluster")]
    ClusterScale {
        /// Seconds per load.
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Requests in flight per load, over up to 4 connections.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Rounds of the forwarding comparison (each: direct, then forwarded).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// vPSDs per appliance.
        #[arg(long, default_value_t = 4)]
        vpsds: u64,
        /// Where to write the JSON of every load.
        #[arg(long, default_value = "cluster-scale.json")]
        out: PathBuf,
    },
    /// Draw the plot again from a sweep's JSON, without measuring.
    Plot {
        #[arg(long, default_value = "sweep.json")]
        from: PathBuf,
        #[arg(long, default_value = "sweep.svg")]
        svg: PathBuf,
    },
    /// Run the appliance itself (what `indiciad` runs), with indiciad's flags.
    #[command(hide = true)]
    Appliance {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:7450")]
    addr: SocketAddr,
    /// An admin credential (stats, provisioning).
    #[arg(long, default_value = "./indicia-data/admin.credential")]
    credential: PathBuf,
    /// How the load reaches the appliance: `library` (callers sharing the client library's
    /// pool, which batches and routes) or `raw` (frames written by the load generator over
    /// --connections connections).
    #[arg(long, default_value = "library", value_parser = ["library", "raw"])]
    client: String,
    /// With --client library, closed loop: the callers, each one call at a time (default:
    /// --connections x --window). The open loop starts every call when it is due.
    #[arg(long)]
    callers: Option<usize>,
    /// With --client library: every call a frame of its own (the pool's batching off).
    #[arg(long)]
    no_batching: bool,
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Closed loop: requests in flight per connection (ignored with --rate).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Open loop: total requests per second (coordinated omission corrected).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Number of vPSDs, with ids from --first-vpsd.
    #[arg(long, default_value_t = 1)]
    vpsds: u64,
    #[arg(long, default_value_t = 9_000_001)]
    first_vpsd: u64,
    /// `uniform` or `zipf:S`.
    #[arg(long, default_value = "uniform")]
    distribution: Distribution,
    /// Indicia per request (1: `sign`; more: `sign-batch`).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// The most request frames one write carries: the requests ready when a
    /// connection writes go out together, as a pipelining gateway sends them (1: every
    /// frame in its own write).
    #[arg(long, default_value_t = FRAMES_PER_WRITE)]
    frames_per_write: usize,
    #[arg(long, default_value = "0.73")]
    postage: String,
    /// Verify every N-th indicium offline (0: none).
    #[arg(long, default_value_t = 100)]
    verify_every: u64,
    /// Provision missing vPSDs and top them up first, with this provider key.
    #[arg(long)]
    provider_key: Option<PathBuf>,
    #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ed25519"])]
    algorithm: String,
    /// The appliance's process id, for its CPU time per indicium.
    #[arg(long)]
    appliance_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS to the appliance, as `indiciactl` takes it.
#[derive(Debug, Default, clap::Args)]
struct TlsArgs {
    /// The CA certificate (PEM) that issued the appliance's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The client certificate (PEM; its common name is the credential's client id).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The client's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the appliance's certificate must carry (default: the host of --addr).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
}

/// What a subcommand prints, and whether every load it measured is valid: the process
/// exits with [`EXIT_INVALID`] if one is not, after printing and writing everything.
struct Outcome {
    text: String,
    valid: bool,
}

impl Outcome {
    /// A table of `total` points, `invalid` of them invalid (their banners): the summary
    /// says how many and `what` was done with them; valid only when none is invalid.
    fn with_invalid(mut text: String, invalid: &[String], total: usize, what: &str) -> Self {
        if !invalid.is_empty() {
            text.push_str(&format!("\n*** {} of {total} {what} ***\n", invalid.len()));
            for banner in invalid {
                text.push_str(&format!("{banner}\n"));
            }
        }
        Self {
            text,
            valid: invalid.is_empty(),
        }
    }

    fn valid(text: String) -> Self {
        Self { text, valid: true }
    }
}

/// The exit status when a measurement is invalid (1 is a failure to measure at all).
const EXIT_INVALID: u8 = 2;

fn run(args: RunArgs) -> Result<Outcome, Box<dyn std::error::Error>> {
    let credential = Credential::load(&args.credential)?;
    let tls = indicia_client::transport::tls_settings_from(
        args.tls.tls_ca.as_deref(),
        args.tls.tls_cert.as_deref(),
        args.tls.tls_key.as_deref(),
        args.tls.tls_server_name.as_deref(),
        &args.addr.to_string(),
    )?;
    let algorithm: Algorithm = args.algorithm.parse()?;
    let postage_mills = parse_amount_mills(&args.postage)?;
    let picker = VpsdPicker::new(args.first_vpsd, args.vpsds, args.distribution);
    let mode = match args.rate {
        Some(rate_per_s) => Mode::Open { rate_per_s },
        None => Mode::Closed {
            window: args.window,
        },
    };
    let config = RunConfig {
        addr: args.addr,
        credential: credential.clone(),
        tls,
        connections: args.connections,
        mode,
        duration: Duration::from_secs_f64(args.duration),
        picker,
        batch: args.batch,
        frames_per_write: args.frames_per_write,
        postage_mills,
        verify_every: args.verify_every,
        seed: args.seed,
        expected_errors: Vec::new(),
        client: match args.client.as_str() {
            "raw" => ClientKind::Raw,
            _ => ClientKind::Library {
                callers: args
                    .callers
                    .unwrap_or(args.connections.max(1) * args.window.max(1)),
                batching: !args.no_batching,
            },
        },
    };
    let mut admin = Client::connect_with(args.addr, &credential, config.tls.as_ref())?;
    if let Some(provider_key) = &args.provider_key {
        indicia_loadgen::fund(&mut admin, &config, algorithm, provider_key)?;
    } else {
        for (vpsd_id, held_mills) in indicia_loadgen::underfunded(&mut admin, &config)? {
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "indicia-loadgen: vPSD {vpsd_id} holds {} ({} indicia), less than this \
                     run may spend; give --provider-key to fund it, or its insufficient-funds \
                     answers will make the run invalid",
                    format_mills(held_mills),
                    held_mills / postage_mills.max(1),
                );
            }
        }
    }
    drop(admin);
    let label = match (mode, config.client) {
        (Mode::Closed { .. }, ClientKind::Library { callers, .. }) => {
            format!("closed loop, client library, {callers} callers")
        }
        (Mode::Open { rate_per_s }, ClientKind::Library { .. }) => {
            format!("open loop, client library, {rate_per_s} calls/s")
        }
        (Mode::Closed { window }, ClientKind::Raw) => {
            format!("closed loop, {} x {window} in flight", args.connections)
        }
        (Mode::Open { rate_per_s }, ClientKind::Raw) => {
            format!("open loop, {rate_per_s} requests/s")
        }
    };
    let report =
        indicia_loadgen::measure(&label, &config, &credential, algorithm, args.appliance_pid)?;
    Ok(Outcome {
        text: if args.json {
            format!("{}\n", report.to_json())
        } else {
            report.to_table()
        },
        valid: report.validity().is_valid(),
    })
}

const DEMO_FIRST_VPSD: u64 = 7_001;
/// Request frames one write may carry in the demo and the sweep.
const FRAMES_PER_WRITE: usize = 64;

/// Provisions `count` ECDSA vPSDs from DEMO_FIRST_VPSD on a fresh appliance, unfunded
/// (each run funds them for what it can spend: [`indicia_loadgen::fund`]); returns its
/// admin credential, a picker over those vPSDs and the admin connection.
fn provisioned(
    appliance: &Appliance,
    count: u64,
    tls: Option<&TlsSettings>,
) -> Result<(Credential, VpsdPicker, Client), Box<dyn std::error::Error>> {
    let credential = appliance.admin_credential()?;
    let picker = VpsdPicker::new(DEMO_FIRST_VPSD, count, Distribution::Uniform);
    let mut admin = Client::connect_with(appliance.addr, &credential, tls)?;
    indicia_loadgen::prepare_vpsds(
        &mut admin,
        picker.ids(),
        Algorithm::EcdsaP256,
        0,
        &appliance.provider_key(),
    )?;
    Ok((credential, picker, admin))
}

fn demo(duration: f64) -> Result<Outcome, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let appliance = Appliance::spawn(&dir.path().join("indicia-data"), None)?;
    let mut out = format!(
        "appliance (indiciad, embedded default config) pid {} on {}, data in {}\n",
        appliance.pid(),
        appliance.addr,
        appliance.data_dir.display()
    );
    let (credential, picker, mut admin) = provisioned(&appliance, 4, None)?;
    out.push_str(
        "provisioned vPSDs 7001-7004 (ECDSA P-256), funded before each phase for all it can \
         spend\n\n",
    );
    let mut config = RunConfig {
        addr: appliance.addr,
        credential: credential.clone(),
        tls: None,
        connections: 8,
        mode: Mode::Closed { window: 8 },
        duration: Duration::from_secs_f64(duration),
        picker,
        batch: 1,
        frames_per_write: FRAMES_PER_WRITE,
        postage_mills: 730,
        verify_every: 50,
        seed: 1,
        expected_errors: Vec::new(),
        // As applications use it: callers sharing the client library's pool.
        client: ClientKind::Library {
            callers: 64,
            batching: true,
        },
    };
    let provider_key = appliance.provider_key();
    indicia_loadgen::fund(&mut admin, &config, Algorithm::EcdsaP256, &provider_key)?;
    let closed = indicia_loadgen::measure(
        "closed loop, client library, 64 callers",
        &config,
        &credential,
        Algorithm::EcdsaP256,
        Some(appliance.pid()),
    )?;
    out.push_str(&closed.to_table());
    let mut invalid = Vec::new();
    if closed.validity().is_valid() {
        let rate = (closed.indicia_per_s() / 2.0).max(100.0).round();
        config.mode = Mode::Open { rate_per_s: rate };
        indicia_loadgen::fund(&mut admin, &config, Algorithm::EcdsaP256, &provider_key)?;
        let open = indicia_loadgen::measure(
            &format!("open loop at half that rate, {rate} requests/s"),
            &config,
            &credential,
            Algorithm::EcdsaP256,
            Some(appliance.pid()),
        )?;
        out.push('\n');
        out.push_str(&open.to_table());
        if !open.validity().is_valid() {
            invalid.push(report::invalid_banner(&open.label, &open.validity()));
        }
    } else {
        invalid.push(report::invalid_banner(&closed.label, &closed.validity()));
        out.push_str(
            "\nno open-loop phase: its rate would be half of an invalid closed-loop figure\n",
        );
    }
    // One indicium, decoded and verified offline with the published key.
    indicia_loadgen::prepare_vpsds(
        &mut admin,
        std::iter::once(DEMO_FIRST_VPSD),
        Algorithm::EcdsaP256,
        730,
        &provider_key,
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let indicium = admin.sign(
        DEMO_FIRST_VPSD,
        indicia_proto::SignItem {
            postage_mills: 730,
            mailing_date: indicia_proto::MailingDate::from_unix_seconds(now)
                .ok_or("the clock is outside the date range")?,
            rate_category: 1,
            destination_zip: Some("10001-0001".parse()?),
            data_digest: None,
        },
    )?;
    let keys = indicia_loadgen::public_keys(&mut admin, std::iter::once(DEMO_FIRST_VPSD))?;
    let bytes = indicium.to_bytes();
    let decoded = indicia_proto::Indicium::decode(bytes.as_ref())?;
    let payload = &decoded.payload;
    let (year, month, day) = payload.mailing_date.ymd();
    out.push_str(&format!(
        "\none indicium, {} bytes: {}\n  vPSD {} key #{} {}, piece {}, postage {}, AR {}, DR {}, \
         mailed {year}-{month:02}-{day:02} from {} to {}\n  signature verified offline: {}\n",
        bytes.as_ref().len(),
        hex::encode(bytes.as_ref()),
        payload.vpsd_id,
        payload.key_serial,
        payload.algorithm.name(),
        payload.piece_number,
        format_mills(payload.postage_mills),
        format_mills(payload.ascending_mills),
        format_mills(payload.descending_mills),
        payload.origin_zip,
        payload
            .destination_zip
            .map_or("-".to_owned(), |zip| zip.to_string()),
        indicia_loadgen::run::verifies(&decoded, &keys),
    ));
    drop(admin);
    let status = appliance.stop()?;
    out.push_str(&format!("appliance stopped on SIGTERM: {status}\n"));
    for banner in &invalid {
        out.push_str(&format!("\n{banner}\n"));
    }
    Ok(Outcome {
        text: out,
        valid: invalid.is_empty(),
    })
}

/// One sweep point's load: closed loop with this many requests in flight in all, or
/// open loop at this rate; over 8 connections (fewer if fewer are in flight).
#[derive(Clone, Copy)]
enum Load {
    InFlight(usize),
    Rate(f64),
}

/// The load of one measured point: single-indicium ECDSA requests at 0.73 in `connections`
/// connections offered as `mode`, every 100th indicium verified.
fn point_config(
    appliance: &Appliance,
    credential: &Credential,
    tls: Option<TlsSettings>,
    picker: VpsdPicker,
    (connections, mode): (usize, Mode),
    duration: f64,
) -> RunConfig {
    RunConfig {
        addr: appliance.addr,
        credential: credential.clone(),
        tls,
        connections,
        mode,
        duration: Duration::from_secs_f64(duration),
        picker,
        batch: 1,
        frames_per_write: FRAMES_PER_WRITE,
        postage_mills: 730,
        verify_every: 100,
        seed: 1,
        expected_errors: Vec::new(),
        client: ClientKind::Raw,
    }
}

/// One load against a fresh appliance: one ECDSA vPSD, `session_indicia_max` = `cap`,
/// single-indicium requests; over mutual TLS with `tls`; raw frames, or with `library`
/// through the client library's pool (as many callers as requests in flight).
fn fresh_point(
    cap: usize,
    shards: usize,
    load: Load,
    duration: f64,
    tls: bool,
    library: bool,
) -> Result<indicia_loadgen::report::Report, Box<dyn std::error::Error>> {
    let label = match load {
        Load::InFlight(total) => format!("cap {cap}, {total} in flight"),
        Load::Rate(rate_per_s) => format!("cap {cap}, open loop at {rate_per_s:.0} requests/s"),
    };
    fresh(&Point {
        label,
        config: format!("[engine]\nsession_indicia_max = {cap}\n"),
        shards,
        vpsds: 1,
        distribution: Distribution::Uniform,
        library: library.then_some(true),
        load,
        duration,
        tls,
    })
}

/// One measured load against a fresh appliance of its own.
struct Point {
    label: String,
    /// The appliance's configuration (TOML) besides `shards` and `[tls]`.
    config: String,
    /// 0: one per core.
    shards: usize,
    /// ECDSA vPSDs from DEMO_FIRST_VPSD, picked by `distribution`.
    vpsds: u64,
    distribution: Distribution,
    /// Through the client library (`Some(batching)`) or raw frames over 8 connections.
    library: Option<bool>,
    load: Load,
    duration: f64,
    tls: bool,
}

fn fresh(point: &Point) -> Result<indicia_loadgen::report::Report, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("indiciad.toml");
    let (tls_section, settings) = transport(dir.path(), point.tls)?;
    std::fs::write(
        &config_path,
        format!(
            "shards = {}\n\n{}\n{tls_section}",
            point.shards, point.config
        ),
    )?;
    let appliance = Appliance::spawn(&dir.path().join("data"), Some(&config_path))?;
    let (credential, _, mut admin) = provisioned(&appliance, point.vpsds, settings.as_ref())?;
    let picker = VpsdPicker::new(DEMO_FIRST_VPSD, point.vpsds, point.distribution);
    let (connections, mode) = match point.load {
        Load::InFlight(total) => {
            let connections = total.clamp(1, 8);
            (
                connections,
                Mode::Closed {
                    window: total.div_ceil(connections),
                },
            )
        }
        Load::Rate(rate_per_s) => (8, Mode::Open { rate_per_s }),
    };
    let mut config = point_config(
        &appliance,
        &credential,
        settings,
        picker,
        (connections, mode),
        point.duration,
    );
    if let Some(batching) = point.library {
        config.client = ClientKind::Library {
            // The open loop starts each call when it is due, however many are waiting.
            callers: match point.load {
                Load::InFlight(total) => total,
                Load::Rate(_) => 1,
            },
            batching,
        };
    }
    indicia_loadgen::fund(
        &mut admin,
        &config,
        Algorithm::EcdsaP256,
        &appliance.provider_key(),
    )?;
    drop(admin);
    let report = indicia_loadgen::measure(
        &point.label,
        &config,
        &credential,
        Algorithm::EcdsaP256,
        Some(appliance.pid()),
    )?;
    appliance.stop()?;
    Ok(report)
}

struct SweepArgs<'a> {
    duration: f64,
    /// Through the client library (callers = requests in flight), or raw frames.
    library: bool,
    caps: &'a [usize],
    in_flight: &'a [usize],
    shards: usize,
    out_path: &'a std::path::Path,
    svg_path: &'a std::path::Path,
}

fn sweep(
    SweepArgs {
        duration,
        library,
        caps,
        in_flight,
        shards,
        out_path,
        svg_path,
    }: SweepArgs<'_>,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut points = Vec::new();
    let mut plotted = Vec::new();
    let mut invalid = Vec::new();
    // The best *valid* closed-loop point with coalescing on: (cap, indicia/s).
    let mut saturation: Option<(usize, f64)> = None;
    let mut table = report::row_header(&format!("{:>5} {:>9}", "cap", "in flight"));
    for &total in in_flight {
        for &cap in caps {
            let report = fresh_point(cap, shards, Load::InFlight(total), duration, false, library)?;
            table.push_str(&format!("{cap:>5} {total:>9} {}\n", report.to_row()));
            let mut point = report.to_json();
            point["session_indicia_max"] = cap.into();
            point["in_flight"] = total.into();
            points.push(point);
            if !report.validity().is_valid() {
                invalid.push(report::invalid_banner(&report.label, &report.validity()));
                continue;
            }
            plotted.push(indicia_loadgen::plot::Point {
                in_flight: total,
                session_size_mean: report.session_size_mean(),
                indicia_per_s: report.indicia_per_s(),
                latency_p99_ms: report.tally.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            });
            if cap > 1 && report.indicia_per_s() > saturation.map_or(0.0, |(_, rate)| rate) {
                saturation = Some((cap, report.indicia_per_s()));
            }
        }
    }
    // Latency at half the saturation rate: the best valid coalescing point's throughput,
    // halved, offered open loop (coordinated omission corrected) to a fresh appliance.
    match saturation {
        Some((cap, rate)) => {
            let half = (rate / 2.0).round().max(1.0);
            let report = fresh_point(cap, shards, Load::Rate(half), duration, false, library)?;
            let latency = &report.tally.latency_us;
            let ms = |quantile: f64| latency.value_at_quantile(quantile) as f64 / 1000.0;
            let validity = report.validity();
            let (appliance_p50, appliance_p99) = report.appliance_latency().p50_p99_ms();
            table.push_str(&format!(
                "\nopen loop at half the saturation rate (best valid point: {rate:.0}/s at cap \
                 {cap}): {half:.0} requests/s offered, {:.0} indicia/s, {:.1} per session; \
                 latency of the successful requests p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
                 p99.9 {:.2} ms, max {:.2} ms; appliance-side p50 {} ms, p99 {} ms; CPU/indicium \
                 {}; {} failures; {}\n",
                report.indicia_per_s(),
                report.session_size_mean(),
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                latency.max() as f64 / 1000.0,
                appliance_p50,
                appliance_p99,
                report
                    .cpu_per_indicium_us()
                    .map_or("n/a".to_owned(), |cpu| format!(
                        "{cpu:.1} us = {:.2}x raw",
                        cpu / report.raw_sign_us
                    )),
                report.tally.failures(),
                validity.describe(),
            ));
            if !validity.is_valid() {
                invalid.push(report::invalid_banner(&report.label, &validity));
            }
            let mut point = report.to_json();
            point["session_indicia_max"] = cap.into();
            point["open_loop_rate_per_s"] = half.into();
            points.push(point);
        }
        None => table.push_str(
            "\nno open-loop point: no valid closed-loop point with coalescing on (cap > 1) to \
             take its rate from\n",
        ),
    }
    std::fs::write(out_path, serde_json::to_string_pretty(&points)?)?;
    indicia_loadgen::plot::write_svg(&plotted, svg_path)?;
    table.push_str(&format!(
        "\n{} points written to {}, the plot of the {} valid closed-loop ones to {}\n",
        points.len(),
        out_path.display(),
        plotted.len(),
        svg_path.display()
    ));
    Ok(Outcome::with_invalid(
        table,
        &invalid,
        points.len(),
        "points INVALID: left out of the plot, the best figure and the open-loop rate",
    ))
}

/// One line of the targets table: what was measured, the target, and whether it held
/// (None: the load behind it was invalid, so it says nothing).
struct Target {
    what: String,
    measured: String,
    target: &'static str,
    met: Option<bool>,
}

fn targets(
    duration: f64,
    out_path: &std::path::Path,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut points = Vec::new();
    let mut invalid = Vec::new();
    let mut lines = Vec::new();
    let mut table = String::new();
    let mut measure = |point: Point| -> Result<report::Report, Box<dyn std::error::Error>> {
        let report = fresh(&point)?;
        table.push_str(&report.to_table());
        table.push('\n');
        if !report.validity().is_valid() {
            invalid.push(report::invalid_banner(&report.label, &report.validity()));
        }
        let mut json = report.to_json();
        json["cross_shard_requests"] = report.delta("cross_shard.requests").into();
        points.push(json);
        Ok(report)
    };
    let ratio = |report: &report::Report| {
        report
            .cpu_per_indicium_us()
            .map(|cpu| cpu / report.raw_sign_us)
    };
    let valid = |report: &report::Report| report.validity().is_valid();
    let library = |label: &str, vpsds, distribution, load| Point {
        label: label.to_owned(),
        config: String::new(),
        shards: 0,
        vpsds,
        distribution,
        library: Some(true),
        load,
        duration,
        tls: false,
    };
    let mut crossed = 0;

    // 1. Many single-indicium callers: one hot vPSD among 101 picked by zipf (s = 1.1: the
    // hot one takes about a fifth of the calls).
    let hot = measure(library(
        "256 callers, 101 vPSDs zipf:1.1 (one hot)",
        101,
        Distribution::Zipf(1.1),
        Load::InFlight(256),
    ))?;
    crossed += hot.delta("cross_shard.requests");
    lines.push(Target {
        what: "256 single-indicium callers, a hot vPSD among 101 zipf: appliance CPU per indicium"
            .into(),
        measured: ratio(&hot).map_or("n/a".into(), |r| format!("{r:.2}x raw")),
        target: "<= 1.15x raw",
        met: valid(&hot).then(|| ratio(&hot).is_some_and(|r| r <= 1.15)),
    });

    // 2. Spread load: 100 vPSDs uniform.
    for callers in [64, 256] {
        let spread = measure(library(
            &format!("{callers} callers, 100 vPSDs uniform"),
            100,
            Distribution::Uniform,
            Load::InFlight(callers),
        ))?;
        crossed += spread.delta("cross_shard.requests");
        lines.push(Target {
            what: format!(
                "spread load, 100 vPSDs uniform, {callers} callers: appliance CPU per indicium"
            ),
            measured: ratio(&spread).map_or("n/a".into(), |r| format!("{r:.2}x raw")),
            target: "<= 1.5x raw",
            met: valid(&spread).then(|| ratio(&spread).is_some_and(|r| r <= 1.5)),
        });
    }

    // 3. Coalescing on against off, one vPSD, at 64 and 256 callers. Off: sessions of one
    // indicium (session_indicia_max = 1) and the library's batching off, every call a frame.
    let mut saturation = 0.0f64;
    for callers in [64, 256] {
        let on = measure(library(
            &format!("coalescing on: {callers} callers, 1 vPSD"),
            1,
            Distribution::Uniform,
            Load::InFlight(callers),
        ))?;
        crossed += on.delta("cross_shard.requests");
        if valid(&on) {
            saturation = saturation.max(on.indicia_per_s());
        }
        if callers == 256 {
            lines.push(Target {
                what: "256 single-indicium callers, one hot vPSD: appliance CPU per indicium"
                    .into(),
                measured: ratio(&on).map_or("n/a".into(), |r| format!("{r:.2}x raw")),
                target: "<= 1.15x raw",
                met: valid(&on).then(|| ratio(&on).is_some_and(|r| r <= 1.15)),
            });
        }
        let off = measure(Point {
            config: "[engine]\nsession_indicia_max = 1\n".into(),
            library: Some(false),
            ..library(
                &format!(
                    "coalescing off: {callers} callers, 1 vPSD, session_indicia_max = 1, no \
                     batching"
                ),
                1,
                Distribution::Uniform,
                Load::InFlight(callers),
            )
        })?;
        crossed += off.delta("cross_shard.requests");
        let gain = on.indicia_per_s() / off.indicia_per_s().max(1e-9);
        lines.push(Target {
            what: format!("coalescing on against off, 1 vPSD, {callers} callers: throughput"),
            measured: format!(
                "{gain:.1}x ({:.0} against {:.0} indicia/s)",
                on.indicia_per_s(),
                off.indicia_per_s()
            ),
            target: ">= 10x",
            met: (valid(&on) && valid(&off)).then_some(gain >= 10.0),
        });
    }

    // 4. Open loop at half of the best saturation just measured (coalescing on), on a fresh
    // appliance.
    let half = (saturation / 2.0).round().max(1.0);
    let open = measure(library(
        &format!("open loop at half of saturation: {half:.0} calls/s, 1 vPSD"),
        1,
        Distribution::Uniform,
        Load::Rate(half),
    ))?;
    crossed += open.delta("cross_shard.requests");
    let (_, appliance_p99) = open.appliance_latency().p50_p99_ms();
    let client_p99 = open.latency(0.99) as f64 / 1000.0;
    lines.push(Target {
        what: format!("open loop at half of saturation ({half:.0}/s): appliance-side p99"),
        measured: format!("{appliance_p99} ms"),
        target: "<= 2 ms",
        met: valid(&open).then(|| appliance_p99.parse::<f64>().is_ok_and(|p99| p99 <= 2.0)),
    });
    lines.push(Target {
        what: format!("open loop at half of saturation ({half:.0}/s): client-side p99"),
        measured: format!("{client_p99:.2} ms"),
        target: "<= 5 ms",
        met: valid(&open).then_some(client_p99 <= 5.0),
    });
    lines.push(Target {
        what: "requests that crossed shards, all loads above (cross_shard.requests)".into(),
        measured: crossed.to_string(),
        target: "0",
        met: Some(crossed == 0),
    });

    let width = lines.iter().map(|line| line.what.len()).max().unwrap_or(0);
    table.push_str(&format!(
        "{:width$}  {:>28}  {:>13}  met\n",
        "target", "measured", "wanted"
    ));
    for line in &lines {
        let met = match line.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "invalid load",
        };
        table.push_str(&format!(
            "{:width$}  {:>28}  {:>13}  {met}\n",
            line.what, line.measured, line.target
        ));
    }
    std::fs::write(out_path, serde_json::to_string_pretty(&points)?)?;
    table.push_str(&format!(
        "\n{} loads written to {}; the demo's open loop and the SoftHSM2 comparison are the \
         `demo` and `peer` commands\n",
        points.len(),
        out_path.display()
    ));
    Ok(Outcome::with_invalid(
        table,
        &invalid,
        points.len(),
        "loads INVALID: their targets say nothing",
    ))
}

fn replot(
    from: &std::path::Path,
    svg: &std::path::Path,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let points: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(from)?)?;
    let field = |point: &serde_json::Value, path: &[&str]| {
        path.iter()
            .try_fold(point, |value, key| value.get(key))
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| format!("{}: a point without {}", from.display(), path.join(".")))
    };
    let mut plotted = Vec::new();
    // The open-loop point has no in-flight level; the plot is of the closed-loop grid,
    // its valid points (a sweep from before the validity rule has none marked invalid).
    for point in points.iter().filter(|point| {
        point.get("in_flight").is_some()
            && point.get("validity").and_then(serde_json::Value::as_str) != Some("invalid")
    }) {
        plotted.push(indicia_loadgen::plot::Point {
            in_flight: field(point, &["in_flight"])? as usize,
            session_size_mean: field(point, &["appliance", "session_size_mean"])?,
            indicia_per_s: field(point, &["indicia_per_s"])?,
            latency_p99_ms: field(point, &["latency_us", "p99"])? / 1000.0,
        });
    }
    indicia_loadgen::plot::write_svg(&plotted, svg)?;
    Ok(Outcome::valid(format!(
        "{} valid points from {} drawn in {}\n",
        plotted.len(),
        from.display(),
        svg.display()
    )))
}

#[cfg(feature = "softhsm")]
fn hsm_cost(module: &std::path::Path, seconds: f64) -> Result<Outcome, Box<dyn std::error::Error>> {
    let costs = indicia_loadgen::peer::hsm_costs(module, seconds)?;
    let starts: Vec<String> = costs.start_ms.iter().map(|ms| format!("{ms:.1}")).collect();
    let mut text = format!(
        "microseconds of CPU per operation (this run, this machine, one thread):\n\
         {:<62} {:>8.2}\n{:<62} {:>8.2}\n{:<62} {:>8.2}\n{:<62} {:>8.2}\n\
         start-up (load module, log in, find key, open the master key), ms wall: {}\n\n\
         added to a signing session's CPU by opening its vPSD key in the HSM instead of in \
         memory, per session and per indicium ({} us per signature):\n",
        "HSM (SoftHSM2) opens a sealed 32-byte key, CKM_AES_GCM",
        costs.hsm_unseal_us,
        "the same in memory, aws-lc-rs AES-256-GCM",
        costs.memory_unseal_us,
        "a vPSD key load in the engine (open + P-256 key pair)",
        costs.key_load_us,
        "one ECDSA P-256 signature (aws-lc-rs)",
        costs.sign_us,
        starts.join(" / "),
        format_args!("{:.1}", costs.sign_us),
    );
    let extra = costs.hsm_unseal_us - costs.memory_unseal_us;
    text.push_str(&format!(
        "{:>13} {:>14} {:>22}\n",
        "session size", "us per session", "per indicium vs sign"
    ));
    for size in [1u32, 4, 16, 64] {
        let per_indicium = extra / f64::from(size);
        text.push_str(&format!(
            "{size:>13} {extra:>14.2} {:>21.1}%\n",
            100.0 * per_indicium / costs.sign_us
        ));
    }
    Ok(Outcome::valid(text))
}

#[cfg(feature = "softhsm")]
fn peer(module: &std::path::Path, seconds: f64) -> Result<Outcome, Box<dyn std::error::Error>> {
    use indicia_loadgen::peer;
    let aws_lc = peer::aws_lc_rate(seconds)?;
    let softhsm = peer::softhsm_rate(module, seconds)?;
    // Saturated: 256 single-indicium callers through the client library.
    let report = fresh_point(256, 0, Load::InFlight(256), seconds, false, true)?;
    let appliance = report
        .cpu_per_indicium_us()
        .map(|us| 1e6 / us)
        .ok_or("no appliance CPU time")?;
    let validity = report.validity();
    let mut text = format!(
        "ECDSA P-256 signatures per CPU-second (this run, this machine):\n\
         {:<58} {aws_lc:>9.0}\n\
         {:<58} {softhsm:>9.0}\n\
         {:<58} {appliance:>9.0} ({})\n",
        "aws-lc-rs, raw signature, one thread",
        "SoftHSM2 via PKCS#11 (SHA-256 + CKM_ECDSA), one thread",
        "appliance: indicia per CPU-second (256 library callers, cap 256)",
        validity.describe(),
    );
    if validity.is_valid() {
        text.push_str(&format!(
            "appliance / SoftHSM2: {:.2}x; appliance / raw aws-lc-rs: {:.2}\n",
            appliance / softhsm,
            appliance / aws_lc,
        ));
    } else {
        text.push_str(&format!(
            "{}\nno ratios: the appliance's figure is not a measurement of its load\n",
            report::invalid_banner(&report.label, &validity)
        ));
    }
    Ok(Outcome {
        text,
        valid: validity.is_valid(),
    })
}

/// For a fresh appliance in `dir`: with `tls`, a private CA's files and the `[tls]`
/// section that uses them, and the admin's client settings; without, nothing (plaintext).
fn transport(
    dir: &std::path::Path,
    tls: bool,
) -> Result<(String, Option<TlsSettings>), indicia_client::ClientError> {
    if tls {
        let (section, settings) = indicia_loadgen::tls_files(dir)?;
        Ok((section, Some(settings)))
    } else {
        Ok((String::new(), None))
    }
}

/// Connections opened one after another against a fresh appliance (plaintext or mutual
/// TLS): the median and p90 time from `connect` to the protocol's `welcome`, in ms.
fn connect_times(tls: bool, count: usize) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("indiciad.toml");
    let (section, settings) = transport(dir.path(), tls)?;
    std::fs::write(&config_path, section)?;
    let appliance = Appliance::spawn(&dir.path().join("data"), Some(&config_path))?;
    let credential = appliance.admin_credential()?;
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = std::time::Instant::now();
        let client = Client::connect_with(appliance.addr, &credential, settings.as_ref())?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(client);
    }
    appliance.stop()?;
    times.sort_by(f64::total_cmp);
    let at = |quantile: f64| times[((times.len() - 1) as f64 * quantile).round() as usize];
    Ok((at(0.5), at(0.9)))
}

fn tls_cost(
    duration: f64,
    in_flight: &[usize],
    rounds: usize,
    out_path: &std::path::Path,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut table = report::row_header(&format!(
        "{:>5} {:>10} {:>9}",
        "round", "transport", "in flight"
    ));
    let mut points = Vec::new();
    let mut invalid = Vec::new();
    // (in flight, tls) -> CPU per indicium over raw, each valid round.
    let mut ratios: std::collections::BTreeMap<(usize, bool), Vec<f64>> = Default::default();
    for round in 1..=rounds.max(1) {
        for &total in in_flight {
            for tls in [false, true] {
                let report = fresh_point(256, 0, Load::InFlight(total), duration, tls, false)?;
                let transport = if tls { "mutual TLS" } else { "plaintext" };
                table.push_str(&format!(
                    "{round:>5} {transport:>10} {total:>9} {}\n",
                    report.to_row()
                ));
                let label = format!("round {round}, {transport}, {total} in flight");
                if let Some(ratio) = valid_ratio(&report, &label, &mut invalid) {
                    ratios.entry((total, tls)).or_default().push(ratio);
                }
                let mut point = report.to_json();
                point["tls"] = tls.into();
                point["in_flight"] = total.into();
                point["round"] = round.into();
                points.push(point);
            }
        }
    }
    table.push_str("\nmean CPU per indicium over the raw signature (same runs, valid loads):\n");
    let mean = |total: usize, tls: bool| {
        ratios
            .get(&(total, tls))
            .filter(|values| !values.is_empty())
            .map(|values| {
                (
                    values.iter().sum::<f64>() / values.len() as f64,
                    values.len(),
                )
            })
    };
    for &total in in_flight {
        match (mean(total, false), mean(total, true)) {
            (Some((plain, plain_n)), Some((tls, tls_n))) => table.push_str(&format!(
                "  {total:>4} in flight: plaintext {plain:.2}x ({plain_n} loads), mutual TLS \
                 {tls:.2}x ({tls_n} loads): TLS adds {:+.1}%\n",
                (tls / plain - 1.0) * 100.0
            )),
            _ => table.push_str(&format!(
                "  {total:>4} in flight: n/a (no valid load of one transport or the other)\n"
            )),
        }
    }
    let (plain_p50, plain_p90) = connect_times(false, 50)?;
    let (tls_p50, tls_p90) = connect_times(true, 50)?;
    table.push_str(&format!(
        "\nopening a connection (TCP, TLS, hello/authenticate), 50 one after another:\n  \
         plaintext p50 {plain_p50:.2} ms, p90 {plain_p90:.2} ms; mutual TLS p50 {tls_p50:.2} ms, \
         p90 {tls_p90:.2} ms\n"
    ));
    let json = serde_json::json!({
        "points": points,
        "connect_ms": {
            "plaintext": {"p50": plain_p50, "p90": plain_p90},
            "mutual_tls": {"p50": tls_p50, "p90": tls_p90},
        },
    });
    std::fs::write(out_path, format!("{json:#}\n"))?;
    table.push_str(&format!("every load's JSON: {}\n", out_path.display()));
    Ok(Outcome::with_invalid(
        table,
        &invalid,
        points.len(),
        "loads INVALID: left out of the means",
    ))
}

/// Appliance CPU per indicium over the raw signature, and etcd's CPU per indicium in µs.
#[cfg(feature = "cluster")]
type CostRatio = (f64, Option<f64>);

/// One load of the cluster-cost experiment, with etcd's CPU time during it.
#[cfg(feature = "cluster")]
struct CostLoad {
    report: indicia_loadgen::report::Report,
    etcd_cpu: Option<Duration>,
    /// The appliance's own etcd thread (the client's gRPC on tokio).
    client_cpu: Option<Duration>,
}

/// Measures one load, with the CPU time the etcd members used meanwhile.
#[cfg(feature = "cluster")]
fn cost_load(
    label: &str,
    config: &RunConfig,
    credential: &Credential,
    appliance: &Appliance,
    etcd: &indiciad::cluster::local::LocalEtcd,
) -> Result<CostLoad, Box<dyn std::error::Error>> {
    let etcd_cpu = || -> Option<Duration> {
        etcd.pids()
            .into_iter()
            .map(report::process_cpu)
            .sum::<Option<Duration>>()
    };
    let client_cpu = || report::threads_cpu(appliance.pid(), "indicia-etcd");
    let before = etcd_cpu();
    let client_before = client_cpu();
    let report = indicia_loadgen::measure(
        label,
        config,
        credential,
        Algorithm::EcdsaP256,
        Some(appliance.pid()),
    )?;
    let after = etcd_cpu();
    let client_after = client_cpu();
    Ok(CostLoad {
        report,
        etcd_cpu: before
            .zip(after)
            .map(|(before, after)| after.saturating_sub(before)),
        client_cpu: client_before
            .zip(client_after)
            .map(|(before, after)| after.saturating_sub(before)),
    })
}

/// A fresh appliance (in cluster mode with `cluster`), saturated, then loaded at half the
/// rate it reached.
#[cfg(feature = "cluster")]
fn cost_point(
    etcd: &indiciad::cluster::local::LocalEtcd,
    cluster: Option<usize>,
    in_flight: usize,
    vpsds: u64,
    duration: f64,
) -> Result<[CostLoad; 2], Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut text = "shards = 0\n".to_owned();
    if let Some(n) = cluster {
        text.push_str(&format!(
            "\n[cluster]\netcd = {:?}\nappliance = \"cost-{n}\"\nadvertise = \"{listen}\"\n\
             prefix = \"/cost-{n}\"\n",
            etcd.endpoints()
        ));
    }
    let config_path = dir.path().join("indiciad.toml");
    std::fs::write(&config_path, text)?;
    let appliance = Appliance::spawn_on(
        &std::env::current_exe()?,
        &dir.path().join("data"),
        Some(&config_path),
        &listen.to_string(),
    )?;
    let (credential, picker, mut admin) = provisioned(&appliance, vpsds, None)?;
    let mode_name = if cluster.is_some() {
        "cluster"
    } else {
        "single node"
    };
    let connections = in_flight.clamp(1, 8);
    let closed = Mode::Closed {
        window: in_flight.div_ceil(connections),
    };
    let mut config = point_config(
        &appliance,
        &credential,
        None,
        picker,
        (connections, closed),
        duration,
    );
    indicia_loadgen::fund(
        &mut admin,
        &config,
        Algorithm::EcdsaP256,
        &appliance.provider_key(),
    )?;
    let saturated = cost_load(
        &format!("{mode_name}, {in_flight} in flight"),
        &config,
        &credential,
        &appliance,
        etcd,
    )?;
    let rate_per_s = (saturated.report.indicia_per_s() / 2.0).max(1.0);
    config.mode = Mode::Open { rate_per_s };
    indicia_loadgen::fund(
        &mut admin,
        &config,
        Algorithm::EcdsaP256,
        &appliance.provider_key(),
    )?;
    drop(admin);
    let half = cost_load(
        &format!("{mode_name}, open loop at {rate_per_s:.0}/s"),
        &config,
        &credential,
        &appliance,
        etcd,
    )?;
    appliance.stop()?;
    Ok([saturated, half])
}

#[cfg(feature = "cluster")]
fn cluster_cost(
    duration: f64,
    in_flight: usize,
    rounds: usize,
    vpsds: u64,
    out_path: &std::path::Path,
) -> Result<Outcome, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let etcd = indiciad::cluster::local::LocalEtcd::start(
        &dir.path().join("etcd"),
        3,
        Duration::from_secs(60),
    )?;
    let mut table = report::row_header(&format!("{:>5} {:>11} {:>10}", "round", "mode", "load"));
    let mut extra = format!(
        "\n{:>5} {:>11} {:>10} {:>14} {:>15} {:>12} {:>18} {:>18}\n",
        "round",
        "mode",
        "load",
        "etcd CPU/ind.",
        "client CPU/ind.",
        "etcd writes",
        "fdatasync p50/p99",
        "etcd txn p50/p99"
    );
    let mut points = Vec::new();
    let mut invalid = Vec::new();
    // (cluster, load) -> appliance CPU per indicium over raw, and etcd CPU per indicium.
    let mut ratios: std::collections::BTreeMap<(bool, usize), Vec<CostRatio>> = Default::default();
    let mut run = 0;
    for round in 1..=rounds.max(1) {
        for cluster in [false, true] {
            run += 1;
            let loads = cost_point(&etcd, cluster.then_some(run), in_flight, vpsds, duration)?;
            let mode = if cluster { "cluster" } else { "single" };
            for (index, load) in loads.iter().enumerate() {
                let which = if index == 0 { "saturated" } else { "half" };
                let report = &load.report;
                table.push_str(&format!(
                    "{round:>5} {mode:>11} {which:>10} {}\n",
                    report.to_row()
                ));
                let ms = |name: &str| {
                    report
                        .after
                        .get(name)
                        .map_or("n/a".to_owned(), |us| format!("{:.2}", *us as f64 / 1000.0))
                };
                let per_indicium = |cpu: Option<Duration>| {
                    cpu.filter(|_| cluster && report.tally.indicia > 0)
                        .map(|cpu| cpu.as_secs_f64() * 1e6 / report.tally.indicia as f64)
                };
                let etcd_per = per_indicium(load.etcd_cpu);
                let client_per = per_indicium(load.client_cpu);
                let delta = |name: &str| {
                    report
                        .after
                        .get(name)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(report.before.get(name).copied().unwrap_or(0))
                };
                let writes = delta("cluster.writes");
                let rounds_done = delta("cluster.rounds");
                extra.push_str(&format!(
                    "{round:>5} {mode:>11} {which:>10} {:>14} {:>15} {:>12} {:>18} {:>18}\n",
                    etcd_per.map_or("-".to_owned(), |us| format!("{us:.1} us")),
                    client_per.map_or("-".to_owned(), |us| format!("{us:.1} us")),
                    if cluster {
                        format!("{:.1}/round", writes as f64 / rounds_done.max(1) as f64)
                    } else {
                        "-".to_owned()
                    },
                    format!(
                        "{}/{} ms",
                        ms("commit_latency_us.p50"),
                        ms("commit_latency_us.p99")
                    ),
                    if cluster {
                        format!(
                            "{}/{} ms",
                            ms("cluster.commit_latency_us.p50"),
                            ms("cluster.commit_latency_us.p99")
                        )
                    } else {
                        "-".to_owned()
                    },
                ));
                let label = format!("round {round}, {mode}, {which}");
                if let Some(ratio) = valid_ratio(report, &label, &mut invalid) {
                    ratios
                        .entry((cluster, index))
                        .or_default()
                        .push((ratio, etcd_per));
                }
                let mut point = report.to_json();
                point["cluster"] = cluster.into();
                point["load"] = which.into();
                point["round"] = round.into();
                point["etcd_cpu_s"] = load.etcd_cpu.map(|cpu| cpu.as_secs_f64()).into();
                point["etcd_cpu_per_indicium_us"] = etcd_per.into();
                point["etcd_client_thread_cpu_per_indicium_us"] = client_per.into();
                point["cluster_writes"] = writes.into();
                point["cluster_rounds"] = rounds_done.into();
                points.push(point);
            }
        }
    }
    table.push_str(&extra);
    table.push_str(
        "\n(commit latencies: the appliance's histograms since it started; etcd CPU: the 3 \
         members together, during the load)\n\nmean appliance CPU per indicium over the raw \
         signature (same runs, valid loads):\n",
    );
    for (index, which) in ["saturated", "half"].iter().enumerate() {
        let mean = |cluster: bool| {
            ratios
                .get(&(cluster, index))
                .filter(|v| !v.is_empty())
                .map(|values| {
                    let n = values.len() as f64;
                    let etcd: Vec<f64> = values.iter().filter_map(|(_, etcd)| *etcd).collect();
                    (
                        values.iter().map(|(ratio, _)| ratio).sum::<f64>() / n,
                        (!etcd.is_empty()).then(|| etcd.iter().sum::<f64>() / etcd.len() as f64),
                        values.len(),
                    )
                })
        };
        match (mean(false), mean(true)) {
            (Some((single, _, n1)), Some((cluster, etcd, n2))) => table.push_str(&format!(
                "  {which:>9}: single node {single:.2}x ({n1} loads), cluster {cluster:.2}x \
                 ({n2} loads): the cluster adds {:+.1}% on the appliance; etcd used {} per \
                 indicium\n",
                (cluster / single - 1.0) * 100.0,
                etcd.map_or("n/a".to_owned(), |us| format!("{us:.1} us of CPU"))
            )),
            _ => table.push_str(&format!("  {which:>9}: n/a (no valid load of one mode)\n")),
        }
    }
    std::fs::write(
        out_path,
        format!("{:#}\n", serde_json::json!({ "points": points })),
    )?;
    table.push_str(&format!("every load's JSON: {}\n", out_path.display()));
    drop(etcd);
    Ok(Outcome::with_invalid(
        table,
        &invalid,
        points.len(),
        "loads INVALID: left out of the means",
    ))
}

/// A load's CPU per indicium over the raw signature, if the load is valid; an invalid
/// one's banner goes to `invalid` (it is left out of the means).
fn valid_ratio(
    report: &indicia_loadgen::report::Report,
    label: &str,
    invalid: &mut Vec<String>,
) -> Option<f64> {
    let validity = report.validity();
    if !validity.is_valid() {
        invalid.push(report::invalid_banner(label, &validity));
        return None;
    }
    report
        .cpu_per_indicium_us()
        .map(|cpu| cpu / report.raw_sign_us)
}

fn main() -> ExitCode {
    let Args { command } = Args::parse();
    let result = match command {
        Command::Run(args) => run(*args),
        Command::Demo { duration } => demo(duration),
        #[cfg(feature = "cluster")]
        Command::ClusterDemo { duration } => indicia_loadgen::cluster_demo::cluster_demo(duration)
            .map(|outcome| Outcome {
                // Printed as it went.
                text: String::new(),
                valid: outcome.valid,
            })
            .map_err(Into::into),
        Command::Sweep {
            duration,
            caps,
            in_flight,
            out,
            svg,
            shards,
            client,
        } => sweep(SweepArgs {
            duration,
            library: client == "library",
            caps: &caps,
            in_flight: &in_flight,
            shards,
            out_path: &out,
            svg_path: &svg,
        }),
        Command::Plot { from, svg } => replot(&from, &svg),
        Command::Targets { duration, out } => targets(duration, &out),
        Command::TlsCost {
            duration,
            in_flight,
            rounds,
            out,
        } => tls_cost(duration, &in_flight, rounds, &out),
        #[cfg(feature = "softhsm")]
        Command::Peer { module, seconds } => peer(&module, seconds),
        #[cfg(feature = "softhsm")]
        Command::HsmCost { module, seconds } => hsm_cost(&module, seconds),
        #[cfg(feature = "cluster")]
        Command::ClusterCost {
            duration,
            in_flight,
            rounds,
            vpsds,
            out,
        } => cluster_cost(duration, in_flight, rounds, vpsds, &out),
        #[cfg(feature = "cluster")]
        Command::ClusterScale {
            duration,
            in_flight,
            rounds,
            vpsds,
            out,
        } => indicia_loadgen::cluster_scale::cluster_scale(duration, in_flight, rounds, vpsds)
            .and_then(|outcome| {
                std::fs::write(&out, format!("{:#}\n", outcome.json))?;
                let text = format!("{}\nevery load's JSON: {}\n", outcome.text, out.display());
                let total = 2 * rounds + 6;
                Ok(Outcome::with_invalid(
                    text,
                    &outcome.invalid,
                    total,
                    "loads INVALID",
                ))
            }),
        Command::Appliance { args } => {
            return indiciad::service::main_with(
                std::iter::once(std::ffi::OsString::from("indiciad")).chain(args),
            )
        }
    };
    match result {
        Ok(Outcome { text, valid }) => {
            print!("{text}");
            if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_INVALID)
            }
        }
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("indicia-loadgen: {err}");
            }
            ExitCode::FAILURE
        }
    }
}
