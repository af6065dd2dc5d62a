//! The task runner: runs the service tasks the managers placed on this node
//! and tells them what became of each.
//!
//! Like the agent it reconciles rather than replays: each pass compares the
//! tasks in the view with the sandboxes on the node, starts what is missing,
//! stops what should stop, removes what is no longer ours, and reports every
//! task whose state differs from what the managers last heard. A task being
//! stopped first leaves every VIP and DNS answer — the managers already took
//! it out when they set it to shutdown; we wait until every other node has
//! applied that — and only then gets SIGTERM.
//!
//! A task with a health check gets a monitor (`health.rs`) once its process
//! runs; its health decides whether the task is reported starting, running
//! or failed (`task_plan`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_common::model::TaskState;
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{NodeView, TaskAssignment, TaskReport, TaskReports, WaitConvergedRequest};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::health::{self, Check, Health};
use crate::managers::Managers;
use crate::sandboxes::{DataPath, Sandboxes, check_id};
use crate::task_plan::{self, Phase, Report};

/// How often running tasks are checked for an exit.
const EXIT_POLL: Duration = Duration::from_millis(200);
/// Longest wait for other nodes to drop a stopping task from their rules.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Local {
    phases: HashMap<String, Phase>,
    /// Last report sent per task, and when.
    sent: HashMap<String, (TaskState, Instant)>,
    /// Task IDs of the view that are not mesh IDs, already warned about.
    refused: HashSet<String>,
    /// Health monitors of running tasks with a check, by task ID.
    monitors: HashMap<String, Monitor>,
}

/// A running (or finished) health monitor and what it found.
struct Monitor {
    task: AbortHandle,
    status: watch::Receiver<health::Status>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct TaskRunner {
    sandboxes: Arc<Sandboxes>,
    managers: Managers,
    dp: DataPath,
    node_id: String,
    local: Mutex<Local>,
    wake: Notify,
    /// Bounds the health probes running at once on this node.
    probes: Arc<Semaphore>,
}

impl TaskRunner {
    pub fn new(
        sandboxes: Arc<Sandboxes>,
        managers: Managers,
        dp: DataPath,
        node_id: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            sandboxes,
            managers,
            dp,
            node_id,
            local: Mutex::default(),
            wake: Notify::new(),
            probes: Arc::new(Semaphore::new(health::MAX_PROBES)),
        })
    }

    fn set_phase(&self, id: &str, p: Option<Phase>) {
        let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Some(p) => l.phases.insert(id.to_string(), p),
            None => l.phases.remove(id),
        };
        drop(l);
        self.wake.notify_one();
    }

    /// Runs passes on every new view, on a task exit, and every second.
    pub async fn run(
        self: Arc<Self>,
        mut views: watch::Receiver<Option<NodeView>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut last_poll = Instant::now();
        let mut seen_exits: HashSet<String> = HashSet::new();
        loop {
            let view = views.borrow_and_update().clone();
            if let Some(view) = view {
                self.pass(&view).await;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            // Between passes, watch running tasks for an exit.
            loop {
                tokio::select! {
                    _ = views.changed() => break,
                    _ = self.wake.notified() => break,
                    _ = tokio::time::sleep(EXIT_POLL) => {}
                    _ = stop.changed() => return,
                }
                if last_poll.elapsed() >= EXIT_POLL {
                    last_poll = Instant::now();
                    let exited: HashSet<String> = self
                        .sandboxes
                        .list()
                        .into_iter()
                        .filter(|r| r.service.is_some() && r.exit_code.is_some())
                        .map(|r| r.id)
                        .collect();
                    let new = exited.iter().any(|id| !seen_exits.contains(id));
                    seen_exits = exited;
                    if new {
                        break;
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
        }
    }

    /// One pass over the view's tasks and this node's task sandboxes: the
    /// decisions are [`task_plan::plan`]'s, carried out here.
    async fn pass(self: &Arc<Self>, view: &NodeView) {
        let tasks = self.valid_tasks(view);
        // Phases before records: a start that ends in between then shows
        // as its sandbox, never as "no job and no sandbox" (a second start).
        let phases = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phases
            .clone();
        let records: HashMap<String, crate::sandboxes::Record> = self
            .sandboxes
            .list()
            .into_iter()
            .filter(|r| r.service.is_some())
            .map(|r| (r.id.clone(), r))
            .collect();
        let exits: HashMap<String, Option<i32>> = records
            .iter()
            .map(|(id, r)| (id.clone(), r.exit_code))
            .collect();
        let by_id: HashMap<&str, &TaskAssignment> =
            tasks.iter().map(|t| (t.id.as_str(), *t)).collect();
        let health = self.monitor_health(&by_id, &records, &phases);
        let plan = task_plan::plan(&tasks, &exits, &phases, &health);
        for id in &plan.start {
            if let Some(t) = by_id.get(id.as_str()) {
                self.set_phase(id, Some(Phase::Starting));
                tokio::spawn(self.clone().start((*t).clone()));
            }
        }
        for id in &plan.stop {
            self.set_phase(id, Some(Phase::Stopping));
            tokio::spawn(self.clone().stop(id.clone()));
        }
        for id in &plan.remove {
            if let Some(r) = records.get(id) {
                info!(task = %r.name, "removing a task this node no longer runs");
            }
            self.set_phase(id, Some(Phase::Stopping));
            let me = self.clone();
            let id = id.clone();
            tokio::spawn(async move {
                if let Err(e) = me.sandboxes.remove_task(&id, &me.dp).await {
                    warn!("{e}");
                }
                me.set_phase(&id, None);
            });
        }
        let due: Vec<TaskReport> = {
            let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
            l.phases
                .retain(|id, p| by_id.contains_key(id.as_str()) || matches!(p, Phase::Stopping));
            l.sent.retain(|id, _| by_id.contains_key(id.as_str()));
            task_plan::due(plan.reports, &mut l.sent, Instant::now())
                .iter()
                .map(Report::to_proto)
                .collect()
        };
        if !due.is_empty() {
            self.send(due).await;
        }
    }

    /// Keeps one health monitor per running task with a check (started
    /// once its process runs, ended when the task leaves the view or is to
    /// stop), and returns what each found.
    fn monitor_health(
        self: &Arc<Self>,
        by_id: &HashMap<&str, &TaskAssignment>,
        records: &HashMap<String, crate::sandboxes::Record>,
        phases: &HashMap<String, Phase>,
    ) -> HashMap<String, Health> {
        let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
        l.monitors.retain(|id, _| {
            by_id
                .get(id.as_str())
                .is_some_and(|t| t.desired_state.parse() == Ok(TaskState::Running))
        });
        for (id, t) in by_id {
            if l.monitors.contains_key(*id)
                || t.desired_state.parse() != Ok(TaskState::Running)
                || phases.contains_key(*id)
            {
                continue;
            }
            let Some(check) = Check::from_pb(t.health.as_ref()) else {
                continue;
            };
            let Some(r) = records.get(*id).filter(|r| r.running() && r.pid > 1) else {
                continue;
            };
            let (tx, rx) = watch::channel(health::Status {
                health: Health::Starting,
                outputs: Default::default(),
            });
            let me = Arc::downgrade(self);
            let job = tokio::spawn(health::monitor(
                r.name.clone(),
                r.pid,
                check,
                r.env.clone(),
                self.probes.clone(),
                tx,
                move || {
                    if let Some(me) = me.upgrade() {
                        me.wake.notify_one();
                    }
                },
            ));
            l.monitors.insert(
                id.to_string(),
                Monitor {
                    task: job.abort_handle(),
                    status: rx,
                },
            );
        }
        l.monitors
            .iter()
            .map(|(id, m)| (id.clone(), m.status.borrow().health))
            .collect()
    }

    /// The view's tasks whose IDs are mesh IDs: any other is skipped before
    /// it can name a path, a namespace or a link, with one warning per ID
    /// while it stays in the view.
    fn valid_tasks<'a>(&self, view: &'a NodeView) -> Vec<&'a TaskAssignment> {
        let (good, bad): (Vec<_>, Vec<_>) =
            view.tasks.iter().partition(|t| check_id(&t.id).is_ok());
        let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
        l.refused.retain(|id| bad.iter().any(|t| t.id == *id));
        for t in bad {
            if l.refused.insert(t.id.clone())
                && let Err(e) = check_id(&t.id)
            {
                warn!("skipping a task the managers sent: {e}");
            }
        }
        good
    }

    async fn send(&self, reports: Vec<TaskReport>) {
        debug!(count = reports.len(), "reporting task states");
        let req = TaskReports { reports };
        let r = self
            .managers
            .call(|ch| {
                let req = req.clone();
                async move { ClusterClient::new(ch).report_tasks(req).await }
            })
            .await;
        if let Err(s) = r {
            warn!("cannot report task states, will retry: {}", s.message());
            // Forget what was sent so the next pass sends it again.
            let mut l = self.local.lock().unwrap_or_else(|e| e.into_inner());
            for t in &req.reports {
                l.sent.remove(&t.task_id);
            }
        }
    }

    async fn start(self: Arc<Self>, t: TaskAssignment) {
        if t.start_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(t.start_delay_ms)).await;
        }
        match self.sandboxes.run_task(&t, &self.dp).await {
            Ok(_) => self.set_phase(&t.id, None),
            Err(e) => {
                warn!(task = %t.name, "task failed to start: {e}");
                self.set_phase(&t.id, Some(Phase::Rejected(e.to_string())));
            }
        }
    }

    /// Stops a task once every other node has stopped sending to it.
    async fn stop(self: Arc<Self>, id: String) {
        let req = WaitConvergedRequest {
            exclude_node: self.node_id.clone(),
            timeout_ms: DRAIN_WAIT.as_millis() as u64,
        };
        let drained = self
            .managers
            .call(|ch| {
                let req = req.clone();
                async move { ClusterClient::new(ch).wait_converged(req).await }
            })
            .await;
        match drained {
            Ok(r) if !r.get_ref().converged => {
                debug!(task = %id, behind = ?r.get_ref().behind, "stopping although some nodes are behind");
            }
            Err(s) => {
                debug!(task = %id, "cannot ask whether nodes drained the task: {}", s.message())
            }
            Ok(_) => {}
        }
        if let Err(e) = self.sandboxes.remove_task(&id, &self.dp).await {
            warn!("{e}");
        }
        self.set_phase(&id, Some(Phase::Stopped));
    }
}
