//! A connection's writer: answers out, in the order they become ready, encoded into one
//! buffer and written in large chunks, each within the write timeout.

use std::os::fd::RawFd;
use std::rc::Rc;

use indicia_proto::frame::FRAME_BYTES_MAX;
use indicia_proto::{ErrorCode, Response};

use super::connection::Inflight;
use super::transport::SharedStream;
use super::{Outgoing, Shard};
use crate::server::local::Outbox;
use crate::server::metrics::Counter;

pub(super) async fn write_answers(
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
