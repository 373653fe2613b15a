//! `indicia-client`: the client library of the indicia appliance, and the `indiciactl` CLI.
//!
//! - [`Pool`] is what applications use: one pool shared by any number of threads and async
//!   tasks, over connections it manages. It batches the `sign` calls that wait together
//!   for a vPSD into one `sign-batch`, sends each vPSD's requests to the shard (and, in a
//!   cluster, the appliance) that owns it, and retries with the same request id, so that
//!   a retry is charged once. See the [`pool`] module.
//! - [`Client`] is one connection, driven by its caller: the handshake, then requests
//!   pipelined by hand. The load generator and the tests use it to speak the protocol
//!   frame by frame.
//!
//! [`Client::connect`] opens a TCP connection and runs the handshake (both sides prove
//! the client's secret; the appliance's proof is checked). Requests can be pipelined:
//! [`Client::send`] any number, then [`Client::recv`] the answers, which may come in any
//! order and are matched by request id. [`Client::call`] does one round trip.
//!
//! Request ids are the idempotency keys of `sign`, `sign-batch`, `refill` and `contact`
//! (per client id): a retry with the same id, also on a new connection, is charged once.
//! A new `Client` starts its ids at a random point so that two processes using the same
//! credential do not collide.

pub mod barcode;
pub mod cli;
pub mod pki;
pub mod pool;
pub mod provider;
pub mod signing;
pub mod transport;
pub mod verify;

pub use indicia_files::{Credential, FileError};
pub use pool::{Pool, PoolBuilder, PoolStats};
pub use transport::{TlsSettings, Transport};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use indicia_proto::frame::{
    FrameDecoder, FRAME_BYTES_MAX, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use indicia_proto::message::{
    handshake_transcript, CLIENT_PROOF_LABEL, NONCE_BYTES, SERVER_PROOF_LABEL,
};
use indicia_proto::{
    Decoded, ErrorBody, Indicium, ItemResult, Request, Response, Role, SignItem, StatEntry,
    VpsdStatus,
};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A credential, key or other file shared with the appliance: missing, readable by
    /// others, or malformed.
    #[error(transparent)]
    Files(#[from] FileError),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection: {0}")]
    Io(std::io::Error),
    /// TLS failed: a certificate refused either way, a file that does not load, or a
    /// TLS protocol error.
    #[error("TLS: {0}")]
    Tls(String),
    /// The `--tls-*` flags given do not make a whole.
    #[error(transparent)]
    TlsFlags(#[from] transport::TlsFlagsError),
    #[error("the appliance closed the connection")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the appliance failed to prove that it knows this client's secret")]
    ServerNotAuthenticated,
    /// The appliance answered with an error.
    #[error("{0}")]
    Refused(ErrorBody),
    #[error("random number generator failed")]
    Random,
    /// No answer within the call's time limit. `sent: false`: the request was never
    /// written, nothing was charged; `sent: true`: it may have been carried out (the
    /// vPSD's `status` tells: its registers and piece count).
    #[error("no answer within the time limit (the request was {})", if *sent { "sent: its outcome is unknown" } else { "not sent" })]
    TimedOut { sent: bool },
    /// No appliance could be reached for the request, or none owns its vPSD.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The request was written, and then its connection or its appliance failed for good
    /// (the reason follows): it may have been carried out (the vPSD's `status` tells).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

impl From<std::io::Error> for ClientError {
    fn from(err: std::io::Error) -> Self {
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<transport::TlsFailure>())
        {
            Some(failure) => Self::Tls(failure.0.clone()),
            None => Self::Io(err),
        }
    }
}

impl ClientError {
    /// The appliance's error, if that is what this is.
    pub fn refusal(&self) -> Option<&ErrorBody> {
        match self {
            Self::Refused(body) => Some(body),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where vPSDs are: the live appliances (id, address), by id, and the owner of each vPSD
/// asked about (the `placement` answer; an appliance that is not in a cluster lists no
/// appliances).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub appliances: Vec<(String, String)>,
    pub vpsds: Vec<indicia_proto::VpsdPlacement>,
}

/// One authenticated connection to the appliance.
#[derive(Debug)]
pub struct Client {
    stream: Transport,
    peer: SocketAddr,
    version: u8,
    role: Role,
    ids: RequestIds,
    decoder: FrameDecoder,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    outbuf: Vec<u8>,
    /// Bytes of `outbuf` queued and not yet written.
    pending_out: usize,
    /// Answers received while [`Client::call`] waited for another one.
    stashed: HashMap<u64, Response>,
    /// An I/O or protocol error happened: the stream is no longer usable.
    broken: bool,
}

/// The request ids of one client, in order: never 0 (the appliance answers errors about
/// the connection itself with request id 0), and distinct until 2^64 - 1 have been used,
/// after which they wrap around to 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIds {
    next: NonZeroU64,
}

impl RequestIds {
    /// Ids from a random point in the lower half of the range (far from wrapping), so that
    /// two processes using the same credential do not collide.
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; 8];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| ClientError::Random)?;
        Ok(Self::starting_at(u64::from_le_bytes(bytes) >> 1))
    }

    /// Ids from `first` on (from 1 if `first` is 0).
    pub fn starting_at(first: u64) -> Self {
        Self {
            next: NonZeroU64::new(first).unwrap_or(NonZeroU64::MIN),
        }
    }

    /// The next id; never 0.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next;
        self.next = id.checked_add(1).unwrap_or(NonZeroU64::MIN);
        id.get()
    }
}

impl Client {
    /// Connects in plaintext and authenticates.
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        credential: &Credential,
    ) -> Result<Self> {
        Self::connect_with(addr, credential, None)
    }

    /// Connects (with mutual TLS when `tls` is given) and authenticates.
    pub fn connect_with(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        credential: &Credential,
        tls: Option<&TlsSettings>,
    ) -> Result<Self> {
        Self::handshake(Transport::connect(addr, tls)?, credential)
    }

    /// Runs the protocol handshake on an open transport.
    pub fn handshake(stream: Transport, credential: &Credential) -> Result<Self> {
        let peer = stream.peer();
        let rng = SystemRandom::new();
        let mut client = Self {
            stream,
            peer,
            version: PROTOCOL_VERSION_MIN,
            role: Role::User,
            ids: RequestIds::random()?,
            decoder: FrameDecoder::default(),
            inbuf: vec![0u8; 64 << 10],
            start: 0,
            end: 0,
            // Room for several frames, so that pipelined requests go out together.
            outbuf: vec![0u8; 4 * FRAME_BYTES_MAX],
            pending_out: 0,
            stashed: HashMap::new(),
            broken: false,
        };
        let mut client_nonce = [0u8; NONCE_BYTES];
        rng.fill(&mut client_nonce)
            .map_err(|_| ClientError::Random)?;
        let (version, server_nonce) = match client.call(&Request::Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            client_id: credential.client_id.clone(),
            client_nonce,
        })? {
            Response::Challenge {
                version,
                server_nonce,
            } => (version, server_nonce),
            other => return Err(unexpected("hello", &other)),
        };
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
            return Err(ClientError::Protocol(format!(
                "the appliance chose version {version}, outside the range offered"
            )));
        }
        client.version = version;
        let key = hmac::Key::new(hmac::HMAC_SHA256, credential.secret.as_ref());
        let transcript = |label| {
            handshake_transcript(
                label,
                version,
                &credential.client_id,
                &client_nonce,
                &server_nonce,
            )
        };
        let mut proof = [0u8; 32];
        proof.copy_from_slice(hmac::sign(&key, &transcript(CLIENT_PROOF_LABEL)).as_ref());
        match client.call(&Request::Authenticate { proof })? {
            Response::Welcome { role, server_proof } => {
                // Constant-time comparison inside aws-lc.
                hmac::verify(&key, &transcript(SERVER_PROOF_LABEL), &server_proof)
                    .map_err(|_| ClientError::ServerNotAuthenticated)?;
                client.role = role;
            }
            other => return Err(unexpected("authenticate", &other)),
        }
        Ok(client)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Bounds how long a read or write may block (None: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_timeout(timeout)?;
        Ok(())
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// The authenticated transport, for a caller that drives the protocol itself (the load
    /// generator). None if requests are still queued or answers were read ahead.
    pub fn into_transport(self) -> Option<Transport> {
        (self.pending_out == 0 && self.start == self.end && self.stashed.is_empty())
            .then_some(self.stream)
    }

    /// A request id not used before by this client (never 0: the appliance uses id 0 for
    /// errors about the connection itself).
    pub fn next_request_id(&mut self) -> u64 {
        self.ids.next_id()
    }

    fn usable(&self) -> Result<()> {
        if self.broken {
            Err(ClientError::Closed)
        } else {
            Ok(())
        }
    }

    /// Queues a request with the given id; it goes out at the next [`Client::flush`] or
    /// [`Client::recv`] (or when the buffer is full).
    ///
    /// Writing blocks until the appliance takes the bytes, and the appliance stops reading
    /// a connection with more than its limit of unanswered requests (1024 by default): a
    /// caller that pipelines must `recv` before it has that many in flight.
    pub fn send(&mut self, request_id: u64, request: &Request) -> Result<()> {
        self.usable()?;
        if self.outbuf.len() - self.pending_out < FRAME_BYTES_MAX {
            self.flush()?;
        }
        let at = self.pending_out;
        let len = request
            .encode_frame(self.version, request_id, &mut self.outbuf[at..])
            .map_err(|err| ClientError::Protocol(format!("cannot encode the request: {err}")))?;
        self.pending_out += len;
        Ok(())
    }

    /// Writes every queued request.
    pub fn flush(&mut self) -> Result<()> {
        self.usable()?;
        if self.pending_out > 0 {
            let written = self.stream.write_all(&self.outbuf[..self.pending_out]);
            // Written or not, these bytes must not go out twice.
            self.pending_out = 0;
            if let Err(err) = written {
                self.broken = true;
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// The next answer, whichever request it is for.
    pub fn recv(&mut self) -> Result<(u64, Response)> {
        if let Some(&id) = self.stashed.keys().next() {
            if let Some(response) = self.stashed.remove(&id) {
                return Ok((id, response));
            }
        }
        self.recv_wire()
    }

    fn recv_wire(&mut self) -> Result<(u64, Response)> {
        self.flush()?;
        let result = self.read_answer();
        match &result {
            Err(_) => self.broken = true,
            // The appliance is closing the connection and says why.
            Ok((0, Response::Error(body))) => {
                self.broken = true;
                return Err(ClientError::Refused(body.clone()));
            }
            Ok(_) => {}
        }
        result
    }

    fn read_answer(&mut self) -> Result<(u64, Response)> {
        loop {
            match self.decoder.decode(&self.inbuf[self.start..self.end]) {
                Ok(Decoded::Frame(frame)) => {
                    let header = frame.header;
                    let len = frame.len();
                    if !header.is_response() {
                        return Err(ClientError::Protocol(
                            "the appliance sent a request frame".into(),
                        ));
                    }
                    let response = Response::decode(header.opcode, frame.body)
                        .map_err(|err| ClientError::Protocol(format!("bad answer: {err}")))?;
                    self.start += len;
                    if self.start == self.end {
                        self.start = 0;
                        self.end = 0;
                    }
                    return Ok((header.request_id, response));
                }
                Ok(Decoded::Incomplete { needed }) => {
                    if self.inbuf.len() - self.end < needed {
                        self.inbuf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                        if self.inbuf.len() < self.end + needed {
                            self.inbuf.resize(self.end + needed, 0);
                        }
                    }
                    let read = self.stream.read(&mut self.inbuf[self.end..])?;
                    if read == 0 {
                        return Err(ClientError::Closed);
                    }
                    self.end += read;
                }
                Err(err) => return Err(ClientError::Protocol(format!("bad frame: {err}"))),
            }
        }
    }

    /// Sends one request with the given id and waits for its answer (answers to other
    /// requests in flight are kept for [`Client::recv`]).
    pub fn call_with_id(&mut self, request_id: u64, request: &Request) -> Result<Response> {
        if let Some(response) = self.stashed.remove(&request_id) {
            return Ok(response);
        }
        self.send(request_id, request)?;
        loop {
            let (id, response) = self.recv_wire()?;
            if id == request_id {
                return Ok(response);
            }
            self.stashed.insert(id, response);
        }
    }

    pub fn call(&mut self, request: &Request) -> Result<Response> {
        let id = self.next_request_id();
        self.call_with_id(id, request)
    }

    /// Calls, turning an error answer into [`ClientError::Refused`].
    fn call_ok(&mut self, request: &Request) -> Result<Response> {
        match self.call(request)? {
            Response::Error(body) => Err(ClientError::Refused(body)),
            response => Ok(response),
        }
    }

    pub fn status(&mut self, vpsd_id: u64) -> Result<VpsdStatus> {
        answer::status(self.call_ok(&Request::Status { vpsd_id })?)
    }

    /// Provisions, refills, contacts, locks, unlocks or rotates: every request answered
    /// with the vPSD's status.
    pub fn change(&mut self, request: &Request) -> Result<VpsdStatus> {
        answer::status(self.call_ok(request)?)
    }

    /// Signs one indicium.
    pub fn sign(&mut self, vpsd_id: u64, item: SignItem) -> Result<Indicium> {
        match self.call_ok(&Request::Sign { vpsd_id, item })? {
            Response::Signed { indicium } => Ok(indicium),
            other => Err(unexpected("sign", &other)),
        }
    }

    /// Signs up to 256 indicia in one request; one result per item.
    pub fn sign_batch(&mut self, vpsd_id: u64, items: Vec<SignItem>) -> Result<Vec<ItemResult>> {
        answer::batch(self.call_ok(&Request::SignBatch { vpsd_id, items })?)
    }

    /// The current public key (SubjectPublicKeyInfo, DER), its algorithm and serial.
    pub fn public_key(&mut self, vpsd_id: u64) -> Result<(indicia_proto::Algorithm, u32, Vec<u8>)> {
        self.public_key_of(vpsd_id, None)
    }

    /// The public key of one serial (`None`: the current one).
    pub fn public_key_of(
        &mut self,
        vpsd_id: u64,
        key_serial: Option<u32>,
    ) -> Result<(indicia_proto::Algorithm, u32, Vec<u8>)> {
        answer::public_key(self.call_ok(&Request::PublicKey {
            vpsd_id,
            key_serial,
        })?)
    }

    /// Online verification: the appliance's verdict on an indicium's bytes, with the vPSD
    /// id and piece number it names.
    pub fn verify(&mut self, indicium: &[u8]) -> Result<(indicia_proto::Verdict, u64, u64)> {
        match self.call_ok(&Request::Verify {
            indicium: indicium.to_vec(),
        })? {
            Response::Verified {
                verdict,
                vpsd_id,
                piece_number,
            } => Ok((verdict, vpsd_id, piece_number)),
            other => Err(unexpected("verify", &other)),
        }
    }

    /// Withdraws a vPSD: its descending register is refunded and it is retired for good.
    pub fn withdraw(&mut self, vpsd_id: u64) -> Result<(u64, VpsdStatus)> {
        answer::withdrawn(self.call_ok(&Request::Withdraw { vpsd_id })?)
    }

    /// A hot backup (admin): the appliance copies every shard's journal up to its durable
    /// point into `out`, a new or empty directory on the appliance's host (an absolute
    /// path), audits the copy and says what it holds. It takes as long as copying the
    /// journals does: give the client a time limit to match.
    pub fn backup(&mut self, out: &str) -> Result<indicia_proto::BackupReport> {
        match self.call_ok(&Request::Backup { out: out.into() })? {
            Response::Backup(report) => Ok(report),
            other => Err(unexpected("backup", &other)),
        }
    }

    pub fn stats(&mut self) -> Result<Vec<StatEntry>> {
        match self.call_ok(&Request::Stats)? {
            Response::Stats { entries } => Ok(entries),
            other => Err(unexpected("stats", &other)),
        }
    }

    /// The cluster's appliances (admin, cluster mode); with `take_over_from`, after this
    /// appliance took over every vPSD of that one. Returns how many it took over, and the
    /// appliances.
    pub fn cluster(
        &mut self,
        take_over_from: Option<&str>,
    ) -> Result<(u32, Vec<indicia_proto::ApplianceEntry>)> {
        let request = match take_over_from {
            Some(from) => Request::ClusterTakeover { from: from.into() },
            None => Request::ClusterStatus,
        };
        match self.call_ok(&request)? {
            Response::Cluster { taken, appliances } => Ok((taken, appliances)),
            other => Err(unexpected("cluster", &other)),
        }
    }
}

impl Client {
    /// Who owns each of these vPSDs, and where the live appliances are reached (cluster
    /// mode; a user may ask only about its own vPSDs).
    pub fn placement(&mut self, vpsd_ids: &[u64]) -> Result<Placement> {
        let request = Request::ClusterPlacement {
            vpsd_ids: vpsd_ids.to_vec(),
        };
        match self.call_ok(&request)? {
            Response::Placement { appliances, vpsds } => Ok(Placement { appliances, vpsds }),
            other => Err(unexpected("cluster-placement", &other)),
        }
    }

    /// Moves a vPSD to another appliance of the cluster (admin), under load: returns the
    /// placement the move left.
    pub fn cluster_move(&mut self, vpsd_id: u64, to: &str) -> Result<Placement> {
        let request = Request::ClusterMove {
            vpsd_id,
            to: to.into(),
        };
        match self.call_ok(&request)? {
            Response::Placement { appliances, vpsds } => Ok(Placement { appliances, vpsds }),
            other => Err(unexpected("cluster-move", &other)),
        }
    }

    /// Marks an appliance draining (its vPSDs move away), or not with `undo` (admin).
    pub fn cluster_drain(
        &mut self,
        appliance: &str,
        undo: bool,
    ) -> Result<Vec<indicia_proto::ApplianceEntry>> {
        let request = Request::ClusterDrain {
            appliance: appliance.into(),
            undo,
        };
        match self.call_ok(&request)? {
            Response::Cluster { appliances, .. } => Ok(appliances),
            other => Err(unexpected("cluster-drain", &other)),
        }
    }

    /// Pins a vPSD or an owner account to an appliance; `None` removes the pin (admin).
    pub fn cluster_pin(
        &mut self,
        subject: indicia_proto::PinSubject,
        appliance: Option<&str>,
    ) -> Result<Vec<indicia_proto::ApplianceEntry>> {
        let request = Request::ClusterPin {
            subject,
            appliance: appliance.unwrap_or_default().into(),
        };
        match self.call_ok(&request)? {
            Response::Cluster { appliances, .. } => Ok(appliances),
            other => Err(unexpected("cluster-pin", &other)),
        }
    }
}

/// The typed content of answers, shared by [`Client`] and [`Pool`]: each takes an answer
/// that is not an error.
pub(crate) mod answer {
    use indicia_proto::{Algorithm, ItemResult, Response, VpsdStatus};

    use super::{unexpected, Result};

    pub fn status(response: Response) -> Result<VpsdStatus> {
        match response {
            Response::VpsdStatus(status) => Ok(status),
            other => Err(unexpected("request", &other)),
        }
    }

    pub fn batch(response: Response) -> Result<Vec<ItemResult>> {
        match response {
            Response::BatchSigned { results } => Ok(results),
            other => Err(unexpected("sign-batch", &other)),
        }
    }

    pub fn public_key(response: Response) -> Result<(Algorithm, u32, Vec<u8>)> {
        match response {
            Response::PublicKeyInfo {
                algorithm,
                key_serial,
                spki_der,
                ..
            } => Ok((algorithm, key_serial, spki_der)),
            other => Err(unexpected("public-key", &other)),
        }
    }

    pub fn withdrawn(response: Response) -> Result<(u64, VpsdStatus)> {
        match response {
            Response::Withdrawn {
                refund_mills,
                status,
            } => Ok((refund_mills, status)),
            other => Err(unexpected("withdraw", &other)),
        }
    }
}

pub(crate) fn unexpected(what: &str, response: &Response) -> ClientError {
    match response {
        Response::Error(body) => ClientError::Refused(body.clone()),
        other => ClientError::Protocol(format!(
            "unexpected answer to {what}: opcode {:#04x}",
            other.opcode()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_never_0_also_where_they_wrap_around() {
        let mut ids = RequestIds::starting_at(u64::MAX - 1);
        assert_eq!(
            [ids.next_id(), ids.next_id(), ids.next_id(), ids.next_id()],
            [u64::MAX - 1, u64::MAX, 1, 2]
        );
        let mut from_zero = RequestIds::starting_at(0);
        assert_eq!([from_zero.next_id(), from_zero.next_id()], [1, 2]);
        for _ in 0..64 {
            let mut random = RequestIds::random().unwrap();
            let first = random.next_id();
            assert!((1..=u64::MAX >> 1).contains(&first), "{first}");
            assert_eq!(random.next_id(), first + 1);
        }
    }
}
