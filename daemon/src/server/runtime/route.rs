//! Cluster mode: where requests go when this appliance does not hold their vPSD, planned
//! moves, rebalancing, and the cluster commands that read or change placement
//! (docs/CLUSTER.md section 12).
//!
//! - A request for a vPSD another appliance owns is forwarded to it once (the hop limit
//!   is 1: a forwarded request is never forwarded again) and its answer carried back. A
//!   stale view is harmless: an owner that is not the owner any more answers
//!   `vpsd-moved`, and the request is routed once more, from etcd's owner key read anew.
//! - A vPSD whose owner key names this appliance but which no shard serves (a planned move
//!   handed it here, a claim whose answer was lost) is adopted on demand, from etcd.
//! - A provision goes where placement puts the new vPSD.
//! - A planned move waits until the vPSD is quiet (its running session committed, etcd
//!   holding every record of it), hands it over in one fenced transaction, journals the
//!   release, and forwards the requests that waited meanwhile to the new owner.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicia_proto::{ErrorCode, Request, Response, VpsdPlacement};

use super::peer::CallError;
use super::{deliver, fail_stop, unix_now, ReplyTo, Shard};
use crate::cluster::{Adoption, HandOver, Handover, Operation, PinKey, Replicator, Stored};
use crate::server::shard::{moved_response, moved_text, Arrival, Elsewhere, MoveOrder};

/// The most vPSDs one shard moves at a time by itself (rebalancing, drains).
pub(super) const MOVES_IN_FLIGHT_MAX: usize = 8;
/// How long a planned move waits for its vPSD to become quiet before it gives up: less
/// than a forward's default time limit, so that the requests that wait for the move are
/// answered in time.
const MOVE_QUIET_WAIT: Duration = Duration::from_secs(2);
/// How often a shard looks for vPSDs that placement puts elsewhere.
pub(super) const REBALANCE_EVERY: Duration = Duration::from_secs(1);
/// How often it looks again when nothing changed since a look that found nothing.
const REBALANCE_RESCAN: Duration = Duration::from_secs(30);
/// The most times one request is forwarded (each to the owner read anew after the last
/// answered `vpsd-moved`).
const ROUTES_MAX: u8 = 3;
/// The most owners a shard remembers; beyond, it forgets one to remember another.
const OWNERS_CACHED_MAX: usize = 1 << 16;

/// Starts routing what the shard could not handle itself, and the moves it was asked for.
pub(super) fn route_pending(shard: &Rc<Shard>) {
    let (elsewhere, moves) = {
        let mut core = shard.core.borrow_mut();
        (core.take_elsewhere(), core.take_moves())
    };
    for item in elsewhere {
        glommio::spawn_local(route(Rc::clone(shard), item)).detach();
    }
    for order in moves {
        glommio::spawn_local(carry_out(Rc::clone(shard), order)).detach();
    }
}

fn answer(shard: &Rc<Shard>, reply: ReplyTo, response: Response) {
    deliver(shard, vec![(reply, response)]);
}

fn unavailable(message: String) -> Response {
    Response::error(ErrorCode::ClusterUnavailable, message)
}

/// Handles a request here, whether or not the shard holds its vPSD.
fn handle_here(shard: &Rc<Shard>, item: Elsewhere<ReplyTo>, arrival: Arrival) {
    let result = shard.core.borrow_mut().handle(
        unix_now(),
        &item.client,
        item.request_id,
        item.request,
        item.reply,
        arrival,
    );
    if let Err(fatal) = result {
        fail_stop(&fatal);
    }
    shard.work.notify();
    route_pending(shard);
}

/// The owner key of a vPSD: from what this shard remembers, or read from etcd (`fresh`).
async fn owner_of(
    shard: &Shard,
    replicator: &Arc<dyn Replicator>,
    vpsd_id: u64,
    fresh: bool,
) -> Result<Option<String>, crate::cluster::ClusterError> {
    if !fresh {
        if let Some(owner) = shard.owners.borrow().get(&vpsd_id) {
            return Ok(Some(owner.clone()));
        }
    }
    let owner = replicator.locate(vec![vpsd_id]).await?.pop().flatten();
    // This appliance is never remembered as the owner: whether it still is, only its
    // shard (or etcd) can say.
    let other = owner
        .as_deref()
        .filter(|owner| *owner != replicator.appliance());
    remember(shard, vpsd_id, other);
    Ok(owner)
}

fn remember(shard: &Shard, vpsd_id: u64, owner: Option<&str>) {
    let mut owners = shard.owners.borrow_mut();
    match owner {
        Some(owner) => {
            if owners.len() >= OWNERS_CACHED_MAX && !owners.contains_key(&vpsd_id) {
                // Full: one goes (whichever the map yields first), not all of them.
                if let Some(&evicted) = owners.keys().next() {
                    owners.remove(&evicted);
                }
            }
            owners.insert(vpsd_id, owner.to_owned());
        }
        None => {
            owners.remove(&vpsd_id);
        }
    }
}

/// Routes one request for a vPSD this shard did not hold when it came.
async fn route(shard: Rc<Shard>, item: Elsewhere<ReplyTo>) {
    let (Some(replicator), Some(vpsd_id)) = (shard.replicator.clone(), item.request.vpsd_id())
    else {
        let arrival = Arrival::Here;
        handle_here(&shard, item, arrival);
        return;
    };
    let me = replicator.appliance().to_owned();
    // At most ROUTES_MAX attempts: the next after an owner that was not the owner any more
    // (each a single hop).
    let notice = matches!(item.request, Request::ClusterAdopt { .. });
    for attempt in 0..ROUTES_MAX {
        if !notice && shard.core.borrow().holds(vpsd_id) {
            // It came here meanwhile (adopted, taken over): the usual path.
            let arrival = item.arrival;
            handle_here(&shard, item, arrival);
            return;
        }
        // A handover notice is about this appliance only: never sent on.
        let here_only = item.arrival == Arrival::Forwarded || notice;
        let fresh = attempt > 0 || here_only;
        let owner = match owner_of(&shard, &replicator, vpsd_id, fresh).await {
            Ok(owner) => owner,
            Err(err) => {
                let text = format!(
                    "cluster: where vPSD {vpsd_id} is cannot be read now ({err}); nothing \
                     was charged: retry shortly"
                );
                answer(&shard, item.reply, unavailable(text));
                return;
            }
        };
        let to = match owner {
            Some(owner) if owner == me => {
                adopt_and_handle(&shard, &replicator, item).await;
                return;
            }
            Some(owner) if !here_only => owner,
            Some(owner) => {
                // Forwarded here by an appliance whose view is stale: it routes again.
                let moved = moved_response(vpsd_id, Some(&owner));
                answer(&shard, item.reply, moved);
                return;
            }
            None => {
                let placed = match &item.request {
                    Request::Provision { owner, .. } if item.arrival == Arrival::Direct => {
                        let placement = replicator.placement();
                        placement
                            .place(vpsd_id, Some(owner), &me)
                            .filter(|placed| *placed != me)
                            .map(str::to_owned)
                    }
                    _ => None,
                };
                match placed {
                    Some(placed) => placed,
                    None => {
                        handle_here(&shard, item, Arrival::Here);
                        return;
                    }
                }
            }
        };
        match forward(&shard, &replicator, &item, &to).await {
            Forwarded::Answered(response) => {
                answer(&shard, item.reply, response);
                return;
            }
            Forwarded::Moved(response) => {
                if attempt + 1 == ROUTES_MAX {
                    answer(&shard, item.reply, response);
                    return;
                }
                remember(&shard, vpsd_id, None);
            }
        }
    }
}

/// How a forward ended.
enum Forwarded {
    /// The answer to give the client.
    Answered(Response),
    /// The appliance did not own the vPSD (any more): route again.
    Moved(Response),
}

async fn forward(
    shard: &Rc<Shard>,
    replicator: &Arc<dyn Replicator>,
    item: &Elsewhere<ReplyTo>,
    to: &str,
) -> Forwarded {
    let vpsd_id = item.request.vpsd_id().unwrap_or_default();
    let Some(peers) = &shard.links else {
        // With [tls] and no peer certificate this appliance cannot reach the others as
        // itself: the client is sent to the owner.
        let text = format!(
            "{} (with [tls], requests are forwarded only with [cluster] peer_certificate)",
            moved_text(vpsd_id, Some(to))
        );
        return Forwarded::Answered(Response::error(ErrorCode::VpsdMoved, text));
    };
    let placement = replicator.placement();
    let Some(address) = placement.address(to) else {
        remember(shard, vpsd_id, None);
        return Forwarded::Answered(unavailable(format!(
            "vPSD {vpsd_id} belongs to appliance {to}, which is not alive: another appliance \
             takes it over within about twice the lease TTL; nothing was charged: retry shortly"
        )));
    };
    let request = Request::Forwarded {
        client_id: item.client.id.clone(),
        request_id: item.request_id,
        request: Box::new(item.request.clone()),
    };
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    metrics.add(crate::server::metrics::Counter::ClusterForwarded, 1);
    match peers.call(to, address, &request).await {
        Ok(Response::Error(body)) if body.code == ErrorCode::VpsdMoved => {
            Forwarded::Moved(Response::Error(body))
        }
        Ok(response) => Forwarded::Answered(response),
        Err(CallError::NotSent(why)) => {
            // Read the owner anew next time: it may have been taken over.
            remember(shard, vpsd_id, None);
            metrics.add(crate::server::metrics::Counter::ClusterForwardsFailed, 1);
            Forwarded::Answered(unavailable(format!(
                "vPSD {vpsd_id} belongs to appliance {to}, which could not be reached \
                 ({why}); nothing was charged: retry shortly"
            )))
        }
        Err(CallError::Lost(why)) => {
            remember(shard, vpsd_id, None);
            metrics.add(crate::server::metrics::Counter::ClusterForwardsFailed, 1);
            Forwarded::Answered(Response::error(
                ErrorCode::ForwardFailed,
                format!(
                    "forwarded to appliance {to}, whose answer did not come ({why}): it may \
                     have been carried out; retry with the same request id"
                ),
            ))
        }
    }
}

/// etcd names this appliance the vPSD's owner but no shard serves it: adopt it from etcd,
/// then handle the request.
async fn adopt_and_handle(
    shard: &Rc<Shard>,
    replicator: &Arc<dyn Replicator>,
    item: Elsewhere<ReplyTo>,
) {
    let vpsd_id = item.request.vpsd_id().unwrap_or_default();
    let me = replicator.appliance();
    let stored = match replicator.fetch(vpsd_id).await {
        Ok(stored) => stored,
        Err(err) => {
            let text = format!("cluster: vPSD {vpsd_id} cannot be read now ({err}); retry shortly");
            answer(shard, item.reply, unavailable(text));
            return;
        }
    };
    match stored {
        Stored {
            owner: Some((owner, epoch)),
            state: Some(state),
            keys: Some(keys),
        } if owner == me => {
            // Adopting under a claim the shard holds already changes nothing (another
            // request adopted it meanwhile); under a newer one, it replaces a stale copy.
            let adoption = Adoption {
                vpsd_id,
                epoch,
                state,
                keys,
                from: String::new(),
            };
            let mut core = shard.core.borrow_mut();
            if let Err(fatal) = core.adopt(unix_now(), adoption) {
                fail_stop(&fatal);
            }
            // Served here now: handled as it came (a forwarded one stays forwarded, so that
            // it is never sent on); if it could not be adopted, or it is the handover notice
            // (which would be checked against etcd again and again), answered here.
            let notice = matches!(item.request, Request::ClusterAdopt { .. });
            let arrival = if core.holds(vpsd_id) && !notice {
                item.arrival
            } else {
                Arrival::Here
            };
            drop(core);
            handle_here(shard, item, arrival);
        }
        Stored {
            owner: Some((owner, _)),
            ..
        } if owner != me => {
            remember(shard, vpsd_id, Some(&owner));
            let moved = moved_response(vpsd_id, Some(&owner));
            answer(shard, item.reply, moved);
        }
        // Nothing to adopt (a provision never acknowledged): handled here as it is.
        _ => handle_here(shard, item, Arrival::Here),
    }
}

/// Carries out a planned move.
async fn carry_out(shard: Rc<Shard>, order: MoveOrder<ReplyTo>) {
    let MoveOrder {
        vpsd_id,
        to,
        reply,
        account,
    } = order;
    let Some(replicator) = shard.replicator.clone() else {
        return;
    };
    let started = Instant::now();
    // An operator's move pins the vPSD; rebalancing follows placement and pins nothing.
    let pin = reply.is_some();
    let outcome = hand_over(&shard, &replicator, vpsd_id, &to, pin, account).await;
    let now = unix_now();
    let response = match outcome {
        Err(MoveRefused::Gone(owner)) if owner == replicator.appliance() => {
            // Handed back here under a newer claim while this copy is stale: it stays until
            // its next write is fenced, or the handover notice replaces it.
            if let Err(fatal) = shard.core.borrow_mut().stay(now, vpsd_id) {
                fail_stop(&fatal);
            }
            Response::error(
                ErrorCode::ClusterUnavailable,
                format!("vPSD {vpsd_id} was handed back here meanwhile: not moved; retry"),
            )
        }
        Err(MoveRefused::Gone(owner)) => {
            // Another appliance owns it already (it was taken over while this one was cut
            // off): the shard lets it go, and what waited goes to the owner.
            tracing::warn!(vpsd = vpsd_id, "not moved to {to}: {owner} owns it already");
            remember(&shard, vpsd_id, Some(&owner));
            if let Err(fatal) = shard.core.borrow_mut().depart(now, vpsd_id, &owner, false) {
                fail_stop(&fatal);
            }
            moved_response(vpsd_id, Some(&owner))
        }
        Ok(()) => {
            remember(&shard, vpsd_id, Some(&to));
            if let Err(fatal) = shard.core.borrow_mut().depart(now, vpsd_id, &to, true) {
                fail_stop(&fatal);
            }
            tracing::info!(
                vpsd = vpsd_id,
                "moved to {to} in {} ms",
                started.elapsed().as_millis()
            );
            let metrics = &shard.metrics.shards[usize::from(shard.index)];
            metrics.add(crate::server::metrics::Counter::ClusterMovedAway, 1);
            notify_adopter(&shard, &replicator, vpsd_id, &to);
            placement_of(&replicator, &[vpsd_id], vec![Some(to.clone())])
        }
        Err(MoveRefused::Unneeded) => {
            tracing::debug!(
                vpsd = vpsd_id,
                "not moved to {to}: placement changed meanwhile"
            );
            if let Err(fatal) = shard.core.borrow_mut().stay(now, vpsd_id) {
                fail_stop(&fatal);
            }
            Response::error(
                ErrorCode::ClusterUnavailable,
                format!("vPSD {vpsd_id} not moved: placement changed meanwhile"),
            )
        }
        Err(MoveRefused::Stays(refusal)) => {
            tracing::warn!(
                vpsd = vpsd_id,
                "not moved to {to}: {}",
                error_text(&refusal)
            );
            // Rebalancing leaves it alone a while before it tries again.
            shard.core.borrow_mut().move_failed(vpsd_id, now);
            if let Err(fatal) = shard.core.borrow_mut().stay(now, vpsd_id) {
                fail_stop(&fatal);
            }
            refusal
        }
    };
    shard.work.notify();
    route_pending(&shard);
    if let Some(reply) = reply {
        answer(&shard, reply, response);
    }
}

fn error_text(response: &Response) -> String {
    match response {
        Response::Error(body) => body.message.clone(),
        other => format!("{other:?}"),
    }
}

/// Why a move did not happen.
enum MoveRefused {
    /// The vPSD stays here; the answer says why.
    Stays(Response),
    /// Another appliance owns it already.
    Gone(String),
    /// Rebalancing that placement, read again, does not ask for: it stays, quietly.
    Unneeded,
}

impl From<Response> for MoveRefused {
    fn from(response: Response) -> Self {
        Self::Stays(response)
    }
}

/// Waits until the vPSD is quiet and hands it over; why not, if it did not move.
async fn hand_over(
    shard: &Rc<Shard>,
    replicator: &Arc<dyn Replicator>,
    vpsd_id: u64,
    to: &str,
    pin: bool,
    rebalancing: Option<String>,
) -> Result<(), MoveRefused> {
    let placement = replicator.placement();
    if to == replicator.appliance() {
        return Err(MoveRefused::from(Response::error(
            ErrorCode::InvalidArgument,
            format!("vPSD {vpsd_id} is on appliance {to} already"),
        )));
    }
    if !placement.is_live(to) {
        return Err(MoveRefused::from(Response::error(
            ErrorCode::InvalidArgument,
            format!("appliance {to} is not alive in the cluster: vPSD {vpsd_id} stays"),
        )));
    }
    if !placement.takes_vpsds(to) {
        return Err(MoveRefused::from(Response::error(
            ErrorCode::InvalidArgument,
            format!("appliance {to} is draining: vPSD {vpsd_id} stays"),
        )));
    }
    // An operator's move pins the vPSD to its new appliance first, so that rebalancing
    // does not move it back (`cluster pin --unpin` gives it back to placement).
    if pin {
        let pin = Operation::Pin {
            key: PinKey::Vpsd(vpsd_id),
            appliance: Some(to.to_owned()),
        };
        if let Err(err) = replicator.operate(pin).await {
            return Err(MoveRefused::from(unavailable(format!(
                "cluster: {err}: vPSD {vpsd_id} not pinned to {to}, not moved"
            ))));
        }
    }
    let deadline = Instant::now() + MOVE_QUIET_WAIT;
    let owned = loop {
        if let Some(owned) = shard.core.borrow().quiet(vpsd_id) {
            break owned;
        }
        if !shard.core.borrow().holds(vpsd_id) {
            return Err(MoveRefused::from(moved_response(vpsd_id, None)));
        }
        if Instant::now() > deadline {
            return Err(MoveRefused::from(unavailable(format!(
                "vPSD {vpsd_id} did not become quiet (its writes in etcd) within {} s: not \
                 moved",
                MOVE_QUIET_WAIT.as_secs()
            ))));
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    };
    match replicator
        .hand_over(Handover {
            vpsd_id,
            epoch: owned.epoch,
            last: owned.last,
            to: to.to_owned(),
            rebalancing,
        })
        .await
    {
        Ok(HandOver::Done { .. }) => Ok(()),
        Ok(HandOver::Fenced { owner }) if !owner.is_empty() => Err(MoveRefused::Gone(owner)),
        Ok(HandOver::Fenced { .. }) => Err(MoveRefused::from(moved_response(vpsd_id, None))),
        Ok(HandOver::Misplaced) => Err(MoveRefused::Unneeded),
        Ok(HandOver::NotLive) => Err(MoveRefused::from(Response::error(
            ErrorCode::InvalidArgument,
            format!("appliance {to} is not alive in the cluster: vPSD {vpsd_id} stays"),
        ))),
        Ok(HandOver::Stale) => Err(MoveRefused::from(unavailable(format!(
            "vPSD {vpsd_id} changed in etcd during the move: not moved; retry"
        )))),
        // etcd did not say: its owner key does. If the handover was applied, the vPSD is
        // the target's; if the key cannot be read either, it stays, and the fence holds
        // (were the handover applied after all, this appliance's next write of the vPSD
        // is refused and voided, and the vPSD leaves).
        Err(err) => match replicator.locate(vec![vpsd_id]).await {
            Ok(owners) if owners.first().and_then(Option::as_deref) == Some(to) => Ok(()),
            _ => Err(MoveRefused::from(unavailable(format!(
                "cluster: {err}: vPSD {vpsd_id} not moved"
            )))),
        },
    }
}

/// Tells the new owner that it owns the vPSD, so that it serves it before its first
/// request (which would adopt it all the same).
fn notify_adopter(shard: &Rc<Shard>, replicator: &Arc<dyn Replicator>, vpsd_id: u64, to: &str) {
    let (Some(address), true) = (
        replicator.placement().address(to).map(str::to_owned),
        shard.links.is_some(),
    ) else {
        return;
    };
    let shard = Rc::clone(shard);
    let to = to.to_owned();
    glommio::spawn_local(async move {
        if let Some(peers) = &shard.links {
            let adopt = Request::ClusterAdopt { vpsd_id };
            match peers.call(&to, &address, &adopt).await {
                Ok(Response::VpsdStatus(_)) => {}
                Ok(other) => {
                    tracing::debug!(vpsd = vpsd_id, "{to} answered the handover with {other:?}");
                }
                Err(err) => tracing::debug!(vpsd = vpsd_id, "{to} not told of the move: {err:?}"),
            }
        }
    })
    .detach();
}

/// Starts moving the vPSDs that placement puts elsewhere (at most a few at a time).
pub(super) fn rebalance(shard: &Rc<Shard>) {
    let Some(replicator) = &shard.replicator else {
        return;
    };
    if !replicator.may_change() || !shard.control.imports_done() {
        return;
    }
    let placement = replicator.placement();
    let me = replicator.appliance();
    if !placement.is_live(me) {
        return;
    }
    let mut core = shard.core.borrow_mut();
    let room = MOVES_IN_FLIGHT_MAX.saturating_sub(core.moving());
    if room == 0 {
        return;
    }
    // Nothing to look at again while placement and the vPSDs here are as at the last
    // look, which found nothing (but every REBALANCE_RESCAN: a failed move's back-off
    // ends).
    let held = core.store().replica().map_or(0, |book| book.owned());
    let unchanged = shard
        .rebalanced
        .borrow()
        .as_ref()
        .is_some_and(|(seen, seen_held, at)| {
            seen.same_layout(&placement) && *seen_held == held && at.elapsed() < REBALANCE_RESCAN
        });
    if unchanged {
        return;
    }
    let misplaced = core.misplaced(unix_now(), room, |vpsd_id, owner| {
        placement.place(vpsd_id, Some(owner), me)
    });
    *shard.rebalanced.borrow_mut() = misplaced
        .is_empty()
        .then(|| (Arc::clone(&placement), held, Instant::now()));
    let mut started = 0;
    for (vpsd_id, to) in misplaced {
        started += usize::from(core.begin_move(vpsd_id, &to));
    }
    drop(core);
    if started > 0 {
        route_pending(shard);
    }
}

/// The placement answer for these vPSDs, given their owners (None: not owned).
fn placement_of(
    replicator: &Arc<dyn Replicator>,
    vpsd_ids: &[u64],
    owners: Vec<Option<String>>,
) -> Response {
    let placement = replicator.placement();
    let me = replicator.appliance();
    let vpsds = vpsd_ids
        .iter()
        .zip(owners)
        .map(|(&vpsd_id, owner)| match owner {
            Some(appliance) => VpsdPlacement {
                vpsd_id,
                appliance,
                owned: true,
            },
            None => VpsdPlacement {
                vpsd_id,
                appliance: placement
                    .place(vpsd_id, None, me)
                    .unwrap_or_default()
                    .to_owned(),
                owned: false,
            },
        })
        .collect();
    // What one answer holds (the protocol's bounds); addresses as cluster-report has them.
    let appliances = placement
        .live
        .iter()
        .take(indicia_proto::message::CLUSTER_APPLIANCES_MAX)
        .map(|(id, address)| {
            let address = if address.len() > indicia_proto::message::APPLIANCE_ADDRESS_BYTES_MAX {
                "(address too long)".to_owned()
            } else {
                address.clone()
            };
            (id.clone(), address)
        })
        .collect();
    Response::Placement { appliances, vpsds }
}

/// Answers cluster-placement, cluster-drain and cluster-pin from etcd, without holding up
/// the shard.
pub(super) fn placement_request(shard: &Rc<Shard>, request: Request, reply: ReplyTo) {
    if let (None, Request::ClusterPlacement { vpsd_ids }) = (&shard.replicator, &request) {
        // Alone: no appliance to route to; every vPSD is this one's to ask about.
        let vpsds = vpsd_ids
            .iter()
            .map(|&vpsd_id| VpsdPlacement {
                vpsd_id,
                appliance: String::new(),
                owned: false,
            })
            .collect();
        let alone = Response::Placement {
            appliances: Vec::new(),
            vpsds,
        };
        answer(shard, reply, alone);
        return;
    }
    let Some(replicator) = shard.replicator.clone() else {
        answer(
            shard,
            reply,
            Response::error(
                ErrorCode::InvalidArgument,
                "this appliance is not in cluster mode (its configuration has no [cluster] \
                 section)",
            ),
        );
        return;
    };
    let named = match &request {
        Request::ClusterDrain { appliance, .. } | Request::ClusterPin { appliance, .. } => {
            Some(appliance.as_str()).filter(|appliance| !appliance.is_empty())
        }
        _ => None,
    };
    if let Some(bad) = named.filter(|appliance| !crate::config::is_appliance_id(appliance)) {
        let refusal = Response::error(
            ErrorCode::InvalidArgument,
            format!("{bad:?} is not an appliance id (letters, digits, '.', '_' or '-')"),
        );
        answer(shard, reply, refusal);
        return;
    }
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        let response = match request {
            Request::ClusterPlacement { vpsd_ids } => {
                match replicator.locate(vpsd_ids.clone()).await {
                    Ok(owners) => placement_of(&replicator, &vpsd_ids, owners),
                    Err(err) => unavailable(format!("cluster: {err}")),
                }
            }
            Request::ClusterDrain { appliance, undo } => {
                report(&replicator, Operation::Drain { appliance, undo }).await
            }
            Request::ClusterPin { subject, appliance } => {
                let key = match subject {
                    indicia_proto::PinSubject::Vpsd(vpsd_id) => PinKey::Vpsd(vpsd_id),
                    indicia_proto::PinSubject::Owner(owner) => PinKey::Owner(owner),
                };
                let appliance = Some(appliance).filter(|appliance| !appliance.is_empty());
                report(&replicator, Operation::Pin { key, appliance }).await
            }
            other => Response::error(
                ErrorCode::UnknownOpcode,
                format!("not a placement request: {other:?}"),
            ),
        };
        answer(&shard, reply, response);
    })
    .detach();
}

async fn report(replicator: &Arc<dyn Replicator>, operation: Operation) -> Response {
    match replicator.operate(operation).await {
        Ok((taken, members)) => cluster_response(taken, members),
        Err(err) => unavailable(format!("cluster: {err}")),
    }
}

/// The cluster-report answer.
pub(super) fn cluster_response(taken: u32, members: Vec<crate::cluster::Member>) -> Response {
    Response::Cluster {
        taken,
        appliances: members
            .into_iter()
            .map(|member| indicia_proto::ApplianceEntry {
                id: member.id,
                address: member.address,
                alive: member.alive,
                vpsds: member.vpsds,
                draining: member.draining,
            })
            .collect(),
    }
}
