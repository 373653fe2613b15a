//! Real etcd members for the cluster tests: [`indiciad::cluster::local::LocalEtcd`] (the
//! Debian `etcd` binary, 3.4) on loopback, with its data in a temporary directory that
//! goes when the cluster is dropped (after the members are killed).

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use indiciad::cluster::local::LocalEtcd;

/// A local etcd cluster and the temporary directory that holds it.
pub struct EtcdCluster {
    // Declared first: dropped (members killed) before the directory goes.
    members: LocalEtcd,
    pub dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports itself healthy.
    pub fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members = LocalEtcd::start(dir.path(), size, Duration::from_secs(60))
            .unwrap_or_else(|err| panic!("{err}"));
        Self { members, dir }
    }

    /// [`EtcdCluster::start`] with more flags for every member.
    pub fn start_with(size: usize, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members = LocalEtcd::start_with(dir.path(), size, Duration::from_secs(60), extra)
            .unwrap_or_else(|err| panic!("{err}"));
        Self { members, dir }
    }

    /// Restarts a killed member (see [`LocalEtcd::restart`]).
    pub fn restart(&mut self, index: usize) {
        self.members.restart(index).unwrap();
    }
}

impl Deref for EtcdCluster {
    type Target = LocalEtcd;

    fn deref(&self) -> &LocalEtcd {
        &self.members
    }
}

impl DerefMut for EtcdCluster {
    fn deref_mut(&mut self) -> &mut LocalEtcd {
        &mut self.members
    }
}
