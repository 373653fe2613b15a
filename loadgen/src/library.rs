//! Driving the appliance through the client library ([`indicia_client::Pool`]), as an
//! application with many concurrent users does: every call is one `sign` (or one
//! `sign-batch` with `--batch`) through one shared pool, on its async API. The pool
//! batches the calls that wait together for a vPSD, and sends each to its vPSD's shard.
//! The calls run as tasks of tokio on one worker thread: an application server's shape,
//! and cheap for the machine the appliance shares (a thread per caller spent more of it
//! waking threads than the appliance spent signing).
//!
//! - **Closed loop**: `callers` tasks, each calling again as soon as it has its answer;
//!   latency runs from the call.
//! - **Open loop**: call `n` is due at `start + n / rate`. A pacing thread sleeps until the
//!   next call is due (to the microsecond; tokio's timers tick in milliseconds) and starts
//!   every call due by then as a task of its own, however many are still waiting for
//!   their answers. Latency runs from when a call was due (coordinated omission
//!   corrected).

use std::sync::Arc;
use std::time::Instant;

use indicia_client::{ClientError, Pool, PoolStats};
use indicia_proto::{ItemResult, MailingDate, Request, Response, SignItem};

use crate::pacing::{latency_us, Schedule};
use crate::run::{verifies, Keys, LoadError, Mode, RunConfig};
use crate::tally::Tally;
use crate::workload::Rng;

/// Runs the load through one pool; returns what the calls got and what the pool did.
/// `callers` is the closed loop's concurrency (the open loop has none of its own).
pub fn run(
    config: &RunConfig,
    keys: &Keys,
    callers: usize,
) -> Result<(Tally, PoolStats), LoadError> {
    let pool = Pool::builder(&[config.addr.to_string()], &config.credential)
        .tls(config.tls.clone())
        .batching(matches!(
            config.client,
            crate::run::ClientKind::Library { batching: true, .. }
        ))
        .build()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("loadgen-callers")
        .build()?;
    let item = item(config);
    let start = Instant::now();
    let deadline = start + config.duration;
    let shared = Arc::new((config.clone(), keys.clone()));
    let mut tally = Tally::default();
    match config.mode {
        Mode::Closed { .. } => {
            let tasks: Vec<_> = (0..callers.max(1))
                .map(|index| {
                    let (pool, shared) = (pool.clone(), Arc::clone(&shared));
                    runtime.spawn(async move {
                        let (config, keys) = &*shared;
                        let mut rng = Rng::new(config.seed.wrapping_add(index as u64 + 1));
                        let (mut tally, mut seen) = (Tally::default(), 0);
                        while Instant::now() < deadline {
                            let vpsd_id = config.picker.pick(&mut rng);
                            let called = Instant::now();
                            let answer = call(&pool, config, vpsd_id, item).await;
                            let answered = Instant::now();
                            record(
                                &mut tally, config, keys, &mut seen, called, answered, answer,
                            );
                        }
                        tally
                    })
                })
                .collect();
            for task in tasks {
                let done = runtime.block_on(task).map_err(|_| LoadError::Thread)?;
                tally.merge(&done);
            }
        }
        Mode::Open { rate_per_s } => {
            let schedule = Schedule::new(start, rate_per_s);
            let mut rng = Rng::new(config.seed);
            let counted = Arc::new(std::sync::Mutex::new((Tally::default(), 0u64)));
            let mut tasks = Vec::new();
            let mut n = 0u64;
            loop {
                let due = schedule.due(n);
                if due >= deadline {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                // Every call due by now starts now (the pacer may have been late).
                let due_by = schedule.due_by(Instant::now());
                while n < due_by {
                    let due = schedule.due(n);
                    if due >= deadline {
                        break;
                    }
                    let vpsd_id = config.picker.pick(&mut rng);
                    let (pool, shared) = (pool.clone(), Arc::clone(&shared));
                    let counted = Arc::clone(&counted);
                    tasks.push(runtime.spawn(async move {
                        let (config, keys) = &*shared;
                        let answer = call(&pool, config, vpsd_id, item).await;
                        let answered = Instant::now();
                        let mut counted = counted
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let (tally, seen) = &mut *counted;
                        record(tally, config, keys, seen, due, answered, answer);
                    }));
                    n += 1;
                }
            }
            for task in tasks {
                runtime.block_on(task).map_err(|_| LoadError::Thread)?;
            }
            let counted = counted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tally.merge(&counted.0);
        }
    }
    Ok((tally, pool.stats()))
}

/// The item every call signs.
fn item(config: &RunConfig) -> SignItem {
    let mailing_date = MailingDate::from_unix_seconds(crate::run::now_unix())
        .unwrap_or(MailingDate::from_days_since_2000(0));
    SignItem {
        postage_mills: config.postage_mills,
        mailing_date,
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

/// One call: a `sign`, or a `sign-batch` of `config.batch` items.
async fn call(
    pool: &Pool,
    config: &RunConfig,
    vpsd_id: u64,
    item: SignItem,
) -> Result<Vec<ItemResult>, ClientError> {
    if config.batch <= 1 {
        return pool
            .sign_async(vpsd_id, item)
            .await
            .map(|indicium| vec![ItemResult::Signed(indicium)]);
    }
    let request = Request::SignBatch {
        vpsd_id,
        items: vec![item; config.batch],
    };
    match pool.call_async(request).await? {
        Response::BatchSigned { results } => Ok(results),
        Response::Error(body) => Err(ClientError::Refused(body)),
        other => Err(ClientError::Protocol(format!(
            "unexpected answer to sign-batch: opcode {:#04x}",
            other.opcode()
        ))),
    }
}

/// Counts one call's outcome; times it (from `due`) only if every item was signed.
fn record(
    tally: &mut Tally,
    config: &RunConfig,
    keys: &Keys,
    seen: &mut u64,
    due: Instant,
    answered: Instant,
    answer: Result<Vec<ItemResult>, ClientError>,
) {
    let results = match answer {
        Ok(results) => results,
        Err(ClientError::Refused(body)) => {
            tally.requests += 1;
            tally.error(body.code);
            return;
        }
        Err(err) => {
            // Not an answer: the library gave up (time limit, no appliance).
            tally.transport_failure(failure_name(&err), 1);
            return;
        }
    };
    tally.requests += 1;
    let mut refused = false;
    for result in results {
        match result {
            ItemResult::Signed(indicium) => {
                tally.indicia += 1;
                *seen += 1;
                if config.verify_every > 0 && *seen % config.verify_every == 0 {
                    if verifies(&indicium, keys) {
                        tally.verified += 1;
                    } else {
                        tally.verify_failed += 1;
                    }
                }
            }
            ItemResult::Failed(body) => {
                tally.error(body.code);
                refused = true;
            }
        }
    }
    if !refused {
        tally.requests_ok += 1;
        tally
            .latency_us
            .saturating_record(latency_us(due, answered));
    }
}

fn failure_name(err: &ClientError) -> String {
    match err {
        ClientError::TimedOut { sent: true } => "timed-out-after-sending".into(),
        ClientError::TimedOut { sent: false } => "timed-out-before-sending".into(),
        ClientError::Unreachable(_) => "unreachable".into(),
        ClientError::OutcomeUnknown(_) => "outcome-unknown".into(),
        ClientError::Closed => "connection-closed".into(),
        other => format!("library ({other})"),
    }
}
