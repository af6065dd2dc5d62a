//! The kernel side of the overlay driver, modelled on Docker's: per network a
//! namespace holding bridge `br0` (with the gateway address) and `vxlan0`
//! (static FDB and ARP entries, no learning, no flooding, no multicast), and
//! per sandbox a veth pair from `br0` to the sandbox.
//!
//! Every function is a reconciliation step: it takes the desired state,
//! compares it with what the kernel has and fixes the difference, so calling
//! it again is harmless and a restart or a hand-deleted device heals on the
//! next call. The agent calls [`ensure_network`] then [`sync_peers`] for each
//! network it needs (a recreated `vxlan0` starts with an empty FDB), and
//! [`attach`] for each sandbox on it.
//!
//! - `peers`: the peer table (static FDB and neighbour entries), planned
//!   purely and then applied.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use ipnet::Ipv4Net;
use nix::errno::Errno;
use tracing::{debug, info, warn};

use crate::link::{Mac, Netlink, VxlanConfig, fmt_mac};
use crate::netns;
pub use crate::netns::NetError;
use crate::stable_hash::fnv1a32;
use crate::veth;

mod peers;

pub use peers::{Peer, SyncReport, peers_in_kernel, sync_peers};

/// The bridge of a network's namespace, holding the gateway address.
pub const BRIDGE: &str = "br0";
/// The VXLAN device of a network's namespace.
pub const VXLAN: &str = "vxlan0";
/// Largest VNI: the field is 24 bits.
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// Which node the driver works for: the prefix of the namespaces it owns,
/// and the namespace that is the node's own (where the underlay address is
/// and so where VXLAN sockets must live). `ns: None` is the process's own
/// namespace, the normal case; tests run several fake nodes in one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub prefix: String,
    pub ns: Option<String>,
}

impl Node {
    /// A node whose underlay is this process's namespace.
    pub fn host(prefix: impl Into<String>) -> Self {
        Node {
            prefix: prefix.into(),
            ns: None,
        }
    }

    /// A node whose underlay is the named namespace (a fake host).
    pub fn in_ns(prefix: impl Into<String>, ns: impl Into<String>) -> Self {
        Node {
            prefix: prefix.into(),
            ns: Some(ns.into()),
        }
    }

    /// Where the VXLAN of a network keeps its UDP socket: the node's own
    /// namespace for plain networks; for encrypted ones the node's tunnel
    /// namespace, whose only way out is the WireGuard device.
    fn underlay_ns(&self, encrypted: bool) -> Option<String> {
        if encrypted {
            Some(tunnel_ns_name(&self.prefix))
        } else {
            self.ns.clone()
        }
    }
}

/// The namespace of a node's WireGuard device (a TAP holding the node's
/// underlay address): the VXLAN sockets of encrypted networks live there,
/// so what they send can only leave through the tunnel.
pub fn tunnel_ns_name(prefix: &str) -> String {
    format!("{prefix}-wg")
}

/// Alias of a `vxlan0` whose socket is in the tunnel namespace: a device
/// is kept only if it is on the side the network asks for.
const ENCRYPTED_ALIAS: &str = "mesh encrypted";

/// One overlay network as this node must have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    pub vni: u32,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// MTU of the bridge, the VXLAN and the veths (underlay MTU minus 50).
    pub mtu: u32,
    /// This node's underlay address: the source of encapsulated packets.
    pub local_ip: Ipv4Addr,
    /// Data-path UDP port (4789 by default, `--data-path-port`).
    pub port: u16,
    /// `--opt encrypted`: the VXLAN is carried inside WireGuard.
    pub encrypted: bool,
}

/// A sandbox's connection to a network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Named namespace of the sandbox (under /run/netns).
    pub sandbox_ns: String,
    /// Interface name inside the sandbox, e.g. `eth0`.
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: Mac,
    pub mtu: u32,
    /// Whether the sandbox's default route goes via this network's gateway.
    pub default_route: bool,
}

/// Name of the namespace of network `vni` on a node.
pub fn network_ns_name(prefix: &str, vni: u32) -> String {
    format!("{prefix}-ov-{vni}")
}

/// Names of an attachment's veth: the end on `br0` (in the network's
/// namespace) and the temporary name of the sandbox end before it is
/// renamed. Derived, not stored, so a restarted agent finds them; at most 15
/// characters (IFNAMSIZ).
fn veth_names(vni: u32, a: &Attachment) -> (String, String) {
    let h = fnv1a32(&[
        &vni.to_be_bytes(),
        a.sandbox_ns.as_bytes(),
        a.ifname.as_bytes(),
    ]);
    (format!("veth{h:08x}"), format!("vtmp{h:08x}"))
}

/// Alias written on the `br0` end of a veth: whose it is, so a hash
/// collision is reported instead of tearing down another sandbox's link.
fn veth_owner(a: &Attachment) -> String {
    format!("mesh {}/{}", a.sandbox_ns, a.ifname)
}

/// Name of a VXLAN while it is still in the node's namespace, unique per
/// node prefix and VNI.
fn temp_vxlan_name(prefix: &str, vni: u32) -> String {
    format!(
        "vx{vni:06x}{:05x}",
        fnv1a32(&[prefix.as_bytes()]) & 0xf_ffff
    )
}

fn validate_spec(spec: &OverlaySpec) -> Result<(), NetError> {
    let what = |msg: String| {
        Err(NetError::Invalid(format!(
            "overlay network VNI {}: {msg}",
            spec.vni
        )))
    };
    if spec.vni == 0 || spec.vni > MAX_VNI {
        return what(format!("VNI must be between 1 and {MAX_VNI}"));
    }
    if !spec.subnet.contains(&spec.gateway) {
        return what(format!(
            "gateway {} is outside subnet {}",
            spec.gateway, spec.subnet
        ));
    }
    if !(68..=65535).contains(&spec.mtu) {
        return what(format!("MTU {} is outside 68-65535", spec.mtu));
    }
    if spec.port == 0 {
        return what("data-path port must not be 0".into());
    }
    Ok(())
}

fn validate_attachment(a: &Attachment) -> Result<(), NetError> {
    let bad = |msg: String| {
        Err(NetError::Invalid(format!(
            "attachment of sandbox {} ({}): {msg}",
            a.sandbox_ns, a.ifname
        )))
    };
    if crate::link::check_ifname(&a.ifname).is_err() {
        return bad("interface name must be 1-15 characters without '/', ':' or spaces".into());
    }
    if a.prefix > 32 {
        return bad(format!("prefix length {} is over 32", a.prefix));
    }
    if a.mac[0] & 1 != 0 {
        return bad(format!("MAC {} is a multicast address", fmt_mac(&a.mac)));
    }
    if !(68..=65535).contains(&a.mtu) {
        return bad(format!("MTU {} is outside 68-65535", a.mtu));
    }
    Ok(())
}

/// Opens the network's namespace, which [`ensure_network`] must have made.
pub(super) async fn open_network(prefix: &str, vni: u32) -> Result<(String, Netlink), NetError> {
    let ns = network_ns_name(prefix, vni);
    if !netns::exists(&ns) {
        return Err(NetError::NoNamespace(ns));
    }
    let nl = Netlink::open(Some(&ns)).await?;
    Ok((ns, nl))
}

/// Ensures, for one network on this node, a namespace holding bridge `br0`
/// (gateway address, MTU, up) and `vxlan0` (created in the node's namespace
/// so its UDP socket lives on the underlay, then moved in, enslaved to
/// `br0`, up). Idempotent; repairs a missing or changed piece. A recreated
/// `vxlan0` has no FDB entries: call [`sync_peers`] after this.
pub async fn ensure_network(node: &Node, spec: &OverlaySpec) -> Result<(), NetError> {
    validate_spec(spec)?;
    let ns = network_ns_name(&node.prefix, spec.vni);
    netns::create_async(&ns).await?;
    let net = Netlink::open(Some(&ns)).await?;
    ensure_bridge(&net, spec).await?;
    ensure_vxlan(node, &net, &ns, spec).await
}

async fn ensure_bridge(net: &Netlink, spec: &OverlaySpec) -> Result<(), NetError> {
    let existing = net.link(BRIDGE).await?;
    let link = match existing {
        Some(l) if l.kind.as_deref() == Some("bridge") => l,
        other => {
            if other.is_some() {
                warn!(ns = net.ns(), "{BRIDGE} is not a bridge; recreating it");
                net.delete(BRIDGE).await?;
            } else {
                debug!(ns = net.ns(), "creating {BRIDGE}");
            }
            net.create_bridge(BRIDGE, spec.mtu).await?;
            net.link(BRIDGE).await?.ok_or_else(|| NetError::NoDevice {
                dev: BRIDGE.into(),
                ns: net.ns().into(),
                hint: "it vanished right after being created; is another agent managing this namespace?",
            })?
        }
    };
    if link.mtu != spec.mtu {
        net.set_mtu(BRIDGE, spec.mtu).await?;
    }
    net.ensure_only_address_v4(BRIDGE, spec.gateway, spec.subnet.prefix_len())
        .await?;
    if !link.up {
        net.set_up(BRIDGE).await?;
    }
    Ok(())
}

async fn ensure_vxlan(
    node: &Node,
    net: &Netlink,
    ns: &str,
    spec: &OverlaySpec,
) -> Result<(), NetError> {
    let want = VxlanConfig {
        name: VXLAN.into(),
        vni: spec.vni,
        local: spec.local_ip,
        port: spec.port,
        mtu: spec.mtu,
    };
    let existing = net.link(VXLAN).await?;
    let usable = existing.as_ref().is_some_and(|l| {
        l.kind.as_deref() == Some("vxlan")
            && l.vxlan.as_ref().is_some_and(|v| want.matches(v))
            && (l.alias.as_deref() == Some(ENCRYPTED_ALIAS)) == spec.encrypted
    });
    if !usable {
        if existing.is_some() {
            info!(
                ns,
                vni = spec.vni,
                "{VXLAN} settings differ from the network's; recreating it"
            );
            net.delete(VXLAN).await?;
        } else {
            info!(ns, vni = spec.vni, "creating {VXLAN}");
        }
        create_vxlan_in_node(node, net, ns, &want, spec.encrypted).await?;
    }
    let br = net
        .require(BRIDGE, "the bridge vanished while setting up the network")
        .await?;
    let link = net.link(VXLAN).await?.ok_or_else(|| NetError::NoDevice {
        dev: VXLAN.into(),
        ns: ns.into(),
        hint: "it vanished right after being created; is another agent managing this namespace?",
    })?;
    if link.mtu != spec.mtu {
        net.set_mtu(VXLAN, spec.mtu).await?;
    }
    if link.master != Some(br) {
        net.set_master(VXLAN, BRIDGE).await?;
    }
    if !link.up {
        net.set_up(VXLAN).await?;
    }
    Ok(())
}

/// Creates the VXLAN under a temporary name in the namespace its socket
/// belongs in (the node's, or the tunnel's for an encrypted network), moves
/// it into the network's namespace and names it `vxlan0` there.
async fn create_vxlan_in_node(
    node: &Node,
    net: &Netlink,
    ns: &str,
    want: &VxlanConfig,
    encrypted: bool,
) -> Result<(), NetError> {
    let underlay = node.underlay_ns(encrypted);
    if let Some(tunnel) = underlay.as_deref().filter(|_| encrypted) {
        // A sandbox may attach before the agent has started the device
        // (the view naming the peers comes after the endpoint). The socket
        // goes into the tunnel namespace anyway: until the device is up,
        // what it sends has no route out at all, never a clear one.
        netns::create_async(tunnel).await?;
    }
    let host = Netlink::open(underlay.as_deref()).await?;
    let tmp = temp_vxlan_name(&node.prefix, want.vni);
    // A leftover from a create interrupted before the move.
    host.delete(&tmp).await?;
    let cfg = VxlanConfig {
        name: tmp.clone(),
        ..want.clone()
    };
    let created = match host.create_vxlan(&cfg).await {
        Ok(()) if encrypted => host.set_alias(&tmp, ENCRYPTED_ALIAS).await,
        other => other,
    };
    if let Err(e) = created {
        if e.errno() == Some(Errno::EEXIST) {
            return Err(NetError::Conflict(format!(
                "{e}: VNI {} on UDP port {} is probably used by another VXLAN device in namespace {} (see `ip -d link show type vxlan`); remove it or use another VNI",
                want.vni,
                want.port,
                host.ns()
            )));
        }
        return Err(e);
    }
    let moved = match netns::open(ns) {
        Ok(fd) => host.move_to_ns(&tmp, fd.as_fd(), ns).await,
        Err(e) => Err(e),
    };
    if let Err(e) = moved {
        let _ = host.delete(&tmp).await;
        return Err(e);
    }
    if let Err(e) = net.rename(&tmp, VXLAN).await {
        let _ = net.delete(&tmp).await;
        return Err(e);
    }
    Ok(())
}

/// Connects a sandbox: a veth pair with one end on `br0` in the network's
/// namespace and the other in the sandbox named `ifname`, with its MAC,
/// IP/prefix and MTU, up, and (if `default_route`) the default route via the
/// gateway. The pair is created with each end directly in its namespace, so
/// nothing touches the node's namespace. Idempotent: fixes a changed setting
/// in place, recreates a broken pair.
pub async fn attach(node: &Node, spec: &OverlaySpec, a: &Attachment) -> Result<(), NetError> {
    validate_spec(spec)?;
    validate_attachment(a)?;
    let (ns, net) = open_network(&node.prefix, spec.vni).await?;
    net.require(
        BRIDGE,
        "the network is not set up on this node: ensure_network must succeed first",
    )
    .await?;
    let sb = Netlink::open(Some(&a.sandbox_ns)).await?;
    let port = Port {
        bridge: BRIDGE,
        names: veth_names(spec.vni, a),
        owner: veth_owner(a),
        whose: format!("this network's (VNI {})", spec.vni),
    };
    connect_port(&net, &sb, a, &port, spec.gateway).await?;
    debug!(ns, sandbox = %a.sandbox_ns, ifname = %a.ifname, ip = %a.ip, "attached");
    Ok(())
}

/// A sandbox's veth to a bridge, as both the overlay and the bridge
/// driver make it.
pub(crate) struct Port<'a> {
    /// The bridge the node end is a port of.
    pub bridge: &'a str,
    /// The node end's name and the sandbox end's name before its rename.
    pub names: (String, String),
    /// The alias that marks the node end as this attachment's.
    pub owner: String,
    /// Whose interface it should be, for the error when it is not.
    pub whose: String,
}

/// Makes the pair in `net` (the bridge's namespace) and `sb` (the
/// sandbox's) exactly `a`: recreates a broken pair, refuses to take over an
/// interface or a name that is someone else's, then configures both ends
/// (and the default route via `gateway` when `a.default_route`).
pub(crate) async fn connect_port(
    net: &Netlink,
    sb: &Netlink,
    a: &Attachment,
    port: &Port<'_>,
    gateway: Ipv4Addr,
) -> Result<(), NetError> {
    let (outer, tmp) = (&port.names.0, &port.names.1);
    let owner = &port.owner;
    let host_end = net.link(outer).await?;
    let inner = sb.link(&a.ifname).await?;
    // No alias: our own create interrupted before it labelled the device.
    if let Some(other) = host_end.as_ref().and_then(|h| h.alias.as_deref())
        && other != owner
    {
        return Err(NetError::Conflict(format!(
            "device {outer} in namespace {} belongs to {other:?}, not to {owner:?} (a name hash collision); detach one of them",
            net.ns()
        )));
    }
    let paired = match (&host_end, &inner) {
        (Some(h), Some(i)) => {
            i.kind.as_deref() == Some("veth") && h.link == Some(i.index) && i.link == Some(h.index)
        }
        _ => false,
    };
    if !paired {
        if host_end.is_some() {
            // Our end without its sandbox end (e.g. still named `tmp` after an
            // interrupted attach): start over; deleting one end removes both.
            info!(ns = net.ns(), dev = %outer, sandbox = %a.sandbox_ns, "veth pair incomplete; recreating it");
            net.delete(outer).await?;
        }
        if let Some(i) = &inner {
            return Err(NetError::Conflict(format!(
                "interface {} (index {}) already exists in namespace {} and is not {}; detach what owns it or choose another interface name",
                a.ifname, i.index, a.sandbox_ns, port.whose
            )));
        }
        veth::create_pair(net, sb, a, outer, tmp, owner).await?;
    }
    veth::configure_bridge_port(net, port.bridge, a, outer).await?;
    veth::configure_sandbox_end(sb, a, a.default_route.then_some(gateway)).await?;
    Ok(())
}

/// Disconnects a sandbox: deletes its veth pair (both ends go together, and
/// with the sandbox end its address and routes). Absent is fine, and so is a
/// network that is already gone.
pub async fn detach(node: &Node, vni: u32, a: &Attachment) -> Result<(), NetError> {
    let ns = network_ns_name(&node.prefix, vni);
    if !netns::exists(&ns) {
        return Ok(());
    }
    let net = Netlink::open(Some(&ns)).await?;
    let (outer, _) = veth_names(vni, a);
    if let Some(l) = net.link(&outer).await?
        && l.alias
            .as_ref()
            .is_some_and(|other| *other != veth_owner(a))
    {
        warn!(ns, dev = %outer, alias = ?l.alias, "not deleting a veth that belongs to another attachment");
        return Ok(());
    }
    if net.delete(&outer).await? {
        debug!(ns, sandbox = %a.sandbox_ns, ifname = %a.ifname, "detached");
    }
    Ok(())
}

/// Removes the network's namespace and everything in it. `vxlan0` is
/// deleted first and explicitly: the kernel destroys a namespace's devices
/// only once nothing refers to it any more, and until then the VNI stays
/// taken on the node. Keeps going past failures and reports the first.
pub async fn remove_network(node: &Node, vni: u32) -> Result<(), NetError> {
    let ns = network_ns_name(&node.prefix, vni);
    let mut first_err = None;
    if netns::exists(&ns) {
        match Netlink::open(Some(&ns)).await {
            Ok(net) => {
                if let Err(e) = net.delete(VXLAN).await {
                    warn!(ns, error = %e, "cannot delete {VXLAN}; removing the namespace anyway");
                    first_err.get_or_insert(e);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    // A VXLAN left in the node's (or tunnel's) namespace by an interrupted
    // create.
    for encrypted in [false, true] {
        let underlay = node.underlay_ns(encrypted);
        if encrypted && !underlay.as_deref().is_some_and(netns::exists) {
            continue;
        }
        match Netlink::open(underlay.as_deref()).await {
            Ok(host) => {
                if let Err(e) = host.delete(&temp_vxlan_name(&node.prefix, vni)).await {
                    first_err.get_or_insert(e);
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Err(e) = netns::delete_async(&ns).await {
        first_err.get_or_insert(e);
    }
    info!(ns, vni, "removed network");
    first_err.map_or(Ok(()), Err)
}

/// VNIs of the networks this node has in the kernel (from the namespace
/// names), so a restarted agent can remove those no longer wanted.
pub fn networks_in_kernel(node: &Node) -> Result<Vec<u32>, NetError> {
    let lead = format!("{}-ov-", node.prefix);
    Ok(netns::list_with_prefix(&lead)?
        .iter()
        .filter_map(|n| n.strip_prefix(&lead)?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const N1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn mac_for(ip: Ipv4Addr) -> Mac {
        mesh_common::model::Mac::for_ip(ip).octets()
    }

    #[test]
    fn mac_is_derived_from_the_ip_like_docker() {
        assert_eq!(
            mac_for(Ipv4Addr::new(10, 0, 0, 2)),
            [0x02, 0x42, 10, 0, 0, 2]
        );
    }

    #[test]
    fn generated_names_fit_ifnamsiz_and_are_stable() {
        let a = Attachment {
            sandbox_ns: "a-very-long-sandbox-namespace-name".into(),
            ifname: "eth0".into(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            mac: mac_for(Ipv4Addr::new(10, 0, 0, 2)),
            mtu: 1450,
            default_route: false,
        };
        let (outer, tmp) = veth_names(MAX_VNI, &a);
        assert!(outer.len() <= 15 && tmp.len() <= 15);
        assert_eq!(veth_names(MAX_VNI, &a), (outer.clone(), tmp));
        let b = Attachment {
            ifname: "eth1".into(),
            ..a.clone()
        };
        assert_ne!(veth_names(MAX_VNI, &b).0, outer);
        assert_ne!(veth_names(4096, &a).0, outer);
        assert!(temp_vxlan_name("some-node-prefix", MAX_VNI).len() <= 15);
        assert_eq!(network_ns_name("mesh", 4097), "mesh-ov-4097");
    }

    #[test]
    fn spec_validation_explains_the_problem() {
        let mut spec = OverlaySpec {
            vni: 4097,
            subnet: "10.0.0.0/24".parse().expect("valid"),
            gateway: Ipv4Addr::new(10, 0, 1, 1),
            mtu: 1450,
            local_ip: N1,
            port: 4789,
            encrypted: false,
        };
        let err = validate_spec(&spec)
            .expect_err("gateway outside")
            .to_string();
        assert!(
            err.contains("gateway 10.0.1.1 is outside subnet 10.0.0.0/24"),
            "{err}"
        );
        spec.gateway = Ipv4Addr::new(10, 0, 0, 1);
        assert!(validate_spec(&spec).is_ok());
        spec.vni = MAX_VNI + 1;
        assert!(validate_spec(&spec).is_err());
    }
}
