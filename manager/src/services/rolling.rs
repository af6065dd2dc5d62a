//! Rolling updates one task at a time, the history kept per slot, and the
//! running tasks a service's VIP balances over.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use mesh_common::model::{NodeState, TaskState};

use super::{Service, TASK_HISTORY, Task, TaskHealth, UpdateState};
use crate::state::ClusterState;

/// A slot: (slot, "") for a replicated service, (0, node) for a global one.
type SlotKey = (u64, String);
/// A slot's live tasks, and its finished ones as (version, ID).
type SlotTasks = (usize, Vec<(u64, String)>);

impl ClusterState {
    /// Rolling update, one task at a time: the next outdated task is
    /// replaced only once the previous replacement runs.
    pub(crate) fn roll(&mut self, index: u64, svc: &Service, at: &str) {
        let mine: Vec<&Task> = self
            .tasks
            .values()
            .filter(|t| t.service_id == svc.id && t.desired_state == TaskState::Running)
            .collect();
        let in_flight = mine.iter().any(|t| {
            t.spec_version == svc.spec_version
                && t.state != TaskState::Running
                && !t.state.is_terminal()
        });
        let outdated: Vec<(u64, String, String)> = mine
            .iter()
            .filter(|t| t.spec_version < svc.spec_version)
            .map(|t| (t.slot, t.node_id.clone(), t.id.clone()))
            .collect();
        if outdated.is_empty() {
            if svc.update_state == UpdateState::Updating
                && let Some(s) = self.services.get_mut(&svc.id)
            {
                s.update_state = UpdateState::Completed;
                s.update_message = "update completed".into();
                s.version = index;
            }
            return;
        }
        if in_flight {
            return;
        }
        let Some((slot, node, old)) = outdated.into_iter().min() else {
            return;
        };
        self.shutdown_task(index, &old, "replaced by an update", at);
        let Some(svc) = self.services.get(&svc.id).cloned() else {
            return;
        };
        let mut t = self.new_task(index, &svc, slot, at);
        if slot == 0 {
            t.node_id = node;
        }
        let id = t.id.clone();
        self.tasks.insert(id.clone(), t);
        self.assign(index, &id, at);
    }

    /// Keeps at most TASK_HISTORY tasks per slot; the oldest finished ones
    /// go first.
    pub(crate) fn prune_history(&mut self, service_id: &str) {
        // Per slot: its live tasks and its finished ones, in one pass (a
        // scan of every task per slot made a 1,000-replica service cost a
        // million comparisons per orchestration).
        let mut by_slot: BTreeMap<SlotKey, SlotTasks> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.service_id == service_id) {
            let key = if t.slot == 0 {
                (0, t.node_id.clone())
            } else {
                (t.slot, String::new())
            };
            let entry = by_slot.entry(key).or_default();
            if t.state.is_terminal() && t.desired_state != TaskState::Running {
                entry.1.push((t.version, t.id.clone()));
            } else {
                entry.0 += 1;
            }
        }
        let mut drop = Vec::new();
        for (key, (live, mut done)) in by_slot {
            let keep = TASK_HISTORY.saturating_sub(live);
            done.sort();
            while done.len() > keep {
                drop.push(done.remove(0).1);
            }
            // Slots beyond the replica count keep no history.
            if key.0 > 0
                && self
                    .services
                    .get(service_id)
                    .is_some_and(|s| key.0 > s.spec.replicas)
                && live == 0
            {
                drop.extend(done.into_iter().map(|(_, id)| id));
            }
        }
        for id in drop {
            self.drop_task(&id);
        }
    }

    /// Addresses of a service's running tasks on a network: what its VIP
    /// balances over and what `tasks.NAME` answers. One pass over the
    /// network's endpoints, each task found by id (an endpoint's sandbox ID
    /// is its task's ID), not a scan of every task per call.
    pub fn backends(&self, service_id: &str, network_id: &str) -> Vec<Ipv4Addr> {
        self.endpoints
            .values()
            .filter(|e| e.network_id == network_id)
            .filter(|e| {
                self.tasks
                    .get(&e.sandbox_id)
                    .is_some_and(|t| t.service_id == service_id && self.is_backend(t))
            })
            .map(|e| e.ip)
            .collect()
    }

    /// Whether a task's addresses are in its service's rotation: the one
    /// rule for `backends` and for the views (`dispatcher::Views`). A task
    /// with a health check serves only while healthy.
    pub fn is_backend(&self, t: &Task) -> bool {
        t.desired_state == TaskState::Running
            && t.state == TaskState::Running
            && matches!(t.health, TaskHealth::None | TaskHealth::Healthy)
            && self
                .nodes
                .get(&t.node_id)
                .is_some_and(|n| n.state == NodeState::Ready)
    }
}
