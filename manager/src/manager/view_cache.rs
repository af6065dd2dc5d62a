//! Node views computed once per applied state, for every caller: each
//! node's Assignments stream, and `behind`, which every waiting `service
//! create` or `update` polls ten times a second. Each of them used to index
//! the whole state and hash each view itself: a quarter of the leader's CPU
//! while 300 tasks started.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mesh_proto::NodeView;
use tokio::sync::watch;

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

/// The views of the nodes streaming from this manager, all at one index.
pub type Published = HashMap<String, NodeViewAt>;

/// How often views are published at most: a burst of changes (300 tasks
/// reporting) is taken together.
const VIEW_SPACING: Duration = Duration::from_millis(50);

/// Publishes the views of every node with an open stream after each
/// change, at most once per [`VIEW_SPACING`], and waits as long again as a
/// publication took, so views never take more than half this manager's
/// time. Each stream used to compute its own view at its own index, so
/// every one re-indexed the whole state (`Views::new`): with 200 simulated
/// nodes that was 88% of the leader's CPU and its apply fell 370 entries
/// behind. Now one index of the state serves every stream.
pub(super) async fn publish(mgr: Weak<Manager>, mut stop: watch::Receiver<bool>) {
    let Some(mut applied) = mgr.upgrade().map(|m| m.sm.subscribe()) else {
        return;
    };
    loop {
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        let Some(m) = mgr.upgrade() else { return };
        let started = Instant::now();
        applied.borrow_and_update();
        let nodes: Vec<String> = m
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        if !nodes.is_empty() {
            let views: Published = m.node_views(|_| nodes).into_iter().collect();
            m.published.send_replace(Arc::new(views));
        }
        drop(m);
        let rest = VIEW_SPACING.max(started.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(rest) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A node's open Assignments stream, counted while it lives.
pub struct Streaming {
    mgr: Arc<Manager>,
    node: String,
}

impl Manager {
    /// Counts a stream of `node`; its views are published until the guard
    /// drops. Returns the publications to follow.
    pub fn stream_views(
        self: &Arc<Self>,
        node: &str,
    ) -> (Streaming, watch::Receiver<Arc<Published>>) {
        *self
            .streaming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(node.to_string())
            .or_default() += 1;
        let guard = Streaming {
            mgr: self.clone(),
            node: node.to_string(),
        };
        (guard, self.published.subscribe())
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let mut s = self.mgr.streaming.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = s.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.remove(&self.node);
            }
        }
    }
}
