//! Neighbour tables of a device: the FDB (AF_BRIDGE; on a VXLAN, which
//! node a MAC lives on) and ARP entries (AF_INET; which MAC an IP has),
//! programmed statically by the overlay instead of learned.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use nix::errno::Errno;

use super::{Mac, NetError, Netlink, fmt_mac, mac_from};

/// One FDB entry of a device (AF_BRIDGE neighbour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: Mac,
    /// For a VXLAN entry: the remote node's underlay address.
    pub dst: Option<Ipv4Addr>,
    /// NTF_SELF: the device's own table (what we program on a VXLAN), as
    /// opposed to the bridge's view of the port.
    pub own: bool,
    pub permanent: bool,
}

/// The remote of a VXLAN FDB entry. The parser cannot know an AF_BRIDGE
/// entry's address family, so an IPv4 remote arrives as four raw bytes.
fn fdb_dst(a: &NeighbourAddress) -> Option<Ipv4Addr> {
    match a {
        NeighbourAddress::Inet(ip) => Some(*ip),
        NeighbourAddress::Other(raw) => {
            <[u8; 4]>::try_from(raw.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    }
}

/// One IPv4 neighbour (ARP) entry of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighEntry {
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// One entry of a neighbour dump, before it is read as an FDB or ARP entry.
struct Neighbour {
    mac: Option<Mac>,
    dst: Option<NeighbourAddress>,
    flags: NeighbourFlags,
    permanent: bool,
}

impl Neighbour {
    fn from_message(m: NeighbourMessage) -> Self {
        let mut n = Neighbour {
            mac: None,
            dst: None,
            flags: m.header.flags,
            permanent: m.header.state == NeighbourState::Permanent,
        };
        for a in m.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(l) => n.mac = mac_from(&l),
                NeighbourAttribute::Destination(d) => n.dst = Some(d),
                _ => {}
            }
        }
        n
    }
}

impl Netlink {
    /// The neighbour table of one family (AF_BRIDGE: the FDB; AF_INET:
    /// ARP) restricted to device `dev`, with each entry's link-layer
    /// address and destination. `what` names the table in errors.
    async fn neighbour_dump(
        &self,
        dev: &str,
        family: AddressFamily,
        what: &str,
    ) -> Result<Vec<Neighbour>, NetError> {
        let idx = self.require_any(dev).await?;
        // The kernel dumps every device's table; filtering here is simpler
        // than the two filter dialects (legacy and strict) it accepts.
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err(format!("list the {what} of {dev}"), e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == idx)
            .map(Neighbour::from_message)
            .collect())
    }

    /// Deletes one neighbour (or FDB) entry; absent is fine.
    async fn neighbour_del(&self, msg: NeighbourMessage, what: String) -> Result<(), NetError> {
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = self.err(what, e);
                if e.errno() == Some(Errno::ENOENT) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// FDB entries of a device (both its own and the bridge's about it).
    pub async fn fdb_entries(&self, dev: &str) -> Result<Vec<FdbEntry>, NetError> {
        let entries = self
            .neighbour_dump(dev, AddressFamily::Bridge, "FDB")
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|n| {
                Some(FdbEntry {
                    mac: n.mac?,
                    dst: n.dst.as_ref().and_then(fdb_dst),
                    own: n.flags.contains(NeighbourFlags::Own),
                    permanent: n.permanent,
                })
            })
            .collect())
    }

    /// Adds (or replaces the destination of) a static FDB entry on a VXLAN:
    /// frames for `mac` go to the node at `dst`.
    pub async fn fdb_replace(&self, dev: &str, mac: Mac, dst: Ipv4Addr) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        self.handle
            .neighbours()
            .add_bridge(idx, &mac)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .destination(IpAddr::V4(dst))
            .replace()
            .execute()
            .await
            .map_err(|e| {
                self.err(
                    format!("set FDB entry {} dst {dst} on {dev}", fmt_mac(&mac)),
                    e,
                )
            })
    }

    /// Deletes a device's own FDB entry for `mac` (only the `dst` remote,
    /// when given). Absent is fine.
    pub async fn fdb_del(
        &self,
        dev: &str,
        mac: Mac,
        dst: Option<Ipv4Addr>,
    ) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = idx;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        if let Some(dst) = dst {
            msg.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        }
        self.neighbour_del(msg, format!("delete FDB entry {} on {dev}", fmt_mac(&mac)))
            .await
    }

    /// IPv4 neighbour entries of a device.
    pub async fn neighbours_v4(&self, dev: &str) -> Result<Vec<NeighEntry>, NetError> {
        let entries = self
            .neighbour_dump(dev, AddressFamily::Inet, "neighbours")
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|n| match n.dst {
                Some(NeighbourAddress::Inet(ip)) => Some(NeighEntry {
                    ip,
                    mac: n.mac,
                    permanent: n.permanent,
                }),
                _ => None,
            })
            .collect())
    }

    /// Adds or replaces a permanent neighbour entry `ip` → `mac` on a device.
    pub async fn neigh_replace(&self, dev: &str, ip: Ipv4Addr, mac: Mac) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        self.handle
            .neighbours()
            .add(idx, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                self.err(
                    format!("set neighbour {ip} lladdr {} on {dev}", fmt_mac(&mac)),
                    e,
                )
            })
    }

    /// Deletes the neighbour entry for `ip` on a device. Absent is fine.
    pub async fn neigh_del(&self, dev: &str, ip: Ipv4Addr) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = idx;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        self.neighbour_del(msg, format!("delete neighbour {ip} on {dev}"))
            .await
    }
}
