//! The byte stream to the appliance: TCP, or mutual TLS 1.3 over TCP (rustls on the
//! aws-lc-rs provider).
//!
//! A [`Transport`] splits into a read half and a write half that two threads may use at
//! once (the load generator reads answers on one thread while another sends requests).
//! With TLS both halves share the rustls connection behind a mutex that is held only to
//! encrypt or decrypt, never across a socket read or write: a writer blocked on a full
//! socket never keeps the reader from taking the answers that would unblock it. Only the
//! write half writes to the socket, so TLS records leave in the order rustls made them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::ClientError;

/// How long the TLS handshake may take before [`Transport::tls`] gives up.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a client needs for mutual TLS: the CA that issued the appliance's certificate, this
/// client's certificate and key, and the name the appliance's certificate must carry.
#[derive(Clone)]
pub struct TlsSettings {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// The server name is the host of the address connected to (not a name given): a
    /// connection to another address checks that address's host ([`TlsSettings::for_address`]).
    by_address: bool,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn tls_file_error(what: &str, path: &Path, err: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(format!("{what} {}: {err}", path.display()))
}

/// Every PEM certificate in a file; at least one.
fn pem_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| tls_file_error(what, path, err))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| tls_file_error(what, path, err))?;
    if certs.is_empty() {
        return Err(tls_file_error(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

impl TlsSettings {
    /// Reads the PEM files: `ca` (the appliance's issuer), `certificate` (this client's
    /// chain, leaf first) and `private_key` (owner-readable only). `server_name` is a DNS
    /// name or an IP address in the appliance's certificate.
    pub fn load(
        ca: &Path,
        certificate: &Path,
        private_key: &Path,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        let mut roots = RootCertStore::empty();
        for cert in pem_certificates("CA", ca)? {
            roots
                .add(cert)
                .map_err(|err| tls_file_error("CA", ca, err))?;
        }
        let chain = pem_certificates("certificate", certificate)?;
        let key_text = indicia_files::read_private(private_key)?;
        let key = PrivateKeyDer::from_pem_slice(key_text.as_bytes())
            .map_err(|err| tls_file_error("private key", private_key, err))?;
        Self::new(roots, chain, key, server_name)
    }

    /// From certificates and a key already in memory.
    pub fn new(
        roots: RootCertStore,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|err| ClientError::Tls(format!("server name `{server_name}`: {err}")))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| ClientError::Tls(err.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|err| ClientError::Tls(format!("client certificate and key: {err}")))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
            by_address: false,
        })
    }

    /// These settings with the server name following the address connected to: the host of
    /// whatever address [`TlsSettings::for_address`] is given.
    pub fn named_by_address(mut self) -> Self {
        self.by_address = true;
        self
    }

    /// The settings for a connection to `addr`: the same, with the host of `addr` as the
    /// server name when the name follows the address (one appliance of a cluster reached
    /// through another's placement, each with its own certificate).
    pub fn for_address(&self, addr: &str) -> Result<Self, ClientError> {
        if !self.by_address {
            return Ok(self.clone());
        }
        let host = host_of(addr);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|err| ClientError::Tls(format!("server name `{host}`: {err}")))?;
        Ok(Self {
            server_name,
            ..self.clone()
        })
    }
}

/// The `--tls-*` flags that `indiciactl` and the load generator share do not make a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFlagsError {
    #[error("mutual TLS needs all of --tls-ca, --tls-cert and --tls-key")]
    Incomplete,
    #[error("--tls-server-name needs --tls-ca, --tls-cert and --tls-key")]
    ServerNameAlone,
}

/// The files of mutual TLS named by the `--tls-*` flags, once they are known to make a
/// whole; nothing is read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// The name the appliance's certificate must carry (None: the host of the address).
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// `--tls-ca`, `--tls-cert`, `--tls-key` and `--tls-server-name`: all three files or
    /// none (plaintext), and a server name only with them.
    pub fn from_flags(
        ca: Option<&Path>,
        certificate: Option<&Path>,
        private_key: Option<&Path>,
        server_name: Option<&str>,
    ) -> Result<Option<Self>, TlsFlagsError> {
        match (ca, certificate, private_key) {
            (None, None, None) if server_name.is_some() => Err(TlsFlagsError::ServerNameAlone),
            (None, None, None) => Ok(None),
            (Some(ca), Some(certificate), Some(private_key)) => Ok(Some(Self {
                ca: ca.to_owned(),
                certificate: certificate.to_owned(),
                private_key: private_key.to_owned(),
                server_name: server_name.map(str::to_owned),
            })),
            _ => Err(TlsFlagsError::Incomplete),
        }
    }

    /// Reads the files, for connections to `addr`.
    pub fn load(&self, addr: &str) -> Result<TlsSettings, ClientError> {
        match &self.server_name {
            Some(name) => TlsSettings::load(&self.ca, &self.certificate, &self.private_key, name),
            None => Ok(TlsSettings::load(
                &self.ca,
                &self.certificate,
                &self.private_key,
                &host_of(addr),
            )?
            .named_by_address()),
        }
    }
}

/// The mutual TLS settings of the `--tls-*` flags ([`TlsFiles::from_flags`]), read for
/// connections to `addr`; None for plaintext.
pub fn tls_settings_from(
    ca: Option<&Path>,
    certificate: Option<&Path>,
    private_key: Option<&Path>,
    server_name: Option<&str>,
    addr: &str,
) -> Result<Option<TlsSettings>, ClientError> {
    TlsFiles::from_flags(ca, certificate, private_key, server_name)?
        .map(|files| files.load(addr))
        .transpose()
}

/// After decoding what `buf[*begin..*end]` held: empties the buffer when all of it was read,
/// or moves the unread rest to the front once less than `room` is left after it.
pub fn compact(buf: &mut [u8], begin: &mut usize, end: &mut usize, room: usize) {
    if *begin == *end {
        (*begin, *end) = (0, 0);
    } else if buf.len() - *end < room {
        buf.copy_within(*begin..*end, 0);
        *end -= *begin;
        *begin = 0;
    }
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
pub fn host_of(addr: &str) -> String {
    if let Ok(socket) = addr.parse::<std::net::SocketAddr>() {
        return socket.ip().to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        _ => addr.to_owned(),
    }
}

/// A TLS failure carried through `std::io` (the client turns it into
/// [`ClientError::Tls`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsFailure(pub String);

/// A rustls error as an I/O error that says what happened in words an operator can act on.
fn tls_io_error(err: rustls::Error) -> io::Error {
    use rustls::AlertDescription as Alert;
    let message = match &err {
        rustls::Error::AlertReceived(
            alert @ (Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied),
        ) => format!("the appliance refused this client's TLS certificate ({alert:?})"),
        rustls::Error::InvalidCertificate(reason) => {
            format!("the appliance's TLS certificate is not trusted: {reason:?}")
        }
        other => other.to_string(),
    };
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(message))
}

fn lock(connection: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    connection.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The read half: answers from the appliance.
#[derive(Debug)]
pub struct ReadHalf {
    tcp: TcpStream,
    tls: Option<TlsReader>,
}

#[derive(Debug)]
struct TlsReader {
    connection: Arc<Mutex<ClientConnection>>,
    /// Ciphertext read from the socket and not yet given to rustls.
    pending: Vec<u8>,
    start: usize,
}

/// The write half: requests to the appliance.
#[derive(Debug)]
pub struct WriteHalf {
    tcp: TcpStream,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Records encrypted under the lock, written after it.
    records: Vec<u8>,
}

/// A connection's byte stream, both halves.
#[derive(Debug)]
pub struct Transport {
    reader: ReadHalf,
    writer: WriteHalf,
    peer: SocketAddr,
}

impl Transport {
    /// Connects over TCP and, with `tls`, runs the TLS handshake.
    pub fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        tls: Option<&TlsSettings>,
    ) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(&addr).map_err(|source| ClientError::Connect {
            addr: format!("{addr:?}"),
            source,
        })?;
        match tls {
            None => Self::plain(tcp),
            Some(settings) => Self::tls(tcp, settings),
        }
    }

    /// Like [`Transport::connect`], giving up on TCP's handshake after `timeout` for each
    /// address `addr` resolves to.
    pub fn connect_within(
        addr: &str,
        tls: Option<&TlsSettings>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
        let mut tcp = None;
        for resolved in addr.to_socket_addrs().map_err(connect_error)? {
            match TcpStream::connect_timeout(&resolved, timeout) {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(err) => last = err,
            }
        }
        let tcp = tcp.ok_or_else(|| connect_error(last))?;
        match tls {
            None => Self::plain(tcp),
            Some(settings) => Self::tls(tcp, settings),
        }
    }

    pub fn plain(tcp: TcpStream) -> Result<Self, ClientError> {
        tcp.set_nodelay(true)?;
        let peer = tcp.peer_addr()?;
        Ok(Self {
            reader: ReadHalf {
                tcp: tcp.try_clone()?,
                tls: None,
            },
            writer: WriteHalf {
                tcp,
                tls: None,
                records: Vec::new(),
            },
            peer,
        })
    }

    /// Runs the TLS handshake on an open TCP stream. A client certificate the appliance
    /// refuses shows at the first read (TLS 1.3 checks it after the client's side of the
    /// handshake is done).
    pub fn tls(mut tcp: TcpStream, settings: &TlsSettings) -> Result<Self, ClientError> {
        tcp.set_nodelay(true)?;
        let peer = tcp.peer_addr()?;
        let mut connection =
            ClientConnection::new(Arc::clone(&settings.config), settings.server_name.clone())
                .map_err(|err| ClientError::Tls(err.to_string()))?;
        // A peer that never answers must not hold the handshake forever; the caller sets
        // its own timeouts afterwards (`set_timeout`).
        tcp.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
        tcp.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT))?;
        while connection.is_handshaking() {
            connection.complete_io(&mut tcp).map_err(|err| {
                let message = err
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .map_or_else(
                        || format!("handshake: {err}"),
                        |tls| tls_io_error(tls.clone()).to_string(),
                    );
                ClientError::Tls(message)
            })?;
        }
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        let connection = Arc::new(Mutex::new(connection));
        Ok(Self {
            reader: ReadHalf {
                tcp: tcp.try_clone()?,
                tls: Some(TlsReader {
                    connection: Arc::clone(&connection),
                    pending: Vec::new(),
                    start: 0,
                }),
            },
            writer: WriteHalf {
                tcp,
                tls: Some(connection),
                records: Vec::new(),
            },
            peer,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.writer.tls.is_some()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Bounds how long a read or a write may block (None: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.tcp.set_read_timeout(timeout)?;
        self.writer.tcp.set_write_timeout(timeout)
    }

    /// The two halves, for a reader thread and a writer thread.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        (self.reader, self.writer)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl ReadHalf {
    /// Bounds how long a read may block (None: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }
}

impl Read for ReadHalf {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.tcp.read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut connection = lock(&tls.connection);
                // Give rustls what it will take, then hand out what it decrypted.
                while tls.start < tls.pending.len() && connection.wants_read() {
                    let taken = connection.read_tls(&mut &tls.pending[tls.start..])?;
                    tls.start += taken;
                    connection.process_new_packets().map_err(tls_io_error)?;
                    if taken == 0 {
                        break;
                    }
                }
                match connection.reader().read(buf) {
                    // 0: the appliance closed the TLS session (close_notify).
                    Ok(n) => return Ok(n),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
                if tls.start < tls.pending.len() {
                    // Undelivered ciphertext and no plaintext yet: feed more.
                    continue;
                }
            }
            tls.pending.clear();
            tls.start = 0;
            tls.pending.resize(32 << 10, 0);
            let read = match self.tcp.read(&mut tls.pending) {
                Ok(read) => read,
                Err(err) => {
                    tls.pending.clear();
                    return Err(err);
                }
            };
            tls.pending.truncate(read);
            if read == 0 {
                // End of the socket: rustls decides whether the session ended cleanly
                // (close_notify seen: Ok(0)) or was cut (UnexpectedEof).
                let mut connection = lock(&tls.connection);
                connection.read_tls(&mut io::empty())?;
                connection.process_new_packets().map_err(tls_io_error)?;
                return match connection.reader().read(buf) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    other => other,
                };
            }
        }
    }
}

impl WriteHalf {
    /// Moves the records rustls has ready (under the lock) to the socket (after it).
    fn send_records(&mut self) -> io::Result<()> {
        let Some(connection) = &self.tls else {
            return Ok(());
        };
        self.records.clear();
        {
            let mut connection = lock(connection);
            while connection.wants_write() {
                connection.write_tls(&mut self.records)?;
            }
        }
        self.tcp.write_all(&self.records)
    }
}

impl WriteHalf {
    /// Bounds how long a write may block (None: forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(timeout)
    }

    /// Shuts the socket down both ways: a read blocked on the other half returns.
    pub fn shutdown(&self) {
        // Already shut down or reset: nothing more to do.
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

impl Write for WriteHalf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(connection) = &self.tls else {
            return self.tcp.write(buf);
        };
        let taken = lock(connection).writer().write(buf)?;
        self.send_records()?;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_records()?;
        self.tcp.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_server_name_defaults_to_the_host_of_the_address() {
        assert_eq!(host_of("127.0.0.1:7450"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7450"), "::1");
        assert_eq!(host_of("indicia.example:7450"), "indicia.example");
        assert_eq!(host_of("indicia.example"), "indicia.example");
    }

    #[test]
    fn the_tls_flags_are_all_or_none() {
        let file = Some(Path::new("x.pem"));
        let flags = |ca, cert, key, name| tls_settings_from(ca, cert, key, name, "127.0.0.1:1");
        assert!(matches!(flags(None, None, None, None), Ok(None)));
        assert!(matches!(
            flags(file, None, file, None),
            Err(ClientError::TlsFlags(TlsFlagsError::Incomplete))
        ));
        assert!(matches!(
            flags(None, None, None, Some("indicia.example")),
            Err(ClientError::TlsFlags(TlsFlagsError::ServerNameAlone))
        ));
    }
}
