//! What the cluster state holds: the cluster's configuration, its nodes,
//! networks and endpoints. Every field is written as older versions wrote
//! it (see `mesh_common::model`), so a state dir or log from before still
//! loads.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use mesh_common::ipam::Ipv4Net;
use mesh_common::model::{Availability, DriverKind, Mac, NodeRole, NodeState};
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
    /// Pools cluster subnets are carved from (`--default-addr-pool`).
    #[serde(default)]
    pub address_pools: Vec<String>,
    /// Prefix length of carved subnets (`--default-addr-pool-mask-length`).
    #[serde(default)]
    pub pool_mask_len: u8,
    /// UDP port of VXLAN traffic (`--data-path-port`).
    #[serde(default)]
    pub data_path_port: u16,
    /// How often every node replaces its WireGuard key
    /// (`--encryption-key-rotation`); 0 = never. Left out while 0, so a
    /// cluster without it is written as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub encryption_key_rotation_secs: u64,
    /// How often nodes heartbeat (`--dispatcher-heartbeat`), in ms; 0 (a
    /// state written before the setting) = [`DEFAULT_HEARTBEAT`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dispatcher_heartbeat_ms: u64,
    /// Silence after which the leader marks a node Down and moves its
    /// tasks (`--node-down-grace`), in ms; 0 = [`DEFAULT_DOWN_BEATS`]
    /// periods.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub node_down_grace_ms: u64,
}

/// Nodes heartbeat this often unless `init` said otherwise: short, so a
/// dead node is noticed within a second, yet a few hundred heartbeats a
/// second at most even for a large cluster.
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(200);

/// A node is Down after this many periods of silence unless `init` said
/// otherwise: three lost heartbeats are tolerated, the fourth is not.
pub const DEFAULT_DOWN_BEATS: u32 = 4;

impl ClusterInfo {
    /// The heartbeat period every manager hands to nodes.
    pub fn heartbeat_period(&self) -> std::time::Duration {
        match self.dispatcher_heartbeat_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => std::time::Duration::from_millis(ms),
        }
    }

    /// How long the leader waits for a silent node before calling it Down.
    pub fn node_down_grace(&self) -> std::time::Duration {
        match self.node_down_grace_ms {
            0 => self.heartbeat_period() * DEFAULT_DOWN_BEATS,
            ms => std::time::Duration::from_millis(ms),
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a user asks for in `mesh network create`. Addresses are kept as the
/// user typed them and checked in `apply`, so every manager decides alike.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NetworkSpec {
    pub name: String,
    /// Always overlay today: local drivers never reach the managers.
    pub driver: DriverKind,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub ip_range: Option<String>,
    pub attachable: bool,
    pub internal: bool,
    pub ingress: bool,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

/// A sandbox's attachment to a cluster network: the address and MAC the
/// managers gave it, and the node it lives on (where its traffic goes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    pub id: String,
    pub network_id: String,
    pub node_id: String,
    /// The sandbox's name (standalone) or task name (service).
    pub sandbox: String,
    pub sandbox_id: String,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub aliases: Vec<String>,
    pub created_at: String,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        NetworkSpec {
            name: String::new(),
            driver: DriverKind::Overlay,
            subnet: None,
            gateway: None,
            ip_range: None,
            attachable: false,
            internal: false,
            ingress: false,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// A cluster network with its allocations.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    pub spec: NetworkSpec,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub created_at: String,
    pub version: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    /// Raft ID, derived from the node ID (used once the node manages).
    pub raft_id: u64,
    pub hostname: String,
    pub role: NodeRole,
    pub availability: Availability,
    pub labels: BTreeMap<String, String>,
    /// Underlay address as the node advertised it; kept as text because
    /// a node may advertise IPv6, and older states hold it so.
    pub addr: String,
    /// ADDR:PORT of the cluster port (managers).
    pub manager_addr: String,
    pub state: NodeState,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
    pub os: String,
    pub architecture: String,
    /// SHA-256 of the node's public key (see `pki::NodeIdentity`): every
    /// peer refuses a certificate for this node ID with another key.
    #[serde(default)]
    pub key_fingerprint: String,
    /// Serial and expiry of the node's current certificate (hex, RFC 3339).
    #[serde(default)]
    pub cert_serial: String,
    #[serde(default)]
    pub cert_not_after: String,
    /// The underlay address the node joined with: a heartbeat may move
    /// `addr` only to this or to the address its connection comes from.
    #[serde(default)]
    pub joined_addr: String,
    /// What the node's data path could not fix on its last pass, as its
    /// heartbeat reported it; left out of the JSON while empty, so a state
    /// without faults is written as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datapath_errors: Vec<String>,
    /// The node's WireGuard static public key (standard base64), as its
    /// heartbeat reported it and `apply` checked it; left out while empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encryption_public_key: String,
    /// How many key rotations were asked for this node
    /// (`node update --rotate-key`); left out while 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub encryption_key_rotations: u64,
    /// The node's own IPv4 routes as its heartbeat reported them (checked
    /// in `apply`, sorted): overlay subnets must not overlap them while the
    /// node is Ready. Left out while empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<NodeRoute>,
}

/// One route of a node's own namespace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeRoute {
    pub destination: Ipv4Net,
    pub device: String,
}

/// A short node ID for messages, as Docker shortens IDs.
pub fn short_id(id: &str) -> String {
    match id.get(..12) {
        Some(s) if id.len() > 12 => format!("{s}…"),
        _ => id.to_string(),
    }
}
