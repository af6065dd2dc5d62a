//! `recvmmsg`/`sendmmsg` for the UDP loop: under load a sandbox's queries
//! are read, and the answers the fast path made sent, a batch per system
//! call each way instead of one call per datagram. The buffers and headers
//! are allocated once per loop and reused, so a batch allocates nothing.
//!
//! The resolver's socket is IPv4 (127.0.0.11), so addresses are
//! `sockaddr_in`; a datagram from anything else is reported without a
//! source and goes unanswered.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// Datagrams read (and answers sent) per system call.
pub(super) const BATCH: usize = 16;

/// One batch's buffers: the queries as received, then the answers.
pub(super) struct Batch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_in>,
    /// Per received datagram: its length and whether the kernel cut it.
    got: Vec<(usize, bool)>,
    /// The answers to send, each written in place by the fast path.
    pub(super) answers: Vec<Vec<u8>>,
    /// Which answer goes to which peer, in `answers` order.
    to: Vec<libc::sockaddr_in>,
    pending: usize,
}

fn zeroed_sockaddr() -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    unsafe { mem::zeroed() }
}

fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    let mut s = zeroed_sockaddr();
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
    s
}

impl Batch {
    /// Buffers for [`BATCH`] datagrams of up to `size` bytes each.
    pub(super) fn new(size: usize) -> Self {
        Batch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; size].into_boxed_slice())
                .collect(),
            addrs: vec![zeroed_sockaddr(); BATCH],
            got: Vec::with_capacity(BATCH),
            answers: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            to: vec![zeroed_sockaddr(); BATCH],
            pending: 0,
        }
    }

    /// Reads up to [`BATCH`] waiting datagrams without blocking; an
    /// `io::ErrorKind::WouldBlock` error when none is waiting (for tokio's
    /// `try_io` to clear the readiness).
    pub(super) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr().cast(),
            iov_len: self.bufs[i].len(),
        });
        // SAFETY: all-zero is a valid mmsghdr.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate() {
            h.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live buffer and address owned by
        // `self` (or `iovs`, alive until the call returns), with its size.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        self.got.clear();
        let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
        for h in hdrs.iter().take(n) {
            let len = (h.msg_len as usize).min(self.bufs[0].len());
            let cut = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.got.push((len, cut));
        }
        Ok(n)
    }

    /// The `i`-th datagram read by [`Batch::recv`] (cut to the buffer if
    /// it was longer: it then fails to parse, as a partial query should).
    pub(super) fn query(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.got[i].0]
    }

    /// Whether the `i`-th datagram was longer than the buffer.
    pub(super) fn cut(&self, i: usize) -> bool {
        self.got[i].1
    }

    /// The source of the `i`-th datagram, if it is IPv4.
    pub(super) fn peer(&self, i: usize) -> Option<SocketAddr> {
        let a = &self.addrs[i];
        (a.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        })
    }

    /// The `i`-th datagram and the buffer to write the next answer into,
    /// which [`Batch::push`] then keeps. At most one answer per datagram
    /// read, sent before the next read, so there is always a free buffer.
    pub(super) fn query_and_answer(&mut self, i: usize) -> (&[u8], &mut Vec<u8>) {
        (
            &self.bufs[i][..self.got[i].0],
            &mut self.answers[self.pending],
        )
    }

    /// Keeps the answer just written by [`Batch::next_answer`] for `peer`.
    pub(super) fn push(&mut self, peer: SocketAddrV4) {
        self.to[self.pending] = to_sockaddr(peer);
        self.pending += 1;
    }

    /// The answers kept and not sent yet, with their peers.
    pub(super) fn pending(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.answers[..self.pending]
            .iter()
            .zip(&self.to)
            .map(|(a, s)| {
                let peer = SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
                    u16::from_be(s.sin_port),
                );
                (a.as_slice(), SocketAddr::V4(peer))
            })
    }

    /// Sends the kept answers without blocking, as many as the socket
    /// takes; the ones sent are dropped from the batch. Returns how many
    /// are left (the socket buffer is full: the caller waits and sends
    /// those one by one).
    pub(super) fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.pending;
        if n == 0 {
            return Ok(0);
        }
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.answers[i].as_mut_ptr().cast(),
            iov_len: self.answers[i].len(),
        });
        // SAFETY: all-zero is a valid mmsghdr.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, h) in hdrs.iter_mut().enumerate().take(n) {
            h.msg_hdr.msg_name = (&raw mut self.to[i]).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `n` headers point at live answers and addresses
        // owned by `self` (or `iovs`, alive until the call returns).
        let r =
            unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
        let sent = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
        self.drop_first(sent);
        Ok(self.pending)
    }

    /// Forgets the first `k` kept answers (sent, or given up).
    pub(super) fn drop_first(&mut self, k: usize) {
        let k = k.min(self.pending);
        self.answers[..self.pending].rotate_left(k);
        self.to[..self.pending].rotate_left(k);
        self.pending -= k;
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_batch_reads_several_datagrams_and_answers_each_sender() {
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        server.set_nonblocking(true).expect("nonblocking");
        let addr = server.local_addr().expect("addr");
        let clients: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        for (i, c) in clients.iter().enumerate() {
            c.send_to(&[i as u8; 5], addr).expect("send");
        }
        // A datagram longer than the buffer is cut and says so.
        clients[0].send_to(&[9u8; 100], addr).expect("send");
        let mut b = Batch::new(64);
        let n = b.recv(server.as_raw_fd()).expect("recv");
        assert_eq!(n, 4);
        for (i, client) in clients.iter().enumerate() {
            assert_eq!(b.query(i), &[i as u8; 5]);
            assert!(!b.cut(i));
            let Some(SocketAddr::V4(peer)) = b.peer(i) else {
                panic!("no IPv4 peer");
            };
            assert_eq!(SocketAddr::V4(peer), client.local_addr().expect("addr"));
            let (_, out) = b.query_and_answer(i);
            out.clear();
            out.extend_from_slice(&[i as u8 + 100; 7]);
            b.push(peer);
        }
        assert_eq!(b.query(3).len(), 64);
        assert!(b.cut(3));
        assert_eq!(b.pending().count(), 3);
        assert_eq!(b.send(server.as_raw_fd()).expect("send"), 0);
        for (i, c) in clients.iter().enumerate() {
            let mut buf = [0u8; 16];
            c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
            let (len, from) = c.recv_from(&mut buf).expect("answer");
            assert_eq!(from, addr);
            assert_eq!(&buf[..len], &[i as u8 + 100; 7]);
        }
        // Nothing left: the kernel says so rather than blocking.
        let e = b.recv(server.as_raw_fd()).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn dropping_sent_answers_keeps_the_rest_in_order() {
        let mut b = Batch::new(16);
        b.got = vec![(0, false); BATCH];
        for i in 0..4u8 {
            let (_, out) = b.query_and_answer(usize::from(i));
            out.clear();
            out.push(i);
            b.push(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1000 + u16::from(i)));
        }
        b.drop_first(3);
        let left: Vec<_> = b.pending().map(|(a, p)| (a.to_vec(), p.port())).collect();
        assert_eq!(left, [(vec![3u8], 1003)]);
        b.drop_first(5);
        assert_eq!(b.pending().count(), 0);
    }
}
