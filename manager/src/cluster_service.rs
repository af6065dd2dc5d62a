//! The gRPC service nodes call on managers over TLS: join, heartbeat,
//! certificate renewal, and (managers only) writes forwarded to the leader and
//! Raft membership requests. Each method checks its caller against the
//! current cluster state (`authz`), since a joining node has no certificate
//! yet and a certificate alone says nothing of who is still a member.

use std::sync::Arc;
use std::time::Instant;

use mesh_common::model::{Availability, NodeRole, NodeState, UnknownWord};
use mesh_common::pki::{NodeIdentity, Role};
use mesh_common::token::{self, ProofSide};
use mesh_common::{id, tls};
use mesh_proto::cluster_server;
use mesh_proto::*;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// The least time between two views computed for one node's Assignments
/// stream: a change waits at most this long to be taken together with
/// those that follow it. While 300 tasks start, a view of their network
/// takes about a millisecond to build and digest, and at 20 ms the three
/// streams still took a fifth of the leader's CPU.
use crate::authz::{self, Need};
use crate::dispatcher;
use crate::join_limit::JoinLimiter;
use crate::manager::{Manager, ManagerError, now};
use crate::state::{Command, CommandResult, Node};

pub struct ClusterService {
    mgr: Arc<Manager>,
    joins: Arc<JoinLimiter>,
}

impl ClusterService {
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self {
            mgr,
            joins: Arc::default(),
        }
    }

    /// The caller's identity and node, if the state lets it make a call
    /// that needs `need`.
    fn caller<T>(&self, req: &Request<T>, need: Need) -> Result<(NodeIdentity, Node), Status> {
        let who = tls::peer_identity(req)
            .ok_or_else(|| Status::unauthenticated(authz::Denied::NoCertificate.to_string()))?;
        let node = self
            .mgr
            .read(|s| authz::caller(s, &who, need))
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok((who, node))
    }

    /// The caller must be a current member (see [`Need::Member`]).
    fn member<T>(&self, req: &Request<T>) -> Result<(NodeIdentity, Node), Status> {
        self.caller(req, Need::Member)
    }

    /// The caller must hold a manager certificate and still be a manager.
    fn manager_member<T>(&self, req: &Request<T>) -> Result<Node, Status> {
        self.caller(req, Need::Manager).map(|(_, n)| n)
    }

    fn not_leader(&self) -> Status {
        let addr = self.mgr.leader_addr().unwrap_or_default();
        let mut s = Status::failed_precondition(format!("not the leader; leader is {addr}"));
        if let Ok(v) = addr.parse() {
            s.metadata_mut().insert("mesh-leader", v);
        }
        // Who the managers are, as on a heartbeat reply: a node that missed
        // a manager's arrival (it was down) must learn it here, or it could
        // never trust the leader it is sent to.
        let managers = managers_of(&self.mgr)
            .iter()
            .map(|m| format!("{}={}", m.node_id, m.key_fingerprint))
            .collect::<Vec<_>>()
            .join(",");
        if let Ok(v) = managers.parse() {
            s.metadata_mut().insert(mesh_proto::MANAGERS_HEADER, v);
        }
        s
    }

    /// Which join secret `proof` was made with, if any: the role it grants
    /// and the secret (to prove ourselves back with).
    fn prove_join(
        cluster: &crate::state::ClusterInfo,
        proof: &[u8],
        exporter: &[u8; 32],
        content: &[u8],
    ) -> Option<(Role, String)> {
        [
            (Role::Manager, &cluster.manager_token),
            (Role::Worker, &cluster.worker_token),
        ]
        .into_iter()
        .find_map(|(role, tok)| {
            let secret = token::parse(tok).ok()?.secret;
            let want = token::join_proof(&secret, ProofSide::Node, exporter, content);
            token::proofs_match(proof, &want).then_some((role, secret))
        })
    }
}

/// Ends when the caller of a stream may no longer make `need` calls
/// (removed, demoted, re-keyed), re-checked at every state change; the
/// stream then ends with the reason.
async fn revoked(mgr: &Manager, who: &NodeIdentity, need: Need) -> Status {
    let mut applied = mgr.sm.subscribe();
    loop {
        if let Err(e) = mgr.read(|s| authz::caller(s, who, need)) {
            return Status::permission_denied(e.to_string());
        }
        if applied.changed().await.is_err() {
            return Status::unavailable("this manager is shutting down");
        }
    }
}

fn to_status(e: ManagerError) -> Status {
    e.into()
}

/// The current managers, with the keys nodes must see them present.
pub fn managers_of(mgr: &Manager) -> Vec<RemoteManager> {
    mgr.read(|s| {
        s.nodes
            .values()
            .filter(|n| n.role == NodeRole::Manager && !n.manager_addr.is_empty())
            .map(|n| RemoteManager {
                node_id: n.id.clone(),
                addr: n.manager_addr.clone(),
                key_fingerprint: n.key_fingerprint.clone(),
            })
            .collect()
    })
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn get_ca(&self, _req: Request<Empty>) -> Result<Response<CaResponse>, Status> {
        let ca = self
            .mgr
            .read(|s| s.cluster.as_ref().map(|c| c.ca_cert_pem.clone()));
        ca.map(|ca_cert_pem| Response::new(CaResponse { ca_cert_pem }))
            .ok_or_else(|| Status::unavailable("this manager has no cluster state yet"))
    }

    async fn join(
        &self,
        req: Request<NodeJoinRequest>,
    ) -> Result<Response<NodeJoinResponse>, Status> {
        let info = tls::peer_info(&req).cloned().unwrap_or_default();
        let source = info.remote.map(|a| a.ip());
        if let Some(ip) = source
            && let Err(wait) = self.joins.check(ip, Instant::now())
        {
            return Err(Status::resource_exhausted(format!(
                "too many failed join attempts from {ip}: try again in {wait} s"
            )));
        }
        let exporter = info
            .exporter
            .ok_or_else(|| Status::failed_precondition("join needs a TLS 1.3 connection"))?;
        let r = req.into_inner();
        let content = mesh_proto::join_request_content(&r);
        let cluster = self
            .mgr
            .read(|s| s.cluster.clone())
            .ok_or_else(|| Status::unavailable("this manager has no cluster state yet"))?;
        let Some((role, secret)) = Self::prove_join(&cluster, &r.proof, &exporter, &content) else {
            if let Some(ip) = source {
                self.joins.failed(ip, Instant::now());
            }
            warn!(source = ?source, "join refused: no valid join proof");
            return Err(Status::permission_denied(
                "invalid join token: it is wrong or has been rotated; get the current one with `mesh join-token worker` (or manager) on a manager",
            ));
        };
        if let Some(why) = self.mgr.read(|s| s.hostname_taken(&r.hostname, "")) {
            return Err(Status::already_exists(why));
        }
        let node_id = id::new_id();
        let cert_pem = crate::ca::sign(&cluster, &r.csr_pem, &node_id, role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = mesh_common::pki::identity_from_pem(&cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let at = now();
        let node = Node {
            id: node_id.clone(),
            // Every node has its Raft ID from the start, so a promotion
            // needs no new allocation.
            raft_id: id::raft_id(&node_id),
            hostname: r.hostname,
            role: role.into(),
            availability: Availability::Active,
            addr: r.advertise_addr.clone(),
            joined_addr: r.advertise_addr,
            manager_addr: r.manager_addr,
            state: NodeState::Unknown,
            created_at: at.clone(),
            updated_at: at,
            os: r.os,
            architecture: r.architecture,
            key_fingerprint: cert.key_fingerprint,
            cert_serial: cert.serial,
            cert_not_after: crate::manager::rfc3339(cert.not_after),
            ..Default::default()
        };
        self.mgr
            .write(Command::AddNode { node })
            .await
            .map_err(to_status)?;
        info!(node = %node_id, role = role.as_str(), "node joined");
        let mut reply = NodeJoinResponse {
            node_id,
            role: role.as_str().into(),
            cert_pem,
            ca_cert_pem: cluster.ca_cert_pem,
            cluster_id: cluster.id,
            managers: managers_of(&self.mgr),
            proof: Vec::new(),
        };
        reply.proof = token::join_proof(
            &secret,
            ProofSide::Manager,
            &exporter,
            &mesh_proto::join_reply_content(&reply),
        );
        Ok(Response::new(reply))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let (_, node) = self.caller(&req, Need::Renewal)?;
        if !self.mgr.is_leader() {
            return Err(self.not_leader());
        }
        let peer = tls::peer_info(&req).and_then(|i| i.remote).map(|a| a.ip());
        let r = req.into_inner();
        self.mgr
            .heartbeat(&node, &r, peer)
            .await
            .map_err(to_status)?;
        let rotation_secs = self.mgr.read(|s| {
            s.cluster
                .as_ref()
                .map_or(0, |c| c.encryption_key_rotation_secs)
        });
        let (period, grace) = self.mgr.liveness();
        Ok(Response::new(HeartbeatResponse {
            role: node.role.to_string(),
            managers: managers_of(&self.mgr),
            leader_id: self.mgr.node_id.clone(),
            period_ms: u32::try_from(period.as_millis()).unwrap_or(u32::MAX),
            node_down_grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            cluster_id: self
                .mgr
                .read(|s| s.cluster.as_ref().map(|c| c.id.clone()))
                .unwrap_or_default(),
            encryption_key_rotations: node.encryption_key_rotations,
            encryption_key_rotation_secs: rotation_secs,
        }))
    }

    async fn renew_cert(
        &self,
        req: Request<RenewCertRequest>,
    ) -> Result<Response<RenewCertResponse>, Status> {
        let (_, node) = self.caller(&req, Need::Renewal)?;
        let role: Role = node.role.into();
        let cluster = self
            .mgr
            .read(|s| s.cluster.clone())
            .ok_or_else(|| Status::unavailable("no cluster state"))?;
        let cert_pem = crate::ca::sign(&cluster, &req.into_inner().csr_pem, &node.id, role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cert = mesh_common::pki::identity_from_pem(&cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        // Recorded before it is handed out; refused unless it is for the
        // key the node was pinned to.
        self.mgr
            .write(Command::SetNodeCert {
                id: node.id.clone(),
                key_fingerprint: cert.key_fingerprint,
                serial: cert.serial,
                not_after: crate::manager::rfc3339(cert.not_after),
            })
            .await
            .map_err(to_status)?;
        info!(node = %node.id, role = role.as_str(), "renewed node certificate");
        Ok(Response::new(RenewCertResponse {
            cert_pem,
            role: node.role.to_string(),
        }))
    }

    async fn propose(
        &self,
        req: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        self.manager_member(&req)?;
        let cmd: Command = serde_json::from_slice(&req.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("bad command: {e}")))?;
        if !self.mgr.is_leader() {
            return Err(self.not_leader());
        }
        let result = self.mgr.propose_local(cmd).await?;
        let result = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProposeResponse { result }))
    }

    async fn read_index(&self, req: Request<Empty>) -> Result<Response<ReadIndexReply>, Status> {
        self.manager_member(&req)?;
        if !self.mgr.is_leader() {
            return Err(self.not_leader());
        }
        let index = self.mgr.leader_read_index().await?;
        Ok(Response::new(ReadIndexReply { index }))
    }

    async fn join_raft(&self, req: Request<JoinRaftRequest>) -> Result<Response<Empty>, Status> {
        let node = self.manager_member(&req)?;
        if !self.mgr.is_leader() {
            return Err(self.not_leader());
        }
        let r = req.into_inner();
        if r.remove {
            // Demotion, asked by whichever manager took the command.
            let target = self
                .mgr
                .read(|s| s.nodes.get(&r.node_id).map(|n| n.raft_id));
            let raft_id =
                target.ok_or_else(|| Status::not_found(format!("node {} not found", r.node_id)))?;
            self.mgr.remove_voter(raft_id).await.map_err(to_status)?;
            info!(node = %r.node_id, "manager left Raft");
            return Ok(Response::new(Empty {}));
        }
        if r.node_id != node.id {
            return Err(Status::permission_denied(
                "a manager can only add itself to Raft",
            ));
        }
        self.mgr
            .add_voter(node.raft_id, &r.addr)
            .await
            .map_err(to_status)?;
        info!(node = %node.id, addr = %r.addr, "manager joined Raft");
        Ok(Response::new(Empty {}))
    }

    type AssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<ViewUpdate, Status>>;

    /// The whole view first, then a delta at each applied change that
    /// changes it. Authorization is re-checked at every change.
    async fn assignments(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let (who, node) = self.member(&req)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mgr = self.mgr.clone();
        tokio::spawn(async move {
            let (_streaming, mut published) = mgr.stream_views(&node.id);
            published.borrow_and_update();
            // The first view now, of the state now; then each publication.
            let mut now = Some(mgr.node_view(&node.id));
            let mut last: Option<Arc<NodeView>> = None;
            loop {
                // Removal or demotion ends the stream at the change itself.
                if let Err(e) = mgr.read(|s| authz::caller(s, &who, Need::Member)) {
                    let _ = tx.send(Err(Status::permission_denied(e.to_string()))).await;
                    return;
                }
                if let Some(now) = now.take()
                    && let Some(update) =
                        dispatcher::update_with(last.as_deref(), &now.view, now.digest)
                {
                    if tx.send(Ok(update)).await.is_err() {
                        return; // the node hung up
                    }
                    last = Some(now.view);
                }
                tokio::select! {
                    r = published.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
                now = published.borrow_and_update().get(&node.id).cloned();
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<EndpointInfo>, Status> {
        let (_, node) = self.member(&req)?;
        let r = req.into_inner();
        let net = self.mgr.read(|s| s.find_network(&r.network).cloned())?;
        let cmd = Command::CreateEndpoint {
            id: if r.endpoint_id.is_empty() {
                id::new_id()
            } else {
                r.endpoint_id
            },
            network_id: net.id.clone(),
            node_id: node.id.clone(),
            sandbox: r.sandbox,
            sandbox_id: r.sandbox_id,
            aliases: r.aliases,
            standalone: true,
            at: now(),
        };
        match self.mgr.write(cmd).await.map_err(to_status)? {
            CommandResult::Endpoint(e) => Ok(Response::new(
                self.mgr.read(|s| dispatcher::endpoint_info(s, &e)),
            )),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    async fn report_tasks(&self, req: Request<TaskReports>) -> Result<Response<Empty>, Status> {
        let (_, node) = self.member(&req)?;
        let reports = req
            .into_inner()
            .reports
            .into_iter()
            .map(|r| {
                let state = r.state.parse().map_err(|e: UnknownWord| {
                    Status::invalid_argument(format!("task {}: {e}", r.task_id))
                })?;
                let health = crate::services::TaskHealth::from_wire(&r.health)
                    .map_err(|e| Status::invalid_argument(format!("task {}: {e}", r.task_id)))?;
                Ok(crate::services::TaskReport {
                    health,
                    task_id: r.task_id,
                    state,
                    message: r.message,
                    error: r.error,
                    exit_code: r.exit_code,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.mgr
            .write(Command::ReportTasks {
                node_id: node.id,
                reports,
                at: now(),
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait_converged(
        &self,
        req: Request<WaitConvergedRequest>,
    ) -> Result<Response<WaitConvergedReply>, Status> {
        self.member(&req)?;
        let r = req.into_inner();
        let timeout = std::time::Duration::from_millis(r.timeout_ms.min(30_000));
        let behind = self
            .mgr
            .wait_converged(&r.exclude_node, timeout)
            .await
            .map_err(to_status)?;
        Ok(Response::new(WaitConvergedReply {
            converged: behind.is_empty(),
            behind,
        }))
    }

    type LogRequestsStream = tokio_stream::wrappers::ReceiverStream<Result<LogRequest, Status>>;

    async fn log_requests(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<Self::LogRequestsStream>, Status> {
        let (who, node) = self.member(&req)?;
        let mut requests = self.mgr.logs.register(&node.id);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mgr = self.mgr.clone();
        tokio::spawn(async move {
            let revoked = revoked(&mgr, &who, Need::Member);
            tokio::pin!(revoked);
            loop {
                tokio::select! {
                    r = requests.recv() => match r {
                        Some(r) => if tx.send(Ok(r)).await.is_err() { return },
                        None => return,
                    },
                    why = &mut revoked => {
                        let _ = tx.send(Err(why)).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn publish_logs(&self, req: Request<LogChunk>) -> Result<Response<Empty>, Status> {
        let (_, node) = self.member(&req)?;
        let mut chunk = req.into_inner();
        // Lines say which node and task they come from: the node is the
        // caller, and a task must be one the caller runs.
        let foreign = self.mgr.read(|s| {
            chunk.lines.iter().find_map(|l| {
                let task = l.task.rsplit('.').next().unwrap_or_default();
                let ours = s.tasks.get(task).is_some_and(|t| t.node_id == node.id);
                (!ours).then(|| l.task.clone())
            })
        });
        if let Some(task) = foreign {
            return Err(Status::permission_denied(format!(
                "log lines for task {task}, which does not run on this node"
            )));
        }
        for l in &mut chunk.lines {
            l.node = node.hostname.clone();
        }
        if !self.mgr.logs.publish(&node.id, chunk).await {
            return Err(Status::not_found(
                "nobody is waiting for these logs any more",
            ));
        }
        Ok(Response::new(Empty {}))
    }

    async fn detach(&self, req: Request<DetachRequest>) -> Result<Response<Empty>, Status> {
        let (_, node) = self.member(&req)?;
        let r = req.into_inner();
        let owner = self
            .mgr
            .read(|s| s.endpoints.get(&r.endpoint_id).map(|e| e.node_id.clone()));
        match owner {
            None => return Ok(Response::new(Empty {})), // already gone: detach is idempotent
            Some(o) if o != node.id => {
                return Err(Status::permission_denied(
                    "a node can only detach its own sandboxes",
                ));
            }
            Some(_) => {}
        }
        match self
            .mgr
            .write(Command::RemoveEndpoint { id: r.endpoint_id })
            .await
        {
            Ok(_) | Err(ManagerError::Refused(_)) => Ok(Response::new(Empty {})),
            Err(e) => Err(to_status(e)),
        }
    }
}
