//! The appliance's connection to etcd, on a thread of its own.
//!
//! `etcd-client` runs on tokio; the shards run on glommio. So the client lives on one
//! thread with a single-threaded tokio runtime, and everything else talks to it through
//! [`Etcd`]'s blocking calls (meant for a shard's blocking pool, like the fdatasync of a
//! commit round). That thread also keeps the appliance's lease alive.
//!
//! **The lease and self-fencing.** At connection the appliance is granted a lease of
//! `lease_ttl` and puts its key (its address) under it. The keep-alive runs every
//! `lease_ttl / 3`. A renewal sent at `t` is good until `t + ttl` at the latest (etcd
//! counts from when it received it), so the appliance may commit until then, less a margin
//! ([`Etcd::may_commit`]): when keep-alive fails, it stops committing before the lease can
//! have expired, and says so. Safety does not rest on this timing: a stale owner's
//! transaction is refused by its compare on the owner key. Timing only keeps the appliance
//! from trying once the others may have taken over. A lost lease is granted anew (with the
//! appliance key put again); the vPSDs' owner keys are not under the lease, so they stay
//! this appliance's until another one takes them over.
//!
//! **Takeover.** Every `lease_ttl` the thread sweeps: the members that joined once (no
//! lease) but whose appliance key is gone are dead; each of their vPSDs (found through the
//! owners' index) whose rendezvous successor among the live appliances is this one is
//! claimed by compare-and-swap on its owner key, and handed with its state and keys to
//! whoever adopts them (the shards, [`Etcd::start_takeover`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::oneshot;

use super::fence::{batches, judge, Outcome, Seen, StateWrite};
use super::keys::Keys;
use super::{
    successor, Adoption, ClusterError, CommitFuture, Member, Replicator, ReportFuture, Stored,
};

/// How an appliance joins the cluster (the `[cluster]` section, milestone 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The etcd members' client URLs.
    pub endpoints: Vec<String>,
    /// This appliance's id, unique in the cluster.
    pub appliance: String,
    /// Where other appliances and clients reach it.
    pub advertise: String,
    pub lease_ttl: Duration,
    pub prefix: String,
    /// A check value of the cluster master key: every appliance must bring the same one.
    pub master_check: String,
}

/// Where the vPSDs this appliance takes over go.
pub type Adopter = Box<dyn Fn(Vec<Adoption>) + Send>;

/// The most members, and the longest address, one cluster report holds (the protocol's
/// `cluster-report` bounds).
const MEMBERS_REPORTED_MAX: usize = 1024;
const ADDRESS_REPORTED_MAX: usize = 128;

/// How long a shard's round waits on the etcd thread for another shard's, to share its
/// transactions; and how many rounds go without waiting after a wait that found none.
const SHARED_ROUND_WAIT: Duration = Duration::from_micros(500);
const ROUNDS_ALONE_AFTER_A_WAIT: u32 = 8;

/// The most keys one range read returns (the sweep and the loads page through larger sets).
const PAGE: i64 = 1000;

/// How many times a write that only shared a failed transaction is sent again in one
/// round before the round gives it up (as [`Outcome::Retry`]).
const ROUND_ATTEMPTS_MAX: usize = 4;

/// The lease as the shards see it: until when this appliance may commit.
#[derive(Debug)]
struct LeaseClock {
    origin: Instant,
    /// Milliseconds after `origin` until which commits are allowed (0: never yet).
    commit_until_ms: AtomicU64,
    /// Milliseconds after `origin` of the last successful renewal.
    renewed_ms: AtomicU64,
    id: AtomicI64,
    /// Renewals that failed or expired since the last good one.
    failures: AtomicU64,
    /// Set once the lease has been seen expired.
    expired: AtomicBool,
}

impl LeaseClock {
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// A renewal sent at `sent` was granted `ttl`: commits are allowed until `sent + ttl`
    /// less the margin.
    fn renewed(&self, sent: Instant, ttl: Duration) {
        let margin = ttl / 5;
        let until = self.ms(sent + ttl.saturating_sub(margin));
        self.commit_until_ms.fetch_max(until, Ordering::AcqRel);
        self.renewed_ms
            .store(self.ms(Instant::now()), Ordering::Release);
        self.failures.store(0, Ordering::Release);
        self.expired.store(false, Ordering::Release);
    }

    fn may_commit(&self) -> bool {
        self.ms(Instant::now()) < self.commit_until_ms.load(Ordering::Acquire)
    }

    fn silent_ms(&self) -> u64 {
        self.ms(Instant::now())
            .saturating_sub(self.renewed_ms.load(Ordering::Acquire))
    }
}

/// Whether a vPSD became (or already was) this appliance's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Owned, with this fencing epoch; its replicated state and that state's revision, if
    /// there is one.
    Owned {
        epoch: i64,
        state: Option<(Vec<u8>, i64)>,
        keys: Option<Vec<u8>>,
    },
    /// Another appliance owns it.
    Taken { owner: String },
}

type Reply<T> = oneshot::Sender<Result<T, ClusterError>>;

enum Command {
    Commit {
        writes: Vec<StateWrite>,
        reply: Reply<Vec<Outcome>>,
    },
    Claim {
        vpsd_id: u64,
        from: Option<String>,
        reply: Reply<Claim>,
    },
    Load {
        vpsd_ids: Vec<u64>,
        reply: Reply<Vec<Stored>>,
    },
    Appliances {
        reply: Reply<Vec<(String, String)>>,
    },
    Owned {
        appliance: String,
        reply: Reply<Vec<u64>>,
    },
    Release {
        vpsd_id: u64,
        epoch: i64,
        reply: Reply<bool>,
    },
    Takeover {
        from: String,
        reply: Reply<usize>,
    },
    Report {
        take_over_from: Option<String>,
        reply: Reply<(u32, Vec<Member>)>,
    },
    StartTakeover {
        adopter: Adopter,
    },
}

/// The connection to etcd: its thread, and the lease.
#[derive(Debug)]
pub struct Etcd {
    commands: Option<tokio::sync::mpsc::UnboundedSender<Command>>,
    lease: Arc<LeaseClock>,
    thread: Option<std::thread::JoinHandle<()>>,
    appliance: String,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Commit { .. } => "Commit",
            Self::Claim { .. } => "Claim",
            Self::Load { .. } => "Load",
            Self::Appliances { .. } => "Appliances",
            Self::Owned { .. } => "Owned",
            Self::Release { .. } => "Release",
            Self::Takeover { .. } => "Takeover",
            Self::Report { .. } => "Report",
            Self::StartTakeover { .. } => "StartTakeover",
        })
    }
}

impl Etcd {
    /// Connects, is granted a lease, announces the appliance under it, and starts the
    /// keep-alive. Returns once the appliance is announced (or could not be).
    pub fn connect(config: EtcdConfig) -> Result<Self, ClusterError> {
        let lease = Arc::new(LeaseClock {
            origin: Instant::now(),
            commit_until_ms: AtomicU64::new(0),
            renewed_ms: AtomicU64::new(0),
            id: AtomicI64::new(0),
            failures: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        });
        let (commands, receiver) = tokio::sync::mpsc::unbounded_channel();
        let (ready, started) = mpsc::sync_channel(1);
        let clock = Arc::clone(&lease);
        let appliance = config.appliance.clone();
        let thread = std::thread::Builder::new()
            .name("indicia-etcd".into())
            .spawn(move || run(config, clock, receiver, ready))
            .map_err(ClusterError::Thread)?;
        match started.recv() {
            Ok(Ok(())) => Ok(Self {
                commands: Some(commands),
                lease,
                thread: Some(thread),
                appliance,
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ClusterError::Stopped)
            }
        }
    }

    /// Whether this appliance may commit now: its lease was last renewed recently enough
    /// that it cannot have expired (with a margin).
    pub fn may_commit(&self) -> bool {
        self.lease.may_commit()
    }

    /// The lease's id (0 before it was granted).
    pub fn lease_id(&self) -> i64 {
        self.lease.id.load(Ordering::Acquire)
    }

    /// Sends a command; its answer comes on the returned channel.
    fn send<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<oneshot::Receiver<Result<T, ClusterError>>, ClusterError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .as_ref()
            .ok_or(ClusterError::Stopped)?
            .send(command(reply))
            .map_err(|_| ClusterError::Stopped)?;
        Ok(answer)
    }

    /// Sends a command and waits for its answer. Blocking: not for an async context.
    fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClusterError> {
        self.send(command)?
            .blocking_recv()
            .map_err(|_| ClusterError::Stopped)?
    }

    /// Writes a round's states (see [`Replicator::commit`]). Blocking.
    pub fn commit_blocking(&self, writes: Vec<StateWrite>) -> Result<Vec<Outcome>, ClusterError> {
        if !self.may_commit() {
            return Err(ClusterError::LeaseLost {
                silent_ms: self.lease.silent_ms(),
            });
        }
        self.call(|reply| Command::Commit { writes, reply })
    }

    /// What etcd holds of each of these vPSDs, in order. Blocking.
    pub fn load(&self, vpsd_ids: Vec<u64>) -> Result<Vec<Stored>, ClusterError> {
        self.call(|reply| Command::Load { vpsd_ids, reply })
    }

    /// The vPSDs `appliance` owns, by the owners' index, by id. Blocking.
    pub fn owned_by(&self, appliance: &str) -> Result<Vec<u64>, ClusterError> {
        let appliance = appliance.to_owned();
        self.call(|reply| Command::Owned { appliance, reply })
    }

    /// Gives up a vPSD this appliance owns at `epoch` whose first write never happened (its
    /// provisioning was never acknowledged): its owner key and index entry are deleted if
    /// they are still as this appliance made them. Blocking.
    pub fn release(&self, vpsd_id: u64, epoch: i64) -> Result<bool, ClusterError> {
        self.call(|reply| Command::Release {
            vpsd_id,
            epoch,
            reply,
        })
    }

    /// Takes over every vPSD of `from` now (by hand: `indiciactl cluster takeover`), alive
    /// or not; they go to the adopter. Returns how many. Blocking.
    pub fn take_over(&self, from: &str) -> Result<usize, ClusterError> {
        let from = from.to_owned();
        self.call(|reply| Command::Takeover { from, reply })
    }

    /// Starts sweeping for dead appliances' vPSDs, handing those taken over to `adopter`
    /// (once the shards serve).
    pub fn start_takeover(&self, adopter: Adopter) -> Result<(), ClusterError> {
        self.commands
            .as_ref()
            .ok_or(ClusterError::Stopped)?
            .send(Command::StartTakeover { adopter })
            .map_err(|_| ClusterError::Stopped)
    }

    /// Makes a vPSD this appliance's: one nobody owns, or one that `from` owns (a takeover,
    /// compare-and-swap on its owner key). Blocking.
    pub fn claim(&self, vpsd_id: u64, from: Option<&str>) -> Result<Claim, ClusterError> {
        let from = from.map(str::to_owned);
        self.call(|reply| Command::Claim {
            vpsd_id,
            from,
            reply,
        })
    }

    /// The appliances whose lease is alive: (id, address), by id. Blocking.
    pub fn appliances(&self) -> Result<Vec<(String, String)>, ClusterError> {
        self.call(|reply| Command::Appliances { reply })
    }
}

impl Replicator for Etcd {
    fn commit(&self, writes: Vec<StateWrite>) -> CommitFuture {
        if !self.may_commit() {
            let silent_ms = self.lease.silent_ms();
            return Box::pin(async move { Err(ClusterError::LeaseLost { silent_ms }) });
        }
        match self.send(|reply| Command::Commit { writes, reply }) {
            Ok(answer) => Box::pin(async move { answer.await.map_err(|_| ClusterError::Stopped)? }),
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }

    fn may_commit(&self) -> bool {
        Etcd::may_commit(self)
    }

    fn appliance(&self) -> &str {
        &self.appliance
    }

    fn load(&self, vpsd_ids: Vec<u64>) -> Result<Vec<Stored>, ClusterError> {
        Etcd::load(self, vpsd_ids)
    }

    fn owned(&self) -> Result<Vec<u64>, ClusterError> {
        self.owned_by(&self.appliance)
    }

    fn release(&self, vpsd_id: u64, epoch: i64) -> Result<bool, ClusterError> {
        Etcd::release(self, vpsd_id, epoch)
    }

    fn report(&self, take_over_from: Option<String>) -> ReportFuture {
        match self.send(|reply| Command::Report {
            take_over_from,
            reply,
        }) {
            Ok(answer) => Box::pin(async move { answer.await.map_err(|_| ClusterError::Stopped)? }),
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }
}

impl Drop for Etcd {
    /// Stops the thread, which revokes the lease: the appliance is gone from the cluster
    /// at once rather than after its TTL.
    fn drop(&mut self) {
        drop(self.commands.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    config: EtcdConfig,
    lease: Arc<LeaseClock>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    ready: mpsc::SyncSender<Result<(), ClusterError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(ClusterError::Thread(err)));
            return;
        }
    };
    runtime.block_on(async move {
        let keys = Keys::new(&config.prefix);
        let ttl = config.lease_ttl;
        let options = ConnectOptions::new()
            .with_connect_timeout(ttl / 3)
            .with_timeout(ttl / 3);
        let mut client = match Client::connect(&config.endpoints, Some(options)).await {
            Ok(client) => client,
            Err(err) => {
                let _ = ready.send(Err(err.into()));
                return;
            }
        };
        if let Err(err) = join(&mut client, &keys, &config).await {
            let _ = ready.send(Err(err));
            return;
        }
        let session = match Session::start(&mut client, &keys, &config, &lease, true).await {
            Ok(session) => session,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        // The lease lives in a task of its own, so that nothing the commands do (a long
        // load at start, a takeover, a slow transaction) holds up its renewal.
        let (stop_lease, lease_stop) = oneshot::channel::<()>();
        let lease_task = tokio::spawn(keep_lease(
            client.clone(),
            keys.clone(),
            config.clone(),
            Arc::clone(&lease),
            session,
            lease_stop,
        ));
        let mut sweep = tokio::time::interval(ttl);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut adopter: Option<Adopter> = None;
        let me = config.appliance.as_str();
        // Rounds to commit without waiting for another shard's (see `SHARED_ROUND_WAIT`).
        let mut alone_for = 0u32;
        // Commands taken off the channel while gathering rounds, to be handled next.
        let mut backlog: VecDeque<Command> = VecDeque::new();
        loop {
            tokio::select! {
                _ = sweep.tick(), if adopter.is_some() && lease.may_commit() => {
                    if let Some(adopter) = &adopter {
                        match sweep_dead(&mut client, &keys, me).await {
                            Ok((adopted, more)) => {
                                if !adopted.is_empty() {
                                    adopter(adopted);
                                }
                                if more {
                                    // The next step soon.
                                    sweep.reset_after(ttl / 10);
                                }
                            }
                            Err(err) => tracing::warn!("etcd: takeover sweep failed: {err}"),
                        }
                    }
                }
                command = next_command(&mut backlog, &mut commands) => {
                    let Some(command) = command else { break };
                    match command {
                        Command::StartTakeover { adopter: new } => adopter = Some(new),
                        Command::Takeover { from, reply } => {
                            let taken =
                                by_hand(&mut client, &keys, me, &from, adopter.as_ref(), &lease)
                                    .await;
                            let _ = reply.send(taken);
                        }
                        Command::Report { take_over_from, reply } => {
                            let mut taken = 0;
                            if let Some(from) = take_over_from {
                                match by_hand(&mut client, &keys, me, &from, adopter.as_ref(), &lease)
                                    .await
                                {
                                    Ok(count) => taken = u32::try_from(count).unwrap_or(u32::MAX),
                                    Err(err) => {
                                        let _ = reply.send(Err(err));
                                        continue;
                                    }
                                }
                            }
                            let _ = reply.send(
                                members(&mut client, &keys).await.map(|members| (taken, members)),
                            );
                        }
                        Command::Commit { writes, reply } => {
                            // The rounds of other shards that queued meanwhile go in the
                            // same transactions (group commit across shards): etcd's cost
                            // is per transaction more than per write. Other commands wait
                            // in the backlog.
                            let mut rounds = vec![(writes, reply)];
                            while let Ok(next) = commands.try_recv() {
                                match next {
                                    Command::Commit { writes, reply } => rounds.push((writes, reply)),
                                    other => backlog.push_back(other),
                                }
                            }
                            if rounds.len() == 1 && backlog.is_empty() && alone_for == 0 {
                                // Alone: another shard's round is often on its way (the
                                // shards' rounds alternate otherwise); wait for it briefly.
                                // Not when waiting did not pay lately (one shard busy).
                                match tokio::time::timeout(SHARED_ROUND_WAIT, commands.recv()).await
                                {
                                    Ok(Some(Command::Commit { writes, reply })) => {
                                        rounds.push((writes, reply));
                                    }
                                    Ok(Some(other)) => backlog.push_back(other),
                                    Ok(None) => {}
                                    Err(_) => alone_for = ROUNDS_ALONE_AFTER_A_WAIT,
                                }
                            } else {
                                alone_for = alone_for.saturating_sub(1);
                            }
                            commit_rounds(&mut client, &keys, me, rounds).await;
                        }
                        command => handle(&mut client, &keys, me, command).await,
                    }
                }
            }
        }
        // A clean stop: the lease goes now, with the appliance's key.
        let _ = stop_lease.send(());
        let _ = lease_task.await;
    });
}

/// The next command: one set aside earlier, or the next from the channel.
async fn next_command(
    backlog: &mut VecDeque<Command>,
    commands: &mut tokio::sync::mpsc::UnboundedReceiver<Command>,
) -> Option<Command> {
    match backlog.pop_front() {
        Some(command) => Some(command),
        None => commands.recv().await,
    }
}

/// Keeps the appliance's lease alive (every `lease_ttl / 3`) until told to stop, then
/// revokes it. A keep-alive stream that breaks is opened again for the same lease; a lease
/// that expired is granted anew, with the appliance's key put again.
async fn keep_lease(
    mut client: Client,
    keys: Keys,
    config: EtcdConfig,
    lease: Arc<LeaseClock>,
    mut session: Session,
    mut stop: oneshot::Receiver<()>,
) {
    let ttl = config.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let Err(err) = session.renew(&lease, ttl).await else {
            continue;
        };
        lease.failures.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(
            "etcd: the lease was not renewed ({err}); commits stop {} ms after the last \
             renewal",
            ttl.saturating_sub(ttl / 5).as_millis()
        );
        if lease.expired.load(Ordering::Acquire) || u128::from(lease.silent_ms()) > ttl.as_millis()
        {
            // Gone: a new lease, and the appliance announced again.
            match Session::start(&mut client, &keys, &config, &lease, false).await {
                Ok(fresh) => {
                    tracing::warn!("etcd: a new lease was granted");
                    session = fresh;
                }
                Err(err) => tracing::warn!("etcd: no new lease yet: {err}"),
            }
        } else if let Ok((keeper, stream)) = client.lease_keep_alive(session.id).await {
            // The stream may be what broke (its member went away): a new one, at once.
            session.keeper = keeper;
            session.stream = stream;
            if session.renew(&lease, ttl).await.is_ok() {
                tracing::info!("etcd: the lease was renewed on a new keep-alive stream");
            }
        }
    }
    let _ = client.lease_revoke(session.id).await;
}

/// Joins the cluster: checks (or, for the first appliance, sets) the master key's check
/// value, and records the appliance as a member.
async fn join(client: &mut Client, keys: &Keys, config: &EtcdConfig) -> Result<(), ClusterError> {
    let check = keys.master_check();
    let response = client
        .txn(
            Txn::new()
                .when(vec![Compare::create_revision(
                    check.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    check.clone(),
                    config.master_check.clone(),
                    None,
                )])
                .or_else(vec![TxnOp::get(check.clone(), None)]),
        )
        .await?;
    if !response.succeeded() {
        let held = match response.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        if held.as_deref() != Some(config.master_check.as_bytes()) {
            return Err(ClusterError::MasterKeyMismatch { key: check });
        }
    }
    client
        .put(
            keys.member(&config.appliance),
            config.advertise.clone(),
            None,
        )
        .await?;
    Ok(())
}

/// One lease and its keep-alive stream.
struct Session {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl Session {
    /// A lease, with the appliance's key under it. At the first start, an appliance key
    /// that exists (under another live lease) means another process runs with this id.
    async fn start(
        client: &mut Client,
        keys: &Keys,
        config: &EtcdConfig,
        lease: &LeaseClock,
        first: bool,
    ) -> Result<Self, ClusterError> {
        let key = keys.appliance(&config.appliance);
        if first {
            // The key may still be there under the lease of this appliance's previous
            // process (killed, and restarted within its TTL): it goes when that lease
            // expires. One that stays longer is renewed by another live process.
            let patience = Instant::now() + config.lease_ttl * 2;
            while !client.get(key.clone(), None).await?.kvs().is_empty() {
                if Instant::now() >= patience {
                    return Err(ClusterError::DuplicateAppliance(config.appliance.clone()));
                }
                tracing::info!(
                    "etcd: appliance key {key} is still alive (a previous process's lease?); \
                     waiting for it to expire"
                );
                tokio::time::sleep(config.lease_ttl / 4).await;
            }
        }
        let sent = Instant::now();
        let ttl_s = i64::try_from(config.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = client.lease_grant(ttl_s, None).await?;
        let id = granted.id();
        let put = TxnOp::put(
            key.clone(),
            config.advertise.clone(),
            Some(PutOptions::new().with_lease(id)),
        );
        let when = if first {
            vec![Compare::create_revision(key, CompareOp::Equal, 0)]
        } else {
            Vec::new()
        };
        if !client
            .txn(Txn::new().when(when).and_then(vec![put]))
            .await?
            .succeeded()
        {
            let _ = client.lease_revoke(id).await;
            return Err(ClusterError::DuplicateAppliance(config.appliance.clone()));
        }
        let (keeper, stream) = client.lease_keep_alive(id).await?;
        lease.id.store(id, Ordering::Release);
        lease.renewed(
            sent,
            Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)),
        );
        Ok(Self { id, keeper, stream })
    }

    /// One keep-alive round trip.
    async fn renew(&mut self, lease: &LeaseClock, ttl: Duration) -> Result<(), ClusterError> {
        // A response to an earlier renewal that timed out must not be taken for this one's
        // (it would extend the commit window from a later send than it answers).
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::ZERO, self.stream.message()).await
        {}
        let sent = Instant::now();
        self.keeper.keep_alive().await?;
        match tokio::time::timeout(ttl / 3, self.stream.message()).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                lease.renewed(
                    sent,
                    Duration::from_secs(u64::try_from(response.ttl()).unwrap_or(0)),
                );
                Ok(())
            }
            Ok(Ok(Some(_))) => {
                lease.expired.store(true, Ordering::Release);
                Err(ClusterError::LeaseLost {
                    silent_ms: lease.silent_ms(),
                })
            }
            Ok(Ok(None)) => Err(ClusterError::Stopped),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => Err(ClusterError::LeaseLost {
                silent_ms: lease.silent_ms(),
            }),
        }
    }
}

async fn handle(client: &mut Client, keys: &Keys, appliance: &str, command: Command) {
    match command {
        Command::Commit { writes, reply } => {
            let _ = reply.send(commit(client, keys, appliance, &writes).await);
        }
        Command::Claim {
            vpsd_id,
            from,
            reply,
        } => {
            let _ = reply.send(claim(client, keys, appliance, vpsd_id, from.as_deref()).await);
        }
        Command::Load { vpsd_ids, reply } => {
            let _ = reply.send(load(client, keys, &vpsd_ids).await);
        }
        Command::Appliances { reply } => {
            let _ = reply.send(appliances(client, keys).await);
        }
        Command::Owned { appliance, reply } => {
            let _ = reply.send(owned_by(client, keys, &appliance).await);
        }
        Command::Release {
            vpsd_id,
            epoch,
            reply,
        } => {
            let _ = reply.send(release(client, keys, appliance, vpsd_id, epoch).await);
        }
        // Handled by the loop, which holds the adopter.
        Command::Takeover { reply, .. } => {
            let _ = reply.send(Err(ClusterError::Stopped));
        }
        Command::Report { reply, .. } => {
            let _ = reply.send(Err(ClusterError::Stopped));
        }
        Command::StartTakeover { .. } => {}
    }
}

/// Commits the rounds of several shards together, and answers each with its outcomes.
async fn commit_rounds(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    rounds: Vec<(Vec<StateWrite>, Reply<Vec<Outcome>>)>,
) {
    if rounds.len() == 1 {
        for (writes, reply) in rounds {
            let _ = reply.send(commit(client, keys, appliance, &writes).await);
        }
        return;
    }
    let mut all = Vec::new();
    let mut replies = Vec::with_capacity(rounds.len());
    for (writes, reply) in rounds {
        replies.push((writes.len(), reply));
        all.extend(writes);
    }
    match commit(client, keys, appliance, &all).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(outcomes.by_ref().take(count).collect()));
            }
        }
        Err(err) => {
            // (commit refuses per write; an error of its own leaves every outcome unknown.)
            let text = err.to_string();
            for (_, reply) in replies {
                let _ = reply.send(Err(ClusterError::Shared(text.clone())));
            }
        }
    }
}

/// etcd refuses writes once its space quota is reached (the NOSPACE alarm).
fn no_space(err: &etcd_client::Error) -> bool {
    err.to_string().contains("database space exceeded")
}

/// etcd (or gRPC) refuses a request over its size limit before applying anything.
fn too_large(err: &etcd_client::Error) -> bool {
    let text = err.to_string();
    text.contains("request is too large") || text.contains("message larger than max")
}

async fn commit(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    writes: &[StateWrite],
) -> Result<Vec<Outcome>, ClusterError> {
    let mut outcomes = vec![Outcome::Retry; writes.len()];
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    for _ in 0..ROUND_ATTEMPTS_MAX {
        if pending.is_empty() {
            break;
        }
        let mut again = Vec::new();
        for batch in batches(writes, &pending) {
            let mut compares = Vec::with_capacity(batch.len() * 2);
            let mut puts = Vec::with_capacity(batch.len() * 2);
            let mut reads = Vec::with_capacity(batch.len() * 2);
            for &index in &batch {
                let write = &writes[index];
                let (owner, state) = (keys.owner(write.vpsd_id), keys.state(write.vpsd_id));
                if write.epoch == 0 {
                    // The first write: nobody may own the vPSD yet.
                    compares.push(Compare::create_revision(owner.clone(), CompareOp::Equal, 0));
                    puts.push(TxnOp::put(owner.clone(), appliance, None));
                    puts.push(TxnOp::put(keys.owned(appliance, write.vpsd_id), "", None));
                } else {
                    compares.push(Compare::mod_revision(
                        owner.clone(),
                        CompareOp::Equal,
                        write.epoch,
                    ));
                }
                compares.push(Compare::mod_revision(
                    state.clone(),
                    CompareOp::Equal,
                    write.last,
                ));
                puts.push(TxnOp::put(state.clone(), write.state.clone(), None));
                if let Some(sealed) = &write.keys {
                    puts.push(TxnOp::put(keys.keys(write.vpsd_id), sealed.clone(), None));
                }
                reads.push(TxnOp::get(owner, None));
                reads.push(TxnOp::get(state, None));
            }
            let response = match client
                .txn(Txn::new().when(compares).and_then(puts).or_else(reads))
                .await
            {
                Ok(response) => response,
                Err(err) if no_space(&err) || too_large(&err) => {
                    tracing::warn!(
                        "etcd refused a transaction of {} writes: {err}",
                        batch.len()
                    );
                    for &index in &batch {
                        outcomes[index] = Outcome::Refused;
                    }
                    continue;
                }
                // Unknown: this transaction may or may not have been applied; those not
                // sent yet surely were not. All go again (the same bytes) next round; the
                // ones written stay written.
                Err(err) => {
                    tracing::warn!("etcd did not answer a transaction: {err}");
                    return Ok(outcomes);
                }
            };
            if response.succeeded() {
                let revision = response.header().map_or(0, |header| header.revision());
                for &index in &batch {
                    let epoch = match writes[index].epoch {
                        0 => revision,
                        epoch => epoch,
                    };
                    outcomes[index] = Outcome::Written { revision, epoch };
                }
                continue;
            }
            let answers = response.op_responses();
            if answers.len() != batch.len() * 2 {
                return Err(ClusterError::Answer {
                    sent: batch.len() * 2,
                    received: answers.len(),
                });
            }
            for (&index, pair) in batch.iter().zip(answers.chunks(2)) {
                let seen = Seen {
                    owner: first_kv(&pair[0]).map(|(value, revision)| {
                        (String::from_utf8_lossy(&value).into_owned(), revision)
                    }),
                    state: first_kv(&pair[1]),
                };
                match judge(&writes[index], appliance, &seen) {
                    Outcome::Retry => again.push(index),
                    outcome => outcomes[index] = outcome,
                }
            }
        }
        pending = again;
    }
    Ok(outcomes)
}

/// The value and `mod_revision` of the first key a read in a transaction found.
fn first_kv(answer: &TxnOpResponse) -> Option<(Vec<u8>, i64)> {
    match answer {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    }
}

async fn claim(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    vpsd_id: u64,
    from: Option<&str>,
) -> Result<Claim, ClusterError> {
    let owner_key = keys.owner(vpsd_id);
    let reads = || {
        vec![
            TxnOp::get(keys.state(vpsd_id), None),
            TxnOp::get(keys.keys(vpsd_id), None),
        ]
    };
    let current = client.get(owner_key.clone(), None).await?;
    let (compare, mut ops) = match current.kvs().first() {
        None => (
            Compare::create_revision(owner_key.clone(), CompareOp::Equal, 0),
            Vec::new(),
        ),
        Some(kv) if kv.value() == appliance.as_bytes() => {
            // Already this appliance's (it restarted): the epoch stands.
            let epoch = kv.mod_revision();
            let response = client.txn(Txn::new().and_then(reads())).await?;
            let answers = response.op_responses();
            return Ok(Claim::Owned {
                epoch,
                state: answers.first().and_then(first_kv),
                keys: answers.get(1).and_then(first_kv).map(|(value, _)| value),
            });
        }
        Some(kv) if from.is_some_and(|from| kv.value() == from.as_bytes()) => (
            Compare::mod_revision(owner_key.clone(), CompareOp::Equal, kv.mod_revision()),
            vec![TxnOp::delete(
                keys.owned(&String::from_utf8_lossy(kv.value()), vpsd_id),
                None,
            )],
        ),
        Some(kv) => {
            return Ok(Claim::Taken {
                owner: String::from_utf8_lossy(kv.value()).into_owned(),
            })
        }
    };
    ops.push(TxnOp::put(owner_key.clone(), appliance, None));
    ops.push(TxnOp::put(keys.owned(appliance, vpsd_id), "", None));
    let first_read = ops.len();
    ops.extend(reads());
    let response = client
        .txn(
            Txn::new()
                .when(vec![compare])
                .and_then(ops)
                .or_else(vec![TxnOp::get(owner_key, None)]),
        )
        .await?;
    let answers = response.op_responses();
    if response.succeeded() {
        Ok(Claim::Owned {
            epoch: response.header().map_or(0, |header| header.revision()),
            state: answers.get(first_read).and_then(first_kv),
            keys: answers
                .get(first_read + 1)
                .and_then(first_kv)
                .map(|(value, _)| value),
        })
    } else {
        Ok(Claim::Taken {
            owner: answers
                .first()
                .and_then(first_kv)
                .map(|(owner, _)| String::from_utf8_lossy(&owner).into_owned())
                .unwrap_or_default(),
        })
    }
}

async fn load(
    client: &mut Client,
    keys: &Keys,
    vpsd_ids: &[u64],
) -> Result<Vec<Stored>, ClusterError> {
    let mut out = Vec::with_capacity(vpsd_ids.len());
    // Three reads a vPSD, within the operation limit of one transaction.
    for chunk in vpsd_ids.chunks(super::fence::TXN_OPS_MAX / 3) {
        let mut reads = Vec::with_capacity(chunk.len() * 3);
        for &vpsd_id in chunk {
            reads.push(TxnOp::get(keys.owner(vpsd_id), None));
            reads.push(TxnOp::get(keys.state(vpsd_id), None));
            reads.push(TxnOp::get(keys.keys(vpsd_id), None));
        }
        let response = client.txn(Txn::new().and_then(reads)).await?;
        let answers = response.op_responses();
        if answers.len() != chunk.len() * 3 {
            return Err(ClusterError::Answer {
                sent: chunk.len() * 3,
                received: answers.len(),
            });
        }
        for triple in answers.chunks(3) {
            out.push(Stored {
                owner: first_kv(&triple[0]).map(|(value, revision)| {
                    (String::from_utf8_lossy(&value).into_owned(), revision)
                }),
                state: first_kv(&triple[1]),
                keys: first_kv(&triple[2]).map(|(value, _)| value),
            });
        }
    }
    Ok(out)
}

/// Every key under `prefix` (keys only), page by page.
async fn keys_under(client: &mut Client, prefix: &str) -> Result<Vec<String>, ClusterError> {
    let end = {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    };
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let response = client
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_keys_only()
                        .with_limit(PAGE),
                ),
            )
            .await?;
        for kv in response.kvs() {
            out.push(String::from_utf8_lossy(kv.key()).into_owned());
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

async fn owned_by(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
) -> Result<Vec<u64>, ClusterError> {
    Ok(keys_under(client, &keys.owned_by(appliance))
        .await?
        .iter()
        .filter_map(|key| keys.owned_id(appliance, key))
        .collect())
}

async fn release(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    vpsd_id: u64,
    epoch: i64,
) -> Result<bool, ClusterError> {
    let owner = keys.owner(vpsd_id);
    let response = client
        .txn(
            Txn::new()
                .when(vec![
                    Compare::mod_revision(owner.clone(), CompareOp::Equal, epoch),
                    Compare::create_revision(keys.state(vpsd_id), CompareOp::Equal, 0),
                ])
                .and_then(vec![
                    TxnOp::delete(owner, None),
                    TxnOp::delete(keys.owned(appliance, vpsd_id), None),
                ]),
        )
        .await?;
    Ok(response.succeeded())
}

/// The most vPSDs one step of a takeover claims: between steps the lease is renewed, so
/// that taking over thousands of vPSDs never makes the successor lose its own lease.
const TAKEOVER_STEP: usize = 256;

/// Takes over at most `limit` vPSDs of `from` (those whose successor among `live` is this
/// appliance, or all of them without `live`): claims each, and returns those claimed with
/// their state, and whether some are left. A claim that fails ends the step with what it
/// has (the rest stay in the index for the next one).
async fn take_over(
    client: &mut Client,
    keys: &Keys,
    me: &str,
    from: &str,
    live: Option<&[String]>,
    limit: usize,
) -> Result<(Vec<Adoption>, bool), ClusterError> {
    let mut adopted = Vec::new();
    let mut claimed = 0;
    for vpsd_id in owned_by(client, keys, from).await? {
        if let Some(live) = live {
            if successor(vpsd_id, live) != Some(me) {
                continue;
            }
        }
        if claimed == limit {
            return Ok((adopted, true));
        }
        claimed += 1;
        let claim = match claim(client, keys, me, vpsd_id, Some(from)).await {
            Ok(claim) => claim,
            Err(err) => {
                tracing::warn!(vpsd = vpsd_id, "takeover from {from} stopped: {err}");
                return Ok((adopted, true));
            }
        };
        match claim {
            Claim::Owned {
                epoch,
                state: Some(state),
                keys: Some(sealed),
            } => adopted.push(Adoption {
                vpsd_id,
                epoch,
                state,
                keys: sealed,
                from: from.to_owned(),
            }),
            Claim::Owned { epoch, .. } => {
                // Owned but never written: a provisioning that was never acknowledged.
                let _ = release(client, keys, me, vpsd_id, epoch).await;
            }
            Claim::Taken { owner } => {
                tracing::info!(vpsd = vpsd_id, "takeover: {owner} was faster");
            }
        }
    }
    Ok((adopted, false))
}

/// A takeover by hand: every vPSD of `from`, alive or not, handed to the adopter step by
/// step (the lease is renewed meanwhile by its own task).
async fn by_hand(
    client: &mut Client,
    keys: &Keys,
    me: &str,
    from: &str,
    adopter: Option<&Adopter>,
    lease: &LeaseClock,
) -> Result<usize, ClusterError> {
    let Some(adopter) = adopter else {
        return Err(ClusterError::NotServing);
    };
    if from == me {
        return Ok(0);
    }
    let mut count = 0;
    loop {
        if !lease.may_commit() {
            return Err(ClusterError::LeaseLost {
                silent_ms: lease.silent_ms(),
            });
        }
        let (taken, more) = take_over(client, keys, me, from, None, TAKEOVER_STEP).await?;
        count += taken.len();
        if !taken.is_empty() {
            adopter(taken);
        }
        if !more {
            break;
        }
    }
    tracing::warn!("takeover by hand: {count} vPSDs of {from} are now this appliance's");
    Ok(count)
}

/// Every member that ever joined, with whether it is alive and how many vPSDs it owns.
async fn members(client: &mut Client, keys: &Keys) -> Result<Vec<Member>, ClusterError> {
    let live = appliances(client, keys).await?;
    let prefix = keys.members();
    let response = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = Vec::new();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let id = key.strip_prefix(&prefix).unwrap_or(&key).to_owned();
        let owned = client
            .get(
                keys.owned_by(&id),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        let address = live.iter().find(|(live_id, _)| *live_id == id).map_or_else(
            || String::from_utf8_lossy(kv.value()).into_owned(),
            |(_, address)| address.clone(),
        );
        out.push(Member {
            alive: live.iter().any(|(live_id, _)| *live_id == id),
            id,
            address,
            vpsds: u32::try_from(owned).unwrap_or(u32::MAX),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    // What one cluster report holds (the protocol's bounds).
    out.truncate(MEMBERS_REPORTED_MAX);
    for member in &mut out {
        if member.address.len() > ADDRESS_REPORTED_MAX {
            member.address = "(address too long)".into();
        }
    }
    Ok(out)
}

/// One sweep: the vPSDs of members without a live appliance key, for those this appliance
/// succeeds.
async fn sweep_dead(
    client: &mut Client,
    keys: &Keys,
    me: &str,
) -> Result<(Vec<Adoption>, bool), ClusterError> {
    let live: Vec<String> = appliances(client, keys)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if !live.iter().any(|id| id == me) {
        return Ok((Vec::new(), false));
    }
    let members_prefix = keys.members();
    let members: Vec<String> = keys_under(client, &members_prefix)
        .await?
        .into_iter()
        .filter_map(|key| key.strip_prefix(&members_prefix).map(str::to_owned))
        .collect();
    let mut adopted = Vec::new();
    let mut more = false;
    for dead in members.iter().filter(|member| !live.contains(member)) {
        let left = TAKEOVER_STEP.saturating_sub(adopted.len());
        if left == 0 {
            more = true;
            break;
        }
        let (taken, rest) = take_over(client, keys, me, dead, Some(&live), left).await?;
        more |= rest;
        if !taken.is_empty() {
            tracing::warn!(
                "takeover: {} vPSDs of {dead} (its lease expired) are now this appliance's",
                taken.len()
            );
        }
        adopted.extend(taken);
    }
    Ok((adopted, more))
}

async fn appliances(
    client: &mut Client,
    keys: &Keys,
) -> Result<Vec<(String, String)>, ClusterError> {
    let prefix = keys.appliances();
    let response = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out: Vec<(String, String)> = response
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            (
                key.strip_prefix(&prefix).unwrap_or(&key).to_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}
