//! `indiciactl`: the operator's and user's command line. The flags are an interface:
//! users and tests script against them.
//!
//! ```text
//! indiciactl [--addr ADDR] [--credential FILE] <command> [--json]
//!   provision --vpsd ID [--algorithm ecdsa-p256|ed25519] [--origin-zip ZIP] [--owner NAME]
//!   refill    --authorization FILE | --vpsd ID --amount AMOUNT --provider-key FILE
//!   contact   --authorization FILE | --vpsd ID --provider-key FILE
//!   sign      --vpsd ID --postage AMOUNT [--count N] [--out FILE] [--destination-zip ZIP]
//!             [--data TEXT | --data-file FILE] [--barcode FILE.png|FILE.svg]
//!   status    --vpsd ID
//!   pubkey    --vpsd ID [--serial N] [--out FILE | --out-dir DIR]
//!   lock      --vpsd ID --reason TEXT
//!   unlock    --vpsd ID
//!   withdraw  --vpsd ID
//!   rotate-key --vpsd ID
//!   verify    [FILE...] [--indicium HEX]... (--key PEM | --keys DIR | --online)
//!             [--store FILE] [--data TEXT | --data-file FILE]
//!   provider keygen --out FILE
//!   provider authorize --key FILE --kind refill|contact --vpsd ID [--amount AMOUNT]
//!             --sequence N [--valid-for SECONDS] --out FILE
//!   stats
//!   pki init --dir DIR --server-name NAME... [--days N]
//!   pki client --dir DIR --id ID [--days N]
//! ```
//!
//! With `--tls-ca FILE --tls-cert FILE --tls-key FILE [--tls-server-name NAME]` the
//! connection is mutual TLS (`pki` makes the files).
//!
//! Exit status: 0; 1 on an error; 2 for usage; 3 when the appliance refused; 4 when an
//! indicium did not verify.
//!
//! AMOUNT is a decimal currency string (`0.73`, `100`), parsed exactly into mills.
//!
//! - `args.rs`: the flags (clap), each parsed once into its type;
//! - `commands.rs`: what each command does;
//! - `output.rs`: what it prints, as text or JSON.

pub mod args;
mod commands;
mod output;

pub use args::Args;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::transport::TlsFiles;
use crate::ClientError;

/// Why a command failed; the CLI prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "signing stopped after {signed} of {count} indicia (those were written out): {source}"
    )]
    Interrupted {
        signed: u64,
        count: u64,
        source: ClientError,
    },
    #[error("{failed} of {count} indicia were not signed; first error: {first}")]
    PartlySigned {
        failed: u64,
        count: u64,
        first: String,
    },
    #[error("{failed} of {count} indicia did not verify")]
    NotVerified { failed: u64, count: u64 },
    /// A backup was taken, but the audit of its copy found something.
    #[error("{0}")]
    Findings(String),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error(transparent)]
    Barcode(#[from] crate::barcode::BarcodeError),
}

impl From<crate::FileError> for CliError {
    fn from(err: crate::FileError) -> Self {
        Self::Client(err.into())
    }
}

impl CliError {
    /// Exit status: 2 for usage, 3 when the appliance refused, 4 when an indicium did not
    /// verify, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Client(ClientError::TlsFlags(_)) => 2,
            Self::Client(ClientError::Refused(_)) | Self::PartlySigned { .. } => 3,
            Self::NotVerified { .. } => 4,
            _ => 1,
        }
    }
}

/// Runs one command; what it prints goes to `out`.
pub fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    let tls = TlsFiles::from_flags(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_server_name.as_deref(),
    )
    .map_err(ClientError::from)?;
    let appliance = commands::Appliance {
        addr: args.addr,
        credential: args.credential,
        tls,
    };
    commands::run(
        args.command,
        &appliance,
        &mut output::Output::new(args.json, out),
    )
}

/// Parses `args` (argv, program name first) and runs the command.
pub fn main_with(
    args: impl IntoIterator<Item = OsString>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let args = Args::try_parse_from(args).map_err(|err| CliError::Usage(err.to_string()))?;
    run(args, out)
}

/// The `indiciactl` binary: clap answers `--help`, `--version` and a bad argument (exit
/// status 2) itself; an error is printed as `indiciactl: <message>`.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let stdout = std::io::stdout();
    match run(args, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("indiciactl: {err}");
            }
            ExitCode::from(err.exit_code())
        }
    }
}
