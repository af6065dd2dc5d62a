//! Where a sandbox's attachments come from (an endpoint from the managers
//! on a cluster network, the next free address on a local one), and
//! `network connect`/`disconnect` on a running sandbox.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use mesh_common::model::{DriverKind, Mac};
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{AttachRequest, DetachRequest, EndpointInfo};
use tracing::{info, warn};

use super::{Attachment, DataPath, Record, Sandboxes, SandboxesError};
use crate::drivers::{self, Egress};
use crate::local_networks::LocalNetwork;
use crate::managers::Managers;
use crate::sandbox;

/// The drivers a sandbox's attachments use, each once.
pub(super) fn kinds_of(rec: &Record) -> BTreeSet<DriverKind> {
    rec.networks.iter().map(|a| a.driver).collect()
}

/// An attachment for an endpoint the managers allocated.
pub(super) fn attachment(
    info: &EndpointInfo,
    ifname: String,
    dp: &DataPath,
) -> Result<Attachment, SandboxesError> {
    let bad = |what: &str| {
        SandboxesError::Manager(format!(
            "the managers sent a bad {what} for network {}",
            info.network_name
        ))
    };
    Ok(Attachment {
        network: info.network_name.clone(),
        network_id: info.network_id.clone(),
        endpoint_id: info.id.clone(),
        ifname,
        ip: info.ip.parse().map_err(|_| bad("address"))?,
        prefix: u8::try_from(info.prefix).map_err(|_| bad("prefix"))?,
        mac: info.mac.clone(),
        gateway: info.gateway.parse().map_err(|_| bad("gateway"))?,
        vni: info.vni,
        mtu: if info.mtu == 0 {
            dp.default_overlay_mtu(info.encrypted)
        } else {
            info.mtu
        },
        internal: info.internal,
        encrypted: info.encrypted,
        driver: DriverKind::Overlay,
        parent: None,
        default_route: false,
    })
}

/// Asks the managers for an endpoint of `rec` on cluster network `network`
/// and makes it the sandbox's next interface.
pub(super) async fn cluster_attachment(
    managers: Option<&Managers>,
    rec: &Record,
    network: &str,
    aliases: &[String],
    dp: &DataPath,
) -> Result<Attachment, SandboxesError> {
    let Some(m) = managers else {
        return Err(SandboxesError::Refused(format!(
            "network {network} not found: it is not a local network and this node is not part of a cluster"
        )));
    };
    let req = AttachRequest {
        network: network.to_string(),
        sandbox: rec.name.clone(),
        sandbox_id: rec.id.clone(),
        aliases: aliases.to_vec(),
        endpoint_id: mesh_common::id::new_id(),
    };
    let info = m
        .call(|ch| {
            let req = req.clone();
            async move {
                ClusterClient::new(ch)
                    .attach(req)
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
        .map_err(|s| SandboxesError::Manager(s.message().to_string()))?;
    match attachment(&info, rec.free_ifname(), dp) {
        Ok(a) => Ok(a),
        Err(e) => {
            let _ = detach_endpoint(m, &info.id).await;
            Err(e)
        }
    }
}

/// Gives an endpoint back to the managers.
pub(super) async fn detach_endpoint(m: &Managers, endpoint_id: &str) -> Result<(), tonic::Status> {
    let req = DetachRequest {
        endpoint_id: endpoint_id.to_string(),
    };
    m.call(|ch| {
        let req = req.clone();
        async move { ClusterClient::new(ch).detach(req).await.map(|_| ()) }
    })
    .await
}

impl Sandboxes {
    /// A bridge or macvlan attachment with the next free local address.
    pub(super) fn local_attachment(
        &self,
        l: &LocalNetwork,
        rec: &Record,
        dp: &DataPath,
    ) -> Result<Attachment, SandboxesError> {
        let bad =
            || SandboxesError::Refused(format!("local network {} is damaged; recreate it", l.name));
        let subnet: ipnet::Ipv4Net = l.subnet.parse().map_err(|_| bad())?;
        let gateway: Ipv4Addr = l.gateway.parse().map_err(|_| bad())?;
        let driver = l.kind().map_err(|_| bad())?;
        let used: BTreeSet<Ipv4Addr> = self
            .list()
            .iter()
            .chain(std::iter::once(rec))
            .flat_map(|r| r.networks.iter())
            .filter(|a| a.network_id == l.id)
            .map(|a| a.ip)
            .collect();
        let range = l
            .ip_range
            .as_deref()
            .and_then(|r| mesh_common::ipam::parse_ip_range(r, &subnet).ok());
        let ip = mesh_common::ipam::next_host(&subnet, range.as_ref(), gateway, &used)
            .map_err(|e| SandboxesError::Refused(e.to_string()))?;
        Ok(Attachment {
            network: l.name.clone(),
            network_id: l.id.clone(),
            endpoint_id: mesh_common::id::new_id(),
            ifname: rec.free_ifname(),
            ip,
            prefix: subnet.prefix_len(),
            mac: Mac::for_ip(ip).to_string(),
            gateway,
            vni: 0,
            mtu: l
                .options
                .get("mtu")
                .and_then(|m| m.parse().ok())
                .unwrap_or(dp.underlay_mtu()),
            internal: l.internal,
            driver,
            parent: l.options.get("parent").cloned(),
            default_route: false,
            encrypted: false,
        })
    }

    /// `mesh network connect`: a new interface in a running sandbox.
    pub async fn connect(
        &self,
        r: &str,
        network: &str,
        aliases: Vec<String>,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Result<Record, SandboxesError> {
        let mut rec = self.find(r)?;
        if !rec.running() {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is not running",
                rec.name
            )));
        }
        if rec.attachment(network).is_some() {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is already connected to network {network}",
                rec.name
            )));
        }
        let local = self.local.find(network);
        let a = match &local {
            Some(l) => {
                let stackless = l.kind().is_ok_and(|k| !drivers::driver(k).has_interface());
                if stackless || rec.host_network {
                    return Err(SandboxesError::Refused(format!(
                        "cannot connect {} to {}: host and none networks take a sandbox's whole network stack",
                        rec.name, l.name
                    )));
                }
                self.local_attachment(l, &rec, dp)?
            }
            None => {
                let Some(m) = managers else {
                    return Err(SandboxesError::Refused(format!(
                        "network {network} not found: this node is not part of a cluster"
                    )));
                };
                cluster_attachment(Some(m), &rec, network, &aliases, dp).await?
            }
        };
        let wired = {
            let _kernel = dp.kernel.lock().await;
            let cx = self.ctx(dp);
            let d = drivers::driver(a.driver);
            match drivers::wire(&cx, &rec, &a).await {
                Ok(()) => d.settle(&cx).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = wired {
            // Give the address back: nothing half-made.
            if let Some(m) = managers.filter(|_| a.driver.is_cluster()) {
                let _ = detach_endpoint(m, &a.endpoint_id).await;
            }
            return Err(e.into());
        }
        rec.networks.push(a);
        self.commit(&rec)?;
        Ok(rec)
    }

    /// `mesh network disconnect`: the interface goes, then the endpoint.
    pub async fn disconnect(
        &self,
        r: &str,
        network: &str,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Result<Record, SandboxesError> {
        let mut rec = self.find(r)?;
        let Some(pos) = rec.attachment(network) else {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is not connected to network {network}",
                rec.name
            )));
        };
        let a = rec.networks.remove(pos);
        {
            let _kernel = dp.kernel.lock().await;
            drivers::driver(a.driver)
                .detach(&self.ctx(dp), &rec, &a)
                .await?;
        }
        if let Some(m) = managers.filter(|_| a.driver.is_cluster()) {
            detach_endpoint(m, &a.endpoint_id)
                .await
                .map_err(|s| SandboxesError::Manager(s.message().to_string()))?;
        }
        self.commit(&rec)?;
        Ok(rec)
    }

    /// Removes sandbox namespaces (and their egress links) of ours that no
    /// record names: what a crash between two steps of `run` or `rm` can
    /// leave. Returns what it removed.
    pub async fn remove_orphans(&self, dp: &DataPath) -> Vec<String> {
        let known: BTreeSet<String> = self.list().into_iter().map(|r| r.netns).collect();
        let sb_prefix = format!("{}-sb-", dp.prefix);
        let Ok(names) = crate::netns::list_with_prefix(&sb_prefix) else {
            return Vec::new();
        };
        let _kernel = dp.kernel.lock().await;
        let mut removed = Vec::new();
        for ns in names.into_iter().filter(|n| !known.contains(n)) {
            let _ = Egress.detach(&ns);
            match sandbox::delete_netns(&ns).await {
                Ok(()) => removed.push(ns),
                Err(e) => warn!("cannot remove orphaned namespace {ns}: {e}"),
            }
        }
        for ns in &removed {
            info!("removed orphaned sandbox namespace {ns}");
        }
        removed
    }
}
