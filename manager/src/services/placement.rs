//! What placing tasks needs to know (each node's load, each service's
//! eligible nodes, each network's used addresses), computed once per
//! orchestration and kept current as tasks are placed. Placing a task used
//! to scan every task for every candidate node and every endpoint for an
//! address: a 1,000-replica service on 200 nodes spent most of its create
//! there (`perf`: `assign`'s load closure and `allocate_address_except`),
//! and 100,000 tasks would never finish. Now a placement costs O(log n).
//!
//! Only what this orchestration placed is added; what it stopped is not
//! taken off (a freed address is reused from the next orchestration on).
//! Every manager runs the same code on the same state, so the choices stay
//! deterministic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use mesh_common::ipam;
use mesh_common::model::TaskState;
use mesh_common::refusal::Refusal;

use super::Service;
use crate::state::networks::no_free_address;
use crate::state::{ClusterState, Network};

/// Nodes by (tasks of the service, tasks overall, node ID).
type SpreadQueue = BTreeSet<(usize, usize, String)>;

#[derive(Default)]
pub(crate) struct Placement {
    loads: Option<Loads>,
    /// Eligible nodes per service, in the scheduler's order.
    eligible: HashMap<String, (Vec<String>, HashSet<String>)>,
    /// The spread order of one service's eligible nodes: (tasks of the
    /// service, tasks overall, node).
    queue: Option<(String, SpreadQueue)>,
    pools: HashMap<String, Pool>,
}

/// Live tasks (desired running, not ended) per node and per service and
/// node.
#[derive(Default)]
struct Loads {
    node: HashMap<String, usize>,
    service: HashMap<(String, String), usize>,
}

/// A network's used addresses, and the lowest one that may be free.
struct Pool {
    used: HashSet<Ipv4Addr>,
    floor: u32,
}

impl Placement {
    fn loads(&mut self, s: &ClusterState) -> &mut Loads {
        self.loads.get_or_insert_with(|| {
            let mut l = Loads::default();
            for t in s.tasks.values() {
                if t.node_id.is_empty()
                    || t.desired_state != TaskState::Running
                    || t.state.is_terminal()
                {
                    continue;
                }
                *l.node.entry(t.node_id.clone()).or_default() += 1;
                *l.service
                    .entry((t.service_id.clone(), t.node_id.clone()))
                    .or_default() += 1;
            }
            l
        })
    }

    /// The service's eligible nodes, as `ClusterState::eligible` says.
    pub(crate) fn eligible(&mut self, s: &ClusterState, svc: &Service) -> &[String] {
        &self.eligible_entry(s, svc).0
    }

    pub(crate) fn is_eligible(&mut self, s: &ClusterState, svc: &Service, node: &str) -> bool {
        self.eligible_entry(s, svc).1.contains(node)
    }

    fn eligible_entry(
        &mut self,
        s: &ClusterState,
        svc: &Service,
    ) -> &(Vec<String>, HashSet<String>) {
        self.eligible.entry(svc.id.clone()).or_insert_with(|| {
            let list = s.eligible(svc);
            let set = list.iter().cloned().collect();
            (list, set)
        })
    }

    /// The eligible node with the fewest tasks of `svc`, then the fewest
    /// overall, then the lowest ID (`scheduler::spread`'s order).
    pub(crate) fn spread(&mut self, s: &ClusterState, svc: &Service) -> Option<String> {
        if self.queue.as_ref().is_none_or(|(id, _)| *id != svc.id) {
            let nodes = self.eligible(s, svc).to_vec();
            let loads = self.loads(s);
            let queue = nodes
                .into_iter()
                .map(|n| {
                    let own = loads
                        .service
                        .get(&(svc.id.clone(), n.clone()))
                        .copied()
                        .unwrap_or(0);
                    let all = loads.node.get(&n).copied().unwrap_or(0);
                    (own, all, n)
                })
                .collect();
            self.queue = Some((svc.id.clone(), queue));
        }
        let (_, queue) = self.queue.as_ref()?;
        queue.first().map(|(_, _, n)| n.clone())
    }

    /// Builds the load counts now, so [`Self::load`] can read them.
    pub(crate) fn count_loads(&mut self, s: &ClusterState) {
        self.loads(s);
    }

    /// A node's (tasks of `svc`, tasks overall), for services whose
    /// placement must skip nodes per task (host-mode ports); needs
    /// [`Self::count_loads`] first.
    pub(crate) fn load(&self, svc: &str, node: &str) -> (usize, usize) {
        let Some(loads) = self.loads.as_ref() else {
            return (0, 0);
        };
        (
            loads
                .service
                .get(&(svc.to_string(), node.to_string()))
                .copied()
                .unwrap_or(0),
            loads.node.get(node).copied().unwrap_or(0),
        )
    }

    /// Counts a task of `svc` placed on `node`.
    pub(crate) fn placed(&mut self, s: &ClusterState, svc: &str, node: &str) {
        self.loads(s);
        let Some(loads) = self.loads.as_mut() else {
            return;
        };
        let own = loads
            .service
            .entry((svc.to_string(), node.to_string()))
            .or_default();
        *own += 1;
        let own_now = *own;
        let all = loads.node.entry(node.to_string()).or_default();
        *all += 1;
        let all_now = *all;
        let Some((queued, queue)) = self.queue.as_mut() else {
            return;
        };
        // In another service's queue the node moves only by its overall
        // load.
        let (own_before, own_after) = if queued == svc {
            (own_now - 1, own_now)
        } else {
            let o = loads
                .service
                .get(&(queued.clone(), node.to_string()))
                .copied()
                .unwrap_or(0);
            (o, o)
        };
        if queue.remove(&(own_before, all_now - 1, node.to_string())) {
            queue.insert((own_after, all_now, node.to_string()));
        }
    }

    /// The lowest free address of `net` (in its range, if it has one).
    pub(crate) fn address(&mut self, s: &ClusterState, net: &Network) -> Result<Ipv4Addr, Refusal> {
        let range = match &net.spec.ip_range {
            Some(r) => Some(ipam::parse_ip_range(r, &net.subnet)?),
            None => None,
        };
        let pool = self.pools.entry(net.id.clone()).or_insert_with(|| {
            let mut used: HashSet<Ipv4Addr> = s
                .endpoints
                .values()
                .filter(|e| e.network_id == net.id)
                .map(|e| e.ip)
                .collect();
            used.extend(
                s.services
                    .values()
                    .filter_map(|x| x.vips.get(&net.id).copied()),
            );
            Pool { used, floor: 0 }
        });
        let ip = ipam::next_host_from(&net.subnet, range.as_ref(), net.gateway, pool.floor, |a| {
            pool.used.contains(&a)
        })
        .map_err(|e| no_free_address(net, e))?;
        pool.used.insert(ip);
        pool.floor = u32::from(ip).saturating_add(1);
        Ok(ip)
    }
}
