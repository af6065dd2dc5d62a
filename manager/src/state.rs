//! The cluster state machine: every change to cluster state is a `Command`
//! applied in log order on every manager. `apply` is deterministic: wall-clock
//! times and random values travel inside the command, chosen by the proposer.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::ipam;
use serde::{Deserialize, Serialize};

pub use crate::services::{Service, ServiceSpec, Task, TaskReport};

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
}

/// What a user asks for in `mesh network create`. Addresses are kept as the
/// user typed them and checked in `apply`, so every manager decides alike.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkSpec {
    pub name: String,
    pub driver: String,
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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Endpoint {
    pub id: String,
    pub network_id: String,
    pub node_id: String,
    /// The sandbox's name (standalone) or task name (service).
    pub sandbox: String,
    pub sandbox_id: String,
    pub ip: String,
    pub mac: String,
    pub aliases: Vec<String>,
    pub created_at: String,
}

/// A cluster network with its allocations.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    pub spec: NetworkSpec,
    pub subnet: String,
    pub gateway: String,
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
}

/// A short node ID for messages, as Docker shortens IDs.
pub fn short_id(id: &str) -> String {
    match id.get(..12) {
        Some(s) if id.len() > 12 => format!("{s}…"),
        _ => id.to_string(),
    }
}

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
    /// A node's data-path faults changed (sent only on a change).
    SetNodeErrors {
        id: String,
        errors: Vec<String>,
    },
    /// A renewed certificate, recorded before it is handed out; it must be
    /// for the key the node joined with.
    SetNodeCert {
        id: String,
        key_fingerprint: String,
        serial: String,
        not_after: String,
    },
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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub enum CommandResult {
    #[default]
    Ok,
    Node(Box<Node>),
    Network(Box<Network>),
    Endpoint(Box<Endpoint>),
    Service(Box<Service>),
    /// Refused by the state machine; the message is shown to the user.
    Refused(String),
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
            Command::Init {
                cluster,
                node,
                ingress,
            } => {
                if self.cluster.is_some() {
                    return CommandResult::Refused("the cluster is already initialized".into());
                }
                self.cluster = Some(cluster.clone());
                if let Some(ingress) = ingress {
                    // Swarm's ingress: 10.0.0.0/24, outside any pool logic.
                    let spec = NetworkSpec {
                        name: "ingress".into(),
                        driver: "overlay".into(),
                        subnet: Some(INGRESS_SUBNET.into()),
                        ingress: true,
                        ..Default::default()
                    };
                    if let CommandResult::Refused(why) =
                        self.create_network(index, ingress, &spec, &cluster.created_at)
                    {
                        self.cluster = None;
                        return CommandResult::Refused(why);
                    }
                }
                let mut node = node.clone();
                node.version = index;
                self.nodes.insert(node.id.clone(), node.clone());
                CommandResult::Node(Box::new(node))
            }
            Command::AddNode { node } => {
                if self.removed.contains(&node.id) {
                    return CommandResult::Refused(format!("node {} was removed", node.id));
                }
                if let Some(why) = self.hostname_taken(&node.hostname, &node.id) {
                    return CommandResult::Refused(why);
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
                    if node.raft_id == 0 {
                        node.raft_id = mesh_common::id::raft_id(&node.id);
                    }
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
            Command::SetNodeErrors { id, errors } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(format!("node {id} not found"));
                };
                node.datapath_errors = errors.clone();
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return CommandResult::Refused(format!("node {id} not found"));
                }
                // Its sandboxes are gone with it.
                self.endpoints.retain(|_, e| e.node_id != *id);
                self.removed.insert(id.clone());
                CommandResult::Ok
            }
            Command::SetNodeCert {
                id,
                key_fingerprint,
                serial,
                not_after,
            } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(format!("node {id} not found"));
                };
                if node.key_fingerprint != *key_fingerprint {
                    return CommandResult::Refused(format!(
                        "node {id} asked for a certificate for another key; a node keeps its key for as long as it is a member (leave and join again for a new one)"
                    ));
                }
                node.cert_serial = serial.clone();
                node.cert_not_after = not_after.clone();
                node.version = index;
                CommandResult::Node(Box::new(node.clone()))
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
            Command::CreateNetwork { id, spec, at } => self.create_network(index, id, spec, at),
            Command::CreateEndpoint {
                id,
                network_id,
                node_id,
                sandbox,
                sandbox_id,
                aliases,
                standalone,
                at,
            } => {
                if let Some(e) = self.endpoints.get(id) {
                    if e.node_id != *node_id {
                        return CommandResult::Refused(format!(
                            "endpoint {id} belongs to another node"
                        ));
                    }
                    return CommandResult::Endpoint(Box::new(e.clone()));
                }
                let Some(net) = self.networks.get(network_id) else {
                    return CommandResult::Refused(format!("network {network_id} not found"));
                };
                if let Some(why) = self.foreign_sandbox(node_id, sandbox_id, *standalone) {
                    return CommandResult::Refused(why);
                }
                if let Some(alias) = aliases.iter().find(|a| {
                    self.services.values().any(|s| {
                        s.spec.networks.contains(network_id) && s.spec.name.eq_ignore_ascii_case(a)
                    })
                }) {
                    return CommandResult::Refused(format!(
                        "alias {alias} is the name of a service on network {}: choose another alias",
                        net.spec.name
                    ));
                }
                if *standalone && !net.spec.attachable {
                    return CommandResult::Refused(format!(
                        "network {} is not manually attachable: create it with --attachable to use it with `mesh run`",
                        net.spec.name
                    ));
                }
                if !self.nodes.contains_key(node_id) {
                    return CommandResult::Refused(format!("node {node_id} not found"));
                }
                if self
                    .endpoints
                    .values()
                    .any(|e| e.network_id == *network_id && e.sandbox_id == *sandbox_id)
                {
                    return CommandResult::Refused(format!(
                        "{sandbox} is already connected to network {}",
                        net.spec.name
                    ));
                }
                match self.allocate_address(net) {
                    Ok(ip) => {
                        let ep = Endpoint {
                            id: id.clone(),
                            network_id: network_id.clone(),
                            node_id: node_id.clone(),
                            sandbox: sandbox.clone(),
                            sandbox_id: sandbox_id.clone(),
                            ip: ip.to_string(),
                            mac: mac_for(ip),
                            aliases: aliases.clone(),
                            created_at: at.clone(),
                        };
                        self.endpoints.insert(id.clone(), ep.clone());
                        CommandResult::Endpoint(Box::new(ep))
                    }
                    Err(why) => CommandResult::Refused(why),
                }
            }
            Command::RemoveEndpoint { id } => {
                if self.endpoints.remove(id).is_none() {
                    return CommandResult::Refused(format!("endpoint {id} not found"));
                }
                CommandResult::Ok
            }
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
            Command::RemoveNetwork { id } => {
                let Some(net) = self.networks.get(id) else {
                    return CommandResult::Refused(format!("network {id} not found"));
                };
                let services: Vec<&str> = self
                    .services
                    .values()
                    .filter(|s| s.spec.networks.contains(id))
                    .map(|s| s.spec.name.as_str())
                    .collect();
                if !services.is_empty() {
                    return CommandResult::Refused(format!(
                        "network {} is in use by service {}; remove the service or `mesh service update --network-rm` first",
                        net.spec.name,
                        services.join(", ")
                    ));
                }
                let users = self.network_users(id);
                if !users.is_empty() {
                    return CommandResult::Refused(format!(
                        "network {} is in use by {}; remove those first",
                        net.spec.name,
                        users.join(", ")
                    ));
                }
                self.networks.remove(id);
                CommandResult::Ok
            }
        }
    }

    /// Why `hostname` cannot be given to node `id`, if another current node
    /// has it: constraints such as `node.hostname==H` must not be captured
    /// by whoever holds a join token.
    pub fn hostname_taken(&self, hostname: &str, id: &str) -> Option<String> {
        self.nodes
            .values()
            .find(|n| n.id != id && !hostname.is_empty() && n.hostname == hostname)
            .map(|n| {
                format!(
                    "hostname {hostname} is taken by node {}: remove that node first (`mesh node rm`)",
                    short_id(&n.id)
                )
            })
    }

    /// Why node `node_id` may not attach `sandbox_id`, if it belongs to
    /// someone else: another node's endpoint, or a service task (tasks are
    /// attached by the orchestrator, never by a node).
    fn foreign_sandbox(&self, node_id: &str, sandbox_id: &str, standalone: bool) -> Option<String> {
        if sandbox_id.is_empty() {
            return Some("a sandbox ID is required".into());
        }
        if self
            .endpoints
            .values()
            .any(|e| e.sandbox_id == sandbox_id && e.node_id != node_id)
        {
            return Some(format!("sandbox {sandbox_id} belongs to another node"));
        }
        if standalone && self.tasks.contains_key(sandbox_id) {
            return Some(format!(
                "sandbox {sandbox_id} is a service task: tasks are attached by the managers"
            ));
        }
        None
    }

    /// Finds a network by full ID, then exact name, then unique ID prefix,
    /// as Docker resolves references.
    pub fn find_network(&self, r: &str) -> Result<&Network, String> {
        if let Some(n) = self.networks.get(r) {
            return Ok(n);
        }
        if let Some(n) = self.networks.values().find(|n| n.spec.name == r) {
            return Ok(n);
        }
        let by_prefix: Vec<&Network> = self
            .networks
            .values()
            .filter(|n| !r.is_empty() && n.id.starts_with(r))
            .collect();
        match by_prefix.as_slice() {
            [n] => Ok(n),
            [] => Err(format!("network {r} not found; see `mesh network ls`")),
            _ => Err(format!(
                "network reference {r:?} is ambiguous: it matches several networks; use more of the ID"
            )),
        }
    }

    /// Who uses a network, for refusals that name them.
    pub fn network_users(&self, id: &str) -> Vec<String> {
        self.endpoints
            .values()
            .filter(|e| e.network_id == id)
            .map(|e| {
                let host = self
                    .nodes
                    .get(&e.node_id)
                    .map_or(e.node_id.as_str(), |n| n.hostname.as_str());
                format!("{} on {host}", e.sandbox)
            })
            .collect()
    }

    /// Next free address of a network (within --ip-range if given).
    fn allocate_address(&self, net: &Network) -> Result<std::net::Ipv4Addr, String> {
        self.allocate_address_except(net, &BTreeSet::new())
    }

    /// Next free address, also avoiding `extra` and every service VIP.
    pub(crate) fn allocate_address_except(
        &self,
        net: &Network,
        extra: &BTreeSet<std::net::Ipv4Addr>,
    ) -> Result<std::net::Ipv4Addr, String> {
        let subnet: ipam::Ipv4Net = net
            .subnet
            .parse()
            .map_err(|_| format!("bad subnet {}", net.subnet))?;
        let gateway: std::net::Ipv4Addr = net
            .gateway
            .parse()
            .map_err(|_| format!("bad gateway {}", net.gateway))?;
        let range = match &net.spec.ip_range {
            Some(r) => Some(ipam::parse_ip_range(r, &subnet).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut used: BTreeSet<std::net::Ipv4Addr> = self
            .endpoints
            .values()
            .filter(|e| e.network_id == net.id)
            .filter_map(|e| e.ip.parse().ok())
            .collect();
        used.extend(extra);
        used.extend(
            self.services
                .values()
                .filter_map(|s| s.vips.get(&net.id))
                .filter_map(|v| v.parse::<std::net::Ipv4Addr>().ok()),
        );
        ipam::next_host(&subnet, range.as_ref(), gateway, &used).map_err(|e| e.to_string())
    }

    /// Checks a spec and allocates its subnet and VNI. Everything is
    /// decided from the replicated state, so allocations never collide.
    fn create_network(
        &mut self,
        index: u64,
        id: &str,
        spec: &NetworkSpec,
        at: &str,
    ) -> CommandResult {
        if let Some(existing) = self.networks.get(id) {
            // A retried proposal that was committed the first time.
            return if existing.spec == *spec {
                CommandResult::Network(Box::new(existing.clone()))
            } else {
                CommandResult::Refused(format!("network ID {id} is taken"))
            };
        }
        match self.allocate_network(spec) {
            Ok((subnet, gateway, vni)) => {
                let net = Network {
                    id: id.to_string(),
                    spec: spec.clone(),
                    subnet: subnet.to_string(),
                    gateway: gateway.to_string(),
                    vni,
                    created_at: at.to_string(),
                    version: index,
                };
                self.networks.insert(id.to_string(), net.clone());
                CommandResult::Network(Box::new(net))
            }
            Err(why) => CommandResult::Refused(why),
        }
    }

    fn allocate_network(
        &self,
        spec: &NetworkSpec,
    ) -> Result<(ipam::Ipv4Net, std::net::Ipv4Addr, u32), String> {
        if self.networks.values().any(|n| n.spec.name == spec.name) {
            return Err(format!("network with name {} already exists", spec.name));
        }
        if spec.ingress
            && let Some(other) = self.networks.values().find(|n| n.spec.ingress)
        {
            return Err(format!(
                "an ingress network already exists ({}); a cluster has one, remove it first",
                other.spec.name
            ));
        }
        let used: Vec<(&str, ipam::Ipv4Net)> = self
            .networks
            .values()
            .filter_map(|n| n.subnet.parse().ok().map(|s| (n.spec.name.as_str(), s)))
            .collect();
        let subnet = match &spec.subnet {
            Some(s) => {
                let subnet = ipam::parse_subnet(s).map_err(|e| e.to_string())?;
                ipam::check_overlap(&subnet, used.iter().map(|(n, s)| (*n, s)))
                    .map_err(|e| e.to_string())?;
                subnet
            }
            None => {
                let cluster = self
                    .cluster
                    .as_ref()
                    .ok_or("the cluster is not initialized")?;
                let pools = cluster
                    .address_pools
                    .iter()
                    .map(|p| ipam::parse_pool(p))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let pools = if pools.is_empty() {
                    vec![default_pool()]
                } else {
                    pools
                };
                let mask = if cluster.pool_mask_len == 0 {
                    DEFAULT_MASK_LEN
                } else {
                    cluster.pool_mask_len
                };
                let taken: Vec<ipam::Ipv4Net> = used.iter().map(|(_, s)| *s).collect();
                ipam::carve(&pools, mask, &taken).map_err(|e| e.to_string())?
            }
        };
        let gateway = match &spec.gateway {
            Some(g) => ipam::parse_gateway(g, &subnet).map_err(|e| e.to_string())?,
            None => ipam::default_gateway(&subnet),
        };
        if let Some(r) = &spec.ip_range {
            ipam::parse_ip_range(r, &subnet).map_err(|e| e.to_string())?;
        }
        let vnis: BTreeSet<u32> = self.networks.values().map(|n| n.vni).collect();
        let vni = ipam::next_vni(&vnis).map_err(|e| e.to_string())?;
        Ok((subnet, gateway, vni))
    }
}

/// Docker's MAC for an address: 02:42 followed by the IPv4 octets, so a MAC
/// never needs allocating and a peer's MAC follows from its address.
pub fn mac_for(ip: std::net::Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

pub const INGRESS_SUBNET: &str = "10.0.0.0/24";
pub const DEFAULT_POOL: &str = "10.0.0.0/8";
pub const DEFAULT_MASK_LEN: u8 = 24;
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;

fn default_pool() -> ipam::Ipv4Net {
    ipam::Ipv4Net::new(std::net::Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default()
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
                    node: first,
                    ingress: Some("ing".into()),
                }
            ),
            CommandResult::Node(_)
        ));
    }

    #[test]
    fn data_path_errors_are_recorded_and_absent_while_empty() {
        let mut s = ClusterState::default();
        init(&mut s);
        s.apply(2, &Command::AddNode { node: node("w1") });
        let plain = serde_json::to_value(&s.nodes["w1"]).expect("json");
        assert!(plain.get("datapath_errors").is_none(), "{plain}");
        let set = Command::SetNodeErrors {
            id: "w1".into(),
            errors: vec!["network app: no such device".into()],
        };
        assert!(matches!(s.apply(3, &set), CommandResult::Node(_)));
        assert_eq!(s.nodes["w1"].datapath_errors.len(), 1);
        // A node written before the field existed still loads.
        let old: Node = serde_json::from_value(plain).expect("old node");
        assert!(old.datapath_errors.is_empty());
        let gone = Command::SetNodeErrors {
            id: "nosuch".into(),
            errors: Vec::new(),
        };
        assert!(matches!(s.apply(4, &gone), CommandResult::Refused(_)));
    }

    #[test]
    fn init_only_once() {
        let mut s = ClusterState::default();
        init(&mut s);
        let again = Command::Init {
            cluster: ClusterInfo::default(),
            node: node("x"),
            ingress: None,
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
        assert_eq!(
            n.raft_id,
            mesh_common::id::raft_id("w1"),
            "a promoted node gets its Raft ID"
        );
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

    fn create(
        s: &mut ClusterState,
        index: u64,
        id: &str,
        name: &str,
        subnet: Option<&str>,
    ) -> CommandResult {
        let spec = NetworkSpec {
            name: name.into(),
            driver: "overlay".into(),
            subnet: subnet.map(String::from),
            ..Default::default()
        };
        s.apply(
            index,
            &Command::CreateNetwork {
                id: id.into(),
                spec,
                at: "t".into(),
            },
        )
    }

    #[test]
    fn networks_allocate_and_free() {
        let mut s = ClusterState::default();
        init(&mut s);
        let ingress = s.networks.get("ing").expect("ingress made at init");
        assert_eq!(
            (ingress.subnet.as_str(), ingress.vni, ingress.spec.ingress),
            ("10.0.0.0/24", 4096, true)
        );
        let CommandResult::Network(a) = create(&mut s, 2, "a", "front", None) else {
            panic!("create refused")
        };
        assert_eq!(
            (a.subnet.as_str(), a.gateway.as_str(), a.vni),
            ("10.0.1.0/24", "10.0.1.1", 4097)
        );
        // A retried proposal returns the same network, allocating nothing.
        assert_eq!(
            create(&mut s, 3, "a", "front", None),
            CommandResult::Network(a.clone())
        );
        assert_eq!(s.networks.len(), 2);
        assert!(
            matches!(create(&mut s, 4, "b", "front", None), CommandResult::Refused(m) if m.contains("already exists"))
        );
        assert!(
            matches!(create(&mut s, 5, "c", "x", Some("10.0.1.128/25")), CommandResult::Refused(m) if m.contains("overlaps"))
        );
        assert_eq!(s.networks.len(), 2, "refused creates allocate nothing");
        assert_eq!(
            s.apply(6, &Command::RemoveNetwork { id: "a".into() }),
            CommandResult::Ok
        );
        let CommandResult::Network(d) = create(&mut s, 7, "d", "again", None) else {
            panic!("create refused")
        };
        assert_eq!(
            (d.subnet.as_str(), d.vni),
            ("10.0.1.0/24", 4097),
            "freed subnet and VNI are reused"
        );
        let spec = NetworkSpec {
            name: "ing2".into(),
            driver: "overlay".into(),
            ingress: true,
            ..Default::default()
        };
        let second = s.apply(
            8,
            &Command::CreateNetwork {
                id: "e".into(),
                spec,
                at: "t".into(),
            },
        );
        assert!(
            matches!(second, CommandResult::Refused(m) if m.contains("ingress network already exists"))
        );
    }

    #[test]
    fn pools_from_cluster_config() {
        let mut s = ClusterState::default();
        let cluster = ClusterInfo {
            id: "c".into(),
            address_pools: vec!["10.20.0.0/20".into()],
            pool_mask_len: 24,
            ..Default::default()
        };
        s.apply(
            1,
            &Command::Init {
                cluster,
                node: node("m"),
                ingress: None,
            },
        );
        for i in 0..16 {
            assert!(matches!(
                create(&mut s, 2 + i, &format!("n{i}"), &format!("n{i}"), None),
                CommandResult::Network(_)
            ));
        }
        assert!(
            matches!(create(&mut s, 20, "x", "x", None), CommandResult::Refused(m) if m.contains("10.20.0.0/20"))
        );
    }

    fn attach(
        s: &mut ClusterState,
        index: u64,
        id: &str,
        net: &str,
        sandbox: &str,
        standalone: bool,
    ) -> CommandResult {
        s.apply(
            index,
            &Command::CreateEndpoint {
                id: id.into(),
                network_id: net.into(),
                node_id: "m1".into(),
                sandbox: sandbox.into(),
                sandbox_id: format!("sb-{sandbox}"),
                aliases: vec![],
                standalone,
                at: "t".into(),
            },
        )
    }

    #[test]
    fn endpoints_allocate_addresses_and_hold_networks() {
        let mut s = ClusterState::default();
        init(&mut s);
        let spec = NetworkSpec {
            name: "app".into(),
            driver: "overlay".into(),
            subnet: Some("10.9.0.0/24".into()),
            ip_range: Some("10.9.0.128/25".into()),
            attachable: true,
            ..Default::default()
        };
        s.apply(
            2,
            &Command::CreateNetwork {
                id: "app".into(),
                spec,
                at: "t".into(),
            },
        );
        let CommandResult::Endpoint(a) = attach(&mut s, 3, "e1", "app", "web", true) else {
            panic!("refused")
        };
        assert_eq!(
            (a.ip.as_str(), a.mac.as_str()),
            ("10.9.0.128", "02:42:0a:09:00:80")
        );
        let CommandResult::Endpoint(b) = attach(&mut s, 4, "e2", "app", "db", true) else {
            panic!("refused")
        };
        assert_eq!(b.ip, "10.9.0.129");
        // Retried proposal: same endpoint, nothing new.
        assert!(
            matches!(attach(&mut s, 5, "e2", "app", "db", true), CommandResult::Endpoint(e) if e.ip == "10.9.0.129")
        );
        assert!(
            matches!(attach(&mut s, 6, "e3", "app", "db", true), CommandResult::Refused(m) if m.contains("already connected"))
        );
        // Standalone sandboxes need --attachable.
        assert!(
            matches!(attach(&mut s, 7, "e4", "ing", "x", true), CommandResult::Refused(m) if m.contains("not manually attachable"))
        );
        let rm = s.apply(8, &Command::RemoveNetwork { id: "app".into() });
        assert!(
            matches!(rm, CommandResult::Refused(m) if m.contains("web on ") && m.contains("db on "))
        );
        assert_eq!(
            s.apply(9, &Command::RemoveEndpoint { id: "e1".into() }),
            CommandResult::Ok
        );
        let CommandResult::Endpoint(c) = attach(&mut s, 10, "e5", "app", "cache", true) else {
            panic!("refused")
        };
        assert_eq!(c.ip, "10.9.0.128", "a freed address is reused");
        s.apply(11, &Command::AddNode { node: node("w9") });
        let ep = Command::CreateEndpoint {
            id: "e6".into(),
            network_id: "app".into(),
            node_id: "w9".into(),
            sandbox: "t".into(),
            sandbox_id: "sb-t".into(),
            aliases: vec![],
            standalone: true,
            at: "t".into(),
        };
        s.apply(12, &ep);
        s.apply(13, &Command::RemoveNode { id: "w9".into() });
        assert!(
            !s.endpoints.contains_key("e6"),
            "a removed node's endpoints go with it"
        );
    }
}
