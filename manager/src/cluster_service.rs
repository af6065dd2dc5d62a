//! The gRPC service nodes call on managers over TLS: join, heartbeat,
//! certificate renewal, and (managers only) writes forwarded to the leader and
//! Raft membership requests. Each method checks the caller's certificate
//! itself, since a joining node has none yet.

use std::sync::Arc;

use mesh_common::pki::{NodeIdentity, Role};
use mesh_common::{id, tls, token};
use mesh_proto::cluster_server;
use mesh_proto::*;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::dispatcher;
use crate::manager::{HEARTBEAT_PERIOD, Manager, ManagerError, now};
use crate::state::{Command, CommandResult, Node};

pub struct ClusterService {
    mgr: Arc<Manager>,
}

impl ClusterService {
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self { mgr }
    }

    /// The caller's identity, if it is a current member of this cluster.
    fn member<T>(&self, req: &Request<T>) -> Result<(NodeIdentity, Node), Status> {
        let who = tls::peer_identity(req)
            .ok_or_else(|| Status::unauthenticated("a node certificate is required"))?;
        self.mgr.read(|s| {
            if s.cluster.as_ref().is_none_or(|c| c.id != who.cluster_id) {
                return Err(Status::permission_denied(
                    "the certificate belongs to another cluster",
                ));
            }
            if s.removed.contains(&who.node_id) {
                return Err(Status::permission_denied(format!(
                    "node {} was removed from the cluster; it must join again with `mesh join`",
                    who.node_id
                )));
            }
            match s.nodes.get(&who.node_id) {
                Some(n) => Ok((who.clone(), n.clone())),
                None => Err(Status::permission_denied(format!(
                    "unknown node {}",
                    who.node_id
                ))),
            }
        })
    }

    /// The caller must hold a manager certificate and still be a manager.
    fn manager_member<T>(&self, req: &Request<T>) -> Result<Node, Status> {
        let (who, node) = self.member(req)?;
        if who.role != Role::Manager || node.role != "manager" {
            return Err(Status::permission_denied(
                "this call needs a manager certificate; worker nodes cannot use the control API",
            ));
        }
        Ok(node)
    }

    fn not_leader(&self) -> Status {
        let addr = self.mgr.leader_addr().unwrap_or_default();
        let mut s = Status::failed_precondition(format!("not the leader; leader is {addr}"));
        if let Ok(v) = addr.parse() {
            s.metadata_mut().insert("mesh-leader", v);
        }
        s
    }
}

fn to_status(e: ManagerError) -> Status {
    match e {
        ManagerError::Refused(m) => Status::failed_precondition(m),
        ManagerError::NoQuorum(..) | ManagerError::NoLeader(_) => {
            Status::unavailable(e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

pub fn managers_of(mgr: &Manager) -> Vec<RemoteManager> {
    mgr.read(|s| {
        s.nodes
            .values()
            .filter(|n| n.role == "manager" && !n.manager_addr.is_empty())
            .map(|n| RemoteManager {
                node_id: n.id.clone(),
                addr: n.manager_addr.clone(),
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
        let r = req.into_inner();
        let presented =
            token::parse(&r.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cluster = self
            .mgr
            .read(|s| s.cluster.clone())
            .ok_or_else(|| Status::unavailable("this manager has no cluster state yet"))?;
        let role = if token_matches(&cluster.manager_token, &presented) {
            Role::Manager
        } else if token_matches(&cluster.worker_token, &presented) {
            Role::Worker
        } else {
            return Err(Status::permission_denied(
                "invalid join token: it is wrong or has been rotated; get the current one with `mesh join-token worker` (or manager) on a manager",
            ));
        };
        let node_id = id::new_id();
        let cert_pem = crate::ca::sign(&cluster, &r.csr_pem, &node_id, role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let at = now();
        let node = Node {
            id: node_id.clone(),
            // Every node has its Raft ID from the start, so a promotion
            // needs no new allocation.
            raft_id: id::raft_id(&node_id),
            hostname: r.hostname,
            role: role.as_str().into(),
            availability: "active".into(),
            addr: r.advertise_addr,
            manager_addr: r.manager_addr,
            state: "unknown".into(),
            created_at: at.clone(),
            updated_at: at,
            os: r.os,
            architecture: r.architecture,
            ..Default::default()
        };
        self.mgr
            .write(Command::AddNode { node })
            .await
            .map_err(to_status)?;
        info!(node = %node_id, role = role.as_str(), "node joined");
        Ok(Response::new(NodeJoinResponse {
            node_id,
            role: role.as_str().into(),
            cert_pem,
            ca_cert_pem: cluster.ca_cert_pem,
            cluster_id: cluster.id,
            managers: managers_of(&self.mgr),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let (_, node) = self.member(&req)?;
        if !self.mgr.is_leader() {
            return Err(self.not_leader());
        }
        let r = req.into_inner();
        self.mgr
            .heartbeat(&node, &r.addr, r.applied_hash)
            .await
            .map_err(to_status)?;
        Ok(Response::new(HeartbeatResponse {
            role: node.role,
            managers: managers_of(&self.mgr),
            leader_id: self.mgr.node_id.clone(),
            period_ms: HEARTBEAT_PERIOD.as_millis() as u32,
            cluster_id: self
                .mgr
                .read(|s| s.cluster.as_ref().map(|c| c.id.clone()))
                .unwrap_or_default(),
        }))
    }

    async fn renew_cert(
        &self,
        req: Request<RenewCertRequest>,
    ) -> Result<Response<RenewCertResponse>, Status> {
        let (_, node) = self.member(&req)?;
        let role: Role = node
            .role
            .parse()
            .map_err(|_| Status::internal("bad role in state"))?;
        let cluster = self
            .mgr
            .read(|s| s.cluster.clone())
            .ok_or_else(|| Status::unavailable("no cluster state"))?;
        let cert_pem = crate::ca::sign(&cluster, &req.into_inner().csr_pem, &node.id, role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(node = %node.id, role = role.as_str(), "renewed node certificate");
        Ok(Response::new(RenewCertResponse {
            cert_pem,
            role: node.role,
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

    type AssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<NodeView, Status>>;

    async fn assignments(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<Self::AssignmentsStream>, Status> {
        let (_, node) = self.member(&req)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mgr = self.mgr.clone();
        tokio::spawn(async move {
            let mut applied = mgr.sm.subscribe();
            let mut last: Option<NodeView> = None;
            loop {
                let generation = *applied.borrow_and_update();
                let view = mgr.read(|s| dispatcher::view_for(s, &node.id, generation));
                if last
                    .as_ref()
                    .is_none_or(|l| !dispatcher::same_content(l, &view))
                {
                    if tx.send(Ok(view.clone())).await.is_err() {
                        return; // the node hung up
                    }
                    last = Some(view);
                }
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<EndpointInfo>, Status> {
        let (_, node) = self.member(&req)?;
        let r = req.into_inner();
        let net = self
            .mgr
            .read(|s| s.find_network(&r.network).cloned())
            .map_err(Status::not_found)?;
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
            .map(|r| crate::services::TaskReport {
                task_id: r.task_id,
                state: r.state,
                message: r.message,
                error: r.error,
                exit_code: r.exit_code,
            })
            .collect();
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
        let (_, node) = self.member(&req)?;
        let mut requests = self.mgr.logs.register(&node.id);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = requests.recv() => match r {
                        Some(r) => if tx.send(Ok(r)).await.is_err() { return },
                        None => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn publish_logs(&self, req: Request<LogChunk>) -> Result<Response<Empty>, Status> {
        self.member(&req)?;
        if !self.mgr.logs.publish(req.into_inner()).await {
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

fn token_matches(current: &str, presented: &token::JoinToken) -> bool {
    token::parse(current).is_ok_and(|t| {
        t.ca_digest == presented.ca_digest && token::secrets_match(&t.secret, &presented.secret)
    })
}
