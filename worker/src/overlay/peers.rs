//! The overlay's peer table: the static FDB (MAC → node) and neighbour
//! (IP → MAC) entries on `vxlan0`, planned purely from the desired peers
//! and what the kernel holds, then applied.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use tracing::{info, warn};

use super::{NetError, Node, VXLAN, open_network};
use crate::link::{FdbEntry, Mac, NeighEntry, fmt_mac};

/// A remote endpoint on the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// The endpoint's overlay address.
    pub ip: Ipv4Addr,
    pub mac: Mac,
    /// Underlay address of the node the endpoint runs on.
    pub node_ip: Ipv4Addr,
}

/// What [`sync_peers`] changed; all zero when the kernel already matched.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub fdb_added: usize,
    pub fdb_updated: usize,
    pub fdb_removed: usize,
    pub neigh_added: usize,
    pub neigh_updated: usize,
    pub neigh_removed: usize,
}

impl SyncReport {
    /// Entries added, fixed or removed: drift that was repaired.
    pub fn changed(&self) -> usize {
        self.fdb_added
            + self.fdb_updated
            + self.fdb_removed
            + self.neigh_added
            + self.neigh_updated
            + self.neigh_removed
    }
}

/// Desired FDB (MAC → node) and neighbour (IP → MAC) tables from the peers.
/// A MAC or IP listed twice keeps its last entry, with a warning: the peer
/// table is the managers' and a duplicate there is their bug to see.
fn desired_tables(peers: &[Peer]) -> (BTreeMap<Mac, Ipv4Addr>, BTreeMap<Ipv4Addr, Mac>) {
    let mut fdb = BTreeMap::new();
    let mut neigh = BTreeMap::new();
    for p in peers {
        if let Some(old) = fdb.insert(p.mac, p.node_ip)
            && old != p.node_ip
        {
            warn!(mac = %fmt_mac(&p.mac), "peer MAC listed on two nodes ({old}, {}); using the last", p.node_ip);
        }
        if let Some(old) = neigh.insert(p.ip, p.mac)
            && old != p.mac
        {
            warn!(ip = %p.ip, "peer IP listed with two MACs; using the last");
        }
    }
    (fdb, neigh)
}

/// The changes that make a table match: entries to add or replace (with
/// whether it is a fix of an existing one) and entries to remove.
#[derive(Debug, Default, PartialEq, Eq)]
struct FdbPlan {
    set: Vec<(Mac, Ipv4Addr, bool)>,
    remove: Vec<(Mac, Option<Ipv4Addr>)>,
}

/// Compares the VXLAN's own FDB entries with the desired ones. An entry
/// counts as correct only if it is permanent and its MAC has exactly the one
/// desired remote.
fn plan_fdb(desired: &BTreeMap<Mac, Ipv4Addr>, current: &[FdbEntry]) -> FdbPlan {
    let mut by_mac: BTreeMap<Mac, Vec<&FdbEntry>> = BTreeMap::new();
    for e in current.iter().filter(|e| e.own) {
        by_mac.entry(e.mac).or_default().push(e);
    }
    let mut plan = FdbPlan::default();
    for (mac, entries) in &by_mac {
        match desired.get(mac) {
            None => plan.remove.extend(entries.iter().map(|e| (*mac, e.dst))),
            Some(want) => {
                let exact =
                    entries.len() == 1 && entries[0].dst == Some(*want) && entries[0].permanent;
                if !exact {
                    // One entry is fixed in place by the replace (no window
                    // without it); extra remotes must go first.
                    if entries.len() > 1 {
                        plan.remove.extend(
                            entries
                                .iter()
                                .filter(|e| e.dst != Some(*want))
                                .map(|e| (*mac, e.dst)),
                        );
                    }
                    plan.set.push((*mac, *want, true));
                }
            }
        }
    }
    for (mac, want) in desired {
        if !by_mac.contains_key(mac) {
            plan.set.push((*mac, *want, false));
        }
    }
    plan
}

#[derive(Debug, Default, PartialEq, Eq)]
struct NeighPlan {
    set: Vec<(Ipv4Addr, Mac, bool)>,
    remove: Vec<Ipv4Addr>,
}

fn plan_neigh(desired: &BTreeMap<Ipv4Addr, Mac>, current: &[NeighEntry]) -> NeighPlan {
    let mut plan = NeighPlan::default();
    let mut seen = BTreeMap::new();
    for e in current {
        seen.insert(e.ip, e);
    }
    for (ip, e) in &seen {
        match desired.get(ip) {
            None => plan.remove.push(*ip),
            Some(mac) if e.mac == Some(*mac) && e.permanent => {}
            Some(mac) => plan.set.push((*ip, *mac, true)),
        }
    }
    for (ip, mac) in desired {
        if !seen.contains_key(ip) {
            plan.set.push((*ip, *mac, false));
        }
    }
    plan
}

/// Makes the static FDB (MAC → node) and neighbour (IP → MAC) entries on
/// `vxlan0` exactly `peers`: adds missing ones, fixes wrong ones, removes
/// stale ones and leaves correct ones untouched (no flapping, no window
/// without an entry). Returns what changed, for drift-repair logs.
pub async fn sync_peers(node: &Node, vni: u32, peers: &[Peer]) -> Result<SyncReport, NetError> {
    let (_ns, net) = open_network(&node.prefix, vni).await?;
    let (fdb_want, neigh_want) = desired_tables(peers);
    let mut report = SyncReport::default();

    let fdb = plan_fdb(&fdb_want, &net.fdb_entries(VXLAN).await?);
    for (mac, dst) in &fdb.remove {
        net.fdb_del(VXLAN, *mac, *dst).await?;
    }
    report.fdb_removed = fdb
        .remove
        .iter()
        .filter(|(m, _)| !fdb_want.contains_key(m))
        .count();
    for (mac, dst, fix) in &fdb.set {
        net.fdb_replace(VXLAN, *mac, *dst).await?;
        if *fix {
            report.fdb_updated += 1;
        } else {
            report.fdb_added += 1;
        }
    }

    let neigh = plan_neigh(&neigh_want, &net.neighbours_v4(VXLAN).await?);
    for ip in &neigh.remove {
        net.neigh_del(VXLAN, *ip).await?;
    }
    report.neigh_removed = neigh.remove.len();
    for (ip, mac, fix) in &neigh.set {
        net.neigh_replace(VXLAN, *ip, *mac).await?;
        if *fix {
            report.neigh_updated += 1;
        } else {
            report.neigh_added += 1;
        }
    }
    if report.changed() > 0 {
        info!(vni, ?report, "peer entries repaired");
    }
    Ok(report)
}

/// The peers the kernel has now: FDB and neighbour entries of `vxlan0`
/// joined on the MAC (an entry without its other half is left out). Sorted
/// by IP.
pub async fn peers_in_kernel(node: &Node, vni: u32) -> Result<Vec<Peer>, NetError> {
    let (_ns, net) = open_network(&node.prefix, vni).await?;
    let fdb: BTreeMap<Mac, Ipv4Addr> = net
        .fdb_entries(VXLAN)
        .await?
        .into_iter()
        .filter(|e| e.own)
        .filter_map(|e| Some((e.mac, e.dst?)))
        .collect();
    let mut peers: Vec<Peer> = net
        .neighbours_v4(VXLAN)
        .await?
        .into_iter()
        .filter_map(|n| {
            let mac = n.mac?;
            Some(Peer {
                ip: n.ip,
                mac,
                node_ip: *fdb.get(&mac)?,
            })
        })
        .collect();
    peers.sort();
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const N2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn fdb(mac: Mac, dst: Ipv4Addr) -> FdbEntry {
        FdbEntry {
            mac,
            dst: Some(dst),
            own: true,
            permanent: true,
        }
    }

    fn mac_for(ip: Ipv4Addr) -> Mac {
        mesh_common::model::Mac::for_ip(ip).octets()
    }

    #[test]
    fn fdb_plan_adds_fixes_removes_and_leaves_correct_entries() {
        let (m1, m2, m3) = (
            [2, 0x42, 0, 0, 0, 1],
            [2, 0x42, 0, 0, 0, 2],
            [2, 0x42, 0, 0, 0, 3],
        );
        let desired = BTreeMap::from([(m1, N1), (m2, N2)]);
        // m1 correct, m2 points at the wrong node, m3 stale, and a bridge
        // (not self) entry that is not ours to touch.
        let current = vec![
            fdb(m1, N1),
            fdb(m2, N1),
            fdb(m3, N2),
            FdbEntry {
                mac: [2, 0, 0, 0, 0, 9],
                dst: None,
                own: false,
                permanent: true,
            },
        ];
        let plan = plan_fdb(&desired, &current);
        assert_eq!(plan.set, vec![(m2, N2, true)]);
        assert_eq!(plan.remove, vec![(m3, Some(N2))]);
        // Two remotes for one MAC: the wrong one goes.
        let plan = plan_fdb(&desired, &[fdb(m1, N1), fdb(m1, N2), fdb(m2, N2)]);
        assert_eq!(plan.remove, vec![(m1, Some(N2))]);
        assert_eq!(plan.set, vec![(m1, N1, true)]);
        // Nothing to do once the kernel matches.
        let plan = plan_fdb(&desired, &[fdb(m1, N1), fdb(m2, N2)]);
        assert_eq!(plan, FdbPlan::default());
        // Missing entry is added.
        let plan = plan_fdb(&desired, &[fdb(m1, N1)]);
        assert_eq!(plan.set, vec![(m2, N2, false)]);
    }

    #[test]
    fn neighbour_plan_replaces_non_permanent_entries() {
        let ip = Ipv4Addr::new(10, 0, 0, 3);
        let mac = mac_for(ip);
        let desired = BTreeMap::from([(ip, mac)]);
        let learned = NeighEntry {
            ip,
            mac: Some(mac),
            permanent: false,
        };
        assert_eq!(
            plan_neigh(&desired, std::slice::from_ref(&learned)).set,
            vec![(ip, mac, true)]
        );
        let ok = NeighEntry {
            permanent: true,
            ..learned
        };
        assert_eq!(plan_neigh(&desired, &[ok]), NeighPlan::default());
        let stale = NeighEntry {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            mac: None,
            permanent: false,
        };
        assert_eq!(
            plan_neigh(&desired, &[stale]).remove,
            vec![Ipv4Addr::new(10, 0, 0, 9)]
        );
    }

    #[test]
    fn duplicate_peers_keep_the_last() {
        let ip = Ipv4Addr::new(10, 0, 0, 3);
        let p = Peer {
            ip,
            mac: mac_for(ip),
            node_ip: N1,
        };
        let q = Peer { node_ip: N2, ..p };
        let (fdb, neigh) = desired_tables(&[p, q]);
        assert_eq!(fdb.get(&p.mac), Some(&N2));
        assert_eq!(neigh.len(), 1);
    }
}
