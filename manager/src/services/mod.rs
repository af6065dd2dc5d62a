//! Services and their tasks, as Swarm's orchestrator, scheduler and
//! allocator would keep them — but inside the Raft state machine. Every
//! decision (which node runs a task, which address it gets, when a task is
//! replaced) is taken in `apply` from the replicated state alone, so all
//! managers agree without a separate leader loop, and a leader change loses
//! nothing in flight.
//!
//! - this file: services, tasks and reports as the state holds them, and
//!   what a spec must satisfy;
//! - `lifecycle`: create, update, remove, task reports and restarts;
//! - `orchestrate`: filling and trimming slots, lost and drained nodes,
//!   placing pending tasks (the choice of node is `crate::scheduler`'s);
//! - `rolling`: rolling updates, task history, a service's backends.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use mesh_common::model::{EndpointMode, PublishMode, RestartCondition, ServiceMode, TaskState};
use serde::{Deserialize, Serialize};

pub use crate::scheduler::Constraint;
pub use health::{HealthCheck, MAX_HEALTH_CMD, MAX_HEALTH_RETRIES, TaskHealth};
use mesh_common::refusal::Refusal;

mod health;
mod lifecycle;
mod orchestrate;
mod placement;
mod ports;
mod rolling;
#[cfg(test)]
mod tests;

/// Most replicas a service may ask for: far more than a small cluster can
/// run, small enough that a typo (an extra zero or three) is caught.
pub const MAX_REPLICAS: u64 = 10_000;
/// Tasks kept per slot, the running one included (Swarm's
/// task-history-retention-limit).
pub const TASK_HISTORY: usize = 5;
/// Docker's default restart delay.
pub const DEFAULT_RESTART_DELAY_MS: u64 = 5_000;
/// Longest restart delay: a day. Longer is a typo (or a unit mix-up), and
/// a task that waits for it looks hung.
pub const MAX_RESTART_DELAY_MS: u64 = 24 * 3600 * 1000;

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
    /// Published ports as asked; left out of the JSON while empty, so a
    /// state or log without ports is written as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// `--health-*` / `--no-healthcheck`; left out while absent, so a
    /// spec without one is written as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

/// One published port of a service, as Docker's `PortConfig`: the same
/// type the CLI parses, stored as the JSON it always had.
pub use mesh_common::ports::ServicePort as PortSpec;

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
    /// The spec's ports with every published port set, in the spec's
    /// order (Docker's `Endpoint.Ports`); empty JSON-wise when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint_ports: Vec<PortSpec>,
}

impl Service {
    /// Whether the service publishes in ingress mode (its tasks then get
    /// an endpoint on the ingress network).
    pub fn uses_ingress(&self) -> bool {
        self.endpoint_ports
            .iter()
            .any(|p| p.mode == PublishMode::Ingress)
    }
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
    /// The health its node last reported ("" without a check); left out
    /// while none.
    #[serde(default, skip_serializing_if = "TaskHealth::is_none")]
    pub health: TaskHealth,
}

/// A node's account of one of its tasks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskReport {
    pub task_id: String,
    pub state: TaskState,
    pub message: String,
    pub error: String,
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "TaskHealth::is_none")]
    pub health: TaskHealth,
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

/// Checks a spec for what `apply` can decide alone.
pub fn validate(spec: &ServiceSpec) -> Result<(), Refusal> {
    if !mesh_common::id::valid_name(&spec.name) || spec.name.len() > mesh_common::id::MAX_NAME {
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
    ports::validate_ports(&spec.ports)?;
    if let Some(h) = &spec.health {
        h.validate()?;
    }
    Ok(())
}

/// What a user typed into a spec that `validate` leaves alone: limits
/// checked by the control API before Raft (not in `apply`, so entries
/// already in a log replay as they did): an empty program, a restart delay
/// over a day, labels and constraint label keys beyond the label limits.
pub fn check_user_words(spec: &ServiceSpec) -> Result<(), Refusal> {
    if spec.cmd.first().is_some_and(|p| p.trim().is_empty()) {
        return Err(Refusal::invalid(
            "the command is empty: give a program to run after the flags",
        ));
    }
    if spec.restart_delay_ms > MAX_RESTART_DELAY_MS {
        return Err(Refusal::invalid(format!(
            "--restart-delay of {}s is too long: use at most 24h",
            spec.restart_delay_ms / 1000
        )));
    }
    mesh_common::input::check_labels("--label", &spec.labels)?;
    for c in &spec.constraints {
        let key = c.split(['=', '!']).next().unwrap_or_default().trim();
        if let Some(label) = key.strip_prefix("node.labels.") {
            mesh_common::input::check_label_key("--constraint", label)?;
        }
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
