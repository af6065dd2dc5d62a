//! The cluster state machine: every change to cluster state is a `Command`
//! applied in log order on every manager. `apply` is deterministic: wall-clock
//! times and random values travel inside the command, chosen by the proposer.
//!
//! - `types`: what the state holds (cluster, nodes, networks, endpoints);
//! - `command`: the commands of the Raft log;
//! - `nodes`: applying node, certificate and token commands;
//! - `networks`: applying network and endpoint commands, and their
//!   allocations (subnets, VNIs, addresses);
//! - services and tasks are applied in `crate::services`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use mesh_common::refusal::Refusal;

mod command;
pub(crate) mod networks;
mod nodes;
#[cfg(test)]
mod tests;
mod types;

pub use crate::services::{PortSpec, Service, ServiceSpec, Task, TaskReport};
pub use command::{Command, RouteReport};
pub use networks::{
    DEFAULT_DATA_PATH_PORT, DEFAULT_MASK_LEN, DEFAULT_POOL, INGRESS_SBOX, INGRESS_SUBNET,
    ingress_sbox_id, is_ingress_sbox, no_such_network,
};
pub use nodes::{MAX_NODE_ROUTES, NO_OVERLAP_CHECK, check_route, check_routes};
pub use types::{
    ClusterInfo, DEFAULT_DOWN_BEATS, DEFAULT_HEARTBEAT, Endpoint, Network, NetworkSpec, Node,
    NodeRoute, short_id,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    Ok,
    Node(Box<Node>),
    Network(Box<Network>),
    Endpoint(Box<Endpoint>),
    Service(Box<Service>),
    /// Refused by the state machine; the message is shown to the user.
    Refused(Refusal),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<String, Node>,
    /// IDs of removed nodes: their certificates are refused from then on.
    pub removed: BTreeSet<String>,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub tasks: BTreeMap<String, Task>,
}

impl ClusterState {
    /// Applies one committed command. `index` is the Raft log index, used as
    /// the objects' version as Swarm uses its Raft index.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        let result = self.apply_one(index, cmd);
        // Every node has an ingress sandbox while there is an ingress
        // network; checked after the commands that can change that (and
        // on a state from before ingress sandboxes), not on the hot path.
        if self.ingress_sync_due(cmd) {
            let at = match cmd {
                Command::Init { cluster, .. } => cluster.created_at.as_str(),
                Command::AddNode { node } => node.created_at.as_str(),
                Command::CreateNetwork { at, .. } | Command::SetNodeState { at, .. } => at.as_str(),
                _ => "",
            };
            self.sync_ingress_sboxes(at);
        }
        // Node changes move tasks: a node down, drained or back.
        match cmd {
            Command::AddNode { .. } | Command::RemoveNode { .. } => self.orchestrate(index, ""),
            Command::UpdateNode { at, .. } | Command::SetNodeState { at, .. } => {
                self.orchestrate(index, at)
            }
            _ => {}
        }
        result
    }

    fn apply_one(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::Init { .. }
            | Command::AddNode { .. }
            | Command::UpdateNode { .. }
            | Command::SetNodeState { .. }
            | Command::RemoveNode { .. }
            | Command::SetNodeErrors { .. }
            | Command::SetNodeCert { .. }
            | Command::SetNodeEncryptionKey { .. }
            | Command::RotateNodeKey { .. }
            | Command::RotateToken { .. }
            | Command::SetNodeRoutes { .. } => self.apply_node_command(index, cmd),
            Command::CreateNetwork { .. }
            | Command::RemoveNetwork { .. }
            | Command::CreateEndpoint { .. }
            | Command::RemoveEndpoint { .. } => self.apply_network_command(index, cmd),
            Command::CreateService { id, spec, at } => self.create_service(index, id, spec, at),
            Command::UpdateService {
                id,
                spec,
                force,
                version,
                at,
            } => self.update_service(index, id, spec, *force, *version, at),
            Command::RemoveService { id, at } => self.remove_service(index, id, at),
            Command::ReportTasks {
                node_id,
                reports,
                at,
            } => self.report_tasks(index, node_id, reports, at),
        }
    }
}
