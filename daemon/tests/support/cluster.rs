//! Appliances of a test cluster: `indiciad` processes with a `[cluster]` section, sharing
//! one master key, replicating to the test's etcd members.

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use indicia_client::Client;
use indicia_proto::Indicium;

use super::etcd::EtcdCluster;
use super::{write_config, Daemon};

/// The lease's TTL in these tests: a dead appliance is taken over within about twice that.
pub const LEASE_TTL_S: u64 = 2;

/// What every member of a cluster shares, and an operator restores after a data loss.
pub const KEY_FILES: [&str; 4] = [
    "master.key",
    "provider.key",
    "provider.pub",
    "admin.credential",
];

/// One appliance of the test cluster: its directory, id, port and, while it runs, its
/// process.
pub struct Appliance {
    pub dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
    /// Where it listens (loopback, or its namespace's address).
    pub host: String,
    /// The network namespace it runs in (a partition test), if any.
    pub netns: Option<String>,
    /// Environment variables its process gets (an HSM test: SoftHSM2's configuration and
    /// the credentials directory).
    pub env: Vec<(&'static str, PathBuf)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Appliance {
    /// An appliance whose vPSDs stay where they were provisioned (`rebalance = false`),
    /// as the tests of takeovers need.
    pub fn new(root: &Path, id: &'static str, etcd: &EtcdCluster) -> Self {
        Self::configured(root, id, etcd, "rebalance = false\n")
    }

    /// An appliance with more `[cluster]` settings (`extra`: TOML lines).
    pub fn configured(root: &Path, id: &'static str, etcd: &EtcdCluster, extra: &str) -> Self {
        Self::placed(root, id, etcd, ("127.0.0.1", free_port(), None), "", extra)
    }

    /// An appliance in its own network namespace, at `host` (port 7450), a member of the
    /// same cluster as `seed` when given.
    pub fn in_netns(
        root: &Path,
        id: &'static str,
        etcd: &EtcdCluster,
        seed: Option<&Appliance>,
        netns: &str,
        host: &str,
        extra: &str,
    ) -> Self {
        // Plaintext on the namespace's address: the test's network reaches nothing else.
        let tls = "[tls]\nplaintext = \"anywhere\"\n";
        let appliance = Self::placed(root, id, etcd, (host, 7450, Some(netns)), tls, extra);
        if let Some(seed) = seed {
            appliance.copy_keys_from(seed);
        }
        appliance
    }

    /// An appliance listening on (host, port), in a network namespace if given; `before`:
    /// sections ahead of `[cluster]`, `extra`: more `[cluster]` lines.
    fn placed(
        root: &Path,
        id: &'static str,
        etcd: &EtcdCluster,
        (host, port, netns): (&str, u16, Option<&str>),
        before: &str,
        extra: &str,
    ) -> Self {
        let dir = root.join(id);
        let text = format!(
            "{before}[cluster]\netcd = {:?}\nappliance = \"{id}\"\nadvertise = \"{host}:{port}\"\n\
             lease_ttl_s = {LEASE_TTL_S}\nprefix = \"/indicia-it\"\n{extra}",
            etcd.endpoints()
        );
        let config = write_config(&dir, &text, &[]);
        Self {
            dir,
            port,
            config,
            daemon: None,
            host: host.to_owned(),
            netns: netns.map(str::to_owned),
            env: Vec::new(),
        }
    }

    /// A member of the same cluster as `seed`: the same master key, provider key and admin
    /// credential (docs/CLUSTER.md), its own journals.
    pub fn joining(root: &Path, id: &'static str, etcd: &EtcdCluster, seed: &Appliance) -> Self {
        let appliance = Self::new(root, id, etcd);
        appliance.copy_keys_from(seed);
        appliance
    }

    /// [`Appliance::joining`] with more `[cluster]` settings.
    pub fn joining_configured(
        root: &Path,
        id: &'static str,
        etcd: &EtcdCluster,
        seed: &Appliance,
        extra: &str,
    ) -> Self {
        let appliance = Self::configured(root, id, etcd, extra);
        appliance.copy_keys_from(seed);
        appliance
    }

    /// Two started members of one cluster (a1, and a2 joining it), both placing and
    /// rebalancing by default, once a1 sees both live.
    pub fn started_pair(root: &Path, etcd: &EtcdCluster) -> (Self, Self) {
        let mut a1 = Self::configured(root, "a1", etcd, "");
        a1.start();
        let mut a2 = Self::joining_configured(root, "a2", etcd, &a1, "");
        a2.start();
        let mut admin = a1.daemon().admin();
        wait_until("a1 sees two live appliances", || {
            admin.placement(&[]).unwrap().appliances.len() == 2
        });
        (a1, a2)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn copy_keys_from(&self, seed: &Appliance) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(self.data()).unwrap();
        std::fs::set_permissions(self.data(), std::fs::Permissions::from_mode(0o700)).unwrap();
        for name in KEY_FILES {
            let to = self.data().join(name);
            std::fs::copy(seed.data().join(name), &to).unwrap();
        }
    }

    pub fn start(&mut self) -> &Daemon {
        assert!(self.daemon.is_none());
        let env: Vec<(&str, &Path)> = self
            .env
            .iter()
            .map(|(name, value)| (*name, value.as_path()))
            .collect();
        self.daemon = Some(Daemon::start_with_env(
            &self.dir,
            Some(&self.config),
            &format!("{}:{}", self.host, self.port),
            self.netns.as_deref(),
            &env,
        ));
        self.daemon()
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    pub fn kill(&mut self) {
        self.daemon.take().unwrap().kill();
    }

    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    /// The data directory lost, all but the keys an operator restores (the appliance must
    /// not run).
    pub fn lose_data(&self) {
        assert!(self.daemon.is_none());
        for entry in std::fs::read_dir(self.data()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).unwrap();
            } else if !KEY_FILES.iter().any(|keep| path.ends_with(keep)) {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.daemon().child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// One entry of the appliance's stats (0 when it is not there).
    pub fn stat(&self, name: &str) -> u64 {
        let daemon = self.daemon();
        let mut admin = indicia_client::Client::connect(daemon.addr, &daemon.admin_credential())
            .unwrap_or_else(|err| {
                panic!(
                    "appliance at {} does not answer ({err}); its log:\n{}",
                    daemon.addr,
                    daemon.log_text()
                )
            });
        admin
            .stats()
            .unwrap()
            .into_iter()
            .find(|entry| entry.name == name)
            .map_or(0, |entry| entry.value)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(daemon) = &self.daemon {
            // A stopped process must be able to die.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(daemon.child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            // A failed test leaves the appliance's log where it can be read.
            if std::thread::panicking() {
                let dir = std::env::temp_dir().join("indicia-test-logs");
                let _ = std::fs::create_dir_all(&dir);
                let name = self.dir.file_name().map_or_else(
                    || "appliance".into(),
                    |name| name.to_string_lossy().into_owned(),
                );
                let path = dir.join(format!("{}-{name}.log", std::process::id()));
                let _ = std::fs::write(&path, daemon.log_text());
                eprintln!("the log of {name}: {}", path.display());
            }
        }
    }
}

/// Every indicium acknowledged so far, by (vPSD, piece number).
#[derive(Default)]
pub struct Acknowledged {
    pub pieces: BTreeMap<(u64, u64), Indicium>,
}

impl Acknowledged {
    pub fn record(&mut self, indicium: Indicium) {
        let key = (indicium.payload.vpsd_id, indicium.payload.piece_number);
        if let Some(earlier) = self.pieces.insert(key, indicium) {
            assert_eq!(
                earlier, indicium,
                "piece {key:?} was acknowledged twice with different content"
            );
            panic!("piece {key:?} was acknowledged twice");
        }
    }

    pub fn postage(&self, vpsd_id: u64) -> u64 {
        self.pieces
            .range((vpsd_id, 0)..=(vpsd_id, u64::MAX))
            .map(|(_, indicium)| indicium.payload.postage_mills)
            .sum()
    }

    pub fn last_piece(&self, vpsd_id: u64) -> u64 {
        self.pieces
            .range((vpsd_id, 0)..=(vpsd_id, u64::MAX))
            .next_back()
            .map_or(0, |((_, piece), _)| *piece)
    }

    /// The registers account for every acknowledged indicium, and for nothing else: no
    /// session charged without being acknowledged (the tests sign one request at a time,
    /// so nothing is in flight when they check).
    pub fn check(&self, client: &mut Client, vpsd_id: u64, funded: u64) {
        let status = client.status(vpsd_id).unwrap();
        assert_eq!(
            status.ascending_mills + status.descending_mills,
            status.control_total_mills,
            "AR + DR = CS"
        );
        assert_eq!(status.control_total_mills, funded);
        assert_eq!(
            status.ascending_mills,
            self.postage(vpsd_id),
            "AR is the postage of every acknowledged indicium of vPSD {vpsd_id}"
        );
        assert_eq!(status.piece_count, self.last_piece(vpsd_id));
    }
}

/// How long anything a cluster test waits for may take.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until `check` holds, or fails saying `what`.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Signer threads under a test: each signs turn after turn (its `sign` returns the
/// acknowledged indicium, or fails the test) until stopped; every indicium is recorded.
pub struct Signers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    signed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Signers {
    /// `count` signers; `signer(n)` makes signer n's signing function, called with the
    /// turn number.
    pub fn start<F>(
        count: u64,
        acked: &std::sync::Arc<std::sync::Mutex<Acknowledged>>,
        signer: impl Fn(u64) -> F,
    ) -> Self
    where
        F: FnMut(u64) -> Indicium + Send + 'static,
    {
        use std::sync::atomic::Ordering;
        use std::sync::Arc;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let signed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..count)
            .map(|n| {
                let mut sign = signer(n);
                let (stop, signed, acked) =
                    (Arc::clone(&stop), Arc::clone(&signed), Arc::clone(acked));
                std::thread::spawn(move || {
                    let mut turn = n;
                    while !stop.load(Ordering::Acquire) {
                        turn += 1;
                        let indicium = sign(turn);
                        acked.lock().unwrap().record(indicium);
                        signed.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self {
            stop,
            signed,
            threads,
        }
    }

    /// Waits until `count` more indicia were signed.
    pub fn wait_for(&self, count: u64) {
        use std::sync::atomic::Ordering;
        let target = self.signed.load(Ordering::Relaxed) + count;
        wait_until("signing goes on", || {
            self.signed.load(Ordering::Relaxed) >= target
        });
    }

    /// Stops the signers; how many indicia they signed.
    pub fn stop(self) -> u64 {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Release);
        for thread in self.threads {
            thread.join().expect("a signer failed");
        }
        self.signed.load(Ordering::Relaxed)
    }
}
