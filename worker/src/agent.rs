//! The data-path agent: makes this node's kernel match its view from the
//! managers, and keeps it so.
//!
//! Reconcile, don't replay: each pass compares the whole view with what the
//! kernel has (networks, FDB and neighbour entries, sandbox links) and fixes
//! the difference. A pass runs when a new view arrives and every few seconds
//! anyway, so a restart, a lost message or an entry deleted by hand heals.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{Empty, NodeView};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::managers::Managers;
use crate::overlay;
use crate::sandboxes::{DataPath, Sandboxes, overlay_attachment, overlay_spec};

/// How often the kernel is re-checked without a new view.
pub const RESYNC_EVERY: Duration = Duration::from_secs(3);

pub struct AgentHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AgentHandle {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Who this node is, for the parts that speak of it to the managers.
pub struct NodeIds {
    pub node_id: String,
    pub hostname: String,
}

pub fn spawn(
    managers: Managers,
    dp: DataPath,
    sandboxes: Arc<Sandboxes>,
    applied: Arc<crate::session::Applied>,
    me: NodeIds,
) -> AgentHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (view_tx, view_rx) = watch::channel::<Option<NodeView>>(None);
    let follow = tokio::spawn(follow_views(managers.clone(), view_tx, stop_rx.clone()));
    let runner =
        crate::tasks::TaskRunner::new(sandboxes.clone(), managers.clone(), dp.clone(), me.node_id);
    let tasks = tokio::spawn(runner.run(view_rx.clone(), stop_rx.clone()));
    let logs = tokio::spawn(crate::task_logs::serve(
        managers,
        sandboxes.clone(),
        me.hostname,
        stop_rx.clone(),
    ));
    let task = tokio::spawn(async move {
        reconcile_loop(dp, sandboxes, applied, view_rx, stop_rx).await;
        follow.abort();
        let _ = tasks.await;
        let _ = logs.await;
    });
    AgentHandle { stop, task }
}

/// Keeps one Assignments stream open to some manager, reconnecting on loss.
async fn follow_views(
    managers: Managers,
    tx: watch::Sender<Option<NodeView>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let stream = managers
            .call(|ch| async move {
                ClusterClient::new(ch)
                    .assignments(Empty {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
        match stream {
            Ok(mut s) => loop {
                tokio::select! {
                    m = s.message() => match m {
                        Ok(Some(view)) => {
                            debug!(generation = view.generation, networks = view.networks.len(), "new node view");
                            let _ = tx.send(Some(view));
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = stop.changed() => return,
                }
            },
            Err(s) => debug!("no view stream: {}", s.message()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn reconcile_loop(
    dp: DataPath,
    sandboxes: Arc<Sandboxes>,
    applied: Arc<crate::session::Applied>,
    mut views: watch::Receiver<Option<NodeView>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            match reconcile(&dp, &sandboxes, &view).await {
                Ok(repairs) => {
                    if repairs > 0 {
                        info!(generation = view.generation, repairs, "data path repaired");
                    }
                    applied.set(view.generation, mesh_proto::view_digest(&view));
                }
                Err(e) => warn!("data path reconcile failed, will retry: {e}"),
            }
        }
        tokio::select! {
            _ = views.changed() => {}
            _ = tokio::time::sleep(RESYNC_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One pass. Returns how many things had to be fixed.
pub async fn reconcile(
    dp: &DataPath,
    sandboxes: &Sandboxes,
    view: &NodeView,
) -> Result<usize, crate::netns::NetError> {
    let _kernel = dp.kernel.lock().await;
    let mut repairs = 0;
    let dp = DataPath {
        port: u16::try_from(view.data_path_port).unwrap_or(dp.port),
        ..dp.clone()
    };
    sandboxes.set_view(view);
    let records = sandboxes.list();
    let mut wanted_vnis = Vec::new();
    for net in &view.networks {
        wanted_vnis.push(net.vni);
        let (Ok(subnet), Ok(gateway)) = (
            net.subnet.parse::<ipnet::Ipv4Net>(),
            net.gateway.parse::<Ipv4Addr>(),
        ) else {
            warn!(network = %net.name, "bad subnet or gateway in the view");
            continue;
        };
        let spec = overlay::OverlaySpec {
            vni: net.vni,
            subnet,
            gateway,
            mtu: if net.mtu == 0 {
                dp.overlay_mtu
            } else {
                net.mtu
            },
            local_ip: dp.local_ip,
            port: dp.port,
        };
        overlay::ensure_network(&dp.node(), &spec).await?;
        let peers: Vec<overlay::Peer> = net
            .peers
            .iter()
            .filter_map(|p| {
                let ip: Ipv4Addr = p.ip.parse().ok()?;
                Some(overlay::Peer {
                    ip,
                    mac: overlay::mac_for(ip),
                    node_ip: p.node_addr.parse().ok()?,
                })
            })
            .collect();
        let report = overlay::sync_peers(&dp.node(), net.vni, &peers).await?;
        repairs += report.changed();
        // Local sandboxes on this network keep their links.
        for rec in records.iter().filter(|r| r.exit_code.is_none()) {
            for a in rec
                .networks
                .iter()
                .filter(|a| a.network_id == net.id && a.driver == "overlay")
            {
                overlay::attach(
                    &dp.node(),
                    &overlay_spec(a, &dp),
                    &overlay_attachment(rec, a),
                )
                .await?;
            }
        }
    }
    // Local (bridge, macvlan) attachments heal on the same pass, and the
    // bridge networks' NAT table with them (once, not per attachment).
    let mut bridges = false;
    for rec in records.iter().filter(|r| r.exit_code.is_none()) {
        for a in rec.networks.iter().filter(|a| a.driver != "overlay") {
            bridges |= a.driver == "bridge";
            if let Err(e) = sandboxes.wire(rec, a, &dp).await {
                warn!(sandbox = %rec.name, network = %a.network, "cannot repair local attachment: {e}");
            }
        }
    }
    if bridges && let Err(e) = sandboxes.sync_local_nat(&dp) {
        warn!("cannot repair the bridge networks' NAT table: {e}");
    }
    // Service VIPs in every sandbox on an overlay, before the view counts
    // as applied: a task leaving the rotation is gone from here first.
    sandboxes.sync_vips(&records);

    // Networks this node no longer needs.
    for vni in overlay::networks_in_kernel(&dp.node())? {
        if !wanted_vnis.contains(&vni) {
            info!(vni, "removing a network this node no longer needs");
            overlay::remove_network(&dp.node(), vni).await?;
            repairs += 1;
        }
    }
    Ok(repairs)
}
