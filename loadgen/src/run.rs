//! Driving the appliance: one writer and one reader thread per connection, over the two
//! halves of one authenticated socket, so that sending never waits for answers.
//!
//! - **Closed loop**: each connection keeps `window` requests in flight; latency runs from
//!   the send.
//! - **Open loop**: each connection sends at `rate / connections` per second on a fixed
//!   schedule; latency runs from when a request was *due* (coordinated omission
//!   corrected, see [`crate::pacing`]).
//!
//! Every `verify_every`-th indicium is checked offline against the vPSD's published key.
//! Answers are counted into a [`Tally`]: successes timed, refusals by error code; a
//! connection that fails during the run is counted by what failed, with its unanswered
//! requests, and the others go on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicia_client::transport::{ReadHalf, WriteHalf};
use indicia_client::{Client, ClientError, Credential, RequestIds, TlsSettings, Transport};
use indicia_proto::frame::FRAME_BYTES_MAX;
use indicia_proto::{
    Algorithm, Decoded, ErrorCode, FrameDecoder, Indicium, ItemResult, MailingDate, Request,
    Response, SignItem,
};
use thiserror::Error;

use crate::pacing::{latency_us, Schedule};
pub use crate::tally::{latency_histogram, Tally, Validity};
use crate::workload::{Rng, VpsdPicker};

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("a load thread panicked")]
    Thread,
    #[error("funding {indicia_max} indicia at {postage_mills} mills does not fit a register")]
    FundingOverflow {
        indicia_max: u64,
        postage_mills: u64,
    },
}

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A fixed number of requests in flight per connection.
    Closed { window: usize },
    /// A fixed total rate, spread evenly over the connections.
    Open { rate_per_s: f64 },
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub addr: SocketAddr,
    pub credential: Credential,
    /// Mutual TLS to the appliance (None: plaintext).
    pub tls: Option<TlsSettings>,
    pub connections: usize,
    pub mode: Mode,
    pub duration: Duration,
    pub picker: VpsdPicker,
    /// Items per request: 1 sends `sign`, more send `sign-batch`.
    pub batch: usize,
    /// The most request frames one write carries. A connection stands for many users
    /// (a shipping station's gateway): the requests that are ready when it writes go out
    /// together, as a pipelining client sends them. 1 sends every frame on its own.
    pub frames_per_write: usize,
    pub postage_mills: u64,
    /// Verify every n-th indicium offline (0: none).
    pub verify_every: u64,
    pub seed: u64,
    /// Error codes this experiment provokes on purpose: they do not make the run invalid.
    /// Empty for the standard experiments, where any error, `busy` included, does.
    pub expected_errors: Vec<ErrorCode>,
    /// Whether the load goes through the client library or raw frames.
    pub client: ClientKind,
}

/// How the load reaches the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Frames written by the load generator itself over `connections` connections, each
    /// standing for a gateway that pipelines (module documentation).
    Raw,
    /// Calls of `callers` threads sharing one [`indicia_client::Pool`] ([`crate::library`]),
    /// each one call at a time; `batching` as the pool's.
    Library { callers: usize, batching: bool },
}

impl RunConfig {
    /// The request kind this run sends, as the appliance's statistics name it.
    pub fn request_kind(&self) -> &'static str {
        if self.batch <= 1 {
            "sign"
        } else {
            "sign_batch"
        }
    }
}

/// The published public keys, by vPSD: algorithm and SubjectPublicKeyInfo.
pub type Keys = HashMap<u64, (Algorithm, Vec<u8>)>;

/// Whether an indicium's signature holds under its vPSD's published key.
pub fn verifies(indicium: &Indicium, keys: &Keys) -> bool {
    let Some((algorithm, spki)) = keys.get(&indicium.payload.vpsd_id) else {
        return false;
    };
    *algorithm == indicium.payload.algorithm
        && indicia_client::verify::signature_holds(indicium, spki)
}

/// Requests sent and not yet answered: request id -> (due or send time, vPSD).
#[derive(Default)]
struct InFlight {
    requests: Mutex<HashMap<u64, Instant>>,
    room: Condvar,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Runs the load; returns what all connections saw.
pub fn run(config: &RunConfig, keys: &Keys) -> Result<Tally, LoadError> {
    let connections = config.connections.max(1);
    let mut threads = Vec::with_capacity(connections);
    let start = Instant::now();
    for index in 0..connections {
        // The client library runs the handshakes (TLS, then the protocol's); the
        // transport's two halves are then used raw, by a reader and a writer thread.
        let transport = Transport::connect(config.addr, config.tls.as_ref())?;
        let client = Client::handshake(transport, &config.credential)?;
        let (reader, stream) = client
            .into_transport()
            .ok_or_else(|| LoadError::Protocol("input left over after the handshake".into()))?
            .split();
        let config = config.clone();
        let keys = keys.clone();
        threads.push(std::thread::spawn(move || {
            connection(&config, &keys, index, start, stream, reader)
        }));
    }
    let mut total = Tally::default();
    for thread in threads {
        let tally = thread.join().map_err(|_| LoadError::Thread)??;
        total.merge(&tally);
    }
    Ok(total)
}

/// Why a connection stopped before its run's end. Counted in the tally by name, apart from
/// the appliance's error codes: the connection failed, not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransportFailure {
    /// The appliance closed the connection.
    Closed,
    /// No answer for [`ANSWER_WAIT_MAX`] with requests in flight.
    Silent,
    /// Reading or writing the socket failed.
    Io(std::io::ErrorKind),
    /// Bytes that are not a frame.
    BadFrame,
    /// A frame whose body does not decode.
    BadAnswer,
    /// An answer of a kind a signing request never gets.
    UnexpectedAnswer(u8),
    /// An answer to a request id that is not in flight.
    UnknownRequest,
    /// An error about the connection (request id 0), named by its code; the appliance
    /// closes the connection after it.
    Connection(indicia_proto::ErrorCode),
}

impl TransportFailure {
    fn name(self) -> String {
        match self {
            Self::Closed => "connection-closed".into(),
            Self::Silent => "no-answer".into(),
            Self::Io(kind) => format!("io ({kind})"),
            Self::BadFrame => "bad-frame".into(),
            Self::BadAnswer => "bad-answer".into(),
            Self::UnexpectedAnswer(opcode) => format!("unexpected-answer-{opcode:#04x}"),
            Self::UnknownRequest => "unknown-request-id".into(),
            Self::Connection(code) => format!("connection-error ({})", code.name()),
        }
    }
}

/// How long a reader waits for an answer, with requests in flight, before it gives the
/// connection up.
const ANSWER_WAIT_MAX: Duration = Duration::from_secs(60);

fn connection(
    config: &RunConfig,
    keys: &Keys,
    index: usize,
    start: Instant,
    stream: WriteHalf,
    mut reader: ReadHalf,
) -> Result<Tally, LoadError> {
    let in_flight = Arc::new(InFlight::default());
    let sending_done = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    reader.set_read_timeout(Some(Duration::from_millis(200)))?;
    let writer = {
        let config = config.clone();
        let in_flight = Arc::clone(&in_flight);
        let sending_done = Arc::clone(&sending_done);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let result = send(&config, index, start, stream, &in_flight, &stop);
            sending_done.store(true, Ordering::Release);
            in_flight.room.notify_all();
            result
        })
    };
    let mut tally = Tally::default();
    let received = receive(
        config,
        keys,
        &mut reader,
        &in_flight,
        &sending_done,
        &mut tally,
    );
    // A failed reader stops the writer: nothing more goes into a broken connection.
    stop.store(true, Ordering::Release);
    in_flight.room.notify_all();
    let sent = writer.join().map_err(|_| LoadError::Thread)??;
    // One failure per connection: the reader's if it failed, else the writer's.
    if let Some(failure) = received.err().or(sent) {
        let unanswered = in_flight.lock().len() as u64;
        tally.transport_failure(failure.name(), unanswered);
    }
    Ok(tally)
}

/// The reader: answers until the writer is done and nothing is in flight, into `tally`.
fn receive(
    config: &RunConfig,
    keys: &Keys,
    reader: &mut ReadHalf,
    in_flight: &InFlight,
    sending_done: &AtomicBool,
    tally: &mut Tally,
) -> Result<(), TransportFailure> {
    let decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 4 * FRAME_BYTES_MAX];
    let (mut begin, mut end) = (0usize, 0usize);
    let mut indicia_seen = 0u64;
    let mut quiet_since = Instant::now();
    loop {
        loop {
            let frame = match decoder.decode(&buf[begin..end]) {
                Ok(Decoded::Frame(frame)) => frame,
                Ok(Decoded::Incomplete { .. }) => break,
                Err(_) => return Err(TransportFailure::BadFrame),
            };
            let answered = Instant::now();
            let request_id = frame.header.request_id;
            let response = Response::decode(frame.header.opcode, frame.body)
                .map_err(|_| TransportFailure::BadAnswer)?;
            begin += frame.len();
            if request_id == 0 {
                if let Response::Error(body) = &response {
                    return Err(TransportFailure::Connection(body.code));
                }
            }
            let due = in_flight.lock().remove(&request_id);
            in_flight.room.notify_one();
            let Some(due) = due else {
                return Err(TransportFailure::UnknownRequest);
            };
            tally.requests += 1;
            let mut signed = Vec::new();
            let mut refused = false;
            match response {
                Response::Signed { indicium } => signed.push(indicium),
                Response::BatchSigned { results } => {
                    for result in results {
                        match result {
                            ItemResult::Signed(indicium) => signed.push(indicium),
                            ItemResult::Failed(body) => {
                                tally.error(body.code);
                                refused = true;
                            }
                        }
                    }
                }
                Response::Error(body) => {
                    tally.error(body.code);
                    refused = true;
                }
                other => return Err(TransportFailure::UnexpectedAnswer(other.opcode())),
            }
            // Only requests answered with every item signed are timed: a refusal is
            // answered without a signature or a durable commit, far sooner.
            if !refused && !signed.is_empty() {
                tally.requests_ok += 1;
                tally
                    .latency_us
                    .saturating_record(latency_us(due, answered));
            }
            for indicium in signed {
                tally.indicia += 1;
                indicia_seen += 1;
                if config.verify_every > 0 && indicia_seen % config.verify_every == 0 {
                    if verifies(&indicium, keys) {
                        tally.verified += 1;
                    } else {
                        tally.verify_failed += 1;
                    }
                }
            }
        }
        indicia_client::transport::compact(&mut buf, &mut begin, &mut end, FRAME_BYTES_MAX);
        if sending_done.load(Ordering::Acquire) && in_flight.lock().is_empty() {
            return Ok(());
        }
        match reader.read(&mut buf[end..]) {
            Ok(0) => return Err(TransportFailure::Closed),
            Ok(n) => {
                end += n;
                quiet_since = Instant::now();
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if quiet_since.elapsed() > ANSWER_WAIT_MAX {
                    return Err(TransportFailure::Silent);
                }
            }
            Err(err) => return Err(TransportFailure::Io(err.kind())),
        }
    }
}

/// The writer: sends until the run's end (or until `stop`), paced by the mode. Returns the
/// connection's failure if a write failed; an error only for what is wrong on this side.
fn send(
    config: &RunConfig,
    index: usize,
    start: Instant,
    mut stream: WriteHalf,
    in_flight: &InFlight,
    stop: &AtomicBool,
) -> Result<Option<TransportFailure>, LoadError> {
    let deadline = start + config.duration;
    let mut rng = Rng::new(config.seed.wrapping_add(index as u64 + 1));
    // Ids from the system's random generator, not the seed: the appliance remembers
    // (client, vPSD, request id), and a second run reusing the first run's ids would be
    // answered from that memory (retries are not what is measured here).
    // Never 0 (the appliance's id for errors about the connection), also after wrapping.
    let mut ids = RequestIds::random()
        .map_err(|_| LoadError::Protocol("random number generator failed".into()))?;
    let mailing_date =
        MailingDate::from_unix_seconds(now_unix()).unwrap_or(MailingDate::from_days_since_2000(0));
    let item = SignItem {
        postage_mills: config.postage_mills,
        mailing_date,
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    };
    let schedule = match config.mode {
        Mode::Open { rate_per_s } => Some(Schedule::new(
            start,
            rate_per_s / config.connections.max(1) as f64,
        )),
        Mode::Closed { .. } => None,
    };
    let frames_per_write = config.frames_per_write.max(1);
    let mut frame = vec![0u8; FRAME_BYTES_MAX];
    let mut out = Vec::new();
    let mut n = 0u64;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(None);
        }
        // How many requests go out in this write, and from when each one counts.
        let (count, first_due) = match (config.mode, schedule) {
            (Mode::Open { .. }, Some(schedule)) => {
                let due = schedule.due(n);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                // Everything already due goes out with it (the writer may have been late).
                let late = schedule.due_by(Instant::now()).saturating_sub(n);
                (
                    usize::try_from(late)
                        .unwrap_or(usize::MAX)
                        .clamp(1, frames_per_write),
                    due,
                )
            }
            (Mode::Closed { window }, _) => {
                let window = window.max(1);
                let mut requests = in_flight.lock();
                while requests.len() >= window
                    && Instant::now() < deadline
                    && !stop.load(Ordering::Acquire)
                {
                    requests = in_flight
                        .room
                        .wait_timeout(requests, Duration::from_millis(50))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                let room = window.saturating_sub(requests.len()).max(1);
                (room.min(frames_per_write), Instant::now())
            }
            (Mode::Open { .. }, None) => (1, Instant::now()),
        };
        if first_due >= deadline {
            return Ok(None);
        }
        out.clear();
        let mut sent = Vec::with_capacity(count);
        for offset in 0..count as u64 {
            let due = match schedule {
                Some(schedule) => schedule.due(n + offset),
                None => first_due,
            };
            if due >= deadline {
                break;
            }
            let vpsd_id = config.picker.pick(&mut rng);
            let request = if config.batch <= 1 {
                Request::Sign { vpsd_id, item }
            } else {
                Request::SignBatch {
                    vpsd_id,
                    items: vec![item; config.batch],
                }
            };
            let id = ids.next_id();
            let len = request
                .encode_frame(1, id, &mut frame)
                .map_err(|err| LoadError::Protocol(format!("cannot encode: {err}")))?;
            out.extend_from_slice(&frame[..len]);
            sent.push((id, due));
        }
        if sent.is_empty() {
            return Ok(None);
        }
        n += sent.len() as u64;
        in_flight.lock().extend(sent);
        if let Err(err) = stream.write_all(&out) {
            return Ok(Some(TransportFailure::Io(err.kind())));
        }
    }
}
