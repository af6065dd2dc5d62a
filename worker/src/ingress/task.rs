//! A task's side of the routing mesh: replies to a connection that came
//! from some node's ingress sandbox go back to that sandbox, whatever the
//! task's default route (see `firewall::ingress_task`): one mark per node,
//! `ip rule fwmark M lookup M`, table M = `default via <node's ingress
//! address> dev ING`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{IpVersion, RouteMessageBuilder};

use mesh_common::model::Protocol;

use super::{DefaultRoute, IngressError, Plan, default_routes, marks};
use crate::firewall::ingress_task::IngressTask;
use crate::firewall::{self, Drift};
use crate::link::Netlink;
use crate::{netns, sysctl};

/// Marks (and routing tables) start here: clear of the kernel's tables
/// 253-255 and of small marks other tools use.
const MARK_BASE: u32 = 0x100;
/// Before the main table's rule (32766).
const RULE_PRIORITY: u32 = 1000;

/// A node's mark: its ingress address's offset in the ingress subnet,
/// plus [`MARK_BASE`]; None for an address outside the subnet.
pub fn mark_for(ip: Ipv4Addr, subnet: &Ipv4Net) -> Option<u32> {
    if !subnet.contains(&ip) {
        return None;
    }
    Some(u32::from(ip) - u32::from(subnet.network()) + MARK_BASE)
}

/// Makes a task sandbox's ingress side what `plan` says: its table, its
/// sysctls, one rule and one route per node, and no rule for a node that
/// left. Each is read first and written only where it differs. Returns
/// how many things it changed.
pub fn sync_task(
    ns: &str,
    ifname: &str,
    plan: &Plan,
    targets: &BTreeSet<(Protocol, u16)>,
) -> Result<usize, IngressError> {
    let table = IngressTask {
        ifname: ifname.into(),
        marks: marks(plan),
        ports: targets.clone(),
    };
    let mut fixed = 0;
    let found = firewall::repair(Some(ns), &table).map_err(|source| IngressError::Firewall {
        table: firewall::ingress_task::TABLE,
        ns: ns.into(),
        source,
    })?;
    if found != Drift::InSync {
        fixed += 1;
    }
    fixed += sysctl::ensure(
        Some(ns),
        &[
            ("ipv4/conf/all/rp_filter".into(), "0"),
            (format!("ipv4/conf/{ifname}/rp_filter"), "0"),
            ("ipv4/tcp_fwmark_accept".into(), "1"),
            ("ipv4/fwmark_reflect".into(), "1"),
        ],
    )?;
    let routes: Vec<(u32, Ipv4Addr)> = plan
        .nodes
        .iter()
        .filter_map(|n| Some((mark_for(n.ip, &plan.subnet)?, n.ip)))
        .collect();
    let ns_owned = ns.to_string();
    let ifname = ifname.to_string();
    fixed += netns::block_on(async move { policy_routes(&ns_owned, &ifname, &routes).await })??;
    Ok(fixed)
}

/// The fwmark of one of our rules (mark == table, at our priority).
fn our_mark(r: &RuleMessage) -> Option<u32> {
    let mut mark = None;
    let mut table = None;
    let mut prio = None;
    for a in &r.attributes {
        match a {
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::Table(t) => table = Some(*t),
            RuleAttribute::Priority(p) => prio = Some(*p),
            _ => {}
        }
    }
    let table = table.unwrap_or(u32::from(r.header.table));
    (prio == Some(RULE_PRIORITY) && mark.is_some() && mark == Some(table) && table >= MARK_BASE)
        .then_some(table)
}

async fn policy_routes(
    ns: &str,
    ifname: &str,
    routes: &[(u32, Ipv4Addr)],
) -> Result<usize, IngressError> {
    let nl = Netlink::open(Some(ns)).await?;
    let idx = nl
        .require(
            ifname,
            "the task's ingress interface is missing; the overlay driver recreates it",
        )
        .await?;
    let h = nl.handle().clone();
    let rules: Vec<RuleMessage> = h
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl.err("list the routing rules", e))?;
    let have: BTreeSet<u32> = rules.iter().filter_map(our_mark).collect();
    let table_routes = default_routes(&nl).await?;
    let want: BTreeSet<u32> = routes.iter().map(|(m, _)| *m).collect();
    let mut fixed = 0;
    for r in rules {
        let Some(stale) = our_mark(&r).filter(|m| !want.contains(m)) else {
            continue;
        };
        h.rule()
            .del(r)
            .execute()
            .await
            .map_err(|e| nl.err("delete a stale ingress routing rule", e))?;
        // Its table's route too; already gone is fine.
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(stale)
            .build();
        let _ = h.route().del(route).execute().await;
        fixed += 1;
    }
    for (mark, gw) in routes {
        let wanted = DefaultRoute {
            gateway: Some(*gw),
            oif: Some(idx),
        };
        if table_routes.get(mark) != Some(&wanted) {
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(*gw)
                .output_interface(idx)
                .table_id(*mark)
                .build();
            h.route()
                .add(msg)
                .replace()
                .execute()
                .await
                .map_err(|e| nl.err(format!("set table {mark}'s route via {gw} on {ifname}"), e))?;
            fixed += 1;
        }
        if !have.contains(mark) {
            h.rule()
                .add()
                .v4()
                .fw_mark(*mark)
                .table_id(*mark)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable)
                .execute()
                .await
                .map_err(|e| nl.err(format!("add rule fwmark {mark} lookup {mark}"), e))?;
            fixed += 1;
        }
    }
    Ok(fixed)
}
