//! The Control API the CLI calls over the daemon's unix socket. Cluster-wide
//! calls need the manager role; writes go through Raft (forwarded to the
//! leader when this manager follows).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_common::{pki, token};
use mesh_manager::manager::{Manager, ManagerError, now};
use mesh_manager::state::{Command, CommandResult, Node};
use mesh_proto::control_server::Control;
use mesh_proto::*;
use tonic::{Request, Response, Status};

use super::Daemon;
use super::lifecycle::{InitParams, JoinParams, NOT_IN_CLUSTER};

pub struct ControlService {
    d: Arc<Daemon>,
}

impl ControlService {
    pub fn new(d: Arc<Daemon>) -> Self {
        Self { d }
    }

    /// A sandbox operation's result as the API answers it.
    #[allow(clippy::result_large_err)]
    fn reply(
        &self,
        rec: Result<mesh_worker::sandboxes::Record, mesh_worker::sandboxes::SandboxesError>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let rec = rec.map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(super::sandboxes::to_pb(
            &rec,
            &self.d.state_dir,
        )))
    }

    /// The manager role, or Docker's refusal for workers.
    fn manager(&self) -> Result<Arc<Manager>, Status> {
        if let Some(m) = self.d.manager() {
            return Ok(m);
        }
        if self
            .d
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            Err(Status::failed_precondition(
                "this node is not a manager: worker nodes can't view or modify cluster state; run this command on a manager node, or promote this node with `mesh node promote`",
            ))
        } else {
            Err(Status::failed_precondition(NOT_IN_CLUSTER))
        }
    }
}

fn err(e: anyhow::Error) -> Status {
    Status::failed_precondition(format!("{e:#}"))
}

pub(super) fn mgr_err(e: ManagerError) -> Status {
    match e {
        ManagerError::NoQuorum(..) | ManagerError::NoLeader(_) => {
            Status::unavailable(e.to_string())
        }
        other => Status::failed_precondition(other.to_string()),
    }
}

/// Finds a node by ID, unique ID prefix, or hostname, as Docker does.
pub fn resolve_node(
    nodes: &BTreeMap<String, Node>,
    r: &str,
    self_id: &str,
) -> Result<Node, Status> {
    let r = if r == "self" { self_id } else { r };
    if let Some(n) = nodes.get(r) {
        return Ok(n.clone());
    }
    let by_name: Vec<&Node> = nodes.values().filter(|n| n.hostname == r).collect();
    let by_prefix: Vec<&Node> = nodes
        .values()
        .filter(|n| !r.is_empty() && n.id.starts_with(r))
        .collect();
    match (by_name.as_slice(), by_prefix.as_slice()) {
        ([n], _) | ([], [n]) => Ok((*n).clone()),
        ([], []) => Err(Status::not_found(format!(
            "node {r} not found; see `mesh node ls`"
        ))),
        _ => Err(Status::failed_precondition(format!(
            "node reference {r:?} is ambiguous: it matches several nodes; use the node ID"
        ))),
    }
}

fn to_pb(mgr: &Manager, n: &Node) -> mesh_proto::Node {
    let leader = mgr.raft.metrics().borrow().current_leader;
    let is_manager = n.role == "manager";
    mesh_proto::Node {
        id: n.id.clone(),
        hostname: n.hostname.clone(),
        role: n.role.clone(),
        availability: n.availability.clone(),
        labels: n.labels.clone().into_iter().collect(),
        addr: n.addr.clone(),
        state: n.state.clone(),
        manager_addr: if is_manager {
            n.manager_addr.clone()
        } else {
            String::new()
        },
        leader: is_manager && leader == Some(n.raft_id),
        reachability: if !is_manager {
            String::new()
        } else if n.state == "ready" || leader == Some(n.raft_id) {
            "reachable".into()
        } else {
            "unreachable".into()
        },
        created_at: n.created_at.clone(),
        updated_at: n.updated_at.clone(),
        version: n.version,
        os: n.os.clone(),
        architecture: n.architecture.clone(),
        message: String::new(),
        tls_not_after: n.cert_not_after.clone(),
        tls_serial: n.cert_serial.clone(),
        tls_key_fingerprint: n.key_fingerprint.clone(),
        datapath_errors: n.datapath_errors.clone(),
    }
}

fn secs_to_rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let r = req.into_inner();
        let cert_expiry = match r.cert_expiry_secs {
            0 => mesh_manager::ca::DEFAULT_CERT_EXPIRY,
            s => Duration::from_secs(s),
        };
        let (node_id, addr) = self
            .d
            .init(InitParams {
                advertise_addr: r.advertise_addr,
                listen_addr: r.listen_addr,
                cert_expiry,
                pools: r.default_addr_pool,
                mask_len: r.default_addr_pool_mask_length,
                data_path_port: r.data_path_port,
            })
            .await
            .map_err(err)?;
        let (worker_token, manager_token) = self
            .manager()?
            .read(|s| {
                s.cluster
                    .as_ref()
                    .map(|c| (c.worker_token.clone(), c.manager_token.clone()))
            })
            .unwrap_or_default();
        Ok(Response::new(InitResponse {
            node_id,
            worker_token,
            manager_token,
            advertise_addr: addr,
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        let (node_id, role) = self
            .d
            .join(JoinParams {
                token: r.token,
                remote: r.remote_addr,
                advertise_addr: r.advertise_addr,
                listen_addr: r.listen_addr,
            })
            .await
            .map_err(err)?;
        Ok(Response::new(JoinResponse { node_id, role }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<Empty>, Status> {
        self.d.leave(req.into_inner().force).await.map_err(err)?;
        Ok(Response::new(Empty {}))
    }

    async fn info(&self, _req: Request<Empty>) -> Result<Response<InfoResponse>, Status> {
        let config = self
            .d
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let error = self
            .d
            .error
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut info = InfoResponse {
            hostname: super::lifecycle::hostname(),
            error: error.clone(),
            datapath_errors: self.d.sandboxes.faults(),
            ..Default::default()
        };
        let Some(config) = config else {
            info.local_node_state = if error.is_empty() {
                "inactive"
            } else {
                "error"
            }
            .into();
            return Ok(Response::new(info));
        };
        info.node_id = config.node_id.clone();
        info.node_addr = config.advertise_addr.clone();
        info.cluster_id = config.cluster_id.clone();
        let status = self
            .d
            .session_status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(st) = status {
            let st = st.lock().unwrap_or_else(|e| e.into_inner()).clone();
            info.local_node_state = if st.connected { "active" } else { "pending" }.into();
            info.error = st.last_error.clone();
            info.leader_id = st.leader_id.clone();
            info.managers = st.managers.clone();
            info.cert_not_after = st.cert_not_after.map(secs_to_rfc3339).unwrap_or_default();
        }
        if let Some(mgr) = self.d.manager() {
            info.control_available = true;
            info.nodes = mgr.read(|s| s.nodes.len() as u64);
            if let Some(l) = mgr.leader_node_id() {
                info.leader_id = l;
            }
            info.managers = mesh_manager::cluster_service::managers_of(&mgr);
        }
        Ok(Response::new(info))
    }

    async fn join_token(
        &self,
        req: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let mgr = self.manager()?;
        let r = req.into_inner();
        if r.role != "worker" && r.role != "manager" {
            return Err(Status::invalid_argument(format!(
                "unknown role {:?}: use worker or manager",
                r.role
            )));
        }
        if r.rotate {
            let ca = mgr
                .read(|s| s.cluster.as_ref().map(|c| c.ca_cert_pem.clone()))
                .ok_or_else(|| Status::failed_precondition("no cluster state"))?;
            let der = pki::pem_to_der(&ca).map_err(|e| Status::internal(e.to_string()))?;
            let cmd = Command::RotateToken {
                role: r.role.clone(),
                token: token::generate(&der),
            };
            mgr.write(cmd).await.map_err(mgr_err)?;
        }
        let token = mgr
            .read(|s| {
                s.cluster.as_ref().map(|c| {
                    if r.role == "worker" {
                        c.worker_token.clone()
                    } else {
                        c.manager_token.clone()
                    }
                })
            })
            .ok_or_else(|| Status::failed_precondition("no cluster state"))?;
        let manager_addr = self
            .d
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.cluster_addr.clone())
            .unwrap_or_default();
        Ok(Response::new(JoinTokenResponse {
            token,
            manager_addr,
        }))
    }

    async fn node_list(&self, _req: Request<Empty>) -> Result<Response<NodeList>, Status> {
        let mgr = self.manager()?;
        let nodes = mgr.read(|s| s.nodes.values().cloned().collect::<Vec<_>>());
        Ok(Response::new(NodeList {
            nodes: nodes.iter().map(|n| to_pb(&mgr, n)).collect(),
        }))
    }

    async fn node_update(
        &self,
        req: Request<NodeUpdateRequest>,
    ) -> Result<Response<mesh_proto::Node>, Status> {
        let mgr = self.manager()?;
        let r = req.into_inner();
        let node = mgr.read(|s| resolve_node(&s.nodes, &r.node, &mgr.node_id))?;
        if !r.availability.is_empty()
            && !["active", "pause", "drain"].contains(&r.availability.as_str())
        {
            return Err(Status::invalid_argument(format!(
                "invalid availability {:?}: use active, pause or drain",
                r.availability
            )));
        }
        let mut role = None;
        if !r.role.is_empty() && r.role != node.role {
            match r.role.as_str() {
                "manager" => role = Some("manager".to_string()),
                "worker" => {
                    let managers =
                        mgr.read(|s| s.nodes.values().filter(|n| n.role == "manager").count());
                    if managers <= 1 {
                        return Err(Status::failed_precondition(format!(
                            "cannot demote node {}: it is the last manager of the cluster; promote another node first",
                            node.id
                        )));
                    }
                    // Leave Raft first, so the voters never count a worker.
                    let req = JoinRaftRequest {
                        node_id: node.id.clone(),
                        addr: String::new(),
                        remove: true,
                    };
                    mgr.membership_call(req).await.map_err(mgr_err)?;
                    role = Some("worker".to_string());
                }
                other => return Err(Status::invalid_argument(format!("unknown role {other:?}"))),
            }
        }
        for k in r.label_add.keys() {
            if k.is_empty() {
                return Err(Status::invalid_argument(
                    "a label needs a key: use --label-add KEY=VALUE",
                ));
            }
        }
        let cmd = Command::UpdateNode {
            id: node.id.clone(),
            availability: (!r.availability.is_empty()).then_some(r.availability),
            role,
            label_add: r.label_add.into_iter().collect(),
            label_rm: r.label_rm,
            at: now(),
        };
        // The write may have gone through another manager; read the result
        // from what it returned.
        match mgr.write(cmd).await.map_err(mgr_err)? {
            CommandResult::Node(n) => Ok(Response::new(to_pb(&mgr, &n))),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    async fn node_remove(
        &self,
        req: Request<NodeRemoveRequest>,
    ) -> Result<Response<Empty>, Status> {
        let mgr = self.manager()?;
        let r = req.into_inner();
        let node = mgr.read(|s| resolve_node(&s.nodes, &r.node, &mgr.node_id))?;
        if node.role == "manager" {
            return Err(Status::failed_precondition(format!(
                "node {} is a cluster manager and a member of Raft; demote it with `mesh node demote` before removing it",
                node.id
            )));
        }
        if node.state == "ready" && !r.force {
            return Err(Status::failed_precondition(format!(
                "node {} is not down and can't be removed; stop its daemon first, or use --force",
                node.id
            )));
        }
        mgr.write(Command::RemoveNode { id: node.id })
            .await
            .map_err(mgr_err)?;
        Ok(Response::new(Empty {}))
    }

    async fn network_create(
        &self,
        req: Request<NetworkCreateRequest>,
    ) -> Result<Response<mesh_proto::Network>, Status> {
        let r = req.into_inner();
        if super::networks::driver_of(&r) != "overlay" {
            let spec = super::networks::local_spec_from(r)?;
            let exists =
                |ifname: &str| std::path::Path::new("/sys/class/net").join(ifname).exists();
            let net = self
                .d
                .sandboxes
                .local
                .create(spec, mesh_common::id::new_id(), &now(), exists)
                .map_err(Status::failed_precondition)?;
            return Ok(Response::new(super::networks::local_to_pb(&net, &[])));
        }
        let mgr = self.manager()?;
        let spec = super::networks::spec_from(r)?;
        if self.d.sandboxes.local.find(&spec.name).is_some() {
            return Err(Status::failed_precondition(format!(
                "network with name {} already exists on this node",
                spec.name
            )));
        }
        let cmd = Command::CreateNetwork {
            id: mesh_common::id::new_id(),
            spec,
            at: now(),
        };
        match mgr.write(cmd).await.map_err(mgr_err)? {
            CommandResult::Network(n) => Ok(Response::new(
                mgr.read(|s| super::networks::to_pb(s, &n, &mgr.node_id)),
            )),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    async fn network_list(&self, _req: Request<Empty>) -> Result<Response<NetworkList>, Status> {
        // Local networks everywhere; cluster networks where the state is.
        let records = self.d.sandboxes.list();
        let mut networks: Vec<mesh_proto::Network> = self
            .d
            .sandboxes
            .local
            .list()
            .iter()
            .map(|n| super::networks::local_to_pb(n, &records))
            .collect();
        if let Some(mgr) = self.d.manager() {
            networks.extend(mgr.read(|s| {
                s.networks
                    .values()
                    .map(|n| super::networks::to_pb(s, n, &mgr.node_id))
                    .collect::<Vec<_>>()
            }));
        }
        Ok(Response::new(NetworkList { networks }))
    }

    async fn network_remove(
        &self,
        req: Request<NetworkRef>,
    ) -> Result<Response<mesh_proto::Network>, Status> {
        let r = req.into_inner();
        if let Some(l) = self.d.sandboxes.local.find(&r.network) {
            let users: Vec<String> = self
                .d
                .sandboxes
                .list()
                .iter()
                .filter(|s| s.networks.iter().any(|a| a.network_id == l.id))
                .map(|s| s.name.clone())
                .collect();
            let removed = self
                .d
                .sandboxes
                .local
                .remove(&l.id, &users)
                .map_err(Status::failed_precondition)?;
            self.d.remove_local_bridge(&removed).await;
            return Ok(Response::new(super::networks::local_to_pb(&removed, &[])));
        }
        let mgr = self.manager()?;
        let net = mgr.read(|s| super::networks::resolve(s, &r.network))?;
        mgr.write(Command::RemoveNetwork { id: net.id.clone() })
            .await
            .map_err(mgr_err)?;
        Ok(Response::new(
            mgr.read(|s| super::networks::to_pb(s, &net, &mgr.node_id)),
        ))
    }

    async fn network_prune(&self, _req: Request<Empty>) -> Result<Response<NetworkList>, Status> {
        let mut removed = Vec::new();
        let records = self.d.sandboxes.list();
        for l in self
            .d
            .sandboxes
            .local
            .list()
            .into_iter()
            .filter(|l| !l.builtin)
        {
            if records
                .iter()
                .any(|s| s.networks.iter().any(|a| a.network_id == l.id))
            {
                continue;
            }
            if let Ok(n) = self.d.sandboxes.local.remove(&l.id, &[]) {
                self.d.remove_local_bridge(&n).await;
                removed.push(super::networks::local_to_pb(&n, &[]));
            }
        }
        let Some(mgr) = self.d.manager() else {
            return Ok(Response::new(NetworkList { networks: removed }));
        };
        // Unused cluster networks; ingress belongs to the cluster and stays.
        let unused: Vec<mesh_manager::state::Network> = mgr.read(|s| {
            s.networks
                .values()
                .filter(|n| !n.spec.ingress && s.network_users(&n.id).is_empty())
                .cloned()
                .collect()
        });
        for n in unused {
            match mgr.write(Command::RemoveNetwork { id: n.id.clone() }).await {
                Ok(_) => removed.push(mgr.read(|s| super::networks::to_pb(s, &n, &mgr.node_id))),
                // Someone started using it meanwhile: keep it.
                Err(ManagerError::Refused(_)) => {}
                Err(e) => return Err(mgr_err(e)),
            }
        }
        Ok(Response::new(NetworkList { networks: removed }))
    }

    async fn sandbox_run(
        &self,
        req: Request<RunRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let r = req.into_inner();
        let spec = mesh_worker::sandboxes::RunSpec {
            name: r.name,
            networks: r.networks,
            aliases: r.aliases,
            cmd: r.cmd,
            env: r.env.into_iter().collect(),
        };
        let rec = self
            .d
            .sandboxes
            .run(spec, &self.d.datapath(), self.d.managers_link().as_ref())
            .await;
        self.reply(rec)
    }

    async fn sandbox_list(&self, _req: Request<Empty>) -> Result<Response<SandboxList>, Status> {
        let sandboxes = self
            .d
            .sandboxes
            .list()
            .iter()
            .map(|r| super::sandboxes::to_pb(r, &self.d.state_dir))
            .collect();
        Ok(Response::new(SandboxList { sandboxes }))
    }

    async fn sandbox_inspect(
        &self,
        req: Request<SandboxRef>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let rec = self
            .d
            .sandboxes
            .find(&req.into_inner().sandbox)
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(super::sandboxes::to_pb(
            &rec,
            &self.d.state_dir,
        )))
    }

    async fn sandbox_remove(
        &self,
        req: Request<SandboxRemoveRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let r = req.into_inner();
        let rec = self
            .d
            .sandboxes
            .remove(
                &r.sandbox,
                r.force,
                &self.d.datapath(),
                self.d.managers_link().as_ref(),
            )
            .await;
        self.reply(rec)
    }

    async fn network_connect(
        &self,
        req: Request<ConnectRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let r = req.into_inner();
        let rec = self
            .d
            .sandboxes
            .connect(
                &r.sandbox,
                &r.network,
                r.aliases,
                &self.d.datapath(),
                self.d.managers_link().as_ref(),
            )
            .await;
        self.reply(rec)
    }

    async fn network_disconnect(
        &self,
        req: Request<ConnectRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let r = req.into_inner();
        let rec = self
            .d
            .sandboxes
            .disconnect(
                &r.sandbox,
                &r.network,
                &self.d.datapath(),
                self.d.managers_link().as_ref(),
            )
            .await;
        self.reply(rec)
    }

    async fn service_create(
        &self,
        req: Request<ServiceCreateRequest>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let svc = super::services::create(&self.d, &mgr, req.into_inner()).await?;
        Ok(Response::new(svc))
    }

    async fn service_list(&self, _req: Request<Empty>) -> Result<Response<ServiceList>, Status> {
        let mgr = self.manager()?;
        Ok(Response::new(super::services::list(&mgr)))
    }

    async fn service_status(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<ServiceStatusReply>, Status> {
        let mgr = self.manager()?;
        let reply = super::services::status(&mgr, &req.into_inner().service).await?;
        Ok(Response::new(reply))
    }

    async fn service_update(
        &self,
        req: Request<ServiceUpdateRequest>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let svc = super::services::update(&self.d, &mgr, req.into_inner()).await?;
        Ok(Response::new(svc))
    }

    async fn service_remove(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let svc = super::services::remove(&mgr, &req.into_inner().service).await?;
        Ok(Response::new(svc))
    }

    type ServiceLogsStream = tokio_stream::wrappers::ReceiverStream<Result<LogLine, Status>>;

    async fn service_logs(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        let mgr = self.manager()?;
        let lines = super::services::logs(mgr, &req.into_inner().service)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            lines,
        )))
    }
}
