//! Connections to the other appliances of the cluster, for forwarding (docs/CLUSTER.md
//! section 12.2): one per shard and appliance, opened on first use, authenticated as
//! client `appliance:<this appliance's id>` (role appliance) with the secret derived from
//! the cluster's master key, and multiplexed: many forwarded requests in flight, each
//! under its own frame request id, answered in any order.
//!
//! Bounded: at most [`CALLS_IN_FLIGHT_MAX`] requests in flight on one link (more wait for
//! room); a call has a time limit; a link that fails is dropped with every call on it
//! failed, and the next call opens a new one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use indicia_proto::frame::{FrameDecoder, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use indicia_proto::message::{
    APPLIANCE_CLIENT_PREFIX, CLIENT_PROOF_LABEL, NONCE_BYTES, SERVER_PROOF_LABEL,
};
use indicia_proto::{Decoded, Request, Response, Role};
use zeroize::Zeroizing;

use super::transport::{SharedStream, Transport};
use crate::server::handshake::proof;

/// The most forwarded requests in flight on one link: the owner's default
/// `inflight_per_connection` (docs/OPERATIONS.md), so that it never stops reading for them.
pub(super) const CALLS_IN_FLIGHT_MAX: usize = 1024;
/// How long a failed open of a link fails the calls that come, before one tries again.
const OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a forwarded request got no answer.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// Nothing reached the owner (no connection, refused handshake): it was not carried
    /// out there.
    NotSent(String),
    /// Sent, and no answer came (time limit, connection lost): it may have been carried
    /// out.
    Lost(String),
}

type Answer = Result<Response, CallError>;

struct Link {
    stream: SharedStream,
    pending: RefCell<HashMap<u64, LocalSender<Answer>>>,
    next_id: Cell<u64>,
    /// One frame written at a time, whole.
    writing: glommio::sync::Semaphore,
    /// Room for calls in flight.
    room: glommio::sync::Semaphore,
    closed: Cell<bool>,
}

impl Link {
    /// Fails every call in flight and closes the link.
    fn fail(&self, why: &str) {
        self.closed.set(true);
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        for (_, waiter) in pending {
            let _ = waiter.try_send(Err(CallError::Lost(why.to_owned())));
        }
    }
}

/// One shard's links to the other appliances.
pub(super) struct Peers {
    /// This appliance's client id toward the others, and its secret.
    client_id: String,
    secret: Zeroizing<[u8; 32]>,
    links: RefCell<HashMap<String, Rc<Link>>>,
    /// Addresses being connected to, so that concurrent first calls share one link.
    connecting: RefCell<HashMap<String, Rc<glommio::sync::Semaphore>>>,
    /// The last failed open to each appliance, when and why.
    failed: RefCell<HashMap<String, (std::time::Instant, String)>>,
    /// The time limit of one forwarded request (and of opening a link).
    pub(super) timeout: Duration,
    rng: SystemRandom,
    /// Mutual TLS toward the others (when this appliance uses `[tls]`).
    tls: Option<futures_rustls::TlsConnector>,
}

impl Peers {
    pub(super) fn new(
        appliance: &str,
        secret: Zeroizing<[u8; 32]>,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        Self {
            client_id: format!("{APPLIANCE_CLIENT_PREFIX}{appliance}"),
            secret,
            links: RefCell::new(HashMap::new()),
            connecting: RefCell::new(HashMap::new()),
            failed: RefCell::new(HashMap::new()),
            timeout,
            rng: SystemRandom::new(),
            tls: tls.map(futures_rustls::TlsConnector::from),
        }
    }

    /// Sends `request` to the appliance at `address` and waits for its answer, within the
    /// time limit.
    pub(super) async fn call(&self, appliance: &str, address: &str, request: &Request) -> Answer {
        // One time limit over finding a link and room on it: waiting behind other calls
        // that open one, or fill it, counts too.
        let link = glommio::timer::timeout(self.timeout, async {
            let link = self.link(appliance, address).await;
            Ok(link)
        })
        .await
        .unwrap_or_else(|_| {
            Err(CallError::NotSent(format!(
                "{appliance} at {address}: no connection within {} ms",
                self.timeout.as_millis()
            )))
        })?;
        let room = glommio::timer::timeout(self.timeout, async {
            Ok(link.room.acquire_permit(1).await)
        })
        .await;
        let _room = match room {
            Ok(Ok(permit)) => permit,
            Ok(Err(err)) => return Err(CallError::NotSent(err.to_string())),
            Err(_) => {
                return Err(CallError::NotSent(format!(
                    "{appliance}: {CALLS_IN_FLIGHT_MAX} requests in flight for {} ms",
                    self.timeout.as_millis()
                )))
            }
        };
        let id = link.next_id.get();
        link.next_id.set(id.wrapping_add(1));
        let frame = encode(request, id)
            .map_err(|err| CallError::NotSent(format!("the request does not encode: {err}")))?;
        let (sender, receiver) = local_channel::new_bounded(1);
        link.pending.borrow_mut().insert(id, sender);
        // The write has the same time limit: an owner that stops reading fails the call.
        let sent = glommio::timer::timeout(self.timeout, async {
            let _writing = link
                .writing
                .acquire_permit(1)
                .await
                .map_err(|err| std::io::Error::other(err.to_string()))?;
            // A write that failed meanwhile may have cut a frame short: nothing more on it.
            if link.closed.get() {
                return Ok(Err(std::io::Error::other("the link failed")));
            }
            Ok(link.stream.write_all(&frame).await)
        })
        .await
        .unwrap_or_else(|err| Err(std::io::Error::other(err.to_string())));
        if let Err(err) = sent {
            self.drop_link(appliance, &link, &format!("write failed: {err}"));
            // Part of the frame may have gone out; the owner decodes nothing of a partial
            // frame, but a whole one may have been written before the error.
            return Err(CallError::Lost(format!("{appliance}: {err}")));
        }
        let answer =
            glommio::timer::timeout(self.timeout, async { Ok(receiver.recv().await) }).await;
        link.pending.borrow_mut().remove(&id);
        match answer {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(CallError::Lost(format!("{appliance}: the link closed"))),
            Err(_) => Err(CallError::Lost(format!(
                "{appliance} did not answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    fn drop_link(&self, appliance: &str, link: &Rc<Link>, why: &str) {
        link.fail(why);
        // Closed, so that the owner and this link's reader let go of it now.
        let stream = link.stream.clone();
        glommio::spawn_local(async move { stream.close().await }).detach();
        let mut links = self.links.borrow_mut();
        if links
            .get(appliance)
            .is_some_and(|held| Rc::ptr_eq(held, link))
        {
            links.remove(appliance);
        }
    }

    /// The open link to `appliance`, or a new one.
    async fn link(&self, appliance: &str, address: &str) -> Result<Rc<Link>, CallError> {
        if let Some(link) = self.usable(appliance) {
            return Ok(link);
        }
        let gate = Rc::clone(
            self.connecting
                .borrow_mut()
                .entry(appliance.to_owned())
                .or_insert_with(|| Rc::new(glommio::sync::Semaphore::new(1))),
        );
        let _turn = gate
            .acquire_permit(1)
            .await
            .map_err(|err| CallError::NotSent(err.to_string()))?;
        if let Some(link) = self.usable(appliance) {
            return Ok(link);
        }
        // An open that failed a moment ago fails the calls that waited for it at once.
        if let Some((at, why)) = self.failed.borrow().get(appliance) {
            if at.elapsed() < OPEN_RETRY_AFTER {
                return Err(CallError::NotSent(why.clone()));
            }
        }
        let opened = glommio::timer::timeout(self.timeout, async {
            Ok(self.open(appliance, address).await)
        })
        .await
        .unwrap_or_else(|_| {
            Err(CallError::NotSent(format!(
                "{appliance} at {address}: no connection within {} ms",
                self.timeout.as_millis()
            )))
        });
        let opened = match opened {
            Ok(opened) => {
                self.failed.borrow_mut().remove(appliance);
                opened
            }
            Err(err) => {
                let why = match &err {
                    CallError::NotSent(why) | CallError::Lost(why) => why.clone(),
                };
                self.failed
                    .borrow_mut()
                    .insert(appliance.to_owned(), (std::time::Instant::now(), why));
                return Err(err);
            }
        };
        let link = Rc::new(opened);
        self.links
            .borrow_mut()
            .insert(appliance.to_owned(), Rc::clone(&link));
        glommio::spawn_local(read_answers(Rc::clone(&link), appliance.to_owned())).detach();
        tracing::info!("forwarding: connected to {appliance} at {address}");
        Ok(link)
    }

    fn usable(&self, appliance: &str) -> Option<Rc<Link>> {
        self.links
            .borrow()
            .get(appliance)
            .filter(|link| !link.closed.get())
            .cloned()
    }

    /// Connects and runs the handshake as this appliance.
    async fn open(&self, appliance: &str, address: &str) -> Result<Link, CallError> {
        let not_sent = |what: &str, err: &dyn std::fmt::Display| {
            CallError::NotSent(format!("{appliance} at {address}: {what}: {err}"))
        };
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|err| not_sent("connect", &err))?;
        let _ = tcp.set_nodelay(true);
        let transport = match &self.tls {
            None => Transport::Plain(tcp),
            Some(connector) => {
                // The owner's certificate must name the host of its advertised address.
                let host = address
                    .rsplit_once(':')
                    .map_or(address, |(host, _)| host)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|err| not_sent("TLS server name", &err))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|err| not_sent("TLS", &err))?;
                Transport::TlsClient(Box::new(tls))
            }
        };
        let stream = SharedStream(Rc::new(RefCell::new(transport)));
        let mut client_nonce = [0u8; NONCE_BYTES];
        self.rng
            .fill(&mut client_nonce)
            .map_err(|_| not_sent("random", &"the generator failed"))?;
        let mut buf = Vec::new();
        let hello = Request::Hello {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION_MAX,
            client_id: self.client_id.clone(),
            client_nonce,
        };
        let (version, server_nonce) = match exchange(&stream, &hello, &mut buf).await {
            Ok(Response::Challenge {
                version,
                server_nonce,
            }) => (version, server_nonce),
            Ok(other) => return Err(not_sent("hello", &format!("{other:?}"))),
            Err(err) => return Err(not_sent("hello", &err)),
        };
        let presented = proof(
            &self.secret,
            CLIENT_PROOF_LABEL,
            version,
            &self.client_id,
            &client_nonce,
            &server_nonce,
        );
        let expected = proof(
            &self.secret,
            SERVER_PROOF_LABEL,
            version,
            &self.client_id,
            &client_nonce,
            &server_nonce,
        );
        match exchange(
            &stream,
            &Request::Authenticate { proof: presented },
            &mut buf,
        )
        .await
        {
            Ok(Response::Welcome {
                role: Role::Appliance,
                server_proof,
            }) if server_proof == expected => {}
            Ok(Response::Welcome { .. }) => {
                return Err(not_sent(
                    "handshake",
                    &"the peer did not prove the cluster's secret (another master key?)",
                ))
            }
            Ok(other) => return Err(not_sent("authenticate", &format!("{other:?}"))),
            Err(err) => return Err(not_sent("authenticate", &err)),
        }
        Ok(Link {
            stream,
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            writing: glommio::sync::Semaphore::new(1),
            room: glommio::sync::Semaphore::new(CALLS_IN_FLIGHT_MAX as u64),
            closed: Cell::new(false),
        })
    }
}

/// A request's frame: most fit a small buffer; a large batch takes the largest frame.
fn encode(request: &Request, id: u64) -> Result<Vec<u8>, indicia_proto::EncodeError> {
    let mut frame = vec![0u8; 4096];
    let len = match request.encode_frame(PROTOCOL_VERSION_MIN, id, &mut frame) {
        Ok(len) => len,
        Err(_) => {
            frame.resize(indicia_proto::frame::FRAME_BYTES_MAX, 0);
            request.encode_frame(PROTOCOL_VERSION_MIN, id, &mut frame)?
        }
    };
    frame.truncate(len);
    Ok(frame)
}

/// One request and its answer, on a link that carries nothing else yet (the handshake).
async fn exchange(
    stream: &SharedStream,
    request: &Request,
    buf: &mut Vec<u8>,
) -> Result<Response, String> {
    // Request id 0 is reserved for errors about the connection.
    let frame = encode(request, 1).map_err(|err| err.to_string())?;
    stream
        .write_all(&frame)
        .await
        .map_err(|err| err.to_string())?;
    read_frame(stream, buf).await
}

/// Reads one whole response frame from the front of `buf` (filling it from the stream).
async fn read_frame(stream: &SharedStream, buf: &mut Vec<u8>) -> Result<Response, String> {
    let decoder = FrameDecoder::default();
    loop {
        match decoder.decode(buf).map_err(|err| err.to_string())? {
            Decoded::Frame(frame) => {
                let len = frame.len();
                let response = Response::decode(frame.header.opcode, frame.body)
                    .map_err(|err| err.to_string());
                buf.drain(..len);
                return response;
            }
            Decoded::Incomplete { needed } => {
                let start = buf.len();
                buf.resize(start + needed.max(4096), 0);
                let read = stream.read(&mut buf[start..]).await;
                match read {
                    Ok(0) => {
                        buf.truncate(start);
                        return Err("the connection closed".into());
                    }
                    Ok(n) => buf.truncate(start + n),
                    Err(err) => {
                        buf.truncate(start);
                        return Err(err.to_string());
                    }
                }
            }
        }
    }
}

/// The link's reader: each answer to the call that waits for it.
async fn read_answers(link: Rc<Link>, appliance: String) {
    let decoder = FrameDecoder::default();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match decoder.decode(&buf) {
            Ok(Decoded::Frame(frame)) => {
                let len = frame.len();
                let id = frame.header.request_id;
                let answer = Response::decode(frame.header.opcode, frame.body)
                    .map_err(|err| CallError::Lost(format!("{appliance}: bad answer: {err}")));
                buf.drain(..len);
                if let Some(waiter) = link.pending.borrow_mut().remove(&id) {
                    let _ = waiter.try_send(answer);
                }
                continue;
            }
            Ok(Decoded::Incomplete { needed }) => {
                let start = buf.len();
                buf.resize(start + needed.max(16 << 10), 0);
                match link.stream.read(&mut buf[start..]).await {
                    Ok(0) => {
                        link.fail(&format!("{appliance} closed the link"));
                        return;
                    }
                    Ok(n) => buf.truncate(start + n),
                    Err(err) => {
                        link.fail(&format!("{appliance}: {err}"));
                        return;
                    }
                }
            }
            Err(err) => {
                link.fail(&format!("{appliance}: bad frame: {err}"));
                link.stream.close().await;
                return;
            }
        }
    }
}
