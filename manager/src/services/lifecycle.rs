//! A service's life in the state machine: created, updated (tasks to
//! replace are marked by a new spec version), removed, and its tasks'
//! reports, with restarts per the service's restart condition.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use mesh_common::model::{DriverKind, EndpointMode, RestartCondition, TaskState};

use super::{Service, ServiceSpec, Task, TaskReport, UpdateState, rank, task_relevant, validate};
use crate::state::{ClusterState, CommandResult};
use mesh_common::refusal::Refusal;

impl ClusterState {
    /// Finds a service by full ID, then name, then unique ID prefix.
    pub fn find_service(&self, r: &str) -> Result<&Service, Refusal> {
        if let Some(s) = self.services.get(r) {
            return Ok(s);
        }
        if let Some(s) = self.services.values().find(|s| s.spec.name == r) {
            return Ok(s);
        }
        let by_prefix: Vec<&Service> = self
            .services
            .values()
            .filter(|s| !r.is_empty() && s.id.starts_with(r))
            .collect();
        match by_prefix.as_slice() {
            [s] => Ok(s),
            [] => Err(Refusal::not_found(format!(
                "service {r} not found; see `mesh service ls`"
            ))),
            _ => Err(Refusal::precondition(format!(
                "service reference {r:?} is ambiguous: it matches several services; use more of the ID"
            ))),
        }
    }

    /// Docker's task name: SERVICE.SLOT, or SERVICE.NODEID for global ones.
    pub fn task_name(&self, t: &Task) -> String {
        let svc = self
            .services
            .get(&t.service_id)
            .map_or("<removed>", |s| s.spec.name.as_str());
        if t.slot == 0 {
            format!("{svc}.{}", t.node_id)
        } else {
            format!("{svc}.{}", t.slot)
        }
    }

    /// The sandbox name of a task, as Docker names its containers.
    pub fn task_sandbox_name(&self, t: &Task) -> String {
        format!("{}.{}", self.task_name(t), t.id)
    }

    pub(crate) fn check_spec(&self, id: &str, spec: &ServiceSpec) -> Result<(), Refusal> {
        validate(spec)?;
        if self
            .services
            .values()
            .any(|s| s.spec.name == spec.name && s.id != id)
        {
            return Err(Refusal::already_exists(format!(
                "service with name {} already exists",
                spec.name
            )));
        }
        for n in &spec.networks {
            let Some(net) = self.networks.get(n) else {
                return Err(Refusal::not_found(format!(
                    "network {n} not found; see `mesh network ls`"
                )));
            };
            if net.spec.ingress {
                return Err(Refusal::invalid(format!(
                    "network {} is the ingress network: it carries published ports, and services cannot attach to it directly",
                    net.spec.name
                )));
            }
            if net.spec.driver != DriverKind::Overlay {
                return Err(Refusal::invalid(format!(
                    "network {} has driver {}: services need an overlay network",
                    net.spec.name, net.spec.driver
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn create_service(
        &mut self,
        index: u64,
        id: &str,
        spec: &ServiceSpec,
        at: &str,
    ) -> CommandResult {
        if let Some(s) = self.services.get(id) {
            return CommandResult::Service(Box::new(s.clone()));
        }
        if let Err(why) = self.check_spec(id, spec) {
            return CommandResult::Refused(why);
        }
        let mut svc = Service {
            id: id.to_string(),
            spec: spec.clone(),
            spec_version: index,
            created_at: at.to_string(),
            updated_at: at.to_string(),
            version: index,
            ..Default::default()
        };
        if let Err(why) = self
            .allocate_vips(&mut svc)
            .and_then(|()| self.allocate_ports(&mut svc))
        {
            return CommandResult::Refused(why);
        }
        self.services.insert(id.to_string(), svc.clone());
        self.orchestrate(index, at);
        CommandResult::Service(Box::new(self.services.get(id).cloned().unwrap_or(svc)))
    }

    /// A VIP on every network of a VIP-mode service; freed where it left.
    pub(crate) fn allocate_vips(&self, svc: &mut Service) -> Result<(), Refusal> {
        let wanted: BTreeSet<&String> = if svc.spec.endpoint_mode == EndpointMode::Vip {
            svc.spec.networks.iter().collect()
        } else {
            BTreeSet::new()
        };
        svc.vips.retain(|n, _| wanted.contains(n));
        for n in wanted {
            if svc.vips.contains_key(n) {
                continue;
            }
            let net = self
                .networks
                .get(n)
                .ok_or_else(|| Refusal::not_found(format!("network {n} not found")))?;
            let extra: BTreeSet<Ipv4Addr> = svc.vips.values().copied().collect();
            let ip = self.allocate_address_except(net, &extra)?;
            svc.vips.insert(n.clone(), ip);
        }
        Ok(())
    }

    pub(crate) fn update_service(
        &mut self,
        index: u64,
        id: &str,
        spec: &ServiceSpec,
        force: bool,
        expected_version: u64,
        at: &str,
    ) -> CommandResult {
        let Some(old) = self.services.get(id).cloned() else {
            return CommandResult::Refused(Refusal::not_found(format!("service {id} not found")));
        };
        if expected_version != 0 && old.version != expected_version {
            return CommandResult::Refused(Refusal::precondition(format!(
                "service {} was changed by someone else meanwhile (version {} is now {}); run the update again",
                old.spec.name, expected_version, old.version
            )));
        }
        if old.spec.mode != spec.mode {
            return CommandResult::Refused(Refusal::invalid("a service's mode cannot be changed"));
        }
        if let Err(why) = self.check_spec(id, spec) {
            return CommandResult::Refused(why);
        }
        let mut svc = old.clone();
        svc.spec = spec.clone();
        if let Err(why) = self
            .allocate_vips(&mut svc)
            .and_then(|()| self.allocate_ports(&mut svc))
        {
            return CommandResult::Refused(why);
        }
        if force || task_relevant(&old.spec) != task_relevant(spec) {
            svc.spec_version = index;
            svc.update_state = UpdateState::Updating;
            svc.update_message = "update in progress".into();
        }
        svc.updated_at = at.to_string();
        svc.version = index;
        self.services.insert(id.to_string(), svc);
        self.orchestrate(index, at);
        match self.services.get(id) {
            Some(s) => CommandResult::Service(Box::new(s.clone())),
            None => CommandResult::Ok,
        }
    }

    pub(crate) fn remove_service(&mut self, index: u64, id: &str, at: &str) -> CommandResult {
        let Some(svc) = self.services.remove(id) else {
            return CommandResult::Refused(Refusal::not_found(format!("service {id} not found")));
        };
        // Tasks are told to stop; they and their addresses go once their
        // node says they have (or at once if they never started anywhere).
        let ids: Vec<String> = self
            .tasks
            .values()
            .filter(|t| t.service_id == id)
            .map(|t| t.id.clone())
            .collect();
        for tid in ids {
            let gone = self
                .tasks
                .get(&tid)
                .is_some_and(|t| t.state.is_terminal() || t.node_id.is_empty());
            if gone {
                self.drop_task(&tid);
            } else if let Some(t) = self.tasks.get_mut(&tid) {
                t.desired_state = TaskState::Shutdown;
                t.version = index;
                t.updated_at = at.to_string();
            }
        }
        CommandResult::Service(Box::new(svc))
    }

    /// Whether nothing but tasks on their way out (told to stop, or of a
    /// removed service) holds network `id`, so a refused `network rm` may
    /// wait for them rather than fail. True also when nothing holds it any
    /// more (they left meanwhile); false while a service asks for it or
    /// any other sandbox is attached.
    pub fn network_held_only_by_leaving_tasks(&self, id: &str) -> bool {
        let ingress = self.networks.get(id).is_some_and(|n| n.spec.ingress);
        if self
            .services
            .values()
            .any(|s| s.spec.networks.iter().any(|n| n == id) || ingress && s.uses_ingress())
        {
            return false;
        }
        self.user_endpoints(id).all(|e| {
            self.tasks.get(&e.sandbox_id).is_some_and(|t| {
                t.desired_state != TaskState::Running || !self.services.contains_key(&t.service_id)
            })
        })
    }

    /// Applies a node's reports on its own tasks. A report never moves a
    /// task backwards (a late "running" after "shutdown" is ignored), and
    /// a node cannot speak for another node's tasks.
    pub(crate) fn report_tasks(
        &mut self,
        index: u64,
        node_id: &str,
        reports: &[TaskReport],
        at: &str,
    ) -> CommandResult {
        for r in reports {
            let Some(t) = self.tasks.get_mut(&r.task_id) else {
                continue;
            };
            if t.node_id != node_id || t.state.is_terminal() {
                continue;
            }
            if rank(r.state) < rank(t.state)
                || r.state == t.state && r.message == t.message && r.health == t.health
            {
                continue;
            }
            t.state = r.state;
            t.health = r.health;
            t.message = r.message.clone();
            t.error = r.error.clone();
            t.exit_code = r.exit_code;
            t.updated_at = at.to_string();
            t.version = index;
            if r.state.is_terminal() {
                let t = t.clone();
                self.task_ended(index, &t, at);
            }
        }
        self.orchestrate(index, at);
        CommandResult::Ok
    }

    /// A task reached a final state: free its addresses, and restart it
    /// per the service's restart condition if it ended by itself.
    pub(crate) fn task_ended(&mut self, index: u64, t: &Task, at: &str) {
        self.endpoints.retain(|_, e| e.sandbox_id != t.id);
        let Some(svc) = self.services.get(&t.service_id).cloned() else {
            self.drop_task(&t.id);
            return;
        };
        if t.desired_state != TaskState::Running {
            return; // stopped on purpose: orchestrate decides what follows
        }
        let restart = match svc.spec.restart_condition {
            RestartCondition::None => false,
            RestartCondition::OnFailure => t.state != TaskState::Complete,
            _ => true,
        } && (svc.spec.restart_max_attempts == 0
            || t.attempt < svc.spec.restart_max_attempts);
        if !restart {
            // Stays the slot's task, so the slot is not refilled.
            return;
        }
        if let Some(old) = self.tasks.get_mut(&t.id) {
            old.desired_state = TaskState::Shutdown;
        }
        let mut next = self.new_task(index, &svc, t.slot, at);
        next.attempt = t.attempt + 1;
        next.start_delay_ms = svc.spec.restart_delay_ms;
        if t.slot == 0 {
            next.node_id = t.node_id.clone();
        }
        let next_id = next.id.clone();
        self.tasks.insert(next_id.clone(), next);
        self.assign(index, &next_id, at);
    }

    pub(crate) fn new_task(&self, index: u64, svc: &Service, slot: u64, at: &str) -> Task {
        let n = self.tasks.len().to_string();
        let id = mesh_common::id::derived_id(&[&svc.id, &slot.to_string(), &index.to_string(), &n]);
        Task {
            id,
            service_id: svc.id.clone(),
            slot,
            desired_state: TaskState::Running,
            state: TaskState::Pending,
            spec_version: svc.spec_version,
            created_at: at.to_string(),
            updated_at: at.to_string(),
            version: index,
            ..Default::default()
        }
    }

    /// Removes a task and frees its addresses.
    pub(crate) fn drop_task(&mut self, id: &str) {
        self.tasks.remove(id);
        self.endpoints.retain(|_, e| e.sandbox_id != id);
    }
}
