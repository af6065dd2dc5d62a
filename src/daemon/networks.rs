//! Network requests from the CLI: checks what can be checked before Raft
//! (names, drivers, options, flag combinations), then proposes the create or
//! remove; subnets and VNIs are allocated inside the state machine.

use std::collections::BTreeMap;

use mesh_manager::state::{self, Network, NetworkSpec};
use tonic::Status;

pub const VXLAN_OPTION: &str = "com.docker.network.driver.overlay.vxlanid_list";
const MTU_OPTIONS: [&str; 2] = ["mtu", "com.docker.network.driver.mtu"];

use mesh_common::id::valid_name;

#[allow(clippy::result_large_err)]
pub fn spec_from(r: mesh_proto::NetworkCreateRequest) -> Result<NetworkSpec, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if !valid_name(&r.name) {
        return bad(format!(
            "invalid network name {:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit",
            r.name
        ));
    }
    if driver_of(&r) != "overlay" {
        return bad(format!(
            "{} is a local driver, not a cluster one",
            driver_of(&r)
        ));
    }
    let driver = "overlay".to_string();
    let mut options = BTreeMap::new();
    for (k, v) in r.options {
        match k.as_str() {
            "encrypted" => {
                if !v.is_empty() && v != "true" {
                    return bad(format!(
                        "invalid value {v:?} for option encrypted: use --opt encrypted"
                    ));
                }
                options.insert(k, String::new());
            }
            k2 if MTU_OPTIONS.contains(&k2) => match v.parse::<u32>() {
                Ok(mtu) if (576..=9000).contains(&mtu) => {
                    options.insert("mtu".into(), mtu.to_string());
                }
                _ => {
                    return bad(format!(
                        "invalid mtu {v:?}: use --opt mtu=N with N between 576 and 9000"
                    ));
                }
            },
            _ => {
                return bad(format!(
                    "unknown option {k:?} for the overlay driver: use --opt encrypted or --opt mtu=N"
                ));
            }
        }
    }
    if r.subnet.is_empty() && (!r.gateway.is_empty() || !r.ip_range.is_empty()) {
        return bad("--gateway and --ip-range need --subnet".into());
    }
    if r.ingress && r.attachable {
        return bad("an ingress network cannot be attachable; drop --attachable".into());
    }
    if r.ingress && r.internal {
        return bad("an ingress network cannot be internal; drop --internal".into());
    }
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(NetworkSpec {
        name: r.name,
        driver,
        subnet: opt(r.subnet),
        gateway: opt(r.gateway),
        ip_range: opt(r.ip_range),
        attachable: r.attachable,
        internal: r.internal,
        ingress: r.ingress,
        options,
        labels: r.labels.into_iter().collect(),
    })
}

/// The driver a create asks for (Docker's default is a local bridge).
pub fn driver_of(r: &mesh_proto::NetworkCreateRequest) -> &str {
    if r.driver.is_empty() {
        "bridge"
    } else {
        r.driver.as_str()
    }
}

/// A local (bridge or macvlan) network request, checked.
#[allow(clippy::result_large_err)]
pub fn local_spec_from(
    r: mesh_proto::NetworkCreateRequest,
) -> Result<mesh_worker::local_networks::LocalSpec, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if !valid_name(&r.name) {
        return bad(format!(
            "invalid network name {:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit",
            r.name
        ));
    }
    let driver = driver_of(&r).to_string();
    match driver.as_str() {
        "bridge" | "macvlan" => {}
        "host" | "none" => {
            return bad(format!(
                "only one {driver} network may exist: it is pre-defined on every node"
            ));
        }
        other => {
            return bad(format!(
                "unknown network driver {other:?}: use overlay, bridge or macvlan"
            ));
        }
    }
    if r.ingress {
        return bad("an ingress network must be -d overlay".into());
    }
    if r.subnet.is_empty() && (!r.gateway.is_empty() || !r.ip_range.is_empty()) {
        return bad("--gateway and --ip-range need --subnet".into());
    }
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(mesh_worker::local_networks::LocalSpec {
        name: r.name,
        driver,
        subnet: opt(r.subnet),
        gateway: opt(r.gateway),
        ip_range: opt(r.ip_range),
        internal: r.internal,
        options: r.options.into_iter().collect(),
        labels: r.labels.into_iter().collect(),
    })
}

/// A local network as the API shows it; its Containers are this node's
/// sandboxes on it.
pub fn local_to_pb(
    n: &mesh_worker::local_networks::LocalNetwork,
    sandboxes: &[mesh_worker::sandboxes::Record],
) -> mesh_proto::Network {
    let prefix = n.subnet.split_once('/').map(|(_, p)| p).unwrap_or("16");
    let containers = sandboxes
        .iter()
        .filter(|r| r.exit_code.is_none())
        .flat_map(|r| {
            r.networks
                .iter()
                .filter(|a| a.network_id == n.id)
                .map(move |a| (r, a))
        })
        .map(|(r, a)| mesh_proto::NetworkContainer {
            sandbox_id: r.id.clone(),
            name: r.name.clone(),
            endpoint_id: a.endpoint_id.clone(),
            mac: a.mac.clone(),
            ipv4: format!("{}/{prefix}", a.ip),
        })
        .collect();
    mesh_proto::Network {
        id: n.id.clone(),
        name: n.name.clone(),
        driver: n.driver.clone(),
        scope: "local".into(),
        subnet: n.subnet.clone(),
        gateway: n.gateway.clone(),
        ip_range: n.ip_range.clone().unwrap_or_default(),
        internal: n.internal,
        options: n.options.clone().into_iter().collect(),
        labels: n.labels.clone().into_iter().collect(),
        created_at: n.created_at.clone(),
        containers,
        ..Default::default()
    }
}

/// Finds a network as Docker resolves references (ID, name, ID prefix).
#[allow(clippy::result_large_err)]
pub fn resolve(s: &state::ClusterState, r: &str) -> Result<Network, Status> {
    s.find_network(r).cloned().map_err(|m| {
        if m.contains("not found") {
            Status::not_found(m)
        } else {
            Status::failed_precondition(m)
        }
    })
}

/// `self_id` is the node answering: its sandboxes are the "Containers".
pub fn to_pb(s: &state::ClusterState, n: &Network, self_id: &str) -> mesh_proto::Network {
    let prefix = n.subnet.split_once('/').map(|(_, p)| p).unwrap_or("24");
    let mut containers = Vec::new();
    let mut peer_nodes = std::collections::BTreeSet::new();
    for e in s.endpoints.values().filter(|e| e.network_id == n.id) {
        peer_nodes.insert(e.node_id.clone());
        if e.node_id == self_id {
            containers.push(mesh_proto::NetworkContainer {
                sandbox_id: e.sandbox_id.clone(),
                name: e.sandbox.clone(),
                endpoint_id: e.id.clone(),
                mac: e.mac.clone(),
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
        ..pb_spec(n)
    }
}

fn pb_spec(n: &Network) -> mesh_proto::Network {
    let mut options: std::collections::HashMap<String, String> =
        n.spec.options.clone().into_iter().collect();
    options.insert(VXLAN_OPTION.into(), n.vni.to_string());
    mesh_proto::Network {
        id: n.id.clone(),
        name: n.spec.name.clone(),
        driver: n.spec.driver.clone(),
        scope: "swarm".into(),
        subnet: n.subnet.clone(),
        gateway: n.gateway.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str) -> mesh_proto::NetworkCreateRequest {
        mesh_proto::NetworkCreateRequest {
            name: name.into(),
            driver: "overlay".into(),
            ..Default::default()
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("front-end_1.x"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a b"));
        assert!(spec_from(req("bad name")).is_err());
    }

    #[test]
    fn drivers_and_options() {
        let mut r = req("n");
        r.driver = String::new();
        assert!(spec_from(r).is_err_and(|e| e.message().contains("local driver")));
        let mut r = req("n");
        r.driver = "vlan".into();
        assert!(local_spec_from(r).is_err_and(|e| e.message().contains("unknown network driver")));
        let mut r = req("n");
        r.options.insert("encrypted".into(), String::new());
        r.options
            .insert("com.docker.network.driver.mtu".into(), "1400".into());
        let spec = spec_from(r).expect("valid");
        assert_eq!(spec.options.get("mtu").map(String::as_str), Some("1400"));
        assert!(spec.options.contains_key("encrypted"));
        let mut r = req("n");
        r.options.insert("mtu".into(), "70000".into());
        assert!(spec_from(r).is_err());
        let mut r = req("n");
        r.options.insert("colour".into(), "blue".into());
        assert!(spec_from(r).is_err_and(|e| e.message().contains("unknown option")));
    }

    #[test]
    fn flag_combinations() {
        let mut r = req("n");
        r.gateway = "10.1.0.1".into();
        assert!(spec_from(r).is_err_and(|e| e.message().contains("need --subnet")));
        let mut r = req("n");
        r.ingress = true;
        r.attachable = true;
        assert!(spec_from(r).is_err());
    }
}
