//! What each command does, on typed arguments (parsed in `args.rs`): files are read and
//! checked first, then the appliance is connected to (only by commands that need it), then
//! the result goes to `output.rs`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use indicia_proto::{
    AuthorizationKind, Indicium, MailingDate, ProviderAuthorization, Request, SignItem,
};
use serde_json::json;

use super::args::{
    AuthorizationSource, ClusterCommand, Command, KeySource, PkiCommand, ProviderCommand,
    ProvisionArgs, PubkeyArgs, SignArgs, Verification,
};
use super::output::{self, Output, Verdict};
use super::CliError;
use crate::provider::{authorize, kind_name, load_provider_key, read_authorization};
use crate::signing::{sign_many, Signed};
use crate::transport::TlsFiles;
use crate::verify::{check_data, read_hex_lines, signature_holds, Keys, Outcome, Store};
use crate::{Client, Credential, Pool};

/// How long one request of a command may take, from the call to its answer.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The appliance a command talks to, and how: nothing is read or connected until a
/// command needs it.
#[derive(Debug)]
pub(super) struct Appliance {
    pub addr: String,
    pub credential: PathBuf,
    pub tls: Option<TlsFiles>,
}

impl Appliance {
    /// Reads the TLS files (if any) and the credential.
    fn settings(&self) -> Result<(Option<crate::TlsSettings>, Credential), CliError> {
        let tls = self
            .tls
            .as_ref()
            .map(|files| files.load(&self.addr))
            .transpose()?;
        Ok((tls, Credential::load(&self.credential)?))
    }

    /// Reads the TLS files and the credential, connects and authenticates.
    fn connect(&self) -> Result<(Client, Credential), CliError> {
        let (tls, credential) = self.settings()?;
        let client = Client::connect_with(self.addr.as_str(), &credential, tls.as_ref())?;
        Ok((client, credential))
    }

    fn client(&self) -> Result<Client, CliError> {
        Ok(self.connect()?.0)
    }

    /// The client library's pool, seeded with the appliance given: every per-vPSD command
    /// goes to the appliance that owns the vPSD (or, for one nobody owns yet, where a
    /// provision would go) and to its shard there. The one given would forward the request
    /// all the same: this saves the hop.
    fn pool(&self) -> Result<(Pool, Credential), CliError> {
        let (tls, credential) = self.settings()?;
        let pool = Pool::builder(&[self.addr.as_str()], &credential)
            .tls(tls)
            .timeout(CALL_TIMEOUT)
            .build()?;
        Ok((pool, credential))
    }

    fn pool_of(&self) -> Result<Pool, CliError> {
        Ok(self.pool()?.0)
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Runs one command.
pub(super) fn run(
    command: Command,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    match command {
        Command::Provision(args) => provision(args, appliance, output),
        Command::Refill(args) => {
            let source = args.source()?;
            provider_request(AuthorizationKind::Refill, source, appliance, output)
        }
        Command::Contact(args) => {
            let source = args.source()?;
            provider_request(AuthorizationKind::Contact, source, appliance, output)
        }
        Command::Sign(args) => sign(args, appliance, output),
        Command::Status { vpsd } => output.status(&appliance.pool_of()?.status(vpsd)?),
        Command::Pubkey(args) => pubkey(args, appliance, output),
        Command::Lock { vpsd, reason } => {
            let request = Request::Lock {
                vpsd_id: vpsd,
                reason,
            };
            output.status(&appliance.pool_of()?.change(request)?)
        }
        Command::Unlock { vpsd } => output.status(
            &appliance
                .pool_of()?
                .change(Request::Unlock { vpsd_id: vpsd })?,
        ),
        Command::RotateKey { vpsd } => output.status(
            &appliance
                .pool_of()?
                .change(Request::RotateKey { vpsd_id: vpsd })?,
        ),
        Command::Withdraw { vpsd } => {
            let (refund_mills, status) = appliance.pool_of()?.withdraw(vpsd)?;
            output::withdrawn(output, refund_mills, &status)
        }
        Command::Stats => {
            let entries = appliance.client()?.stats()?;
            let text = output::stats(&entries, output.json);
            output.print(&text)
        }
        Command::Backup { out, timeout } => {
            let mut client = appliance.client()?;
            client.set_timeout(Some(std::time::Duration::from_secs(timeout.max(1))))?;
            let report = client.backup(&out)?;
            let text = output::backup(&out, &report, output.json);
            output.print(&text)?;
            if report.clean {
                Ok(())
            } else {
                Err(CliError::Findings(
                    "the audit of the copy found something: run `indiciad audit` on it".into(),
                ))
            }
        }
        Command::Cluster { command } => cluster(command, appliance, output),
        Command::Verify(args) => verify(args.verification()?, appliance, output),
        Command::Provider { command } => provider(command, output),
        Command::Pki { command } => pki(command, output),
    }
}

fn cluster(
    command: ClusterCommand,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    let text = match command {
        ClusterCommand::Status => {
            let (_, appliances) = appliance.client()?.cluster(None)?;
            output::cluster(None, &appliances, output.json)
        }
        ClusterCommand::Takeover { from } => {
            let (taken, appliances) = appliance.client()?.cluster(Some(&from))?;
            output::cluster(Some(taken), &appliances, output.json)
        }
        ClusterCommand::Placement { vpsds } => {
            let placement = appliance.client()?.placement(&vpsds)?;
            output::placement(&placement, output.json)
        }
        ClusterCommand::Move { vpsd, to } => {
            let placement = appliance.client()?.cluster_move(vpsd, &to)?;
            output::placement(&placement, output.json)
        }
        ClusterCommand::Drain {
            appliance: id,
            undo,
        } => {
            let appliances = appliance.client()?.cluster_drain(&id, undo)?;
            output::cluster(None, &appliances, output.json)
        }
        ClusterCommand::Pin { subject, to, unpin } => {
            let subject = match (subject.vpsd, subject.owner) {
                (Some(vpsd), _) => indicia_proto::PinSubject::Vpsd(vpsd),
                (None, Some(owner)) => indicia_proto::PinSubject::Owner(owner),
                (None, None) => {
                    return Err(CliError::Usage(
                        "cluster pin needs --vpsd or --owner".into(),
                    ))
                }
            };
            let to = if unpin { None } else { to.as_deref() };
            let appliances = appliance.client()?.cluster_pin(subject, to)?;
            output::cluster(None, &appliances, output.json)
        }
    };
    output.print(&text)
}

fn provision(
    args: ProvisionArgs,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    let (pool, credential) = appliance.pool()?;
    let status = pool.change(Request::Provision {
        vpsd_id: args.vpsd,
        owner: args.owner.unwrap_or(credential.client_id),
        algorithm: args.algorithm,
        origin_zip: args.origin_zip,
    })?;
    output.status(&status)
}

/// An authorization file's kind and vPSD must be what the command says.
fn checked_authorization_file(
    path: &Path,
    kind: AuthorizationKind,
    vpsd: Option<u64>,
) -> Result<ProviderAuthorization, CliError> {
    let authorization = read_authorization(path)?;
    if authorization.kind != kind {
        return Err(CliError::Usage(format!(
            "{}: a {} authorization, not a {}",
            path.display(),
            kind_name(authorization.kind),
            kind_name(kind)
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

/// A refill or a contact: the authorization file is read and checked before connecting;
/// one built here with the provider key takes the vPSD's next sequence from the appliance.
fn provider_request(
    kind: AuthorizationKind,
    source: AuthorizationSource,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    let (pool, authorization) = match source {
        AuthorizationSource::File { path, vpsd } => {
            let authorization = checked_authorization_file(&path, kind, vpsd)?;
            (appliance.pool_of()?, authorization)
        }
        AuthorizationSource::ProviderKey {
            vpsd,
            amount_mills,
            provider_key,
        } => {
            let key = load_provider_key(&provider_key)?;
            let pool = appliance.pool_of()?;
            let sequence = pool.status(vpsd)?.provider_sequence + 1;
            let authorization =
                authorize(&key, kind, vpsd, amount_mills, sequence, now_unix() + 3600);
            (pool, authorization)
        }
    };
    let vpsd_id = authorization.vpsd_id;
    let request = match kind {
        AuthorizationKind::Refill => Request::Refill {
            vpsd_id,
            authorization,
        },
        AuthorizationKind::Contact => Request::Contact {
            vpsd_id,
            authorization,
        },
    };
    output.status(&pool.change(request)?)
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

fn sign(args: SignArgs, appliance: &Appliance, output: &mut Output<'_>) -> Result<(), CliError> {
    let mailing_date = MailingDate::from_unix_seconds(now_unix())
        .ok_or_else(|| CliError::Usage("the clock is outside the date range".into()))?;
    let data_digest = bound_data(args.data, args.data_file.as_deref())?
        .map(|data| crate::verify::data_digest(&data));
    let item = SignItem {
        postage_mills: args.postage,
        mailing_date,
        rate_category: 0,
        destination_zip: args.destination_zip,
        data_digest,
    };
    let count = args.count.get();
    let pool = appliance.pool_of()?;
    let Signed {
        indicia: signed,
        refused,
        error,
    } = sign_many(&pool, args.vpsd, item, count);
    // What was signed is charged: it is written out whatever happened after.
    let text = output::indicia(&signed, output.json);
    output.write_to(args.out.as_deref(), &text)?;
    if let Some(barcode) = &args.barcode {
        for indicium in &signed {
            let file = if count == 1 {
                barcode.clone()
            } else {
                barcode.numbered(indicium.payload.piece_number)
            };
            file.write(indicium.to_bytes().as_ref())?;
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

fn pubkey(
    args: PubkeyArgs,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    let vpsd = args.vpsd;
    let (algorithm, key_serial, der) = appliance.pool_of()?.public_key_of(vpsd, args.serial)?;
    let pem = crate::verify::spki_pem(&der);
    let path = match args.out_dir {
        Some(dir) => Some(dir.join(crate::verify::key_file_name(vpsd, key_serial))),
        None => args.out,
    };
    if !output.json {
        return output.write_to(path.as_deref(), &pem);
    }
    if let Some(path) = &path {
        output.write_to(Some(path), &pem)?;
    }
    let value = json!({
        "vpsd_id": vpsd,
        "algorithm": algorithm.name(),
        "key_serial": key_serial,
        "spki_pem": pem,
        "file": path.as_ref().map(|path| path.display().to_string()),
    });
    output.print(&format!("{value}\n"))
}

/// Where the verifier gets its verdicts.
enum Checker {
    Offline(Keys),
    Online(Box<Client>),
}

impl Checker {
    fn signature(&mut self, indicium: &Indicium) -> Result<Outcome, CliError> {
        let payload = &indicium.payload;
        Ok(match self {
            Self::Offline(keys) => match keys.get(payload.vpsd_id, payload.key_serial)? {
                None => Outcome::UnknownKey,
                Some(spki) if !signature_holds(indicium, spki) => Outcome::BadSignature,
                Some(_) => Outcome::Valid,
            },
            Self::Online(client) => match client.verify(indicium.to_bytes().as_ref())?.0 {
                indicia_proto::Verdict::Valid => Outcome::Valid,
                indicia_proto::Verdict::BadSignature => Outcome::BadSignature,
                indicia_proto::Verdict::UnknownKey => Outcome::UnknownKey,
                indicia_proto::Verdict::NotIssued => Outcome::NotIssued,
                indicia_proto::Verdict::Malformed => {
                    Outcome::Malformed("the appliance could not decode it".into())
                }
            },
        })
    }
}

/// An indicium to verify: where it was read, and what was read there.
type Input = (String, Result<Indicium, String>);

/// The indicia to verify: `--indicium` values first, then the files (`-` is standard
/// input).
fn verify_inputs(verification: &Verification) -> Result<Vec<Input>, CliError> {
    let mut inputs = Vec::new();
    for (number, text) in verification.indicia_hex.iter().enumerate() {
        inputs.extend(
            read_hex_lines(text)
                .into_iter()
                .map(|(_, read)| (format!("--indicium #{}", number + 1), read)),
        );
    }
    for path in &verification.files {
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
    Ok(inputs)
}

fn verify(
    verification: Verification,
    appliance: &Appliance,
    output: &mut Output<'_>,
) -> Result<(), CliError> {
    let data = bound_data(verification.data.clone(), verification.data_file.as_deref())?;
    let mut checker = match &verification.keys {
        KeySource::Online => Checker::Online(Box::new(appliance.client()?)),
        KeySource::Single(path) => {
            Checker::Offline(Keys::Single(crate::verify::load_public_key_pem(path)?))
        }
        KeySource::Directory(dir) => Checker::Offline(Keys::directory(dir)?),
    };
    let mut store = verification.store.as_deref().map(Store::open).transpose()?;
    let now = now_unix();
    let mut results: Vec<Verdict> = Vec::new();
    let mut failed = 0u64;
    for (place, read) in verify_inputs(&verification)? {
        let outcome = match &read {
            Err(err) => Outcome::Malformed(err.clone()),
            Ok(indicium) => {
                let signature = checker.signature(indicium)?;
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
    let text = output::verdicts(&results, failed, output.json);
    output.print(&text)?;
    if failed > 0 {
        return Err(CliError::NotVerified {
            failed,
            count: results.len() as u64,
        });
    }
    Ok(())
}

/// The provider's commands: no appliance involved.
fn provider(command: ProviderCommand, output: &mut Output<'_>) -> Result<(), CliError> {
    match command {
        ProviderCommand::Keygen { out: path } => {
            let public = crate::provider::generate_key(&path)?;
            output::provider_key(output, &path, &public)
        }
        ProviderCommand::Authorize(args) => {
            let amount_mills = args.amount_mills()?;
            let key = load_provider_key(&args.key)?;
            let authorization = authorize(
                &key,
                args.kind,
                args.vpsd,
                amount_mills,
                args.sequence,
                now_unix().saturating_add(args.valid_for),
            );
            crate::provider::write_authorization(&args.out, &authorization)?;
            output::authorization_issued(output, &authorization, &args.out)
        }
    }
}

/// The certificate authority's commands: no appliance involved.
fn pki(command: PkiCommand, output: &mut Output<'_>) -> Result<(), CliError> {
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
    output::written(output, &written)
}
