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

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::fence::{judge, Outcome, Seen, StateWrite, WRITES_PER_TXN_MAX};
use super::keys::Keys;
use super::ClusterError;

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
}

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
    },
    /// Another appliance owns it.
    Taken { owner: String },
}

type Reply<T> = mpsc::SyncSender<Result<T, ClusterError>>;

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
    Appliances {
        reply: Reply<Vec<(String, String)>>,
    },
}

/// The connection to etcd: its thread, and the lease.
#[derive(Debug)]
pub struct Etcd {
    commands: Option<tokio::sync::mpsc::UnboundedSender<Command>>,
    lease: Arc<LeaseClock>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Commit { .. } => "Commit",
            Self::Claim { .. } => "Claim",
            Self::Appliances { .. } => "Appliances",
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
        let thread = std::thread::Builder::new()
            .name("indicia-etcd".into())
            .spawn(move || run(config, clock, receiver, ready))
            .map_err(ClusterError::Thread)?;
        match started.recv() {
            Ok(Ok(())) => Ok(Self {
                commands: Some(commands),
                lease,
                thread: Some(thread),
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

    fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClusterError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.commands
            .as_ref()
            .ok_or(ClusterError::Stopped)?
            .send(command(reply))
            .map_err(|_| ClusterError::Stopped)?;
        answer.recv().map_err(|_| ClusterError::Stopped)?
    }

    /// Writes a round's states, each fenced by its owner's epoch and its last revision;
    /// one outcome per write, in order. Refused as a whole while the lease may have
    /// expired. Blocking.
    pub fn commit(&self, writes: Vec<StateWrite>) -> Result<Vec<Outcome>, ClusterError> {
        if !self.may_commit() {
            return Err(ClusterError::LeaseLost {
                silent_ms: self.lease.silent_ms(),
            });
        }
        self.call(|reply| Command::Commit { writes, reply })
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
        let mut session = match Session::start(&mut client, &keys, &config, &lease).await {
            Ok(session) => session,
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(err) = session.renew(&lease, ttl).await {
                        lease.failures.fetch_add(1, Ordering::AcqRel);
                        tracing::warn!(
                            "etcd: the lease was not renewed ({err}); commits stop {} ms after \
                             the last renewal",
                            ttl.saturating_sub(ttl / 5).as_millis()
                        );
                        if lease.expired.load(Ordering::Acquire) || lease.silent_ms() > ttl.as_millis() as u64 {
                            // Gone: a new lease, and the appliance announced again.
                            match Session::start(&mut client, &keys, &config, &lease).await {
                                Ok(fresh) => {
                                    tracing::warn!("etcd: a new lease was granted");
                                    session = fresh;
                                }
                                Err(err) => tracing::warn!("etcd: no new lease yet: {err}"),
                            }
                        }
                    }
                }
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    handle(&mut client, &keys, &config.appliance, command).await;
                }
            }
        }
        // A clean stop: the lease goes now, with the appliance's key.
        let _ = client.lease_revoke(session.id).await;
    });
}

/// One lease and its keep-alive stream.
struct Session {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl Session {
    async fn start(
        client: &mut Client,
        keys: &Keys,
        config: &EtcdConfig,
        lease: &LeaseClock,
    ) -> Result<Self, ClusterError> {
        let sent = Instant::now();
        let ttl_s = i64::try_from(config.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = client.lease_grant(ttl_s, None).await?;
        let id = granted.id();
        client
            .put(
                keys.appliance(&config.appliance),
                config.advertise.clone(),
                Some(PutOptions::new().with_lease(id)),
            )
            .await?;
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
            let _ = reply.send(commit(client, keys, &writes).await);
        }
        Command::Claim {
            vpsd_id,
            from,
            reply,
        } => {
            let _ = reply.send(claim(client, keys, appliance, vpsd_id, from.as_deref()).await);
        }
        Command::Appliances { reply } => {
            let _ = reply.send(appliances(client, keys).await);
        }
    }
}

async fn commit(
    client: &mut Client,
    keys: &Keys,
    writes: &[StateWrite],
) -> Result<Vec<Outcome>, ClusterError> {
    let mut outcomes = vec![Outcome::Retry; writes.len()];
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    for _ in 0..ROUND_ATTEMPTS_MAX {
        if pending.is_empty() {
            break;
        }
        let mut again = Vec::new();
        for batch in pending.chunks(WRITES_PER_TXN_MAX) {
            let mut compares = Vec::with_capacity(batch.len() * 2);
            let mut puts = Vec::with_capacity(batch.len());
            let mut reads = Vec::with_capacity(batch.len() * 2);
            for &index in batch {
                let write = &writes[index];
                let (owner, state) = (keys.owner(write.vpsd_id), keys.state(write.vpsd_id));
                compares.push(Compare::mod_revision(
                    owner.clone(),
                    CompareOp::Equal,
                    write.epoch,
                ));
                compares.push(Compare::mod_revision(
                    state.clone(),
                    CompareOp::Equal,
                    write.last,
                ));
                puts.push(TxnOp::put(state.clone(), write.state.clone(), None));
                reads.push(TxnOp::get(owner, None));
                reads.push(TxnOp::get(state, None));
            }
            let response = client
                .txn(Txn::new().when(compares).and_then(puts).or_else(reads))
                .await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |header| header.revision());
                for &index in batch {
                    outcomes[index] = Outcome::Written { revision };
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
                let first = |answer: &TxnOpResponse| match answer {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                        (
                            String::from_utf8_lossy(kv.value()).into_owned(),
                            kv.mod_revision(),
                        )
                    }),
                    _ => None,
                };
                let seen = Seen {
                    owner: first(&pair[0]),
                    state_revision: first(&pair[1]).map_or(0, |(_, revision)| revision),
                };
                match judge(&writes[index], &seen) {
                    Outcome::Retry => again.push(index),
                    outcome => outcomes[index] = outcome,
                }
            }
        }
        pending = again;
    }
    Ok(outcomes)
}

async fn claim(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    vpsd_id: u64,
    from: Option<&str>,
) -> Result<Claim, ClusterError> {
    let (owner_key, state_key) = (keys.owner(vpsd_id), keys.state(vpsd_id));
    let current = client.get(owner_key.clone(), None).await?;
    let compare = match current.kvs().first() {
        None => Compare::create_revision(owner_key.clone(), CompareOp::Equal, 0),
        Some(kv) if kv.value() == appliance.as_bytes() => {
            // Already this appliance's (it restarted): the epoch stands.
            let state = client.get(state_key, None).await?;
            return Ok(Claim::Owned {
                epoch: kv.mod_revision(),
                state: state
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            });
        }
        Some(kv) if from.is_some_and(|from| kv.value() == from.as_bytes()) => {
            Compare::mod_revision(owner_key.clone(), CompareOp::Equal, kv.mod_revision())
        }
        Some(kv) => {
            return Ok(Claim::Taken {
                owner: String::from_utf8_lossy(kv.value()).into_owned(),
            })
        }
    };
    let response = client
        .txn(
            Txn::new()
                .when(vec![compare])
                .and_then(vec![
                    TxnOp::put(owner_key.clone(), appliance, None),
                    TxnOp::get(state_key, None),
                ])
                .or_else(vec![TxnOp::get(owner_key, None)]),
        )
        .await?;
    let answers = response.op_responses();
    let kv_of = |answer: Option<&TxnOpResponse>| match answer {
        Some(TxnOpResponse::Get(get)) => get
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    };
    if response.succeeded() {
        Ok(Claim::Owned {
            epoch: response.header().map_or(0, |header| header.revision()),
            state: kv_of(answers.get(1)),
        })
    } else {
        Ok(Claim::Taken {
            owner: kv_of(answers.first())
                .map(|(owner, _)| String::from_utf8_lossy(&owner).into_owned())
                .unwrap_or_default(),
        })
    }
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
