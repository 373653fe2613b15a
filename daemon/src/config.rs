//! The appliance's configuration: a TOML file, or the embedded default (an empty file).
//! Every field has a safe default; unknown fields are an error, so a typo never silently
//! leaves a setting at its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::engine::EngineConfig;
use crate::journal::JournalConfig;

/// Most shards one appliance runs (one per core).
pub const SHARDS_MAX: usize = 256;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Where the master key, credentials and journals live.
    pub data_dir: PathBuf,
    /// Number of shards (executors); 0 means one per available core.
    pub shards: usize,
    pub engine: EngineConfig,
    pub journal: JournalConfig,
    pub server: ServerConfig,
    /// Mutual TLS on the client port, or where plaintext is allowed (the `[tls]` section).
    pub tls: TlsConfig,
    /// Clients besides the admin credential created at first start.
    pub clients: Vec<ClientConfig>,
    /// Cluster mode (milestone 2): the vPSDs' state replicated and fenced on etcd. Without
    /// it the appliance runs alone (docs/CLUSTER.md).
    pub cluster: Option<ClusterConfig>,
    /// The master key sealed by an AES key inside an HSM (PKCS#11), not a file. Without it
    /// the master key is `master.key` or its systemd credential (docs/OPERATIONS.md 5.7).
    pub hsm: Option<crate::hsm::HsmConfig>,
    /// The Prometheus endpoint; off unless configured (docs/OPERATIONS.md 7.1).
    pub metrics: Option<MetricsConfig>,
}

/// The `[metrics]` section: where the Prometheus endpoint listens (HTTP, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint, e.g. "127.0.0.1:9750" (port 0: one the kernel picks).
    pub listen: SocketAddr,
}

/// The longest appliance id: it must fit the replicated state's origin, and, as
/// `appliance:<id>`, a client id (other appliances connect as that client).
pub fn appliance_id_bytes_max() -> usize {
    crate::store::codec::APPLIANCE_BYTES_MAX.min(
        indicia_proto::message::CLIENT_ID_BYTES_MAX
            - indicia_proto::message::APPLIANCE_CLIENT_PREFIX.len(),
    )
}

/// Whether `id` may name an appliance: 1 to [`appliance_id_bytes_max`] letters, digits,
/// '.', '_' or '-'.
pub fn is_appliance_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= appliance_id_bytes_max()
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
}

/// The `[cluster]` section: which etcd cluster to replicate to, and who this appliance is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The etcd members' client URLs.
    pub etcd: Vec<String>,
    /// This appliance's id, unique in the cluster.
    pub appliance: String,
    /// Where other appliances and clients reach it (host:port).
    pub advertise: String,
    /// The lease's time to live: an appliance silent this long is taken over.
    #[serde(default = "ClusterConfig::default_lease_ttl_s")]
    pub lease_ttl_s: u64,
    /// The prefix of every key the cluster keeps in etcd.
    #[serde(default = "ClusterConfig::default_prefix")]
    pub prefix: String,
    /// Whether vPSDs are placed by rendezvous hashing over the live appliances, and moved
    /// when that changes (an appliance joins); otherwise a vPSD stays where it was
    /// provisioned unless pinned, drained or taken over.
    #[serde(default = "ClusterConfig::default_rebalance")]
    pub rebalance: bool,
    /// The time limit of a request forwarded to the vPSD's owner.
    #[serde(default = "ClusterConfig::default_forward_timeout_ms")]
    pub forward_timeout_ms: u64,
    /// With `[tls]`: this appliance's client certificate toward the others (PEM; its
    /// subject common name `appliance:<id>`, issued by a CA in every appliance's
    /// `client_ca`), its private key, and the CAs that issue the appliances' server
    /// certificates. Without them, requests are not forwarded between appliances that use
    /// TLS.
    pub peer_certificate: Option<PathBuf>,
    pub peer_private_key: Option<PathBuf>,
    pub peer_ca: Option<PathBuf>,
}

impl ClusterConfig {
    /// The files of mutual TLS between appliances, when all three are set.
    pub fn peer_tls(&self) -> Option<(&Path, &Path, &Path)> {
        Some((
            self.peer_certificate.as_deref()?,
            self.peer_private_key.as_deref()?,
            self.peer_ca.as_deref()?,
        ))
    }
}

impl ClusterConfig {
    fn default_lease_ttl_s() -> u64 {
        5
    }

    fn default_prefix() -> String {
        "/indicia".into()
    }

    fn default_rebalance() -> bool {
        true
    }

    fn default_forward_timeout_ms() -> u64 {
        5_000
    }

    fn validate(&self) -> Result<(), String> {
        if self.etcd.is_empty() || self.etcd.iter().any(|url| !url.starts_with("http")) {
            return Err(
                "cluster.etcd must list the etcd members' client URLs (http://host:port)".into(),
            );
        }
        if !is_appliance_id(&self.appliance) {
            return Err(format!(
                "cluster.appliance = {:?}: 1 to {} letters, digits, '.', '_' or '-'",
                self.appliance,
                appliance_id_bytes_max()
            ));
        }
        if self.advertise.parse::<SocketAddr>().is_err() {
            return Err(format!(
                "cluster.advertise = {:?} is not an address (host:port)",
                self.advertise
            ));
        }
        if !(2..=60).contains(&self.lease_ttl_s) {
            return Err(format!(
                "cluster.lease_ttl_s = {} is outside 2..=60",
                self.lease_ttl_s
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.len() > 128 {
            return Err(format!(
                "cluster.prefix = {:?} must start with '/' (at most 128 bytes)",
                self.prefix
            ));
        }
        if !(100..=60_000).contains(&self.forward_timeout_ms) {
            return Err(format!(
                "cluster.forward_timeout_ms = {} is outside 100..=60000",
                self.forward_timeout_ms
            ));
        }
        if !cfg!(feature = "cluster") {
            return Err(
                "this indiciad was built without cluster support: build it with \
                        `--features indiciad/cluster` (needs protoc; docs/CLUSTER.md)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The `[tls]` section. With `certificate`, `private_key` and `client_ca` set, every
/// connection is mutual TLS 1.3: the appliance proves itself with `certificate`, and each
/// client must present a certificate issued by `client_ca` whose subject common name is the
/// client id it then authenticates as. Without them the port is plaintext, which is allowed
/// only where `plaintext` says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The appliance's certificate chain (PEM), leaf first.
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1), readable by the owner only.
    pub private_key: Option<PathBuf>,
    /// The certificate authorities (PEM) that issue client certificates.
    pub client_ca: Option<PathBuf>,
    /// Where a port without TLS may listen.
    pub plaintext: Plaintext,
}

impl TlsConfig {
    /// Whether the client port is TLS.
    pub fn enabled(&self) -> bool {
        self.certificate.is_some()
    }
}

/// Where the client port may be plaintext (`[tls] plaintext`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Plaintext {
    /// Never: the appliance does not start without TLS.
    Never,
    /// On a loopback address only (127.0.0.0/8, ::1): a benchmark or a co-located
    /// gateway. Any other address needs TLS.
    #[default]
    Loopback,
    /// On any address: a deliberate choice for a network that is protected otherwise.
    Anywhere,
}

/// Limits and timeouts of the network side (the `[server]` section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections one shard serves at once; more are closed at accept.
    pub connections_max: usize,
    /// Requests one connection may have unanswered; the shard stops reading it beyond.
    pub inflight_per_connection: usize,
    /// Requests all of one shard's connections may have unanswered together; a request
    /// beyond is answered `busy` at once.
    pub inflight_per_shard: usize,
    /// Largest request frame body accepted; a frame declaring more is answered
    /// `frame-too-large` and the connection closed. The default holds the largest request
    /// the protocol can express (a full `sign-batch`, 12 554 bytes) with room to spare.
    pub request_body_bytes_max: u32,
    /// Time a new connection has to complete the handshake.
    pub handshake_timeout_ms: u64,
    /// Time a frame that has started to arrive has to arrive whole.
    pub frame_timeout_ms: u64,
    /// Time a write of answers may block (a client that does not read is cut off).
    pub write_timeout_ms: u64,
    /// Indicia one shard queues for sessions; sign requests beyond are answered `busy`.
    pub queued_indicia_max: usize,
    /// Optional wait before a turn's sessions start, to let more requests join them
    /// (natural batching needs none; 0 turns it off).
    pub linger_us: u64,
    /// Capacity of each channel between two shards, in messages.
    pub cross_shard_channel: usize,
    /// On SIGTERM, how long to wait for running work to be answered before exiting.
    pub drain_timeout_ms: u64,
    /// How often the integrity monitor audits every journal in the background (0: never).
    pub audit_interval_s: u64,
    /// Whether the integrity monitor also checks indicium signatures (each once per run, as
    /// records appear). Off by default: a verification costs about three signatures.
    pub audit_signatures: bool,
    /// An authenticated connection with nothing in flight that sends nothing for this long
    /// is closed (0: never).
    pub idle_timeout_ms: u64,
    /// Whether each shard also listens on a port of its own (on the `listen` address), which
    /// `topology` reports: a routing client connects there and its requests never cross
    /// shards.
    pub shard_ports: bool,
    /// The first shard port (shard i listens on this + i); 0 lets the system pick free
    /// ports at each start.
    pub shard_port_base: u16,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            connections_max: 4096,
            inflight_per_connection: 1024,
            inflight_per_shard: 65_536,
            request_body_bytes_max: 16_384,
            handshake_timeout_ms: 10_000,
            frame_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            queued_indicia_max: 65_536,
            linger_us: 0,
            cross_shard_channel: 1024,
            drain_timeout_ms: 30_000,
            audit_interval_s: 3_600,
            audit_signatures: false,
            idle_timeout_ms: 300_000,
            shard_ports: true,
            shard_port_base: 0,
        }
    }
}

/// A client allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The id it presents at the handshake.
    pub id: String,
    pub role: ClientRole,
    /// File holding its secret (hex, 32 bytes), readable by the appliance only.
    pub secret_file: PathBuf,
    /// The vPSDs a user may sign for and read (ignored for admins, who may use all).
    #[serde(default)]
    pub vpsds: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRole {
    User,
    Admin,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7450)),
            data_dir: PathBuf::from("./indicia-data"),
            shards: 0,
            engine: EngineConfig::default(),
            journal: JournalConfig::default(),
            server: ServerConfig::default(),
            tls: TlsConfig::default(),
            clients: Vec::new(),
            cluster: None,
            hsm: None,
            metrics: None,
        }
    }
}

impl Config {
    /// Parses and validates a configuration text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if let Some(hsm) = &self.hsm {
            hsm.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(ConfigError::Invalid)?;
            let peer_files = [
                &cluster.peer_certificate,
                &cluster.peer_private_key,
                &cluster.peer_ca,
            ];
            let set = peer_files.iter().filter(|file| file.is_some()).count();
            if set != 0 && set != 3 {
                return invalid(
                    "cluster.peer_certificate, peer_private_key and peer_ca go together".into(),
                );
            }
            if set == 3 && !self.tls.enabled() {
                return invalid(
                    "cluster.peer_certificate and its files are for appliances that use [tls]: \
                     without it, appliances forward in plaintext"
                        .into(),
                );
            }
        }
        if self.shards > SHARDS_MAX {
            return invalid(format!(
                "shards = {} is above the maximum of {SHARDS_MAX}",
                self.shards
            ));
        }
        let engine = &self.engine;
        if !(1..=4096).contains(&engine.session_indicia_max) {
            return invalid(format!(
                "engine.session_indicia_max = {} is outside 1..=4096",
                engine.session_indicia_max
            ));
        }
        if engine.postage_mills_max == 0 || engine.postage_mills_max > 1_000_000_000 {
            return invalid(format!(
                "engine.postage_mills_max = {} is outside 1..=1000000000",
                engine.postage_mills_max
            ));
        }
        if engine.contact_days_max == 0 || engine.contact_days_max > 3_650 {
            return invalid(format!(
                "engine.contact_days_max = {} is outside 1..=3650",
                engine.contact_days_max
            ));
        }
        if engine.idempotency_indicia_max < 2 || engine.vpsds_max == 0 {
            return invalid(
                "engine.idempotency_indicia_max must be at least 2 and engine.vpsds_max at least 1"
                    .into(),
            );
        }
        if !(1..=crate::engine::KEYS_PER_VPSD_LIMIT).contains(&engine.keys_per_vpsd_max) {
            return invalid(format!(
                "engine.keys_per_vpsd_max = {} is outside 1..={}",
                engine.keys_per_vpsd_max,
                crate::engine::KEYS_PER_VPSD_LIMIT
            ));
        }
        if engine.key_cache_keys > 1 << 20 {
            return invalid(format!(
                "engine.key_cache_keys = {} is outside 0..=1048576",
                engine.key_cache_keys
            ));
        }
        if self.journal.segment_bytes < (64 << 10) || self.journal.segment_bytes > (1 << 34) {
            return invalid(format!(
                "journal.segment_bytes = {} is outside 64 KiB..=16 GiB",
                self.journal.segment_bytes
            ));
        }
        let server = &self.server;
        let ranges: [(&str, u64, u64, u64); 13] = [
            (
                "request_body_bytes_max",
                u64::from(server.request_body_bytes_max),
                4096,
                u64::from(indicia_proto::frame::BODY_BYTES_MAX),
            ),
            ("connections_max", server.connections_max as u64, 1, 1 << 20),
            (
                "inflight_per_connection",
                server.inflight_per_connection as u64,
                1,
                1 << 16,
            ),
            (
                "inflight_per_shard",
                server.inflight_per_shard as u64,
                1,
                1 << 24,
            ),
            (
                "handshake_timeout_ms",
                server.handshake_timeout_ms,
                10,
                3_600_000,
            ),
            ("frame_timeout_ms", server.frame_timeout_ms, 10, 3_600_000),
            ("write_timeout_ms", server.write_timeout_ms, 10, 3_600_000),
            (
                "queued_indicia_max",
                server.queued_indicia_max as u64,
                256,
                1 << 24,
            ),
            ("linger_us", server.linger_us, 0, 1_000_000),
            (
                "cross_shard_channel",
                server.cross_shard_channel as u64,
                1,
                1 << 20,
            ),
            ("drain_timeout_ms", server.drain_timeout_ms, 0, 3_600_000),
            // Up to 30 days (0: no background audit).
            ("audit_interval_s", server.audit_interval_s, 0, 2_592_000),
            ("idle_timeout_ms", server.idle_timeout_ms, 0, 86_400_000),
        ];
        for (name, value, low, high) in ranges {
            if !(low..=high).contains(&value) {
                return invalid(format!("server.{name} = {value} is outside {low}..={high}"));
            }
        }
        let tls = &self.tls;
        match (&tls.certificate, &tls.private_key, &tls.client_ca) {
            (Some(_), Some(_), Some(_)) => {}
            (None, None, None) => match tls.plaintext {
                Plaintext::Anywhere => {}
                Plaintext::Loopback if self.listen.ip().is_loopback() => {}
                Plaintext::Loopback => {
                    return invalid(format!(
                        "listen = {} is not a loopback address and TLS is not configured: set \
                         [tls] certificate, private_key and client_ca, or allow plaintext there \
                         explicitly with [tls] plaintext = \"anywhere\"",
                        self.listen
                    ))
                }
                Plaintext::Never => {
                    return invalid(
                        "[tls] plaintext = \"never\" and TLS is not configured: set [tls] \
                         certificate, private_key and client_ca"
                            .into(),
                    )
                }
            },
            _ => {
                return invalid(
                    "[tls] needs all of certificate, private_key and client_ca (mutual TLS), or \
                     none of them"
                        .into(),
                )
            }
        }
        let mut ids = std::collections::HashSet::new();
        for client in &self.clients {
            if client.id.is_empty() || client.id.len() > indicia_proto::message::CLIENT_ID_BYTES_MAX
            {
                return invalid(format!("client id `{}` must be 1 to 64 bytes", client.id));
            }
            if client
                .id
                .starts_with(indicia_proto::message::APPLIANCE_CLIENT_PREFIX)
            {
                return invalid(format!(
                    "client id `{}`: ids that start with `{}` are the cluster's appliances",
                    client.id,
                    indicia_proto::message::APPLIANCE_CLIENT_PREFIX
                ));
            }
            if !ids.insert(client.id.as_str()) || client.id == crate::datadir::ADMIN_CLIENT_ID {
                return invalid(format!(
                    "client id `{}` is used twice (or is the built-in admin)",
                    client.id
                ));
            }
        }
        Ok(())
    }

    /// The number of shards to run: the configured number, or one per available core.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            shards => shards,
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        self.engine.clone()
    }

    pub fn journal_config(&self) -> JournalConfig {
        self.journal.clone()
    }
}

/// Entry point for the `config` fuzz target (`fuzz/`): any bytes as a configuration file.
/// Parsing and validation must answer with a value or a typed error, never panic; a
/// configuration that validates must keep validating after its defaults are applied.
pub mod fuzz {
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(config) = super::Config::parse(text, std::path::Path::new("fuzz.toml")) {
            // parse() validates; what it accepts must give a usable engine and journal.
            let engine = config.engine_config();
            assert!(engine.session_indicia_max >= 1);
            let _ = config.journal_config();
            assert!(config.shard_count() >= 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_an_empty_file() {
        let parsed = Config::parse("", Path::new("empty.toml")).unwrap();
        assert_eq!(parsed, Config::default());
        assert_eq!(parsed.listen.to_string(), "127.0.0.1:7450");
        assert_eq!(parsed.data_dir, PathBuf::from("./indicia-data"));
        assert_eq!(parsed.engine_config(), EngineConfig::default());
        assert!(parsed.shard_count() >= 1);
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
            listen = "0.0.0.0:7451"
            data_dir = "/var/lib/indicia"
            shards = 4
            [engine]
            session_indicia_max = 64
            contact_days_max = 30
            [journal]
            segment_bytes = 1048576
            [tls]
            certificate = "/etc/indicia/tls/server.pem"
            private_key = "/etc/indicia/tls/server.key"
            client_ca = "/etc/indicia/tls/clients-ca.pem"
            [[clients]]
            id = "station-7"
            role = "user"
            secret_file = "/etc/indicia/station-7.secret"
            vpsds = [1001, 1002]
        "#;
        let config = Config::parse(text, Path::new("full.toml")).unwrap();
        assert_eq!(config.shard_count(), 4);
        assert_eq!(config.engine.session_indicia_max, 64);
        assert_eq!(
            config.engine.postage_mills_max,
            EngineConfig::default().postage_mills_max
        );
        assert_eq!(config.journal_config().segment_bytes, 1 << 20);
        assert_eq!(config.clients[0].role, ClientRole::User);
        assert_eq!(config.clients[0].vpsds, vec![1001, 1002]);
        assert!(config.tls.enabled());
    }

    #[test]
    fn plaintext_listens_only_where_the_config_allows_it() {
        let parse = |text: &str| Config::parse(text, Path::new("tls.toml"));
        // The default allows plaintext on loopback only.
        assert!(!parse("").unwrap().tls.enabled());
        assert!(parse("listen = \"[::1]:7450\"").is_ok());
        let exposed = parse("listen = \"0.0.0.0:7450\"").unwrap_err().to_string();
        assert!(
            exposed.contains("not a loopback address") && exposed.contains("[tls]"),
            "{exposed}"
        );
        assert!(parse("listen = \"10.1.2.3:7450\"\n[tls]\nplaintext = \"anywhere\"").is_ok());
        let never = parse("[tls]\nplaintext = \"never\"")
            .unwrap_err()
            .to_string();
        assert!(never.contains("plaintext = \"never\""), "{never}");
        let partial = parse("[tls]\ncertificate = \"a.pem\"\nprivate_key = \"a.key\"")
            .unwrap_err()
            .to_string();
        assert!(partial.contains("client_ca"), "{partial}");
        let tls = "[tls]\ncertificate = \"a.pem\"\nprivate_key = \"a.key\"\nclient_ca = \"ca.pem\"";
        assert!(parse(&format!("listen = \"0.0.0.0:7450\"\n{tls}")).is_ok());
        let typo = parse("[tls]\nplaintext = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("sometimes"), "{typo}");
    }

    #[test]
    fn typos_and_bad_values_are_errors_that_name_the_problem() {
        let typo = Config::parse("listne = \"127.0.0.1:1\"", Path::new("typo.toml")).unwrap_err();
        assert!(typo.to_string().contains("listne"), "{typo}");
        let zero =
            Config::parse("[engine]\nsession_indicia_max = 0", Path::new("zero.toml")).unwrap_err();
        assert!(zero.to_string().contains("session_indicia_max"), "{zero}");
        let twice = Config::parse(
            "[[clients]]\nid = \"a\"\nrole = \"user\"\nsecret_file = \"x\"\n[[clients]]\nid = \"a\"\nrole = \"admin\"\nsecret_file = \"y\"",
            Path::new("twice.toml"),
        )
        .unwrap_err();
        assert!(twice.to_string().contains("used twice"), "{twice}");
        assert!(Config::parse("listen = \"not an address\"", Path::new("bad.toml")).is_err());
    }
}
