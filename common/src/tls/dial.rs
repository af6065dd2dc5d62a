//! The client side: gRPC channels to a peer over TLS, lazy (reconnecting by
//! themselves), eager (errors name the address), or bound to one connection
//! (a join's proof travels on the connection it was derived from).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, future::BoxFuture};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsConnector, client};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{JOIN_EXPORTER_LABEL, TlsError};

/// A lazy gRPC channel to `addr` ("IP:PORT" or "HOST:PORT") over TLS,
/// verifying the server as `server_name`. Nothing is dialled until the first
/// call; the channel reconnects by itself after failures.
pub fn channel(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout, None)?;
    Ok(endpoint.connect_with_connector_lazy(dialer.into_service(None)))
}

/// Like [`channel`], for a channel kept for long and shared by many calls:
/// an HTTP/2 ping every `ping_every`, unanswered for as long, closes a
/// connection whose peer went silent (behind a cut link, say), so calls on
/// it fail and the caller can try another peer instead of waiting for TCP
/// to give up.
pub fn kept_channel(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
    ping_every: Duration,
) -> Result<Channel, TlsError> {
    kept_channel_from(addr, None, config, server_name, connect_timeout, ping_every)
}

/// Like [`kept_channel`], its connections made from the local address
/// `from` (when given): many simulated nodes in one namespace each speak
/// from their own address, as real nodes do.
pub fn kept_channel_from(
    addr: &str,
    from: Option<IpAddr>,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
    ping_every: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout, from)?;
    Ok(endpoint
        .http2_keep_alive_interval(ping_every)
        .keep_alive_timeout(ping_every)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(dialer.into_service(None)))
}

/// Like [`channel`] but connects now, so a wrong address, an unreachable
/// peer or a certificate problem is reported here with the address in it.
pub async fn connect(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout, None)?;
    let first = dialer.dial().await?;
    let (peer, addr) = (dialer.peer.clone(), dialer.addr.to_string());
    endpoint
        .connect_with_connector(dialer.into_service(Some(first)))
        .await
        .map_err(|cause| TlsError::Transport { peer, addr, cause })
}

/// Connects now over one TLS connection and never redials, returning the
/// channel and that connection's join exporter: a proof derived from it
/// must travel on the very connection it was derived for. `from`, when
/// given, is the local address to connect from.
pub async fn connect_bound(
    addr: &str,
    from: Option<IpAddr>,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    connect_timeout: Duration,
) -> Result<(Channel, [u8; 32]), TlsError> {
    let (endpoint, dialer) = prepare(addr, config, server_name, connect_timeout, from)?;
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
    from: Option<IpAddr>,
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
        from,
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
    from: Option<IpAddr>,
}

type ClientIo = TokioIo<client::TlsStream<TcpStream>>;

impl Dialer {
    async fn dial(&self) -> Result<ClientIo, TlsError> {
        let attempt = async {
            let tcp = self.tcp().await.map_err(|cause| TlsError::Unreachable {
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

    /// The TCP connection, from `from` when given (then `addr` must be
    /// IP:PORT of the same family).
    async fn tcp(&self) -> io::Result<TcpStream> {
        let Some(from) = self.from else {
            return TcpStream::connect(&*self.addr).await;
        };
        let to: SocketAddr = self.addr.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "connecting from a given address needs an IP:PORT peer",
            )
        })?;
        let socket = match to {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(from, 0))?;
        socket.connect(to).await
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

/// Names the peer in errors: "manager" reads better than "mesh-manager".
fn peer_label(server_name: &str) -> &str {
    server_name.strip_prefix("mesh-").unwrap_or(server_name)
}
