//! What each node must have in its kernel, derived from the cluster state.
//! A node sees only the networks it has sandboxes on, and for each, every
//! endpoint on other nodes (its FDB and neighbour entries): this is what
//! keeps the push small as clusters grow.

use std::collections::{BTreeSet, HashMap};

use mesh_common::model::PublishMode;
use mesh_proto::view_update::Update;
use mesh_proto::{
    EncryptionView, EndpointInfo, IngressNode, IngressPort, IngressView, NetworkAssignment,
    NodeView, PeerEntry, ServiceEntry, TaskAssignment, ViewUpdate, WireguardPeer,
};

use crate::pb::service::port_to_pb;
use crate::state::{
    ClusterState, DEFAULT_DATA_PATH_PORT, Endpoint, Network, NetworkSpec, Task, ingress_sbox_id,
    is_ingress_sbox,
};

/// UDP port WireGuard listens on, on every node's underlay address.
pub const WIREGUARD_PORT: u32 = 51820;

/// Whether a network's traffic between nodes goes through WireGuard.
pub fn is_encrypted(spec: &NetworkSpec) -> bool {
    spec.options.contains_key("encrypted")
}

/// Option names that set a network's MTU: ours and Docker's.
pub const MTU_OPTIONS: [&str; 2] = ["mtu", "com.docker.network.driver.mtu"];

/// A network's MTU as its options give it (0: the node's default).
pub fn network_mtu(spec: &NetworkSpec) -> u32 {
    MTU_OPTIONS
        .iter()
        .find_map(|k| spec.options.get(*k))
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

pub fn endpoint_info(s: &ClusterState, e: &Endpoint) -> EndpointInfo {
    let net = s.networks.get(&e.network_id);
    EndpointInfo {
        id: e.id.clone(),
        network_id: e.network_id.clone(),
        network_name: net.map(|n| n.spec.name.clone()).unwrap_or_default(),
        node_id: e.node_id.clone(),
        sandbox: e.sandbox.clone(),
        sandbox_id: e.sandbox_id.clone(),
        ip: e.ip.to_string(),
        prefix: net.map_or(24, |n| u32::from(n.subnet.prefix_len())),
        mac: e.mac.to_string(),
        gateway: net.map(|n| n.gateway.to_string()).unwrap_or_default(),
        aliases: e.aliases.clone(),
        vni: net.map(|n| n.vni).unwrap_or_default(),
        mtu: net.map_or(0, |n| network_mtu(&n.spec)),
        internal: net.is_some_and(|n| n.spec.internal),
        data_path_port: data_path_port(s),
        encrypted: net.is_some_and(|n| n.spec.options.contains_key("encrypted")),
    }
}

/// Who is where in one state, gathered in one scan of its endpoints and
/// tasks, so a view costs what it holds rather than tasks × endpoints
/// (every lookup below was a scan of the whole state). Built per read, so
/// it never outlives the state it was made from nor goes into a snapshot.
pub struct Views<'a> {
    s: &'a ClusterState,
    /// Endpoints per network, in endpoint id order (as the state keeps them).
    on_network: HashMap<&'a str, Vec<&'a Endpoint>>,
    /// Endpoints per sandbox (task id for a task's).
    of_sandbox: HashMap<&'a str, Vec<&'a Endpoint>>,
    /// Tasks not ended, per node, in task id order.
    tasks_on: HashMap<&'a str, Vec<&'a Task>>,
    /// Networks each node has an endpoint on.
    nets_of: HashMap<&'a str, BTreeSet<&'a str>>,
    /// Addresses of running tasks on Ready nodes per (service, network),
    /// in endpoint id order: what `ClusterState::backends` gives.
    backends: HashMap<(&'a str, &'a str), Vec<String>>,
}

impl<'a> Views<'a> {
    pub fn new(s: &'a ClusterState) -> Self {
        let mut on_network: HashMap<&str, Vec<&Endpoint>> = HashMap::new();
        let mut of_sandbox: HashMap<&str, Vec<&Endpoint>> = HashMap::new();
        let mut nets_of: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut backends: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for e in s.endpoints.values() {
            on_network.entry(&e.network_id).or_default().push(e);
            of_sandbox.entry(&e.sandbox_id).or_default().push(e);
            nets_of.entry(&e.node_id).or_default().insert(&e.network_id);
            if let Some(t) = s.tasks.get(&e.sandbox_id)
                && s.is_backend(t)
            {
                backends
                    .entry((&t.service_id, &e.network_id))
                    .or_default()
                    .push(e.ip.to_string());
            }
        }
        let mut tasks_on: HashMap<&str, Vec<&Task>> = HashMap::new();
        for t in s.tasks.values().filter(|t| !t.state.is_terminal()) {
            tasks_on.entry(&t.node_id).or_default().push(t);
        }
        Views {
            s,
            on_network,
            of_sandbox,
            tasks_on,
            nets_of,
            backends,
        }
    }

    fn backends(&self, service_id: &str, network_id: &str) -> Vec<String> {
        self.backends
            .get(&(service_id, network_id))
            .cloned()
            .unwrap_or_default()
    }

    fn on_network(&self, network_id: &str) -> &[&'a Endpoint] {
        self.on_network.get(network_id).map_or(&[], Vec::as_slice)
    }

    /// The view of one node at Raft index `generation`.
    pub fn view(&self, node_id: &str, generation: u64) -> NodeView {
        let s = self.s;
        let networks = self
            .nets_of
            .get(node_id)
            .into_iter()
            .flatten()
            .filter_map(|id| s.networks.get(*id))
            .map(|n| self.assignment(n, node_id))
            .collect();
        NodeView {
            generation,
            data_path_port: data_path_port(s),
            networks,
            tasks: self.tasks_for(node_id),
            ingress: self.ingress_for(node_id),
            encryption: self.encryption_for(node_id),
        }
    }

    fn assignment(&self, net: &Network, node_id: &str) -> NetworkAssignment {
        let s = self.s;
        let mut local = Vec::new();
        let mut peers = Vec::new();
        for e in self.on_network(&net.id) {
            if e.node_id == node_id {
                local.push(endpoint_info(s, e));
            } else if let Some(n) = s.nodes.get(&e.node_id) {
                peers.push(PeerEntry {
                    ip: e.ip.to_string(),
                    mac: e.mac.to_string(),
                    node_addr: n.addr.clone(),
                    name: e.sandbox.clone(),
                    aliases: e.aliases.clone(),
                });
            }
        }
        NetworkAssignment {
            id: net.id.clone(),
            name: net.spec.name.clone(),
            vni: net.vni,
            subnet: net.subnet.to_string(),
            gateway: net.gateway.to_string(),
            mtu: network_mtu(&net.spec),
            internal: net.spec.internal,
            encrypted: is_encrypted(&net.spec),
            local,
            peers,
            services: s
                .services
                .values()
                .filter(|svc| svc.spec.networks.contains(&net.id))
                .map(|svc| ServiceEntry {
                    id: svc.id.clone(),
                    name: svc.spec.name.clone(),
                    vip: svc
                        .vips
                        .get(&net.id)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    backends: self.backends(&svc.id, &net.id),
                })
                .collect(),
        }
    }

    /// The tasks a node must run or stop: every one of its tasks that has
    /// not ended. Addresses come in the order of the service's networks,
    /// which is the order of the task's interfaces.
    fn tasks_for(&self, node_id: &str) -> Vec<TaskAssignment> {
        let s = self.s;
        self.tasks_on
            .get(node_id)
            .into_iter()
            .flatten()
            .map(|t| {
                let svc = s.services.get(&t.service_id);
                // The spec's networks, then ingress (not one of them), last.
                let order = |net: &str| {
                    svc.and_then(|v| v.spec.networks.iter().position(|n| n == net))
                        .unwrap_or(usize::MAX)
                };
                let mut eps: Vec<&Endpoint> = self
                    .of_sandbox
                    .get(t.id.as_str())
                    .map(|v| v.to_vec())
                    .unwrap_or_default();
                eps.sort_by_key(|e| order(&e.network_id));
                TaskAssignment {
                    id: t.id.clone(),
                    name: s.task_sandbox_name(t),
                    service_id: t.service_id.clone(),
                    service_name: svc.map(|v| v.spec.name.clone()).unwrap_or_default(),
                    desired_state: t.desired_state.to_string(),
                    cmd: svc.map(|v| v.spec.cmd.clone()).unwrap_or_default(),
                    env: svc.map(|v| v.spec.env.clone()).unwrap_or_default(),
                    networks: eps.into_iter().map(|e| endpoint_info(s, e)).collect(),
                    start_delay_ms: t.start_delay_ms,
                    known_state: t.state.to_string(),
                    ports: svc
                        .map(|v| v.endpoint_ports.iter().map(port_to_pb).collect())
                        .unwrap_or_default(),
                    health: svc.and_then(|v| v.spec.health.as_ref()).map(|h| h.to_pb()),
                }
            })
            .collect()
    }

    /// The routing mesh as `node_id` builds it: only once the node has its
    /// ingress sandbox (its address on the ingress network).
    fn ingress_for(&self, node_id: &str) -> Option<IngressView> {
        let s = self.s;
        let net = s.ingress_network()?;
        let sbox_id = ingress_sbox_id(node_id);
        let on_ingress = self.on_network(&net.id);
        let mine = on_ingress.iter().find(|e| e.sandbox_id == sbox_id)?;
        let nodes = on_ingress
            .iter()
            .filter(|e| is_ingress_sbox(e))
            .map(|e| IngressNode {
                node_id: e.node_id.clone(),
                ip: e.ip.to_string(),
                mac: e.mac.to_string(),
            })
            .collect();
        let mut ports = Vec::new();
        for svc in s.services.values() {
            let ingress: Vec<_> = svc
                .endpoint_ports
                .iter()
                .filter(|p| p.mode == PublishMode::Ingress)
                .collect();
            if ingress.is_empty() {
                continue;
            }
            let backends = self.backends(&svc.id, &net.id);
            for p in ingress {
                ports.push(IngressPort {
                    service_id: svc.id.clone(),
                    service_name: svc.spec.name.clone(),
                    protocol: p.protocol.to_string(),
                    published_port: p.published.map_or(0, u32::from),
                    target_port: p.target.into(),
                    backends: backends.clone(),
                });
            }
        }
        Some(IngressView {
            network_id: net.id.clone(),
            endpoint: Some(endpoint_info(s, mine)),
            nodes,
            ports,
        })
    }

    /// The WireGuard peers of `node_id`: every other node with an endpoint
    /// on an encrypted network this node has an endpoint on (the ingress
    /// network too, if it is encrypted), once that node has a recorded key.
    /// `None` while this node needs no encrypted network. Sorted by node ID,
    /// so the view's digest does not depend on map order.
    fn encryption_for(&self, node_id: &str) -> Option<EncryptionView> {
        let s = self.s;
        let mine: Vec<&str> = self
            .nets_of
            .get(node_id)
            .into_iter()
            .flatten()
            .copied()
            .filter(|id| s.networks.get(*id).is_some_and(|n| is_encrypted(&n.spec)))
            .collect();
        if mine.is_empty() {
            return None;
        }
        let peer_ids: BTreeSet<&str> = mine
            .iter()
            .flat_map(|net| self.on_network(net))
            .filter(|e| e.node_id != node_id)
            .map(|e| e.node_id.as_str())
            .collect();
        let peers = peer_ids
            .into_iter()
            .filter_map(|id| s.nodes.get(id))
            .filter(|n| !n.encryption_public_key.is_empty())
            .map(|n| WireguardPeer {
                node_id: n.id.clone(),
                public_key: n.encryption_public_key.clone(),
                addr: n.addr.clone(),
            })
            .collect();
        Some(EncryptionView {
            listen_port: WIREGUARD_PORT,
            peers,
        })
    }
}

/// The view of one node at Raft index `generation`. For several nodes of
/// one state, build [`Views`] once.
pub fn view_for(s: &ClusterState, node_id: &str, generation: u64) -> NodeView {
    Views::new(s).view(node_id, generation)
}

/// The Assignments stream's next message after `last` (what this stream
/// sent so far): the whole view first, then a delta on `last`; `None` when
/// the view asks nothing new of the kernel.
pub fn update_for(last: Option<&NodeView>, view: &NodeView) -> Option<ViewUpdate> {
    update_with(last, view, mesh_proto::view_digest(view))
}

/// [`update_for`] with the view's digest already known.
pub fn update_with(last: Option<&NodeView>, view: &NodeView, digest: u64) -> Option<ViewUpdate> {
    let update = match last {
        None => Update::Full(view.clone()),
        Some(l) => match mesh_proto::view_delta(l, view) {
            Some(d) if mesh_proto::delta_is_empty(&d) => return None,
            Some(d) => Update::Delta(d),
            None if same_content(l, view) => return None,
            None => Update::Full(view.clone()),
        },
    };
    Some(ViewUpdate {
        generation: view.generation,
        base_generation: last.map_or(0, |l| l.generation),
        digest,
        update: Some(update),
    })
}

fn data_path_port(s: &ClusterState) -> u32 {
    s.cluster
        .as_ref()
        .map(|c| c.data_path_port)
        .filter(|p| *p != 0)
        .unwrap_or(DEFAULT_DATA_PATH_PORT)
        .into()
}

/// Two views ask the same of the kernel (generations aside).
pub fn same_content(a: &NodeView, b: &NodeView) -> bool {
    a.data_path_port == b.data_path_port
        && a.networks == b.networks
        && a.tasks == b.tasks
        && a.ingress == b.ingress
        && a.encryption == b.encryption
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClusterInfo, Command, NetworkSpec, Node};

    fn node(id: &str, addr: &str) -> Node {
        Node {
            id: id.into(),
            addr: addr.into(),
            role: mesh_common::model::NodeRole::Worker,
            ..Default::default()
        }
    }

    fn attach(s: &mut ClusterState, i: u64, id: &str, net: &str, node: &str) {
        let cmd = Command::CreateEndpoint {
            id: id.into(),
            network_id: net.into(),
            node_id: node.into(),
            sandbox: format!("sb-{id}"),
            sandbox_id: id.into(),
            aliases: vec![],
            standalone: true,
            at: "t".into(),
        };
        s.apply(i, &cmd);
    }

    #[test]
    fn nodes_see_only_their_networks_and_remote_peers() {
        let mut s = ClusterState::default();
        let cluster = ClusterInfo {
            id: "c".into(),
            data_path_port: 7777,
            ..Default::default()
        };
        s.apply(
            1,
            &Command::Init {
                cluster,
                node: node("a", "192.168.1.1"),
                ingress: None,
            },
        );
        s.apply(
            2,
            &Command::AddNode {
                node: node("b", "192.168.1.2"),
            },
        );
        s.apply(
            3,
            &Command::AddNode {
                node: node("c", "192.168.1.3"),
            },
        );
        for (i, name) in ["red", "blue"].iter().enumerate() {
            let spec = NetworkSpec {
                name: name.to_string(),
                driver: mesh_common::model::DriverKind::Overlay,
                attachable: true,
                ..Default::default()
            };
            s.apply(
                4 + i as u64,
                &Command::CreateNetwork {
                    id: name.to_string(),
                    spec,
                    at: "t".into(),
                },
            );
        }
        attach(&mut s, 10, "a1", "red", "a");
        attach(&mut s, 11, "b1", "red", "b");
        attach(&mut s, 12, "c1", "blue", "c");
        let va = view_for(&s, "a", 12);
        assert_eq!(va.data_path_port, 7777);
        assert_eq!(va.networks.len(), 1, "a needs only red");
        let red = &va.networks[0];
        assert_eq!((red.local.len(), red.peers.len()), (1, 1));
        assert_eq!(red.peers[0].node_addr, "192.168.1.2");
        assert_eq!(red.local[0].prefix, 24);
        let vc = view_for(&s, "c", 12);
        assert_eq!(vc.networks.len(), 1);
        assert!(vc.networks[0].peers.is_empty(), "nobody else is on blue");
        assert!(view_for(&s, "nobody", 12).networks.is_empty());
        assert!(same_content(&va, &view_for(&s, "a", 99)));
        attach(&mut s, 13, "b2", "red", "b");
        assert!(
            !same_content(&va, &view_for(&s, "a", 13)),
            "a new peer changes a's view"
        );
    }

    fn key(i: u8) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([i; 32])
    }

    fn peer_ids(s: &ClusterState, id: &str) -> Option<Vec<(String, String, String)>> {
        view_for(s, id, 0).encryption.map(|e| {
            assert_eq!(e.listen_port, WIREGUARD_PORT);
            e.peers
                .into_iter()
                .map(|p| (p.node_id, p.addr, p.public_key))
                .collect()
        })
    }

    #[test]
    fn wireguard_peers_are_the_nodes_sharing_an_encrypted_network() {
        let mut s = ClusterState::default();
        s.apply(
            1,
            &Command::Init {
                cluster: ClusterInfo::default(),
                node: node("a", "192.168.1.1"),
                ingress: None,
            },
        );
        for (i, id) in ["b", "c", "d", "e"].iter().enumerate() {
            let n = node(id, &format!("192.168.1.{}", i + 2));
            s.apply(2 + i as u64, &Command::AddNode { node: n });
        }
        // Every node but e has a key.
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let cmd = Command::SetNodeEncryptionKey {
                id: id.to_string(),
                public_key: key(i as u8 + 1),
            };
            assert!(matches!(
                s.apply(10 + i as u64, &cmd),
                crate::state::CommandResult::Node(_)
            ));
        }
        for (i, (name, encrypted)) in [("sec1", true), ("sec2", true), ("plain", false)]
            .iter()
            .enumerate()
        {
            let mut spec = NetworkSpec {
                name: name.to_string(),
                attachable: true,
                ..Default::default()
            };
            if *encrypted {
                spec.options.insert("encrypted".into(), String::new());
            }
            s.apply(
                20 + i as u64,
                &Command::CreateNetwork {
                    id: name.to_string(),
                    spec,
                    at: "t".into(),
                },
            );
        }
        attach(&mut s, 30, "a1", "sec1", "a");
        attach(&mut s, 31, "a2", "sec2", "a");
        attach(&mut s, 32, "a3", "plain", "a");
        attach(&mut s, 33, "b1", "sec1", "b");
        attach(&mut s, 34, "b2", "sec1", "b");
        attach(&mut s, 35, "c1", "sec2", "c");
        attach(&mut s, 36, "d1", "plain", "d");
        attach(&mut s, 37, "e1", "sec1", "e");
        let peer = |id: &str, n: u8| (id.to_string(), format!("192.168.1.{n}"), key(n));
        assert_eq!(
            peer_ids(&s, "a"),
            Some(vec![peer("b", 2), peer("c", 3)]),
            "both encrypted networks, sorted, once per node, no d (plain) nor e (no key)"
        );
        assert_eq!(peer_ids(&s, "b"), Some(vec![peer("a", 1)]));
        assert_eq!(peer_ids(&s, "c"), Some(vec![peer("a", 1)]));
        assert_eq!(peer_ids(&s, "d"), None, "d needs no encrypted network");
        assert_eq!(
            peer_ids(&s, "e"),
            Some(vec![peer("a", 1), peer("b", 2)]),
            "e has no key yet but still needs its device"
        );
        let before = view_for(&s, "a", 0);
        s.apply(
            40,
            &Command::SetNodeEncryptionKey {
                id: "b".into(),
                public_key: key(9),
            },
        );
        assert!(
            !same_content(&before, &view_for(&s, "a", 0)),
            "a rotated peer key changes the view"
        );
        s.apply(41, &Command::RemoveNode { id: "c".into() });
        assert_eq!(
            peer_ids(&s, "a"),
            Some(vec![("b".into(), "192.168.1.2".into(), key(9))]),
            "a removed node disappears"
        );
        s.apply(42, &Command::RemoveEndpoint { id: "a2".into() });
        s.apply(43, &Command::RemoveEndpoint { id: "a1".into() });
        assert_eq!(peer_ids(&s, "a"), None, "no encrypted network left on a");
    }

    #[test]
    fn ingress_view_tasks_ports_and_order() {
        use crate::services::{PortSpec, ServiceSpec};
        use mesh_common::model::{Protocol, PublishMode, TaskState};
        let mut s = ClusterState::default();
        let cluster = ClusterInfo {
            id: "c".into(),
            ..Default::default()
        };
        s.apply(
            1,
            &Command::Init {
                cluster,
                node: node("a", "192.168.1.1"),
                ingress: Some("ing".into()),
            },
        );
        for (i, id) in ["b", "c"].iter().enumerate() {
            let mut n = node(id, &format!("192.168.1.{}", i + 2));
            n.state = mesh_common::model::NodeState::Ready;
            n.availability = mesh_common::model::Availability::Active;
            s.apply(2 + i as u64, &Command::AddNode { node: n });
        }
        let spec = NetworkSpec {
            name: "app".into(),
            driver: mesh_common::model::DriverKind::Overlay,
            options: [("com.docker.network.driver.mtu".into(), "1200".into())].into(),
            ..Default::default()
        };
        s.apply(
            4,
            &Command::CreateNetwork {
                id: "app".into(),
                spec,
                at: "t".into(),
            },
        );
        let ports = vec![
            PortSpec {
                protocol: Protocol::Tcp,
                target: 80,
                published: Some(8080),
                mode: PublishMode::Ingress,
            },
            PortSpec {
                protocol: Protocol::Udp,
                target: 53,
                published: Some(5353),
                mode: PublishMode::Host,
            },
        ];
        let spec = ServiceSpec {
            name: "web".into(),
            replicas: 1,
            networks: vec!["app".into()],
            cmd: vec!["sleep".into()],
            ports,
            ..Default::default()
        };
        s.apply(
            5,
            &Command::CreateService {
                id: "web".into(),
                spec,
                at: "t".into(),
            },
        );
        let task = s.tasks.values().next().expect("a task").clone();
        assert_eq!(task.node_id, "b", "a is not Ready in this state");
        let vb = view_for(&s, "b", 5);
        let ta = &vb.tasks[0];
        let nets: Vec<&str> = ta.networks.iter().map(|e| e.network_id.as_str()).collect();
        assert_eq!(nets, ["app", "ing"], "ingress last");
        assert_eq!(ta.networks[0].mtu, 1200, "Docker's MTU option is read");
        assert_eq!(ta.ports.len(), 2);
        assert_eq!(
            (
                ta.ports[1].published_port,
                ta.ports[1].publish_mode.as_str()
            ),
            (5353, "host")
        );
        let ing = vb.ingress.as_ref().expect("b has its ingress sandbox");
        assert_eq!(ing.network_id, "ing");
        let me = ing.endpoint.as_ref().expect("b's endpoint");
        assert_eq!(
            (me.node_id.as_str(), me.sandbox.as_str()),
            ("b", "ingress-sbox")
        );
        assert_eq!(ing.nodes.len(), 3, "every node's sandbox, ready or not");
        assert_eq!(ing.ports.len(), 1, "only ingress-mode ports");
        let p = &ing.ports[0];
        assert_eq!(
            (
                p.published_port,
                p.target_port,
                p.protocol.as_str(),
                p.service_name.as_str()
            ),
            (8080, 80, "tcp", "web")
        );
        assert!(p.backends.is_empty(), "nothing runs yet");
        let ingress_net = vb
            .networks
            .iter()
            .find(|n| n.id == "ing")
            .expect("ingress in networks");
        assert!(ingress_net.services.is_empty(), "no VIP or DNS on ingress");
        // A node without tasks still has the mesh (it answers on the port).
        let vc = view_for(&s, "c", 5);
        assert_eq!(vc.ingress.as_ref().map(|i| i.ports.len()), Some(1));
        s.apply(
            6,
            &Command::ReportTasks {
                node_id: "b".into(),
                reports: vec![crate::services::TaskReport {
                    task_id: task.id.clone(),
                    state: TaskState::Running,
                    ..Default::default()
                }],
                at: "t".into(),
            },
        );
        let vc2 = view_for(&s, "c", 6);
        assert!(!same_content(&vc, &vc2), "a new backend changes every view");
        let backends = &vc2.ingress.as_ref().expect("ingress").ports[0].backends;
        let task_ip = s
            .endpoints
            .values()
            .find(|e| e.sandbox_id == task.id && e.network_id == "ing")
            .map(|e| e.ip.to_string());
        assert_eq!(backends.first(), task_ip.as_ref());
        s.apply(
            7,
            &Command::SetNodeState {
                id: "b".into(),
                state: mesh_common::model::NodeState::Down,
                addr: None,
                at: "t".into(),
            },
        );
        let vc3 = view_for(&s, "c", 7);
        assert!(
            vc3.ingress.as_ref().expect("ingress").ports[0]
                .backends
                .is_empty()
        );
        s.apply(8, &Command::RemoveNetwork { id: "ing".into() });
        assert!(s.networks.contains_key("ing"), "still published");
    }

    /// Three Ready nodes, an ingress network and two overlays, `replicas`
    /// tasks of a published service and a tenth as many of a two-network
    /// one; most tasks running, every seventh still starting.
    fn big_state(replicas: u64) -> ClusterState {
        use crate::services::{PortSpec, ServiceSpec, TaskReport};
        use mesh_common::model::{
            Availability, NodeState, Protocol, PublishMode, ServiceMode, TaskState,
        };
        let mut s = ClusterState::default();
        let ready = |id: &str, n: u8| Node {
            availability: Availability::Active,
            state: NodeState::Ready,
            ..node(id, &format!("192.168.1.{n}"))
        };
        let mut i = 1;
        let mut cmd = |s: &mut ClusterState, c: Command| {
            i += 1;
            s.apply(i, &c)
        };
        cmd(
            &mut s,
            Command::Init {
                cluster: ClusterInfo {
                    id: "c".into(),
                    ..Default::default()
                },
                node: ready("a", 1),
                ingress: Some("ing".into()),
            },
        );
        for (n, id) in ["b", "c"].iter().enumerate() {
            let node = ready(id, n as u8 + 2);
            cmd(&mut s, Command::AddNode { node });
        }
        for net in ["net", "back"] {
            let spec = NetworkSpec {
                name: net.into(),
                driver: mesh_common::model::DriverKind::Overlay,
                ..Default::default()
            };
            let id = net.into();
            let at = "t".into();
            cmd(&mut s, Command::CreateNetwork { id, spec, at });
        }
        let web = ServiceSpec {
            name: "web".into(),
            mode: ServiceMode::Replicated,
            replicas,
            networks: vec!["net".into()],
            cmd: vec!["sleep".into()],
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                target: 80,
                published: Some(8080),
                mode: PublishMode::Ingress,
            }],
            ..Default::default()
        };
        let db = ServiceSpec {
            name: "db".into(),
            replicas: replicas / 10,
            networks: vec!["net".into(), "back".into()],
            ..web.clone()
        };
        let db = ServiceSpec {
            ports: vec![],
            ..db
        };
        for (id, spec) in [("web", web), ("db", db)] {
            let r = cmd(
                &mut s,
                Command::CreateService {
                    id: id.into(),
                    spec,
                    at: "t".into(),
                },
            );
            assert!(matches!(r, crate::state::CommandResult::Service(_)));
        }
        let tasks: Vec<Task> = s.tasks.values().cloned().collect();
        assert_eq!(tasks.len() as u64, replicas + replicas / 10);
        for (_, t) in tasks.iter().enumerate().filter(|(n, _)| n % 7 != 0) {
            let reports = vec![TaskReport {
                task_id: t.id.clone(),
                state: TaskState::Running,
                ..Default::default()
            }];
            let node_id = t.node_id.clone();
            let at = "t".into();
            cmd(
                &mut s,
                Command::ReportTasks {
                    node_id,
                    reports,
                    at,
                },
            );
        }
        s
    }

    /// The best of `runs` timings of `f`, so a busy machine inflates it less.
    fn best_of(runs: u32, mut f: impl FnMut()) -> std::time::Duration {
        (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    }

    #[test]
    fn indexed_views_are_the_scanned_ones_at_300_replicas() {
        let mut s = big_state(300);
        let nodes = ["a", "b", "c", "nobody"];
        let check = |s: &ClusterState| {
            let views = Views::new(s);
            for n in nodes {
                let want = scans::view_for(s, n, 9);
                let got = views.view(n, 9);
                assert_eq!(got, want, "node {n}");
                assert_eq!(
                    mesh_proto::view_digest(&got),
                    mesh_proto::view_digest(&want)
                );
            }
        };
        check(&s);
        let vb = view_for(&s, "b", 9);
        assert!(vb.tasks.len() > 50, "{} tasks on b", vb.tasks.len());
        let ing = vb.ingress.as_ref().expect("ingress");
        assert!(!ing.ports[0].backends.is_empty());
        // A node going down takes its backends out of every view.
        s.apply(
            10_000,
            &Command::SetNodeState {
                id: "c".into(),
                state: mesh_common::model::NodeState::Down,
                addr: None,
                at: "t".into(),
            },
        );
        check(&s);

        // What one change costs the manager: every node's view computed
        // again and compared with the last one sent (before: a scan per
        // lookup; now: one index per change, then a delta).
        let s = big_state(300);
        let scanned = best_of(5, || {
            for n in nodes {
                std::hint::black_box(scans::view_for(&s, n, 9));
            }
        });
        let indexed = best_of(5, || {
            let views = Views::new(&s);
            for n in nodes {
                std::hint::black_box(views.view(n, 9));
            }
        });
        let last: Vec<NodeView> = nodes.iter().map(|n| view_for(&s, n, 9)).collect();
        let compared = best_of(5, || {
            for l in &last {
                assert!(same_content(l, l));
            }
        });
        let diffed = best_of(5, || {
            for l in &last {
                assert!(update_for(Some(l), l).is_none(), "nothing changed");
            }
        });
        println!(
            "views of 3 nodes + 1, 330 tasks: scans {scanned:?}, indexed {indexed:?}; \
             unchanged check: compare {compared:?}, delta {diffed:?}"
        );
    }

    #[test]
    fn the_stream_sends_the_whole_view_then_small_deltas() {
        use mesh_common::model::TaskState;
        let mut s = big_state(300);
        let v1 = view_for(&s, "b", 9);
        let c1 = view_for(&s, "c", 9);
        let first = update_for(None, &v1).expect("a first message");
        assert!(matches!(first.update, Some(Update::Full(_))));
        assert_eq!(first.digest, mesh_proto::view_digest(&v1));
        assert_eq!(update_for(Some(&v1), &view_for(&s, "b", 10)), None);
        // One starting task of c's comes up: b's view changes only in the
        // backends of the networks and ports that task is on.
        let t = s
            .tasks
            .values()
            .find(|t| t.node_id == "c" && t.state != TaskState::Running)
            .expect("a starting task on c")
            .clone();
        s.apply(
            11,
            &Command::ReportTasks {
                node_id: "c".into(),
                reports: vec![crate::services::TaskReport {
                    task_id: t.id.clone(),
                    state: TaskState::Running,
                    ..Default::default()
                }],
                at: "t".into(),
            },
        );
        let v2 = view_for(&s, "b", 11);
        let u = update_for(Some(&v1), &v2).expect("the view changed");
        assert_eq!((u.base_generation, u.generation), (9, 11));
        assert_eq!(u.digest, mesh_proto::view_digest(&v2));
        let Some(Update::Delta(d)) = &u.update else {
            panic!("a delta, not {:?}", u.update)
        };
        assert!(d.tasks.is_empty(), "none of b's tasks changed");
        assert!(d.removed_tasks.is_empty() && d.task_order.is_empty());
        assert!(d.ingress.is_some(), "the ingress backends did");
        use mesh_proto::prost::Message;
        let (whole, delta) = (v2.encode_to_vec().len(), u.encode_to_vec().len());
        println!("one task up, 330 tasks: whole view {whole} bytes, delta {delta} bytes");
        assert!(delta < whole / 2, "{delta} vs {whole}");
        // On c, the task's own entry changes and nothing else of the tasks.
        let d = mesh_proto::view_delta(&c1, &view_for(&s, "c", 11)).expect("unique ids");
        let ids: Vec<&str> = d.tasks.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, [t.id.as_str()], "its known state");
    }
}

/// The views as they were computed before [`Views`]: every lookup a scan of
/// the whole state. Kept only to check that the indexed views are the same,
/// digest for digest, and to time both on one state.
#[cfg(test)]
mod scans {
    use super::*;
    use mesh_common::model::{NodeState, TaskState};
    use std::collections::BTreeSet;

    fn backends(s: &ClusterState, service_id: &str, network_id: &str) -> Vec<std::net::Ipv4Addr> {
        let running: BTreeSet<&str> = s
            .tasks
            .values()
            .filter(|t| {
                t.service_id == service_id
                    && t.desired_state == TaskState::Running
                    && t.state == TaskState::Running
                    && s.nodes
                        .get(&t.node_id)
                        .is_some_and(|n| n.state == NodeState::Ready)
            })
            .map(|t| t.id.as_str())
            .collect();
        s.endpoints
            .values()
            .filter(|e| e.network_id == network_id && running.contains(e.sandbox_id.as_str()))
            .map(|e| e.ip)
            .collect()
    }

    fn assignment(s: &ClusterState, net: &Network, node_id: &str) -> NetworkAssignment {
        let mut local = Vec::new();
        let mut peers = Vec::new();
        for e in s.endpoints.values().filter(|e| e.network_id == net.id) {
            if e.node_id == node_id {
                local.push(endpoint_info(s, e));
            } else if let Some(n) = s.nodes.get(&e.node_id) {
                peers.push(PeerEntry {
                    ip: e.ip.to_string(),
                    mac: e.mac.to_string(),
                    node_addr: n.addr.clone(),
                    name: e.sandbox.clone(),
                    aliases: e.aliases.clone(),
                });
            }
        }
        NetworkAssignment {
            id: net.id.clone(),
            name: net.spec.name.clone(),
            vni: net.vni,
            subnet: net.subnet.to_string(),
            gateway: net.gateway.to_string(),
            mtu: network_mtu(&net.spec),
            internal: net.spec.internal,
            encrypted: is_encrypted(&net.spec),
            local,
            peers,
            services: s
                .services
                .values()
                .filter(|svc| svc.spec.networks.contains(&net.id))
                .map(|svc| ServiceEntry {
                    id: svc.id.clone(),
                    name: svc.spec.name.clone(),
                    vip: svc
                        .vips
                        .get(&net.id)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    backends: backends(s, &svc.id, &net.id)
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                })
                .collect(),
        }
    }

    /// The tasks a node must run or stop: every one of its tasks that has not
    /// ended. Addresses come in the order of the service's networks, which is
    /// the order of the task's interfaces.
    fn tasks_for(s: &ClusterState, node_id: &str) -> Vec<TaskAssignment> {
        s.tasks
            .values()
            .filter(|t| t.node_id == node_id && !t.state.is_terminal())
            .map(|t| {
                let svc = s.services.get(&t.service_id);
                // The spec's networks, then ingress (not one of them), last.
                let order = |net: &str| {
                    svc.and_then(|v| v.spec.networks.iter().position(|n| n == net))
                        .unwrap_or(usize::MAX)
                };
                let mut eps: Vec<&Endpoint> = s
                    .endpoints
                    .values()
                    .filter(|e| e.sandbox_id == t.id)
                    .collect();
                eps.sort_by_key(|e| order(&e.network_id));
                TaskAssignment {
                    id: t.id.clone(),
                    name: s.task_sandbox_name(t),
                    service_id: t.service_id.clone(),
                    service_name: svc.map(|v| v.spec.name.clone()).unwrap_or_default(),
                    desired_state: t.desired_state.to_string(),
                    cmd: svc.map(|v| v.spec.cmd.clone()).unwrap_or_default(),
                    env: svc.map(|v| v.spec.env.clone()).unwrap_or_default(),
                    networks: eps.into_iter().map(|e| endpoint_info(s, e)).collect(),
                    start_delay_ms: t.start_delay_ms,
                    known_state: t.state.to_string(),
                    ports: svc
                        .map(|v| v.endpoint_ports.iter().map(port_to_pb).collect())
                        .unwrap_or_default(),
                    health: svc.and_then(|v| v.spec.health.as_ref()).map(|h| h.to_pb()),
                }
            })
            .collect()
    }

    /// The routing mesh as `node_id` builds it: only once the node has its
    /// ingress sandbox (its address on the ingress network).
    fn ingress_for(s: &ClusterState, node_id: &str) -> Option<IngressView> {
        let net = s.ingress_network()?;
        let sbox_id = ingress_sbox_id(node_id);
        let mine = s
            .endpoints
            .values()
            .find(|e| e.network_id == net.id && e.sandbox_id == sbox_id)?;
        let nodes = s
            .endpoints
            .values()
            .filter(|e| e.network_id == net.id && is_ingress_sbox(e))
            .map(|e| IngressNode {
                node_id: e.node_id.clone(),
                ip: e.ip.to_string(),
                mac: e.mac.to_string(),
            })
            .collect();
        let mut ports = Vec::new();
        for svc in s.services.values() {
            let ingress: Vec<_> = svc
                .endpoint_ports
                .iter()
                .filter(|p| p.mode == PublishMode::Ingress)
                .collect();
            if ingress.is_empty() {
                continue;
            }
            let backends: Vec<String> = backends(s, &svc.id, &net.id)
                .iter()
                .map(ToString::to_string)
                .collect();
            for p in ingress {
                ports.push(IngressPort {
                    service_id: svc.id.clone(),
                    service_name: svc.spec.name.clone(),
                    protocol: p.protocol.to_string(),
                    published_port: p.published.map_or(0, u32::from),
                    target_port: p.target.into(),
                    backends: backends.clone(),
                });
            }
        }
        Some(IngressView {
            network_id: net.id.clone(),
            endpoint: Some(endpoint_info(s, mine)),
            nodes,
            ports,
        })
    }

    /// The WireGuard peers of `node_id`: every other node with an endpoint on
    /// an encrypted network this node has an endpoint on (the ingress network
    /// too, if it is encrypted), once that node has a recorded key. `None`
    /// while this node needs no encrypted network. Sorted by node ID, so the
    /// view's digest does not depend on map order.
    fn encryption_for(s: &ClusterState, node_id: &str) -> Option<EncryptionView> {
        let mine: std::collections::BTreeSet<&str> = s
            .endpoints
            .values()
            .filter(|e| e.node_id == node_id)
            .filter(|e| {
                s.networks
                    .get(&e.network_id)
                    .is_some_and(|n| is_encrypted(&n.spec))
            })
            .map(|e| e.network_id.as_str())
            .collect();
        if mine.is_empty() {
            return None;
        }
        let peer_ids: std::collections::BTreeSet<&str> = s
            .endpoints
            .values()
            .filter(|e| e.node_id != node_id && mine.contains(e.network_id.as_str()))
            .map(|e| e.node_id.as_str())
            .collect();
        let peers = peer_ids
            .into_iter()
            .filter_map(|id| s.nodes.get(id))
            .filter(|n| !n.encryption_public_key.is_empty())
            .map(|n| WireguardPeer {
                node_id: n.id.clone(),
                public_key: n.encryption_public_key.clone(),
                addr: n.addr.clone(),
            })
            .collect();
        Some(EncryptionView {
            listen_port: WIREGUARD_PORT,
            peers,
        })
    }

    /// The view of one node at Raft index `generation`.
    pub fn view_for(s: &ClusterState, node_id: &str, generation: u64) -> NodeView {
        let networks = s
            .networks
            .values()
            .filter(|n| {
                s.endpoints
                    .values()
                    .any(|e| e.network_id == n.id && e.node_id == node_id)
            })
            .map(|n| assignment(s, n, node_id))
            .collect();
        NodeView {
            generation,
            data_path_port: data_path_port(s),
            networks,
            tasks: tasks_for(s, node_id),
            ingress: ingress_for(s, node_id),
            encryption: encryption_for(s, node_id),
        }
    }
}
