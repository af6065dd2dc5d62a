//! mesh node ls|inspect|rm|promote|demote|update.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use mesh_proto::*;
use serde_json::json;

use crate::cli::NodeCmd;
use crate::client::{connect, status};
use crate::table::{self, title};

fn manager_status(n: &Node) -> String {
    if n.role != "manager" {
        String::new()
    } else if n.leader {
        "Leader".into()
    } else {
        title(&n.reachability)
    }
}

/// `--filter key=value` as Docker's node ls takes it.
fn matches(n: &Node, filters: &[(String, String)], self_id: &str) -> bool {
    filters.iter().all(|(k, v)| match k.as_str() {
        "role" => n.role == *v,
        "name" => n.hostname == *v,
        "id" => n.id.starts_with(v.as_str()),
        "membership" => v == "accepted",
        "node.label" | "label" => match v.split_once('=') {
            Some((lk, lv)) => n.labels.get(lk).is_some_and(|x| x == lv),
            None => n.labels.contains_key(v),
        },
        "self" => (n.id == self_id) == (v == "true"),
        _ => false,
    })
}

/// Filters whose values are words: a misspelt one would match nothing
/// and look like an empty cluster, so it is refused as Docker does.
fn check_filter_value(key: &str, value: &str) -> Result<()> {
    let allowed: &[&str] = match key {
        "role" => &["manager", "worker"],
        "membership" => &["accepted", "pending"],
        "self" => &["true", "false"],
        _ => return Ok(()),
    };
    if !allowed.contains(&value) {
        bail!(
            "invalid filter {key}={value:?}: use {key}={}",
            allowed.join(" or ")
        );
    }
    Ok(())
}

fn inspect_json(n: &Node) -> serde_json::Value {
    let mut v = json!({
        "ID": n.id,
        "Version": {"Index": n.version},
        "CreatedAt": n.created_at,
        "UpdatedAt": n.updated_at,
        "Spec": {"Labels": n.labels, "Role": n.role, "Availability": n.availability},
        "Description": {
            "Hostname": n.hostname,
            "Platform": {"Architecture": n.architecture, "OS": n.os},
            // Docker shows the CA here; we show what the cluster pins.
            "TLSInfo": {
                "CertSerial": n.tls_serial,
                "CertNotAfter": n.tls_not_after,
                "KeyFingerprint": n.tls_key_fingerprint,
            },
        },
        // Routes: the node's own, as its heartbeats report them (Docker has
        // no such field); overlay subnets may not overlap them.
        "Status": {
            "State": n.state,
            "Addr": n.addr,
            "DataPathErrors": n.datapath_errors,
            "Routes": n.routes.iter().map(|r| json!({"Destination": r.destination, "Device": r.device})).collect::<Vec<_>>(),
        },
        // The WireGuard key of encrypted overlays, and the peers' last
        // handshakes as the node's last heartbeat reported them.
        "Encryption": {
            "PublicKey": n.encryption_public_key,
            "KeyRotations": n.encryption_key_rotations,
            "Peers": n.encryption_peers.iter().map(crate::cluster_cmd::peer_json).collect::<Vec<_>>(),
        },
    });
    if n.role == "manager" {
        v["ManagerStatus"] =
            json!({"Leader": n.leader, "Reachability": n.reachability, "Addr": n.manager_addr});
    }
    v
}

pub async fn run(host: &str, cmd: NodeCmd) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    match cmd {
        NodeCmd::Ls {
            filter,
            format,
            quiet,
        } => {
            let mut filters = Vec::new();
            for f in filter {
                let Some((k, v)) = f.split_once('=') else {
                    bail!("invalid filter {f:?}: use KEY=VALUE (role, name, id, label, self)");
                };
                if ![
                    "role",
                    "name",
                    "id",
                    "membership",
                    "node.label",
                    "label",
                    "self",
                ]
                .contains(&k)
                {
                    bail!("invalid filter key {k:?}: use role, name, id, label or self");
                }
                check_filter_value(k, v)?;
                filters.push((k.to_string(), v.to_string()));
            }
            let self_id = c.info(Empty {}).await.map_err(status)?.into_inner().node_id;
            let mut nodes = c
                .node_list(Empty {})
                .await
                .map_err(status)?
                .into_inner()
                .nodes;
            nodes.retain(|n| matches(n, &filters, &self_id));
            nodes.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
            if quiet {
                for n in &nodes {
                    println!("{}", n.id);
                }
            } else if format.as_deref() == Some("json") {
                for n in &nodes {
                    let v = json!({
                        "ID": n.id,
                        "Hostname": n.hostname,
                        "Status": title(&n.state),
                        "Availability": title(&n.availability),
                        "ManagerStatus": manager_status(n),
                        "EngineVersion": env!("CARGO_PKG_VERSION"),
                        "TLSStatus": "Ready",
                        "Self": n.id == self_id,
                        "Addr": n.addr,
                        "Labels": n.labels,
                    });
                    println!("{v}");
                }
            } else if let Some(f) = format {
                bail!("unsupported --format {f:?}: use json or leave it out for a table");
            } else {
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        let id = if n.id == self_id {
                            format!("{} *", n.id)
                        } else {
                            n.id.clone()
                        };
                        vec![
                            id,
                            n.hostname.clone(),
                            title(&n.state),
                            title(&n.availability),
                            manager_status(n),
                            env!("CARGO_PKG_VERSION").into(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "ID",
                        "HOSTNAME",
                        "STATUS",
                        "AVAILABILITY",
                        "MANAGER STATUS",
                        "ENGINE VERSION",
                    ],
                    &rows,
                );
            }
        }
        NodeCmd::Inspect { nodes } => {
            let info = c.info(Empty {}).await.map_err(status)?.into_inner();
            let all = c
                .node_list(Empty {})
                .await
                .map_err(status)?
                .into_inner()
                .nodes;
            let by_id: HashMap<String, Node> = all.into_iter().map(|n| (n.id.clone(), n)).collect();
            let mut out = Vec::new();
            for r in &nodes {
                let r = if r == "self" { &info.node_id } else { r };
                let found: Vec<&Node> = match by_id.get(r) {
                    Some(n) => vec![n],
                    None => {
                        let by_name: Vec<&Node> =
                            by_id.values().filter(|n| &n.hostname == r).collect();
                        if by_name.is_empty() {
                            by_id
                                .values()
                                .filter(|n| n.id.starts_with(r.as_str()))
                                .collect()
                        } else {
                            by_name
                        }
                    }
                };
                match found.as_slice() {
                    [n] => out.push(inspect_json(n)),
                    [] => bail!("no such node: {r}"),
                    _ => bail!("node reference {r:?} is ambiguous; use the node ID"),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        NodeCmd::Rm { force, nodes } => {
            for n in nodes {
                c.node_remove(NodeRemoveRequest {
                    node: n.clone(),
                    force,
                })
                .await
                .map_err(status)?;
                println!("{n}");
            }
        }
        NodeCmd::Promote { nodes } => {
            for n in nodes {
                c.node_update(NodeUpdateRequest {
                    node: n.clone(),
                    role: "manager".into(),
                    ..Default::default()
                })
                .await
                .map_err(status)?;
                println!("Node {n} promoted to a manager in the cluster.");
            }
        }
        NodeCmd::Demote { nodes } => {
            for n in nodes {
                c.node_update(NodeUpdateRequest {
                    node: n.clone(),
                    role: "worker".into(),
                    ..Default::default()
                })
                .await
                .map_err(status)?;
                println!("Manager {n} demoted in the cluster.");
            }
        }
        NodeCmd::Update {
            availability,
            label_add,
            label_rm,
            rotate_key,
            node,
        } => {
            let mut labels = HashMap::new();
            for l in label_add {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                if k.is_empty() {
                    bail!("invalid label {l:?}: use --label-add KEY=VALUE");
                }
                labels.insert(k.to_string(), v.to_string());
            }
            c.node_update(NodeUpdateRequest {
                node: node.clone(),
                availability: availability.unwrap_or_default(),
                role: String::new(),
                label_add: labels,
                label_rm,
                rotate_key,
            })
            .await
            .map_err(status)?;
            println!("{node}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
