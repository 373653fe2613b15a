//! One connection's protocol state, sans-io: the handshake (version negotiation and
//! HMAC-SHA256 challenge-response, both sides proving the secret), then access control of
//! every request against the client's role and vPSDs. The network code feeds it decoded
//! requests and does what it answers; nothing here touches a socket or a clock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use indicia_proto::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use indicia_proto::message::{
    handshake_transcript, CLIENT_PROOF_LABEL, NONCE_BYTES, PROOF_BYTES, SERVER_PROOF_LABEL,
};
use indicia_proto::{ErrorCode, Indicium, Request, Response, Role};
use zeroize::Zeroizing;

use crate::engine::ClientTag;

/// A client the appliance knows: its secret, role and (for users) vPSDs.
pub struct ClientEntry {
    pub id: String,
    secret: Zeroizing<[u8; 32]>,
    pub role: Role,
    /// vPSDs a user may sign for and read; ignored for admins.
    pub vpsds: HashSet<u64>,
    pub tag: ClientTag,
}

impl std::fmt::Debug for ClientEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientEntry")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("vpsds", &self.vpsds.len())
            .finish_non_exhaustive()
    }
}

impl ClientEntry {
    pub fn new(
        id: &str,
        secret: Zeroizing<[u8; 32]>,
        role: Role,
        vpsds: impl IntoIterator<Item = u64>,
    ) -> Self {
        Self {
            id: id.to_owned(),
            secret,
            role,
            vpsds: vpsds.into_iter().collect(),
            tag: ClientTag::of(id),
        }
    }
}

/// Every client, by id; and in cluster mode, the other appliances (role appliance).
#[derive(Default)]
pub struct ClientDirectory {
    clients: HashMap<String, Arc<ClientEntry>>,
    /// Cluster mode: the key every appliance's secret derives from (from the cluster's
    /// master key, which every appliance holds).
    appliances: Option<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for ClientDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientDirectory")
            .field("clients", &self.clients.len())
            .field("appliances", &self.appliances.is_some())
            .finish()
    }
}

/// HMAC-SHA256 of `message` under `key`.
fn mac(key: &[u8], message: &[u8]) -> Zeroizing<[u8; 32]> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(hmac::sign(&key, message).as_ref());
    out
}

impl ClientDirectory {
    pub fn insert(&mut self, entry: ClientEntry) {
        self.clients.insert(entry.id.clone(), Arc::new(entry));
    }

    /// Cluster mode: every appliance of the cluster may connect as client
    /// `appliance:<id>` (role appliance), with a secret derived from the cluster's master
    /// key: HMAC-SHA256(HMAC-SHA256(master key, "indicia appliance secret v1"), id).
    pub fn admit_appliances(&mut self, master_key: &[u8; 32]) {
        self.appliances = Some(mac(master_key, b"indicia appliance secret v1"));
    }

    /// The secret of appliance `appliance` (cluster mode).
    pub fn appliance_secret(&self, appliance: &str) -> Option<Zeroizing<[u8; 32]>> {
        let root = self.appliances.as_ref()?;
        Some(mac(root.as_ref(), appliance.as_bytes()))
    }

    pub fn get(&self, id: &str) -> Option<Arc<ClientEntry>> {
        if let Some(appliance) = id.strip_prefix(indicia_proto::message::APPLIANCE_CLIENT_PREFIX) {
            if appliance.is_empty() {
                return None;
            }
            let secret = self.appliance_secret(appliance)?;
            return Some(Arc::new(ClientEntry::new(id, secret, Role::Appliance, [])));
        }
        self.clients.get(id).cloned()
    }
}

/// HMAC-SHA256 proof over the handshake transcript with the given label.
pub fn proof(
    secret: &[u8; 32],
    label: &[u8],
    version: u8,
    client_id: &str,
    client_nonce: &[u8; NONCE_BYTES],
    server_nonce: &[u8; NONCE_BYTES],
) -> [u8; PROOF_BYTES] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let transcript = handshake_transcript(label, version, client_id, client_nonce, server_nonce);
    let mut out = [0u8; PROOF_BYTES];
    out.copy_from_slice(hmac::sign(&key, &transcript).as_ref());
    out
}

/// What the network code must do with a request.
#[derive(Debug)]
pub enum Action {
    /// Send this answer now.
    Reply(Response),
    /// Send this answer, then close the connection.
    ReplyAndClose(Response),
    /// Authorized: hand the request to the shard that owns its vPSD.
    Dispatch {
        client: Arc<ClientEntry>,
        request: Request,
    },
}

enum State {
    AwaitHello,
    AwaitAuthenticate {
        client_id: String,
        version: u8,
        client_nonce: [u8; NONCE_BYTES],
        server_nonce: [u8; NONCE_BYTES],
    },
    Authenticated {
        client: Arc<ClientEntry>,
        version: u8,
    },
}

/// One connection's handshake and access control.
pub struct Connection {
    state: State,
    /// The client id the connection's TLS client certificate names (None: plaintext).
    certificate: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::AwaitHello => "await-hello",
            State::AwaitAuthenticate { .. } => "await-authenticate",
            State::Authenticated { .. } => "authenticated",
        };
        f.debug_struct("Connection")
            .field("state", &state)
            .field("certificate", &self.certificate)
            .finish()
    }
}

impl Default for Connection {
    fn default() -> Self {
        Self::new()
    }
}

fn error(code: ErrorCode, message: &str) -> Response {
    Response::error(code, message)
}

impl Connection {
    pub fn new() -> Self {
        Self {
            state: State::AwaitHello,
            certificate: None,
        }
    }

    /// A connection whose verified TLS client certificate names `client_id`: its handshake
    /// must be for that client, and no other.
    pub fn with_certificate(client_id: String) -> Self {
        Self {
            state: State::AwaitHello,
            certificate: Some(client_id),
        }
    }

    /// The protocol version the connection speaks once negotiated (frames before that are
    /// version 1).
    pub fn version(&self) -> u8 {
        match &self.state {
            State::Authenticated { version, .. } | State::AwaitAuthenticate { version, .. } => {
                *version
            }
            State::AwaitHello => PROTOCOL_VERSION_MIN,
        }
    }

    pub fn client(&self) -> Option<&Arc<ClientEntry>> {
        match &self.state {
            State::Authenticated { client, .. } => Some(client),
            _ => None,
        }
    }

    /// Handles one decoded request.
    pub fn on_request(
        &mut self,
        request: Request,
        directory: &ClientDirectory,
        rng: &SystemRandom,
    ) -> Action {
        match (&self.state, request) {
            (
                State::AwaitHello,
                Request::Hello {
                    version_min,
                    version_max,
                    client_id,
                    client_nonce,
                },
            ) => {
                if let Some(named) = self
                    .certificate
                    .as_ref()
                    .filter(|named| **named != client_id)
                {
                    // A certificate is one client's: it does not lend its connection to
                    // another client's secret (a user cannot become the admin this way).
                    return Action::ReplyAndClose(error(
                        ErrorCode::AuthenticationFailed,
                        &format!(
                            "the TLS client certificate is for client `{named}`, not `{client_id}`"
                        ),
                    ));
                }
                let version = version_max.min(PROTOCOL_VERSION_MAX);
                if version < version_min.max(PROTOCOL_VERSION_MIN) {
                    return Action::ReplyAndClose(error(
                        ErrorCode::UnsupportedVersion,
                        &format!("this appliance speaks versions {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"),
                    ));
                }
                let mut server_nonce = [0u8; NONCE_BYTES];
                if rng.fill(&mut server_nonce).is_err() {
                    return Action::ReplyAndClose(error(
                        ErrorCode::Internal,
                        "random number generator failed",
                    ));
                }
                // An unknown client id gets a challenge too and fails only at the proof, so
                // that ids cannot be probed.
                self.state = State::AwaitAuthenticate {
                    client_id,
                    version,
                    client_nonce,
                    server_nonce,
                };
                Action::Reply(Response::Challenge {
                    version,
                    server_nonce,
                })
            }
            (
                State::AwaitAuthenticate {
                    client_id,
                    version,
                    client_nonce,
                    server_nonce,
                },
                Request::Authenticate { proof: presented },
            ) => {
                let failed = || {
                    Action::ReplyAndClose(error(
                        ErrorCode::AuthenticationFailed,
                        "authentication failed",
                    ))
                };
                let client = directory.get(client_id);
                let client = client.as_ref();
                // An unknown id costs the same HMAC as a known one (under a throwaway key),
                // so that the time to the refusal does not tell which ids exist.
                let unknown_id_key = [0u8; 32];
                let secret: &[u8; 32] = client.map_or(&unknown_id_key, |client| &*client.secret);
                let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_ref());
                let transcript = handshake_transcript(
                    CLIENT_PROOF_LABEL,
                    *version,
                    client_id,
                    client_nonce,
                    server_nonce,
                );
                // Constant-time comparison inside aws-lc.
                let verified = hmac::verify(&key, &transcript, &presented).is_ok();
                let Some(client) = client.filter(|_| verified) else {
                    return failed();
                };
                let server_proof = proof(
                    &client.secret,
                    SERVER_PROOF_LABEL,
                    *version,
                    client_id,
                    client_nonce,
                    server_nonce,
                );
                let response = Response::Welcome {
                    role: client.role,
                    server_proof,
                };
                self.state = State::Authenticated {
                    client: Arc::clone(client),
                    version: *version,
                };
                Action::Reply(response)
            }
            (State::Authenticated { .. }, Request::Hello { .. } | Request::Authenticate { .. })
            | (State::AwaitAuthenticate { .. }, Request::Hello { .. })
            | (State::AwaitHello, Request::Authenticate { .. }) => Action::Reply(error(
                ErrorCode::HandshakeOutOfOrder,
                "handshake message out of order",
            )),
            (State::AwaitHello | State::AwaitAuthenticate { .. }, _) => Action::Reply(error(
                ErrorCode::NotAuthenticated,
                "complete the handshake (hello, authenticate) first",
            )),
            (State::Authenticated { client, .. }, request) => match authorize(client, &request) {
                Ok(()) => Action::Dispatch {
                    client: Arc::clone(client),
                    request,
                },
                Err(message) => Action::Reply(error(ErrorCode::Forbidden, &message)),
            },
        }
    }
}

/// Whether an authenticated client may make this request.
pub fn authorize(client: &ClientEntry, request: &Request) -> Result<(), String> {
    let between_appliances = matches!(
        request,
        Request::Forwarded { .. } | Request::ClusterAdopt { .. }
    );
    match client.role {
        Role::Appliance if between_appliances => return Ok(()),
        Role::Appliance => {
            return Err(format!(
                "client {} (role appliance) may only forward requests and hand over vPSDs",
                client.id
            ))
        }
        _ if between_appliances => {
            return Err(format!(
                "client {} may not do this; only another appliance of the cluster may",
                client.id
            ))
        }
        Role::Admin => return Ok(()),
        Role::User => {}
    }
    let vpsd_allowed = |vpsd_id: u64| {
        if client.vpsds.contains(&vpsd_id) {
            Ok(())
        } else {
            Err(format!("client {} may not use vPSD {vpsd_id}", client.id))
        }
    };
    match request {
        Request::Sign { vpsd_id, .. }
        | Request::SignBatch { vpsd_id, .. }
        | Request::Status { vpsd_id }
        | Request::PublicKey { vpsd_id, .. } => vpsd_allowed(*vpsd_id),
        // A malformed indicium names no vPSD: the verdict says so, and reveals nothing.
        Request::Verify { indicium } => match Indicium::decode(indicium) {
            Ok(decoded) => vpsd_allowed(decoded.payload.vpsd_id),
            Err(_) => Ok(()),
        },
        // The provider's signature authorizes these, whoever carries them.
        Request::Refill { .. } | Request::Contact { .. } => Ok(()),
        // How this appliance is sharded: nothing about any vPSD.
        Request::Topology => Ok(()),
        // Where its own vPSDs are, so that it can send their requests there.
        Request::ClusterPlacement { vpsd_ids } => vpsd_ids
            .iter()
            .try_for_each(|&vpsd_id| vpsd_allowed(vpsd_id)),
        _ => Err(format!(
            "client {} (role user) may not do this; it needs role admin",
            client.id
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicia_proto::{MailingDate, SignItem};

    fn directory() -> ClientDirectory {
        let mut directory = ClientDirectory::default();
        directory.insert(ClientEntry::new(
            "station-7",
            Zeroizing::new([7; 32]),
            Role::User,
            [1001],
        ));
        directory.insert(ClientEntry::new(
            "admin",
            Zeroizing::new([9; 32]),
            Role::Admin,
            [],
        ));
        directory
    }

    fn hello(client_id: &str, version_min: u8, version_max: u8) -> Request {
        Request::Hello {
            version_min,
            version_max,
            client_id: client_id.into(),
            client_nonce: [1; 32],
        }
    }

    /// Runs the handshake with `secret`; returns the connection and the final action.
    fn handshake(client_id: &str, secret: [u8; 32]) -> (Connection, Action) {
        let directory = directory();
        let rng = SystemRandom::new();
        let mut connection = Connection::new();
        let Action::Reply(Response::Challenge {
            version,
            server_nonce,
        }) = connection.on_request(hello(client_id, 1, 1), &directory, &rng)
        else {
            panic!("challenge expected");
        };
        let client_proof = proof(
            &secret,
            CLIENT_PROOF_LABEL,
            version,
            client_id,
            &[1; 32],
            &server_nonce,
        );
        let action = connection.on_request(
            Request::Authenticate {
                proof: client_proof,
            },
            &directory,
            &rng,
        );
        if let Action::Reply(Response::Welcome { server_proof, .. }) = &action {
            // Mutual: the client checks that the appliance knows the secret too.
            let expected = proof(
                &secret,
                SERVER_PROOF_LABEL,
                version,
                client_id,
                &[1; 32],
                &server_nonce,
            );
            assert_eq!(server_proof, &expected);
        }
        (connection, action)
    }

    fn code(action: &Action) -> Option<ErrorCode> {
        match action {
            Action::Reply(Response::Error(body)) | Action::ReplyAndClose(Response::Error(body)) => {
                Some(body.code)
            }
            _ => None,
        }
    }

    fn sign(vpsd_id: u64) -> Request {
        Request::Sign {
            vpsd_id,
            item: SignItem {
                postage_mills: 730,
                mailing_date: MailingDate::from_days_since_2000(9_830),
                rate_category: 1,
                destination_zip: None,
                data_digest: None,
            },
        }
    }

    #[test]
    fn the_right_secret_authenticates_both_ways() {
        let (connection, action) = handshake("station-7", [7; 32]);
        assert!(matches!(
            action,
            Action::Reply(Response::Welcome {
                role: Role::User,
                ..
            })
        ));
        assert_eq!(connection.client().unwrap().tag, ClientTag::of("station-7"));
        assert_eq!(connection.version(), 1);
    }

    #[test]
    fn a_wrong_secret_or_unknown_client_fails_alike_and_closes() {
        let (connection, wrong) = handshake("station-7", [8; 32]);
        assert!(matches!(wrong, Action::ReplyAndClose(_)));
        assert_eq!(code(&wrong), Some(ErrorCode::AuthenticationFailed));
        assert!(connection.client().is_none());
        let (_, unknown) = handshake("nobody", [7; 32]);
        assert_eq!(code(&unknown), Some(ErrorCode::AuthenticationFailed));
    }

    #[test]
    fn versions_without_overlap_are_refused() {
        let mut connection = Connection::new();
        let action =
            connection.on_request(hello("station-7", 2, 3), &directory(), &SystemRandom::new());
        assert!(matches!(action, Action::ReplyAndClose(_)));
        assert_eq!(code(&action), Some(ErrorCode::UnsupportedVersion));
        // A client that also speaks a newer version gets the newest common one.
        let mut connection = Connection::new();
        let action =
            connection.on_request(hello("station-7", 1, 5), &directory(), &SystemRandom::new());
        assert!(matches!(
            action,
            Action::Reply(Response::Challenge { version: 1, .. })
        ));
    }

    #[test]
    fn nothing_runs_before_the_handshake_and_handshakes_run_once() {
        let directory = directory();
        let rng = SystemRandom::new();
        let mut connection = Connection::new();
        assert_eq!(
            code(&connection.on_request(sign(1001), &directory, &rng)),
            Some(ErrorCode::NotAuthenticated)
        );
        assert_eq!(
            code(&connection.on_request(
                Request::Authenticate { proof: [0; 32] },
                &directory,
                &rng
            )),
            Some(ErrorCode::HandshakeOutOfOrder)
        );
        let (mut connection, _) = handshake("station-7", [7; 32]);
        assert_eq!(
            code(&connection.on_request(hello("station-7", 1, 1), &directory, &rng)),
            Some(ErrorCode::HandshakeOutOfOrder)
        );
    }

    #[test]
    fn users_reach_their_own_vpsds_only_and_admins_everything() {
        let directory = directory();
        let rng = SystemRandom::new();
        let (mut user, _) = handshake("station-7", [7; 32]);
        assert!(matches!(
            user.on_request(sign(1001), &directory, &rng),
            Action::Dispatch { .. }
        ));
        assert_eq!(
            code(&user.on_request(sign(1002), &directory, &rng)),
            Some(ErrorCode::Forbidden)
        );
        assert_eq!(
            code(&user.on_request(
                Request::Lock {
                    vpsd_id: 1001,
                    reason: "x".into()
                },
                &directory,
                &rng
            )),
            Some(ErrorCode::Forbidden)
        );
        assert_eq!(
            code(&user.on_request(Request::Stats, &directory, &rng)),
            Some(ErrorCode::Forbidden)
        );
        assert!(matches!(
            user.on_request(
                Request::Verify {
                    indicium: vec![1, 2, 3]
                },
                &directory,
                &rng
            ),
            Action::Dispatch { .. }
        ));
        let (mut admin, _) = handshake("admin", [9; 32]);
        assert!(matches!(
            admin.on_request(sign(1002), &directory, &rng),
            Action::Dispatch { .. }
        ));
        assert!(matches!(
            admin.on_request(Request::Stats, &directory, &rng),
            Action::Dispatch { .. }
        ));
    }

    #[test]
    fn a_certificate_binds_the_connection_to_its_client() {
        let directory = directory();
        let rng = SystemRandom::new();
        // A user's certificate cannot carry the admin's handshake, even with the secret.
        let mut connection = Connection::with_certificate("station-7".into());
        let action = connection.on_request(hello("admin", 1, 1), &directory, &rng);
        assert!(matches!(action, Action::ReplyAndClose(_)));
        assert_eq!(code(&action), Some(ErrorCode::AuthenticationFailed));
        assert!(connection.client().is_none());
        // Its own handshake goes ahead.
        let mut connection = Connection::with_certificate("station-7".into());
        let action = connection.on_request(hello("station-7", 1, 1), &directory, &rng);
        assert!(matches!(action, Action::Reply(Response::Challenge { .. })));
    }
}
