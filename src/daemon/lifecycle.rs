//! Joining, leaving and changing roles. Each operation either completes or
//! undoes what it did, so a failure leaves the node as it was.
//!
//! Over 600 lines because join, leave, promote and demote each pair a step
//! with its undo; kept in one file so every undo sits next to its step.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use mesh_common::id;
use mesh_common::pki::{self, CertAuthority, Role};
use mesh_common::tls::{self, ReloadableIdentity, TrustedManagers};
use mesh_common::token;
use mesh_manager::manager::{Manager, PeerTls, now};
use mesh_manager::state::{ClusterInfo, Command, Node};
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{JoinRaftRequest, NodeJoinRequest};
use mesh_worker::encryption::Encryption;
use mesh_worker::managers::Managers;
use mesh_worker::sandboxes::DataPath;
use mesh_worker::session::{Links, Session};
use mesh_worker::state_dir::{Certs, NodeConfig};
use tracing::{info, warn};

use super::{Daemon, Membership};

pub const DEFAULT_PORT: u16 = 2377;

/// What `init` needs beyond the defaults.
pub struct InitParams {
    pub advertise_addr: String,
    pub listen_addr: String,
    pub cert_expiry: Duration,
    pub pools: Vec<String>,
    pub mask_len: u32,
    pub data_path_port: u32,
    /// Seconds between key rotations, checked (0 = never).
    pub encryption_key_rotation_secs: u64,
    /// Heartbeat period and down grace in ms as asked (0 = default).
    pub dispatcher_heartbeat_ms: u64,
    pub node_down_grace_ms: u64,
}

pub struct JoinParams {
    pub token: String,
    pub remote: String,
    pub advertise_addr: String,
    pub listen_addr: String,
}

pub const NOT_IN_CLUSTER: &str =
    "this node is not part of a cluster: run `mesh init` or `mesh join` first";
pub const ALREADY_IN_CLUSTER: &str = "this node is already part of a cluster; use `mesh leave` to leave it before joining or creating another";

/// Adds the default port to "HOST" and checks the shape of "HOST:PORT".
pub fn with_port(addr: &str, default_port: u16) -> Result<String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(addr.to_string());
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port).to_string());
    }
    if let Some((host, port)) = addr.rsplit_once(':')
        && !host.is_empty()
        && port.parse::<u16>().is_ok()
    {
        return Ok(addr.to_string());
    }
    bail!("invalid address {addr:?}: expected IP or IP:PORT")
}

/// The local address the kernel would use to reach `remote`: a UDP connect
/// picks a route and sends nothing.
fn local_addr_towards(remote: &str) -> Option<IpAddr> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(remote).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

/// This node's hostname (per UTS namespace, so each lab node has its own).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Resolves the advertised IP and the cluster port other nodes dial.
fn addresses(
    advertise: &str,
    listen: &str,
    towards: Option<&str>,
) -> Result<(String, String, String)> {
    let listen = with_port(
        if listen.is_empty() { "0.0.0.0" } else { listen },
        DEFAULT_PORT,
    )
    .context("--listen-addr")?;
    let listen_port = listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(DEFAULT_PORT);
    let (ip, port) = if advertise.is_empty() {
        let ip = match towards {
            // The address this node uses to reach the manager is the one
            // the cluster can reach it at.
            Some(remote) => local_addr_towards(remote).ok_or_else(|| {
                anyhow!("cannot reach manager at {remote}: this node has no route to it; check the address")
            })?,
            None => local_addr_towards("192.0.2.1:9").ok_or_else(|| {
                anyhow!("could not choose an IP address to advertise since this system has no default route; specify one with --advertise-addr")
            })?,
        };
        (ip, listen_port)
    } else {
        let sa: SocketAddr = with_port(advertise, listen_port)
            .context("--advertise-addr")?
            .parse()
            .map_err(|_| {
                anyhow!("--advertise-addr must be an IP address (or IP:PORT), got {advertise:?}")
            })?;
        (sa.ip(), sa.port())
    };
    Ok((
        ip.to_string(),
        listen,
        SocketAddr::new(ip, port).to_string(),
    ))
}

impl Daemon {
    /// On start: pick up the membership the state dir holds.
    pub(super) async fn resume(&self) -> Result<()> {
        let Some(config) = self.state_dir.load_config()? else {
            return Ok(());
        };
        let certs = self.state_dir.load_certs()?;
        let mut m = self.membership.lock().await;
        info!(node = %config.node_id, role = %config.role, "resuming cluster membership");
        let identity = ReloadableIdentity::new(&certs.cert, &certs.key)?;
        m.identity = Some(identity);
        m.certs = Some(certs);
        m.trusted = TrustedManagers::new(config.manager_keys.clone());
        m.config = Some(config.clone());
        if config.role == "manager" {
            self.start_manager_role(&mut m, None).await?;
        }
        self.start_session(&mut m).await?;
        self.publish(&m);
        Ok(())
    }

    /// Makes the lock-free copies match the membership.
    fn publish(&self, m: &Membership) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = m.config.clone();
        *self
            .session_status
            .write()
            .unwrap_or_else(|e| e.into_inner()) = m.session.as_ref().map(|s| s.status.clone());
        *self.applied.write().unwrap_or_else(|e| e.into_inner()) =
            m.session.as_ref().map(|s| s.applied.clone());
        *self.encryption.write().unwrap_or_else(|e| e.into_inner()) = m.encryption.clone();
    }

    async fn start_session(&self, m: &mut Membership) -> Result<()> {
        let (Some(config), Some(certs), Some(identity)) = (&m.config, &m.certs, &m.identity) else {
            bail!("no membership to start a session for");
        };
        // The data path follows the node's view from the managers.
        let managers = Managers::new(
            &certs.ca,
            identity.clone(),
            config.managers.clone(),
            m.trusted.clone(),
        )?;
        // Made once per membership and kept across restarts; `leave`
        // removes it with the rest of the membership.
        let encryption = Encryption::load_or_create(self.state_dir.root())?;
        let session = Session::spawn(
            self.state_dir.clone(),
            config.clone(),
            certs.clone(),
            identity.clone(),
            m.trusted.clone(),
            Links {
                managers: managers.clone(),
                events: self.events.clone(),
                encryption: encryption.clone(),
            },
        )?;
        let local_ip: std::net::Ipv4Addr = config
            .advertise_addr
            .parse()
            .with_context(|| format!("advertise address {} is not IPv4", config.advertise_addr))?;
        let dp = DataPath {
            prefix: self.prefix.clone(),
            local_ip,
            port: mesh_manager::state::DEFAULT_DATA_PATH_PORT,
            overlay_mtu: mesh_worker::sandboxes::overlay_mtu_for(local_ip).await,
            kernel: self.kernel.clone(),
        };
        info!(local = %dp.local_ip, overlay_mtu = dp.overlay_mtu, "data path settings");
        m.agent = Some(mesh_worker::agent::spawn(
            managers.clone(),
            dp.clone(),
            self.sandboxes.clone(),
            session.applied.clone(),
            encryption.clone(),
            mesh_worker::agent::NodeIds {
                node_id: config.node_id.clone(),
                hostname: hostname(),
            },
        ));
        m.managers = Some(managers.clone());
        m.encryption = Some(encryption);
        *self.datapath.write().unwrap_or_else(|e| e.into_inner()) = Some(dp);
        *self
            .managers_link
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(managers);
        m.session = Some(session);
        Ok(())
    }

    /// Starts Raft and the cluster port. With `bootstrap`, this manager
    /// becomes the single voter of a new cluster.
    async fn start_manager_role(
        &self,
        m: &mut Membership,
        bootstrap: Option<&str>,
    ) -> Result<Arc<Manager>> {
        let (Some(config), Some(certs), Some(identity)) = (&m.config, &m.certs, &m.identity) else {
            bail!("no membership to start a manager for");
        };
        let listener = tokio::net::TcpListener::bind(&config.listen_addr)
            .await
            .with_context(|| format!("cannot listen on {} for the cluster port (in use? choose another with --listen-addr)", config.listen_addr))?;
        let server_tls = tls::server_config(&certs.ca, identity.clone())?;
        let mgr = Manager::start(
            &self.state_dir.raft_dir(),
            &config.node_id,
            PeerTls {
                ca_pem: certs.ca.clone(),
                identity: identity.clone(),
                trusted: m.trusted.clone(),
            },
            self.snapshot_every,
        )
        .await?;
        if let Some(addr) = bootstrap
            && let Err(e) = mgr.bootstrap(addr).await
        {
            mgr.shutdown().await;
            return Err(e.into());
        }
        m.server = Some(mesh_manager::server::serve(
            listener,
            server_tls,
            mgr.clone(),
        ));
        *self.manager.write().unwrap_or_else(|e| e.into_inner()) = Some(mgr.clone());
        Ok(mgr)
    }

    async fn stop_manager_role(&self, m: &mut Membership) {
        let mgr = self
            .manager
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(s) = m.server.take() {
            s.stop().await;
        }
        if let Some(mgr) = mgr {
            mgr.shutdown().await;
        }
    }

    /// Stops everything this membership runs (the state dir is untouched).
    pub(super) async fn teardown(&self, m: &mut Membership) {
        if let Some(s) = m.session.take() {
            s.stop().await;
        }
        if let Some(a) = m.agent.take() {
            a.stop().await;
        }
        // Out of the cluster, the node answers on no published port.
        let dp = self
            .datapath
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(dp) = dp
            && let Err(e) = tokio::task::block_in_place(|| mesh_worker::ingress::remove(&dp.node()))
        {
            warn!("removing the routing mesh: {e}");
        }
        // The agent has stopped the WireGuard device; its namespace (and
        // with it any encrypted VXLAN's socket) goes too.
        let prefix = self
            .datapath
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|dp| dp.prefix.clone());
        if let Some(prefix) = prefix
            && let Err(e) =
                mesh_worker::netns::delete_async(&mesh_worker::overlay::tunnel_ns_name(&prefix))
                    .await
        {
            warn!("removing the tunnel namespace: {e}");
        }
        *self.datapath.write().unwrap_or_else(|e| e.into_inner()) = None;
        *self
            .managers_link
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
        self.stop_manager_role(m).await;
        *m = Membership::default();
        self.publish(m);
    }

    pub(super) async fn stop_all(&self) {
        let mut m = self.membership.lock().await;
        if let Some(s) = m.session.take() {
            s.stop().await;
        }
        if let Some(a) = m.agent.take() {
            a.stop().await;
        }
        self.stop_manager_role(&mut m).await;
    }

    pub(super) async fn init(&self, p: InitParams) -> Result<(String, String)> {
        let mut m = self.membership.lock().await;
        if m.config.is_some() {
            bail!(ALREADY_IN_CLUSTER);
        }
        let (ip, listen, cluster_addr) = addresses(&p.advertise_addr, &p.listen_addr, None)?;
        let settings = mesh_manager::control::cluster::network_settings(
            &p.pools,
            p.mask_len,
            p.data_path_port,
        )?;
        let rotation_secs =
            mesh_manager::control::cluster::key_rotation(p.encryption_key_rotation_secs)?;
        let liveness = mesh_manager::control::cluster::liveness(
            p.dispatcher_heartbeat_ms,
            p.node_down_grace_ms,
        )?;
        let cluster_id = id::new_id();
        let node_id = id::new_id();
        let ca = CertAuthority::generate(&cluster_id)?;
        let (key, csr) = pki::new_key_and_csr()?;
        let cert = ca.sign_node(&csr, &node_id, Role::Manager, &cluster_id, p.cert_expiry)?;
        let own = pki::identity_from_pem(&cert)?;
        let ca_der = pki::pem_to_der(&ca.cert_pem)?;
        let certs = Certs {
            ca: ca.cert_pem.clone(),
            cert,
            key,
        };
        let config = NodeConfig {
            node_id: node_id.clone(),
            cluster_id: cluster_id.clone(),
            role: "manager".into(),
            advertise_addr: ip.clone(),
            listen_addr: listen,
            cluster_addr: cluster_addr.clone(),
            managers: vec![cluster_addr.clone()],
            manager_keys: [(node_id.clone(), own.key_fingerprint.clone())].into(),
        };
        let result = async {
            self.begin_membership(&mut m, &certs, &config)?;
            let mgr = self.start_manager_role(&mut m, Some(&cluster_addr)).await?;
            let at = now();
            let cluster = ClusterInfo {
                id: cluster_id.clone(),
                created_at: at.clone(),
                ca_cert_pem: ca.cert_pem.clone(),
                ca_key_pem: ca.key_pem.clone(),
                worker_token: token::generate(&ca_der),
                manager_token: token::generate(&ca_der),
                cert_expiry_secs: p.cert_expiry.as_secs(),
                address_pools: settings.pools.clone(),
                pool_mask_len: settings.mask_len,
                data_path_port: settings.data_path_port,
                encryption_key_rotation_secs: rotation_secs,
                dispatcher_heartbeat_ms: liveness.heartbeat_ms,
                node_down_grace_ms: liveness.down_grace_ms,
            };
            let node = mesh_manager::control::cluster::first_manager(Node {
                id: node_id.clone(),
                raft_id: mgr.raft_id,
                hostname: hostname(),
                addr: ip.clone(),
                manager_addr: cluster_addr.clone(),
                created_at: at.clone(),
                updated_at: at,
                os: std::env::consts::OS.into(),
                architecture: std::env::consts::ARCH.into(),
                joined_addr: ip.clone(),
                key_fingerprint: own.key_fingerprint.clone(),
                cert_serial: own.serial.clone(),
                cert_not_after: mesh_manager::manager::rfc3339(own.not_after),
                ..Default::default()
            });
            mgr.write(Command::Init {
                cluster,
                node,
                ingress: Some(id::new_id()),
            })
            .await?;
            anyhow::Ok(())
        }
        .await;
        self.finish_membership(&mut m, &config, result).await?;
        info!(node = %node_id, cluster = %cluster_id, "cluster initialized");
        Ok((node_id, cluster_addr))
    }

    /// First step of init and join: forget any old membership and take the
    /// new certificates.
    fn begin_membership(
        &self,
        m: &mut Membership,
        certs: &Certs,
        config: &NodeConfig,
    ) -> Result<()> {
        self.state_dir.wipe_cluster()?;
        self.state_dir.save_certs(certs)?;
        m.identity = Some(ReloadableIdentity::new(&certs.cert, &certs.key)?);
        m.trusted = TrustedManagers::new(config.manager_keys.clone());
        m.certs = Some(certs.clone());
        m.config = Some(config.clone());
        Ok(())
    }

    /// Last step of init and join: node.json is written only once everything
    /// else worked (its presence means "member"); on failure, undo it all.
    async fn finish_membership(
        &self,
        m: &mut Membership,
        config: &NodeConfig,
        started: Result<()>,
    ) -> Result<()> {
        let result = match started {
            Ok(()) => match self.state_dir.save_config(config) {
                Ok(()) => self.start_session(m).await,
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.undo(m).await;
            return Err(e);
        }
        self.error
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.publish(m);
        Ok(())
    }

    /// Undoes a failed init or join.
    async fn undo(&self, m: &mut Membership) {
        self.teardown(m).await;
        if let Err(e) = self.state_dir.wipe_cluster() {
            warn!("cleaning up after a failed join: {e}");
        }
    }

    pub(super) async fn join(&self, p: JoinParams) -> Result<(String, String)> {
        let mut m = self.membership.lock().await;
        if m.config.is_some() {
            bail!(ALREADY_IN_CLUSTER);
        }
        let presented = token::parse(&p.token)?;
        let remote = with_port(&p.remote, DEFAULT_PORT)?;
        let (ip, listen, cluster_addr) =
            addresses(&p.advertise_addr, &p.listen_addr, Some(&remote))?;

        // Fetch the CA without trusting it yet, and pin it by the token's
        // digest before any secret is sent.
        let ca_pem = mesh_worker::join::fetch_ca(&remote, &presented).await?;
        let request = NodeJoinRequest {
            proof: Vec::new(),
            csr_pem: String::new(),
            advertise_addr: ip.clone(),
            manager_addr: cluster_addr.clone(),
            hostname: hostname(),
            os: std::env::consts::OS.into(),
            architecture: std::env::consts::ARCH.into(),
        };
        let joined = mesh_worker::join::join(&remote, None, &ca_pem, &presented, request).await?;
        let (key, reply) = (joined.key_pem, joined.reply);
        let certs = Certs {
            ca: ca_pem,
            cert: reply.cert_pem,
            key,
        };
        let mut managers: Vec<String> = reply.managers.iter().map(|m| m.addr.clone()).collect();
        if managers.is_empty() {
            managers.push(remote.clone());
        }
        let config = NodeConfig {
            node_id: reply.node_id.clone(),
            cluster_id: reply.cluster_id.clone(),
            role: reply.role.clone(),
            advertise_addr: ip,
            listen_addr: listen,
            cluster_addr: cluster_addr.clone(),
            managers,
            manager_keys: reply
                .managers
                .iter()
                .map(|m| (m.node_id.clone(), m.key_fingerprint.clone()))
                .collect(),
        };
        let result = async {
            self.begin_membership(&mut m, &certs, &config)?;
            if reply.role == "manager" {
                let mgr = self.start_manager_role(&mut m, None).await?;
                join_raft(&mgr, &config).await?;
            }
            anyhow::Ok(())
        }
        .await;
        self.finish_membership(&mut m, &config, result).await?;
        info!(node = %reply.node_id, role = %reply.role, "joined the cluster");
        Ok((reply.node_id, reply.role))
    }

    pub(super) async fn leave(&self, force: bool) -> Result<()> {
        let mut m = self.membership.lock().await;
        let Some(config) = m.config.clone() else {
            bail!(NOT_IN_CLUSTER);
        };
        if config.role == "manager" && !force {
            let managers = self.manager().map(|mgr| mgr.voters().len()).unwrap_or(1);
            bail!(
                "this node is a manager (one of {managers}); leaving may cost the cluster its quorum. Demote it first with `mesh node demote`, or use `mesh leave --force` to ignore this"
            );
        }
        if config.role == "manager"
            && let Some(mgr) = self.manager()
            && mgr.voters().len() > 1
        {
            // Best effort: take ourselves out of Raft so the others keep
            // their quorum arithmetic right.
            let req = JoinRaftRequest {
                node_id: config.node_id.clone(),
                addr: String::new(),
                remove: true,
            };
            if let Err(e) = mgr.membership_call(req).await {
                warn!("could not leave Raft cleanly: {e}");
            }
        }
        self.teardown(&mut m).await;
        self.state_dir.wipe_cluster()?;
        info!("left the cluster");
        Ok(())
    }

    /// Applies a role the session saw in the cluster state (promote/demote).
    pub(super) async fn switch_role(&self, role: Role) -> Result<()> {
        let mut m = self.membership.lock().await;
        let Some(mut config) = m.config.clone() else {
            return Ok(());
        };
        // The session renewed the certificate on disk; reload it.
        m.certs = Some(self.state_dir.load_certs()?);
        config.role = role.as_str().into();
        m.config = Some(config.clone());
        match role {
            Role::Manager if self.manager().is_none() => {
                info!("promoted: starting the manager role");
                let _ = std::fs::remove_dir_all(self.state_dir.raft_dir());
                let mgr = self.start_manager_role(&mut m, None).await?;
                join_raft(&mgr, &config).await?;
            }
            Role::Worker if self.manager().is_some() => {
                info!("demoted: stopping the manager role");
                self.stop_manager_role(&mut m).await;
                let _ = std::fs::remove_dir_all(self.state_dir.raft_dir());
            }
            _ => {}
        }
        self.publish(&m);
        Ok(())
    }
}

/// Asks the leader to make this new manager a Raft voter, following
/// redirects from followers.
async fn join_raft(mgr: &Manager, config: &NodeConfig) -> Result<()> {
    let req = JoinRaftRequest {
        node_id: config.node_id.clone(),
        addr: config.cluster_addr.clone(),
        remove: false,
    };
    let mut targets: Vec<String> = config
        .managers
        .iter()
        .filter(|a| **a != config.cluster_addr)
        .cloned()
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    let mut last = String::from("no other manager known");
    while tokio::time::Instant::now() < deadline && !targets.is_empty() {
        let addr = targets[i % targets.len()].clone();
        i += 1;
        let channel = mgr.peers.channel(&addr)?;
        let mut r = tonic::Request::new(req.clone());
        r.set_timeout(Duration::from_secs(20));
        match ClusterClient::new(channel).join_raft(r).await {
            Ok(_) => return Ok(()),
            Err(s) => {
                last = format!("{addr}: {}", s.message());
                if let Some(leader) = s
                    .metadata()
                    .get("mesh-leader")
                    .and_then(|v| v.to_str().ok())
                    && !leader.is_empty()
                    && leader != config.cluster_addr
                {
                    if !targets.iter().any(|t| t == leader) {
                        targets.push(leader.to_string());
                    }
                    i = targets.iter().position(|t| t == leader).unwrap_or(0);
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    bail!("could not join the managers' Raft group: {last}")
}
