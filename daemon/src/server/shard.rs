//! One shard's request handling, sans-io: requests in, answers out, and the rule that no
//! answer leaves before the journal bytes that justify it are durable.
//!
//! The executor around it (glommio, one per core) feeds authorized requests for the vPSDs
//! this shard owns, calls [`ShardCore::run_sessions`] once per turn of its loop, flushes
//! with [`ShardCore::flush_ticket`] / [`ShardCore::complete`] (group commit: one flush for
//! every session of the turn), and sends what [`ShardCore::take_ready`] returns.
//!
//! A vPSD's session runs until its record is durable: the vPSD takes its next session only
//! after the flush that covers it, so everything that queued during the signing and the
//! commit joins that next session (natural batching across the commit).
//!
//! Every answer, reads included, waits until the journal is durable up to the last record
//! appended when the answer was made: a status may show registers only once they cannot be
//! lost, and a retry answered from the idempotency window waits like the original did.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use indicia_proto::{ErrorBody, ErrorCode, ItemResult, Request, Response};

use super::coalesce::{Busy, Coalescer};
use super::handshake::ClientEntry;
use crate::cluster::fence::{Outcome, StateWrite};
use crate::cluster::{Adoption, ClusterError, Replicator};
use crate::engine::{EngineError, JobAnswer, Record, ResetCause, SignJob};
use crate::store::codec::{decode_replica, Replicated};
use crate::store::replica::{Owned, Settled};
use crate::store::{FlushTicket, JournalError, Store, StoreError};

/// How long rebalancing leaves a vPSD alone after a move of it failed, in seconds.
pub const MOVE_RETRY_AFTER_S: u64 = 30;

/// Counters of one shard, for the stats request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub requests: u64,
    pub errors: u64,
    pub sessions: u64,
    pub indicia: u64,
    pub busy: u64,
    pub flushes: u64,
    /// Sizes (indicia) of the sessions run since the metrics last drained them.
    pub session_sizes: Vec<u32>,
    /// Wire codes of the errors answered since the metrics last drained them.
    pub new_errors: Vec<u16>,
    /// Cluster mode: replicated rounds, writes, and how writes ended.
    pub replica_rounds: u64,
    pub replica_writes: u64,
    /// Writes refused by the fence (the vPSD moved): their sessions were voided.
    pub fenced: u64,
    /// Writes etcd refused as a whole (no lease, too large): voided too.
    pub refused: u64,
    /// Rounds whose outcome was unknown (a timeout, a lost connection): sent again.
    pub replica_retries: u64,
    /// vPSDs taken over from another appliance.
    pub adopted: u64,
    /// Sessions and changes refused because the appliance may not commit (no lease).
    pub unavailable: u64,
    /// Answers given up as `outcome-unknown` because the appliance lost its lease while
    /// their writes were on their way to etcd.
    pub outcome_unknown: u64,
}

/// The journal failed: the process must stop (fail-stop) and recover from disk.
#[derive(Debug, thiserror::Error)]
#[error("journal failure, stopping: {0}")]
pub struct Fatal(pub JournalError);

/// How a request reached this shard (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From a client of this appliance: if another appliance owns its vPSD, it is
    /// forwarded there.
    Direct,
    /// Forwarded by another appliance: never forwarded again (the hop limit is 1).
    Forwarded,
    /// Routed here: this appliance handles it whether or not it holds the vPSD (placement
    /// put a provision here, or no appliance owns the vPSD).
    Here,
}

/// A request for a vPSD this shard does not hold (cluster mode), for the runtime to route:
/// to the vPSD's owner, to an adoption on demand, or back here.
#[derive(Debug)]
pub struct Elsewhere<R> {
    pub reply: R,
    pub client: Arc<ClientEntry>,
    /// The client's request id (its idempotency key).
    pub request_id: u64,
    pub request: Request,
    pub arrival: Arrival,
}

/// A planned move the runtime is to carry out: hand `vpsd_id` over to `to` once it is
/// quiet (its running session committed, etcd holding all of it).
#[derive(Debug)]
pub struct MoveOrder<R> {
    pub vpsd_id: u64,
    pub to: String,
    /// Who asked (None: rebalancing).
    pub reply: Option<R>,
    /// Rebalancing: the vPSD's owner account (placement is checked again before the move).
    pub account: Option<String>,
}

/// What a sign request needs back.
struct SignReply<R> {
    reply: R,
    batch: bool,
    /// Who asked, and how it came: a request whose vPSD left while it queued is routed
    /// again.
    client: Arc<ClientEntry>,
    arrival: Arrival,
}

/// An answer waiting for its sequence to be acknowledged (durable, and in etcd).
struct Awaiting<R> {
    sequence: u64,
    /// The vPSD whose records the answer depends on (voided with them).
    vpsd_id: Option<u64>,
    reply: R,
    response: Response,
    /// Cluster mode, a client's own sign: the request, to be routed to the vPSD's owner
    /// if a fence voids its session (a stale view of who owns the vPSD is then harmless).
    resend: Option<Resend>,
}

/// A request to send again elsewhere, as it came.
struct Resend {
    client: Arc<ClientEntry>,
    request_id: u64,
    request: Request,
}

/// One commit round: the local flush and the replicated writes, made together.
#[derive(Debug)]
pub struct Round {
    pub ticket: Option<FlushTicket>,
    pub writes: Vec<StateWrite>,
}

pub struct ShardCore<R> {
    store: Store,
    coalescer: Coalescer<SignReply<R>>,
    /// Answers waiting for the journal (and etcd) to hold everything up to their sequence.
    awaiting: VecDeque<Awaiting<R>>,
    /// Cluster mode: etcd, for whether this appliance may commit now.
    replicator: Option<Arc<dyn Replicator>>,
    /// vPSDs that left this appliance, and where they went (for `vpsd-moved`).
    moved: HashMap<u64, String>,
    /// The last replicated round's failure, logged once while it repeats.
    last_replica_error: Option<String>,
    /// Sessions whose record is journaled but not yet durable: (sequence, vPSD). Their
    /// vPSD takes no new session until then.
    committing: VecDeque<(u64, u64)>,
    ready: Vec<(R, Response)>,
    /// Requests for vPSDs this shard does not hold, for the runtime to route.
    elsewhere: Vec<Elsewhere<R>>,
    /// vPSDs on their way to another appliance, with the requests that came meanwhile:
    /// they are forwarded to the new owner once it owns the vPSD, or handled here if the
    /// move fails.
    holding: HashMap<u64, Vec<Elsewhere<R>>>,
    /// Planned moves for the runtime to carry out.
    moves: Vec<MoveOrder<R>>,
    /// vPSDs whose last move failed, and when (unix seconds): rebalancing waits
    /// [`MOVE_RETRY_AFTER_S`] before it tries again.
    move_failures: HashMap<u64, u64>,
    stats: ShardStats,
}

impl<R> std::fmt::Debug for ShardCore<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCore")
            .field("awaiting", &self.awaiting.len())
            .field("ready", &self.ready.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn error_response(err: &EngineError) -> Response {
    Response::Error(err.to_body())
}

impl<R> ShardCore<R> {
    pub fn new(store: Store, queued_indicia_max: usize) -> Self {
        Self::with_replicator(store, queued_indicia_max, None)
    }

    /// A shard in cluster mode when `replicator` is set (its store's replica book enabled).
    pub fn with_replicator(
        mut store: Store,
        queued_indicia_max: usize,
        replicator: Option<Arc<dyn Replicator>>,
    ) -> Self {
        let session_indicia_max = store.engine.config().session_indicia_max;
        let moved = store
            .replica_mut()
            .map(|book| book.take_departed())
            .unwrap_or_default()
            .into_iter()
            .map(|(vpsd_id, owner)| (vpsd_id, moved_text(vpsd_id, Some(&owner))))
            .collect();
        Self {
            store,
            coalescer: Coalescer::new(session_indicia_max, queued_indicia_max),
            awaiting: VecDeque::new(),
            replicator,
            moved,
            last_replica_error: None,
            committing: VecDeque::new(),
            ready: Vec::new(),
            elsewhere: Vec::new(),
            holding: HashMap::new(),
            moves: Vec::new(),
            move_failures: HashMap::new(),
            stats: ShardStats::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// For the metrics, which drain what was recorded per session and per error.
    pub fn stats_mut(&mut self) -> &mut ShardStats {
        &mut self.stats
    }

    /// Indicia queued for a session now.
    pub fn queued_indicia(&self) -> usize {
        self.coalescer.queued_indicia()
    }

    /// Answers made but waiting for the journal to become durable.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// Whether a session could start now.
    pub fn has_sessions(&self) -> bool {
        self.coalescer.has_ready()
    }

    /// Queues an answer behind everything appended so far.
    fn answer(&mut self, reply: R, response: Response) {
        self.answer_for(None, reply, response);
    }

    /// Queues an answer that depends on `vpsd_id`'s records behind everything appended so
    /// far: if those records are voided, so is the answer.
    fn answer_for(&mut self, vpsd_id: Option<u64>, reply: R, response: Response) {
        self.answer_resendable(vpsd_id, reply, response, None);
    }

    /// [`ShardCore::answer_for`], with the request to route elsewhere if its records are
    /// voided because the vPSD moved.
    fn answer_resendable(
        &mut self,
        vpsd_id: Option<u64>,
        reply: R,
        response: Response,
        resend: Option<Resend>,
    ) {
        match &response {
            Response::Error(body) => {
                self.stats.errors += 1;
                self.stats.new_errors.push(body.code.wire());
            }
            Response::BatchSigned { results } => {
                for result in results {
                    if let ItemResult::Failed(body) = result {
                        self.stats.errors += 1;
                        self.stats.new_errors.push(body.code.wire());
                    }
                }
            }
            _ => {}
        }
        // A cluster refusal says that nothing was done: it depends on no record, and must
        // not wait behind a write etcd has not answered (it would wait as long).
        let refusal = matches!(
            &response,
            Response::Error(body)
                if matches!(body.code, ErrorCode::ClusterUnavailable | ErrorCode::VpsdMoved)
        );
        let last = self.store.last_sequence();
        if refusal || (self.store.acknowledged_sequence() >= last && self.awaiting.is_empty()) {
            self.ready.push((reply, response));
        } else {
            self.awaiting.push_back(Awaiting {
                sequence: last,
                vpsd_id,
                reply,
                response,
                resend,
            });
        }
    }

    /// Cluster mode: whether changes may be committed now (the lease cannot have
    /// expired). Always outside cluster mode.
    fn may_commit(&self) -> bool {
        self.replicator
            .as_ref()
            .is_none_or(|replicator| replicator.may_change())
    }

    fn unavailable() -> Response {
        Response::error(
            ErrorCode::ClusterUnavailable,
            "this appliance cannot commit to the cluster now (its etcd lease may have \
             expired, or etcd is out of space); this request was not carried out: retry \
             shortly with the same request id",
        )
    }

    /// The answer for a vPSD that left this appliance, if it did.
    fn moved_answer(&self, vpsd_id: u64) -> Option<Response> {
        self.moved
            .get(&vpsd_id)
            .map(|whereto| Response::error(ErrorCode::VpsdMoved, whereto.clone()))
    }

    /// Journals and applies a prepared record. An error the request caused (a record the
    /// engine refuses) becomes an error answer; a journal failure is fatal.
    fn commit(&mut self, now_unix: u64, record: Record) -> Result<Result<u64, Response>, Fatal> {
        if !self.may_commit() {
            self.stats.unavailable += 1;
            return Ok(Err(Self::unavailable()));
        }
        match self.store.commit(record, now_unix) {
            Ok(sequence) => Ok(Ok(sequence)),
            // Nothing was journaled: the request is refused, the shard goes on.
            Err(
                err @ (StoreError::Rejected(_)
                | StoreError::Codec(_)
                | StoreError::Journal(JournalError::RecordTooLarge(_))),
            ) => Ok(Err(Response::Error(ErrorBody::new(
                ErrorCode::Internal,
                err.to_string(),
            )))),
            Err(StoreError::Journal(err)) => Err(Fatal(err)),
        }
    }

    /// Handles one authorized request for a vPSD this shard owns (or a verify). Sign
    /// requests queue for the next session; everything else runs now. In cluster mode a
    /// request for a vPSD this shard does not hold goes to the runtime to be routed
    /// ([`ShardCore::take_elsewhere`]), unless it arrived [`Arrival::Here`]; one for a
    /// vPSD on its way to another appliance waits for the move.
    pub fn handle(
        &mut self,
        now_unix: u64,
        client: &Arc<ClientEntry>,
        request_id: u64,
        request: Request,
        reply: R,
        arrival: Arrival,
    ) -> Result<(), Fatal> {
        let vpsd_id = request.vpsd_id();
        // Cluster mode only: a single appliance has nowhere else to send a request.
        if let Some(id) = vpsd_id.filter(|_| self.replicator.is_some()) {
            // A handover notice is checked against etcd even when the vPSD is here: what is
            // here may be a stale copy (this appliance was cut off and taken over).
            let notice = matches!(request, Request::ClusterAdopt { .. });
            let away = arrival != Arrival::Here && (notice || self.store.engine.vpsd(id).is_none());
            let parked = self.holding.get_mut(&id);
            if away || parked.is_some() {
                let elsewhere = Elsewhere {
                    reply,
                    client: Arc::clone(client),
                    request_id,
                    request,
                    arrival,
                };
                match parked {
                    Some(parked) => parked.push(elsewhere),
                    None => self.elsewhere.push(elsewhere),
                }
                return Ok(());
            }
        }
        self.stats.requests += 1;
        if let Some(moved) = vpsd_id.and_then(|id| {
            self.store
                .engine
                .vpsd(id)
                .is_none()
                .then(|| self.moved_answer(id))
                .flatten()
        }) {
            self.answer(reply, moved);
            return Ok(());
        }
        let engine = &self.store.engine;
        let status = |store: &Store, vpsd_id: u64| match store.engine.status(now_unix, vpsd_id) {
            Ok(status) => Response::VpsdStatus(status),
            Err(err) => error_response(&err),
        };
        let response = match request {
            Request::Sign { vpsd_id, item } => {
                let reply = SignReply {
                    reply,
                    batch: false,
                    client: Arc::clone(client),
                    arrival,
                };
                self.queue(vpsd_id, request_id, vec![item], reply);
                return Ok(());
            }
            Request::SignBatch { vpsd_id, items } => {
                let reply = SignReply {
                    reply,
                    batch: true,
                    client: Arc::clone(client),
                    arrival,
                };
                self.queue(vpsd_id, request_id, items, reply);
                return Ok(());
            }
            Request::ClusterMove { vpsd_id, to } => {
                if self.replicator.is_none() {
                    Response::error(
                        ErrorCode::InvalidArgument,
                        "this appliance is not in cluster mode (its configuration has no \
                         [cluster] section)",
                    )
                } else if engine.vpsd(vpsd_id).is_none() {
                    error_response(&EngineError::UnknownVpsd { vpsd_id })
                } else {
                    // Requests from now on wait for the move; the running session ends
                    // first.
                    self.holding.insert(vpsd_id, Vec::new());
                    self.moves.push(MoveOrder {
                        vpsd_id,
                        to,
                        reply: Some(reply),
                        account: None,
                    });
                    return Ok(());
                }
            }
            Request::ClusterAdopt { vpsd_id } => status(&self.store, vpsd_id),
            Request::Status { vpsd_id } => status(&self.store, vpsd_id),
            Request::PublicKey {
                vpsd_id,
                key_serial,
            } => match engine.public_key(vpsd_id, key_serial) {
                Ok((algorithm, key_serial, spki_der)) => Response::PublicKeyInfo {
                    vpsd_id,
                    algorithm,
                    key_serial,
                    spki_der,
                },
                Err(err) => error_response(&err),
            },
            Request::Verify { indicium } => {
                let (verdict, vpsd_id, piece_number) = engine.verify(&indicium);
                Response::Verified {
                    verdict,
                    vpsd_id,
                    piece_number,
                }
            }
            Request::Provision {
                vpsd_id,
                owner,
                algorithm,
                origin_zip,
            } => match engine.prepare_provision(now_unix, vpsd_id, &owner, algorithm, origin_zip) {
                Ok(record) => match self.commit(now_unix, record)? {
                    Ok(_) => status(&self.store, vpsd_id),
                    Err(response) => response,
                },
                Err(err) => error_response(&err),
            },
            Request::Refill {
                vpsd_id,
                authorization,
            }
            | Request::Contact {
                vpsd_id,
                authorization,
            } => {
                match engine.prepare_provider(
                    now_unix,
                    client.tag,
                    request_id,
                    vpsd_id,
                    &authorization,
                ) {
                    Ok(prepared) => match prepared.record {
                        Some(record) => match self.commit(now_unix, record)? {
                            Ok(_) => status(&self.store, vpsd_id),
                            Err(response) => response,
                        },
                        // A retry: answered with the status, after the same wait.
                        None => status(&self.store, vpsd_id),
                    },
                    Err(err) => error_response(&err),
                }
            }
            Request::Lock { vpsd_id, reason } => {
                let prepared = engine.prepare_lock(now_unix, vpsd_id, &reason).map(Some);
                self.mutate(now_unix, vpsd_id, prepared)?
            }
            Request::Unlock { vpsd_id } => {
                let prepared = engine.prepare_unlock(now_unix, vpsd_id);
                self.mutate(now_unix, vpsd_id, prepared)?
            }
            Request::RotateKey { vpsd_id } => {
                let prepared = engine.prepare_rotate_key(now_unix, vpsd_id).map(Some);
                self.mutate(now_unix, vpsd_id, prepared)?
            }
            Request::Withdraw { vpsd_id } => match engine.prepare_withdraw(now_unix, vpsd_id) {
                Ok(record) => {
                    let refund_mills = match &record {
                        Record::Withdraw { refund_mills, .. } => *refund_mills,
                        _ => 0,
                    };
                    match self.commit(now_unix, record)? {
                        Ok(_) => match self.store.engine.status(now_unix, vpsd_id) {
                            Ok(status) => Response::Withdrawn {
                                refund_mills,
                                status,
                            },
                            Err(err) => error_response(&err),
                        },
                        Err(response) => response,
                    }
                }
                Err(err) => error_response(&err),
            },
            Request::Hello { .. } | Request::Authenticate { .. } => Response::error(
                ErrorCode::HandshakeOutOfOrder,
                "handshake message out of order",
            ),
            _ => Response::error(ErrorCode::UnknownOpcode, "not served by a shard"),
        };
        self.answer_for(vpsd_id, reply, response);
        Ok(())
    }

    fn mutate(
        &mut self,
        now_unix: u64,
        vpsd_id: u64,
        prepared: Result<Option<Record>, EngineError>,
    ) -> Result<Response, Fatal> {
        let status = |store: &Store| match store.engine.status(now_unix, vpsd_id) {
            Ok(status) => Response::VpsdStatus(status),
            Err(err) => error_response(&err),
        };
        Ok(match prepared {
            Ok(Some(record)) => match self.commit(now_unix, record)? {
                Ok(_) => status(&self.store),
                Err(response) => response,
            },
            Ok(None) => status(&self.store),
            Err(err) => error_response(&err),
        })
    }

    fn queue(
        &mut self,
        vpsd_id: u64,
        request_id: u64,
        items: Vec<indicia_proto::SignItem>,
        reply: SignReply<R>,
    ) {
        if !self.may_commit() {
            // Self-fenced: refused now rather than queued behind a session whose write may
            // wait for etcd as long as it is out of reach.
            self.stats.unavailable += 1;
            self.answer(reply.reply, Self::unavailable());
            return;
        }
        let job = SignJob {
            client: reply.client.tag,
            request_id,
            items,
        };
        if let Err(Busy(SignReply { reply, .. })) = self.coalescer.push(vpsd_id, job, reply) {
            self.stats.busy += 1;
            self.answer(
                reply,
                Response::error(ErrorCode::Busy, "the shard's queue is full; retry shortly"),
            );
        }
    }

    /// Runs every session that can start now: one per vPSD with queued requests and no
    /// session still waiting for its commit. A vPSD with more queued than one session takes
    /// gets its next session once this one is durable.
    pub fn run_sessions(&mut self, now_unix: u64) -> Result<(), Fatal> {
        self.run_sessions_within(now_unix, usize::MAX)
    }

    /// Like [`ShardCore::run_sessions`], but stops starting sessions once `indicia_max`
    /// indicia were signed in this call (at least one session runs), so that one turn of
    /// the shard's loop stays short; the rest waits for the next turn.
    pub fn run_sessions_within(&mut self, now_unix: u64, indicia_max: usize) -> Result<(), Fatal> {
        let mut signed = 0usize;
        for _ in 0..self.coalescer.ready_len() {
            if signed >= indicia_max {
                break;
            }
            let Some((vpsd_id, pending)) = self.coalescer.next_session() else {
                break;
            };
            // Moved apart, not copied: the engine reads the jobs, the replies wait.
            let (jobs, replies): (Vec<SignJob>, Vec<SignReply<R>>) = pending
                .into_iter()
                .map(|pending| (pending.job, pending.reply))
                .unzip();
            signed += jobs.iter().map(|job| job.items.len()).sum::<usize>();
            let (jobs, replies) =
                if self.replicator.is_some() && self.store.engine.vpsd(vpsd_id).is_none() {
                    // The vPSD left while these queued (fenced, taken over, moved): nothing
                    // was signed here; they are routed to its owner. Those routed here already
                    // are answered here (below), never routed again.
                    let (here, away): (Vec<_>, Vec<_>) = jobs
                        .into_iter()
                        .zip(replies)
                        .partition(|(_, reply)| reply.arrival == Arrival::Here);
                    for (job, reply) in away {
                        let request = sign_request(vpsd_id, job.items, reply.batch);
                        self.elsewhere.push(Elsewhere {
                            reply: reply.reply,
                            client: reply.client,
                            request_id: job.request_id,
                            request,
                            arrival: reply.arrival,
                        });
                    }
                    if here.is_empty() {
                        self.coalescer.finish(vpsd_id);
                        continue;
                    }
                    here.into_iter().unzip()
                } else {
                    (jobs, replies)
                };
            if let Some(refusal) = self.refusal(vpsd_id) {
                // Nothing signed, nothing charged.
                self.coalescer.finish(vpsd_id);
                for reply in replies {
                    self.answer(reply.reply, refusal.clone());
                }
                continue;
            }
            let prepared = self.store.engine.prepare_session(now_unix, vpsd_id, &jobs);
            if prepared.record.is_none() {
                // A signing key that does not unseal (or match its public key) will not on a
                // retry either: the vPSD is locked, and its status says why.
                if let Some(Err(crate::engine::EngineError::Integrity(reason))) =
                    prepared.answers.first()
                {
                    let reason = format!("signing key: {reason}");
                    tracing::error!(vpsd = vpsd_id, "locked: {reason}");
                    self.store.engine.lock_integrity(vpsd_id, &reason);
                }
            }
            let mut failure = None;
            let mut journaled = None;
            if let Some(record) = prepared.record {
                let size = record.indicia().count();
                self.stats.sessions += 1;
                self.stats.indicia += size as u64;
                self.stats
                    .session_sizes
                    .push(u32::try_from(size).unwrap_or(u32::MAX));
                match self.commit(now_unix, Record::Session(record))? {
                    Ok(sequence) => journaled = Some(sequence),
                    Err(response) => failure = Some(response),
                }
            }
            match journaled {
                // The session ends when its record is durable: what queues meanwhile
                // makes the next one (natural batching across the commit).
                Some(sequence) => self.committing.push_back((sequence, vpsd_id)),
                None => self.coalescer.finish(vpsd_id),
            }
            let cluster = self.replicator.is_some();
            for ((job, reply), answer) in jobs.into_iter().zip(replies).zip(prepared.answers) {
                let response = match &failure {
                    Some(response) => response.clone(),
                    None => sign_response(answer, reply.batch),
                };
                // A client's own request (not forwarded here) is routed to the owner if a
                // fence voids this session.
                let resend = (cluster && failure.is_none() && reply.arrival == Arrival::Direct)
                    .then(|| Resend {
                        request: sign_request(vpsd_id, job.items, reply.batch),
                        client: reply.client,
                        request_id: job.request_id,
                    });
                self.answer_resendable(Some(vpsd_id), reply.reply, response, resend);
            }
        }
        Ok(())
    }

    /// Why a session for this vPSD may not run now (cluster mode): it moved, or this
    /// appliance may not commit.
    fn refusal(&mut self, vpsd_id: u64) -> Option<Response> {
        if self.store.engine.vpsd(vpsd_id).is_none() {
            return self.moved_answer(vpsd_id);
        }
        if !self.may_commit() {
            self.stats.unavailable += 1;
            return Some(Self::unavailable());
        }
        None
    }

    /// Locks a vPSD whose history the integrity monitor found not to reconcile.
    pub fn lock_integrity(&mut self, vpsd_id: u64, reason: &str) {
        self.store.engine.lock_integrity(vpsd_id, reason);
    }

    /// The journal's durable sequence.
    pub fn durable_sequence(&self) -> u64 {
        self.store.durable_sequence()
    }

    /// Marks the journal closed cleanly (after the final flush); nothing more is written.
    pub fn close_journal(&mut self) -> Result<u64, JournalError> {
        self.store.close()
    }

    /// What the next commit round must do, if anything: the journal's flush (group
    /// commit) and, in cluster mode, the writes etcd does not have yet.
    pub fn round(&mut self) -> Result<Option<Round>, Fatal> {
        let ticket = self.store.flush_ticket();
        let writes = match self.store.replica_round() {
            Ok(writes) => writes,
            Err(StoreError::Journal(err)) => return Err(Fatal(err)),
            // The state was journaled with this very encoding: a value it cannot hold here
            // is a bug, and nothing may be acknowledged past it.
            Err(err) => {
                return Err(Fatal(JournalError::Io(std::io::Error::other(format!(
                    "the replicated state does not encode: {err}"
                )))))
            }
        };
        if ticket.is_none() && writes.is_empty() {
            return Ok(None);
        }
        Ok(Some(Round { ticket, writes }))
    }

    /// Whether a round would have something to do now.
    pub fn round_pending(&self) -> bool {
        self.store.last_sequence() > self.store.durable_sequence() || self.store.replica_pending()
    }

    /// What the next group commit must sync, if anything is waiting for it (outside
    /// cluster mode; see [`ShardCore::round`]).
    pub fn flush_ticket(&mut self) -> Option<FlushTicket> {
        self.store.flush_ticket()
    }

    /// Records a flush's outcome and releases the answers it made durable. A failed flush
    /// is fatal.
    pub fn complete(
        &mut self,
        ticket: &FlushTicket,
        result: std::io::Result<()>,
    ) -> Result<(), Fatal> {
        self.store.complete(ticket, result).map_err(Fatal)?;
        self.stats.flushes += 1;
        self.release();
        Ok(())
    }

    /// Records a round's outcome: the local flush's (a failure is fatal) and etcd's. Writes
    /// the fence refused void their vPSD's records and answers; writes whose outcome is
    /// unknown are sent again next round. Returns whether etcd's outcome was unknown or a
    /// refusal (the caller waits a little before the next round).
    pub fn complete_round(
        &mut self,
        now_unix: u64,
        ticket: Option<&FlushTicket>,
        local: std::io::Result<()>,
        replicated: Option<Result<Vec<Outcome>, ClusterError>>,
    ) -> Result<bool, Fatal> {
        if let Some(ticket) = ticket {
            self.store.complete(ticket, local).map_err(Fatal)?;
            self.stats.flushes += 1;
        }
        let mut unknown = false;
        if let Some(replicated) = replicated {
            self.stats.replica_rounds += 1;
            let outcomes = match replicated {
                Ok(outcomes) => {
                    self.last_replica_error = None;
                    self.stats.replica_writes += outcomes.len() as u64;
                    unknown = outcomes
                        .iter()
                        .any(|outcome| matches!(outcome, Outcome::Retry | Outcome::Refused));
                    Ok(outcomes)
                }
                Err(err) => {
                    // Logged once while it repeats (a lost lease: once, whatever its age).
                    let text = err.to_string();
                    let kind = match &err {
                        ClusterError::LeaseLost { .. } => "lease lost".to_owned(),
                        _ => text.clone(),
                    };
                    if self.last_replica_error.as_deref() != Some(kind.as_str()) {
                        tracing::warn!("replicated commit failed: {text}");
                        self.last_replica_error = Some(kind);
                    }
                    unknown = true;
                    Err(err.refused())
                }
            };
            if unknown {
                self.stats.replica_retries += 1;
            }
            for settled in self.store.settle(outcomes) {
                self.void(now_unix, settled, true)?;
            }
        }
        self.release();
        Ok(unknown)
    }

    /// Voids what etcd will not hold: the vPSD's answers from `since` on become errors, and
    /// the journal records it (a release, or a reset to the state etcd holds). `counted`:
    /// etcd's answer to a write caused it (`cluster.fenced`, `cluster.refused`), not a
    /// takeover that supersedes what the shard held.
    fn void(&mut self, now_unix: u64, settled: Settled, counted: bool) -> Result<(), Fatal> {
        let (vpsd_id, since, response) = match &settled {
            Settled::Moved {
                vpsd_id,
                since,
                owner,
            } => {
                self.stats.fenced += u64::from(counted);
                let whereto = moved_text(*vpsd_id, owner.as_deref());
                tracing::warn!(vpsd = vpsd_id, "fenced: {whereto}");
                self.moved.insert(*vpsd_id, whereto.clone());
                (
                    *vpsd_id,
                    *since,
                    Response::error(ErrorCode::VpsdMoved, whereto),
                )
            }
            Settled::Refused { vpsd_id, since, .. } => {
                self.stats.refused += 1;
                (*vpsd_id, *since, Self::unavailable())
            }
        };
        let reroute = matches!(settled, Settled::Moved { .. });
        let mut kept = VecDeque::with_capacity(self.awaiting.len());
        for mut waiting in std::mem::take(&mut self.awaiting) {
            if waiting.vpsd_id != Some(vpsd_id) || waiting.sequence < since {
                kept.push_back(waiting);
                continue;
            }
            match waiting.resend.take().filter(|_| reroute) {
                // Nothing of it stands here: to the owner, with its request id.
                Some(Resend {
                    client,
                    request_id,
                    request,
                }) => self.elsewhere.push(Elsewhere {
                    reply: waiting.reply,
                    client,
                    request_id,
                    request,
                    arrival: Arrival::Direct,
                }),
                None => {
                    waiting.response = response.clone();
                    kept.push_back(waiting);
                }
            }
        }
        self.awaiting = kept;
        let before = self.committing.len();
        self.committing.retain(|&(_, id)| id != vpsd_id);
        if self.committing.len() != before {
            self.coalescer.finish(vpsd_id);
        }
        let local_version = self
            .store
            .engine
            .vpsd(vpsd_id)
            .map_or(0, |vpsd| vpsd.version);
        let journaled = match settled {
            Settled::Refused {
                replicated: Some(replicated),
                ..
            } => {
                let owned = self
                    .store
                    .replica()
                    .and_then(|book| book.ownership(vpsd_id))
                    .unwrap_or(Owned { epoch: 0, last: 0 });
                let replicated_version = replicated.version;
                let recent = self
                    .store
                    .replica()
                    .map(|book| book.recent_written(vpsd_id))
                    .unwrap_or_default();
                self.store
                    .commit_reset(
                        *replicated,
                        ResetCause::Voided { local_version },
                        recent,
                        &owned,
                        now_unix,
                    )
                    .map(|_| ())
                    .map_err(|err| (err, replicated_version))
            }
            Settled::Refused { .. } => self
                .store
                .commit_release(vpsd_id, "", 0, now_unix)
                .map(|_| ())
                .map_err(|err| (err, 0)),
            Settled::Moved { owner, .. } => self
                .store
                .commit_release(vpsd_id, owner.as_deref().unwrap_or(""), 0, now_unix)
                .map(|_| ())
                .map_err(|err| (err, 0)),
        };
        match journaled {
            Ok(()) => Ok(()),
            Err((StoreError::Journal(err), _)) => Err(Fatal(err)),
            Err((err, _)) => {
                // The void record did not apply: the vPSD keeps a state etcd does not
                // hold, so it must not serve.
                let reason = format!("void of unreplicated records failed: {err}");
                tracing::error!(vpsd = vpsd_id, "{reason}");
                self.store.engine.lock_integrity(vpsd_id, &reason);
                Ok(())
            }
        }
    }

    /// A vPSD this appliance took over: its state from etcd, journaled as a reset.
    pub fn adopt(&mut self, now_unix: u64, adoption: Adoption) -> Result<(), Fatal> {
        // Adopted already under this very claim (on demand, by a request that came before
        // the takeover's hand-off reached the shard): what the shard holds is as new or
        // newer; adopting again would void it.
        // An older claim than the one held (a late hand-off, a stale read) changes nothing
        // either.
        let held_claim = self
            .store
            .replica()
            .and_then(|book| book.ownership(adoption.vpsd_id))
            .is_some_and(|owned| owned.epoch >= adoption.epoch);
        if held_claim && self.holds(adoption.vpsd_id) {
            return Ok(());
        }
        let Replicated {
            vpsd,
            origin,
            recent,
        } = match decode_replica(adoption.vpsd_id, &adoption.state.0, &adoption.keys) {
            Ok(decoded) => decoded,
            Err(err) => {
                tracing::error!(
                    vpsd = adoption.vpsd_id,
                    "taken over from {}, but its replicated state does not decode: {err}; \
                     it is not served here",
                    adoption.from
                );
                return Ok(());
            }
        };
        let owned = Owned {
            epoch: adoption.epoch,
            last: adoption.state.1,
        };
        // Adopted on demand (a planned move handed it here): from its last writer.
        let adoption = Adoption {
            from: if adoption.from.is_empty() {
                origin.appliance.clone()
            } else {
                adoption.from
            },
            ..adoption
        };
        tracing::warn!(
            vpsd = vpsd.id,
            "taken over from {}: continues at version {} (piece {}), as written by {} \
             (shard {}, sequence {})",
            adoption.from,
            vpsd.version,
            vpsd.registers.piece_count,
            origin.appliance,
            origin.shard,
            origin.sequence
        );
        let vpsd_id = vpsd.id;
        // What this shard still holds of the vPSD (from an earlier time it owned it) is
        // superseded: records etcd never got are void, and the answers that wait on them
        // never leave; the old state goes with a release before the new one comes.
        if self.store.engine.vpsd(vpsd_id).is_some() {
            let since = self
                .store
                .replica()
                .and_then(|book| book.pending_since(vpsd_id))
                .unwrap_or(u64::MAX);
            let superseded = Settled::Moved {
                vpsd_id,
                since,
                owner: None,
            };
            self.void(now_unix, superseded, false)?;
        }
        match self.store.commit_reset(
            vpsd,
            ResetCause::Adopted {
                from: adoption.from,
                epoch: adoption.epoch,
            },
            recent,
            &owned,
            now_unix,
        ) {
            Ok(_) => {
                self.moved.remove(&vpsd_id);
                self.stats.adopted += 1;
                Ok(())
            }
            Err(StoreError::Journal(err)) => Err(Fatal(err)),
            Err(err) => {
                tracing::error!(vpsd = vpsd_id, "taken over, but not journaled: {err}");
                Ok(())
            }
        }
    }

    /// Releases the answers and sessions that everything acknowledged now covers.
    fn release(&mut self) {
        let acknowledged = self.store.acknowledged_sequence();
        while let Some(&(sequence, vpsd_id)) = self.committing.front() {
            if sequence > acknowledged {
                break;
            }
            self.committing.pop_front();
            self.coalescer.finish(vpsd_id);
        }
        while self
            .awaiting
            .front()
            .is_some_and(|waiting| waiting.sequence <= acknowledged)
        {
            if let Some(waiting) = self.awaiting.pop_front() {
                self.ready.push((waiting.reply, waiting.response));
            }
        }
    }

    /// Answers that may leave now.
    pub fn take_ready(&mut self) -> Vec<(R, Response)> {
        std::mem::take(&mut self.ready)
    }

    /// Cluster mode, once this appliance may no longer commit (its lease may have
    /// expired): the answers still waiting for etcd leave now as `outcome-unknown`
    /// instead of waiting for as long as etcd is out of reach. Their writes are still sent
    /// as they were (never voided), so a retry with the same request id finds the original
    /// (here, or at the next owner) or is carried out once.
    pub fn give_up_waiting(&mut self) {
        if self
            .replicator
            .as_ref()
            .is_none_or(|replicator| replicator.may_commit())
        {
            return;
        }
        // Requests queued behind a session whose write is on its way: never signed.
        let queued = self.coalescer.take_queued();
        let (refused, waiting) = (queued.len(), self.awaiting.len());
        for pending in queued {
            self.stats.unavailable += 1;
            self.answer(pending.reply.reply, Self::unavailable());
        }
        if refused + waiting > 0 {
            tracing::warn!(
                "this appliance may not commit: {waiting} answers waiting for etcd leave now \
                 (as outcome-unknown where their vPSD's writes are on their way), {refused} \
                 queued requests are refused"
            );
        }
        let acknowledged = self.store.acknowledged_sequence();
        while let Some(waiting) = self.awaiting.pop_front() {
            // An answer that depends on no vPSD, or on one whose records are all in etcd
            // (durable with them: a round completes both), leaves as it was made.
            let settled = waiting.vpsd_id.is_none_or(|vpsd_id| {
                self.store
                    .replica()
                    .is_some_and(|book| book.settled(vpsd_id).is_some())
            });
            if waiting.sequence <= acknowledged || settled {
                self.ready.push((waiting.reply, waiting.response));
                continue;
            }
            self.stats.outcome_unknown += 1;
            // An error answer was counted when it was made.
            if !matches!(waiting.response, Response::Error(_)) {
                self.stats.errors += 1;
                self.stats.new_errors.push(ErrorCode::OutcomeUnknown.wire());
            }
            let response = Response::error(
                ErrorCode::OutcomeUnknown,
                "this appliance lost etcd while the change was on its way there: it may \
                 have been carried out; retry with the same request id",
            );
            self.ready.push((waiting.reply, response));
        }
    }

    /// Requests for vPSDs this shard does not hold, to be routed (cluster mode).
    pub fn take_elsewhere(&mut self) -> Vec<Elsewhere<R>> {
        std::mem::take(&mut self.elsewhere)
    }

    /// Planned moves to carry out.
    pub fn take_moves(&mut self) -> Vec<MoveOrder<R>> {
        std::mem::take(&mut self.moves)
    }

    /// Starts moving a vPSD to `to` by itself (rebalancing, a drain): requests wait from
    /// now on. False when it is not here or already moving.
    pub fn begin_move(&mut self, vpsd_id: u64, to: &str) -> bool {
        let Some(account) = self
            .store
            .engine
            .vpsd(vpsd_id)
            .map(|vpsd| vpsd.owner.clone())
        else {
            return false;
        };
        if self.holding.contains_key(&vpsd_id) {
            return false;
        }
        self.holding.insert(vpsd_id, Vec::new());
        self.moves.push(MoveOrder {
            vpsd_id,
            to: to.to_owned(),
            reply: None,
            account: Some(account),
        });
        true
    }

    /// Whether the shard holds the vPSD (serves it).
    pub fn holds(&self, vpsd_id: u64) -> bool {
        self.store.engine.vpsd(vpsd_id).is_some()
    }

    /// A move of `vpsd_id` failed: rebalancing leaves it alone a while.
    pub fn move_failed(&mut self, vpsd_id: u64, now_unix: u64) {
        self.move_failures
            .retain(|_, at| now_unix.saturating_sub(*at) < MOVE_RETRY_AFTER_S);
        self.move_failures.insert(vpsd_id, now_unix);
    }

    /// vPSDs moving now.
    pub fn moving(&self) -> usize {
        self.holding.len()
    }

    /// The vPSD's ownership, once it can be handed over as it is: no session queued or
    /// running, every record of it in etcd, no write of it under way.
    pub fn quiet(&self, vpsd_id: u64) -> Option<Owned> {
        if !self.coalescer.is_idle(vpsd_id) || self.committing.iter().any(|&(_, id)| id == vpsd_id)
        {
            return None;
        }
        self.store.replica()?.settled(vpsd_id)
    }

    /// The vPSDs that placement puts elsewhere, with where (at most `limit`, none of them
    /// moving already). `place` gives a vPSD's appliance from its id and owner account.
    pub fn misplaced<'p>(
        &self,
        now_unix: u64,
        limit: usize,
        place: impl Fn(u64, &str) -> Option<&'p str>,
    ) -> Vec<(u64, String)> {
        let Some(book) = self.store.replica() else {
            return Vec::new();
        };
        let me = book.appliance();
        let mut out = Vec::new();
        for vpsd in self.store.engine.vpsds() {
            if out.len() == limit {
                break;
            }
            let failed_lately = self
                .move_failures
                .get(&vpsd.id)
                .is_some_and(|at| now_unix.saturating_sub(*at) < MOVE_RETRY_AFTER_S);
            // A vPSD locked by the integrity monitor stays: its lock is this appliance's
            // (in memory), and another would serve it unlocked.
            let integrity_locked = matches!(
                vpsd.state,
                crate::engine::StoredState::Locked(indicia_proto::LockReason::Integrity(_))
            );
            if self.holding.contains_key(&vpsd.id)
                || !book.owns(vpsd.id)
                || failed_lately
                || integrity_locked
            {
                continue;
            }
            if let Some(placed) = place(vpsd.id, &vpsd.owner).filter(|placed| *placed != me) {
                out.push((vpsd.id, placed.to_owned()));
            }
        }
        out
    }

    /// The vPSD is `to`'s in etcd now: the journal records the release, and the requests
    /// that waited go to be routed (to the new owner). `handed_over`: this appliance handed
    /// it over, quiet, so that etcd holds its local version (the release says so);
    /// otherwise what etcd holds is not known here (0).
    pub fn depart(
        &mut self,
        now_unix: u64,
        vpsd_id: u64,
        to: &str,
        handed_over: bool,
    ) -> Result<(), Fatal> {
        let version = self
            .store
            .engine
            .vpsd(vpsd_id)
            .filter(|_| handed_over)
            .map_or(0, |vpsd| vpsd.version);
        match self.store.commit_release(vpsd_id, to, version, now_unix) {
            Ok(_) => {}
            Err(StoreError::Journal(err)) => return Err(Fatal(err)),
            Err(err) => {
                // etcd names `to` the owner: this shard must not serve the vPSD again.
                let reason = format!("moved to {to}, but the release was not journaled: {err}");
                tracing::error!(vpsd = vpsd_id, "{reason}");
                self.store.engine.lock_integrity(vpsd_id, &reason);
            }
        }
        self.moved.insert(vpsd_id, moved_text(vpsd_id, Some(to)));
        tracing::info!(vpsd = vpsd_id, "moved to {to}");
        let parked = self.holding.remove(&vpsd_id).unwrap_or_default();
        self.elsewhere.extend(parked);
        Ok(())
    }

    /// The move of `vpsd_id` did not happen: the requests that waited are handled here
    /// (or routed, if the vPSD is not here any more).
    pub fn stay(&mut self, now_unix: u64, vpsd_id: u64) -> Result<(), Fatal> {
        for parked in self.holding.remove(&vpsd_id).unwrap_or_default() {
            self.handle(
                now_unix,
                &parked.client,
                parked.request_id,
                parked.request,
                parked.reply,
                parked.arrival,
            )?;
        }
        Ok(())
    }
}

/// A `vpsd-moved` answer.
pub(crate) fn moved_response(vpsd_id: u64, owner: Option<&str>) -> Response {
    Response::error(ErrorCode::VpsdMoved, moved_text(vpsd_id, owner))
}

/// The message of a `vpsd-moved` answer.
pub(crate) fn moved_text(vpsd_id: u64, owner: Option<&str>) -> String {
    match owner {
        Some(owner) => format!(
            "vPSD {vpsd_id} belongs to appliance {owner} of the cluster now; nothing was \
             charged here"
        ),
        None => {
            format!("vPSD {vpsd_id} no longer belongs to this appliance; nothing was charged here")
        }
    }
}

/// A sign (one item) or a batch request, as a queued job holds it.
fn sign_request(vpsd_id: u64, items: Vec<indicia_proto::SignItem>, batch: bool) -> Request {
    match (batch, items.len()) {
        (false, 1) => {
            let mut items = items.into_iter();
            match items.next() {
                Some(item) => Request::Sign { vpsd_id, item },
                None => Request::SignBatch {
                    vpsd_id,
                    items: Vec::new(),
                },
            }
        }
        _ => Request::SignBatch { vpsd_id, items },
    }
}

/// The wire answer to a sign (one item) or a batch.
fn sign_response(answer: JobAnswer, batch: bool) -> Response {
    match answer {
        Err(err) => error_response(&err),
        Ok(items) if batch => Response::BatchSigned {
            results: items
                .into_iter()
                .map(|item| match item {
                    Ok(indicium) => ItemResult::Signed(indicium),
                    Err(body) => ItemResult::Failed(body),
                })
                .collect(),
        },
        Ok(items) => match items.into_iter().next() {
            Some(Ok(indicium)) => Response::Signed { indicium },
            Some(Err(body)) => Response::Error(body),
            None => Response::error(ErrorCode::Internal, "a sign request without an answer"),
        },
    }
}
