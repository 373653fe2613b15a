//! A connection's writer: answers out, in the order they become ready, encoded into one
//! buffer and written in large chunks, each within the write timeout.

use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Instant;

use indicia_proto::frame::FRAME_BYTES_MAX;
use indicia_proto::{ErrorCode, Response};

use super::inflight::Inflight;
use super::transport::SharedStream;
use super::{Outgoing, Shard};
use crate::server::local::Outbox;
use crate::server::metrics::{Counter, Received, ShardMetrics};

/// Writes the connection's answers until its outbox closes. Every answer taken is released
/// from the requests in flight, written or not: once a write fails (the client is gone or
/// does not read), the rest are counted as undelivered.
pub(super) async fn write_answers(
    stream: SharedStream,
    fd: RawFd,
    outbox: Rc<Outbox<Outgoing>>,
    inflight: Rc<Inflight>,
    shard: Rc<Shard>,
) {
    /// Answers are encoded into one buffer and written when it holds this much.
    const WRITE_CHUNK: usize = 256 << 10;
    /// Room kept free for the next answer; a larger one grows the buffer as needed.
    const ANSWER_ROOM: usize = 16 << 10;
    let metrics = &shard.metrics.shards[usize::from(shard.index)];
    let mut buf: Vec<u8> = Vec::new();
    // The requests whose answers are in the buffer, for their latency.
    let mut timed: Vec<Received> = Vec::new();
    let mut broken = false;
    while let Some(batch) = outbox.take().await {
        let count = batch.len();
        let mut used = 0;
        // Answers encoded into the buffer and not yet written.
        let mut held = 0;
        let mut undelivered = 0;
        for outgoing in batch {
            if broken {
                undelivered += 1;
                continue;
            }
            if buf.len() - used < ANSWER_ROOM {
                buf.resize(used + ANSWER_ROOM, 0);
            }
            used += encode(&mut buf, used, &outgoing);
            held += 1;
            timed.extend(outgoing.received);
            if used >= WRITE_CHUNK {
                broken = !write_out(&stream, &buf[..used], &mut timed, metrics).await;
                if broken {
                    undelivered += held;
                }
                (used, held) = (0, 0);
            }
        }
        if !broken && used > 0 {
            broken = !write_out(&stream, &buf[..used], &mut timed, metrics).await;
            if broken {
                undelivered += held;
            }
        }
        if broken {
            // The client is gone or does not read (write timeout): stop reading it too.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        if undelivered > 0 {
            super::undelivered(&shard, undelivered, "the connection's write failed");
        }
        if buf.len() > WRITE_CHUNK + FRAME_BYTES_MAX {
            // After a burst of large answers, back to a small buffer.
            buf = Vec::new();
        }
        inflight.release(count);
    }
}

/// Encodes one answer at `buf[at..]` (growing `buf` for a large one); returns its length.
fn encode(buf: &mut Vec<u8>, at: usize, outgoing: &Outgoing) -> usize {
    let Outgoing {
        request_id,
        version,
        ref response,
        ..
    } = *outgoing;
    let mut encoded = response.encode_frame(version, request_id, &mut buf[at..]);
    if let Err(indicia_proto::EncodeError::BufferTooSmall { .. }) = encoded {
        // A large answer (a batch): room for the largest frame there is.
        buf.resize(at + FRAME_BYTES_MAX, 0);
        encoded = response.encode_frame(version, request_id, &mut buf[at..]);
    }
    let err = match encoded {
        Ok(len) => return len,
        Err(err) => err,
    };
    // Every answer the appliance makes fits a frame; if one did not, the client still gets
    // an answer for its request.
    tracing::error!("cannot encode an answer: {err}");
    let fallback = Response::error(ErrorCode::Internal, "answer too large");
    match fallback.encode_frame(version, request_id, &mut buf[at..]) {
        Ok(len) => len,
        // There is room for the largest frame, and this one is small.
        Err(err) => super::fail_stop(&format!(
            "cannot encode the answer to request {request_id}, nor an error in its place: {err}"
        )),
    }
}

/// Writes one buffer of answers, those of the requests in `timed`; false if the connection
/// failed (a write that timed out is counted). A request's latency ends when the buffer
/// that holds its answer is handed to the socket.
async fn write_out(
    stream: &SharedStream,
    bytes: &[u8],
    timed: &mut Vec<Received>,
    metrics: &ShardMetrics,
) -> bool {
    let handed = Instant::now();
    let written = stream.write_all(bytes).await;
    if written.is_ok() {
        metrics.record_answered(handed, timed);
    }
    timed.clear();
    match written {
        Ok(()) => true,
        Err(err) => {
            if err.kind() == std::io::ErrorKind::TimedOut {
                metrics.add(Counter::WriteTimeouts, 1);
            }
            false
        }
    }
}
