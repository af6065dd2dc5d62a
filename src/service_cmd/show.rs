//! How services and tasks are printed: Docker's durations and states,
//! short IDs, the command column, `service inspect`'s JSON, `service ps`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use mesh_manager::services::is_terminal;
use mesh_proto::control_client::ControlClient;
use mesh_proto::*;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::transport::Channel;

use super::progress::blocked;
use crate::client::status;
use crate::table::{self, title};

pub(super) const COMMAND_WIDTH: usize = 30;

/// Docker's `units.HumanDuration`, lowercased as `service ps` shows it.
pub(super) fn human_duration(d: Duration) -> String {
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

pub(super) fn timestamp(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// "Running 3 seconds ago", with the health of a task that has a check as
/// `docker ps` adds it: "Running 3 seconds ago (healthy)". A starting task
/// is starting for its check, which says nothing more.
pub(super) fn current_state(t: &Task, now: OffsetDateTime) -> String {
    let state = match timestamp(&t.updated_at) {
        Some(at) => {
            let age = Duration::try_from(now - at).unwrap_or_default();
            format!("{} {} ago", title(&t.state), human_duration(age))
        }
        None => title(&t.state),
    };
    if t.health.is_empty() || t.health == t.state {
        state
    } else {
        format!("{state} ({})", t.health)
    }
}

/// Docker's `ContainerSpec.Healthcheck` (durations in nanoseconds).
fn healthcheck_json(h: &HealthCheck) -> serde_json::Value {
    if h.disabled {
        return json!({"Test": ["NONE"]});
    }
    let ns = |ms: u64| ms.saturating_mul(1_000_000);
    json!({
        "Test": ["CMD-SHELL", h.cmd],
        "Interval": ns(h.interval_ms),
        "Timeout": ns(h.timeout_ms),
        "Retries": h.retries,
        "StartPeriod": ns(h.start_period_ms),
        "StartInterval": ns(h.start_interval_ms),
    })
}

/// How many of the tasks meant to run are starting, healthy or unhealthy:
/// what `service inspect` adds for a service with a check.
fn health_json(tasks: &[Task]) -> serde_json::Value {
    let count = |h: &str| {
        tasks
            .iter()
            .filter(|t| t.desired_state == "running" && t.health == h)
            .count()
    };
    json!({
        "Starting": count("starting"),
        "Healthy": count("healthy"),
        "Unhealthy": count("unhealthy"),
    })
}

/// What went wrong with a task, in one phrase (may be empty).
pub(super) fn why(t: &Task) -> String {
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

pub(super) fn short(id: &str, no_trunc: bool) -> String {
    if no_trunc {
        id.to_string()
    } else {
        id.chars().take(12).collect()
    }
}

pub(super) fn command_column(cmd: &[String]) -> String {
    let s = cmd.join(" ");
    if s.chars().count() <= COMMAND_WIDTH {
        s
    } else {
        s.chars().take(COMMAND_WIDTH - 1).collect::<String>() + "…"
    }
}

/// A port in Docker's `PortConfig` JSON shape (PublishedPort left out
/// while 0: to be allocated).
pub(super) fn port_json(p: &PortConfig) -> serde_json::Value {
    let mut v = json!({
        "Protocol": p.protocol,
        "TargetPort": p.target_port,
        "PublishMode": p.publish_mode,
    });
    if p.published_port != 0 {
        v["PublishedPort"] = json!(p.published_port);
    }
    v
}

/// `service ls`'s PORTS column: `*:8080->80/tcp, *:30000->81/udp`.
pub(super) fn ports_column(ports: &[PortConfig]) -> String {
    ports
        .iter()
        .map(|p| format!("*:{}->{}/{}", p.published_port, p.target_port, p.protocol))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Docker's `service inspect` shape, plus "HealthStatus" (how its tasks
/// stand) for a service with a health check.
pub(super) fn inspect_json(s: &Service, tasks: &[Task]) -> serde_json::Value {
    let mode = if s.mode == "global" {
        json!({"Global": {}})
    } else {
        json!({"Replicated": {"Replicas": s.replicas}})
    };
    let labels: BTreeMap<&String, &String> = s.labels.iter().collect();
    let spec_ports: Vec<_> = s.spec_ports.iter().map(port_json).collect();
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
            "EndpointSpec": {"Mode": s.endpoint_mode, "Ports": spec_ports},
        },
        "Endpoint": {
            "Spec": {"Mode": s.endpoint_mode, "Ports": spec_ports},
            "Ports": s.endpoint_ports.iter().map(port_json).collect::<Vec<_>>(),
            "VirtualIPs": s.vips.iter().map(|v| json!({"NetworkID": v.network_id, "Addr": v.addr})).collect::<Vec<_>>(),
        },
    });
    if let Some(h) = &s.health {
        v["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = healthcheck_json(h);
        if !h.disabled {
            v["HealthStatus"] = health_json(tasks);
        }
    }
    if !s.update_state.is_empty() {
        v["UpdateStatus"] = json!({"State": s.update_state, "Message": s.update_message});
    }
    v
}

/// Each named service with its tasks, in the order given; the first that
/// cannot be had ends it with the managers' reason.
pub(super) async fn statuses(
    c: &mut ControlClient<Channel>,
    services: Vec<String>,
) -> Result<Vec<ServiceStatusReply>> {
    let mut out = Vec::with_capacity(services.len());
    for service in services {
        let st = c
            .service_status(ServiceRef { service })
            .await
            .map_err(status)?;
        out.push(st.into_inner());
    }
    Ok(out)
}

pub(super) async fn ps(
    c: &mut ControlClient<Channel>,
    services: Vec<String>,
    format: Option<String>,
    quiet: bool,
    no_trunc: bool,
) -> Result<ExitCode> {
    if let Some(f) = format.as_deref().filter(|f| *f != "json") {
        bail!("unsupported --format {f:?}: use json or leave it out for a table");
    }
    let tasks: Vec<Task> = statuses(c, services)
        .await?
        .into_iter()
        .flat_map(|st| st.tasks)
        .collect();
    let now = OffsetDateTime::now_utc();
    let error_column = |t: &Task| {
        let e = if !t.error.is_empty() {
            t.error.clone()
        } else if blocked(t) {
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
                "Health": t.health,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_truncation() {
        assert_eq!(command_column(&["sleep".into(), "100".into()]), "sleep 100");
        let long = command_column(&["x".repeat(50)]);
        assert_eq!(long.chars().count(), COMMAND_WIDTH);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn ports_as_docker_shows_them() {
        let p = |proto: &str, target, published, mode: &str| PortConfig {
            protocol: proto.into(),
            target_port: target,
            published_port: published,
            publish_mode: mode.into(),
        };
        let svc = Service {
            endpoint_mode: "vip".into(),
            spec_ports: vec![p("tcp", 80, 8080, "ingress"), p("udp", 53, 0, "ingress")],
            endpoint_ports: vec![
                p("tcp", 80, 8080, "ingress"),
                p("udp", 53, 30000, "ingress"),
            ],
            ..Default::default()
        };
        let v = inspect_json(&svc, &[]);
        let spec = &v["Spec"]["EndpointSpec"];
        assert_eq!(spec["Mode"], "vip");
        assert_eq!(
            spec["Ports"][0],
            json!({"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"})
        );
        assert!(
            spec["Ports"][1].get("PublishedPort").is_none(),
            "0: allocated"
        );
        assert_eq!(v["Endpoint"]["Ports"][1]["PublishedPort"], 30000);
        assert_eq!(
            ports_column(&svc.endpoint_ports),
            "*:8080->80/tcp, *:30000->53/udp"
        );
        assert_eq!(ports_column(&[]), "");
    }

    #[test]
    fn health_as_ps_and_inspect_show_it() {
        let t = |state: &str, health: &str| Task {
            state: state.into(),
            desired_state: "running".into(),
            health: health.into(),
            ..Default::default()
        };
        let now = OffsetDateTime::now_utc();
        assert_eq!(
            current_state(&t("running", "healthy"), now),
            "Running (healthy)"
        );
        assert_eq!(current_state(&t("starting", "starting"), now), "Starting");
        assert_eq!(
            current_state(&t("failed", "unhealthy"), now),
            "Failed (unhealthy)"
        );
        assert_eq!(current_state(&t("running", ""), now), "Running");

        let svc = Service {
            health: Some(HealthCheck {
                cmd: "curl -f localhost".into(),
                interval_ms: 2000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let tasks = [
            t("running", "healthy"),
            t("starting", "starting"),
            t("running", "healthy"),
        ];
        let v = inspect_json(&svc, &tasks);
        let h = &v["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"];
        assert_eq!(h["Test"], json!(["CMD-SHELL", "curl -f localhost"]));
        assert_eq!(h["Interval"], 2_000_000_000u64);
        assert_eq!(
            v["HealthStatus"],
            json!({"Starting": 1, "Healthy": 2, "Unhealthy": 0})
        );
        let off = Service {
            health: Some(HealthCheck {
                disabled: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = inspect_json(&off, &tasks);
        assert_eq!(
            v["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"],
            json!(["NONE"])
        );
        assert!(v.get("HealthStatus").is_none());
        assert!(
            inspect_json(&Service::default(), &[])
                .get("HealthStatus")
                .is_none()
        );
    }
}
