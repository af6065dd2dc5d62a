//! Local network requests (bridge, macvlan) from the Control API: this
//! node's own networks, kept in [`crate::local_networks`]. What a create
//! may ask for is decided here; cluster networks are decided by the
//! managers (`mesh_manager::control::networks`).

use mesh_common::id::check_network_name;
use mesh_common::model::DriverKind;
use mesh_common::refusal::Refusal;

use crate::local_networks::{LocalNetwork, LocalSpec};
use crate::sandboxes::Record;

/// A local (bridge or macvlan) network request, checked.
pub fn spec_from(r: mesh_proto::NetworkCreateRequest) -> Result<LocalSpec, Refusal> {
    let bad = |m: String| Err(Refusal::invalid(m));
    check_network_name(&r.name)?;
    let driver = DriverKind::requested(&r.driver).to_string();
    match driver.as_str() {
        "bridge" | "macvlan" => {}
        "host" | "none" => {
            return bad(format!(
                "only one {driver} network may exist: it is pre-defined on every node"
            ));
        }
        other => {
            return bad(format!(
                "unknown network driver {other:?}: use overlay, bridge or macvlan"
            ));
        }
    }
    if r.ingress {
        return bad("an ingress network must be -d overlay".into());
    }
    if r.subnet.is_empty() && (!r.gateway.is_empty() || !r.ip_range.is_empty()) {
        return bad("--gateway and --ip-range need --subnet".into());
    }
    mesh_common::input::check_network_words(&r.subnet, &r.labels)?;
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(LocalSpec {
        name: r.name,
        driver,
        subnet: opt(r.subnet),
        gateway: opt(r.gateway),
        ip_range: opt(r.ip_range),
        internal: r.internal,
        options: r.options.into_iter().collect(),
        labels: r.labels.into_iter().collect(),
    })
}

/// A local network as the API shows it; its Containers are this node's
/// sandboxes on it.
pub fn to_pb(n: &LocalNetwork, sandboxes: &[Record]) -> mesh_proto::Network {
    let prefix = n.subnet.split_once('/').map(|(_, p)| p).unwrap_or("16");
    let containers = sandboxes
        .iter()
        .filter(|r| r.exit_code.is_none())
        .flat_map(|r| {
            r.networks
                .iter()
                .filter(|a| a.network_id == n.id)
                .map(move |a| (r, a))
        })
        .map(|(r, a)| mesh_proto::NetworkContainer {
            sandbox_id: r.id.clone(),
            name: r.name.clone(),
            endpoint_id: a.endpoint_id.clone(),
            mac: a.mac.clone(),
            ipv4: format!("{}/{prefix}", a.ip),
        })
        .collect();
    mesh_proto::Network {
        id: n.id.clone(),
        name: n.name.clone(),
        driver: n.driver.clone(),
        scope: "local".into(),
        subnet: n.subnet.clone(),
        gateway: n.gateway.clone(),
        ip_range: n.ip_range.clone().unwrap_or_default(),
        internal: n.internal,
        options: n.options.clone().into_iter().collect(),
        labels: n.labels.clone().into_iter().collect(),
        created_at: n.created_at.clone(),
        containers,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers() {
        let r = mesh_proto::NetworkCreateRequest {
            name: "n".into(),
            driver: "vlan".into(),
            ..Default::default()
        };
        assert!(spec_from(r).is_err_and(|e| e.contains("unknown network driver")));
    }
}
