//! The scheduler's choice of node, as pure functions of the nodes and their
//! loads: which nodes may take a service's task (ready, active, and
//! satisfying its constraints), and which of them takes it (spread: fewest
//! tasks of the service, then fewest tasks overall, then the lowest ID, so
//! every manager picks the same one).

use mesh_common::model::{Availability, NodeState};

use crate::state::Node;
use mesh_common::refusal::Refusal;

/// One `node.X==V` / `node.X!=V` scheduling constraint.
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    key: String,
    equal: bool,
    value: String,
}

impl Constraint {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        let (key, equal, value) = if let Some((k, v)) = s.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = s.split_once("!=") {
            (k, false, v)
        } else {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: use node.role==worker, node.hostname==H, node.id==ID or node.labels.K==V (or !=)"
            )));
        };
        let key = key.trim();
        let value = value.trim();
        let known = matches!(key, "node.role" | "node.hostname" | "node.id")
            || key
                .strip_prefix("node.labels.")
                .is_some_and(|k| !k.is_empty());
        if !known || value.is_empty() {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: use node.role==worker, node.hostname==H, node.id==ID or node.labels.K==V (or !=)"
            )));
        }
        if key == "node.role" && !matches!(value, "worker" | "manager") {
            return Err(Refusal::invalid(format!(
                "invalid constraint {s:?}: node.role is worker or manager"
            )));
        }
        Ok(Constraint {
            key: key.to_string(),
            equal,
            value: value.to_string(),
        })
    }

    pub fn matches(&self, n: &Node) -> bool {
        let actual = match self.key.as_str() {
            "node.role" => Some(n.role.as_str()),
            "node.hostname" => Some(n.hostname.as_str()),
            "node.id" => Some(n.id.as_str()),
            k => k
                .strip_prefix("node.labels.")
                .and_then(|l| n.labels.get(l))
                .map(String::as_str),
        };
        (actual == Some(self.value.as_str())) == self.equal
    }
}

/// Whether the scheduler may place anything on `n` at all.
pub fn schedulable(n: &Node) -> bool {
    n.state == NodeState::Ready && n.availability == Availability::Active
}

/// The IDs of the nodes that may take a task with these constraints, in
/// ID order. Constraints that do not parse were refused at create time;
/// any left over constrain nothing.
pub fn eligible<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    constraints: &[String],
) -> Vec<String> {
    let constraints: Vec<Constraint> = constraints
        .iter()
        .filter_map(|c| Constraint::parse(c).ok())
        .collect();
    nodes
        .into_iter()
        .filter(|n| schedulable(n))
        .filter(|n| constraints.iter().all(|c| c.matches(n)))
        .map(|n| n.id.clone())
        .collect()
}

/// Why no node can take a task, in Docker's words.
pub fn no_node_reason<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    constraints: &[String],
) -> String {
    let ready = nodes.into_iter().filter(|n| schedulable(n)).count();
    if ready == 0 || constraints.is_empty() {
        return "no suitable node (no node is ready and active)".into();
    }
    format!(
        "no suitable node (scheduling constraints not satisfied on {ready} node{})",
        if ready == 1 { "" } else { "s" }
    )
}

/// The spread choice among `eligible` nodes; `load` gives a node's live
/// tasks (of this service, overall).
pub fn spread(eligible: &[String], load: impl Fn(&str) -> (usize, usize)) -> Option<String> {
    eligible
        .iter()
        .min_by_key(|n| (load(n), n.as_str()))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::model::NodeRole;

    fn node(id: &str, state: NodeState, availability: Availability) -> Node {
        Node {
            id: id.into(),
            hostname: format!("h-{id}"),
            role: NodeRole::Worker,
            state,
            availability,
            ..Default::default()
        }
    }

    #[test]
    fn only_ready_active_nodes_that_satisfy_constraints() {
        let mut labelled = node("c", NodeState::Ready, Availability::Active);
        labelled.labels.insert("zone".into(), "x".into());
        let nodes = [
            node("a", NodeState::Ready, Availability::Active),
            node("b", NodeState::Down, Availability::Active),
            labelled,
            node("d", NodeState::Ready, Availability::Drain),
        ];
        assert_eq!(eligible(&nodes, &[]), ["a", "c"]);
        assert_eq!(eligible(&nodes, &["node.labels.zone==x".into()]), ["c"]);
        assert_eq!(eligible(&nodes, &["node.hostname!=h-a".into()]), ["c"]);
        let none = ["node.role==manager".to_string()];
        assert!(eligible(&nodes, &none).is_empty());
        assert_eq!(
            no_node_reason(&nodes, &none),
            "no suitable node (scheduling constraints not satisfied on 2 nodes)"
        );
        assert_eq!(
            no_node_reason(&nodes[1..2], &[]),
            "no suitable node (no node is ready and active)"
        );
    }

    #[test]
    fn spread_prefers_fewest_of_the_service_then_fewest_overall_then_id() {
        let nodes = ["a".to_string(), "b".into(), "c".into()];
        let load = |n: &str| match n {
            "a" => (1, 0),
            "b" => (0, 5),
            _ => (0, 2),
        };
        assert_eq!(spread(&nodes, load).as_deref(), Some("c"));
        assert_eq!(spread(&nodes, |_| (0, 0)).as_deref(), Some("a"));
        assert_eq!(spread(&[], |_| (0, 0)), None);
    }

    #[test]
    fn constraints_parse_or_say_how() {
        assert!(Constraint::parse("node.labels.k==v").is_ok());
        assert!(
            Constraint::parse("node.color=red").is_err_and(|e| e.contains("invalid constraint"))
        );
        assert!(
            Constraint::parse("node.role==boss").is_err_and(|e| e.contains("worker or manager"))
        );
    }
}
