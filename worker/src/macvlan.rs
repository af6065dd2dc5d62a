//! The kernel side of Docker's `macvlan` driver (bridge mode): a macvlan
//! device on a parent interface of the node, moved into the sandbox;
//! sandboxes on one parent talk to each other through the macvlan's
//! internal switch and to the parent's LAN directly.
//!
//! Like [`crate::local`], every function is a reconciliation step, and the
//! devices are labelled with an alias saying whose they are.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use ipnet::Ipv4Net;
use netlink_packet_route::link::MacVlanMode;
use rtnetlink::LinkMacVlan;
use tracing::{debug, info, warn};

use crate::link::{Netlink, fmt_mac, netlink_error};
use crate::local::{alias_starts, validate_attachment};
use crate::netns::{self, NetError};
use crate::overlay::{Attachment, Node};
use crate::stable_hash::fnv1a48;
use crate::veth;

/// Alias of a sandbox's macvlan, followed by the parent's name.
const MACVLAN_ALIAS: &str = "mesh macvlan on ";

fn macvlan_owner(parent: &str) -> String {
    format!("{MACVLAN_ALIAS}{parent}")
}

/// Temporary name of a sandbox's macvlan between its creation in the node's
/// namespace and its rename inside the sandbox.
fn macvlan_tmp(a: &Attachment) -> String {
    let h = fnv1a48(&[b"macvlan", a.sandbox_ns.as_bytes(), a.ifname.as_bytes()]);
    format!("mlm{h:012x}")
}

/// Connects a sandbox to a macvlan network: a macvlan in bridge mode on
/// `parent`, created in the node's namespace (where the parent is) and
/// moved into the sandbox, renamed `ifname` there, with the MAC, address
/// and MTU, up, and the default route via `gateway` when one is given and
/// the attachment is the sandbox's default (`default_route`). `parent`
/// must exist on the node; its state is the operator's and is not changed.
/// Idempotent: fixes settings in place, recreates a macvlan on the wrong
/// parent.
pub async fn attach_macvlan(
    node: &Node,
    parent: &str,
    a: &Attachment,
    gateway: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    validate_attachment(a)?;
    if let Some(gw) = gateway {
        let net = Ipv4Net::new(a.ip, a.prefix)
            .map_err(|e| NetError::Invalid(format!("prefix length {}: {e}", a.prefix)))?
            .trunc();
        if !net.contains(&gw) || gw == a.ip {
            return Err(NetError::Invalid(format!(
                "gateway {gw} for sandbox {} ({}/{}): it must be another address of {net}",
                a.sandbox_ns, a.ip, a.prefix
            )));
        }
    }
    let host = Netlink::open(node.ns.as_deref()).await?;
    let Some(lower) = host.link(parent).await? else {
        return Err(NetError::Invalid(format!(
            "option parent={parent}: macvlan parent interface {parent} does not exist on this node (namespace {}); see `ip link` for its interfaces",
            host.ns()
        )));
    };
    if a.mtu > lower.mtu {
        return Err(NetError::Invalid(format!(
            "MTU {} for sandbox {}: a macvlan cannot exceed its parent {parent}'s MTU {}",
            a.mtu, a.sandbox_ns, lower.mtu
        )));
    }
    if !lower.up {
        warn!(
            ns = host.ns(),
            parent, "macvlan parent is down: its macvlans have no carrier until it is up"
        );
    }
    let sb = Netlink::open(Some(&a.sandbox_ns)).await?;
    let owner = macvlan_owner(parent);
    match sb.link(&a.ifname).await? {
        Some(i) if i.kind.as_deref() == Some("macvlan") && alias_starts(&i, MACVLAN_ALIAS) => {
            let right = i.alias.as_deref() == Some(owner.as_str()) && i.link == Some(lower.index);
            if !right {
                info!(sandbox = %a.sandbox_ns, ifname = %a.ifname, parent, "macvlan is on another parent; recreating it");
                sb.delete(&a.ifname).await?;
                create_macvlan(&host, &sb, lower.index, a, &owner).await?;
            }
        }
        Some(i) => {
            return Err(NetError::Conflict(format!(
                "interface {} (index {}) already exists in namespace {} and is not a mesh macvlan; detach what owns it or choose another interface name",
                a.ifname, i.index, a.sandbox_ns
            )));
        }
        None => create_macvlan(&host, &sb, lower.index, a, &owner).await?,
    }
    veth::configure_sandbox_end(&sb, a, gateway.filter(|_| a.default_route)).await?;
    debug!(parent, sandbox = %a.sandbox_ns, ifname = %a.ifname, ip = %a.ip, "attached macvlan");
    Ok(())
}

async fn create_macvlan(
    host: &Netlink,
    sb: &Netlink,
    lower: u32,
    a: &Attachment,
    owner: &str,
) -> Result<(), NetError> {
    let tmp = macvlan_tmp(a);
    // Leftovers of an interrupted create: before the move, or before the
    // rename. The hash in the name makes them ours.
    host.delete(&tmp).await?;
    sb.delete(&tmp).await?;
    let sb_fd = netns::open(&a.sandbox_ns)?;
    let msg = LinkMacVlan::new(&tmp, lower, MacVlanMode::Bridge)
        .mtu(a.mtu)
        .address(a.mac.to_vec())
        .build();
    host.handle().link().add(msg).execute().await.map_err(|e| {
        netlink_error(
            format!(
                "create macvlan {tmp} for sandbox {} ({})",
                a.sandbox_ns,
                fmt_mac(&a.mac)
            ),
            host.ns(),
            e,
        )
    })?;
    if let Err(e) = host.move_to_ns(&tmp, sb_fd.as_fd(), &a.sandbox_ns).await {
        let _ = host.delete(&tmp).await;
        return Err(e);
    }
    let named = async {
        sb.set_alias(&tmp, owner).await?;
        sb.rename(&tmp, &a.ifname).await
    };
    if let Err(e) = named.await {
        let _ = sb.delete(&tmp).await;
        return Err(e);
    }
    Ok(())
}

/// Disconnects a sandbox from a macvlan network: deletes its macvlan (and
/// with it the address and routes). Absent is fine, and so is a sandbox
/// that is already gone; an interface of that name that is not a mesh
/// macvlan is left alone with a warning.
pub async fn detach_macvlan(a: &Attachment) -> Result<(), NetError> {
    if !netns::exists(&a.sandbox_ns) {
        return Ok(());
    }
    let sb = Netlink::open(Some(&a.sandbox_ns)).await?;
    if let Some(l) = sb.link(&a.ifname).await? {
        if l.kind.as_deref() == Some("macvlan") && alias_starts(&l, MACVLAN_ALIAS) {
            sb.delete(&a.ifname).await?;
            debug!(sandbox = %a.sandbox_ns, ifname = %a.ifname, "detached macvlan");
        } else {
            warn!(sandbox = %a.sandbox_ns, ifname = %a.ifname, "not deleting an interface that is not a mesh macvlan");
        }
    }
    sb.delete(&macvlan_tmp(a)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_name_fits_ifnamsiz() {
        let a = Attachment {
            sandbox_ns: "a-very-long-sandbox-namespace-name".into(),
            ifname: "eth0".into(),
            ip: Ipv4Addr::new(10, 88, 0, 2),
            prefix: 24,
            mac: mesh_common::model::Mac::for_ip(Ipv4Addr::new(10, 88, 0, 2)).octets(),
            mtu: 1500,
            default_route: true,
        };
        assert_eq!(macvlan_tmp(&a).len(), 15);
    }
}
