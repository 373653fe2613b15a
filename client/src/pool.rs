//! [`Pool`]: the client for many concurrent callers. One `Pool` is shared by any number of
//! threads (it is `Clone`, `Send` and `Sync`) and by async tasks (on tokio or any other
//! executor); it manages a small set of connections itself.
//!
//! - **Batching.** `sign` calls for the same vPSD that wait at the same moment leave as one
//!   `sign-batch` frame (at most the appliance's `batch_items_max` items); each caller gets
//!   its own indicium or its own error. Under load, the calls that arrive while a
//!   connection is writing form the next frame, so frames grow with the load and no caller
//!   waits for a timer.
//! - **Routing.** The pool asks the appliance for its `topology` and connects to each
//!   shard's own port, so that a vPSD's requests go straight to the shard that owns it and
//!   never cross shards on the appliance. In a cluster it also learns each vPSD's owner
//!   (`cluster-placement`) and sends there (docs/CLUSTER.md section 12.4).
//! - **Retries, charged once.** A frame keeps its request id and its content for life: after
//!   a lost connection it is sent again as it was, and the appliance's idempotency window
//!   answers a request it already carried out with the original answer. `busy` is retried
//!   after a short random wait; `vpsd-moved`, `cluster-unavailable`, `forward-failed` and
//!   `outcome-unknown` are sent again to the owner read anew (at most [`ROUTES_MAX`] sends
//!   in all). A connection on which a frame went unanswered for a whole time limit is given
//!   up; what is left on it goes again on a new one.
//! - **Time limits.** Every call has one ([`PoolBuilder::timeout`]). A call that runs out of
//!   time before its frame was written fails with [`ClientError::TimedOut`] and `sent:
//!   false`: nothing was charged. With `sent: true` the outcome is unknown; the answer, if
//!   it comes, is dropped. A call whose frame was written and whose connection or appliance
//!   then fails for good gets [`ClientError::OutcomeUnknown`]; one that was never written
//!   gets the failure itself. Callers whose calls share a `sign-batch` keep their own
//!   time limits: one that runs out ends its own wait only.
//!
//! ```no_run
//! use indicia_client::{Credential, Pool};
//! use indicia_proto::{MailingDate, SignItem};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let credential = Credential::load("station-7.credential".as_ref())?;
//! let pool = Pool::connect(&["127.0.0.1:7450"], &credential)?;
//! let item = SignItem {
//!     postage_mills: 730,
//!     mailing_date: MailingDate::from_days_since_2000(9_500),
//!     rate_category: 1,
//!     destination_zip: None,
//!     data_digest: None,
//! };
//! // From any number of threads at once: calls for one vPSD leave together.
//! std::thread::scope(|scope| {
//!     for _ in 0..64 {
//!         scope.spawn(|| pool.sign(1001, item));
//!     }
//! });
//! # Ok(())
//! # }
//! ```
//!
//! The same from async code (each future is independent of the runtime; on tokio, call the
//! `_async` methods rather than the blocking ones, which block the worker thread):
//!
//! ```no_run
//! # async fn example(pool: indicia_client::Pool, item: indicia_proto::SignItem)
//! #     -> indicia_client::Result<()> {
//! let indicium = pool.sign_async(1001, item).await?;
//! println!("piece {}", indicium.payload.piece_number);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use indicia_proto::frame::{FrameDecoder, FRAME_BYTES_MAX};
use indicia_proto::message::BATCH_ITEMS_MAX;
use indicia_proto::{
    Decoded, ErrorCode, Indicium, ItemResult, Request, Response, SignItem, Topology, VpsdStatus,
};

use crate::transport::{host_of, ReadHalf, TlsSettings, WriteHalf};
use crate::{Client, ClientError, Credential, Placement, RequestIds, Result, Transport};

/// The most times one frame is sent, in all, when its answers say to look for the owner
/// again (`vpsd-moved`, `cluster-unavailable`, `forward-failed`, `outcome-unknown`); the
/// last such answer is the caller's.
pub const ROUTES_MAX: u32 = 3;

/// How long a connection's TCP, TLS and protocol handshakes may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect back-off: the first wait, and the longest.
const RECONNECT_FIRST: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// `busy`: the first wait before the frame goes again, and the longest.
const BUSY_FIRST: Duration = Duration::from_millis(2);
const BUSY_MAX: Duration = Duration::from_millis(200);
/// How often a connection's writer looks for calls past their time limit.
const EXPIRY_EVERY: Duration = Duration::from_millis(10);

/// What a [`Pool`] did, since it was built (for tests, and for the load generator).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls made (each `sign` is one).
    pub calls: u64,
    /// Request frames written, first sends and resends.
    pub frames_sent: u64,
    /// `sign-batch` frames made from several `sign` calls, and the calls they carried.
    pub batches: u64,
    pub batched_calls: u64,
    /// Frames written again: after a lost connection, `busy`, or to another owner.
    pub resends: u64,
    /// Connections opened (the first ones included).
    pub connections: u64,
    /// Frames answered `busy` (each sent again later).
    pub busy: u64,
    /// Frames sent to an owner read anew.
    pub reroutes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    frames_sent: AtomicU64,
    batches: AtomicU64,
    batched_calls: AtomicU64,
    resends: AtomicU64,
    connections: AtomicU64,
    busy: AtomicU64,
    reroutes: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PoolStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        PoolStats {
            calls: get(&self.calls),
            frames_sent: get(&self.frames_sent),
            batches: get(&self.batches),
            batched_calls: get(&self.batched_calls),
            resends: get(&self.resends),
            connections: get(&self.connections),
            busy: get(&self.busy),
            reroutes: get(&self.reroutes),
        }
    }
}

/// Builds a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    seeds: Vec<String>,
    credential: Credential,
    tls: Option<TlsSettings>,
    timeout: Duration,
    batching: bool,
    shard_aware: bool,
    frames_in_flight_max: usize,
    frames_per_vpsd_max: usize,
}

impl PoolBuilder {
    /// Mutual TLS toward every appliance (its server name is checked on every address the
    /// pool connects to; shard ports share their appliance's certificate).
    pub fn tls(mut self, tls: Option<TlsSettings>) -> Self {
        self.tls = tls;
        self
    }

    /// The time limit of each call, from the call to its answer (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether `sign` calls waiting together for one vPSD leave as one `sign-batch` (default
    /// true). Off, every call is a frame of its own.
    pub fn batching(mut self, batching: bool) -> Self {
        self.batching = batching;
        self
    }

    /// Whether to connect to each shard's own port (default true). Off, every request goes
    /// to the appliance's main port, and the appliance passes it to the owning shard.
    pub fn shard_aware(mut self, shard_aware: bool) -> Self {
        self.shard_aware = shard_aware;
        self
    }

    /// The most request frames one connection has unanswered (default 1 024, the
    /// appliance's default `inflight_per_connection`); further frames wait in the pool.
    pub fn frames_in_flight_max(mut self, frames: usize) -> Self {
        self.frames_in_flight_max = frames.max(1);
        self
    }

    /// The most frames of `sign` calls for one vPSD that one connection has unanswered
    /// (default 2). The appliance signs a vPSD's sessions one after the other, each after
    /// the previous one's commit: a third frame would only wait there, while in the pool
    /// more calls join it. 0 means no limit.
    pub fn frames_per_vpsd_max(mut self, frames: usize) -> Self {
        self.frames_per_vpsd_max = if frames == 0 { usize::MAX } else { frames };
        self
    }

    /// Connects to the first seed that answers, authenticates, and learns whether it is a
    /// cluster and how it is sharded. Fails if no seed can be reached or the credential is
    /// refused.
    pub fn build(self) -> Result<Pool> {
        if self.seeds.is_empty() {
            return Err(ClientError::Protocol(
                "a pool needs at least one address".into(),
            ));
        }
        let (router, routed) = mpsc::channel();
        let inner = Arc::new(Inner {
            options: self,
            ids: AtomicU64::new(RequestIds::random()?.next_id()),
            routes: Mutex::new(Routes::default()),
            links: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            closed: AtomicBool::new(false),
            router: Mutex::new(Some(router)),
        });
        {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("indicia-pool-router".into())
                .spawn(move || route_loop(&inner, &routed))
                .map_err(ClientError::Io)?;
        }
        let pool = Pool {
            handle: Arc::new(Handle {
                inner: Arc::clone(&inner),
            }),
        };
        futures_lite::future::block_on(inner.discover())?;
        Ok(pool)
    }
}

/// A thread-safe client of one appliance or of a cluster, over connections it manages (see
/// the module's documentation).
#[derive(Debug, Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

/// Closes the pool's connections when the last [`Pool`] clone is dropped.
#[derive(Debug)]
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Pool {
    /// A builder with the defaults: `seeds` are appliance addresses (`host:port`); one is
    /// enough, of any appliance of a cluster.
    pub fn builder<S: AsRef<str>>(seeds: &[S], credential: &Credential) -> PoolBuilder {
        PoolBuilder {
            seeds: seeds.iter().map(|seed| seed.as_ref().to_owned()).collect(),
            credential: credential.clone(),
            tls: None,
            timeout: Duration::from_secs(10),
            batching: true,
            shard_aware: true,
            frames_in_flight_max: 1024,
            frames_per_vpsd_max: 2,
        }
    }

    /// A pool with the defaults, in plaintext.
    pub fn connect<S: AsRef<str>>(seeds: &[S], credential: &Credential) -> Result<Self> {
        Self::builder(seeds, credential).build()
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// What the pool did so far.
    pub fn stats(&self) -> PoolStats {
        self.inner().counters.snapshot()
    }

    /// Signs one indicium (batched with other callers' signs for the same vPSD).
    pub fn sign(&self, vpsd_id: u64, item: SignItem) -> Result<Indicium> {
        futures_lite::future::block_on(self.sign_async(vpsd_id, item))
    }

    /// [`Pool::sign`], as a future.
    pub async fn sign_async(&self, vpsd_id: u64, item: SignItem) -> Result<Indicium> {
        let inner = self.inner();
        Counters::add(&inner.counters.calls, 1);
        let slot = Slot::new();
        let waiter = Waiter {
            slot: Arc::clone(&slot),
            deadline: deadline_after(inner.options.timeout),
        };
        match inner.target(vpsd_id).await {
            Ok(target) => inner
                .link(&target)?
                .submit_sign(inner.next_id(), vpsd_id, item, waiter),
            Err(err) => {
                slot.complete(Err(not_sent(err)));
            }
        }
        match Completion(slot).await? {
            Response::Signed { indicium } => Ok(indicium),
            other => Err(crate::unexpected("sign", &other)),
        }
    }

    /// Sends any request (to its vPSD's owner and shard, if it names one) and returns the
    /// answer; an `error` answer is `Ok(Response::Error(..))`. A `sign-batch` given here
    /// leaves as it is, never merged with other calls.
    pub fn call(&self, request: Request) -> Result<Response> {
        futures_lite::future::block_on(self.call_async(request))
    }

    /// [`Pool::call`], as a future.
    pub async fn call_async(&self, request: Request) -> Result<Response> {
        let inner = self.inner();
        Counters::add(&inner.counters.calls, 1);
        inner.call(request).await
    }

    /// Calls, turning an `error` answer into [`ClientError::Refused`].
    fn call_ok(&self, request: Request) -> Result<Response> {
        match self.call(request)? {
            Response::Error(body) => Err(ClientError::Refused(body)),
            response => Ok(response),
        }
    }

    /// Signs several indicia for one vPSD in one request; one result per item.
    pub fn sign_batch(&self, vpsd_id: u64, items: Vec<SignItem>) -> Result<Vec<ItemResult>> {
        crate::answer::batch(self.call_ok(Request::SignBatch { vpsd_id, items })?)
    }

    /// A vPSD's registers and state.
    pub fn status(&self, vpsd_id: u64) -> Result<VpsdStatus> {
        crate::answer::status(self.call_ok(Request::Status { vpsd_id })?)
    }

    /// Provisions, refills, contacts, locks, unlocks or rotates: every request answered
    /// with the vPSD's status.
    pub fn change(&self, request: Request) -> Result<VpsdStatus> {
        crate::answer::status(self.call_ok(request)?)
    }

    /// The public key of one serial of a vPSD (`None`: the current one): its algorithm,
    /// serial and SubjectPublicKeyInfo (DER).
    pub fn public_key_of(
        &self,
        vpsd_id: u64,
        key_serial: Option<u32>,
    ) -> Result<(indicia_proto::Algorithm, u32, Vec<u8>)> {
        crate::answer::public_key(self.call_ok(Request::PublicKey {
            vpsd_id,
            key_serial,
        })?)
    }

    /// Withdraws a vPSD (admin): its refund, and its status after.
    pub fn withdraw(&self, vpsd_id: u64) -> Result<(u64, VpsdStatus)> {
        crate::answer::withdrawn(self.call_ok(Request::Withdraw { vpsd_id })?)
    }

    /// How the appliance at `address` (one the pool knows, or a seed) is sharded.
    pub fn topology(&self, address: &str) -> Result<Option<Topology>> {
        futures_lite::future::block_on(self.inner().topology(address))
    }

    /// The appliance and shard each of these vPSDs' requests go to now, as the pool knows
    /// it (after asking where it did not know).
    pub fn route_of(&self, vpsd_id: u64) -> Result<(String, Option<u16>)> {
        let target = futures_lite::future::block_on(self.inner().target(vpsd_id))?;
        Ok((target.address, target.shard))
    }
}

/// Where a frame goes: an appliance, and one of its shards' own ports (None: its main
/// port).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Target {
    address: String,
    shard: Option<u16>,
}

#[derive(Debug, Default)]
struct Routes {
    /// Whether the appliances form a cluster (None: not known yet).
    cluster: Option<bool>,
    /// Where vPSDs go when there is no cluster: the seed that answered.
    single: Option<String>,
    /// Each vPSD's owner (appliance id), as last read.
    owners: HashMap<u64, String>,
    /// Each live appliance's address, as last read.
    addresses: HashMap<String, String>,
    /// How each appliance is sharded, by address (None: it does not say).
    topologies: HashMap<String, Option<Topology>>,
}

struct Inner {
    options: PoolBuilder,
    /// The next request id (never 0).
    ids: AtomicU64,
    routes: Mutex<Routes>,
    links: Mutex<HashMap<Target, Arc<Link>>>,
    counters: Counters,
    closed: AtomicBool,
    /// Frames to send to an owner read anew (None once closed: the router then stops).
    router: Mutex<Option<mpsc::Sender<Frame>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("seeds", &self.options.seeds)
            .field("links", &lock(&self.links).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn next_id(&self) -> u64 {
        loop {
            // 0 is the appliance's id for errors about the connection.
            let id = self.ids.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // The router's channel ends: it stops.
        lock(&self.router).take();
        let links: Vec<Arc<Link>> = lock(&self.links).values().cloned().collect();
        for link in links {
            link.close();
        }
    }

    /// The connection to `target`, started if need be.
    fn link(self: &Arc<Self>, target: &Target) -> Result<Arc<Link>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let mut links = lock(&self.links);
        // Again under the lock: `close` takes the links under it after setting `closed`.
        if self.closed.load(Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(link) = links.get(target) {
            return Ok(Arc::clone(link));
        }
        let batch_items_max = if self.options.batching {
            lock(&self.routes)
                .topologies
                .get(&target.address)
                .and_then(Option::as_ref)
                .map_or(BATCH_ITEMS_MAX, |topology| {
                    usize::from(topology.batch_items_max)
                })
        } else {
            1
        };
        let link = Arc::new(Link {
            target: target.clone(),
            state: Mutex::new(LinkState {
                batch_items_max,
                ..LinkState::default()
            }),
            wake: Condvar::new(),
        });
        let writer = {
            let inner = Arc::clone(self);
            let link = Arc::clone(&link);
            move || write_loop(&inner, &link)
        };
        std::thread::Builder::new()
            .name("indicia-pool-writer".into())
            .spawn(writer)
            .map_err(ClientError::Io)?;
        links.insert(target.clone(), Arc::clone(&link));
        Ok(link)
    }

    /// Sends one request as a frame of its own and waits for its answer.
    async fn call(self: &Arc<Self>, request: Request) -> Result<Response> {
        let slot = Slot::new();
        let waiter = Waiter {
            slot: Arc::clone(&slot),
            deadline: deadline_after(self.options.timeout),
        };
        let target = match routing_vpsd(&request) {
            Some(vpsd_id) => self.target(vpsd_id).await,
            None => self.any_appliance(),
        };
        match target {
            Ok(target) => {
                let frame = Frame::single(self.next_id(), request, waiter);
                self.link(&target)?.submit_frame(frame);
            }
            Err(err) => {
                slot.complete(Err(not_sent(err)));
            }
        }
        Completion(slot).await
    }

    /// A request about no vPSD goes to the main port of an appliance it knows.
    fn any_appliance(&self) -> Result<Target> {
        let routes = lock(&self.routes);
        let mut known: Vec<&String> = routes.addresses.values().collect();
        known.sort();
        let address = routes
            .single
            .as_ref()
            .or(known.first().copied())
            .or(self.options.seeds.first())
            .cloned()
            .ok_or_else(|| ClientError::Protocol("no appliance to send to".into()))?;
        Ok(Target {
            address,
            shard: None,
        })
    }

    /// Learns, from the first seed that answers, whether there is a cluster, and the
    /// topology of the appliance it reached.
    async fn discover(self: &Arc<Self>) -> Result<()> {
        let mut last = ClientError::Closed;
        for seed in self.options.seeds.clone() {
            match self.placement_at(&seed, Vec::new()).await {
                Ok(placement) => {
                    let cluster = !placement.appliances.is_empty();
                    {
                        let mut routes = lock(&self.routes);
                        routes.cluster = Some(cluster);
                        if !cluster {
                            routes.single = Some(seed.clone());
                        }
                        learn(&mut routes, &placement);
                    }
                    if !cluster {
                        self.topology(&seed).await?;
                    }
                    return Ok(());
                }
                // The client itself is refused: every appliance would say the same.
                Err(ClientError::Refused(body))
                    if matches!(
                        body.code,
                        ErrorCode::Forbidden
                            | ErrorCode::NotAuthenticated
                            | ErrorCode::InvalidArgument
                    ) =>
                {
                    return Err(ClientError::Refused(body))
                }
                // This one cannot answer now (cut off from etcd, say): another may.
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// Asks the appliance at `address` where these vPSDs are.
    async fn placement_at(
        self: &Arc<Self>,
        address: &str,
        vpsd_ids: Vec<u64>,
    ) -> Result<Placement> {
        let slot = Slot::new();
        let waiter = Waiter {
            slot: Arc::clone(&slot),
            deadline: deadline_after(self.options.timeout),
        };
        let frame = Frame::single(
            self.next_id(),
            Request::ClusterPlacement { vpsd_ids },
            waiter,
        );
        let target = Target {
            address: address.to_owned(),
            shard: None,
        };
        // A request about no vPSD: never rerouted.
        self.link(&target)?.submit_frame(frame);
        match Completion(slot).await? {
            Response::Placement { appliances, vpsds } => Ok(Placement { appliances, vpsds }),
            other => Err(crate::unexpected("cluster-placement", &other)),
        }
    }

    /// The appliance at `address`'s topology, asked once and remembered. None: it has no
    /// shard ports, or does not know the request (an older appliance).
    async fn topology(self: &Arc<Self>, address: &str) -> Result<Option<Topology>> {
        if let Some(known) = lock(&self.routes).topologies.get(address) {
            return Ok(known.clone());
        }
        let slot = Slot::new();
        let waiter = Waiter {
            slot: Arc::clone(&slot),
            deadline: deadline_after(self.options.timeout),
        };
        let frame = Frame::single(self.next_id(), Request::Topology, waiter);
        let target = Target {
            address: address.to_owned(),
            shard: None,
        };
        self.link(&target)?.submit_frame(frame);
        let topology = match Completion(slot).await? {
            Response::Topology(topology) if !topology.ports.is_empty() => Some(topology),
            Response::Topology(_) => None,
            // An appliance from before `topology`.
            Response::Error(body)
                if matches!(body.code, ErrorCode::Malformed | ErrorCode::UnknownOpcode) =>
            {
                None
            }
            other => return Err(crate::unexpected("topology", &other)),
        };
        lock(&self.routes)
            .topologies
            .insert(address.to_owned(), topology.clone());
        Ok(topology)
    }

    /// Where `vpsd_id`'s requests go: its owner (asked for if not known), and the shard
    /// that holds it there.
    /// In a cluster, an owner remembered that does not answer (drained and stopped since,
    /// or gone) is forgotten and the vPSD's owner asked for again, once.
    async fn target(self: &Arc<Self>, vpsd_id: u64) -> Result<Target> {
        let mut tries = 0;
        loop {
            tries += 1;
            let address = self.owner_address(vpsd_id).await?;
            if !self.options.shard_aware {
                return Ok(Target {
                    address,
                    shard: None,
                });
            }
            match self.topology(&address).await {
                Ok(topology) => {
                    let shard =
                        topology.map(|topology| indicia_proto::shard_of(vpsd_id, topology.shards));
                    return Ok(Target { address, shard });
                }
                Err(ClientError::Unreachable(_)) if tries < 2 && self.in_cluster() => {
                    self.forget_owner(vpsd_id);
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn owner_address(self: &Arc<Self>, vpsd_id: u64) -> Result<String> {
        {
            let routes = lock(&self.routes);
            if let Some(single) = &routes.single {
                return Ok(single.clone());
            }
            if let Some(address) = routes
                .owners
                .get(&vpsd_id)
                .and_then(|owner| routes.addresses.get(owner))
            {
                return Ok(address.clone());
            }
        }
        // Not known: ask any appliance (the known ones first, then the seeds).
        let mut candidates: Vec<String> = lock(&self.routes).addresses.values().cloned().collect();
        candidates.sort();
        for seed in &self.options.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last = ClientError::Closed;
        for address in candidates {
            match self.placement_at(&address, vec![vpsd_id]).await {
                Ok(placement) => {
                    let mut routes = lock(&self.routes);
                    learn(&mut routes, &placement);
                    // Owned, or where placement would put it (a provision's vPSD).
                    let placed = placement
                        .vpsds
                        .first()
                        .and_then(|placed| routes.addresses.get(&placed.appliance));
                    if let Some(address) = placed {
                        return Ok(address.clone());
                    }
                    if placement.appliances.is_empty() {
                        // Not a cluster after all (an appliance replaced by a single one).
                        routes.single = Some(address.clone());
                        return Ok(address);
                    }
                    last = ClientError::Protocol(format!("no appliance owns vPSD {vpsd_id}"));
                }
                Err(ClientError::Refused(body))
                    if matches!(body.code, ErrorCode::Forbidden | ErrorCode::InvalidArgument) =>
                {
                    return Err(ClientError::Refused(body))
                }
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// Forgets where `vpsd_id` is (its owner answered that it is not, or is unreachable).
    fn forget_owner(&self, vpsd_id: u64) {
        lock(&self.routes).owners.remove(&vpsd_id);
    }

    fn in_cluster(&self) -> bool {
        lock(&self.routes).cluster == Some(true)
    }

    /// Hands a frame to the router, to go to its vPSD's owner read anew.
    fn reroute(&self, frame: Frame) {
        let sent = match lock(&self.router).as_ref() {
            Some(router) => router.send(frame),
            None => Err(mpsc::SendError(frame)),
        };
        if let Err(mpsc::SendError(frame)) = sent {
            frame.fail(|| ClientError::Closed);
        }
    }
}

/// The vPSD whose owner and shard a request goes to: the one it names, or for `verify` the
/// one the indicium names (its keys are there).
fn routing_vpsd(request: &Request) -> Option<u64> {
    match request {
        Request::Verify { indicium } => Indicium::decode(indicium)
            .ok()
            .map(|decoded| decoded.payload.vpsd_id),
        other => other.vpsd_id(),
    }
}

/// When a call made now runs out of time (far in the future for a limit too large to add).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// A failure to find where a call goes: the call itself was never written.
fn not_sent(err: ClientError) -> ClientError {
    match err {
        ClientError::TimedOut { .. } => ClientError::TimedOut { sent: false },
        ClientError::OutcomeUnknown(why) => ClientError::Unreachable(why),
        other => other,
    }
}

fn learn(routes: &mut Routes, placement: &Placement) {
    if !placement.appliances.is_empty() {
        routes.cluster = Some(true);
        routes.single = None;
        routes.addresses = placement.appliances.iter().cloned().collect();
    }
    for vpsd in &placement.vpsds {
        if vpsd.owned && !vpsd.appliance.is_empty() {
            routes.owners.insert(vpsd.vpsd_id, vpsd.appliance.clone());
        } else {
            routes.owners.remove(&vpsd.vpsd_id);
        }
    }
}

/// The router: frames whose vPSD must be found again (one at a time; each waits at most
/// for its callers' time limits).
fn route_loop(inner: &Arc<Inner>, frames: &mpsc::Receiver<Frame>) {
    while let Ok(mut frame) = frames.recv() {
        if inner.closed.load(Ordering::Acquire) {
            frame.fail(|| ClientError::Closed);
            continue;
        }
        frame.expire(Instant::now());
        if frame.abandoned() {
            continue;
        }
        let Some(vpsd_id) = frame.vpsd_id else {
            frame.fail(|| ClientError::Closed);
            continue;
        };
        inner.forget_owner(vpsd_id);
        let target = futures_lite::future::block_on(inner.target(vpsd_id));
        match target.and_then(|target| inner.link(&target)) {
            Ok(link) => {
                Counters::add(&inner.counters.reroutes, 1);
                link.submit_frame(frame);
            }
            Err(err) => {
                let message = err.to_string();
                frame.fail(|| ClientError::Unreachable(message.clone()));
            }
        }
    }
}

/// One caller waiting for an answer.
#[derive(Debug)]
struct Waiter {
    slot: Arc<Slot>,
    deadline: Instant,
}

/// What a frame carries.
#[derive(Debug)]
enum Body {
    /// `sign` calls for one vPSD, one item per waiter, in order: one item goes as `sign`,
    /// more as `sign-batch`.
    Signs(Vec<SignItem>),
    /// A request of its own, for one waiter.
    Single(Request),
}

/// One request frame, from its making to its answer: its id and, once written, its content
/// never change, so that every resend is the same request to the appliance.
#[derive(Debug)]
struct Frame {
    id: u64,
    vpsd_id: Option<u64>,
    body: Body,
    waiters: Vec<Waiter>,
    /// The request as first written (None: not written yet, items may still join).
    wire: Option<Request>,
    /// Times sent to an owner read anew.
    routes: u32,
    /// `busy` answers so far (for the back-off).
    busy: u32,
    /// Not to be sent before (after `busy`).
    not_before: Option<Instant>,
    /// Whether its id is in its link's queue.
    queued: bool,
    /// The connection it is in flight on, and since when (None: not in flight).
    on: Option<(u64, Instant)>,
}

impl Frame {
    fn single(id: u64, request: Request, waiter: Waiter) -> Self {
        Self {
            id,
            vpsd_id: routing_vpsd(&request),
            body: Body::Single(request),
            waiters: vec![waiter],
            wire: None,
            routes: 0,
            busy: 0,
            not_before: None,
            queued: false,
            on: None,
        }
    }

    fn sent(&self) -> bool {
        self.wire.is_some()
    }

    /// The request to write, fixed at the first write.
    fn request(&mut self) -> &Request {
        let body = &self.body;
        let vpsd_id = self.vpsd_id.unwrap_or_default();
        self.wire.get_or_insert_with(|| match body {
            Body::Single(request) => request.clone(),
            Body::Signs(items) if items.len() == 1 => Request::Sign {
                vpsd_id,
                item: items[0],
            },
            Body::Signs(items) => Request::SignBatch {
                vpsd_id,
                items: items.clone(),
            },
        })
    }

    /// Fails callers past their time limit. Before the first write their items leave the
    /// frame (nothing of theirs is sent); after it, the outcome is unknown.
    fn expire(&mut self, now: Instant) {
        if !self.waiters.iter().any(|waiter| waiter.deadline <= now) {
            return;
        }
        if self.sent() {
            // Written: every caller keeps its place (its item's result comes at its index),
            // only its wait ends.
            for waiter in &self.waiters {
                if waiter.deadline <= now {
                    waiter
                        .slot
                        .complete(Err(ClientError::TimedOut { sent: true }));
                }
            }
            return;
        }
        let mut index = 0;
        while index < self.waiters.len() {
            let waiter = &self.waiters[index];
            if waiter.deadline <= now || waiter.slot.is_done() {
                let waiter = self.waiters.remove(index);
                if let Body::Signs(items) = &mut self.body {
                    items.remove(index);
                }
                waiter
                    .slot
                    .complete(Err(ClientError::TimedOut { sent: false }));
            } else {
                index += 1;
            }
        }
    }

    /// Whether nobody waits for its answer any more.
    fn abandoned(&self) -> bool {
        self.waiters.iter().all(|waiter| waiter.slot.is_done())
    }

    /// Every caller gets an error made by `error`; once the frame was written, its outcome
    /// is unknown, and that is what the callers are told.
    fn fail(self, error: impl Fn() -> ClientError) {
        let sent = self.sent();
        for waiter in self.waiters {
            waiter.slot.complete(Err(if sent {
                ClientError::OutcomeUnknown(error().to_string())
            } else {
                error()
            }));
        }
    }

    /// Every caller gets its answer: its own item's result for a batch of calls.
    fn answer(self, response: Response) {
        let batched = matches!(self.wire, Some(Request::SignBatch { .. }))
            && matches!(self.body, Body::Signs(_));
        match (batched, response) {
            (true, Response::BatchSigned { results }) if results.len() == self.waiters.len() => {
                for (waiter, result) in self.waiters.into_iter().zip(results) {
                    waiter.slot.complete(Ok(match result {
                        ItemResult::Signed(indicium) => Response::Signed { indicium },
                        ItemResult::Failed(body) => Response::Error(body),
                    }));
                }
            }
            (true, Response::BatchSigned { results }) => {
                let count = results.len();
                self.fail(|| {
                    ClientError::Protocol(format!(
                        "a batch-signed answer with {count} results to a sign-batch of other size"
                    ))
                });
            }
            (_, response) => {
                for waiter in self.waiters {
                    waiter.slot.complete(Ok(response.clone()));
                }
            }
        }
    }
}

/// Where a caller's answer arrives.
#[derive(Debug, Default)]
struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    result: Option<Result<Response>>,
    done: bool,
    waker: Option<Waker>,
}

impl Slot {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the result, unless there is one already; wakes the caller.
    fn complete(&self, result: Result<Response>) -> bool {
        let waker = {
            let mut state = lock(&self.state);
            if state.done {
                return false;
            }
            state.done = true;
            state.result = Some(result);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    fn is_done(&self) -> bool {
        lock(&self.state).done
    }
}

/// A caller's wait for its slot.
struct Completion(Arc<Slot>);

impl Future for Completion {
    type Output = Result<Response>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = lock(&self.0.state);
        match state.result.take() {
            Some(result) => Poll::Ready(result),
            None if state.done => Poll::Ready(Err(ClientError::Closed)),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// One connection (to an appliance's main port, or to one shard's), with the frames that
/// go on it.
#[derive(Debug)]
struct Link {
    target: Target,
    state: Mutex<LinkState>,
    /// Wakes the writer: frames to send, or the connection was lost.
    wake: Condvar,
}

#[derive(Debug, Default)]
struct LinkState {
    /// Frames made and not answered, by id.
    frames: HashMap<u64, Frame>,
    /// Ids of frames to write, in order (first sends and resends).
    queue: VecDeque<u64>,
    /// A frame of `sign` calls per vPSD that more calls may still join.
    open: HashMap<u64, u64>,
    /// Frames written on the current connection and not answered, and of those, the
    /// frames of `sign` calls by vPSD.
    in_flight: usize,
    vpsd_in_flight: HashMap<u64, usize>,
    /// The current connection's number (0: none).
    connection: u64,
    /// The appliance's most items in a `sign-batch` (from its topology).
    batch_items_max: usize,
    closed: bool,
}

impl LinkState {
    /// Whether frame `id` may be written now.
    fn sendable(&self, id: u64, now: Instant, options: &PoolBuilder) -> bool {
        let Some(frame) = self.frames.get(&id) else {
            // Answered or dropped: its queue entry goes.
            return true;
        };
        if frame.not_before.is_some_and(|at| at > now) {
            return false;
        }
        match (&frame.body, frame.vpsd_id) {
            (Body::Signs(_), Some(vpsd_id)) => {
                self.vpsd_in_flight.get(&vpsd_id).copied().unwrap_or(0)
                    < options.frames_per_vpsd_max
            }
            _ => true,
        }
    }

    /// Frame `id` was written on the current connection.
    fn took_off(&mut self, id: u64) {
        let connection = self.connection;
        let Some(frame) = self.frames.get_mut(&id) else {
            return;
        };
        frame.on = Some((connection, Instant::now()));
        let counted = match (&frame.body, frame.vpsd_id) {
            (Body::Signs(_), Some(vpsd_id)) => Some(vpsd_id),
            _ => None,
        };
        self.in_flight += 1;
        if let Some(vpsd_id) = counted {
            *self.vpsd_in_flight.entry(vpsd_id).or_default() += 1;
        }
    }

    /// `frame` was answered or dropped: if it was in flight on the current connection, it
    /// no longer counts there (one in flight on a connection given up counts nowhere).
    fn landed(&mut self, frame: &Frame) {
        if frame
            .on
            .is_none_or(|(connection, _)| connection != self.connection)
        {
            return;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if let (Body::Signs(_), Some(vpsd_id)) = (&frame.body, frame.vpsd_id) {
            if let Some(count) = self.vpsd_in_flight.get_mut(&vpsd_id) {
                *count -= 1;
                if *count == 0 {
                    self.vpsd_in_flight.remove(&vpsd_id);
                }
            }
        }
    }
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }

    fn close(&self) {
        self.state().closed = true;
        self.wake.notify_all();
    }

    /// Adds a `sign` call to the open frame of its vPSD, or to a new frame `id`.
    fn submit_sign(&self, id: u64, vpsd_id: u64, item: SignItem, waiter: Waiter) {
        let mut state = self.state();
        if state.closed {
            drop(state);
            waiter.slot.complete(Err(ClientError::Closed));
            return;
        }
        let cap = state.batch_items_max;
        if let Some(&id) = state.open.get(&vpsd_id) {
            if let Some(frame) = state.frames.get_mut(&id) {
                if let Body::Signs(items) = &mut frame.body {
                    if frame.wire.is_none() && items.len() < cap {
                        items.push(item);
                        frame.waiters.push(waiter);
                        return;
                    }
                }
            }
        }
        let frame = Frame {
            id,
            vpsd_id: Some(vpsd_id),
            body: Body::Signs(vec![item]),
            waiters: vec![waiter],
            wire: None,
            routes: 0,
            busy: 0,
            not_before: None,
            queued: true,
            on: None,
        };
        if cap > 1 {
            state.open.insert(vpsd_id, id);
        }
        // Every frame of one vPSD's calls joins the limit of frames in flight per vPSD.
        state.frames.insert(id, frame);
        state.queue.push_back(id);
        drop(state);
        self.wake.notify_one();
    }

    fn submit_frame(&self, frame: Frame) {
        let mut state = self.state();
        if state.closed {
            drop(state);
            frame.fail(|| ClientError::Closed);
            return;
        }
        let id = frame.id;
        let mut frame = frame;
        frame.queued = true;
        frame.on = None;
        state.frames.insert(id, frame);
        state.queue.push_back(id);
        drop(state);
        self.wake.notify_one();
    }

    /// The connection numbered `connection` is gone: what was written on it goes again on
    /// the next one, as it was.
    fn lost(&self, connection: u64) {
        let mut state = self.state();
        if state.connection != connection {
            return;
        }
        state.connection = 0;
        state.in_flight = 0;
        state.vpsd_in_flight.clear();
        let mut written: Vec<u64> = Vec::new();
        for (id, frame) in &mut state.frames {
            if frame.on.is_some_and(|(on, _)| on == connection) {
                frame.on = None;
                if !frame.queued {
                    frame.queued = true;
                    written.push(*id);
                }
            }
        }
        written.sort_unstable();
        for id in written.into_iter().rev() {
            state.queue.push_front(id);
        }
        drop(state);
        self.wake.notify_all();
    }
}

/// A connection's writer: connects (again) when there is work, and writes every frame
/// ready in one write.
fn write_loop(inner: &Arc<Inner>, link: &Arc<Link>) {
    let mut half: Option<(u64, WriteHalf)> = None;
    let mut connections = 0u64;
    let mut backoff = RECONNECT_FIRST;
    let mut out = Vec::with_capacity(4 * FRAME_BYTES_MAX);
    let mut frame_buf = vec![0u8; FRAME_BYTES_MAX];
    let mut last_expiry = Instant::now();
    let mut jitter = Jitter::new();
    loop {
        let mut state = link.state();
        // Wait for something to do.
        loop {
            if state.closed {
                let frames: Vec<Frame> = state.frames.drain().map(|(_, frame)| frame).collect();
                state.queue.clear();
                drop(state);
                if let Some((_, half)) = half.take() {
                    half.shutdown();
                }
                for frame in frames {
                    frame.fail(|| ClientError::Closed);
                }
                return;
            }
            let now = Instant::now();
            let mut silent = false;
            if now.duration_since(last_expiry) >= EXPIRY_EVERY {
                last_expiry = now;
                silent = expire(&mut state, now, inner.options.timeout);
            }
            if let Some((number, _)) = &half {
                if state.connection != *number || silent {
                    // The reader lost it, or a frame written on it went unanswered for a
                    // whole time limit (a peer gone without a word): what is left goes
                    // again on a new connection.
                    let number = *number;
                    if let Some((_, gone)) = half.take() {
                        gone.shutdown();
                    }
                    if silent {
                        drop(state);
                        link.lost(number);
                        state = link.state();
                    }
                }
            }
            let ready = state
                .queue
                .iter()
                .any(|id| state.sendable(*id, now, &inner.options));
            let room = state.in_flight < inner.options.frames_in_flight_max;
            if ready && (half.is_none() || room) {
                break;
            }
            state = if state.frames.is_empty() {
                // Nothing to expire or resend: sleep until there is.
                link.wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner)
            } else {
                link.wake
                    .wait_timeout(state, EXPIRY_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            };
        }
        if half.is_none() {
            drop(state);
            match connect(inner, link) {
                Ok((writer, reader)) => {
                    connections += 1;
                    backoff = RECONNECT_FIRST;
                    Counters::add(&inner.counters.connections, 1);
                    let number = connections;
                    {
                        let mut state = link.state();
                        state.connection = number;
                        state.in_flight = 0;
                        state.vpsd_in_flight.clear();
                    }
                    let spawned = {
                        let inner = Arc::clone(inner);
                        let link = Arc::clone(link);
                        std::thread::Builder::new()
                            .name("indicia-pool-reader".into())
                            .spawn(move || read_loop(&inner, &link, number, reader))
                    };
                    if spawned.is_err() {
                        writer.shutdown();
                        link.lost(number);
                        std::thread::sleep(backoff);
                        continue;
                    }
                    half = Some((number, writer));
                }
                Err(err) if permanent(&err) => {
                    // The appliance refuses this client: every call here fails the same way.
                    let message = err.to_string();
                    let frames: Vec<Frame> = {
                        let mut state = link.state();
                        state.queue.clear();
                        state.open.clear();
                        state.frames.drain().map(|(_, frame)| frame).collect()
                    };
                    for frame in frames {
                        frame.fail(|| match &err {
                            ClientError::Refused(body) => ClientError::Refused(body.clone()),
                            _ => ClientError::Unreachable(message.clone()),
                        });
                    }
                }
                Err(err) => {
                    let take_all = || -> Vec<Frame> {
                        let mut state = link.state();
                        state.queue.clear();
                        state.open.clear();
                        state.frames.drain().map(|(_, frame)| frame).collect()
                    };
                    let no_port =
                        matches!(&err, ClientError::Unreachable(why) if why == NO_SHARD_PORT);
                    if link.target.shard.is_some() && connections > 0 && !no_port {
                        // The appliance may have restarted on other shard ports: they are
                        // asked for again at the next try.
                        lock(&inner.routes).topologies.remove(&link.target.address);
                    }
                    if link.target.shard.is_some() && (connections == 0 || no_port) {
                        // A shard port that cannot be reached (a firewall in front of the
                        // appliance, say), or none at all: its vPSDs go through the main
                        // port from now on.
                        lock(&inner.routes)
                            .topologies
                            .insert(link.target.address.clone(), None);
                        let main = Target {
                            address: link.target.address.clone(),
                            shard: None,
                        };
                        match inner.link(&main) {
                            Ok(main) => {
                                for frame in take_all() {
                                    main.submit_frame(frame);
                                }
                            }
                            Err(_) => {
                                for frame in take_all() {
                                    frame.fail(|| ClientError::Closed);
                                }
                            }
                        }
                    } else if connections == 0 && !inner.in_cluster() {
                        // Never reached: say so now rather than at the time limit.
                        let message = err.to_string();
                        for frame in take_all() {
                            frame.fail(|| ClientError::Unreachable(message.clone()));
                        }
                    } else if inner.in_cluster() {
                        // Maybe the owner is gone: look for its vPSDs' owners again.
                        for frame in take_all() {
                            if frame.vpsd_id.is_some() {
                                inner.reroute(frame);
                            } else {
                                let address = link.target.address.clone();
                                frame.fail(|| {
                                    ClientError::Unreachable(format!("{address} does not answer"))
                                });
                            }
                        }
                    }
                    std::thread::sleep(jitter.around(backoff));
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
            continue;
        }
        // Write every frame that is ready, in one write.
        let now = Instant::now();
        out.clear();
        let mut kept = VecDeque::new();
        let mut written = 0u64;
        let mut resent = 0u64;
        while let Some(id) = state.queue.pop_front() {
            if state.in_flight >= inner.options.frames_in_flight_max {
                state.queue.push_front(id);
                break;
            }
            if !state.sendable(id, now, &inner.options) {
                kept.push_back(id);
                continue;
            }
            let Some(frame) = state.frames.get_mut(&id) else {
                continue;
            };
            frame.queued = false;
            frame.not_before = None;
            if frame.sent() {
                resent += 1;
            }
            let vpsd_id = frame.vpsd_id;
            let batch = match &frame.body {
                Body::Signs(items) if frame.wire.is_none() && items.len() > 1 => items.len() as u64,
                _ => 0,
            };
            let request = frame.request();
            let version = indicia_proto::frame::PROTOCOL_VERSION_MIN;
            match request.encode_frame(version, id, &mut frame_buf) {
                Ok(len) => out.extend_from_slice(&frame_buf[..len]),
                Err(err) => {
                    let message = format!("cannot encode the request: {err}");
                    if let Some(frame) = state.frames.remove(&id) {
                        frame.fail(|| ClientError::Protocol(message.clone()));
                    }
                    continue;
                }
            }
            if let Some(vpsd_id) = vpsd_id {
                if state.open.get(&vpsd_id) == Some(&id) {
                    state.open.remove(&vpsd_id);
                }
            }
            if batch > 0 {
                Counters::add(&inner.counters.batches, 1);
                Counters::add(&inner.counters.batched_calls, batch);
            }
            state.took_off(id);
            written += 1;
            if out.len() >= 8 * FRAME_BYTES_MAX {
                break;
            }
        }
        while let Some(id) = kept.pop_back() {
            state.queue.push_front(id);
        }
        drop(state);
        Counters::add(&inner.counters.frames_sent, written);
        Counters::add(&inner.counters.resends, resent);
        if out.is_empty() {
            continue;
        }
        if let Some((number, writer)) = &mut half {
            if std::io::Write::write_all(writer, &out).is_err() {
                let number = *number;
                if let Some((_, gone)) = half.take() {
                    gone.shutdown();
                }
                link.lost(number);
            }
        }
    }
}

/// Fails the callers of `state`'s frames that are past their time limit; drops frames
/// nobody waits for any more. True if one of them was written on the current connection
/// and never answered.
fn expire(state: &mut LinkState, now: Instant, timeout: Duration) -> bool {
    let mut unanswered = false;
    let mut emptied = Vec::new();
    for (id, frame) in &mut state.frames {
        frame.expire(now);
        if frame.abandoned() {
            emptied.push(*id);
        }
    }
    for id in emptied {
        if let Some(frame) = state.frames.remove(&id) {
            if let Some(vpsd_id) = frame.vpsd_id {
                if state.open.get(&vpsd_id) == Some(&id) {
                    state.open.remove(&vpsd_id);
                }
            }
            // Written on this connection a whole time limit ago and never answered.
            if frame.on.is_some_and(|(connection, written)| {
                connection == state.connection && now.duration_since(written) >= timeout
            }) {
                unanswered = true;
            }
            state.landed(&frame);
            if frame.queued {
                state.queue.retain(|queued| *queued != id);
            }
        }
    }
    unanswered
}

/// Errors a new connection would meet again: the credential or TLS refused.
fn permanent(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::Refused(_)
            | ClientError::ServerNotAuthenticated
            | ClientError::Tls(_)
            | ClientError::Files(_)
    )
}

/// Opens the link's connection: TCP (and TLS), then the handshake.
/// A shard's port is asked for again (after a failure) when it is not known: the
/// appliance may have restarted on other ports. [`NO_SHARD_PORT`] if it has none now.
fn connect(inner: &Arc<Inner>, link: &Link) -> Result<(WriteHalf, ReadHalf)> {
    let target = &link.target;
    let address = match target.shard {
        None => target.address.clone(),
        Some(shard) => {
            let topology = futures_lite::future::block_on(inner.topology(&target.address))?;
            let port = topology
                .and_then(|topology| topology.ports.get(usize::from(shard)).copied())
                .ok_or_else(|| ClientError::Unreachable(NO_SHARD_PORT.into()))?;
            with_port(&target.address, port)
        }
    };
    let tls = inner
        .options
        .tls
        .as_ref()
        .map(|tls| tls.for_address(&address))
        .transpose()?;
    let transport = Transport::connect_within(&address, tls.as_ref(), CONNECT_TIMEOUT)?;
    transport.set_timeout(Some(CONNECT_TIMEOUT))?;
    let client = Client::handshake(transport, &inner.options.credential)?;
    let transport = client
        .into_transport()
        .ok_or_else(|| ClientError::Protocol("input left over after the handshake".into()))?;
    transport.set_timeout(None)?;
    let (reader, writer) = transport.split();
    writer.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok((writer, reader))
}

/// Why a shard's connection was not opened: the appliance has no such shard port (any
/// more).
const NO_SHARD_PORT: &str = "no port for this shard";

/// `address` (host:port) with another port.
fn with_port(address: &str, port: u16) -> String {
    let host = host_of(address);
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A connection's reader: answers to their callers, until the connection ends.
fn read_loop(inner: &Arc<Inner>, link: &Arc<Link>, connection: u64, mut reader: ReadHalf) {
    let decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 4 * FRAME_BYTES_MAX];
    let (mut begin, mut end) = (0usize, 0usize);
    let mut jitter = Jitter::new();
    loop {
        let mut answers = Vec::new();
        loop {
            match decoder.decode(&buf[begin..end]) {
                Ok(Decoded::Frame(frame)) => {
                    let header = frame.header;
                    let len = frame.len();
                    match Response::decode(header.opcode, frame.body) {
                        Ok(response) if header.is_response() => {
                            answers.push((header.request_id, response))
                        }
                        _ => {
                            link.lost(connection);
                            return;
                        }
                    }
                    begin += len;
                }
                Ok(Decoded::Incomplete { needed }) => {
                    if buf.len() - begin < needed {
                        buf.resize(begin + needed, 0);
                    }
                    break;
                }
                Err(_) => {
                    link.lost(connection);
                    return;
                }
            }
        }
        if !answers.is_empty() {
            deliver(inner, link, answers, &mut jitter);
        }
        crate::transport::compact(&mut buf, &mut begin, &mut end, FRAME_BYTES_MAX);
        if buf.len() - end < FRAME_BYTES_MAX {
            buf.resize(end + FRAME_BYTES_MAX, 0);
        }
        match std::io::Read::read(&mut reader, &mut buf[end..]) {
            Ok(0) | Err(_) => {
                link.lost(connection);
                return;
            }
            Ok(read) => end += read,
        }
    }
}

/// Hands answers to their callers, or sends their frames again.
fn deliver(inner: &Arc<Inner>, link: &Link, answers: Vec<(u64, Response)>, jitter: &mut Jitter) {
    let mut done = Vec::with_capacity(answers.len());
    let mut rerouted = Vec::new();
    let mut retried = false;
    let waiting;
    {
        let mut state = link.state();
        for (id, response) in answers {
            if id == 0 {
                // About the connection itself; the appliance closes it next.
                continue;
            }
            let Some(mut frame) = state.frames.remove(&id) else {
                // Its callers gave up.
                continue;
            };
            // (Answered on a connection given up since, it counts nowhere any more.)
            state.landed(&frame);
            if frame.queued {
                frame.queued = false;
                state.queue.retain(|queued| *queued != id);
            }
            let code = match &response {
                Response::Error(body) => Some(body.code),
                _ => None,
            };
            match code {
                Some(ErrorCode::Busy)
                    if frame.waiters.iter().any(|w| w.deadline > Instant::now()) =>
                {
                    Counters::add(&inner.counters.busy, 1);
                    frame.busy += 1;
                    let wait = BUSY_FIRST
                        .saturating_mul(1 << frame.busy.min(7))
                        .min(BUSY_MAX);
                    frame.not_before = Some(Instant::now() + jitter.around(wait));
                    frame.on = None;
                    if !frame.queued {
                        frame.queued = true;
                        state.queue.push_back(id);
                    }
                    state.frames.insert(id, frame);
                    retried = true;
                }
                Some(
                    ErrorCode::VpsdMoved
                    | ErrorCode::ClusterUnavailable
                    | ErrorCode::ForwardFailed
                    | ErrorCode::OutcomeUnknown,
                ) if frame.vpsd_id.is_some() && frame.routes + 1 < ROUTES_MAX => {
                    frame.routes += 1;
                    if code == Some(ErrorCode::ClusterUnavailable) {
                        let wait = Duration::from_millis(50) * frame.routes;
                        frame.not_before = Some(Instant::now() + jitter.around(wait));
                    }
                    rerouted.push(frame);
                }
                _ => done.push((frame, response)),
            }
        }
        waiting = !state.queue.is_empty();
    }
    // Frames answered make room (per vPSD, per connection) for frames waiting for it.
    if retried || waiting {
        link.wake.notify_one();
    }
    for frame in rerouted {
        inner.reroute(frame);
    }
    for (frame, response) in done {
        frame.answer(response);
    }
}

/// Spreads waits out, so that many callers told `busy` at once do not come back at once.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = RequestIds::random().map_or(0x9E37_79B9_7F4A_7C15, |mut ids| ids.next_id());
        Self(seed | 1)
    }

    /// A duration between half of `wait` and `wait`.
    fn around(&mut self, wait: Duration) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let fraction = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        wait.mul_f64(0.5 + 0.5 * fraction)
    }
}
