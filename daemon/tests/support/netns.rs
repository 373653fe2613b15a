//! Network namespaces a partition test makes, and removes when dropped.
//!
//! The test's thread moves into a namespace of its own (the hub: `unshare`), which holds a
//! bridge at 10.79.0.1/24; every process under test runs in a namespace of its own,
//! attached to the bridge by a veth pair, at 10.79.0.<host>. The processes the thread
//! starts and the threads it spawns share the hub, so the test reaches every process, and
//! nothing reaches anything outside: no traffic leaves the namespaces. A partition is a
//! link set down, or blackhole routes inside one namespace.

use std::process::Command;

/// The hub's address; hosts are 10.79.0.<host>.
pub const HUB: &str = "10.79.0.1";

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|err| {
            panic!("cannot run `ip` (Debian package iproute2): {err}");
        });
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}

/// The hub and the namespaces made so far.
pub struct Net {
    prefix: String,
    names: Vec<String>,
}

impl Net {
    /// Moves the calling thread into a new network namespace with a bridge. Needs root
    /// (CAP_SYS_ADMIN and CAP_NET_ADMIN).
    pub fn hub() -> Self {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of the test's own (needs root)");
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "add", "br0", "type", "bridge"]);
        ip(&["addr", "add", &format!("{HUB}/24"), "dev", "br0"]);
        ip(&["link", "set", "br0", "up"]);
        Self {
            prefix: format!("indicia-{}", std::process::id()),
            names: Vec::new(),
        }
    }

    /// A namespace at 10.79.0.<host>, attached to the hub; returns its name.
    pub fn node(&mut self, host: u8) -> String {
        let name = format!("{}-{host}", self.prefix);
        ip(&["netns", "add", &name]);
        self.names.push(name.clone());
        let hub_end = format!("vh{host}");
        ip(&[
            "link", "add", &hub_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        ip(&["link", "set", &hub_end, "master", "br0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/24", Self::address(host)),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        name
    }

    pub fn address(host: u8) -> String {
        format!("10.79.0.{host}")
    }

    /// Cuts a namespace off from everything (its link down), or puts it back.
    pub fn isolate(&self, name: &str, isolated: bool) {
        let state = if isolated { "down" } else { "up" };
        ip(&["-n", name, "link", "set", "eth0", state]);
    }

    /// Makes `hosts` unreachable from namespace `name` (blackhole routes), or reachable
    /// again: a partition between some processes only.
    pub fn cut(&self, name: &str, hosts: &[u8], cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for host in hosts {
            let target = format!("{}/32", Self::address(*host));
            ip(&["-n", name, "route", verb, "blackhole", &target]);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
