//! The progress display `create`, `update` and `scale` show until the
//! service converges: reading one status into lines and an outcome
//! (`assess`, pure), drawing them, and polling until the end.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_manager::services::is_terminal;
use mesh_proto::control_client::ControlClient;
use mesh_proto::*;
use tonic::transport::Channel;

use super::show::{timestamp, why};
use crate::client::status;

/// How often progress polls the service's status.
const POLL: Duration = Duration::from_millis(100);
/// How long progress rides out a daemon or leader that cannot answer
/// (e.g. during an election) before giving up.
const UNAVAILABLE_GRACE: Duration = Duration::from_secs(5);
/// Above this many tasks only the overall line is drawn, as Docker does.
const MAX_BARS: u64 = 100;
/// Failures of one slot since the change began that mean it will not
/// converge by itself.
const FAILURES_TO_GIVE_UP: usize = 3;

/// The scheduler's message for a task no node can take.
pub(super) const NO_NODE: &str = "no suitable node";
/// How long `service rm` waits for the service's tasks to stop: more than
/// a task's 10 s stop grace, and a lost node is Down (and its tasks freed)
/// within about a second (its grace, see `mesh init --node-down-grace`).
const RM_WAIT: Duration = Duration::from_secs(30);

/// A task the managers cannot place or give addresses to: it stays
/// pending, and only the state machine writes a pending task's message
/// (no node qualifies, a network has no free address).
pub(super) fn blocked(t: &Task) -> bool {
    t.state == "pending" && !t.message.is_empty()
}

/// What a blocked task waits for, for the line `create` exits with.
fn until(why: &str) -> &'static str {
    if why.starts_with(NO_NODE) {
        "a node qualifies"
    } else if why.contains("no free address") {
        "an address is freed"
    } else {
        "that changes"
    }
}

/// The service's restart condition as Docker names it ("any" when unset).
fn restart_condition(svc: &Service) -> &str {
    match svc.restart_condition.as_str() {
        "" => "any",
        c => c,
    }
}

/// The states a task goes through to run, for the progress bars.
const STAGES: [&str; 4] = ["pending", "assigned", "starting", "running"];

/// Where a service stands, for the progress display.
#[derive(Debug, PartialEq)]
enum Outcome {
    Waiting,
    Converged,
    /// Will not converge by itself: exit with this line.
    Failed(String),
    /// Tasks no node can take: fatal once the status holds still.
    Unplaceable(String),
}

struct Progress {
    lines: Vec<String>,
    outcome: Outcome,
}

/// `[=====>      ]`: how far a task has got towards running.
fn bar(state: &str) -> Option<String> {
    let stage = STAGES.iter().position(|s| *s == state)? + 1;
    let n = stage * 50 / STAGES.len();
    Some(format!("[{}>{}]", "=".repeat(n), " ".repeat(50 - n)))
}

/// One slot's progress line; tasks still on an older spec are not yet
/// updated, and show as blank as Docker shows them.
fn task_line(label: &str, t: Option<&Task>, newest: u64) -> String {
    let line = match t {
        Some(t) if t.spec_version >= newest => {
            if blocked(t) {
                format!("{label}: {}", t.message)
            } else if let Some(b) = bar(&t.state) {
                format!("{label}: {:<9} {b}", t.state)
            } else {
                format!("{label}: {:<9} {}", t.state, why(t))
            }
        }
        _ => format!("{label}:"),
    };
    line.trim_end().to_string()
}

fn task_ref(t: &Task) -> String {
    let mut s = format!("task {}", t.name);
    if !t.node.is_empty() {
        s.push_str(&format!(" on {}", t.node));
    }
    s.push_str(&format!(": {}", t.state));
    let why = why(t);
    if !why.is_empty() {
        s.push_str(&format!(": {why}"));
    }
    s
}

/// Reads one status: the lines to show and whether to stop.
fn assess(st: &ServiceStatusReply) -> Progress {
    let Some(svc) = &st.service else {
        return Progress {
            lines: Vec::new(),
            outcome: Outcome::Waiting,
        };
    };
    let name = &svc.name;
    let see = format!("(see `mesh service ps {name}`)");
    let current: Vec<&Task> = st
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running")
        .collect();
    let newest = current.iter().map(|t| t.spec_version).max().unwrap_or(0);
    let n = svc.desired;
    let done = current
        .iter()
        .filter(|t| t.state == "running" && t.spec_version == newest)
        .count();
    let mut lines = vec![format!("overall progress: {done} out of {n} tasks")];
    if n <= MAX_BARS {
        if svc.mode == "global" {
            let mut by_node = current.clone();
            by_node.sort_by(|a, b| a.node.cmp(&b.node));
            lines.extend(by_node.iter().map(|t| task_line(&t.node, Some(t), newest)));
        } else {
            for slot in 1..=n {
                // The daemon lists each slot's newest task first.
                let t = current.iter().find(|t| t.slot == slot).copied();
                lines.push(task_line(&format!("{slot}/{n}"), t, newest));
            }
        }
    }

    // A task that should run but ended is not restarted any more.
    if let Some(t) = current.iter().find(|t| is_terminal(&t.state)) {
        let policy = match svc.restart_condition.as_str() {
            "none" => "; not restarted (restart condition none)".to_string(),
            "on-failure" if t.state == "complete" => {
                "; not restarted (restart condition on-failure)".to_string()
            }
            _ if svc.restart_max_attempts > 0 => format!(
                "; not restarted (--restart-max-attempts {} reached)",
                svc.restart_max_attempts
            ),
            _ => String::new(),
        };
        return Progress {
            lines,
            outcome: Outcome::Failed(format!(
                "service {name} failed to converge: {}{policy} {see}",
                task_ref(t)
            )),
        };
    }
    let since = timestamp(&svc.updated_at);
    // A start refused since the change began (no such command, a bad
    // network): it would be refused again, so say why at once; the
    // managers go on restarting it per the policy.
    if let Some(t) = st
        .tasks
        .iter()
        .filter(|t| t.state == "rejected" && t.spec_version >= newest)
        .filter(|t| timestamp(&t.updated_at).is_some_and(|at| since.is_none_or(|s| at >= s)))
        .max_by_key(|t| timestamp(&t.updated_at))
    {
        return Progress {
            lines,
            outcome: Outcome::Failed(format!(
                "service {name} failed to converge: {}; restarts go on in the background (restart condition {}) {see}",
                task_ref(t),
                restart_condition(svc)
            )),
        };
    }
    // A slot that keeps failing since the change began.
    let mut failures: BTreeMap<(u64, &str), Vec<&Task>> = BTreeMap::new();
    for t in st
        .tasks
        .iter()
        .filter(|t| matches!(t.state.as_str(), "failed" | "rejected"))
        .filter(|t| timestamp(&t.updated_at).is_some_and(|at| since.is_none_or(|s| at >= s)))
    {
        let node = if t.slot == 0 { t.node_id.as_str() } else { "" };
        failures.entry((t.slot, node)).or_default().push(t);
    }
    if let Some(t) = failures
        .values()
        .filter(|f| f.len() >= FAILURES_TO_GIVE_UP)
        .filter_map(|f| f.iter().max_by_key(|t| timestamp(&t.updated_at)))
        .next()
    {
        return Progress {
            lines,
            outcome: Outcome::Failed(format!(
                "service {name} failed to converge: {} {see}",
                task_ref(t)
            )),
        };
    }

    let lingering = st
        .tasks
        .iter()
        .any(|t| t.desired_state != "running" && !is_terminal(&t.state));
    let stuck: Vec<&Task> = current
        .iter()
        .filter(|t| t.state != "running")
        .copied()
        .collect();
    let settled = stuck.is_empty()
        && current.len() as u64 == n
        && !lingering
        && svc.update_state != "updating";
    if settled && st.converged {
        lines.push("verify: Service converged".into());
        return Progress {
            lines,
            outcome: Outcome::Converged,
        };
    }
    if settled {
        lines.push(format!(
            "verify: waiting for {} to apply the change",
            st.behind.join(", ")
        ));
    }
    if !stuck.is_empty() && !lingering && st.converged && stuck.iter().all(|t| blocked(t)) {
        return Progress {
            lines,
            outcome: Outcome::Unplaceable(format!(
                "service {name}: {} task(s) cannot be placed: {}; they stay pending until {} {see}",
                stuck.len(),
                stuck[0].message,
                until(&stuck[0].message)
            )),
        };
    }
    Progress {
        lines,
        outcome: Outcome::Waiting,
    }
}

/// Draws the progress lines: in place on a terminal, otherwise each line
/// once per change so logs stay readable.
struct Screen {
    tty: bool,
    shown: Vec<String>,
    /// Lines drawn so far on a terminal (the cursor is below them).
    height: usize,
}

impl Screen {
    fn new() -> Self {
        Screen {
            tty: std::io::stdout().is_terminal(),
            shown: Vec::new(),
            height: 0,
        }
    }

    fn show(&mut self, lines: &[String]) -> std::io::Result<()> {
        if self.shown == lines {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        if self.tty {
            if self.height > 0 {
                write!(out, "\x1b[{}A", self.height)?;
            }
            for l in lines {
                writeln!(out, "\x1b[2K{l}")?;
            }
            for _ in lines.len()..self.height {
                writeln!(out, "\x1b[2K")?;
            }
            self.height = self.height.max(lines.len());
        } else {
            for (i, l) in lines.iter().enumerate() {
                if self.shown.get(i) != Some(l) {
                    writeln!(out, "{l}")?;
                }
            }
        }
        self.shown = lines.to_vec();
        out.flush()
    }
}

/// Asks for a service's status every [`POLL`]; a manager that is briefly
/// unavailable (an election) is waited out for [`UNAVAILABLE_GRACE`].
struct StatusPoll {
    tick: tokio::time::Interval,
    unavailable_since: Option<Instant>,
}

impl StatusPoll {
    fn new() -> Self {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            tick,
            unavailable_since: None,
        }
    }

    /// The next answer, `Ok(None)` while the manager is unavailable within
    /// the grace, or the manager's refusal.
    async fn next(
        &mut self,
        c: &mut ControlClient<Channel>,
        service: &str,
    ) -> Result<Option<ServiceStatusReply>, tonic::Status> {
        self.tick.tick().await;
        let req = ServiceRef {
            service: service.to_string(),
        };
        match c.service_status(req).await {
            Ok(r) => {
                self.unavailable_since = None;
                Ok(Some(r.into_inner()))
            }
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && self
                        .unavailable_since
                        .is_none_or(|t| t.elapsed() < UNAVAILABLE_GRACE) =>
            {
                self.unavailable_since.get_or_insert_with(Instant::now);
                Ok(None)
            }
            Err(s) => Err(s),
        }
    }
}

/// Polls the service's status until it converges or cannot; the end is
/// always a state seen, never a fixed wait.
pub(super) async fn converge(c: &mut ControlClient<Channel>, service_id: &str) -> Result<()> {
    let mut screen = Screen::new();
    let mut last: Option<ServiceStatusReply> = None;
    let mut poll = StatusPoll::new();
    loop {
        let Some(st) = poll.next(c, service_id).await.map_err(status)? else {
            continue;
        };
        let p = assess(&st);
        let stable = last.as_ref() == Some(&st);
        last = Some(st);
        screen.show(&p.lines)?;
        match p.outcome {
            Outcome::Converged => return Ok(()),
            Outcome::Failed(m) => bail!("{m}"),
            Outcome::Unplaceable(m) if stable => bail!("{m}"),
            _ => {}
        }
    }
}

/// Waits until a removed service's tasks are gone (stopped, their
/// endpoints freed; its VIPs went with the service), or fails after
/// [`RM_WAIT`] naming a task still held.
pub(super) async fn stopped(c: &mut ControlClient<Channel>, svc: &Service) -> Result<()> {
    let start = Instant::now();
    let mut poll = StatusPoll::new();
    loop {
        let left = match poll.next(c, &svc.id).await {
            Ok(Some(st)) => st.tasks,
            Ok(None) => continue,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(status(s)),
        };
        if start.elapsed() >= RM_WAIT {
            let mut first = left.first().cloned().unwrap_or_default();
            first.name = first.name.replace("<removed>", &svc.name);
            bail!(
                "service {} is removed, but {} of its task(s) have not stopped after {}s: {}; their node stops them when it answers, and they are freed once it is Down (see `mesh node ls`)",
                svc.name,
                left.len(),
                RM_WAIT.as_secs(),
                task_ref(&first)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(slot: u64, state: &str) -> Task {
        Task {
            id: format!("t{slot}{state}"),
            name: format!("web.{slot}"),
            slot,
            node: "node1".into(),
            desired_state: "running".into(),
            state: state.into(),
            spec_version: 7,
            updated_at: "2025-01-01T00:00:10Z".into(),
            ..Default::default()
        }
    }

    fn reply(tasks: Vec<Task>, desired: u64, converged: bool) -> ServiceStatusReply {
        ServiceStatusReply {
            service: Some(Service {
                name: "web".into(),
                mode: "replicated".into(),
                replicas: desired,
                desired,
                updated_at: "2025-01-01T00:00:00Z".into(),
                ..Default::default()
            }),
            tasks,
            converged,
            behind: if converged {
                vec![]
            } else {
                vec!["node2".into()]
            },
        }
    }

    #[test]
    fn progress() {
        let p = assess(&reply(
            vec![task(1, "running"), task(2, "starting")],
            2,
            true,
        ));
        assert_eq!(p.outcome, Outcome::Waiting);
        assert_eq!(p.lines[0], "overall progress: 1 out of 2 tasks");
        assert_eq!(p.lines[1], format!("1/2: running   [{}>]", "=".repeat(50)));
        assert!(p.lines[2].starts_with("2/2: starting  [=====") && p.lines[2].ends_with(" ]"));

        let p = assess(&reply(
            vec![task(1, "running"), task(2, "running")],
            2,
            false,
        ));
        assert_eq!(p.outcome, Outcome::Waiting);
        assert_eq!(
            p.lines.last().map(String::as_str),
            Some("verify: waiting for node2 to apply the change")
        );

        let p = assess(&reply(
            vec![task(1, "running"), task(2, "running")],
            2,
            true,
        ));
        assert_eq!(p.outcome, Outcome::Converged);
        assert_eq!(
            p.lines.last().map(String::as_str),
            Some("verify: Service converged")
        );

        // A task being stopped must be gone first.
        let mut old = task(3, "running");
        old.desired_state = "shutdown".into();
        let p = assess(&reply(vec![task(1, "running"), old], 1, true));
        assert_eq!(p.outcome, Outcome::Waiting);
    }

    #[test]
    fn progress_failures() {
        let mut rejected = task(1, "rejected");
        rejected.error = "cannot start: no such file".into();
        let p = assess(&reply(vec![rejected], 1, true));
        assert_eq!(
            p.outcome,
            Outcome::Failed(
                "service web failed to converge: task web.1 on node1: rejected: cannot start: no such file (see `mesh service ps web`)".into()
            )
        );

        // A refused start that will be restarted fails at once, with the
        // reason and what goes on.
        let mut refused = task(1, "rejected");
        refused.desired_state = "shutdown".into();
        refused.error = "cannot start: /nope: no such file".into();
        let retry = task(1, "pending");
        let p = assess(&reply(vec![retry.clone(), refused.clone()], 1, true));
        assert_eq!(
            p.outcome,
            Outcome::Failed(
                "service web failed to converge: task web.1 on node1: rejected: cannot start: /nope: no such file; restarts go on in the background (restart condition any) (see `mesh service ps web`)".into()
            )
        );
        // ... but not one from before the change, nor one on an older spec.
        let mut before = refused.clone();
        before.updated_at = "2024-12-31T23:59:59Z".into();
        assert_eq!(
            assess(&reply(vec![retry.clone(), before], 1, true)).outcome,
            Outcome::Waiting
        );
        let mut older = refused;
        older.spec_version = 6;
        assert_eq!(
            assess(&reply(vec![retry, older], 1, true)).outcome,
            Outcome::Waiting
        );

        let mut history = vec![task(1, "starting")];
        for i in 0..3 {
            let mut t = task(1, "failed");
            t.id = format!("f{i}");
            t.desired_state = "shutdown".into();
            t.exit_code = 1;
            history.push(t);
        }
        let p = assess(&reply(history.clone(), 1, true));
        assert!(matches!(p.outcome, Outcome::Failed(m) if m.contains("failed: exit code 1")));
        // Failures from before the change do not count.
        for t in &mut history {
            if t.state == "failed" {
                t.updated_at = "2024-12-31T23:59:59Z".into();
            }
        }
        assert_eq!(assess(&reply(history, 1, true)).outcome, Outcome::Waiting);

        let mut pending = task(2, "pending");
        pending.message =
            "no suitable node (scheduling constraints not satisfied on 3 nodes)".into();
        let p = assess(&reply(vec![task(1, "running"), pending], 2, true));
        assert!(
            matches!(p.outcome, Outcome::Unplaceable(m) if m.starts_with("service web: 1 task(s) cannot be placed: no suitable node"))
        );

        let mut full = task(2, "pending");
        full.message = "network tiny has no free address (10.20.0.0/30)".into();
        let p = assess(&reply(vec![task(1, "running"), full], 2, true));
        assert_eq!(
            p.lines[2],
            "2/2: network tiny has no free address (10.20.0.0/30)"
        );
        assert!(
            matches!(&p.outcome, Outcome::Unplaceable(m) if m.starts_with("service web: 1 task(s) cannot be placed: network tiny has no free address (10.20.0.0/30); they stay pending until an address is freed")),
            "{:?}",
            p.outcome
        );
        // A fresh pending task has no message: it is on its way.
        assert_eq!(
            assess(&reply(
                vec![task(1, "running"), task(2, "pending")],
                2,
                true
            ))
            .outcome,
            Outcome::Waiting
        );
    }
}
