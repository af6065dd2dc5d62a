//! Applying node commands: init, joins, updates, liveness, removal,
//! certificates and join tokens.

use std::collections::BTreeSet;

use mesh_common::ipam::Ipv4Net;
use mesh_common::model::DriverKind;

use super::networks::INGRESS_SUBNET;
use super::{ClusterState, Command, CommandResult, NetworkSpec, NodeRoute, RouteReport, short_id};
use mesh_common::refusal::Refusal;

/// At most this many routes are kept per node (the worker caps its report
/// alike): a node must not grow the replicated state by reporting.
pub const MAX_NODE_ROUTES: usize = 64;
/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
const MAX_DEVICE_LEN: usize = 15;
/// `--opt no-overlap-check`: the network's subnet may overlap nodes' routes.
pub const NO_OVERLAP_CHECK: &str = "no-overlap-check";

impl ClusterState {
    pub(super) fn apply_node_command(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::Init {
                cluster,
                node,
                ingress,
            } => {
                if self.cluster.is_some() {
                    return CommandResult::Refused(Refusal::precondition(
                        "the cluster is already initialized",
                    ));
                }
                self.cluster = Some(cluster.clone());
                if let Some(ingress) = ingress {
                    // Swarm's ingress: 10.0.0.0/24, outside any pool logic.
                    let spec = NetworkSpec {
                        name: "ingress".into(),
                        driver: DriverKind::Overlay,
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
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "node {} was removed",
                        node.id
                    )));
                }
                if let Some(why) = self.hostname_taken(&node.hostname, &node.id) {
                    return CommandResult::Refused(Refusal::already_exists(why));
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
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                if let Some(a) = availability {
                    node.availability = *a;
                }
                if let Some(r) = role {
                    node.role = *r;
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
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                node.state = *state;
                if let Some(a) = addr {
                    node.addr = a.clone();
                }
                node.updated_at = at.clone();
                node.version = index;
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::SetNodeErrors { id, errors } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                node.datapath_errors = errors.clone();
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::SetNodeEncryptionKey { id, public_key } => {
                if let Some(why) = self.wireguard_key_refusal(id, public_key) {
                    return CommandResult::Refused(why);
                }
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                node.encryption_public_key = public_key.clone();
                node.version = index;
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::SetNodeRoutes { id, routes } => {
                let routes = match check_routes(routes) {
                    Ok(r) => r,
                    Err(why) => return CommandResult::Refused(Refusal::invalid(why)),
                };
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                node.routes = routes;
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::RotateNodeKey { id } => {
                let Some(node) = self.nodes.get_mut(id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                node.encryption_key_rotations += 1;
                node.version = index;
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::RemoveNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
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
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {id} not found"
                    )));
                };
                if node.key_fingerprint != *key_fingerprint {
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "node {id} asked for a certificate for another key; a node keeps its key for as long as it is a member (leave and join again for a new one)"
                    )));
                }
                node.cert_serial = serial.clone();
                node.cert_not_after = not_after.clone();
                node.version = index;
                CommandResult::Node(Box::new(node.clone()))
            }
            Command::RotateToken { role, token } => {
                let Some(c) = self.cluster.as_mut() else {
                    return CommandResult::Refused(Refusal::precondition(
                        "the cluster is not initialized",
                    ));
                };
                match role.as_str() {
                    "worker" => c.worker_token = token.clone(),
                    "manager" => c.manager_token = token.clone(),
                    other => {
                        return CommandResult::Refused(Refusal::invalid(format!(
                            "unknown role {other}"
                        )));
                    }
                }
                CommandResult::Ok
            }
            _ => CommandResult::Refused(Refusal::invalid("not a node command")),
        }
    }

    /// Why node `id` may not hold WireGuard key `public_key`, if it may
    /// not: the key is malformed, or another node holds it (two nodes with
    /// one key would get each other's traffic). The heartbeat handler asks
    /// before proposing, so a bad report costs no log entry.
    pub fn wireguard_key_refusal(&self, id: &str, public_key: &str) -> Option<Refusal> {
        if let Err(why) = check_wireguard_key(public_key) {
            return Some(Refusal::invalid(why));
        }
        self.nodes
            .values()
            .find(|n| n.id != id && n.encryption_public_key == public_key)
            .map(|other| {
                Refusal::already_exists(format!(
                    "WireGuard key {public_key} is held by node {}: every node makes its own",
                    short_id(&other.id)
                ))
            })
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
}

/// Reported routes as the state keeps them, or why they cannot be: each
/// destination an IPv4 CIDR without host bits, each device an interface
/// name; at most [`MAX_NODE_ROUTES`]; kept sorted and deduplicated, so a
/// report compares equal whatever order it came in.
pub fn check_routes(routes: &[RouteReport]) -> Result<Vec<NodeRoute>, String> {
    if routes.len() > MAX_NODE_ROUTES {
        return Err(format!(
            "{} routes reported: at most {MAX_NODE_ROUTES} are kept",
            routes.len()
        ));
    }
    let mut kept = BTreeSet::new();
    for r in routes {
        kept.insert(check_route(r)?);
    }
    Ok(kept.into_iter().collect())
}

/// One reported route, checked (see [`check_routes`]).
pub fn check_route(r: &RouteReport) -> Result<NodeRoute, String> {
    let destination: Ipv4Net = r.destination.parse().map_err(|_| {
        format!(
            "route destination {:?} is not an IPv4 CIDR",
            mesh_common::input::shorten(&r.destination)
        )
    })?;
    if destination.trunc() != destination {
        return Err(format!("route destination {destination} has host bits set"));
    }
    let d = &r.device;
    if d.is_empty()
        || d.len() > MAX_DEVICE_LEN
        || d.chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(format!(
            "route device {:?} is not an interface name",
            mesh_common::input::shorten(d)
        ));
    }
    Ok(NodeRoute {
        destination,
        device: d.clone(),
    })
}

/// Why a reported WireGuard public key is not one: it must be standard
/// base64 (as `wg` prints keys) of exactly 32 bytes, and not all zero (the
/// key of no one: every handshake with it would fail).
fn check_wireguard_key(key: &str) -> Result<(), String> {
    use base64::Engine;
    let shown: String = key.chars().take(60).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| format!("WireGuard key {shown:?} is not standard base64"))?;
    let bytes = <[u8; 32]>::try_from(bytes)
        .map_err(|b| format!("WireGuard key {shown:?} is {} bytes, not 32", b.len()))?;
    if bytes == [0u8; 32] {
        return Err("the all-zero WireGuard key is no node's key".into());
    }
    Ok(())
}
