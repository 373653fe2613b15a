//! SoftHSM2 tokens for the tests of the master key in an HSM (docs/OPERATIONS.md 5.7): each
//! in a directory of its own, with a systemd-like credentials directory holding its PIN.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{Daemon, BIN};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN: &str = "indicia-test";
pub const PIN: &str = "4711-user-pin";

/// A SoftHSM2 token of its own (its configuration and token directory) and a systemd-like
/// credentials directory with its PIN.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub credentials: PathBuf,
}

impl SoftHsm {
    pub fn new(dir: &Path) -> Self {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let output = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", TOKEN])
            .args(["--pin", PIN, "--so-pin", "4711-so-pin"])
            .output()
            .expect("softhsm2-util (Debian package softhsm2) runs");
        assert!(output.status.success(), "{}", text(&output));
        let credentials = dir.join("credentials");
        std::fs::create_dir_all(&credentials).unwrap();
        write_private(&credentials.join("hsm-pin"), &format!("{PIN}\n"));
        Self { conf, credentials }
    }

    pub fn env(&self) -> [(&'static str, &Path); 2] {
        [
            ("SOFTHSM2_CONF", &self.conf),
            ("CREDENTIALS_DIRECTORY", &self.credentials),
        ]
    }

    /// `indiciad --config CONFIG --data-dir DIR/data ARGS` with the token's environment.
    pub fn tool(&self, dir: &Path, config: &Path, args: &[&str]) -> Output {
        indiciad(dir, config, args, &self.env())
    }

    pub fn start(&self, dir: &Path, config: &Path) -> Daemon {
        Daemon::start_with_env(dir, Some(config), "127.0.0.1:0", None, &self.env())
    }
}

pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `indiciad --config CONFIG --data-dir DIR/data ARGS` with exactly the credentials
/// directory and SoftHSM2 configuration of `env` (none of this process's own).
pub fn indiciad(dir: &Path, config: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(BIN);
    command
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("SOFTHSM2_CONF");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

/// The `[hsm]` section naming `token` and `key_label` (the PIN: the credential `hsm-pin`).
pub fn hsm_section(token: &str, key_label: &str) -> String {
    format!("[hsm]\nmodule = \"{MODULE}\"\ntoken = \"{token}\"\nkey_label = \"{key_label}\"\n")
}
