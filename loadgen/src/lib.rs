//! `indicia-loadgen`: drives the appliance the way a fleet of shipping stations would and
//! reports how coalescing amortizes the signing session.
//!
//! - [`workload`]: which vPSD each request is for (uniform or zipf).
//! - [`funding`]: what a run can spend, funded before it starts.
//! - [`pacing`]: open-loop schedules, coordinated omission corrected.
//! - [`run`]: the connections, closed or open loop, with offline verification.
//! - [`tally`]: what a run saw (successes apart from errors) and whether it is valid.
//! - [`appliance`]: the appliance as a child process (this program's `appliance`
//!   subcommand runs `indiciad`'s code).
//! - [`plot`]: the sweep's SVG.
//! - `peer` (feature `softhsm`): the same signatures through SoftHSM2, for comparison.
//! - [`report`]: throughput, latency percentiles (client-side and the appliance's own),
//!   the appliance's statistics and CPU time, and the raw signing cost measured in the
//!   same run.

pub mod appliance;
#[cfg(feature = "cluster")]
pub mod cluster_demo;
#[cfg(feature = "cluster")]
pub mod cluster_scale;
pub mod funding;
pub mod library;
pub mod pacing;
#[cfg(feature = "softhsm")]
pub mod peer;
pub mod plot;
pub mod report;
pub mod run;
pub mod tally;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicia_client::provider::{authorize, load_provider_key};
use indicia_client::{Client, ClientError, Credential, TlsSettings};
use indicia_proto::{Algorithm, AuthorizationKind, ErrorCode, Request, Zip};

use report::{Report, Stats};
use run::{Keys, LoadError, RunConfig};

fn stats(client: &mut Client) -> Result<Stats, ClientError> {
    Ok(report::stats_from(client.stats()?))
}

/// Provisions the run's vPSDs that do not exist yet (with `algorithm`) and tops each up to
/// at least `funds_mills` available, with provider authorizations signed by the key in
/// `provider_key` (each with the vPSD's next sequence number). Needs an admin credential.
pub fn prepare_vpsds(
    client: &mut Client,
    ids: impl Iterator<Item = u64>,
    algorithm: Algorithm,
    funds_mills: u64,
    provider_key: &Path,
) -> Result<(), ClientError> {
    let key = load_provider_key(provider_key)?;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
        + 3600;
    for vpsd_id in ids {
        let status = match client.status(vpsd_id) {
            Ok(status) => status,
            Err(ClientError::Refused(body)) if body.code == ErrorCode::UnknownVpsd => client
                .change(&Request::Provision {
                    vpsd_id,
                    owner: "loadgen".into(),
                    algorithm,
                    origin_zip: Zip::new(20260, None).unwrap_or_else(|_| unreachable!("valid")),
                })?,
            Err(err) => return Err(err),
        };
        if status.descending_mills < funds_mills {
            let authorization = authorize(
                &key,
                AuthorizationKind::Refill,
                vpsd_id,
                funds_mills - status.descending_mills,
                status.provider_sequence + 1,
                expires,
            );
            client.change(&Request::Refill {
                vpsd_id,
                authorization,
            })?;
        }
    }
    Ok(())
}

/// Provisions `config`'s vPSDs that do not exist yet and funds each for everything the run
/// can spend ([`funding::funds_mills`]). Call it before every run on the same vPSDs: what
/// an earlier run spent is topped up again.
pub fn fund(
    client: &mut Client,
    config: &RunConfig,
    algorithm: Algorithm,
    provider_key: &Path,
) -> Result<(), LoadError> {
    let funds_mills = funding::funds_mills(config).ok_or(LoadError::FundingOverflow {
        indicia_max: funding::indicia_max(config),
        postage_mills: config.postage_mills,
    })?;
    prepare_vpsds(
        client,
        config.picker.ids(),
        algorithm,
        funds_mills,
        provider_key,
    )?;
    Ok(())
}

/// The vPSDs of `config` that hold less than the run can spend, with what they hold (in
/// mills): for a run that cannot fund them itself (no provider key).
pub fn underfunded(
    client: &mut Client,
    config: &RunConfig,
) -> Result<Vec<(u64, u64)>, ClientError> {
    let needed = funding::funds_mills(config).unwrap_or(u64::MAX);
    let mut short = Vec::new();
    for vpsd_id in config.picker.ids() {
        let status = client.status(vpsd_id)?;
        if status.descending_mills < needed {
            short.push((vpsd_id, status.descending_mills));
        }
    }
    Ok(short)
}

/// The published keys of the run's vPSDs, for offline verification.
pub fn public_keys(
    client: &mut Client,
    ids: impl Iterator<Item = u64>,
) -> Result<Keys, ClientError> {
    let mut keys = Keys::new();
    for vpsd_id in ids {
        let (algorithm, _, spki) = client.public_key(vpsd_id)?;
        keys.insert(vpsd_id, (algorithm, spki));
    }
    Ok(keys)
}

/// Runs one load and reports it: the appliance's statistics before and after (through an
/// admin connection), its CPU time if `appliance_pid` is given, and the raw signing cost of
/// `algorithm` measured just before.
pub fn measure(
    label: &str,
    config: &RunConfig,
    admin: &Credential,
    algorithm: Algorithm,
    appliance_pid: Option<u32>,
) -> Result<Report, LoadError> {
    let raw_sign = || {
        report::raw_sign_us(algorithm)
            .map_err(|_| LoadError::Protocol("the raw signing measurement failed".into()))
    };
    let raw_sign_before = raw_sign()?;
    let mut control = Client::connect_with(config.addr, admin, config.tls.as_ref())?;
    let keys = public_keys(&mut control, config.picker.ids())?;
    let before = stats(&mut control)?;
    let cpu_before = appliance_pid.and_then(report::process_cpu);
    let started = Instant::now();
    let tally = match config.client {
        run::ClientKind::Raw => run::run(config, &keys)?,
        run::ClientKind::Library { callers, .. } => {
            let (mut tally, pool) = library::run(config, &keys, callers)?;
            tally.library = Some(pool);
            tally
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = appliance_pid.and_then(report::process_cpu);
    let after = stats(&mut control)?;
    let raw_sign_after = raw_sign()?;
    Ok(Report {
        label: label.to_owned(),
        seconds,
        tally,
        expected_errors: config.expected_errors.clone(),
        request_kind: config.request_kind(),
        before,
        after,
        appliance_cpu: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after.saturating_sub(before)),
        raw_sign_us: (raw_sign_before + raw_sign_after) / 2.0,
        raw_sign_before_after_us: (raw_sign_before, raw_sign_after),
    })
}

/// A private CA, the appliance's certificate and the admin's, written into `dir`; the
/// `[tls]` section that uses them and the admin's client settings.
pub fn tls_files(dir: &Path) -> Result<(String, TlsSettings), ClientError> {
    use std::os::unix::fs::OpenOptionsExt;
    let authority = indicia_client::pki::Authority::new("loadgen CA", 1)?;
    let server = authority.server(&["127.0.0.1".into()])?;
    let admin = authority.client("admin")?;
    let write = |name: &str, text: &str, mode: u32| -> Result<PathBuf, ClientError> {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
            .map_err(|source| ClientError::File {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    };
    let ca = write("ca.pem", authority.cert_pem(), 0o644)?;
    let cert = write("server.pem", &server.cert_pem, 0o644)?;
    let key = write("server.key", &server.key_pem, 0o600)?;
    let admin_cert = write("admin.pem", &admin.cert_pem, 0o644)?;
    let admin_key = write("admin.key", &admin.key_pem, 0o600)?;
    let section = format!(
        "[tls]\ncertificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string(),
    );
    let settings = TlsSettings::load(&ca, &admin_cert, &admin_key, "127.0.0.1")?;
    Ok((section, settings))
}
