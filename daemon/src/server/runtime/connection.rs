//! One connection: its reader ([`super::reader`]) runs in the connection's task, its writer
//! ([`super::writer`]) in a task of its own, with the limits that keep a hostile or slow
//! client from costing others anything: requests in flight, the handshake and frame
//! deadlines, the write timeout, bounded buffers.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::reader::read_requests;
use super::transport::{tls_accept, SharedStream, Transport};
use super::writer::write_answers;
use super::{Outgoing, Shard};
use crate::server::conn_rules::{ConnectionRules, Limits};
use crate::server::handshake::Connection;
use crate::server::local::{Outbox, Signal};
use crate::server::metrics::Counter;

/// Requests in flight on one connection: the reader takes one per frame, the writer gives
/// it back when the answer is written (or, the client gone, given up).
pub(super) struct Inflight {
    count: Cell<usize>,
    max: usize,
    changed: Signal,
    /// The shard's count over all its connections.
    shard_total: Rc<Cell<usize>>,
}

impl Inflight {
    pub(super) fn new(max: usize, shard_total: Rc<Cell<usize>>) -> Self {
        Self {
            count: Cell::new(0),
            max,
            changed: Signal::default(),
            shard_total,
        }
    }

    pub(super) async fn acquire(&self) {
        while self.count.get() >= self.max {
            self.changed.wait().await;
        }
        self.count.set(self.count.get() + 1);
        self.shard_total.set(self.shard_total.get() + 1);
    }

    /// `n` answers were written or given up. Each answers one request taken with
    /// [`Inflight::acquire`]: more would be an answer without a request.
    pub(super) fn release(&self, n: usize) {
        let count = self.count.get();
        let total = self.shard_total.get();
        assert!(
            n <= count,
            "{n} answers released on a connection with {count} requests in flight"
        );
        assert!(
            n <= total,
            "{n} answers released on a shard with {total} requests in flight"
        );
        self.count.set(count - n);
        self.shard_total.set(total - n);
        self.changed.notify();
    }

    /// Whether requests of this connection are unanswered.
    pub(super) fn any(&self) -> bool {
        self.count.get() > 0
    }

    pub(super) fn is_full(&self) -> bool {
        self.count.get() >= self.max
    }

    pub(super) async fn drained(&self) {
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
    let accepted = Instant::now();
    let limits = Limits::of(&shard.config);
    let handshake_deadline = accepted + limits.handshake_timeout;
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
    let inflight = Rc::new(Inflight::new(
        shard.config.inflight_per_connection,
        Rc::clone(&shard.inflight_total),
    ));
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
        ConnectionRules::new(connection, limits, accepted),
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn requests_in_flight_are_bounded_per_connection_and_counted_per_shard() {
        let shard_total = Rc::new(Cell::new(0));
        let one = Inflight::new(2, Rc::clone(&shard_total));
        let other = Inflight::new(2, Rc::clone(&shard_total));
        block_on(async {
            one.acquire().await;
            one.acquire().await;
            other.acquire().await;
        });
        assert!(one.is_full() && one.any());
        assert!(!other.is_full());
        assert_eq!(shard_total.get(), 3);
        // A full connection waits for an answer to be written.
        let mut waiting = Box::pin(one.acquire());
        assert!(block_on(poll_once(&mut waiting)).is_none());
        one.release(1);
        assert!(block_on(poll_once(&mut waiting)).is_some());
        drop(waiting);
        one.release(2);
        assert!(!one.any());
        assert_eq!(shard_total.get(), 1);
        block_on(one.drained());
    }

    #[test]
    #[should_panic(expected = "2 answers released on a connection with 1 requests in flight")]
    fn more_answers_than_requests_is_a_bug_that_stops() {
        let inflight = Inflight::new(4, Rc::new(Cell::new(0)));
        block_on(inflight.acquire());
        inflight.release(2);
    }

    #[test]
    #[should_panic(expected = "1 answers released on a shard with 0 requests in flight")]
    fn a_shard_count_out_of_step_is_a_bug_that_stops() {
        let shard_total = Rc::new(Cell::new(0));
        let inflight = Inflight::new(4, Rc::clone(&shard_total));
        block_on(inflight.acquire());
        shard_total.set(0);
        inflight.release(1);
    }
}
