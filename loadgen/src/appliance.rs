//! The appliance as a child process: this program re-executed with its `appliance`
//! subcommand, which runs exactly what `indiciad` runs (`indiciad::service`). A separate
//! process, so that its CPU time can be read from /proc apart from the load generator's,
//! and so that one `cargo run` builds both.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use indicia_client::{ClientError, Credential};

use crate::run::LoadError;

/// A running appliance in its own process.
#[derive(Debug)]
pub struct Appliance {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Appliance {
    /// Starts the appliance on `data_dir`, listening on a free loopback port, with an
    /// optional config file, and waits until it listens.
    pub fn spawn(data_dir: &Path, config: Option<&Path>) -> Result<Self, LoadError> {
        Self::spawn_with(&std::env::current_exe()?, data_dir, config)
    }

    /// Like [`Appliance::spawn`], with the path of an `indicia-loadgen` executable.
    pub fn spawn_with(
        exe: &Path,
        data_dir: &Path,
        config: Option<&Path>,
    ) -> Result<Self, LoadError> {
        Self::spawn_on(exe, data_dir, config, "127.0.0.1:0")
    }

    /// Like [`Appliance::spawn_with`], listening on `listen`.
    pub fn spawn_on(
        exe: &Path,
        data_dir: &Path,
        config: Option<&Path>,
        listen: &str,
    ) -> Result<Self, LoadError> {
        let mut command = Command::new(exe);
        command
            .arg("appliance")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        // The info line that says where it listens is needed; the rest is filtered below.
        command.env("INDICIA_LOG", "info");
        let mut child = command.spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| LoadError::Protocol("no stderr from the appliance".into()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut told = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !told {
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default();
                        let _ = tx.send(Ok(addr.parse::<SocketAddr>().ok()));
                        told = true;
                        continue;
                    }
                    if line.contains("ERROR") {
                        let _ = tx.send(Err(line.clone()));
                    }
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("appliance: {line}");
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(Some(addr))) => addr,
            Ok(Err(line)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LoadError::Protocol(format!(
                    "the appliance did not start: {line}"
                )));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LoadError::Protocol("the appliance did not start".into()));
            }
        };
        Ok(Self {
            child,
            addr,
            data_dir: data_dir.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn admin_credential(&self) -> Result<Credential, ClientError> {
        Ok(Credential::load(&self.data_dir.join("admin.credential"))?)
    }

    pub fn provider_key(&self) -> PathBuf {
        self.data_dir.join("provider.key")
    }

    /// kill -9, and the wait for it to be gone.
    pub fn kill(mut self) -> Result<ExitStatus, LoadError> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, and the exit status once it has drained and stopped.
    pub fn stop(mut self) -> Result<ExitStatus, LoadError> {
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(self.child.id()).map_err(|_| LoadError::Protocol("pid".into()))?,
        );
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|err| LoadError::Io(err.into()))?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        // Stopped already (stop() waited), or the caller failed: make sure it is gone.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
