//! The Control API the CLI calls over the daemon's unix socket: wiring
//! only. Cluster calls need the manager role and go to
//! `mesh_manager::control`, which decides; calls about this node's
//! sandboxes and local networks go to the worker's `Sandboxes`.

use std::sync::Arc;
use std::time::Duration;

use mesh_common::model::DriverKind;
use mesh_manager::control;
use mesh_manager::manager::{Manager, now};
use mesh_manager::state::no_such_network;
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

    /// The manager role for a read: only once it has confirmed its state
    /// reflects every write acknowledged before the read began.
    async fn current_manager(&self) -> Result<Arc<Manager>, Status> {
        let mgr = self.manager()?;
        mgr.ensure_current().await?;
        Ok(mgr)
    }

    /// `network connect` and `disconnect`: one path, so both answer alike.
    async fn attachment(
        &self,
        r: ConnectRequest,
        connect: bool,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        check_aliases(&r.aliases)?;
        let (dp, managers) = (self.d.datapath(), self.d.managers_link());
        let rec = if connect {
            let s = &self.d.sandboxes;
            s.connect(&r.sandbox, &r.network, r.aliases, &dp, managers.as_ref())
                .await
        } else {
            let s = &self.d.sandboxes;
            s.disconnect(&r.sandbox, &r.network, &dp, managers.as_ref())
                .await
        };
        self.reply(rec)
    }
}

/// DNS aliases a sandbox asks for, checked before anything is made: the
/// embedded DNS could never answer a malformed one.
fn check_aliases(aliases: &[String]) -> Result<(), Status> {
    for a in aliases {
        mesh_common::input::check_alias(a)?;
    }
    Ok(())
}

/// A lifecycle failure (init, join, leave): a typed refusal keeps its
/// code; anything else is a precondition the user must fix.
fn err(e: anyhow::Error) -> Status {
    match e.downcast::<mesh_common::refusal::Refusal>() {
        Ok(r) => r.into(),
        Err(e) => Status::failed_precondition(format!("{e:#}")),
    }
}

/// The rotation interval as `mesh init` takes it (e.g. "12h"); empty =
/// never.
fn rotation_text(secs: u64) -> String {
    if secs == 0 {
        return String::new();
    }
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// A period a heartbeat reply gave, as users type it; empty = not heard.
fn ms_text(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    mesh_manager::control::cluster::text(Duration::from_millis(ms))
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
                encryption_key_rotation_secs: r.encryption_key_rotation_secs,
                dispatcher_heartbeat_ms: r.dispatcher_heartbeat_ms,
                node_down_grace_ms: r.node_down_grace_ms,
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
            datapath_errors: self
                .d
                .applied
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|a| a.faults())
                .unwrap_or_default(),
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
        info.encryption = self
            .d
            .encryption
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|e| e.info());
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
            info.encryption_key_rotation = rotation_text(st.encryption_key_rotation_secs);
            info.dispatcher_heartbeat = ms_text(st.heartbeat_ms);
            info.node_down_grace = ms_text(st.node_down_grace_ms);
        }
        if let Some(mgr) = self.d.manager() {
            info.control_available = true;
            info.nodes = mgr.read(|s| s.nodes.len() as u64);
            if let Some(l) = mgr.leader_node_id() {
                info.leader_id = l;
            }
            info.managers = mesh_manager::cluster_service::managers_of(&mgr);
            // A manager knows the interval before its first heartbeat reply.
            let secs = mgr.read(|s| {
                s.cluster
                    .as_ref()
                    .map_or(0, |c| c.encryption_key_rotation_secs)
            });
            info.encryption_key_rotation = rotation_text(secs);
            let (period, grace) = mgr.liveness();
            info.dispatcher_heartbeat = mesh_manager::control::cluster::text(period);
            info.node_down_grace = mesh_manager::control::cluster::text(grace);
        }
        Ok(Response::new(info))
    }

    async fn join_token(
        &self,
        req: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let mgr = self.manager()?;
        let r = req.into_inner();
        let token = control::tokens::join_token(&mgr, &r.role, r.rotate).await?;
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
        Ok(Response::new(control::nodes::list(
            &*self.current_manager().await?,
        )))
    }

    async fn node_update(
        &self,
        req: Request<NodeUpdateRequest>,
    ) -> Result<Response<mesh_proto::Node>, Status> {
        let node = control::nodes::update(&*self.manager()?, req.into_inner()).await?;
        Ok(Response::new(node))
    }

    async fn node_remove(
        &self,
        req: Request<NodeRemoveRequest>,
    ) -> Result<Response<Empty>, Status> {
        control::nodes::remove(&*self.manager()?, req.into_inner()).await?;
        Ok(Response::new(Empty {}))
    }

    async fn network_create(
        &self,
        req: Request<NetworkCreateRequest>,
    ) -> Result<Response<mesh_proto::Network>, Status> {
        let r = req.into_inner();
        if control::networks::driver_of(&r) != DriverKind::Overlay.as_str() {
            if r.options.contains_key("encrypted") {
                return Err(control::networks::encrypted_needs_overlay(
                    control::networks::driver_of(&r),
                )
                .into());
            }
            let spec = mesh_worker::local_request::spec_from(r)?;
            let exists =
                |ifname: &str| std::path::Path::new("/sys/class/net").join(ifname).exists();
            let net = self
                .d
                .sandboxes
                .local
                .create(spec, mesh_common::id::new_id(), &now(), exists)
                .map_err(Status::failed_precondition)?;
            return Ok(Response::new(mesh_worker::local_request::to_pb(&net, &[])));
        }
        let mgr = self.manager()?;
        let local_taken = self.d.sandboxes.local.find(&r.name).is_some();
        let net = control::networks::create(&mgr, r, local_taken).await?;
        Ok(Response::new(net))
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
            .map(|n| mesh_worker::local_request::to_pb(n, &records))
            .collect();
        if self.d.manager().is_some() {
            networks.extend(control::networks::list(&*self.current_manager().await?));
        }
        Ok(Response::new(NetworkList { networks }))
    }

    async fn network_inspect(
        &self,
        req: Request<NetworkRef>,
    ) -> Result<Response<mesh_proto::Network>, Status> {
        let r = req.into_inner().network;
        if let Some(l) = self.d.sandboxes.local.find(&r) {
            let records = self.d.sandboxes.list();
            return Ok(Response::new(mesh_worker::local_request::to_pb(
                &l, &records,
            )));
        }
        // A worker knows its local networks only: for it, no such network.
        let net = match self.d.manager() {
            Some(_) => control::networks::inspect(&*self.current_manager().await?, &r)?,
            None => return Err(no_such_network(&r).into()),
        };
        Ok(Response::new(net))
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
            return Ok(Response::new(mesh_worker::local_request::to_pb(
                &removed,
                &[],
            )));
        }
        let net = control::networks::remove(&*self.manager()?, &r.network).await?;
        Ok(Response::new(net))
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
                removed.push(mesh_worker::local_request::to_pb(&n, &[]));
            }
        }
        if let Some(mgr) = self.d.manager() {
            removed.extend(control::networks::prune(&mgr).await?);
        }
        Ok(Response::new(NetworkList { networks: removed }))
    }

    async fn sandbox_run(
        &self,
        req: Request<RunRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        let r = req.into_inner();
        check_aliases(&r.aliases)?;
        let ports = r
            .ports
            .iter()
            .map(|p| {
                mesh_worker::ports::from_wire(
                    &p.host_ip,
                    p.host_port,
                    p.container_port,
                    &p.protocol,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec = mesh_worker::sandboxes::RunSpec {
            name: r.name,
            networks: r.networks,
            aliases: r.aliases,
            cmd: r.cmd,
            env: r.env.into_iter().collect(),
            ports,
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
        self.attachment(req.into_inner(), true).await
    }

    async fn network_disconnect(
        &self,
        req: Request<ConnectRequest>,
    ) -> Result<Response<mesh_proto::Sandbox>, Status> {
        self.attachment(req.into_inner(), false).await
    }

    async fn service_create(
        &self,
        req: Request<ServiceCreateRequest>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let local = |n: &str| self.d.sandboxes.local.find(n).map(|l| l.driver);
        let svc = control::services::create(&mgr, req.into_inner(), &local).await?;
        Ok(Response::new(svc))
    }

    async fn service_list(&self, _req: Request<Empty>) -> Result<Response<ServiceList>, Status> {
        Ok(Response::new(control::services::list(
            &*self.current_manager().await?,
        )))
    }

    async fn service_status(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<ServiceStatusReply>, Status> {
        let mgr = self.current_manager().await?;
        let reply = control::services::status(&mgr, &req.into_inner().service).await?;
        Ok(Response::new(reply))
    }

    async fn service_update(
        &self,
        req: Request<ServiceUpdateRequest>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let local = |n: &str| self.d.sandboxes.local.find(n).map(|l| l.driver);
        let svc = control::services::update(&mgr, req.into_inner(), &local).await?;
        Ok(Response::new(svc))
    }

    async fn service_remove(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<mesh_proto::Service>, Status> {
        let mgr = self.manager()?;
        let svc = control::services::remove(&mgr, &req.into_inner().service).await?;
        Ok(Response::new(svc))
    }

    type ServiceLogsStream = tokio_stream::wrappers::ReceiverStream<Result<LogLine, Status>>;

    async fn service_logs(
        &self,
        req: Request<ServiceRef>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        let mgr = self.manager()?;
        let lines = control::services::logs(mgr, &req.into_inner().service)?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            lines,
        )))
    }
}
