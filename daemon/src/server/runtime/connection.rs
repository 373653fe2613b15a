//! One connection: a reader (frames in, handshake and access control, dispatch to the
//! owning shard) and a writer (answers out, in the order they become ready), with the
//! limits that keep a hostile or slow client from costing others anything: requests in
//! flight, the handshake and frame deadlines, the write timeout, bounded buffers.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use indicia_proto::frame::{FrameDecoder, FRAME_BYTES_MAX, PROTOCOL_VERSION_MIN};
use indicia_proto::message::opcode;
use indicia_proto::{DecodeError, Decoded, ErrorCode, FrameError, Indicium, Request, Response};

use super::{deliver_local, fail_stop, unix_now, Cross, Forwarded, Outgoing, ReplyTo, Shard};
use crate::server::handshake::{Action, ClientEntry, Connection};
use crate::server::local::{Outbox, Signal};
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

/// A connection's byte stream: TCP, or TLS over TCP.
enum Transport {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    /// With TLS, sends close_notify, then closes the socket.
    fn poll_close(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}

/// The stream shared by a connection's reader and writer. Each poll borrows it only for
/// the duration of the poll, so the two never hold it at the same time; with TLS both go
/// through the one rustls connection, whose records therefore stay in order.
#[derive(Clone)]
struct SharedStream(Rc<RefCell<Transport>>);

impl SharedStream {
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)).await
    }

    async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let written =
                poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[written..];
        }
        // TLS may hold encrypted records back when the socket was full: out with them.
        poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)).await
    }

    async fn close(&self) {
        let _ = poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)).await;
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) {
        let _ = self.0.borrow().tcp().set_read_timeout(timeout);
    }
}

/// Requests in flight on one connection: the reader takes one per frame, the writer gives
/// it back when the answer is written.
struct Inflight {
    count: Cell<usize>,
    max: usize,
    changed: Signal,
    /// The shard's count over all its connections.
    shard_total: Rc<Cell<usize>>,
}

impl Inflight {
    async fn acquire(&self) {
        while self.count.get() >= self.max {
            self.changed.wait().await;
        }
        self.count.set(self.count.get() + 1);
        self.shard_total.set(self.shard_total.get() + 1);
    }

    fn release(&self, n: usize) {
        let n = n.min(self.count.get());
        self.count.set(self.count.get() - n);
        self.shard_total
            .set(self.shard_total.get().saturating_sub(n));
        self.changed.notify();
    }

    fn is_full(&self) -> bool {
        self.count.get() >= self.max
    }

    async fn drained(&self) {
        while self.count.get() > 0 {
            self.changed.wait().await;
        }
    }
}

/// One connection: the reader runs here, the writer in its own task.
pub(super) async fn serve(
    shard: Rc<Shard>,
    stream: TcpStream,
    id: u64,
    outbox: Rc<Outbox<Outgoing>>,
    version: Rc<Cell<u8>>,
) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(shard.config.write_timeout_ms)));
    let fd = stream.as_raw_fd();
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    let handshake_deadline =
        Instant::now() + Duration::from_millis(shard.config.handshake_timeout_ms);
    let (transport, connection) = match &shard.tls {
        None => (Transport::Plain(stream), Connection::new()),
        Some(acceptor) => match tls_accept(acceptor, stream, handshake_deadline).await {
            Ok((tls, client_id)) => (
                Transport::Tls(Box::new(tls)),
                Connection::with_certificate(client_id),
            ),
            Err(reason) => {
                // No certificate, one from another issuer, no TLS at all, or too slow:
                // nothing was read, so nothing is answered.
                tracing::debug!(shard = shard.index, "TLS handshake failed: {reason}");
                metrics.add(Counter::TlsFailed, 1);
                shard.connections.borrow_mut().remove(&id);
                outbox.close();
                metrics.sub(Counter::ConnectionsOpen, 1);
                shard.connection_closed.notify();
                return;
            }
        },
    };
    let stream = SharedStream(Rc::new(RefCell::new(transport)));
    let inflight = Rc::new(Inflight {
        count: Cell::new(0),
        max: shard.config.inflight_per_connection,
        changed: Signal::default(),
        shard_total: Rc::clone(&shard.inflight_total),
    });
    let writer = glommio::spawn_local(write_answers(
        stream.clone(),
        fd,
        Rc::clone(&outbox),
        Rc::clone(&inflight),
        Rc::clone(&shard),
    ));
    let cut_off = read_requests(
        &shard,
        &stream,
        &outbox,
        &version,
        &inflight,
        id,
        Handshake {
            connection,
            deadline: handshake_deadline,
        },
    )
    .await;
    // Every request read gets its answer before the connection closes.
    inflight.drained().await;
    shard.connections.borrow_mut().remove(&id);
    outbox.close();
    writer.await;
    if cut_off {
        // Closing with unread input would reset the connection and could destroy the
        // error frame on its way: end our side first, then discard what the client still
        // sends, briefly.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
        stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut sink = [0u8; 4096];
        let mut discarded = 0;
        while discarded < (256 << 10) {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    }
    stream.close().await;
    metrics.sub(Counter::ConnectionsOpen, 1);
    shard.connection_closed.notify();
}

/// The TLS handshake, within the protocol handshake's deadline; the client id its verified
/// certificate names.
async fn tls_accept(
    acceptor: &futures_rustls::TlsAcceptor,
    stream: TcpStream,
    deadline: Instant,
) -> Result<(futures_rustls::server::TlsStream<TcpStream>, String), String> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let accepted = futures_lite::future::or(async { Some(acceptor.accept(stream).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    let tls = match accepted {
        None => return Err("the TLS handshake did not complete in time".into()),
        Some(Err(err)) => return Err(err.to_string()),
        Some(Ok(tls)) => tls,
    };
    let client_id = crate::server::tls::peer_identity(tls.get_ref().1)?;
    Ok((tls, client_id))
}

async fn write_answers(
    stream: SharedStream,
    fd: RawFd,
    outbox: Rc<Outbox<Outgoing>>,
    inflight: Rc<Inflight>,
    shard: Rc<Shard>,
) {
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    // A failed write ends the connection; a write that timed out is counted.
    let failed = |err: std::io::Error| {
        if err.kind() == std::io::ErrorKind::TimedOut {
            metrics.add(Counter::WriteTimeouts, 1);
        }
        true
    };
    /// Answers are encoded into one buffer and written when it holds this much.
    const WRITE_CHUNK: usize = 256 << 10;
    /// Room kept free for the next answer; a larger one grows the buffer as needed.
    const ANSWER_ROOM: usize = 16 << 10;
    let mut buf: Vec<u8> = Vec::new();
    let mut broken = false;
    while let Some(batch) = outbox.take().await {
        let count = batch.len();
        let mut used = 0;
        for (request_id, version, response) in batch {
            if broken {
                continue;
            }
            if buf.len() - used < ANSWER_ROOM {
                buf.resize(used + ANSWER_ROOM, 0);
            }
            let mut encoded = response.encode_frame(version, request_id, &mut buf[used..]);
            if let Err(indicia_proto::EncodeError::BufferTooSmall { .. }) = encoded {
                // A large answer (a batch): room for the largest frame there is.
                buf.resize(used + FRAME_BYTES_MAX, 0);
                encoded = response.encode_frame(version, request_id, &mut buf[used..]);
            }
            match encoded {
                Ok(len) => used += len,
                Err(err) => {
                    // Every answer the appliance makes fits a frame; if one did not, the
                    // client still gets an answer for its request.
                    tracing::error!("cannot encode an answer: {err}");
                    let fallback = Response::error(ErrorCode::Internal, "answer too large");
                    if let Ok(len) = fallback.encode_frame(version, request_id, &mut buf[used..]) {
                        used += len;
                    }
                }
            }
            if used >= WRITE_CHUNK {
                broken = stream
                    .write_all(&buf[..used])
                    .await
                    .err()
                    .is_some_and(failed);
                used = 0;
            }
        }
        if !broken && used > 0 {
            broken = stream
                .write_all(&buf[..used])
                .await
                .err()
                .is_some_and(failed);
        }
        if broken {
            // The client is gone or does not read (write timeout): stop reading it too.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        if buf.len() > WRITE_CHUNK + FRAME_BYTES_MAX {
            // After a burst of large answers, back to a small buffer.
            buf = Vec::new();
        }
        inflight.release(count);
    }
}

/// A connection's protocol handshake state (bound to its TLS certificate, if any) and the
/// time by which the handshake must be complete.
struct Handshake {
    connection: Connection,
    deadline: Instant,
}

async fn read_requests(
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
