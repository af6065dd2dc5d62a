//! The data-path agent: makes this node's kernel match its view from the
//! managers, and keeps it so.
//!
//! Reconcile, don't replay: each pass runs every network driver, egress, the
//! VIP tables and the DNS listeners, each comparing the whole view with what
//! the kernel has and fixing the difference. A pass runs when a new view
//! arrives and every few seconds anyway, so a restart, a lost message or an
//! entry deleted by hand heals. What a pass cannot fix is collected per
//! network and per sandbox, never stops the rest, and is the node's status
//! (`mesh info`, the heartbeat) until a later pass fixes it.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::NodeView;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use mesh_common::model::DriverKind;

use crate::drivers::{self, Desired, Egress, Fault, Repair};
use crate::encryption::Encryption;
use crate::managers::Managers;
use crate::sandboxes::{DataPath, Record, Sandboxes};
use crate::tunnel::Tunnel;
use crate::views::ChangeLog;

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
    encryption: Arc<Encryption>,
    me: NodeIds,
) -> AgentHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (view_tx, view_rx) = watch::channel::<Option<NodeView>>(None);
    let changes = Arc::new(crate::views::ChangeLog::default());
    let follow = tokio::spawn(crate::views::follow(
        managers.clone(),
        view_tx,
        changes.clone(),
        stop_rx.clone(),
    ));
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
        reconcile_loop(
            dp, sandboxes, applied, encryption, view_rx, changes, stop_rx,
        )
        .await;
        follow.abort();
        let _ = tasks.await;
        let _ = logs.await;
    });
    AgentHandle { stop, task }
}

async fn reconcile_loop(
    dp: DataPath,
    sandboxes: Arc<Sandboxes>,
    applied: Arc<crate::session::Applied>,
    encryption: Arc<Encryption>,
    mut views: watch::Receiver<Option<NodeView>>,
    changes: Arc<ChangeLog>,
    mut stop: watch::Receiver<bool>,
) {
    // The WireGuard device lives as long as this loop: leaving the cluster
    // stops the agent and so the device.
    let mut tunnel = Tunnel::default();
    let mut rotations = encryption.subscribe();
    // The generation the last pass worked from: what changed since is
    // what a new view brings.
    let mut seen: Option<u64> = None;
    loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            if seen != Some(view.generation) {
                let changed = changes.changed_since(seen);
                debug!(
                    generation = view.generation,
                    all = changed.all,
                    networks = ?changed.networks,
                    tasks = changed.tasks.len(),
                    ingress = changed.ingress,
                    "view changed"
                );
                seen = Some(view.generation);
            }
            let key = encryption.private_key();
            let pass = reconcile(&dp, &sandboxes, &view, &mut tunnel, key).await;
            let (datapath, port, peers) = tunnel.status().unwrap_or_default();
            encryption.set_status(datapath, port, peers);
            if pass.repairs > 0 {
                info!(
                    generation = view.generation,
                    repairs = pass.repairs,
                    "data path repaired"
                );
            }
            let faults: Vec<String> = pass.faults.iter().map(ToString::to_string).collect();
            if faults != applied.faults() {
                for f in &faults {
                    warn!("data path: {f}; will retry");
                }
                if faults.is_empty() {
                    info!("data path: every earlier fault is repaired");
                }
            }
            // The view counts as applied once its overlays are: the
            // managers wait for that before they call a change converged.
            if pass.overlays_applied {
                applied.set(view.generation, mesh_proto::view_digest(&view));
            }
            applied.set_faults(faults);
        }
        tokio::select! {
            _ = views.changed() => {}
            // A new key pair goes into the device at once.
            _ = rotations.changed() => {}
            _ = tokio::time::sleep(RESYNC_EVERY) => {}
            _ = stop.changed() => {
                // Out of the cluster, nothing is being reconciled.
                applied.set_faults(Vec::new());
                return;
            }
        }
    }
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Things that had to be fixed.
    pub repairs: usize,
    /// What could not be, each with where; the rest was repaired anyway.
    pub faults: Vec<Fault>,
    /// Whether every overlay network of the view is in the kernel.
    pub overlays_applied: bool,
}

impl Pass {
    fn add(&mut self, r: Repair) {
        self.repairs += r.repairs;
        self.faults.extend(r.faults);
    }
}

/// One pass over every part of the data path: the WireGuard device, each
/// driver, egress, the service VIP tables and the DNS listeners. A failure
/// in one network or sandbox is recorded and the pass goes on with the rest.
pub async fn reconcile(
    dp: &DataPath,
    sandboxes: &Sandboxes,
    view: &NodeView,
    tunnel: &mut Tunnel,
    key: [u8; 32],
) -> Pass {
    let mut steps = crate::timing::Steps::new();
    // Teardowns wait for the pass (it acts on the sandboxes it lists);
    // starts do not, and take the kernel lock only between the node-wide
    // steps below.
    let _gate = sandboxes.pass_gate().await;
    steps.mark("gate_wait");
    let kernel = dp.kernel.lock().await;
    steps.mark("lock_wait");
    sandboxes.forget_ensured();
    let dp = DataPath {
        port: u16::try_from(view.data_path_port).unwrap_or(dp.port),
        ..dp.clone()
    };
    sandboxes.set_view(view);
    let live: Vec<Record> = sandboxes
        .list()
        .into_iter()
        .filter(|r| r.running())
        .collect();
    let want = Desired {
        view,
        sandboxes: &live,
    };
    let cx = sandboxes.ctx(&dp);
    let mut pass = Pass::default();
    // Before the overlays: an encrypted network's VXLAN is made in the
    // device's namespace.
    pass.add(tunnel.repair(&dp, view, key));
    steps.mark("tunnel");
    for driver in drivers::all() {
        let r = driver.repair(&cx, &want).await;
        steps.mark(driver.kind().as_str());
        if driver.kind() == DriverKind::Overlay {
            pass.overlays_applied = r.faults.is_empty();
        }
        pass.add(r);
    }
    pass.add(Egress.repair(&want).await);
    steps.mark("egress");
    // The routing mesh, before the view counts as applied: a stopping
    // task leaves the published ports' rotation before its SIGTERM.
    pass.add(crate::ingress::repair(&dp, view, &live).await);
    steps.mark("ingress");
    pass.add(sandboxes.repair_ports(&dp));
    steps.mark("ports");
    // What follows is per sandbox namespace: no node-wide lock.
    drop(kernel);
    // Service VIPs in every sandbox on an overlay, before the view counts
    // as applied: a task leaving the rotation is gone from here first.
    pass.add(sandboxes.sync_vips(&live));
    steps.mark("vips");
    // Names after the VIP tables: a name answers only once it is routed.
    sandboxes.refresh_dns();
    pass.add(sandboxes.repair_dns(&live).await);
    steps.mark("dns");
    debug!(
        generation = view.generation,
        sandboxes = live.len(),
        total_ms = format!("{:.1}", steps.total_ms()),
        "pass: {}",
        steps.summary()
    );
    pass
}
