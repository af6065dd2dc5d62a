//! DNS over TCP: our own accept loop, not hickory's, so each sandbox's
//! connections are capped in number, idle time and lifetime.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use nix::errno::Errno;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

use super::handler::SandboxHandler;

/// DNS-over-TCP connections served at once per sandbox; one more is
/// accepted and closed at once. Each holds a socket (a file descriptor) of
/// the daemon, so without a cap one sandbox could exhaust them. Stub
/// resolvers use one connection per lookup, so a few suffice.
pub const MAX_TCP_CONNECTIONS: usize = 16;

/// A TCP connection that has not sent a whole query this long after it
/// opened or after its last answer is closed, so a sandbox cannot hold its
/// connection slots with idle (or trickling) connections.
pub const TCP_IDLE: Duration = Duration::from_secs(3);

/// A TCP connection is closed this long after it opened, however busy, so
/// no client keeps a slot for good.
pub const TCP_LIFETIME: Duration = Duration::from_secs(30);

/// Accepts the sandbox's DNS-over-TCP connections and serves at most
/// [`MAX_TCP_CONNECTIONS`] at once. One more is accepted and closed at once:
/// left in the backlog it would still hold kernel memory, and the client
/// would only find out after its own timeout. Runs until aborted; the
/// connections' tasks are in a `JoinSet` it owns, so they end with it.
pub(super) async fn serve_tcp(listener: tokio::net::TcpListener, handler: SandboxHandler) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(sandbox = %handler.sandbox_id, error = %e, "DNS TCP accept failed");
                // Out of descriptors or memory: pause rather than spin. An
                // aborted handshake (the client's doing) costs no pause, so
                // a sandbox cannot slow the accepts down with those.
                if e.raw_os_error().map(Errno::from_raw).is_some_and(|n| {
                    matches!(
                        n,
                        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
                    )
                }) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(sandbox = %handler.sandbox_id, %peer, "too many DNS TCP connections; closing the new one");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_tcp_connection(&handler, stream, peer).await {
                debug!(sandbox = %handler.sandbox_id, %peer, error = %e, "DNS TCP connection failed");
            }
        });
    }
}

/// Serves one TCP connection: each query is answered before the next is
/// read (in order, as RFC 7766 allows), so one connection has at most one
/// query in flight. Ends when the client closes, sends no whole query for
/// [`TCP_IDLE`], or [`TCP_LIFETIME`] is up.
async fn serve_tcp_connection(
    handler: &SandboxHandler,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let end = Instant::now() + TCP_LIFETIME;
    loop {
        let deadline = (Instant::now() + TCP_IDLE).min(end);
        let query = match timeout_at(deadline, read_tcp_message(&mut stream)).await {
            Ok(Ok(Some(query))) => query,
            // Closed by the client, idle, or old enough.
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        if let Some(reply) = handler.answer_raw(query, peer, Protocol::Tcp).await {
            let len = u16::try_from(reply.len())
                .map_err(|_| io::Error::other("DNS reply too long for TCP"))?;
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&reply);
            // A client that does not read its answers is as idle as one
            // that does not ask.
            timeout(TCP_IDLE, stream.write_all(&out))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
        if Instant::now() >= end {
            return Ok(());
        }
    }
}

/// Reads one length-prefixed DNS message; `None` if the client closed the
/// connection between messages.
async fn read_tcp_message(stream: &mut tokio::net::TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}
