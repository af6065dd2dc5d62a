//! Node views computed once per applied state, for every caller: each
//! node's Assignments stream, and `behind`, which every waiting `service
//! create` or `update` polls ten times a second. Each of them used to index
//! the whole state and hash each view itself: a quarter of the leader's CPU
//! while 300 tasks started.

use std::collections::HashMap;
use std::sync::Arc;

use mesh_proto::NodeView;

use super::Manager;
use crate::state::ClusterState;

/// One node's view and its digest.
#[derive(Clone)]
pub struct NodeViewAt {
    pub view: Arc<NodeView>,
    pub digest: u64,
}

/// The views computed at one applied index.
#[derive(Default)]
pub(super) struct ViewCache {
    index: Option<u64>,
    by_node: HashMap<String, NodeViewAt>,
}

impl Manager {
    /// The views of the nodes `pick` chooses from the current state, each
    /// stamped with the state's applied index as its generation, in
    /// `pick`'s order. All in one read of the state.
    pub fn node_views(
        &self,
        pick: impl FnOnce(&ClusterState) -> Vec<String>,
    ) -> Vec<(String, NodeViewAt)> {
        self.sm.read_indexed(|s, index| {
            let nodes = pick(s);
            let mut cache = self.view_cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.index != Some(index) {
                cache.index = Some(index);
                cache.by_node.clear();
            }
            let mut views = None;
            nodes
                .into_iter()
                .map(|node| {
                    if let Some(v) = cache.by_node.get(&node) {
                        return (node, v.clone());
                    }
                    let views = views.get_or_insert_with(|| crate::dispatcher::Views::new(s));
                    let view = views.view(&node, index);
                    let at = NodeViewAt {
                        digest: mesh_proto::view_digest(&view),
                        view: Arc::new(view),
                    };
                    cache.by_node.insert(node.clone(), at.clone());
                    (node, at)
                })
                .collect()
        })
    }

    /// One node's view now (see [`Self::node_views`]).
    pub fn node_view(&self, node: &str) -> NodeViewAt {
        let mut v = self.node_views(|_| vec![node.to_string()]);
        match v.pop() {
            Some((_, at)) => at,
            // `pick` gave one node, so one came back.
            None => NodeViewAt {
                view: Arc::new(NodeView::default()),
                digest: 0,
            },
        }
    }
}
