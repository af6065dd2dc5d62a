//! Task logs live on the node that ran the task. Each node keeps a stream
//! open to every manager (`LogRequests`); a manager asked for a service's
//! logs sends a request down the streams of the nodes holding its tasks,
//! and the nodes answer with `PublishLogs` chunks routed back here by
//! request ID. Nodes expose no port of their own.

use std::collections::HashMap;
use std::sync::Mutex;

use mesh_proto::{LogChunk, LogRequest};
use tokio::sync::mpsc;

#[derive(Default)]
pub struct LogRouter {
    nodes: Mutex<HashMap<String, mpsc::Sender<LogRequest>>>,
    pending: Mutex<HashMap<String, mpsc::Sender<LogChunk>>>,
}

impl LogRouter {
    /// A node opened its request stream (a newer one replaces the old).
    pub fn register(&self, node_id: &str) -> mpsc::Receiver<LogRequest> {
        let (tx, rx) = mpsc::channel(16);
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node_id.to_string(), tx);
        rx
    }

    /// Asks `node_id` for the logs of `task_ids`; chunks arrive on the
    /// returned receiver until one says `done`.
    pub async fn request(
        &self,
        node_id: &str,
        task_ids: Vec<String>,
    ) -> Result<mpsc::Receiver<LogChunk>, String> {
        let tx = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node_id)
            .cloned()
            .ok_or_else(|| format!("node {node_id} is not connected to this manager"))?;
        let request_id = mesh_common::id::new_id();
        let (chunks_tx, chunks_rx) = mpsc::channel(64);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.clone(), chunks_tx);
        let sent = tx
            .send(LogRequest {
                request_id: request_id.clone(),
                task_ids,
            })
            .await;
        if sent.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&request_id);
            return Err(format!("node {node_id} is not connected to this manager"));
        }
        Ok(chunks_rx)
    }

    /// A node's answer; false if nobody waits for it any more.
    pub async fn publish(&self, chunk: LogChunk) -> bool {
        let tx = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if chunk.done {
                pending.remove(&chunk.request_id)
            } else {
                pending.get(&chunk.request_id).cloned()
            }
        };
        match tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        }
    }
}
