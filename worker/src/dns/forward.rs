//! Relaying queries that are not ours to the host's resolvers: UDP first,
//! TCP when the answer is truncated, all within one deadline. Runs in the
//! daemon's (node's) namespace, where those resolvers are reachable.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

/// Why a forwarded query got no usable reply (logged; the sandbox sees
/// SERVFAIL).
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstreams,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("query of {0} bytes is too long for TCP")]
    TooLong(usize),
}

/// The host's resolvers and how long to wait for them.
pub(super) struct Forwarder {
    pub(super) upstreams: Vec<SocketAddr>,
    pub(super) timeout: Duration,
}

impl Forwarder {
    /// Sends `query` to the upstreams in order until one replies, all within
    /// `self.timeout`, and returns the raw reply. Each upstream gets an even
    /// share of the time left, so one silent resolver cannot use it all.
    pub(super) async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        // A fresh random ID: the sandbox chose the original, so reusing it
        // would let the sandbox (or anyone who sees its queries) forge
        // replies to the daemon.
        let mut query = query.to_vec();
        let id: u16 = rand::random();
        if let Some(id_field) = query.get_mut(..2) {
            id_field.copy_from_slice(&id.to_be_bytes());
        }

        let deadline = Instant::now() + self.timeout;
        let mut last = ForwardError::Timeout(self.timeout);
        let n = self.upstreams.len();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(n - i).unwrap_or(1);
            let attempt_deadline = Instant::now() + share;
            let attempt = async {
                if !tcp {
                    let reply = exchange_udp(*upstream, &query).await?;
                    // TC set: the answer did not fit; ask again over TCP.
                    if reply.get(2).is_none_or(|b| b & 0x02 == 0) {
                        return Ok(reply);
                    }
                }
                exchange_tcp(*upstream, &query).await
            };
            match timeout_at(attempt_deadline, attempt).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    debug!(%upstream, error = %e, "upstream DNS failed");
                    last = e;
                }
                Err(_) => {
                    debug!(%upstream, "upstream DNS timed out");
                    last = ForwardError::Timeout(share);
                }
            }
        }
        Err(last)
    }
}

/// Whether `reply` is a response to `query` (same ID, QR bit set).
fn is_reply_to(reply: &[u8], query: &[u8]) -> bool {
    reply.len() >= 12 && reply[..2] == query[..2] && reply[2] & 0x80 != 0
}

/// One UDP exchange from an ephemeral port; stray or foreign datagrams are
/// ignored (the socket is connected, so only the upstream can reach it).
async fn exchange_udp(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Some(reply) = buf.get(..n)
            && is_reply_to(reply, query)
        {
            return Ok(reply.to_vec());
        }
    }
}

/// One TCP exchange (RFC 1035 4.2.2 length prefix).
async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::TooLong(query.len()))?;
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        if is_reply_to(&reply, query) {
            return Ok(reply);
        }
    }
}
