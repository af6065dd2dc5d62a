//! Userspace WireGuard for encrypted overlays.
//!
//! The VXLAN devices of encrypted networks are created in a private
//! namespace (`{prefix}-wg`) whose only route to the peers' underlay IPs is a
//! TAP device held by this process. Every VXLAN packet of such a network is
//! therefore read here, encrypted with the peer's WireGuard session
//! (boringtun's I/O-free `noise::Tunn`) and sent from a UDP socket in the
//! node's namespace; received datagrams are decrypted, checked against the
//! peer's address and written back to the TAP.
//!
//! The data path avoids one syscall per packet: the TAP hands over whole
//! VXLAN-wrapped TCP bursts (tunnel GSO), which `offload` splits into
//! segments, and the UDP socket sends them with one GSO `sendmsg` and
//! receives with `recvmmsg` + GRO. Where the kernel refuses tunnel GSO on the
//! TAP, the device falls back to plain per-packet TAP I/O (`Datapath::Batch`).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::SystemTime;

mod engine;
pub mod offload;
mod peers;
mod socket;
mod tap;

/// Where and how the device runs.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Named namespace (under /run/netns) for the TAP; created if missing.
    pub tap_ns: String,
    /// The TAP's name, e.g. "mwg0".
    pub tap_name: String,
    /// Namespace of the outer UDP socket; `None` = this process's.
    pub udp_ns: Option<String>,
    /// The node's underlay IP: the TAP's address (/32) and the socket's
    /// bind address.
    pub local_ip: Ipv4Addr,
    /// UDP port of the outer socket (51820 in production).
    pub listen_port: u16,
    /// TAP MTU (underlay MTU - 60).
    pub mtu: u32,
    /// This node's X25519 private key.
    pub private_key: [u8; 32],
}

/// One peer: a node sharing an encrypted network with this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub node_id: String,
    pub public_key: [u8; 32],
    /// The peer's underlay IP: its endpoint and its only allowed inner source.
    pub addr: Ipv4Addr,
}

/// Which data path the device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    /// Whole VXLAN bursts from the TAP (tunnel GSO), UDP GSO/GRO.
    TunnelGso,
    /// Per-packet TAP I/O, batched socket I/O.
    Batch,
}

impl fmt::Display for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Datapath::TunnelGso => "tunnel-gso",
            Datapath::Batch => "batch",
        })
    }
}

/// What one peer's session looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub node_id: String,
    pub public_key: [u8; 32],
    pub endpoint: SocketAddrV4,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What the device looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub datapath: Datapath,
    pub listen_port: u16,
    pub public_key: [u8; 32],
    pub peers: Vec<PeerStatus>,
}

/// Errors of the WireGuard device, each saying what to check.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// Namespace or rtnetlink work failed.
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    /// The TAP device could not be opened or configured.
    #[error(
        "cannot set up TAP device {name} in namespace {ns}: {action}: {source} (is /dev/net/tun present and are we root?)"
    )]
    Tap {
        name: String,
        ns: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The outer UDP socket could not be opened.
    #[error(
        "cannot open the WireGuard UDP socket on {addr}: {action}: {source} (is the port in use, or the address not on this node?)"
    )]
    Socket {
        addr: SocketAddrV4,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A device configuration that cannot be made real.
    #[error("invalid WireGuard device configuration: {0}")]
    Config(String),
    /// A peer list that cannot be made real.
    #[error("invalid WireGuard peers: {0}")]
    InvalidPeers(String),
    /// A worker thread could not be started.
    #[error("cannot start the WireGuard {what} thread: {source}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The device's threads are gone (a previous fatal error).
    #[error("the WireGuard device has stopped: {0}")]
    Stopped(String),
}

pub use crate::overlay::tunnel_ns_name as namespace_name;

pub use engine::Device;
