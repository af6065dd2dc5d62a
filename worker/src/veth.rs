//! A sandbox's veth pair onto a bridge, shared by the overlay and local
//! bridge drivers (and the sandbox-end setup by macvlan): create it with one
//! end already in the sandbox, then make both ends match the attachment.
//! Each step checks the kernel first, so calling again repairs drift.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use crate::link::Netlink;
use crate::netns::{self, NetError};
use crate::overlay::Attachment;

/// Creates the pair: `outer` in `net`'s namespace labelled `owner`, the
/// other end created straight in the sandbox as `tmp`, then given its MAC
/// and renamed to the attachment's interface name.
pub(crate) async fn create_pair(
    net: &Netlink,
    sb: &Netlink,
    a: &Attachment,
    outer: &str,
    tmp: &str,
    owner: &str,
) -> Result<(), NetError> {
    // A stray temporary end in the sandbox would block the create; it
    // cannot be anyone else's since the name carries our hash.
    sb.delete(tmp).await?;
    let sb_fd = netns::open(&a.sandbox_ns)?;
    net.create_veth(outer, tmp, a.mtu, Some(sb_fd.as_fd()))
        .await?;
    let named = async {
        net.set_alias(outer, owner).await?;
        sb.set_mac(tmp, a.mac).await?;
        sb.rename(tmp, &a.ifname).await
    };
    if let Err(e) = named.await {
        let _ = net.delete(outer).await;
        return Err(e);
    }
    Ok(())
}

/// The node end: MTU, on `bridge`, up.
pub(crate) async fn configure_bridge_port(
    net: &Netlink,
    bridge: &str,
    a: &Attachment,
    outer: &str,
) -> Result<(), NetError> {
    let o = net.link(outer).await?.ok_or_else(|| NetError::NoDevice {
        dev: outer.into(),
        ns: net.ns().into(),
        hint: "it vanished while attaching; the next attach recreates it",
    })?;
    let br = net
        .require(bridge, "the bridge vanished while attaching")
        .await?;
    if o.mtu != a.mtu {
        net.set_mtu(outer, a.mtu).await?;
    }
    if o.master != Some(br) {
        net.set_master(outer, bridge).await?;
    }
    if !o.up {
        net.set_up(outer).await?;
    }
    Ok(())
}

/// The sandbox end (a veth or a macvlan): MAC, MTU, exactly the one
/// address, up, and the default route via `gateway` when given.
pub(crate) async fn configure_sandbox_end(
    sb: &Netlink,
    a: &Attachment,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let i = sb
        .link(&a.ifname)
        .await?
        .ok_or_else(|| NetError::NoDevice {
            dev: a.ifname.clone(),
            ns: sb.ns().into(),
            hint: "it vanished while attaching; the next attach recreates it",
        })?;
    let mut up = i.up;
    if i.mac != Some(a.mac) {
        // A macvlan refuses a new MAC while up.
        if up {
            sb.set_down(&a.ifname).await?;
            up = false;
        }
        sb.set_mac(&a.ifname, a.mac).await?;
    }
    if i.mtu != a.mtu {
        sb.set_mtu(&a.ifname, a.mtu).await?;
    }
    sb.ensure_only_address_v4(&a.ifname, a.ip, a.prefix).await?;
    if !up {
        sb.set_up(&a.ifname).await?;
    }
    // After "up": the gateway is reachable only once the connected route of
    // the interface's subnet exists.
    if let Some(gw) = gateway {
        sb.replace_default_route(gw, &a.ifname).await?;
    }
    Ok(())
}
