//! The routing mesh on this node (issue 12): published ports of services
//! reach their tasks from any node, and host-mode ports reach the local
//! task. Built as Swarm's, except that the client's address is kept for
//! TCP (see `notes/ingress.md`):
//!
//! - `sbox`: the node's ingress sandbox `{prefix}-ingress`, on the ingress
//!   overlay (`eth0`) and linked to the node by a veth of its own (`gw0`);
//!   `ip mesh_ingress_lb` balances each port over the tasks;
//! - the node's `ip mesh_ingress` sends published ports to the sandbox
//!   (ingress mode) or to a local task (host mode);
//! - `task`: in each task on the ingress network, `ip mesh_ingress_task`
//!   and one policy route per node send replies back to the node whose
//!   ingress sandbox sent the connection.
//!
//! [`repair`] is one step of every reconcile pass: it compares the whole
//! view with the kernel and fixes the difference, so a restart, a node
//! joining or a table deleted by hand heals on the next pass; without an
//! ingress network the sandbox goes, and with it every rule it needed.

mod sbox;
mod task;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::Ipv4Net;
use mesh_common::model::{Mac, Protocol, PublishMode};
use mesh_proto::{NodeView, TaskAssignment};
use tracing::info;

use crate::drivers::{EGRESS_SUBNET, Fault, Repair};
use crate::egress::GWBRIDGE;
use crate::firewall::ingress_host::{HostPort, IngressHost, MeshPort};
use crate::firewall::ingress_lb::{IngressLb, LbPort};
use crate::firewall::{self, Drift, FirewallError};
use crate::link::Netlink;
use crate::netns::{self, NetError};
use crate::overlay::Node;
use crate::sandboxes::{DataPath, Record};
use crate::sysctl::{self, SysctlError};

pub use sbox::{
    LINK_PREFIX, NODE_IFNAME, NODE_LINK_IP, SANDBOX_LINK_IP, remove_sandbox, sandbox_ns,
};
pub use task::{mark_for, sync_task};

/// The ingress sandbox's interface on the ingress network.
pub const SANDBOX_INGRESS_IF: &str = "eth0";
/// The ingress sandbox's end of its link to the node.
pub const SANDBOX_LINK_IF: &str = "gw0";

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{0}")]
    View(String),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("table {table} in {ns}: {source}")]
    Firewall {
        table: &'static str,
        ns: String,
        source: FirewallError,
    },
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

/// One node's ingress endpoint, as a task's reply routing needs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IngressNode {
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// The view's `IngressView`, parsed once: what the kernel must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub network_id: String,
    /// This node's ingress endpoint.
    pub ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// 0: the node's overlay default.
    pub mtu: u32,
    /// An encrypted ingress network: its VXLAN goes inside WireGuard.
    pub encrypted: bool,
    pub nodes: Vec<IngressNode>,
    pub ports: BTreeSet<LbPort>,
}

impl Plan {
    /// Reads the view's ingress part; None without an ingress network.
    /// A port that does not parse is left out and reported.
    pub fn of(view: &NodeView) -> Result<Option<(Plan, Vec<Fault>)>, IngressError> {
        let Some(ing) = &view.ingress else {
            return Ok(None);
        };
        let bad = |what: &str| IngressError::View(format!("the view's ingress {what} is invalid"));
        let ep = ing.endpoint.as_ref().ok_or_else(|| bad("endpoint"))?;
        let ip: Ipv4Addr = ep.ip.parse().map_err(|_| bad("endpoint address"))?;
        let prefix = u8::try_from(ep.prefix).map_err(|_| bad("endpoint prefix"))?;
        let subnet = Ipv4Net::new(ip, prefix)
            .map_err(|_| bad("endpoint prefix"))?
            .trunc();
        let gateway = ep.gateway.parse().map_err(|_| bad("gateway"))?;
        let mut faults = Vec::new();
        let nodes = ing
            .nodes
            .iter()
            .filter_map(|n| {
                let ip: Ipv4Addr = n.ip.parse().ok()?;
                Some(IngressNode {
                    ip,
                    mac: Mac::for_ip(ip).to_string(),
                })
            })
            .collect();
        let mut ports = BTreeSet::new();
        for p in &ing.ports {
            let proto = Protocol::from_wire(&p.protocol).ok();
            let port = u16::try_from(p.published_port).ok().filter(|p| *p != 0);
            let target = u16::try_from(p.target_port).ok().filter(|p| *p != 0);
            let (Some(proto), Some(port), Some(target)) = (proto, port, target) else {
                faults.push(Fault::new(
                    format!("ingress port {}/{}", p.published_port, p.protocol),
                    "invalid protocol or port in the view; left out",
                ));
                continue;
            };
            ports.insert(LbPort {
                proto,
                port,
                target,
                service: p.service_name.clone(),
                backends: p.backends.iter().filter_map(|b| b.parse().ok()).collect(),
            });
        }
        Ok(Some((
            Plan {
                network_id: ing.network_id.clone(),
                ip,
                subnet,
                gateway,
                vni: ep.vni,
                mtu: ep.mtu,
                encrypted: ep.encrypted,
                nodes,
                ports,
            },
            faults,
        )))
    }

    pub fn lb_table(&self) -> IngressLb {
        IngressLb {
            from_node: SANDBOX_LINK_IF.into(),
            ingress: SANDBOX_INGRESS_IF.into(),
            ports: self.ports.clone(),
        }
    }
}

/// The published ports of a task in one mode: (proto, published,
/// target). A port whose words do not parse is in neither mode.
fn task_ports(t: &TaskAssignment, mode: PublishMode) -> BTreeSet<(Protocol, u16, u16)> {
    t.ports
        .iter()
        .filter(|p| PublishMode::from_wire(&p.publish_mode) == Ok(mode))
        .filter_map(|p| {
            Some((
                Protocol::from_wire(&p.protocol).ok()?,
                u16::try_from(p.published_port).ok()?,
                u16::try_from(p.target_port).ok()?,
            ))
        })
        .collect()
}

/// The node's `ip mesh_ingress` table for this view and these sandboxes;
/// a host-mode port of a task without egress is a fault, the rest stands.
pub fn host_table(
    plan: Option<&Plan>,
    view: &NodeView,
    live: &[Record],
) -> (IngressHost, Vec<Fault>) {
    let mut faults = Vec::new();
    let mut host_ports = BTreeSet::new();
    for rec in live.iter().filter(|r| r.running()) {
        let Some(t) = view.tasks.iter().find(|t| t.id == rec.id) else {
            continue;
        };
        for (proto, port, target) in task_ports(t, PublishMode::Host) {
            match rec.egress_ip {
                Some(addr) => {
                    host_ports.insert(HostPort {
                        proto,
                        port,
                        task: rec.name.clone(),
                        addr,
                        target,
                    });
                }
                None => faults.push(Fault::new(
                    format!("task {} host port {port}/{proto}", rec.name),
                    "the task has no address on mesh_gwbridge (all its networks are --internal?); its host port is not published",
                )),
            }
        }
    }
    let table = IngressHost {
        sandbox: plan.map(|_| (SANDBOX_LINK_IP, NODE_IFNAME.to_string())),
        mesh_ports: plan
            .map(|p| {
                p.ports
                    .iter()
                    .map(|l| MeshPort {
                        proto: l.proto,
                        port: l.port,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        host_ports,
        gwbridge: (
            GWBRIDGE.into(),
            Ipv4Net::new(EGRESS_SUBNET.0, EGRESS_SUBNET.1).unwrap_or_default(),
        ),
    };
    (table, faults)
}

/// The ingress interface of a task sandbox and the task's ingress target
/// ports, if it is on the ingress network.
pub fn task_side<'a>(
    plan: &Plan,
    view: &NodeView,
    rec: &'a Record,
) -> Option<(&'a crate::sandboxes::Attachment, BTreeSet<(Protocol, u16)>)> {
    let a = rec
        .networks
        .iter()
        .find(|a| a.network_id == plan.network_id)?;
    let targets = view
        .tasks
        .iter()
        .find(|t| t.id == rec.id)
        .map(|t| {
            task_ports(t, PublishMode::Ingress)
                .into_iter()
                .map(|(p, _, t)| (p, t))
                .collect()
        })
        .unwrap_or_default();
    Some((a, targets))
}

/// Whether this process has rebuilt the node's table once.
static REBUILT: AtomicBool = AtomicBool::new(false);

/// One pass of the routing mesh on this node (the node's own namespace).
pub async fn repair(dp: &DataPath, view: &NodeView, live: &[Record]) -> Repair {
    repair_in(dp, &dp.node(), view, live).await
}

/// [`repair`] for a node whose namespace is `node.ns` (a test's fake host).
pub async fn repair_in(dp: &DataPath, node: &Node, view: &NodeView, live: &[Record]) -> Repair {
    let mut out = Repair::default();
    let plan = match Plan::of(view) {
        Ok(Some((plan, faults))) => {
            out.faults.extend(faults);
            Some(plan)
        }
        Ok(None) => None,
        Err(e) => {
            out.fail(|| "ingress".into(), e);
            None
        }
    };
    let mut sandbox_ok = false;
    match &plan {
        Some(plan) => match sbox::ensure(dp, node, plan).await {
            Ok(fixed) => {
                out.repairs += fixed;
                sandbox_ok = true;
            }
            Err(e) => out.fail(|| "ingress".into(), e),
        },
        None => match tokio::task::block_in_place(|| remove_sandbox(node)) {
            Ok(true) => {
                info!("ingress network gone: removed the ingress sandbox");
                out.repairs += 1;
            }
            Ok(false) => {}
            Err(e) => out.fail(|| "ingress".into(), e),
        },
    }
    let (host, faults) = host_table(plan.as_ref().filter(|_| sandbox_ok), view, live);
    out.faults.extend(faults);
    if !host.host_ports.is_empty() {
        // 127.0.0.1:PORT on the node reaches a host-mode task too.
        let r = tokio::task::block_in_place(|| {
            sysctl::ensure(
                node.ns.as_deref(),
                &[(format!("ipv4/conf/{GWBRIDGE}/route_localnet"), "1")],
            )
        });
        match r {
            Ok(n) => out.repairs += n,
            Err(e) => out.fail(|| "ingress host-mode ports".into(), e),
        }
    }
    // The first pass of a daemon rebuilds the table whatever it holds:
    // nothing a crashed run left (a counter, an element drift detection
    // does not read) survives a restart.
    let first = !REBUILT.swap(true, Ordering::SeqCst);
    let r = tokio::task::block_in_place(|| {
        let done = if first {
            firewall::sync(node.ns.as_deref(), &host).map(|()| Drift::Differs)
        } else {
            firewall::repair(node.ns.as_deref(), &host)
        };
        done.map_err(|source| IngressError::Firewall {
            table: firewall::ingress_host::TABLE,
            ns: netns::label(node.ns.as_deref()),
            source,
        })
    });
    match r {
        Ok(Drift::InSync) => {}
        Ok(_) => out.repairs += 1,
        Err(e) => out.fail(|| "ingress".into(), e),
    }
    if let Some(plan) = &plan {
        for rec in live.iter().filter(|r| r.running()) {
            let Some((a, targets)) = task_side(plan, view, rec) else {
                continue;
            };
            let r =
                tokio::task::block_in_place(|| sync_task(&rec.netns, &a.ifname, plan, &targets));
            match r {
                Ok(n) => out.repairs += n,
                Err(e) => out.fail(|| format!("task {} ingress", rec.name), e),
            }
        }
    }
    out
}

/// Removes everything of the routing mesh from a node: its ingress sandbox
/// and its `mesh_ingress` table (a node leaving the cluster). Task sides go
/// with their sandboxes.
pub fn remove(node: &Node) -> Result<(), IngressError> {
    remove_sandbox(node)?;
    firewall::remove(node.ns.as_deref(), firewall::ingress_host::ID).map_err(|source| {
        IngressError::Firewall {
            table: firewall::ingress_host::TABLE,
            ns: netns::label(node.ns.as_deref()),
            source,
        }
    })
}

/// Every node's mark, by MAC, for a task's table.
pub(crate) fn marks(plan: &Plan) -> BTreeMap<String, u32> {
    plan.nodes
        .iter()
        .filter_map(|n| Some((n.mac.clone(), mark_for(n.ip, &plan.subnet)?)))
        .collect()
}

/// A default route as the kernel holds it: its gateway and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DefaultRoute {
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// The IPv4 default route of every routing table of `nl`'s namespace, by
/// table ID, so a pass replaces only the routes that differ.
pub(crate) async fn default_routes(nl: &Netlink) -> Result<BTreeMap<u32, DefaultRoute>, NetError> {
    Ok(nl
        .routes_v4()
        .await?
        .into_iter()
        .filter(|r| r.destination.prefix_len() == 0)
        .map(|r| {
            let d = DefaultRoute {
                gateway: r.gateway,
                oif: r.oif,
            };
            (r.table, d)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::{EndpointInfo, IngressPort, IngressView, PortConfig};

    fn view() -> NodeView {
        NodeView {
            ingress: Some(IngressView {
                network_id: "ing".into(),
                endpoint: Some(EndpointInfo {
                    ip: "10.255.0.2".into(),
                    prefix: 16,
                    gateway: "10.255.0.1".into(),
                    vni: 4096,
                    ..Default::default()
                }),
                nodes: vec![mesh_proto::IngressNode {
                    node_id: "n1".into(),
                    ip: "10.255.0.2".into(),
                    mac: String::new(),
                }],
                ports: vec![
                    IngressPort {
                        service_name: "web".into(),
                        protocol: "tcp".into(),
                        published_port: 8080,
                        target_port: 80,
                        backends: vec!["10.255.0.6".into(), "10.255.0.5".into()],
                        ..Default::default()
                    },
                    IngressPort {
                        protocol: "sctp".into(),
                        published_port: 9,
                        target_port: 9,
                        ..Default::default()
                    },
                ],
            }),
            tasks: vec![TaskAssignment {
                id: "t1".into(),
                ports: vec![
                    PortConfig {
                        protocol: "udp".into(),
                        target_port: 53,
                        published_port: 5353,
                        publish_mode: "host".into(),
                    },
                    PortConfig {
                        protocol: "tcp".into(),
                        target_port: 80,
                        published_port: 8080,
                        publish_mode: "ingress".into(),
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn task(egress: Option<Ipv4Addr>) -> Record {
        let mut r: Record = serde_json::from_value(serde_json::json!({
            "id": "t1", "name": "web.1.t1", "netns": "n", "pid": 0, "cmd": [], "env": [],
            "networks": [{"network": "ingress", "network_id": "ing", "endpoint_id": "e",
                "ifname": "eth1", "ip": "10.255.0.5", "prefix": 16, "mac": "",
                "gateway": "10.255.0.1", "vni": 4096, "mtu": 1450, "internal": false}],
            "egress_ip": null, "created_at": ""
        }))
        .expect("record");
        r.egress_ip = egress;
        r
    }

    #[test]
    fn the_plan_reads_the_view_and_reports_a_bad_port() {
        let (plan, faults) = Plan::of(&view()).expect("valid").expect("ingress");
        assert_eq!(
            plan.subnet,
            "10.255.0.0/16".parse::<Ipv4Net>().expect("net")
        );
        assert_eq!(plan.nodes[0].mac, "02:42:0a:ff:00:02");
        assert_eq!(plan.ports.len(), 1);
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].scope, "ingress port 9/sctp");
        assert!(
            Plan::of(&NodeView::default())
                .expect("no ingress")
                .is_none()
        );
    }

    #[test]
    fn marks_are_offsets_in_the_subnet_clear_of_reserved_tables() {
        let net: Ipv4Net = "10.255.0.0/16".parse().expect("net");
        assert_eq!(mark_for(Ipv4Addr::new(10, 255, 0, 2), &net), Some(0x102));
        assert_eq!(mark_for(Ipv4Addr::new(10, 255, 1, 0), &net), Some(0x200));
        assert_eq!(mark_for(Ipv4Addr::new(10, 0, 0, 2), &net), None);
    }

    #[test]
    fn host_ports_need_the_task_egress_address() {
        let v = view();
        let (plan, _) = Plan::of(&v).expect("valid").expect("ingress");
        let (t, faults) = host_table(Some(&plan), &v, &[task(Some(Ipv4Addr::new(172, 18, 0, 7)))]);
        assert!(faults.is_empty(), "{faults:?}");
        let hp: Vec<_> = t.host_ports.iter().collect();
        assert_eq!(
            (hp[0].port, hp[0].target, hp[0].proto),
            (5353, 53, Protocol::Udp)
        );
        assert_eq!(t.mesh_ports.len(), 1);
        let (t, faults) = host_table(Some(&plan), &v, &[task(None)]);
        assert!(t.host_ports.is_empty());
        assert_eq!(faults[0].scope, "task web.1.t1 host port 5353/udp");
    }

    #[test]
    fn a_task_accepts_its_ingress_targets_only() {
        let v = view();
        let (plan, _) = Plan::of(&v).expect("valid").expect("ingress");
        let rec = task(None);
        let (a, targets) = task_side(&plan, &v, &rec).expect("on ingress");
        assert_eq!(a.ifname, "eth1");
        assert_eq!(targets, [(Protocol::Tcp, 80)].into());
    }
}
