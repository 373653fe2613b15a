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
//!
//! Here: [`Etcd`], its commands and the thread's loop. `lease`: joining, the lease and
//! its keep-alive task. `commit`: the fenced transactions of the shards' rounds, merged
//! across shards. `ownership`: claims, the owners' index, takeovers and the members.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::sync::oneshot;

mod commit;
mod lease;
mod moves;
mod ownership;

use super::fence::{batches, judge, Outcome, Seen, StateWrite};
use super::keys::Keys;
use super::placement::Placement;
use super::{
    successor, Adoption, ClusterError, CommitFuture, HandOver, Handover, Member, Operation,
    Pending, Replicator, ReportFuture, Stored,
};
use commit::*;
use lease::*;
use moves::*;
use ownership::*;

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
    /// Whether vPSDs are placed, and moved, by rendezvous hashing (`[cluster] rebalance`).
    pub rebalance: bool,
}

/// The latest placement, shared by the etcd thread (which reads it) and the shards.
type SharedPlacement = Arc<std::sync::Mutex<Arc<Placement>>>;

/// Where the vPSDs this appliance takes over go.
pub type Adopter = Box<dyn Fn(Vec<Adoption>) + Send>;

/// How long a shard's round waits on the etcd thread for another shard's, to share its
/// transactions; and how many rounds go without waiting after a wait that found none.
const SHARED_ROUND_WAIT: Duration = Duration::from_micros(500);
const ROUNDS_ALONE_AFTER_A_WAIT: u32 = 8;

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
    Locate {
        vpsd_ids: Vec<u64>,
        reply: Reply<Vec<Option<String>>>,
    },
    HandOver {
        handover: Handover,
        reply: Reply<HandOver>,
    },
    Operate {
        operation: Operation,
        reply: Reply<(u32, Vec<Member>)>,
    },
}

/// The connection to etcd: its thread, and the lease.
#[derive(Debug)]
pub struct Etcd {
    commands: Option<tokio::sync::mpsc::UnboundedSender<Command>>,
    lease: Arc<LeaseClock>,
    thread: Option<std::thread::JoinHandle<()>>,
    appliance: String,
    placement: SharedPlacement,
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
            Self::Locate { .. } => "Locate",
            Self::HandOver { .. } => "HandOver",
            Self::Operate { .. } => "Operate",
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
            no_space: AtomicBool::new(false),
        });
        let (commands, receiver) = tokio::sync::mpsc::unbounded_channel();
        let (ready, started) = mpsc::sync_channel(1);
        let clock = Arc::clone(&lease);
        let appliance = config.appliance.clone();
        let placement: SharedPlacement = Arc::default();
        let shared = Arc::clone(&placement);
        let thread = std::thread::Builder::new()
            .name("indicia-etcd".into())
            .spawn(move || run(config, clock, shared, receiver, ready))
            .map_err(ClusterError::Thread)?;
        match started.recv() {
            Ok(Ok(())) => Ok(Self {
                commands: Some(commands),
                lease,
                thread: Some(thread),
                appliance,
                placement,
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

    /// Sends a command; its answer as a future.
    fn pending<T: Send + 'static>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Pending<T> {
        match self.send(command) {
            Ok(answer) => Box::pin(async move { answer.await.map_err(|_| ClusterError::Stopped)? }),
            Err(err) => Box::pin(async move { Err(err) }),
        }
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

    fn may_change(&self) -> bool {
        Etcd::may_commit(self) && !self.lease.no_space.load(Ordering::Acquire)
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
        self.pending(|reply| Command::Report {
            take_over_from,
            reply,
        })
    }

    fn placement(&self) -> Arc<Placement> {
        Arc::clone(
            &self
                .placement
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn locate(&self, vpsd_ids: Vec<u64>) -> Pending<Vec<Option<String>>> {
        self.pending(|reply| Command::Locate { vpsd_ids, reply })
    }

    fn fetch(&self, vpsd_id: u64) -> Pending<Stored> {
        let stored = self.pending(|reply| Command::Load {
            vpsd_ids: vec![vpsd_id],
            reply,
        });
        Box::pin(async move { Ok(stored.await?.pop().unwrap_or_default()) })
    }

    fn hand_over(&self, handover: Handover) -> Pending<HandOver> {
        if !self.may_commit() {
            let silent_ms = self.lease.silent_ms();
            return Box::pin(async move { Err(ClusterError::LeaseLost { silent_ms }) });
        }
        self.pending(|reply| Command::HandOver { handover, reply })
    }

    fn operate(&self, operation: Operation) -> ReportFuture {
        self.pending(|reply| Command::Operate { operation, reply })
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
    placement: SharedPlacement,
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
        // HTTP/2 pings, while requests or the lease's stream are open on a connection, find
        // a member that went silent (cut off, its host gone) within about half a TTL, so
        // that requests go to the others instead of timing out one after another; a member
        // without a leader answers at once instead of waiting. etcd must allow pings this
        // often (`--grpc-keepalive-min-time`, docs/CLUSTER.md section 9.1); it refuses
        // pings on a connection without streams whatever that says, so none are sent then.
        let options = ConnectOptions::new()
            .with_connect_timeout(ttl / 3)
            .with_timeout(ttl / 3)
            .with_keep_alive(ttl / 4, ttl / 4)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
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
        refresh_placement(&mut client, &keys, &config, &placement).await;
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
        // Placement is read again twice a TTL: a new appliance is given vPSDs within about
        // one TTL of its start.
        let mut reread = tokio::time::interval(ttl / 2);
        reread.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = reread.tick() => {
                    refresh_placement(&mut client, &keys, &config, &placement).await;
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
                        Command::HandOver { handover, reply } => {
                            let mut placed = true;
                            if let Some(account) = &handover.rebalancing {
                                // Read again only if it may miss a change: one made after
                                // the vPSD became this appliance's (a pin before a move).
                                let read_at = placement
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .revision;
                                if read_at <= handover.epoch {
                                    refresh_placement(&mut client, &keys, &config, &placement)
                                        .await;
                                }
                                let now = Arc::clone(
                                    &placement
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                                );
                                placed = now.place(handover.vpsd_id, Some(account), me)
                                    == Some(handover.to.as_str());
                            }
                            let done = if placed {
                                hand_over(&mut client, &keys, me, &handover).await
                            } else {
                                Ok(HandOver::Misplaced)
                            };
                            let _ = reply.send(done);
                        }
                        Command::Operate { operation, reply } => {
                            let done = operate(&mut client, &keys, &operation).await;
                            refresh_placement(&mut client, &keys, &config, &placement).await;
                            let _ = reply.send(match done {
                                Ok(()) => members(&mut client, &keys).await.map(|members| (0, members)),
                                Err(err) => Err(err),
                            });
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
                            commit_rounds(&mut client, &keys, me, rounds, &lease).await;
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

/// Reads placement again and shares it; a failure keeps the last one (and says so).
async fn refresh_placement(
    client: &mut Client,
    keys: &Keys,
    config: &EtcdConfig,
    shared: &SharedPlacement,
) {
    match read_placement(client, keys, config.rebalance).await {
        Ok(placement) => {
            *shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(placement);
        }
        Err(err) => tracing::debug!("etcd: placement not read: {err}"),
    }
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

async fn handle(client: &mut Client, keys: &Keys, appliance: &str, command: Command) {
    match command {
        // Handled by the loop, which gathers the rounds of several shards.
        Command::Commit { reply, .. } => {
            let _ = reply.send(Err(ClusterError::Stopped));
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
        Command::Locate { vpsd_ids, reply } => {
            let _ = reply.send(locate(client, keys, &vpsd_ids).await);
        }
        // Handled by the loop, which holds the placement.
        Command::HandOver { reply, .. } => {
            let _ = reply.send(Err(ClusterError::Stopped));
        }
        // Handled by the loop, which holds the placement.
        Command::Operate { reply, .. } => {
            let _ = reply.send(Err(ClusterError::Stopped));
        }
    }
}
