//! The server side: TLS connections accepted for tonic, handshakes bounded
//! in number and time, and what a handler knows of each connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::{FutureExt, future::BoxFuture};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server};

use super::{HANDSHAKE_TIMEOUT, JOIN_EXPORTER_LABEL};
use crate::pki::{self, NodeIdentity};

/// At most this many server-side handshakes run at once; beyond that,
/// accepting waits (the kernel backlog absorbs the rest).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// After a failed `accept` (e.g. out of file descriptors), wait this long
/// before trying again instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
