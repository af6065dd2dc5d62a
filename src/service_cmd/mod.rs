//! mesh service create|ls|ps|inspect|update|scale|rm|logs, and the progress
//! display `create`, `update` and `scale` show until the service converges
//! (and the wait of `rm` until its tasks are gone).
//!
//! - `flags`: flags that need more than clap (replicas, delays, env, labels);
//! - `show`: how services and tasks are printed, and `service ps`;
//! - `progress`: the convergence display and when it ends.

mod flags;
mod progress;
mod show;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Result, bail};
use mesh_proto::control_client::ControlClient;
use mesh_proto::*;
use serde_json::json;
use tonic::transport::Channel;

pub use flags::{HealthArgs, parse_delay, parse_replicas, parse_scale};

use crate::cli::{ServiceCmd, ServiceCreateArgs, ServiceUpdateArgs};
use crate::client::{connect, status};
use crate::table;
use flags::{env_from_flags, labels};
use mesh_common::ports::ServicePort;
use progress::converge;
use show::{command_column, inspect_json, ports_column, ps, short, statuses};

/// A `--publish` as the API takes it (published 0: allocate one).
fn port_config(p: &ServicePort) -> PortConfig {
    PortConfig {
        protocol: p.protocol.to_string(),
        target_port: p.target.into(),
        published_port: p.published.map_or(0, u32::from),
        publish_mode: p.mode.to_string(),
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
        ports: a.publish.iter().map(port_config).collect(),
        health: a.health.for_create()?,
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
        publish_add: a.publish_add.iter().map(port_config).collect(),
        publish_rm: a.publish_rm,
        health: a.health.for_update()?,
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
                        "Ports": ports_column(&s.endpoint_ports),
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
                            ports_column(&s.endpoint_ports),
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
            let out: Vec<_> = statuses(&mut c, services)
                .await?
                .iter()
                .filter_map(|st| st.service.as_ref().map(|s| inspect_json(s, &st.tasks)))
                .collect();
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ServiceCmd::Rm { detach, services } => {
            let mut failed = false;
            for s in services {
                let removed = match c.service_remove(ServiceRef { service: s.clone() }).await {
                    Ok(svc) => svc.into_inner(),
                    Err(e) => {
                        eprintln!("Error: {}", status(e));
                        failed = true;
                        continue;
                    }
                };
                if !detach && let Err(e) = progress::stopped(&mut c, &removed).await {
                    eprintln!("Error: {e:#}");
                    failed = true;
                    continue;
                }
                println!("{s}");
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
