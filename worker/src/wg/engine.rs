//! The device: TAP, socket, peers and the threads moving packets.
//!
//! Three plain OS threads: TAP → UDP (split, encrypt, GSO send), UDP → TAP
//! (GRO receive, decrypt, coalesce, write) and timers (handshakes,
//! keepalives, rekeying). Each polls with a short timeout so `Drop` can stop
//! it; the fds close when the last thread lets go, and the TAP vanishes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use netlink_packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};

use super::offload::{self, Coalescer, VNET_HDR_LEN, VnetHdr};
use super::peers::{Peer, PeerTable};
use super::socket::{self, RecvBatch, Socket, Transmit};
use super::tap;
use super::{Datapath, DeviceConfig, DeviceStatus, PeerConfig, PeerStatus, WgError};
use crate::link::{Mac, Netlink, netlink_error};
use crate::netns::{self, NetError};

/// Handshakes accepted per second before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How long a thread waits for I/O before checking whether to stop.
const POLL_MS: libc::c_int = 100;
/// Largest frame the TAP hands over (a 64 KB burst plus headers).
const FRAME_MAX: usize = VNET_HDR_LEN + 65_536 + 512;
/// Encrypted output per TAP batch before it is sent.
const OUT_BUF: usize = 1 << 20;
/// Room kept free in the output for one more frame's segments.
const OUT_HEADROOM: usize = 160 * 1024;
/// Frames read from the TAP per batch.
const TAP_BATCH: usize = 32;
/// Messages per `recvmmsg`.
const RECV_BATCH: usize = 16;

/// This node's static key and the handshake rate limiter bound to it.
pub(super) struct Keys {
    pub secret: StaticSecret,
    pub public: PublicKey,
    pub limiter: Arc<RateLimiter>,
}

impl Keys {
    fn new(key: [u8; 32]) -> Keys {
        let secret = StaticSecret::from(key);
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Keys {
            secret,
            public,
            limiter,
        }
    }
}

/// What the threads share.
struct Shared {
    cfg: DeviceConfig,
    datapath: Datapath,
    tap_fd: RawFd,
    tap_mac: Mac,
    sock: Socket,
    keys: RwLock<Arc<Keys>>,
    peers: RwLock<Arc<PeerTable>>,
    /// Serialises `set_peers`/`set_private_key`/`repair`.
    config: Mutex<()>,
    stop: AtomicBool,
    /// Keeps the TAP fd open while threads run.
    _tap: std::os::fd::OwnedFd,
}

impl Shared {
    fn keys(&self) -> Arc<Keys> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn table(&self) -> Arc<PeerTable> {
        match self.peers.read() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn endpoint(&self, peer: &Peer) -> SocketAddrV4 {
        SocketAddrV4::new(peer.cfg.addr, self.cfg.listen_port)
    }

    fn send_control(&self, peer: &Peer, pkt: &[u8]) {
        let t = Transmit {
            dst: self.endpoint(peer),
            buf: pkt,
            seg: pkt.len(),
        };
        if let Err(e) = self.sock.send(&[t]) {
            debug!(peer = %peer.cfg.node_id, error = %e, "cannot send a WireGuard control packet");
        }
    }
}

/// A thread's name and body.
type Loop = (&'static str, fn(&Shared));

/// A running userspace WireGuard device. Dropping it stops its threads and
/// closes the TAP (which makes the device vanish).
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Runs `f` on a fresh thread with its own small runtime: the device's API
/// is synchronous and may be called from inside a tokio runtime.
fn block_on<T: Send>(
    f: impl std::future::Future<Output = Result<T, NetError>> + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::NoRuntime(e.to_string()))?;
            rt.block_on(f)
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::NoRuntime("netlink thread panicked".into())))
    })
}

/// Makes the TAP's kernel side right: MTU, no ARP, up, the node's address
/// /32, a route to every peer. Returns its MAC. Idempotent.
async fn configure_tap(cfg: &DeviceConfig, peers: &[Ipv4Addr]) -> Result<Mac, NetError> {
    let nl = Netlink::open(Some(&cfg.tap_ns)).await?;
    let name = &cfg.tap_name;
    let idx = nl
        .require(name, "the WireGuard TAP is gone; restart the device")
        .await?;
    let msg = LinkUnspec::new_with_index(idx)
        .mtu(cfg.mtu)
        .arp(false)
        .up()
        .build();
    nl.handle()
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| netlink_error(format!("set up {name}"), nl.ns(), e))?;
    nl.ensure_only_address_v4(name, cfg.local_ip, 32).await?;
    for &p in peers {
        nl.replace_dev_route(p, 32, name).await?;
    }
    let link = nl.link(name).await?.ok_or_else(|| NetError::NoDevice {
        dev: name.clone(),
        ns: cfg.tap_ns.clone(),
        hint: "the WireGuard TAP is gone; restart the device",
    })?;
    link.mac
        .ok_or_else(|| NetError::Invalid(format!("TAP {name} has no MAC address")))
}

/// Adds routes to `add` and removes those to `del` through the TAP.
async fn update_routes(
    cfg: &DeviceConfig,
    add: &[Ipv4Addr],
    del: &[Ipv4Addr],
) -> Result<(), NetError> {
    let nl = Netlink::open(Some(&cfg.tap_ns)).await?;
    let name = &cfg.tap_name;
    for &p in add {
        nl.replace_dev_route(p, 32, name).await?;
    }
    if del.is_empty() {
        return Ok(());
    }
    let idx = nl
        .require(name, "the WireGuard TAP is gone; restart the device")
        .await?;
    for &p in del {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        match nl.handle().route().del(msg).execute().await {
            Ok(()) => {}
            Err(e) => {
                let err = netlink_error(format!("delete the route to {p} via {name}"), nl.ns(), e);
                // Already gone is what we wanted.
                if err.errno() != Some(nix::errno::Errno::ESRCH) {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

impl Device {
    /// Creates the TAP (address, NOARP, up, MTU) and the socket, and starts
    /// the threads.
    pub fn start(cfg: DeviceConfig) -> Result<Device, WgError> {
        crate::link::check_ifname(&cfg.tap_name)?;
        if cfg.mtu < 576 || cfg.mtu > 65_000 {
            return Err(WgError::Config(format!(
                "TAP MTU {} out of range 576-65000",
                cfg.mtu
            )));
        }
        netns::create(&cfg.tap_ns)?;
        let tap_err = |action: &'static str, source: io::Error| WgError::Tap {
            name: cfg.tap_name.clone(),
            ns: cfg.tap_ns.clone(),
            action,
            source,
        };
        let name = cfg.tap_name.clone();
        let tap = netns::run_in(&cfg.tap_ns, move || tap::open(&name))?
            .map_err(|(a, e)| tap_err(a, e))?;
        let addr = SocketAddrV4::new(cfg.local_ip, cfg.listen_port);
        let sock = match &cfg.udp_ns {
            Some(ns) => netns::run_in(ns, move || socket::open(addr))?,
            None => socket::open(addr),
        }
        .map_err(|(action, source)| WgError::Socket {
            addr,
            action,
            source,
        })?;
        let tap_mac = block_on(configure_tap(&cfg, &[]))?;
        let datapath = if tap.tunnel_gso {
            Datapath::TunnelGso
        } else {
            Datapath::Batch
        };
        info!(tap = %cfg.tap_name, ns = %cfg.tap_ns, %addr, %datapath, gro = sock.gro, "WireGuard device up");
        let shared = Arc::new(Shared {
            keys: RwLock::new(Arc::new(Keys::new(cfg.private_key))),
            peers: RwLock::new(Arc::new(PeerTable::default())),
            config: Mutex::new(()),
            stop: AtomicBool::new(false),
            datapath,
            tap_fd: tap.fd.as_raw_fd(),
            tap_mac,
            sock,
            _tap: tap.fd,
            cfg,
        });
        let mut dev = Device {
            shared,
            threads: Vec::new(),
        };
        let loops: [Loop; 3] = [
            ("wg-tx", tx_loop),
            ("wg-rx", rx_loop),
            ("wg-timers", timer_loop),
        ];
        for (what, f) in loops {
            let sh = dev.shared.clone();
            let h = std::thread::Builder::new()
                .name(what.into())
                .spawn(move || f(&sh))
                .map_err(|source| WgError::Thread { what, source })?;
            dev.threads.push(h);
        }
        Ok(dev)
    }

    /// Makes the peer set `peers`; unchanged peers keep their sessions, and
    /// the routes through the TAP follow.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), WgError> {
        let sh = &self.shared;
        let _g = sh.config.lock().unwrap_or_else(|p| p.into_inner());
        let old = sh.table();
        let keys = sh.keys();
        let new = PeerTable::build(&old, peers, &keys, sh.cfg.local_ip)?;
        let add: Vec<Ipv4Addr> = new.addrs().collect();
        let del: Vec<Ipv4Addr> = old.addrs().filter(|a| !new.has_addr(a)).collect();
        block_on(update_routes(&sh.cfg, &add, &[]))?;
        *sh.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        block_on(update_routes(&sh.cfg, &[], &del))?;
        Ok(())
    }

    /// Key rotation: every peer gets a fresh session under the new key, and
    /// a handshake starts at once.
    pub fn set_private_key(&self, key: [u8; 32]) {
        let sh = &self.shared;
        let _g = sh.config.lock().unwrap_or_else(|p| p.into_inner());
        let keys = Arc::new(Keys::new(key));
        *sh.keys.write().unwrap_or_else(|p| p.into_inner()) = keys.clone();
        let mut buf = vec![0u8; 256];
        for peer in sh.table().iter() {
            let mut t = peer.lock();
            *t = peer.new_tunn(&keys);
            if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
                let p = p.to_vec();
                drop(t);
                sh.send_control(peer, &p);
            }
        }
    }

    /// The device's state now.
    pub fn status(&self) -> DeviceStatus {
        let sh = &self.shared;
        let now = SystemTime::now();
        let peers = sh
            .table()
            .iter()
            .map(|p| {
                let (since, tx, rx, _, _) = p.lock().stats();
                PeerStatus {
                    node_id: p.cfg.node_id.clone(),
                    public_key: p.cfg.public_key,
                    endpoint: sh.endpoint(p),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect();
        DeviceStatus {
            datapath: sh.datapath,
            listen_port: sh.cfg.listen_port,
            public_key: *sh.keys().public.as_bytes(),
            peers,
        }
    }

    /// Re-adds the TAP's address, routes and up state if deleted by hand.
    pub fn repair(&self) -> Result<(), WgError> {
        let sh = &self.shared;
        let _g = sh.config.lock().unwrap_or_else(|p| p.into_inner());
        let addrs: Vec<Ipv4Addr> = sh.table().addrs().collect();
        block_on(configure_tap(&sh.cfg, &addrs))?;
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a WireGuard thread panicked");
            }
        }
    }
}

/// Waits until `fd` is readable or the poll times out.
fn wait_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, POLL_MS) > 0 }
}

/// One non-blocking read; `None` when nothing is waiting. A hard error
/// (the TAP deleted under us) pauses a poll interval so a dead fd that
/// polls readable forever cannot make the thread spin.
fn read_fd(fd: RawFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: reads into a live buffer of the given length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
            debug!(error = %e, "TAP read failed");
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
        }
        return None;
    }
    Some(n as usize)
}

/// TAP → UDP: read frames, split bursts, encrypt under one lock per frame,
/// send each frame's packets as one GSO train.
fn tx_loop(sh: &Shared) {
    let mut rbuf = vec![0u8; FRAME_MAX];
    let mut scratch = Vec::with_capacity(FRAME_MAX);
    let mut out = vec![0u8; OUT_BUF];
    let mut trains: Vec<(SocketAddrV4, usize, usize, usize)> = Vec::new();
    let mut control: Vec<(SocketAddrV4, Vec<u8>)> = Vec::new();
    while !sh.stop.load(Ordering::Relaxed) {
        if !wait_readable(sh.tap_fd) {
            continue;
        }
        let table = sh.table();
        let mut off = 0;
        for _ in 0..TAP_BATCH {
            let Some(n) = read_fd(sh.tap_fd, &mut rbuf) else {
                break;
            };
            let Some(h) = VnetHdr::parse(&rbuf[..n]) else {
                continue;
            };
            let frame = &rbuf[VNET_HDR_LEN..n];
            // Only IPv4 to a peer's address: anything else (IPv6 ND, ...) has
            // nowhere to go.
            if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
                continue;
            }
            let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
            let Some(peer) = table.by_addr(dst) else {
                continue;
            };
            let ep = sh.endpoint(peer);
            let start = off;
            let mut seg = 0;
            let mut t = peer.lock();
            let r = offload::split(&h, frame, &mut scratch, |pkt| {
                match t.encapsulate(pkt, &mut out[off..]) {
                    TunnResult::WriteToNetwork(b) if b.first() == Some(&4) => {
                        if seg == 0 {
                            seg = b.len();
                        }
                        off += b.len();
                    }
                    // A handshake initiation: the packet waits in the Tunn.
                    TunnResult::WriteToNetwork(b) => control.push((ep, b.to_vec())),
                    TunnResult::Err(e) => debug!(error = ?e, "encapsulate failed"),
                    _ => {}
                }
            });
            drop(t);
            if let Err(e) = r {
                debug!(error = ?e, gso_type = h.gso_type, "dropping a TAP frame");
            }
            if off > start {
                // Packets of equal size to one peer form one GSO train
                // across frames too (the batch path reads one packet per
                // frame): extend the previous train when it ended on a
                // full-size segment and this one has that size.
                match trains.last_mut() {
                    Some((dst, s, e, sz))
                        if *dst == ep
                            && *e == start
                            && (*e - *s) % *sz == 0
                            && (seg == *sz || (off - start <= *sz && seg == off - start)) =>
                    {
                        *e = off;
                    }
                    _ => trains.push((ep, start, off, seg)),
                }
            }
            if OUT_BUF - off < OUT_HEADROOM {
                break;
            }
        }
        let tx: Vec<Transmit<'_>> = trains
            .iter()
            .map(|&(dst, s, e, seg)| Transmit {
                dst,
                buf: &out[s..e],
                seg,
            })
            .chain(control.iter().map(|(dst, b)| Transmit {
                dst: *dst,
                buf: b,
                seg: b.len(),
            }))
            .collect();
        if let Err(e) = sh.sock.send(&tx) {
            debug!(error = %e, "UDP send failed");
        }
        drop(tx);
        trains.clear();
        control.clear();
    }
}

/// Which peer a datagram claims to come from: by public key for a
/// handshake initiation, by our receiver index for everything else.
/// An initiation costs a Diffie-Hellman to identify, so its MAC and the
/// rate limit are checked first; under load the sender gets a cookie.
fn identify(
    sh: &Shared,
    table: &PeerTable,
    keys: &Keys,
    src: SocketAddrV4,
    dg: &[u8],
) -> Option<Arc<Peer>> {
    match Tunn::parse_incoming_packet(dg).ok()? {
        Packet::HandshakeInit(_) => {
            let mut cookie = [0u8; 64];
            let p = match keys
                .limiter
                .verify_packet(Some(IpAddr::V4(*src.ip())), dg, &mut cookie)
            {
                Ok(Packet::HandshakeInit(p)) => p,
                Err(TunnResult::WriteToNetwork(c)) => {
                    // Only to a peer's own address: no reflection elsewhere.
                    if let Some(peer) = table.by_addr(*src.ip()) {
                        let c = c.to_vec();
                        sh.send_control(peer, &c);
                    }
                    return None;
                }
                _ => return None,
            };
            let half = parse_handshake_anon(&keys.secret, &keys.public, &p).ok()?;
            table.by_key(&half.peer_static_public).cloned()
        }
        Packet::HandshakeResponse(p) => table.by_index(p.receiver_idx >> 8).cloned(),
        Packet::PacketCookieReply(p) => table.by_index(p.receiver_idx >> 8).cloned(),
        Packet::PacketData(p) => {
            let peer = table.by_index(p.receiver_idx >> 8).cloned();
            if peer.is_none()
                && let Some(stale) = table.by_addr(*src.ip())
            {
                rehandshake(sh, stale);
            }
            peer
        }
    }
}

/// A peer goes on sending data on a session this device no longer has
/// (this daemon restarted, or its key was rotated): WireGuard would let it
/// wait for its own rekey timeout (15 s); a fresh initiation from here ends
/// that at once. One at a time: Tunn sends none while one is in flight, so
/// a stream of such packets (or spoofed ones) costs no more.
fn rehandshake(sh: &Shared, peer: &Peer) {
    let mut buf = [0u8; 256];
    let init = match peer.lock().format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(b) => b.to_vec(),
        _ => return,
    };
    debug!(peer = %peer.cfg.node_id, "data on an unknown session; starting a handshake");
    sh.send_control(peer, &init);
}

/// UDP → TAP: receive batches, decrypt, keep only packets from the peer's
/// own address, coalesce and write to the TAP.
fn rx_loop(sh: &Shared) {
    let mut batch = RecvBatch::new(RECV_BATCH, 65_536);
    let mut plain = vec![0u8; 65_536];
    let mut co = Coalescer::new(sh.tap_mac, sh.datapath == Datapath::TunnelGso);
    while !sh.stop.load(Ordering::Relaxed) {
        if !wait_readable(sh.sock.raw()) {
            continue;
        }
        loop {
            let n = match sh.sock.recv(&mut batch) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    debug!(error = %e, "UDP receive failed");
                    break;
                }
            };
            let table = sh.table();
            let keys = sh.keys();
            for i in 0..n {
                let (_, src, stride) = batch.got[i];
                for dg in batch.msg(i).chunks(stride.max(1)) {
                    receive(sh, &table, &keys, src, dg, &mut plain, &mut co);
                }
            }
            co.flush();
            for f in co.frames() {
                // SAFETY: writes a live buffer of the given length.
                let r =
                    unsafe { libc::write(sh.tap_fd, f.as_ptr() as *const libc::c_void, f.len()) };
                if r < 0 {
                    debug!(error = %io::Error::last_os_error(), len = f.len(), "TAP write failed");
                }
            }
            co.clear();
        }
    }
}

fn receive(
    sh: &Shared,
    table: &PeerTable,
    keys: &Keys,
    src: SocketAddrV4,
    dg: &[u8],
    plain: &mut [u8],
    co: &mut Coalescer,
) {
    let Some(peer) = identify(sh, table, keys, src, dg) else {
        return;
    };
    // Pinned endpoint: the peer's underlay address and nothing else.
    if *src.ip() != peer.cfg.addr {
        return;
    }
    let mut t = peer.lock();
    match t.decapsulate(Some(IpAddr::V4(*src.ip())), dg, plain) {
        TunnResult::WriteToNetwork(b) => {
            let first = b.to_vec();
            let mut more = vec![first];
            // Packets queued while the handshake ran go out now.
            while let TunnResult::WriteToNetwork(b) = t.decapsulate(None, &[], plain) {
                more.push(b.to_vec());
            }
            drop(t);
            for p in &more {
                sh.send_control(&peer, p);
            }
        }
        // Allowed IPs: only the peer's own underlay address.
        TunnResult::WriteToTunnelV4(pkt, from) if from == peer.cfg.addr => co.push(pkt),
        _ => {}
    }
}

/// Drives every session's timers (handshake retries, keepalives, rekeying)
/// and the handshake rate limiter.
fn timer_loop(sh: &Shared) {
    let mut buf = vec![0u8; 256];
    let mut last_reset = Instant::now();
    while !sh.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if last_reset.elapsed() >= Duration::from_secs(1) {
            sh.keys().limiter.reset_count();
            last_reset = Instant::now();
        }
        for peer in sh.table().iter() {
            let mut t = peer.lock();
            if let TunnResult::WriteToNetwork(p) = t.update_timers(&mut buf) {
                let p = p.to_vec();
                drop(t);
                sh.send_control(peer, &p);
            }
        }
    }
}
