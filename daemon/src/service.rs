//! The `indiciad` program: flags, logging, signals, sd_notify and the watchdog around
//! [`Server`]. The `indiciad` binary is [`main_with`]; the load generator runs the same
//! code as its appliance process.
//!
//! With no arguments it runs on the embedded default configuration (listen on
//! 127.0.0.1:7450, data in ./indicia-data, one shard per core); on first start it creates
//! the master key, an admin credential and a development provider key in the data
//! directory and says where they are. SIGTERM or SIGINT stops it gracefully (exit 0).
//! Under systemd it reports READY/STOPPING and pings the watchdog.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::server::{self, Server};
use clap::Parser;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};

#[derive(Debug, Parser)]
#[command(
    name = "indiciad",
    version,
    about = "The indicia appliance: signs postage indicia for virtual PSDs"
)]
struct Args {
    /// TOML configuration file (without it: the embedded default).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Data directory (master key, credentials, journals); overrides the config file.
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Address to listen on; overrides the config file.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Number of shards (0: one per core); overrides the config file.
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    #[command(subcommand)]
    command: Option<Tool>,
}

/// Offline tools on a data directory (the appliance itself runs without a subcommand).
#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// The integrity monitor: read the journals read-only and check the chain, checksums,
    /// every invariant and every indicium's signature; with --ledger, reconcile a ledger
    /// file against the journals. Exit status 0 when clean, 1 on any finding.
    Audit {
        /// Reconcile this ledger (JSON lines or CSV, as export-ledger writes it).
        #[arg(long, value_name = "FILE")]
        ledger: Option<PathBuf>,
        /// The master key file, when it is not in the data directory (a credential).
        #[arg(long, value_name = "FILE")]
        master_key: Option<PathBuf>,
        /// With [hsm]: the token's PIN, when not in the credential `pin_credential`.
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write the transaction log (one line per refill, session and withdrawal) for the
    /// provider's accounting system.
    ExportLedger {
        #[arg(long, value_enum, default_value_t = LedgerFormat::Jsonl)]
        format: LedgerFormat,
        /// Where to write it (default: standard output).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        master_key: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
    },
    /// Make the AES key that seals the master key on the HSM token of [hsm]: AES-256,
    /// sensitive, never extractable, labelled `key_label`. Refuses if the label is taken.
    HsmKeygen {
        /// The token's PIN, when not in the credential `pin_credential`.
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
    },
    /// Move the data directory's master key into the HSM of [hsm]: seal it there
    /// (`master.key.hsm`), check that it opens to the same key, and remove `master.key`.
    /// The key itself does not change: journals, sealed vPSD keys and the cluster are as
    /// they were. Safe while the appliance runs; it uses the HSM from its next start.
    Rewrap {
        /// The file master key, when not the data directory's (a credential).
        #[arg(long, value_name = "FILE")]
        master_key: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
        /// Leave the data directory's `master.key` in place (remove it by hand later).
        #[arg(long)]
        keep_file: bool,
    },
}

/// How `export-ledger` writes the ledger (docs/FILES.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LedgerFormat {
    /// One JSON object per line.
    Jsonl,
    /// A header line, then comma-separated values.
    Csv,
}

/// Why `indiciad` (or one of its tools) stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Audit(#[from] crate::store::audit::AuditError),
    #[error(transparent)]
    MasterKey(#[from] crate::datadir::MasterKeyError),
    #[error("HSM: {0}")]
    Hsm(#[from] crate::hsm::HsmError),
    #[error("this tool needs [hsm] in the configuration: the PKCS#11 module, token and key")]
    NoHsm,
    #[error("rewrap: {0}")]
    Rewrap(String),
    #[error(transparent)]
    Exporter(#[from] server::exporter::ExporterError),
    #[error(transparent)]
    Ledger(#[from] crate::store::ledger::LedgerError),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("standard output: {0}")]
    Stdout(std::io::Error),
    #[error("cannot block signals: {0}")]
    Signals(nix::Error),
    #[error("cannot start the signal thread: {0}")]
    SignalThread(std::io::Error),
    #[error("built for FIPS, but aws-lc is not in FIPS mode: {0}")]
    NotFips(&'static str),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("cluster: {0}")]
    Member(String),
}

/// The file that records which cluster member a data directory belongs to; written at its
/// first start in cluster mode (whose vPSDs are then written to etcd, not released).
pub const CLUSTER_MEMBER_FILE: &str = "cluster-member";

/// The check value of the cluster master key that etcd keeps: every appliance of a cluster
/// must bring the same master key (sealed vPSD keys move between them).
pub fn master_check(master_key: &[u8; 32]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, master_key);
    hex::encode(aws_lc_rs::hmac::sign(&key, b"indicia cluster master key check v1").as_ref())
}

/// The membership a data directory records, and whether this is its first start in
/// cluster mode.
#[cfg(feature = "cluster")]
fn cluster_member(
    data: &crate::datadir::DataDir,
    cluster: &crate::config::ClusterConfig,
) -> Result<bool, ServiceError> {
    let path = data.path.join(CLUSTER_MEMBER_FILE);
    let expected = format!(
        "appliance = {:?}\nprefix = {:?}\n",
        cluster.appliance, cluster.prefix
    );
    match std::fs::read_to_string(&path) {
        Ok(text) if text == expected => Ok(false),
        Ok(text) => Err(ServiceError::Member(format!(
            "{} says this data directory belongs to another member ({}), not appliance {:?} \
             under {:?}: an appliance keeps its id for the life of its data directory",
            path.display(),
            text.trim().replace('\n', ", "),
            cluster.appliance,
            cluster.prefix
        ))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(ServiceError::Write { path, source }),
    }
}

/// Connects to etcd and joins the cluster (cluster mode).
#[cfg(feature = "cluster")]
fn join_cluster(
    data: &crate::datadir::DataDir,
    cluster: &crate::config::ClusterConfig,
) -> Result<(Arc<crate::cluster::etcd::Etcd>, bool), ServiceError> {
    let first = cluster_member(data, cluster)?;
    let etcd = crate::cluster::etcd::Etcd::connect(crate::cluster::etcd::EtcdConfig {
        endpoints: cluster.etcd.clone(),
        appliance: cluster.appliance.clone(),
        advertise: cluster.advertise.clone(),
        lease_ttl: Duration::from_secs(cluster.lease_ttl_s),
        prefix: cluster.prefix.clone(),
        master_check: master_check(data.master_key()),
        rebalance: cluster.rebalance,
    })?;
    tracing::info!(
        "cluster: appliance {} joined etcd at {} (lease {} s, prefix {})",
        cluster.appliance,
        cluster.etcd.join(","),
        cluster.lease_ttl_s,
        cluster.prefix
    );
    Ok((Arc::new(etcd), first))
}

/// Records the data directory's membership after its first start in cluster mode.
fn record_membership(
    data: &crate::datadir::DataDir,
    cluster: &crate::config::ClusterConfig,
) -> Result<(), ServiceError> {
    let path = data.path.join(CLUSTER_MEMBER_FILE);
    let text = format!(
        "appliance = {:?}\nprefix = {:?}\n",
        cluster.appliance, cluster.prefix
    );
    indicia_files::write_durable(&path, text.as_bytes()).map_err(|err| ServiceError::Write {
        path: path.clone(),
        source: std::io::Error::other(err.to_string()),
    })
}

/// Exit status of `audit` when it found something.
const EXIT_FINDINGS: u8 = 1;
/// Exit status of a tool that could not run (unreadable data directory, key, ledger).
const EXIT_TOOL_FAILED: u8 = 2;

/// The master key of the config's data directory, for an offline tool: `master_key` (a
/// file) or the `master.key` credential or the directory's own, or with `[hsm]` the HSM.
fn tool_master_key(
    config: &Config,
    master_key: Option<&std::path::Path>,
    pin_file: Option<&std::path::Path>,
) -> Result<zeroize::Zeroizing<[u8; 32]>, ServiceError> {
    let credential = master_key
        .map(PathBuf::from)
        .or_else(server::master_key_credential);
    Ok(crate::datadir::read_master_key(
        std::path::Path::new(&config.data_dir),
        server::key_source(config, credential.as_deref(), pin_file),
    )?)
}

fn audit_report(
    config: &Config,
    master_key: Option<&std::path::Path>,
    pin_file: Option<&std::path::Path>,
) -> Result<crate::store::audit::AuditReport, ServiceError> {
    let key = tool_master_key(config, master_key, pin_file)?;
    Ok(crate::store::audit::audit_data_dir(
        std::path::Path::new(&config.data_dir),
        &key,
        &config.engine_config(),
    )?)
}

/// Runs an offline tool; prints to standard output; returns the exit status.
fn run_tool(config: &Config, tool: Tool) -> Result<u8, ServiceError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let mut print = |text: &str| {
        stdout
            .write_all(text.as_bytes())
            .map_err(ServiceError::Stdout)
    };
    match tool {
        Tool::Audit {
            ledger,
            master_key,
            pin_file,
            json,
        } => {
            let report = audit_report(config, master_key.as_deref(), pin_file.as_deref())?;
            let reconciliation = match &ledger {
                Some(path) => {
                    let lines = crate::store::ledger::read_ledger(path)?;
                    Some(crate::store::ledger::reconcile(&report.ledger(), &lines))
                }
                None => None,
            };
            if json {
                let mut value = report.to_json();
                if let Some(reconciliation) = &reconciliation {
                    value["ledger"] = reconciliation.to_json();
                    // `clean` covers the journals and the ledger together.
                    value["clean"] = (report.is_clean() && reconciliation.is_clean()).into();
                }
                print(&format!("{value}\n"))?;
            } else {
                print(&report.to_text())?;
                if let Some(reconciliation) = &reconciliation {
                    print(&reconciliation.to_text())?;
                }
            }
            let clean = report.is_clean() && reconciliation.as_ref().is_none_or(|r| r.is_clean());
            Ok(if clean { 0 } else { EXIT_FINDINGS })
        }
        Tool::ExportLedger {
            format,
            out,
            master_key,
            pin_file,
        } => {
            let report = audit_report(config, master_key.as_deref(), pin_file.as_deref())?;
            let mut text = String::new();
            if format == LedgerFormat::Csv {
                text.push_str(&crate::store::ledger::LEDGER_COLUMNS.join(","));
                text.push('\n');
            }
            for line in report.ledger() {
                match format {
                    LedgerFormat::Csv => text.push_str(&line.to_csv()),
                    LedgerFormat::Jsonl => text.push_str(&line.to_json().to_string()),
                }
                text.push('\n');
            }
            match &out {
                Some(path) => {
                    std::fs::write(path, &text).map_err(|source| ServiceError::Write {
                        path: path.clone(),
                        source,
                    })?
                }
                None => print(&text)?,
            }
            if !report.is_clean() {
                // The ledger holds what the journal shows; the operator must know it is
                // not clean (run audit for the findings).
                tracing::warn!(
                    "the journal has {} finding(s): run `indiciad audit`",
                    report.findings().count()
                );
            }
            Ok(0)
        }
        Tool::HsmKeygen { pin_file } => {
            let hsm = config.hsm.as_ref().ok_or(ServiceError::NoHsm)?;
            let pin = crate::hsm::read_pin(hsm, pin_file.as_deref())?;
            crate::hsm::Hsm::generate_key(hsm, &pin)?;
            print(&format!(
                "made AES-256 key {:?} on token {:?} (sensitive, never extractable)\n",
                hsm.key_label, hsm.token
            ))?;
            Ok(0)
        }
        Tool::Rewrap {
            master_key,
            pin_file,
            keep_file,
        } => {
            print(&rewrap(
                config,
                master_key.as_deref(),
                pin_file.as_deref(),
                keep_file,
            )?)?;
            Ok(0)
        }
    }
}

/// `indiciad rewrap`: seals the file master key by the HSM key, checks the sealed copy
/// opens to the same key (from disk), and removes the data directory's `master.key`.
fn rewrap(
    config: &Config,
    master_key: Option<&std::path::Path>,
    pin_file: Option<&std::path::Path>,
    keep_file: bool,
) -> Result<String, ServiceError> {
    use crate::hsm::{SealedMasterKey, SEALED_MASTER_KEY_FILE};
    let hsm_config = config.hsm.as_ref().ok_or(ServiceError::NoHsm)?;
    let dir = std::path::Path::new(&config.data_dir);
    let sealed_path = dir.join(SEALED_MASTER_KEY_FILE);
    if sealed_path.exists() {
        return Err(ServiceError::Rewrap(format!(
            "{} exists: this data directory's master key is sealed by an HSM already",
            sealed_path.display()
        )));
    }
    let credential = master_key
        .map(PathBuf::from)
        .or_else(server::master_key_credential);
    let key = crate::datadir::read_master_key(
        dir,
        crate::datadir::KeySource::File(credential.as_deref()),
    )?;
    let hsm = crate::hsm::unlock(hsm_config, pin_file)?;
    let sealed = hsm.seal(&key)?;
    indicia_files::write_private(&sealed_path, sealed.to_text().as_bytes())
        .map_err(crate::datadir::MasterKeyError::from)?;
    // Read back from the disk and opened by the HSM: only then may the file key go.
    let opened = SealedMasterKey::read(&sealed_path)
        .map_err(crate::datadir::MasterKeyError::from)
        .and_then(|sealed| Ok(hsm.unseal(&sealed, &sealed_path)?));
    if !matches!(&opened, Ok(opened) if **opened == *key) {
        let _ = std::fs::remove_file(&sealed_path);
        return Err(ServiceError::Rewrap(format!(
            "{} did not open to the same master key ({}); it was removed and nothing changed",
            sealed_path.display(),
            opened
                .err()
                .map_or("another key".into(), |err| err.to_string())
        )));
    }
    let mut text = format!(
        "sealed the master key (check value {}) by key {:?} on token {:?}: {}\n",
        &master_check(&key)[..16],
        hsm_config.key_label,
        hsm_config.token,
        sealed_path.display()
    );
    let in_dir = dir.join(crate::datadir::MASTER_KEY_FILE);
    if in_dir.exists() && !keep_file {
        std::fs::remove_file(&in_dir).map_err(|source| ServiceError::Write {
            path: in_dir.clone(),
            source,
        })?;
        indicia_files::sync_dir(dir).map_err(crate::datadir::MasterKeyError::from)?;
        text.push_str(&format!("removed {}\n", in_dir.display()));
    }
    text.push_str(
        "the appliance opens the master key with the HSM from its next start; destroy every \
         other copy of the file master key (backups, credentials, LoadCredential= lines)\n",
    );
    Ok(text)
}

fn init_logging() {
    let level = match std::env::var("INDICIA_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    // Under systemd the journal adds its own timestamps.
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        // A closed stderr must not take down the thread that logs (the default reports
        // write errors with eprintln!, which panics when stderr is gone).
        .log_internal_errors(false);
    if under_systemd {
        let _ = builder.without_time().try_init();
    } else {
        let _ = builder.try_init();
    }
}

fn load_config(args: &Args) -> Result<Config, ServiceError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(data_dir) = &args.data_dir {
        config.data_dir.clone_from(data_dir);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    config.validate()?;
    Ok(config)
}

/// SIGTERM and SIGINT are taken by a thread of their own: blocked here, before the
/// executors start, so that every thread inherits the mask.
fn block_signals() -> Result<SigSet, nix::Error> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd there is no socket; that is not an error.
    let _ = sd_notify::notify(state);
}

fn run(args: &Args) -> Result<(), ServiceError> {
    let signals = block_signals().map_err(ServiceError::Signals)?;
    let config = load_config(args)?;
    let data = server::open_data_dir(&config)?;
    if !data.created.is_empty() {
        tracing::info!(
            "first start: initialized data directory {}",
            data.path.display()
        );
        for path in &data.created {
            tracing::info!("  created {}", path.display());
        }
        let provider_key = data.path.join(crate::datadir::PROVIDER_KEY_FILE);
        if data.created.contains(&provider_key) {
            tracing::info!(
                "  development provider key: {} (signs refills; replace provider.pub with the \
                 real provider's key for production)",
                provider_key.display()
            );
        }
    }
    tracing::info!(
        "admin credential: {} (indiciactl --credential)",
        data.path
            .join(crate::datadir::ADMIN_CREDENTIAL_FILE)
            .display()
    );
    let started = Instant::now();
    #[cfg(feature = "cluster")]
    let joined = match &config.cluster {
        Some(cluster) => Some(join_cluster(&data, cluster)?),
        None => None,
    };
    #[cfg(not(feature = "cluster"))]
    let joined: Option<(Arc<dyn crate::cluster::Replicator>, bool)> = None;
    let server = Server::start_in(
        &config,
        &data,
        joined.as_ref().map(|(etcd, import)| server::ClusterStart {
            replicator: Arc::clone(etcd) as Arc<dyn crate::cluster::Replicator>,
            import: *import,
        }),
    )?;
    // The data directory is recorded as a member once every vPSD it imported (its first
    // start in cluster mode) is in etcd: a restart before that imports them again.
    let mut membership_pending = match (&config.cluster, &joined) {
        (Some(cluster), Some((_, true))) => Some(cluster),
        _ => None,
    };
    #[cfg(feature = "cluster")]
    if let Some((etcd, _)) = &joined {
        let control = Arc::clone(server.control());
        etcd.start_takeover(Box::new(move |adoptions| control.adopt(adoptions)))?;
    }
    for (shard, report) in server.recovery().iter().enumerate() {
        if report.records_replayed > 0 || !report.is_clean() {
            tracing::info!(
                shard,
                "recovered {} records ({} indicia) up to sequence {}",
                report.records_replayed,
                report.indicia_replayed,
                report.last_sequence
            );
        }
        if let Some(torn) = &report.torn_tail {
            tracing::warn!(shard, "cut a torn tail: {torn:?}");
        }
        for finding in &report.findings {
            tracing::error!(shard, "journal finding: {finding}");
        }
        for (vpsd, reason) in &report.locked {
            tracing::error!(shard, vpsd, "locked by recovery: {reason}");
        }
        if let Some(reason) = &report.provisioning_blocked {
            tracing::error!(shard, "provisioning blocked: {reason}");
        }
        if let Some(note) = &report.window_note {
            tracing::warn!(shard, "{note}");
        }
        if let Some(cluster) = &report.cluster {
            tracing::info!(
                shard,
                "cluster: {} vPSDs agree with etcd, {} imported",
                cluster.agreed,
                cluster.imported
            );
            for (vpsd, local, theirs) in &cluster.voided {
                tracing::warn!(
                    shard,
                    vpsd,
                    "cluster: local records after version {theirs} (up to {local}) never \
                     reached etcd: void, continuing from etcd's state"
                );
            }
            for (vpsd, local, theirs) in &cluster.behind {
                tracing::warn!(
                    shard,
                    vpsd,
                    "cluster: etcd is ahead of the local journal (version {theirs} against \
                     {local}): continuing from etcd's state; the local history misses the \
                     versions between"
                );
            }
            for (vpsd, owner) in &cluster.released {
                tracing::warn!(
                    shard,
                    vpsd,
                    "cluster: released ({})",
                    if owner.is_empty() {
                        "never replicated"
                    } else {
                        owner.as_str()
                    }
                );
            }
            for (vpsd, reason) in &cluster.locked {
                tracing::error!(shard, vpsd, "cluster: locked: {reason}");
            }
        }
    }
    // The Prometheus endpoint, for as long as the appliance runs; logged before "listening
    // on", so that whoever waits for that line finds its address.
    let _exporter = match &config.metrics {
        Some(metrics) => {
            let exporter = server::exporter::Exporter::start(
                metrics.listen,
                Arc::clone(server.metrics()),
                config.cluster.is_some(),
            )?;
            tracing::info!(
                "metrics: Prometheus endpoint on http://{}/metrics",
                exporter.addr
            );
            Some(exporter)
        }
        None => None,
    };
    let transport = if config.tls.enabled() {
        "mutual TLS 1.3"
    } else {
        "plaintext, as [tls] plaintext allows"
    };
    let shard_ports = match server.shard_ports() {
        [] => String::new(),
        ports => format!(
            " (shard ports {})",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    tracing::info!(
        "indiciad {} listening on {} ({transport}) with {} shards{shard_ports}; data in {} \
         (started in {} ms)",
        env!("CARGO_PKG_VERSION"),
        server.local_addr(),
        server.shards(),
        data.path.display(),
        started.elapsed().as_millis()
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {}", server.local_addr())),
    ]);

    let stop = Arc::new(AtomicBool::new(false));
    let main_thread = std::thread::current();
    {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("indicia-signals".into())
            .spawn(move || {
                let mut first = true;
                while let Ok(signal) = signals.wait() {
                    if signal == Signal::SIGHUP {
                        tracing::warn!("SIGHUP: the configuration is read at start only; ignored");
                        continue;
                    }
                    if !first {
                        tracing::warn!("{signal} again: exiting without draining");
                        std::process::exit(1);
                    }
                    first = false;
                    stop.store(true, Ordering::Release);
                    main_thread.unpark();
                    tracing::info!("{signal}: stopping (send it again to exit at once)");
                }
            })
            .map_err(ServiceError::SignalThread)?;
    }

    // The watchdog is pinged only while every shard's loop keeps turning.
    let watchdog = sd_notify::watchdog_enabled().map(|interval| interval / 2);
    let mut beats = server.control().heartbeats();
    while !stop.load(Ordering::Acquire) {
        if let Some(cluster) = membership_pending {
            if server.control().imports_done() {
                record_membership(&data, cluster)?;
                tracing::info!(
                    "cluster: every local vPSD is in etcd; {} records the membership",
                    data.path.join(CLUSTER_MEMBER_FILE).display()
                );
                membership_pending = None;
            }
        }
        std::thread::park_timeout(watchdog.unwrap_or(Duration::from_secs(1)).min(
            if membership_pending.is_some() {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(3600)
            },
        ));
        if watchdog.is_some() {
            let now = server.control().heartbeats();
            if now.iter().zip(&beats).all(|(now, before)| now > before) {
                notify(&[sd_notify::NotifyState::Watchdog]);
            } else {
                tracing::warn!("a shard's loop has not turned since the last watchdog ping");
            }
            beats = now;
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    server.shutdown();
    server.join()?;
    // Last: the lease is revoked once every answered request is durable (the others
    // take over this appliance's vPSDs at their next sweep).
    drop(joined);
    tracing::info!("stopped: every answered request is durable");
    Ok(())
}

/// Keeps key material out of core dumps and away from other processes of the same user:
/// the process is made non-dumpable (no core file, no ptrace attach without
/// CAP_SYS_PTRACE, /proc/PID/mem and friends owned by root) and its core size limit is 0.
fn harden_process() -> Result<(), nix::Error> {
    nix::sys::prctl::set_dumpable(false)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
}

/// Built with the `fips` feature, the cryptography must run in aws-lc's FIPS 140-3 module:
/// aws-lc checks its own integrity and runs its self-tests when it first starts, and reports
/// FIPS mode only if they passed. Without the feature there is nothing to check.
fn check_fips_mode() -> Result<(), ServiceError> {
    if cfg!(feature = "fips") {
        aws_lc_rs::try_fips_mode().map_err(ServiceError::NotFips)?;
        tracing::info!("cryptography: aws-lc FIPS 140-3 module, in FIPS mode");
    }
    Ok(())
}

/// Runs `indiciad` with these arguments (the program name first) until it is stopped.
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(err) => {
            // Help and version go to stdout with status 0; usage errors exit 2.
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2));
        }
    };
    init_logging();
    // Before any key is read: the master key, and every unsealed vPSD key, live in this
    // process's memory.
    if let Err(err) = harden_process() {
        tracing::error!("cannot make the process non-dumpable: {err}");
        return ExitCode::FAILURE;
    }
    if let Err(err) = check_fips_mode() {
        tracing::error!("{err}");
        return ExitCode::FAILURE;
    }
    if let Some(tool) = args.command {
        let outcome = load_config(&Args {
            command: None,
            ..args
        })
        .and_then(|config| run_tool(&config, tool));
        return match outcome {
            Ok(status) => ExitCode::from(status),
            Err(message) => {
                tracing::error!("{message}");
                ExitCode::from(EXIT_TOOL_FAILED)
            }
        };
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_made_non_dumpable_with_no_core_file() {
        super::harden_process().unwrap();
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
        assert_eq!(
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap(),
            (0, 0)
        );
    }
}
