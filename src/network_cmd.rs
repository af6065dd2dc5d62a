//! mesh network create|ls|inspect|rm|prune.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use mesh_proto::*;
use serde_json::json;

use crate::cli::NetworkCmd;
use crate::client::{connect, status};
use crate::table;

/// "K=V" flags (labels, options); a bare "K" means an empty value.
fn key_values(items: Vec<String>, flag: &str) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in items {
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
        if k.is_empty() {
            bail!("invalid {flag} {item:?}: use {flag} KEY=VALUE");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Docker's `network inspect` shape.
pub fn inspect_json(n: &Network) -> serde_json::Value {
    let mut config = json!({"Subnet": n.subnet, "Gateway": n.gateway});
    if !n.ip_range.is_empty() {
        config["IPRange"] = json!(n.ip_range);
    }
    json!({
        "Name": n.name,
        "Id": n.id,
        "Created": n.created_at,
        "Scope": n.scope,
        "Driver": n.driver,
        "EnableIPv6": false,
        "IPAM": {"Driver": "default", "Options": null, "Config": [config]},
        "Internal": n.internal,
        "Attachable": n.attachable,
        "Ingress": n.ingress,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": false,
        "Containers": n.containers.iter().map(|c| (c.sandbox_id.clone(), json!({
            "Name": c.name, "EndpointID": c.endpoint_id, "MacAddress": c.mac, "IPv4Address": c.ipv4, "IPv6Address": "",
        }))).collect::<serde_json::Map<String, serde_json::Value>>(),
        "Options": n.options,
        "Labels": n.labels,
        "Peers": n.peers.iter().map(|p| json!({"Name": p.name, "IP": p.ip})).collect::<Vec<_>>(),
    })
}

fn matches(n: &Network, filters: &[(String, String)]) -> bool {
    filters.iter().all(|(k, v)| match k.as_str() {
        "driver" => n.driver == *v,
        "name" => n.name.contains(v.as_str()),
        "id" => n.id.starts_with(v.as_str()),
        "scope" => n.scope == *v,
        "type" => v == "custom" && !n.ingress || v == "builtin" && n.ingress,
        "label" => match v.split_once('=') {
            Some((lk, lv)) => n.labels.get(lk).is_some_and(|x| x == lv),
            None => n.labels.contains_key(v),
        },
        _ => false,
    })
}

pub async fn run(host: &str, cmd: NetworkCmd) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    match cmd {
        NetworkCmd::Create {
            driver,
            subnet,
            gateway,
            ip_range,
            attachable,
            internal,
            ingress,
            opt,
            label,
            name,
        } => {
            let n = c
                .network_create(NetworkCreateRequest {
                    name,
                    driver,
                    subnet,
                    gateway,
                    ip_range,
                    attachable,
                    internal,
                    ingress,
                    options: key_values(opt, "--opt")?,
                    labels: key_values(label, "--label")?,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", n.id);
        }
        NetworkCmd::Ls {
            filter,
            format,
            quiet,
            no_trunc,
        } => {
            let mut filters = Vec::new();
            for f in filter {
                let Some((k, v)) = f.split_once('=') else {
                    bail!(
                        "invalid filter {f:?}: use KEY=VALUE (driver, name, id, scope, type, label)"
                    );
                };
                if !["driver", "name", "id", "scope", "type", "label"].contains(&k) {
                    bail!("invalid filter key {k:?}: use driver, name, id, scope, type or label");
                }
                filters.push((k.to_string(), v.to_string()));
            }
            let mut nets = c
                .network_list(Empty {})
                .await
                .map_err(status)?
                .into_inner()
                .networks;
            nets.retain(|n| matches(n, &filters));
            nets.sort_by(|a, b| a.name.cmp(&b.name));
            let short = |id: &str| {
                if no_trunc {
                    id.to_string()
                } else {
                    id.chars().take(12).collect()
                }
            };
            if quiet {
                for n in &nets {
                    println!("{}", short(&n.id));
                }
            } else if format.as_deref() == Some("json") {
                for n in &nets {
                    let v = json!({
                        "ID": n.id,
                        "Name": n.name,
                        "Driver": n.driver,
                        "Scope": n.scope,
                        "IPv6": "false",
                        "Internal": n.internal.to_string(),
                        "Labels": n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                        "Subnet": n.subnet,
                        "Gateway": n.gateway,
                        "VNI": n.vni,
                        "CreatedAt": n.created_at,
                    });
                    println!("{v}");
                }
            } else if let Some(f) = format {
                bail!("unsupported --format {f:?}: use json or leave it out for a table");
            } else {
                let rows: Vec<Vec<String>> = nets
                    .iter()
                    .map(|n| {
                        vec![
                            short(&n.id),
                            n.name.clone(),
                            n.driver.clone(),
                            n.scope.clone(),
                        ]
                    })
                    .collect();
                table::print(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], &rows);
            }
        }
        NetworkCmd::Inspect { networks } => {
            // The daemon resolves each reference (local networks first),
            // and says NotFound with Docker's words when none matches.
            let mut out = Vec::new();
            for r in networks {
                let n = c
                    .network_inspect(NetworkRef { network: r })
                    .await
                    .map_err(status)?
                    .into_inner();
                out.push(inspect_json(&n));
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        NetworkCmd::Rm { networks } => {
            let mut failed = false;
            for r in networks {
                match c.network_remove(NetworkRef { network: r.clone() }).await {
                    Ok(_) => println!("{r}"),
                    Err(s) => {
                        eprintln!("Error: {}", s.message());
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        NetworkCmd::Connect {
            alias,
            network,
            sandbox,
        } => {
            c.network_connect(ConnectRequest {
                network,
                sandbox,
                aliases: alias,
            })
            .await
            .map_err(status)?;
        }
        NetworkCmd::Disconnect {
            force: _,
            network,
            sandbox,
        } => {
            c.network_disconnect(ConnectRequest {
                network,
                sandbox,
                aliases: vec![],
            })
            .await
            .map_err(status)?;
        }
        NetworkCmd::Prune { force: _ } => {
            let removed = c
                .network_prune(Empty {})
                .await
                .map_err(status)?
                .into_inner()
                .networks;
            if !removed.is_empty() {
                println!("Deleted Networks:");
                for n in &removed {
                    println!("{}", n.name);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
