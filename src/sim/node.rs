//! One simulated node: the real join, then the real session over one TLS
//! connection from its own address (heartbeats at the cluster's period,
//! the Assignments stream applied in memory with the worker's own code,
//! task states reported as a worker whose starts all succeed). No kernel
//! work.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_common::tls::{self, ReloadableIdentity};
use mesh_common::token::JoinToken;
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{Empty, HeartbeatRequest, NodeJoinRequest, NodeView, TaskReport, TaskReports};
use prost::Message;
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;

use super::stats::Stats;

/// An idle connection is pinged this often (and closed when a ping goes
/// unanswered as long): thousands of nodes must not ping every second.
const PING_EVERY: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon task reports the managers did not take are sent again.
const REPORT_RETRY: Duration = Duration::from_secs(1);
/// Until the first reply says the cluster's period.
const FIRST_PERIOD: Duration = Duration::from_millis(200);

/// What every simulated node shares: where the managers are and the CA.
pub struct Cluster {
    pub managers: Vec<String>,
    pub ca_pem: String,
    pub token: JoinToken,
    pub stats: Arc<Stats>,
}

/// A joined simulated node.
pub struct SimNode {
    pub index: usize,
    pub id: String,
    pub ip: Ipv4Addr,
    key_pem: String,
    cert_pem: String,
}

impl SimNode {
    /// Joins through `managers[index % len]` from `ip`, as `mesh join` does.
    pub async fn join(cluster: &Cluster, index: usize, ip: Ipv4Addr) -> Result<SimNode> {
        let remote = &cluster.managers[index % cluster.managers.len()];
        let request = NodeJoinRequest {
            advertise_addr: ip.to_string(),
            hostname: format!("sim-{index}"),
            os: std::env::consts::OS.into(),
            architecture: std::env::consts::ARCH.into(),
            ..Default::default()
        };
        let joined = mesh_worker::join::join(
            remote,
            Some(IpAddr::V4(ip)),
            &cluster.ca_pem,
            &cluster.token,
            request,
        )
        .await
        .with_context(|| format!("simulated node {index} ({ip})"))?;
        Ok(SimNode {
            index,
            id: joined.reply.node_id,
            ip,
            key_pem: joined.key_pem,
            cert_pem: joined.reply.cert_pem,
        })
    }

    /// Runs the node's session until `stop` turns true.
    pub async fn run(self, cluster: Arc<Cluster>, stop: watch::Receiver<bool>) {
        let identity = match ReloadableIdentity::new(&self.cert_pem, &self.key_pem) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("simulated node {}: {e}", self.index);
                return;
            }
        };
        let config = match tls::client_config(&cluster.ca_pem, Some(identity)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("simulated node {}: {e}", self.index);
                return;
            }
        };
        let node = Arc::new(Session {
            ip: self.ip,
            config,
            cluster,
            applied: watch::channel((0, 0)).0,
            channel: std::sync::Mutex::new(None),
            reopen: Notify::new(),
        });
        let beats = tokio::spawn(node.clone().heartbeats(stop.clone()));
        node.assignments(stop).await;
        let _ = beats.await;
    }
}

struct Session {
    ip: Ipv4Addr,
    config: Arc<rustls::ClientConfig>,
    cluster: Arc<Cluster>,
    /// (generation, digest) of the last view applied.
    applied: watch::Sender<(u64, u64)>,
    /// The connection to the manager believed to lead, and its address.
    channel: std::sync::Mutex<Option<(String, Channel)>>,
    /// The leader moved: the view stream follows it.
    reopen: Notify,
}

impl Session {
    /// The channel to `addr`, made now if it is not the current one.
    fn channel_to(&self, addr: &str) -> Option<Channel> {
        let mut cur = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, ch)) = cur.as_ref()
            && a == addr
        {
            return Some(ch.clone());
        }
        let ch = tls::kept_channel_from(
            addr,
            Some(IpAddr::V4(self.ip)),
            self.config.clone(),
            tls::MANAGER_SERVER_NAME,
            CONNECT_TIMEOUT,
            PING_EVERY,
        )
        .ok()?;
        *cur = Some((addr.to_string(), ch.clone()));
        Some(ch)
    }

    fn current(&self) -> Option<(String, Channel)> {
        self.channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Heartbeats every period, and at once when a new view is applied.
    async fn heartbeats(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let stats = &self.cluster.stats;
        let mut next = 0usize;
        let mut addr = self.cluster.managers[0].clone();
        let mut period = FIRST_PERIOD;
        let mut beating = false;
        let mut applied = self.applied.subscribe();
        loop {
            let Some(ch) = self.channel_to(&addr) else {
                return;
            };
            let (generation, digest) = *applied.borrow_and_update();
            let body = HeartbeatRequest {
                addr: self.ip.to_string(),
                applied_generation: generation,
                applied_hash: digest,
                ..Default::default()
            };
            stats
                .heartbeat_bytes
                .fetch_add(body.encoded_len() as u64, Ordering::Relaxed);
            let mut req = tonic::Request::new(body);
            req.set_timeout(CALL_TIMEOUT);
            let wait = match ClusterClient::new(ch).heartbeat(req).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if !beating {
                        beating = true;
                        stats.beating.fetch_add(1, Ordering::Relaxed);
                    }
                    stats
                        .heartbeat_bytes
                        .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
                    if reply.period_ms > 0 {
                        period = Duration::from_millis(u64::from(reply.period_ms));
                    }
                    period
                }
                Err(s) => {
                    stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                    let leader = s
                        .metadata()
                        .get("mesh-leader")
                        .and_then(|v| v.to_str().ok())
                        .filter(|l| !l.is_empty() && self.cluster.managers.iter().any(|m| m == l))
                        .map(str::to_string);
                    match leader {
                        Some(l) => addr = l,
                        None => {
                            next = (next + 1) % self.cluster.managers.len();
                            addr = self.cluster.managers[next].clone();
                        }
                    }
                    self.reopen.notify_waiters();
                    Duration::from_millis(150)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = applied.changed() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Keeps the Assignments stream open on the heartbeat's connection,
    /// applies each update with the worker's own code and reports tasks.
    async fn assignments(&self, stop: watch::Receiver<bool>) {
        let mut view: Option<NodeView> = None;
        self.follow(&mut view, stop).await;
        // A stopped node's tasks no longer count as held.
        let held = view.map_or(0, |v| v.tasks.len());
        self.cluster
            .stats
            .tasks
            .fetch_sub(held as i64, Ordering::Relaxed);
    }

    async fn follow(&self, view: &mut Option<NodeView>, mut stop: watch::Receiver<bool>) {
        let stats = &self.cluster.stats;
        // What each task was last reported as.
        let mut sent: HashMap<String, &'static str> = HashMap::new();
        loop {
            let reopen = self.reopen.notified();
            let opened = match self.current() {
                Some((_, ch)) => ClusterClient::new(ch)
                    .max_decoding_message_size(256 << 20)
                    .assignments(Empty {})
                    .await
                    .ok()
                    .map(|r| r.into_inner()),
                None => None,
            };
            if let Some(mut s) = opened {
                tokio::pin!(reopen);
                // Reports the managers did not take, retried as a worker's
                // next pass would.
                let mut unsent = false;
                loop {
                    let update = tokio::select! {
                        m = s.message() => m,
                        _ = tokio::time::sleep(REPORT_RETRY), if unsent => {
                            if let Some(v) = view.as_ref() {
                                unsent = !self.report(v, &mut sent).await;
                            }
                            continue;
                        }
                        _ = &mut reopen => break,
                        _ = stop.changed() => return,
                    };
                    let Ok(Some(update)) = update else { break };
                    stats
                        .view_bytes
                        .fetch_add(update.encoded_len() as u64, Ordering::Relaxed);
                    let full = matches!(
                        update.update,
                        Some(mesh_proto::view_update::Update::Full(_))
                    );
                    match mesh_worker::views::apply(view.as_ref(), update) {
                        Ok((v, _)) => {
                            if full {
                                stats.full_views.fetch_add(1, Ordering::Relaxed);
                                // A new stream: report everything again.
                                sent.clear();
                            } else {
                                stats.deltas.fetch_add(1, Ordering::Relaxed);
                            }
                            let before = view.as_ref().map_or(0, |o| o.tasks.len());
                            stats
                                .tasks
                                .fetch_add(v.tasks.len() as i64 - before as i64, Ordering::Relaxed);
                            unsent = !self.report(&v, &mut sent).await;
                            let _ = self
                                .applied
                                .send((v.generation, mesh_proto::view_digest(&v)));
                            *view = Some(v);
                        }
                        Err(_) => {
                            stats.view_errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Reports each task whose state as a worker would see it (started at
    /// once, stopped at once) differs from what was last sent; false when
    /// the managers did not take them.
    async fn report(&self, view: &NodeView, sent: &mut HashMap<String, &'static str>) -> bool {
        let mut reports = Vec::new();
        sent.retain(|id, _| view.tasks.iter().any(|t| t.id == *id));
        for t in &view.tasks {
            let state = if t.desired_state == "running" {
                "running"
            } else {
                "shutdown"
            };
            if t.known_state == state || sent.get(&t.id) == Some(&state) {
                continue;
            }
            sent.insert(t.id.clone(), state);
            reports.push(TaskReport {
                task_id: t.id.clone(),
                state: state.into(),
                health: if t.health.is_some() && state == "running" {
                    "healthy".into()
                } else {
                    String::new()
                },
                ..Default::default()
            });
        }
        if reports.is_empty() {
            return true;
        }
        let Some((_, ch)) = self.current() else {
            return false;
        };
        let count = reports.len() as u64;
        let mut req = tonic::Request::new(TaskReports {
            reports: reports.clone(),
        });
        req.set_timeout(CALL_TIMEOUT);
        match ClusterClient::new(ch).report_tasks(req).await {
            Ok(_) => {
                self.cluster
                    .stats
                    .task_reports
                    .fetch_add(count, Ordering::Relaxed);
                true
            }
            Err(_) => {
                for r in reports {
                    sent.remove(&r.task_id);
                }
                false
            }
        }
    }
}
