//! The commands of the Raft log. Their serialized form is the log's: a
//! field added later needs `#[serde(default)]`, and a word that `apply`
//! may refuse stays a string, so an old log always replays.

use std::collections::BTreeMap;

use mesh_common::model::{Availability, NodeRole, NodeState};
use serde::{Deserialize, Serialize};

use super::{ClusterInfo, NetworkSpec, Node, ServiceSpec, TaskReport};

/// Commands are made once per write and then serialized into the log, so
/// the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Command {
    Init {
        cluster: ClusterInfo,
        node: Node,
        /// ID for the `ingress` network created with the cluster.
        #[serde(default)]
        ingress: Option<String>,
    },
    AddNode {
        node: Node,
    },
    UpdateNode {
        id: String,
        availability: Option<Availability>,
        role: Option<NodeRole>,
        label_add: BTreeMap<String, String>,
        label_rm: Vec<String>,
        at: String,
    },
    SetNodeState {
        id: String,
        state: NodeState,
        addr: Option<String>,
        at: String,
    },
    RemoveNode {
        id: String,
    },
    /// A node's data-path faults changed (sent only on a change).
    SetNodeErrors {
        id: String,
        errors: Vec<String>,
    },
    /// The node's WireGuard public key as its heartbeat reported it (sent
    /// only on a change); refused unless it is 32 bytes of standard base64,
    /// not all zero, and no other node's.
    SetNodeEncryptionKey {
        id: String,
        public_key: String,
    },
    /// `node update --rotate-key`: the node makes a new key pair.
    RotateNodeKey {
        id: String,
    },
    /// A renewed certificate, recorded before it is handed out; it must be
    /// for the key the node joined with.
    SetNodeCert {
        id: String,
        key_fingerprint: String,
        serial: String,
        not_after: String,
    },
    /// `role` stays the word the proposer sent: a log written by older
    /// versions may hold one that `apply` refused.
    RotateToken {
        role: String,
        token: String,
    },
    /// `id` is chosen by the proposer, so a retried create is recognised.
    CreateNetwork {
        id: String,
        spec: NetworkSpec,
        at: String,
    },
    RemoveNetwork {
        id: String,
    },
    /// Attaches a sandbox on `node_id` to a network; the address is chosen
    /// in `apply`. `id` is the proposer's, so a retry is recognised.
    CreateEndpoint {
        id: String,
        network_id: String,
        node_id: String,
        sandbox: String,
        sandbox_id: String,
        aliases: Vec<String>,
        /// Standalone sandboxes may only join attachable networks.
        standalone: bool,
        at: String,
    },
    RemoveEndpoint {
        id: String,
    },
    /// `id` is the proposer's, so a retried create is recognised.
    CreateService {
        id: String,
        spec: ServiceSpec,
        at: String,
    },
    /// The whole new spec, computed by the proposer from `version`; refused
    /// if the service changed meanwhile.
    UpdateService {
        id: String,
        spec: ServiceSpec,
        force: bool,
        version: u64,
        at: String,
    },
    RemoveService {
        id: String,
        #[serde(default)]
        at: String,
    },
    ReportTasks {
        node_id: String,
        reports: Vec<TaskReport>,
        at: String,
    },
    /// The node's own routes as its heartbeat reported them (sent only on
    /// a change); refused unless every one is a CIDR and a device name, at
    /// most `MAX_NODE_ROUTES` of them.
    SetNodeRoutes {
        id: String,
        routes: Vec<RouteReport>,
    },
}

/// A route as a node reported it: text, checked in `apply`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteReport {
    pub destination: String,
    pub device: String,
}
