//! The simulator's counters, printed as one `stats:` line of key=value
//! pairs that a person can read and a benchmark can parse.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    pub heartbeats: AtomicU64,
    pub heartbeat_errors: AtomicU64,
    /// Requests and replies, as encoded protobuf (no TLS or HTTP/2 framing).
    pub heartbeat_bytes: AtomicU64,
    pub full_views: AtomicU64,
    pub deltas: AtomicU64,
    /// Updates that did not apply (wrong base or digest): the stream is
    /// reopened for a whole view, as a worker does.
    pub view_errors: AtomicU64,
    pub view_bytes: AtomicU64,
    pub task_reports: AtomicU64,
    /// Tasks in the live nodes' views, summed.
    pub tasks: AtomicI64,
    /// Nodes whose first heartbeat was answered.
    pub beating: AtomicU64,
}

impl Stats {
    pub fn line(&self, nodes: usize, alive: usize) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "stats: nodes={nodes} alive={alive} tasks={} heartbeats={} heartbeat_errors={} heartbeat_bytes={} full_views={} deltas={} view_errors={} view_bytes={} task_reports={}",
            self.tasks.load(Ordering::Relaxed),
            get(&self.heartbeats),
            get(&self.heartbeat_errors),
            get(&self.heartbeat_bytes),
            get(&self.full_views),
            get(&self.deltas),
            get(&self.view_errors),
            get(&self.view_bytes),
            get(&self.task_reports),
        )
    }
}
