//! The peer table: one `Tunn` per peer, found by address (sending), by
//! receiver index (data, responses) or by public key (initiations).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::Tunn;
use boringtun::x25519::PublicKey;

use super::engine::Keys;
use super::{PeerConfig, WgError};

/// One peer and its WireGuard state.
pub(super) struct Peer {
    pub cfg: PeerConfig,
    /// Our 24-bit session index prefix for this peer.
    pub index: u32,
    tunn: Mutex<Tunn>,
}

impl Peer {
    /// The peer's protocol state; one lock per batch of packets.
    pub fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh session state under `keys` (no session yet).
    pub fn new_tunn(&self, keys: &Keys) -> Tunn {
        Tunn::new(
            keys.secret.clone(),
            PublicKey::from(self.cfg.public_key),
            None,
            None,
            self.index,
            Some(keys.limiter.clone()),
        )
    }
}

/// The current peers; replaced whole on every change, so the data path
/// reads a consistent snapshot without holding a lock.
#[derive(Default)]
pub(super) struct PeerTable {
    peers: Vec<Arc<Peer>>,
    by_addr: HashMap<Ipv4Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<[u8; 32], Arc<Peer>>,
}

impl PeerTable {
    /// The table for `wanted`, keeping the `Peer` (and its sessions) of
    /// every peer whose configuration did not change.
    pub fn build(
        old: &PeerTable,
        wanted: Vec<PeerConfig>,
        keys: &Keys,
        local: Ipv4Addr,
    ) -> Result<PeerTable, WgError> {
        let mut addrs = HashSet::new();
        let mut pubkeys = HashSet::new();
        for p in &wanted {
            if p.addr.is_unspecified() || p.addr.is_broadcast() || p.addr.is_multicast() {
                return Err(WgError::InvalidPeers(format!(
                    "peer {} has address {}, which is not a node address",
                    p.node_id, p.addr
                )));
            }
            if p.addr == local {
                return Err(WgError::InvalidPeers(format!(
                    "peer {} has this node's own address {local}",
                    p.node_id
                )));
            }
            if !addrs.insert(p.addr) {
                return Err(WgError::InvalidPeers(format!(
                    "two peers share address {}",
                    p.addr
                )));
            }
            if !pubkeys.insert(p.public_key) {
                return Err(WgError::InvalidPeers(format!(
                    "two peers share one public key (node {})",
                    p.node_id
                )));
            }
            if p.public_key == *keys.public.as_bytes() {
                return Err(WgError::InvalidPeers(format!(
                    "peer {} has this node's own public key",
                    p.node_id
                )));
            }
        }
        let mut used: HashSet<u32> = HashSet::new();
        let mut t = PeerTable::default();
        let mut fresh = Vec::new();
        for cfg in wanted {
            match old.peers.iter().find(|p| p.cfg == cfg) {
                Some(p) => {
                    used.insert(p.index);
                    t.insert(p.clone());
                }
                None => fresh.push(cfg),
            }
        }
        // Indices of removed peers are not reused at once, so their stray
        // packets cannot reach a newcomer's Tunn.
        used.extend(old.peers.iter().map(|p| p.index));
        for cfg in fresh {
            let mut index = rand::random::<u32>() & 0x00ff_ffff;
            while used.contains(&index) {
                index = (index + 1) & 0x00ff_ffff;
            }
            used.insert(index);
            let tunn = Tunn::new(
                keys.secret.clone(),
                PublicKey::from(cfg.public_key),
                None,
                None,
                index,
                Some(keys.limiter.clone()),
            );
            t.insert(Arc::new(Peer {
                cfg,
                index,
                tunn: Mutex::new(tunn),
            }));
        }
        Ok(t)
    }

    fn insert(&mut self, p: Arc<Peer>) {
        self.by_addr.insert(p.cfg.addr, p.clone());
        self.by_index.insert(p.index, p.clone());
        self.by_key.insert(p.cfg.public_key, p.clone());
        self.peers.push(p);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.peers.iter()
    }

    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.peers.iter().map(|p| p.cfg.addr)
    }

    pub fn has_addr(&self, a: &Ipv4Addr) -> bool {
        self.by_addr.contains_key(a)
    }

    pub fn by_addr(&self, a: Ipv4Addr) -> Option<&Arc<Peer>> {
        self.by_addr.get(&a)
    }

    pub fn by_index(&self, i: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&i)
    }

    pub fn by_key(&self, k: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(k)
    }
}
