//! `mesh node ls|inspect|update|promote|demote|rm`: which node a reference
//! names, and what may be done to it (the last manager stays, a manager
//! leaves Raft before it is demoted, a live node needs --force to go).

use std::collections::BTreeMap;

use mesh_common::model::{Availability, NodeRole, NodeState};
use mesh_proto::{JoinRaftRequest, NodeRemoveRequest, NodeUpdateRequest};
use tonic::Status;

use crate::manager::{Manager, now};
use crate::pb::node::node_to_pb;
use crate::state::{Command, CommandResult, Node};
use mesh_common::refusal::Refusal;

/// Finds a node by ID, hostname or unique ID prefix, as Docker does;
/// `self` is the node answering.
pub fn resolve_node(
    nodes: &BTreeMap<String, Node>,
    r: &str,
    self_id: &str,
) -> Result<Node, Refusal> {
    let r = if r == "self" { self_id } else { r };
    if let Some(n) = nodes.get(r) {
        return Ok(n.clone());
    }
    let by_name: Vec<&Node> = nodes.values().filter(|n| n.hostname == r).collect();
    let by_prefix: Vec<&Node> = nodes
        .values()
        .filter(|n| !r.is_empty() && n.id.starts_with(r))
        .collect();
    match (by_name.as_slice(), by_prefix.as_slice()) {
        ([n], _) | ([], [n]) => Ok((*n).clone()),
        ([], []) => Err(Refusal::not_found(format!(
            "node {r} not found; see `mesh node ls`"
        ))),
        _ => Err(Refusal::precondition(format!(
            "node reference {r:?} is ambiguous: it matches several nodes; use the node ID"
        ))),
    }
}

fn leader(mgr: &Manager) -> Option<u64> {
    mgr.raft.metrics().borrow().current_leader
}

pub fn list(mgr: &Manager) -> mesh_proto::NodeList {
    let leader = leader(mgr);
    let mut nodes: Vec<mesh_proto::Node> =
        mgr.read(|s| s.nodes.values().map(|n| node_to_pb(n, leader)).collect());
    for n in &mut nodes {
        n.encryption_peers = mgr.encryption_peers(&n.id);
    }
    mesh_proto::NodeList { nodes }
}

/// Why a role change is refused before anything is written, if it is.
pub fn check_demote(nodes: &BTreeMap<String, Node>, node: &Node) -> Result<(), Refusal> {
    let managers = nodes
        .values()
        .filter(|n| n.role == NodeRole::Manager)
        .count();
    if node.role == NodeRole::Manager && managers <= 1 {
        return Err(Refusal::precondition(format!(
            "cannot demote node {}: it is the last manager of the cluster; promote another node first",
            node.id
        )));
    }
    Ok(())
}

/// Why a node may not be removed now, if it may not.
pub fn check_remove(node: &Node, force: bool) -> Result<(), Refusal> {
    if node.role == NodeRole::Manager {
        return Err(Refusal::precondition(format!(
            "node {} is a cluster manager and a member of Raft; demote it with `mesh node demote` before removing it",
            node.id
        )));
    }
    if node.state == NodeState::Ready && !force {
        return Err(Refusal::precondition(format!(
            "node {} is not down and can't be removed; stop its daemon first, or use --force",
            node.id
        )));
    }
    Ok(())
}

/// The words of an update request, checked.
fn parse_update(
    r: &NodeUpdateRequest,
) -> Result<(Option<Availability>, Option<NodeRole>), Refusal> {
    let availability = match r.availability.as_str() {
        "" => None,
        a => Some(a.parse::<Availability>().map_err(|_| {
            Refusal::invalid(format!(
                "invalid availability {a:?}: use active, pause or drain"
            ))
        })?),
    };
    let role = match r.role.as_str() {
        "" => None,
        x => Some(
            x.parse::<NodeRole>()
                .map_err(|_| Refusal::invalid(format!("unknown role {x:?}")))?,
        ),
    };
    if r.label_add.keys().any(String::is_empty) {
        return Err(Refusal::invalid(
            "a label needs a key: use --label-add KEY=VALUE",
        ));
    }
    mesh_common::input::check_labels("--label-add", &r.label_add)?;
    Ok((availability, role))
}

/// `--label-rm K` of a label the node does not have is refused, as Docker
/// does: it is most often a typo, and a no-op write would still count as
/// an update.
fn check_label_rm(node: &Node, label_rm: &[String]) -> Result<(), Refusal> {
    match label_rm.iter().find(|k| !node.labels.contains_key(*k)) {
        Some(k) => Err(Refusal::not_found(format!(
            "node {} has no label {:?}: see `mesh node inspect {}`",
            node.hostname,
            mesh_common::input::shorten(k),
            node.hostname
        ))),
        None => Ok(()),
    }
}

pub async fn update(mgr: &Manager, r: NodeUpdateRequest) -> Result<mesh_proto::Node, Status> {
    let node = mgr.read(|s| resolve_node(&s.nodes, &r.node, &mgr.node_id))?;
    let (availability, role) = parse_update(&r)?;
    check_label_rm(&node, &r.label_rm)?;
    let role = role.filter(|x| *x != node.role);
    if role == Some(NodeRole::Worker) {
        mgr.read(|s| check_demote(&s.nodes, &node))?;
        // Leave Raft first, so the voters never count a worker.
        let req = JoinRaftRequest {
            node_id: node.id.clone(),
            addr: String::new(),
            remove: true,
        };
        mgr.membership_call(req).await?;
    }
    let other_change = availability.is_some()
        || role.is_some()
        || !r.label_add.is_empty()
        || !r.label_rm.is_empty();
    let mut result = None;
    if r.rotate_key {
        // The node sees the new count in its next heartbeat reply and
        // makes a new key pair; its new public key follows.
        result = Some(
            mgr.write(Command::RotateNodeKey {
                id: node.id.clone(),
            })
            .await?,
        );
    }
    if other_change || !r.rotate_key {
        let cmd = Command::UpdateNode {
            id: node.id.clone(),
            availability,
            role,
            label_add: r.label_add.into_iter().collect(),
            label_rm: r.label_rm,
            at: now(),
        };
        result = Some(mgr.write(cmd).await?);
    }
    // The write may have gone through another manager; read the result
    // from what it returned.
    match result {
        Some(CommandResult::Node(n)) => Ok(node_to_pb(&n, leader(mgr))),
        _ => Err(Status::internal("unexpected result")),
    }
}

pub async fn remove(mgr: &Manager, r: NodeRemoveRequest) -> Result<(), Status> {
    let node = mgr.read(|s| resolve_node(&s.nodes, &r.node, &mgr.node_id))?;
    check_remove(&node, r.force)?;
    mgr.write(Command::RemoveNode { id: node.id }).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::refusal::RefusalKind;

    fn nodes(list: &[(&str, &str, NodeRole)]) -> BTreeMap<String, Node> {
        list.iter()
            .map(|(id, host, role)| {
                let n = Node {
                    id: (*id).into(),
                    hostname: (*host).into(),
                    role: *role,
                    ..Default::default()
                };
                (n.id.clone(), n)
            })
            .collect()
    }

    #[test]
    fn references_resolve_as_docker_does() {
        let all = nodes(&[
            ("abc1", "node1", NodeRole::Manager),
            ("abd2", "node2", NodeRole::Worker),
        ]);
        assert_eq!(
            resolve_node(&all, "node2", "abc1").map(|n| n.id),
            Ok("abd2".into())
        );
        assert_eq!(
            resolve_node(&all, "abc", "abc1").map(|n| n.id),
            Ok("abc1".into())
        );
        assert_eq!(
            resolve_node(&all, "self", "abc1").map(|n| n.id),
            Ok("abc1".into())
        );
        assert_eq!(
            resolve_node(&all, "ab", "abc1").map_err(|e| e.kind),
            Err(RefusalKind::FailedPrecondition)
        );
        assert_eq!(
            resolve_node(&all, "zz", "abc1").map_err(|e| e.kind),
            Err(RefusalKind::NotFound)
        );
    }

    #[test]
    fn the_last_manager_stays_and_live_nodes_need_force() {
        let one = nodes(&[("m", "m", NodeRole::Manager), ("w", "w", NodeRole::Worker)]);
        assert!(check_demote(&one, &one["m"]).is_err_and(|e| e.contains("last manager")));
        let two = nodes(&[("m", "m", NodeRole::Manager), ("n", "n", NodeRole::Manager)]);
        assert!(check_demote(&two, &two["m"]).is_ok());
        assert!(check_remove(&one["m"], true).is_err_and(|e| e.contains("demote it")));
        let mut w = one["w"].clone();
        w.state = NodeState::Ready;
        assert!(check_remove(&w, false).is_err_and(|e| e.contains("--force")));
        assert!(check_remove(&w, true).is_ok());
    }

    #[test]
    fn update_words_are_checked() {
        let bad = NodeUpdateRequest {
            availability: "sleepy".into(),
            ..Default::default()
        };
        assert!(parse_update(&bad).is_err_and(|e| e.kind == RefusalKind::InvalidArgument));
        let ok = NodeUpdateRequest {
            availability: "drain".into(),
            role: "manager".into(),
            ..Default::default()
        };
        assert_eq!(
            parse_update(&ok),
            Ok((Some(Availability::Drain), Some(NodeRole::Manager)))
        );
    }
}
