//! `mesh daemon`: the node agent process.
//!
//! Owns the node's state dir and its control socket. On start it resumes
//! whatever membership the state dir holds; `init`/`join`/`leave` arrive over
//! the socket. It wires the worker's session to the manager role: a role
//! change reported by the session starts or stops the manager (Raft, cluster
//! port), and removal from the cluster forgets the membership.

mod control;
mod lifecycle;
mod sandboxes;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use mesh_common::tls::ReloadableIdentity;
use mesh_manager::manager::Manager;
use mesh_manager::server::ServerHandle;
use mesh_proto::control_server::ControlServer;
use mesh_worker::session::{SessionEvent, SessionHandle, SessionStatus};
use mesh_worker::state_dir::{Certs, NodeConfig, StateDir};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The membership a node currently has. Guarded by one async mutex so that
/// init, join, leave and role changes never interleave.
#[derive(Default)]
struct Membership {
    config: Option<NodeConfig>,
    certs: Option<Certs>,
    identity: Option<ReloadableIdentity>,
    session: Option<SessionHandle>,
    server: Option<ServerHandle>,
    /// Keeps the kernel in step with this node's view from the managers.
    agent: Option<mesh_worker::agent::AgentHandle>,
    managers: Option<mesh_worker::managers::Managers>,
    /// The node's WireGuard key, shared by the session (heartbeats,
    /// rotation) and the agent (the WireGuard device).
    encryption: Option<Arc<mesh_worker::encryption::Encryption>>,
    /// The managers this node accepts as servers, shared by every client
    /// config of the membership and kept current by the session.
    trusted: mesh_common::tls::TrustedManagers,
}

pub struct Daemon {
    state_dir: StateDir,
    /// Raft log entries between snapshots (`--raft-snapshot-every`).
    snapshot_every: u64,
    membership: tokio::sync::Mutex<Membership>,
    /// The manager role, if this node has it; read without the membership
    /// lock so queries never wait behind a join or a role change.
    manager: RwLock<Option<Arc<Manager>>>,
    /// Session status for `mesh info`, readable without the lock.
    session_status: RwLock<Option<Arc<Mutex<SessionStatus>>>>,
    /// The agent's last faults for `mesh info`, readable without the lock.
    applied: RwLock<Option<Arc<mesh_worker::session::Applied>>>,
    /// The node's WireGuard key and device state for `mesh info`,
    /// readable without the lock.
    encryption: RwLock<Option<Arc<mesh_worker::encryption::Encryption>>>,
    config: RwLock<Option<NodeConfig>>,
    /// Why this node is not in a cluster any more (e.g. it was removed).
    error: RwLock<String>,
    sandboxes: Arc<mesh_worker::sandboxes::Sandboxes>,
    /// Namespace prefix unique to this daemon's state dir.
    prefix: String,
    /// Data-path settings while the node is in a cluster.
    datapath: RwLock<Option<mesh_worker::sandboxes::DataPath>>,
    managers_link: RwLock<Option<mesh_worker::managers::Managers>>,
    /// Serialises kernel changes (see `DataPath::kernel`).
    kernel: Arc<tokio::sync::Mutex<()>>,
    events: mpsc::Sender<SessionEvent>,
}

pub struct DaemonOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub snapshot_every: u64,
    pub dns_upstream: Vec<std::net::SocketAddr>,
}

pub async fn run(opts: DaemonOptions) -> Result<()> {
    let state_dir = StateDir::new(&opts.state_dir);
    state_dir.create()?;
    let listener = bind_socket(&opts.socket).await?;
    let (events, mut events_rx) = mpsc::channel(16);
    let prefix = state_dir.instance_prefix()?;
    let local = Arc::new(mesh_worker::local_networks::LocalNetworks::load(
        state_dir.root().join("networks.json"),
        &mesh_manager::manager::now(),
    ));
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = if opts.dns_upstream.is_empty() {
        mesh_worker::dns::upstreams_from_resolv_conf(&host_resolv)
    } else {
        opts.dns_upstream.clone()
    };
    let dns = mesh_worker::dns::DnsServer::new(upstreams, std::time::Duration::from_secs(2));
    let sandboxes = Arc::new(mesh_worker::sandboxes::Sandboxes::load(
        state_dir.sandboxes_dir(),
        local,
        dns,
    )?);
    let daemon = Arc::new(Daemon {
        sandboxes,
        prefix,
        datapath: RwLock::new(None),
        managers_link: RwLock::new(None),
        kernel: Arc::default(),
        state_dir,
        snapshot_every: opts.snapshot_every,
        membership: Default::default(),
        manager: RwLock::new(None),
        session_status: RwLock::new(None),
        applied: RwLock::new(None),
        encryption: RwLock::new(None),
        config: RwLock::new(None),
        error: RwLock::new(String::new()),
        events,
    });
    daemon.resume().await?;
    daemon.sandboxes.remove_orphans(&daemon.datapath()).await;
    daemon.sandboxes.serve_dns_all().await;
    if let Err(e) = daemon.sandboxes.sync_ports(&daemon.datapath()).await {
        tracing::warn!("published ports: {e}; the reconcile pass will retry");
    }

    let d = daemon.clone();
    tokio::spawn(async move {
        while let Some(ev) = events_rx.recv().await {
            d.on_session_event(ev).await;
        }
    });

    info!(socket = %opts.socket.display(), state_dir = %opts.state_dir.display(), "mesh daemon ready");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let control = ControlServer::new(control::ControlService::new(daemon.clone()));
    let serve = tonic::transport::Server::builder()
        .add_service(control)
        .serve_with_incoming_shutdown(incoming, shutdown_signal());
    let r = serve.await;
    daemon.stop_all().await;
    let _ = std::fs::remove_file(&opts.socket);
    r.context("control socket server failed")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down");
}

/// Binds the control socket, refusing to steal it from a live daemon but
/// replacing one left behind by a crash.
async fn bind_socket(path: &std::path::Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another mesh daemon is already listening on {}; stop it first or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(l)
}

impl Daemon {
    /// Data-path settings: the cluster's once joined, a local default before.
    fn datapath(&self) -> mesh_worker::sandboxes::DataPath {
        self.datapath
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(mesh_worker::sandboxes::DataPath {
                prefix: self.prefix.clone(),
                local_ip: std::net::Ipv4Addr::UNSPECIFIED,
                port: mesh_manager::state::DEFAULT_DATA_PATH_PORT,
                overlay_mtu: 1450,
                kernel: self.kernel.clone(),
            })
    }

    /// Takes down a removed local bridge network's bridge and NAT rules.
    async fn remove_local_bridge(&self, net: &mesh_worker::local_networks::LocalNetwork) {
        let dp = self.datapath();
        let mtu = dp.underlay_mtu();
        let Some(spec) = net.bridge_spec(mtu) else {
            return;
        };
        let _kernel = dp.kernel.lock().await;
        if let Err(e) = mesh_worker::local::remove_bridge(&dp.node(), &spec.bridge).await {
            warn!("removing bridge {}: {e}", spec.bridge);
        }
        if let Err(e) = self.sandboxes.sync_local_nat(&dp) {
            warn!("updating NAT rules: {e}");
        }
    }

    fn managers_link(&self) -> Option<mesh_worker::managers::Managers> {
        self.managers_link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn manager(&self) -> Option<Arc<Manager>> {
        self.manager
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn on_session_event(&self, ev: SessionEvent) {
        match ev {
            SessionEvent::RoleChanged(role) => {
                if let Err(e) = self.switch_role(role).await {
                    warn!("cannot switch to role {role}: {e:#}");
                }
            }
            SessionEvent::Removed(msg) => {
                warn!("{msg}; forgetting the cluster");
                let mut m = self.membership.lock().await;
                self.teardown(&mut m).await;
                if let Err(e) = self.state_dir.wipe_cluster() {
                    warn!("{e}");
                }
                *self.error.write().unwrap_or_else(|e| e.into_inner()) =
                    "this node was removed from the cluster; join again with `mesh join`".into();
            }
        }
    }
}
