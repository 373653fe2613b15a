//! Signing many indicia at once: sign-batch requests of up to [`BATCH_ITEMS_MAX`] items,
//! several in flight at once through the [`Pool`], each retried by the pool with its own
//! request id if a connection fails. What was signed is charged, so it is returned even
//! when a request fails midway.

use std::sync::Mutex;

use indicia_proto::message::BATCH_ITEMS_MAX;
use indicia_proto::{ErrorBody, Indicium, ItemResult, Request, Response, SignItem};

use crate::{ClientError, Pool};

/// What [`sign_many`] got: the indicia signed (in piece order), the refusals with the
/// number of indicia each covers, and the error that ended it early, if any. Signed
/// indicia are charged: they are returned even when a request failed.
#[derive(Debug, Default)]
pub struct Signed {
    pub indicia: Vec<Indicium>,
    pub refused: Vec<(ErrorBody, u64)>,
    pub error: Option<ClientError>,
}

/// How many sign-batch requests [`sign_many`] keeps in flight: enough to keep the
/// appliance's sessions full, far below its limit of unanswered requests per connection.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;

/// Signs `count` indicia in batches of up to 256, [`BATCHES_IN_FLIGHT_MAX`] at a time; no
/// batch starts after one has failed.
pub fn sign_many(pool: &Pool, vpsd_id: u64, item: SignItem, count: u64) -> Signed {
    let sizes: Vec<u64> = (0..count.div_ceil(BATCH_ITEMS_MAX as u64))
        .map(|batch| (count - batch * BATCH_ITEMS_MAX as u64).min(BATCH_ITEMS_MAX as u64))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let result = Mutex::new(Signed::default());
    let lock = || {
        result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    std::thread::scope(|scope| {
        for _ in 0..BATCHES_IN_FLIGHT_MAX.min(sizes.len()) {
            scope.spawn(|| loop {
                let batch = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&size) = sizes.get(batch) else {
                    return;
                };
                if lock().error.is_some() {
                    return;
                }
                // `size` <= 256.
                let items = vec![item; size as usize];
                let answer = pool.call(Request::SignBatch { vpsd_id, items });
                let mut result = lock();
                match answer {
                    Ok(Response::BatchSigned { results }) => {
                        for item in results {
                            match item {
                                ItemResult::Signed(indicium) => result.indicia.push(indicium),
                                ItemResult::Failed(body) => result.refused.push((body, 1)),
                            }
                        }
                    }
                    Ok(Response::Error(body)) => result.refused.push((body, size)),
                    Ok(other) => {
                        result.error = Some(ClientError::Protocol(format!(
                            "unexpected answer to sign-batch: opcode {:#04x}",
                            other.opcode()
                        )));
                    }
                    Err(err) => result.error = Some(err),
                }
            });
        }
    });
    let mut result = result
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    result
        .indicia
        .sort_by_key(|indicium| indicium.payload.piece_number);
    result
}
