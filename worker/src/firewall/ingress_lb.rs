//! `ip mesh_ingress_lb` in the node's ingress sandbox: each published port
//! is load-balanced round robin over the ingress addresses of the
//! service's tasks, on whatever node they run.
//!
//! - nat `prerouting`: `iifname gw0 <proto> dport P dnat to numgen inc mod
//!   N map { 0 : b0, … } : TARGET` (backends sorted, so the same input
//!   builds the same table);
//! - filter `input`: a port without backends is refused at once (TCP
//!   reset, ICMP port unreachable), not left to time out;
//! - nat `postrouting`: UDP leaving on the ingress interface is
//!   masqueraded. TCP is not: the task sees the client's address and routes
//!   its replies back here by the MAC the SYN came from (see
//!   `firewall::ingress_task`). An unconnected UDP socket picks its reply
//!   source from the unmarked route, so for UDP the client address is
//!   given up for replies that always find their way (as Cilium's hybrid
//!   mode does);
//! - filter `forward`: TCP MSS clamped to the route's MTU, since a custom
//!   ingress network may have a smaller MTU than the client's path.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use mesh_common::model::Protocol;
use nftables::expr::{Expression, MetaKey, NamedExpression, RT, RTKey, TcpOption};
use nftables::schema::NfListObject;
use nftables::stmt::{Mangle, Match, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfHook, RejectCode};

use super::rules::{
    TableId, counter, cut_comment, dnat_round_robin, dport, meta_is, payload, string,
};
use super::{FirewallError, Table};

/// Our table (family `ip`) in the ingress sandbox.
pub const TABLE: &str = "mesh_ingress_lb";
/// The table's family and name.
pub const ID: TableId = TableId::ip(TABLE);

/// One published port and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LbPort {
    pub proto: Protocol,
    pub port: u16,
    pub target: u16,
    pub service: String,
    pub backends: BTreeSet<Ipv4Addr>,
}

/// The ingress sandbox's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressLb {
    /// The link from the node (`gw0`).
    pub from_node: String,
    /// The interface on the ingress network (`eth0`).
    pub ingress: String,
    pub ports: BTreeSet<LbPort>,
}

impl Table for IngressLb {
    fn id(&self) -> TableId {
        ID
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let mut b = vec![
            ID.chain(
                "prerouting",
                Some((NfChainType::NAT, NfHook::Prerouting, -100)),
            ),
            ID.chain("input", Some((NfChainType::Filter, NfHook::Input, 0))),
            ID.chain(
                "postrouting",
                Some((NfChainType::NAT, NfHook::Postrouting, 100)),
            ),
            ID.chain("forward", Some((NfChainType::Filter, NfHook::Forward, 0))),
        ];
        for p in &self.ports {
            let what = cut_comment(format!(
                "published {}/{} service {}",
                p.port, p.proto, p.service
            ));
            let mut r = vec![
                meta_is(MetaKey::Iifname, Operator::EQ, string(&self.from_node)),
                dport(p.proto, p.port),
                counter(),
            ];
            if p.backends.is_empty() {
                r.push(Statement::Reject(Some(match p.proto {
                    Protocol::Tcp => Reject::new(Some(RejectType::TCPReset), None),
                    Protocol::Udp => {
                        Reject::new(Some(RejectType::ICMP), Some(RejectCode::PortUnreach))
                    }
                })));
                b.push(ID.rule("input", r, what));
            } else {
                r.push(dnat_round_robin(TABLE, &p.backends, Some(p.target))?);
                b.push(ID.rule("prerouting", r, what));
            }
        }
        b.push(ID.rule(
            "postrouting",
            vec![
                meta_is(MetaKey::Oifname, Operator::EQ, string(&self.ingress)),
                meta_is(MetaKey::L4proto, Operator::EQ, string("udp")),
                counter(),
                Statement::Masquerade(None),
            ],
            "UDP replies must come back here: the source is not kept for UDP",
        ));
        b.push(ID.rule(
            "forward",
            vec![
                Statement::Match(Match {
                    left: payload("tcp", "flags"),
                    right: string("syn"),
                    op: Operator::IN,
                }),
                Statement::Mangle(Mangle {
                    key: Expression::Named(NamedExpression::TcpOption(TcpOption {
                        name: "maxseg".into(),
                        field: Some("size".into()),
                    })),
                    value: Expression::Named(NamedExpression::RT(RT {
                        key: RTKey::MTU,
                        family: None,
                    })),
                }),
            ],
            "clamp the MSS to the path: a custom ingress may have a small MTU",
        ));
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::batch;

    #[test]
    fn ports_are_balanced_over_sorted_backends_or_refused() {
        let t = IngressLb {
            from_node: "gw0".into(),
            ingress: "eth0".into(),
            ports: [
                LbPort {
                    proto: Protocol::Tcp,
                    port: 8080,
                    target: 80,
                    service: "web".into(),
                    backends: [Ipv4Addr::new(10, 0, 0, 6), Ipv4Addr::new(10, 0, 0, 5)].into(),
                },
                LbPort {
                    proto: Protocol::Udp,
                    port: 5353,
                    target: 53,
                    service: "dns".into(),
                    backends: BTreeSet::new(),
                },
            ]
            .into(),
        };
        let j = serde_json::to_string(&batch(&t).expect("batch").to_nftables()).expect("json");
        let want = r#"{"dnat":{"addr":{"map":{"key":{"numgen":{"mode":"inc","mod":2,"offset":0}},"data":{"set":[[0,"10.0.0.5"],[1,"10.0.0.6"]]}}},"port":80}}"#;
        assert!(j.contains(want), "{j}");
        assert!(
            j.contains(r#"{"reject":{"type":"icmp","expr":"port-unreachable"}}"#),
            "{j}"
        );
        assert!(
            j.contains(r#""comment":"published 8080/tcp service web""#),
            "{j}"
        );
        assert!(
            j.contains(r#"{"tcp option":{"name":"maxseg","field":"size"}}"#),
            "{j}"
        );
        assert!(j.contains(r#"{"rt":{"key":"mtu"}}"#), "{j}");
        // No SNAT for TCP: the only masquerade is for UDP.
        assert_eq!(j.matches("masquerade").count(), 1, "{j}");
    }
}
