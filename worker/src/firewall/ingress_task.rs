//! `ip mesh_ingress_task` in each task sandbox with an ingress interface:
//! the client's address is kept (no SNAT in the ingress sandbox), so a
//! reply must be routed back to the node whose ingress sandbox sent the
//! connection, not along the default route. The sender is known by the
//! source MAC of the first packet (every MAC derives from its IP):
//!
//! - filter `prerouting` (mangle): a new connection on the ingress
//!   interface gets the ct mark of the sending node; the packet mark
//!   follows the ct mark;
//! - route `output` (mangle): a packet of a marked connection carries the
//!   mark, and the kernel routes it again (`ip rule fwmark M lookup M`,
//!   table M = default via that node's ingress address);
//! - filter `input`: on the ingress interface only new connections to the
//!   service's published target ports are accepted.
//!
//! One rule per node (its MAC is a plain operand), so drift detection sees
//! a changed node list.

use std::collections::{BTreeMap, BTreeSet};

use nftables::expr::{Expression, MetaKey, NamedExpression};
use nftables::schema::NfListObject;
use nftables::stmt::{Mangle, Match, Operator, Statement};
use nftables::types::{NfChainType, NfHook};

use mesh_common::model::Protocol;

use super::rules::{TableId, counter, ct, dport, meta_is, payload, string};
use super::{FirewallError, Table};

/// Our table (family `ip`) in each task sandbox on the ingress network.
pub const TABLE: &str = "mesh_ingress_task";
/// The table's family and name.
pub const ID: TableId = TableId::ip(TABLE);
/// mangle
const MANGLE: i32 = -150;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressTask {
    /// The task's interface on the ingress network.
    pub ifname: String,
    /// Each node's ingress MAC ("02:42:…") and its mark.
    pub marks: BTreeMap<String, u32>,
    /// The target ports the ingress interface accepts.
    pub ports: BTreeSet<(Protocol, u16)>,
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    Statement::Match(Match {
        left: ct("state"),
        // nft lists a list of one as its element: so it is given that way,
        // or drift detection would see a difference every pass.
        right: match states {
            [one] => string(one),
            _ => Expression::List(states.iter().map(|s| string(s)).collect()),
        },
        op: Operator::IN,
    })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(nftables::expr::Meta { key }))
}

impl Table for IngressTask {
    fn id(&self) -> TableId {
        ID
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let ing = || meta_is(MetaKey::Iifname, Operator::EQ, string(&self.ifname));
        let mut b = vec![
            ID.chain(
                "prerouting",
                Some((NfChainType::Filter, NfHook::Prerouting, MANGLE)),
            ),
            ID.chain("output", Some((NfChainType::Route, NfHook::Output, MANGLE))),
            ID.chain("input", Some((NfChainType::Filter, NfHook::Input, 0))),
        ];
        for (mac, mark) in &self.marks {
            b.push(ID.rule(
                "prerouting",
                vec![
                    ing(),
                    ct_state(&["new"]),
                    Statement::Match(Match {
                        left: payload("ether", "saddr"),
                        right: string(mac),
                        op: Operator::EQ,
                    }),
                    Statement::Mangle(Mangle {
                        key: ct("mark"),
                        value: Expression::Number(*mark),
                    }),
                ],
                format!("connection from the ingress sandbox of mark {mark:#x}"),
            ));
        }
        b.push(ID.rule(
            "prerouting",
            vec![
                ing(),
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: ct("mark"),
                }),
            ],
            "the packet mark follows its connection's",
        ));
        b.push(ID.rule(
            "output",
            vec![
                Statement::Match(Match {
                    left: ct("mark"),
                    right: Expression::Number(0),
                    op: Operator::NEQ,
                }),
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: ct("mark"),
                }),
            ],
            "replies go back to the node that sent the connection",
        ));
        b.push(ID.rule(
            "input",
            vec![
                ing(),
                ct_state(&["established", "related"]),
                Statement::Accept(None),
            ],
            "replies and the rest of accepted connections",
        ));
        for (proto, port) in &self.ports {
            let r = vec![
                ing(),
                ct_state(&["new"]),
                dport(*proto, *port),
                Statement::Accept(None),
            ];
            b.push(ID.rule("input", r, format!("published target {port}/{proto}")));
        }
        b.push(ID.rule(
            "input",
            vec![ing(), counter(), Statement::Drop(None)],
            "nothing else enters through the ingress network",
        ));
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::batch;

    #[test]
    fn marks_by_mac_route_replies_and_only_targets_enter() {
        let t = IngressTask {
            ifname: "eth1".into(),
            marks: [("02:42:0a:ff:00:02".to_string(), 0x102)].into(),
            ports: [(Protocol::Tcp, 80)].into(),
        };
        let j = serde_json::to_string(&batch(&t).expect("batch").to_nftables()).expect("json");
        assert!(
            j.contains(
                r#"{"payload":{"protocol":"ether","field":"saddr"}},"right":"02:42:0a:ff:00:02""#
            ),
            "{j}"
        );
        assert!(
            j.contains(r#"{"mangle":{"key":{"ct":{"key":"mark"}},"value":258}}"#),
            "{j}"
        );
        assert!(j.contains(r#""type":"route","hook":"output""#), "{j}");
        assert!(
            j.contains(
                r#"{"mangle":{"key":{"meta":{"key":"mark"}},"value":{"ct":{"key":"mark"}}}}"#
            ),
            "{j}"
        );
        assert!(j.contains(r#""comment":"published target 80/tcp""#), "{j}");
        assert!(j.contains(r#"{"drop":null}"#), "{j}");
    }
}
