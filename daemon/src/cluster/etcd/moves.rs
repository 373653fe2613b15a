//! Placement and planned moves: reading what placement is made of (live appliances,
//! drains, pins), the operator's changes to it, where vPSDs are, and the fenced handover
//! of a vPSD from its owner to another appliance.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::cluster::placement::{Placement, PINS_MAX};
use crate::cluster::{HandOver, Handover, Operation, PinKey};

/// Every key and value under `prefix`, at most `limit`.
async fn values_under(
    client: &mut Client,
    prefix: &str,
    limit: usize,
) -> Result<Vec<(String, String)>, ClusterError> {
    let response = client
        .get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(i64::try_from(limit).unwrap_or(i64::MAX)),
            ),
        )
        .await?;
    if response.more() {
        tracing::warn!("more than {limit} keys under {prefix}: only the first {limit} are used");
    }
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect())
}

/// What placement is made of, now.
pub(super) async fn read_placement(
    client: &mut Client,
    keys: &Keys,
    rebalance: bool,
) -> Result<Placement, ClusterError> {
    // Every read below sees at least this revision.
    let revision = client
        .get(keys.appliances(), Some(GetOptions::new().with_count_only()))
        .await?
        .header()
        .map_or(0, |header| header.revision());
    let live = appliances(client, keys).await?;
    let drained: BTreeSet<String> = draining(client, keys).await?.into_iter().collect();
    let vpsd_prefix = keys.pins_vpsd();
    let vpsd_pins: BTreeMap<u64, String> = values_under(client, &vpsd_prefix, PINS_MAX)
        .await?
        .into_iter()
        .filter_map(|(key, appliance)| {
            Some((key.strip_prefix(&vpsd_prefix)?.parse().ok()?, appliance))
        })
        .collect();
    let owner_pins: BTreeMap<String, String> = values_under(client, &keys.pins_owner(), PINS_MAX)
        .await?
        .into_iter()
        .filter_map(|(key, appliance)| Some((keys.pinned_owner(&key)?, appliance)))
        .collect();
    Ok(Placement {
        live,
        draining: drained,
        vpsd_pins,
        owner_pins,
        rebalance,
        revision,
    })
}

/// An operator's change to placement.
pub(super) async fn operate(
    client: &mut Client,
    keys: &Keys,
    operation: &Operation,
) -> Result<(), ClusterError> {
    match operation {
        Operation::Drain { appliance, undo } => {
            let key = keys.draining(appliance);
            if *undo {
                client.delete(key, None).await?;
            } else {
                client.put(key, "", None).await?;
            }
        }
        Operation::Pin { key, appliance } => {
            let key = match key {
                PinKey::Vpsd(vpsd_id) => keys.pin_vpsd(*vpsd_id),
                PinKey::Owner(owner) => keys.pin_owner(owner),
            };
            match appliance {
                Some(appliance) => {
                    client.put(key, appliance.as_str(), None).await?;
                }
                None => {
                    client.delete(key, None).await?;
                }
            }
        }
    }
    Ok(())
}

/// The owner key of each vPSD: its value (the owner's id), or None.
pub(super) async fn locate(
    client: &mut Client,
    keys: &Keys,
    vpsd_ids: &[u64],
) -> Result<Vec<Option<String>>, ClusterError> {
    let mut out = Vec::with_capacity(vpsd_ids.len());
    for chunk in vpsd_ids.chunks(crate::cluster::fence::TXN_OPS_MAX) {
        let reads: Vec<TxnOp> = chunk
            .iter()
            .map(|&vpsd_id| TxnOp::get(keys.owner(vpsd_id), None))
            .collect();
        let response = client.txn(Txn::new().and_then(reads)).await?;
        let answers = response.op_responses();
        if answers.len() != chunk.len() {
            return Err(ClusterError::Answer {
                sent: chunk.len(),
                received: answers.len(),
            });
        }
        for answer in &answers {
            out.push(
                first_kv(answer).map(|(owner, _)| String::from_utf8_lossy(&owner).into_owned()),
            );
        }
    }
    Ok(out)
}

/// Hands a vPSD this appliance owns at `epoch`, whose state etcd holds at revision `last`,
/// to `to`: one transaction, guarded like a commit (the owner key still at this
/// appliance's epoch, the state as this appliance last wrote it) and by `to` being live,
/// makes `to` the owner (the transaction's revision is its epoch) and moves the owners'
/// index entry. The state and keys stay as they are: `to` continues from them.
pub(super) async fn hand_over(
    client: &mut Client,
    keys: &Keys,
    me: &str,
    handover: &Handover,
) -> Result<HandOver, ClusterError> {
    let Handover {
        vpsd_id,
        epoch,
        last,
        ref to,
        ..
    } = *handover;
    let to = to.as_str();
    let owner_key = keys.owner(vpsd_id);
    let target = keys.appliance(to);
    let response = client
        .txn(
            Txn::new()
                .when(vec![
                    Compare::mod_revision(owner_key.clone(), CompareOp::Equal, epoch),
                    Compare::mod_revision(keys.state(vpsd_id), CompareOp::Equal, last),
                    Compare::create_revision(target.clone(), CompareOp::Greater, 0),
                ])
                .and_then(vec![
                    TxnOp::put(owner_key.clone(), to, None),
                    TxnOp::delete(keys.owned(me, vpsd_id), None),
                    TxnOp::put(keys.owned(to, vpsd_id), "", None),
                ])
                .or_else(vec![
                    TxnOp::get(owner_key, None),
                    TxnOp::get(keys.state(vpsd_id), None),
                    TxnOp::get(target, None),
                ]),
        )
        .await?;
    if response.succeeded() {
        return Ok(HandOver::Done {
            epoch: response.header().map_or(0, |header| header.revision()),
        });
    }
    let answers = response.op_responses();
    let owner = answers.first().and_then(first_kv);
    let state = answers.get(1).and_then(first_kv);
    let target_live = answers.get(2).and_then(first_kv).is_some();
    Ok(match owner {
        Some((owner, revision)) if revision != epoch || owner != me.as_bytes() => {
            HandOver::Fenced {
                owner: String::from_utf8_lossy(&owner).into_owned(),
            }
        }
        None => HandOver::Fenced {
            owner: String::new(),
        },
        Some(_) if state.is_none_or(|(_, revision)| revision != last) => HandOver::Stale,
        Some(_) if !target_live => HandOver::NotLive,
        Some(_) => HandOver::Stale,
    })
}
