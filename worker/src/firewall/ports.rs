//! `ip mesh_ports` in the node namespace: the host ports of standalone
//! sandboxes (`mesh run -p`), rebuilt from every record in one batch.
//!
//! - nat `prerouting` and `output` (dstnat): `fib daddr type local [ip daddr
//!   IP] PROTO dport HOST dnat to SANDBOX:CONT`, so the port answers from
//!   other nodes and from the node itself;
//! - nat `postrouting` (srcnat), per interface a sandbox is reached on:
//!   masquerade sources in 127.0.0.0/8 (with `route_localnet` on that
//!   interface, set by the caller), and hairpin (`ct status dnat` from the
//!   same interface), so replies come back through the node.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::model::Protocol;
use nftables::expr::MetaKey;
use nftables::schema::NfListObject;
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfChainType, NfHook};

use super::rules::{
    TableId, counter, ct_status_dnat, cut_comment, dnat, dport, fib_daddr_local, ip_field_is,
    meta_is, saddr_in, string,
};
use super::{FirewallError, Table};

/// Our table (family `ip`) in the node's namespace.
pub const TABLE: &str = "mesh_ports";
pub const ID: TableId = TableId::ip(TABLE);
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";

/// One published port and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    /// None: every local address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub protocol: Protocol,
    pub target: Ipv4Addr,
    pub target_port: u16,
    /// The node-side interface the sandbox is reached through (its bridge
    /// or mesh_gwbridge).
    pub iface: String,
    /// The sandbox's name, for the rule's comment.
    pub sandbox: String,
}

/// The table for every published port of the node; with none, the table
/// should not exist.
#[derive(Debug, Clone, Copy)]
pub struct PortsTable<'a> {
    pub rules: &'a [PortRule],
}

impl Table for PortsTable<'_> {
    fn id(&self) -> TableId {
        ID
    }

    fn wanted(&self) -> bool {
        !self.rules.is_empty()
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let mut rules = self.rules.to_vec();
        rules.sort();
        rules.dedup();
        let mut b = vec![
            ID.chain(
                PREROUTING,
                Some((NfChainType::NAT, NfHook::Prerouting, -100)),
            ),
            ID.chain(OUTPUT, Some((NfChainType::NAT, NfHook::Output, -100))),
            ID.chain(
                POSTROUTING,
                Some((NfChainType::NAT, NfHook::Postrouting, 100)),
            ),
        ];
        for chain in [PREROUTING, OUTPUT] {
            for r in &rules {
                let mut e = vec![fib_daddr_local()];
                if let Some(ip) = r.host_ip {
                    e.push(ip_field_is("daddr", string(ip)));
                }
                e.push(dport(r.protocol, r.host_port));
                e.push(counter());
                e.push(dnat(r.target, Some(r.target_port)));
                b.push(ID.rule(chain, e, comment(r)));
            }
        }
        let ifaces: BTreeSet<&str> = rules.iter().map(|r| r.iface.as_str()).collect();
        let loopback = Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("a valid prefix");
        for iface in ifaces {
            b.push(ID.rule(
                POSTROUTING,
                vec![
                    meta_is(MetaKey::Oifname, Operator::EQ, string(iface)),
                    saddr_in(&loopback),
                    counter(),
                    Statement::Masquerade(None),
                ],
                "published port reached from the node's loopback",
            ));
            b.push(ID.rule(
                POSTROUTING,
                vec![
                    meta_is(MetaKey::Iifname, Operator::EQ, string(iface)),
                    meta_is(MetaKey::Oifname, Operator::EQ, string(iface)),
                    ct_status_dnat(),
                    counter(),
                    Statement::Masquerade(None),
                ],
                "published port reached from a sandbox on the same network (hairpin)",
            ));
        }
        Ok(b)
    }
}

/// "sandbox NAME 80/tcp", cut to what nft accepts.
fn comment(r: &PortRule) -> String {
    cut_comment(format!(
        "sandbox {} {}/{}",
        r.sandbox, r.target_port, r.protocol
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{batch, table_of};

    fn rule(ip: Option<[u8; 4]>, port: u16, proto: Protocol, iface: &str) -> PortRule {
        PortRule {
            host_ip: ip.map(Ipv4Addr::from),
            host_port: port,
            protocol: proto,
            target: Ipv4Addr::new(172, 17, 0, 2),
            target_port: 80,
            iface: iface.into(),
            sandbox: "web".into(),
        }
    }

    #[test]
    fn dnat_in_both_hooks_and_masquerade_per_interface() {
        let rules = [
            rule(None, 8080, Protocol::Tcp, "mesh0"),
            rule(Some([127, 0, 0, 1]), 9090, Protocol::Udp, "mesh0"),
        ];
        let json = serde_json::to_value(
            batch(&PortsTable { rules: &rules })
                .expect("batch")
                .to_nftables(),
        )
        .expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        for c in &cmds[1..] {
            assert_eq!(table_of(c), Some(TABLE), "{c}");
        }
        let in_chain = |chain: &str| -> Vec<String> {
            cmds.iter()
                .filter(|c| c["add"]["rule"]["chain"] == chain)
                .map(|c| c.to_string())
                .collect()
        };
        for chain in [PREROUTING, OUTPUT] {
            let r = in_chain(chain);
            assert_eq!(r.len(), 2, "{r:?}");
            assert!(
                r.iter()
                    .all(|x| x.contains("\"fib\"") && x.contains("\"dnat\""))
            );
            assert!(
                r.iter()
                    .any(|x| x.contains("\"tcp\"") && x.contains("8080"))
            );
            // Only the loopback-bound rule names an address.
            let bound: Vec<_> = r.iter().filter(|x| x.contains("127.0.0.1")).collect();
            assert_eq!(bound.len(), 1);
            assert!(bound[0].contains("\"udp\"") && bound[0].contains("9090"));
        }
        let post = in_chain(POSTROUTING);
        assert_eq!(post.len(), 2, "one interface: loopback + hairpin");
        assert!(
            post.iter()
                .all(|x| x.contains("masquerade") && x.contains("mesh0"))
        );
        assert!(post.iter().any(|x| x.contains("127.0.0.0")));
        assert!(
            post.iter()
                .any(|x| x.contains("\"dnat\"") && x.contains("status"))
        );
    }

    #[test]
    fn no_ports_no_table() {
        let t = PortsTable { rules: &[] };
        assert!(!t.wanted());
        let json = serde_json::to_value(batch(&t).expect("batch").to_nftables()).expect("json");
        assert_eq!(json["nftables"].as_array().expect("array").len(), 2);
    }
}
