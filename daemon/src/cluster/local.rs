//! A local etcd cluster on loopback, for the cluster demo and the tests: the Debian `etcd`
//! binary (3.4), one process per member, their data under one directory. Never for
//! production (docs/CLUSTER.md says how to run etcd there).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a local etcd cluster could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalEtcdError {
    #[error("cannot run `etcd` (Debian package etcd-server): {0}")]
    Spawn(std::io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd member {member} not healthy after {seconds} s; the end of its log:\n{log}")]
    Unhealthy {
        member: String,
        seconds: u64,
        log: String,
    },
}

/// Members of a local etcd cluster on loopback.
#[derive(Debug)]
pub struct LocalEtcd {
    dir: PathBuf,
    members: Vec<Member>,
    /// More flags for every member (a space quota, for a test).
    extra: Vec<String>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// The network namespace it runs in (`ip netns exec`), if not the caller's.
    netns: Option<String>,
    child: Option<Child>,
}

/// Where one member runs: its address and, for a partition test, its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHost {
    pub ip: std::net::IpAddr,
    pub netns: Option<String>,
}

/// A loopback port nobody holds now, below the kernel's ephemeral range (32768 and up on
/// Debian): the port stays free until etcd binds it, since no outgoing connection (other
/// members' among them) is given a port down there.
fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 20_000 + (std::process::id() * 97) % 10_000;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap_or(20_000)));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// One HTTP/1.0 exchange with a member (its health and status endpoints), None if it does
/// not answer within a short time.
fn http(addr: SocketAddr, request: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split("\r\n\r\n").nth(1).map(str::to_owned)
}

impl LocalEtcd {
    /// Starts `size` members with their data under `dir` and waits until each reports
    /// itself healthy (a leader is elected), at most `patience`.
    pub fn start(dir: &Path, size: usize, patience: Duration) -> Result<Self, LocalEtcdError> {
        Self::start_with(dir, size, patience, &[])
    }

    /// [`LocalEtcd::start`], with more flags for every member (`--quota-backend-bytes=N`).
    pub fn start_with(
        dir: &Path,
        size: usize,
        patience: Duration,
        extra: &[&str],
    ) -> Result<Self, LocalEtcdError> {
        std::fs::create_dir_all(dir).map_err(|source| LocalEtcdError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client: free_port(),
                peer: free_port(),
                netns: None,
                child: None,
            })
            .collect();
        Self::start_members(dir, members, patience, extra)
    }

    /// Members on the given hosts, each in its own network namespace (a partition test
    /// cuts them apart): ports 2379 (clients) and 2380 (peers) on each host's address.
    pub fn start_on_hosts(
        dir: &Path,
        hosts: &[MemberHost],
        patience: Duration,
    ) -> Result<Self, LocalEtcdError> {
        std::fs::create_dir_all(dir).map_err(|source| LocalEtcdError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let members = hosts
            .iter()
            .enumerate()
            .map(|(index, host)| Member {
                name: format!("m{index}"),
                client: SocketAddr::new(host.ip, 2379),
                peer: SocketAddr::new(host.ip, 2380),
                netns: host.netns.clone(),
                child: None,
            })
            .collect();
        Self::start_members(dir, members, patience, &[])
    }

    fn start_members(
        dir: &Path,
        members: Vec<Member>,
        patience: Duration,
        extra: &[&str],
    ) -> Result<Self, LocalEtcdError> {
        let size = members.len();
        let mut cluster = Self {
            dir: dir.to_owned(),
            members,
            extra: extra.iter().map(|flag| (*flag).to_owned()).collect(),
        };
        for index in 0..size {
            cluster.spawn(index)?;
        }
        cluster.wait_healthy(patience)?;
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> Result<(), LocalEtcdError> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("{}=http://{}", member.name, member.peer))
            .collect();
        let member = &self.members[index];
        let data = self.dir.join(&member.name);
        let log_path = self.dir.join(format!("{}.log", member.name));
        let log = std::fs::File::create(&log_path).map_err(|source| LocalEtcdError::Io {
            path: log_path,
            source,
        })?;
        let mut command = match &member.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns.as_str(), "etcd"]);
                command
            }
            None => Command::new("etcd"),
        };
        let child = command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(self.dir.to_string_lossy().replace('/', "-"))
            .arg("--initial-cluster-state")
            .arg("new")
            // The appliances ping every lease_ttl / 4 (0.5 s at the tests' 2 s).
            .arg("--grpc-keepalive-min-time=200ms")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(LocalEtcdError::Spawn)?;
        self.members[index].child = Some(child);
        Ok(())
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("http://{}", member.client))
            .collect()
    }

    /// Whether a member answers `GET /health` with `"health":"true"`.
    fn healthy(addr: SocketAddr) -> bool {
        http(addr, "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_some_and(|body| body.contains("\"health\":\"true\""))
    }

    fn wait_healthy(&self, patience: Duration) -> Result<(), LocalEtcdError> {
        let deadline = Instant::now() + patience;
        for member in &self.members {
            while !Self::healthy(member.client) {
                if Instant::now() >= deadline {
                    let log = self.log(&member.name);
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    return Err(LocalEtcdError::Unhealthy {
                        member: member.name.clone(),
                        seconds: patience.as_secs(),
                        log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// One request to the v3 JSON gateway of the first running member (`POST path` with a
    /// JSON body): its answer's body, if it answered.
    pub fn gateway(&self, path: &str, body: &str) -> Option<String> {
        let member = self.members.iter().find(|member| member.child.is_some())?;
        http(member.client, &Self::post(path, body))
    }

    /// The same request to every running member (a defragmentation is per member).
    pub fn gateway_each(&self, path: &str, body: &str) -> Vec<Option<String>> {
        self.members
            .iter()
            .filter(|member| member.child.is_some())
            .map(|member| http(member.client, &Self::post(path, body)))
            .collect()
    }

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// The process ids of the running members (for their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|member| member.child.as_ref().map(Child::id))
            .collect()
    }

    /// A member's log.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The index of the member that is the leader now, if one says so: each member's
    /// status (the v3 JSON gateway, `POST /v3/maintenance/status`) names the leader's id
    /// and its own.
    pub fn leader(&self) -> Option<usize> {
        let request = "POST /v3/maintenance/status HTTP/1.0\r\nHost: localhost\r\n\
                       Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        self.members.iter().position(|member| {
            member.child.is_some()
                && http(member.client, request)
                    .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                    .is_some_and(|status| {
                        let own = status["header"]["member_id"].as_str();
                        own.is_some() && own == status["leader"].as_str()
                    })
        })
    }

    /// kill -9 of one member (its data stays).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members.get_mut(index).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data.
    pub fn restart(&mut self, index: usize) -> Result<(), LocalEtcdError> {
        if self.members.get(index).is_some_and(|m| m.child.is_none()) {
            self.spawn(index)?;
        }
        Ok(())
    }

    /// Sends `signal` to every member (SIGSTOP: etcd stops answering; SIGCONT: it goes on).
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for member in &self.members {
            if let Some(child) = &member.child {
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
                }
            }
        }
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        // A stopped member must be able to die.
        self.signal_all(nix::sys::signal::Signal::SIGCONT);
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
