//! `ip mesh_egress` in the node namespace: what `docker_gwbridge`'s
//! iptables rules do, as one table of our own. Traffic from the gwbridge
//! subnet leaving through any other interface is masqueraded; traffic
//! routed from one gwbridge port to another is dropped (sandboxes reach the
//! world, not each other); replies are accepted.

use ipnet::Ipv4Net;
use nftables::expr::{Expression, MetaKey, NamedExpression};
use nftables::schema::NfListObject;
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfHook};

use super::rules::{self, TableId, counter, meta_is, saddr_in, string};
use super::{FirewallError, Table};
use crate::egress::GWBRIDGE;

/// Our table (family `ip`) in the node namespace.
pub const TABLE: &str = "mesh_egress";

/// The table's family and name.
pub const ID: TableId = TableId::ip(TABLE);
const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";

/// The egress table for one gwbridge subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressTable {
    pub subnet: Ipv4Net,
}

impl Table for EgressTable {
    fn id(&self) -> TableId {
        ID
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        Ok(vec![
            // srcnat priority, as Docker's and netavark's NAT.
            ID.chain(
                POSTROUTING,
                Some((NfChainType::NAT, NfHook::Postrouting, 100)),
            ),
            ID.rule(
                POSTROUTING,
                vec![
                    saddr_in(&self.subnet),
                    meta_is(MetaKey::Oifname, Operator::NEQ, string(GWBRIDGE)),
                    counter(),
                    Statement::Masquerade(None),
                ],
                "sandbox traffic leaving the node takes the node's address",
            ),
            ID.chain(FORWARD, Some((NfChainType::Filter, NfHook::Forward, 0))),
            ID.rule(
                FORWARD,
                vec![
                    meta_is(MetaKey::Iifname, Operator::EQ, string(GWBRIDGE)),
                    meta_is(MetaKey::Oifname, Operator::EQ, string(GWBRIDGE)),
                    counter(),
                    Statement::Drop(None),
                ],
                "no sandbox-to-sandbox traffic routed over the gateway bridge",
            ),
            ID.rule(
                FORWARD,
                vec![
                    Statement::Match(Match {
                        left: Expression::Named(NamedExpression::CT(nftables::expr::CT {
                            key: "state".into(),
                            family: None,
                            dir: None,
                        })),
                        right: Expression::List(vec![
                            rules::string("established"),
                            rules::string("related"),
                        ]),
                        op: Operator::IN,
                    }),
                    Statement::Accept(None),
                ],
                "replies to sandbox connections",
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{batch, table_of};
    use mesh_common::ipam;

    fn egress_batch(net: &Ipv4Net) -> nftables::batch::Batch<'static> {
        batch(&EgressTable { subnet: *net }).expect("batch")
    }

    #[test]
    fn batch_replaces_only_our_table() {
        let net = ipam::parse_subnet("172.18.0.0/16").expect("subnet");
        let json = serde_json::to_value(egress_batch(&net).to_nftables()).expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        // add table, delete table, add table: an atomic replace.
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        assert_eq!(cmds[2]["add"]["table"]["name"], TABLE);
        for c in cmds {
            assert_eq!(table_of(c), Some(TABLE), "{c}");
        }
        let text = json.to_string();
        assert!(text.contains("\"masquerade\""), "{text}");
        assert!(text.contains("172.18.0.0"), "{text}");
    }
}
