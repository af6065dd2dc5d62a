//! DNS over UDP: our own receive loop, not hickory's. Hickory queues every
//! answer in one 32-slot channel per socket and drops what does not fit, so
//! a burst of SERVFAILs (a flood over the forwarding cap, or many forwards
//! timing out together) could drop a sandbox's answer to a local name.
//! Here each answer is sent on the socket by the task that made it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use nix::errno::Errno;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::debug;

use super::handler::SandboxHandler;

/// UDP queries being answered at once per sandbox (local ones finish at
/// once; forwarded ones are capped lower, by
/// [`super::MAX_INFLIGHT_FORWARDS`], and the rest get SERVFAIL). Past this,
/// new datagrams are dropped unanswered, as the kernel drops them from a
/// full socket buffer: the client retries.
pub const MAX_UDP_QUERIES: usize = 1024;

/// The largest query read; a longer datagram is cut and then fails to
/// parse (FORMERR).
const MAX_QUERY: usize = 4096;

/// Receives the sandbox's queries and answers each in a task of its own.
/// Runs until aborted; the tasks are in a `JoinSet` it owns.
pub(super) async fn serve_udp(socket: UdpSocket, handler: SandboxHandler) {
    let socket = Arc::new(socket);
    let slots = Arc::new(Semaphore::new(MAX_UDP_QUERIES));
    let mut queries = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = socket.recv_from(&mut buf).await;
        while queries.try_join_next().is_some() {}
        let (len, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!(sandbox = %handler.sandbox_id, error = %e, "DNS UDP receive failed");
                if e.raw_os_error()
                    .map(Errno::from_raw)
                    .is_some_and(|n| matches!(n, Errno::ENOBUFS | Errno::ENOMEM))
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        if !answerable(peer) {
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(sandbox = %handler.sandbox_id, %peer, "too many DNS UDP queries in flight; dropping one");
            continue;
        };
        let raw = buf[..len].to_vec();
        let (handler, socket) = (handler.clone(), socket.clone());
        queries.spawn(async move {
            let _slot = slot;
            if let Some(reply) = handler.answer_raw(raw, peer, Protocol::Udp).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                debug!(sandbox = %handler.sandbox_id, %peer, error = %e, "DNS UDP send failed");
            }
        });
    }
}

/// A source an answer can go back to (not port 0, not unspecified).
fn answerable(peer: SocketAddr) -> bool {
    peer.port() != 0 && !peer.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_sources_are_answered() {
        assert!(answerable("127.0.0.1:5353".parse().expect("addr")));
        assert!(!answerable("127.0.0.1:0".parse().expect("addr")));
        assert!(!answerable("0.0.0.0:53".parse().expect("addr")));
    }
}
