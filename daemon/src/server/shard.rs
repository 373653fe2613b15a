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

use std::collections::VecDeque;
use std::sync::Arc;

use indicia_proto::{ErrorBody, ErrorCode, ItemResult, Request, Response};

use super::coalesce::{Busy, Coalescer};
use super::handshake::ClientEntry;
use crate::engine::{EngineError, JobAnswer, Record, SignJob};
use crate::store::{FlushTicket, JournalError, Store, StoreError};

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
}

/// The journal failed: the process must stop (fail-stop) and recover from disk.
#[derive(Debug, thiserror::Error)]
#[error("journal failure, stopping: {0}")]
pub struct Fatal(pub JournalError);

/// What a sign request needs back.
struct SignReply<R> {
    reply: R,
    batch: bool,
}

pub struct ShardCore<R> {
    store: Store,
    coalescer: Coalescer<SignReply<R>>,
    /// Answers waiting for the journal to be durable up to their sequence number.
    awaiting: VecDeque<(u64, R, Response)>,
    /// Sessions whose record is journaled but not yet durable: (sequence, vPSD). Their
    /// vPSD takes no new session until then.
    committing: VecDeque<(u64, u64)>,
    ready: Vec<(R, Response)>,
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
        let session_indicia_max = store.engine.config().session_indicia_max;
        Self {
            store,
            coalescer: Coalescer::new(session_indicia_max, queued_indicia_max),
            awaiting: VecDeque::new(),
            committing: VecDeque::new(),
            ready: Vec::new(),
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
        let last = self.store.last_sequence();
        if self.store.durable_sequence() >= last && self.awaiting.is_empty() {
            self.ready.push((reply, response));
        } else {
            self.awaiting.push_back((last, reply, response));
        }
    }

    /// Journals and applies a prepared record. An error the request caused (a record the
    /// engine refuses) becomes an error answer; a journal failure is fatal.
    fn commit(&mut self, now_unix: u64, record: Record) -> Result<Result<u64, Response>, Fatal> {
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
    /// requests queue for the next session; everything else runs now.
    pub fn handle(
        &mut self,
        now_unix: u64,
        client: &Arc<ClientEntry>,
        request_id: u64,
        request: Request,
        reply: R,
    ) -> Result<(), Fatal> {
        self.stats.requests += 1;
        let engine = &self.store.engine;
        let status = |store: &Store, vpsd_id: u64| match store.engine.status(now_unix, vpsd_id) {
            Ok(status) => Response::VpsdStatus(status),
            Err(err) => error_response(&err),
        };
        let response = match request {
            Request::Sign { vpsd_id, item } => {
                self.queue(vpsd_id, client, request_id, vec![item], reply, false);
                return Ok(());
            }
            Request::SignBatch { vpsd_id, items } => {
                self.queue(vpsd_id, client, request_id, items, reply, true);
                return Ok(());
            }
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
        self.answer(reply, response);
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
        client: &Arc<ClientEntry>,
        request_id: u64,
        items: Vec<indicia_proto::SignItem>,
        reply: R,
        batch: bool,
    ) {
        let job = SignJob {
            client: client.tag,
            request_id,
            items,
        };
        if let Err(Busy(SignReply { reply, .. })) =
            self.coalescer
                .push(vpsd_id, job, SignReply { reply, batch })
        {
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
            for (reply, answer) in replies.into_iter().zip(prepared.answers) {
                let response = match &failure {
                    Some(response) => response.clone(),
                    None => sign_response(answer, reply.batch),
                };
                self.answer(reply.reply, response);
            }
        }
        Ok(())
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

    /// What the next group commit must sync, if anything is waiting for it.
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
        let durable = self.store.complete(ticket, result).map_err(Fatal)?;
        self.stats.flushes += 1;
        while let Some(&(sequence, vpsd_id)) = self.committing.front() {
            if sequence > durable {
                break;
            }
            self.committing.pop_front();
            self.coalescer.finish(vpsd_id);
        }
        while self
            .awaiting
            .front()
            .is_some_and(|(sequence, _, _)| *sequence <= durable)
        {
            if let Some((_, reply, response)) = self.awaiting.pop_front() {
                self.ready.push((reply, response));
            }
        }
        Ok(())
    }

    /// Answers that may leave now.
    pub fn take_ready(&mut self) -> Vec<(R, Response)> {
        std::mem::take(&mut self.ready)
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
