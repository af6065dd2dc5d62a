//! The node's side of `mesh service logs`: a stream of log requests kept
//! open to every manager, answered from the tasks' output files. The node
//! dials out only; it serves no port.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{Empty, LogChunk, LogLine, LogRequest};
use tokio::sync::watch;
use tracing::debug;

use crate::managers::Managers;
use crate::sandboxes::Sandboxes;

/// Lines per chunk: keeps each message well under gRPC's 4 MiB limit.
const LINES_PER_CHUNK: usize = 2000;

/// Keeps one request stream per known manager until `stop`.
pub async fn serve(
    managers: Managers,
    sandboxes: Arc<Sandboxes>,
    hostname: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut streams: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let addrs = managers.addrs();
        streams.retain(|a, h| {
            let keep = addrs.contains(a) && !h.is_finished();
            if !keep {
                h.abort();
            }
            keep
        });
        for a in addrs {
            if let std::collections::hash_map::Entry::Vacant(slot) = streams.entry(a.clone()) {
                slot.insert(tokio::spawn(follow(
                    managers.clone(),
                    a,
                    sandboxes.clone(),
                    hostname.clone(),
                )));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.changed() => break,
        }
    }
    for h in streams.values() {
        h.abort();
    }
}

async fn follow(managers: Managers, addr: String, sandboxes: Arc<Sandboxes>, hostname: String) {
    let Ok(ch) = managers.channel_to(&addr) else {
        return;
    };
    let mut client = ClusterClient::new(ch);
    let mut stream = match client.log_requests(Empty {}).await {
        Ok(s) => s.into_inner(),
        Err(s) => {
            debug!(manager = %addr, "no log request stream: {}", s.message());
            return;
        }
    };
    while let Ok(Some(req)) = stream.message().await {
        answer(&mut client, &sandboxes, &hostname, req).await;
    }
}

async fn answer(
    client: &mut ClusterClient<tonic::transport::Channel>,
    sandboxes: &Sandboxes,
    hostname: &str,
    req: LogRequest,
) {
    let mut lines = Vec::new();
    for id in &req.task_ids {
        let task = sandboxes
            .list()
            .into_iter()
            .find(|r| r.id == *id)
            .map_or_else(|| id.clone(), |r| r.name);
        if let Some(text) = sandboxes.task_log(id) {
            for l in text.lines() {
                lines.push(LogLine {
                    task: task.clone(),
                    node: hostname.to_string(),
                    line: l.to_string(),
                    stderr: false,
                });
            }
        }
    }
    let mut chunks: Vec<Vec<LogLine>> = lines
        .chunks(LINES_PER_CHUNK)
        .map(<[LogLine]>::to_vec)
        .collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    let last = chunks.len() - 1;
    for (i, lines) in chunks.into_iter().enumerate() {
        let chunk = LogChunk {
            request_id: req.request_id.clone(),
            lines,
            done: i == last,
        };
        if client.publish_logs(chunk).await.is_err() {
            return;
        }
    }
}
