//! IPv4 address management for cluster networks, with Docker Swarm's rules.
//!
//! Managers carve network subnets out of the cluster's address pools, check
//! subnets given by users against the networks that already exist, pick
//! gateways, VXLAN IDs and endpoint addresses. Everything here is arithmetic
//! on values the caller passes in: the caller owns the list of what is used.
//!
//! Over 600 lines only because its inline tests (Swarm's IPAM rules, case
//! by case) are nearly half of it; the logic is one concept.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

pub use ipnet::Ipv4Net;

/// Longest prefix of a network subnet: a /30 still has a gateway and one host.
pub const MAX_SUBNET_PREFIX: u8 = 30;
/// Shortest prefix of an address pool, so one pool cannot swallow the space.
pub const MIN_POOL_PREFIX: u8 = 8;
/// Swarm hands out overlay VXLAN IDs from 4096 up; lower ones are left to
/// local networks.
pub const FIRST_VNI: u32 = 4096;
/// The VXLAN ID field is 24 bits wide.
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// Why an address, subnet or ID cannot be used or allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid {kind} {input:?}: expected an IPv4 CIDR such as 10.1.0.0/24")]
    InvalidCidr { kind: &'static str, input: String },
    #[error("invalid {kind} {input:?}: only IPv4 is supported; use an address such as {example}")]
    Ipv6Unsupported {
        kind: &'static str,
        input: String,
        example: &'static str,
    },
    #[error("{kind} {input} has host bits set; did you mean {network}?")]
    HostBitsSet {
        kind: &'static str,
        input: String,
        network: Ipv4Net,
    },
    #[error(
        "{kind} {net} is too small: use a prefix of /{MAX_SUBNET_PREFIX} or shorter so there is room for a gateway and hosts"
    )]
    TooSmall { kind: &'static str, net: Ipv4Net },
    #[error("address pool {0} is too large: use a prefix of /{MIN_POOL_PREFIX} or longer")]
    PoolTooLarge(Ipv4Net),
    #[error(
        "cannot carve /{0} networks: the mask length must be /{MAX_SUBNET_PREFIX} or shorter so each network has room for a gateway and hosts"
    )]
    InvalidMaskLen(u8),
    #[error(
        "cannot carve /{mask_len} networks from address pool {pool}: the mask must be /{} or longer (the pool's own prefix); use a longer mask or a larger pool",
        .pool.prefix_len()
    )]
    MaskShorterThanPool { pool: Ipv4Net, mask_len: u8 },
    #[error(
        "no address pools to carve networks from: add a pool with `mesh init --default-addr-pool`"
    )]
    NoPools,
    #[error(
        "no free /{mask_len} subnet left in address pools {}: add a pool with `mesh init --default-addr-pool` or remove unused networks",
        join(.pools)
    )]
    Exhausted { pools: Vec<Ipv4Net>, mask_len: u8 },
    #[error(
        "subnet {subnet} overlaps {existing} of network {network:?}: choose a subnet outside it or remove that network"
    )]
    Overlap {
        subnet: Ipv4Net,
        existing: Ipv4Net,
        network: String,
    },
    #[error("invalid gateway {0:?}: expected an IPv4 address such as 10.1.0.1")]
    InvalidGateway(String),
    #[error(
        "gateway {gateway} is outside subnet {subnet}: pick an address inside it such as {}",
        default_gateway(.subnet)
    )]
    GatewayOutsideSubnet { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error(
        "gateway {gateway} is the {which} address of subnet {subnet}: pick a host address such as {}",
        default_gateway(.subnet)
    )]
    GatewayReserved {
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
        which: &'static str,
    },
    #[error(
        "ip range {range} is not inside subnet {subnet}: pick a range within the subnet, or leave it out to use the whole subnet"
    )]
    RangeOutsideSubnet { range: Ipv4Net, subnet: Ipv4Net },
    #[error(
        "no free VXLAN ID left between {FIRST_VNI} and {MAX_VNI}: remove unused overlay networks"
    )]
    VniExhausted,
    #[error(
        "no free address left in {0}: remove unused endpoints, or use a larger subnet or --ip-range"
    )]
    HostsExhausted(Ipv4Net),
    #[error(
        "{kind} {net} overlaps {reserved} ({what}), which hosts cannot use: choose a private range such as 10.1.0.0/24"
    )]
    Reserved {
        kind: &'static str,
        net: Ipv4Net,
        reserved: Ipv4Net,
        what: &'static str,
    },
}

/// Ranges no network of ours may take: the kernel treats them specially
/// (or we use them ourselves: 169.254.254.0/30 links each node to its
/// ingress sandbox).
const RESERVED: [(Ipv4Net, &str); 5] = [
    (
        Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
        "\"this network\"",
    ),
    (
        Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
        "loopback",
    ),
    (
        Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
        "link-local",
    ),
    (
        Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4),
        "multicast",
    ),
    (
        Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4),
        "reserved and broadcast",
    ),
];

/// Why a subnet or pool cannot hold hosts' addresses, if it cannot: it
/// overlaps loopback, link-local, multicast or another reserved range.
/// Checked where users give subnets (network create, init's pools), not
/// when state is replayed.
pub fn check_usable(net: &Ipv4Net, kind: &'static str) -> Result<(), IpamError> {
    match RESERVED.iter().find(|(r, _)| overlaps(net, r)) {
        Some(&(reserved, what)) => Err(IpamError::Reserved {
            kind,
            net: *net,
            reserved,
            what,
        }),
        None => Ok(()),
    }
}

/// Comma-separated list of networks for error messages.
fn join(nets: &[Ipv4Net]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses an IPv4 CIDR in its network form; `kind` names the value in errors
/// so the user knows which flag was wrong.
fn parse_network(s: &str, kind: &'static str) -> Result<Ipv4Net, IpamError> {
    let input = s.trim();
    let net = match input.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V4(net)) => net,
        Ok(ipnet::IpNet::V6(_)) => {
            return Err(IpamError::Ipv6Unsupported {
                kind,
                input: input.to_owned(),
                example: "10.1.0.0/24",
            });
        }
        // An IPv6 literal with a bad prefix is still IPv6: say so rather than
        // "malformed", since fixing the prefix would not help.
        Err(_) if input.contains(':') => {
            return Err(IpamError::Ipv6Unsupported {
                kind,
                input: input.to_owned(),
                example: "10.1.0.0/24",
            });
        }
        Err(_) => {
            return Err(IpamError::InvalidCidr {
                kind,
                input: input.to_owned(),
            });
        }
    };
    if net.trunc() != net {
        return Err(IpamError::HostBitsSet {
            kind,
            input: input.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// Parses a user's subnet (`--subnet`): IPv4, no host bits, and /30 or
/// shorter so it can hold a gateway and at least one host.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, IpamError> {
    let net = parse_network(s, "subnet")?;
    if net.prefix_len() > MAX_SUBNET_PREFIX {
        return Err(IpamError::TooSmall {
            kind: "subnet",
            net,
        });
    }
    Ok(net)
}

/// Parses an address pool (`--default-addr-pool`): like a subnet, with a
/// prefix between /8 and /30.
pub fn parse_pool(s: &str) -> Result<Ipv4Net, IpamError> {
    let net = parse_network(s, "address pool")?;
    if net.prefix_len() > MAX_SUBNET_PREFIX {
        return Err(IpamError::TooSmall {
            kind: "address pool",
            net,
        });
    }
    if net.prefix_len() < MIN_POOL_PREFIX {
        return Err(IpamError::PoolTooLarge(net));
    }
    Ok(net)
}

/// Whether two networks share an address. CIDR blocks either nest or are
/// disjoint, so it is enough to test containment of the network addresses.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// First and last address of a network as integers, ignoring host bits.
fn bounds(net: &Ipv4Net) -> (u64, u64) {
    (
        u64::from(u32::from(net.network())),
        u64::from(u32::from(net.broadcast())),
    )
}

/// First free block of prefix `mask_len` from `pools` (in the order given,
/// lowest address first within each pool) that overlaps none of `used`.
///
/// Used subnets are sorted and merged into disjoint intervals once; each
/// collision then jumps the candidate past the whole interval, so a call costs
/// O(n log n) in the number of used subnets, not O(blocks in the pool).
pub fn carve(pools: &[Ipv4Net], mask_len: u8, used: &[Ipv4Net]) -> Result<Ipv4Net, IpamError> {
    if mask_len > MAX_SUBNET_PREFIX {
        return Err(IpamError::InvalidMaskLen(mask_len));
    }
    if pools.is_empty() {
        return Err(IpamError::NoPools);
    }
    if let Some(pool) = pools.iter().find(|p| p.prefix_len() > mask_len) {
        return Err(IpamError::MaskShorterThanPool {
            pool: *pool,
            mask_len,
        });
    }

    let taken = merged_intervals(used);
    let size = 1u64 << (32 - u32::from(mask_len));
    for pool in pools {
        let (pool_start, pool_end) = bounds(pool);
        let mut candidate = pool_start;
        while candidate + size - 1 <= pool_end {
            let block_end = candidate + size - 1;
            // Intervals are disjoint and sorted, so their ends are sorted too:
            // the first one ending at or after `candidate` is the only one
            // that can collide first.
            let i = taken.partition_point(|&(_, end)| end < candidate);
            match taken.get(i) {
                Some(&(start, end)) if start <= block_end => {
                    candidate = (end + 1).div_ceil(size) * size;
                }
                _ => return Ok(block(candidate, mask_len)),
            }
        }
    }
    Err(IpamError::Exhausted {
        pools: pools.to_vec(),
        mask_len,
    })
}

/// Sorted, disjoint `[start, end]` address intervals covering `nets`.
fn merged_intervals(nets: &[Ipv4Net]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = nets.iter().map(bounds).collect();
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 + 1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The network of prefix `len` starting at `start`; both were checked by the
/// caller (start < 2^32 and aligned, len ≤ 32).
fn block(start: u64, len: u8) -> Ipv4Net {
    let addr = Ipv4Addr::from(u32::try_from(start).unwrap_or(u32::MAX));
    Ipv4Net::new_assert(addr, len)
}

/// Validates a user-given subnet against existing networks, naming the first
/// one it overlaps so the user knows what to change or remove.
pub fn check_overlap<'a>(
    subnet: &Ipv4Net,
    used: impl IntoIterator<Item = (&'a str, &'a Ipv4Net)>,
) -> Result<(), IpamError> {
    match used.into_iter().find(|(_, net)| overlaps(subnet, net)) {
        Some((name, net)) => Err(IpamError::Overlap {
            subnet: *subnet,
            existing: *net,
            network: name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Default gateway: the first host address (.1 of a /24), as Swarm does.
pub fn default_gateway(subnet: &Ipv4Net) -> Ipv4Addr {
    // `hosts()` is never empty; the fallback only keeps this panic-free.
    subnet.hosts().next().unwrap_or(subnet.network())
}

/// Parses a user's `--gateway`: it must be a host address of `subnet`, since
/// the network and broadcast addresses cannot be assigned to an interface.
pub fn parse_gateway(s: &str, subnet: &Ipv4Net) -> Result<Ipv4Addr, IpamError> {
    let input = s.trim();
    let gateway = match input.parse::<IpAddr>() {
        Ok(IpAddr::V4(addr)) => addr,
        Ok(IpAddr::V6(_)) => {
            return Err(IpamError::Ipv6Unsupported {
                kind: "gateway",
                input: input.to_owned(),
                example: "10.1.0.1",
            });
        }
        Err(_) => return Err(IpamError::InvalidGateway(input.to_owned())),
    };
    if !subnet.contains(&gateway) {
        return Err(IpamError::GatewayOutsideSubnet {
            gateway,
            subnet: *subnet,
        });
    }
    let which = if gateway == subnet.network() {
        "network"
    } else if gateway == subnet.broadcast() {
        "broadcast"
    } else {
        return Ok(gateway);
    };
    Err(IpamError::GatewayReserved {
        gateway,
        subnet: *subnet,
        which,
    })
}

/// Parses `--ip-range` with the subnet rules; it must lie inside `subnet`
/// (the whole subnet is allowed) since endpoints get addresses from it.
pub fn parse_ip_range(s: &str, subnet: &Ipv4Net) -> Result<Ipv4Net, IpamError> {
    let range = parse_network(s, "ip range")?;
    if range.prefix_len() > MAX_SUBNET_PREFIX {
        return Err(IpamError::TooSmall {
            kind: "ip range",
            net: range,
        });
    }
    if !subnet.contains(&range) {
        return Err(IpamError::RangeOutsideSubnet {
            range,
            subnet: *subnet,
        });
    }
    Ok(range)
}

/// Lowest value in `first..=last` that is not taken. Costs one probe per
/// taken value below the answer, which is bounded by the number in use.
fn lowest_free(first: u32, last: u32, taken: impl Fn(u32) -> bool) -> Option<u32> {
    (first..=last).find(|&v| !taken(v))
}

/// Lowest free VXLAN ID from [`FIRST_VNI`] to [`MAX_VNI`].
pub fn next_vni(used: &BTreeSet<u32>) -> Result<u32, IpamError> {
    lowest_free(FIRST_VNI, MAX_VNI, |v| used.contains(&v)).ok_or(IpamError::VniExhausted)
}

/// Like [`next_host`], from address `floor` up (the caller knows every
/// address below it is taken), with `taken` saying which are used: many
/// allocations in a row then cost what they allocate, not what is used.
pub fn next_host_from(
    subnet: &Ipv4Net,
    range: Option<&Ipv4Net>,
    gateway: Ipv4Addr,
    floor: u32,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Result<Ipv4Addr, IpamError> {
    let range = range.unwrap_or(subnet);
    if !subnet.contains(range) {
        return Err(IpamError::RangeOutsideSubnet {
            range: *range,
            subnet: *subnet,
        });
    }
    let reserved = [subnet.network(), subnet.broadcast(), gateway];
    let first = u32::from(range.network()).max(floor);
    let last = u32::from(range.broadcast());
    lowest_free(first, last, |v| {
        let addr = Ipv4Addr::from(v);
        reserved.contains(&addr) || taken(addr)
    })
    .map(Ipv4Addr::from)
    .ok_or(IpamError::HostsExhausted(*range))
}

/// Next free endpoint address in `range` (or the whole subnet), skipping the
/// subnet's network and broadcast addresses, the gateway and `used`.
pub fn next_host(
    subnet: &Ipv4Net,
    range: Option<&Ipv4Net>,
    gateway: Ipv4Addr,
    used: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    next_host_from(subnet, range, gateway, 0, |a| used.contains(&a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test CIDR parses")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address parses")
    }

    #[test]
    fn ipam_carves_in_order() {
        let pools = [net("10.0.0.0/8")];
        assert_eq!(carve(&pools, 24, &[]), Ok(net("10.0.0.0/24")));
        assert_eq!(
            carve(&pools, 24, &[net("10.0.0.0/24")]),
            Ok(net("10.0.1.0/24"))
        );
        // A hole left by a removed network is reused before higher blocks.
        let used = [net("10.0.0.0/24"), net("10.0.2.0/24")];
        assert_eq!(carve(&pools, 24, &used), Ok(net("10.0.1.0/24")));
    }

    #[test]
    fn ipam_skips_used_sixteen_in_one_jump() {
        let pools = [net("10.0.0.0/8")];
        let used = [net("10.0.0.0/16"), net("10.1.0.0/24")];
        assert_eq!(carve(&pools, 24, &used), Ok(net("10.1.1.0/24")));
        // Unsorted input and a used net bigger than the pool itself.
        let used = [net("10.1.0.0/24"), net("10.0.0.0/16")];
        assert_eq!(carve(&pools, 24, &used), Ok(net("10.1.1.0/24")));
        assert!(matches!(
            carve(&[net("10.20.0.0/20")], 24, &[net("10.0.0.0/8")]),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn ipam_multiple_pools() {
        let pools = [net("10.20.0.0/23"), net("192.168.0.0/16")];
        let used = [net("10.20.0.0/24"), net("10.20.1.0/24")];
        assert_eq!(carve(&pools, 24, &used), Ok(net("192.168.0.0/24")));
        // Pools are tried in the order given, not by address.
        let pools = [net("192.168.0.0/16"), net("10.20.0.0/23")];
        assert_eq!(carve(&pools, 24, &[]), Ok(net("192.168.0.0/24")));
    }

    #[test]
    fn ipam_mask_shorter_than_pool() {
        let err = carve(&[net("10.0.0.0/8"), net("10.20.0.0/20")], 16, &[]);
        assert_eq!(
            err,
            Err(IpamError::MaskShorterThanPool {
                pool: net("10.20.0.0/20"),
                mask_len: 16
            })
        );
        let msg = err.expect_err("error").to_string();
        assert!(msg.contains("10.20.0.0/20") && msg.contains("/20"), "{msg}");
        // Equal is fine: the pool is one network.
        assert_eq!(
            carve(&[net("10.20.0.0/20")], 20, &[]),
            Ok(net("10.20.0.0/20"))
        );
        assert_eq!(
            carve(&[net("10.0.0.0/8")], 31, &[]),
            Err(IpamError::InvalidMaskLen(31))
        );
        assert_eq!(carve(&[], 24, &[]), Err(IpamError::NoPools));
    }

    #[test]
    fn ipam_exhaustion_after_sixteen_and_reuse() {
        let pools = [net("10.20.0.0/20")];
        let mut used = Vec::new();
        for i in 0..16 {
            let got = carve(&pools, 24, &used).expect("pool has room");
            assert_eq!(got, net(&format!("10.20.{i}.0/24")));
            used.push(got);
        }
        let err = carve(&pools, 24, &used).expect_err("pool is full");
        assert_eq!(
            err,
            IpamError::Exhausted {
                pools: pools.to_vec(),
                mask_len: 24
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("10.20.0.0/20") && msg.contains("/24"), "{msg}");
        assert!(msg.contains("mesh init --default-addr-pool"), "{msg}");
        assert!(msg.contains("remove unused networks"), "{msg}");

        used.retain(|n| *n != net("10.20.7.0/24"));
        assert_eq!(carve(&pools, 24, &used), Ok(net("10.20.7.0/24")));
    }

    #[test]
    fn ipam_user_subnet_overlap_both_directions() {
        let front = net("10.0.0.0/16");
        let back = net("10.5.1.0/24");
        let existing = [("front", &front), ("back", &back)];

        // Smaller than an existing network.
        let err = check_overlap(&net("10.0.1.0/24"), existing).expect_err("overlaps");
        assert_eq!(
            err.to_string(),
            "subnet 10.0.1.0/24 overlaps 10.0.0.0/16 of network \"front\": choose a subnet outside it or remove that network"
        );
        // Bigger than an existing network.
        assert_eq!(
            check_overlap(&net("10.5.0.0/16"), existing),
            Err(IpamError::Overlap {
                subnet: net("10.5.0.0/16"),
                existing: back,
                network: "back".into()
            })
        );
        assert!(check_overlap(&net("10.0.0.0/16"), existing).is_err());
        assert_eq!(check_overlap(&net("10.1.0.0/16"), existing), Ok(()));
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.9.9.0/24")));
        assert!(overlaps(&net("10.9.9.0/24"), &net("10.0.0.0/8")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
    }

    #[test]
    fn ipam_host_bits() {
        let err = parse_subnet("10.0.0.5/24").expect_err("host bits");
        assert_eq!(
            err.to_string(),
            "subnet 10.0.0.5/24 has host bits set; did you mean 10.0.0.0/24?"
        );
        assert!(
            parse_pool("10.1.0.0/8")
                .expect_err("host bits")
                .to_string()
                .contains("did you mean 10.0.0.0/8?")
        );
        assert_eq!(parse_subnet(" 10.0.0.0/24 "), Ok(net("10.0.0.0/24")));
    }

    #[test]
    fn ipam_malformed_cidrs() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.256.0/24", "", "banana/24"] {
            let err = parse_subnet(bad).expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("invalid subnet {bad:?}: expected an IPv4 CIDR such as 10.1.0.0/24")
            );
        }
        for v6 in ["fd00::/64", "fd00::/129", "::1"] {
            let msg = parse_subnet(v6).expect_err(v6).to_string();
            assert!(msg.contains("only IPv4 is supported"), "{msg}");
        }
        assert!(
            parse_pool("10.0.0.0/33")
                .expect_err("bad")
                .to_string()
                .starts_with("invalid address pool \"10.0.0.0/33\"")
        );
    }

    #[test]
    fn ipam_prefix_limits() {
        assert_eq!(parse_subnet("10.0.0.0/30"), Ok(net("10.0.0.0/30")));
        for small in ["10.0.0.0/31", "10.0.0.0/32"] {
            let err = parse_subnet(small).expect_err(small);
            assert!(matches!(err, IpamError::TooSmall { .. }));
            assert!(err.to_string().contains("/30 or shorter"), "{err}");
        }
        assert_eq!(parse_pool("10.0.0.0/8"), Ok(net("10.0.0.0/8")));
        assert_eq!(parse_pool("10.0.0.0/30"), Ok(net("10.0.0.0/30")));
        assert_eq!(
            parse_pool("0.0.0.0/7"),
            Err(IpamError::PoolTooLarge(net("0.0.0.0/7")))
        );
        assert!(matches!(
            parse_pool("10.0.0.0/31"),
            Err(IpamError::TooSmall { .. })
        ));
    }

    #[test]
    fn ipam_reserved_ranges_are_not_usable() {
        for ok in [
            "10.0.0.0/8",
            "192.168.1.0/24",
            "172.16.0.0/12",
            "100.64.0.0/10",
        ] {
            assert!(check_usable(&net(ok), "subnet").is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("127.0.0.0/24", "loopback"),
            ("169.254.254.0/24", "link-local"),
            ("224.0.0.0/24", "multicast"),
            ("240.0.0.0/24", "reserved"),
            ("0.0.0.0/24", "this network"),
            ("128.0.0.0/1", "link-local"),
        ] {
            let e = check_usable(&net(bad), "subnet")
                .expect_err(bad)
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn ipam_gateway() {
        let subnet = net("10.0.0.0/24");
        assert_eq!(default_gateway(&subnet), ip("10.0.0.1"));
        assert_eq!(default_gateway(&net("10.0.0.8/30")), ip("10.0.0.9"));
        assert_eq!(parse_gateway("10.0.0.254", &subnet), Ok(ip("10.0.0.254")));

        let err = parse_gateway("10.0.0.0", &subnet).expect_err("network");
        assert_eq!(
            err.to_string(),
            "gateway 10.0.0.0 is the network address of subnet 10.0.0.0/24: pick a host address such as 10.0.0.1"
        );
        assert!(matches!(
            parse_gateway("10.0.0.255", &subnet),
            Err(IpamError::GatewayReserved {
                which: "broadcast",
                ..
            })
        ));
        assert!(matches!(
            parse_gateway("10.0.1.1", &subnet),
            Err(IpamError::GatewayOutsideSubnet { .. })
        ));
        assert_eq!(
            parse_gateway("10.0.0.1/24", &subnet),
            Err(IpamError::InvalidGateway("10.0.0.1/24".into()))
        );
        assert!(matches!(
            parse_gateway("fd00::1", &subnet),
            Err(IpamError::Ipv6Unsupported { .. })
        ));
    }

    #[test]
    fn ipam_ip_range() {
        let subnet = net("10.0.0.0/16");
        assert_eq!(
            parse_ip_range("10.0.4.0/24", &subnet),
            Ok(net("10.0.4.0/24"))
        );
        assert_eq!(parse_ip_range("10.0.0.0/16", &subnet), Ok(subnet));
        assert!(matches!(
            parse_ip_range("10.1.0.0/24", &subnet),
            Err(IpamError::RangeOutsideSubnet { .. })
        ));
        assert!(matches!(
            parse_ip_range("10.0.0.0/8", &subnet),
            Err(IpamError::RangeOutsideSubnet { .. })
        ));
        assert!(matches!(
            parse_ip_range("10.0.4.1/24", &subnet),
            Err(IpamError::HostBitsSet {
                kind: "ip range",
                ..
            })
        ));
    }

    #[test]
    fn ipam_vni() {
        let mut used = BTreeSet::new();
        assert_eq!(next_vni(&used), Ok(FIRST_VNI));
        used.extend([1, 4095, 4096, 4097, 4099]);
        assert_eq!(next_vni(&used), Ok(4098));
        used.insert(4098);
        assert_eq!(next_vni(&used), Ok(4100));
        // Filling all 16M IDs is too slow for a unit test: exercise the same
        // search over a small synthetic space instead.
        let taken: BTreeSet<u32> = (10..=20).collect();
        assert_eq!(lowest_free(10, 20, |v| taken.contains(&v)), None);
        assert_eq!(lowest_free(10, 21, |v| taken.contains(&v)), Some(21));
        assert_eq!(lowest_free(MAX_VNI, MAX_VNI, |_| false), Some(MAX_VNI));
        assert_eq!(lowest_free(MAX_VNI, MAX_VNI, |_| true), None);
        assert!(IpamError::VniExhausted.to_string().contains("16777215"));
    }

    #[test]
    fn ipam_next_host() {
        let subnet = net("10.0.0.0/29");
        let gw = ip("10.0.0.1");
        let mut used = BTreeSet::new();
        assert_eq!(next_host(&subnet, None, gw, &used), Ok(ip("10.0.0.2")));
        used.extend([ip("10.0.0.2"), ip("10.0.0.3")]);
        assert_eq!(next_host(&subnet, None, gw, &used), Ok(ip("10.0.0.4")));
        used.extend([ip("10.0.0.4"), ip("10.0.0.5"), ip("10.0.0.6")]);
        assert_eq!(
            next_host(&subnet, None, gw, &used),
            Err(IpamError::HostsExhausted(subnet))
        );

        // In a range, the range's own first address is a valid host.
        let subnet = net("10.0.0.0/24");
        let range = net("10.0.0.128/25");
        let used = BTreeSet::new();
        assert_eq!(
            next_host(&subnet, Some(&range), gw, &used),
            Ok(ip("10.0.0.128"))
        );
        // ... but the subnet's broadcast is not.
        let range = net("10.0.0.252/30");
        let used: BTreeSet<_> = [ip("10.0.0.252"), ip("10.0.0.253"), ip("10.0.0.254")].into();
        assert_eq!(
            next_host(&subnet, Some(&range), gw, &used),
            Err(IpamError::HostsExhausted(range))
        );
        // A gateway in the range is skipped too.
        let range = net("10.0.0.0/30");
        assert_eq!(
            next_host(&subnet, Some(&range), gw, &BTreeSet::new()),
            Ok(ip("10.0.0.2"))
        );
    }

    #[test]
    fn ipam_carve_many_distinct() {
        let pools = [net("10.0.0.0/8")];
        let mut used: Vec<Ipv4Net> = Vec::new();
        for _ in 0..1000 {
            let got = carve(&pools, 24, &used).expect("a /8 holds 65536 /24s");
            assert!(pools[0].contains(&got));
            assert!(
                used.iter().all(|u| !overlaps(u, &got)),
                "{got} overlaps a used subnet"
            );
            used.push(got);
        }
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 1000);
        assert_eq!(used[999], net("10.3.231.0/24"));
    }
}
