//! Published ports in the state machine: what a spec may ask for, the
//! allocation of published ports (decided in `apply`, so every manager
//! picks the same), and which nodes a host-mode port leaves free.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::model::{Protocol, PublishMode, TaskState};
use mesh_common::ports::DYNAMIC_PORTS;
use mesh_common::refusal::Refusal;

use super::{PortSpec, Service};
use crate::state::{ClusterState, Network};

/// What `apply` tells a service asking for an ingress port without an
/// ingress network.
pub const NO_INGRESS: &str =
    "no ingress network: create one with mesh network create --driver overlay --ingress NAME";

/// Checks a spec's ports alone; the parser already refused most of this,
/// but a request may come from anywhere.
pub(super) fn validate_ports(ports: &[PortSpec]) -> Result<(), Refusal> {
    let mut seen = BTreeSet::new();
    for p in ports {
        if p.target == 0 {
            return Err(Refusal::invalid("target port 0 is out of range 1-65535"));
        }
        if p.published == Some(0) {
            return Err(Refusal::invalid(
                "published port 0 is out of range 1-65535; leave it out to have one allocated",
            ));
        }
        if p.mode == PublishMode::Host && p.published.is_none() {
            return Err(Refusal::invalid(
                "mode=host needs published=PORT: choosing a host port per node is not supported",
            ));
        }
        if let Some(published) = p.published
            && !seen.insert((p.protocol, published))
        {
            return Err(Refusal::invalid(format!(
                "port {} is published twice",
                p.label()
            )));
        }
    }
    let mut exact: Vec<&PortSpec> = ports.iter().collect();
    exact.sort();
    if exact.windows(2).any(|w| w[0] == w[1]) {
        return Err(Refusal::invalid("a port is published twice"));
    }
    Ok(())
}

/// Host-mode (protocol, port) pairs of a service's allocated ports.
pub(crate) fn host_ports(svc: &Service) -> BTreeSet<(Protocol, u16)> {
    svc.endpoint_ports
        .iter()
        .filter(|p| p.mode == PublishMode::Host)
        .filter_map(|p| p.published.map(|n| (p.protocol, n)))
        .collect()
}

impl ClusterState {
    /// The cluster's ingress network, if it has one.
    pub fn ingress_network(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.spec.ingress)
    }

    /// Gives every port of `svc.spec` its published port and checks it
    /// against every other service's: an ingress port is the cluster's,
    /// so it clashes with any other use of that protocol and port; two
    /// host-mode ports may share one (the scheduler keeps them on
    /// different nodes). A port left to allocate keeps the one it had
    /// (`svc.endpoint_ports` before the change), else the lowest free in
    /// `DYNAMIC_PORTS`.
    pub(crate) fn allocate_ports(&self, svc: &mut Service) -> Result<(), Refusal> {
        let wants_ingress = svc
            .spec
            .ports
            .iter()
            .any(|p| p.mode == PublishMode::Ingress);
        if wants_ingress && self.ingress_network().is_none() {
            return Err(Refusal::precondition(NO_INGRESS));
        }
        let mut taken: BTreeMap<(Protocol, u16), (&str, PublishMode)> = BTreeMap::new();
        for other in self.services.values().filter(|o| o.id != svc.id) {
            for p in &other.endpoint_ports {
                if let Some(n) = p.published {
                    let e = taken
                        .entry((p.protocol, n))
                        .or_insert((other.spec.name.as_str(), p.mode));
                    if p.mode == PublishMode::Ingress {
                        *e = (other.spec.name.as_str(), p.mode);
                    }
                }
            }
        }
        let clash = |p: &PortSpec, n: u16| -> Result<(), Refusal> {
            match taken.get(&(p.protocol, n)) {
                Some((_, PublishMode::Host)) if p.mode == PublishMode::Host => Ok(()),
                Some((name, _)) => Err(Refusal::precondition(format!(
                    "port {n}/{} is already in use by service {name}",
                    p.protocol
                ))),
                None => Ok(()),
            }
        };
        let mut mine: BTreeSet<(Protocol, u16)> = BTreeSet::new();
        for p in &svc.spec.ports {
            if let Some(n) = p.published {
                clash(p, n)?;
                mine.insert((p.protocol, n));
            }
        }
        let old = std::mem::take(&mut svc.endpoint_ports);
        let mut out = Vec::with_capacity(svc.spec.ports.len());
        for p in &svc.spec.ports {
            let published = match p.published {
                Some(n) => n,
                None => {
                    let free = |n: u16| {
                        !taken.contains_key(&(p.protocol, n)) && !mine.contains(&(p.protocol, n))
                    };
                    let kept = old
                        .iter()
                        .filter(|o| {
                            o.protocol == p.protocol && o.target == p.target && o.mode == p.mode
                        })
                        .filter_map(|o| o.published)
                        .find(|n| DYNAMIC_PORTS.contains(n) && free(*n));
                    let Some(n) = kept.or_else(|| DYNAMIC_PORTS.clone().find(|n| free(*n))) else {
                        return Err(Refusal::precondition(format!(
                            "no free port left in {}-{} for {}",
                            DYNAMIC_PORTS.start(),
                            DYNAMIC_PORTS.end(),
                            p.protocol
                        )));
                    };
                    mine.insert((p.protocol, n));
                    n
                }
            };
            out.push(PortSpec {
                published: Some(published),
                ..*p
            });
        }
        svc.endpoint_ports = out;
        Ok(())
    }

    /// The first host-mode port of `svc` that a placed task on `node` (of
    /// any service, `except` aside) holds until its node reports it ended:
    /// a task told to stop still has the port bound. Pending tasks hold
    /// nothing, so two waiting global tasks never block each other.
    pub(crate) fn host_port_clash(
        &self,
        svc: &Service,
        node: &str,
        except: &str,
    ) -> Option<(Protocol, u16)> {
        let mine = host_ports(svc);
        if mine.is_empty() {
            return None;
        }
        self.tasks
            .values()
            .filter(|t| {
                t.node_id == node
                    && t.id != except
                    && t.state != TaskState::Pending
                    && !t.state.is_terminal()
            })
            .filter_map(|t| self.services.get(&t.service_id))
            .find_map(|other| host_ports(other).intersection(&mine).next().copied())
    }
}
