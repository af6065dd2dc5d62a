//! `ip mesh_ingress` in the node namespace: published ports reach the
//! routing mesh (ingress mode) or a local task straight (host mode), as
//! Swarm's `DOCKER-INGRESS` chain does with iptables.
//!
//! - nat `prerouting` and `output` (dstnat): `fib daddr type local` plus the
//!   port: an ingress port goes to the node's ingress sandbox (port kept),
//!   a host port to the task's `gw0` address and target port;
//! - nat `postrouting` (srcnat): sources in 127.0.0.0/8 are masqueraded on
//!   their way to the sandbox (`route_localnet=1` lets them leave `lo`), so
//!   `curl 127.0.0.1:PORT` works on the node; traffic DNATed back out of
//!   the gateway bridge it came from (a sandbox reaching a published port
//!   of this node) is masqueraded so the reply comes back the same way.
//!
//! Every rule's comment names its port: drift detection compares comments,
//! so a changed port list is rebuilt even where only a number changed.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::model::Protocol;
use nftables::expr::MetaKey;
use nftables::schema::NfListObject;
use nftables::stmt::{Operator, Statement};
use nftables::types::{NfChainType, NfHook};

use super::rules::{
    TableId, counter, ct_status_dnat, cut_comment, dnat, dport, fib_daddr_local, meta_is, saddr_in,
    string,
};
use super::{FirewallError, Table};

/// Our table (family `ip`) in the node namespace.
pub const TABLE: &str = "mesh_ingress";
/// The table's family and name.
pub const ID: TableId = TableId::ip(TABLE);
const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const POSTROUTING: &str = "postrouting";

/// An ingress-mode port: to the node's ingress sandbox.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshPort {
    pub proto: Protocol,
    pub port: u16,
}

/// A host-mode port of a local task: straight to its `gw0` address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostPort {
    pub proto: Protocol,
    pub port: u16,
    pub task: String,
    pub addr: Ipv4Addr,
    pub target: u16,
}

/// The node's published-port table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressHost {
    /// The ingress sandbox's address on its link to the node, and the
    /// node end's interface; None without an ingress network.
    pub sandbox: Option<(Ipv4Addr, String)>,
    pub mesh_ports: BTreeSet<MeshPort>,
    pub host_ports: BTreeSet<HostPort>,
    /// The gateway bridge (name, subnet) host-mode tasks hang off.
    pub gwbridge: (String, Ipv4Net),
}

impl IngressHost {
    fn nothing(&self) -> bool {
        self.host_ports.is_empty() && (self.sandbox.is_none() || self.mesh_ports.is_empty())
    }
}

impl Table for IngressHost {
    fn id(&self) -> TableId {
        ID
    }

    fn wanted(&self) -> bool {
        !self.nothing()
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let mut b = Vec::new();
        for (chain, hook) in [(PREROUTING, NfHook::Prerouting), (OUTPUT, NfHook::Output)] {
            b.push(ID.chain(chain, Some((NfChainType::NAT, hook, -100))));
            if let Some((sbox, _)) = &self.sandbox {
                for p in &self.mesh_ports {
                    let r = vec![
                        fib_daddr_local(),
                        dport(p.proto, p.port),
                        counter(),
                        dnat(*sbox, None),
                    ];
                    b.push(ID.rule(
                        chain,
                        r,
                        format!("ingress {}/{} to the routing mesh", p.port, p.proto),
                    ));
                }
            }
            for p in &self.host_ports {
                let r = vec![
                    fib_daddr_local(),
                    dport(p.proto, p.port),
                    counter(),
                    dnat(p.addr, Some(p.target)),
                ];
                let c = format!(
                    "host {}/{} to {}:{} task {}",
                    p.port, p.proto, p.addr, p.target, p.task
                );
                b.push(ID.rule(chain, r, cut_comment(c)));
            }
        }
        b.push(ID.chain(
            POSTROUTING,
            Some((NfChainType::NAT, NfHook::Postrouting, 100)),
        ));
        let loopback = Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default();
        let mut outs: Vec<String> = Vec::new();
        if let Some((_, ifname)) = &self.sandbox {
            outs.push(ifname.clone());
        }
        if !self.host_ports.is_empty() {
            outs.push(self.gwbridge.0.clone());
        }
        for out in outs {
            b.push(ID.rule(
                POSTROUTING,
                vec![
                    saddr_in(&loopback),
                    meta_is(MetaKey::Oifname, Operator::EQ, string(&out)),
                    counter(),
                    Statement::Masquerade(None),
                ],
                format!("the node's 127.0.0.1 reaching a published port through {out}"),
            ));
        }
        b.push(ID.rule(
            POSTROUTING,
            vec![
                ct_status_dnat(),
                meta_is(MetaKey::Iifname, Operator::EQ, string(&self.gwbridge.0)),
                counter(),
                Statement::Masquerade(None),
            ],
            "hairpin: a sandbox of this node reaching a published port",
        ));
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::batch;

    fn json(t: &IngressHost) -> String {
        serde_json::to_string(&batch(t).expect("batch").to_nftables()).expect("json")
    }

    fn gw() -> (String, Ipv4Net) {
        (
            "mesh_gwbridge".into(),
            "172.18.0.0/16".parse().expect("net"),
        )
    }

    #[test]
    fn ingress_ports_go_to_the_sandbox_and_host_ports_to_the_task() {
        let t = IngressHost {
            sandbox: Some((Ipv4Addr::new(169, 254, 254, 2), "mesh_ingress".into())),
            mesh_ports: [MeshPort {
                proto: Protocol::Tcp,
                port: 8080,
            }]
            .into(),
            host_ports: [HostPort {
                proto: Protocol::Udp,
                port: 5353,
                task: "dns.1.x".into(),
                addr: Ipv4Addr::new(172, 18, 0, 5),
                target: 53,
            }]
            .into(),
            gwbridge: gw(),
        };
        let j = json(&t);
        assert!(
            j.contains(r#"{"fib":{"result":"type","flags":["daddr"]}}"#),
            "{j}"
        );
        assert!(
            j.contains(r#"{"payload":{"protocol":"tcp","field":"dport"}},"right":8080"#),
            "{j}"
        );
        assert!(j.contains(r#"{"dnat":{"addr":"169.254.254.2"}}"#), "{j}");
        assert!(
            j.contains(r#"{"dnat":{"addr":"172.18.0.5","port":53}}"#),
            "{j}"
        );
        assert!(
            j.contains(r#""comment":"ingress 8080/tcp to the routing mesh""#),
            "{j}"
        );
        assert!(
            j.contains(r#""prefix":{"addr":"127.0.0.0","len":8}"#),
            "{j}"
        );
        assert!(j.contains(r#""right":"mesh_ingress""#), "{j}");
        assert!(j.contains(r#"{"masquerade":null}"#), "{j}");
        // Both hooks: from outside and from the node itself.
        assert_eq!(j.matches("ingress 8080/tcp").count(), 2, "{j}");
    }

    #[test]
    fn no_ports_means_no_table() {
        let t = IngressHost {
            sandbox: Some((Ipv4Addr::new(169, 254, 254, 2), "mesh_ingress".into())),
            gwbridge: gw(),
            ..Default::default()
        };
        assert!(!t.wanted());
        let j = json(&t);
        assert!(!j.contains("chain"), "{j}");
        assert!(j.contains(r#""delete""#), "{j}");
    }
}
