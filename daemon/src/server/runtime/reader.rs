//! A connection's reader: frames in, the handshake and access control, and each authorized
//! request run here or forwarded to the shard that owns its vPSD.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicia_proto::frame::{FrameDecoder, PROTOCOL_VERSION_MIN};
use indicia_proto::message::opcode;
use indicia_proto::{DecodeError, Decoded, ErrorCode, FrameError, Indicium, Request, Response};

use super::connection::Inflight;
use super::transport::SharedStream;
use super::{deliver_local, fail_stop, unix_now, Cross, Forwarded, Outgoing, ReplyTo, Shard};
use crate::server::handshake::{Action, ClientEntry, Connection};
use crate::server::local::Outbox;
use crate::server::metrics::Counter;
use crate::server::shard_of;

/// Requests a connection has read for other shards, sent in one message per shard after
/// each read (or sooner, before the reader would wait).
struct Forwarder {
    batches: Vec<Vec<Forwarded>>,
    queued: usize,
}

impl Forwarder {
    fn new(shards: u16) -> Self {
        Self {
            batches: (0..shards).map(|_| Vec::new()).collect(),
            queued: 0,
        }
    }

    fn push(&mut self, owner: u16, forwarded: Forwarded) {
        if let Some(batch) = self.batches.get_mut(usize::from(owner)) {
            batch.push(forwarded);
            self.queued += 1;
        }
    }

    async fn flush(&mut self, shard: &Rc<Shard>) {
        if self.queued == 0 {
            return;
        }
        self.queued = 0;
        let metrics = &shard.metrics.shards[usize::from(shard.index)];
        for (owner, batch) in self.batches.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let batch = std::mem::take(batch);
            metrics.add(Counter::CrossShardRequests, batch.len() as u64);
            let Some(Some(sender)) = shard.peers.get(owner) else {
                continue;
            };
            if let Err(glommio::GlommioError::Closed(glommio::ResourceType::Channel(
                Cross::Requests(batch),
            ))) = sender.send(Cross::Requests(batch)).await
            {
                let refused = batch
                    .into_iter()
                    .map(|forwarded| {
                        let response = Response::error(
                            ErrorCode::ShuttingDown,
                            "the owning shard has stopped",
                        );
                        (forwarded.reply, response)
                    })
                    .collect();
                deliver_local(shard, refused);
            }
        }
    }
}

/// A connection's protocol handshake state (bound to its TLS certificate, if any) and the
/// time by which the handshake must be complete.
pub(super) struct Handshake {
    pub(super) connection: Connection,
    pub(super) deadline: Instant,
}

pub(super) async fn read_requests(
    shard: &Rc<Shard>,
    stream: &SharedStream,
    outbox: &Rc<Outbox<Outgoing>>,
    version: &Rc<Cell<u8>>,
    inflight: &Rc<Inflight>,
    connection_id: u64,
    handshake: Handshake,
) -> bool {
    let Handshake {
        mut connection,
        deadline: handshake_deadline,
    } = handshake;
    /// Read buffer of an idle connection; it grows to hold a large frame, then shrinks.
    const READ_BUFFER: usize = 16 << 10;
    /// Largest frame accepted before the handshake is complete (`hello` and `authenticate`
    /// are far smaller).
    const PRE_AUTH_FRAME_MAX: usize = 4096;
    let decoder = FrameDecoder::new(shard.config.request_body_bytes_max);
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    let frame_timeout = Duration::from_millis(shard.config.frame_timeout_ms);
    let idle_timeout =
        Some(Duration::from_millis(shard.config.idle_timeout_ms)).filter(|idle| !idle.is_zero());
    let mut buf = vec![0u8; READ_BUFFER];
    let (mut start, mut end) = (0usize, 0usize);
    // When the first byte of the frame now arriving came.
    let mut frame_started: Option<Instant> = None;
    let refuse = |request_id: u64, code: ErrorCode, message: String| {
        metrics.connection_error(code);
        outbox.push((request_id, version.get(), Response::error(code, message)));
    };
    let mut forwarder = Forwarder::new(shard.shards);
    loop {
        // A handshake that has not completed in time is over, whatever the client keeps
        // sending meanwhile (requests before it are refused, but they keep bytes coming).
        if connection.client().is_none() && Instant::now() >= handshake_deadline {
            inflight.acquire().await;
            refuse(
                0,
                ErrorCode::Malformed,
                "the handshake did not complete in time".into(),
            );
            return true;
        }
        // Whether this turn took a whole frame off the buffer.
        let mut consumed = false;
        // Every complete frame in the buffer.
        let mut stop = false;
        loop {
            let decoded = decoder.decode(&buf[start..end]);
            // Until the handshake is done only its two small frames make sense: nobody
            // unauthenticated gets a large buffer, whether the frame is whole or announced.
            let frame_bytes = match &decoded {
                Ok(Decoded::Frame(frame)) => frame.len(),
                Ok(Decoded::Incomplete { needed }) => end - start + needed,
                Err(_) => 0,
            };
            if connection.client().is_none() && frame_bytes > PRE_AUTH_FRAME_MAX {
                inflight.acquire().await;
                refuse(
                    0,
                    ErrorCode::FrameTooLarge,
                    format!(
                        "frames before the handshake is complete are at most {PRE_AUTH_FRAME_MAX} \
                         bytes"
                    ),
                );
                stop = true;
                break;
            }
            let frame = match decoded {
                Ok(Decoded::Frame(frame)) => frame,
                Ok(Decoded::Incomplete { needed }) => {
                    if buf.len() - end < needed {
                        buf.copy_within(start..end, 0);
                        end -= start;
                        start = 0;
                        if buf.len() < end + needed {
                            buf.resize(end + needed, 0);
                        }
                    }
                    break;
                }
                Err(err) => {
                    // A bad frame: the stream can no longer be trusted to be aligned.
                    let (code, request_id) = frame_error_answer(&err, &buf[start..end]);
                    if inflight.is_full() {
                        forwarder.flush(shard).await;
                    }
                    inflight.acquire().await;
                    refuse(request_id, code, format!("bad frame: {err}"));
                    stop = true;
                    break;
                }
            };
            let header = frame.header;
            let frame_len = frame.len();
            let body = frame.body;
            if inflight.is_full() {
                // Requests held here would never be answered while we wait: send them.
                forwarder.flush(shard).await;
            }
            inflight.acquire().await;
            // `hello` frames carry version 1 forever (docs/PROTOCOL.md section 4.1).
            let expected_version = if header.opcode == opcode::HELLO {
                PROTOCOL_VERSION_MIN
            } else {
                connection.version()
            };
            if header.version != expected_version {
                refuse(
                    header.request_id,
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "frame version {} on a connection that speaks version {expected_version}",
                        header.version
                    ),
                );
                stop = true;
                break;
            }
            if header.is_response() {
                refuse(
                    header.request_id,
                    ErrorCode::Malformed,
                    "a client sent a response frame".into(),
                );
                stop = true;
                break;
            }
            let request = match Request::decode(header.opcode, body) {
                Ok(request) => request,
                Err(err) => {
                    let code = match err {
                        DecodeError::UnknownOpcode { .. } | DecodeError::WrongDirection { .. } => {
                            ErrorCode::UnknownOpcode
                        }
                        _ => ErrorCode::Malformed,
                    };
                    refuse(header.request_id, code, err.to_string());
                    start += frame_len;
                    consumed = true;
                    continue;
                }
            };
            start += frame_len;
            consumed = true;
            match connection.on_request(request, &shard.directory, &shard.rng) {
                Action::Reply(response) => {
                    if let Response::Error(body) = &response {
                        metrics.connection_error(body.code);
                    }
                    outbox.push((header.request_id, version.get(), response));
                    version.set(connection.version());
                }
                Action::ReplyAndClose(response) => {
                    if let Response::Error(body) = &response {
                        metrics.connection_error(body.code);
                    }
                    outbox.push((header.request_id, version.get(), response));
                    stop = true;
                    break;
                }
                Action::Dispatch { .. }
                    if shard.inflight_total.get() > shard.config.inflight_per_shard =>
                {
                    // Overload: an explicit answer now, rather than an unbounded backlog.
                    refuse(
                        header.request_id,
                        ErrorCode::Busy,
                        format!(
                            "the shard has {} requests in flight (server.inflight_per_shard); \
                             retry with the same request id",
                            shard.config.inflight_per_shard
                        ),
                    );
                }
                Action::Dispatch { client, request } => {
                    let reply = ReplyTo {
                        shard: shard.index,
                        connection: connection_id,
                        request_id: header.request_id,
                    };
                    if let Some((owner, forwarded)) = dispatch(shard, client, request, reply) {
                        forwarder.push(owner, forwarded);
                    }
                }
            }
            // A client with many frames buffered must not hold the shard.
            if glommio::executor().need_preempt() {
                forwarder.flush(shard).await;
                glommio::yield_if_needed().await;
            }
        }
        forwarder.flush(shard).await;
        if stop {
            return true;
        }
        if start == end {
            start = 0;
            end = 0;
            frame_started = None;
            if buf.len() > READ_BUFFER {
                buf = vec![0u8; READ_BUFFER];
            }
        } else if consumed {
            // Whole frames were taken: what is left began arriving with the last read.
            frame_started = Some(Instant::now());
        } else {
            frame_started.get_or_insert_with(Instant::now);
        }
        // A connection must finish its handshake, and a frame that has begun must arrive
        // whole, within their time limits; an authenticated connection with nothing in
        // flight may stay idle for the idle timeout.
        let timeout = if connection.client().is_none() {
            Some(
                handshake_deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            )
        } else {
            // From the frame's first byte, not from the last read: a client trickling
            // bytes does not get to hold a connection open mid-frame.
            match frame_started {
                Some(started) => Some(
                    (started + frame_timeout)
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ),
                // (With answers still due it is not idle: checked when the time is up.)
                None => idle_timeout,
            }
        };
        stream.set_read_timeout(timeout);
        match stream.read(&mut buf[end..]).await {
            Ok(0) => {
                if end > start {
                    inflight.acquire().await;
                    if shard.stopping.get() {
                        refuse(
                            0,
                            ErrorCode::ShuttingDown,
                            "the appliance is shutting down; send the unanswered requests again"
                                .into(),
                        );
                    } else {
                        refuse(
                            0,
                            ErrorCode::Malformed,
                            "the stream ended in the middle of a frame".into(),
                        );
                    }
                    return true;
                }
                return false;
            }
            Ok(n) => end += n,
            Err(err) => {
                if err.kind() == std::io::ErrorKind::TimedOut {
                    if connection.client().is_some() && frame_started.is_none() {
                        if inflight.count.get() > 0 {
                            // Waiting for its answers is not idleness.
                            continue;
                        }
                        // Idle: closed without an error frame (nothing was asked).
                        metrics.add(Counter::ConnectionsIdleClosed, 1);
                        return false;
                    }
                    let what = if connection.client().is_none() {
                        "the handshake did not complete in time"
                    } else {
                        "a frame did not arrive whole in time"
                    };
                    inflight.acquire().await;
                    refuse(0, ErrorCode::Malformed, what.into());
                    return true;
                }
                return false;
            }
        }
    }
}

/// The code and request id of the error frame sent before closing on a bad frame
/// (docs/PROTOCOL.md section 2.4).
fn frame_error_answer(err: &FrameError, input: &[u8]) -> (ErrorCode, u64) {
    let request_id = || {
        input
            .get(8..16)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    match err {
        FrameError::BadMagic { .. } | FrameError::HeaderChecksum { .. } => {
            (ErrorCode::Malformed, 0)
        }
        FrameError::UnsupportedVersion { .. } => (ErrorCode::UnsupportedVersion, request_id()),
        FrameError::BodyTooLarge { .. } => (ErrorCode::FrameTooLarge, request_id()),
        _ => (ErrorCode::Malformed, request_id()),
    }
}

/// Handles an authorized request here if this shard owns its vPSD (or it needs no
/// owner); otherwise returns it with the shard it must go to.
fn dispatch(
    shard: &Rc<Shard>,
    client: Arc<ClientEntry>,
    request: Request,
    reply: ReplyTo,
) -> Option<(u16, Forwarded)> {
    let owner = match &request {
        Request::Stats => {
            let report = shard.metrics.report();
            deliver_local(shard, vec![(reply, Response::Stats { entries: report })]);
            return None;
        }
        // A malformed indicium names no vPSD; any shard can say so.
        Request::Verify { indicium } => Indicium::decode(indicium).map_or(shard.index, |decoded| {
            shard_of(decoded.payload.vpsd_id, shard.shards)
        }),
        other => other
            .vpsd_id()
            .map_or(shard.index, |vpsd_id| shard_of(vpsd_id, shard.shards)),
    };
    if owner != shard.index {
        return Some((
            owner,
            Forwarded {
                client,
                reply,
                request,
            },
        ));
    }
    let result =
        shard
            .core
            .borrow_mut()
            .handle(unix_now(), &client, reply.request_id, request, reply);
    if let Err(fatal) = result {
        fail_stop(&fatal);
    }
    shard.work.notify();
    None
}
