//! Mutual TLS between nodes, and the tonic glue for it.
//!
//! - Every config is built on the ring provider explicitly, so nothing depends
//!   on a process-wide default provider.
//! - A node's certificate lives in a [`ReloadableIdentity`] that both server
//!   and client configs read on every handshake: renewing the certificate is
//!   a [`ReloadableIdentity::set`], no restart and no new configs.
//! - Servers ask for client certificates but do not require them (a joining
//!   node has none yet); handlers decide with [`peer_identity`].
//! - Only TLS 1.3 is offered: both ends are always mesh.
//! - Session resumption is off on both sides: a resumed session carries the
//!   certificate of the original handshake, so after a renewal or a role
//!   change the peer would still see the old identity.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::{FutureExt, future::BoxFuture};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::{self, NodeIdentity};

pub use crate::trust::{ManagerCheck, TrustedManagers, member_client_config};

/// The DNS SAN every manager certificate carries. Clients dial managers by IP
/// but verify this name, so any manager of the cluster is acceptable and a
/// worker certificate is not.
pub const MANAGER_SERVER_NAME: &str = "mesh-manager";

/// A TLS handshake that has not finished by then is dropped, so half-open or
/// stalled clients cannot pile up on a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many server-side handshakes run at once; beyond that,
/// accepting waits (the kernel backlog absorbs the rest).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// After a failed `accept` (e.g. out of file descriptors), wait this long
/// before trying again instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What can go wrong setting up TLS or reaching a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in the PEM (expected a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate,
    #[error("invalid certificate PEM: {0}")]
    Certificate(String),
    #[error("invalid private key PEM (expected a -----BEGIN PRIVATE KEY----- block): {0}")]
    Key(String),
    #[error(
        "the private key does not belong to the certificate (were the key and certificate of different nodes mixed up?)"
    )]
    KeyMismatch,
    #[error("invalid cluster CA certificate: {0}")]
    CaCertificate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error("invalid address {addr:?}: expected IP:PORT or HOST:PORT")]
    InvalidAddress { addr: String },
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    #[error("cannot reach {peer} at {addr}: {}", describe_io(.cause))]
    Unreachable {
        peer: String,
        addr: String,
        cause: io::Error,
    },
    #[error("timed out after {after:?} connecting to {peer} at {addr}")]
    Timeout {
        peer: String,
        addr: String,
        after: Duration,
    },
    #[error("TLS handshake with {peer} at {addr} failed: {}", describe_tls(.cause))]
    Handshake {
        peer: String,
        addr: String,
        cause: io::Error,
    },
    #[error("cannot open a gRPC connection to {peer} at {addr}: {}", chain(.cause))]
    Transport {
        peer: String,
        addr: String,
        cause: tonic::transport::Error,
    },
}

/// This node's certificate and key, swappable while connections are served.
///
/// Clones share the same slot, so the copy handed to a server or client
/// config sees every later [`set`](Self::set).
#[derive(Clone)]
pub struct ReloadableIdentity {
    inner: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl ReloadableIdentity {
    /// Loads a certificate chain (leaf first) and its private key.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(ReloadableIdentity {
            inner: Arc::new(RwLock::new(Arc::new(certified_key(cert_pem, key_pem)?))),
        })
    }

    /// Replaces certificate and key; new handshakes use them, established
    /// connections keep theirs. On error the old identity stays in place.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    /// The certificate and key in use now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Who the current certificate says this node is (e.g. to decide when to
    /// renew, or whether the role changed).
    pub fn identity(&self) -> Result<NodeIdentity, pki::PkiError> {
        let key = self.current();
        let leaf = key.cert.first().ok_or(pki::PkiError::NoPemCertificate)?;
        pki::identity_from_der(leaf)
    }
}

impl fmt::Debug for ReloadableIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self
            .identity()
            .map(|id| format!("{} ({})", id.node_id, id.role))
            .unwrap_or_else(|_| "<not a node certificate>".to_owned());
        f.debug_struct("ReloadableIdentity")
            .field("certificate", &shown)
            .finish()
    }
}

impl rustls::server::ResolvesServerCert for ReloadableIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Always offers the certificate: servers only trust the cluster CA anyway,
/// and an unsolicited certificate is harmless.
impl rustls::client::ResolvesClientCert for ReloadableIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: presents `id`, verifies client certificates against the
/// cluster CA when offered, but lets clients without one in (joining nodes);
/// ALPN `h2` for gRPC.
pub fn server_config(ca_pem: &str, id: ReloadableIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(id));
    // No resumption: every handshake must show the current certificates.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Client side: trusts only the cluster CA, presents `id` if given; ALPN
/// `h2` for gRPC.
pub fn client_config(
    ca_pem: &str,
    id: Option<ReloadableIdentity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match id {
        Some(id) => builder.with_client_cert_resolver(Arc::new(id)),
        None => builder.with_no_client_auth(),
    };
    // No resumption: every handshake must show the current certificates.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client config that accepts ANY server certificate.
///
/// Only for the first step of joining: fetching the CA certificate from a
/// manager before anything can be trusted. The caller must accept that CA
/// only if its SHA-256 matches the digest in the join token
/// ([`crate::token::JoinToken::matches_ca`]), then reconnect with
/// [`client_config`]. Never send secrets over a connection made with this.
pub fn unverified_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyServerCert {
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13]);
    let mut config = builder
        // ring always offers TLS 1.3 cipher suites, so this cannot fail.
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A lazy gRPC channel to `addr` ("IP:PORT" or "HOST:PORT") over TLS,
/// verifying the server as `server_name`. Nothing is dialled until the first
/// call; the channel reconnects by itself after failures.
pub fn channel(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout)?;
    Ok(endpoint.connect_with_connector_lazy(dialer.into_service(None)))
}

/// Like [`channel`] but connects now, so a wrong address, an unreachable
/// peer or a certificate problem is reported here with the address in it.
pub async fn connect(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout)?;
    let first = dialer.dial().await?;
    let (peer, addr) = (dialer.peer.clone(), dialer.addr.to_string());
    endpoint
        .connect_with_connector(dialer.into_service(Some(first)))
        .await
        .map_err(|cause| TlsError::Transport { peer, addr, cause })
}

/// Connects now over one TLS connection and never redials, returning the
/// channel and that connection's join exporter: a proof derived from it
/// must travel on the very connection it was derived for.
pub async fn connect_bound(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<(Channel, [u8; 32]), TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout)?;
    let first = dialer.dial().await?;
    let exporter = first
        .inner()
        .get_ref()
        .1
        .export_keying_material([0u8; 32], JOIN_EXPORTER_LABEL, None)
        .map_err(|e| TlsError::Config(format!("no TLS exporter: {e}")))?;
    let (peer, addr) = (dialer.peer.clone(), dialer.addr.to_string());
    let first = Arc::new(Mutex::new(Some(first)));
    let once = tower::service_fn(move |_uri: Uri| {
        let io = first.lock().unwrap_or_else(PoisonError::into_inner).take();
        let (peer, addr) = (dialer.peer.clone(), dialer.addr.to_string());
        async move {
            io.ok_or_else(|| TlsError::Unreachable {
                peer,
                addr,
                cause: io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the connection a join is bound to was lost",
                ),
            })
        }
        .boxed()
    });
    let channel = endpoint
        .connect_with_connector(once)
        .await
        .map_err(|cause| TlsError::Transport { peer, addr, cause })?;
    Ok((channel, exporter))
}

fn prepare(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<(Endpoint, Dialer), TlsError> {
    let invalid = || TlsError::InvalidAddress {
        addr: addr.to_owned(),
    };
    if addr.is_empty() || addr.contains('/') {
        return Err(invalid());
    }
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|_| invalid())?;
    if endpoint.uri().port_u16().is_none() {
        return Err(invalid());
    }
    let name = ServerName::try_from(server_name)
        .map_err(|_| TlsError::InvalidServerName(server_name.to_owned()))?;
    let dialer = Dialer {
        addr: addr.into(),
        peer: peer_label(server_name).to_owned(),
        name,
        connector: TlsConnector::from(config),
        timeout: connect_timeout,
    };
    Ok((endpoint, dialer))
}

/// How a channel (re)connects: TCP (no Nagle: gRPC messages are small and
/// latency-bound), then the TLS handshake, both under one timeout.
#[derive(Clone)]
struct Dialer {
    addr: Arc<str>,
    peer: String,
    name: ServerName<'static>,
    connector: TlsConnector,
    timeout: Duration,
}

type ClientIo = TokioIo<client::TlsStream<TcpStream>>;

impl Dialer {
    async fn dial(&self) -> Result<ClientIo, TlsError> {
        let attempt = async {
            let tcp =
                TcpStream::connect(&*self.addr)
                    .await
                    .map_err(|cause| TlsError::Unreachable {
                        peer: self.peer.clone(),
                        addr: self.addr.to_string(),
                        cause,
                    })?;
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(addr = %self.addr, error = %e, "cannot set TCP_NODELAY");
            }
            self.connector
                .connect(self.name.clone(), tcp)
                .await
                .map_err(|cause| TlsError::Handshake {
                    peer: self.peer.clone(),
                    addr: self.addr.to_string(),
                    cause,
                })
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(tls) => Ok(TokioIo::new(tls?)),
            Err(_) => Err(TlsError::Timeout {
                peer: self.peer.clone(),
                addr: self.addr.to_string(),
                after: self.timeout,
            }),
        }
    }

    /// A tower service for tonic; `first` (from an eager connect) is handed
    /// out once before dialling anew.
    fn into_service(
        self,
        first: Option<ClientIo>,
    ) -> impl tower::Service<
        Uri,
        Response = ClientIo,
        Error = TlsError,
        Future = BoxFuture<'static, Result<ClientIo, TlsError>>,
    > + Clone
    + Send
    + 'static {
        let first = Arc::new(Mutex::new(first));
        tower::service_fn(move |_uri: Uri| {
            let dialer = self.clone();
            let ready = first.lock().unwrap_or_else(PoisonError::into_inner).take();
            async move {
                match ready {
                    Some(io) => Ok(io),
                    None => dialer.dial().await,
                }
            }
            .boxed()
        })
    }
}

/// TLS connections accepted on `listener`, for
/// `tonic::transport::Server::serve_with_incoming`.
///
/// Handshakes run concurrently (up to a limit, each under
/// [`HANDSHAKE_TIMEOUT`]) so a slow client does not hold up others. Failed
/// handshakes and accept errors are logged at debug level and skipped; the
/// stream never ends and never yields an error. Dropping it closes the
/// listener and abandons handshakes in progress. Must be polled inside a
/// tokio runtime.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<ServerIo, io::Error>> + Send + 'static {
    Incoming {
        listener,
        acceptor: TlsAcceptor::from(config),
        handshakes: FuturesUnordered::new(),
        backoff: None,
    }
}

struct Incoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: FuturesUnordered<BoxFuture<'static, Option<ServerIo>>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Incoming {
    /// Starts handshakes for every connection the kernel has ready.
    fn accept_ready(&mut self, cx: &mut Context<'_>) {
        while self.handshakes.len() < MAX_PENDING_HANDSHAKES {
            if let Some(backoff) = &mut self.backoff {
                if backoff.as_mut().poll(cx).is_pending() {
                    return;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return,
                Poll::Ready(Ok((tcp, peer))) => {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let accept = self.acceptor.accept(tcp);
                    self.handshakes.push(
                        async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                                Ok(Ok(tls)) => Some(ServerIo::new(tls, peer)),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    None
                                }
                            }
                        }
                        .boxed(),
                    );
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "accepting a TCP connection failed");
                    self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
            }
        }
    }
}

impl Stream for Incoming {
    type Item = Result<ServerIo, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            this.accept_ready(cx);
            match this.handshakes.poll_next_unpin(cx) {
                Poll::Ready(Some(Some(tls))) => return Poll::Ready(Some(Ok(tls))),
                // A failed handshake frees a slot: accept again, then re-poll.
                Poll::Ready(Some(None)) => continue,
                // Empty set: the listener (or backoff) has registered the waker.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Label of the TLS exporter both ends of a join derive their proofs from
/// (RFC 8446 section 7.5): the proofs are bound to this one connection, so
/// nobody can relay them over another.
pub const JOIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-mesh-join";

/// What a server knows of a connection: where it comes from, the client's
/// verified certificate chain, and the connection's join exporter.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    pub exporter: Option<[u8; 32]>,
}

/// A server-side TLS connection with what handlers need to know of it
/// (tonic hands [`PeerInfo`] to every request on it).
pub struct ServerIo {
    inner: server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl ServerIo {
    fn new(inner: server::TlsStream<TcpStream>, remote: SocketAddr) -> Self {
        let conn = inner.get_ref().1;
        let certs = conn
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect()));
        let exporter = conn
            .export_keying_material([0u8; 32], JOIN_EXPORTER_LABEL, None)
            .ok();
        ServerIo {
            inner,
            info: PeerInfo {
                remote: Some(remote),
                certs,
                exporter,
            },
        }
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl tokio::io::AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection facts of the request, when it came through [`incoming`].
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// The identity in the client certificate of the connection `req` came in
/// on, if the client presented one (the TLS layer has already verified it
/// against the cluster CA). `None` for unauthenticated clients.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<NodeIdentity> {
    let certs = peer_info(req)?.certs.as_ref()?;
    let leaf = certs.first()?;
    pki::identity_from_der(leaf).ok()
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::CaCertificate(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| TlsError::CaCertificate(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::CaCertificate(
            "no -----BEGIN CERTIFICATE----- block found".to_owned(),
        ));
    }
    Ok(Arc::new(roots))
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).map_err(|e| {
        match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::Key(other.to_string()),
        }
    })
}

/// Names the peer in errors: "manager" reads better than "mesh-manager".
fn peer_label(server_name: &str) -> &str {
    server_name.strip_prefix("mesh-").unwrap_or(server_name)
}

/// An error with its causes ("transport error" alone says nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Short, lowercase reasons for the usual connect failures.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused (is mesh running there?)".into(),
        io::ErrorKind::TimedOut => "connection timed out".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

/// Adds what to do about the certificate errors a user can cause.
fn describe_tls(e: &io::Error) -> String {
    let hint = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            " (its certificate is not from this cluster's CA: wrong address, or a node of another cluster?)"
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            ..
        })) => " (it is not a manager of this cluster)",
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => " (its certificate has expired: check both clocks)",
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => " (its certificate is not valid yet: check both clocks)",
        _ => "",
    };
    format!("{e}{hint}")
}

/// See [`unverified_client_config`]: checks handshake signatures (so the
/// server holds the key of the certificate it shows) but trusts any
/// certificate.
#[derive(Debug)]
struct AcceptAnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertAuthority, Role};
    use mesh_proto::RaftBytes;
    use mesh_proto::raft_client::RaftClient;
    use mesh_proto::raft_server::{Raft, RaftServer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CLUSTER: &str = "c1uster000000000000000000";
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    const WAIT: Duration = Duration::from_secs(5);

    fn install_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// A signed node: its ID, identity, and the PEMs behind it.
    struct Node {
        id: String,
        identity: ReloadableIdentity,
        cert_pem: String,
        key_pem: String,
    }

    fn node(ca: &CertAuthority, role: Role) -> Node {
        let id = crate::id::new_id();
        let (key_pem, csr) = pki::new_key_and_csr().expect("CSR");
        let cert_pem = ca.sign_node(&csr, &id, role, CLUSTER, DAY).expect("signs");
        let identity = ReloadableIdentity::new(&cert_pem, &key_pem).expect("identity");
        Node {
            id,
            identity,
            cert_pem,
            key_pem,
        }
    }

    fn leaf_id(certs: Option<&[CertificateDer<'static>]>) -> Option<String> {
        let leaf = certs?.first()?;
        Some(pki::identity_from_der(leaf).expect("node cert").node_id)
    }

    /// What each side saw of one handshake on loopback: the peer's node ID
    /// (None = no certificate), or the error text.
    struct Outcome {
        server: Result<Option<String>, String>,
        client: Result<Option<String>, String>,
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &'static str,
    ) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let seen = leaf_id(tls.get_ref().1.peer_certificates());
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(seen)
        });
        let client_side = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from(name).expect("name");
            let mut tls = TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let seen = leaf_id(tls.get_ref().1.peer_certificates());
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok(seen)
        };
        let client = tokio::time::timeout(WAIT, client_side)
            .await
            .expect("client side finishes");
        let server = tokio::time::timeout(WAIT, server_side)
            .await
            .expect("server side finishes")
            .expect("server task");
        Outcome { server, client }
    }

    #[tokio::test]
    async fn mutual_tls_with_and_without_client_certificate() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let manager = node(&ca, Role::Manager);
        let worker = node(&ca, Role::Worker);
        let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");

        let with = client_config(&ca.cert_pem, Some(worker.identity.clone())).expect("client");
        let out = handshake(server.clone(), with, MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(manager.id.clone())));
        assert_eq!(out.server, Ok(Some(worker.id.clone())));

        let without = client_config(&ca.cert_pem, None).expect("client");
        let out = handshake(server, without, MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(manager.id)));
        assert_eq!(
            out.server,
            Ok(None),
            "a joining node gets in without a certificate"
        );
    }

    #[tokio::test]
    async fn set_swaps_the_certificate_for_new_handshakes() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let first = node(&ca, Role::Manager);
        let second = node(&ca, Role::Manager);
        let client_node = node(&ca, Role::Worker);
        let renewed = node(&ca, Role::Manager);

        let server = server_config(&ca.cert_pem, first.identity.clone()).expect("server");
        let client = client_config(&ca.cert_pem, Some(client_node.identity.clone())).expect("c");
        let out = handshake(server.clone(), client.clone(), MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(first.id.clone())));

        first
            .identity
            .set(&second.cert_pem, &second.key_pem)
            .expect("set");
        client_node
            .identity
            .set(&renewed.cert_pem, &renewed.key_pem)
            .expect("set");
        let out = handshake(server, client, MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(second.id.clone())));
        assert_eq!(out.server, Ok(Some(renewed.id)));
        assert_eq!(first.identity.identity().expect("id").node_id, second.id);
    }

    #[test]
    fn set_rejects_bad_input_and_keeps_the_old_identity() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let a = node(&ca, Role::Worker);
        let b = node(&ca, Role::Worker);
        assert!(matches!(
            a.identity.set(&a.cert_pem, &b.key_pem),
            Err(TlsError::KeyMismatch)
        ));
        assert!(matches!(
            a.identity.set("", &a.key_pem),
            Err(TlsError::NoCertificate)
        ));
        assert!(matches!(
            a.identity.set(&a.cert_pem, "nope"),
            Err(TlsError::Key(_))
        ));
        assert_eq!(a.identity.identity().expect("id").node_id, a.id);
        assert!(matches!(
            server_config("nope", a.identity.clone()),
            Err(TlsError::CaCertificate(_))
        ));
    }

    #[tokio::test]
    async fn certificates_from_another_ca_are_rejected() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let other = CertAuthority::generate("other").expect("CA");
        let manager = node(&ca, Role::Manager);
        let foreign = node(&other, Role::Manager);

        // A server with a foreign certificate.
        let server = server_config(&other.cert_pem, foreign.identity.clone()).expect("server");
        let client = client_config(&ca.cert_pem, None).expect("client");
        let out = handshake(server, client, MANAGER_SERVER_NAME).await;
        let err = out.client.expect_err("client must reject the server");
        assert!(err.contains("UnknownIssuer"), "{err}");

        // A client with a foreign certificate.
        let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");
        let client = client_config(&ca.cert_pem, Some(foreign.identity)).expect("client");
        let out = handshake(server, client, MANAGER_SERVER_NAME).await;
        let err = out.server.expect_err("server must reject the client");
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(out.client.is_err(), "the client learns it was rejected");
    }

    #[tokio::test]
    async fn a_worker_certificate_does_not_pass_as_a_manager() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let worker = node(&ca, Role::Worker);
        let server = server_config(&ca.cert_pem, worker.identity).expect("server");
        let client = client_config(&ca.cert_pem, None).expect("client");
        let out = handshake(server, client, MANAGER_SERVER_NAME).await;
        let err = out.client.expect_err("worker is not mesh-manager");
        assert!(err.contains("not valid for name"), "{err}");
    }

    #[tokio::test]
    async fn members_accept_only_current_managers_with_their_recorded_key() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let manager = node(&ca, Role::Manager);
        let client = node(&ca, Role::Worker);
        let fp = manager.identity.identity().expect("id").key_fingerprint;
        let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");
        let trusted = TrustedManagers::default();
        let config = member_client_config(
            &ca.cert_pem,
            client.identity.clone(),
            Arc::new(trusted.clone()),
        )
        .expect("client");

        // CA-signed, right name, but not a manager the cluster lists.
        let out = handshake(server.clone(), config.clone(), MANAGER_SERVER_NAME).await;
        let err = out.client.expect_err("unknown manager");
        assert!(err.contains("not a current manager"), "{err}");

        // Listed, but for another key (a certificate signed for its ID).
        trusted.set([(manager.id.clone(), "0".repeat(64))].into());
        let out = handshake(server.clone(), config.clone(), MANAGER_SERVER_NAME).await;
        let err = out.client.expect_err("other key");
        assert!(err.contains("another key"), "{err}");

        trusted.set([(manager.id.clone(), fp)].into());
        let out = handshake(server, config, MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(manager.id)));
    }

    #[tokio::test]
    async fn unverified_client_accepts_any_server() {
        install_provider();
        let other = CertAuthority::generate("other").expect("CA");
        let foreign = node(&other, Role::Worker);
        let server = server_config(&other.cert_pem, foreign.identity).expect("server");
        let out = handshake(server, unverified_client_config(), MANAGER_SERVER_NAME).await;
        assert_eq!(out.client, Ok(Some(foreign.id)));
        assert_eq!(out.server, Ok(None));
    }

    /// Answers `vote` with "<node ID>/<role>" of the caller's certificate.
    struct WhoAmI;

    #[tonic::async_trait]
    impl Raft for WhoAmI {
        async fn vote(
            &self,
            request: tonic::Request<RaftBytes>,
        ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
            let who = peer_identity(&request)
                .map(|id| format!("{}/{}", id.node_id, id.role))
                .unwrap_or_default();
            Ok(tonic::Response::new(RaftBytes {
                data: who.into_bytes(),
            }))
        }

        async fn append(
            &self,
            _request: tonic::Request<RaftBytes>,
        ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
            Err(tonic::Status::unimplemented("test service"))
        }

        async fn snapshot(
            &self,
            _request: tonic::Request<RaftBytes>,
        ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
            Err(tonic::Status::unimplemented("test service"))
        }
    }

    async fn serve(config: Arc<ServerConfig>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(WhoAmI))
                .serve_with_incoming(incoming(listener, config)),
        );
        addr
    }

    async fn who(channel: Channel) -> Result<String, tonic::Status> {
        let reply = tokio::time::timeout(WAIT, RaftClient::new(channel).vote(RaftBytes::default()))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("test timeout"))??;
        Ok(String::from_utf8_lossy(&reply.into_inner().data).into_owned())
    }

    #[tokio::test]
    async fn tonic_round_trip_sees_the_peer_identity() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let manager = node(&ca, Role::Manager);
        let worker = node(&ca, Role::Worker);
        let addr = serve(server_config(&ca.cert_pem, manager.identity).expect("server")).await;

        let config = client_config(&ca.cert_pem, Some(worker.identity)).expect("client");
        let lazy = channel(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT).expect("channel");
        assert_eq!(
            who(lazy).await.expect("vote"),
            format!("{}/worker", worker.id)
        );

        let eager = connect(&addr, config, MANAGER_SERVER_NAME, WAIT)
            .await
            .expect("connect");
        assert_eq!(
            who(eager.clone()).await.expect("vote"),
            format!("{}/worker", worker.id)
        );
        assert_eq!(
            who(eager).await.expect("again"),
            format!("{}/worker", worker.id)
        );

        let anonymous = client_config(&ca.cert_pem, None).expect("client");
        let anonymous = channel(&addr, anonymous, MANAGER_SERVER_NAME, WAIT).expect("channel");
        assert_eq!(who(anonymous).await.expect("vote"), "");
    }

    #[tokio::test]
    async fn stalled_and_garbage_clients_do_not_block_the_server() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let manager = node(&ca, Role::Manager);
        let addr = serve(server_config(&ca.cert_pem, manager.identity).expect("server")).await;

        // Holds a TCP connection open without ever starting TLS.
        let _stalled = TcpStream::connect(&addr).await.expect("connect");
        // Speaks plain HTTP to a TLS port.
        let mut garbage = TcpStream::connect(&addr).await.expect("connect");
        garbage
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");

        let config = client_config(&ca.cert_pem, None).expect("client");
        for _ in 0..3 {
            let ch = channel(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT).expect("channel");
            assert_eq!(
                who(ch).await.expect("served despite the stalled client"),
                ""
            );
        }
    }

    #[tokio::test]
    async fn connect_errors_name_the_address() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let config = client_config(&ca.cert_pem, None).expect("client");

        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let err = connect(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT)
            .await
            .expect_err("nothing listens there");
        assert_eq!(
            err.to_string(),
            format!("cannot reach manager at {addr}: connection refused (is mesh running there?)")
        );

        let other = CertAuthority::generate("other").expect("CA");
        let foreign = node(&other, Role::Manager);
        let addr = serve(server_config(&other.cert_pem, foreign.identity).expect("server")).await;
        let err = connect(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT)
            .await
            .expect_err("foreign cluster");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("TLS handshake with manager at {addr} failed"))
                && text.contains("not from this cluster's CA"),
            "{text}"
        );

        for bad in ["", "no-port", "http://1.2.3.4:5", "1.2.3.4:99999"] {
            assert!(
                matches!(
                    channel(bad, config.clone(), MANAGER_SERVER_NAME, WAIT),
                    Err(TlsError::InvalidAddress { .. })
                ),
                "{bad:?} must be rejected"
            );
        }
    }

    #[tokio::test]
    async fn connect_times_out_on_a_silent_server() {
        install_provider();
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let config = client_config(&ca.cert_pem, None).expect("client");
        // Accepts TCP (via the backlog) but never answers the ClientHello.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let err = connect(
            &addr,
            config,
            MANAGER_SERVER_NAME,
            Duration::from_millis(200),
        )
        .await
        .expect_err("times out");
        assert!(matches!(err, TlsError::Timeout { .. }), "{err}");
        drop(silent);
    }
}
