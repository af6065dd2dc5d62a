//! Applying network and endpoint commands, with their allocations: a
//! subnet and VNI per network, an address per endpoint, all decided from
//! the replicated state so that managers never hand out the same one.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use mesh_common::ipam::{self, Ipv4Net};
use mesh_common::model::{Mac, NodeState, PublishMode};

use super::{
    ClusterState, Command, CommandResult, Endpoint, NO_OVERLAP_CHECK, Network, NetworkSpec, Node,
    NodeRoute,
};
use mesh_common::refusal::Refusal;

impl ClusterState {
    pub(super) fn apply_network_command(&mut self, index: u64, cmd: &Command) -> CommandResult {
        match cmd {
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
                        return CommandResult::Refused(Refusal::precondition(format!(
                            "endpoint {id} belongs to another node"
                        )));
                    }
                    return CommandResult::Endpoint(Box::new(e.clone()));
                }
                let Some(net) = self.networks.get(network_id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "network {network_id} not found"
                    )));
                };
                if let Some(why) = self.foreign_sandbox(node_id, sandbox_id, *standalone) {
                    return CommandResult::Refused(Refusal::precondition(why));
                }
                if let Some(alias) = aliases.iter().find(|a| {
                    self.services.values().any(|s| {
                        s.spec.networks.contains(network_id) && s.spec.name.eq_ignore_ascii_case(a)
                    })
                }) {
                    return CommandResult::Refused(Refusal::already_exists(format!(
                        "alias {alias} is the name of a service on network {}: choose another alias",
                        net.spec.name
                    )));
                }
                if *standalone && !net.spec.attachable {
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "network {} is not manually attachable: create it with --attachable to use it with `mesh run`",
                        net.spec.name
                    )));
                }
                if !self.nodes.contains_key(node_id) {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "node {node_id} not found"
                    )));
                }
                if self
                    .endpoints
                    .values()
                    .any(|e| e.network_id == *network_id && e.sandbox_id == *sandbox_id)
                {
                    return CommandResult::Refused(Refusal::already_exists(format!(
                        "{sandbox} is already connected to network {}",
                        net.spec.name
                    )));
                }
                match self.allocate_address(net) {
                    Ok(ip) => {
                        let ep = Endpoint {
                            id: id.clone(),
                            network_id: network_id.clone(),
                            node_id: node_id.clone(),
                            sandbox: sandbox.clone(),
                            sandbox_id: sandbox_id.clone(),
                            ip,
                            mac: Mac::for_ip(ip),
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
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "endpoint {id} not found"
                    )));
                }
                CommandResult::Ok
            }
            Command::RemoveNetwork { id } => {
                let Some(net) = self.networks.get(id) else {
                    return CommandResult::Refused(Refusal::not_found(format!(
                        "network {id} not found"
                    )));
                };
                if net.spec.ingress
                    && let Some((svc, port)) = self.services.values().find_map(|s| {
                        s.endpoint_ports
                            .iter()
                            .find(|p| p.mode == PublishMode::Ingress)
                            .map(|p| (s.spec.name.as_str(), p.label()))
                    })
                {
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "network {} is in use by service {svc} (published port {port}); remove its published ports first",
                        net.spec.name
                    )));
                }
                let services: Vec<&str> = self
                    .services
                    .values()
                    .filter(|s| s.spec.networks.contains(id))
                    .map(|s| s.spec.name.as_str())
                    .collect();
                if !services.is_empty() {
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "network {} is in use by service {}; remove the service or `mesh service update --network-rm` first",
                        net.spec.name,
                        services.join(", ")
                    )));
                }
                let users = self.network_users(id);
                if !users.is_empty() {
                    return CommandResult::Refused(Refusal::precondition(format!(
                        "network {} is in use by {}; remove those first",
                        net.spec.name,
                        users.join(", ")
                    )));
                }
                self.networks.remove(id);
                // The nodes' ingress sandboxes go with their network.
                self.endpoints.retain(|_, e| e.network_id != *id);
                CommandResult::Ok
            }
            _ => CommandResult::Refused(Refusal::invalid("not a network command")),
        }
    }

    /// Why node `node_id` may not attach `sandbox_id`, if it belongs to
    /// someone else: another node's endpoint, or a service task (tasks are
    /// attached by the orchestrator, never by a node).
    pub(crate) fn foreign_sandbox(
        &self,
        node_id: &str,
        sandbox_id: &str,
        standalone: bool,
    ) -> Option<String> {
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
    pub fn find_network(&self, r: &str) -> Result<&Network, Refusal> {
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
            [] => Err(Refusal::not_found(format!(
                "network {r} not found; see `mesh network ls`"
            ))),
            _ => Err(Refusal::precondition(format!(
                "network reference {r:?} is ambiguous: it matches several networks; use more of the ID"
            ))),
        }
    }

    /// Who uses a network, for refusals that name them. The nodes'
    /// ingress sandboxes belong to the network itself and do not count.
    pub fn network_users(&self, id: &str) -> Vec<String> {
        self.user_endpoints(id)
            .map(|e| {
                let host = self
                    .nodes
                    .get(&e.node_id)
                    .map_or(e.node_id.as_str(), |n| n.hostname.as_str());
                format!("{} on {host}", e.sandbox)
            })
            .collect()
    }

    /// The endpoints that make a network in use: all but the nodes'
    /// ingress sandboxes, which belong to the network itself.
    pub(crate) fn user_endpoints<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Endpoint> {
        self.endpoints
            .values()
            .filter(move |e| e.network_id == id && !is_ingress_sbox(e))
    }

    /// Next free address of a network (within --ip-range if given).
    pub(crate) fn allocate_address(&self, net: &Network) -> Result<Ipv4Addr, Refusal> {
        self.allocate_address_except(net, &BTreeSet::new())
    }

    /// Next free address, also avoiding `extra` and every service VIP.
    pub(crate) fn allocate_address_except(
        &self,
        net: &Network,
        extra: &BTreeSet<Ipv4Addr>,
    ) -> Result<Ipv4Addr, Refusal> {
        let range = match &net.spec.ip_range {
            Some(r) => Some(ipam::parse_ip_range(r, &net.subnet)?),
            None => None,
        };
        let mut used: BTreeSet<Ipv4Addr> = self
            .endpoints
            .values()
            .filter(|e| e.network_id == net.id)
            .map(|e| e.ip)
            .collect();
        used.extend(extra);
        used.extend(
            self.services
                .values()
                .filter_map(|s| s.vips.get(&net.id).copied()),
        );
        ipam::next_host(&net.subnet, range.as_ref(), net.gateway, &used)
            .map_err(|e| no_free_address(net, e))
    }

    /// Checks a spec and allocates its subnet and VNI. Everything is
    /// decided from the replicated state, so allocations never collide.
    pub(crate) fn create_network(
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
                CommandResult::Refused(Refusal::already_exists(format!("network ID {id} is taken")))
            };
        }
        match self.allocate_network(spec) {
            Ok((subnet, gateway, vni)) => {
                let net = Network {
                    id: id.to_string(),
                    spec: spec.clone(),
                    subnet,
                    gateway,
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

    fn allocate_network(&self, spec: &NetworkSpec) -> Result<(Ipv4Net, Ipv4Addr, u32), Refusal> {
        if self.networks.values().any(|n| n.spec.name == spec.name) {
            return Err(Refusal::already_exists(format!(
                "network with name {} already exists",
                spec.name
            )));
        }
        if spec.ingress
            && let Some(other) = self.networks.values().find(|n| n.spec.ingress)
        {
            return Err(Refusal::already_exists(format!(
                "an ingress network already exists ({}); a cluster has one, remove it first",
                other.spec.name
            )));
        }
        let used: Vec<(&str, Ipv4Net)> = self
            .networks
            .values()
            .map(|n| (n.spec.name.as_str(), n.subnet))
            .collect();
        let avoid_routes = !spec.options.contains_key(NO_OVERLAP_CHECK);
        let subnet = match &spec.subnet {
            Some(s) => {
                let subnet = ipam::parse_subnet(s)?;
                ipam::check_overlap(&subnet, used.iter().map(|(n, s)| (*n, s)))?;
                if avoid_routes && let Some(why) = self.route_overlap(&subnet) {
                    return Err(why);
                }
                subnet
            }
            None => {
                let cluster = self
                    .cluster
                    .as_ref()
                    .ok_or_else(|| Refusal::precondition("the cluster is not initialized"))?;
                let pools = cluster
                    .address_pools
                    .iter()
                    .map(|p| ipam::parse_pool(p))
                    .collect::<Result<Vec<_>, _>>()?;
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
                let mut taken: Vec<Ipv4Net> = used.iter().map(|(_, s)| *s).collect();
                if avoid_routes {
                    taken.extend(self.ready_routes().map(|(_, r)| r.destination));
                }
                ipam::carve(&pools, mask, &taken)?
            }
        };
        let gateway = match &spec.gateway {
            Some(g) => ipam::parse_gateway(g, &subnet)?,
            None => ipam::default_gateway(&subnet),
        };
        if let Some(r) = &spec.ip_range {
            ipam::parse_ip_range(r, &subnet)?;
        }
        let vnis: BTreeSet<u32> = self.networks.values().map(|n| n.vni).collect();
        let vni = ipam::next_vni(&vnis)?;
        Ok((subnet, gateway, vni))
    }
}

/// An exhausted network, named as the user knows it (this line is what a
/// blocked task shows in `service ps` and what `create` exits with).
pub(crate) fn no_free_address(net: &Network, e: ipam::IpamError) -> Refusal {
    match e {
        ipam::IpamError::HostsExhausted(range) => Refusal::precondition(format!(
            "network {} has no free address ({range})",
            net.spec.name
        )),
        other => other.into(),
    }
}

impl ClusterState {
    /// Every route of every Ready node, with its node: what a cluster
    /// subnet must not overlap. A Down node's routes do not count (it may
    /// never come back, and its report may be old).
    fn ready_routes(&self) -> impl Iterator<Item = (&Node, &NodeRoute)> {
        self.nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .flat_map(|n| n.routes.iter().map(move |r| (n, r)))
    }

    /// Why `subnet` cannot be an overlay's, if it overlaps a Ready node's
    /// own route: that node's sandboxes on the overlay would lose what the
    /// route reaches (the underlay itself, often). Names the first such
    /// node and route.
    fn route_overlap(&self, subnet: &Ipv4Net) -> Option<Refusal> {
        let (node, route) = self
            .ready_routes()
            .find(|(_, r)| ipam::overlaps(subnet, &r.destination))?;
        let id: String = node.id.chars().take(12).collect();
        Some(Refusal::precondition(format!(
            "subnet {subnet} overlaps route {} dev {} on node {} ({id}); pick another subnet, or pass --opt {NO_OVERLAP_CHECK}",
            route.destination, route.device, node.hostname
        )))
    }
}

/// The sandbox name of every node's endpoint on the ingress network.
pub const INGRESS_SBOX: &str = "ingress-sbox";

/// The sandbox ID of `node_id`'s ingress sandbox: derived, so every
/// manager and the node itself name it alike.
pub fn ingress_sbox_id(node_id: &str) -> String {
    format!("ingress-{node_id}")
}

/// The endpoint ID of `node_id`'s ingress sandbox on network `net_id`.
fn ingress_sbox_endpoint_id(node_id: &str, net_id: &str) -> String {
    mesh_common::id::derived_id(&[INGRESS_SBOX, node_id, net_id])
}

/// Whether an endpoint is a node's ingress sandbox (made by the managers,
/// not a user of its network).
pub fn is_ingress_sbox(e: &Endpoint) -> bool {
    e.sandbox == INGRESS_SBOX && e.sandbox_id == ingress_sbox_id(&e.node_id)
}

impl ClusterState {
    /// Whether [`Self::sync_ingress_sboxes`] may find anything to do after
    /// `cmd`: the commands that change the nodes or the ingress network, or
    /// free an address of it (a node left without one for a full subnet
    /// then gets one). Any other command (task reports, heartbeats' node
    /// states, the hot path) skips it, unless the first node has no
    /// ingress sandbox yet: a state written before ingress sandboxes
    /// existed gets them on its next command, whatever it is. That check
    /// is one lookup, the endpoint ID being derived.
    pub(crate) fn ingress_sync_due(&self, cmd: &Command) -> bool {
        match cmd {
            Command::Init { .. }
            | Command::AddNode { .. }
            | Command::RemoveNode { .. }
            | Command::CreateNetwork { .. }
            | Command::RemoveNetwork { .. }
            | Command::RemoveEndpoint { .. }
            | Command::RemoveService { .. } => true,
            _ => self.ingress_network().is_some_and(|net| {
                self.nodes.keys().next().is_some_and(|node_id| {
                    !self
                        .endpoints
                        .contains_key(&ingress_sbox_endpoint_id(node_id, &net.id))
                })
            }),
        }
    }

    /// One ingress-sandbox endpoint per node while an ingress network
    /// exists, none otherwise: made for new nodes and a new ingress
    /// network, dropped with their node. A full subnet leaves the node
    /// without one (its view then has no ingress) rather than refusing
    /// the node.
    pub(crate) fn sync_ingress_sboxes(&mut self, at: &str) {
        let Some(net) = self.ingress_network().cloned() else {
            self.endpoints.retain(|_, e| !is_ingress_sbox(e));
            return;
        };
        let nodes = &self.nodes;
        self.endpoints
            .retain(|_, e| !is_ingress_sbox(e) || nodes.contains_key(&e.node_id));
        let have: BTreeSet<&str> = self
            .endpoints
            .values()
            .filter(|e| e.network_id == net.id && is_ingress_sbox(e))
            .map(|e| e.node_id.as_str())
            .collect();
        let missing: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !have.contains(n.as_str()))
            .cloned()
            .collect();
        for node_id in missing {
            let sandbox_id = ingress_sbox_id(&node_id);
            let Ok(ip) = self.allocate_address(&net) else {
                continue;
            };
            let ep = Endpoint {
                id: ingress_sbox_endpoint_id(&node_id, &net.id),
                network_id: net.id.clone(),
                node_id,
                sandbox: INGRESS_SBOX.into(),
                sandbox_id,
                ip,
                mac: Mac::for_ip(ip),
                aliases: Vec::new(),
                created_at: at.to_string(),
            };
            self.endpoints.insert(ep.id.clone(), ep);
        }
    }
}

/// Docker's refusal for a network nobody has, as `docker network inspect`
/// words it (the tail keeps the "not found" older scripts look for).
pub fn no_such_network(r: &str) -> Refusal {
    Refusal::not_found(format!(
        "No such network: {r} (not found; see `mesh network ls`)"
    ))
}

pub const INGRESS_SUBNET: &str = "10.0.0.0/24";
pub const DEFAULT_POOL: &str = "10.0.0.0/8";
pub const DEFAULT_MASK_LEN: u8 = 24;
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;

fn default_pool() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap_or_default()
}

#[cfg(test)]
mod ingress_sbox_tests {
    use mesh_common::model::{NodeRole, NodeState};

    use super::super::{ClusterInfo, Node};
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            role: NodeRole::Worker,
            ..Default::default()
        }
    }

    fn sboxes(s: &ClusterState) -> BTreeSet<String> {
        s.endpoints
            .values()
            .filter(|e| is_ingress_sbox(e))
            .map(|e| e.node_id.clone())
            .collect()
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(
            1,
            &Command::Init {
                cluster: ClusterInfo {
                    id: "c".into(),
                    ..Default::default()
                },
                node: node("a"),
                ingress: Some("ing".into()),
            },
        );
        s.apply(2, &Command::AddNode { node: node("b") });
        s
    }

    #[test]
    fn hot_commands_skip_the_sync_and_node_changes_run_it() {
        let mut s = cluster();
        assert_eq!(sboxes(&s), ["a", "b"].map(String::from).into());
        // Node b loses its sandbox behind the state machine's back: only a
        // command that can change the outcome (or the first node missing
        // one) brings it back.
        s.endpoints
            .retain(|_, e| !(is_ingress_sbox(e) && e.node_id == "b"));
        let hot = [
            Command::SetNodeState {
                id: "b".into(),
                state: NodeState::Ready,
                addr: None,
                at: "t".into(),
            },
            Command::SetNodeErrors {
                id: "b".into(),
                errors: vec!["x".into()],
            },
            Command::ReportTasks {
                node_id: "b".into(),
                reports: Vec::new(),
                at: "t".into(),
            },
        ];
        for (i, cmd) in (3..).zip(&hot) {
            assert!(!s.ingress_sync_due(cmd), "{cmd:?}");
            s.apply(i, cmd);
            assert_eq!(sboxes(&s), ["a".to_string()].into(), "{cmd:?}");
        }
        s.apply(9, &Command::AddNode { node: node("c") });
        assert_eq!(sboxes(&s), ["a", "b", "c"].map(String::from).into());
        s.apply(10, &Command::RemoveNode { id: "c".into() });
        assert_eq!(sboxes(&s), ["a", "b"].map(String::from).into());
    }

    #[test]
    fn a_state_from_before_ingress_sandboxes_gets_them_on_any_command() {
        let mut s = cluster();
        // As an older version wrote it: an ingress network, no sandboxes.
        s.endpoints.retain(|_, e| !is_ingress_sbox(e));
        let report = Command::ReportTasks {
            node_id: "b".into(),
            reports: Vec::new(),
            at: "t".into(),
        };
        assert!(s.ingress_sync_due(&report));
        s.apply(3, &report);
        assert_eq!(sboxes(&s), ["a", "b"].map(String::from).into());
        assert!(!s.ingress_sync_due(&report), "nothing left to do");
    }
}

#[cfg(test)]
mod route_overlap_tests {
    use std::collections::BTreeMap;

    use mesh_common::model::{NodeRole, NodeState};
    use mesh_common::refusal::RefusalKind;

    use super::super::{ClusterInfo, MAX_NODE_ROUTES, RouteReport};
    use super::*;

    fn node(id: &str, hostname: &str, state: NodeState) -> Node {
        Node {
            id: id.into(),
            hostname: hostname.into(),
            role: NodeRole::Worker,
            state,
            ..Default::default()
        }
    }

    fn routes(id: &str, list: &[(&str, &str)]) -> Command {
        Command::SetNodeRoutes {
            id: id.into(),
            routes: list
                .iter()
                .map(|(d, dev)| RouteReport {
                    destination: d.to_string(),
                    device: dev.to_string(),
                })
                .collect(),
        }
    }

    /// Node `aaaa…` Ready with the underlay route, node `bbbb…` Down with
    /// a route of its own; no ingress network.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let a = "a".repeat(24);
        let b = "b".repeat(24);
        s.apply(
            1,
            &Command::Init {
                cluster: ClusterInfo {
                    id: "c".into(),
                    ..Default::default()
                },
                node: node(&a, "node1", NodeState::Ready),
                ingress: None,
            },
        );
        s.apply(
            2,
            &Command::AddNode {
                node: node(&b, "node2", NodeState::Down),
            },
        );
        let r = s.apply(3, &routes(&a, &[("192.168.1.0/24", "eth0")]));
        assert!(matches!(r, CommandResult::Node(_)), "{r:?}");
        let r = s.apply(4, &routes(&b, &[("10.88.0.0/16", "eth0")]));
        assert!(matches!(r, CommandResult::Node(_)), "{r:?}");
        s
    }

    fn create(
        s: &mut ClusterState,
        name: &str,
        subnet: Option<&str>,
        opts: &[&str],
    ) -> CommandResult {
        let spec = NetworkSpec {
            name: name.into(),
            subnet: subnet.map(String::from),
            options: opts
                .iter()
                .map(|o| (o.to_string(), String::new()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        let id = format!("net-{name}");
        s.apply(
            10,
            &Command::CreateNetwork {
                id,
                spec,
                at: "t".into(),
            },
        )
    }

    #[test]
    fn a_subnet_overlapping_a_ready_nodes_route_is_refused_by_name() {
        let mut s = cluster();
        for (i, subnet) in ["192.168.1.0/24", "192.168.1.128/25", "192.168.0.0/16"]
            .into_iter()
            .enumerate()
        {
            let CommandResult::Refused(why) = create(&mut s, &format!("n{i}"), Some(subnet), &[])
            else {
                panic!("{subnet} was accepted");
            };
            assert_eq!(why.kind, RefusalKind::FailedPrecondition);
            assert_eq!(
                why.message,
                format!(
                    "subnet {subnet} overlaps route 192.168.1.0/24 dev eth0 on node node1 (aaaaaaaaaaaa); pick another subnet, or pass --opt no-overlap-check"
                )
            );
        }
        assert!(s.networks.is_empty(), "nothing made");
        // Beside it, the escape hatch, and a Down node's route.
        for (name, subnet, opts) in [
            ("beside", "192.168.2.0/24", &[][..]),
            ("forced", "192.168.1.0/24", &[NO_OVERLAP_CHECK][..]),
            ("downs", "10.88.1.0/24", &[][..]),
        ] {
            let r = create(&mut s, name, Some(subnet), opts);
            assert!(matches!(r, CommandResult::Network(_)), "{name}: {r:?}");
        }
    }

    #[test]
    fn carved_subnets_skip_ready_nodes_routes() {
        let mut s = cluster();
        let a = "a".repeat(24);
        s.apply(
            5,
            &routes(&a, &[("10.0.0.0/23", "eth1"), ("192.168.1.0/24", "eth0")]),
        );
        let CommandResult::Network(n) = create(&mut s, "auto", None, &[]) else {
            panic!("not carved");
        };
        assert_eq!(n.subnet.to_string(), "10.0.2.0/24");
        // With the check off, the pool's first block is taken as before.
        let CommandResult::Network(n) = create(&mut s, "forced", None, &[NO_OVERLAP_CHECK]) else {
            panic!("not carved");
        };
        assert_eq!(n.subnet.to_string(), "10.0.0.0/24");
    }

    #[test]
    fn a_route_report_is_checked_bounded_and_kept_sorted() {
        let mut s = cluster();
        let a = "a".repeat(24);
        let bad = [
            ("10.1.0.0", "eth0"),
            ("10.1.0.1/24", "eth0"),
            ("fd00::/8", "eth0"),
            ("10.1.0.0/24", ""),
            ("10.1.0.0/24", "a-very-long-device"),
            ("10.1.0.0/24", "eth 0"),
        ];
        for (d, dev) in bad {
            let r = s.apply(6, &routes(&a, &[(d, dev)]));
            assert!(
                matches!(&r, CommandResult::Refused(w) if w.kind == RefusalKind::InvalidArgument),
                "{d} dev {dev:?}: {r:?}"
            );
        }
        let many: Vec<(String, &str)> = (0..=MAX_NODE_ROUTES)
            .map(|i| (format!("10.{i}.0.0/16"), "eth0"))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(d, e)| (d.as_str(), *e)).collect();
        assert!(matches!(
            s.apply(7, &routes(&a, &many)),
            CommandResult::Refused(_)
        ));
        assert!(matches!(
            s.apply(8, &routes("nobody", &[("10.1.0.0/24", "eth0")])),
            CommandResult::Refused(_)
        ));
        // Nothing refused changed the record; a good report replaces it,
        // sorted and without duplicates.
        assert_eq!(s.nodes[&a].routes.len(), 1);
        s.apply(
            9,
            &routes(
                &a,
                &[
                    ("192.168.1.0/24", "eth0"),
                    ("10.5.0.0/16", "wg0"),
                    ("10.5.0.0/16", "wg0"),
                ],
            ),
        );
        let kept: Vec<String> = s.nodes[&a]
            .routes
            .iter()
            .map(|r| format!("{} dev {}", r.destination, r.device))
            .collect();
        assert_eq!(kept, ["10.5.0.0/16 dev wg0", "192.168.1.0/24 dev eth0"]);
    }
}
