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
//! glommio stays inside this module, so the runtime can be replaced without touching the
//! engine, the journal or the sans-io parts of the server.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use indicia_proto::frame::{FrameDecoder, FRAME_BYTES_MAX, PROTOCOL_VERSION_MIN};
use indicia_proto::message::opcode;
use indicia_proto::{DecodeError, Decoded, ErrorCode, FrameError, Indicium, Request, Response};

use super::handshake::{Action, ClientDirectory, ClientEntry, Connection};
use super::local::{Outbox, Signal};
use super::metrics::{Counter, Metrics};
use super::shard::{Fatal, ShardCore};
use super::{shard_of, Control, ServerError, ShardReady};
use crate::config::ServerConfig;
use crate::journal::{FlushTicket, Store};

/// Where an answer goes: the shard and connection that received the request.
#[derive(Debug, Clone, Copy)]
pub struct ReplyTo {
    shard: u16,
    connection: u64,
    request_id: u64,
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
    client: Arc<ClientEntry>,
    reply: ReplyTo,
    request: Request,
}

/// Requests a connection has read for other shards, sent in one message per shard after
/// each read (or sooner, before the reader would wait).
struct Forwarder {
    batches: Vec<Vec<Forwarded>>,
    queued: usize,
}

impl Forwarder {
    fn new(shards: u16) -> Self {
        Self {
            batches: (0..shards).map(|_| Vec::new()).collect(),
            queued: 0,
        }
    }

    fn push(&mut self, owner: u16, forwarded: Forwarded) {
        if let Some(batch) = self.batches.get_mut(usize::from(owner)) {
            batch.push(forwarded);
            self.queued += 1;
        }
    }

    async fn flush(&mut self, shard: &Rc<Shard>) {
        if self.queued == 0 {
            return;
        }
        self.queued = 0;
        let metrics = &shard.metrics.shards[usize::from(shard.index)];
        for (owner, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(batch);
            metrics.add(Counter::CrossShardRequests, batch.len() as u64);
            let Some(Some(sender)) = shard.peers.get(owner) else {
                continue;
            };
            if let Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(
                Cross::Requests(batch),
            ))) = sender.send(Cross::Requests(batch)).await
            {
                let refused = batch
                    .into_iter()
                    .map(|forwarded| {
                        let response = Response::error(
                            ErrorCode::ShuttingDown,
                            "the owning shard has stopped",
                        );
                        (forwarded.reply, response)
                    })
                    .collect();
                deliver_local(shard, refused);
            }
        }
    }
}

/// One frame to write: request id, header version, answer.
type Outgoing = (u64, u8, Response);

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
    pub open_store: Box<dyn FnOnce() -> Result<Store, ServerError> + Send>,
    pub senders: Vec<Option<shared_channel::SharedSender<Cross>>>,
    pub receivers: Vec<shared_channel::SharedReceiver<Cross>>,
    pub directory: Arc<ClientDirectory>,
    pub metrics: Arc<Metrics>,
    pub control: Arc<Control>,
    pub config: ServerConfig,
    pub ready: mpsc::Sender<ShardReady>,
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
        // The driver can stay busy signing for a while; check for I/O often.
        .preempt_timer(Duration::from_millis(2))
        .spawn(move || run_shard(setup))
        .map_err(|err| ServerError::Runtime(err.to_string()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The journal failed: nothing more may be acknowledged. Stop the process; the next start
/// recovers from disk.
fn fail_stop(fatal: &Fatal) -> ! {
    tracing::error!("{fatal}");
    std::process::exit(70);
}

struct Shard {
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
    stop_accepting: Signal,
    /// Shutdown has begun: connections are being closed.
    stopping: Cell<bool>,
    /// The driver must stop.
    stopped: Cell<bool>,
}

async fn run_shard(setup: ShardSetup) -> Result<(), ServerError> {
    let ShardSetup {
        index,
        shards,
        listener,
        open_store,
        senders,
        receivers,
        directory,
        metrics,
        control,
        config,
        ready,
        ..
    } = setup;
    let store = match open_store() {
        Ok(store) => store,
        Err(err) => {
            let message = err.to_string();
            control.done_draining();
            let _ = ready.send(ShardReady::Failed(index, message));
            return Err(err);
        }
    };
    // SAFETY: `listener` is an open, listening TCP socket made on the main thread for this
    // shard; ownership of the descriptor passes to glommio's listener here.
    #[allow(unsafe_code)]
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    // Each end of a channel waits for the other to connect: connect all ends at once, or
    // two shards would wait for each other. glommio notices a peer's connection only on a
    // turn of its reactor, so a ticker keeps the reactor turning until all are connected.
    let connecting = Rc::new(Cell::new(true));
    let ticker = glommio::spawn_local({
        let connecting = Rc::clone(&connecting);
        async move {
            while connecting.get() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
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
    let mut peers = Vec::with_capacity(sending.len());
    for task in sending {
        peers.push(match task {
            Some(task) => Some(task.await),
            None => None,
        });
    }
    let mut inbound = Vec::with_capacity(receiving.len());
    for task in receiving {
        inbound.push(task.await);
    }
    connecting.set(false);
    ticker.await;
    let core = ShardCore::new(store, config.queued_indicia_max);
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
        stop_accepting: Signal::default(),
        stopping: Cell::new(false),
        stopped: Cell::new(false),
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

    accept(&shard, listener).await;
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

/// Accepts connections until shutdown.
async fn accept(shard: &Rc<Shard>, listener: TcpListener) {
    loop {
        // The stop signal is polled first: a backlog of connections must not hide it.
        let accepted = futures_lite::future::or(
            async {
                shard.stop_accepting.wait().await;
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
        glommio::spawn_local(serve(Rc::clone(shard), stream, id, outbox, version)).detach();
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
    let ready = {
        let mut core = shard.core.borrow_mut();
        if let Some(ticket) = core.flush_ticket() {
            let result = ticket.execute();
            if let Err(fatal) = core.complete(&ticket, result) {
                fail_stop(&fatal);
            }
        }
        core.take_ready()
    };
    deliver(shard, ready);
}

/// Heartbeat for the watchdog, and the shutdown trigger.
async fn watch(shard: Rc<Shard>) {
    let heartbeat = &shard.control.heartbeats[usize::from(shard.index)];
    let mut stopping = false;
    while !shard.stopped.get() {
        heartbeat.fetch_add(1, Ordering::Relaxed);
        if !stopping && shard.control.shutdown.load(Ordering::Acquire) {
            stopping = true;
            shard.stop_accepting.notify();
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
                    request,
                } in requests
                {
                    if let Err(fatal) = core.handle(now, &client, reply.request_id, request, reply)
                    {
                        fail_stop(&fatal);
                    }
                }
                shard.work.notify();
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
        // Let readers and receivers queue more before the next turn.
        futures_lite::future::yield_now().await;
    }
}

/// Starts a group commit of everything appended so far, unless one is running (the next
/// starts when it completes).
fn start_flush(shard: &Rc<Shard>) {
    if shard.flush_in_flight.get() {
        return;
    }
    let Some(ticket) = shard.core.borrow_mut().flush_ticket() else {
        return;
    };
    shard.flush_in_flight.set(true);
    glommio::spawn_local(flush(Rc::clone(shard), ticket)).detach();
}

async fn flush(shard: Rc<Shard>, ticket: FlushTicket) {
    let started = Instant::now();
    let (ticket, result) = glommio::executor()
        .spawn_blocking(move || {
            let result = ticket.execute();
            (ticket, result)
        })
        .await;
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    metrics.record_commit(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
    let ready = {
        let mut core = shard.core.borrow_mut();
        if let Err(fatal) = core.complete(&ticket, result) {
            fail_stop(&fatal);
        }
        metrics.set(Counter::AwaitingDurable, core.awaiting() as u64);
        metrics.set(Counter::Flushes, core.stats().flushes);
        core.take_ready()
    };
    shard.flush_in_flight.set(false);
    deliver(&shard, ready);
    // Records appended while this flush ran need the next one.
    start_flush(&shard);
}

/// Hands answers to their connections, here or on the shard that received the request.
fn deliver(shard: &Rc<Shard>, ready: Vec<(ReplyTo, Response)>) {
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
        let Some(Some(sender)) = shard.peers.get(usize::from(to)) else {
            continue;
        };
        if let Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(
            Cross::Answers(answers),
        ))) = sender.try_send(Cross::Answers(answers))
        {
            // The channel is full: wait for room without holding up the driver.
            let shard = Rc::clone(shard);
            glommio::spawn_local(async move {
                if let Some(Some(sender)) = shard.peers.get(usize::from(to)) {
                    let _ = sender.send(Cross::Answers(answers)).await;
                }
            })
            .detach();
        }
    }
}

fn deliver_local(shard: &Shard, answers: Vec<(ReplyTo, Response)>) {
    let connections = shard.connections.borrow();
    for (reply, response) in answers {
        // A connection that is gone has no one to tell; a retry with the same request id
        // gets the same answer from the idempotency window.
        if let Some(handle) = connections.get(&reply.connection) {
            handle
                .outbox
                .push((reply.request_id, handle.version.get(), response));
        }
    }
}

/// A TCP stream shared by a connection's reader and writer. Each poll borrows it only for
/// the duration of the poll, so the two never hold it at the same time.
#[derive(Clone)]
struct SharedStream(Rc<RefCell<TcpStream>>);

impl SharedStream {
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)).await
    }

    async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let written =
                poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[written..];
        }
        Ok(())
    }

    async fn close(&self) {
        let _ = poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)).await;
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) {
        let _ = self.0.borrow().set_read_timeout(timeout);
    }
}

/// Requests in flight on one connection: the reader takes one per frame, the writer gives
/// it back when the answer is written.
struct Inflight {
    count: Cell<usize>,
    max: usize,
    changed: Signal,
}

impl Inflight {
    async fn acquire(&self) {
        while self.count.get() >= self.max {
            self.changed.wait().await;
        }
        self.count.set(self.count.get() + 1);
    }

    fn release(&self, n: usize) {
        self.count.set(self.count.get().saturating_sub(n));
        self.changed.notify();
    }

    fn is_full(&self) -> bool {
        self.count.get() >= self.max
    }

    async fn drained(&self) {
        while self.count.get() > 0 {
            self.changed.wait().await;
        }
    }
}

/// One connection: the reader runs here, the writer in its own task.
async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    id: u64,
    outbox: Rc<Outbox<Outgoing>>,
    version: Rc<Cell<u8>>,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(shard.config.write_timeout_ms)));
    let fd = stream.as_raw_fd();
    let stream = SharedStream(Rc::new(RefCell::new(stream)));
    let inflight = Rc::new(Inflight {
        count: Cell::new(0),
        max: shard.config.inflight_per_connection,
        changed: Signal::default(),
    });
    let writer = glommio::spawn_local(write_answers(
        stream.clone(),
        fd,
        Rc::clone(&outbox),
        Rc::clone(&inflight),
    ));
    let cut_off = read_requests(&shard, &stream, &outbox, &version, &inflight, id).await;
    // Every request read gets its answer before the connection closes.
    inflight.drained().await;
    shard.connections.borrow_mut().remove(&id);
    outbox.close();
    writer.await;
    if cut_off {
        // Closing with unread input would reset the connection and could destroy the
        // error frame on its way: end our side first, then discard what the client still
        // sends, briefly.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
        stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        let mut discarded = 0;
        while discarded < (256 << 10) {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }
    stream.close().await;
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    metrics.sub(Counter::ConnectionsOpen, 1);
    shard.connection_closed.notify();
}

async fn write_answers(
    stream: SharedStream,
    fd: RawFd,
    outbox: Rc<Outbox<Outgoing>>,
    inflight: Rc<Inflight>,
) {
    /// Answers are encoded into one buffer and written when it holds this much.
    const WRITE_CHUNK: usize = 256 << 10;
    /// Room kept free for the next answer; a larger one grows the buffer as needed.
    const ANSWER_ROOM: usize = 16 << 10;
    let mut buf: Vec<u8> = Vec::new();
    let mut broken = false;
    while let Some(batch) = outbox.take().await {
        let count = batch.len();
        let mut used = 0;
        for (request_id, version, response) in batch {
            if broken {
                continue;
            }
            if buf.len() - used < ANSWER_ROOM {
                buf.resize(used + ANSWER_ROOM, 0);
            }
            let mut encoded = response.encode_frame(version, request_id, &mut buf[used..]);
            if let Err(indicia_proto::EncodeError::BufferTooSmall { .. }) = encoded {
                // A large answer (a batch): room for the largest frame there is.
                buf.resize(used + FRAME_BYTES_MAX, 0);
                encoded = response.encode_frame(version, request_id, &mut buf[used..]);
            }
            match encoded {
                Ok(len) => used += len,
                Err(err) => {
                    // Every answer the appliance makes fits a frame; if one did not, the
                    // client still gets an answer for its request.
                    tracing::error!("cannot encode an answer: {err}");
                    let fallback = Response::error(ErrorCode::Internal, "answer too large");
                    if let Ok(len) = fallback.encode_frame(version, request_id, &mut buf[used..]) {
                        used += len;
                    }
                }
            }
            if used >= WRITE_CHUNK {
                broken = stream.write_all(&buf[..used]).await.is_err();
                used = 0;
            }
        }
        if !broken && used > 0 {
            broken = stream.write_all(&buf[..used]).await.is_err();
        }
        if broken {
            // The client is gone or does not read (write timeout): stop reading it too.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        if buf.len() > WRITE_CHUNK + FRAME_BYTES_MAX {
            // After a burst of large answers, back to a small buffer.
            buf = Vec::new();
        }
        inflight.release(count);
    }
}

async fn read_requests(
    shard: &Rc<Shard>,
    stream: &SharedStream,
    outbox: &Rc<Outbox<Outgoing>>,
    version: &Rc<Cell<u8>>,
    inflight: &Rc<Inflight>,
    connection_id: u64,
) -> bool {
    /// Read buffer of an idle connection; it grows to hold a large frame, then shrinks.
    const READ_BUFFER: usize = 16 << 10;
    let decoder = FrameDecoder::default();
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    let handshake_timeout = Duration::from_millis(shard.config.handshake_timeout_ms);
    let frame_timeout = Duration::from_millis(shard.config.frame_timeout_ms);
    let handshake_deadline = Instant::now() + handshake_timeout;
    let mut connection = Connection::new();
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    // When the first byte of the frame now arriving came.
    let mut frame_started: Option<Instant> = None;
    let refuse = |request_id: u64, code: ErrorCode, message: String| {
        metrics.connection_error(code);
        outbox.push((request_id, version.get(), Response::error(code, message)));
    };
    let mut forwarder = Forwarder::new(shard.shards);
    loop {
        // Every complete frame in the buffer.
        let mut stop = false;
        loop {
            let frame = match decoder.decode(&buf[start..end]) {
                Ok(Decoded::Frame(frame)) => frame,
                Ok(Decoded::Incomplete { needed }) => {
                    if buf.len() - end < needed {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                        if buf.len() < end + needed {
                            buf.resize(end + needed, 0);
                        }
                    }
                    break;
                }
                Err(err) => {
                    // A bad frame: the stream can no longer be trusted to be aligned.
                    let (code, request_id) = frame_error_answer(&err, &buf[start..end]);
                    if inflight.is_full() {
                        forwarder.flush(shard).await;
                    }
                    inflight.acquire().await;
                    refuse(request_id, code, format!("bad frame: {err}"));
                    stop = true;
                    break;
                }
            };
            let header = frame.header;
            let frame_len = frame.len();
            let body = frame.body;
            if inflight.is_full() {
                // Requests held here would never be answered while we wait: send them.
                forwarder.flush(shard).await;
            }
            inflight.acquire().await;
            // `hello` frames carry version 1 forever (docs/PROTOCOL.md section 4.1).
            let expected_version = if header.opcode == opcode::HELLO {
                PROTOCOL_VERSION_MIN
            } else {
                connection.version()
            };
            if header.version != expected_version {
                refuse(
                    header.request_id,
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "frame version {} on a connection that speaks version {expected_version}",
                        header.version
                    ),
                );
                stop = true;
                break;
            }
            if header.is_response() {
                refuse(
                    header.request_id,
                    ErrorCode::Malformed,
                    "a client sent a response frame".into(),
                );
                stop = true;
                break;
            }
            let request = match Request::decode(header.opcode, body) {
                Ok(request) => request,
                Err(err) => {
                    let code = match err {
                        DecodeError::UnknownOpcode { .. } | DecodeError::WrongDirection { .. } => {
                            ErrorCode::UnknownOpcode
                        }
                        _ => ErrorCode::Malformed,
                    };
                    refuse(header.request_id, code, err.to_string());
                    start += frame_len;
                    continue;
                }
            };
            start += frame_len;
            match connection.on_request(request, &shard.directory, &shard.rng) {
                Action::Reply(response) => {
                    if let Response::Error(body) = &response {
                        metrics.connection_error(body.code);
                    }
                    outbox.push((header.request_id, version.get(), response));
                    version.set(connection.version());
                }
                Action::ReplyAndClose(response) => {
                    if let Response::Error(body) = &response {
                        metrics.connection_error(body.code);
                    }
                    outbox.push((header.request_id, version.get(), response));
                    stop = true;
                    break;
                }
                Action::Dispatch { client, request } => {
                    let reply = ReplyTo {
                        shard: shard.index,
                        connection: connection_id,
                        request_id: header.request_id,
                    };
                    if let Some((owner, forwarded)) = dispatch(shard, client, request, reply) {
                        forwarder.push(owner, forwarded);
                    }
                }
            }
            // A client with many frames buffered must not hold the shard.
            if glommio::executor().need_preempt() {
                forwarder.flush(shard).await;
                glommio::yield_if_needed().await;
            }
        }
        forwarder.flush(shard).await;
        if stop {
            return true;
        }
        if start == end {
            start = 0;
            end = 0;
            frame_started = None;
            if buf.len() > READ_BUFFER {
                buf = vec![0u8; READ_BUFFER];
            }
        } else {
            frame_started.get_or_insert_with(Instant::now);
        }
        // A connection must finish its handshake, and a frame that has begun must arrive
        // whole, within their time limits; an idle authenticated connection may wait.
        let timeout = if connection.client().is_none() {
            Some(
                handshake_deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
        } else {
            // From the frame's first byte, not from the last read: a client trickling
            // bytes does not get to hold a connection open mid-frame.
            frame_started.map(|started| {
                (started + frame_timeout)
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            })
        };
        stream.set_read_timeout(timeout);
        match stream.read(&mut buf[end..]).await {
            Ok(0) => {
                if end > start {
                    inflight.acquire().await;
                    if shard.stopping.get() {
                        refuse(
                            0,
                            ErrorCode::ShuttingDown,
                            "the appliance is shutting down; send the unanswered requests again"
                                .into(),
                        );
                    } else {
                        refuse(
                            0,
                            ErrorCode::Malformed,
                            "the stream ended in the middle of a frame".into(),
                        );
                    }
                    return true;
                }
                return false;
            }
            Ok(n) => end += n,
            Err(err) => {
                if err.kind() == std::io::ErrorKind::TimedOut {
                    let what = if connection.client().is_none() {
                        "the handshake did not complete in time"
                    } else {
                        "a frame did not arrive whole in time"
                    };
                    inflight.acquire().await;
                    refuse(0, ErrorCode::Malformed, what.into());
                    return true;
                }
                return false;
            }
        }
    }
}

/// The code and request id of the error frame sent before closing on a bad frame
/// (docs/PROTOCOL.md section 2.4).
fn frame_error_answer(err: &FrameError, input: &[u8]) -> (ErrorCode, u64) {
    let request_id = || {
        input
            .get(8..16)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    match err {
        FrameError::BadMagic { .. } | FrameError::HeaderChecksum { .. } => {
            (ErrorCode::Malformed, 0)
        }
        FrameError::UnsupportedVersion { .. } => (ErrorCode::UnsupportedVersion, request_id()),
        FrameError::BodyTooLarge { .. } => (ErrorCode::FrameTooLarge, request_id()),
        _ => (ErrorCode::Malformed, request_id()),
    }
}

/// Handles an authorized request here if this shard owns its vPSD (or it needs no
/// owner); otherwise returns it with the shard it must go to.
fn dispatch(
    shard: &Rc<Shard>,
    client: Arc<ClientEntry>,
    request: Request,
    reply: ReplyTo,
) -> Option<(u16, Forwarded)> {
    let owner = match &request {
        Request::Stats => {
            let report = shard.metrics.report();
            deliver_local(shard, vec![(reply, Response::Stats { entries: report })]);
            return None;
        }
        // A malformed indicium names no vPSD; any shard can say so.
        Request::Verify { indicium } => Indicium::decode(indicium).map_or(shard.index, |decoded| {
            shard_of(decoded.payload.vpsd_id, shard.shards)
        }),
        other => other
            .vpsd_id()
            .map_or(shard.index, |vpsd_id| shard_of(vpsd_id, shard.shards)),
    };
    if owner != shard.index {
        return Some((
            owner,
            Forwarded {
                client,
                reply,
                request,
            },
        ));
    }
    let result =
        shard
            .core
            .borrow_mut()
            .handle(unix_now(), &client, reply.request_id, request, reply);
    if let Err(fatal) = result {
        fail_stop(&fatal);
    }
    shard.work.notify();
    None
}
