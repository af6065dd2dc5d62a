//! `ip mesh_local` in the node namespace: NAT and isolation of Docker's
//! local `bridge` networks, rebuilt from the full list of them in one
//! atomic batch. It is separate from `ip mesh_egress` (the gwbridge's) so
//! neither rebuild can drop the other's rules.
//!
//! Per non-internal network: MASQUERADE for its subnet leaving through any
//! other interface, and a drop of anything forwarded to another of our
//! bridges (Docker's DOCKER-ISOLATION). Per internal network: a drop of
//! anything forwarded out of it or into it.

use std::collections::BTreeSet;

use nftables::expr::{Expression, MetaKey, NamedExpression, SetItem};
use nftables::schema::NfListObject;
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfChainType, NfHook};
use tracing::{debug, info};

use super::rules::{TableId, counter, jump, meta_is, saddr_in, string};
use super::{FirewallError, Table};
use crate::local::BridgeSpec;
use crate::netns::{self, NetError};
use crate::overlay::Node;

/// Our table (family `ip`) in the node's namespace.
pub const TABLE: &str = "mesh_local";

const ID: TableId = TableId::ip(TABLE);
const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";

/// The table for every bridge network the node has; with none, the table
/// should not exist.
#[derive(Debug, Clone, Copy)]
pub struct BridgeNat<'a> {
    pub nets: &'a [BridgeSpec],
}

/// Per-network chain of the forward hook: what traffic coming from the
/// network's bridge may not do.
fn fwd_chain(bridge: &str) -> String {
    format!("fwd-{bridge}")
}

/// Per-network chain of the postrouting hook: the network's NAT.
fn nat_chain(bridge: &str) -> String {
    format!("nat-{bridge}")
}

impl Table for BridgeNat<'_> {
    fn id(&self) -> TableId {
        ID
    }

    fn wanted(&self) -> bool {
        !self.nets.is_empty()
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let nets = self.nets;
        // srcnat priority, as Docker's and netavark's NAT.
        let mut b = vec![
            ID.chain(
                POSTROUTING,
                Some((NfChainType::NAT, NfHook::Postrouting, 100)),
            ),
            ID.chain(FORWARD, Some((NfChainType::Filter, NfHook::Forward, 0))),
        ];
        for net in nets {
            let br = net.bridge.as_str();
            let fwd = fwd_chain(br);
            b.push(ID.chain(fwd.clone(), None));
            b.push(ID.rule(
                FORWARD,
                vec![
                    meta_is(MetaKey::Iifname, Operator::EQ, string(br)),
                    jump(fwd.clone()),
                ],
                "traffic routed out of a mesh bridge network",
            ));
            if net.internal {
                b.push(ID.rule(
                    fwd,
                    vec![
                        meta_is(MetaKey::Oifname, Operator::NEQ, string(br)),
                        counter(),
                        Statement::Drop(None),
                    ],
                    "internal network: nothing leaves it",
                ));
                b.push(ID.rule(
                    FORWARD,
                    vec![
                        meta_is(MetaKey::Oifname, Operator::EQ, string(br)),
                        meta_is(MetaKey::Iifname, Operator::NEQ, string(br)),
                        counter(),
                        Statement::Drop(None),
                    ],
                    "internal network: nothing enters it from elsewhere",
                ));
                continue;
            }
            // Docker's DOCKER-ISOLATION: one bridge network never reaches
            // another through the node. Drops on the way in to the others
            // are their own chains' rules.
            let others: Vec<SetItem<'static>> = nets
                .iter()
                .filter(|o| o.bridge != net.bridge)
                .map(|o| SetItem::Element(string(&o.bridge)))
                .collect();
            if !others.is_empty() {
                b.push(ID.rule(
                    fwd,
                    vec![
                        meta_is(
                            MetaKey::Oifname,
                            Operator::EQ,
                            Expression::Named(NamedExpression::Set(others)),
                        ),
                        counter(),
                        Statement::Drop(None),
                    ],
                    "isolation between bridge networks",
                ));
            }
            let nat = nat_chain(br);
            b.push(ID.chain(nat.clone(), None));
            b.push(ID.rule(
                POSTROUTING,
                vec![saddr_in(&net.subnet), jump(nat.clone())],
                "traffic from a mesh bridge network",
            ));
            b.push(ID.rule(
                nat,
                vec![
                    meta_is(MetaKey::Oifname, Operator::NEQ, string(br)),
                    counter(),
                    Statement::Masquerade(None),
                ],
                "sandbox traffic leaving the node takes the node's address",
            ));
        }
        Ok(b)
    }
}

/// IPv4 forwarding on in the node's namespace, as routing from a bridge to
/// the uplink needs.
pub(crate) fn forwarding_on(ns: Option<&str>) -> Result<(), NetError> {
    match super::enable_forwarding(ns) {
        Ok(true) => {
            info!(ns = %netns::label(ns), "turned on IPv4 forwarding");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(namespace_error("turn on IPv4 forwarding in", ns, e)),
    }
}

fn namespace_error(action: &'static str, ns: Option<&str>, e: FirewallError) -> NetError {
    match e {
        FirewallError::Net(n) => n,
        FirewallError::Forwarding(source) => NetError::Namespace {
            action,
            name: netns::label(ns),
            source,
        },
        other => NetError::Namespace {
            action,
            name: netns::label(ns),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

fn validate(nets: &[BridgeSpec]) -> Result<(), NetError> {
    let mut seen = BTreeSet::new();
    for net in nets {
        crate::local::validate_bridge(net)?;
        if !seen.insert(net.bridge.as_str()) {
            return Err(NetError::Invalid(format!(
                "bridge networks: device {} is listed twice; each network needs its own bridge",
                net.bridge
            )));
        }
    }
    Ok(())
}

/// Makes the node's `ip mesh_local` table exactly what `nets` (every bridge
/// network the node has) needs, in one atomic batch. Removing a network is
/// calling this without it; with none left the table goes. Blocking (it
/// runs `nft`): async callers use `spawn_blocking`.
pub fn sync_nat(node: &Node, nets: &[BridgeSpec]) -> Result<(), NetError> {
    validate(nets)?;
    let ns = node.ns.as_deref();
    if nets.iter().any(|n| !n.internal) {
        forwarding_on(ns)?;
    }
    super::sync(ns, &BridgeNat { nets })
        .map_err(|e| namespace_error("apply the nftables table `ip mesh_local` in", ns, e))?;
    debug!(ns = %netns::label(ns), networks = nets.len(), "rebuilt table {TABLE}");
    Ok(())
}

/// Like [`sync_nat`], but only rebuilds the table when the kernel's copy
/// drifted from what `nets` needs (one `nft` run when it did not); returns
/// what it found. For the reconcile loop.
pub fn repair_nat(node: &Node, nets: &[BridgeSpec]) -> Result<super::Drift, NetError> {
    validate(nets)?;
    let ns = node.ns.as_deref();
    if nets.iter().any(|n| !n.internal) {
        forwarding_on(ns)?;
    }
    let found = super::repair(ns, &BridgeNat { nets })
        .map_err(|e| namespace_error("repair the nftables table `ip mesh_local` in", ns, e))?;
    if found != super::Drift::InSync {
        info!(ns = %netns::label(ns), ?found, "rebuilt table {TABLE}");
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{batch, table_of};
    use ipnet::Ipv4Net;
    use mesh_common::ipam;

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

    fn nat_batch(nets: &[BridgeSpec]) -> nftables::batch::Batch<'static> {
        batch(&BridgeNat { nets }).expect("batch")
    }

    #[test]
    fn batch_masquerades_isolates_and_keeps_internal_in() {
        let nets = [
            spec("mbr-a", "10.88.0.0/24", false),
            spec("mbr-b", "10.89.0.0/24", false),
            spec("mbr-i", "10.90.0.0/24", true),
        ];
        let json = serde_json::to_value(nat_batch(&nets).to_nftables()).expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        assert_eq!(cmds[2]["add"]["table"]["name"], TABLE);
        let text = json.to_string();
        // NAT for the two non-internal subnets, none for the internal one.
        assert_eq!(text.matches("\"masquerade\"").count(), 2, "{text}");
        assert!(
            text.contains("10.88.0.0") && text.contains("10.89.0.0"),
            "{text}"
        );
        assert!(!text.contains("10.90.0.0"), "{text}");
        // A's isolation set names the other bridges, not A.
        let a_drop = cmds
            .iter()
            .find(|c| c["add"]["rule"]["chain"] == "fwd-mbr-a")
            .expect("rule in fwd-mbr-a");
        let set = a_drop.to_string();
        assert!(set.contains("mbr-b") && set.contains("mbr-i"), "{set}");
        assert!(!set.contains("\"mbr-a\""), "{set}");
        // Every object is in our table.
        for c in &cmds[1..] {
            assert_eq!(table_of(c), Some(TABLE), "{c}");
        }
    }

    #[test]
    fn empty_list_only_removes_the_table() {
        let json = serde_json::to_value(nat_batch(&[]).to_nftables()).expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
    }
}
