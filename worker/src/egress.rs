//! Egress for sandboxes, as Docker's `docker_gwbridge`: one bridge per node
//! with a private subnet, one veth per sandbox, the sandbox's default route
//! through the bridge, and MASQUERADE for whatever leaves the node.
//!
//! Every function takes the node's namespace explicitly (`None` = the
//! namespace the daemon runs in), so a test or a lab can stand a namespace
//! in for a host. Links, addresses and routes are driven over rtnetlink, as
//! the rest of the data path; the NAT is the `ip mesh_egress` table of
//! `crate::firewall::egress`, replaced in one atomic batch.
//!
//! The functions are synchronous, for callers that are not async or hold a
//! lock: each runs its netlink work on a thread of its own
//! ([`crate::netns::block_on`]), so none blocks an async worker thread
//! beyond what `block_in_place` allows, and the daemon never changes its
//! own namespace.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use mesh_common::ipam::{self, IpamError, Ipv4Net};
use tracing::{debug, info};

use crate::firewall::egress::EgressTable;
use crate::firewall::{self, Drift, FirewallError};
use crate::link::Netlink;
use crate::netns::{self, NetError};

/// The node's egress bridge, as `docker_gwbridge`.
pub const GWBRIDGE: &str = "mesh_gwbridge";
/// Docker's usual gwbridge subnet.
pub const DEFAULT_GW_SUBNET: &str = "172.18.0.0/16";
/// Our nftables table (family `ip`) in the node namespace.
pub use crate::firewall::egress::TABLE;
/// Name of the egress interface inside a sandbox; overlay interfaces are
/// `ethN`, so this one cannot collide with them.
pub const SANDBOX_IFNAME: &str = "gw0";

/// MTU of the bridge and of the veths we create, as `ip link add` gives.
const MTU: u32 = 1500;

/// Why an egress operation failed; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid gateway bridge subnet: {0}")]
    Subnet(#[from] IpamError),
    #[error(
        "no egress address left in {subnet}: every one is taken by a sandbox on this node; remove some sandboxes first"
    )]
    Exhausted { subnet: Ipv4Net },
    #[error("invalid egress address {ip}/{prefix}: the prefix must be between 1 and 30")]
    Prefix { ip: Ipv4Addr, prefix: u8 },
    #[error(
        "invalid egress address {ip}/{prefix}: it is the network, broadcast or gateway address"
    )]
    Address { ip: Ipv4Addr, prefix: u8 },
    #[error("network namespace {0:?} does not exist (no /run/netns/{0}); create it first")]
    NetnsMissing(String),
    #[error("{GWBRIDGE} does not exist in {ns}: call ensure_gwbridge before attaching sandboxes")]
    NoBridge { ns: Ns },
    /// A netlink request failed; the error names the device and namespace.
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("table {TABLE} in {ns}: {source}")]
    Firewall { ns: Ns, source: FirewallError },
    #[error("cannot turn on IP forwarding in {ns}: {source}")]
    Forwarding { ns: Ns, source: FirewallError },
    #[error("removing egress in {ns} was incomplete: {}", join(.errors))]
    Teardown { ns: Ns, errors: Vec<EgressError> },
}

fn join(errors: &[EgressError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A namespace as errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ns(Option<String>);

impl Ns {
    fn of(ns: Option<&str>) -> Self {
        Self(ns.map(str::to_owned))
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("the host namespace"),
            Some(n) => write!(f, "namespace {n}"),
        }
    }
}

/// What [`check_gwbridge`] found wrong and put right.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    /// `mesh_gwbridge` was missing and was created.
    pub bridge: bool,
    /// Its address was missing or wrong.
    pub address: bool,
    /// It was down.
    pub up: bool,
    /// The `ip mesh_egress` table was missing or differed.
    pub table: bool,
}

impl Repaired {
    /// Whether anything had drifted.
    pub fn any(&self) -> bool {
        self.bridge || self.address || self.up || self.table
    }
}

/// Fails with [`EgressError::NetnsMissing`] unless the named namespace
/// exists (`None`, the daemon's own, always does).
fn require_ns(ns: Option<&str>) -> Result<(), EgressError> {
    match ns.map(netns::open) {
        None | Some(Ok(_)) => Ok(()),
        Some(Err(NetError::NoNamespace(name))) => Err(EgressError::NetnsMissing(name)),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Runs async netlink work for a synchronous caller.
fn run<T: Send>(
    work: impl Future<Output = Result<T, EgressError>> + Send,
) -> Result<T, EgressError> {
    netns::block_on(work)?
}

/// The gateway of a gw subnet: its first address, as Docker's IPAM gives it.
fn gateway(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

/// Makes the node's egress bridge: `mesh_gwbridge` with the subnet's first
/// address, up; IPv4 forwarding on; and the `ip mesh_egress` table
/// (masquerade what leaves from the subnet through any other interface; drop
/// what would be routed from one gwbridge port to another). Idempotent: a
/// second call fixes the address and replaces the table.
pub fn ensure_gwbridge(node_ns: Option<&str>, subnet: &str) -> Result<(), EgressError> {
    let net = ipam::parse_subnet(subnet)?;
    run(ensure(node_ns, net, true)).map(drop)
}

/// The reconcile loop's check of egress: the same result as
/// [`ensure_gwbridge`], but the table is only rebuilt when the kernel's copy
/// is missing or drifted (see `crate::firewall::drift`), so calling it every
/// pass costs a few netlink requests and one `nft` run. Returns what it had
/// to repair.
pub fn check_gwbridge(node_ns: Option<&str>, subnet: &str) -> Result<Repaired, EgressError> {
    let net = ipam::parse_subnet(subnet)?;
    run(ensure(node_ns, net, false))
}

async fn ensure(
    node_ns: Option<&str>,
    net: Ipv4Net,
    replace: bool,
) -> Result<Repaired, EgressError> {
    let ns = Ns::of(node_ns);
    let gw = gateway(&net);
    require_ns(node_ns)?;
    let host = Netlink::open(node_ns).await?;
    let mut fixed = Repaired::default();
    let link =
        match host.link(GWBRIDGE).await? {
            Some(l) => l,
            None => {
                host.create_bridge(GWBRIDGE, MTU).await?;
                info!(%ns, "created {GWBRIDGE}");
                fixed.bridge = true;
                host.link(GWBRIDGE).await?.ok_or_else(|| NetError::NoDevice {
                dev: GWBRIDGE.into(),
                ns: host.ns().into(),
                hint: "it vanished right after being created; is another agent managing it?",
            })?
            }
        };
    let want = (gw, net.prefix_len());
    if host.addresses_v4(GWBRIDGE).await? != [want] {
        debug!(%ns, "setting the address of {GWBRIDGE}");
        host.ensure_only_address_v4(GWBRIDGE, want.0, want.1)
            .await?;
        fixed.address = true;
    }
    if !link.up {
        host.set_up(GWBRIDGE).await?;
        fixed.up = !fixed.bridge;
    }
    firewall::enable_forwarding(node_ns).map_err(|source| EgressError::Forwarding {
        ns: ns.clone(),
        source,
    })?;
    let table = EgressTable { subnet: net };
    let fw = |source| EgressError::Firewall {
        ns: ns.clone(),
        source,
    };
    if replace {
        firewall::sync(node_ns, &table).map_err(fw)?;
    } else {
        let found = firewall::repair(node_ns, &table).map_err(fw)?;
        fixed.table = found != Drift::InSync;
    }
    if fixed.any() {
        info!(%ns, ?fixed, "repaired egress");
    }
    Ok(fixed)
}

/// The node-side name of a sandbox's egress veth: derived from the sandbox
/// namespace (unique on the node) so that detach finds it again without
/// any saved state. "mgw" + 12 hex digits fits the 15-byte limit.
pub fn host_ifname(sandbox_ns: &str) -> String {
    // FNV-1a, 64 bits, kept to 48: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sandbox_ns.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mgw{:012x}", h & 0xffff_ffff_ffff)
}

/// The lowest free egress address of the gwbridge `subnet`, skipping its
/// network, broadcast and gateway addresses and `used` (the egress
/// addresses of the node's sandboxes). A full subnet is an error, never a
/// reused address.
pub fn next_address(subnet: &Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, EgressError> {
    ipam::next_host(subnet, None, gateway(subnet), used).map_err(|e| match e {
        IpamError::HostsExhausted(_) => EgressError::Exhausted { subnet: *subnet },
        other => EgressError::Subnet(other),
    })
}

/// Checks an egress address and returns its gateway: the first address of
/// its subnet, which must not be the address itself.
fn egress_gateway(ip: Ipv4Addr, prefix: u8) -> Result<Ipv4Addr, EgressError> {
    if !(1..=30).contains(&prefix) {
        return Err(EgressError::Prefix { ip, prefix });
    }
    let net = Ipv4Net::new(ip, prefix)
        .map_err(|_| EgressError::Prefix { ip, prefix })?
        .trunc();
    let gw = gateway(&net);
    if ip == net.network() || ip == net.broadcast() || ip == gw {
        return Err(EgressError::Address { ip, prefix });
    }
    Ok(gw)
}

/// Gives a sandbox egress: a veth whose sandbox end `gw0` has `ip/prefix`
/// and whose node end is an isolated port of `mesh_gwbridge`. The default
/// route goes through the bridge address when `default_route` is true, or
/// when the sandbox has no default route yet. Idempotent; a failure leaves
/// no veth behind.
pub fn attach(
    node_ns: Option<&str>,
    sandbox_ns: &str,
    ip_addr: Ipv4Addr,
    prefix: u8,
    default_route: bool,
) -> Result<(), EgressError> {
    let gw = egress_gateway(ip_addr, prefix)?;
    require_ns(Some(sandbox_ns))?;
    require_ns(node_ns)?;
    run(async {
        let host = Netlink::open(node_ns).await?;
        let Some(bridge) = host.link(GWBRIDGE).await? else {
            return Err(EgressError::NoBridge {
                ns: Ns::of(node_ns),
            });
        };
        let sb = Netlink::open(Some(sandbox_ns)).await?;
        let host_if = host_ifname(sandbox_ns);
        let have_host = host.link(&host_if).await?.is_some();
        let have_inner = sb.link(SANDBOX_IFNAME).await?.is_some();
        if have_host != have_inner {
            // Half of a pair (an interrupted attach): start over.
            host.delete(&host_if).await?;
            sb.delete(SANDBOX_IFNAME).await?;
        }
        if !(have_host && have_inner) {
            let sb_fd = netns::open(sandbox_ns)?;
            host.create_veth(&host_if, SANDBOX_IFNAME, bridge.mtu, Some(sb_fd.as_fd()))
                .await?;
        }
        let configure = async {
            host.set_master(&host_if, GWBRIDGE).await?;
            // Isolated ports cannot talk to each other at layer 2:
            // sandboxes reach only the gateway through this bridge.
            host.set_bridge_port_isolated(&host_if, true).await?;
            host.set_up(&host_if).await?;
            sb.ensure_only_address_v4(SANDBOX_IFNAME, ip_addr, prefix)
                .await?;
            sb.set_up(SANDBOX_IFNAME).await?;
            sb.set_up("lo").await?;
            if default_route || !sb.has_default_route_v4().await? {
                sb.replace_default_route(gw, SANDBOX_IFNAME).await?;
            }
            Ok::<(), NetError>(())
        };
        if let Err(e) = configure.await {
            let _ = host.delete(&host_if).await;
            return Err(e.into());
        }
        info!(sandbox = sandbox_ns, address = %ip_addr, port = %host_if, "attached sandbox to {GWBRIDGE}");
        Ok(())
    })
}

/// Removes a sandbox's egress veth (both ends go together). Fine if it is
/// already gone, or if the sandbox namespace is.
pub fn detach(node_ns: Option<&str>, sandbox_ns: &str) -> Result<(), EgressError> {
    require_ns(node_ns)?;
    run(async {
        let host = Netlink::open(node_ns).await?;
        host.delete(&host_ifname(sandbox_ns)).await?;
        // The node end may have gone another way (a half-made attach); the
        // sandbox end is only worth looking for while its namespace exists.
        if netns::exists(sandbox_ns) {
            let sb = Netlink::open(Some(sandbox_ns)).await?;
            sb.delete(SANDBOX_IFNAME).await?;
        }
        debug!(sandbox = sandbox_ns, "detached sandbox from {GWBRIDGE}");
        Ok(())
    })
}

/// Removes the bridge and our nftables table from the node; keeps going past
/// failures and reports them all. IP forwarding stays on: other parts of
/// the node may rely on it. Ports still on the bridge are released, not
/// deleted: detach sandboxes first.
pub fn remove_gwbridge(node_ns: Option<&str>) -> Result<(), EgressError> {
    let ns = Ns::of(node_ns);
    let mut errors = Vec::new();
    if let Err(source) = firewall::remove(node_ns, firewall::egress::ID) {
        errors.push(EgressError::Firewall {
            ns: ns.clone(),
            source,
        });
    }
    let link = run(async {
        require_ns(node_ns)?;
        Netlink::open(node_ns).await?.delete(GWBRIDGE).await?;
        Ok(())
    });
    if let Err(e) = link {
        errors.push(e);
    }
    if errors.is_empty() {
        info!(%ns, "removed {GWBRIDGE} and table {TABLE}");
        Ok(())
    } else {
        Err(EgressError::Teardown { ns, errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_fit_and_differ() {
        let a = host_ifname("t1-s1");
        let b = host_ifname("t1-s2");
        assert_eq!(a.len(), 15);
        assert_ne!(a, b);
        assert_eq!(a, host_ifname("t1-s1"));
    }

    #[test]
    fn gateway_is_the_first_address() {
        let net = ipam::parse_subnet(DEFAULT_GW_SUBNET).expect("subnet");
        assert_eq!(gateway(&net), Ipv4Addr::new(172, 18, 0, 1));
    }

    #[test]
    fn next_address_skips_the_gateway_and_fails_when_full() {
        let net = ipam::parse_subnet("172.18.0.0/30").expect("subnet");
        let mut used = BTreeSet::new();
        let first = next_address(&net, &used).expect("one free");
        assert_eq!(first, Ipv4Addr::new(172, 18, 0, 2));
        used.insert(first);
        let err = next_address(&net, &used).expect_err("full");
        assert!(matches!(err, EgressError::Exhausted { .. }), "{err}");
    }

    #[test]
    fn egress_addresses_are_host_addresses_other_than_the_gateway() {
        let ip = Ipv4Addr::new(172, 18, 0, 2);
        assert_eq!(
            egress_gateway(ip, 16).ok(),
            Some(Ipv4Addr::new(172, 18, 0, 1))
        );
        assert!(matches!(
            egress_gateway(ip, 31),
            Err(EgressError::Prefix { .. })
        ));
        for bad in [[172, 18, 0, 0], [172, 18, 0, 1], [172, 18, 255, 255]] {
            assert!(matches!(
                egress_gateway(Ipv4Addr::from(bad), 16),
                Err(EgressError::Address { .. })
            ));
        }
    }
}
