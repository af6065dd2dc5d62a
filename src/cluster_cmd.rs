//! init, join, join-token, leave, info.

use std::process::ExitCode;

use anyhow::Result;
use mesh_proto::*;
use serde_json::json;

use crate::cli::{InfoArgs, InitArgs, JoinArgs, JoinTokenArgs, LeaveArgs};
use crate::client::{connect, status};

pub async fn init(host: &str, a: InitArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let r = c
        .init(InitRequest {
            advertise_addr: a.advertise_addr,
            listen_addr: a.listen_addr,
            cert_expiry_secs: a.cert_expiry.as_secs(),
            force_new_cluster: false,
            default_addr_pool: a.default_addr_pool,
            default_addr_pool_mask_length: a.default_addr_pool_mask_length,
            data_path_port: a.data_path_port,
            encryption_key_rotation_secs: a.encryption_key_rotation.map_or(0, |d| d.as_secs()),
            dispatcher_heartbeat_ms: a.dispatcher_heartbeat.map_or(0, millis),
            node_down_grace_ms: a.node_down_grace.map_or(0, millis),
        })
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "Cluster initialized: current node ({}) is now a manager.\n",
        r.node_id
    );
    println!("To add a worker to this cluster, run the following command:\n");
    println!(
        "    mesh join --token {} {}\n",
        r.worker_token, r.advertise_addr
    );
    println!(
        "To add a manager to this cluster, run 'mesh join-token manager' and follow the instructions."
    );
    Ok(ExitCode::SUCCESS)
}

/// A duration in ms for the API, where 0 means "left out": anything below
/// 1 ms rounds up, so it is refused as too short rather than defaulted.
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

pub async fn join(host: &str, a: JoinArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let r = c
        .join(JoinRequest {
            token: a.token,
            remote_addr: a.remote,
            advertise_addr: a.advertise_addr,
            listen_addr: a.listen_addr,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("This node joined a cluster as a {}.", r.role);
    Ok(ExitCode::SUCCESS)
}

pub async fn join_token(host: &str, a: JoinTokenArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let r = c
        .join_token(JoinTokenRequest {
            role: a.role.clone(),
            rotate: a.rotate,
        })
        .await
        .map_err(status)?
        .into_inner();
    if a.quiet {
        println!("{}", r.token);
        return Ok(ExitCode::SUCCESS);
    }
    if a.rotate {
        println!("Successfully rotated {} join token.\n", a.role);
    }
    println!(
        "To add a {} to this cluster, run the following command:\n",
        a.role
    );
    println!("    mesh join --token {} {}\n", r.token, r.manager_addr);
    Ok(ExitCode::SUCCESS)
}

pub async fn leave(host: &str, a: LeaveArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    c.leave(LeaveRequest { force: a.force })
        .await
        .map_err(status)?;
    println!("Node left the cluster.");
    Ok(ExitCode::SUCCESS)
}

pub async fn info(host: &str, a: InfoArgs) -> Result<ExitCode> {
    let mut c = connect(host).await?;
    let i = c.info(Empty {}).await.map_err(status)?.into_inner();
    let managers: Vec<_> = i
        .managers
        .iter()
        .map(|m| json!({"NodeID": m.node_id, "Addr": m.addr}))
        .collect();
    if a.format.as_deref() == Some("json") {
        let v = json!({
            "Name": i.hostname,
            "Swarm": {
                "NodeID": i.node_id,
                "NodeAddr": i.node_addr,
                "LocalNodeState": i.local_node_state,
                "ControlAvailable": i.control_available,
                "Error": i.error,
                "RemoteManagers": managers,
                "Nodes": i.nodes,
                "Managers": i.managers.len(),
                "Cluster": {"ID": i.cluster_id},
                "LeaderID": i.leader_id,
                "CertNotAfter": i.cert_not_after,
                "DataPathErrors": i.datapath_errors,
                "EncryptionKeyRotation": i.encryption_key_rotation,
                "DispatcherHeartbeat": i.dispatcher_heartbeat,
                "NodeDownGrace": i.node_down_grace,
                "Encryption": i.encryption.as_ref().map(encryption_json),
            }
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("Name: {}", i.hostname);
    println!("Cluster: {}", i.local_node_state);
    if !i.error.is_empty() {
        println!(" Error: {}", i.error);
    }
    if i.node_id.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(" NodeID: {}", i.node_id);
    println!(" Is Manager: {}", i.control_available);
    println!(" ClusterID: {}", i.cluster_id);
    println!(" Leader: {}", i.leader_id);
    println!(" Managers: {}", i.managers.len());
    if i.control_available {
        println!(" Nodes: {}", i.nodes);
    }
    println!(" Node Address: {}", i.node_addr);
    println!(" Manager Addresses:");
    for m in &i.managers {
        println!("  {}", m.addr);
    }
    println!(" Certificate Expiry: {}", i.cert_not_after);
    if !i.datapath_errors.is_empty() {
        println!(" Data Path Errors:");
        for e in &i.datapath_errors {
            println!("  {e}");
        }
    }
    println!(
        " Encryption Key Rotation: {}",
        if i.encryption_key_rotation.is_empty() {
            "never"
        } else {
            &i.encryption_key_rotation
        }
    );
    if !i.dispatcher_heartbeat.is_empty() {
        println!(" Dispatcher Heartbeat: {}", i.dispatcher_heartbeat);
        println!(" Node Down Grace: {}", i.node_down_grace);
    }
    if let Some(e) = &i.encryption {
        println!(" Encryption:");
        println!("  Public Key: {}", e.public_key);
        println!("  Key Created: {}", e.key_created_at);
        println!(
            "  Datapath: {}",
            if e.datapath.is_empty() {
                "idle (no encrypted network here)"
            } else {
                &e.datapath
            }
        );
        if e.listen_port != 0 {
            println!("  Listen Port: {}", e.listen_port);
        }
        if !e.peers.is_empty() {
            println!("  Peers:");
            for p in &e.peers {
                let hs = if p.last_handshake.is_empty() {
                    "never"
                } else {
                    &p.last_handshake
                };
                println!(
                    "   {}  endpoint {}  last handshake {}",
                    p.node_id, p.endpoint, hs
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A peer as `mesh info` and `node inspect` show it in JSON.
pub fn peer_json(p: &EncryptionPeer) -> serde_json::Value {
    json!({
        "NodeID": p.node_id,
        "PublicKey": p.public_key,
        "Endpoint": p.endpoint,
        "LastHandshake": p.last_handshake,
        "RxBytes": p.rx_bytes,
        "TxBytes": p.tx_bytes,
    })
}

fn encryption_json(e: &EncryptionInfo) -> serde_json::Value {
    json!({
        "PublicKey": e.public_key,
        "KeyCreatedAt": e.key_created_at,
        "Datapath": e.datapath,
        "ListenPort": e.listen_port,
        "Peers": e.peers.iter().map(peer_json).collect::<Vec<_>>(),
    })
}
