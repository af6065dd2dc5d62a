//! The cluster state machine: every change to cluster state is a `Command`
//! applied in log order on every manager. `apply` is deterministic: wall-clock
//! times and random values travel inside the command, chosen by the proposer.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Cluster-wide configuration fixed at `mesh init` (tokens rotate).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterInfo {
    pub id: String,
    pub created_at: String,
    pub ca_cert_pem: String,
    /// The CA key is replicated so that any manager can sign certificates
    /// after a leader change, as Swarm does.
    pub ca_key_pem: String,
    pub worker_token: String,
    pub manager_token: String,
    pub cert_expiry_secs: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    /// Raft ID of a manager (derived from the node ID); 0 for workers.
    pub raft_id: u64,
    pub hostname: String,
    pub role: String,
    pub availability: String,
    pub labels: BTreeMap<String, String>,
    pub addr: String,
    /// ADDR:PORT of the cluster port (managers).
    pub manager_addr: String,
    pub state: String,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
    pub os: String,
    pub architecture: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Command {
    Init {
        cluster: ClusterInfo,
        node: Node,
    },
    AddNode {
        node: Node,
    },
    UpdateNode {
        id: String,
        availability: Option<String>,
        role: Option<String>,
        label_add: BTreeMap<String, String>,
        label_rm: Vec<String>,
        at: String,
    },
    SetNodeState {
        id: String,
        state: String,
        addr: Option<String>,
        at: String,
    },
    RemoveNode {
        id: String,
    },
    RotateToken {
        role: String,
        token: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    Ok,
    Node(Node),
    /// Refused by the state machine; the message is shown to the user.
    Refused(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<String, Node>,
    /// IDs of removed nodes: their certificates are refused from then on.
    pub removed: BTreeSet<String>,
}

impl ClusterState {
    /// Applies one committed command. `index` is the Raft log index, used as
    /// the objects' version as Swarm uses its Raft index.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::Init { cluster, node } => {
                if self.cluster.is_some() {
                    return CommandResult::Refused("the cluster is already initialized".into());
                }
                self.cluster = Some(cluster.clone());
                let mut node = node.clone();
                node.version = index;
                self.nodes.insert(node.id.clone(), node.clone());
                CommandResult::Node(node)
            }
            Command::AddNode { node } => {
                if self.removed.contains(&node.id) {
                    return CommandResult::Refused(format!("node {} was removed", node.id));
                }
                let mut node = node.clone();
                node.version = index;
                self.nodes.insert(node.id.clone(), node.clone());
                CommandResult::Node(node)
            }
            Command::UpdateNode {
                id,
                availability,
                role,
                label_add,
                label_rm,
                at,
            } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(format!("node {id} not found"));
                };
                if let Some(a) = availability {
                    node.availability = a.clone();
                }
                if let Some(r) = role {
                    node.role = r.clone();
                }
                for k in label_rm {
                    node.labels.remove(k);
                }
                for (k, v) in label_add {
                    node.labels.insert(k.clone(), v.clone());
                }
                node.updated_at = at.clone();
                node.version = index;
                CommandResult::Node(node.clone())
            }
            Command::SetNodeState {
                id,
                state,
                addr,
                at,
            } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(format!("node {id} not found"));
                };
                node.state = state.clone();
                if let Some(a) = addr {
                    node.addr = a.clone();
                }
                node.updated_at = at.clone();
                node.version = index;
                CommandResult::Node(node.clone())
            }
            Command::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return CommandResult::Refused(format!("node {id} not found"));
                }
                self.removed.insert(id.clone());
                CommandResult::Ok
            }
            Command::RotateToken { role, token } => {
                let Some(c) = self.cluster.as_mut() else {
                    return CommandResult::Refused("the cluster is not initialized".into());
                };
                match role.as_str() {
                    "worker" => c.worker_token = token.clone(),
                    "manager" => c.manager_token = token.clone(),
                    other => return CommandResult::Refused(format!("unknown role {other}")),
                }
                CommandResult::Ok
            }
        }
    }
}
