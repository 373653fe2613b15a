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

    /// Members on the given hosts, each in its network namespace (a partition test).
    pub fn start_on_hosts(hosts: &[indiciad::cluster::local::MemberHost]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members = LocalEtcd::start_on_hosts(dir.path(), hosts, Duration::from_secs(60))
            .unwrap_or_else(|err| panic!("{err}"));
        Self { members, dir }
    }

    /// Restarts a killed member (see [`LocalEtcd::restart`]).
    pub fn restart(&mut self, index: usize) {
        self.members.restart(index).unwrap();
    }
}

impl Drop for EtcdCluster {
    /// A failed test leaves the members' logs where they can be read.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dir = std::env::temp_dir().join("indicia-test-logs");
            let _ = std::fs::create_dir_all(&dir);
            for index in 0..8 {
                let name = format!("m{index}");
                let log = self.members.log(&name);
                if !log.is_empty() {
                    let path = dir.join(format!("{}-etcd-{name}.log", std::process::id()));
                    let _ = std::fs::write(&path, log);
                }
            }
        }
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
