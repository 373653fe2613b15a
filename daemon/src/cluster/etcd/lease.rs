//! The appliance's membership: joining the cluster, its lease and the keep-alive that
//! renews it in a task of its own.

use super::*;

/// The lease as the shards see it: until when this appliance may commit.
#[derive(Debug)]
pub(super) struct LeaseClock {
    pub(super) origin: Instant,
    /// Milliseconds after `origin` until which commits are allowed (0: never yet).
    pub(super) commit_until_ms: AtomicU64,
    /// Milliseconds after `origin` of the last successful renewal.
    pub(super) renewed_ms: AtomicU64,
    pub(super) id: AtomicI64,
    /// Renewals that failed or expired since the last good one.
    pub(super) failures: AtomicU64,
    /// Set once the lease has been seen expired.
    pub(super) expired: AtomicBool,
    /// Set while etcd answers writes with its space quota exceeded (the NOSPACE alarm);
    /// cleared by the next transaction that succeeds.
    pub(super) no_space: AtomicBool,
}

impl LeaseClock {
    pub(super) fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    /// A renewal sent at `sent` was granted `ttl`: commits are allowed until `sent + ttl`
    /// less the margin.
    pub(super) fn renewed(&self, sent: Instant, ttl: Duration) {
        let margin = ttl / 5;
        let until = self.ms(sent + ttl.saturating_sub(margin));
        self.commit_until_ms.fetch_max(until, Ordering::AcqRel);
        self.renewed_ms
            .store(self.ms(Instant::now()), Ordering::Release);
        self.failures.store(0, Ordering::Release);
        self.expired.store(false, Ordering::Release);
    }

    pub(super) fn may_commit(&self) -> bool {
        self.ms(Instant::now()) < self.commit_until_ms.load(Ordering::Acquire)
    }

    pub(super) fn silent_ms(&self) -> u64 {
        self.ms(Instant::now())
            .saturating_sub(self.renewed_ms.load(Ordering::Acquire))
    }
}

/// Keeps the appliance's lease alive (every `lease_ttl / 3`) until told to stop, then
/// revokes it. A keep-alive stream that breaks is opened again for the same lease; a lease
/// that expired is granted anew, with the appliance's key put again.
pub(super) async fn keep_lease(
    mut client: Client,
    keys: Keys,
    config: EtcdConfig,
    lease: Arc<LeaseClock>,
    mut session: Session,
    mut stop: oneshot::Receiver<()>,
) {
    let ttl = config.lease_ttl;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let Err(err) = session.renew(&lease, ttl).await else {
            continue;
        };
        lease.failures.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(
            "etcd: the lease was not renewed ({err}); commits stop {} ms after the last \
             renewal",
            ttl.saturating_sub(ttl / 5).as_millis()
        );
        if lease.expired.load(Ordering::Acquire) || u128::from(lease.silent_ms()) > ttl.as_millis()
        {
            // Gone: a new lease, and the appliance announced again.
            match Session::start(&mut client, &keys, &config, &lease, false).await {
                Ok(fresh) => {
                    tracing::warn!("etcd: a new lease was granted");
                    session = fresh;
                }
                Err(err) => tracing::warn!("etcd: no new lease yet: {err}"),
            }
        } else if let Ok((keeper, stream)) = client.lease_keep_alive(session.id).await {
            // The stream may be what broke (its member went away): a new one, at once.
            session.keeper = keeper;
            session.stream = stream;
            if session.renew(&lease, ttl).await.is_ok() {
                tracing::info!("etcd: the lease was renewed on a new keep-alive stream");
            }
        }
    }
    let _ = client.lease_revoke(session.id).await;
}

/// Joins the cluster: checks (or, for the first appliance, sets) the master key's check
/// value, and records the appliance as a member.
pub(super) async fn join(
    client: &mut Client,
    keys: &Keys,
    config: &EtcdConfig,
) -> Result<(), ClusterError> {
    let check = keys.master_check();
    let response = client
        .txn(
            Txn::new()
                .when(vec![Compare::create_revision(
                    check.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    check.clone(),
                    config.master_check.clone(),
                    None,
                )])
                .or_else(vec![TxnOp::get(check.clone(), None)]),
        )
        .await?;
    if !response.succeeded() {
        let held = match response.op_responses().first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        if held.as_deref() != Some(config.master_check.as_bytes()) {
            return Err(ClusterError::MasterKeyMismatch { key: check });
        }
    }
    client
        .put(
            keys.member(&config.appliance),
            config.advertise.clone(),
            None,
        )
        .await?;
    Ok(())
}

/// One lease and its keep-alive stream.
pub(super) struct Session {
    pub(super) id: i64,
    pub(super) keeper: etcd_client::LeaseKeeper,
    pub(super) stream: etcd_client::LeaseKeepAliveStream,
}

impl Session {
    /// A lease, with the appliance's key under it. At the first start, an appliance key
    /// that exists (under another live lease) means another process runs with this id.
    pub(super) async fn start(
        client: &mut Client,
        keys: &Keys,
        config: &EtcdConfig,
        lease: &LeaseClock,
        first: bool,
    ) -> Result<Self, ClusterError> {
        let key = keys.appliance(&config.appliance);
        if first {
            // The key may still be there under the lease of this appliance's previous
            // process (killed, and restarted within its TTL): it goes when that lease
            // expires. One that stays longer is renewed by another live process.
            let patience = Instant::now() + config.lease_ttl * 2;
            while !client.get(key.clone(), None).await?.kvs().is_empty() {
                if Instant::now() >= patience {
                    return Err(ClusterError::DuplicateAppliance(config.appliance.clone()));
                }
                tracing::info!(
                    "etcd: appliance key {key} is still alive (a previous process's lease?); \
                     waiting for it to expire"
                );
                tokio::time::sleep(config.lease_ttl / 4).await;
            }
        }
        let sent = Instant::now();
        let ttl_s = i64::try_from(config.lease_ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let granted = client.lease_grant(ttl_s, None).await?;
        let id = granted.id();
        let put = TxnOp::put(
            key.clone(),
            config.advertise.clone(),
            Some(PutOptions::new().with_lease(id)),
        );
        let when = if first {
            vec![Compare::create_revision(key, CompareOp::Equal, 0)]
        } else {
            Vec::new()
        };
        if !client
            .txn(Txn::new().when(when).and_then(vec![put]))
            .await?
            .succeeded()
        {
            let _ = client.lease_revoke(id).await;
            return Err(ClusterError::DuplicateAppliance(config.appliance.clone()));
        }
        let (keeper, stream) = client.lease_keep_alive(id).await?;
        lease.id.store(id, Ordering::Release);
        lease.renewed(
            sent,
            Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0)),
        );
        Ok(Self { id, keeper, stream })
    }

    /// One keep-alive round trip.
    pub(super) async fn renew(
        &mut self,
        lease: &LeaseClock,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        // A response to an earlier renewal that timed out must not be taken for this one's
        // (it would extend the commit window from a later send than it answers).
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::ZERO, self.stream.message()).await
        {}
        let sent = Instant::now();
        self.keeper.keep_alive().await?;
        match tokio::time::timeout(ttl / 3, self.stream.message()).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                lease.renewed(
                    sent,
                    Duration::from_secs(u64::try_from(response.ttl()).unwrap_or(0)),
                );
                Ok(())
            }
            Ok(Ok(Some(_))) => {
                lease.expired.store(true, Ordering::Release);
                Err(ClusterError::LeaseLost {
                    silent_ms: lease.silent_ms(),
                })
            }
            Ok(Ok(None)) => Err(ClusterError::Stopped),
            Ok(Err(err)) => Err(err.into()),
            Err(_) => Err(ClusterError::LeaseLost {
                silent_ms: lease.silent_ms(),
            }),
        }
    }
}
