//! mesh run | ps | exec | rm | port | inspect.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mesh_proto::*;
use serde_json::json;

use crate::cli::RunArgs;
use crate::client::{connect, status};
use crate::table;

pub async fn run(host: &str, a: RunArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let mut env = std::collections::HashMap::new();
    for e in a.env {
        let Some((k, v)) = e.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            bail!("invalid --env {e:?}: use KEY=VALUE")
        };
        env.insert(k.to_string(), v.to_string());
    }
    let sb = c
        .sandbox_run(RunRequest {
            name: a.name,
            networks: a.network,
            aliases: a.network_alias,
            cmd: a.cmd,
            env,
            ports: a
                .publish
                .iter()
                .map(|p| PortBinding {
                    host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    host_port: p.host_port.map_or(0, u32::from),
                    container_port: p.container_port.into(),
                    protocol: p.protocol.to_string(),
                })
                .collect(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if a.detach {
        println!("{}", sb.id);
        return Ok(ExitCode::SUCCESS);
    }
    // Attached: follow its output until it exits, then exit with its code.
    let mut offset = 0u64;
    loop {
        if let Ok(mut f) = std::fs::File::open(&sb.log_path) {
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        }
        let now = c
            .sandbox_inspect(SandboxRef {
                sandbox: sb.id.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        if now.state == "exited" {
            if let Ok(mut f) = std::fs::File::open(&sb.log_path) {
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::new();
                f.read_to_end(&mut buf)?;
                std::io::stdout().write_all(&buf)?;
            }
            return Ok(ExitCode::from(u8::try_from(now.exit_code).unwrap_or(1)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn ps(host: &str, all: bool, format: Option<String>, quiet: bool) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let mut list = c
        .sandbox_list(Empty {})
        .await
        .map_err(status)?
        .into_inner()
        .sandboxes;
    list.retain(|s| all || s.state == "running");
    list.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    let nets = |s: &Sandbox| {
        s.networks
            .iter()
            .map(|n| n.network.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let ips = |s: &Sandbox| {
        s.networks
            .iter()
            .map(|n| n.ip.clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    if quiet {
        for s in &list {
            println!("{}", &s.id[..12.min(s.id.len())]);
        }
    } else if format.as_deref() == Some("json") {
        for s in &list {
            let status = if s.state == "running" {
                "Up".to_string()
            } else {
                format!("Exited ({})", s.exit_code)
            };
            println!(
                "{}",
                json!({"ID": s.id, "Names": s.name, "Command": s.cmd.join(" "), "State": s.state, "Status": status,
                       "Networks": nets(s), "IPs": ips(s), "Pid": s.pid, "CreatedAt": s.created_at})
            );
        }
    } else if let Some(f) = format {
        bail!("unsupported --format {f:?}: use json or leave it out for a table");
    } else {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| {
                let status = if s.state == "running" {
                    "Up".to_string()
                } else {
                    format!("Exited ({})", s.exit_code)
                };
                vec![
                    s.id.chars().take(12).collect(),
                    s.cmd.join(" "),
                    status,
                    nets(s),
                    ips(s),
                    s.name.clone(),
                ]
            })
            .collect();
        table::print(
            &[
                "SANDBOX ID",
                "COMMAND",
                "STATUS",
                "NETWORKS",
                "IPS",
                "NAMES",
            ],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One sandbox as its daemon shows it.
async fn inspect_one(host: &str, name: &str) -> Result<Sandbox> {
    let mut c = connect(host).await?;
    Ok(c.sandbox_inspect(SandboxRef {
        sandbox: name.to_string(),
    })
    .await
    .map_err(status)?
    .into_inner())
}

/// Joins the sandbox's namespaces in a child and runs CMD there with this
/// terminal's stdio (the CLI runs on the same machine as its daemon).
pub async fn exec(host: &str, name: &str, cmd: Vec<String>) -> Result<ExitCode> {
    let sb = inspect_one(host, name).await?;
    if sb.state != "running" {
        bail!(
            "sandbox {} is not running (exited with {}); start a new one with `mesh run`",
            sb.name,
            sb.exit_code
        );
    }
    let env = vec![("HOSTNAME".to_string(), sb.name.clone())];
    let st = tokio::task::spawn_blocking(move || mesh_worker::sandbox::exec(sb.pid, &cmd, &env))
        .await?
        .context("exec")?;
    Ok(ExitCode::from(
        st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1),
    ))
}

pub async fn rm(host: &str, force: bool, names: Vec<String>) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let mut failed = false;
    for n in names {
        match c
            .sandbox_remove(SandboxRemoveRequest {
                sandbox: n.clone(),
                force,
            })
            .await
        {
            Ok(_) => println!("{n}"),
            Err(s) => {
                eprintln!("Error: {}", s.message());
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The host side of a binding as Docker prints it: `0.0.0.0:8080`.
fn host_side(p: &PortBinding) -> String {
    mesh_common::ports::host_side(
        p.host_ip.parse().ok(),
        u16::try_from(p.host_port).unwrap_or(0),
    )
}

/// `mesh port NAME [PORT[/PROTO]]`, as `docker port`.
pub async fn port(host: &str, name: &str, which: Option<String>) -> Result<ExitCode> {
    let filter = match &which {
        None => None,
        Some(w) => {
            let (p, proto) = mesh_common::ports::parse_port_ref(w)?;
            let proto = proto.unwrap_or_default();
            Some((p, proto.to_string()))
        }
    };
    let sb = inspect_one(host, name).await?;
    match filter {
        None => {
            for p in &sb.ports {
                println!("{}/{} -> {}", p.container_port, p.protocol, host_side(p));
            }
        }
        Some((port, proto)) => {
            let hits: Vec<_> = sb
                .ports
                .iter()
                .filter(|p| p.container_port == u32::from(port) && p.protocol == proto)
                .collect();
            if hits.is_empty() {
                bail!("No public port '{port}/{proto}' published for {}", sb.name);
            }
            for p in hits {
                println!("{}", host_side(p));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Docker's `{"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}`, with
/// the host port as bound.
fn port_map(ports: &[PortBinding]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for p in ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        let entry = m
            .entry(key)
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(v) = entry {
            v.push(json!({
                "HostIp": if p.host_ip.is_empty() { "0.0.0.0" } else { &p.host_ip },
                "HostPort": if p.host_port == 0 { String::new() } else { p.host_port.to_string() },
            }));
        }
    }
    serde_json::Value::Object(m)
}

/// `mesh inspect NAME...`: Docker-shaped JSON, an array of objects.
pub async fn inspect(host: &str, names: Vec<String>) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let mut out = Vec::new();
    for n in names {
        let sb = c
            .sandbox_inspect(SandboxRef { sandbox: n })
            .await
            .map_err(status)?
            .into_inner();
        let networks: serde_json::Map<String, serde_json::Value> = sb
            .networks
            .iter()
            .map(|a| {
                (
                    a.network.clone(),
                    json!({
                        "NetworkID": a.network_id,
                        "EndpointID": a.endpoint_id,
                        "Gateway": a.gateway,
                        "IPAddress": a.ip,
                        "IPPrefixLen": a.prefix,
                        "MacAddress": a.mac,
                        "Aliases": serde_json::Value::Null,
                    }),
                )
            })
            .collect();
        let running = sb.state == "running";
        out.push(json!({
            "Id": sb.id,
            "Name": format!("/{}", sb.name),
            "Created": sb.created_at,
            "State": {
                "Status": sb.state,
                "Running": running,
                "Pid": if running { sb.pid } else { 0 },
                "ExitCode": sb.exit_code,
            },
            "Config": {"Cmd": sb.cmd, "Env": sb.env},
            "HostConfig": {"PortBindings": port_map(&sb.ports)},
            "NetworkSettings": {
                "Ports": port_map(&sb.ports),
                "Networks": networks,
                "SandboxKey": mesh_worker::netns::path(&sb.netns).display().to_string(),
            },
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
