//! The DNS records a node serves, derived from its view and its sandboxes:
//! pure, so what a sandbox can resolve is tested without a resolver.

use std::net::Ipv4Addr;

use mesh_common::model::DriverKind;
use mesh_proto::NodeView;

use super::Record;
use crate::dns::{NetworkRecords, Records};

/// Every network's names: cluster networks from the view (sandboxes here
/// and elsewhere, their aliases, services), and user-defined local networks
/// from this node's running sandboxes. `builtin` says whether a local
/// network ID is a pre-defined one: the default bridge has no names, as in
/// Docker.
pub fn records(
    view: Option<&NodeView>,
    sandboxes: &[Record],
    builtin: impl Fn(&str) -> bool,
) -> Records {
    let mut records = Records::default();
    // The ingress network carries published ports only: as in Swarm, no
    // name resolves on it (tasks reach each other on their own networks).
    let ingress = view
        .and_then(|v| v.ingress.as_ref())
        .map(|i| i.network_id.as_str());
    for net in view
        .iter()
        .flat_map(|v| v.networks.iter())
        .filter(|n| Some(n.id.as_str()) != ingress)
    {
        records
            .networks
            .insert(net.id.clone(), network_records(net));
    }
    for rec in sandboxes.iter().filter(|r| r.running()) {
        for a in rec
            .networks
            .iter()
            .filter(|a| a.driver != DriverKind::Overlay && !builtin(&a.network_id))
        {
            records
                .networks
                .entry(a.network_id.clone())
                .or_insert_with(|| NetworkRecords::named(a.network_id.clone(), &a.network))
                .insert_sandbox(&rec.name, a.ip);
        }
    }
    records
}

/// One cluster network's names. Addresses that do not parse are left out.
fn network_records(net: &mesh_proto::NetworkAssignment) -> NetworkRecords {
    let mut r = NetworkRecords::named(net.id.clone(), &net.name);
    let endpoints = net
        .local
        .iter()
        .map(|e| (&e.sandbox, &e.ip, &e.aliases))
        .chain(net.peers.iter().map(|p| (&p.name, &p.ip, &p.aliases)));
    for (name, ip, aliases) in endpoints {
        if let Ok(ip) = ip.parse() {
            r.insert_sandbox(name, ip);
            for a in aliases {
                r.insert_alias(a, ip);
            }
        }
    }
    // Services: NAME is the VIP (or, in dnsrr mode, the tasks),
    // tasks.NAME always the running tasks.
    for svc in &net.services {
        let backends: Vec<Ipv4Addr> = svc.backends.iter().filter_map(|b| b.parse().ok()).collect();
        match svc.vip.parse::<Ipv4Addr>() {
            Ok(vip) => r.insert_alias(&svc.name, vip),
            Err(_) => {
                for ip in &backends {
                    r.insert_alias(&svc.name, *ip);
                }
            }
        }
        let tasks = format!("tasks.{}", svc.name);
        r.names.entry(tasks.clone()).or_default();
        for ip in backends {
            r.insert_alias(&tasks, ip);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::{EndpointInfo, NetworkAssignment, PeerEntry, ServiceEntry};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    fn view() -> NodeView {
        NodeView {
            networks: vec![NetworkAssignment {
                id: "net1".into(),
                local: vec![EndpointInfo {
                    sandbox: "web".into(),
                    ip: "10.0.1.2".into(),
                    aliases: vec!["www".into()],
                    ..Default::default()
                }],
                peers: vec![
                    PeerEntry {
                        name: "db".into(),
                        ip: "10.0.1.3".into(),
                        ..Default::default()
                    },
                    PeerEntry {
                        name: "broken".into(),
                        ip: "nope".into(),
                        ..Default::default()
                    },
                ],
                services: vec![
                    ServiceEntry {
                        name: "api".into(),
                        vip: "10.0.1.100".into(),
                        backends: vec!["10.0.1.5".into(), "10.0.1.6".into()],
                        ..Default::default()
                    },
                    ServiceEntry {
                        name: "rr".into(),
                        vip: String::new(),
                        backends: vec!["10.0.1.7".into()],
                        ..Default::default()
                    },
                    ServiceEntry {
                        name: "idle".into(),
                        vip: "10.0.1.101".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn cluster_names_from_the_view() {
        let r = records(Some(&view()), &[], |_| false);
        let n = &r.networks["net1"];
        assert_eq!(n.names["web"], vec![ip("10.0.1.2")]);
        assert_eq!(n.names["www"], vec![ip("10.0.1.2")]);
        assert_eq!(n.names["db"], vec![ip("10.0.1.3")]);
        assert!(!n.names.contains_key("broken"));
        // Only a sandbox's own name answers a reverse lookup.
        assert_eq!(n.reverse[&ip("10.0.1.2")], vec!["web".to_string()]);
        // VIP mode: the name is the VIP, tasks.NAME the tasks.
        assert_eq!(n.names["api"], vec![ip("10.0.1.100")]);
        assert_eq!(n.names["tasks.api"], vec![ip("10.0.1.5"), ip("10.0.1.6")]);
        // dnsrr: the name is the tasks.
        assert_eq!(n.names["rr"], vec![ip("10.0.1.7")]);
        // A service with no task yet still has an (empty) tasks. name.
        assert!(n.names["tasks.idle"].is_empty());
    }

    #[test]
    fn local_names_skip_builtin_networks_and_exited_sandboxes() {
        let rec = |name: &str, net: &str, addr: &str, exit: Option<i32>| -> Record {
            let mut r: Record = serde_json::from_value(serde_json::json!({
                "id": name, "name": name, "netns": "n", "pid": 0, "cmd": [], "env": [],
                "networks": [{"network": net, "network_id": net, "endpoint_id": "e",
                    "ifname": "eth0", "ip": addr, "prefix": 24, "mac": "", "gateway": "172.19.0.1",
                    "vni": 0, "mtu": 1500, "internal": false, "driver": "bridge"}],
                "egress_ip": null, "created_at": ""
            }))
            .expect("record");
            r.exit_code = exit;
            r
        };
        let sandboxes = [
            rec("a", "mine", "172.19.0.2", None),
            rec("b", "default", "172.17.0.2", None),
            rec("c", "mine", "172.19.0.3", Some(0)),
        ];
        let r = records(None, &sandboxes, |id| id == "default");
        assert_eq!(r.networks.len(), 1);
        let n = &r.networks["mine"];
        assert_eq!(n.names["a"], vec![ip("172.19.0.2")]);
        assert!(!n.names.contains_key("c"));
    }

    #[test]
    fn the_ingress_network_has_no_names() {
        let mut v = view();
        v.ingress = Some(mesh_proto::IngressView {
            network_id: "net1".into(),
            ..Default::default()
        });
        let r = records(Some(&v), &[], |_| false);
        assert!(!r.networks.contains_key("net1"));
        assert!(
            records(Some(&view()), &[], |_| false)
                .networks
                .contains_key("net1")
        );
    }
}
