//! Services and their tasks, as Swarm's orchestrator, scheduler and
//! allocator would keep them — but inside the Raft state machine. Every
//! decision (which node runs a task, which address it gets, when a task is
//! replaced) is taken in `apply` from the replicated state alone, so all
//! managers agree without a separate leader loop, and a leader change loses
//! nothing in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mesh_common::model::{
    Availability, DriverKind, EndpointMode, Mac, NodeState, RestartCondition, ServiceMode,
    TaskState,
};
use serde::{Deserialize, Serialize};

use crate::refusal::Refusal;
use crate::state::{ClusterState, CommandResult, Endpoint};

/// Most replicas a service may ask for: far more than a small cluster can
/// run, small enough that a typo (an extra zero or three) is caught.
pub const MAX_REPLICAS: u64 = 10_000;
/// Tasks kept per slot, the running one included (Swarm's
/// task-history-retention-limit).
pub const TASK_HISTORY: usize = 5;
/// Docker's default restart delay.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 5_000;

/// What a user asks for in `mesh service create` (and `update`). Networks
/// are held by ID; the proposer resolves names.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub mode: ServiceMode,
    pub replicas: u64,
    pub networks: Vec<String>,
    pub endpoint_mode: EndpointMode,
    /// K=V, in the order given.
    pub env: Vec<String>,
    pub constraints: Vec<String>,
    pub restart_condition: RestartCondition,
    pub restart_delay_ms: u64,
    /// 0 = unlimited.
    pub restart_max_attempts: u64,
    pub cmd: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub id: String,
    pub spec: ServiceSpec,
    /// Network ID to the service's virtual IP on it (VIP mode).
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// Raft index of the last change that needs tasks replaced; tasks made
    /// before it are rolled over one at a time.
    pub spec_version: u64,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
    pub update_state: UpdateState,
    pub update_message: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    /// Replicated services: 1..=replicas. Global services: 0 (the node is
    /// the slot).
    pub slot: u64,
    /// Empty while pending.
    pub node_id: String,
    /// Running or Shutdown.
    pub desired_state: TaskState,
    pub state: TaskState,
    pub message: String,
    pub error: String,
    pub exit_code: i32,
    /// The service's `spec_version` this task was made for.
    pub spec_version: u64,
    /// Restarts of this slot so far (for --restart-max-attempts).
    pub attempt: u64,
    /// Wait before starting: a restart after the task ended by itself.
    pub start_delay_ms: u64,
    pub created_at: String,
    /// When `state` last changed.
    pub updated_at: String,
    pub version: u64,
}

/// A node's account of one of its tasks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskReport {
    pub task_id: String,
    pub state: TaskState,
    pub message: String,
    pub error: String,
    pub exit_code: i32,
}

/// Where a service's rolling update stands; written as the words older
/// versions wrote ("" before any update).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    #[default]
    #[serde(rename = "")]
    None,
    #[serde(rename = "updating")]
    Updating,
    #[serde(rename = "completed")]
    Completed,
}

impl UpdateState {
    pub const fn as_str(self) -> &'static str {
        match self {
            UpdateState::None => "",
            UpdateState::Updating => "updating",
            UpdateState::Completed => "completed",
        }
    }
}

/// Whether a task state word read from the wire is final; unknown words
/// are not (the CLI shows them as they come).
pub fn is_terminal(state: &str) -> bool {
    state.parse::<TaskState>().is_ok_and(TaskState::is_terminal)
}

/// How far along a task is: every terminal state counts the same, so a
/// report never moves a task from one ending to another.
fn rank(state: TaskState) -> u8 {
    match state {
        TaskState::Pending => 0,
        TaskState::Assigned => 1,
        TaskState::Starting => 2,
        TaskState::Running => 3,
        _ => 4,
    }
}

/// One `node.X==V` / `node.X!=V` scheduling constraint.
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    key: String,
    equal: bool,
    value: String,
}

impl Constraint {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        let (key, equal, value) = if let Some((k, v)) = s.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = s.split_once("!=") {
            (k, false, v)
        } else {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: use node.role==worker, node.hostname==H, node.id==ID or node.labels.K==V (or !=)"
            )));
        };
        let key = key.trim();
        let value = value.trim();
        let known = matches!(key, "node.role" | "node.hostname" | "node.id")
            || key
                .strip_prefix("node.labels.")
                .is_some_and(|k| !k.is_empty());
        if !known || value.is_empty() {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: use node.role==worker, node.hostname==H, node.id==ID or node.labels.K==V (or !=)"
            )));
        }
        if key == "node.role" && !matches!(value, "worker" | "manager") {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: node.role is worker or manager"
            )));
        }
        Ok(Constraint {
            key: key.to_string(),
            equal,
            value: value.to_string(),
        })
    }

    fn matches(&self, n: &crate::state::Node) -> bool {
        let actual = match self.key.as_str() {
            "node.role" => Some(n.role.as_str()),
            "node.hostname" => Some(n.hostname.as_str()),
            "node.id" => Some(n.id.as_str()),
            k => k
                .strip_prefix("node.labels.")
                .and_then(|l| n.labels.get(l))
                .map(String::as_str),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

/// Checks a spec for what `apply` can decide alone.
pub fn validate(spec: &ServiceSpec) -> Result<(), Refusal> {
    if !mesh_common::id::valid_name(&spec.name) || spec.name.len() > 63 {
        return Err(Refusal::invalid(format!(
            "invalid service name {:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters",
            spec.name
        )));
    }
    if spec.replicas > MAX_REPLICAS {
        return Err(Refusal::invalid(format!(
            "{} replicas is more than the limit of {MAX_REPLICAS}",
            spec.replicas
        )));
    }
    for c in &spec.constraints {
        Constraint::parse(c)?;
    }
    for e in &spec.env {
        if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(Refusal::invalid(format!(
                "invalid environment variable {e:?}: use KEY=VALUE"
            )));
        }
    }
    if spec.cmd.is_empty() {
        return Err(Refusal::invalid(
            "no command given: mesh service create [OPTIONS] -- CMD [ARG...]",
        ));
    }
    let mut nets = spec.networks.clone();
    nets.sort();
    nets.dedup();
    if nets.len() != spec.networks.len() {
        return Err(Refusal::invalid("a network is given twice"));
    }
    Ok(())
}

/// What in a spec, when changed, needs the tasks replaced (everything but
/// the replica count).
fn task_relevant(a: &ServiceSpec) -> ServiceSpec {
    ServiceSpec {
        replicas: 0,
        labels: BTreeMap::new(),
        ..a.clone()
    }
}

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

    fn check_spec(&self, id: &str, spec: &ServiceSpec) -> Result<(), Refusal> {
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
        if let Err(why) = self.allocate_vips(&mut svc) {
            return CommandResult::Refused(why);
        }
        self.services.insert(id.to_string(), svc.clone());
        self.orchestrate(index, at);
        CommandResult::Service(Box::new(self.services.get(id).cloned().unwrap_or(svc)))
    }

    /// A VIP on every network of a VIP-mode service; freed where it left.
    fn allocate_vips(&self, svc: &mut Service) -> Result<(), Refusal> {
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
        if let Err(why) = self.allocate_vips(&mut svc) {
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
            if rank(r.state) < rank(t.state) || r.state == t.state && r.message == t.message {
                continue;
            }
            t.state = r.state;
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
    fn task_ended(&mut self, index: u64, t: &Task, at: &str) {
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

    fn new_task(&self, index: u64, svc: &Service, slot: u64, at: &str) -> Task {
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
    fn drop_task(&mut self, id: &str) {
        self.tasks.remove(id);
        self.endpoints.retain(|_, e| e.sandbox_id != id);
    }

    fn eligible(&self, svc: &Service) -> Vec<String> {
        let constraints: Vec<Constraint> = svc
            .spec
            .constraints
            .iter()
            .filter_map(|c| Constraint::parse(c).ok())
            .collect();
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Ready && n.availability == Availability::Active)
            .filter(|n| constraints.iter().all(|c| c.matches(n)))
            .map(|n| n.id.clone())
            .collect()
    }

    /// Why no node can take a task of `svc`, in Docker's words.
    fn no_node_reason(&self, svc: &Service) -> String {
        let ready: Vec<&crate::state::Node> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready && n.availability == Availability::Active)
            .collect();
        if ready.is_empty() || svc.spec.constraints.is_empty() {
            return "no suitable node (no node is ready and active)".into();
        }
        format!(
            "no suitable node (scheduling constraints not satisfied on {} node{})",
            ready.len(),
            if ready.len() == 1 { "" } else { "s" }
        )
    }

    /// Places a pending task (spread: the eligible node with fewest tasks
    /// of this service, then fewest tasks overall) and gives it addresses.
    fn assign(&mut self, index: u64, task_id: &str, at: &str) {
        let Some(t) = self.tasks.get(task_id).cloned() else {
            return;
        };
        let Some(svc) = self.services.get(&t.service_id).cloned() else {
            return;
        };
        let eligible = self.eligible(&svc);
        let node = if !t.node_id.is_empty() {
            eligible.iter().find(|n| **n == t.node_id).cloned()
        } else {
            let load = |n: &String, service: bool| {
                self.tasks
                    .values()
                    .filter(|x| {
                        x.node_id == *n
                            && x.desired_state == TaskState::Running
                            && !x.state.is_terminal()
                            && (!service || x.service_id == svc.id)
                    })
                    .count()
            };
            eligible
                .iter()
                .min_by_key(|n| (load(n, true), load(n, false), (*n).clone()))
                .cloned()
        };
        let Some(node) = node else {
            let reason = self.no_node_reason(&svc);
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
        for net_id in &svc.spec.networks {
            let Some(net) = self.networks.get(net_id) else {
                continue;
            };
            match self.allocate_address_except(net, &BTreeSet::new()) {
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
                    if let Some(t) = self.tasks.get_mut(task_id) {
                        t.state = TaskState::Pending;
                        t.message = format!("cannot allocate an address: {why}");
                        t.version = index;
                    }
                    return;
                }
            }
        }
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
        let ids: Vec<String> = self.services.keys().cloned().collect();
        for id in ids {
            let Some(svc) = self.services.get(&id).cloned() else {
                continue;
            };
            if svc.spec.mode == ServiceMode::Global {
                self.orchestrate_global(index, &svc, at);
            } else {
                self.orchestrate_replicated(index, &svc, at);
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
            self.assign(index, &id, at);
        }
    }

    /// Tasks on nodes that are down, drained or gone cannot be relied on:
    /// they stop counting (and their addresses go) so that their slots are
    /// filled elsewhere. A node that comes back sees they are not its tasks
    /// any more and stops them.
    fn orphan_lost_tasks(&mut self, index: u64, at: &str) {
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
        for (id, why) in lost {
            self.endpoints.retain(|_, e| e.sandbox_id != id);
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
    fn current_tasks(&self, service_id: &str) -> BTreeMap<(u64, String), String> {
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

    fn shutdown_task(&mut self, index: u64, id: &str, why: &str, at: &str) {
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

    fn orchestrate_replicated(&mut self, index: u64, svc: &Service, at: &str) {
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
            self.assign(index, &id, at);
        }
    }

    fn orchestrate_global(&mut self, index: u64, svc: &Service, at: &str) {
        let current = self.current_tasks(&svc.id);
        let eligible: BTreeSet<String> = self.eligible(svc).into_iter().collect();
        for ((_, node), tid) in &current {
            let running_elsewhere = self.tasks.get(tid).is_some_and(|t| !t.state.is_terminal());
            if !eligible.contains(node) && running_elsewhere {
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
            self.assign(index, &id, at);
        }
    }

    /// Rolling update, one task at a time: the next outdated task is
    /// replaced only once the previous replacement runs.
    fn roll(&mut self, index: u64, svc: &Service, at: &str) {
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
    fn prune_history(&mut self, service_id: &str) {
        let mut by_slot: BTreeMap<(u64, String), Vec<(u64, String)>> = BTreeMap::new();
        for t in self.tasks.values().filter(|t| t.service_id == service_id) {
            let key = if t.slot == 0 {
                (0, t.node_id.clone())
            } else {
                (t.slot, String::new())
            };
            if t.state.is_terminal() && t.desired_state != TaskState::Running {
                by_slot
                    .entry(key)
                    .or_default()
                    .push((t.version, t.id.clone()));
            } else {
                by_slot.entry(key).or_default();
            }
        }
        let mut drop = Vec::new();
        for (key, mut done) in by_slot {
            let live = self
                .tasks
                .values()
                .filter(|t| {
                    t.service_id == service_id
                        && !(t.state.is_terminal() && t.desired_state != TaskState::Running)
                        && (if t.slot == 0 {
                            (0, t.node_id.clone()) == key
                        } else {
                            (t.slot, String::new()) == key
                        })
                })
                .count();
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
    /// balances over and what `tasks.NAME` answers.
    pub fn backends(&self, service_id: &str, network_id: &str) -> Vec<Ipv4Addr> {
        let running: BTreeSet<&str> = self
            .tasks
            .values()
            .filter(|t| {
                t.service_id == service_id
                    && t.desired_state == TaskState::Running
                    && t.state == TaskState::Running
                    && self
                        .nodes
                        .get(&t.node_id)
                        .is_some_and(|n| n.state == NodeState::Ready)
            })
            .map(|t| t.id.as_str())
            .collect();
        self.endpoints
            .values()
            .filter(|e| e.network_id == network_id && running.contains(e.sandbox_id.as_str()))
            .map(|e| e.ip)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterInfo, Command, NetworkSpec, Node};

    struct Lab {
        s: ClusterState,
        i: u64,
    }

    impl Lab {
        fn new(nodes: &[&str]) -> Self {
            let mut s = ClusterState::default();
            let node = |id: &str| Node {
                id: id.into(),
                hostname: id.into(),
                role: mesh_common::model::NodeRole::Worker,
                availability: Availability::Active,
                state: NodeState::Ready,
                addr: format!("192.168.0.{}", id.len()),
                ..Default::default()
            };
            s.apply(
                1,
                &Command::Init {
                    cluster: ClusterInfo {
                        id: "c".into(),
                        ..Default::default()
                    },
                    node: node(nodes[0]),
                    ingress: Some("ing".into()),
                },
            );
            let mut lab = Lab { s, i: 1 };
            for n in &nodes[1..] {
                lab.cmd(Command::AddNode { node: node(n) });
            }
            lab.cmd(Command::CreateNetwork {
                id: "net".into(),
                spec: NetworkSpec {
                    name: "app".into(),
                    driver: DriverKind::Overlay,
                    ..Default::default()
                },
                at: "t".into(),
            });
            lab
        }

        fn cmd(&mut self, c: Command) -> CommandResult {
            self.i += 1;
            self.s.apply(self.i, &c)
        }

        fn create(&mut self, id: &str, f: impl FnOnce(&mut ServiceSpec)) -> CommandResult {
            let mut spec = ServiceSpec {
                name: id.into(),
                mode: ServiceMode::Replicated,
                replicas: 1,
                networks: vec!["net".into()],
                endpoint_mode: EndpointMode::Vip,
                restart_condition: RestartCondition::Any,
                cmd: vec!["sleep".into(), "1000".into()],
                ..Default::default()
            };
            f(&mut spec);
            self.cmd(Command::CreateService {
                id: id.into(),
                spec,
                at: "t".into(),
            })
        }

        fn live(&self, svc: &str) -> Vec<Task> {
            self.s
                .tasks
                .values()
                .filter(|t| t.service_id == svc && t.desired_state == TaskState::Running)
                .cloned()
                .collect()
        }

        fn per_node(&self, svc: &str) -> BTreeMap<String, usize> {
            let mut m = BTreeMap::new();
            for t in self.live(svc) {
                *m.entry(t.node_id.clone()).or_default() += 1;
            }
            m
        }

        fn report(&mut self, task: &Task, state: TaskState, code: i32) {
            self.cmd(Command::ReportTasks {
                node_id: task.node_id.clone(),
                reports: vec![TaskReport {
                    task_id: task.id.clone(),
                    state,
                    exit_code: code,
                    ..Default::default()
                }],
                at: "t".into(),
            });
        }

        fn run_all(&mut self, svc: &str) {
            for t in self.live(svc) {
                if t.state != TaskState::Running {
                    self.report(&t, TaskState::Running, 0);
                }
            }
        }

        fn scale(&mut self, svc: &str, n: u64) {
            let cur = self.s.services[svc].clone();
            let mut spec = cur.spec.clone();
            spec.replicas = n;
            self.cmd(Command::UpdateService {
                id: svc.into(),
                spec,
                force: false,
                version: cur.version,
                at: "t".into(),
            });
        }
    }

    #[test]
    fn replicas_spread_and_get_addresses_and_vips() {
        let mut lab = Lab::new(&["a", "bb", "ccc"]);
        assert!(matches!(
            lab.create("web", |s| s.replicas = 6),
            CommandResult::Service(_)
        ));
        let per = lab.per_node("web");
        assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
        let svc = &lab.s.services["web"];
        let vip = svc.vips.get("net").copied().expect("a VIP on net");
        let ips: BTreeSet<Ipv4Addr> = lab.s.endpoints.values().map(|e| e.ip).collect();
        assert_eq!(ips.len(), 6, "one address per task");
        assert!(!ips.contains(&vip), "no task gets the VIP");
        assert!(
            lab.live("web")
                .iter()
                .all(|t| t.state == TaskState::Assigned)
        );
        assert!(lab.s.backends("web", "net").is_empty(), "nothing runs yet");
        lab.run_all("web");
        assert_eq!(lab.s.backends("web", "net").len(), 6);
        assert!(
            matches!(lab.create("web", |_| {}), CommandResult::Service(_)),
            "a retried create is recognised"
        );
        let dup = lab.create("web2", |s| s.name = "web".into());
        assert!(matches!(dup, CommandResult::Refused(m) if m.contains("already exists")));
    }

    #[test]
    fn scale_down_and_up() {
        let mut lab = Lab::new(&["a", "bb", "ccc"]);
        lab.create("web", |s| s.replicas = 6);
        lab.run_all("web");
        lab.scale("web", 2);
        assert_eq!(lab.live("web").len(), 2);
        let stopping: Vec<Task> = lab
            .s
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Shutdown)
            .cloned()
            .collect();
        assert_eq!(stopping.len(), 4);
        assert_eq!(
            lab.s.backends("web", "net").len(),
            2,
            "stopping tasks leave the rotation at once"
        );
        // Their addresses stay theirs until they are down.
        assert_eq!(lab.s.endpoints.len(), 6);
        for t in &stopping {
            lab.report(t, TaskState::Shutdown, 0);
        }
        assert_eq!(lab.s.endpoints.len(), 2);
        lab.scale("web", 6);
        assert_eq!(lab.live("web").len(), 6);
        assert_eq!(lab.per_node("web").values().max(), Some(&2));
    }

    #[test]
    fn node_down_moves_tasks_and_back_is_fine() {
        let mut lab = Lab::new(&["a", "bb", "ccc"]);
        lab.create("web", |s| s.replicas = 6);
        lab.run_all("web");
        lab.cmd(Command::SetNodeState {
            id: "bb".into(),
            state: NodeState::Down,
            addr: None,
            at: "t".into(),
        });
        let per = lab.per_node("web");
        assert_eq!(per.get("bb"), None);
        assert_eq!(per.values().sum::<usize>(), 6);
        assert!(
            lab.s
                .tasks
                .values()
                .filter(|t| t.state == TaskState::Orphaned)
                .count()
                == 2
        );
        assert!(lab.s.endpoints.values().all(|e| e.node_id != "bb"));
        lab.run_all("web");
        assert_eq!(lab.s.backends("web", "net").len(), 6);
        // A late report from the dead node changes nothing.
        let old = lab
            .s
            .tasks
            .values()
            .find(|t| t.state == TaskState::Orphaned)
            .cloned();
        if let Some(old) = old {
            lab.report(&old, TaskState::Running, 0);
            assert_eq!(lab.s.tasks[&old.id].state, "orphaned");
        }
    }

    #[test]
    fn restart_conditions() {
        let mut lab = Lab::new(&["a"]);
        lab.create("any", |s| s.restart_delay_ms = 100);
        lab.run_all("any");
        let t = lab.live("any")[0].clone();
        lab.report(&t, TaskState::Complete, 0);
        let next = lab.live("any");
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].id, t.id);
        assert_eq!((next[0].attempt, next[0].start_delay_ms), (1, 100));

        lab.create("onf", |s| s.restart_condition = RestartCondition::OnFailure);
        lab.run_all("onf");
        let t = lab.live("onf")[0].clone();
        lab.report(&t, TaskState::Complete, 0);
        let after = lab.live("onf");
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].id, t.id, "a clean exit is not restarted");

        lab.create("max", |s| s.restart_max_attempts = 2);
        for _ in 0..5 {
            let t = lab.live("max")[0].clone();
            if t.state.is_terminal() {
                break;
            }
            lab.report(&t, TaskState::Failed, 1);
        }
        let total = lab
            .s
            .tasks
            .values()
            .filter(|t| t.service_id == "max")
            .count();
        assert_eq!(total, 3, "first run and two restarts");
    }

    #[test]
    fn rolling_update_one_at_a_time() {
        let mut lab = Lab::new(&["a", "bb"]);
        lab.create("web", |s| s.replicas = 3);
        lab.run_all("web");
        let cur = lab.s.services["web"].clone();
        let mut spec = cur.spec.clone();
        spec.env.push("A=1".into());
        lab.cmd(Command::UpdateService {
            id: "web".into(),
            spec,
            force: false,
            version: cur.version,
            at: "t".into(),
        });
        let v = lab.s.services["web"].spec_version;
        let fresh = |lab: &Lab| {
            lab.live("web")
                .iter()
                .filter(|t| t.spec_version == v)
                .count()
        };
        assert_eq!(fresh(&lab), 1, "one task replaced at a time");
        for round in 2..=3 {
            let new: Vec<Task> = lab
                .live("web")
                .into_iter()
                .filter(|t| t.spec_version == v && t.state != TaskState::Running)
                .collect();
            for t in new {
                lab.report(&t, TaskState::Running, 0);
            }
            assert_eq!(fresh(&lab), round);
        }
        lab.run_all("web");
        assert_eq!(lab.s.services["web"].update_state, UpdateState::Completed);
        // Stale version: refused.
        let stale = lab.cmd(Command::UpdateService {
            id: "web".into(),
            spec: cur.spec.clone(),
            force: false,
            version: cur.version,
            at: "t".into(),
        });
        assert!(matches!(stale, CommandResult::Refused(m) if m.contains("meanwhile")));
    }

    #[test]
    fn constraints_global_and_bad_specs() {
        let mut lab = Lab::new(&["a", "bb", "ccc"]);
        lab.create("nowhere", |s| {
            s.constraints = vec!["node.hostname==zz".into()]
        });
        let t = lab.live("nowhere");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].state, "pending");
        assert!(
            t[0].message
                .contains("scheduling constraints not satisfied on 3 nodes")
        );
        lab.create("pinned", |s| {
            s.replicas = 4;
            s.constraints = vec!["node.hostname==bb".into()];
        });
        assert_eq!(
            lab.per_node("pinned").keys().collect::<Vec<_>>(),
            vec!["bb"]
        );
        lab.create("g", |s| {
            s.mode = ServiceMode::Global;
            s.replicas = 0;
        });
        assert_eq!(lab.per_node("g").len(), 3);
        lab.cmd(Command::UpdateNode {
            id: "a".into(),
            availability: Some(Availability::Drain),
            role: None,
            label_add: Default::default(),
            label_rm: vec![],
            at: "t".into(),
        });
        assert_eq!(lab.per_node("g").len(), 2, "drained nodes run no tasks");
        let bad = [
            lab.create("x", |s| s.replicas = MAX_REPLICAS + 1),
            lab.create("y", |s| s.networks = vec!["nope".into()]),
            lab.create("z", |s| s.networks = vec!["ing".into()]),
            lab.create("w", |s| s.constraints = vec!["node.color=red".into()]),
            lab.create("v", |s| s.cmd = vec![]),
        ];
        for b in bad {
            assert!(matches!(b, CommandResult::Refused(_)), "{b:?}");
        }
        assert!(!lab.s.services.contains_key("x"));
        let rm = lab.cmd(Command::RemoveNetwork { id: "net".into() });
        assert!(matches!(rm, CommandResult::Refused(m) if m.contains("in use by service")));
        lab.cmd(Command::RemoveService {
            id: "nowhere".into(),
            at: "t".into(),
        });
        assert!(lab.s.tasks.values().all(|t| t.service_id != "nowhere"));
    }
}
