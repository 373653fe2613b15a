//! The cluster's etcd layer against a real 3-member etcd on loopback (started and stopped
//! by each test): the appliance's lease and announcement, owner claims and takeovers, the
//! fenced commit, and self-fencing when keep-alive fails.
//! Built with the `cluster` feature (`.ci/run` does), which needs `protoc`; the members are
//! the Debian `etcd` binary.
#![cfg(feature = "cluster")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use indiciad::cluster::etcd::{Claim, Etcd, EtcdConfig};
use indiciad::cluster::fence::{Outcome, StateWrite};
use indiciad::cluster::ClusterError;
use support::etcd::EtcdCluster;

fn appliance(cluster: &EtcdCluster, id: &str, ttl_s: u64) -> Etcd {
    Etcd::connect(EtcdConfig {
        endpoints: cluster.endpoints(),
        appliance: id.into(),
        advertise: format!("127.0.0.1:7{}", id.len()),
        lease_ttl: Duration::from_secs(ttl_s),
        prefix: "/indicia-test".into(),
        master_check: "check".into(),
        rebalance: true,
    })
    .unwrap()
}

fn write(vpsd_id: u64, epoch: i64, last: i64, state: &str) -> StateWrite {
    StateWrite {
        vpsd_id,
        epoch,
        last,
        state: state.as_bytes().to_vec(),
        keys: None,
    }
}

fn owned(claim: Claim) -> (i64, Option<(Vec<u8>, i64)>) {
    match claim {
        Claim::Owned { epoch, state, .. } => (epoch, state),
        Claim::Taken { owner } => panic!("taken by {owner}"),
    }
}

#[test]
fn appliances_are_announced_under_their_leases_and_leave_when_they_stop() {
    let cluster = EtcdCluster::start(3);
    let a1 = appliance(&cluster, "a1", 5);
    let a2 = appliance(&cluster, "a2", 5);
    assert!(a1.may_commit() && a1.lease_id() != 0);
    let ids = |etcd: &Etcd| -> Vec<String> {
        etcd.appliances()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    assert_eq!(ids(&a2), vec!["a1", "a2"]);
    // A clean stop revokes the lease: gone at once, not after the TTL.
    drop(a1);
    assert_eq!(ids(&a2), vec!["a2"]);
}

#[test]
fn commits_are_fenced_by_the_owners_epoch_and_the_last_revision() {
    let cluster = EtcdCluster::start(3);
    let a1 = appliance(&cluster, "a1", 5);
    let a2 = appliance(&cluster, "a2", 5);
    let (epoch1, state) = owned(a1.claim(7, None).unwrap());
    assert_eq!(state, None);
    assert_eq!(
        owned(a1.claim(7, None).unwrap()).0,
        epoch1,
        "a claim of one's own vPSD keeps the epoch"
    );
    let Outcome::Written { revision: r1, .. } =
        a1.commit_blocking(vec![write(7, epoch1, 0, "v1")]).unwrap()[0]
    else {
        panic!("the first write of its owner is written")
    };
    assert_eq!(
        a1.commit_blocking(vec![write(7, epoch1, 0, "again")])
            .unwrap(),
        vec![Outcome::Stale { revision: r1 }],
        "a write that does not follow the last revision"
    );
    assert_eq!(
        a2.claim(7, None).unwrap(),
        Claim::Taken { owner: "a1".into() }
    );
    // A takeover: compare-and-swap on the owner key; the state comes along.
    let (epoch2, state) = owned(a2.claim(7, Some("a1")).unwrap());
    assert!(epoch2 > epoch1);
    assert_eq!(state, Some((b"v1".to_vec(), r1)));
    // The old owner is fenced off, whatever it believes.
    assert_eq!(
        a1.commit_blocking(vec![write(7, epoch1, r1, "v2 by a1")])
            .unwrap(),
        vec![Outcome::Fenced {
            owner: Some("a2".into())
        }]
    );
    assert!(matches!(
        a2.commit_blocking(vec![write(7, epoch2, r1, "v2 by a2")])
            .unwrap()[..],
        [Outcome::Written { .. }]
    ));
}

/// A round of 100 writes takes four transactions (32 each at most); when one vPSD of a
/// batch was taken over, only its write is refused and the others are sent again.
#[test]
fn a_round_spans_transactions_and_a_fenced_write_fails_alone() {
    let cluster = EtcdCluster::start(3);
    let a1 = appliance(&cluster, "a1", 5);
    let a2 = appliance(&cluster, "a2", 5);
    let epochs: Vec<i64> = (0..100u64)
        .map(|vpsd| owned(a1.claim(vpsd, None).unwrap()).0)
        .collect();
    let round: Vec<StateWrite> = (0..100u64)
        .map(|vpsd| write(vpsd, epochs[vpsd as usize], 0, "first"))
        .collect();
    let outcomes = a1.commit_blocking(round).unwrap();
    let revisions: Vec<i64> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Written { revision, .. } => *revision,
            other => panic!("{other:?}"),
        })
        .collect();
    owned(a2.claim(42, Some("a1")).unwrap());
    let round: Vec<StateWrite> = (0..100u64)
        .map(|vpsd| {
            write(
                vpsd,
                epochs[vpsd as usize],
                revisions[vpsd as usize],
                "second",
            )
        })
        .collect();
    let outcomes = a1.commit_blocking(round).unwrap();
    for (vpsd, outcome) in outcomes.iter().enumerate() {
        if vpsd == 42 {
            assert_eq!(
                outcome,
                &Outcome::Fenced {
                    owner: Some("a2".into())
                }
            );
        } else {
            assert!(
                matches!(outcome, Outcome::Written { .. }),
                "{vpsd}: {outcome:?}"
            );
        }
    }
}

/// When etcd stops answering, the appliance stops committing before its lease can have
/// expired (and says why); once etcd answers again it renews (or is granted a new lease)
/// and commits again.
#[test]
fn without_keep_alive_commits_stop_before_the_lease_can_expire() {
    let cluster = EtcdCluster::start(3);
    let a1 = appliance(&cluster, "a1", 3);
    let (epoch, _) = owned(a1.claim(9, None).unwrap());
    assert!(a1.may_commit());
    cluster.signal_all(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    while a1.may_commit() {
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "still committing when the lease may have expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    match a1.commit_blocking(vec![write(9, epoch, 0, "during")]) {
        Err(ClusterError::LeaseLost { .. }) => {}
        other => panic!("{other:?}"),
    }
    cluster.signal_all(nix::sys::signal::Signal::SIGCONT);
    let resumed = Instant::now();
    while !a1.may_commit() {
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "no lease again 30 s after etcd came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(matches!(
        a1.commit_blocking(vec![write(9, epoch, 0, "after")])
            .unwrap()[..],
        [Outcome::Written { .. }]
    ));
}

/// A vPSD's first write creates its owner key (the epoch is the revision that did); a
/// second appliance creating the same vPSD is fenced; the owners' index follows takeovers;
/// and an appliance brings the cluster's master key or is refused.
#[test]
fn first_writes_create_owners_and_the_index_follows_takeovers() {
    let cluster = EtcdCluster::start(3);
    let a1 = appliance(&cluster, "a1", 5);
    let a2 = appliance(&cluster, "a2", 5);
    let outcomes = a1.commit_blocking(vec![write(5, 0, 0, "created")]).unwrap();
    let Outcome::Written { revision, epoch } = outcomes[0] else {
        panic!("{outcomes:?}")
    };
    assert_eq!(epoch, revision, "the owner key was created with the state");
    assert_eq!(
        a2.commit_blocking(vec![write(5, 0, 0, "mine too")])
            .unwrap(),
        vec![Outcome::Fenced {
            owner: Some("a1".into())
        }]
    );
    assert_eq!(a1.owned_by("a1").unwrap(), vec![5]);
    owned(a2.claim(5, Some("a1")).unwrap());
    assert_eq!(a1.owned_by("a1").unwrap(), Vec::<u64>::new());
    assert_eq!(a1.owned_by("a2").unwrap(), vec![5]);
    let stored = a2.load(vec![5, 6]).unwrap();
    assert_eq!(
        stored[0].owner.as_ref().map(|(owner, _)| owner.as_str()),
        Some("a2")
    );
    assert_eq!(
        stored[0].state.as_ref().map(|(value, _)| value.as_slice()),
        Some(&b"created"[..])
    );
    assert_eq!(stored[1], Default::default());
    let stranger = Etcd::connect(EtcdConfig {
        endpoints: cluster.endpoints(),
        appliance: "a3".into(),
        advertise: "127.0.0.1:7003".into(),
        lease_ttl: Duration::from_secs(5),
        prefix: "/indicia-test".into(),
        master_check: "another key".into(),
        rebalance: true,
    });
    assert!(
        matches!(stranger, Err(ClusterError::MasterKeyMismatch { .. })),
        "{stranger:?}"
    );
    let twin = Etcd::connect(EtcdConfig {
        endpoints: cluster.endpoints(),
        appliance: "a1".into(),
        advertise: "127.0.0.1:7004".into(),
        lease_ttl: Duration::from_secs(5),
        prefix: "/indicia-test".into(),
        master_check: "check".into(),
        rebalance: true,
    });
    assert!(
        matches!(twin, Err(ClusterError::DuplicateAppliance(_))),
        "{twin:?}"
    );
}
