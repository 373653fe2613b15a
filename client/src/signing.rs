//! Signing many indicia at once: sign-batch requests of up to [`BATCH_ITEMS_MAX`] items,
//! several in flight on one connection, their answers taken in whatever order they come.
//! What was signed is charged, so it is returned even when the connection fails midway.

use std::collections::HashMap;

use indicia_proto::message::BATCH_ITEMS_MAX;
use indicia_proto::{ErrorBody, Indicium, ItemResult, Request, Response, SignItem};

use crate::{Client, ClientError};

/// What [`sign_many`] got: the indicia signed (in piece order), the refusals with the
/// number of indicia each covers, and the error that ended it early, if any. Signed
/// indicia are charged: they are returned even when the connection failed midway.
#[derive(Debug, Default)]
pub struct Signed {
    pub indicia: Vec<Indicium>,
    pub refused: Vec<(ErrorBody, u64)>,
    pub error: Option<ClientError>,
}

/// How many sign-batch requests [`sign_many`] keeps in flight: enough to keep the
/// appliance's sessions full, far below its limit of unanswered requests per connection.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;

/// Signs `count` indicia in pipelined batches of up to 256.
pub fn sign_many(client: &mut Client, vpsd_id: u64, item: SignItem, count: u64) -> Signed {
    let mut result = Signed::default();
    let mut left = count;
    let mut in_flight: HashMap<u64, u64> = HashMap::new();
    loop {
        while left > 0 && in_flight.len() < BATCHES_IN_FLIGHT_MAX {
            let size = left.min(BATCH_ITEMS_MAX as u64);
            let id = client.next_request_id();
            // `size` <= 256.
            let items = vec![item; size as usize];
            if let Err(err) = client.send(id, &Request::SignBatch { vpsd_id, items }) {
                result.error = Some(err);
                break;
            }
            left -= size;
            in_flight.insert(id, size);
        }
        if in_flight.is_empty() || result.error.is_some() {
            break;
        }
        let (id, response) = match client.recv() {
            Ok(answer) => answer,
            Err(err) => {
                result.error = Some(err);
                break;
            }
        };
        let Some(size) = in_flight.remove(&id) else {
            continue;
        };
        match response {
            Response::BatchSigned { results } => {
                for item in results {
                    match item {
                        ItemResult::Signed(indicium) => result.indicia.push(indicium),
                        ItemResult::Failed(body) => result.refused.push((body, 1)),
                    }
                }
            }
            Response::Error(body) => result.refused.push((body, size)),
            other => {
                result.error = Some(ClientError::Protocol(format!(
                    "unexpected answer to sign-batch: opcode {:#04x}",
                    other.opcode()
                )));
                break;
            }
        }
    }
    result
        .indicia
        .sort_by_key(|indicium| indicium.payload.piece_number);
    result
}
