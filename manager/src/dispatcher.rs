//! What each node must have in its kernel, derived from the cluster state.
//! A node sees only the networks it has sandboxes on, and for each, every
//! endpoint on other nodes (its FDB and neighbour entries): this is what
//! keeps the push small as clusters grow.

use mesh_common::model::PublishMode;
use mesh_proto::{
    EncryptionView, EndpointInfo, IngressNode, IngressPort, IngressView, NetworkAssignment,
    NodeView, PeerEntry, ServiceEntry, TaskAssignment, WireguardPeer,
};

use crate::pb::service::port_to_pb;
use crate::state::{
    ClusterState, DEFAULT_DATA_PATH_PORT, Endpoint, Network, NetworkSpec, ingress_sbox_id,
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
                backends: s
                    .backends(&svc.id, &net.id)
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
        let backends: Vec<String> = s
            .backends(&svc.id, &net.id)
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
}
