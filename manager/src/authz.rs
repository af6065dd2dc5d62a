//! Who may call what, decided from the current cluster state, never from a
//! certificate alone. A CA-signed certificate only says who its holder
//! claims to be; the state says whether that node is still a member, which
//! role it has now, and which key it was pinned to when it joined.
//!
//! Pure functions over `ClusterState`, so every rule is tested inline; the
//! gRPC services and the TLS client checks call them.

use mesh_common::pki::{NodeIdentity, Role};

use crate::state::{ClusterState, Node};

/// What a call needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Heartbeat and certificate renewal: the certificate's role may differ
    /// from the state's, since renewing is how a node catches up with a
    /// promotion or demotion.
    Renewal,
    /// Anything a worker may do. A manager certificate of a node the state
    /// calls a worker (demoted) is refused until it renews; a worker
    /// certificate of a node just promoted carries less, and passes.
    Member,
    /// The control API, Raft and writes: a manager certificate of a node
    /// the state calls a manager.
    Manager,
}

/// Why a caller was refused; the text is what the caller is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("a node certificate is required")]
    NoCertificate,
    #[error("the certificate belongs to another cluster")]
    OtherCluster,
    #[error("node {0} was removed from the cluster; it must join again with `mesh join`")]
    Removed(String),
    #[error("unknown node {0}")]
    Unknown(String),
    #[error(
        "this certificate is not node {0}'s: its key differs from the one the cluster recorded for that node"
    )]
    WrongKey(String),
    #[error(
        "node {0} is no longer a manager: its manager certificate is refused (the node renews it by itself)"
    )]
    Demoted(String),
    #[error(
        "this call needs a manager certificate of a current manager; worker nodes cannot use the control API"
    )]
    NotManager,
    #[error("Raft is for current managers only: node {0} is not in the Raft membership")]
    NotInRaft(String),
    #[error(
        "node {node} may speak Raft only for itself (Raft ID {own}), not for Raft ID {claimed}"
    )]
    NotOwnRaftId {
        node: String,
        own: u64,
        claimed: u64,
    },
}

/// The caller's node, if its certificate may make a call that needs `need`.
pub fn caller(state: &ClusterState, who: &NodeIdentity, need: Need) -> Result<Node, Denied> {
    if state
        .cluster
        .as_ref()
        .is_none_or(|c| c.id != who.cluster_id)
    {
        return Err(Denied::OtherCluster);
    }
    if state.removed.contains(&who.node_id) {
        return Err(Denied::Removed(who.node_id.clone()));
    }
    let node = state
        .nodes
        .get(&who.node_id)
        .ok_or_else(|| Denied::Unknown(who.node_id.clone()))?;
    if node.key_fingerprint != who.key_fingerprint {
        return Err(Denied::WrongKey(who.node_id.clone()));
    }
    let state_is_manager = node.role == Role::Manager.as_str();
    match need {
        Need::Renewal => {}
        Need::Member => {
            if who.role == Role::Manager && !state_is_manager {
                return Err(Denied::Demoted(who.node_id.clone()));
            }
        }
        Need::Manager => {
            if who.role != Role::Manager {
                return Err(Denied::NotManager);
            }
            if !state_is_manager {
                return Err(Denied::Demoted(who.node_id.clone()));
            }
        }
    }
    Ok(node.clone())
}

/// A Raft RPC from `who` claiming to be Raft node `claimed` (the candidate
/// of a Vote, the leader of an Append or Snapshot). `members` are the Raft
/// IDs of the receiver's membership, voters and learners.
pub fn raft_caller(
    state: &ClusterState,
    members: &[u64],
    who: &NodeIdentity,
    claimed: u64,
) -> Result<(), Denied> {
    let node = caller(state, who, Need::Manager)?;
    if !members.contains(&node.raft_id) {
        return Err(Denied::NotInRaft(who.node_id.clone()));
    }
    if node.raft_id != claimed {
        return Err(Denied::NotOwnRaftId {
            node: who.node_id.clone(),
            own: node.raft_id,
            claimed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ClusterInfo;
    use mesh_common::model::NodeRole;
    use std::time::SystemTime;

    fn id(node: &str, role: Role, key: &str) -> NodeIdentity {
        NodeIdentity {
            node_id: node.into(),
            role,
            cluster_id: "c1".into(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            key_fingerprint: key.into(),
            serial: "01".into(),
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState {
            cluster: Some(ClusterInfo {
                id: "c1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        for (n, role, raft_id) in [("m1", NodeRole::Manager, 1), ("w1", NodeRole::Worker, 2)] {
            s.nodes.insert(
                n.into(),
                Node {
                    id: n.into(),
                    role,
                    raft_id,
                    key_fingerprint: format!("key-{n}"),
                    ..Default::default()
                },
            );
        }
        s
    }

    #[test]
    fn the_state_decides_not_the_certificate() {
        let mut s = state();
        assert!(caller(&s, &id("m1", Role::Manager, "key-m1"), Need::Manager).is_ok());
        assert!(caller(&s, &id("w1", Role::Worker, "key-w1"), Need::Member).is_ok());
        assert_eq!(
            caller(&s, &id("w1", Role::Worker, "key-w1"), Need::Manager),
            Err(Denied::NotManager)
        );
        // A manager certificate of a node the state calls a worker.
        assert_eq!(
            caller(&s, &id("w1", Role::Manager, "key-w1"), Need::Manager),
            Err(Denied::Demoted("w1".into()))
        );
        assert_eq!(
            caller(&s, &id("w1", Role::Manager, "key-w1"), Need::Member),
            Err(Denied::Demoted("w1".into()))
        );
        assert!(caller(&s, &id("w1", Role::Manager, "key-w1"), Need::Renewal).is_ok());
        // Another key for a known node ID (e.g. signed by a stolen CA key).
        assert_eq!(
            caller(&s, &id("m1", Role::Manager, "forged"), Need::Renewal),
            Err(Denied::WrongKey("m1".into()))
        );
        let mut other = id("m1", Role::Manager, "key-m1");
        other.cluster_id = "c2".into();
        assert_eq!(caller(&s, &other, Need::Member), Err(Denied::OtherCluster));
        s.nodes.remove("m1");
        s.removed.insert("m1".into());
        assert_eq!(
            caller(&s, &id("m1", Role::Manager, "key-m1"), Need::Renewal),
            Err(Denied::Removed("m1".into()))
        );
        assert_eq!(
            caller(&s, &id("x", Role::Manager, "k"), Need::Member),
            Err(Denied::Unknown("x".into()))
        );
    }

    #[test]
    fn raft_needs_membership_and_the_callers_own_id() {
        let s = state();
        let m1 = id("m1", Role::Manager, "key-m1");
        assert!(raft_caller(&s, &[1], &m1, 1).is_ok());
        assert_eq!(
            raft_caller(&s, &[1], &m1, 7),
            Err(Denied::NotOwnRaftId {
                node: "m1".into(),
                own: 1,
                claimed: 7
            })
        );
        assert_eq!(
            raft_caller(&s, &[3], &m1, 1),
            Err(Denied::NotInRaft("m1".into()))
        );
        assert_eq!(
            raft_caller(&s, &[1, 2], &id("w1", Role::Worker, "key-w1"), 2),
            Err(Denied::NotManager)
        );
    }
}
