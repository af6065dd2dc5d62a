//! Task logs live on the node that ran the task. Each node keeps a stream
//! open to every manager (`LogRequests`); a manager asked for a service's
//! logs sends a request down the streams of the nodes holding its tasks,
//! and the nodes answer with `PublishLogs` chunks routed back here by
//! request ID. Nodes expose no port of their own.
//!
//! A node may never answer (it hangs, or its stream is stuck): every wait
//! here is bounded by [`NODE_TIMEOUT`], and a request's routing entry lives
//! exactly as long as the [`LogStream`] waiting on it, so nothing leaks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::{LogChunk, LogRequest};
use tokio::sync::mpsc;

/// How long a node may stay silent (no chunk) on a log request.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Request ID to the node it was sent to and where its chunks go.
type Pending = Arc<Mutex<HashMap<String, (String, mpsc::Sender<LogChunk>)>>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("node {0} is not connected to this manager")]
    NotConnected(String),
    #[error(
        "node {node} did not answer the log request within {}s; its tasks' logs are missing (is the node overloaded or partitioned? see `mesh node ls`)",
        idle.as_secs()
    )]
    Timeout { node: String, idle: Duration },
}

pub struct LogRouter {
    nodes: Mutex<HashMap<String, mpsc::Sender<LogRequest>>>,
    pending: Pending,
    idle: Duration,
}

impl Default for LogRouter {
    fn default() -> Self {
        Self::with_timeout(NODE_TIMEOUT)
    }
}

impl LogRouter {
    /// A router that gives up on a node silent for `idle`.
    pub fn with_timeout(idle: Duration) -> Self {
        Self {
            nodes: Mutex::default(),
            pending: Pending::default(),
            idle,
        }
    }

    /// A node opened its request stream (a newer one replaces the old).
    pub fn register(&self, node_id: &str) -> mpsc::Receiver<LogRequest> {
        let (tx, rx) = mpsc::channel(16);
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node_id.to_string(), tx);
        rx
    }

    /// Asks `node_id` for the logs of `task_ids`; the chunks arrive on the
    /// returned stream. `node` names the node in errors (its hostname).
    pub async fn request(
        &self,
        node_id: &str,
        node: &str,
        task_ids: Vec<String>,
    ) -> Result<LogStream, LogError> {
        let tx = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node_id)
            .cloned()
            .ok_or_else(|| LogError::NotConnected(node.to_string()))?;
        let request_id = mesh_common::id::new_id();
        let (chunks_tx, rx) = mpsc::channel(64);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.clone(), (node_id.to_string(), chunks_tx));
        // From here the entry is removed when `stream` is dropped.
        let mut stream = LogStream {
            node: node.to_string(),
            request_id: request_id.clone(),
            rx,
            pending: self.pending.clone(),
            idle: self.idle,
            finished: false,
        };
        let req = LogRequest {
            request_id,
            task_ids,
        };
        // A node that does not read its stream fills it: bounded too.
        match tokio::time::timeout(self.idle, tx.send(req)).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(_)) => Err(LogError::NotConnected(stream.node.clone())),
            Err(_) => Err(stream.timed_out()),
        }
    }

    /// Node `from`'s answer; false if nobody waits for it any more, or the
    /// request was not sent to `from` (a node answers only its own).
    pub async fn publish(&self, from: &str, chunk: LogChunk) -> bool {
        let tx = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.get(&chunk.request_id) {
                Some((node, _)) if node != from => None,
                Some(_) if chunk.done => pending.remove(&chunk.request_id).map(|(_, tx)| tx),
                Some((_, tx)) => Some(tx.clone()),
                None => None,
            }
        };
        match tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }

    /// Requests still waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The answer to one log request, chunk by chunk.
pub struct LogStream {
    node: String,
    request_id: String,
    rx: mpsc::Receiver<LogChunk>,
    pending: Pending,
    idle: Duration,
    finished: bool,
}

impl LogStream {
    /// The next chunk, or None once a chunk said `done`. Fails if the node
    /// sends nothing for the router's timeout; the request is then dropped,
    /// and later chunks for it are refused.
    pub async fn next(&mut self) -> Result<Option<LogChunk>, LogError> {
        if self.finished {
            return Ok(None);
        }
        match tokio::time::timeout(self.idle, self.rx.recv()).await {
            Ok(Some(chunk)) => {
                self.finished = chunk.done;
                Ok(Some(chunk))
            }
            // Only the router drops the sender, after a `done` chunk.
            Ok(None) => {
                self.finished = true;
                Ok(None)
            }
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&mut self) -> LogError {
        self.finished = true;
        self.forget();
        LogError::Timeout {
            node: self.node.clone(),
            idle: self.idle,
        }
    }

    fn forget(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.request_id);
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, done: bool) -> LogChunk {
        LogChunk {
            request_id: id.to_string(),
            lines: Vec::new(),
            done,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_node_times_out_and_is_forgotten() {
        let router = LogRouter::default();
        let _requests = router.register("n1");
        let mut stream = router
            .request("n1", "host1", vec!["t".into()])
            .await
            .expect("request");
        assert_eq!(router.pending(), 1);
        let started = tokio::time::Instant::now();
        let err = stream.next().await.expect_err("must time out");
        assert_eq!(started.elapsed(), NODE_TIMEOUT);
        assert!(
            err.to_string().contains("node host1 did not answer"),
            "{err}"
        );
        assert_eq!(router.pending(), 0);
        // A late answer finds nobody waiting.
        assert!(!router.publish("n1", chunk(&stream.request_id, false)).await);
        assert_eq!(stream.next().await, Ok(None));
    }

    #[tokio::test(start_paused = true)]
    async fn each_chunk_restarts_the_wait() {
        let router = LogRouter::default();
        let mut requests = router.register("n1");
        let mut stream = router
            .request("n1", "host1", Vec::new())
            .await
            .expect("request");
        let id = requests.recv().await.expect("request sent").request_id;
        for _ in 0..3 {
            tokio::time::sleep(NODE_TIMEOUT - Duration::from_secs(1)).await;
            assert!(router.publish("n1", chunk(&id, false)).await);
            assert!(stream.next().await.expect("chunk").is_some());
        }
        assert!(
            !router.publish("n2", chunk(&id, true)).await,
            "another node cannot answer (or end) n1's request"
        );
        assert!(router.publish("n1", chunk(&id, true)).await);
        assert!(stream.next().await.expect("done").is_some_and(|c| c.done));
        assert_eq!(stream.next().await, Ok(None));
        assert_eq!(router.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_wait_is_forgotten() {
        let router = LogRouter::default();
        let _requests = router.register("n1");
        let stream = router.request("n1", "host1", Vec::new()).await;
        assert_eq!(router.pending(), 1);
        drop(stream);
        assert_eq!(router.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_not_reading_its_stream_times_out() {
        let router = LogRouter::default();
        let _requests = router.register("n1");
        // Fill the node's request stream.
        let mut streams = Vec::new();
        for _ in 0..16 {
            streams.push(
                router
                    .request("n1", "host1", Vec::new())
                    .await
                    .expect("queued"),
            );
        }
        let err = router
            .request("n1", "host1", Vec::new())
            .await
            .err()
            .expect("must time out");
        assert!(matches!(err, LogError::Timeout { .. }), "{err}");
        assert_eq!(router.pending(), 16);
        drop(streams);
        assert_eq!(router.pending(), 0);
    }

    #[tokio::test]
    async fn an_unknown_node_is_refused() {
        let router = LogRouter::default();
        let err = router.request("n9", "host9", Vec::new()).await.err();
        assert_eq!(err, Some(LogError::NotConnected("host9".into())));
        assert_eq!(router.pending(), 0);
    }
}
