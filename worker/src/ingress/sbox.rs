//! The node's ingress sandbox: a namespace with the node's endpoint on the
//! ingress overlay (`eth0`, made by the overlay driver's own attach) and a
//! veth to the node (`gw0`), its default route.
//!
//! Why a veth of its own and not a port of `mesh_gwbridge` as Swarm's
//! ingress-sbox has: `ip mesh_egress` drops what is routed from one
//! gwbridge port to another, which is exactly the path of a task on this
//! node reaching a published port; and an address out of the gwbridge
//! subnet can never be handed to a sandbox by `next_egress_ip`. The link
//! uses a link-local /30, which no overlay or local network can be given.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use tracing::info;

use super::{
    DefaultRoute, IngressError, Plan, SANDBOX_INGRESS_IF, SANDBOX_LINK_IF, default_routes,
};
use crate::drivers::overlay_spec;
use crate::firewall::{self, Drift};
use crate::link::Netlink;
use crate::netns::{self, NetError};
use crate::overlay::{self, Attachment, Node};
use crate::sandboxes::DataPath;
use crate::sysctl;

/// The node's end of the link to the ingress sandbox.
pub const NODE_IFNAME: &str = "mesh_ingress";
/// The node's address on that link.
pub const NODE_LINK_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 254, 1);
/// The ingress sandbox's address on that link: where published ports go.
pub const SANDBOX_LINK_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 254, 2);
pub const LINK_PREFIX: u8 = 30;
const LINK_MTU: u32 = 1500;

/// The ingress sandbox's namespace on a node.
pub fn sandbox_ns(prefix: &str) -> String {
    format!("{prefix}-ingress")
}

/// Makes the ingress sandbox what `plan` says, and its table; returns how
/// many things had to be fixed.
pub(super) async fn ensure(dp: &DataPath, node: &Node, plan: &Plan) -> Result<usize, IngressError> {
    let ns = sandbox_ns(&node.prefix);
    let mut fixed = 0;
    if !netns::exists(&ns) {
        info!(ns, "creating the ingress sandbox");
        netns::create_async(&ns).await?;
        fixed += 1;
    }
    let spec = overlay_spec(
        dp,
        plan.vni,
        plan.subnet,
        plan.gateway,
        plan.mtu,
        plan.encrypted,
    );
    let a = Attachment {
        sandbox_ns: ns.clone(),
        ifname: SANDBOX_INGRESS_IF.into(),
        ip: plan.ip,
        prefix: plan.subnet.prefix_len(),
        mac: mesh_common::model::Mac::for_ip(plan.ip).octets(),
        mtu: spec.mtu,
        default_route: false,
    };
    overlay::attach(node, &spec, &a).await?;
    fixed += link(node, &ns).await?;
    let all = |k: &str| (format!("ipv4/conf/{k}/rp_filter"), "0");
    fixed += tokio::task::block_in_place(|| {
        sysctl::ensure(
            Some(&ns),
            &[
                ("ipv4/ip_forward".into(), "1"),
                all("all"),
                all("default"),
                all(SANDBOX_INGRESS_IF),
                all(SANDBOX_LINK_IF),
            ],
        )
    })?;
    // 127.0.0.1:PORT on the node: local sources may leave through the link.
    fixed += tokio::task::block_in_place(|| {
        firewall::enable_forwarding(node.ns.as_deref()).map_err(|source| {
            IngressError::Firewall {
                table: firewall::ingress_host::TABLE,
                ns: netns::label(node.ns.as_deref()),
                source,
            }
        })?;
        Ok::<_, IngressError>(sysctl::ensure(
            node.ns.as_deref(),
            &[(format!("ipv4/conf/{NODE_IFNAME}/route_localnet"), "1")],
        )?)
    })?;
    let lb = plan.lb_table();
    let found =
        tokio::task::block_in_place(|| firewall::repair(Some(&ns), &lb)).map_err(|source| {
            IngressError::Firewall {
                table: firewall::ingress_lb::TABLE,
                ns: ns.clone(),
                source,
            }
        })?;
    if found != Drift::InSync {
        fixed += 1;
    }
    Ok(fixed)
}

/// The veth between the node and the sandbox, its addresses and the
/// sandbox's default route; recreated when either end is missing or they
/// are not each other's peer. Each part is read first and set only where it
/// differs.
async fn link(node: &Node, ns: &str) -> Result<usize, IngressError> {
    let host = Netlink::open(node.ns.as_deref()).await?;
    let sb = Netlink::open(Some(ns)).await?;
    let outer = host.link(NODE_IFNAME).await?;
    let inner = sb.link(SANDBOX_LINK_IF).await?;
    let paired = match (&outer, &inner) {
        (Some(o), Some(i)) => o.link == Some(i.index) && i.link == Some(o.index),
        _ => false,
    };
    let mut fixed = 0;
    if !paired {
        host.delete(NODE_IFNAME).await?;
        sb.delete(SANDBOX_LINK_IF).await?;
        let fd = netns::open(ns)?;
        host.create_veth(NODE_IFNAME, SANDBOX_LINK_IF, LINK_MTU, Some(fd.as_fd()))
            .await?;
        info!(ns, "linked the ingress sandbox to the node");
        fixed += 1;
    }
    if host.addresses_v4(NODE_IFNAME).await? != [(NODE_LINK_IP, LINK_PREFIX)] {
        host.ensure_only_address_v4(NODE_IFNAME, NODE_LINK_IP, LINK_PREFIX)
            .await?;
        fixed += 1;
    }
    if sb.addresses_v4(SANDBOX_LINK_IF).await? != [(SANDBOX_LINK_IP, LINK_PREFIX)] {
        sb.ensure_only_address_v4(SANDBOX_LINK_IF, SANDBOX_LINK_IP, LINK_PREFIX)
            .await?;
        fixed += 1;
    }
    let (outer_up, inner_up) = match (&outer, &inner) {
        (Some(o), Some(i)) if paired => (o.up, i.up),
        _ => (false, false),
    };
    if !outer_up {
        host.set_up(NODE_IFNAME).await?;
    }
    if !inner_up {
        sb.set_up(SANDBOX_LINK_IF).await?;
    }
    if !sb.link("lo").await?.is_some_and(|l| l.up) {
        sb.set_up("lo").await?;
    }
    let wanted = DefaultRoute {
        gateway: Some(NODE_LINK_IP),
        oif: sb.index(SANDBOX_LINK_IF).await?,
    };
    let main = u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN);
    if default_routes(&sb).await?.get(&main) != Some(&wanted) {
        sb.replace_default_route(NODE_LINK_IP, SANDBOX_LINK_IF)
            .await?;
        fixed += 1;
    }
    Ok(fixed)
}

/// Removes the ingress sandbox (its veths go with it) and reports whether
/// there was one. The node's `mesh_ingress` table follows on the same pass.
pub fn remove_sandbox(node: &Node) -> Result<bool, NetError> {
    let ns = sandbox_ns(&node.prefix);
    if !netns::exists(&ns) {
        return Ok(false);
    }
    netns::delete(&ns)?;
    Ok(true)
}
