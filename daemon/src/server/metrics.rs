//! What the operator can read of a running appliance (the `stats` request): per shard,
//! counters and gauges in atomics and histograms behind a lock that only the owning shard
//! takes on its hot path (once per turn of its loop, once per write of answers), gathered
//! into one report on whichever shard answers the request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use hdrhistogram::Histogram;
use indicia_proto::message::{opcode, StatEntry, STATS_ENTRIES_MAX};
use indicia_proto::ErrorCode;

use super::shard::ShardStats;

/// The counters and gauges of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// Requests handled by the shard that owns their vPSD.
    Requests,
    /// Error answers and failed batch items, all codes (in the report, connection
    /// errors included).
    Errors,
    Sessions,
    Indicia,
    /// Sign requests refused because the shard's queue was full.
    Busy,
    /// Group commits (one fdatasync round each).
    Flushes,
    ConnectionsAccepted,
    /// Gauge: connections open on this shard now.
    ConnectionsOpen,
    /// Requests this shard's connections sent to the shard owning their vPSD.
    CrossShardRequests,
    /// Gauge: indicia queued for a session now.
    QueuedIndicia,
    /// Gauge: answers waiting for the journal to become durable.
    AwaitingDurable,
    /// Frames refused before they reached a shard (bad frames, bad bodies, handshake and
    /// access control errors).
    ConnectionErrors,
    /// Connections closed because they stayed idle past `idle_timeout_ms`.
    ConnectionsIdleClosed,
    /// Connections closed at accept because `connections_max` were open.
    ConnectionsRefused,
    /// Connections cut off because a write of answers blocked past `write_timeout_ms`.
    WriteTimeouts,
    /// Connections that ended in the TLS handshake: no client certificate, one from
    /// another issuer, not TLS at all, or too slow.
    TlsFailed,
    /// Answers made for a connection that could no longer take them: its client vanished
    /// or stopped reading (a failed or timed-out write), or, after the drain timeout at
    /// shutdown, its shard had stopped.
    AnswersUndelivered,
    /// Cluster mode: replicated rounds (one or more etcd transactions each).
    ClusterRounds,
    /// Cluster mode: vPSD states written to etcd (or tried).
    ClusterWrites,
    /// Cluster mode: writes the fence refused (the vPSD had moved): their records and
    /// answers were voided.
    ClusterFenced,
    /// Cluster mode: writes etcd refused as a whole (no lease, too large): voided.
    ClusterRefused,
    /// Cluster mode: rounds whose outcome was unknown (sent again).
    ClusterRetries,
    /// Cluster mode: vPSDs taken over from other appliances.
    ClusterAdopted,
    /// Cluster mode: changes refused because this appliance may not commit (its lease may
    /// have expired: self-fencing).
    ClusterUnavailable,
    /// Cluster mode, gauge: vPSDs this appliance owns.
    ClusterOwned,
    /// Cluster mode, gauge: shards that may commit now (0: the appliance is self-fenced).
    ClusterCommitting,
    /// Cluster mode: requests forwarded to the appliance that owns their vPSD.
    ClusterForwarded,
    /// Cluster mode: forwarded requests without an answer (the owner unreachable, or
    /// silent past `forward_timeout_ms`).
    ClusterForwardsFailed,
    /// Cluster mode: vPSDs handed over to another appliance (planned moves, drains,
    /// rebalancing).
    ClusterMovedAway,
    /// Cluster mode: answers given up as `outcome-unknown` (the lease lost while their
    /// writes were on their way to etcd).
    ClusterOutcomeUnknown,
    /// vPSDs the integrity monitor had this shard lock (their history did not reconcile).
    IntegrityLocks,
    /// Findings of the integrity monitor in this shard's journal (each counted once per run
    /// of the process).
    IntegrityFindings,
}

const COUNTERS: [(Counter, &str); 32] = [
    (Counter::Requests, "requests"),
    (Counter::Errors, "errors"),
    (Counter::Sessions, "sessions"),
    (Counter::Indicia, "indicia"),
    (Counter::Busy, "busy"),
    (Counter::Flushes, "flushes"),
    (Counter::ConnectionsAccepted, "connections.accepted"),
    (Counter::ConnectionsOpen, "connections.open"),
    (Counter::CrossShardRequests, "cross_shard.requests"),
    (Counter::QueuedIndicia, "queue.indicia"),
    (Counter::AwaitingDurable, "answers.awaiting_durable"),
    (Counter::ConnectionErrors, "connection_errors"),
    (Counter::ConnectionsIdleClosed, "connections.idle_closed"),
    (Counter::ConnectionsRefused, "connections.refused"),
    (Counter::WriteTimeouts, "connections.write_timeouts"),
    (Counter::TlsFailed, "connections.tls_failed"),
    (Counter::AnswersUndelivered, "answers.undelivered"),
    (Counter::ClusterRounds, "cluster.rounds"),
    (Counter::ClusterWrites, "cluster.writes"),
    (Counter::ClusterFenced, "cluster.fenced"),
    (Counter::ClusterRefused, "cluster.refused"),
    (Counter::ClusterRetries, "cluster.retries"),
    (Counter::ClusterAdopted, "cluster.adopted"),
    (Counter::ClusterUnavailable, "cluster.unavailable"),
    (Counter::ClusterOwned, "cluster.vpsds_owned"),
    (Counter::ClusterCommitting, "cluster.committing_shards"),
    (Counter::ClusterForwarded, "cluster.forwarded"),
    (Counter::ClusterForwardsFailed, "cluster.forwards_failed"),
    (Counter::ClusterMovedAway, "cluster.moved_away"),
    (Counter::ClusterOutcomeUnknown, "cluster.outcome_unknown"),
    (Counter::IntegrityLocks, "integrity.locks"),
    (Counter::IntegrityFindings, "integrity.findings"),
];

/// How Prometheus reads a counter of [`COUNTERS`]: its metric name (without the `indicia_`
/// prefix and, for counters, the `_total` suffix that the exposition adds), whether it is a
/// gauge, and its help text. Every counter is exported per shard (label `shard`); `errors`
/// is exported by code instead ([`ErrorsByCode`]).
pub const PROMETHEUS_COUNTERS: [(Counter, &str, bool, &str); 31] = [
    (
        Counter::Requests,
        "requests",
        false,
        "Requests handled by the shard that owns their vPSD.",
    ),
    (
        Counter::Sessions,
        "sessions",
        false,
        "Signing sessions committed.",
    ),
    (
        Counter::Indicia,
        "indicia_signed",
        false,
        "Indicia signed and committed.",
    ),
    (
        Counter::Busy,
        "busy",
        false,
        "Sign requests refused busy (the shard's queue was full).",
    ),
    (
        Counter::Flushes,
        "flushes",
        false,
        "Group commits of the journal (one fdatasync round each).",
    ),
    (
        Counter::ConnectionsAccepted,
        "connections_accepted",
        false,
        "Client connections accepted.",
    ),
    (
        Counter::ConnectionsOpen,
        "connections_open",
        true,
        "Client connections open now.",
    ),
    (
        Counter::CrossShardRequests,
        "cross_shard_requests",
        false,
        "Requests sent to the shard owning their vPSD.",
    ),
    (
        Counter::QueuedIndicia,
        "queued_indicia",
        true,
        "Indicia queued for a signing session now.",
    ),
    (
        Counter::AwaitingDurable,
        "answers_awaiting_durable",
        true,
        "Answers waiting for the journal to become durable now.",
    ),
    (
        Counter::ConnectionErrors,
        "connection_errors",
        false,
        "Frames refused before they reached a shard.",
    ),
    (
        Counter::ConnectionsIdleClosed,
        "connections_idle_closed",
        false,
        "Connections closed after idle_timeout_ms.",
    ),
    (
        Counter::ConnectionsRefused,
        "connections_refused",
        false,
        "Connections refused at accept (connections_max open).",
    ),
    (
        Counter::WriteTimeouts,
        "connection_write_timeouts",
        false,
        "Connections cut off because a write blocked past write_timeout_ms.",
    ),
    (
        Counter::TlsFailed,
        "connections_tls_failed",
        false,
        "Connections that ended in the TLS handshake.",
    ),
    (
        Counter::AnswersUndelivered,
        "answers_undelivered",
        false,
        "Answers whose connection could no longer take them.",
    ),
    (
        Counter::ClusterRounds,
        "cluster_rounds",
        false,
        "Cluster mode: replicated rounds to etcd.",
    ),
    (
        Counter::ClusterWrites,
        "cluster_writes",
        false,
        "Cluster mode: vPSD states written to etcd (or tried).",
    ),
    (
        Counter::ClusterFenced,
        "cluster_fenced",
        false,
        "Cluster mode: writes the fence refused (the vPSD had moved); voided.",
    ),
    (
        Counter::ClusterRefused,
        "cluster_refused",
        false,
        "Cluster mode: writes etcd refused as a whole; voided.",
    ),
    (
        Counter::ClusterRetries,
        "cluster_retries",
        false,
        "Cluster mode: rounds whose outcome was unknown, sent again.",
    ),
    (
        Counter::ClusterAdopted,
        "cluster_adopted",
        false,
        "Cluster mode: vPSDs taken over from other appliances.",
    ),
    (
        Counter::ClusterUnavailable,
        "cluster_unavailable",
        false,
        "Cluster mode: changes refused because this appliance may not commit (lease).",
    ),
    (
        Counter::ClusterOwned,
        "cluster_vpsds_owned",
        true,
        "Cluster mode: vPSDs this shard owns now.",
    ),
    (
        Counter::ClusterCommitting,
        "cluster_committing",
        true,
        "Cluster mode: 1 when the shard may commit, 0 when self-fenced (lease lost).",
    ),
    (
        Counter::ClusterForwarded,
        "cluster_forwarded",
        false,
        "Cluster mode: requests forwarded to their vPSD's owner.",
    ),
    (
        Counter::ClusterForwardsFailed,
        "cluster_forwards_failed",
        false,
        "Cluster mode: forwarded requests without an answer.",
    ),
    (
        Counter::ClusterMovedAway,
        "cluster_moved_away",
        false,
        "Cluster mode: vPSDs handed over to another appliance.",
    ),
    (
        Counter::ClusterOutcomeUnknown,
        "cluster_outcome_unknown",
        false,
        "Cluster mode: answers given up as outcome-unknown.",
    ),
    (
        Counter::IntegrityLocks,
        "integrity_locks",
        false,
        "vPSDs the integrity monitor locked (history did not reconcile).",
    ),
    (
        Counter::IntegrityFindings,
        "integrity_findings",
        false,
        "Findings of the integrity monitor in the shard's journal.",
    ),
];

/// The fixed buckets of the Prometheus latency histograms, in microseconds (exported in
/// seconds): 50 us to 10 s.
pub const LATENCY_BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The fixed buckets of the Prometheus session-size histogram, in indicia.
pub const SESSION_SIZE_BUCKETS: [u64; 13] =
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096];

/// A histogram as both readers need it: HDR for the percentiles of `stats`, and for
/// Prometheus the exact sum and the counts in fixed buckets.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub hdr: Histogram<u64>,
    /// The sum of every value recorded (after clamping to the HDR bounds).
    pub sum: u64,
    /// Values at most `bounds[i]` and above `bounds[i - 1]`, per bucket; values above the
    /// last bound are the count less all of these.
    pub buckets: Vec<u64>,
    pub bounds: &'static [u64],
}

impl Recorded {
    fn new(high: u64, bounds: &'static [u64]) -> Self {
        Self {
            hdr: histogram(high),
            sum: 0,
            buckets: vec![0; bounds.len()],
            bounds,
        }
    }

    fn record(&mut self, value: u64) {
        let value = value.clamp(1, self.hdr.high());
        self.hdr.saturating_record(value);
        self.sum = self.sum.saturating_add(value);
        let index = self.bounds.partition_point(|bound| *bound < value);
        if let Some(bucket) = self.buckets.get_mut(index) {
            *bucket += 1;
        }
    }

    pub fn count(&self) -> u64 {
        self.hdr.len()
    }
}

/// What Prometheus reads of one shard's histograms ([`ShardMetrics::prometheus`]).
#[derive(Debug, Clone)]
pub struct ShardHistograms {
    pub session_size: Recorded,
    pub commit_latency_us: Recorded,
    pub replica_latency_us: Recorded,
    pub errors_by_code: BTreeMap<u16, u64>,
    pub request_latency_us: Vec<(RequestKind, Recorded)>,
}

/// What a request asks for, by its opcode: the `<kind>` of the `request_latency_us.<kind>`
/// entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum RequestKind {
    Hello,
    Authenticate,
    Sign,
    SignBatch,
    Status,
    PublicKey,
    Verify,
    Provision,
    Refill,
    Contact,
    Lock,
    Unlock,
    Withdraw,
    RotateKey,
    Stats,
    ClusterStatus,
    ClusterTakeover,
    Forwarded,
    ClusterPlacement,
    ClusterMove,
    ClusterDrain,
    ClusterPin,
    ClusterAdopt,
    Topology,
    Backup,
}

impl RequestKind {
    /// Every kind, in the order of the report.
    pub const ALL: [Self; 25] = [
        Self::Sign,
        Self::SignBatch,
        Self::Status,
        Self::Refill,
        Self::Contact,
        Self::Provision,
        Self::PublicKey,
        Self::Verify,
        Self::Lock,
        Self::Unlock,
        Self::Withdraw,
        Self::RotateKey,
        Self::Stats,
        Self::ClusterStatus,
        Self::ClusterTakeover,
        Self::Forwarded,
        Self::ClusterPlacement,
        Self::ClusterMove,
        Self::ClusterDrain,
        Self::ClusterPin,
        Self::ClusterAdopt,
        Self::Topology,
        Self::Backup,
        Self::Hello,
        Self::Authenticate,
    ];

    /// The kind of a request frame's opcode; None for one that is not a request opcode.
    pub fn of_opcode(code: u8) -> Option<Self> {
        Some(match code {
            opcode::HELLO => Self::Hello,
            opcode::AUTHENTICATE => Self::Authenticate,
            opcode::SIGN => Self::Sign,
            opcode::SIGN_BATCH => Self::SignBatch,
            opcode::STATUS => Self::Status,
            opcode::PUBLIC_KEY => Self::PublicKey,
            opcode::VERIFY => Self::Verify,
            opcode::PROVISION => Self::Provision,
            opcode::REFILL => Self::Refill,
            opcode::CONTACT => Self::Contact,
            opcode::LOCK => Self::Lock,
            opcode::UNLOCK => Self::Unlock,
            opcode::WITHDRAW => Self::Withdraw,
            opcode::ROTATE_KEY => Self::RotateKey,
            opcode::STATS => Self::Stats,
            opcode::CLUSTER_STATUS => Self::ClusterStatus,
            opcode::CLUSTER_TAKEOVER => Self::ClusterTakeover,
            opcode::FORWARDED => Self::Forwarded,
            opcode::CLUSTER_PLACEMENT => Self::ClusterPlacement,
            opcode::CLUSTER_MOVE => Self::ClusterMove,
            opcode::CLUSTER_DRAIN => Self::ClusterDrain,
            opcode::CLUSTER_PIN => Self::ClusterPin,
            opcode::CLUSTER_ADOPT => Self::ClusterAdopt,
            opcode::TOPOLOGY => Self::Topology,
            opcode::BACKUP => Self::Backup,
            _ => return None,
        })
    }

    /// The request's name in snake_case, as in the stats entries.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::Authenticate => "authenticate",
            Self::Sign => "sign",
            Self::SignBatch => "sign_batch",
            Self::Status => "status",
            Self::PublicKey => "public_key",
            Self::Verify => "verify",
            Self::Provision => "provision",
            Self::Refill => "refill",
            Self::Contact => "contact",
            Self::Lock => "lock",
            Self::Unlock => "unlock",
            Self::Withdraw => "withdraw",
            Self::RotateKey => "rotate_key",
            Self::Stats => "stats",
            Self::ClusterStatus => "cluster_status",
            Self::ClusterTakeover => "cluster_takeover",
            Self::Forwarded => "forwarded",
            Self::ClusterPlacement => "cluster_placement",
            Self::ClusterMove => "cluster_move",
            Self::ClusterDrain => "cluster_drain",
            Self::ClusterPin => "cluster_pin",
            Self::ClusterAdopt => "cluster_adopt",
            Self::Topology => "topology",
            Self::Backup => "backup",
        }
    }
}

/// A request as its answer remembers it, for the latency histograms: its kind and when its
/// frame was complete in the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub kind: RequestKind,
    pub at: Instant,
}

/// Upper bound of the latency histograms, in microseconds (one minute).
const LATENCY_US_MAX: u64 = 60_000_000;
/// Upper bound of the session-size histogram.
const SESSION_SIZE_MAX: u64 = 1 << 16;

#[derive(Debug)]
struct Histograms {
    session_size: Recorded,
    commit_latency_us: Recorded,
    /// Cluster mode: how long etcd took to answer a round's writes.
    replica_latency_us: Recorded,
    errors_by_code: BTreeMap<u16, u64>,
    /// By [`RequestKind`]; made at the first request of the kind (a histogram is about
    /// 20 KiB, and most kinds are rare).
    request_latency_us: [Option<Recorded>; RequestKind::ALL.len()],
}

fn latency() -> Recorded {
    Recorded::new(LATENCY_US_MAX, &LATENCY_BUCKETS_US)
}

/// One shard's metrics.
#[derive(Debug)]
pub struct ShardMetrics {
    counters: [AtomicU64; COUNTERS.len()],
    histograms: Mutex<Histograms>,
}

fn histogram(high: u64) -> Histogram<u64> {
    // Two significant digits: 1% resolution is plenty for an operator and keeps each
    // histogram a few KiB. Bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, high, 2).unwrap_or_else(|_| unreachable!("constant bounds"))
}

impl Default for ShardMetrics {
    fn default() -> Self {
        Self {
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            histograms: Mutex::new(Histograms {
                session_size: Recorded::new(SESSION_SIZE_MAX, &SESSION_SIZE_BUCKETS),
                commit_latency_us: latency(),
                replica_latency_us: latency(),
                errors_by_code: BTreeMap::new(),
                request_latency_us: std::array::from_fn(|_| None),
            }),
        }
    }
}

impl ShardMetrics {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    pub fn add(&self, counter: Counter, value: u64) {
        self.counters[counter as usize].fetch_add(value, Ordering::Relaxed);
    }

    pub fn sub(&self, counter: Counter, value: u64) {
        self.counters[counter as usize].fetch_sub(value, Ordering::Relaxed);
    }

    pub fn set(&self, counter: Counter, value: u64) {
        self.counters[counter as usize].store(value, Ordering::Relaxed);
    }

    fn histograms(&self) -> std::sync::MutexGuard<'_, Histograms> {
        // A panic while holding this lock aborts the process (panic = abort in release);
        // in tests, the data is still consistent enough to read.
        self.histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Copies the shard core's counters and drains what it recorded during the turn.
    pub fn publish(&self, stats: &mut ShardStats, queued_indicia: usize, awaiting: usize) {
        self.set(Counter::Requests, stats.requests);
        self.set(Counter::Errors, stats.errors);
        self.set(Counter::Sessions, stats.sessions);
        self.set(Counter::Indicia, stats.indicia);
        self.set(Counter::Busy, stats.busy);
        self.set(Counter::Flushes, stats.flushes);
        self.set(Counter::QueuedIndicia, queued_indicia as u64);
        self.set(Counter::AwaitingDurable, awaiting as u64);
        if stats.session_sizes.is_empty() && stats.new_errors.is_empty() {
            return;
        }
        let mut histograms = self.histograms();
        for size in stats.session_sizes.drain(..) {
            histograms.session_size.record(u64::from(size));
        }
        for code in stats.new_errors.drain(..) {
            *histograms.errors_by_code.entry(code).or_default() += 1;
        }
    }

    /// An error answered before the request reached a shard.
    pub fn connection_error(&self, code: ErrorCode) {
        self.add(Counter::ConnectionErrors, 1);
        *self
            .histograms()
            .errors_by_code
            .entry(code.wire())
            .or_default() += 1;
    }

    pub fn record_commit(&self, latency_us: u64) {
        self.histograms().commit_latency_us.record(latency_us);
    }

    /// How long etcd took to answer one round's writes.
    pub fn record_replica(&self, latency_us: u64) {
        self.histograms().replica_latency_us.record(latency_us);
    }

    /// A copy of the histograms, for the Prometheus exposition (one lock, a few KiB each).
    pub fn prometheus(&self) -> ShardHistograms {
        let histograms = self.histograms();
        ShardHistograms {
            session_size: histograms.session_size.clone(),
            commit_latency_us: histograms.commit_latency_us.clone(),
            replica_latency_us: histograms.replica_latency_us.clone(),
            errors_by_code: histograms.errors_by_code.clone(),
            request_latency_us: RequestKind::ALL
                .iter()
                .filter_map(|&kind| {
                    histograms.request_latency_us[kind as usize]
                        .as_ref()
                        .map(|recorded| (kind, recorded.clone()))
                })
                .collect(),
        }
    }

    /// Copies the shard core's cluster counters (cluster mode).
    pub fn publish_cluster(
        &self,
        stats: &ShardStats,
        owned: Option<usize>,
        may_commit: Option<bool>,
    ) {
        let Some(owned) = owned else {
            return;
        };
        self.set(Counter::ClusterRounds, stats.replica_rounds);
        self.set(Counter::ClusterWrites, stats.replica_writes);
        self.set(Counter::ClusterFenced, stats.fenced);
        self.set(Counter::ClusterRefused, stats.refused);
        self.set(Counter::ClusterRetries, stats.replica_retries);
        self.set(Counter::ClusterAdopted, stats.adopted);
        self.set(Counter::ClusterUnavailable, stats.unavailable);
        self.set(Counter::ClusterOutcomeUnknown, stats.outcome_unknown);
        self.set(Counter::ClusterOwned, owned as u64);
        self.set(
            Counter::ClusterCommitting,
            u64::from(may_commit.unwrap_or(false)),
        );
    }

    /// The answers to `requests` were handed to the socket at `answered`: one lock for a
    /// whole write of answers.
    pub fn record_answered(&self, answered: Instant, requests: &[Received]) {
        if requests.is_empty() {
            return;
        }
        let mut histograms = self.histograms();
        for request in requests {
            let latency_us = answered.saturating_duration_since(request.at).as_micros();
            histograms.request_latency_us[request.kind as usize]
                .get_or_insert_with(latency)
                .record(u64::try_from(latency_us).unwrap_or(u64::MAX));
        }
    }
}

/// Every shard's metrics, shared by all shards.
#[derive(Debug)]
pub struct Metrics {
    pub shards: Vec<ShardMetrics>,
    started: Instant,
}

impl Metrics {
    pub fn new(shards: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..shards).map(|_| ShardMetrics::default()).collect(),
            started: Instant::now(),
        })
    }

    /// Seconds since the appliance started.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn total(&self, counter: Counter) -> u64 {
        self.shards.iter().map(|shard| shard.get(counter)).sum()
    }

    /// The `stats` answer: totals, errors by code, histogram summaries, then per-shard
    /// counters (as many shards as fit in one report).
    pub fn report(&self) -> Vec<StatEntry> {
        let mut entries = Vec::new();
        let mut push = |name: String, value: u64| entries.push(StatEntry { name, value });
        push("uptime_s".into(), self.started.elapsed().as_secs());
        push("shards".into(), self.shards.len() as u64);
        for (counter, name) in COUNTERS {
            let mut value = self.total(counter);
            if counter == Counter::Errors {
                // All errors, so that the `errors.<code>` entries add up to it.
                value += self.total(Counter::ConnectionErrors);
            }
            push(name.into(), value);
        }
        let mut session_size = histogram(SESSION_SIZE_MAX);
        let mut commit_latency_us = histogram(LATENCY_US_MAX);
        let mut replica_latency_us = histogram(LATENCY_US_MAX);
        let mut errors_by_code = BTreeMap::<u16, u64>::new();
        let mut request_latency_us: [Histogram<u64>; RequestKind::ALL.len()] =
            std::array::from_fn(|_| histogram(LATENCY_US_MAX));
        for shard in &self.shards {
            let histograms = shard.histograms();
            // Same bounds on both sides: adding cannot fail.
            let _ = session_size.add(&histograms.session_size.hdr);
            let _ = commit_latency_us.add(&histograms.commit_latency_us.hdr);
            let _ = replica_latency_us.add(&histograms.replica_latency_us.hdr);
            for (code, count) in &histograms.errors_by_code {
                *errors_by_code.entry(*code).or_default() += count;
            }
            for (sum, recorded) in request_latency_us
                .iter_mut()
                .zip(&histograms.request_latency_us)
            {
                if let Some(recorded) = recorded {
                    let _ = sum.add(&recorded.hdr);
                }
            }
        }
        for (code, count) in errors_by_code {
            push(
                format!("errors.{}", ErrorCode::from_wire(code).name()),
                count,
            );
        }
        let mut summaries = vec![
            ("session_size".to_owned(), &session_size),
            ("commit_latency_us".to_owned(), &commit_latency_us),
        ];
        if !replica_latency_us.is_empty() {
            summaries.push(("cluster.commit_latency_us".to_owned(), &replica_latency_us));
        }
        for kind in RequestKind::ALL {
            summaries.push((
                format!("request_latency_us.{}", kind.name()),
                &request_latency_us[kind as usize],
            ));
        }
        for (name, histogram) in summaries {
            push(format!("{name}.count"), histogram.len());
            if histogram.is_empty() {
                continue;
            }
            push(format!("{name}.mean"), histogram.mean().round() as u64);
            for (label, quantile) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
                push(
                    format!("{name}.{label}"),
                    histogram.value_at_quantile(quantile),
                );
            }
            push(format!("{name}.max"), histogram.max());
        }
        let per_shard = [
            (Counter::Requests, "requests"),
            (Counter::Sessions, "sessions"),
            (Counter::Indicia, "indicia"),
            (Counter::QueuedIndicia, "queue.indicia"),
        ];
        for (index, shard) in self.shards.iter().enumerate() {
            if entries.len() + per_shard.len() > STATS_ENTRIES_MAX {
                break;
            }
            for (counter, name) in per_shard {
                entries.push(StatEntry {
                    name: format!("shard.{index}.{name}"),
                    value: shard.get(counter),
                });
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(entries: &[StatEntry], name: &str) -> Option<u64> {
        entries
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| entry.value)
    }

    #[test]
    fn the_report_sums_shards_and_summarizes_histograms() {
        let metrics = Metrics::new(3);
        let mut stats = ShardStats {
            requests: 10,
            indicia: 7,
            sessions: 2,
            session_sizes: vec![3, 4],
            new_errors: vec![ErrorCode::InsufficientFunds.wire()],
            ..ShardStats::default()
        };
        metrics.shards[0].publish(&mut stats, 5, 1);
        assert!(stats.session_sizes.is_empty() && stats.new_errors.is_empty());
        let mut other = ShardStats {
            requests: 1,
            session_sizes: vec![100],
            ..ShardStats::default()
        };
        metrics.shards[2].publish(&mut other, 0, 0);
        metrics.shards[1].connection_error(ErrorCode::Forbidden);
        metrics.shards[1].record_commit(250);
        let report = metrics.report();
        assert_eq!(value(&report, "requests"), Some(11));
        assert_eq!(value(&report, "indicia"), Some(7));
        assert_eq!(value(&report, "queue.indicia"), Some(5));
        assert_eq!(value(&report, "errors.insufficient-funds"), Some(1));
        assert_eq!(value(&report, "errors.forbidden"), Some(1));
        assert_eq!(value(&report, "connection_errors"), Some(1));
        assert_eq!(value(&report, "session_size.count"), Some(3));
        assert_eq!(value(&report, "session_size.max"), Some(100));
        assert_eq!(value(&report, "session_size.p50"), Some(4));
        assert_eq!(value(&report, "commit_latency_us.count"), Some(1));
        assert_eq!(value(&report, "shard.2.requests"), Some(1));
        assert_eq!(value(&report, "shard.1.requests"), Some(0));
        let p99 = value(&report, "commit_latency_us.p99").unwrap();
        assert!((248..=252).contains(&p99), "{p99}");
    }

    #[test]
    fn a_report_of_many_shards_fits_one_frame() {
        let metrics = Metrics::new(crate::config::SHARDS_MAX);
        // Every entry there can be: every error code, every histogram recorded.
        let shard = &metrics.shards[0];
        for code in ErrorCode::all() {
            shard.connection_error(code);
        }
        shard.publish(
            &mut ShardStats {
                session_sizes: vec![1],
                ..ShardStats::default()
            },
            0,
            0,
        );
        shard.record_commit(1);
        let now = Instant::now();
        let requests: Vec<Received> = RequestKind::ALL
            .iter()
            .map(|&kind| Received { kind, at: now })
            .collect();
        shard.record_answered(now, &requests);
        let report = metrics.report();
        assert!(report.len() <= STATS_ENTRIES_MAX);
        assert!(report
            .iter()
            .all(|entry| entry.name.len() <= indicia_proto::message::STAT_NAME_BYTES_MAX));
        assert!(report.iter().any(|entry| entry.name == "shard.0.indicia"));
    }

    #[test]
    fn request_latencies_are_summarized_per_kind_and_summed_over_shards() {
        let metrics = Metrics::new(2);
        let start = Instant::now();
        let at = |us: u64| start + std::time::Duration::from_micros(us);
        let sign = |us: u64| Received {
            kind: RequestKind::Sign,
            at: start + std::time::Duration::from_micros(1_000 - us),
        };
        metrics.shards[0].record_answered(at(1_000), &[sign(100), sign(200), sign(300)]);
        metrics.shards[1].record_answered(
            at(1_000),
            &[
                sign(400),
                Received {
                    kind: RequestKind::SignBatch,
                    at: start,
                },
            ],
        );
        let report = metrics.report();
        assert_eq!(value(&report, "request_latency_us.sign.count"), Some(4));
        // Two significant digits: values within 1 %.
        let mean = value(&report, "request_latency_us.sign.mean").unwrap();
        assert!((248..=252).contains(&mean), "{mean}");
        let p50 = value(&report, "request_latency_us.sign.p50").unwrap();
        assert!((199..=201).contains(&p50), "{p50}");
        let max = value(&report, "request_latency_us.sign.max").unwrap();
        assert!((399..=401).contains(&max), "{max}");
        assert_eq!(
            value(&report, "request_latency_us.sign_batch.count"),
            Some(1)
        );
        // A kind never seen: its count, and no percentiles.
        assert_eq!(
            value(&report, "request_latency_us.rotate_key.count"),
            Some(0)
        );
        assert_eq!(value(&report, "request_latency_us.rotate_key.p50"), None);
    }

    #[test]
    fn every_request_opcode_has_a_kind_and_every_kind_one_opcode() {
        let kinds: Vec<RequestKind> = (0..=u8::MAX).filter_map(RequestKind::of_opcode).collect();
        assert_eq!(kinds.len(), RequestKind::ALL.len());
        for kind in RequestKind::ALL {
            assert_eq!(kinds.iter().filter(|&&k| k == kind).count(), 1, "{kind:?}");
        }
        assert_eq!(RequestKind::of_opcode(opcode::SIGNED), None);
    }
}
