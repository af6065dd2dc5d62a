//! The device: TAP, socket, peers and the threads moving packets.

use super::{DeviceConfig, DeviceStatus, PeerConfig, WgError};

/// A running userspace WireGuard device. Dropping it stops its threads and
/// closes the TAP (which makes the device vanish).
pub struct Device {
    _cfg: DeviceConfig,
}

impl Device {
    /// Creates the TAP (address, NOARP, up, MTU) and the socket, and starts
    /// the threads.
    pub fn start(cfg: DeviceConfig) -> Result<Device, WgError> {
        let _ = cfg;
        Err(WgError::Stopped("not built yet".into()))
    }

    /// Makes the peer set `peers`; unchanged peers keep their sessions.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<(), WgError> {
        let _ = peers;
        Err(WgError::Stopped("not built yet".into()))
    }

    /// Key rotation: every peer gets a fresh session under the new key.
    pub fn set_private_key(&self, key: [u8; 32]) {
        let _ = key;
    }

    /// The device's state now.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            datapath: super::Datapath::Batch,
            listen_port: self._cfg.listen_port,
            public_key: [0; 32],
            peers: Vec::new(),
        }
    }

    /// Re-adds the TAP's address, routes and up state if deleted by hand.
    pub fn repair(&self) -> Result<(), WgError> {
        Err(WgError::Stopped("not built yet".into()))
    }
}
