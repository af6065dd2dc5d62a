//! Sandbox records as the Control API shows them.

use mesh_worker::sandboxes::Record;
use mesh_worker::state_dir::StateDir;

pub fn to_pb(r: &Record, state_dir: &StateDir) -> mesh_proto::Sandbox {
    mesh_proto::Sandbox {
        id: r.id.clone(),
        name: r.name.clone(),
        pid: r.pid,
        state: if r.running() { "running" } else { "exited" }.into(),
        exit_code: r.exit_code.unwrap_or(0),
        cmd: r.cmd.clone(),
        networks: r
            .networks
            .iter()
            .map(|a| mesh_proto::SandboxAttachment {
                network: a.network.clone(),
                network_id: a.network_id.clone(),
                endpoint_id: a.endpoint_id.clone(),
                ifname: a.ifname.clone(),
                ip: a.ip.to_string(),
                prefix: a.prefix.into(),
                mac: a.mac.clone(),
                gateway: a.gateway.to_string(),
            })
            .collect(),
        created_at: r.created_at.clone(),
        ports: r
            .ports
            .iter()
            .map(|p| mesh_proto::PortBinding {
                host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                host_port: p.host_port.into(),
                container_port: p.container_port.into(),
                protocol: p.protocol.to_string(),
            })
            .collect(),
        env: r.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        log_path: state_dir
            .sandboxes_dir()
            .join(&r.id)
            .join("output.log")
            .display()
            .to_string(),
        netns: r.netns.clone(),
    }
}
