//! Node-wide data-path settings every driver works with.

use std::net::Ipv4Addr;

use crate::overlay;

/// Node-wide data-path settings the sandboxes are wired with.
#[derive(Clone, Debug)]
pub struct DataPath {
    /// Prefix of every namespace this daemon makes (unique per node).
    pub prefix: String,
    pub local_ip: Ipv4Addr,
    pub port: u16,
    /// MTU for overlays without --opt mtu: the underlay's, minus VXLAN's 50.
    pub overlay_mtu: u32,
    /// Held while changing what is node-wide and shared (a network's
    /// namespace, bridge and VXLAN, `mesh_gwbridge`, the node's tables):
    /// the node-wide half of a reconcile pass and the few such steps of a
    /// start, connect or teardown (both may create the same VXLAN). Never
    /// held for work inside one sandbox's namespace.
    pub kernel: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// MTU of the interface holding `ip` (the underlay), minus VXLAN's 50 bytes
/// of headers; 1450 if it cannot be found.
pub async fn overlay_mtu_for(ip: Ipv4Addr) -> u32 {
    let Ok(nl) = crate::link::Netlink::open(None).await else {
        return 1450;
    };
    let Ok(links) = nl.links().await else {
        return 1450;
    };
    for l in links {
        if nl
            .addresses_v4(&l.name)
            .await
            .is_ok_and(|a| a.iter().any(|(a, _)| *a == ip))
        {
            return l.mtu.saturating_sub(50).max(576);
        }
    }
    1450
}

/// Bytes WireGuard adds to what it carries: outer IPv4 (20) and UDP (8),
/// its data header (16) and the Poly1305 tag (16).
pub const WIREGUARD_OVERHEAD: u32 = 60;

impl DataPath {
    /// The underlay's MTU: the default for local networks.
    pub fn underlay_mtu(&self) -> u32 {
        self.overlay_mtu + 50
    }

    /// MTU of an overlay without `--opt mtu`: an encrypted one also leaves
    /// room for WireGuard, so a full-size inner packet is never fragmented.
    pub fn default_overlay_mtu(&self, encrypted: bool) -> u32 {
        if encrypted {
            self.overlay_mtu.saturating_sub(WIREGUARD_OVERHEAD).max(576)
        } else {
            self.overlay_mtu
        }
    }

    /// The drivers' view of this node: its namespace prefix, and the
    /// daemon's own namespace as the underlay.
    pub fn node(&self) -> overlay::Node {
        overlay::Node::host(self.prefix.clone())
    }
}
