//! Runs the real `indiciad` binary for the integration tests: a temporary data directory,
//! loopback on a port the kernel picks, and the real client.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)] // each test binary uses part of this

pub mod cluster;
pub mod etcd;
pub mod netns;
pub mod softhsm;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicia_client::provider::{authorize, load_provider_key};
use indicia_client::{Client, Credential};
use indicia_proto::{
    Algorithm, AuthorizationKind, Indicium, MailingDate, Request, SignItem, VpsdStatus, Zip,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_indiciad");

/// The `indiciactl` binary, next to `indiciad`. `cargo test -p indiciad` builds only this
/// package's binaries, and a copy left by an earlier build may be stale, so the first call
/// in a test process asks cargo (the one running the tests) to build it, in the profile
/// and target directory of the `indiciad` under test: a no-op when it is up to date. A
/// failed build fails the test with cargo's output.
pub fn indiciactl() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_indiciactl)
}

fn build_indiciactl() -> PathBuf {
    // BIN is <target dir>[/<triple>]/<profile dir>/indiciad.
    let profile_dir = Path::new(BIN).parent().unwrap();
    let above = profile_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            "indicia-client",
            "--bin",
            "indiciactl",
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
    match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        custom => {
            command.args(["--profile", custom]);
        }
    }
    // Cargo marks the root of a target directory with CACHEDIR.TAG; anything else above
    // the profile directory is a target triple's directory.
    if above.join("CACHEDIR.TAG").exists() {
        command.arg("--target-dir").arg(above);
    } else {
        command
            .arg("--target-dir")
            .arg(above.parent().unwrap())
            .arg("--target")
            .arg(above.file_name().unwrap());
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "building indiciactl failed ({:?}, {}):\n{}{}",
        command,
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = profile_dir.join("indiciactl");
    assert!(
        path.exists(),
        "cargo built indiciactl, but not at {}",
        path.display()
    );
    path
}

/// A running daemon.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A user client for the config file: id, secret, vPSDs.
pub struct User {
    pub id: &'static str,
    pub secret: [u8; 32],
    pub vpsds: Vec<u64>,
}

impl User {
    pub fn credential(&self) -> Credential {
        Credential::new(self.id, self.secret)
    }
}

/// Writes `indiciad.toml` in `dir`: the given extra TOML, then the users (with their
/// secret files).
pub fn write_config(dir: &Path, extra: &str, users: &[User]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = format!("{extra}\n");
    for user in users {
        let secret_file = dir.join(format!("{}.secret", user.id));
        std::fs::write(&secret_file, hex::encode(user.secret)).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        text.push_str(&format!(
            "[[clients]]\nid = \"{}\"\nrole = \"user\"\nsecret_file = \"{}\"\nvpsds = {:?}\n",
            user.id,
            secret_file.display(),
            user.vpsds
        ));
    }
    let path = dir.join("indiciad.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    /// Starts `indiciad` on `dir/data` with 2 shards and waits until it listens.
    pub fn start(dir: &Path, config: Option<&Path>) -> Self {
        Self::start_on(dir, config, "127.0.0.1:0")
    }

    /// [`Daemon::start`] on the address `listen`.
    pub fn start_on(dir: &Path, config: Option<&Path>, listen: &str) -> Self {
        Self::start_in(dir, config, listen, None)
    }

    /// [`Daemon::start_on`], in the network namespace `netns` if given.
    pub fn start_in(dir: &Path, config: Option<&Path>, listen: &str, netns: Option<&str>) -> Self {
        Self::start_with_env(dir, config, listen, netns, &[])
    }

    /// [`Daemon::start_in`] with these environment variables added (a credentials
    /// directory, SoftHSM2's configuration).
    pub fn start_with_env(
        dir: &Path,
        config: Option<&Path>,
        listen: &str,
        netns: Option<&str>,
        env: &[(&str, &Path)],
    ) -> Self {
        let mut command = match std::env::var_os("INDICIA_TEST_GDB") {
            _ if netns.is_some() => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns.unwrap_or_default(), BIN]);
                ip
            }
            Some(log) => {
                let mut gdb = Command::new("gdb");
                gdb.args([
                    "-batch",
                    "-ex",
                    "run",
                    "-ex",
                    "thread apply all bt 30",
                    "-ex",
                    "quit",
                ])
                .arg("--args")
                .arg(BIN)
                .env("GDB_LOG", log);
                gdb
            }
            None => Command::new(BIN),
        };
        command
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", listen, "--shards", "2"])
            .env("INDICIA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(if std::env::var_os("INDICIA_TEST_GDB").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let listening = line.split("listening on ").nth(1).map(|rest| {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        addr.parse::<SocketAddr>().ok()
                    });
                    // In the log before the start is reported, so that a caller sees it.
                    log.lock().unwrap().push(line);
                    if let Some(addr) = listening {
                        let _ = tx.send(addr);
                    }
                }
                let _ = tx.send(None);
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "indiciad did not start; its threads:\n{}\nits log:\n{}",
                    threads(child.id()),
                    log.lock().unwrap().join("\n")
                )
            });
        Self {
            child,
            addr,
            dir: dir.join("data"),
            log,
        }
    }

    pub fn admin_credential(&self) -> Credential {
        Credential::load(&self.dir.join("admin.credential")).unwrap()
    }

    pub fn admin(&self) -> Client {
        self.connect(&self.admin_credential())
    }

    pub fn connect(&self, credential: &Credential) -> Client {
        let client = Client::connect(self.addr, credential).unwrap();
        client.set_timeout(Some(Duration::from_secs(60))).unwrap();
        client
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// kill -9.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "indiciad did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Provisions and funds a vPSD through the admin credential and the development
    /// provider key of the data directory.
    pub fn provision_funded(&self, vpsd_id: u64, algorithm: Algorithm, amount_mills: u64) {
        let mut admin = self.admin();
        admin
            .change(&Request::Provision {
                vpsd_id,
                owner: format!("owner-{vpsd_id}"),
                algorithm,
                origin_zip: Zip::new(20260, None).unwrap(),
            })
            .unwrap();
        self.refill(&mut admin, vpsd_id, amount_mills);
    }

    pub fn refill(&self, client: &mut Client, vpsd_id: u64, amount_mills: u64) -> VpsdStatus {
        let key = load_provider_key(&self.dir.join("provider.key")).unwrap();
        let sequence = client.status(vpsd_id).unwrap().provider_sequence + 1;
        let authorization = authorize(
            &key,
            AuthorizationKind::Refill,
            vpsd_id,
            amount_mills,
            sequence,
            now_unix() + 3600,
        );
        client
            .change(&Request::Refill {
                vpsd_id,
                authorization,
            })
            .unwrap()
    }
}

/// What each thread of a process is doing (name, state, kernel wait channel, CPU ticks, and
/// its kernel stack where readable): for a daemon that does not start.
fn threads(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}: the process is gone)");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let stat = read("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        out.push_str(&format!(
            "{} {} state {} wchan {} utime {} stime {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            fields.first().unwrap_or(&"?"),
            read("wchan"),
            fields.get(11).unwrap_or(&"?"),
            fields.get(12).unwrap_or(&"?"),
            read("stack")
        ));
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) when the test ends, also when it fails halfway.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn item(postage_mills: u64) -> SignItem {
    SignItem {
        postage_mills,
        mailing_date: MailingDate::from_unix_seconds(now_unix()).unwrap(),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    }
}

/// Checks an indicium's signature offline, with the key the appliance published.
pub fn verifies(indicium: &Indicium, spki_der: &[u8]) -> bool {
    indicia_client::verify::signature_holds(indicium, spki_der)
}
