//! A connection's reader: frames in, the handshake and access control, and each authorized
//! request run here or forwarded to the shard that owns its vPSD.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use indicia_proto::{ErrorCode, Indicium, Request, Response};

use super::inflight::Inflight;
use super::route;
use super::transport::SharedStream;
use super::{deliver_local, fail_stop, unix_now, Cross, Forwarded, Outgoing, ReplyTo, Shard};
use crate::server::conn_rules::{Action, Answer, ConnectionRules, Next, Timeout};
use crate::server::handshake::{authorize, ClientEntry};
use crate::server::local::Outbox;
use crate::server::metrics::Counter;
use crate::server::shard::Arrival;
use crate::server::shard_of;

/// Requests a connection has read for other shards, sent in one message per shard after
/// each read (or sooner, before the reader would wait).
struct Forwarder {
    batches: Vec<Vec<Forwarded>>,
    queued: usize,
}

impl Forwarder {
    fn new(shards: u16) -> Self {
        Self {
            batches: (0..shards).map(|_| Vec::new()).collect(),
            queued: 0,
        }
    }

    fn push(&mut self, owner: u16, forwarded: Forwarded) {
        let shards = self.batches.len();
        let Some(batch) = self.batches.get_mut(usize::from(owner)) else {
            // shard_of places every vPSD on one of the shards: the request has nowhere to
            // go and could never be answered.
            fail_stop(&format!(
                "request {} is for shard {owner} of {shards}, which does not exist",
                forwarded.reply.request_id
            ));
        };
        batch.push(forwarded);
        self.queued += 1;
    }

    async fn flush(&mut self, shard: &Rc<Shard>) {
        if self.queued == 0 {
            return;
        }
        self.queued = 0;
        let metrics = &shard.metrics.shards[usize::from(shard.index)];
        for (owner, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(batch);
            metrics.add(Counter::CrossShardRequests, batch.len() as u64);
            // Every shard has a sender to every other, and requests for this shard never
            // reach the forwarder.
            let Some(Some(sender)) = shard.peers.get(owner) else {
                fail_stop(&format!(
                    "shard {} has no channel to shard {owner} for {} requests",
                    shard.index,
                    batch.len()
                ));
            };
            match sender.send(Cross::Requests(batch)).await {
                Ok(()) => {}
                Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(
                    Cross::Requests(batch),
                ))) => {
                    // The owner stopped (after the drain timeout): the requests are read,
                    // so they are answered.
                    let refused = batch
                        .into_iter()
                        .map(|forwarded| {
                            let response = Response::error(
                                ErrorCode::ShuttingDown,
                                "the owning shard has stopped",
                            );
                            (forwarded.reply, response)
                        })
                        .collect();
                    deliver_local(shard, refused);
                }
                Err(err) => fail_stop(&format!(
                    "requests for shard {owner} were lost on their way: {err}"
                )),
            }
        }
    }
}

/// Reads and handles the connection's frames until it must close; true when it was cut
/// off (an error frame is on its way and the client may still be sending), false when the
/// client ended it or went quiet.
pub(super) async fn read_requests(
    shard: &Rc<Shard>,
    stream: &SharedStream,
    outbox: &Rc<Outbox<Outgoing>>,
    version: &Rc<Cell<u8>>,
    inflight: &Rc<Inflight>,
    connection_id: u64,
    mut rules: ConnectionRules,
) -> bool {
    /// Read buffer of an idle connection; it grows to hold a large frame, then shrinks.
    const READ_BUFFER: usize = 16 << 10;
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    let send = |answer: Answer| {
        if let Response::Error(body) = &answer.response {
            metrics.connection_error(body.code);
        }
        outbox.push(Outgoing {
            request_id: answer.request_id,
            version: version.get(),
            response: answer.response,
            received: answer.request,
        });
    };
    let mut forwarder = Forwarder::new(shard.shards);
    loop {
        if let Some(answer) = rules.handshake_overdue(Instant::now()) {
            inflight.acquire().await;
            send(answer);
            return true;
        }
        // Whether this turn took a whole frame off the buffer.
        let mut took_frames = false;
        // Every complete frame in the buffer.
        let mut stop = false;
        loop {
            let frame = match rules.next_frame(&buf[start..end]) {
                Next::Frame(frame) => frame,
                Next::Incomplete { needed } => {
                    if buf.len() - end < needed {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                        if buf.len() < end + needed {
                            buf.resize(end + needed, 0);
                        }
                    }
                    break;
                }
                Next::Close(answer) => {
                    take_inflight(shard, inflight, &mut forwarder).await;
                    send(answer);
                    stop = true;
                    break;
                }
            };
            // The frame is complete: its request's latency runs from here.
            let received = Instant::now();
            let frame_len = frame.len();
            take_inflight(shard, inflight, &mut forwarder).await;
            let action = rules.on_frame(
                frame,
                received,
                &shard.directory,
                &shard.rng,
                shard.inflight_total.get(),
            );
            start += frame_len;
            took_frames = true;
            match action {
                Action::Reply(answer) => send(answer),
                Action::ReplyAndClose(answer) => {
                    send(answer);
                    stop = true;
                    break;
                }
                Action::Dispatch {
                    request_id,
                    received,
                    client,
                    request,
                } => {
                    let reply = ReplyTo {
                        shard: shard.index,
                        connection: connection_id,
                        request_id,
                        received,
                    };
                    if let Some((owner, forwarded)) = dispatch(shard, client, request, reply) {
                        forwarder.push(owner, forwarded);
                    }
                }
            }
            // Answers from now on carry the version the handshake may just have fixed.
            version.set(rules.version());
            // A client with many frames buffered must not hold the shard.
            if glommio::executor().need_preempt() {
                forwarder.flush(shard).await;
                glommio::yield_if_needed().await;
            }
        }
        forwarder.flush(shard).await;
        if stop {
            return true;
        }
        if start == end {
            start = 0;
            end = 0;
            if buf.len() > READ_BUFFER {
                buf = vec![0u8; READ_BUFFER];
            }
        }
        rules.on_buffered(Instant::now(), end > start, took_frames);
        stream.set_read_timeout(rules.read_timeout(Instant::now()));
        match stream.read(&mut buf[end..]).await {
            Ok(0) => {
                let Some(answer) = rules.on_end_of_stream(end > start, shard.stopping.get()) else {
                    return false;
                };
                inflight.acquire().await;
                send(answer);
                return true;
            }
            Ok(n) => end += n,
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                match rules.on_read_timeout(inflight.any()) {
                    Timeout::Wait => {}
                    Timeout::CloseIdle => {
                        metrics.add(Counter::ConnectionsIdleClosed, 1);
                        return false;
                    }
                    Timeout::Close(answer) => {
                        inflight.acquire().await;
                        send(answer);
                        return true;
                    }
                }
            }
            Err(_) => return false,
        }
    }
}

/// Answers cluster-status and cluster-takeover from etcd, without holding up the shard.
fn cluster_report(shard: &Rc<Shard>, request: Request, reply: ReplyTo) {
    let Some(replicator) = &shard.replicator else {
        deliver_local(
            shard,
            vec![(
                reply,
                Response::error(
                    indicia_proto::ErrorCode::InvalidArgument,
                    "this appliance is not in cluster mode (its configuration has no [cluster] \
                     section)",
                ),
            )],
        );
        return;
    };
    let take_over_from = match request {
        Request::ClusterTakeover { from } => Some(from),
        _ => None,
    };
    let report = replicator.report(take_over_from);
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        let response = match report.await {
            Ok((taken, members)) => route::cluster_response(taken, members),
            Err(err) => Response::error(
                indicia_proto::ErrorCode::ClusterUnavailable,
                format!("cluster: {err}"),
            ),
        };
        deliver_local(&shard, vec![(reply, response)]);
    })
    .detach();
}

/// The client a forwarded request is carried for, once it may make the request: known
/// here, not another appliance, and authorized as if it had connected here.
fn forwarded_client(
    shard: &Shard,
    client_id: &str,
    request: &Request,
) -> Result<Arc<ClientEntry>, String> {
    let client = shard
        .directory
        .get(client_id)
        .filter(|client| client.role != indicia_proto::Role::Appliance)
        .ok_or_else(|| {
            format!(
                "client {client_id} is not known to this appliance: every appliance of the \
                 cluster needs the same [[clients]]"
            )
        })?;
    authorize(&client, request)?;
    Ok(client)
}

/// The most items of a `sign-batch` whose frame fits `request_body_bytes_max` with every
/// item at its largest, also when another appliance carries it (`forwarded`, with the
/// longest client id).
fn batch_items_max(request_body_bytes_max: u32) -> u16 {
    use indicia_proto::message::{BATCH_ITEMS_MAX, CLIENT_ID_BYTES_MAX};
    /// A `forwarded` body around its request: client id (u16 length and bytes), request
    /// id, opcode.
    const FORWARDED_BYTES: usize = 2 + CLIENT_ID_BYTES_MAX + 8 + 1;
    /// A `sign-batch` body: vPSD id and count, then the items (49 bytes at most each).
    const SIGN_BATCH_BYTES: usize = 8 + 2;
    const ITEM_BYTES_MAX: usize = 49;
    let room = (request_body_bytes_max as usize).saturating_sub(FORWARDED_BYTES + SIGN_BATCH_BYTES);
    // At most BATCH_ITEMS_MAX (256), so the cast holds.
    (room / ITEM_BYTES_MAX).clamp(1, BATCH_ITEMS_MAX) as u16
}

/// Takes a request in flight for the frame at hand, waiting while the connection has its
/// fill; requests held in the forwarder would never be answered meanwhile, so they go
/// first.
async fn take_inflight(shard: &Rc<Shard>, inflight: &Inflight, forwarder: &mut Forwarder) {
    if inflight.is_full() {
        forwarder.flush(shard).await;
    }
    inflight.acquire().await;
}

/// Handles an authorized request here if this shard owns its vPSD (or it needs no
/// owner); otherwise returns it with the shard it must go to.
fn dispatch(
    shard: &Rc<Shard>,
    client: Arc<ClientEntry>,
    request: Request,
    reply: ReplyTo,
) -> Option<(u16, Forwarded)> {
    let (client, request_id, request, arrival) = match request {
        Request::Forwarded {
            client_id,
            request_id,
            request,
        } => match forwarded_client(shard, &client_id, &request) {
            Ok(client) => (client, request_id, *request, Arrival::Forwarded),
            Err(refusal) => {
                let refusal = Response::error(ErrorCode::Forbidden, refusal);
                deliver_local(shard, vec![(reply, refusal)]);
                return None;
            }
        },
        request => (client, reply.request_id, request, Arrival::Direct),
    };
    let named = match &request {
        Request::ClusterMove { to: appliance, .. }
        | Request::ClusterTakeover { from: appliance } => Some(appliance.as_str()),
        _ => None,
    };
    if let Some(bad) = named.filter(|appliance| !crate::config::is_appliance_id(appliance)) {
        let refusal = Response::error(
            ErrorCode::InvalidArgument,
            format!("{bad:?} is not an appliance id (letters, digits, '.', '_' or '-')"),
        );
        deliver_local(shard, vec![(reply, refusal)]);
        return None;
    }
    let owner = match &request {
        Request::Stats => {
            let report = shard.metrics.report();
            deliver_local(shard, vec![(reply, Response::Stats { entries: report })]);
            return None;
        }
        Request::Topology => {
            let topology = indicia_proto::Topology {
                shards: shard.shards,
                shard: shard.index,
                hash: indicia_proto::message::SHARD_HASH_XXH3,
                batch_items_max: batch_items_max(shard.config.request_body_bytes_max),
                ports: shard.shard_ports.to_vec(),
            };
            deliver_local(shard, vec![(reply, Response::Topology(topology))]);
            return None;
        }
        Request::Backup { out } => {
            super::backup::backup_request(shard, out.clone(), reply);
            return None;
        }
        Request::ClusterStatus | Request::ClusterTakeover { .. } => {
            cluster_report(shard, request, reply);
            return None;
        }
        Request::ClusterPlacement { .. }
        | Request::ClusterDrain { .. }
        | Request::ClusterPin { .. } => {
            route::placement_request(shard, request, reply);
            return None;
        }
        // A malformed indicium names no vPSD; any shard can say so.
        Request::Verify { indicium } => Indicium::decode(indicium).map_or(shard.index, |decoded| {
            shard_of(decoded.payload.vpsd_id, shard.shards)
        }),
        other => other
            .vpsd_id()
            .map_or(shard.index, |vpsd_id| shard_of(vpsd_id, shard.shards)),
    };
    if owner != shard.index {
        return Some((
            owner,
            Forwarded {
                client,
                reply,
                request_id,
                request,
                arrival,
            },
        ));
    }
    let result =
        shard
            .core
            .borrow_mut()
            .handle(unix_now(), &client, request_id, request, reply, arrival);
    if let Err(fatal) = result {
        fail_stop(&fatal);
    }
    shard.work.notify();
    route::route_pending(shard);
    None
}
