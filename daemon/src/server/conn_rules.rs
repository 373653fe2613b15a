//! One connection's rules, sans-io: what the appliance does with each frame a client sends
//! and with the connection's clocks, before a request reaches a shard. It wraps the
//! handshake and access control ([`handshake::Connection`]) in the frame-level rules of
//! docs/PROTOCOL.md sections 2.4, 4 and 5.1:
//!
//! - a bad frame (the decoder's typed error) is answered once, then the connection closes:
//!   the stream can no longer be trusted to be aligned on frames;
//! - until `welcome`, a frame is at most [`PRE_AUTH_FRAME_BYTES_MAX`] bytes, announced or
//!   whole, so that nobody unauthenticated gets a large buffer;
//! - `hello` frames carry version 1, every other frame the negotiated version;
//! - a client sends requests, never a response frame;
//! - request id 0 is the appliance's, for errors about the connection: a request that
//!   carries it is refused, and the connection goes on (the stream is still aligned);
//! - a body that does not decode is refused, and the connection goes on;
//! - past the shard's in-flight limit an authorized request is answered `busy`;
//! - the handshake must complete by its deadline, a frame that has begun must arrive whole
//!   within the frame timeout, and an authenticated connection may stay idle so long.
//!
//! The checks on a frame run in one fixed order, the first failing one decides the answer
//! (docs/PROTOCOL.md section 4.2). The runtime feeds this the bytes it has read, the frames
//! they hold and the current time, and does what it answers: nothing here touches a socket
//! or reads a clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use indicia_proto::frame::{Frame, FrameDecoder, HEADER_BYTES, PROTOCOL_VERSION_MIN};
use indicia_proto::message::opcode;
use indicia_proto::{DecodeError, Decoded, ErrorCode, FrameError, Request, Response};

use super::handshake::{self, ClientDirectory, ClientEntry, Connection};
use super::metrics::{Received, RequestKind};
use crate::config::ServerConfig;

/// Largest frame accepted before the handshake is complete, header included: `hello` and
/// `authenticate` are far smaller.
pub const PRE_AUTH_FRAME_BYTES_MAX: usize = 4096;

/// The request id of answers about the connection rather than a request (a bad frame, a
/// time limit): no request may carry it, so that a client can tell the two apart.
pub const REQUEST_ID_RESERVED: u64 = 0;

/// The limits the rules apply, from the `[server]` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub request_body_bytes_max: u32,
    pub inflight_per_shard: usize,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    /// None: an authenticated connection may stay idle for ever.
    pub idle_timeout: Option<Duration>,
}

impl Limits {
    pub fn of(config: &ServerConfig) -> Self {
        Self {
            request_body_bytes_max: config.request_body_bytes_max,
            inflight_per_shard: config.inflight_per_shard,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            frame_timeout: Duration::from_millis(config.frame_timeout_ms),
            idle_timeout: Some(Duration::from_millis(config.idle_timeout_ms))
                .filter(|idle| !idle.is_zero()),
        }
    }
}

/// One frame to send: the request id it answers (0: it is about the connection, not a
/// request) and the answer.
#[derive(Debug)]
pub struct Answer {
    pub request_id: u64,
    pub response: Response,
    /// The request answered, for its latency (None: the answer is about the connection).
    pub request: Option<Received>,
}

impl Answer {
    /// An error about the connection, not a request.
    fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            request_id,
            response: Response::error(code, message),
            request: None,
        }
    }

    /// The answer to a request frame.
    fn to(request: Option<Received>, request_id: u64, response: Response) -> Self {
        Self {
            request_id,
            response,
            request,
        }
    }
}

/// What the front of the bytes read so far holds.
#[derive(Debug)]
pub enum Next<'a> {
    /// At least this many more bytes are needed.
    Incomplete { needed: usize },
    /// A whole frame: hand it to [`ConnectionRules::on_frame`], then drop `frame.len()`
    /// bytes.
    Frame(Frame<'a>),
    /// A bad frame: send this, then close the connection.
    Close(Answer),
}

/// What the runtime must do with a frame.
#[derive(Debug)]
pub enum Action {
    /// Send this answer; the connection goes on.
    Reply(Answer),
    /// Send this answer, then close the connection.
    ReplyAndClose(Answer),
    /// Authorized: run the request on the shard that owns its vPSD.
    Dispatch {
        request_id: u64,
        /// When its frame was complete, for its latency (None: a kind not timed).
        received: Option<Received>,
        client: Arc<ClientEntry>,
        request: Request,
    },
}

/// What a read that timed out means.
#[derive(Debug)]
pub enum Timeout {
    /// Nothing is late: answers are still due, so the connection is not idle. Read again.
    Wait,
    /// Idle past the idle timeout: close without a frame (nothing was asked).
    CloseIdle,
    /// The handshake or a frame is late: send this, then close.
    Close(Answer),
}

/// The version a frame must carry: `hello` frames carry version 1 in every protocol
/// version, so that any two peers can negotiate (docs/PROTOCOL.md section 4.1); every other
/// frame the connection's version.
fn expected_version(frame_opcode: u8, negotiated: u8) -> u8 {
    if frame_opcode == opcode::HELLO {
        PROTOCOL_VERSION_MIN
    } else {
        negotiated
    }
}

/// One connection's frame rules, handshake and clocks.
#[derive(Debug)]
pub struct ConnectionRules {
    connection: Connection,
    limits: Limits,
    handshake_deadline: Instant,
    /// Frames of an authenticated connection.
    decoder: FrameDecoder,
    /// Frames before `welcome`: the body cap that keeps them within
    /// [`PRE_AUTH_FRAME_BYTES_MAX`].
    pre_auth_decoder: FrameDecoder,
    /// When the first byte of the frame now arriving came (None: no partial frame).
    frame_started: Option<Instant>,
}

impl ConnectionRules {
    /// A connection accepted at `accepted`, whose handshake runs in `connection` (bound to a
    /// TLS certificate, or not).
    pub fn new(connection: Connection, limits: Limits, accepted: Instant) -> Self {
        let pre_auth_body_max = (PRE_AUTH_FRAME_BYTES_MAX - HEADER_BYTES) as u32;
        Self {
            connection,
            limits,
            handshake_deadline: accepted + limits.handshake_timeout,
            decoder: FrameDecoder::new(limits.request_body_bytes_max),
            pre_auth_decoder: FrameDecoder::new(
                limits.request_body_bytes_max.min(pre_auth_body_max),
            ),
            frame_started: None,
        }
    }

    /// The version the connection speaks (1 until negotiated): the header version of the
    /// answers sent from now on.
    pub fn version(&self) -> u8 {
        self.connection.version()
    }

    pub fn is_authenticated(&self) -> bool {
        self.connection.client().is_some()
    }

    /// Checked before every turn of the reader, whatever the client keeps sending (requests
    /// before the handshake are refused, but they keep bytes coming): a handshake that has
    /// not completed by its deadline ends the connection.
    pub fn handshake_overdue(&self, now: Instant) -> Option<Answer> {
        (!self.is_authenticated() && now >= self.handshake_deadline).then(|| {
            Answer::error(
                0,
                ErrorCode::Malformed,
                "the handshake did not complete in time",
            )
        })
    }

    /// Looks at the front of the bytes read and not yet taken.
    pub fn next_frame<'a>(&self, input: &'a [u8]) -> Next<'a> {
        let decoder = if self.is_authenticated() {
            &self.decoder
        } else {
            &self.pre_auth_decoder
        };
        match decoder.decode(input) {
            Ok(Decoded::Incomplete { needed }) => Next::Incomplete { needed },
            Ok(Decoded::Frame(frame)) => Next::Frame(frame),
            Err(err) => Next::Close(self.bad_frame(&err)),
        }
    }

    /// The answer to a bad frame (docs/PROTOCOL.md section 2.4), sent before closing.
    fn bad_frame(&self, err: &FrameError) -> Answer {
        let request_id = err.request_id().unwrap_or(0);
        let code = match err {
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::BodyTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Malformed,
        };
        match *err {
            FrameError::BodyTooLarge { len, .. } if !self.is_authenticated() => {
                let len_max = self.decoder.body_bytes_max();
                if len <= len_max {
                    // Within the request cap, over the cap before the handshake.
                    return Answer::error(
                        0,
                        code,
                        format!(
                            "frames before the handshake is complete are at most \
                             {PRE_AUTH_FRAME_BYTES_MAX} bytes"
                        ),
                    );
                }
                // Over the request cap, which is what the client must hear about.
                let err = FrameError::BodyTooLarge {
                    len,
                    len_max,
                    request_id,
                };
                Answer::error(request_id, code, format!("bad frame: {err}"))
            }
            _ => Answer::error(request_id, code, format!("bad frame: {err}")),
        }
    }

    /// A whole frame, in this order: its version, its direction, its request id, its body,
    /// then the handshake and access control, then the shard's in-flight limit. `received`:
    /// when the frame was complete; `shard_inflight` counts the requests the shard's
    /// connections have unanswered, this one included.
    pub fn on_frame(
        &mut self,
        frame: Frame<'_>,
        received: Instant,
        directory: &ClientDirectory,
        rng: &SystemRandom,
        shard_inflight: usize,
    ) -> Action {
        let header = frame.header;
        let request_id = header.request_id;
        // Every request frame gets its answer timed, whatever the answer.
        let timed = RequestKind::of_opcode(header.opcode)
            .filter(|_| !header.is_response())
            .map(|kind| Received { kind, at: received });
        let answer = |response| Answer::to(timed, request_id, response);
        let refuse = |code, message: String| answer(Response::error(code, message));
        let expected = expected_version(header.opcode, self.connection.version());
        if header.version != expected {
            return Action::ReplyAndClose(refuse(
                ErrorCode::UnsupportedVersion,
                format!(
                    "frame version {} on a connection that speaks version {expected}",
                    header.version
                ),
            ));
        }
        if header.is_response() {
            return Action::ReplyAndClose(refuse(
                ErrorCode::Malformed,
                "a client sent a response frame".into(),
            ));
        }
        if request_id == REQUEST_ID_RESERVED {
            return Action::Reply(refuse(
                ErrorCode::Malformed,
                "request id 0 is reserved for errors about the connection; use another".into(),
            ));
        }
        let request = match Request::decode(header.opcode, frame.body) {
            Ok(request) => request,
            Err(err) => {
                let code = match err {
                    DecodeError::UnknownOpcode { .. } | DecodeError::WrongDirection { .. } => {
                        ErrorCode::UnknownOpcode
                    }
                    _ => ErrorCode::Malformed,
                };
                return Action::Reply(refuse(code, err.to_string()));
            }
        };
        match self.connection.on_request(request, directory, rng) {
            handshake::Action::Reply(response) => Action::Reply(answer(response)),
            handshake::Action::ReplyAndClose(response) => Action::ReplyAndClose(answer(response)),
            handshake::Action::Dispatch { .. }
                if shard_inflight > self.limits.inflight_per_shard =>
            {
                // Overload: an explicit answer now, rather than an unbounded backlog.
                Action::Reply(refuse(
                    ErrorCode::Busy,
                    format!(
                        "the shard has {} requests in flight (server.inflight_per_shard); \
                         retry with the same request id",
                        self.limits.inflight_per_shard
                    ),
                ))
            }
            handshake::Action::Dispatch { client, request } => Action::Dispatch {
                request_id,
                received: timed,
                client,
                request,
            },
        }
    }

    /// After the reader took what whole frames the buffer held: `partial` whether bytes of
    /// a next frame are left, `took_frames` whether any frame was taken. The frame timeout
    /// runs from the first byte of a frame.
    pub fn on_buffered(&mut self, now: Instant, partial: bool, took_frames: bool) {
        self.frame_started = match (partial, took_frames) {
            (false, _) => None,
            // What is left began arriving with the last read.
            (true, true) => Some(now),
            (true, false) => Some(self.frame_started.unwrap_or(now)),
        };
    }

    /// How long the next read may wait (None: for ever).
    pub fn read_timeout(&self, now: Instant) -> Option<Duration> {
        let until = |deadline: Instant| {
            Some(
                deadline
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
            )
        };
        if !self.is_authenticated() {
            return until(self.handshake_deadline);
        }
        match self.frame_started {
            // From the frame's first byte, not from the last read: a client trickling
            // bytes does not get to hold a connection open mid-frame.
            Some(started) => until(started + self.limits.frame_timeout),
            // (With answers still due it is not idle: see `on_read_timeout`.)
            None => self.limits.idle_timeout,
        }
    }

    /// A read waited for [`ConnectionRules::read_timeout`]; `answers_due` whether requests
    /// of this connection are still unanswered.
    pub fn on_read_timeout(&self, answers_due: bool) -> Timeout {
        let what = if !self.is_authenticated() {
            "the handshake did not complete in time"
        } else if self.frame_started.is_some() {
            "a frame did not arrive whole in time"
        } else if answers_due {
            // Waiting for its answers is not idleness.
            return Timeout::Wait;
        } else {
            return Timeout::CloseIdle;
        };
        Timeout::Close(Answer::error(0, ErrorCode::Malformed, what))
    }

    /// The client ended its stream: the answer to send before closing, if any. `partial`:
    /// part of a frame had arrived; `shutting_down`: the appliance ended the stream itself,
    /// to stop reading.
    pub fn on_end_of_stream(&self, partial: bool, shutting_down: bool) -> Option<Answer> {
        if !partial {
            return None;
        }
        Some(if shutting_down {
            Answer::error(
                0,
                ErrorCode::ShuttingDown,
                "the appliance is shutting down; send the unanswered requests again",
            )
        } else {
            Answer::error(
                0,
                ErrorCode::Malformed,
                "the stream ended in the middle of a frame",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicia_proto::message::{CLIENT_PROOF_LABEL, NONCE_BYTES};
    use indicia_proto::{ErrorBody, MailingDate, Role, SignItem};
    use zeroize::Zeroizing;

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            request_body_bytes_max: 16_384,
            inflight_per_shard: 100,
            handshake_timeout: 10 * SECOND,
            frame_timeout: 5 * SECOND,
            idle_timeout: Some(300 * SECOND),
        }
    }

    fn directory() -> ClientDirectory {
        let mut directory = ClientDirectory::default();
        directory.insert(ClientEntry::new(
            "station-7",
            Zeroizing::new([7; 32]),
            Role::User,
            [1001],
        ));
        directory
    }

    /// A connection's rules and what the runtime passes them.
    struct Harness {
        rules: ConnectionRules,
        directory: ClientDirectory,
        rng: SystemRandom,
        accepted: Instant,
        shard_inflight: usize,
    }

    impl Harness {
        fn new() -> Self {
            let accepted = Instant::now();
            Self {
                rules: ConnectionRules::new(Connection::new(), limits(), accepted),
                directory: directory(),
                rng: SystemRandom::new(),
                accepted,
                shard_inflight: 1,
            }
        }

        /// The connection after a completed handshake as station-7.
        fn authenticated() -> Self {
            let mut harness = Self::new();
            let hello = encode(&hello_request(), 1, 1);
            let Action::Reply(Answer {
                response:
                    Response::Challenge {
                        version,
                        server_nonce,
                    },
                ..
            }) = harness.feed(&hello)
            else {
                panic!("challenge expected");
            };
            let proof = handshake::proof(
                &[7; 32],
                CLIENT_PROOF_LABEL,
                version,
                "station-7",
                &[1; NONCE_BYTES],
                &server_nonce,
            );
            let action = harness.feed(&encode(&Request::Authenticate { proof }, 1, 2));
            assert!(
                matches!(
                    action,
                    Action::Reply(Answer {
                        response: Response::Welcome { .. },
                        ..
                    })
                ),
                "{action:?}"
            );
            assert!(harness.rules.is_authenticated());
            harness
        }

        /// One whole frame through the rules.
        fn feed(&mut self, bytes: &[u8]) -> Action {
            let frame = match self.rules.next_frame(bytes) {
                Next::Frame(frame) => frame,
                other => panic!("a whole frame expected, got {other:?}"),
            };
            assert_eq!(frame.len(), bytes.len());
            self.rules.on_frame(
                frame,
                self.accepted,
                &self.directory,
                &self.rng,
                self.shard_inflight,
            )
        }

        /// The answer that closes the connection, from whichever step refuses the bytes.
        fn refused_and_closed(&mut self, bytes: &[u8]) -> (u64, ErrorCode) {
            let answer = match self.rules.next_frame(bytes) {
                Next::Close(answer) => answer,
                Next::Frame(frame) => {
                    match self.rules.on_frame(
                        frame,
                        self.accepted,
                        &self.directory,
                        &self.rng,
                        self.shard_inflight,
                    ) {
                        Action::ReplyAndClose(answer) => answer,
                        other => panic!("a refusal that closes expected, got {other:?}"),
                    }
                }
                Next::Incomplete { needed } => panic!("incomplete, {needed} bytes needed"),
            };
            (answer.request_id, code(&answer))
        }
    }

    fn code(answer: &Answer) -> ErrorCode {
        match &answer.response {
            Response::Error(ErrorBody { code, .. }) => *code,
            other => panic!("an error expected, got {other:?}"),
        }
    }

    /// The request id and error code of a refusal that leaves the connection open.
    fn refused(action: &Action) -> (u64, ErrorCode) {
        match action {
            Action::Reply(answer) => (answer.request_id, code(answer)),
            other => panic!("a refusal expected, got {other:?}"),
        }
    }

    fn hello_request() -> Request {
        Request::Hello {
            version_min: 1,
            version_max: 1,
            client_id: "station-7".into(),
            client_nonce: [1; NONCE_BYTES],
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

    fn encode(request: &Request, version: u8, request_id: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let len = request.encode_frame(version, request_id, &mut buf).unwrap();
        buf.truncate(len);
        buf
    }

    /// A frame with any opcode, flags and body.
    fn raw(opcode: u8, flags: u16, request_id: u64, body: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_BYTES + body.len()];
        let len = indicia_proto::frame::encode_frame(&mut buf, 1, opcode, flags, request_id, |w| {
            w.put(body)
        })
        .unwrap();
        buf.truncate(len);
        buf
    }

    /// Changes header bytes and seals the header checksum again.
    fn reseal(mut bytes: Vec<u8>, change: impl FnOnce(&mut [u8])) -> Vec<u8> {
        change(&mut bytes);
        let sum = crc32c::crc32c(&bytes[0..28]);
        bytes[28..32].copy_from_slice(&sum.to_le_bytes());
        bytes
    }

    #[test]
    fn a_header_that_cannot_be_trusted_is_answered_with_request_id_0_and_closes() {
        let mut harness = Harness::authenticated();
        let mut bad_magic = encode(&sign(1001), 1, 9);
        bad_magic[0] = b'X';
        assert_eq!(
            harness.refused_and_closed(&bad_magic),
            (0, ErrorCode::Malformed)
        );
        let mut bad_checksum = encode(&sign(1001), 1, 9);
        bad_checksum[8] ^= 1;
        assert_eq!(
            harness.refused_and_closed(&bad_checksum),
            (0, ErrorCode::Malformed)
        );
    }

    #[test]
    fn a_bad_frame_with_an_intact_header_is_answered_with_its_request_id_and_closes() {
        let mut harness = Harness::authenticated();
        let frame = encode(&sign(1001), 1, 9);
        let version = reseal(frame.clone(), |bytes| bytes[4] = 2);
        assert_eq!(
            harness.refused_and_closed(&version),
            (9, ErrorCode::UnsupportedVersion)
        );
        let reserved = reseal(frame.clone(), |bytes| bytes[25] = 1);
        assert_eq!(
            harness.refused_and_closed(&reserved),
            (9, ErrorCode::Malformed)
        );
        let flags = reseal(frame.clone(), |bytes| bytes[6] = 0x02);
        assert_eq!(
            harness.refused_and_closed(&flags),
            (9, ErrorCode::Malformed)
        );
        let mut body = frame;
        body[HEADER_BYTES] ^= 1;
        assert_eq!(harness.refused_and_closed(&body), (9, ErrorCode::Malformed));
        // Over the request cap: refused from the header alone, before the body arrives.
        let large = raw(opcode::SIGN, 0, 9, &[0; 16_385]);
        assert_eq!(
            harness.refused_and_closed(&large[..HEADER_BYTES]),
            (9, ErrorCode::FrameTooLarge)
        );
    }

    #[test]
    fn a_frame_not_yet_whole_waits_for_exactly_what_is_missing() {
        let harness = Harness::authenticated();
        let frame = encode(&sign(1001), 1, 9);
        assert!(matches!(
            harness.rules.next_frame(&frame[..10]),
            Next::Incomplete { needed: 22 }
        ));
        assert!(matches!(
            harness.rules.next_frame(&frame[..frame.len() - 1]),
            Next::Incomplete { needed: 1 }
        ));
    }

    #[test]
    fn before_welcome_a_frame_is_at_most_4096_bytes_announced_or_whole() {
        let mut harness = Harness::new();
        let at_cap = raw(
            opcode::STATUS,
            0,
            9,
            &[0; PRE_AUTH_FRAME_BYTES_MAX - HEADER_BYTES],
        );
        assert!(matches!(
            harness.rules.next_frame(&at_cap[..HEADER_BYTES]),
            Next::Incomplete { .. }
        ));
        let over = raw(
            opcode::STATUS,
            0,
            9,
            &[0; PRE_AUTH_FRAME_BYTES_MAX - HEADER_BYTES + 1],
        );
        // The header alone, and the whole frame (whose body checksum is not even looked
        // at), are refused alike, with request id 0.
        assert_eq!(
            harness.refused_and_closed(&over[..HEADER_BYTES]),
            (0, ErrorCode::FrameTooLarge)
        );
        let mut corrupt = over.clone();
        corrupt[HEADER_BYTES] ^= 1;
        assert_eq!(
            harness.refused_and_closed(&corrupt),
            (0, ErrorCode::FrameTooLarge)
        );
        // Over the request cap too: that cap is what the client hears about, with its id.
        let large = raw(opcode::STATUS, 0, 9, &[0; 16_385]);
        let Next::Close(answer) = harness.rules.next_frame(&large[..HEADER_BYTES]) else {
            panic!("refused");
        };
        assert_eq!(
            (answer.request_id, code(&answer)),
            (9, ErrorCode::FrameTooLarge)
        );
        assert!(
            matches!(&answer.response, Response::Error(body) if body.message.contains("16384")),
            "{answer:?}"
        );
        // After welcome the same frame is an ordinary one.
        let harness = Harness::authenticated();
        assert!(matches!(
            harness.rules.next_frame(&over[..HEADER_BYTES]),
            Next::Incomplete { .. }
        ));
    }

    #[test]
    fn hello_frames_carry_version_1_and_every_other_frame_the_negotiated_one() {
        assert_eq!(expected_version(opcode::HELLO, 1), 1);
        assert_eq!(expected_version(opcode::HELLO, 2), 1);
        assert_eq!(expected_version(opcode::SIGN, 2), 2);
        assert_eq!(expected_version(opcode::AUTHENTICATE, 2), 2);
        // Version 1 is all there is, so a frame of another version fails the decoder first.
        let mut harness = Harness::new();
        let v2_hello = reseal(encode(&hello_request(), 1, 3), |bytes| bytes[4] = 2);
        assert_eq!(
            harness.refused_and_closed(&v2_hello),
            (3, ErrorCode::UnsupportedVersion)
        );
    }

    #[test]
    fn a_response_frame_from_a_client_is_refused_and_closes() {
        let mut harness = Harness::authenticated();
        let response = raw(opcode::SIGNED, 0x0001, 12, &[]);
        assert_eq!(
            harness.refused_and_closed(&response),
            (12, ErrorCode::Malformed)
        );
        // A request opcode with the response flag: the flag decides.
        let flagged = raw(opcode::STATUS, 0x0001, 13, &[0; 8]);
        assert_eq!(
            harness.refused_and_closed(&flagged),
            (13, ErrorCode::Malformed)
        );
    }

    #[test]
    fn a_body_that_does_not_decode_is_refused_and_the_connection_goes_on() {
        let mut harness = Harness::authenticated();
        let truncated = raw(opcode::STATUS, 0, 31, &[1, 2, 3]);
        assert_eq!(
            refused(&harness.feed(&truncated)),
            (31, ErrorCode::Malformed)
        );
        let unknown = raw(0x7E, 0, 32, &[]);
        assert_eq!(
            refused(&harness.feed(&unknown)),
            (32, ErrorCode::UnknownOpcode)
        );
        let zero = raw(0x00, 0, 33, &[]);
        assert_eq!(
            refused(&harness.feed(&zero)),
            (33, ErrorCode::UnknownOpcode)
        );
        // Still usable: a good request goes through.
        assert!(matches!(
            harness.feed(&encode(&sign(1001), 1, 34)),
            Action::Dispatch { request_id: 34, .. }
        ));
    }

    #[test]
    fn request_id_0_is_refused_whatever_the_request_and_the_connection_goes_on() {
        let mut harness = Harness::new();
        // Not even a hello: the handshake has not begun after it.
        let Action::Reply(answer) = harness.feed(&encode(&hello_request(), 1, 0)) else {
            panic!("refused, and the connection goes on");
        };
        assert_eq!(
            (answer.request_id, code(&answer)),
            (0, ErrorCode::Malformed)
        );
        assert!(
            matches!(&answer.response, Response::Error(body) if body.message.contains("request id 0 is reserved")),
            "{answer:?}"
        );
        assert!(matches!(
            harness.feed(&encode(&hello_request(), 1, 1)),
            Action::Reply(Answer {
                response: Response::Challenge { .. },
                ..
            })
        ));
        let mut harness = Harness::authenticated();
        assert_eq!(
            refused(&harness.feed(&encode(&sign(1001), 1, 0))),
            (0, ErrorCode::Malformed),
            "never dispatched"
        );
        // Before the body: a body that does not decode is refused for its id all the same.
        let truncated = raw(opcode::SIGN, 0, 0, &[1]);
        let Action::Reply(answer) = harness.feed(&truncated) else {
            panic!("refused");
        };
        assert!(
            matches!(&answer.response, Response::Error(body) if body.message.contains("reserved")),
            "{answer:?}"
        );
        // After the direction: a response frame still closes the connection.
        let response = raw(opcode::SIGNED, 0x0001, 0, &[]);
        assert_eq!(
            harness.refused_and_closed(&response),
            (0, ErrorCode::Malformed)
        );
        assert!(matches!(
            harness.feed(&encode(&sign(1001), 1, 1)),
            Action::Dispatch { request_id: 1, .. }
        ));
    }

    #[test]
    fn before_welcome_the_body_is_checked_before_the_handshake_state() {
        let mut harness = Harness::new();
        // A bad body is malformed and an unknown opcode unknown-opcode, not
        // not-authenticated.
        let truncated = raw(opcode::SIGN, 0, 5, &[1]);
        assert_eq!(
            refused(&harness.feed(&truncated)),
            (5, ErrorCode::Malformed)
        );
        let unknown = raw(0x7E, 0, 6, &[]);
        assert_eq!(
            refused(&harness.feed(&unknown)),
            (6, ErrorCode::UnknownOpcode)
        );
        let response_opcode = raw(opcode::SIGNED, 0, 7, &[]);
        assert_eq!(
            refused(&harness.feed(&response_opcode)),
            (7, ErrorCode::UnknownOpcode)
        );
        // A request that decodes: not-authenticated.
        assert_eq!(
            refused(&harness.feed(&encode(&sign(1001), 1, 8))),
            (8, ErrorCode::NotAuthenticated)
        );
        // None of it moved the handshake on: a hello still opens it.
        assert!(matches!(
            harness.feed(&encode(&hello_request(), 1, 9)),
            Action::Reply(Answer {
                response: Response::Challenge { .. },
                ..
            })
        ));
    }

    #[test]
    fn the_handshake_and_access_control_run_on_frames_that_decode() {
        let mut harness = Harness::new();
        let authenticate = encode(&Request::Authenticate { proof: [0; 32] }, 1, 4);
        assert_eq!(
            refused(&harness.feed(&authenticate)),
            (4, ErrorCode::HandshakeOutOfOrder)
        );
        let mut harness = Harness::authenticated();
        assert_eq!(
            refused(&harness.feed(&encode(&hello_request(), 1, 5))),
            (5, ErrorCode::HandshakeOutOfOrder)
        );
        assert_eq!(
            refused(&harness.feed(&encode(&sign(1002), 1, 6))),
            (6, ErrorCode::Forbidden)
        );
        let Action::Dispatch {
            request_id,
            client,
            request,
            ..
        } = harness.feed(&encode(&sign(1001), 1, 7))
        else {
            panic!("dispatch expected");
        };
        assert_eq!((request_id, client.id.as_str()), (7, "station-7"));
        assert_eq!(request, sign(1001));
        // A failed authentication closes the connection.
        let mut harness = Harness::new();
        harness.feed(&encode(&hello_request(), 1, 1));
        let wrong = encode(&Request::Authenticate { proof: [0; 32] }, 1, 2);
        assert_eq!(
            harness.refused_and_closed(&wrong),
            (2, ErrorCode::AuthenticationFailed)
        );
    }

    #[test]
    fn past_the_shards_in_flight_limit_an_authorized_request_is_busy() {
        let mut harness = Harness::authenticated();
        harness.shard_inflight = 100;
        assert!(matches!(
            harness.feed(&encode(&sign(1001), 1, 7)),
            Action::Dispatch { .. }
        ));
        harness.shard_inflight = 101;
        assert_eq!(
            refused(&harness.feed(&encode(&sign(1001), 1, 8))),
            (8, ErrorCode::Busy)
        );
        // Access control comes first: a forbidden request is forbidden, busy or not.
        assert_eq!(
            refused(&harness.feed(&encode(&sign(1002), 1, 9))),
            (9, ErrorCode::Forbidden)
        );
    }

    #[test]
    fn the_handshake_must_complete_by_its_deadline_whatever_arrives_meanwhile() {
        let mut harness = Harness::new();
        let deadline = harness.accepted + limits().handshake_timeout;
        assert!(harness.rules.handshake_overdue(deadline - SECOND).is_none());
        assert_eq!(
            harness.rules.read_timeout(deadline - SECOND),
            Some(SECOND),
            "a read waits until the deadline, no longer"
        );
        // Requests refused meanwhile do not move it.
        harness.feed(&encode(&sign(1001), 1, 8));
        let overdue = harness.rules.handshake_overdue(deadline).unwrap();
        assert_eq!(
            (overdue.request_id, code(&overdue)),
            (0, ErrorCode::Malformed)
        );
        assert!(matches!(
            harness.rules.on_read_timeout(false),
            Timeout::Close(Answer { request_id: 0, .. })
        ));
        let harness = Harness::authenticated();
        assert!(harness
            .rules
            .handshake_overdue(deadline + 100 * SECOND)
            .is_none());
    }

    #[test]
    fn a_frame_that_has_begun_must_arrive_whole_within_the_frame_timeout() {
        let mut harness = Harness::authenticated();
        let now = harness.accepted;
        harness.rules.on_buffered(now, true, false);
        // Later reads that bring more of the same frame do not extend its time.
        harness.rules.on_buffered(now + 3 * SECOND, true, false);
        assert_eq!(
            harness.rules.read_timeout(now + 3 * SECOND),
            Some(2 * SECOND)
        );
        let Timeout::Close(answer) = harness.rules.on_read_timeout(true) else {
            panic!("a late frame closes the connection, answers due or not");
        };
        assert_eq!(
            (answer.request_id, code(&answer)),
            (0, ErrorCode::Malformed)
        );
        // Frames taken and part of the next one left: its time runs from the last read.
        harness.rules.on_buffered(now + 4 * SECOND, true, true);
        assert_eq!(
            harness.rules.read_timeout(now + 4 * SECOND),
            Some(5 * SECOND)
        );
        // Nothing left: no frame is late.
        harness.rules.on_buffered(now + 5 * SECOND, false, true);
        assert_eq!(
            harness.rules.read_timeout(now + 5 * SECOND),
            limits().idle_timeout
        );
    }

    #[test]
    fn an_idle_connection_closes_without_a_frame_unless_answers_are_due() {
        let harness = Harness::authenticated();
        assert!(matches!(harness.rules.on_read_timeout(true), Timeout::Wait));
        assert!(matches!(
            harness.rules.on_read_timeout(false),
            Timeout::CloseIdle
        ));
    }

    #[test]
    fn every_answer_to_a_request_frame_is_timed_from_the_frame_and_no_other() {
        let mut harness = Harness::authenticated();
        let received = Instant::now();
        let mut on_frame = |bytes: &[u8]| {
            let Next::Frame(frame) = harness.rules.next_frame(bytes) else {
                panic!("a frame");
            };
            harness.rules.on_frame(
                frame,
                received,
                &harness.directory,
                &harness.rng,
                harness.shard_inflight,
            )
        };
        let sign_at = Some(Received {
            kind: RequestKind::Sign,
            at: received,
        });
        assert!(matches!(
            on_frame(&encode(&sign(1001), 1, 5)),
            Action::Dispatch { received, .. } if received == sign_at
        ));
        // Refused requests too: forbidden, a bad body, request id 0.
        for bytes in [
            encode(&sign(1002), 1, 6),
            raw(opcode::SIGN, 0, 7, &[1]),
            encode(&sign(1001), 1, 0),
        ] {
            let Action::Reply(answer) = on_frame(&bytes) else {
                panic!("refused");
            };
            assert_eq!(answer.request, sign_at);
        }
        // Not a request: an unknown opcode, a response frame, a bad frame.
        let Action::Reply(unknown) = on_frame(&raw(0x7E, 0, 8, &[])) else {
            panic!("refused");
        };
        assert_eq!(unknown.request, None);
        let Action::ReplyAndClose(response) = on_frame(&raw(opcode::SIGN, 0x0001, 9, &[])) else {
            panic!("refused");
        };
        assert_eq!(response.request, None);
        let mut bad = encode(&sign(1001), 1, 10);
        bad[HEADER_BYTES] ^= 1;
        let Next::Close(bad) = harness.rules.next_frame(&bad) else {
            panic!("a bad frame");
        };
        assert_eq!(bad.request, None);
    }

    #[test]
    fn the_limits_are_the_server_configs() {
        let mut config = ServerConfig::default();
        assert_eq!(
            Limits::of(&config).idle_timeout,
            Some(Duration::from_millis(config.idle_timeout_ms))
        );
        config.idle_timeout_ms = 0;
        let limits = Limits::of(&config);
        assert_eq!(limits.idle_timeout, None, "0: no idle limit");
        assert_eq!(limits.request_body_bytes_max, config.request_body_bytes_max);
        assert_eq!(limits.inflight_per_shard, config.inflight_per_shard);
    }

    #[test]
    fn the_end_of_the_stream_mid_frame_is_answered_before_closing() {
        let harness = Harness::authenticated();
        assert!(harness.rules.on_end_of_stream(false, false).is_none());
        assert!(harness.rules.on_end_of_stream(false, true).is_none());
        let cut = harness.rules.on_end_of_stream(true, false).unwrap();
        assert_eq!((cut.request_id, code(&cut)), (0, ErrorCode::Malformed));
        let stopping = harness.rules.on_end_of_stream(true, true).unwrap();
        assert_eq!(
            (stopping.request_id, code(&stopping)),
            (0, ErrorCode::ShuttingDown)
        );
    }
}
