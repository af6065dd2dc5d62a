//! A service and its tasks as `mesh service ls|inspect|ps` show them.

use mesh_common::model::{Protocol, PublishMode, ServiceMode, TaskState};
use mesh_common::refusal::Refusal;

use crate::services::{PortSpec, Service, Task};
use crate::state::ClusterState;

fn net_name(s: &ClusterState, id: &str) -> String {
    s.networks
        .get(id)
        .map_or_else(|| id.to_string(), |n| n.spec.name.clone())
}

/// A service as the API shows it, with its running and desired task counts.
pub fn service_to_pb(s: &ClusterState, svc: &Service) -> mesh_proto::Service {
    let current: Vec<&Task> = s
        .tasks
        .values()
        .filter(|t| t.service_id == svc.id && t.desired_state == TaskState::Running)
        .collect();
    let running = current
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .count() as u64;
    let desired = match svc.spec.mode {
        ServiceMode::Global => current.len() as u64,
        ServiceMode::Replicated => svc.spec.replicas,
    };
    let vips = svc
        .vips
        .iter()
        .map(|(net, ip)| {
            let prefix = s.networks.get(net).map_or(32, |n| n.subnet.prefix_len());
            mesh_proto::ServiceVip {
                network_id: net.clone(),
                network: net_name(s, net),
                addr: format!("{ip}/{prefix}"),
            }
        })
        .collect();
    let spec = &svc.spec;
    mesh_proto::Service {
        id: svc.id.clone(),
        name: spec.name.clone(),
        mode: spec.mode.to_string(),
        replicas: spec.replicas,
        networks: spec.networks.iter().map(|n| net_name(s, n)).collect(),
        endpoint_mode: spec.endpoint_mode.to_string(),
        env: spec.env.clone(),
        constraints: spec.constraints.clone(),
        restart_condition: spec.restart_condition.to_string(),
        restart_delay_ms: spec.restart_delay_ms,
        restart_max_attempts: spec.restart_max_attempts,
        cmd: spec.cmd.clone(),
        labels: spec.labels.clone().into_iter().collect(),
        vips,
        created_at: svc.created_at.clone(),
        updated_at: svc.updated_at.clone(),
        version: svc.version,
        running,
        desired,
        update_state: svc.update_state.as_str().to_string(),
        update_message: svc.update_message.clone(),
        network_ids: spec.networks.clone(),
        spec_ports: spec.ports.iter().map(port_to_pb).collect(),
        endpoint_ports: svc.endpoint_ports.iter().map(port_to_pb).collect(),
        health: spec.health.as_ref().map(|h| h.to_pb()),
    }
}

/// A port as the API shows it (published 0: to be allocated).
pub fn port_to_pb(p: &PortSpec) -> mesh_proto::PortConfig {
    mesh_proto::PortConfig {
        protocol: p.protocol.to_string(),
        target_port: p.target.into(),
        published_port: p.published.map_or(0, u32::from),
        publish_mode: p.mode.to_string(),
    }
}

fn port_number(what: &str, n: u32) -> Result<u16, Refusal> {
    u16::try_from(n)
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| Refusal::invalid(format!("{what} port {n} is out of range 1-65535")))
}

/// A port from a request, every word and number checked (empty words are
/// Docker's defaults: tcp, ingress; published 0 is allocated).
pub fn port_from_pb(p: &mesh_proto::PortConfig) -> Result<PortSpec, Refusal> {
    let protocol = Protocol::from_wire(&p.protocol).map_err(|_| {
        Refusal::invalid(format!(
            "unknown protocol {:?}: expected tcp or udp",
            p.protocol
        ))
    })?;
    let mode = PublishMode::from_wire(&p.publish_mode).map_err(|_| {
        Refusal::invalid(format!(
            "unknown publish mode {:?}: expected ingress or host",
            p.publish_mode
        ))
    })?;
    let published = match p.published_port {
        0 => None,
        n => Some(port_number("published", n)?),
    };
    Ok(PortSpec {
        protocol,
        target: port_number("target", p.target_port)?,
        published,
        mode,
    })
}

pub fn task_to_pb(s: &ClusterState, t: &Task) -> mesh_proto::Task {
    let addresses = s
        .endpoints
        .values()
        .filter(|e| e.sandbox_id == t.id)
        .map(|e| format!("{}={}", net_name(s, &e.network_id), e.ip))
        .collect();
    mesh_proto::Task {
        id: t.id.clone(),
        name: s.task_name(t),
        service_id: t.service_id.clone(),
        slot: t.slot,
        node_id: t.node_id.clone(),
        node: s
            .nodes
            .get(&t.node_id)
            .map_or_else(|| t.node_id.clone(), |n| n.hostname.clone()),
        desired_state: t.desired_state.to_string(),
        state: t.state.to_string(),
        message: t.message.clone(),
        error: t.error.clone(),
        exit_code: t.exit_code,
        created_at: t.created_at.clone(),
        updated_at: t.updated_at.clone(),
        addresses,
        spec_version: t.spec_version,
        health: t.health.as_str().to_string(),
    }
}
