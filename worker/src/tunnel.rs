//! The node's WireGuard device as the view wants it: up while the node has
//! an encrypted network, with the view's peers and the node's current key;
//! down otherwise. One reconcile step of the agent, run before the overlay
//! driver so an encrypted network's VXLAN finds its tunnel namespace.
//!
//! The device itself (TAP, socket, crypto loop) is [`crate::wg`]; the key
//! pair is the node's state ([`crate::encryption`]).

use std::net::Ipv4Addr;

use mesh_proto::{EncryptionPeer, NodeView};
use tracing::info;

use crate::drivers::Repair;
use crate::overlay::tunnel_ns_name;
use crate::sandboxes::{DataPath, WIREGUARD_OVERHEAD};
use crate::wg;

/// Name of the TAP in the tunnel namespace.
pub const TAP: &str = "mwg0";

/// What the device was started with: a change means a new device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    tap_ns: String,
    local_ip: Ipv4Addr,
    listen_port: u16,
    mtu: u32,
}

/// The running device and what it was last given.
#[derive(Default)]
pub struct Tunnel {
    running: Option<Running>,
}

struct Running {
    device: wg::Device,
    settings: Settings,
    key: [u8; 32],
    peers: Vec<wg::PeerConfig>,
}

impl Tunnel {
    /// One pass: starts, reconfigures or stops the device. A peer the view
    /// describes badly is left out and reported; the rest still work.
    pub fn repair(&mut self, dp: &DataPath, view: &NodeView, key: [u8; 32]) -> Repair {
        let mut out = Repair::default();
        let Some(enc) = &view.encryption else {
            if self.running.take().is_some() {
                info!("no encrypted network left on this node; WireGuard device stopped");
                out.repairs += 1;
            }
            return out;
        };
        let scope = || "encryption".to_string();
        let Ok(listen_port) = u16::try_from(enc.listen_port) else {
            out.fail(
                scope,
                format!("bad WireGuard port {} in the view", enc.listen_port),
            );
            return out;
        };
        let settings = Settings {
            tap_ns: tunnel_ns_name(&dp.prefix),
            local_ip: dp.local_ip,
            listen_port,
            mtu: dp.underlay_mtu().saturating_sub(WIREGUARD_OVERHEAD),
        };
        let mut peers = Vec::new();
        for p in &enc.peers {
            match peer_config(p) {
                Ok(c) => peers.push(c),
                Err(e) => out.fail(|| format!("encryption peer {}", p.node_id), e),
            }
        }
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.settings != settings)
        {
            info!("WireGuard settings changed; restarting the device");
            self.running = None;
        }
        if self.running.is_none() {
            let cfg = wg::DeviceConfig {
                tap_ns: settings.tap_ns.clone(),
                tap_name: TAP.into(),
                udp_ns: None,
                local_ip: settings.local_ip,
                listen_port: settings.listen_port,
                mtu: settings.mtu,
                private_key: key,
            };
            match tokio::task::block_in_place(|| wg::Device::start(cfg)) {
                Ok(device) => {
                    info!(port = listen_port, "WireGuard device up");
                    out.repairs += 1;
                    self.running = Some(Running {
                        device,
                        settings,
                        key,
                        peers: Vec::new(),
                    });
                }
                Err(e) => {
                    out.fail(scope, e);
                    return out;
                }
            }
        }
        let Some(r) = self.running.as_mut() else {
            return out;
        };
        if r.key != key {
            info!("node key rotated; WireGuard sessions start over with the new key");
            tokio::task::block_in_place(|| r.device.set_private_key(key));
            r.key = key;
            out.repairs += 1;
        }
        if r.peers != peers {
            match tokio::task::block_in_place(|| r.device.set_peers(peers.clone())) {
                Ok(()) => {
                    info!(peers = peers.len(), "WireGuard peers updated");
                    r.peers = peers;
                    out.repairs += 1;
                }
                Err(e) => out.fail(scope, e),
            }
        }
        if let Err(e) = tokio::task::block_in_place(|| r.device.repair()) {
            // What repair cannot mend (the TAP itself deleted by hand) needs
            // a new device: the next pass starts one.
            info!(error = %e, "WireGuard device broken; restarting it on the next pass");
            self.running = None;
            out.fail(scope, e);
        }
        out
    }

    /// The device's state for `mesh info` and the heartbeat: which I/O path
    /// it runs, its port and every peer's handshake; None while it is down.
    pub fn status(&self) -> Option<(String, u32, Vec<EncryptionPeer>)> {
        let r = self.running.as_ref()?;
        let s = r.device.status();
        let peers = s
            .peers
            .iter()
            .map(|p| EncryptionPeer {
                node_id: p.node_id.clone(),
                public_key: crate::encryption::encode_key(&p.public_key),
                endpoint: p.endpoint.to_string(),
                last_handshake: p.last_handshake.map(crate::rfc3339).unwrap_or_default(),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect();
        Some((s.datapath.to_string(), u32::from(s.listen_port), peers))
    }
}

fn peer_config(p: &mesh_proto::WireguardPeer) -> Result<wg::PeerConfig, String> {
    let public_key = crate::encryption::parse_public_key(&p.public_key)
        .map_err(|e| format!("bad public key in the view: {e}"))?;
    let addr: Ipv4Addr = p
        .addr
        .parse()
        .map_err(|_| format!("bad address {:?} in the view", p.addr))?;
    Ok(wg::PeerConfig {
        node_id: p.node_id.clone(),
        public_key,
        addr,
    })
}
