//! Who owns what: claims, the owners' index, takeovers (by the sweep and by hand), the
//! members, and reading what etcd holds of vPSDs.

use super::*;

/// The most members, and the longest address, one cluster report holds (the protocol's
/// `cluster-report` bounds).
pub(super) const MEMBERS_REPORTED_MAX: usize = 1024;
pub(super) const ADDRESS_REPORTED_MAX: usize = 128;

/// The most keys one range read returns (the sweep and the loads page through larger sets).
pub(super) const PAGE: i64 = 1000;

pub(super) async fn claim(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    vpsd_id: u64,
    from: Option<&str>,
) -> Result<Claim, ClusterError> {
    let owner_key = keys.owner(vpsd_id);
    let reads = || {
        vec![
            TxnOp::get(keys.state(vpsd_id), None),
            TxnOp::get(keys.keys(vpsd_id), None),
        ]
    };
    let current = client.get(owner_key.clone(), None).await?;
    let (compare, mut ops) = match current.kvs().first() {
        None => (
            Compare::create_revision(owner_key.clone(), CompareOp::Equal, 0),
            Vec::new(),
        ),
        Some(kv) if kv.value() == appliance.as_bytes() => {
            // Already this appliance's (it restarted): the epoch stands.
            let epoch = kv.mod_revision();
            let response = client.txn(Txn::new().and_then(reads())).await?;
            let answers = response.op_responses();
            return Ok(Claim::Owned {
                epoch,
                state: answers.first().and_then(first_kv),
                keys: answers.get(1).and_then(first_kv).map(|(value, _)| value),
            });
        }
        Some(kv) if from.is_some_and(|from| kv.value() == from.as_bytes()) => (
            Compare::mod_revision(owner_key.clone(), CompareOp::Equal, kv.mod_revision()),
            vec![TxnOp::delete(
                keys.owned(&String::from_utf8_lossy(kv.value()), vpsd_id),
                None,
            )],
        ),
        Some(kv) => {
            return Ok(Claim::Taken {
                owner: String::from_utf8_lossy(kv.value()).into_owned(),
            })
        }
    };
    ops.push(TxnOp::put(owner_key.clone(), appliance, None));
    ops.push(TxnOp::put(keys.owned(appliance, vpsd_id), "", None));
    let first_read = ops.len();
    ops.extend(reads());
    let response = client
        .txn(
            Txn::new()
                .when(vec![compare])
                .and_then(ops)
                .or_else(vec![TxnOp::get(owner_key, None)]),
        )
        .await?;
    let answers = response.op_responses();
    if response.succeeded() {
        Ok(Claim::Owned {
            epoch: response.header().map_or(0, |header| header.revision()),
            state: answers.get(first_read).and_then(first_kv),
            keys: answers
                .get(first_read + 1)
                .and_then(first_kv)
                .map(|(value, _)| value),
        })
    } else {
        Ok(Claim::Taken {
            owner: answers
                .first()
                .and_then(first_kv)
                .map(|(owner, _)| String::from_utf8_lossy(&owner).into_owned())
                .unwrap_or_default(),
        })
    }
}

pub(super) async fn load(
    client: &mut Client,
    keys: &Keys,
    vpsd_ids: &[u64],
) -> Result<Vec<Stored>, ClusterError> {
    let mut out = Vec::with_capacity(vpsd_ids.len());
    // Three reads a vPSD, within the operation limit of one transaction.
    for chunk in vpsd_ids.chunks(crate::cluster::fence::TXN_OPS_MAX / 3) {
        let mut reads = Vec::with_capacity(chunk.len() * 3);
        for &vpsd_id in chunk {
            reads.push(TxnOp::get(keys.owner(vpsd_id), None));
            reads.push(TxnOp::get(keys.state(vpsd_id), None));
            reads.push(TxnOp::get(keys.keys(vpsd_id), None));
        }
        let response = client.txn(Txn::new().and_then(reads)).await?;
        let answers = response.op_responses();
        if answers.len() != chunk.len() * 3 {
            return Err(ClusterError::Answer {
                sent: chunk.len() * 3,
                received: answers.len(),
            });
        }
        for triple in answers.chunks(3) {
            out.push(Stored {
                owner: first_kv(&triple[0]).map(|(value, revision)| {
                    (String::from_utf8_lossy(&value).into_owned(), revision)
                }),
                state: first_kv(&triple[1]),
                keys: first_kv(&triple[2]).map(|(value, _)| value),
            });
        }
    }
    Ok(out)
}

/// Every key under `prefix` (keys only), page by page.
pub(super) async fn keys_under(
    client: &mut Client,
    prefix: &str,
) -> Result<Vec<String>, ClusterError> {
    let end = {
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    };
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let response = client
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_range(end.clone())
                        .with_keys_only()
                        .with_limit(PAGE),
                ),
            )
            .await?;
        for kv in response.kvs() {
            out.push(String::from_utf8_lossy(kv.key()).into_owned());
        }
        match response.kvs().last() {
            Some(last) if response.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

pub(super) async fn owned_by(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
) -> Result<Vec<u64>, ClusterError> {
    Ok(keys_under(client, &keys.owned_by(appliance))
        .await?
        .iter()
        .filter_map(|key| keys.owned_id(appliance, key))
        .collect())
}

pub(super) async fn release(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    vpsd_id: u64,
    epoch: i64,
) -> Result<bool, ClusterError> {
    let owner = keys.owner(vpsd_id);
    let response = client
        .txn(
            Txn::new()
                .when(vec![
                    Compare::mod_revision(owner.clone(), CompareOp::Equal, epoch),
                    Compare::create_revision(keys.state(vpsd_id), CompareOp::Equal, 0),
                ])
                .and_then(vec![
                    TxnOp::delete(owner, None),
                    TxnOp::delete(keys.owned(appliance, vpsd_id), None),
                ]),
        )
        .await?;
    Ok(response.succeeded())
}

/// The most vPSDs one step of a takeover claims: between steps the lease is renewed, so
/// that taking over thousands of vPSDs never makes the successor lose its own lease.
pub(super) const TAKEOVER_STEP: usize = 256;

/// Takes over at most `limit` vPSDs of `from` (those whose successor among `live` is this
/// appliance, or all of them without `live`): claims each, and returns those claimed with
/// their state, and whether some are left. A claim that fails ends the step with what it
/// has (the rest stay in the index for the next one).
pub(super) async fn take_over(
    client: &mut Client,
    keys: &Keys,
    me: &str,
    from: &str,
    live: Option<&[String]>,
    limit: usize,
) -> Result<(Vec<Adoption>, bool), ClusterError> {
    let mut adopted = Vec::new();
    let mut claimed = 0;
    for vpsd_id in owned_by(client, keys, from).await? {
        if let Some(live) = live {
            if successor(vpsd_id, live) != Some(me) {
                continue;
            }
        }
        if claimed == limit {
            return Ok((adopted, true));
        }
        claimed += 1;
        let claim = match claim(client, keys, me, vpsd_id, Some(from)).await {
            Ok(claim) => claim,
            Err(err) => {
                tracing::warn!(vpsd = vpsd_id, "takeover from {from} stopped: {err}");
                return Ok((adopted, true));
            }
        };
        match claim {
            Claim::Owned {
                epoch,
                state: Some(state),
                keys: Some(sealed),
            } => adopted.push(Adoption {
                vpsd_id,
                epoch,
                state,
                keys: sealed,
                from: from.to_owned(),
            }),
            Claim::Owned { epoch, .. } => {
                // Owned but never written: a provisioning that was never acknowledged.
                let _ = release(client, keys, me, vpsd_id, epoch).await;
            }
            Claim::Taken { owner } => {
                tracing::info!(vpsd = vpsd_id, "takeover: {owner} was faster");
            }
        }
    }
    Ok((adopted, false))
}

/// A takeover by hand: every vPSD of `from`, alive or not, handed to the adopter step by
/// step (the lease is renewed meanwhile by its own task).
pub(super) async fn by_hand(
    client: &mut Client,
    keys: &Keys,
    me: &str,
    from: &str,
    adopter: Option<&Adopter>,
    lease: &LeaseClock,
) -> Result<usize, ClusterError> {
    let Some(adopter) = adopter else {
        return Err(ClusterError::NotServing);
    };
    if from == me {
        return Ok(0);
    }
    let mut count = 0;
    loop {
        if !lease.may_commit() {
            return Err(ClusterError::LeaseLost {
                silent_ms: lease.silent_ms(),
            });
        }
        let (taken, more) = take_over(client, keys, me, from, None, TAKEOVER_STEP).await?;
        count += taken.len();
        if !taken.is_empty() {
            adopter(taken);
        }
        if !more {
            break;
        }
    }
    tracing::warn!("takeover by hand: {count} vPSDs of {from} are now this appliance's");
    Ok(count)
}

/// The appliances an operator drains.
pub(super) async fn draining(
    client: &mut Client,
    keys: &Keys,
) -> Result<Vec<String>, ClusterError> {
    let prefix = keys.drainings();
    Ok(keys_under(client, &prefix)
        .await?
        .into_iter()
        .filter_map(|key| key.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// Every member that ever joined, with whether it is alive and how many vPSDs it owns.
pub(super) async fn members(client: &mut Client, keys: &Keys) -> Result<Vec<Member>, ClusterError> {
    let live = appliances(client, keys).await?;
    let draining = draining(client, keys).await?;
    let prefix = keys.members();
    let response = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut out = Vec::new();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let id = key.strip_prefix(&prefix).unwrap_or(&key).to_owned();
        let owned = client
            .get(
                keys.owned_by(&id),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        let address = live.iter().find(|(live_id, _)| *live_id == id).map_or_else(
            || String::from_utf8_lossy(kv.value()).into_owned(),
            |(_, address)| address.clone(),
        );
        out.push(Member {
            alive: live.iter().any(|(live_id, _)| *live_id == id),
            draining: draining.contains(&id),
            id,
            address,
            vpsds: u32::try_from(owned).unwrap_or(u32::MAX),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    // What one cluster report holds (the protocol's bounds).
    out.truncate(MEMBERS_REPORTED_MAX);
    for member in &mut out {
        if member.address.len() > ADDRESS_REPORTED_MAX {
            member.address = "(address too long)".into();
        }
    }
    Ok(out)
}

/// One sweep: the vPSDs of members without a live appliance key, for those this appliance
/// succeeds.
pub(super) async fn sweep_dead(
    client: &mut Client,
    keys: &Keys,
    me: &str,
) -> Result<(Vec<Adoption>, bool), ClusterError> {
    let live: Vec<String> = appliances(client, keys)
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    if !live.iter().any(|id| id == me) {
        return Ok((Vec::new(), false));
    }
    // The successors: the live appliances an operator does not drain (all live ones if
    // every one drains), as placement has them, so that a takeover does not place a vPSD
    // where it would move away from at once.
    let draining = draining(client, keys).await?;
    let open: Vec<String> = live
        .iter()
        .filter(|id| !draining.contains(id))
        .cloned()
        .collect();
    let successors = if open.is_empty() { live.clone() } else { open };
    let members_prefix = keys.members();
    let members: Vec<String> = keys_under(client, &members_prefix)
        .await?
        .into_iter()
        .filter_map(|key| key.strip_prefix(&members_prefix).map(str::to_owned))
        .collect();
    let mut adopted = Vec::new();
    let mut more = false;
    for dead in members.iter().filter(|member| !live.contains(member)) {
        let left = TAKEOVER_STEP.saturating_sub(adopted.len());
        if left == 0 {
            more = true;
            break;
        }
        let (taken, rest) = take_over(client, keys, me, dead, Some(&successors), left).await?;
        more |= rest;
        if !taken.is_empty() {
            tracing::warn!(
                "takeover: {} vPSDs of {dead} (its lease expired) are now this appliance's",
                taken.len()
            );
        }
        adopted.extend(taken);
    }
    Ok((adopted, more))
}

pub(super) async fn appliances(
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
