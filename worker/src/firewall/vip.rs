//! `ip mesh_vip` in each client sandbox: service VIPs load-balanced over
//! the services' tasks (see `crate::vip` for why it is built this way).
//!
//! - a nat chain hooked at `output`, one rule per service with tasks:
//!   `ip daddr VIP dnat to numgen inc mod N map { 0 : b0, 1 : b1, ... }`;
//! - a filter chain at `output` refusing connections to the VIPs of
//!   services without tasks: TCP reset, ICMP port unreachable otherwise.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use nftables::expr::{Expression, MetaKey, NamedExpression, SetItem};
use nftables::schema::NfListObject;
use nftables::stmt::{Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfHook, RejectCode};
use tracing::warn;

use super::rules::{TableId, counter, cut_comment, dnat_round_robin, ip_field_is, meta_is, string};
use super::{FirewallError, Table};
use crate::vip::VipService;

/// Our table (family `ip`) in each client sandbox.
pub const TABLE: &str = "mesh_vip";

/// The table's family and name.
pub const ID: TableId = TableId::ip(TABLE);
const NAT_CHAIN: &str = "output_nat";
const FILTER_CHAIN: &str = "output_filter";
/// dstnat, as any DNAT of locally generated traffic.
const NAT_PRIORITY: i32 = -100;
/// filter: after DNAT, so translated packets no longer carry a VIP.
const FILTER_PRIORITY: i32 = 0;

/// The VIP table for the services one sandbox sees. Services are sorted by
/// VIP and backends by address, so the same input (in any order,
/// duplicates aside) always builds the same table.
#[derive(Debug, Clone, Copy)]
pub struct VipTable<'a> {
    pub services: &'a [VipService],
}

impl VipTable<'_> {
    /// Services by VIP, each with its pool of backends.
    fn by_vip(&self) -> BTreeMap<Ipv4Addr, (&str, BTreeSet<Ipv4Addr>)> {
        let mut by_vip: BTreeMap<Ipv4Addr, (&str, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
        for s in self.services {
            let backends = s.backends.iter().copied();
            match by_vip.entry(s.vip) {
                Entry::Vacant(e) => {
                    e.insert((&s.name, backends.collect()));
                }
                // The same service listed twice (e.g. from two views): one pool.
                Entry::Occupied(mut e) if e.get().0 == s.name => e.get_mut().1.extend(backends),
                // One address for two services is a bug upstream; keeping one
                // of them (the same one whatever the order) beats refusing the
                // whole table, which would break every other service too.
                Entry::Occupied(mut e) => {
                    let (first, second) = (e.get().0, s.name.as_str());
                    let kept = first.min(second);
                    warn!(vip = %s.vip, first, second, kept, "two services share one VIP");
                    if kept == s.name {
                        e.insert((&s.name, backends.collect()));
                    }
                }
            }
        }
        by_vip
    }
}

impl Table for VipTable<'_> {
    fn id(&self) -> TableId {
        ID
    }

    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError> {
        let by_vip = self.by_vip();
        let mut b = Vec::new();
        let balanced: Vec<_> = by_vip
            .iter()
            .filter(|(_, (_, bk))| !bk.is_empty())
            .collect();
        if !balanced.is_empty() {
            b.push(ID.chain(
                NAT_CHAIN,
                Some((NfChainType::NAT, NfHook::Output, NAT_PRIORITY)),
            ));
            for (vip, (name, backends)) in balanced {
                b.push(ID.rule(
                    NAT_CHAIN,
                    vec![
                        ip_field_is("daddr", string(vip)),
                        counter(),
                        dnat_round_robin(TABLE, backends, None)?,
                    ],
                    comment(name),
                ));
            }
        }

        // One set lookup per rule: this chain sees every packet the sandbox
        // sends, not only the first of each connection.
        let idle: Vec<_> = by_vip
            .iter()
            .filter(|(_, (_, bk))| bk.is_empty())
            .map(|(vip, _)| SetItem::Element(string(vip)))
            .collect();
        if !idle.is_empty() {
            b.push(ID.chain(
                FILTER_CHAIN,
                Some((NfChainType::Filter, NfHook::Output, FILTER_PRIORITY)),
            ));
            let idle = Expression::Named(NamedExpression::Set(idle));
            b.push(ID.rule(
                FILTER_CHAIN,
                vec![
                    ip_field_is("daddr", idle.clone()),
                    meta_is(MetaKey::L4proto, Operator::EQ, string("tcp")),
                    counter(),
                    Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
                ],
                "service without tasks: refuse TCP at once",
            ));
            b.push(ID.rule(
                FILTER_CHAIN,
                vec![
                    ip_field_is("daddr", idle),
                    counter(),
                    Statement::Reject(Some(Reject::new(
                        Some(RejectType::ICMP),
                        Some(RejectCode::PortUnreach),
                    ))),
                ],
                "service without tasks: refuse the rest at once",
            ));
        }
        Ok(b)
    }
}

/// "service NAME", cut to what nft accepts.
pub(crate) fn comment(name: &str) -> String {
    cut_comment(format!("service {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::rules::COMMENT_MAX;
    use crate::vip::render;

    fn svc(name: &str, vip: [u8; 4], backends: &[[u8; 4]]) -> VipService {
        VipService {
            name: name.into(),
            vip: vip.into(),
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
        }
    }

    #[test]
    fn render_ignores_order_and_duplicates() {
        let a = [
            svc("web", [10, 0, 1, 2], &[[10, 0, 1, 5], [10, 0, 1, 6]]),
            svc("db", [10, 0, 1, 3], &[]),
        ];
        let b = [
            svc("db", [10, 0, 1, 3], &[]),
            svc(
                "web",
                [10, 0, 1, 2],
                &[[10, 0, 1, 6], [10, 0, 1, 5], [10, 0, 1, 6]],
            ),
        ];
        assert_eq!(render(&a), render(&b));
        assert_ne!(render(&a), render(&a[..1]));
    }

    #[test]
    fn render_has_the_round_robin_map_and_the_reject() {
        let json = render(&[
            svc("web", [10, 0, 1, 2], &[[10, 0, 1, 6], [10, 0, 1, 5]]),
            svc("db", [10, 0, 1, 3], &[]),
        ]);
        let want = r#"{"dnat":{"addr":{"map":{"key":{"numgen":{"mode":"inc","mod":2,"offset":0}},"data":{"set":[[0,"10.0.1.5"],[1,"10.0.1.6"]]}}}}}"#;
        assert!(json.contains(want), "{json}");
        assert!(
            json.contains(r#"{"reject":{"type":"tcp reset"}}"#),
            "{json}"
        );
        assert!(json.contains(r#""right":{"set":["10.0.1.3"]}"#), "{json}");
        assert!(json.contains(r#""comment":"service web""#), "{json}");
    }

    #[test]
    fn no_services_is_an_empty_table() {
        let json = render(&[]);
        assert!(!json.contains("chain"), "{json}");
        assert!(json.contains(TABLE), "{json}");
    }

    #[test]
    fn one_vip_for_two_services_keeps_one_whatever_the_order() {
        let a = svc("a", [10, 0, 1, 2], &[]);
        let b = svc("b", [10, 0, 1, 2], &[[10, 0, 1, 5]]);
        let kept = render(std::slice::from_ref(&a));
        assert_eq!(render(&[a.clone(), b.clone()]), kept);
        assert_eq!(render(&[b, a]), kept);
    }

    #[test]
    fn one_service_listed_twice_pools_its_backends() {
        let twice = [
            svc("web", [10, 0, 1, 2], &[[10, 0, 1, 5]]),
            svc("web", [10, 0, 1, 2], &[[10, 0, 1, 6]]),
        ];
        let once = [svc("web", [10, 0, 1, 2], &[[10, 0, 1, 5], [10, 0, 1, 6]])];
        assert_eq!(render(&twice), render(&once));
    }

    #[test]
    fn long_names_are_cut_on_a_char_boundary() {
        let c = comment(&"é".repeat(100));
        assert!(c.len() <= COMMENT_MAX);
        assert!(c.starts_with("service é"));
    }
}
