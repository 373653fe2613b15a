//! The fenced commit on the wire: a round's writes in transactions, and the rounds of
//! several shards merged into the same ones.

use super::*;

/// How many times a write that only shared a failed transaction is sent again in one
/// round before the round gives it up (as [`Outcome::Retry`]).
pub(super) const ROUND_ATTEMPTS_MAX: usize = 4;

/// Commits the rounds of several shards together, and answers each with its outcomes.
pub(super) async fn commit_rounds(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    rounds: Vec<(Vec<StateWrite>, Reply<Vec<Outcome>>)>,
    lease: &LeaseClock,
) {
    if rounds.len() == 1 {
        for (writes, reply) in rounds {
            let _ = reply.send(commit(client, keys, appliance, &writes, lease).await);
        }
        return;
    }
    let mut all = Vec::new();
    let mut replies = Vec::with_capacity(rounds.len());
    for (writes, reply) in rounds {
        replies.push((writes.len(), reply));
        all.extend(writes);
    }
    match commit(client, keys, appliance, &all, lease).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(outcomes.by_ref().take(count).collect()));
            }
        }
        Err(err) => {
            // (commit refuses per write; an error of its own leaves every outcome unknown.)
            let text = err.to_string();
            for (_, reply) in replies {
                let _ = reply.send(Err(ClusterError::Shared(text.clone())));
            }
        }
    }
}

/// etcd's space quota is exceeded (the NOSPACE alarm). This is no refusal: the write that
/// crossed the quota *was* applied (etcd 3.4 applies it, then answers with this error and
/// raises the alarm), and those after it were not; which one a write was, only its value in
/// etcd says. So its outcome is unknown: it is sent again, as it was, until etcd takes
/// writes again and answers.
pub(super) fn no_space(err: &etcd_client::Error) -> bool {
    err.to_string().contains("database space exceeded")
}

/// etcd (or gRPC) refuses a request over its size limit before applying anything.
pub(super) fn too_large(err: &etcd_client::Error) -> bool {
    let text = err.to_string();
    text.contains("request is too large") || text.contains("message larger than max")
}

pub(super) async fn commit(
    client: &mut Client,
    keys: &Keys,
    appliance: &str,
    writes: &[StateWrite],
    lease: &LeaseClock,
) -> Result<Vec<Outcome>, ClusterError> {
    let mut outcomes = vec![Outcome::Retry; writes.len()];
    let mut pending: Vec<usize> = (0..writes.len()).collect();
    for _ in 0..ROUND_ATTEMPTS_MAX {
        if pending.is_empty() {
            break;
        }
        let mut again = Vec::new();
        for batch in batches(writes, &pending) {
            let mut compares = Vec::with_capacity(batch.len() * 2);
            let mut puts = Vec::with_capacity(batch.len() * 2);
            let mut reads = Vec::with_capacity(batch.len() * 2);
            for &index in &batch {
                let write = &writes[index];
                let (owner, state) = (keys.owner(write.vpsd_id), keys.state(write.vpsd_id));
                if write.epoch == 0 {
                    // The first write: nobody may own the vPSD yet.
                    compares.push(Compare::create_revision(owner.clone(), CompareOp::Equal, 0));
                    puts.push(TxnOp::put(owner.clone(), appliance, None));
                    puts.push(TxnOp::put(keys.owned(appliance, write.vpsd_id), "", None));
                } else {
                    compares.push(Compare::mod_revision(
                        owner.clone(),
                        CompareOp::Equal,
                        write.epoch,
                    ));
                }
                compares.push(Compare::mod_revision(
                    state.clone(),
                    CompareOp::Equal,
                    write.last,
                ));
                puts.push(TxnOp::put(state.clone(), write.state.clone(), None));
                if let Some(sealed) = &write.keys {
                    puts.push(TxnOp::put(keys.keys(write.vpsd_id), sealed.clone(), None));
                }
                reads.push(TxnOp::get(owner, None));
                reads.push(TxnOp::get(state, None));
            }
            let response = match client
                .txn(Txn::new().when(compares).and_then(puts).or_else(reads))
                .await
            {
                Ok(response) => response,
                Err(err) if no_space(&err) => {
                    if !lease.no_space.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                            "etcd is out of space ({err}): this appliance takes no change \
                             until etcd takes writes again; the writes under way are sent \
                             again until then (docs/CLUSTER.md 9.3)"
                        );
                    }
                    // Unknown (see `no_space`): these, and the rest, go again next round.
                    return Ok(outcomes);
                }
                Err(err) if too_large(&err) => {
                    tracing::warn!(
                        "etcd refused a transaction of {} writes: {err}",
                        batch.len()
                    );
                    for &index in &batch {
                        outcomes[index] = Outcome::Refused;
                    }
                    continue;
                }
                // Unknown: this transaction may or may not have been applied; those not
                // sent yet surely were not. All go again (the same bytes) next round; the
                // ones written stay written.
                Err(err) => {
                    tracing::warn!("etcd did not answer a transaction: {err}");
                    return Ok(outcomes);
                }
            };
            if lease.no_space.swap(false, Ordering::AcqRel) {
                tracing::warn!("etcd takes writes again: changes are accepted again");
            }
            if response.succeeded() {
                let revision = response.header().map_or(0, |header| header.revision());
                for &index in &batch {
                    let epoch = match writes[index].epoch {
                        0 => revision,
                        epoch => epoch,
                    };
                    outcomes[index] = Outcome::Written { revision, epoch };
                }
                continue;
            }
            let answers = response.op_responses();
            if answers.len() != batch.len() * 2 {
                return Err(ClusterError::Answer {
                    sent: batch.len() * 2,
                    received: answers.len(),
                });
            }
            for (&index, pair) in batch.iter().zip(answers.chunks(2)) {
                let seen = Seen {
                    owner: first_kv(&pair[0]).map(|(value, revision)| {
                        (String::from_utf8_lossy(&value).into_owned(), revision)
                    }),
                    state: first_kv(&pair[1]),
                };
                match judge(&writes[index], appliance, &seen) {
                    Outcome::Retry => again.push(index),
                    outcome => outcomes[index] = outcome,
                }
            }
        }
        pending = again;
    }
    Ok(outcomes)
}

/// The value and `mod_revision` of the first key a read in a transaction found.
pub(super) fn first_kv(answer: &TxnOpResponse) -> Option<(Vec<u8>, i64)> {
    match answer {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    }
}
