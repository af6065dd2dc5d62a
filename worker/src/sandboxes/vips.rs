//! Service VIPs in each sandbox: which services it must balance (pure, from
//! the view) and keeping its `mesh_vip` table so.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_common::model::DriverKind;
use mesh_proto::NodeView;

use super::{Record, Sandboxes};
use crate::drivers::{Fault, Repair};
use crate::vip::VipService;

/// Services on the sandbox's networks, from the managers' view, in VIP mode
/// (a dnsrr service has no VIP): what its `mesh_vip` table must balance.
/// The ingress network never gives VIPs (its ports are balanced by the
/// node's ingress sandbox), whatever its entry holds.
pub fn vip_services(view: &NodeView, rec: &Record) -> Vec<VipService> {
    let ingress = view.ingress.as_ref().map(|i| i.network_id.as_str());
    view.networks
        .iter()
        .filter(|n| Some(n.id.as_str()) != ingress)
        .filter(|n| rec.networks.iter().any(|a| a.network_id == n.id))
        .flat_map(|n| n.services.iter())
        .filter_map(|svc| {
            Some(VipService {
                name: svc.name.clone(),
                vip: svc.vip.parse().ok()?,
                backends: svc.backends.iter().filter_map(|b| b.parse().ok()).collect(),
            })
        })
        .collect()
}

/// Whether a sandbox has a VIP table to keep: running, with a namespace of
/// its own, on some overlay.
fn has_vips(r: &Record) -> bool {
    r.running() && !r.host_network && r.networks.iter().any(|a| a.driver == DriverKind::Overlay)
}

impl Sandboxes {
    /// The VIP table `rec` must have under the latest view, as the text
    /// applied. Sandboxes on the same networks get the same table: it is
    /// rendered once per view and set of networks (100 task sandboxes of
    /// one service on a node rendered the same 300 backends 100 times per
    /// pass), and [`Sandboxes::set_view`] drops the renderings.
    pub fn vip_text_for(&self, rec: &Record) -> Arc<str> {
        let mut key: Vec<&str> = rec.networks.iter().map(|a| a.network_id.as_str()).collect();
        key.sort_unstable();
        key.dedup();
        let key = key.join(",");
        // The view stays locked throughout, so no new view can slip in
        // between the rendering and its caching.
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let mut texts = self.vip_texts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(text) = texts.get(&key) {
            return text.clone();
        }
        let services = view
            .as_ref()
            .map(|v| vip_services(v, rec))
            .unwrap_or_default();
        let text: Arc<str> = crate::vip::render(&services).into();
        texts.insert(key, text.clone());
        text
    }

    /// Brings every running sandbox's VIP table in line with the view; a
    /// table that fails is retried on the next pass, and reported.
    pub fn sync_vips(&self, records: &[Record]) -> Repair {
        let live: Vec<&Record> = records.iter().filter(|r| has_vips(r)).collect();
        let mut todo = Vec::new();
        let mut rendered = BTreeMap::new();
        let mut names = BTreeMap::new();
        for rec in &live {
            let text = self.vip_text_for(rec);
            rendered.insert(rec.netns.clone(), text);
            names.insert(rec.netns.clone(), rec.name.clone());
        }
        {
            let applied = self.vip_applied.lock().unwrap_or_else(|e| e.into_inner());
            for (ns, text) in &rendered {
                if applied.get(ns) != Some(text) {
                    todo.push((ns.clone(), text.clone()));
                }
            }
        }
        let failed = if todo.is_empty() {
            Vec::new()
        } else {
            let started = std::time::Instant::now();
            let failed = tokio::task::block_in_place(|| crate::vip::sync_many(&todo));
            tracing::debug!(
                tables = todo.len(),
                of = live.len(),
                ms = started.elapsed().as_millis() as u64,
                "synced VIP tables"
            );
            failed
        };
        let mut out = Repair::default();
        let mut applied = self.vip_applied.lock().unwrap_or_else(|e| e.into_inner());
        for (ns, e) in &failed {
            let who = names.get(ns).cloned().unwrap_or_else(|| ns.clone());
            out.faults.push(Fault::new(
                format!("sandbox {who} service VIPs ({})", crate::vip::TABLE),
                e,
            ));
            rendered.remove(ns);
            applied.remove(ns);
        }
        // Merged, not replaced: a sandbox being started (not listed yet)
        // keeps what its start applied; teardown forgets its entry.
        applied.extend(rendered);
        out
    }

    /// Notes the ruleset a start applied in `ns`, so the next pass does not
    /// apply it again.
    pub(super) fn vip_synced(&self, ns: &str, text: Arc<str>) {
        self.vip_applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns.to_string(), text);
    }

    /// Forgets a namespace that is going.
    pub(super) fn vip_forget(&self, ns: &str) {
        self.vip_applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::{NetworkAssignment, ServiceEntry};
    use std::net::Ipv4Addr;

    fn on(nets: &[&str]) -> Record {
        let networks: Vec<serde_json::Value> = nets
            .iter()
            .map(|n| {
                serde_json::json!({"network": n, "network_id": n, "endpoint_id": "e",
                    "ifname": "eth0", "ip": "10.0.1.2", "prefix": 24, "mac": "",
                    "gateway": "10.0.1.1", "vni": 1, "mtu": 1450, "internal": false})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "id": "x", "name": "x", "netns": "n", "pid": 0, "cmd": [], "env": [],
            "networks": networks, "egress_ip": null, "created_at": ""
        }))
        .expect("record")
    }

    fn svc(name: &str, vip: &str, backends: &[&str]) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            vip: vip.into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_vip_services_of_the_sandbox_networks() {
        let view = NodeView {
            networks: vec![
                NetworkAssignment {
                    id: "a".into(),
                    services: vec![
                        svc("api", "10.0.1.100", &["10.0.1.5", "bad"]),
                        svc("rr", "", &["10.0.1.7"]),
                    ],
                    ..Default::default()
                },
                NetworkAssignment {
                    id: "b".into(),
                    services: vec![svc("other", "10.0.2.100", &[])],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let got = vip_services(&view, &on(&["a"]));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "api");
        assert_eq!(got[0].vip, Ipv4Addr::new(10, 0, 1, 100));
        assert_eq!(got[0].backends, vec![Ipv4Addr::new(10, 0, 1, 5)]);
        assert_eq!(vip_services(&view, &on(&["a", "b"])).len(), 2);
        assert!(vip_services(&view, &on(&[])).is_empty());
        assert!(has_vips(&on(&["a"])));
        assert!(!has_vips(&on(&[])));
    }

    #[test]
    fn the_ingress_network_gives_no_vips() {
        let mut view = NodeView {
            networks: vec![NetworkAssignment {
                id: "ing".into(),
                services: vec![svc("web", "10.255.0.9", &["10.255.0.5"])],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(vip_services(&view, &on(&["ing"])).len(), 1);
        view.ingress = Some(mesh_proto::IngressView {
            network_id: "ing".into(),
            ..Default::default()
        });
        assert!(vip_services(&view, &on(&["ing"])).is_empty());
    }
}
