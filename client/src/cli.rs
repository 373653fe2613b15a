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

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use indicia_proto::{
    format_mills, parse_amount_mills, Algorithm, AuthorizationKind, Indicium, LockReason,
    MailingDate, ProviderAuthorization, Request, SignItem, VpsdState, VpsdStatus, Zip,
};
use serde_json::{json, Value};

use crate::provider::{authorize, load_provider_key};
use crate::signing::{sign_many, Signed};
use crate::verify::spki_pem;
use crate::{Client, ClientError, Credential};

#[derive(Debug, Parser)]
#[command(
    name = "indiciactl",
    version,
    about = "Provision, refill and sign with an indicia appliance"
)]
pub struct Args {
    /// Address of the appliance.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7450",
        value_name = "ADDR"
    )]
    pub addr: String,
    /// Credential file (client id and secret).
    #[arg(
        long,
        global = true,
        default_value = "./indicia-data/admin.credential",
        value_name = "FILE"
    )]
    pub credential: PathBuf,
    /// Mutual TLS: the CA certificate (PEM) that issued the appliance's certificate. Needs
    /// --tls-cert and --tls-key.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM; its common name is the credential's client id).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM, mode 0600).
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The name the appliance's certificate must carry (default: the host of --addr).
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Print the result as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a vPSD with a fresh signing key (admin).
    Provision {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ed25519"])]
        algorithm: String,
        /// Origin ZIP code printed in every indicium (12345 or 12345-6789).
        #[arg(long, default_value = "00000", value_name = "ZIP")]
        origin_zip: String,
        /// Owner account (default: the credential's client id).
        #[arg(long, value_name = "NAME")]
        owner: Option<String>,
    },
    /// Credit funds: submit a provider's authorization file, or build and sign one here with
    /// the provider key (`--vpsd --amount --provider-key`). The provider's signature
    /// authorizes it, whoever submits it.
    Refill {
        #[arg(long, value_name = "ID")]
        vpsd: Option<u64>,
        #[arg(long, value_name = "AMOUNT", requires = "provider_key")]
        amount: Option<String>,
        /// The provider's Ed25519 key: 64 hex digits of seed (provider.key).
        #[arg(long, value_name = "FILE", conflicts_with = "authorization")]
        provider_key: Option<PathBuf>,
        /// An authorization file issued by `indiciactl provider authorize --kind refill`.
        #[arg(long, value_name = "FILE")]
        authorization: Option<PathBuf>,
    },
    /// Record provider contact: the provider's signed acknowledgment that it received the
    /// vPSD's audit data; it resets the contact watchdog.
    Contact {
        #[arg(long, value_name = "ID")]
        vpsd: Option<u64>,
        #[arg(long, value_name = "FILE", conflicts_with = "authorization")]
        provider_key: Option<PathBuf>,
        /// An authorization file issued by `indiciactl provider authorize --kind contact`.
        #[arg(long, value_name = "FILE")]
        authorization: Option<PathBuf>,
    },
    /// Sign indicia: one line of hex per indicium.
    Sign {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "AMOUNT")]
        postage: String,
        #[arg(long, default_value_t = 1, value_name = "N")]
        count: u64,
        /// Write the indicia here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Destination ZIP code printed in the indicium.
        #[arg(long, value_name = "ZIP")]
        destination_zip: Option<String>,
        /// Bind this data to the indicium: its SHA-256 goes into the data digest.
        #[arg(long, value_name = "TEXT", conflicts_with = "data_file")]
        data: Option<String>,
        /// Bind this file's bytes to the indicium (SHA-256 in the data digest).
        #[arg(long, value_name = "FILE")]
        data_file: Option<PathBuf>,
        /// Also render each indicium as a Data Matrix symbol: FILE.png or FILE.svg (with
        /// several indicia, FILE-<piece>.png ...).
        #[arg(long, value_name = "FILE")]
        barcode: Option<PathBuf>,
    },
    /// Registers and state of a vPSD.
    Status {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// A vPSD's public key, SubjectPublicKeyInfo in PEM: the current one, or `--serial`.
    Pubkey {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "SERIAL")]
        serial: Option<u32>,
        #[arg(long, value_name = "FILE", conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// Write `<vpsd>-<serial>.pem` into this directory (a verifier's key directory).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Stop a vPSD from signing (admin); the reason is recorded.
    Lock {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Let a locked vPSD sign again (admin).
    Unlock {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// Refund a vPSD's descending register and retire it for good (admin).
    Withdraw {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// Give a vPSD a new signing key and serial (admin); indicia signed with the old key
    /// still verify under the old serial.
    RotateKey {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// Check indicia: signature, data digest, duplicates. Offline with `--key` or `--keys`,
    /// or online (`--online`) by asking the appliance.
    Verify(VerifyArgs),
    /// The postage provider's tools (no appliance needed).
    Provider {
        #[command(subcommand)]
        command: ProviderCommand,
    },
    /// A private certificate authority for mutual TLS (no appliance needed).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// The appliance's counters and histograms (admin).
    Stats,
}

/// `indiciactl verify`'s flags.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Files of indicia, one hex indicium per line (`-` for standard input).
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
    /// An indicium in hex (repeatable).
    #[arg(long, value_name = "HEX")]
    indicium: Vec<String>,
    /// One public key (PEM), for every indicium.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["keys", "online"])]
    key: Option<PathBuf>,
    /// A directory of `<vpsd>-<serial>.pem` public keys.
    #[arg(long, value_name = "DIR", conflicts_with = "online")]
    keys: Option<PathBuf>,
    /// Ask the appliance (it knows every key and which pieces were issued).
    #[arg(long)]
    online: bool,
    /// A verifier store: pieces seen before are reported as duplicates.
    #[arg(long, value_name = "FILE")]
    store: Option<PathBuf>,
    /// The data the indicia should bind (checked against their data digest).
    #[arg(long, value_name = "TEXT", conflicts_with = "data_file")]
    data: Option<String>,
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Create the provider's Ed25519 key pair: FILE (the seed, 0600) and FILE.pub (what
    /// the appliance's operator installs as provider.pub).
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Issue a signed authorization to a file, for an operator to submit with
    /// `indiciactl refill|contact --authorization FILE`.
    Authorize {
        /// The provider's key (from `provider keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long, value_parser = ["refill", "contact"])]
        kind: String,
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        /// The amount to credit (refill only).
        #[arg(long, value_name = "AMOUNT")]
        amount: Option<String>,
        /// The vPSD's next provider sequence (its last accepted one plus one, as
        /// `indiciactl status` shows it); each sequence is accepted once.
        #[arg(long, value_name = "N")]
        sequence: u64,
        /// Seconds from now until the authorization expires.
        #[arg(long, default_value_t = 7 * 86_400, value_name = "SECONDS")]
        valid_for: u64,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a CA and the appliance's certificate in DIR: ca.pem, ca.key, server.pem,
    /// server.key (keys 0600). The appliance's [tls] takes server.pem, server.key and
    /// ca.pem (as client_ca); clients take ca.pem as --tls-ca.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A DNS name or IP address clients reach the appliance by (repeatable).
        #[arg(long = "server-name", value_name = "NAME", required = true)]
        server_names: Vec<String>,
        #[arg(long, default_value_t = 825, value_name = "DAYS")]
        days: u32,
    },
    /// Issue a client's certificate from the CA in DIR: clients/ID.pem and clients/ID.key.
    /// ID is the client id of the appliance's configuration (or `admin`).
    Client {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, value_name = "ID")]
        id: String,
        #[arg(long, default_value_t = 825, value_name = "DAYS")]
        days: u32,
    },
}

/// Why a command failed; the CLI prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn amount(text: &str, what: &str) -> Result<u64, CliError> {
    parse_amount_mills(text).map_err(|err| CliError::Usage(format!("--{what}: {err}")))
}

fn state_name(state: &VpsdState) -> (&'static str, Option<String>) {
    match state {
        VpsdState::Active => ("active", None),
        VpsdState::Locked(LockReason::Operator(reason)) => {
            ("locked", Some(format!("operator: {reason}")))
        }
        VpsdState::Locked(LockReason::ContactOverdue) => {
            ("locked", Some("provider contact overdue".into()))
        }
        VpsdState::Locked(LockReason::Integrity(reason)) => {
            ("locked", Some(format!("integrity: {reason}")))
        }
        VpsdState::Withdrawn => ("withdrawn", None),
    }
}

/// A vPSD's status as JSON (the fields scripts rely on are stable).
pub fn status_json(status: &VpsdStatus) -> Value {
    let (state, reason) = state_name(&status.state);
    json!({
        "vpsd_id": status.vpsd_id,
        "owner": status.owner,
        "algorithm": status.algorithm.name(),
        "key_serial": status.key_serial,
        "state": state,
        "lock_reason": reason,
        "ascending_mills": status.ascending_mills,
        "descending_mills": status.descending_mills,
        "control_total_mills": status.control_total_mills,
        "piece_count": status.piece_count,
        "origin_zip": status.origin_zip.to_string(),
        "last_contact_unix": status.last_contact_unix,
        "provider_sequence": status.provider_sequence,
        "version": status.version,
    })
}

fn status_text(status: &VpsdStatus) -> String {
    let (state, reason) = state_name(&status.state);
    let state = match reason {
        Some(reason) => format!("{state} ({reason})"),
        None => state.to_owned(),
    };
    format!(
        "vPSD {}  owner {}  {} key #{}\n\
         state:          {state}\n\
         ascending:      {}\n\
         descending:     {}\n\
         control total:  {}\n\
         pieces:         {}\n\
         origin ZIP:     {}\n\
         provider seq:   {} (the next authorization needs {})\n\
         last contact:   {} (unix seconds)\n\
         version:        {}\n",
        status.vpsd_id,
        status.owner,
        status.algorithm.name(),
        status.key_serial,
        format_mills(status.ascending_mills),
        format_mills(status.descending_mills),
        format_mills(status.control_total_mills),
        status.piece_count,
        status.origin_zip,
        status.provider_sequence,
        status.provider_sequence + 1,
        status.last_contact_unix,
        status.version,
    )
}

fn write_output(path: Option<&Path>, text: &str, out: &mut dyn Write) -> Result<(), CliError> {
    match path {
        Some(path) => std::fs::write(path, text).map_err(|source| CliError::Output {
            path: path.to_owned(),
            source,
        }),
        None => out
            .write_all(text.as_bytes())
            .map_err(|source| CliError::Output {
                path: PathBuf::from("<stdout>"),
                source,
            }),
    }
}

fn print(out: &mut dyn Write, text: &str) -> Result<(), CliError> {
    write_output(None, text, out)
}

/// Checks the arguments the appliance never sees, before connecting.
fn check_arguments(command: &Command) -> Result<(), CliError> {
    match command {
        Command::Provision { origin_zip, .. } => {
            origin_zip
                .parse::<Zip>()
                .map_err(|err| CliError::Usage(format!("--origin-zip: {err}")))?;
        }
        Command::Refill {
            vpsd,
            amount: text,
            provider_key,
            authorization,
        } => {
            if let Some(text) = text {
                amount(text, "amount")?;
            }
            match (authorization, provider_key) {
                (Some(_), _) => {}
                (None, Some(_)) if vpsd.is_some() && text.is_some() => {}
                _ => {
                    return Err(CliError::Usage(
                        "refill needs --authorization FILE, or --vpsd, --amount and --provider-key"
                            .into(),
                    ))
                }
            }
        }
        Command::Contact {
            vpsd,
            provider_key,
            authorization,
        } => {
            if authorization.is_none() && (provider_key.is_none() || vpsd.is_none()) {
                return Err(CliError::Usage(
                    "contact needs --authorization FILE, or --vpsd and --provider-key".into(),
                ));
            }
        }
        Command::Lock { reason, .. } => {
            if reason.len() > indicia_proto::message::REASON_BYTES_MAX {
                return Err(CliError::Usage(format!(
                    "--reason: at most {} bytes",
                    indicia_proto::message::REASON_BYTES_MAX
                )));
            }
        }
        Command::Sign {
            postage,
            count,
            destination_zip,
            barcode,
            ..
        } => {
            amount(postage, "postage")?;
            if *count == 0 {
                return Err(CliError::Usage("--count must be at least 1".into()));
            }
            if let Some(zip) = destination_zip {
                zip.parse::<Zip>()
                    .map_err(|err| CliError::Usage(format!("--destination-zip: {err}")))?;
            }
            if let Some(path) = barcode {
                crate::barcode::ImageFormat::of(path)
                    .map_err(|err| CliError::Usage(format!("--barcode: {err}")))?;
            }
        }
        Command::Verify(VerifyArgs {
            files,
            indicium,
            key,
            keys,
            online,
            ..
        }) => {
            if files.is_empty() && indicium.is_empty() {
                return Err(CliError::Usage(
                    "verify needs indicia: FILE arguments or --indicium HEX".into(),
                ));
            }
            if key.is_none() && keys.is_none() && !online {
                return Err(CliError::Usage(
                    "verify needs --key FILE, --keys DIR or --online".into(),
                ));
            }
        }
        Command::Provider {
            command:
                ProviderCommand::Authorize {
                    kind, amount: text, ..
                },
        } => match (kind.as_str(), text) {
            ("refill", Some(text)) => {
                amount(text, "amount")?;
            }
            ("refill", None) => {
                return Err(CliError::Usage(
                    "a refill authorization needs --amount".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(CliError::Usage(
                    "a contact authorization carries no amount".into(),
                ))
            }
            _ => {}
        },
        Command::Status { .. }
        | Command::Pubkey { .. }
        | Command::Unlock { .. }
        | Command::Withdraw { .. }
        | Command::RotateKey { .. }
        | Command::Provider { .. }
        | Command::Pki { .. }
        | Command::Stats => {}
    }
    Ok(())
}

/// The data a sign or verify command binds: `--data TEXT` or `--data-file FILE`.
fn bound_data(text: Option<String>, file: Option<&Path>) -> Result<Option<Vec<u8>>, CliError> {
    match (text, file) {
        (Some(text), _) => Ok(Some(text.into_bytes())),
        (None, Some(path)) => std::fs::read(path)
            .map(Some)
            .map_err(|source| CliError::Output {
                path: path.to_owned(),
                source,
            }),
        (None, None) => Ok(None),
    }
}

/// The authorization a refill or contact submits: the one read from a file (checked before
/// connecting), or one built here with the provider key and the vPSD's next sequence.
fn submitted_authorization(
    client: &mut Client,
    kind: AuthorizationKind,
    vpsd: Option<u64>,
    amount_mills: u64,
    provider_key: Option<&Path>,
    from_file: Option<ProviderAuthorization>,
) -> Result<ProviderAuthorization, CliError> {
    if let Some(authorization) = from_file {
        return Ok(authorization);
    }
    let (Some(vpsd), Some(provider_key)) = (vpsd, provider_key) else {
        return Err(CliError::Usage(
            "--authorization FILE, or --vpsd and --provider-key".into(),
        ));
    };
    let key = load_provider_key(provider_key)?;
    let sequence = client.status(vpsd)?.provider_sequence + 1;
    Ok(authorize(
        &key,
        kind,
        vpsd,
        amount_mills,
        sequence,
        now_unix() + 3600,
    ))
}

/// The provider's commands: no appliance involved.
fn provider(command: ProviderCommand, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        ProviderCommand::Keygen { out: path } => {
            let public = crate::provider::generate_key(&path)?;
            let text = if json {
                format!(
                    "{}\n",
                    json!({"key": path.display().to_string(), "public_key": public})
                )
            } else {
                format!(
                    "provider key written to {} (keep it secret); public key {public} in {}.pub: \
                     install it as the appliance's provider.pub\n",
                    path.display(),
                    path.display()
                )
            };
            print(out, &text)
        }
        ProviderCommand::Authorize {
            key,
            kind,
            vpsd,
            amount: text,
            sequence,
            valid_for,
            out: path,
        } => {
            let kind = crate::provider::parse_kind(&kind)
                .ok_or_else(|| CliError::Usage(format!("--kind {kind}")))?;
            let amount_mills = match &text {
                Some(text) => amount(text, "amount")?,
                None => 0,
            };
            let key = load_provider_key(&key)?;
            let authorization = authorize(
                &key,
                kind,
                vpsd,
                amount_mills,
                sequence,
                now_unix().saturating_add(valid_for),
            );
            crate::provider::write_authorization(&path, &authorization)?;
            let value = crate::provider::authorization_json(&authorization);
            let text = if json {
                format!("{value}\n")
            } else {
                format!(
                    "{} authorization for vPSD {vpsd}, sequence {sequence}{}, expires at unix {}, \
                     written to {}\n",
                    crate::provider::kind_name(kind),
                    if kind == AuthorizationKind::Refill {
                        format!(", amount {}", format_mills(amount_mills))
                    } else {
                        String::new()
                    },
                    authorization.expires_unix,
                    path.display()
                )
            };
            print(out, &text)
        }
    }
}

/// Where the verifier gets its verdicts.
enum Checker {
    Offline(crate::verify::Keys),
    Online(Box<Client>),
}

fn verify(
    args: VerifyArgs,
    connect: impl FnOnce() -> Result<Client, CliError>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    use crate::verify::{check_data, read_hex_lines, signature_holds, Keys, Outcome, Store};

    let data = bound_data(args.data.clone(), args.data_file.as_deref())?;
    let mut checker = if args.online {
        Checker::Online(Box::new(connect()?))
    } else if let Some(path) = &args.key {
        Checker::Offline(Keys::Single(crate::verify::load_public_key_pem(path)?))
    } else if let Some(dir) = &args.keys {
        Checker::Offline(Keys::directory(dir)?)
    } else {
        return Err(CliError::Usage(
            "verify needs --key FILE, --keys DIR or --online".into(),
        ));
    };
    let mut store = args.store.as_deref().map(Store::open).transpose()?;
    // (where, what was read)
    let mut inputs: Vec<(String, Result<Indicium, String>)> = Vec::new();
    for (number, text) in args.indicium.iter().enumerate() {
        inputs.extend(
            read_hex_lines(text)
                .into_iter()
                .map(|(_, read)| (format!("--indicium #{}", number + 1), read)),
        );
    }
    for path in &args.files {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|source| CliError::Output {
            path: path.clone(),
            source,
        })?;
        inputs.extend(
            read_hex_lines(&text)
                .into_iter()
                .map(|(line, read)| (format!("{}:{line}", path.display()), read)),
        );
    }
    let now = now_unix();
    let mut results = Vec::new();
    let mut failed = 0u64;
    for (place, read) in inputs {
        let outcome = match &read {
            Err(err) => Outcome::Malformed(err.clone()),
            Ok(indicium) => {
                let payload = &indicium.payload;
                let signature = match &mut checker {
                    Checker::Offline(keys) => {
                        match keys.get(payload.vpsd_id, payload.key_serial)? {
                            None => Outcome::UnknownKey,
                            Some(spki) if !signature_holds(indicium, spki) => Outcome::BadSignature,
                            Some(_) => Outcome::Valid,
                        }
                    }
                    Checker::Online(client) => {
                        match client.verify(indicium.to_bytes().as_ref())?.0 {
                            indicia_proto::Verdict::Valid => Outcome::Valid,
                            indicia_proto::Verdict::BadSignature => Outcome::BadSignature,
                            indicia_proto::Verdict::UnknownKey => Outcome::UnknownKey,
                            indicia_proto::Verdict::NotIssued => Outcome::NotIssued,
                            indicia_proto::Verdict::Malformed => {
                                Outcome::Malformed("the appliance could not decode it".into())
                            }
                        }
                    }
                };
                let data = data
                    .as_ref()
                    .map_or(Ok(()), |data| check_data(indicium, data));
                match (signature, data, &mut store) {
                    (Outcome::Valid, Err(mismatch), _) => Outcome::DataMismatch(mismatch),
                    (Outcome::Valid, Ok(()), Some(store)) => {
                        match store.record(indicium, now, &place)? {
                            Some(first) => Outcome::Duplicate(first),
                            None => Outcome::Valid,
                        }
                    }
                    (outcome, _, _) => outcome,
                }
            }
        };
        if outcome != Outcome::Valid {
            failed += 1;
        }
        results.push((place, read.ok(), outcome));
    }
    if let Some(store) = &store {
        store.sync()?;
    }
    let text = if json {
        let list: Vec<Value> = results
            .iter()
            .map(|(place, indicium, outcome)| {
                json!({
                    "source": place,
                    "vpsd_id": indicium.as_ref().map(|i| i.payload.vpsd_id),
                    "key_serial": indicium.as_ref().map(|i| i.payload.key_serial),
                    "piece_number": indicium.as_ref().map(|i| i.payload.piece_number),
                    "postage_mills": indicium.as_ref().map(|i| i.payload.postage_mills),
                    "verdict": outcome.name(),
                    "detail": outcome.detail(),
                })
            })
            .collect();
        format!("{}\n", Value::Array(list))
    } else {
        let mut text = String::new();
        for (place, indicium, outcome) in &results {
            let what = match indicium {
                Some(indicium) => format!(
                    "vPSD {} key #{} piece {} postage {}",
                    indicium.payload.vpsd_id,
                    indicium.payload.key_serial,
                    indicium.payload.piece_number,
                    format_mills(indicium.payload.postage_mills)
                ),
                None => "-".to_owned(),
            };
            let detail = outcome
                .detail()
                .map_or(String::new(), |detail| format!(" ({detail})"));
            text.push_str(&format!("{place}: {what}: {}{detail}\n", outcome.name()));
        }
        text.push_str(&format!(
            "{} indicia: {} valid, {failed} not\n",
            results.len(),
            results.len() as u64 - failed
        ));
        text
    };
    print(out, &text)?;
    if failed > 0 {
        return Err(CliError::NotVerified {
            failed,
            count: results.len() as u64,
        });
    }
    Ok(())
}

/// An authorization file's kind and vPSD must be what the command says.
fn check_authorization_file(
    path: &Path,
    kind: AuthorizationKind,
    vpsd: Option<u64>,
) -> Result<ProviderAuthorization, CliError> {
    let authorization = crate::provider::read_authorization(path)?;
    if authorization.kind != kind {
        return Err(CliError::Usage(format!(
            "{}: a {} authorization, not a {}",
            path.display(),
            crate::provider::kind_name(authorization.kind),
            crate::provider::kind_name(kind)
        )));
    }
    if let Some(vpsd) = vpsd.filter(|vpsd| *vpsd != authorization.vpsd_id) {
        return Err(CliError::Usage(format!(
            "{}: the authorization is for vPSD {}, not {vpsd}",
            path.display(),
            authorization.vpsd_id
        )));
    }
    Ok(authorization)
}

/// Runs one command; what it prints goes to `out`.
pub fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    check_arguments(&args.command)?;
    // An authorization file is read and checked before connecting, once.
    let from_file = match &args.command {
        Command::Refill {
            vpsd,
            authorization: Some(path),
            ..
        } => Some(check_authorization_file(
            path,
            AuthorizationKind::Refill,
            *vpsd,
        )?),
        Command::Contact {
            vpsd,
            authorization: Some(path),
            ..
        } => Some(check_authorization_file(
            path,
            AuthorizationKind::Contact,
            *vpsd,
        )?),
        _ => None,
    };
    let tls = tls_settings(&args)?;
    let connect = || -> Result<Client, CliError> {
        let credential = Credential::load(&args.credential)?;
        Ok(Client::connect_with(
            args.addr.as_str(),
            &credential,
            tls.as_ref(),
        )?)
    };
    let command = match args.command {
        Command::Provider { command } => return provider(command, args.json, out),
        Command::Pki { command } => return pki(command, args.json, out),
        Command::Verify(verify_args) => return verify(verify_args, connect, args.json, out),
        command => command,
    };
    let credential = Credential::load(&args.credential)?;
    let mut client = Client::connect_with(args.addr.as_str(), &credential, tls.as_ref())?;
    match command {
        Command::Provision {
            vpsd,
            algorithm,
            origin_zip,
            owner,
        } => {
            let algorithm: Algorithm = algorithm
                .parse()
                .map_err(|err| CliError::Usage(format!("--algorithm: {err}")))?;
            let origin_zip: Zip = origin_zip
                .parse()
                .map_err(|err| CliError::Usage(format!("--origin-zip: {err}")))?;
            let status = client.change(&Request::Provision {
                vpsd_id: vpsd,
                owner: owner.unwrap_or_else(|| credential.client_id.clone()),
                algorithm,
                origin_zip,
            })?;
            report_status(&status, args.json, out)
        }
        Command::Refill {
            vpsd,
            amount: text,
            provider_key,
            authorization: _,
        } => {
            let amount_mills = match &text {
                Some(text) => amount(text, "amount")?,
                None => 0,
            };
            let authorization = submitted_authorization(
                &mut client,
                AuthorizationKind::Refill,
                vpsd,
                amount_mills,
                provider_key.as_deref(),
                from_file,
            )?;
            let status = client.change(&Request::Refill {
                vpsd_id: authorization.vpsd_id,
                authorization,
            })?;
            report_status(&status, args.json, out)
        }
        Command::Contact {
            vpsd,
            provider_key,
            authorization: _,
        } => {
            let authorization = submitted_authorization(
                &mut client,
                AuthorizationKind::Contact,
                vpsd,
                0,
                provider_key.as_deref(),
                from_file,
            )?;
            let status = client.change(&Request::Contact {
                vpsd_id: authorization.vpsd_id,
                authorization,
            })?;
            report_status(&status, args.json, out)
        }
        Command::Sign {
            vpsd,
            postage,
            count,
            out: path,
            destination_zip,
            data,
            data_file,
            barcode,
        } => {
            let mailing_date = MailingDate::from_unix_seconds(now_unix())
                .ok_or_else(|| CliError::Usage("the clock is outside the date range".into()))?;
            let destination_zip = destination_zip
                .map(|zip| zip.parse::<Zip>())
                .transpose()
                .map_err(|err| CliError::Usage(format!("--destination-zip: {err}")))?;
            let data_digest = bound_data(data, data_file.as_deref())?
                .map(|data| crate::verify::data_digest(&data));
            let item = SignItem {
                postage_mills: amount(&postage, "postage")?,
                mailing_date,
                rate_category: 0,
                destination_zip,
                data_digest,
            };
            let Signed {
                indicia: signed,
                refused,
                error,
            } = sign_many(&mut client, vpsd, item, count);
            let text = if args.json {
                let list: Vec<Value> = signed
                    .iter()
                    .map(|indicium| {
                        json!({
                            "piece_number": indicium.payload.piece_number,
                            "postage_mills": indicium.payload.postage_mills,
                            "indicium": hex::encode(indicium.to_bytes()),
                        })
                    })
                    .collect();
                format!("{}\n", Value::Array(list))
            } else {
                signed
                    .iter()
                    .map(|indicium| format!("{}\n", hex::encode(indicium.to_bytes())))
                    .collect()
            };
            // What was signed is charged: it is written out whatever happened after.
            write_output(path.as_deref(), &text, out)?;
            if let Some(barcode) = &barcode {
                for indicium in &signed {
                    let file = if count == 1 {
                        barcode.clone()
                    } else {
                        crate::barcode::numbered_path(barcode, indicium.payload.piece_number)
                    };
                    crate::barcode::write(indicium.to_bytes().as_ref(), &file)?;
                }
            }
            if let Some(err) = error {
                return Err(CliError::Interrupted {
                    signed: signed.len() as u64,
                    count,
                    source: err,
                });
            }
            match refused.first() {
                None => Ok(()),
                Some((first, _)) => Err(CliError::PartlySigned {
                    failed: refused.iter().map(|(_, size)| size).sum(),
                    count,
                    first: first.to_string(),
                }),
            }
        }
        Command::Status { vpsd } => {
            let status = client.status(vpsd)?;
            report_status(&status, args.json, out)
        }
        Command::Pubkey {
            vpsd,
            serial,
            out: path,
            out_dir,
        } => {
            let (algorithm, key_serial, der) = client.public_key_of(vpsd, serial)?;
            let pem = spki_pem(&der);
            let path = match out_dir {
                Some(dir) => Some(dir.join(crate::verify::key_file_name(vpsd, key_serial))),
                None => path,
            };
            if args.json {
                let value = json!({
                    "vpsd_id": vpsd,
                    "algorithm": algorithm.name(),
                    "key_serial": key_serial,
                    "spki_pem": pem,
                    "file": path.as_ref().map(|path| path.display().to_string()),
                });
                if let Some(path) = &path {
                    write_output(Some(path), &pem, out)?;
                }
                print(out, &format!("{value}\n"))
            } else {
                write_output(path.as_deref(), &pem, out)
            }
        }
        Command::Lock { vpsd, reason } => {
            let status = client.change(&Request::Lock {
                vpsd_id: vpsd,
                reason,
            })?;
            report_status(&status, args.json, out)
        }
        Command::Unlock { vpsd } => {
            let status = client.change(&Request::Unlock { vpsd_id: vpsd })?;
            report_status(&status, args.json, out)
        }
        Command::RotateKey { vpsd } => {
            let status = client.change(&Request::RotateKey { vpsd_id: vpsd })?;
            report_status(&status, args.json, out)
        }
        Command::Withdraw { vpsd } => {
            let (refund_mills, status) = client.withdraw(vpsd)?;
            if args.json {
                let mut value = status_json(&status);
                value["refund_mills"] = refund_mills.into();
                print(out, &format!("{value}\n"))
            } else {
                print(
                    out,
                    &format!(
                        "refund {} (the descending register), vPSD retired\n{}",
                        format_mills(refund_mills),
                        status_text(&status)
                    ),
                )
            }
        }
        Command::Stats => {
            let entries = client.stats()?;
            let text = if args.json {
                let map: serde_json::Map<String, Value> = entries
                    .iter()
                    .map(|entry| (entry.name.clone(), Value::from(entry.value)))
                    .collect();
                format!("{}\n", Value::Object(map))
            } else {
                entries
                    .iter()
                    .map(|entry| format!("{:<40} {}\n", entry.name, entry.value))
                    .collect()
            };
            print(out, &text)
        }
        Command::Provider { .. } | Command::Pki { .. } | Command::Verify(_) => {
            unreachable!("handled before connecting")
        }
    }
}

/// The mutual TLS settings of the flags: all of --tls-ca, --tls-cert and --tls-key, or
/// none (plaintext).
fn tls_settings(args: &Args) -> Result<Option<crate::TlsSettings>, CliError> {
    Ok(crate::transport::tls_settings_from(
        args.tls_ca.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_server_name.as_deref(),
        &args.addr,
    )?)
}

fn pki(command: PkiCommand, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let written = match command {
        PkiCommand::Init {
            dir,
            server_names,
            days,
        } => crate::pki::init(&dir, &server_names, days)?,
        PkiCommand::Client { dir, id, days } => {
            let (cert, key) = crate::pki::issue_client(&dir, &id, days)?;
            vec![cert, key]
        }
    };
    let names: Vec<String> = written
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    if json {
        print(out, &format!("{}\n", json!({ "written": names })))
    } else {
        print(out, &format!("wrote {}\n", names.join(", ")))
    }
}

fn report_status(status: &VpsdStatus, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    if json {
        print(out, &format!("{}\n", status_json(status)))
    } else {
        print(out, &status_text(status))
    }
}

/// Parses `args` (argv, program name first) and runs the command.
pub fn main_with(
    args: impl IntoIterator<Item = OsString>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let args = Args::try_parse_from(args).map_err(|err| CliError::Usage(err.to_string()))?;
    run(args, out)
}
