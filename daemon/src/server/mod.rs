//! The network side of the appliance.
//!
//! - [`handshake`]: one connection's handshake and access control (sans-io).
//! - [`conn_rules`]: one connection's frame rules and clocks around the handshake
//!   (sans-io).
//! - [`coalesce`]: per-vPSD queues and natural batching (sans-io).
//! - [`shard`]: one shard's request handling and the durability rule (sans-io).
//! - [`metrics`]: counters and histograms for the `stats` request.
//! - `runtime`: the thread-per-core server around them (glommio).
//!
//! [`Server::start`] opens the data directory's journals, binds the listeners and starts
//! one executor per shard; [`Server::shutdown`] asks it to stop gracefully and
//! [`Server::join`] waits for that.

pub mod coalesce;
pub mod conn_rules;
pub mod exporter;
pub mod handshake;
mod local;
pub mod metrics;
mod runtime;
pub mod shard;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use indicia_proto::Role;
use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::cluster::{Adoption, Replicator};
use crate::config::{ClientRole, Config, ServerConfig};
use crate::datadir::{self, DataDir, DataDirError};
use crate::engine::{Engine, MasterKey};
use crate::store::{RecoveryReport, Store, StoreError};
use handshake::{ClientDirectory, ClientEntry};
use metrics::Metrics;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("shard {shard}: journal: {source}")]
    Journal { shard: u16, source: StoreError },
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error(transparent)]
    MasterKeySource(#[from] datadir::MasterKeyError),
    #[error("master key: {0}")]
    MasterKey(#[from] crate::engine::keys::KeyError),
    #[error("runtime: {0}")]
    Runtime(String),
    /// A setting that holds alone but not with the rest (the shard count, say).
    #[error("config: {0}")]
    Config(String),
    #[error("shard {0} failed to start: {1}")]
    ShardFailed(u16, Box<ServerError>),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("shard {shard}: checking the journal against the cluster: {source}")]
    Reconcile {
        shard: u16,
        source: crate::store::replica::ReconcileError,
    },
}

/// Cluster mode, for the start: etcd, and whether this is the data directory's first start
/// in the cluster (its vPSDs are then written to etcd rather than released).
#[derive(Debug, Clone)]
pub struct ClusterStart {
    pub replicator: Arc<dyn Replicator>,
    pub import: bool,
}

/// The shard that owns a vPSD. Fixed for the life of a data directory: the journals hold
/// each vPSD in its shard's files, which is why the shard count is recorded there.
pub fn shard_of(vpsd_id: u64, shards: u16) -> u16 {
    indicia_proto::shard_of(vpsd_id, shards)
}

/// State shared by the shards and the thread that controls them.
#[derive(Debug)]
pub struct Control {
    shutdown: AtomicBool,
    /// Shards still closing their own connections.
    draining: AtomicUsize,
    /// Advanced by every shard's loop a few times a second (for the watchdog).
    heartbeats: Vec<AtomicU64>,
    /// Each shard's durable journal sequence, for the background audit.
    durable: Vec<AtomicU64>,
    /// vPSDs the background audit found not to reconcile, for their shard to lock.
    integrity: Vec<std::sync::Mutex<Vec<(u64, String)>>>,
    /// Cluster mode: vPSDs taken over from other appliances, for their shard to adopt.
    adoptions: Vec<std::sync::Mutex<Vec<Adoption>>>,
    /// Cluster mode: each shard's imported vPSDs not yet in etcd (`usize::MAX` until the
    /// shard has said).
    imports_left: Vec<AtomicUsize>,
    /// Every shard serves (or the start failed).
    gate: StartGate,
    /// Hot backups: where the data is, and the master key for the copy's chain and audit.
    backup: crate::store::backup::BackupSource,
}

/// Empties one shard's queue of a [`Control`] mailbox.
fn take_queued<T>(queues: &[std::sync::Mutex<Vec<T>>], shard: u16) -> Vec<T> {
    queues
        .get(usize::from(shard))
        .map_or_else(Vec::new, |queue| {
            std::mem::take(
                &mut *queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        })
}

impl Control {
    /// One shard has closed its connections (or never opened any). Saturating: after a
    /// failed start the count is set to zero so that no shard waits for another.
    fn done_draining(&self) {
        let _ = self
            .draining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            });
    }

    /// Hands vPSDs that do not reconcile to their shard, which locks them.
    pub fn lock_integrity(&self, shard: u16, locks: Vec<(u64, String)>) {
        if let Some(queue) = self.integrity.get(usize::from(shard)) {
            queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(locks);
        }
    }

    /// What the background audit asked this shard to lock.
    fn take_integrity(&self, shard: u16) -> Vec<(u64, String)> {
        take_queued(&self.integrity, shard)
    }

    /// Hands vPSDs taken over from another appliance to the shards that hold them.
    pub fn adopt(&self, adoptions: Vec<Adoption>) {
        let shards = u16::try_from(self.adoptions.len()).unwrap_or(u16::MAX);
        for adoption in adoptions {
            let shard = shard_of(adoption.vpsd_id, shards);
            if let Some(queue) = self.adoptions.get(usize::from(shard)) {
                queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(adoption);
            }
        }
    }

    /// A shard's imported vPSDs not yet in etcd.
    fn set_imports_left(&self, shard: u16, left: usize) {
        if let Some(count) = self.imports_left.get(usize::from(shard)) {
            count.store(left, Ordering::Release);
        }
    }

    /// Whether every shard has every vPSD it imported (a first start in cluster mode) in
    /// etcd.
    pub fn imports_done(&self) -> bool {
        self.imports_left
            .iter()
            .all(|left| left.load(Ordering::Acquire) == 0)
    }

    /// What this shard is to adopt.
    fn take_adoptions(&self, shard: u16) -> Vec<Adoption> {
        take_queued(&self.adoptions, shard)
    }

    fn set_durable(&self, shard: u16, sequence: u64) {
        if let Some(durable) = self.durable.get(usize::from(shard)) {
            durable.fetch_max(sequence, Ordering::AcqRel);
        }
    }

    /// What a hot backup needs.
    fn backup(&self) -> &crate::store::backup::BackupSource {
        &self.backup
    }

    fn durable(&self, shard: u16) -> u64 {
        self.durable
            .get(usize::from(shard))
            .map_or(0, |durable| durable.load(Ordering::Acquire))
    }

    /// A snapshot of every shard's heartbeat counter.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.heartbeats
            .iter()
            .map(|beat| beat.load(Ordering::Relaxed))
            .collect()
    }
}

/// A shard's report at startup.
#[derive(Debug)]
enum ShardReady {
    Ready,
    Failed(u16, Box<ServerError>),
}

/// A running appliance.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shards: u16,
    /// Each shard's own port (empty without `shard_ports`).
    shard_ports: Arc<Vec<u16>>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    recovery: Vec<RecoveryReport>,
    executors: Vec<glommio::ExecutorJoinHandle<Result<(), ServerError>>>,
    /// The background integrity monitor, if configured.
    auditor: Option<std::thread::JoinHandle<()>>,
}

/// The clients the appliance knows: the admin credential of the data directory plus those
/// in the configuration.
pub fn client_directory(config: &Config, data: &DataDir) -> Result<ClientDirectory, ServerError> {
    let mut directory = ClientDirectory::default();
    directory.insert(ClientEntry::new(
        &data.admin.client_id,
        data.admin.secret.clone(),
        Role::Admin,
        [],
    ));
    for client in &config.clients {
        let secret = datadir::load_secret(&client.secret_file)?;
        let role = match client.role {
            ClientRole::User => Role::User,
            ClientRole::Admin => Role::Admin,
        };
        directory.insert(ClientEntry::new(
            &client.id,
            secret,
            role,
            client.vpsds.iter().copied(),
        ));
    }
    if config.cluster.is_some() {
        directory.admit_appliances(data.master_key());
    }
    Ok(directory)
}

/// How shards forward requests to the other appliances (cluster mode): in plaintext, or
/// over mutual TLS when this appliance uses `[tls]` and has its peer certificate. With
/// `[tls]` and no peer certificate, nothing is forwarded (a request for another
/// appliance's vPSD is answered `vpsd-moved`).
fn forwarding(
    config: &Config,
    directory: &ClientDirectory,
    replicator: Option<&dyn Replicator>,
    peer_tls: Option<Arc<rustls::ClientConfig>>,
) -> Option<runtime::Forwarding> {
    let replicator = replicator?;
    let cluster = config.cluster.as_ref()?;
    if config.tls.enabled() && peer_tls.is_none() {
        return None;
    }
    Some(runtime::Forwarding {
        appliance: replicator.appliance().to_owned(),
        secret: directory.appliance_secret(replicator.appliance())?,
        timeout: Duration::from_millis(cluster.forward_timeout_ms),
        tls: peer_tls,
    })
}

/// A TCP socket bound to `addr`, with SO_REUSEPORT when every shard is to have one on the
/// same address. It listens only once every shard serves ([`Server::start`]).
fn bound(addr: SocketAddr, reuse_port: bool) -> Result<Socket, ServerError> {
    let listen_error = |source| ServerError::Listen { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(listen_error)?;
    socket.set_reuse_address(true).map_err(listen_error)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(listen_error)?;
    }
    socket.bind(&addr.into()).map_err(listen_error)?;
    Ok(socket)
}

/// How long a start waits for its address to be free (a process that was just killed may
/// hold its listening sockets for a moment, while the kernel tears down its io_uring rings).
pub const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// The sockets of all shards, bound, not listening yet. A first socket without
/// SO_REUSEPORT checks that nobody holds the address (SO_REUSEPORT alone would let a second
/// appliance share the port and take half of the connections) and picks the port when 0
/// was asked for. While the address is in use it is tried again, for [`LISTEN_WAIT`] at
/// most: a start right after a crash waits for the dead process's sockets to go, and a
/// second appliance on the same address still fails to start.
fn sockets(addr: SocketAddr, shards: u16) -> Result<(SocketAddr, Vec<Socket>), ServerError> {
    let probe = bound_waiting(addr, false)?;
    let addr = probe
        .local_addr()
        .ok()
        .and_then(|bound| bound.as_socket())
        .unwrap_or(addr);
    drop(probe);
    let sockets = (0..shards)
        .map(|_| bound(addr, true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((addr, sockets))
}

/// [`bound`], tried again while the address is in use, for [`LISTEN_WAIT`] at most.
fn bound_waiting(addr: SocketAddr, reuse_port: bool) -> Result<Socket, ServerError> {
    let deadline = std::time::Instant::now() + LISTEN_WAIT;
    let mut logged = false;
    loop {
        match bound(addr, reuse_port) {
            Ok(socket) => return Ok(socket),
            Err(ServerError::Listen { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                if !logged {
                    tracing::warn!(
                        "{addr} is in use ({source}); trying again for up to {} s (a process \
                         that just stopped may still hold it)",
                        LISTEN_WAIT.as_secs()
                    );
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Each shard's own socket, bound, not listening yet (none without `shard_ports`): on the
/// listen address's IP, at `shard_port_base` + the shard's index, or at a port the system
/// picks when the base is 0.
fn shard_sockets(
    listen: SocketAddr,
    shards: u16,
    server: &ServerConfig,
) -> Result<Vec<(SocketAddr, Socket)>, ServerError> {
    if !server.shard_ports {
        return Ok(Vec::new());
    }
    let base = server.shard_port_base;
    if base != 0 {
        let last = u32::from(base) + u32::from(shards) - 1;
        if last > u32::from(u16::MAX)
            || (u32::from(base)..=last).contains(&u32::from(listen.port()))
        {
            return Err(ServerError::Config(format!(
                "server.shard_port_base = {base}: the {shards} shard ports {base}..={last} must \
                 fit below 65536 and leave out the listen port {}",
                listen.port()
            )));
        }
    }
    (0..shards)
        .map(|index| {
            let port = if base == 0 { 0 } else { base + index };
            let socket = bound_waiting(SocketAddr::new(listen.ip(), port), false)?;
            let addr = socket
                .local_addr()
                .ok()
                .and_then(|bound| bound.as_socket())
                .unwrap_or(listen);
            Ok((addr, socket))
        })
        .collect()
}

/// Opened by the main thread once every shard has started (true: their sockets listen,
/// serve) or one has failed (false: stop); each shard waits for it before it accepts.
#[derive(Debug, Default)]
pub struct StartGate {
    state: std::sync::Mutex<Option<bool>>,
    opened: std::sync::Condvar,
}

impl StartGate {
    fn open(&self, serve: bool) {
        *self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(serve);
        self.opened.notify_all();
    }

    /// Blocks until the gate opens; whether to serve.
    fn wait(&self) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(serve) = *state {
                return serve;
            }
            state = self
                .opened
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// The file of a data directory that records its shard count.
pub const LAYOUT_FILE: &str = "layout.toml";

/// `layout.toml`: how many shards the data directory's journals were written with. vPSDs
/// are placed by shard count, so it is fixed at first start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Layout {
    shards: u16,
}

/// Why the data directory's layout does not allow a start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error(
        "cannot read {path}: {source}; it records the shard count the journals were written \
         with. Restore it (`shards = N`, N = the number of shard-NNN directories) or fix its \
         permissions; the appliance does not start without it"
    )]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: {what}; it must hold `shards = N` with N in 1..={max} (N = the number of \
         shard-NNN directories)",
        max = crate::config::SHARDS_MAX
    )]
    Malformed { path: PathBuf, what: String },
    #[error(
        "{path} is missing but the data directory holds {journals} shard journal(s); write \
         `shards = {journals}` into it (if that is the count they were written with) to start"
    )]
    Missing { path: PathBuf, journals: usize },
    #[error(
        "the data directory {path} holds {recorded} shards; it cannot be opened with \
         {configured} (vPSDs live in their shard's journal; resharding is not supported)"
    )]
    Mismatch {
        path: PathBuf,
        recorded: u16,
        configured: usize,
    },
    #[error("{0} shards is too many")]
    TooMany(usize),
    #[error(transparent)]
    Write(#[from] DataDirError),
}

/// The shard count of a data directory: recorded at first start, fixed afterwards. A
/// layout that cannot be read, or is missing beside existing journals, stops the start:
/// writing a new one could place vPSDs on the wrong shards.
fn layout(data: &DataDir, config: &Config) -> Result<u16, LayoutError> {
    let path = data.path.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let malformed = |what: String| LayoutError::Malformed {
                path: path.clone(),
                what,
            };
            let recorded = toml::from_str::<Layout>(&text)
                .map_err(|err| malformed(err.message().to_owned()))?
                .shards;
            if !(1..=crate::config::SHARDS_MAX).contains(&usize::from(recorded)) {
                return Err(malformed(format!("shards = {recorded}")));
            }
            if config.shards != 0 && config.shards != usize::from(recorded) {
                return Err(LayoutError::Mismatch {
                    path: data.path.clone(),
                    recorded,
                    configured: config.shards,
                });
            }
            Ok(recorded)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let journals = journal_dirs(&data.path)?;
            if journals > 0 {
                return Err(LayoutError::Missing { path, journals });
            }
            let configured = config.shard_count();
            let shards = u16::try_from(configured).map_err(|_| LayoutError::TooMany(configured))?;
            let text =
                toml::to_string(&Layout { shards }).map_err(|err| LayoutError::Malformed {
                    path: path.clone(),
                    what: err.to_string(),
                })?;
            datadir::write_synced(
                &path,
                &format!("# Written at first start; vPSDs are placed by shard count.\n{text}"),
            )?;
            Ok(shards)
        }
        Err(source) => Err(LayoutError::Unreadable { path, source }),
    }
}

/// How many `shard-NNN` journal directories a data directory holds.
fn journal_dirs(data_dir: &Path) -> Result<usize, LayoutError> {
    let unreadable = |source| LayoutError::Unreadable {
        path: data_dir.to_owned(),
        source,
    };
    let mut count = 0;
    for entry in std::fs::read_dir(data_dir).map_err(unreadable)? {
        let name = entry.map_err(unreadable)?.file_name();
        if name.to_string_lossy().starts_with("shard-") {
            count += 1;
        }
    }
    Ok(count)
}

impl Server {
    /// Recovers every shard's journal, binds the listeners and starts serving.
    pub fn start(config: &Config, data: &DataDir) -> Result<Self, ServerError> {
        Self::start_in(config, data, None)
    }

    /// [`Server::start`], in cluster mode when `cluster` is set: every shard checks its
    /// journal against etcd before it serves, and every commit round is replicated.
    pub fn start_in(
        config: &Config,
        data: &DataDir,
        cluster: Option<ClusterStart>,
    ) -> Result<Self, ServerError> {
        let shards = layout(data, config)?;
        let directory = Arc::new(client_directory(config, data)?);
        let tls = tls::server_config(&config.tls)?;
        let peer_tls = match config
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.peer_tls())
        {
            Some((certificate, key, ca)) => Some(tls::peer_client_config(certificate, key, ca)?),
            None => {
                if config.cluster.is_some() && config.tls.enabled() {
                    tracing::warn!(
                        "cluster: [tls] without [cluster] peer_certificate: requests for other \
                         appliances' vPSDs are answered vpsd-moved, not forwarded"
                    );
                }
                None
            }
        };
        let (local_addr, mut sockets) = sockets(config.listen, shards)?;
        let shard_sockets = shard_sockets(local_addr, shards, &config.server)?;
        let shard_ports: Arc<Vec<u16>> =
            Arc::new(shard_sockets.iter().map(|(addr, _)| addr.port()).collect());
        let mut shard_fds = shard_sockets
            .iter()
            .map(|(addr, socket)| {
                socket
                    .try_clone()
                    .map(OwnedFd::from)
                    .map_err(|source| ServerError::Listen {
                        addr: *addr,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        sockets.extend(shard_sockets.into_iter().map(|(_, socket)| socket));
        // Each shard gets its own descriptor of its socket; `sockets` keeps one to start
        // listening with once every shard serves.
        let fds = sockets
            .iter()
            .map(|socket| {
                socket
                    .try_clone()
                    .map(OwnedFd::from)
                    .map_err(|source| ServerError::Listen {
                        addr: local_addr,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cpus = allowed_cpus();
        let metrics = Metrics::new(usize::from(shards));
        let control = Arc::new(Control {
            shutdown: AtomicBool::new(false),
            draining: AtomicUsize::new(usize::from(shards)),
            heartbeats: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            durable: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            integrity: (0..shards)
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
            adoptions: (0..shards)
                .map(|_| std::sync::Mutex::new(Vec::new()))
                .collect(),
            imports_left: (0..shards).map(|_| AtomicUsize::new(usize::MAX)).collect(),
            gate: StartGate::default(),
            backup: crate::store::backup::BackupSource::new(
                data.path.clone(),
                data.master_key(),
                config.engine_config(),
            ),
        });
        let (senders, receivers) =
            runtime::mesh(usize::from(shards), config.server.cross_shard_channel);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (report_tx, report_rx) = mpsc::channel::<(u16, RecoveryReport)>();
        let mut executors = Vec::new();
        for (((index, fd), senders), receivers) in (0..shards).zip(fds).zip(senders).zip(receivers)
        {
            // Wiped when the shard's start-up closure is dropped.
            let master = zeroize::Zeroizing::new(*data.master_key());
            let provider = data.provider_public_key;
            let engine_config = config.engine_config();
            let journal_config = config.journal_config();
            let dir = data.shard_dir(index);
            let report_tx = report_tx.clone();
            let replicator = cluster
                .as_ref()
                .map(|cluster| Arc::clone(&cluster.replicator));
            let cluster = cluster.clone();
            let open_store = Box::new(move || {
                let master_key = MasterKey::new(&master).map_err(ServerError::MasterKey)?;
                let engine = Engine::new(engine_config, master_key, provider);
                let (mut store, mut report) =
                    Store::open_shard(&dir, index, &master, journal_config, engine).map_err(
                        |source| ServerError::Journal {
                            shard: index,
                            source,
                        },
                    )?;
                if let Some(cluster) = &cluster {
                    store.enable_replica(cluster.replicator.appliance(), index);
                    let reconciled = crate::store::replica::reconcile(
                        &mut store,
                        cluster.replicator.as_ref(),
                        cluster.import,
                        |vpsd_id| shard_of(vpsd_id, shards) == index,
                        runtime::unix_now(),
                    )
                    .map_err(|source| ServerError::Reconcile {
                        shard: index,
                        source,
                    })?;
                    report.cluster = Some(reconciled);
                }
                let _ = report_tx.send((index, report));
                Ok(store)
            });
            let setup = runtime::ShardSetup {
                index,
                shards,
                // More shards than cores (a test, or an operator's choice) share cores.
                cpu: cpus.get(usize::from(index) % cpus.len().max(1)).copied(),
                listener: fd,
                shard_listener: shard_fds.next(),
                shard_ports: Arc::clone(&shard_ports),
                open_store,
                senders,
                receivers,
                directory: Arc::clone(&directory),
                metrics: Arc::clone(&metrics),
                control: Arc::clone(&control),
                config: config.server.clone(),
                tls: tls.clone(),
                ready: ready_tx.clone(),
                forwarding: forwarding(config, &directory, replicator.as_deref(), peer_tls.clone()),
                replicator,
            };
            // A failure here leaves the shards already started waiting for their peer's
            // channels: the error ends the start, and the process with it.
            executors.push(runtime::spawn(setup)?);
        }
        drop(ready_tx);
        drop(report_tx);
        let mut failure = None;
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(ShardReady::Ready) => {}
                Ok(ShardReady::Failed(shard, error)) => {
                    failure.get_or_insert(ServerError::ShardFailed(shard, error));
                }
                Err(_) => {
                    failure.get_or_insert(ServerError::Runtime(
                        "a shard stopped while starting".into(),
                    ));
                    break;
                }
            }
        }
        let mut auditor = None;
        if failure.is_none() && config.server.audit_interval_s > 0 {
            let shard_dirs = (0..shards)
                .map(|index| (index, data.shard_dir(index)))
                .collect();
            match audit_in_background(
                Arc::clone(&control),
                Arc::clone(&metrics),
                shard_dirs,
                zeroize::Zeroizing::new(*data.master_key()),
                config.engine_config(),
                Duration::from_secs(config.server.audit_interval_s),
                config.server.audit_signatures,
            ) {
                Ok(handle) => auditor = Some(handle),
                Err(err) => failure = Some(err),
            }
        }
        // Every shard has recovered and serves: only now does the port accept connections
        // (before, a client could complete a handshake with a process about to exit).
        if failure.is_none() {
            for socket in &sockets {
                if let Err(source) = socket.listen(1024) {
                    failure.get_or_insert(ServerError::Listen {
                        addr: local_addr,
                        source,
                    });
                }
            }
        }
        drop(sockets);
        control.gate.open(failure.is_none());
        let mut recovery: Vec<(u16, RecoveryReport)> = report_rx.try_iter().collect();
        recovery.sort_by_key(|(shard, _)| *shard);
        let server = Self {
            local_addr,
            shards,
            shard_ports,
            control,
            metrics,
            recovery: recovery.into_iter().map(|(_, report)| report).collect(),
            executors,
            auditor,
        };
        if let Some(err) = failure {
            // The shards that did start must not wait for the one that did not.
            server.control.draining.store(0, Ordering::Release);
            server.shutdown();
            let _ = server.join();
            return Err(err);
        }
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Each shard's own port, by shard (empty without `[server] shard_ports`).
    pub fn shard_ports(&self) -> &[u16] {
        &self.shard_ports
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What recovery found on each shard, in shard order.
    pub fn recovery(&self) -> &[RecoveryReport] {
        &self.recovery
    }

    /// Asks every shard to stop: no new connections, answer what was read, flush, exit.
    pub fn shutdown(&self) {
        self.control.shutdown.store(true, Ordering::Release);
    }

    /// Waits for every shard to stop.
    pub fn join(self) -> Result<(), ServerError> {
        // The monitor sees the shutdown between audits; one under way is read-only and is
        // not waited for (the process may exit under it).
        if let Some(auditor) = self.auditor.filter(std::thread::JoinHandle::is_finished) {
            let _ = auditor.join();
        }
        let mut result = Ok(());
        for executor in self.executors {
            let outcome = match executor.join() {
                Ok(outcome) => outcome,
                Err(err) => Err(ServerError::Runtime(err.to_string())),
            };
            if let Err(err) = outcome {
                if result.is_ok() {
                    result = Err(err);
                }
            }
        }
        result
    }
}

/// The integrity monitor of the running appliance: every `interval`, each shard's journal
/// is audited read-only ([`crate::store::audit::audit_shard`], everything up to the shard's
/// durable sequence must be there and reconcile, every signature is checked), on a thread
/// of its own; a vPSD whose history does not reconcile is handed to its shard, which locks
/// it (no more indicia from it) with the finding as the reason.
fn audit_in_background(
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    shard_dirs: Vec<(u16, PathBuf)>,
    master_key: zeroize::Zeroizing<[u8; 32]>,
    engine_config: crate::engine::EngineConfig,
    interval: Duration,
    check_signatures: bool,
) -> Result<std::thread::JoinHandle<()>, ServerError> {
    std::thread::Builder::new()
        .name("indicia-audit".into())
        .spawn(move || {
            let stopping = || control.shutdown.load(Ordering::Acquire);
            // What was reported already: a finding is logged, and its vPSD handed to the
            // shard, once per run of the process.
            let mut reported = std::collections::HashSet::new();
            // Per shard: the last sequence whose signatures a pass checked.
            let mut verified: std::collections::HashMap<u16, u64> =
                std::collections::HashMap::new();
            // The first audit soon after the start: a lock found by an earlier run and not
            // yet carried by a checkpoint is made again without waiting a whole interval.
            let mut wake = std::time::Instant::now() + interval.min(Duration::from_secs(5));
            loop {
                while std::time::Instant::now() < wake {
                    if stopping() {
                        return;
                    }
                    std::thread::sleep(
                        wake.saturating_duration_since(std::time::Instant::now())
                            .min(Duration::from_millis(200)),
                    );
                }
                wake = std::time::Instant::now() + interval;
                for (shard, dir) in &shard_dirs {
                    if stopping() {
                        return;
                    }
                    let durable = control.durable(*shard);
                    let started = std::time::Instant::now();
                    // With `audit_signatures`, each signature is checked once per run: those
                    // of records after the last pass's end.
                    let signatures_after =
                        check_signatures.then(|| verified.get(shard).copied().unwrap_or(0));
                    match crate::store::audit::audit_shard_with(
                        dir,
                        *shard,
                        &master_key,
                        engine_config.clone(),
                        Some(durable),
                        signatures_after,
                    ) {
                        Ok(audit) => {
                            verified.insert(*shard, audit.report.last_sequence);
                            let report = &audit.report;
                            for finding in &report.findings {
                                if reported.insert((*shard, finding.to_string())) {
                                    tracing::error!(shard, "integrity monitor: {finding}");
                                    if let Some(shard) = metrics.shards.get(usize::from(*shard)) {
                                        shard.add(metrics::Counter::IntegrityFindings, 1);
                                    }
                                }
                            }
                            tracing::info!(
                                shard,
                                records = report.records_replayed,
                                indicia = report.indicia_replayed,
                                signatures = audit.signatures_checked,
                                findings = report.findings.len(),
                                ms = started.elapsed().as_millis() as u64,
                                "integrity monitor: journal audited up to seq {durable}"
                            );
                            let locks: Vec<(u64, String)> = report
                                .locked
                                .iter()
                                .filter(|(id, reason)| {
                                    reported.insert((*shard, format!("lock {id}: {reason}")))
                                })
                                .map(|(id, reason)| (*id, format!("integrity monitor: {reason}")))
                                .collect();
                            if !locks.is_empty() {
                                control.lock_integrity(*shard, locks);
                            }
                        }
                        Err(err) => tracing::error!(shard, "integrity monitor: {err}"),
                    }
                }
            }
        })
        .map_err(|err| ServerError::Runtime(format!("cannot start the integrity monitor: {err}")))
}

/// The CPUs this process may run on (a cpuset or CPUAffinity= can exclude some), in order.
fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|cpu| set.is_set(*cpu).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The data directory named by the config, opened (and initialized on first start). With
/// `[hsm]` the master key is `master.key.hsm`, opened by the HSM with the PIN credential.
/// Else, under systemd, a `master.key` credential (`LoadCredential=`) takes the place of
/// the data directory's master key.
pub fn open_data_dir(config: &Config) -> Result<DataDir, ServerError> {
    let credential = master_key_credential();
    Ok(DataDir::open_with(
        Path::new(&config.data_dir),
        key_source(config, credential.as_deref(), None),
    )?)
}

/// `$CREDENTIALS_DIRECTORY/master.key`, when systemd passed it.
pub fn master_key_credential() -> Option<std::path::PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| Path::new(&dir).join(datadir::MASTER_KEY_FILE))
        .filter(|path| path.exists())
}

/// Where the config's master key comes from: the HSM with `[hsm]` (its PIN from `pin_file`
/// or the credential), else `master_key_file` or the data directory's `master.key`.
pub fn key_source<'a>(
    config: &'a Config,
    master_key_file: Option<&'a Path>,
    pin_file: Option<&'a Path>,
) -> datadir::KeySource<'a> {
    match &config.hsm {
        Some(hsm) => datadir::KeySource::Hsm {
            config: hsm,
            pin_file,
        },
        None => datadir::KeySource::File(master_key_file),
    }
}
