//! The outer UDP socket: GSO sends (`UDP_SEGMENT`) and GRO receives
//! (`UDP_GRO`, `recvmmsg`), so a burst costs one syscall each way.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Most segments the kernel takes in one GSO send.
pub const MAX_GSO_SEGS: usize = 64;
/// Largest UDP payload of one GSO send.
pub const MAX_GSO_BYTES: usize = 65_000;

/// The socket, with what the kernel turned out to support.
pub struct Socket {
    pub fd: OwnedFd,
    gso: AtomicBool,
    pub gro: bool,
}

fn setopt(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    // SAFETY: an int option, passed by pointer with its size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut s: libc::sockaddr_in = unsafe { mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
    s
}

/// Opens a UDP socket bound to `addr` in the calling thread's namespace.
pub fn open(addr: SocketAddrV4) -> Result<Socket, (&'static str, io::Error)> {
    // SAFETY: plain socket(2).
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(("socket", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = sockaddr(addr);
    // SAFETY: binds to a valid sockaddr_in of the given size.
    let r = unsafe {
        libc::bind(
            raw,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(("bind", io::Error::last_os_error()));
    }
    // Large buffers: a burst is ~64 KB and arrives all at once. FORCE needs
    // CAP_NET_ADMIN; the plain option is the fallback.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !setopt(raw, libc::SOL_SOCKET, force, 8 << 20) {
            setopt(raw, libc::SOL_SOCKET, plain, 8 << 20);
        }
    }
    let gro = setopt(raw, libc::SOL_UDP, UDP_GRO, 1);
    Ok(Socket {
        fd,
        gso: AtomicBool::new(true),
        gro,
    })
}

/// One datagram or GSO train to send: `buf` holds segments of `seg` bytes
/// each (the last may be shorter).
pub struct Transmit<'a> {
    pub dst: SocketAddrV4,
    pub buf: &'a [u8],
    pub seg: usize,
}

impl Socket {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends every transmit, splitting trains too big for one GSO send, and
    /// falling back to one datagram per segment where GSO is refused.
    /// Errors other than a full buffer are returned after trying the rest.
    pub fn send(&self, tx: &[Transmit<'_>]) -> io::Result<()> {
        let mut last = Ok(());
        for t in tx {
            if t.buf.is_empty() {
                continue;
            }
            let seg = t.seg.max(1);
            if t.buf.len() <= seg || !self.gso.load(Ordering::Relaxed) {
                for d in t.buf.chunks(seg) {
                    if let Err(e) = self.send_one(t.dst, d, None) {
                        last = Err(e);
                    }
                }
                continue;
            }
            let per = (MAX_GSO_BYTES / seg).clamp(1, MAX_GSO_SEGS) * seg;
            for train in t.buf.chunks(per) {
                let seg_opt = (train.len() > seg).then_some(seg as u16);
                match self.send_one(t.dst, train, seg_opt) {
                    Ok(()) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                        tracing::warn!(error = %e, "UDP GSO refused; sending one datagram per packet");
                        self.gso.store(false, Ordering::Relaxed);
                        for d in train.chunks(seg) {
                            if let Err(e) = self.send_one(t.dst, d, None) {
                                last = Err(e);
                            }
                        }
                    }
                    Err(e) => last = Err(e),
                }
            }
        }
        last
    }

    fn send_one(&self, dst: SocketAddrV4, buf: &[u8], seg: Option<u16>) -> io::Result<()> {
        let mut sa = sockaddr(dst);
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsg holding a u16, aligned.
        let mut cbuf = [0u64; 4];
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = &mut sa as *mut libc::sockaddr_in as *mut libc::c_void;
        msg.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(seg) = seg {
            // SAFETY: CMSG_SPACE of a u16 fits in cbuf (32 bytes); the
            // pointers come from the msghdr set up above.
            unsafe {
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
            }
        }
        loop {
            // SAFETY: msg points at live buffers for the duration of the call.
            let r = unsafe { libc::sendmsg(self.raw(), &msg, 0) };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // A full buffer: wait until there is room (the kernel's
                // backpressure), rather than drop a whole burst.
                Some(libc::EAGAIN) => {
                    let mut p = libc::pollfd {
                        fd: self.raw(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 100) };
                    continue;
                }
                _ => return Err(e),
            }
        }
    }
}

/// Buffers for batched receives.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<[u64; 8]>,
    /// Per message: length, source, GRO stride.
    pub got: Vec<(usize, SocketAddrV4, usize)>,
}

impl RecvBatch {
    pub fn new(n: usize, size: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; size]).collect(),
            // SAFETY: all-zero is a valid sockaddr_in.
            addrs: (0..n).map(|_| unsafe { mem::zeroed() }).collect(),
            cmsgs: vec![[0u64; 8]; n],
            got: Vec::with_capacity(n),
        }
    }

    /// The `i`-th received message.
    pub fn msg(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.got[i].0]
    }
}

impl Socket {
    /// Receives up to a batch of messages without blocking (`Ok(0)` when
    /// none is waiting).
    pub fn recv(&self, b: &mut RecvBatch) -> io::Result<usize> {
        let n = b.bufs.len();
        let mut iovs: Vec<libc::iovec> = b
            .bufs
            .iter_mut()
            .map(|v| libc::iovec {
                iov_base: v.as_mut_ptr() as *mut libc::c_void,
                iov_len: v.len(),
            })
            .collect();
        // SAFETY: all-zero is a valid mmsghdr.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for i in 0..n {
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut b.addrs[i] as *mut libc::sockaddr_in as *mut libc::c_void;
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = b.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = mem::size_of::<[u64; 8]>();
        }
        // SAFETY: every header points at live buffers owned by `b`/`iovs`.
        let r = unsafe {
            libc::recvmmsg(
                self.raw(),
                hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        b.got.clear();
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        let r = r as usize;
        for (i, h) in hdrs.iter().enumerate().take(r) {
            let len = h.msg_len as usize;
            let a = &b.addrs[i];
            let src = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            );
            let mut stride = len;
            // SAFETY: walking the control buffer the kernel filled, bounded
            // by msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        let s = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                        if s > 0 {
                            stride = s as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            b.got.push((len, src, stride));
        }
        Ok(r)
    }
}
