//! The thread-per-core runtime: one glommio executor per shard, pinned to a core, each
//! listening on the same address (SO_REUSEPORT) and serving the connections that land on
//! it. A request for a vPSD another shard owns crosses over a bounded channel; the answer
//! comes back the same way.
//!
//! Tasks of one shard:
//! - the acceptor (until shutdown),
//! - per connection, a reader (frames in, handshake and access control, dispatch) and a
//!   writer (answers out, in whatever order they become ready),
//! - one receiver per peer shard (requests to run here, answers to deliver here),
//! - the driver: runs the sessions the coalescer has ready, starts a group commit when
//!   none is running (the fdatasync runs on the executor's blocking pool, so the shard
//!   keeps reading and signing meanwhile), and hands out the answers the journal made
//!   durable,
//! - the watch: a heartbeat for the systemd watchdog and the shutdown trigger.
//!
//! The connection tasks are in [`connection`], [`reader`] and [`writer`], over the stream of
//! [`transport`].
//!
//! glommio stays inside this module, so the runtime can be replaced without touching the
//! engine, the journal or the sans-io parts of the server.

mod backup;
mod connection;
mod inflight;
mod peer;
mod reader;
mod route;
mod transport;
mod writer;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use indicia_proto::frame::PROTOCOL_VERSION_MIN;
use indicia_proto::{Request, Response};

use super::handshake::{ClientDirectory, ClientEntry};
use super::local::{Outbox, Signal};
use super::metrics::{Counter, Metrics, Received};
use super::shard::Round;
use super::shard::ShardCore;
use super::{Control, ServerError, ShardReady};
use crate::cluster::Replicator;
use crate::config::ServerConfig;
use crate::store::Store;

/// Where an answer goes: the shard and connection that received the request; and when,
/// for its latency.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    pub(super) shard: u16,
    pub(super) connection: u64,
    pub(super) request_id: u64,
    pub(super) received: Option<Received>,
}

/// What shards send each other.
#[derive(Debug)]
pub(super) enum Cross {
    /// Requests read on the sending shard for vPSDs the receiving shard owns.
    Requests(Vec<Forwarded>),
    /// Answers to requests the receiving shard sent.
    Answers(Vec<(ReplyTo, Response)>),
}

/// An authorized request on its way to the shard that owns its vPSD.
#[derive(Debug)]
pub(super) struct Forwarded {
    pub(super) client: Arc<ClientEntry>,
    pub(super) reply: ReplyTo,
    /// The client's request id (the idempotency key; the frame's, unless another
    /// appliance forwarded the request).
    pub(super) request_id: u64,
    pub(super) request: Request,
    pub(super) arrival: crate::server::shard::Arrival,
}

/// One frame to write.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) request_id: u64,
    /// The header version.
    pub(super) version: u8,
    pub(super) response: Response,
    /// The request it answers, timed from its frame to the write of this answer (None:
    /// the answer is about the connection).
    pub(super) received: Option<Received>,
}

struct ConnectionHandle {
    outbox: Rc<Outbox<Outgoing>>,
    version: Rc<Cell<u8>>,
    fd: RawFd,
}

/// Everything a shard needs to start, built on the main thread.
pub(super) struct ShardSetup {
    pub index: u16,
    pub shards: u16,
    pub cpu: Option<usize>,
    pub listener: OwnedFd,
    /// The shard's own listening socket (`shard_ports`), and every shard's port.
    pub shard_listener: Option<OwnedFd>,
    pub shard_ports: Arc<Vec<u16>>,
    pub open_store: Box<dyn FnOnce() -> Result<Store, ServerError> + Send>,
    pub senders: Vec<Option<shared_channel::SharedSender<Cross>>>,
    pub receivers: Vec<shared_channel::SharedReceiver<Cross>>,
    pub directory: Arc<ClientDirectory>,
    pub metrics: Arc<Metrics>,
    pub control: Arc<Control>,
    pub config: ServerConfig,
    /// Mutual TLS on every connection (None: plaintext, where the config allows it).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub ready: mpsc::Sender<ShardReady>,
    /// Cluster mode: etcd, the replicated half of every commit round.
    pub replicator: Option<Arc<dyn Replicator>>,
    /// Cluster mode without TLS: forwarding to other appliances, as this appliance.
    pub forwarding: Option<Forwarding>,
}

/// How a shard forwards requests to the other appliances of the cluster.
pub(super) struct Forwarding {
    /// This appliance's id, and its secret toward the others.
    pub appliance: String,
    pub secret: zeroize::Zeroizing<[u8; 32]>,
    /// The time limit of one forwarded request.
    pub timeout: Duration,
    /// Mutual TLS toward the others (appliances that use `[tls]`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// The channels of a full mesh between `shards` shards: `senders[from][to]`,
/// `receivers[to]` (one per other shard).
pub(super) type Mesh = (
    Vec<Vec<Option<shared_channel::SharedSender<Cross>>>>,
    Vec<Vec<shared_channel::SharedReceiver<Cross>>>,
);

pub(super) fn mesh(shards: usize, capacity: usize) -> Mesh {
    let mut senders: Vec<Vec<_>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    let mut receivers: Vec<Vec<_>> = (0..shards).map(|_| Vec::new()).collect();
    for (from, row) in senders.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (sender, receiver) = shared_channel::new_bounded(capacity);
                *slot = Some(sender);
                receivers[to].push(receiver);
            }
        }
    }
    (senders, receivers)
}

/// Starts the executor of one shard on its own thread.
pub(super) fn spawn(
    setup: ShardSetup,
) -> Result<glommio::ExecutorJoinHandle<Result<(), ServerError>>, ServerError> {
    let placement = match setup.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    LocalExecutorBuilder::new(placement)
        .name(&format!("indicia-shard-{}", setup.index))
        // Small rings: without CAP_IPC_LOCK, RLIMIT_MEMLOCK caps what all executors
        // together may lock.
        .io_memory(512 << 10)
        .ring_depth(256)
        // How long tasks may run before glommio polls for I/O. The driver yields after
        // every turn, so I/O is polled far more often than this in practice. At 2 ms, about
        // one start in 220 of an overloaded machine (4 appliances starting at once on 2
        // cores) hung for good: an executor parked with its preemption flag set and a task
        // runnable, and woke only to park again. At 20 ms: 0 in 2 000 such starts, and the
        // same throughput and latency (docs/BENCHMARKS.md).
        .preempt_timer(Duration::from_millis(20))
        .spawn(move || run_shard(setup))
        .map_err(|err| ServerError::Runtime(err.to_string()))
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The journal failed: nothing more may be acknowledged; or a bug would leave a request
/// that was read without an answer. Stop the process, saying why; the next start recovers
/// from disk.
pub(super) fn fail_stop(reason: &dyn std::fmt::Display) -> ! {
    tracing::error!("{reason}");
    std::process::exit(70);
}

/// Answers whose connection can no longer take them: counted, not dropped unseen.
pub(super) fn undelivered(shard: &Shard, count: usize, why: &str) {
    shard.metrics.shards[usize::from(shard.index)].add(Counter::AnswersUndelivered, count as u64);
    tracing::debug!(shard = shard.index, count, "answers undelivered: {why}");
}

pub(super) struct Shard {
    index: u16,
    shards: u16,
    core: RefCell<ShardCore<ReplyTo>>,
    directory: Arc<ClientDirectory>,
    rng: SystemRandom,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    config: ServerConfig,
    peers: Vec<Option<ConnectedSender<Cross>>>,
    connections: RefCell<HashMap<u64, ConnectionHandle>>,
    next_connection: Cell<u64>,
    /// Wakes the driver: sessions may be ready, or records may need a flush.
    work: Signal,
    /// Wakes the shutdown sequence when a connection closes.
    connection_closed: Signal,
    flush_in_flight: Cell<bool>,
    /// Cluster mode: etcd.
    pub(super) replicator: Option<Arc<dyn Replicator>>,
    stop_accepting: Signal,
    /// The same, for the shard's own port.
    stop_accepting_shard_port: Signal,
    /// Every shard's own port, by shard (empty without `shard_ports`).
    pub(super) shard_ports: Arc<Vec<u16>>,
    /// Shutdown has begun: connections are being closed.
    stopping: Cell<bool>,
    /// The driver must stop.
    stopped: Cell<bool>,
    /// Requests read from this shard's connections and not yet answered, all connections
    /// together (bounded by `inflight_per_shard`).
    inflight_total: Rc<Cell<usize>>,
    tls: Option<futures_rustls::TlsAcceptor>,
    /// Cluster mode: links to the other appliances, for forwarding (None with TLS).
    links: Option<peer::Peers>,
    /// Cluster mode: the owners of vPSDs this shard routed requests for, as last read.
    owners: RefCell<HashMap<u64, String>>,
    /// Cluster mode: the placement and the number of vPSDs held at the last look for
    /// misplaced vPSDs that found none, and when.
    rebalanced: RefCell<Option<(Arc<crate::cluster::placement::Placement>, usize, Instant)>>,
}

async fn run_shard(setup: ShardSetup) -> Result<(), ServerError> {
    let ShardSetup {
        index,
        shards,
        listener,
        shard_listener,
        shard_ports,
        open_store,
        senders,
        receivers,
        directory,
        metrics,
        control,
        config,
        tls,
        ready,
        replicator,
        forwarding,
        ..
    } = setup;
    let store = match open_store() {
        Ok(store) => store,
        Err(err) => {
            control.done_draining();
            // The start reports the error (this executor's own result is not read then).
            let _ = ready.send(ShardReady::Failed(index, Box::new(err)));
            return Ok(());
        }
    };
    control.set_durable(index, store.durable_sequence());
    // SAFETY: `listener` is an open, listening TCP socket made on the main thread for this
    // shard; ownership of the descriptor passes to glommio's listener here.
    #[allow(unsafe_code)]
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    // SAFETY: as above, the shard's own listening socket (`shard_ports`).
    #[allow(unsafe_code)]
    let shard_listener =
        shard_listener.map(|fd| unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) });
    // Each end of a channel waits for the other to connect: connect all ends at once, or
    // two shards would wait for each other. glommio notices a peer's connection only on a
    // turn of its reactor, so a ticker keeps the reactor turning until all are connected.
    // It yields rather than sleeps, so that the start depends on no timer.
    let connecting = Rc::new(Cell::new(true));
    let ticker = glommio::spawn_local({
        let connecting = Rc::clone(&connecting);
        async move {
            while connecting.get() {
                futures_lite::future::yield_now().await;
            }
        }
    });
    let receiving: Vec<_> = receivers
        .into_iter()
        .map(|receiver| glommio::spawn_local(receiver.connect()))
        .collect();
    let sending: Vec<_> = senders
        .into_iter()
        .map(|sender| sender.map(|sender| glommio::spawn_local(sender.connect())))
        .collect();
    tracing::debug!(shard = index, "store open; connecting to the other shards");
    let mut peers = Vec::with_capacity(sending.len());
    for task in sending {
        peers.push(match task {
            Some(task) => Some(task.await),
            None => None,
        });
    }
    tracing::debug!(shard = index, "senders connected");
    let mut inbound = Vec::with_capacity(receiving.len());
    for task in receiving {
        inbound.push(task.await);
    }
    tracing::debug!(shard = index, "receivers connected");
    connecting.set(false);
    ticker.await;
    let core = ShardCore::with_replicator(store, config.queued_indicia_max, replicator.clone());
    let shard = Rc::new(Shard {
        index,
        shards,
        core: RefCell::new(core),
        directory,
        rng: SystemRandom::new(),
        metrics,
        control,
        config,
        peers,
        connections: RefCell::new(HashMap::new()),
        next_connection: Cell::new(0),
        work: Signal::default(),
        connection_closed: Signal::default(),
        flush_in_flight: Cell::new(false),
        replicator,
        stop_accepting: Signal::default(),
        stop_accepting_shard_port: Signal::default(),
        shard_ports,
        stopping: Cell::new(false),
        stopped: Cell::new(false),
        inflight_total: Rc::new(Cell::new(0)),
        tls: tls.map(futures_rustls::TlsAcceptor::from),
        links: forwarding.map(|forwarding| {
            peer::Peers::new(
                &forwarding.appliance,
                forwarding.secret,
                forwarding.timeout,
                forwarding.tls,
            )
        }),
        owners: RefCell::new(HashMap::new()),
        rebalanced: RefCell::new(None),
    });
    let _ = ready.send(ShardReady::Ready);
    // Dropped now: if another shard fails to start, the main thread sees every sender gone
    // instead of waiting for a report that will never come.
    drop(ready);

    let mut tasks = Vec::new();
    for receiver in inbound {
        tasks.push(glommio::spawn_local(receive(Rc::clone(&shard), receiver)));
    }
    let driver = glommio::spawn_local(drive(Rc::clone(&shard)));
    let watch = glommio::spawn_local(watch(Rc::clone(&shard)));

    // Accept only once every shard serves (the main thread then makes the sockets listen).
    let control = Arc::clone(&shard.control);
    let serve = glommio::executor()
        .spawn_blocking(move || control.gate.wait())
        .await;
    if serve {
        match shard_listener {
            Some(own) => {
                futures_lite::future::zip(
                    accept(&shard, listener, &shard.stop_accepting),
                    accept(&shard, own, &shard.stop_accepting_shard_port),
                )
                .await;
            }
            None => accept(&shard, listener, &shard.stop_accepting).await,
        }
    }
    drain(&shard).await;
    // No more sessions: stop the driver, then make everything appended durable and hand
    // out the last answers.
    shard.stopped.set(true);
    shard.work.notify();
    driver.await;
    final_flush(&shard).await;
    watch.await;
    for task in tasks {
        drop(task);
    }
    Ok(())
}

/// Accepts connections on one listener until `stop`.
async fn accept(shard: &Rc<Shard>, listener: TcpListener, stop: &Signal) {
    loop {
        // The stop signal is polled first: a backlog of connections must not hide it.
        let accepted = futures_lite::future::or(
            async {
                stop.wait().await;
                None
            },
            async { Some(listener.accept().await) },
        )
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(err)) => {
                // EMFILE and friends: keep the shard alive, try again shortly.
                tracing::warn!(shard = shard.index, "accept failed: {err}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let metrics = &shard.metrics.shards[usize::from(shard.index)];
        if shard.connections.borrow().len() >= shard.config.connections_max {
            tracing::warn!(
                shard = shard.index,
                "connection refused: {} connections open (server.connections_max)",
                shard.config.connections_max
            );
            metrics.add(Counter::ConnectionsRefused, 1);
            drop(stream);
            continue;
        }
        metrics.add(Counter::ConnectionsAccepted, 1);
        metrics.add(Counter::ConnectionsOpen, 1);
        let id = shard.next_connection.get();
        shard.next_connection.set(id + 1);
        // Registered before its task runs, so that a shutdown starting now sees it.
        let outbox = Rc::new(Outbox::default());
        let version = Rc::new(Cell::new(PROTOCOL_VERSION_MIN));
        shard.connections.borrow_mut().insert(
            id,
            ConnectionHandle {
                outbox: Rc::clone(&outbox),
                version: Rc::clone(&version),
                fd: stream.as_raw_fd(),
            },
        );
        glommio::spawn_local(connection::serve(
            Rc::clone(shard),
            stream,
            id,
            outbox,
            version,
        ))
        .detach();
        glommio::yield_if_needed().await;
    }
}

/// Stops the shard's connections: every open one stops reading and is closed once its
/// requests are answered; then the shard waits for the others (it keeps serving their
/// requests until every shard has drained).
async fn drain(shard: &Rc<Shard>) {
    shard.stopping.set(true);
    let connections: Vec<RawFd> = shard
        .connections
        .borrow()
        .values()
        .map(|handle| handle.fd)
        .collect();
    for fd in connections {
        // The reader sees end of stream and closes the connection once it is answered.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
    }
    let deadline = Instant::now() + Duration::from_millis(shard.config.drain_timeout_ms);
    while !shard.connections.borrow().is_empty() && Instant::now() < deadline {
        let _ = futures_lite::future::or(
            async {
                shard.connection_closed.wait().await;
            },
            async {
                glommio::timer::sleep(Duration::from_millis(20)).await;
            },
        )
        .await;
    }
    shard.control.done_draining();
    while shard.control.draining.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    if !shard.connections.borrow().is_empty() {
        tracing::warn!(
            shard = shard.index,
            "drain timeout: closing {} connections with requests unanswered",
            shard.connections.borrow().len()
        );
    }
}

/// Makes everything appended durable (the driver has stopped) and hands out the answers.
async fn final_flush(shard: &Rc<Shard>) {
    while shard.flush_in_flight.get() {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    // A round, and in cluster mode a second one for the void records of the first.
    for _ in 0..2 {
        let round = match shard.core.borrow_mut().round() {
            Ok(Some(round)) => round,
            Ok(None) => break,
            Err(fatal) => fail_stop(&fatal),
        };
        let ready = run_round(shard, round).await;
        deliver(shard, ready);
    }
    // Everything is durable and answered: mark the journal closed cleanly, so that damage
    // to its last records is found as corruption at the next start, not cut as a torn tail.
    match shard.core.borrow_mut().close_journal() {
        Ok(sequence) => tracing::debug!(shard = shard.index, sequence, "journal closed"),
        Err(err) => tracing::warn!(
            shard = shard.index,
            "could not mark the journal closed: {err}"
        ),
    }
}

/// Heartbeat for the watchdog, and the shutdown trigger.
async fn watch(shard: Rc<Shard>) {
    let heartbeat = &shard.control.heartbeats[usize::from(shard.index)];
    let mut stopping = false;
    let mut rebalanced = Instant::now();
    while !shard.stopped.get() {
        heartbeat.fetch_add(1, Ordering::Relaxed);
        for (vpsd_id, reason) in shard.control.take_integrity(shard.index) {
            tracing::error!(shard = shard.index, vpsd = vpsd_id, "locked: {reason}");
            shard.metrics.shards[usize::from(shard.index)].add(Counter::IntegrityLocks, 1);
            shard.core.borrow_mut().lock_integrity(vpsd_id, &reason);
        }
        let given_up = {
            let mut core = shard.core.borrow_mut();
            core.give_up_waiting();
            core.take_ready()
        };
        deliver(&shard, given_up);
        publish_cluster(&shard, &shard.core.borrow());
        // Writes etcd is still to get (a first start's imports, a vPSD taken back) go even
        // when no request comes to start a round.
        if !shard.flush_in_flight.get() && shard.core.borrow().round_pending() {
            start_flush(&shard);
        }
        let adoptions = shard.control.take_adoptions(shard.index);
        if !adoptions.is_empty() {
            let now = unix_now();
            let mut core = shard.core.borrow_mut();
            for adoption in adoptions {
                if let Err(fatal) = core.adopt(now, adoption) {
                    fail_stop(&fatal);
                }
            }
            drop(core);
            shard.work.notify();
            route::route_pending(&shard);
        }
        if !stopping && rebalanced.elapsed() >= route::REBALANCE_EVERY {
            rebalanced = Instant::now();
            route::rebalance(&shard);
        }
        if !stopping && shard.control.shutdown.load(Ordering::Acquire) {
            stopping = true;
            shard.stop_accepting.notify();
            shard.stop_accepting_shard_port.notify();
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests and answers from one peer shard.
async fn receive(shard: Rc<Shard>, receiver: ConnectedReceiver<Cross>) {
    while let Some(message) = receiver.recv().await {
        match message {
            Cross::Requests(requests) => {
                let now = unix_now();
                let mut core = shard.core.borrow_mut();
                for Forwarded {
                    client,
                    reply,
                    request_id,
                    request,
                    arrival,
                } in requests
                {
                    if let Err(fatal) =
                        core.handle(now, &client, request_id, request, reply, arrival)
                    {
                        fail_stop(&fatal);
                    }
                }
                drop(core);
                shard.work.notify();
                route::route_pending(&shard);
            }
            Cross::Answers(answers) => deliver_local(&shard, answers),
        }
    }
}

/// The shard's loop: sessions, group commit, answers.
async fn drive(shard: Rc<Shard>) {
    let linger = Duration::from_micros(shard.config.linger_us);
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    loop {
        shard.work.wait().await;
        if shard.stopped.get() {
            return;
        }
        if !linger.is_zero() && shard.core.borrow().has_sessions() {
            glommio::timer::sleep(linger).await;
        }
        let ready = {
            let mut core = shard.core.borrow_mut();
            // About 20 ms of signing per turn at most: readers and flushes run between.
            if let Err(fatal) = core.run_sessions_within(unix_now(), 1024) {
                fail_stop(&fatal);
            }
            let queued = core.queued_indicia();
            let awaiting = core.awaiting();
            metrics.publish(core.stats_mut(), queued, awaiting);
            if core.has_sessions() {
                // More is queued than this turn took: come back after the others ran.
                shard.work.notify();
            }
            core.take_ready()
        };
        start_flush(&shard);
        deliver(&shard, ready);
        route::route_pending(&shard);
        // Let readers and receivers queue more before the next turn.
        futures_lite::future::yield_now().await;
    }
}

/// Starts a commit round of everything appended so far (the group commit, and in cluster
/// mode the replicated writes), unless one is running (the next starts when it completes).
fn start_flush(shard: &Rc<Shard>) {
    if shard.flush_in_flight.get() {
        return;
    }
    let round = match shard.core.borrow_mut().round() {
        Ok(Some(round)) => round,
        Ok(None) => return,
        Err(fatal) => fail_stop(&fatal),
    };
    shard.flush_in_flight.set(true);
    glommio::spawn_local(flush(Rc::clone(shard), round)).detach();
}

/// Copies the shard's cluster counters into the metrics (cluster mode).
fn publish_cluster(shard: &Shard, core: &ShardCore<ReplyTo>) {
    shard.control.set_imports_left(
        shard.index,
        core.store().replica().map_or(0, |book| book.imports_left()),
    );
    shard.metrics.shards[usize::from(shard.index)].publish_cluster(
        core.stats(),
        core.store().replica().map(|book| book.owned()),
        shard
            .replicator
            .as_ref()
            .map(|replicator| replicator.may_change()),
    );
}

/// How long a round waits before the next one when etcd's outcome was unknown or etcd
/// refused it.
const REPLICA_RETRY_PAUSE: Duration = Duration::from_millis(100);

async fn flush(shard: Rc<Shard>, round: Round) {
    let ready = run_round(&shard, round).await;
    shard.flush_in_flight.set(false);
    deliver(&shard, ready);
    // glommio runs a spawned task at once, inside `spawn_local`: a round that completes
    // without waiting (etcd refused it on the spot) would start the next one inside this
    // one, deeper and deeper. Yielding first ends this task before the next begins.
    futures_lite::future::yield_now().await;
    // Records appended while this round ran need the next one.
    start_flush(&shard);
}

/// One commit round: the fdatasync on the executor's blocking pool and the replicated
/// writes on etcd's thread, at the same time; answers leave once both are done. Returns
/// the answers that may leave.
async fn run_round(shard: &Rc<Shard>, round: Round) -> Vec<(ReplyTo, Response)> {
    let started = Instant::now();
    let Round { ticket, writes } = round;
    let local = async {
        match ticket {
            Some(ticket) => {
                let (ticket, result) = glommio::executor()
                    .spawn_blocking(move || {
                        let result = ticket.execute();
                        (ticket, result)
                    })
                    .await;
                (Some(ticket), result)
            }
            None => (None, Ok(())),
        }
    };
    let replicated = async {
        match (&shard.replicator, writes.is_empty()) {
            (Some(replicator), false) => {
                let replicated_started = Instant::now();
                let outcome = replicator.commit(writes).await;
                let metrics = &shard.metrics.shards[usize::from(shard.index)];
                metrics.record_replica(
                    u64::try_from(replicated_started.elapsed().as_micros()).unwrap_or(u64::MAX),
                );
                Some(outcome)
            }
            _ => None,
        }
    };
    let ((ticket, result), replicated) = futures_lite::future::zip(local, replicated).await;
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    if ticket.is_some() {
        metrics.record_commit(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    let (ready, unknown) = {
        let mut core = shard.core.borrow_mut();
        let unknown = match core.complete_round(unix_now(), ticket.as_ref(), result, replicated) {
            Ok(unknown) => unknown,
            Err(fatal) => fail_stop(&fatal),
        };
        if let Some(ticket) = &ticket {
            shard
                .control
                .set_durable(shard.index, ticket.up_to_sequence);
        }
        metrics.set(Counter::AwaitingDurable, core.awaiting() as u64);
        metrics.set(Counter::Flushes, core.stats().flushes);
        publish_cluster(shard, &core);
        if core.has_sessions() {
            // Sessions that ended with this round freed their vPSDs for the next ones.
            shard.work.notify();
        }
        (core.take_ready(), unknown)
    };
    route::route_pending(shard);
    if unknown {
        // etcd did not say, or refused: give it a moment before the writes go again.
        glommio::timer::sleep(REPLICA_RETRY_PAUSE).await;
    }
    ready
}

/// Hands answers to their connections, here or on the shard that received the request.
pub(super) fn deliver(shard: &Rc<Shard>, ready: Vec<(ReplyTo, Response)>) {
    if ready.is_empty() {
        return;
    }
    let mut local = Vec::new();
    let mut remote: HashMap<u16, Vec<(ReplyTo, Response)>> = HashMap::new();
    for (reply, response) in ready {
        if reply.shard == shard.index {
            local.push((reply, response));
        } else {
            remote
                .entry(reply.shard)
                .or_default()
                .push((reply, response));
        }
    }
    deliver_local(shard, local);
    for (to, answers) in remote {
        // Every shard has a sender to every other.
        let Some(Some(sender)) = shard.peers.get(usize::from(to)) else {
            fail_stop(&format!(
                "shard {} has no channel to shard {to} for {} answers",
                shard.index,
                answers.len()
            ));
        };
        match sender.try_send(Cross::Answers(answers)) {
            Ok(()) => {}
            Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(
                Cross::Answers(answers),
            ))) => {
                // The channel is full: wait for room without holding up the driver.
                let shard = Rc::clone(shard);
                glommio::spawn_local(async move {
                    if let Some(Some(sender)) = shard.peers.get(usize::from(to)) {
                        let sent = sender.send(Cross::Answers(answers)).await;
                        answers_not_sent(&shard, to, sent);
                    }
                })
                .detach();
            }
            sent => answers_not_sent(shard, to, sent),
        }
    }
}

/// The outcome of sending answers to the shard that received their requests. That shard
/// stops taking them only once it has stopped, which it does with requests unanswered
/// only after the drain timeout at shutdown: those answers are counted.
fn answers_not_sent(shard: &Shard, to: u16, sent: Result<(), glommio::GlommioError<Cross>>) {
    match sent {
        Ok(()) => {}
        Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(Cross::Answers(
            answers,
        )))) => undelivered(
            shard,
            answers.len(),
            &format!("shard {to} has stopped (drain timeout)"),
        ),
        Err(err) => fail_stop(&format!(
            "answers for shard {to} were lost on their way: {err}"
        )),
    }
}

pub(super) fn deliver_local(shard: &Shard, answers: Vec<(ReplyTo, Response)>) {
    let connections = shard.connections.borrow();
    for (reply, response) in answers {
        // A connection stays registered until every request it read is answered (`serve`
        // waits for that), so its answers always find it.
        let Some(handle) = connections.get(&reply.connection) else {
            fail_stop(&format!(
                "the answer to request {} is for connection {} of shard {}, which is closed",
                reply.request_id, reply.connection, shard.index
            ));
        };
        handle.outbox.push(Outgoing {
            request_id: reply.request_id,
            version: handle.version.get(),
            response,
            received: reply.received,
        });
    }
}
