//! The overlay driver: one VXLAN network per cluster network this node
//! needs, with the static peer table from the managers' view (the kernel
//! code is [`crate::overlay`]).

use std::net::Ipv4Addr;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use mesh_common::model::{DriverKind, Mac};
use tracing::info;

use super::{Ctx, Desired, DriverError, NetworkDriver, Repair};
use crate::overlay::{self, OverlaySpec, Peer};
use crate::sandboxes::{Attachment, DataPath, Record};

pub struct Overlay;

/// One overlay network as this node must have it; an MTU of 0 means the
/// node's default (the underlay's minus VXLAN's headers, and WireGuard's
/// when encrypted).
pub fn overlay_spec(
    dp: &DataPath,
    vni: u32,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    mtu: u32,
    encrypted: bool,
) -> OverlaySpec {
    OverlaySpec {
        vni,
        subnet,
        gateway,
        mtu: if mtu == 0 {
            dp.default_overlay_mtu(encrypted)
        } else {
            mtu
        },
        local_ip: dp.local_ip,
        port: dp.port,
        encrypted,
    }
}

fn spec_of(dp: &DataPath, a: &Attachment) -> OverlaySpec {
    overlay_spec(dp, a.vni, a.subnet(), a.gateway, a.mtu, a.encrypted)
}

/// The peer table of a network from the view; entries with an address that
/// does not parse are left out.
fn peers_of(net: &mesh_proto::NetworkAssignment) -> Vec<Peer> {
    net.peers
        .iter()
        .filter_map(|p| {
            let ip: Ipv4Addr = p.ip.parse().ok()?;
            Some(Peer {
                ip,
                mac: Mac::for_ip(ip).octets(),
                node_ip: p.node_addr.parse().ok()?,
            })
        })
        .collect()
}

#[async_trait]
impl NetworkDriver for Overlay {
    fn kind(&self) -> DriverKind {
        DriverKind::Overlay
    }

    async fn ensure(&self, cx: &Ctx<'_>, a: &Attachment) -> Result<(), DriverError> {
        overlay::ensure_network(&cx.dp.node(), &spec_of(cx.dp, a)).await?;
        Ok(())
    }

    async fn attach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        overlay::attach(&cx.dp.node(), &spec_of(cx.dp, a), &a.link(rec)).await?;
        Ok(())
    }

    async fn detach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        overlay::detach(&cx.dp.node(), a.vni, &a.link(rec)).await?;
        Ok(())
    }

    /// Every network of the view: the network, its peers, and this node's
    /// sandboxes on it; then the networks this node no longer needs go.
    async fn repair(&self, cx: &Ctx<'_>, want: &Desired<'_>) -> Repair {
        let node = cx.dp.node();
        let mut out = Repair::default();
        for net in &want.view.networks {
            let scope = || format!("network {}", net.name);
            let (Ok(subnet), Ok(gateway)) = (
                net.subnet.parse::<Ipv4Net>(),
                net.gateway.parse::<Ipv4Addr>(),
            ) else {
                out.fail(scope, "bad subnet or gateway in the view");
                continue;
            };
            let spec = overlay_spec(cx.dp, net.vni, subnet, gateway, net.mtu, net.encrypted);
            if let Err(e) = overlay::ensure_network(&node, &spec).await {
                // Nothing else of this network can work; the others can.
                out.fail(scope, e);
                continue;
            }
            match overlay::sync_peers(&node, net.vni, &peers_of(net)).await {
                Ok(report) => out.repairs += report.changed(),
                Err(e) => out.fail(scope, e),
            }
            for (rec, a) in want
                .attachments(DriverKind::Overlay)
                .filter(|(_, a)| a.network_id == net.id)
            {
                let r = overlay::attach(&node, &spec_of(cx.dp, a), &a.link(rec)).await;
                out.note(
                    || format!("sandbox {} on network {}", rec.name, net.name),
                    r,
                );
            }
        }
        match overlay::networks_in_kernel(&node) {
            Ok(vnis) => {
                for vni in vnis {
                    if want.view.networks.iter().any(|n| n.vni == vni) {
                        continue;
                    }
                    info!(vni, "removing a network this node no longer needs");
                    match overlay::remove_network(&node, vni).await {
                        Ok(()) => out.repairs += 1,
                        Err(e) => out.fail(|| format!("overlay network VNI {vni}"), e),
                    }
                }
            }
            Err(e) => out.fail(|| "overlay networks".into(), e),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp() -> DataPath {
        DataPath {
            prefix: "t".into(),
            local_ip: Ipv4Addr::new(192, 0, 2, 1),
            port: 4789,
            overlay_mtu: 1450,
            kernel: Default::default(),
        }
    }

    #[test]
    fn spec_takes_the_node_default_mtu() {
        let subnet: Ipv4Net = "10.0.1.0/24".parse().expect("subnet");
        let gw = Ipv4Addr::new(10, 0, 1, 1);
        assert_eq!(overlay_spec(&dp(), 4097, subnet, gw, 0, false).mtu, 1450);
        let s = overlay_spec(&dp(), 4097, subnet, gw, 1400, false);
        assert_eq!((s.mtu, s.port, s.local_ip), (1400, 4789, dp().local_ip));
        // Encrypted: WireGuard's 60 bytes come off too, unless --opt mtu.
        let e = overlay_spec(&dp(), 4097, subnet, gw, 0, true);
        assert_eq!((e.mtu, e.encrypted), (1390, true));
        assert_eq!(overlay_spec(&dp(), 4097, subnet, gw, 1300, true).mtu, 1300);
    }

    #[test]
    fn peers_skip_bad_addresses_and_derive_macs() {
        let net = mesh_proto::NetworkAssignment {
            peers: vec![
                mesh_proto::PeerEntry {
                    ip: "10.0.1.3".into(),
                    node_addr: "192.0.2.2".into(),
                    ..Default::default()
                },
                mesh_proto::PeerEntry {
                    ip: "bad".into(),
                    node_addr: "192.0.2.2".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let peers = peers_of(&net);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].mac, [0x02, 0x42, 10, 0, 1, 3]);
    }
}
