//! Service virtual IPs, load-balanced inside each client sandbox.
//!
//! Swarm gives a service one VIP per network; a connection from a sandbox
//! to that VIP must reach one of the service's running tasks. The kernel we
//! target has no IPVS, so, as kube-proxy's nftables mode, each client
//! sandbox gets a table of its own, `ip mesh_vip`, with:
//!
//! - a nat chain hooked at `output` (the traffic is generated in the
//!   sandbox), one rule per service with tasks:
//!   `ip daddr VIP dnat to numgen inc mod N map { 0 : b0, 1 : b1, ... }`.
//!   NAT chains only see the first packet of a connection, so `numgen inc`
//!   (one counter per rule) spreads connections round robin and conntrack
//!   keeps each connection on its task. Every protocol is translated, ICMP
//!   echo included: a ping to the VIP is answered by one of the tasks, which
//!   is what Docker users expect from a VIP (Docker binds the VIP in the
//!   sandbox and answers locally; we cannot without owning its addresses).
//! - a filter chain at `output` refusing connections to the VIPs of
//!   services without tasks: TCP reset, ICMP port unreachable otherwise, so
//!   the client fails at once instead of waiting for a timeout.
//!
//! The table is replaced whole in one `nft` batch, one fork per namespace;
//! [`render`] tells callers when a namespace is already up to date, and
//! [`sync_many`] updates many namespaces a few at a time.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nftables::batch::Batch;
use nftables::expr::{
    Expression, Map, MetaKey, NamedExpression, NgMode, Numgen, Payload, PayloadField, SetItem,
};
use nftables::schema::{NfListObject, Rule};
use nftables::stmt::{Match, NAT, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook, RejectCode};

use tracing::warn;

use crate::nft;

/// Our table (family `ip`) in each client sandbox.
pub const TABLE: &str = "mesh_vip";

const NAT_CHAIN: &str = "output_nat";
const FILTER_CHAIN: &str = "output_filter";
/// dstnat, as any DNAT of locally generated traffic.
const NAT_PRIORITY: i32 = -100;
/// filter: after DNAT, so translated packets no longer carry a VIP.
const FILTER_PRIORITY: i32 = 0;
/// nft refuses longer rule comments.
const COMMENT_MAX: usize = 128;
/// Namespaces updated at once by [`sync_many`]: each one is an `nft`
/// process, and more than a few only compete for the same CPUs.
const PARALLEL: usize = 4;

/// One service as a client sandbox sees it on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipService {
    /// Shown in the rule's comment, for whoever reads `nft list`.
    pub name: String,
    pub vip: Ipv4Addr,
    /// Addresses of the running tasks on this network; order and duplicates
    /// do not matter.
    pub backends: Vec<Ipv4Addr>,
}

/// Makes table `ip mesh_vip` in namespace `ns` hold exactly these services:
/// created if missing, replaced atomically otherwise (one `nft` run), so a
/// sandbox never sees half an update. Replacing restarts the round robin;
/// established connections keep their task (conntrack).
pub fn sync(ns: &str, services: &[VipService]) -> io::Result<()> {
    apply(ns, table_batch(services)?)
}

/// Removes the table from `ns`; a table that is not there is fine.
pub fn remove(ns: &str) -> io::Result<()> {
    let mut b = Batch::new();
    // "add" first makes "delete" succeed whether or not the table exists.
    b.add(nft::table(TABLE));
    b.delete(nft::table(TABLE));
    apply(ns, b)
}

/// The ruleset [`sync`] would apply, as its JSON text: equal inputs (in any
/// order, duplicates aside) give equal strings, so callers can skip
/// namespaces whose last sync rendered the same.
pub fn render(services: &[VipService]) -> String {
    match table_batch(services).and_then(encode) {
        Ok(json) => json,
        // Only for input `sync` refuses too; never equal to a real ruleset.
        Err(e) => format!("error: {e}"),
    }
}

/// [`sync`] for many namespaces, at most four at a time. Returns the
/// namespaces that failed with their errors; the others are up to date.
pub fn sync_many(items: &[(String, Vec<VipService>)]) -> Vec<(String, io::Error)> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let worker = || {
        while let Some((ns, services)) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(e) = sync(ns, services) {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((ns.clone(), e));
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(worker);
        }
    });
    failed.into_inner().unwrap_or_else(|p| p.into_inner())
}

fn apply(ns: &str, batch: Batch<'_>) -> io::Result<()> {
    nft::apply(Some(ns), batch)
        .map_err(|e| io::Error::new(e.kind(), format!("table {TABLE} in namespace {ns}: {e}")))
}

fn encode(batch: Batch<'_>) -> io::Result<String> {
    serde_json::to_string(&batch.to_nftables())
        .map_err(|e| io::Error::other(format!("cannot encode the ruleset: {e}")))
}

/// The whole table as one batch, services sorted by VIP and backends by
/// address so the same input always gives the same batch. It starts with
/// "add table; delete table", which replaces an earlier table or none.
fn table_batch(services: &[VipService]) -> io::Result<Batch<'static>> {
    let mut by_vip: BTreeMap<Ipv4Addr, (&str, BTreeSet<Ipv4Addr>)> = BTreeMap::new();
    for s in services {
        let backends = s.backends.iter().copied();
        match by_vip.entry(s.vip) {
            Entry::Vacant(e) => {
                e.insert((&s.name, backends.collect()));
            }
            // The same service listed twice (e.g. from two views): one pool.
            Entry::Occupied(mut e) if e.get().0 == s.name => e.get_mut().1.extend(backends),
            // One address for two services is a bug upstream; keeping one of
            // them (the same one whatever the order) beats refusing the
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

    let mut b = Batch::new();
    b.add(nft::table(TABLE));
    b.delete(nft::table(TABLE));
    b.add(nft::table(TABLE));

    let balanced: Vec<_> = by_vip
        .iter()
        .filter(|(_, (_, bk))| !bk.is_empty())
        .collect();
    if !balanced.is_empty() {
        b.add(nft::chain(
            TABLE,
            NAT_CHAIN.into(),
            Some((NfChainType::NAT, NfHook::Output, NAT_PRIORITY)),
        ));
        for (vip, (name, backends)) in balanced {
            b.add(rule(
                NAT_CHAIN,
                vec![
                    daddr_is(ip_expr(*vip)),
                    nft::counter(),
                    dnat_round_robin(backends)?,
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
        .map(|(vip, _)| SetItem::Element(ip_expr(*vip)))
        .collect();
    if !idle.is_empty() {
        b.add(nft::chain(
            TABLE,
            FILTER_CHAIN.into(),
            Some((NfChainType::Filter, NfHook::Output, FILTER_PRIORITY)),
        ));
        let idle = Expression::Named(NamedExpression::Set(idle));
        b.add(rule(
            FILTER_CHAIN,
            vec![
                daddr_is(idle.clone()),
                nft::meta_is(MetaKey::L4proto, Operator::EQ, nft::name_expr("tcp")),
                nft::counter(),
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
            "service without tasks: refuse TCP at once".into(),
        ));
        b.add(rule(
            FILTER_CHAIN,
            vec![
                daddr_is(idle),
                nft::counter(),
                Statement::Reject(Some(Reject::new(
                    Some(RejectType::ICMP),
                    Some(RejectCode::PortUnreach),
                ))),
            ],
            "service without tasks: refuse the rest at once".into(),
        ));
    }
    Ok(b)
}

/// `dnat to numgen inc mod N map { 0 : b0, 1 : b1, ... }`
fn dnat_round_robin(backends: &BTreeSet<Ipv4Addr>) -> io::Result<Statement<'static>> {
    let n = u32::try_from(backends.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many backends"))?;
    let map = backends
        .iter()
        .zip(0u32..)
        .map(|(ip, i)| SetItem::Mapping(Expression::Number(i), ip_expr(*ip)))
        .collect();
    Ok(Statement::DNAT(Some(NAT {
        addr: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
            key: Expression::Named(NamedExpression::Numgen(Numgen {
                mode: NgMode::Inc,
                ng_mod: n,
                offset: Some(0),
            })),
            data: Expression::Named(NamedExpression::Set(map)),
        })))),
        family: None,
        port: None,
        flags: None,
    })))
}

/// `ip daddr RIGHT` (an address or an anonymous set of them).
fn daddr_is(right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: "ip".into(),
                field: "daddr".into(),
            },
        ))),
        right,
        op: Operator::EQ,
    })
}

fn ip_expr(ip: Ipv4Addr) -> Expression<'static> {
    Expression::String(Cow::Owned(ip.to_string()))
}

/// A rule of our table; unlike `nft::rule`, the comment may be built at
/// run time (it names the service).
fn rule(
    chain: &'static str,
    expr: Vec<Statement<'static>>,
    comment: String,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: TABLE.into(),
        chain: chain.into(),
        expr: Cow::Owned(expr),
        comment: Some(comment.into()),
        ..Rule::default()
    })
}

/// "service NAME", cut to what nft accepts (on a character boundary).
fn comment(name: &str) -> String {
    let mut c = format!("service {name}");
    if c.len() > COMMENT_MAX {
        let mut end = COMMENT_MAX;
        while !c.is_char_boundary(end) {
            end -= 1;
        }
        c.truncate(end);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

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
