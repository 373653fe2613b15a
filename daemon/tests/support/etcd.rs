//! Real etcd members for the cluster tests: the Debian `etcd` binary (3.4), run by the test
//! on loopback ports in a temporary directory, killed when the cluster is dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A cluster of etcd members on loopback.
pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// A loopback port nobody holds now, below the kernel's ephemeral range (32768 and up
/// here): the port stays free until etcd binds it, since no outgoing connection (other
/// members' among them) is given a port down there.
fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = 20_000 + (std::process::id() * 97) % 10_000;
    loop {
        let port = start + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports itself healthy (a leader
    /// is elected).
    pub fn start(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self { dir, members };
        for index in 0..size {
            cluster.spawn(index);
        }
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|member| format!("{}=http://{}", member.name, member.peer))
            .collect();
        let member = &self.members[index];
        let data: PathBuf = self.dir.path().join(&member.name);
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", member.name))).unwrap();
        let child = Command::new("etcd")
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
            .arg(self.dir.path().to_string_lossy().replace('/', "-"))
            .arg("--initial-cluster-state")
            .arg("new")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run etcd (Debian package etcd-server): {err}"));
        self.members[index].child = Some(child);
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
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for member in &self.members {
            while !Self::healthy(member.client) {
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy after {limit:?}; its log:\n{}",
                    member.name,
                    self.log(&member.name)
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The index of the member that is the leader now, if one says so: each member's
    /// status (the v3 JSON gateway, `POST /v3/maintenance/status`) names the leader's id
    /// and its own.
    pub fn leader(&self) -> Option<usize> {
        for (index, member) in self.members.iter().enumerate() {
            if member.child.is_none() {
                continue;
            }
            let Ok(mut stream) =
                TcpStream::connect_timeout(&member.client, Duration::from_millis(500))
            else {
                continue;
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let request = "POST /v3/maintenance/status HTTP/1.0\r\nHost: localhost\r\n\
                           Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
            if stream.write_all(request.as_bytes()).is_err() {
                continue;
            }
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            let Some(body) = answer.split("\r\n\r\n").nth(1) else {
                continue;
            };
            let Ok(status) = serde_json::from_str::<serde_json::Value>(body) else {
                continue;
            };
            let own = status["header"]["member_id"].as_str();
            if own.is_some() && own == status["leader"].as_str() {
                return Some(index);
            }
        }
        None
    }

    /// kill -9 of one member (its data stays).
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data.
    pub fn restart(&mut self, index: usize) {
        if self.members[index].child.is_none() {
            self.spawn(index);
        }
    }

    /// Sends `signal` to every member (SIGSTOP: etcd stops answering; SIGCONT: it goes on).
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for member in &self.members {
            if let Some(child) = &member.child {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
                nix::sys::signal::kill(pid, signal).unwrap();
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
                // A stopped member must be able to die.
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
