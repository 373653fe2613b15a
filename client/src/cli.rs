//! `indiciactl`: the operator's and user's command line. The flags are an interface:
//! users and tests script against them.
//!
//! ```text
//! indiciactl [--addr ADDR] [--credential FILE] <command> [--json]
//!   provision --vpsd ID [--algorithm ecdsa-p256|ed25519] [--origin-zip ZIP] [--owner NAME]
//!   refill    --vpsd ID --amount AMOUNT --provider-key FILE
//!   sign      --vpsd ID --postage AMOUNT [--count N] [--out FILE]
//!   status    --vpsd ID
//!   pubkey    --vpsd ID [--out FILE]
//!   stats
//! ```
//!
//! AMOUNT is a decimal currency string (`0.73`, `100`), parsed exactly into mills.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use clap::{Parser, Subcommand};
use indicia_proto::message::BATCH_ITEMS_MAX;
use indicia_proto::{
    format_mills, parse_amount_mills, Algorithm, AuthorizationKind, Indicium, ItemResult,
    LockReason, MailingDate, ProviderAuthorization, Request, SignItem, VpsdState, VpsdStatus, Zip,
};
use serde_json::{json, Value};

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
    /// Credit funds: builds a provider authorization, signs it with the provider key, and
    /// submits it.
    Refill {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "AMOUNT")]
        amount: String,
        /// The provider's Ed25519 key: 64 hex digits of seed (provider.key).
        #[arg(long, value_name = "FILE")]
        provider_key: PathBuf,
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
    },
    /// Registers and state of a vPSD.
    Status {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// The vPSD's current public key, SubjectPublicKeyInfo in PEM.
    Pubkey {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The appliance's counters and histograms (admin).
    Stats,
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
}

impl CliError {
    /// Exit status: 2 for usage, 3 when the appliance refused, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Client(ClientError::Refused(_)) | Self::PartlySigned { .. } => 3,
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
        status.version,
    )
}

/// The PEM text of a SubjectPublicKeyInfo.
pub fn spki_pem(der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// Loads a provider key file: 64 hex digits of Ed25519 seed, owner-readable only.
pub fn load_provider_key(path: &Path) -> Result<Ed25519KeyPair, ClientError> {
    let text = crate::read_private(path)?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), seed.as_mut()).map_err(|err| ClientError::Credential {
        path: path.to_owned(),
        what: format!("expected 64 hex digits of Ed25519 seed: {err}"),
    })?;
    Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).map_err(|_| ClientError::Credential {
        path: path.to_owned(),
        what: "not an Ed25519 seed".into(),
    })
}

/// A provider authorization signed with `key` (what the provider's systems issue).
pub fn authorize(
    key: &Ed25519KeyPair,
    kind: AuthorizationKind,
    vpsd_id: u64,
    amount_mills: u64,
    sequence: u64,
    expires_unix: u64,
) -> ProviderAuthorization {
    sign_authorization(
        key,
        ProviderAuthorization {
            kind,
            vpsd_id,
            amount_mills,
            sequence,
            expires_unix,
            signature: [0; 64],
        },
    )
}

/// `authorization` with its signature made by `key` over
/// [`ProviderAuthorization::signed_bytes`] (also to re-sign an altered one, in tests).
pub fn sign_authorization(
    key: &Ed25519KeyPair,
    mut authorization: ProviderAuthorization,
) -> ProviderAuthorization {
    let signature = key.sign(&authorization.signed_bytes());
    authorization.signature.copy_from_slice(signature.as_ref());
    authorization
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

/// What [`sign_many`] got: the indicia signed (in piece order), the refusals with the
/// number of indicia each covers, and the error that ended it early, if any. Signed
/// indicia are charged: they are returned even when the connection failed midway.
#[derive(Debug, Default)]
pub struct Signed {
    pub indicia: Vec<Indicium>,
    pub refused: Vec<(indicia_proto::ErrorBody, u64)>,
    pub error: Option<ClientError>,
}

/// Signs `count` indicia in pipelined batches of up to 256.
pub fn sign_many(client: &mut Client, vpsd_id: u64, item: SignItem, count: u64) -> Signed {
    const PIPELINE: usize = 8;
    let mut result = Signed::default();
    let mut left = count;
    let mut in_flight: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    loop {
        while left > 0 && in_flight.len() < PIPELINE {
            let size = left.min(BATCH_ITEMS_MAX as u64);
            let id = client.next_request_id();
            // `size` <= 256.
            let items = vec![item; size as usize];
            if let Err(err) = client.send(id, &Request::SignBatch { vpsd_id, items }) {
                result.error = Some(err);
                break;
            }
            left -= size;
            in_flight.insert(id, size);
        }
        if in_flight.is_empty() || result.error.is_some() {
            break;
        }
        let (id, response) = match client.recv() {
            Ok(answer) => answer,
            Err(err) => {
                result.error = Some(err);
                break;
            }
        };
        let Some(size) = in_flight.remove(&id) else {
            continue;
        };
        match response {
            indicia_proto::Response::BatchSigned { results } => {
                for item in results {
                    match item {
                        ItemResult::Signed(indicium) => result.indicia.push(indicium),
                        ItemResult::Failed(body) => result.refused.push((body, 1)),
                    }
                }
            }
            indicia_proto::Response::Error(body) => result.refused.push((body, size)),
            other => {
                result.error = Some(ClientError::Protocol(format!(
                    "unexpected answer to sign-batch: opcode {:#04x}",
                    other.opcode()
                )));
                break;
            }
        }
    }
    result
        .indicia
        .sort_by_key(|indicium| indicium.payload.piece_number);
    result
}

/// Runs one command; what it prints goes to `out`.
/// Checks the arguments the appliance never sees, before connecting.
fn check_arguments(command: &Command) -> Result<(), CliError> {
    match command {
        Command::Provision { origin_zip, .. } => {
            origin_zip
                .parse::<Zip>()
                .map_err(|err| CliError::Usage(format!("--origin-zip: {err}")))?;
        }
        Command::Refill { amount: text, .. } => {
            amount(text, "amount")?;
        }
        Command::Sign { postage, count, .. } => {
            amount(postage, "postage")?;
            if *count == 0 {
                return Err(CliError::Usage("--count must be at least 1".into()));
            }
        }
        Command::Status { .. } | Command::Pubkey { .. } | Command::Stats => {}
    }
    Ok(())
}

pub fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    check_arguments(&args.command)?;
    let credential = Credential::load(&args.credential)?;
    let mut client = Client::connect(args.addr.as_str(), &credential)?;
    match args.command {
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
        } => {
            let amount_mills = amount(&text, "amount")?;
            let key = load_provider_key(&provider_key)?;
            let sequence = client.status(vpsd)?.provider_sequence + 1;
            let authorization = authorize(
                &key,
                AuthorizationKind::Refill,
                vpsd,
                amount_mills,
                sequence,
                now_unix() + 3600,
            );
            let status = client.change(&Request::Refill {
                vpsd_id: vpsd,
                authorization,
            })?;
            report_status(&status, args.json, out)
        }
        Command::Sign {
            vpsd,
            postage,
            count,
            out: path,
        } => {
            if count == 0 {
                return Err(CliError::Usage("--count must be at least 1".into()));
            }
            let mailing_date = MailingDate::from_unix_seconds(now_unix())
                .ok_or_else(|| CliError::Usage("the clock is outside the date range".into()))?;
            let item = SignItem {
                postage_mills: amount(&postage, "postage")?,
                mailing_date,
                rate_category: 0,
                destination_zip: None,
                data_digest: None,
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
        Command::Pubkey { vpsd, out: path } => {
            let (algorithm, key_serial, der) = client.public_key(vpsd)?;
            let pem = spki_pem(&der);
            if args.json {
                let value = json!({
                    "vpsd_id": vpsd,
                    "algorithm": algorithm.name(),
                    "key_serial": key_serial,
                    "spki_pem": pem,
                });
                if let Some(path) = &path {
                    write_output(Some(path), &pem, out)?;
                }
                print(out, &format!("{value}\n"))
            } else {
                write_output(path.as_deref(), &pem, out)
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
