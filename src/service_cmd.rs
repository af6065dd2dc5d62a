//! mesh service create|ls|ps|inspect|update|scale|rm|logs, and the progress
//! display `create`, `update` and `scale` show until the service converges.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use mesh_manager::services::is_terminal;
use mesh_proto::control_client::ControlClient;
use mesh_proto::*;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::transport::Channel;

use crate::cli::{ServiceCmd, ServiceCreateArgs, ServiceUpdateArgs};
use crate::client::{connect, status};
use crate::table::{self, title};

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
const NO_NODE: &str = "no suitable node";
/// The states a task goes through to run, for the progress bars.
const STAGES: [&str; 4] = ["pending", "assigned", "starting", "running"];
const COMMAND_WIDTH: usize = 30;

/// `--replicas N`: a clear word for negative numbers rather than clap's
/// "unexpected argument".
pub fn parse_replicas(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    if s.parse::<i64>().is_ok_and(|n| n < 0) {
        return Err(format!(
            "replicas cannot be negative (got {s}): use 0 or more"
        ));
    }
    Err(format!(
        "invalid replicas {s:?}: use a whole number, 0 or more"
    ))
}

/// `--restart-delay 5s|500ms|1m30s|0`.
pub fn parse_delay(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 5s, 500ms, 1m30s)"))
}

/// `mesh service scale NAME=N`.
pub fn parse_scale(s: &str) -> Result<(String, u64), String> {
    let Some((name, n)) = s.split_once('=') else {
        return Err(format!(
            "invalid scale specifier {s:?}: use SERVICE=REPLICAS"
        ));
    };
    if name.is_empty() {
        return Err(format!(
            "invalid scale specifier {s:?}: use SERVICE=REPLICAS"
        ));
    }
    let n = parse_replicas(n).map_err(|e| format!("{name}: {e}"))?;
    Ok((name.to_string(), n))
}

/// `-e K=V` as given; a bare `-e K` takes K's value from `lookup` (this
/// shell's environment) and is dropped if unset, as Docker does.
fn env_from_flags(
    items: Vec<String>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in items {
        match item.split_once('=') {
            Some(("", _)) => bail!("invalid environment variable {item:?}: use -e KEY=VALUE"),
            Some(_) => out.push(item),
            None if item.is_empty() => bail!("invalid environment variable \"\": use -e KEY=VALUE"),
            None => {
                if let Some(v) = lookup(&item) {
                    out.push(format!("{item}={v}"));
                }
            }
        }
    }
    Ok(out)
}

/// `--label K=V`; a bare K means an empty value.
fn labels(items: Vec<String>) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in items {
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
        if k.is_empty() {
            bail!("invalid --label {item:?}: use --label KEY=VALUE");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Docker's `units.HumanDuration`, lowercased as `service ps` shows it.
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let minutes = secs / 60;
    let hours = (d.as_secs_f64() / 3600.0 + 0.5) as u64;
    match () {
        _ if secs < 1 => "less than a second".into(),
        _ if secs == 1 => "1 second".into(),
        _ if secs < 60 => format!("{secs} seconds"),
        _ if minutes == 1 => "about a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "about an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", secs / 3600 / 24 / 365),
    }
}

fn timestamp(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// "Running 3 seconds ago".
fn current_state(t: &Task, now: OffsetDateTime) -> String {
    match timestamp(&t.updated_at) {
        Some(at) => {
            let age = Duration::try_from(now - at).unwrap_or_default();
            format!("{} {} ago", title(&t.state), human_duration(age))
        }
        None => title(&t.state),
    }
}

/// What went wrong with a task, in one phrase (may be empty).
fn why(t: &Task) -> String {
    if !t.error.is_empty() {
        t.error.clone()
    } else if !t.message.is_empty() && (t.state == "pending" || is_terminal(&t.state)) {
        t.message.clone()
    } else if t.exit_code != 0 {
        format!("exit code {}", t.exit_code)
    } else {
        String::new()
    }
}

fn short(id: &str, no_trunc: bool) -> String {
    if no_trunc {
        id.to_string()
    } else {
        id.chars().take(12).collect()
    }
}

fn command_column(cmd: &[String]) -> String {
    let s = cmd.join(" ");
    if s.chars().count() <= COMMAND_WIDTH {
        s
    } else {
        s.chars().take(COMMAND_WIDTH - 1).collect::<String>() + "…"
    }
}

/// Docker's `service inspect` shape.
fn inspect_json(s: &Service) -> serde_json::Value {
    let mode = if s.mode == "global" {
        json!({"Global": {}})
    } else {
        json!({"Replicated": {"Replicas": s.replicas}})
    };
    let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
    let mut v = json!({
        "ID": s.id,
        "Version": {"Index": s.version},
        "CreatedAt": s.created_at,
        "UpdatedAt": s.updated_at,
        "Spec": {
            "Name": s.name,
            "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": {"Command": s.cmd, "Env": s.env},
                "RestartPolicy": {
                    "Condition": s.restart_condition,
                    // Nanoseconds, as Docker's API has it.
                    "Delay": s.restart_delay_ms.saturating_mul(1_000_000),
                    "MaxAttempts": s.restart_max_attempts,
                },
                "Placement": {"Constraints": s.constraints},
                "Networks": s.network_ids.iter().map(|id| json!({"Target": id})).collect::<Vec<_>>(),
            },
            "Mode": mode,
            "EndpointSpec": {"Mode": s.endpoint_mode},
        },
        "Endpoint": {
            "Spec": {"Mode": s.endpoint_mode},
            "VirtualIPs": s.vips.iter().map(|v| json!({"NetworkID": v.network_id, "Addr": v.addr})).collect::<Vec<_>>(),
        },
    });
    if !s.update_state.is_empty() {
        v["UpdateStatus"] = json!({"State": s.update_state, "Message": s.update_message});
    }
    v
}

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
            if t.state == "pending" && t.message.starts_with(NO_NODE) {
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
    // A slot that keeps failing since the change began.
    let since = timestamp(&svc.updated_at);
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
    if !stuck.is_empty()
        && !lingering
        && st.converged
        && stuck
            .iter()
            .all(|t| t.state == "pending" && t.message.starts_with(NO_NODE))
    {
        return Progress {
            lines,
            outcome: Outcome::Unplaceable(format!(
                "service {name}: {} task(s) cannot be placed: {}; they stay pending until a node qualifies {see}",
                stuck.len(),
                stuck[0].message
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

/// Polls the service's status until it converges or cannot; the end is
/// always a state seen, never a fixed wait.
async fn converge(c: &mut ControlClient<Channel>, service_id: &str) -> Result<()> {
    let mut screen = Screen::new();
    let mut last: Option<ServiceStatusReply> = None;
    let mut unavailable_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let req = ServiceRef {
            service: service_id.to_string(),
        };
        let st = match c.service_status(req).await {
            Ok(r) => {
                unavailable_since = None;
                r.into_inner()
            }
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && unavailable_since.is_none_or(|t| t.elapsed() < UNAVAILABLE_GRACE) =>
            {
                unavailable_since.get_or_insert_with(Instant::now);
                continue;
            }
            Err(s) => return Err(status(s)),
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

async fn create(c: &mut ControlClient<Channel>, a: ServiceCreateArgs) -> Result<ExitCode> {
    let req = ServiceCreateRequest {
        name: a.name,
        mode: a.mode,
        replicas: a.replicas.unwrap_or(0),
        has_replicas: a.replicas.is_some(),
        networks: a.network,
        endpoint_mode: a.endpoint_mode,
        env: env_from_flags(a.env, |k| std::env::var(k).ok())?,
        constraints: a.constraint,
        restart_condition: a.restart_condition,
        restart_delay_ms: a
            .restart_delay
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        has_restart_delay: a.restart_delay.is_some(),
        restart_max_attempts: a.restart_max_attempts,
        cmd: a.cmd,
        labels: labels(a.label)?,
    };
    let svc = c.service_create(req).await.map_err(status)?.into_inner();
    println!("{}", svc.id);
    if !a.detach {
        converge(c, &svc.id).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn update(c: &mut ControlClient<Channel>, a: ServiceUpdateArgs) -> Result<ExitCode> {
    let req = ServiceUpdateRequest {
        service: a.service.clone(),
        replicas: a.replicas,
        network_add: a.network_add,
        network_rm: a.network_rm,
        env_add: a.env_add,
        env_rm: a.env_rm,
        constraint_add: a.constraint_add,
        constraint_rm: a.constraint_rm,
        force: a.force,
    };
    let svc = c.service_update(req).await.map_err(status)?.into_inner();
    println!("{}", a.service);
    if !a.detach {
        converge(c, &svc.id).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn scale(
    c: &mut ControlClient<Channel>,
    scales: Vec<(String, u64)>,
    detach: bool,
) -> Result<ExitCode> {
    let mut failed = false;
    for (name, n) in scales {
        let req = ServiceUpdateRequest {
            service: name.clone(),
            replicas: Some(n),
            ..Default::default()
        };
        let svc = match c.service_update(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                eprintln!("Error: {}", status(s));
                failed = true;
                continue;
            }
        };
        println!("{name} scaled to {n}");
        if !detach && let Err(e) = converge(c, &svc.id).await {
            eprintln!("Error: {e:#}");
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn ps(
    c: &mut ControlClient<Channel>,
    services: Vec<String>,
    format: Option<String>,
    quiet: bool,
    no_trunc: bool,
) -> Result<ExitCode> {
    if format.as_deref().is_some_and(|f| f != "json") {
        bail!("unsupported --format {format:?}: use json or leave it out for a table");
    }
    let mut tasks = Vec::new();
    for s in services {
        let st = c
            .service_status(ServiceRef { service: s })
            .await
            .map_err(status)?
            .into_inner();
        tasks.extend(st.tasks);
    }
    let now = OffsetDateTime::now_utc();
    let error_column = |t: &Task| {
        let e = if !t.error.is_empty() {
            t.error.clone()
        } else if t.state == "pending" && t.message.starts_with(NO_NODE) {
            t.message.clone()
        } else {
            String::new()
        };
        if e.is_empty() { e } else { format!("{e:?}") }
    };
    if quiet {
        for t in &tasks {
            println!("{}", short(&t.id, no_trunc));
        }
    } else if format.is_some() {
        for t in &tasks {
            let v = json!({
                "ID": t.id,
                "Name": t.name,
                "Node": t.node,
                "DesiredState": title(&t.desired_state),
                "CurrentState": current_state(t, now),
                "Error": t.error,
                "Message": t.message,
                "Ports": "",
            });
            println!("{v}");
        }
    } else {
        let mut rows = Vec::new();
        let mut previous: Option<&str> = None;
        for t in &tasks {
            // Older tasks of a slot follow its newest, as Docker shows them.
            let name = if previous == Some(t.name.as_str()) {
                format!(" \\_ {}", t.name)
            } else {
                t.name.clone()
            };
            previous = Some(t.name.as_str());
            rows.push(vec![
                short(&t.id, no_trunc),
                name,
                t.node.clone(),
                title(&t.desired_state),
                current_state(t, now),
                error_column(t),
            ]);
        }
        table::print(
            &[
                "ID",
                "NAME",
                "NODE",
                "DESIRED STATE",
                "CURRENT STATE",
                "ERROR",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(host: &str, cmd: ServiceCmd) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    match cmd {
        ServiceCmd::Create(a) => return create(&mut c, a).await,
        ServiceCmd::Update(a) => return update(&mut c, a).await,
        ServiceCmd::Scale { detach, scales } => return scale(&mut c, scales, detach).await,
        ServiceCmd::Ps {
            format,
            quiet,
            no_trunc,
            services,
        } => return ps(&mut c, services, format, quiet, no_trunc).await,
        ServiceCmd::Ls {
            format,
            quiet,
            no_trunc,
        } => {
            let services = c
                .service_list(Empty {})
                .await
                .map_err(status)?
                .into_inner()
                .services;
            let replicas = |s: &Service| format!("{}/{}", s.running, s.desired);
            if quiet {
                for s in &services {
                    println!("{}", short(&s.id, no_trunc));
                }
            } else if format.as_deref() == Some("json") {
                for s in &services {
                    let v = json!({
                        "ID": s.id,
                        "Name": s.name,
                        "Mode": s.mode,
                        "Replicas": replicas(s),
                        "Command": s.cmd.join(" "),
                        "Ports": "",
                    });
                    println!("{v}");
                }
            } else if let Some(f) = format {
                bail!("unsupported --format {f:?}: use json or leave it out for a table");
            } else {
                let rows: Vec<Vec<String>> = services
                    .iter()
                    .map(|s| {
                        vec![
                            short(&s.id, no_trunc),
                            s.name.clone(),
                            s.mode.clone(),
                            replicas(s),
                            command_column(&s.cmd),
                            String::new(),
                        ]
                    })
                    .collect();
                table::print(
                    &["ID", "NAME", "MODE", "REPLICAS", "COMMAND", "PORTS"],
                    &rows,
                );
            }
        }
        ServiceCmd::Inspect { services } => {
            let mut out = Vec::new();
            for s in services {
                let st = c
                    .service_status(ServiceRef { service: s })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(svc) = st.service {
                    out.push(inspect_json(&svc));
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ServiceCmd::Rm { services } => {
            let mut failed = false;
            for s in services {
                match c.service_remove(ServiceRef { service: s.clone() }).await {
                    Ok(_) => println!("{s}"),
                    Err(e) => {
                        eprintln!("Error: {}", status(e));
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        ServiceCmd::Logs { service } => {
            let mut lines = c
                .service_logs(ServiceRef { service })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(l) = lines.message().await.map_err(status)? {
                let text = l.line.trim_end_matches('\n');
                let line = format!("{}@{}    | {text}", l.task, l.node);
                let written = if l.stderr {
                    writeln!(std::io::stderr(), "{line}")
                } else {
                    writeln!(std::io::stdout(), "{line}")
                };
                // A reader that stopped (`| head`) is not an error.
                if let Err(e) = written {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        break;
                    }
                    return Err(e.into());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_and_scale() {
        assert_eq!(parse_replicas("3"), Ok(3));
        assert_eq!(parse_replicas("0"), Ok(0));
        assert!(parse_replicas("-1").is_err_and(|e| e.contains("cannot be negative")));
        assert!(parse_replicas("two").is_err_and(|e| e.contains("whole number")));
        assert_eq!(parse_scale("web=5"), Ok(("web".to_string(), 5)));
        assert_eq!(parse_scale("a.b=0"), Ok(("a.b".to_string(), 0)));
        assert!(parse_scale("web").is_err_and(|e| e.contains("SERVICE=REPLICAS")));
        assert!(parse_scale("=3").is_err());
        assert!(parse_scale("web=-2").is_err_and(|e| e.starts_with("web: ")));
        assert!(parse_scale("web=").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_delay("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_delay("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert!(parse_delay("soon").is_err());
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "less than a second"
        );
        assert_eq!(human_duration(Duration::from_secs(3)), "3 seconds");
        assert_eq!(human_duration(Duration::from_secs(70)), "about a minute");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600)), "3 hours");
    }

    #[test]
    fn env_flags() {
        let lookup = |k: &str| (k == "HOME").then(|| "/root".to_string());
        let env = env_from_flags(
            vec!["A=1".into(), "HOME".into(), "UNSET".into(), "B=x=y".into()],
            lookup,
        )
        .expect("valid");
        assert_eq!(env, ["A=1", "HOME=/root", "B=x=y"]);
        assert!(env_from_flags(vec!["=1".into()], lookup).is_err());
    }

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
    }

    #[test]
    fn command_truncation() {
        assert_eq!(command_column(&["sleep".into(), "100".into()]), "sleep 100");
        let long = command_column(&["x".repeat(50)]);
        assert_eq!(long.chars().count(), COMMAND_WIDTH);
        assert!(long.ends_with('…'));
    }
}
