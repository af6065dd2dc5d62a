//! DNS over UDP: our own receive loop, not hickory's. Hickory queues every
//! answer in one 32-slot channel per socket and drops what does not fit, so
//! a burst of SERVFAILs (a flood over the forwarding cap, or many forwards
//! timing out together) could drop a sandbox's answer to a local name.
//! Here each answer is sent on the socket by the task that made it.
//!
//! Queries the sandbox's table answers (its own names, NXDOMAIN, NODATA,
//! PTR) are answered inline by the loop itself ([`super::wire`]): no task,
//! no copy of the query, the answer written into one reused buffer. Only
//! the rest (forwarding, odd queries) gets a task and hickory's parser.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use nix::errno::Errno;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::debug;

use super::batch::{BATCH, Batch};
use super::handler::SandboxHandler;
use super::wire;

/// UDP queries being answered at once per sandbox (local ones finish at
/// once; forwarded ones are capped lower, by
/// [`super::MAX_INFLIGHT_FORWARDS`], and the rest get SERVFAIL). Past this,
/// new datagrams are dropped unanswered, as the kernel drops them from a
/// full socket buffer: the client retries.
pub const MAX_UDP_QUERIES: usize = 1024;

/// The largest query read; a longer datagram is cut and then fails to
/// parse (FORMERR).
const MAX_QUERY: usize = 4096;

/// Receives the sandbox's queries a batch at a time ([`Batch`]): the fast
/// path's answers go back in one `sendmmsg`, the rest each get a task.
/// Runs until aborted; the tasks are in a `JoinSet` it owns.
pub(super) async fn serve_udp(socket: UdpSocket, handler: SandboxHandler) {
    let socket = Arc::new(socket);
    let fd = socket.as_raw_fd();
    let slots = Arc::new(Semaphore::new(MAX_UDP_QUERIES));
    let mut queries = tokio::task::JoinSet::new();
    let mut batch = Batch::new(MAX_QUERY);
    let mut table = handler.table();
    loop {
        let received = match socket.readable().await {
            Ok(()) => socket.try_io(Interest::READABLE, || batch.recv(fd)),
            Err(e) => Err(e),
        };
        if !queries.is_empty() {
            while queries.try_join_next().is_some() {}
        }
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
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
        handler.refresh(&mut table);
        for i in 0..n {
            let Some(peer) = batch.peer(i).filter(|p| answerable(*p)) else {
                continue;
            };
            if let SocketAddr::V4(v4) = peer
                && !batch.cut(i)
            {
                let (query, out) = batch.query_and_answer(i);
                if wire::answer(&table.1, query, out) {
                    batch.push(v4);
                    continue;
                }
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(sandbox = %handler.sandbox_id, %peer, "too many DNS UDP queries in flight; dropping one");
                continue;
            };
            let raw = batch.query(i).to_vec();
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
        send_answers(&socket, &handler, &mut batch).await;
    }
}

/// Sends the batch's answers: all at once if the socket takes them, else
/// what is left one by one, each waiting for room (the kernel queues, or
/// drops, what comes meanwhile). The batch is empty after.
async fn send_answers(socket: &UdpSocket, handler: &SandboxHandler, batch: &mut Batch) {
    let fd = socket.as_raw_fd();
    match socket.try_io(Interest::WRITABLE, || batch.send(fd)) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => {
            // One answer the kernel refuses (its peer unreachable...) must
            // not hold back the others.
            debug!(sandbox = %handler.sandbox_id, error = %e, "DNS UDP batch send failed");
        }
    }
    for (answer, peer) in batch.pending() {
        if let Err(e) = socket.send_to(answer, peer).await {
            debug!(sandbox = %handler.sandbox_id, %peer, error = %e, "DNS UDP send failed");
        }
    }
    batch.drop_first(BATCH);
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
