//! `indiciactl`'s flags, each parsed once into its type by clap (`value_parser`): amounts
//! into mills, ZIP codes, algorithms, authorization kinds, counts, lock reasons, barcode
//! files. A bad value is a usage error (exit status 2) before anything is read or sent.
//!
//! What clap cannot say alone, which flags go together, is turned into a typed value here
//! too ([`AuthorizationSource`], [`Verification`], [`AuthorizeArgs::amount_mills`]), with
//! the CLI's own usage messages, still before anything is read or sent.

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::str::FromStr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use indicia_proto::message::REASON_BYTES_MAX;
use indicia_proto::{parse_amount_mills, Algorithm, AuthorizationKind, Zip};

use super::CliError;
use crate::barcode::BarcodeFile;

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
    Provision(ProvisionArgs),
    /// Credit funds: submit a provider's authorization file, or build and sign one here with
    /// the provider key (`--vpsd --amount --provider-key`). The provider's signature
    /// authorizes it, whoever submits it.
    Refill(RefillArgs),
    /// Record provider contact: the provider's signed acknowledgment that it received the
    /// vPSD's audit data; it resets the contact watchdog.
    Contact(ContactArgs),
    /// Sign indicia: one line of hex per indicium.
    Sign(SignArgs),
    /// Registers and state of a vPSD.
    Status {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
    },
    /// A vPSD's public key, SubjectPublicKeyInfo in PEM: the current one, or `--serial`.
    Pubkey(PubkeyArgs),
    /// Stop a vPSD from signing (admin); the reason is recorded.
    Lock {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        #[arg(long, value_name = "TEXT", value_parser = lock_reason)]
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
    /// A hot backup (admin): the appliance copies every shard's journal up to its durable
    /// point into DIR on its own host (absolute; new or empty), audits the copy, and
    /// writes what it covers into DIR/backup.toml. It serves meanwhile.
    Backup {
        #[arg(long, value_name = "DIR")]
        out: String,
        /// How long to wait for the copy, in seconds.
        #[arg(long, value_name = "S", default_value_t = 3600)]
        timeout: u64,
    },
    /// The cluster the appliance belongs to (admin, cluster mode).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

/// An appliance id as the protocol carries it: 1 to 64 bytes.
fn appliance_id(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > indicia_proto::message::APPLIANCE_ID_BYTES_MAX {
        return Err(format!(
            "an appliance id has 1 to {} bytes",
            indicia_proto::message::APPLIANCE_ID_BYTES_MAX
        ));
    }
    Ok(text.to_owned())
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Every appliance that joined: id, address, whether it is alive, how many vPSDs it
    /// owns.
    Status,
    /// Make the appliance take over every vPSD of another one now (for an appliance to be
    /// retired; a dead one is taken over by itself once its lease expires).
    Takeover {
        /// The appliance whose vPSDs move.
        #[arg(long, value_name = "ID", value_parser = appliance_id)]
        from: String,
    },
    /// Which appliance owns each vPSD, and where the live appliances are reached.
    Placement {
        /// The vPSDs (repeat the flag, or separate with commas).
        #[arg(
            long = "vpsd",
            value_name = "ID",
            required = true,
            value_delimiter = ','
        )]
        vpsds: Vec<u64>,
    },
    /// Move a vPSD to another appliance now, under load: its running session commits, the
    /// requests that come meanwhile are forwarded to the new owner.
    Move {
        #[arg(long, value_name = "ID")]
        vpsd: u64,
        /// The appliance that is to own it.
        #[arg(long, value_name = "APPLIANCE", value_parser = appliance_id)]
        to: String,
    },
    /// Move every vPSD away from an appliance (which then takes none), so that it can be
    /// stopped; `--undo` ends the drain.
    Drain {
        #[arg(long, value_name = "ID", value_parser = appliance_id)]
        appliance: String,
        #[arg(long)]
        undo: bool,
    },
    /// Pin a vPSD, or every vPSD of an owner account, to an appliance (`--unpin` removes
    /// the pin).
    Pin {
        #[command(flatten)]
        subject: PinArgs,
        /// The appliance (omit with --unpin).
        #[arg(long, value_name = "APPLIANCE", value_parser = appliance_id, required_unless_present = "unpin", conflicts_with = "unpin")]
        to: Option<String>,
        #[arg(long)]
        unpin: bool,
    },
}

/// What `cluster pin` applies to: one vPSD, or an owner account.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct PinArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: Option<u64>,
    /// Every vPSD provisioned for this owner account (customer).
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
}

/// `indiciactl provision`'s flags.
#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: u64,
    #[arg(long, default_value = "ecdsa-p256", value_parser = algorithm())]
    pub algorithm: Algorithm,
    /// Origin ZIP code printed in every indicium (12345 or 12345-6789).
    #[arg(long, default_value = "00000", value_name = "ZIP", value_parser = Zip::from_str)]
    pub origin_zip: Zip,
    /// Owner account (default: the credential's client id).
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
}

/// `indiciactl refill`'s flags.
#[derive(Debug, clap::Args)]
pub struct RefillArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: Option<u64>,
    #[arg(long, value_name = "AMOUNT", requires = "provider_key", value_parser = parse_amount_mills)]
    pub amount: Option<u64>,
    /// The provider's Ed25519 key: 64 hex digits of seed (provider.key).
    #[arg(long, value_name = "FILE", conflicts_with = "authorization")]
    pub provider_key: Option<PathBuf>,
    /// An authorization file issued by `indiciactl provider authorize --kind refill`.
    #[arg(long, value_name = "FILE")]
    pub authorization: Option<PathBuf>,
}

/// `indiciactl contact`'s flags.
#[derive(Debug, clap::Args)]
pub struct ContactArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: Option<u64>,
    #[arg(long, value_name = "FILE", conflicts_with = "authorization")]
    pub provider_key: Option<PathBuf>,
    /// An authorization file issued by `indiciactl provider authorize --kind contact`.
    #[arg(long, value_name = "FILE")]
    pub authorization: Option<PathBuf>,
}

/// `indiciactl sign`'s flags.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: u64,
    #[arg(long, value_name = "AMOUNT", value_parser = parse_amount_mills)]
    pub postage: u64,
    #[arg(long, default_value = "1", value_name = "N", value_parser = count)]
    pub count: NonZeroU64,
    /// Write the indicia here instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Destination ZIP code printed in the indicium.
    #[arg(long, value_name = "ZIP", value_parser = Zip::from_str)]
    pub destination_zip: Option<Zip>,
    /// Bind this data to the indicium: its SHA-256 goes into the data digest.
    #[arg(long, value_name = "TEXT", conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Bind this file's bytes to the indicium (SHA-256 in the data digest).
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,
    /// Also render each indicium as a Data Matrix symbol: FILE.png or FILE.svg (with
    /// several indicia, FILE-<piece>.png ...).
    #[arg(long, value_name = "FILE", value_parser = barcode_file)]
    pub barcode: Option<BarcodeFile>,
}

/// `indiciactl pubkey`'s flags.
#[derive(Debug, clap::Args)]
pub struct PubkeyArgs {
    #[arg(long, value_name = "ID")]
    pub vpsd: u64,
    #[arg(long, value_name = "SERIAL")]
    pub serial: Option<u32>,
    #[arg(long, value_name = "FILE", conflicts_with = "out_dir")]
    pub out: Option<PathBuf>,
    /// Write `<vpsd>-<serial>.pem` into this directory (a verifier's key directory).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
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
    Authorize(AuthorizeArgs),
}

/// `indiciactl provider authorize`'s flags.
#[derive(Debug, clap::Args)]
pub struct AuthorizeArgs {
    /// The provider's key (from `provider keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[arg(long, value_parser = authorization_kind())]
    pub kind: AuthorizationKind,
    #[arg(long, value_name = "ID")]
    pub vpsd: u64,
    /// The amount to credit (refill only).
    #[arg(long, value_name = "AMOUNT", value_parser = parse_amount_mills)]
    amount: Option<u64>,
    /// The vPSD's next provider sequence (its last accepted one plus one, as
    /// `indiciactl status` shows it); each sequence is accepted once.
    #[arg(long, value_name = "N")]
    pub sequence: u64,
    /// Seconds from now until the authorization expires.
    #[arg(long, default_value_t = 7 * 86_400, value_name = "SECONDS")]
    pub valid_for: u64,
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
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

/// `--algorithm`: the names [`Algorithm`] parses, listed in the help.
fn algorithm() -> impl TypedValueParser<Value = Algorithm> {
    PossibleValuesParser::new(["ecdsa-p256", "ed25519"]).try_map(|name| name.parse::<Algorithm>())
}

/// `--kind`: `refill` or `contact`, listed in the help.
fn authorization_kind() -> impl TypedValueParser<Value = AuthorizationKind> {
    PossibleValuesParser::new(["refill", "contact"])
        .try_map(|name| crate::provider::parse_kind(&name).ok_or("neither refill nor contact"))
}

/// `--count`: a whole number, at least 1.
fn count(text: &str) -> Result<NonZeroU64, String> {
    let count: u64 = text.parse().map_err(|err| format!("{err}"))?;
    NonZeroU64::new(count).ok_or_else(|| "must be at least 1".to_owned())
}

/// `--reason`: what the protocol carries, at most [`REASON_BYTES_MAX`] bytes.
fn lock_reason(text: &str) -> Result<String, String> {
    if text.len() > REASON_BYTES_MAX {
        return Err(format!("at most {REASON_BYTES_MAX} bytes"));
    }
    Ok(text.to_owned())
}

/// `--barcode`: a file whose extension names the format.
fn barcode_file(text: &str) -> Result<BarcodeFile, crate::barcode::BarcodeError> {
    BarcodeFile::new(PathBuf::from(text))
}

/// Where a refill's or contact's authorization comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizationSource {
    /// A file issued by `indiciactl provider authorize`; with `--vpsd`, it must name that
    /// vPSD.
    File { path: PathBuf, vpsd: Option<u64> },
    /// Built and signed here with the provider's key, for the vPSD's next sequence.
    ProviderKey {
        vpsd: u64,
        amount_mills: u64,
        provider_key: PathBuf,
    },
}

impl RefillArgs {
    pub fn source(self) -> Result<AuthorizationSource, CliError> {
        match self {
            Self {
                authorization: Some(path),
                vpsd,
                ..
            } => Ok(AuthorizationSource::File { path, vpsd }),
            Self {
                authorization: None,
                vpsd: Some(vpsd),
                amount: Some(amount_mills),
                provider_key: Some(provider_key),
            } => Ok(AuthorizationSource::ProviderKey {
                vpsd,
                amount_mills,
                provider_key,
            }),
            _ => Err(CliError::Usage(
                "refill needs --authorization FILE, or --vpsd, --amount and --provider-key".into(),
            )),
        }
    }
}

impl ContactArgs {
    pub fn source(self) -> Result<AuthorizationSource, CliError> {
        match self {
            Self {
                authorization: Some(path),
                vpsd,
                ..
            } => Ok(AuthorizationSource::File { path, vpsd }),
            Self {
                authorization: None,
                vpsd: Some(vpsd),
                provider_key: Some(provider_key),
            } => Ok(AuthorizationSource::ProviderKey {
                vpsd,
                amount_mills: 0,
                provider_key,
            }),
            _ => Err(CliError::Usage(
                "contact needs --authorization FILE, or --vpsd and --provider-key".into(),
            )),
        }
    }
}

impl AuthorizeArgs {
    /// The amount the authorization carries: a refill's (required), 0 for a contact (which
    /// takes none).
    pub fn amount_mills(&self) -> Result<u64, CliError> {
        match (self.kind, self.amount) {
            (AuthorizationKind::Refill, Some(amount_mills)) => Ok(amount_mills),
            (AuthorizationKind::Refill, None) => Err(CliError::Usage(
                "a refill authorization needs --amount".into(),
            )),
            (AuthorizationKind::Contact, Some(_)) => Err(CliError::Usage(
                "a contact authorization carries no amount".into(),
            )),
            (AuthorizationKind::Contact, None) => Ok(0),
        }
    }
}

/// Where the verifier gets its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--key FILE`: one public key for every indicium.
    Single(PathBuf),
    /// `--keys DIR`: a key directory.
    Directory(PathBuf),
    /// `--online`: the appliance.
    Online,
}

/// What `indiciactl verify` checks, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub files: Vec<PathBuf>,
    pub indicia_hex: Vec<String>,
    pub keys: KeySource,
    pub store: Option<PathBuf>,
    pub data: Option<String>,
    pub data_file: Option<PathBuf>,
}

impl VerifyArgs {
    pub fn verification(self) -> Result<Verification, CliError> {
        if self.files.is_empty() && self.indicium.is_empty() {
            return Err(CliError::Usage(
                "verify needs indicia: FILE arguments or --indicium HEX".into(),
            ));
        }
        let keys = match (self.key, self.keys, self.online) {
            (Some(file), _, _) => KeySource::Single(file),
            (None, Some(dir), _) => KeySource::Directory(dir),
            (None, None, true) => KeySource::Online,
            (None, None, false) => {
                return Err(CliError::Usage(
                    "verify needs --key FILE, --keys DIR or --online".into(),
                ))
            }
        };
        Ok(Verification {
            files: self.files,
            indicia_hex: self.indicium,
            keys,
            store: self.store,
            data: self.data,
            data_file: self.data_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("indiciactl").chain(args.iter().copied()))
    }

    #[test]
    fn values_are_parsed_into_their_types_once() {
        let Ok(Args {
            command: Command::Sign(sign),
            ..
        }) = parse(&[
            "sign",
            "--vpsd",
            "7",
            "--postage",
            "0.73",
            "--count",
            "3",
            "--destination-zip",
            "20260-0001",
            "--barcode",
            "label.SVG",
        ])
        else {
            panic!("sign did not parse");
        };
        assert_eq!(sign.postage, 730);
        assert_eq!(sign.count.get(), 3);
        assert_eq!(sign.destination_zip, "20260-0001".parse().ok());
        assert_eq!(
            sign.barcode.map(|barcode| barcode.format),
            Some(crate::barcode::ImageFormat::Svg)
        );
        let Ok(Args {
            command: Command::Provision(provision),
            ..
        }) = parse(&["provision", "--vpsd", "1", "--algorithm", "ed25519"])
        else {
            panic!("provision did not parse");
        };
        assert_eq!(provision.algorithm, Algorithm::Ed25519);
        assert_eq!(provision.origin_zip.to_string(), "00000");
    }

    #[test]
    fn a_bad_value_is_a_usage_error() {
        for args in [
            &["sign", "--vpsd", "1", "--postage", "0.7301"][..],
            &["sign", "--vpsd", "1", "--postage", "1", "--count", "0"],
            &[
                "sign",
                "--vpsd",
                "1",
                "--postage",
                "1",
                "--barcode",
                "a.gif",
            ],
            &[
                "sign",
                "--vpsd",
                "1",
                "--postage",
                "1",
                "--destination-zip",
                "1234",
            ],
            &["provision", "--vpsd", "1", "--algorithm", "rsa"],
            &["provision", "--vpsd", "1", "--origin-zip", "x"],
            &[
                "provider",
                "authorize",
                "--key",
                "k",
                "--kind",
                "gift",
                "--vpsd",
                "1",
            ],
        ] {
            let err = parse(args).err().map(|err| err.kind());
            assert!(
                matches!(
                    err,
                    Some(
                        clap::error::ErrorKind::ValueValidation
                            | clap::error::ErrorKind::InvalidValue
                    )
                ),
                "{args:?}: {err:?}"
            );
        }
        let long = "x".repeat(REASON_BYTES_MAX + 1);
        assert!(parse(&["lock", "--vpsd", "1", "--reason", &long]).is_err());
        let fits = "x".repeat(REASON_BYTES_MAX);
        assert!(parse(&["lock", "--vpsd", "1", "--reason", &fits]).is_ok());
    }

    #[test]
    fn a_refill_comes_from_a_file_or_from_the_provider_key() {
        let source = |args: &[&str]| match parse(args) {
            Ok(Args {
                command: Command::Refill(refill),
                ..
            }) => refill.source().map_err(|err| err.to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            source(&["refill", "--authorization", "a.json"]),
            Ok(AuthorizationSource::File {
                path: "a.json".into(),
                vpsd: None
            })
        );
        assert_eq!(
            source(&[
                "refill",
                "--vpsd",
                "5",
                "--amount",
                "2.5",
                "--provider-key",
                "p.key"
            ]),
            Ok(AuthorizationSource::ProviderKey {
                vpsd: 5,
                amount_mills: 2_500,
                provider_key: "p.key".into()
            })
        );
        let err = source(&["refill", "--vpsd", "5"]).unwrap_err();
        assert!(err.contains("--authorization FILE"), "{err}");
    }
}
