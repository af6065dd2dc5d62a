//! Moving every service towards its spec: slots filled and trimmed,
//! global services on every eligible node, tasks of lost or drained nodes
//! replaced, pending tasks placed and given their addresses.

use std::collections::BTreeMap;

use mesh_common::model::{Availability, Mac, NodeState, ServiceMode, TaskState};

use super::Service;
use super::placement::Placement;
use super::ports::host_ports;
use crate::scheduler;
use crate::state::{ClusterState, Endpoint};

impl ClusterState {
    pub(crate) fn eligible(&self, svc: &Service) -> Vec<String> {
        scheduler::eligible(self.nodes.values(), &svc.spec.constraints)
    }

    /// Places a pending task (spread: the eligible node with fewest tasks
    /// of this service, then fewest tasks overall) and gives it addresses.
    pub(crate) fn assign(&mut self, index: u64, task_id: &str, at: &str) {
        self.assign_with(&mut Placement::default(), index, task_id, at);
    }

    /// [`Self::assign`] with what this orchestration already knows.
    pub(crate) fn assign_with(&mut self, p: &mut Placement, index: u64, task_id: &str, at: &str) {
        let Some(t) = self.tasks.get(task_id).cloned() else {
            return;
        };
        let Some(svc) = self.services.get(&t.service_id).cloned() else {
            return;
        };
        let node = if host_ports(&svc).is_empty() {
            if t.node_id.is_empty() {
                p.spread(self, &svc)
            } else {
                p.is_eligible(self, &svc, &t.node_id)
                    .then(|| t.node_id.clone())
            }
        } else {
            // A host-mode port is bound on the node: one live task per node.
            let eligible: Vec<String> = p
                .eligible(self, &svc)
                .iter()
                .filter(|n| self.host_port_clash(&svc, n, task_id).is_none())
                .cloned()
                .collect();
            if t.node_id.is_empty() {
                p.count_loads(self);
                scheduler::spread(&eligible, |n| p.load(&svc.id, n))
            } else {
                eligible.iter().find(|n| **n == t.node_id).cloned()
            }
        };
        let Some(node) = node else {
            let all_eligible = p.eligible(self, &svc).to_vec();
            let clash = all_eligible
                .iter()
                .filter(|n| t.node_id.is_empty() || **n == t.node_id)
                .find_map(|n| self.host_port_clash(&svc, n, task_id));
            let reason = match clash {
                Some((proto, port)) if !t.node_id.is_empty() => format!(
                    "no suitable node (host-mode port {port}/{proto} is already used on this node)"
                ),
                Some((proto, port)) => format!(
                    "no suitable node (host-mode port {port}/{proto} is already used on every eligible node)"
                ),
                None => scheduler::no_node_reason(self.nodes.values(), &svc.spec.constraints),
            };
            if let Some(t) = self.tasks.get_mut(task_id)
                && (t.state != TaskState::Pending || t.message != reason)
            {
                t.state = TaskState::Pending;
                t.message = reason;
                t.version = index;
                t.updated_at = at.to_string();
            }
            return;
        };
        let sandbox = self.task_sandbox_name(&t);
        let mut made = Vec::new();
        // Ingress last: it is not one of the spec's networks.
        let ingress = svc
            .uses_ingress()
            .then(|| self.ingress_network().map(|n| n.id.clone()))
            .flatten();
        for net_id in svc.spec.networks.iter().chain(ingress.iter()) {
            let Some(net) = self.networks.get(net_id) else {
                continue;
            };
            match p.address(self, net) {
                Ok(ip) => {
                    let ep = Endpoint {
                        id: mesh_common::id::derived_id(&[task_id, net_id]),
                        network_id: net_id.clone(),
                        node_id: node.clone(),
                        sandbox: sandbox.clone(),
                        sandbox_id: task_id.to_string(),
                        ip,
                        mac: Mac::for_ip(ip),
                        aliases: Vec::new(),
                        created_at: at.to_string(),
                    };
                    made.push(ep.id.clone());
                    self.endpoints.insert(ep.id.clone(), ep);
                }
                Err(why) => {
                    for id in made {
                        self.endpoints.remove(&id);
                    }
                    // Stays pending with the reason (what `service ps`
                    // shows and `create` exits with); retried at every
                    // orchestration, so it runs once an address is freed.
                    // Written only when it changes, so the status holds
                    // still and the CLI can tell it is stuck.
                    let reason = why.to_string();
                    if let Some(t) = self.tasks.get_mut(task_id)
                        && (t.state != TaskState::Pending || t.message != reason)
                    {
                        t.state = TaskState::Pending;
                        t.message = reason;
                        t.version = index;
                        t.updated_at = at.to_string();
                    }
                    return;
                }
            }
        }
        p.placed(self, &svc.id, &node);
        if let Some(t) = self.tasks.get_mut(task_id) {
            t.node_id = node;
            t.state = TaskState::Assigned;
            t.message = "scheduled".into();
            t.version = index;
            t.updated_at = at.to_string();
        }
    }

    /// Moves every service towards its spec: fills and trims slots, rolls
    /// outdated tasks one at a time, replaces tasks lost with their node,
    /// and places pending ones. Runs after every change that can matter.
    pub(crate) fn orchestrate(&mut self, index: u64, at: &str) {
        self.orphan_lost_tasks(index, at);
        let mut p = Placement::default();
        let ids: Vec<String> = self.services.keys().cloned().collect();
        for id in ids {
            let Some(svc) = self.services.get(&id).cloned() else {
                continue;
            };
            if svc.spec.mode == ServiceMode::Global {
                self.orchestrate_global(&mut p, index, &svc, at);
            } else {
                self.orchestrate_replicated(&mut p, index, &svc, at);
            }
            self.roll(index, &svc, at);
            self.prune_history(&svc.id);
        }
        let pending: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Pending && t.desired_state == TaskState::Running)
            .map(|t| t.id.clone())
            .collect();
        for id in pending {
            self.assign_with(&mut p, index, &id, at);
        }
    }

    /// Tasks on nodes that are down, drained or gone cannot be relied on:
    /// they stop counting (and their addresses go) so that their slots are
    /// filled elsewhere. A node that comes back sees they are not its tasks
    /// any more and stops them.
    pub(crate) fn orphan_lost_tasks(&mut self, index: u64, at: &str) {
        let lost: Vec<(String, String)> = self
            .tasks
            .values()
            .filter(|t| !t.node_id.is_empty() && !t.state.is_terminal())
            .filter_map(|t| match self.nodes.get(&t.node_id) {
                None => Some((t.id.clone(), "node was removed".to_string())),
                Some(n) if n.state == NodeState::Down => {
                    Some((t.id.clone(), "node is down".into()))
                }
                _ => None,
            })
            .collect();
        // One pass over the endpoints for all of them: a node of thousands
        // of tasks going down must not cost tasks × endpoints.
        let gone: std::collections::HashSet<&str> =
            lost.iter().map(|(id, _)| id.as_str()).collect();
        if !gone.is_empty() {
            self.endpoints
                .retain(|_, e| !gone.contains(e.sandbox_id.as_str()));
        }
        for (id, why) in lost {
            let Some(t) = self.tasks.get_mut(&id) else {
                continue;
            };
            t.state = TaskState::Orphaned;
            t.message = why;
            t.desired_state = TaskState::Shutdown;
            t.version = index;
            t.updated_at = at.to_string();
            if !self.services.contains_key(&t.service_id) {
                self.tasks.remove(&id);
            }
        }
        // Drained nodes: their tasks are stopped and placed elsewhere.
        let drained: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Running && !t.state.is_terminal())
            .filter(|t| {
                self.nodes
                    .get(&t.node_id)
                    .is_some_and(|n| n.availability == Availability::Drain)
            })
            .map(|t| t.id.clone())
            .collect();
        for id in drained {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.desired_state = TaskState::Shutdown;
                t.message = "node is drained".into();
                t.version = index;
            }
        }
    }

    /// The task of each slot that should be running (one per slot).
    pub(crate) fn current_tasks(&self, service_id: &str) -> BTreeMap<(u64, String), String> {
        let mut out = BTreeMap::new();
        for t in self
            .tasks
            .values()
            .filter(|t| t.service_id == service_id && t.desired_state == TaskState::Running)
        {
            let key = if t.slot == 0 {
                (0, t.node_id.clone())
            } else {
                (t.slot, String::new())
            };
            out.insert(key, t.id.clone());
        }
        out
    }

    pub(crate) fn shutdown_task(&mut self, index: u64, id: &str, why: &str, at: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        t.desired_state = TaskState::Shutdown;
        t.message = why.to_string();
        t.version = index;
        // A task no node has yet is over at once; others end when their
        // node says so.
        if t.node_id.is_empty() && !t.state.is_terminal() {
            t.state = TaskState::Shutdown;
            t.updated_at = at.to_string();
            self.endpoints.retain(|_, e| e.sandbox_id != id);
        }
    }

    pub(crate) fn orchestrate_replicated(
        &mut self,
        p: &mut Placement,
        index: u64,
        svc: &Service,
        at: &str,
    ) {
        let current = self.current_tasks(&svc.id);
        // Scale down: the highest slots go first.
        for ((slot, _), tid) in current.iter().rev() {
            if *slot > svc.spec.replicas {
                self.shutdown_task(index, tid, "scaled down", at);
            }
        }
        for slot in 1..=svc.spec.replicas {
            if current.contains_key(&(slot, String::new())) {
                continue;
            }
            let t = self.new_task(index, svc, slot, at);
            let id = t.id.clone();
            self.tasks.insert(id.clone(), t);
            self.assign_with(p, index, &id, at);
        }
    }

    pub(crate) fn orchestrate_global(
        &mut self,
        p: &mut Placement,
        index: u64,
        svc: &Service,
        at: &str,
    ) {
        let current = self.current_tasks(&svc.id);
        let eligible: Vec<String> = p.eligible(self, svc).to_vec();
        for ((_, node), tid) in &current {
            let running_elsewhere = self.tasks.get(tid).is_some_and(|t| !t.state.is_terminal());
            if !p.is_eligible(self, svc, node) && running_elsewhere {
                let ready = self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.state == NodeState::Ready);
                if ready {
                    self.shutdown_task(index, tid, "node no longer satisfies the service", at);
                }
            }
        }
        for node in eligible {
            if current.contains_key(&(0, node.clone())) {
                continue;
            }
            let mut t = self.new_task(index, svc, 0, at);
            t.node_id = node;
            let id = t.id.clone();
            self.tasks.insert(id.clone(), t);
            self.assign_with(p, index, &id, at);
        }
    }
}
