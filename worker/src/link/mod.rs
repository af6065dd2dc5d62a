//! Small async helpers over rtnetlink for the few things the data path does
//! to devices: create bridges, veth pairs and VXLAN devices, move and
//! configure them, and program addresses, routes, FDB and neighbour entries.
//!
//! Every helper works on one namespace through a [`Netlink`] (a handle opened
//! with [`crate::netns::handle_in`]) and reports failures with the device and
//! the namespace, so a log line is enough to find the culprit.
//!
//! - this file: devices (look up, create, move, rename, configure, delete);
//! - `addr`: IPv4 addresses and routes;
//! - `neigh`: FDB and ARP entries.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoData, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use nix::errno::Errno;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan};
use tracing::debug;

pub use crate::netns::NetError;
pub use neigh::{FdbEntry, NeighEntry};
pub use route::Route4;

mod addr;
mod neigh;
mod route;

/// A MAC address.
pub type Mac = [u8; 6];

/// Formats a MAC the way `ip link` prints it.
pub fn fmt_mac(mac: &Mac) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

pub(crate) fn mac_from(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

/// What the kernel says about one device (the parts the data path checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `veth`, `vxlan`, ...; `None` for devices without a kind (lo).
    pub kind: Option<String>,
    pub mtu: u32,
    pub mac: Option<Mac>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Index of the bridge the device is enslaved to.
    pub master: Option<u32>,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub link: Option<u32>,
    /// IFLA_IFALIAS: a free-form label; the overlay marks its veths with
    /// their owner so a name collision is never mistaken for a stale device.
    pub alias: Option<String>,
    /// Set when the device is a VXLAN.
    pub vxlan: Option<VxlanInfo>,
}

/// A VXLAN device's settings as the kernel reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub group: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub learning: Option<bool>,
    pub proxy: Option<bool>,
    pub l2miss: Option<bool>,
    pub l3miss: Option<bool>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mtu: 0,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            master: None,
            link: None,
            alias: None,
            vxlan: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Address(a) => link.mac = mac_from(a),
                LinkAttribute::Controller(m) if *m != 0 => link.master = Some(*m),
                LinkAttribute::Link(l) if *l != 0 => link.link = Some(*l),
                LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                link.vxlan = Some(VxlanInfo::from_attrs(v))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

impl VxlanInfo {
    fn from_attrs(attrs: &[InfoVxlan]) -> Self {
        let mut v = VxlanInfo::default();
        for a in attrs {
            match a {
                InfoVxlan::Id(id) => v.vni = Some(*id),
                InfoVxlan::Local(ip) => v.local = Some(*ip),
                InfoVxlan::Group(ip) if !ip.is_unspecified() => v.group = Some(*ip),
                InfoVxlan::Port(p) => v.port = Some(*p),
                InfoVxlan::Learning(b) => v.learning = Some(*b),
                InfoVxlan::Proxy(b) => v.proxy = Some(*b),
                InfoVxlan::L2Miss(b) => v.l2miss = Some(*b),
                InfoVxlan::L3Miss(b) => v.l3miss = Some(*b),
                _ => {}
            }
        }
        v
    }
}

/// How a VXLAN device is made for an overlay: unicast only (no group),
/// static FDB (no learning), ARP answered locally from the neighbour table
/// (proxy), no miss notifications since nobody listens for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub name: String,
    pub vni: u32,
    /// Source address of the encapsulated packets: the node's underlay IP.
    pub local: Ipv4Addr,
    /// Destination UDP port (the data-path port, 4789 by default).
    pub port: u16,
    pub mtu: u32,
}

impl VxlanConfig {
    /// Whether an existing device was made with these settings (MTU aside,
    /// which can be changed in place).
    pub fn matches(&self, info: &VxlanInfo) -> bool {
        info.vni == Some(self.vni)
            && info.local == Some(self.local)
            && info.port == Some(self.port)
            && info.group.is_none()
            && info.learning == Some(false)
            && info.proxy == Some(true)
    }
}

/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;

/// Refuses a name the kernel would reject with a cryptic ERANGE.
pub fn check_ifname(name: &str) -> Result<(), NetError> {
    if name.is_empty()
        || name.len() > MAX_IFNAME
        || name.contains(['/', ' ', ':'])
        || name == "."
        || name == ".."
    {
        return Err(NetError::Invalid(format!(
            "interface name {name:?}: use 1-{MAX_IFNAME} characters without '/', ':' or spaces"
        )));
    }
    Ok(())
}

/// An rtnetlink error as a [`NetError`], keeping the kernel's errno.
pub(crate) fn netlink_error(what: String, ns: &str, e: rtnetlink::Error) -> NetError {
    let errno = match &e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| Errno::from_raw(c.get().abs())),
        _ => None,
    };
    let reason = match errno {
        Some(errno) => errno.desc().to_string(),
        None => e.to_string(),
    };
    NetError::Netlink {
        what,
        ns: ns.to_string(),
        errno,
        reason,
    }
}

/// An rtnetlink handle bound to one namespace, with the namespace's name for
/// error messages.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    ns: String,
}

impl Netlink {
    /// Opens a connection in `ns` (`None`: the node's own namespace).
    pub async fn open(ns: Option<&str>) -> Result<Self, NetError> {
        Ok(Netlink {
            handle: crate::netns::handle_in(ns).await?,
            ns: crate::netns::label(ns),
        })
    }

    /// The raw handle, for requests these helpers do not cover.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The namespace's name as used in messages (`host` for the node's).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    pub(crate) fn err(&self, what: impl Into<String>, e: rtnetlink::Error) -> NetError {
        netlink_error(what.into(), &self.ns, e)
    }

    /// The device called `name`, if there is one.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        // Such a device cannot exist; the kernel would answer ERANGE.
        if check_ifname(name).is_err() {
            return Ok(None);
        }
        let mut stream = self.handle.link().get().match_name(name).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(m))
                if m.code
                    .is_some_and(|c| c.get().abs() == Errno::ENODEV as i32) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.err(format!("look up device {name}"), e)),
        }
    }

    /// All devices of the namespace.
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list devices", e))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Index of the device called `name`, if there is one.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, NetError> {
        Ok(self.link(name).await?.map(|l| l.index))
    }

    /// Index of a device that must exist; `hint` tells the user what to do.
    pub async fn require(&self, name: &str, hint: &'static str) -> Result<u32, NetError> {
        self.index(name).await?.ok_or_else(|| NetError::NoDevice {
            dev: name.to_string(),
            ns: self.ns.clone(),
            hint,
        })
    }

    pub(crate) async fn require_any(&self, name: &str) -> Result<u32, NetError> {
        self.require(name, "it may have been deleted meanwhile")
            .await
    }

    /// Creates a Linux bridge, down.
    pub async fn create_bridge(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        check_ifname(name)?;
        let msg = LinkBridge::new(name).down().mtu(mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.err(format!("create bridge {name}"), e))?;
        debug!(ns = %self.ns, dev = name, "created bridge");
        Ok(())
    }

    /// Creates a veth pair `name` (here) / `peer`; with `peer_ns` the peer is
    /// born in that namespace, so its name never has to be free here.
    pub async fn create_veth(
        &self,
        name: &str,
        peer: &str,
        mtu: u32,
        peer_ns: Option<BorrowedFd<'_>>,
    ) -> Result<(), NetError> {
        check_ifname(name)?;
        check_ifname(peer)?;
        let mut peer_msg = LinkUnspec::new_with_name(peer).mtu(mtu);
        if let Some(fd) = peer_ns {
            peer_msg = peer_msg.setns_by_fd(fd.as_raw_fd());
        }
        let msg = LinkVeth::new(name, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| self.err(format!("create veth pair {name}/{peer}"), e))?;
        debug!(ns = %self.ns, dev = name, peer, "created veth pair");
        Ok(())
    }

    /// Creates a VXLAN device, down. Its UDP socket belongs to this
    /// namespace for good, even if the device is moved elsewhere later.
    pub async fn create_vxlan(&self, c: &VxlanConfig) -> Result<(), NetError> {
        check_ifname(&c.name)?;
        let msg = LinkVxlan::new(&c.name, c.vni)
            .local(c.local)
            .port(c.port)
            .learning(false)
            .proxy(true)
            .l2miss(false)
            .l3miss(false)
            .mtu(c.mtu)
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            self.err(
                format!(
                    "create vxlan {} (vni {}, local {}, port {})",
                    c.name, c.vni, c.local, c.port
                ),
                e,
            )
        })?;
        debug!(ns = %self.ns, dev = %c.name, vni = c.vni, "created vxlan");
        Ok(())
    }

    async fn set(&self, what: String, msg: LinkMessage) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| self.err(what, e))
    }

    /// Moves a device into the namespace `ns_fd` refers to.
    pub async fn move_to_ns(
        &self,
        name: &str,
        ns_fd: BorrowedFd<'_>,
        ns_name: &str,
    ) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx)
            .setns_by_fd(ns_fd.as_raw_fd())
            .build();
        self.set(format!("move {name} to namespace {ns_name}"), msg)
            .await
    }

    /// Renames a device (it must be down).
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<(), NetError> {
        check_ifname(new_name)?;
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx).name(new_name).build();
        self.set(format!("rename {name} to {new_name}"), msg).await
    }

    /// Sets a device administratively up.
    pub async fn set_up(&self, name: &str) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx).up().build();
        self.set(format!("set {name} up"), msg).await
    }

    /// Sets a device administratively down.
    pub async fn set_down(&self, name: &str) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx).down().build();
        self.set(format!("set {name} down"), msg).await
    }

    /// Sets a device's MTU.
    pub async fn set_mtu(&self, name: &str, mtu: u32) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx).mtu(mtu).build();
        self.set(format!("set the MTU of {name} to {mtu}"), msg)
            .await
    }

    /// Sets a device's MAC address.
    pub async fn set_mac(&self, name: &str, mac: Mac) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx)
            .address(mac.to_vec())
            .build();
        self.set(format!("set the MAC of {name} to {}", fmt_mac(&mac)), msg)
            .await
    }

    /// Sets a device's alias (IFLA_IFALIAS).
    pub async fn set_alias(&self, name: &str, alias: &str) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = LinkUnspec::new_with_index(idx).alias(alias).build();
        self.set(format!("set the alias of {name}"), msg).await
    }

    /// Enslaves a device to a bridge.
    pub async fn set_master(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let br = self.require_any(bridge).await?;
        let msg = LinkUnspec::new_with_index(idx).controller(br).build();
        self.set(format!("attach {name} to bridge {bridge}"), msg)
            .await
    }

    /// Deletes a device (a veth takes its peer with it). Returns whether
    /// there was one.
    pub async fn delete(&self, name: &str) -> Result<bool, NetError> {
        let Some(idx) = self.index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(idx).execute().await {
            Ok(()) => {
                debug!(ns = %self.ns, dev = name, "deleted device");
                Ok(true)
            }
            Err(e) => {
                let e = self.err(format!("delete {name}"), e);
                // Gone meanwhile (a veth whose peer was deleted): fine.
                if e.errno() == Some(Errno::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Makes a bridge port isolated (or not): isolated ports of one bridge
    /// cannot reach each other, only the bridge itself and other ports.
    pub async fn set_bridge_port_isolated(&self, name: &str, on: bool) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        // Port settings need RTM_NEWLINK; RTM_SETLINK ignores them.
        let msg = LinkBridgePort::new(idx).isolated(on).build();
        self.handle
            .link()
            .set_port(msg)
            .execute()
            .await
            .map_err(|e| self.err(format!("set bridge port {name} isolated {on}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read-only: a dump of the process's own namespace, needing no root.
    #[tokio::test]
    async fn host_handle_sees_loopback() {
        let nl = Netlink::open(None).await.expect("netlink in the host");
        let lo = nl.link("lo").await.expect("lookup").expect("lo exists");
        assert_eq!(lo.index, 1);
        assert_eq!(nl.ns(), "host");
        assert!(nl.link("mesh-nodev").await.expect("lookup").is_none());
        assert!(
            nl.link("longer-than-ifnamsiz")
                .await
                .expect("lookup")
                .is_none()
        );
        let err = nl
            .create_bridge("longer-than-ifnamsiz", 1500)
            .await
            .expect_err("too long");
        assert!(err.to_string().contains("1-15 characters"), "{err}");
    }

    #[test]
    fn mac_formats_like_ip_link() {
        assert_eq!(fmt_mac(&[0x02, 0x42, 10, 0, 0, 255]), "02:42:0a:00:00:ff");
    }

    #[test]
    fn vxlan_config_match_checks_what_cannot_change_in_place() {
        let c = VxlanConfig {
            name: "vxlan0".into(),
            vni: 4097,
            local: Ipv4Addr::new(192, 0, 2, 1),
            port: 4789,
            mtu: 1450,
        };
        let mut info = VxlanInfo {
            vni: Some(4097),
            local: Some(Ipv4Addr::new(192, 0, 2, 1)),
            group: None,
            port: Some(4789),
            learning: Some(false),
            proxy: Some(true),
            l2miss: Some(false),
            l3miss: Some(false),
        };
        assert!(c.matches(&info));
        info.port = Some(4790);
        assert!(!c.matches(&info));
        info.port = Some(4789);
        info.learning = Some(true);
        assert!(!c.matches(&info));
    }
}
