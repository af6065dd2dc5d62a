//! Naming and addressing of a lab: pure functions, so they are unit-tested.
//!
//! Every kernel object of lab `L` carries `L` in its name (`mlab-L-ul`,
//! `mlab-L-nodeN`) so that `down L` can find the leftovers of a crashed run
//! without any state file, and never touches another lab's objects.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::error::{LabError, Result};

/// Longest lab name. Kept short so a lab name plus a short prefix still fits
/// an interface name (IFNAMSIZ: 15 characters) and socket paths stay well
/// under the 108-byte limit of `sun_path`.
pub const MAX_LAB_NAME: usize = 12;

/// Most nodes in one lab: addresses are `.11`..`.250` of the lab's /24.
pub const MAX_NODES: usize = 240;

/// Prefix of every network namespace the harness creates.
pub const NS_PREFIX: &str = "mlab-";

/// Which of a lab's namespaces a name denotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsKind {
    /// The namespace holding the underlay bridge.
    Underlay,
    /// A node's namespace, with the node's name (`node3`).
    Node(String),
    /// An outside host's namespace, with the host's name (`host1`).
    Host(String),
    /// The node simulator's namespace (`mesh lab sim`).
    Sim,
}

/// Checks that `name` can be used as a lab name.
pub fn validate_lab_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(LabError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_LAB_NAME {
        return bad("it is too long (it ends up in namespace and interface names)");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("it has a character other than a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    Ok(())
}

/// Name of the `i`-th node (1-based); also its hostname.
pub fn node_name(i: usize) -> String {
    format!("node{i}")
}

/// Name of the `j`-th outside host (1-based); also its hostname.
pub fn host_name(j: usize) -> String {
    format!("host{j}")
}

/// Network namespace of node `node` in lab `lab`.
pub fn node_netns(lab: &str, node: &str) -> String {
    format!("{NS_PREFIX}{lab}-{node}")
}

/// Network namespace of outside host `host` in lab `lab`.
pub fn host_netns(lab: &str, host: &str) -> String {
    format!("{NS_PREFIX}{lab}-{host}")
}

/// Network namespace holding lab `lab`'s underlay bridge.
pub fn underlay_netns(lab: &str) -> String {
    format!("{NS_PREFIX}{lab}-ul")
}

/// Network namespace of lab `lab`'s node simulator.
pub fn sim_netns(lab: &str) -> String {
    format!("{NS_PREFIX}{lab}-sim")
}

/// The simulator's own address on the lab's /24: past every node and host.
pub fn sim_gateway(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, k, 254)
}

/// Where simulated nodes' addresses come from: routed to the simulator's
/// namespace from every node, and kept out of the lab's /24 so a
/// simulation can hold far more nodes than a lab (RFC 6598 shared space,
/// which no overlay default pool uses).
pub const SIM_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 16);

/// The `i`-th simulated node's address (0-based), skipping the range's
/// network and broadcast addresses.
pub fn sim_node_ip(i: usize) -> Option<Ipv4Addr> {
    let size = 1u32 << (32 - SIM_RANGE.1);
    let n = u32::try_from(i).ok()?.checked_add(1)?;
    (n < size - 1).then(|| Ipv4Addr::from(u32::from(SIM_RANGE.0) + n))
}

/// Underlay address of the `i`-th node (1-based) in the lab's /24 `192.168.k.0/24`.
pub fn node_ip(k: u8, i: usize) -> Ipv4Addr {
    debug_assert!((1..=MAX_NODES).contains(&i));
    Ipv4Addr::new(192, 168, k, (10 + i) as u8)
}

/// Underlay address of the `j`-th outside host (1-based) of a lab with
/// `nodes` nodes: right after the nodes, so the two never overlap while
/// `nodes + hosts` stays within [`MAX_NODES`].
pub fn host_ip(k: u8, nodes: usize, j: usize) -> Ipv4Addr {
    debug_assert!(j >= 1 && nodes + j <= MAX_NODES);
    Ipv4Addr::new(192, 168, k, (10 + nodes + j) as u8)
}

/// The lowest /24 index (192.168.k.0/24, k in 1..=254) no other lab uses.
///
/// Labs are isolated from each other, so a clash would still work; distinct
/// subnets just keep addresses unambiguous in logs and captures.
pub fn pick_subnet_index(used: &BTreeSet<u8>) -> Option<u8> {
    (1..=254u8).find(|k| !used.contains(k))
}

/// Parses a namespace name made by the harness into (lab, kind).
///
/// The parse is unambiguous: `-ul` and `-node<digits>` suffixes cannot overlap,
/// so lab `a` never claims lab `a-node1`'s namespaces.
pub fn parse_netns(ns: &str) -> Option<(String, NsKind)> {
    let rest = ns.strip_prefix(NS_PREFIX)?;
    // Suffixes never contain '-', lab names may: split at the last one.
    let (lab, suffix) = rest.rsplit_once('-')?;
    let numbered = |prefix: &str| {
        suffix
            .strip_prefix(prefix)
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    let kind = if suffix == "ul" {
        NsKind::Underlay
    } else if suffix == "sim" {
        NsKind::Sim
    } else if numbered("node") {
        NsKind::Node(suffix.to_string())
    } else if numbered("host") {
        NsKind::Host(suffix.to_string())
    } else {
        return None;
    };
    validate_lab_name(lab).ok()?;
    Some((lab.to_string(), kind))
}

/// Maps what a user typed for a node (`node2`, or just `2`) to a node name.
pub fn normalize_node_arg(arg: &str) -> String {
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
        format!("node{}", arg.trim_start_matches('0'))
    } else {
        arg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        for ok in ["lab", "t1", "a", "e2e-dns-1", "abcdefghijkl"] {
            assert!(validate_lab_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Lab",
            "a_b",
            "-a",
            "a-",
            "abcdefghijklm",
            "a b",
            "a/b",
            "é",
            "a.b",
        ] {
            assert!(validate_lab_name(bad).is_err(), "{bad:?}");
        }
        let msg = validate_lab_name("UP").err().map(|e| e.to_string());
        assert!(msg.is_some_and(|m| m.contains("a-z")));
    }

    #[test]
    fn namespace_names_round_trip() {
        assert_eq!(underlay_netns("t1"), "mlab-t1-ul");
        assert_eq!(node_netns("t1", "node3"), "mlab-t1-node3");
        assert_eq!(
            parse_netns("mlab-t1-ul"),
            Some(("t1".into(), NsKind::Underlay))
        );
        assert_eq!(parse_netns("mlab-t1-sim"), Some(("t1".into(), NsKind::Sim)));
        assert_eq!(sim_node_ip(0), Some(Ipv4Addr::new(100, 64, 0, 1)));
        assert_eq!(sim_node_ip(65533), Some(Ipv4Addr::new(100, 64, 255, 254)));
        assert_eq!(sim_node_ip(65534), None);
        assert_eq!(
            parse_netns("mlab-t1-node12"),
            Some(("t1".into(), NsKind::Node("node12".into())))
        );
        // Lab names that look like suffixes stay with their own lab.
        assert_eq!(
            parse_netns("mlab-a-node1-node2"),
            Some(("a-node1".into(), NsKind::Node("node2".into())))
        );
        assert_eq!(
            parse_netns("mlab-a-ul-ul"),
            Some(("a-ul".into(), NsKind::Underlay))
        );
        assert_eq!(host_netns("t1", "host2"), "mlab-t1-host2");
        assert_eq!(
            parse_netns("mlab-t1-host2"),
            Some(("t1".into(), NsKind::Host("host2".into())))
        );
        assert_eq!(
            parse_netns("mlab-a-host1-node2"),
            Some(("a-host1".into(), NsKind::Node("node2".into())))
        );
        assert_eq!(
            parse_netns("mlab-a-node1-host2"),
            Some(("a-node1".into(), NsKind::Host("host2".into())))
        );
        for foreign in [
            "mlab-t1-hostx",
            "mlab-t1-host",
            "mlab-t1-nodex",
            "mlab-t1-node",
            "mlab--ul",
            "other",
            "mlab-T-ul",
            "mlab-t1",
        ] {
            assert_eq!(parse_netns(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(node_ip(7, 1), Ipv4Addr::new(192, 168, 7, 11));
        assert_eq!(node_ip(7, MAX_NODES), Ipv4Addr::new(192, 168, 7, 250));
        // Hosts follow the nodes, and the last possible one is still in range.
        assert_eq!(host_ip(7, 3, 1), Ipv4Addr::new(192, 168, 7, 14));
        assert_eq!(host_ip(7, 3, 2), Ipv4Addr::new(192, 168, 7, 15));
        assert_eq!(host_ip(7, MAX_NODES - 1, 1), node_ip(7, MAX_NODES));
    }

    #[test]
    fn subnet_picking() {
        let mut used = BTreeSet::new();
        assert_eq!(pick_subnet_index(&used), Some(1));
        used.extend([1, 2, 4]);
        assert_eq!(pick_subnet_index(&used), Some(3));
        used.extend(0..=255);
        assert_eq!(pick_subnet_index(&used), None);
    }

    #[test]
    fn node_args() {
        assert_eq!(normalize_node_arg("2"), "node2");
        assert_eq!(normalize_node_arg("02"), "node2");
        assert_eq!(normalize_node_arg("node2"), "node2");
    }
}
