//! One connection: its reader ([`super::reader`]) runs in the connection's task, its writer
//! ([`super::writer`]) in a task of its own, with the limits that keep a hostile or slow
//! client from costing others anything: requests in flight, the handshake and frame
//! deadlines, the write timeout, bounded buffers.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

use super::inflight::Inflight;
use super::reader::read_requests;
use super::transport::{tls_accept, SharedStream, Transport};
use super::writer::write_answers;
use super::{Outgoing, Shard};
use crate::server::conn_rules::{ConnectionRules, Limits};
use crate::server::handshake::Connection;
use crate::server::local::Outbox;
use crate::server::metrics::Counter;

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
