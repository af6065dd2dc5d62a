//! Segmentation and coalescing of VXLAN-wrapped bursts, free of I/O.
//!
//! With tunnel GSO the TAP hands over one Ethernet frame holding a whole
//! burst of an inner TCP (or UDP) flow wrapped in VXLAN, described by a
//! `virtio_net_hdr` with tunnel offsets. WireGuard carries IP packets of at
//! most the TAP's MTU, so [`split`] cuts such a burst into the packets the
//! kernel would have sent: every length, IP ID, TCP sequence number, flag and
//! checksum as if segmented on the wire. On the way back [`Coalescer`] glues
//! consecutive in-order TCP segments of one flow into one burst again, so the
//! receiving stack handles one large packet instead of forty.

/// Size of the `virtio_net_hdr_v1_hash_tunnel` the TAP is configured for.
pub const VNET_HDR_LEN: usize = 24;

/// `flags`: the checksum from `csum_start` on is still to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksums have been checked (or need not be).
pub const F_DATA_VALID: u8 = 2;
/// `flags`: the outer UDP checksum of a tunnel packet is to be computed.
pub const F_UDP_TUNNEL_CSUM: u8 = 8;

/// `gso_type` values (low bits) and tunnel bits.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
pub const GSO_ECN: u8 = 0x80;

const ETH_LEN: usize = 14;
const VXLAN_LEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// The largest IPv4 packet a coalesced burst may become.
const MAX_IP_LEN: usize = 65_535;
/// The most segments one coalesced burst holds.
const MAX_MERGE_SEGS: usize = 64;

/// A `virtio_net_hdr` with tunnel offsets (all fields little-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub outer_th_offset: u16,
    pub inner_nh_offset: u16,
}

impl VnetHdr {
    /// Parses the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            outer_th_offset: le(20),
            inner_nh_offset: le(22),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        b[..VNET_HDR_LEN].fill(0);
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[20..22].copy_from_slice(&self.outer_th_offset.to_le_bytes());
        b[22..24].copy_from_slice(&self.inner_nh_offset.to_le_bytes());
    }
}

/// Why a frame could not be segmented (it is dropped, and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitError {
    /// Too short or inconsistent headers.
    Malformed,
    /// A GSO type this code does not segment.
    Unsupported(u8),
}

/// Adds `b` to a running one's-complement sum (big-endian 16-bit words; an
/// odd trailing byte is padded with zero). Only valid for `b` starting at an
/// even offset of the checksummed range.
pub fn csum_add(mut sum: u64, b: &[u8]) -> u64 {
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Split in two 32-bit halves so the 64-bit accumulator cannot overflow
        // for any realistic length.
        sum += w >> 32;
        sum += w & 0xffff_ffff;
    }
    let mut rest = chunks.remainder();
    while rest.len() >= 2 {
        sum += u64::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    if let [last] = rest {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits (not inverted).
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `b` (inverted, ready to store).
pub fn checksum(b: &[u8]) -> u16 {
    !csum_fold(csum_add(0, b))
}

/// Sum of the IPv4/IPv6 pseudo-header for an L4 segment of `len` bytes.
fn pseudo_sum(ip: &[u8], proto: u8, len: usize) -> u64 {
    let mut s = if ip[0] >> 4 == 4 {
        csum_add(0, &ip[12..20])
    } else {
        csum_add(0, &ip[8..40])
    };
    s += u64::from(proto);
    s += len as u64;
    s
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn put16(b: &mut [u8], i: usize, v: u16) {
    b[i..i + 2].copy_from_slice(&v.to_be_bytes());
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Rewrites an IPv4 header's checksum.
fn fix_ipv4_csum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    put16(ip, 10, 0);
    let c = checksum(&ip[..ihl]);
    put16(ip, 10, c);
}

/// Sets an IP header's length fields for a packet of `ip_len` bytes (IPv4:
/// total length, ID + `id_add`, checksum; IPv6: payload length).
fn set_ip_len(ip: &mut [u8], ip_len: usize, id_add: u16) {
    if ip[0] >> 4 == 4 {
        put16(ip, 2, ip_len as u16);
        let id = be16(ip, 4).wrapping_add(id_add);
        put16(ip, 4, id);
        fix_ipv4_csum(ip);
    } else {
        put16(ip, 4, (ip_len - 40) as u16);
    }
}

/// Computes the L4 checksum of the packet whose IP header starts at `ip_off`
/// and L4 header at `l4_off` in `pkt`, and stores it at `l4_off + field`.
fn fill_l4_csum(pkt: &mut [u8], ip_off: usize, l4_off: usize, proto: u8) {
    let field = if proto == PROTO_TCP { 16 } else { 6 };
    let len = pkt.len() - l4_off;
    put16(pkt, l4_off + field, 0);
    let s = pseudo_sum(&pkt[ip_off..], proto, len);
    let mut c = !csum_fold(csum_add(s, &pkt[l4_off..]));
    if proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    put16(pkt, l4_off + field, c);
}

/// Where the headers of a VXLAN-wrapped (or plain) frame are.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Offset of the outer UDP header, if the frame is a tunnel packet.
    outer_udp: Option<usize>,
    /// Offset of the (inner) IP header that is segmented.
    ip: usize,
    /// Offset of its L4 header.
    l4: usize,
    /// Length of all headers (payload starts here).
    hdr_len: usize,
    proto: u8,
}

fn layout(h: &VnetHdr, frame: &[u8]) -> Result<Layout, SplitError> {
    let tunnel = h.gso_type & (GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6) != 0;
    let l4 = usize::from(h.csum_start);
    let (outer_udp, ip) = if tunnel {
        (
            Some(usize::from(h.outer_th_offset)),
            usize::from(h.inner_nh_offset),
        )
    } else {
        (None, ETH_LEN)
    };
    if frame.len() < ETH_LEN + 20 || ip + 20 > frame.len() || l4 + 8 > frame.len() || l4 <= ip {
        return Err(SplitError::Malformed);
    }
    let v = frame[ip] >> 4;
    let proto = match v {
        4 => frame[ip + 9],
        6 => frame[ip + 6],
        _ => return Err(SplitError::Malformed),
    };
    let l4_len = match proto {
        PROTO_TCP => {
            if l4 + 20 > frame.len() {
                return Err(SplitError::Malformed);
            }
            usize::from(frame[l4 + 12] >> 4) * 4
        }
        PROTO_UDP => 8,
        _ => return Err(SplitError::Malformed),
    };
    let hdr_len = l4 + l4_len;
    if hdr_len > frame.len() || l4_len < 8 {
        return Err(SplitError::Malformed);
    }
    if let Some(u) = outer_udp
        && (u + 8 + VXLAN_LEN + ETH_LEN > ip || frame[ETH_LEN] >> 4 != 4)
    {
        return Err(SplitError::Malformed);
    }
    Ok(Layout {
        outer_udp,
        ip,
        l4,
        hdr_len,
        proto,
    })
}

/// Cuts one frame read from the TAP into IP packets ready for encryption
/// (the outer Ethernet header removed), calling `emit` with each in order.
/// Returns the number of packets emitted.
///
/// - No GSO: the packet as is, with its L4 checksum completed when the
///   header says `NEEDS_CSUM`.
/// - TCP/UDP GSO, plain or inside a UDP tunnel: `gso_size` bytes of payload
///   per packet, headers rewritten as the kernel's segmentation would.
///
/// `scratch` is reused between calls to avoid allocations.
pub fn split(
    h: &VnetHdr,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, SplitError> {
    if frame.len() < ETH_LEN + 20 {
        return Err(SplitError::Malformed);
    }
    let gso = h.gso_type & !(GSO_ECN | GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6);
    if gso == GSO_NONE {
        scratch.clear();
        scratch.extend_from_slice(&frame[ETH_LEN..]);
        if h.flags & F_NEEDS_CSUM != 0 {
            let start = usize::from(h.csum_start);
            let field = start + usize::from(h.csum_offset);
            if start < ETH_LEN || field + 2 > frame.len() {
                return Err(SplitError::Malformed);
            }
            let (start, field) = (start - ETH_LEN, field - ETH_LEN);
            // The field holds the pseudo-header sum; the checksum covers it.
            let c = checksum(&scratch[start..]);
            let c = if c == 0 && h.csum_offset == 6 {
                0xffff
            } else {
                c
            };
            put16(scratch, field, c);
        }
        emit(scratch);
        return Ok(1);
    }
    if !matches!(gso, GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4) {
        return Err(SplitError::Unsupported(h.gso_type));
    }
    let l = layout(h, frame)?;
    let mss = usize::from(h.gso_size);
    if mss == 0 {
        return Err(SplitError::Malformed);
    }
    let payload = &frame[l.hdr_len..];
    if payload.is_empty() {
        return Err(SplitError::Malformed);
    }
    let n = payload.len().div_ceil(mss).max(1);
    let first_seq = if l.proto == PROTO_TCP {
        be32(frame, l.l4 + 4)
    } else {
        0
    };
    let tcp_flags = if l.proto == PROTO_TCP {
        frame[l.l4 + 13]
    } else {
        0
    };
    // Headers without the outer Ethernet header.
    let hdrs = &frame[ETH_LEN..l.hdr_len];
    let (ip, l4) = (l.ip - ETH_LEN, l.l4 - ETH_LEN);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        scratch.clear();
        scratch.extend_from_slice(hdrs);
        scratch.extend_from_slice(chunk);
        let total = scratch.len();
        let last = i + 1 == n;
        if let Some(u) = l.outer_udp {
            let u = u - ETH_LEN;
            set_ip_len(&mut scratch[..], total, i as u16);
            put16(scratch, u + 4, (total - u) as u16);
            // VXLAN over IPv4 sends no outer UDP checksum by default; zero is
            // a valid "none" on IPv4 whatever the sender asked for.
            put16(scratch, u + 6, 0);
        }
        set_ip_len(&mut scratch[ip..], total - ip, i as u16);
        if l.proto == PROTO_TCP {
            let seq = first_seq.wrapping_add((i * mss) as u32);
            scratch[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            let mut f = tcp_flags;
            if !last {
                f &= !(0x01 | 0x08); // FIN, PSH only on the last
            }
            if i != 0 {
                f &= !0x80; // CWR only on the first
            }
            scratch[l4 + 13] = f;
        } else {
            put16(scratch, l4 + 4, (total - l4) as u16);
        }
        fill_l4_csum(scratch, ip, l4, l.proto);
        emit(scratch);
    }
    Ok(n)
}

/// Which burst a decrypted packet can join: a TCP segment inside VXLAN over
/// IPv4, inner IPv4, with only ACK (and PSH) set.
#[derive(Debug, Clone, Copy)]
struct TcpInTunnel {
    /// Offset of the inner IPv4 header in the packet (outer IP first).
    inner_ip: usize,
    tcp: usize,
    hdr_len: usize,
    seq: u32,
    flags: u8,
}

fn tcp_in_tunnel(p: &[u8]) -> Option<TcpInTunnel> {
    if p.len() < 20 || p[0] != 0x45 || p[9] != PROTO_UDP || be16(p, 6) & 0x3fff != 0 {
        return None;
    }
    let u = 20;
    // VXLAN: the "I" flag and the inner Ethernet header.
    let vx = u + 8;
    let eth = vx + VXLAN_LEN;
    let inner_ip = eth + ETH_LEN;
    if p.len() < inner_ip + 40 || p[vx] & 0x08 == 0 || be16(p, eth + 12) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &p[inner_ip..];
    if ip[0] != 0x45 || ip[9] != PROTO_TCP || be16(ip, 6) & 0x3fff != 0 {
        return None;
    }
    if usize::from(be16(ip, 2)) != ip.len() || usize::from(be16(p, 2)) != p.len() {
        return None;
    }
    let tcp = inner_ip + 20;
    let thl = usize::from(p[tcp + 12] >> 4) * 4;
    let flags = p[tcp + 13];
    // ACK alone or ACK+PSH; anything else goes through on its own.
    if thl < 20 || tcp + thl > p.len() || flags & !0x08 != 0x10 {
        return None;
    }
    Some(TcpInTunnel {
        inner_ip,
        tcp,
        hdr_len: tcp + thl,
        seq: be32(p, tcp + 4),
        flags,
    })
}

/// Builds frames for the TAP from decrypted IP packets, merging consecutive
/// in-order TCP segments of one VXLAN-wrapped flow into one GSO burst.
///
/// Frames are appended to an output buffer as `[vnet hdr][Ethernet][IP...]`;
/// [`Coalescer::frames`] lists their ranges.
pub struct Coalescer {
    /// Ethernet header put in front of every packet (dst = the TAP's MAC).
    eth: [u8; ETH_LEN],
    /// Whether the TAP accepts tunnel GSO frames (otherwise never merge).
    merge: bool,
    buf: Vec<u8>,
    frames: Vec<(usize, usize)>,
    /// The open burst: start of its frame in `buf`, its first segment's
    /// parse, its segment count, payload size and next expected sequence.
    open: Option<Open>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    start: usize,
    first: TcpInTunnel,
    segs: usize,
    mss: usize,
    next_seq: u32,
}

impl Coalescer {
    /// `dst_mac`: the TAP's address; `merge`: whether to build GSO bursts.
    pub fn new(dst_mac: [u8; 6], merge: bool) -> Coalescer {
        let mut eth = [0u8; ETH_LEN];
        eth[..6].copy_from_slice(&dst_mac);
        // A fixed, locally administered source: the "peer side" of the TAP.
        eth[6..12].copy_from_slice(&[0x02, 0x6d, 0x77, 0x67, 0x00, 0x01]);
        eth[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        Coalescer {
            eth,
            merge,
            buf: Vec::with_capacity(1 << 20),
            frames: Vec::new(),
            open: None,
        }
    }

    /// Adds one decrypted IPv4 packet.
    pub fn push(&mut self, pkt: &[u8]) {
        let parsed = if self.merge { tcp_in_tunnel(pkt) } else { None };
        if let (Some(p), Some(o)) = (parsed, self.open)
            && self.can_join(&o, pkt, &p)
        {
            let payload = &pkt[p.hdr_len..];
            self.buf.extend_from_slice(payload);
            let o = Open {
                segs: o.segs + 1,
                next_seq: o.next_seq.wrapping_add(payload.len() as u32),
                ..o
            };
            // PSH, or a short segment, ends the burst.
            let ends = p.flags & 0x08 != 0 || payload.len() < o.mss;
            if ends {
                self.buf[o.start + VNET_HDR_LEN + ETH_LEN + o.first.tcp + 13] |= p.flags & 0x08;
                self.close_with(o);
            } else {
                self.open = Some(o);
            }
            return;
        }
        self.close();
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; VNET_HDR_LEN]);
        self.buf.extend_from_slice(&self.eth);
        self.buf.extend_from_slice(pkt);
        match parsed {
            Some(p) if pkt.len() > p.hdr_len && p.flags & 0x08 == 0 => {
                self.open = Some(Open {
                    start,
                    first: p,
                    segs: 1,
                    mss: pkt.len() - p.hdr_len,
                    next_seq: p.seq.wrapping_add((pkt.len() - p.hdr_len) as u32),
                });
            }
            _ => {
                // Checksums were made by the sender and the AEAD vouches for
                // every byte since.
                let h = VnetHdr {
                    flags: F_DATA_VALID,
                    ..VnetHdr::default()
                };
                h.write(&mut self.buf[start..]);
                self.frames.push((start, self.buf.len()));
            }
        }
    }

    fn can_join(&self, o: &Open, pkt: &[u8], p: &TcpInTunnel) -> bool {
        let f = &self.buf[o.start + VNET_HDR_LEN + ETH_LEN..];
        let payload = pkt.len() - p.hdr_len;
        payload > 0
            && payload <= o.mss
            && o.segs < MAX_MERGE_SEGS
            && p.seq == o.next_seq
            && p.hdr_len == o.first.hdr_len
            && f.len() + payload <= MAX_IP_LEN
            // Same outer addresses/ports, VXLAN header and inner Ethernet.
            && f[12..20] == pkt[12..20]
            && f[20..24] == pkt[20..24]
            && f[28..p.inner_ip] == pkt[28..p.inner_ip]
            // Same inner TOS, TTL, addresses.
            && f[p.inner_ip + 1] == pkt[p.inner_ip + 1]
            && f[p.inner_ip + 8] == pkt[p.inner_ip + 8]
            && f[p.inner_ip + 12..p.inner_ip + 20] == pkt[p.inner_ip + 12..p.inner_ip + 20]
            // Same ports, ack, window and options (timestamps included).
            && f[p.tcp..p.tcp + 4] == pkt[p.tcp..p.tcp + 4]
            && f[p.tcp + 8..p.tcp + 12] == pkt[p.tcp + 8..p.tcp + 12]
            && f[p.tcp + 14..p.tcp + 16] == pkt[p.tcp + 14..p.tcp + 16]
            && f[p.tcp + 20..p.hdr_len] == pkt[p.tcp + 20..p.hdr_len]
    }

    /// Ends the open burst, if any.
    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            self.close_with(o);
        }
    }

    fn close_with(&mut self, o: Open) {
        self.open = None;
        let start = o.start;
        let end = self.buf.len();
        let t = o.first;
        let h = if o.segs == 1 {
            VnetHdr {
                flags: F_DATA_VALID,
                ..VnetHdr::default()
            }
        } else {
            let pkt = &mut self.buf[start + VNET_HDR_LEN + ETH_LEN..end];
            let total = pkt.len();
            put16(pkt, 2, total as u16);
            fix_ipv4_csum(pkt);
            put16(pkt, 20 + 4, (total - 20) as u16);
            put16(pkt, 20 + 6, 0);
            let inner_len = total - t.inner_ip;
            put16(&mut pkt[t.inner_ip..], 2, inner_len as u16);
            fix_ipv4_csum(&mut pkt[t.inner_ip..]);
            // As a sending stack leaves it for segmentation offload: the
            // pseudo-header sum (not inverted) in the checksum field.
            let tcp_len = total - t.tcp;
            let ps = csum_fold(pseudo_sum(&pkt[t.inner_ip..], PROTO_TCP, tcp_len));
            put16(pkt, t.tcp + 16, ps);
            VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
                hdr_len: (ETH_LEN + t.hdr_len) as u16,
                gso_size: o.mss as u16,
                csum_start: (ETH_LEN + t.tcp) as u16,
                csum_offset: 16,
                outer_th_offset: (ETH_LEN + 20) as u16,
                inner_nh_offset: (ETH_LEN + t.inner_ip) as u16,
            }
        };
        h.write(&mut self.buf[start..]);
        self.frames.push((start, end));
    }

    /// Closes the open burst; the frames built so far are ready.
    pub fn flush(&mut self) {
        self.close();
    }

    /// The built frames (after [`Coalescer::flush`]).
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        self.frames.iter().map(|&(s, e)| &self.buf[s..e])
    }

    /// How many frames are ready.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame is ready.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Forgets every frame, keeping the buffer.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.frames.clear();
        self.open = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent checksum: plain 16-bit word loop.
    fn naive_sum(parts: &[&[u8]]) -> u16 {
        let mut all = Vec::new();
        for p in parts {
            all.extend_from_slice(p);
        }
        if all.len() % 2 == 1 {
            all.push(0);
        }
        let mut s: u32 = 0;
        for w in all.chunks(2) {
            s += u32::from(u16::from_be_bytes([w[0], w[1]]));
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn ipv4_ok(ip: &[u8]) -> bool {
        naive_sum(&[&ip[..20]]) == 0xffff
    }

    fn tcp_ok(ip: &[u8]) -> bool {
        let tcp = &ip[20..];
        let len = (tcp.len() as u16).to_be_bytes();
        naive_sum(&[&ip[12..20], &[0, 6], &len, tcp]) == 0xffff
    }

    const MSS: usize = 1338;

    /// A VXLAN-wrapped TCP burst as the TAP hands it over with tunnel GSO.
    fn burst(payload: &[u8], flags: u8) -> (VnetHdr, Vec<u8>) {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xaa; 6]);
        f.extend_from_slice(&[0xbb; 6]);
        f.extend_from_slice(&[0x08, 0x00]);
        let outer_ip = f.len();
        f.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        let udp = f.len();
        f.extend_from_slice(&[0xc0, 0x01, 0x12, 0xb5, 0, 0, 0, 0]);
        f.extend_from_slice(&[0x08, 0, 0, 0, 0, 0x10, 0x00, 0]);
        f.extend_from_slice(&[0x02, 1, 1, 1, 1, 1, 0x02, 2, 2, 2, 2, 2, 0x08, 0x00]);
        let ip = f.len();
        f.extend_from_slice(&[0x45, 0, 0, 0, 0x55, 0x00, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[192, 168, 0, 1, 192, 168, 0, 2]);
        let tcp = f.len();
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        f.extend_from_slice(&0xfffff000u32.to_be_bytes()); // seq wraps inside
        f.extend_from_slice(&7u32.to_be_bytes());
        f.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0xde, 0xad, 0, 0]);
        // 12 bytes of options: NOP NOP timestamps.
        f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        let hdr_len = f.len();
        f.extend_from_slice(payload);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
            hdr_len: hdr_len as u16,
            gso_size: MSS as u16,
            csum_start: tcp as u16,
            csum_offset: 16,
            outer_th_offset: udp as u16,
            inner_nh_offset: ip as u16,
        };
        let _ = outer_ip;
        (h, f)
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn checksum_matches_naive_for_odd_and_even_lengths() {
        for n in [0usize, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1499, 1500, 65_535] {
            let b = payload(n);
            assert_eq!(checksum(&b), !naive_sum(&[&b]), "length {n}");
        }
    }

    #[test]
    fn split_gives_valid_segments_and_merge_restores_the_burst() {
        let data = payload(MSS * 20 + 123);
        let (h, frame) = burst(&data, 0x18); // ACK|PSH
        let mut scratch = Vec::new();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        let n = split(&h, &frame, &mut scratch, |s| segs.push(s.to_vec())).expect("split");
        assert_eq!(n, 21);
        assert_eq!(segs.len(), 21);
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(ipv4_ok(s), "outer ip csum, seg {i}");
            assert_eq!(usize::from(be16(s, 2)), s.len());
            assert_eq!(be16(s, 4), 0x1234u16.wrapping_add(i as u16));
            assert_eq!(usize::from(be16(s, 24)), s.len() - 20, "outer udp len");
            let inner = &s[50..];
            assert!(ipv4_ok(inner), "inner ip csum, seg {i}");
            assert_eq!(usize::from(be16(inner, 2)), inner.len());
            assert!(tcp_ok(inner), "tcp csum, seg {i}");
            let seq = be32(inner, 24);
            assert_eq!(seq, 0xfffff000u32.wrapping_add((i * MSS) as u32));
            let flags = inner[33];
            assert_eq!(flags & 0x08 != 0, i == 20, "PSH only on the last");
            got.extend_from_slice(&inner[52..]);
            if i < 20 {
                assert_eq!(inner.len() - 52, MSS);
            }
        }
        assert_eq!(got, data);

        // Merge back.
        let mut c = Coalescer::new([0xaa; 6], true);
        for s in &segs {
            c.push(s);
        }
        c.flush();
        assert_eq!(c.len(), 1);
        let out = c.frames().next().expect("one frame").to_vec();
        let vh = VnetHdr::parse(&out).expect("vnet hdr");
        assert_eq!(vh.gso_type, GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4);
        assert_eq!(usize::from(vh.gso_size), MSS);
        assert_eq!(vh.flags, F_NEEDS_CSUM);
        let merged = &out[VNET_HDR_LEN..];
        // Same headers as the original burst except lengths/checksums.
        assert_eq!(merged.len(), frame.len());
        assert_eq!(&merged[usize::from(vh.hdr_len)..], &data[..]);
        assert_eq!(vh.hdr_len, h.hdr_len);
        assert_eq!(vh.csum_start, h.csum_start);
        assert_eq!(vh.inner_nh_offset, h.inner_nh_offset);
        assert_eq!(vh.outer_th_offset, h.outer_th_offset);
        let ip = &merged[14..];
        assert!(ipv4_ok(ip));
        assert!(ipv4_ok(&ip[50..]));
        assert_eq!(usize::from(be16(ip, 2)), ip.len());
        assert_eq!(be32(ip, 50 + 24), 0xfffff000);
        assert_eq!(ip[50 + 33], 0x18, "the last segment's PSH kept");
        // Splitting the merged burst again gives the same segments.
        let mut again: Vec<Vec<u8>> = Vec::new();
        let vh2 = VnetHdr {
            flags: vh.flags,
            ..vh
        };
        split(&vh2, merged, &mut scratch, |s| again.push(s.to_vec())).expect("resplit");
        assert_eq!(again.len(), segs.len());
        for (a, b) in again.iter().zip(&segs) {
            // IP IDs differ (the merged frame keeps the first); payload,
            // sequence and TCP checksum must match.
            assert_eq!(a[50..], b[50..]);
        }
    }

    #[test]
    fn merge_stops_at_gaps_and_other_flows() {
        let data = payload(MSS * 4);
        let (h, frame) = burst(&data, 0x10);
        let mut scratch = Vec::new();
        let mut segs: Vec<Vec<u8>> = Vec::new();
        split(&h, &frame, &mut scratch, |s| segs.push(s.to_vec())).expect("split");
        assert_eq!(segs.len(), 4);
        let mut c = Coalescer::new([0xaa; 6], true);
        // 0, 1, then 3 (gap), then 2 (out of order).
        c.push(&segs[0]);
        c.push(&segs[1]);
        c.push(&segs[3]);
        c.push(&segs[2]);
        c.flush();
        let frames: Vec<Vec<u8>> = c.frames().map(<[u8]>::to_vec).collect();
        assert_eq!(frames.len(), 3);
        let gso: Vec<u8> = frames.iter().map(|f| f[1]).collect();
        assert_eq!(gso, [GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4, 0, 0]);
        // Without merging every packet is its own frame.
        let mut c = Coalescer::new([0xaa; 6], false);
        for s in &segs {
            c.push(s);
        }
        c.flush();
        assert_eq!(c.len(), 4);
        for (f, s) in c.frames().zip(&segs) {
            assert_eq!(&f[VNET_HDR_LEN + 14..], &s[..]);
            assert_eq!(f[0], F_DATA_VALID);
        }
    }

    #[test]
    fn non_gso_needs_csum_is_completed() {
        let data = payload(300);
        let (mut h, mut frame) = burst(&data, 0x18);
        h.gso_type = GSO_NONE;
        // Lengths as a non-GSO packet has them; checksum field = pseudo sum.
        let total = frame.len() - 14;
        put16(&mut frame, 16, total as u16);
        let inner = usize::from(h.inner_nh_offset);
        let ilen = frame.len() - inner;
        put16(&mut frame, inner + 2, ilen as u16);
        let tcp = usize::from(h.csum_start);
        let ps = csum_fold(pseudo_sum(&frame[inner..], 6, frame.len() - tcp));
        put16(&mut frame, tcp + 16, ps);
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        split(&h, &frame, &mut scratch, |s| out.push(s.to_vec())).expect("split");
        assert_eq!(out.len(), 1);
        assert!(tcp_ok(&out[0][50..]));
    }

    #[test]
    fn truncated_frames_are_refused() {
        let (h, frame) = burst(&payload(5000), 0x10);
        let mut scratch = Vec::new();
        for cut in [10, 40, 60, 90, 100] {
            let r = split(&h, &frame[..cut], &mut scratch, |_| {});
            assert!(r.is_err(), "cut at {cut}");
        }
    }
}
