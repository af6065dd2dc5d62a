//! Docker's local network drivers, for standalone sandboxes on one node:
//!
//! - `bridge`: a Linux bridge in the node's namespace holding the gateway
//!   address, one veth per sandbox (one end a port of the bridge, the other
//!   `ifname` in the sandbox), MASQUERADE for what leaves the node from the
//!   subnet, and no forwarding between two bridge networks (Docker's
//!   DOCKER-ISOLATION chains). An `internal` network gets no NAT and nothing
//!   leaves or enters it through the node;
//! - `macvlan` (bridge mode): its kernel code is [`crate::macvlan`];
//! - `host` and `none` need no kernel code: a `host` sandbox shares the
//!   node's namespace, a `none` sandbox has only its loopback.
//!
//! Like [`crate::overlay`], every function is a reconciliation step: it
//! compares the desired state with the kernel's and fixes the difference, so
//! calling it again is harmless and a hand-deleted device heals on the next
//! call. Devices are labelled with an alias (IFLA_IFALIAS) saying whose they
//! are, so a name clash with something the operator made is reported instead
//! of being taken over or torn down.
//!
//! The firewall side is one nftables table of our own in the node's
//! namespace, `ip mesh_local`, rebuilt from the full list of bridge networks
//! in one atomic batch by [`sync_nat`]; rules we did not make are never
//! touched. It is separate from `ip mesh_egress` (the gwbridge's) so neither
//! rebuild can drop the other's rules.
//!
//! Addresses of local networks are not replicated: the node picks them with
//! [`next_address`] from what its own sandboxes use.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::ipam;
use tracing::{debug, info, warn};

use crate::firewall::bridge_nat::forwarding_on;
use crate::link::{Link, Netlink, check_ifname, fmt_mac};
use crate::netns::NetError;
use crate::overlay::{Attachment, Node, Port, connect_port};
use crate::stable_hash::fnv1a48;

/// Bridge device of the default `bridge` network (Docker's `docker0`).
pub const DEFAULT_BRIDGE: &str = "mesh0";
/// Our nftables table (family `ip`) in the node's namespace.
pub use crate::firewall::bridge_nat::TABLE;
/// The NAT and isolation table of all bridge networks; it lives with the
/// other tables in `crate::firewall`.
pub use crate::firewall::bridge_nat::sync_nat;

/// Alias of a bridge we made, followed by the network's name.
const BRIDGE_ALIAS: &str = "mesh bridge network ";
/// Alias of the node end of a sandbox's veth, followed by `sandbox/ifname`.
const PORT_ALIAS: &str = "mesh bridge port ";

/// One `bridge` network as this node must have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// The network's name; written in the bridge's alias so an operator
    /// running `ip -d link` sees which network a bridge serves.
    pub name: String,
    /// The Linux bridge device (at most 15 characters): `mbr-` and a short
    /// ID (see [`bridge_name`]), or [`DEFAULT_BRIDGE`] for the default
    /// network.
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// Address of the bridge: the sandboxes' next hop.
    pub gateway: Ipv4Addr,
    /// MTU of the bridge and the default for its veths.
    pub mtu: u32,
    /// `--internal`: no NAT, and nothing is forwarded into or out of the
    /// network; its sandboxes reach only each other and the gateway.
    pub internal: bool,
}

/// Bridge device name for a network ID: `mbr-` and the ID's first 11
/// characters, which fits IFNAMSIZ and is as unique as Docker's `br-` names.
pub fn bridge_name(network_id: &str) -> String {
    let short: String = network_id.chars().take(11).collect();
    format!("mbr-{short}")
}

/// IPAM for local networks: the lowest free host address of `subnet`,
/// skipping the network and broadcast addresses, the gateway and `used`.
/// `None` when the subnet is full. Local networks are not replicated, so
/// `used` is whatever this node's sandboxes hold.
pub fn next_address(
    subnet: &Ipv4Net,
    gateway: Ipv4Addr,
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    ipam::next_host(subnet, None, gateway, used).ok()
}

fn bridge_owner(network: &str) -> String {
    format!("{BRIDGE_ALIAS}{network}")
}

fn port_owner(a: &Attachment) -> String {
    format!("{PORT_ALIAS}{}/{}", a.sandbox_ns, a.ifname)
}

pub(crate) fn alias_starts(l: &Link, prefix: &str) -> bool {
    l.alias.as_deref().is_some_and(|a| a.starts_with(prefix))
}

/// Names of a bridge attachment's veth: the node end (a port of the bridge)
/// and the temporary name of the sandbox end before its rename. Derived,
/// not stored, so a restarted agent finds them; 15 characters.
fn port_names(bridge: &str, a: &Attachment) -> (String, String) {
    let h = fnv1a48(&[
        bridge.as_bytes(),
        a.sandbox_ns.as_bytes(),
        a.ifname.as_bytes(),
    ]);
    (format!("mlb{h:012x}"), format!("mlt{h:012x}"))
}

pub(crate) fn validate_bridge(spec: &BridgeSpec) -> Result<(), NetError> {
    let bad = |msg: String| {
        Err(NetError::Invalid(format!(
            "bridge network {:?} (device {}): {msg}",
            spec.name, spec.bridge
        )))
    };
    if check_ifname(&spec.bridge).is_err() {
        return bad("the bridge name must be 1-15 characters without '/', ':' or spaces".into());
    }
    let net = spec.subnet;
    if net.trunc() != net {
        return bad(format!(
            "subnet {net} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    if net.prefix_len() > ipam::MAX_SUBNET_PREFIX {
        return bad(format!(
            "subnet {net} is too small: use /{} or shorter",
            ipam::MAX_SUBNET_PREFIX
        ));
    }
    if !net.contains(&spec.gateway) {
        return bad(format!("gateway {} is outside subnet {net}", spec.gateway));
    }
    if spec.gateway == net.network() || spec.gateway == net.broadcast() {
        return bad(format!(
            "gateway {} is the network or broadcast address of {net}",
            spec.gateway
        ));
    }
    if !(68..=65535).contains(&spec.mtu) {
        return bad(format!("MTU {} is outside 68-65535", spec.mtu));
    }
    Ok(())
}

pub(crate) fn validate_attachment(a: &Attachment) -> Result<(), NetError> {
    let bad = |msg: String| {
        Err(NetError::Invalid(format!(
            "attachment of sandbox {} ({}): {msg}",
            a.sandbox_ns, a.ifname
        )))
    };
    if check_ifname(&a.ifname).is_err() {
        return bad("interface name must be 1-15 characters without '/', ':' or spaces".into());
    }
    if !(1..=32).contains(&a.prefix) {
        return bad(format!("prefix length {} is outside 1-32", a.prefix));
    }
    if a.mac[0] & 1 != 0 || a.mac == [0; 6] {
        return bad(format!(
            "MAC {} is a multicast or zero address",
            fmt_mac(&a.mac)
        ));
    }
    if !(68..=65535).contains(&a.mtu) {
        return bad(format!("MTU {} is outside 68-65535", a.mtu));
    }
    Ok(())
}

/// Ensures a bridge network on the node: the bridge (labelled as ours),
/// its MTU, exactly the gateway address, up; and, unless the network is
/// internal, IPv4 forwarding. The NAT and isolation rules are
/// [`sync_nat`]'s, which needs every network at once. Idempotent. A device
/// of that name that is not ours is left alone and reported, with one
/// exception: a bridge with no label, down, without addresses or ports is
/// what an interrupted create leaves, and is adopted.
pub async fn ensure_bridge(node: &Node, spec: &BridgeSpec) -> Result<(), NetError> {
    validate_bridge(spec)?;
    let host = Netlink::open(node.ns.as_deref()).await?;
    let owner = bridge_owner(&spec.name);
    let link = match host.link(&spec.bridge).await? {
        Some(l) => claim_bridge(&host, spec, &owner, l).await?,
        None => {
            host.create_bridge(&spec.bridge, spec.mtu).await?;
            host.set_alias(&spec.bridge, &owner).await?;
            info!(ns = host.ns(), bridge = %spec.bridge, network = %spec.name, "created bridge");
            host.link(&spec.bridge)
                .await?
                .ok_or_else(|| NetError::NoDevice {
                    dev: spec.bridge.clone(),
                    ns: host.ns().into(),
                    hint: "it vanished right after being created; is another agent managing it?",
                })?
        }
    };
    if link.mtu != spec.mtu {
        host.set_mtu(&spec.bridge, spec.mtu).await?;
    }
    host.ensure_only_address_v4(&spec.bridge, spec.gateway, spec.subnet.prefix_len())
        .await?;
    if !link.up {
        host.set_up(&spec.bridge).await?;
    }
    if !spec.internal {
        forwarding_on(node.ns.as_deref())?;
    }
    Ok(())
}

/// Decides whether an existing device may serve as the network's bridge.
async fn claim_bridge(
    host: &Netlink,
    spec: &BridgeSpec,
    owner: &str,
    l: Link,
) -> Result<Link, NetError> {
    if l.kind.as_deref() != Some("bridge") {
        return Err(NetError::Conflict(format!(
            "device {} in namespace {} is a {} device, not a bridge, and is not mesh's; remove it or give network {:?} another bridge name",
            spec.bridge,
            host.ns(),
            l.kind.as_deref().unwrap_or("plain"),
            spec.name
        )));
    }
    match l.alias.as_deref() {
        Some(a) if a == owner => Ok(l),
        Some(a) => Err(NetError::Conflict(format!(
            "bridge {} in namespace {} is labelled {a:?}, not {owner:?}; it belongs to something else, so give network {:?} another bridge name",
            spec.bridge,
            host.ns(),
            spec.name
        ))),
        None => {
            let has_ports = host
                .links()
                .await?
                .iter()
                .any(|p| p.master == Some(l.index));
            let has_addresses = !host.addresses_v4(&spec.bridge).await?.is_empty();
            if l.up || has_ports || has_addresses {
                return Err(NetError::Conflict(format!(
                    "bridge {} already exists in namespace {} and is in use by something other than mesh; remove it or give network {:?} another bridge name",
                    spec.bridge,
                    host.ns(),
                    spec.name
                )));
            }
            debug!(ns = host.ns(), bridge = %spec.bridge, "adopting an unlabelled, unused bridge");
            host.set_alias(&spec.bridge, owner).await?;
            Ok(l)
        }
    }
}

/// Removes a bridge network's bridge, and our veths on it first (which
/// takes their sandbox ends along: a removed network leaves no dangling
/// interface in a sandbox). Absent is fine; a device of that name that is
/// not ours is left alone with a warning. Keeps going past failures and
/// reports the first. The nftables side is rebuilt by [`sync_nat`] with
/// the networks that remain.
pub async fn remove_bridge(node: &Node, bridge: &str) -> Result<(), NetError> {
    let host = Netlink::open(node.ns.as_deref()).await?;
    let Some(br) = host.link(bridge).await? else {
        return Ok(());
    };
    if br.kind.as_deref() != Some("bridge") || !alias_starts(&br, BRIDGE_ALIAS) {
        warn!(ns = host.ns(), bridge, alias = ?br.alias, "not removing a device that mesh did not make");
        return Ok(());
    }
    let mut first_err = None;
    for port in host.links().await? {
        if port.master == Some(br.index)
            && alias_starts(&port, PORT_ALIAS)
            && let Err(e) = host.delete(&port.name).await
        {
            first_err.get_or_insert(e);
        }
    }
    if let Err(e) = host.delete(bridge).await {
        first_err.get_or_insert(e);
    }
    info!(ns = host.ns(), bridge, "removed bridge network");
    first_err.map_or(Ok(()), Err)
}

/// The bridges of ours on the node, by device name, sorted: what a
/// restarted agent compares with the networks it still wants.
pub async fn bridges_in_kernel(node: &Node) -> Result<Vec<String>, NetError> {
    let host = Netlink::open(node.ns.as_deref()).await?;
    let mut names: Vec<String> = host
        .links()
        .await?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("bridge") && alias_starts(l, BRIDGE_ALIAS))
        .map(|l| l.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Connects a sandbox to a bridge network: a veth pair whose node end is a
/// port of the bridge and whose other end, born directly in the sandbox's
/// namespace, is renamed `ifname` there, with the MAC, address and MTU, up,
/// and the default route via the gateway when `default_route`. Idempotent:
/// fixes a changed setting in place, recreates a broken pair.
pub async fn attach_bridge(node: &Node, spec: &BridgeSpec, a: &Attachment) -> Result<(), NetError> {
    validate_bridge(spec)?;
    validate_attachment(a)?;
    let net = spec.subnet;
    if !net.contains(&a.ip)
        || a.prefix != net.prefix_len()
        || [net.network(), net.broadcast(), spec.gateway].contains(&a.ip)
    {
        return Err(NetError::Invalid(format!(
            "address {}/{} for sandbox {} on network {:?}: use a host address of {net} other than the gateway {}",
            a.ip, a.prefix, a.sandbox_ns, spec.name, spec.gateway
        )));
    }
    let host = Netlink::open(node.ns.as_deref()).await?;
    let owner = bridge_owner(&spec.name);
    let ready = host.link(&spec.bridge).await?.is_some_and(|l| {
        l.kind.as_deref() == Some("bridge") && l.alias.as_deref() == Some(owner.as_str())
    });
    if !ready {
        return Err(NetError::NoDevice {
            dev: spec.bridge.clone(),
            ns: host.ns().into(),
            hint: "the bridge network is not set up on this node: ensure_bridge must succeed first",
        });
    }
    let sb = Netlink::open(Some(&a.sandbox_ns)).await?;
    let port = Port {
        bridge: &spec.bridge,
        names: port_names(&spec.bridge, a),
        owner: port_owner(a),
        whose: format!("bridge network {:?}'s", spec.name),
    };
    connect_port(&host, &sb, a, &port, spec.gateway).await?;
    debug!(bridge = %spec.bridge, sandbox = %a.sandbox_ns, ifname = %a.ifname, ip = %a.ip, "attached to bridge network");
    Ok(())
}

/// Disconnects a sandbox from a bridge network: deletes its veth pair
/// (both ends go together, and with the sandbox end its address and
/// routes). Absent is fine, and so is a sandbox that is already gone.
pub async fn detach_bridge(node: &Node, spec: &BridgeSpec, a: &Attachment) -> Result<(), NetError> {
    let host = Netlink::open(node.ns.as_deref()).await?;
    let (outer, _) = port_names(&spec.bridge, a);
    if let Some(l) = host.link(&outer).await?
        && l.alias
            .as_ref()
            .is_some_and(|other| *other != port_owner(a))
    {
        warn!(ns = host.ns(), dev = %outer, alias = ?l.alias, "not deleting a veth that belongs to another attachment");
        return Ok(());
    }
    if host.delete(&outer).await? {
        debug!(bridge = %spec.bridge, sandbox = %a.sandbox_ns, ifname = %a.ifname, "detached from bridge network");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bridge: &str, subnet: &str, internal: bool) -> BridgeSpec {
        let subnet: Ipv4Net = subnet.parse().expect("test subnet");
        BridgeSpec {
            name: format!("net-{bridge}"),
            bridge: bridge.into(),
            subnet,
            gateway: ipam::default_gateway(&subnet),
            mtu: 1500,
            internal,
        }
    }

    #[test]
    fn names_fit_ifnamsiz_and_are_stable() {
        let a = Attachment {
            sandbox_ns: "a-very-long-sandbox-namespace-name".into(),
            ifname: "eth0".into(),
            ip: Ipv4Addr::new(10, 88, 0, 2),
            prefix: 24,
            mac: mesh_common::model::Mac::for_ip(Ipv4Addr::new(10, 88, 0, 2)).octets(),
            mtu: 1500,
            default_route: true,
        };
        let (outer, tmp) = port_names("mbr-0123456789a", &a);
        assert_eq!((outer.len(), tmp.len()), (15, 15));
        assert_eq!(port_names("mbr-0123456789a", &a), (outer.clone(), tmp));
        assert_ne!(port_names("mesh0", &a).0, outer);
        assert_eq!(bridge_name("0123456789abcdef"), "mbr-0123456789a");
        assert!(check_ifname(&bridge_name("0123456789abcdef")).is_ok());
    }

    #[test]
    fn next_address_skips_gateway_and_used() {
        let net: Ipv4Net = "10.88.0.0/30".parse().expect("subnet");
        let gw = Ipv4Addr::new(10, 88, 0, 1);
        let mut used = BTreeSet::new();
        assert_eq!(
            next_address(&net, gw, &used),
            Some(Ipv4Addr::new(10, 88, 0, 2))
        );
        used.insert(Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(next_address(&net, gw, &used), None);
    }

    #[test]
    fn spec_validation_explains_the_problem() {
        let mut s = spec("mbr-a", "10.88.0.0/24", false);
        assert!(validate_bridge(&s).is_ok());
        s.gateway = Ipv4Addr::new(10, 89, 0, 1);
        let err = validate_bridge(&s).expect_err("outside").to_string();
        assert!(
            err.contains("gateway 10.89.0.1 is outside subnet 10.88.0.0/24"),
            "{err}"
        );
        s.gateway = Ipv4Addr::new(10, 88, 0, 255);
        assert!(validate_bridge(&s).is_err());
        let s = spec("a-bridge-name-too-long", "10.88.0.0/24", false);
        assert!(validate_bridge(&s).is_err());
    }
}
