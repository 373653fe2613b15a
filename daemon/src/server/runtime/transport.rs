//! A connection's byte stream: plain TCP or TLS over TCP, one type for both, shared by the
//! connection's reader and writer; and the TLS handshake that opens it.

use std::cell::RefCell;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// A connection's byte stream: TCP, or TLS over TCP.
pub(super) enum Transport {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
    /// This appliance's own connection to another one (forwarding), over mutual TLS.
    TlsClient(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
            Self::TlsClient(tls) => tls.get_ref().0,
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
            Self::TlsClient(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
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
            Self::TlsClient(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Self::TlsClient(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
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
            Self::TlsClient(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}

/// The stream shared by a connection's reader and writer. Each poll borrows it only for
/// the duration of the poll, so the two never hold it at the same time; with TLS both go
/// through the one rustls connection, whose records therefore stay in order.
#[derive(Clone)]
pub(super) struct SharedStream(pub(super) Rc<RefCell<Transport>>);

impl SharedStream {
    pub(super) async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)).await
    }

    pub(super) async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
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

    pub(super) async fn close(&self) {
        let _ = poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)).await;
    }

    pub(super) fn set_read_timeout(&self, timeout: Option<Duration>) {
        let _ = self.0.borrow().tcp().set_read_timeout(timeout);
    }
}

/// The TLS handshake, within the protocol handshake's deadline; the client id its verified
/// certificate names.
pub(super) async fn tls_accept(
    acceptor: &futures_rustls::TlsAcceptor,
    stream: TcpStream,
    deadline: Instant,
) -> Result<(futures_rustls::server::TlsStream<TcpStream>, String), crate::server::tls::AcceptError>
{
    let timeout = deadline.saturating_duration_since(Instant::now());
    let accepted = futures_lite::future::or(async { Some(acceptor.accept(stream).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    let tls = match accepted {
        None => return Err(crate::server::tls::AcceptError::Timeout),
        Some(Err(err)) => return Err(crate::server::tls::AcceptError::Handshake(err)),
        Some(Ok(tls)) => tls,
    };
    let client_id = crate::server::tls::peer_identity(tls.get_ref().1)?;
    Ok((tls, client_id))
}
