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
    Node(Box<Node>),
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
                CommandResult::Node(Box::new(node))
            }
            Command::AddNode { node } => {
                if self.removed.contains(&node.id) {
                    return CommandResult::Refused(format!("node {} was removed", node.id));
                }
                let mut node = node.clone();
                node.version = index;
                self.nodes.insert(node.id.clone(), node.clone());
                CommandResult::Node(Box::new(node))
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
                CommandResult::Node(Box::new(node.clone()))
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
                CommandResult::Node(Box::new(node.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            role: "worker".into(),
            availability: "active".into(),
            state: "unknown".into(),
            ..Default::default()
        }
    }

    fn init(s: &mut ClusterState) {
        let cluster = ClusterInfo {
            id: "c".into(),
            worker_token: "w".into(),
            manager_token: "m".into(),
            ..Default::default()
        };
        let mut first = node("m1");
        first.role = "manager".into();
        assert!(matches!(
            s.apply(
                1,
                &Command::Init {
                    cluster,
                    node: first
                }
            ),
            CommandResult::Node(_)
        ));
    }

    #[test]
    fn init_only_once() {
        let mut s = ClusterState::default();
        init(&mut s);
        let again = Command::Init {
            cluster: ClusterInfo::default(),
            node: node("x"),
        };
        assert!(matches!(s.apply(2, &again), CommandResult::Refused(_)));
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.cluster.as_ref().map(|c| c.id.as_str()), Some("c"));
    }

    #[test]
    fn update_labels_role_and_version() {
        let mut s = ClusterState::default();
        init(&mut s);
        s.apply(2, &Command::AddNode { node: node("w1") });
        let cmd = Command::UpdateNode {
            id: "w1".into(),
            availability: Some("drain".into()),
            role: None,
            label_add: [
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]
            .into(),
            label_rm: vec![],
            at: "t".into(),
        };
        s.apply(3, &cmd);
        let rm = Command::UpdateNode {
            id: "w1".into(),
            availability: None,
            role: Some("manager".into()),
            label_add: Default::default(),
            label_rm: vec!["a".into()],
            at: "t2".into(),
        };
        let CommandResult::Node(n) = s.apply(4, &rm) else {
            panic!("update refused")
        };
        assert_eq!(n.availability, "drain");
        assert_eq!(n.role, "manager");
        assert_eq!(n.labels.len(), 1);
        assert_eq!(n.labels.get("b").map(String::as_str), Some("2"));
        assert_eq!(n.version, 4);
        assert_eq!(n.updated_at, "t2");
    }

    #[test]
    fn removed_nodes_stay_out() {
        let mut s = ClusterState::default();
        init(&mut s);
        s.apply(2, &Command::AddNode { node: node("w1") });
        assert_eq!(
            s.apply(3, &Command::RemoveNode { id: "w1".into() }),
            CommandResult::Ok
        );
        assert!(s.removed.contains("w1"));
        assert!(matches!(
            s.apply(4, &Command::AddNode { node: node("w1") }),
            CommandResult::Refused(_)
        ));
        assert!(matches!(
            s.apply(5, &Command::RemoveNode { id: "w1".into() }),
            CommandResult::Refused(_)
        ));
        let st = Command::SetNodeState {
            id: "w1".into(),
            state: "ready".into(),
            addr: None,
            at: "t".into(),
        };
        assert!(matches!(s.apply(6, &st), CommandResult::Refused(_)));
    }

    #[test]
    fn token_rotation() {
        let mut s = ClusterState::default();
        let rot = Command::RotateToken {
            role: "worker".into(),
            token: "new".into(),
        };
        assert!(matches!(s.apply(1, &rot), CommandResult::Refused(_)));
        init(&mut s);
        assert_eq!(s.apply(2, &rot), CommandResult::Ok);
        assert_eq!(
            s.cluster.as_ref().map(|c| c.worker_token.as_str()),
            Some("new")
        );
        assert_eq!(
            s.cluster.as_ref().map(|c| c.manager_token.as_str()),
            Some("m")
        );
        let bad = Command::RotateToken {
            role: "boss".into(),
            token: "x".into(),
        };
        assert!(matches!(s.apply(3, &bad), CommandResult::Refused(_)));
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds = [
            Command::AddNode { node: node("a") },
            Command::SetNodeState {
                id: "a".into(),
                state: "ready".into(),
                addr: Some("10.0.0.1".into()),
                at: "t".into(),
            },
            Command::RemoveNode { id: "a".into() },
        ];
        let run = || {
            let mut s = ClusterState::default();
            init(&mut s);
            for (i, c) in cmds.iter().enumerate() {
                s.apply(i as u64 + 2, c);
            }
            serde_json::to_string(&s).unwrap_or_default()
        };
        assert_eq!(run(), run());
    }
}
