//! A node as `mesh node ls` and `inspect` show it.

use mesh_common::model::{NodeRole, NodeState};

use crate::state::Node;

/// `leader` is the Raft ID of the current leader, if known: it decides
/// the manager status column.
pub fn node_to_pb(n: &Node, leader: Option<u64>) -> mesh_proto::Node {
    let is_manager = n.role == NodeRole::Manager;
    mesh_proto::Node {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        role: n.role.to_string(),
        availability: n.availability.to_string(),
        labels: n.labels.clone().into_iter().collect(),
        addr: n.addr.clone(),
        state: n.state.to_string(),
        manager_addr: if is_manager {
            n.manager_addr.clone()
        } else {
            String::new()
        },
        leader: is_manager && leader == Some(n.raft_id),
        reachability: if !is_manager {
            String::new()
        } else if n.state == NodeState::Ready || leader == Some(n.raft_id) {
            "reachable".into()
        } else {
            "unreachable".into()
        },
        created_at: n.created_at.clone(),
        updated_at: n.updated_at.clone(),
        version: n.version,
        os: n.os.clone(),
        architecture: n.architecture.clone(),
        message: String::new(),
        tls_not_after: n.cert_not_after.clone(),
        tls_serial: n.cert_serial.clone(),
        tls_key_fingerprint: n.key_fingerprint.clone(),
        routes: n
            .routes
            .iter()
            .map(|r| mesh_proto::NodeRoute {
                destination: r.destination.to_string(),
                device: r.device.clone(),
            })
            .collect(),
        datapath_errors: n.datapath_errors.clone(),
        encryption_public_key: n.encryption_public_key.clone(),
        encryption_key_rotations: n.encryption_key_rotations,
        // Not in the state: the caller adds what the node's heartbeats said.
        encryption_peers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_status_follows_role_state_and_leader() {
        let mut n = Node {
            id: "a".into(),
            raft_id: 7,
            role: NodeRole::Manager,
            state: NodeState::Down,
            manager_addr: "10.0.0.1:2377".into(),
            ..Default::default()
        };
        let pb = node_to_pb(&n, Some(7));
        assert_eq!((pb.leader, pb.reachability.as_str()), (true, "reachable"));
        assert_eq!(node_to_pb(&n, Some(1)).reachability, "unreachable");
        n.role = NodeRole::Worker;
        let pb = node_to_pb(&n, Some(7));
        assert_eq!(
            (pb.role.as_str(), pb.leader, pb.manager_addr.as_str()),
            ("worker", false, "")
        );
    }
}
