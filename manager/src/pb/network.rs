//! A cluster network as `mesh network ls` and `inspect` show it.

use std::collections::{BTreeSet, HashMap};

use crate::state::{ClusterState, Network};

/// Docker's option that shows an overlay's VXLAN ID.
pub const VXLAN_OPTION: &str = "com.docker.network.driver.overlay.vxlanid_list";

/// `self_id` is the node answering: its sandboxes are the "Containers";
/// every node with an endpoint on the network is a "Peer".
pub fn network_to_pb(s: &ClusterState, n: &Network, self_id: &str) -> mesh_proto::Network {
    let prefix = n.subnet.prefix_len();
    let mut containers = Vec::new();
    let mut peer_nodes = BTreeSet::new();
    for e in s.endpoints.values().filter(|e| e.network_id == n.id) {
        peer_nodes.insert(e.node_id.clone());
        if e.node_id == self_id {
            containers.push(mesh_proto::NetworkContainer {
                sandbox_id: e.sandbox_id.clone(),
                name: e.sandbox.clone(),
                endpoint_id: e.id.clone(),
                mac: e.mac.to_string(),
                ipv4: format!("{}/{prefix}", e.ip),
            });
        }
    }
    let peers = peer_nodes
        .iter()
        .filter_map(|id| s.nodes.get(id))
        .map(|node| mesh_proto::NetworkPeer {
            name: node.hostname.clone(),
            ip: node.addr.clone(),
        })
        .collect();
    mesh_proto::Network {
        containers,
        peers,
        ..spec_to_pb(n)
    }
}

fn spec_to_pb(n: &Network) -> mesh_proto::Network {
    let mut options: HashMap<String, String> = n.spec.options.clone().into_iter().collect();
    options.insert(VXLAN_OPTION.into(), n.vni.to_string());
    mesh_proto::Network {
        id: n.id.clone(),
        name: n.spec.name.clone(),
        driver: n.spec.driver.to_string(),
        scope: "swarm".into(),
        subnet: n.subnet.to_string(),
        gateway: n.gateway.to_string(),
        ip_range: n.spec.ip_range.clone().unwrap_or_default(),
        vni: n.vni,
        attachable: n.spec.attachable,
        internal: n.spec.internal,
        ingress: n.spec.ingress,
        options,
        labels: n.spec.labels.clone().into_iter().collect(),
        created_at: n.created_at.clone(),
        version: n.version,
        ..Default::default()
    }
}
