//! `indicia-loadgen`: see the library's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicia_client::{Client, Credential};
use indicia_loadgen::run::{Mode, RunConfig};
use indicia_loadgen::workload::{Distribution, VpsdPicker};
use indicia_proto::{parse_amount_mills, Algorithm};

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
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, default_value = "127.0.0.1:7450")]
    addr: SocketAddr,
    /// An admin credential (stats, provisioning).
    #[arg(long, default_value = "./indicia-data/admin.credential")]
    credential: PathBuf,
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
}

fn run(args: RunArgs) -> Result<String, Box<dyn std::error::Error>> {
    let credential = Credential::load(&args.credential)?;
    let algorithm: Algorithm = args.algorithm.parse()?;
    let postage_mills = parse_amount_mills(&args.postage)?;
    let picker = VpsdPicker::new(args.first_vpsd, args.vpsds, args.distribution);
    if let Some(provider_key) = &args.provider_key {
        let mut admin = Client::connect(args.addr, &credential)?;
        // Enough for the whole run at a generous rate.
        let funds = postage_mills.saturating_mul(50_000_000);
        indicia_loadgen::prepare_vpsds(&mut admin, picker.ids(), algorithm, funds, provider_key)?;
    }
    let mode = match args.rate {
        Some(rate_per_s) => Mode::Open { rate_per_s },
        None => Mode::Closed {
            window: args.window,
        },
    };
    let config = RunConfig {
        addr: args.addr,
        credential: credential.clone(),
        connections: args.connections,
        mode,
        duration: Duration::from_secs_f64(args.duration),
        picker,
        batch: args.batch,
        postage_mills,
        verify_every: args.verify_every,
        seed: args.seed,
    };
    let label = match mode {
        Mode::Closed { window } => {
            format!("closed loop, {} x {window} in flight", args.connections)
        }
        Mode::Open { rate_per_s } => format!("open loop, {rate_per_s} requests/s"),
    };
    let report =
        indicia_loadgen::measure(&label, &config, &credential, algorithm, args.appliance_pid)?;
    Ok(if args.json {
        format!("{}\n", report.to_json())
    } else {
        report.to_table()
    })
}

fn main() -> ExitCode {
    let Args { command } = Args::parse();
    let result = match command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
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
