//! The task runner's decision table, free of I/O: from the tasks in the
//! node's view, the task sandboxes on this node and what the runner is
//! already doing with each, which tasks to start, stop and remove, and which
//! states to report. `tasks.rs` carries the decisions out.
//!
//! A task with a health check is "starting" (health starting) until its
//! check passes, then "running" (healthy); the managers put only running
//! tasks in VIPs, DNS and ingress, so it serves only once healthy. An
//! unhealthy task is reported failed ("unhealthy container") and stopped;
//! its restart policy replaces it.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mesh_common::model::TaskState;
use mesh_proto::{TaskAssignment, TaskReport};

use crate::health::Health;

/// The error of a task its health check failed, close to Docker's.
pub const UNHEALTHY: &str = "unhealthy container";

/// A report the managers have not reflected yet is sent again after this.
pub const REPORT_AGAIN: Duration = Duration::from_secs(2);

/// What this node knows of one task beyond its sandbox record.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// A start job is running (possibly waiting out the restart delay).
    Starting,
    /// The start failed; the error is reported as "rejected".
    Rejected(String),
    /// A stop job is running.
    Stopping,
    /// Stopped on the managers' request.
    Stopped,
}

/// What one pass does.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Tasks to start (the view wants them running and there is no sandbox).
    pub start: Vec<String>,
    /// Tasks to stop once the other nodes drained them.
    pub stop: Vec<String>,
    /// Task sandboxes that are not ours any more (ended, or moved while
    /// this node was down), removed at once.
    pub remove: Vec<String>,
    /// States the managers have not heard yet.
    pub reports: Vec<Report>,
}

/// One task state to tell the managers.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub task_id: String,
    pub state: TaskState,
    pub message: &'static str,
    pub error: String,
    pub exit_code: i32,
    /// "" without a check, else the health's word.
    pub health: &'static str,
}

impl Report {
    fn new(task_id: &str, state: TaskState, message: &'static str) -> Self {
        Report {
            task_id: task_id.to_string(),
            state,
            message,
            error: String::new(),
            exit_code: 0,
            health: "",
        }
    }

    fn with_health(self, h: Option<Health>) -> Self {
        Report {
            health: h.map_or("", Health::as_str),
            ..self
        }
    }

    fn rejected(task_id: &str, error: &str) -> Self {
        Report {
            error: error.to_string(),
            exit_code: -1,
            ..Report::new(task_id, TaskState::Rejected, "task: failed to start")
        }
    }

    pub fn to_proto(&self) -> TaskReport {
        TaskReport {
            task_id: self.task_id.clone(),
            state: self.state.to_string(),
            message: self.message.to_string(),
            error: self.error.clone(),
            exit_code: self.exit_code,
            health: self.health.to_string(),
        }
    }
}

/// Whether an assignment carries a check that runs.
pub fn has_check(t: &TaskAssignment) -> bool {
    t.health
        .as_ref()
        .is_some_and(|h| !h.disabled && !h.cmd.is_empty())
}

/// The table. `tasks` are the view's tasks (IDs already checked),
/// `exits` this node's task sandboxes by ID with their exit code (None:
/// still running), `phases` what the runner is doing with each task,
/// `health` what the checks of running tasks found so far.
pub fn plan(
    tasks: &[&TaskAssignment],
    exits: &HashMap<String, Option<i32>>,
    phases: &HashMap<String, Phase>,
    health: &HashMap<String, Health>,
) -> Plan {
    let mut p = Plan::default();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut reports = Vec::new();
    for t in tasks {
        let id = t.id.as_str();
        // A task listed twice is decided once.
        if !seen.insert(id) {
            continue;
        }
        let phase = phases.get(id);
        let exit = exits.get(id);
        if t.desired_state.parse() == Ok(TaskState::Running) {
            // Without a check there is no health; with one, starting until
            // the check says otherwise.
            let h = has_check(t).then(|| health.get(id).copied().unwrap_or(Health::Starting));
            match (phase, exit) {
                (Some(Phase::Starting | Phase::Stopping), _) => {}
                (Some(Phase::Rejected(err)), _) => reports.push(Report::rejected(id, err)),
                // Failed for good; stopped while still running.
                _ if h == Some(Health::Unhealthy) => {
                    if exit == Some(&None) {
                        p.stop.push(id.to_string());
                    }
                    reports.push(Report {
                        error: UNHEALTHY.to_string(),
                        exit_code: -1,
                        ..Report::new(id, TaskState::Failed, "health check failed").with_health(h)
                    });
                }
                (_, Some(None)) if h == Some(Health::Starting) => {
                    reports.push(Report::new(id, TaskState::Starting, "starting").with_health(h));
                }
                (_, Some(None)) => {
                    reports.push(Report::new(id, TaskState::Running, "started").with_health(h));
                }
                (_, Some(Some(0))) => {
                    reports.push(Report::new(id, TaskState::Complete, "finished").with_health(h));
                }
                (_, Some(Some(code))) => reports.push(Report {
                    error: format!("task: non-zero exit ({code})"),
                    exit_code: *code,
                    ..Report::new(id, TaskState::Failed, "task exited").with_health(h)
                }),
                (_, None) => {
                    p.start.push(id.to_string());
                    reports.push(Report::new(id, TaskState::Starting, "starting").with_health(h));
                }
            }
        } else {
            match (phase, exit) {
                // Stopping already, or stopped once its start is done.
                (Some(Phase::Stopping | Phase::Starting), _) => {}
                (_, Some(_)) => p.stop.push(id.to_string()),
                (Some(Phase::Rejected(err)), None) => reports.push(Report::rejected(id, err)),
                (_, None) => reports.push(Report::new(id, TaskState::Shutdown, "stopped")),
            }
        }
    }
    let mut gone: Vec<&String> = exits
        .keys()
        .filter(|id| !seen.contains(id.as_str()) && !phases.contains_key(*id))
        .collect();
    gone.sort();
    p.remove = gone.into_iter().cloned().collect();
    // Only what differs from what the managers last heard.
    let known: HashMap<&str, &str> = tasks
        .iter()
        .map(|t| (t.id.as_str(), t.known_state.as_str()))
        .collect();
    p.reports = reports
        .into_iter()
        .filter(|r| known.get(r.task_id.as_str()) != Some(&r.state.as_str()))
        .collect();
    p
}

/// The reports to send now: a state not sent yet, or sent more than
/// [`REPORT_AGAIN`] before `now` without the managers reflecting it. Marks
/// them sent in `sent`.
pub fn due(
    reports: Vec<Report>,
    sent: &mut HashMap<String, (TaskState, Instant)>,
    now: Instant,
) -> Vec<Report> {
    reports
        .into_iter()
        .filter(|r| {
            let fresh = sent.get(&r.task_id).is_none_or(|(s, at)| {
                *s != r.state || now.saturating_duration_since(*at) > REPORT_AGAIN
            });
            if fresh {
                sent.insert(r.task_id.clone(), (r.state, now));
            }
            fresh
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, desired: &str, known: &str) -> TaskAssignment {
        TaskAssignment {
            id: id.into(),
            desired_state: desired.into(),
            known_state: known.into(),
            ..Default::default()
        }
    }

    fn run(
        tasks: &[TaskAssignment],
        exits: &[(&str, Option<i32>)],
        phases: &[(&str, Phase)],
    ) -> Plan {
        run_health(tasks, exits, phases, &[])
    }

    fn checked(id: &str, known: &str) -> TaskAssignment {
        TaskAssignment {
            health: Some(mesh_proto::HealthCheck {
                cmd: "true".into(),
                ..Default::default()
            }),
            ..task(id, "running", known)
        }
    }

    fn run_health(
        tasks: &[TaskAssignment],
        exits: &[(&str, Option<i32>)],
        phases: &[(&str, Phase)],
        health: &[(&str, Health)],
    ) -> Plan {
        let refs: Vec<&TaskAssignment> = tasks.iter().collect();
        let exits = exits.iter().map(|(i, e)| (i.to_string(), *e)).collect();
        let phases = phases
            .iter()
            .map(|(i, p)| (i.to_string(), p.clone()))
            .collect();
        let health = health.iter().map(|(i, h)| (i.to_string(), *h)).collect();
        plan(&refs, &exits, &phases, &health)
    }

    #[test]
    fn a_checked_task_is_starting_until_healthy() {
        // Started: reported starting with health starting.
        let p = run_health(&[checked("a", "assigned")], &[], &[], &[]);
        assert_eq!(p.start, ["a"]);
        assert_eq!(
            (p.reports[0].state, p.reports[0].health),
            (TaskState::Starting, "starting")
        );
        // Its process runs but no probe passed: nothing new to say.
        let p = run_health(&[checked("a", "starting")], &[("a", None)], &[], &[]);
        assert_eq!(p, Plan::default());
        let p = run_health(
            &[checked("a", "starting")],
            &[("a", None)],
            &[],
            &[("a", Health::Starting)],
        );
        assert_eq!(p, Plan::default());
        // Healthy: running.
        let p = run_health(
            &[checked("a", "starting")],
            &[("a", None)],
            &[],
            &[("a", Health::Healthy)],
        );
        assert_eq!(
            (p.reports[0].state, p.reports[0].health),
            (TaskState::Running, "healthy")
        );
        assert_eq!(p.reports[0].to_proto().health, "healthy");
    }

    #[test]
    fn an_unhealthy_task_is_failed_and_stopped() {
        let p = run_health(
            &[checked("a", "running")],
            &[("a", None)],
            &[],
            &[("a", Health::Unhealthy)],
        );
        assert_eq!(p.stop, ["a"]);
        let r = &p.reports[0];
        assert_eq!(
            (r.state, r.health, r.error.as_str()),
            (TaskState::Failed, "unhealthy", UNHEALTHY)
        );
        // Once stopped it is not started again while the view still wants
        // it running (no restart policy): only the failure is told.
        let p = run_health(
            &[checked("a", "running")],
            &[],
            &[("a", Phase::Stopped)],
            &[("a", Health::Unhealthy)],
        );
        assert!(p.start.is_empty() && p.stop.is_empty());
        assert_eq!(states(&p), [("a", TaskState::Failed)]);
        // The managers know: silence.
        let p = run_health(
            &[checked("a", "failed")],
            &[],
            &[("a", Phase::Stopped)],
            &[("a", Health::Unhealthy)],
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_task_without_a_check_reports_no_health() {
        let p = run_health(
            &[task("a", "running", "starting")],
            &[("a", None)],
            &[],
            &[("a", Health::Starting)],
        );
        assert_eq!(
            (p.reports[0].state, p.reports[0].health),
            (TaskState::Running, "")
        );
    }

    fn states(p: &Plan) -> Vec<(&str, TaskState)> {
        p.reports
            .iter()
            .map(|r| (r.task_id.as_str(), r.state))
            .collect()
    }

    #[test]
    fn a_wanted_task_without_a_sandbox_starts() {
        let p = run(&[task("a", "running", "assigned")], &[], &[]);
        assert_eq!(p.start, ["a"]);
        assert_eq!(states(&p), [("a", TaskState::Starting)]);
        assert!(p.stop.is_empty() && p.remove.is_empty());
        // Listed twice, started once.
        let p = run(
            &[task("a", "running", ""), task("a", "running", "")],
            &[],
            &[],
        );
        assert_eq!(p.start, ["a"]);
    }

    #[test]
    fn a_sandbox_reports_running_complete_or_failed() {
        let tasks = [
            task("r", "running", "starting"),
            task("c", "running", "running"),
            task("f", "running", "running"),
        ];
        let p = run(&tasks, &[("r", None), ("c", Some(0)), ("f", Some(3))], &[]);
        assert!(p.start.is_empty() && p.stop.is_empty() && p.remove.is_empty());
        assert_eq!(
            states(&p),
            [
                ("r", TaskState::Running),
                ("c", TaskState::Complete),
                ("f", TaskState::Failed)
            ]
        );
        let failed = &p.reports[2];
        assert_eq!(
            (failed.error.as_str(), failed.exit_code),
            ("task: non-zero exit (3)", 3)
        );
    }

    #[test]
    fn what_the_managers_already_know_is_not_reported() {
        let p = run(&[task("r", "running", "running")], &[("r", None)], &[]);
        assert_eq!(p, Plan::default());
        let p = run(&[task("s", "shutdown", "shutdown")], &[], &[]);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn jobs_under_way_are_left_alone() {
        for phase in [Phase::Starting, Phase::Stopping] {
            for desired in ["running", "shutdown"] {
                let p = run(
                    &[task("a", desired, "")],
                    &[("a", None)],
                    &[("a", phase.clone())],
                );
                assert_eq!(p, Plan::default(), "{phase:?} {desired}");
            }
        }
    }

    #[test]
    fn a_failed_start_is_rejected_with_its_error() {
        let rejected = Phase::Rejected("no such network".into());
        for desired in ["running", "shutdown"] {
            let p = run(
                &[task("a", desired, "starting")],
                &[],
                &[("a", rejected.clone())],
            );
            assert_eq!(states(&p), [("a", TaskState::Rejected)], "{desired}");
            assert_eq!(p.reports[0].error, "no such network");
            assert_eq!(p.reports[0].exit_code, -1);
            assert!(p.start.is_empty());
        }
    }

    #[test]
    fn a_task_to_shut_down_is_stopped_then_reported() {
        let p = run(&[task("a", "shutdown", "running")], &[("a", None)], &[]);
        assert_eq!(p.stop, ["a"]);
        assert!(p.reports.is_empty());
        let p = run(
            &[task("a", "shutdown", "running")],
            &[],
            &[("a", Phase::Stopped)],
        );
        assert!(p.stop.is_empty());
        assert_eq!(states(&p), [("a", TaskState::Shutdown)]);
        // Any desired state but "running" means stop.
        let p = run(&[task("a", "bogus", "running")], &[("a", Some(0))], &[]);
        assert_eq!(p.stop, ["a"]);
    }

    #[test]
    fn sandboxes_no_longer_in_the_view_are_removed_unless_busy() {
        let p = run(
            &[task("a", "running", "running")],
            &[("a", None), ("old", Some(0)), ("busy", None), ("b", None)],
            &[("busy", Phase::Stopping)],
        );
        assert_eq!(p.remove, ["b", "old"]);
    }

    #[test]
    fn reports_are_repeated_only_when_changed_or_unanswered() {
        let t0 = Instant::now();
        let mut sent = HashMap::new();
        let r = |s| Report::new("a", s, "x");
        assert_eq!(due(vec![r(TaskState::Starting)], &mut sent, t0).len(), 1);
        // The same state again soon: not sent.
        let soon = t0 + Duration::from_millis(500);
        assert!(due(vec![r(TaskState::Starting)], &mut sent, soon).is_empty());
        // A new state: sent at once.
        assert_eq!(due(vec![r(TaskState::Running)], &mut sent, soon).len(), 1);
        // The same state, long unanswered: sent again.
        let later = soon + REPORT_AGAIN + Duration::from_millis(1);
        assert_eq!(due(vec![r(TaskState::Running)], &mut sent, later).len(), 1);
    }

    #[test]
    fn reports_carry_the_words_the_managers_expect() {
        let p = run(&[task("f", "running", "")], &[("f", Some(2))], &[]);
        let proto = p.reports[0].to_proto();
        assert_eq!(
            (
                proto.state.as_str(),
                proto.message.as_str(),
                proto.exit_code
            ),
            ("failed", "task exited", 2)
        );
    }
}
