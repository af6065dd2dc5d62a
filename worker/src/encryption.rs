//! The node's WireGuard static key pair (encrypted overlays).
//!
//! Each node makes its own X25519 key pair; the private key never leaves
//! the node: it lives in `wireguard.json` in the state dir (0600, written
//! atomically through [`crate::private_fs`]), so a restarted daemon keeps
//! its key and its peers need no new record. The public key travels in
//! heartbeats and is recorded by the leader. One [`Encryption`] is shared
//! by the session (heartbeats, rotation), the agent (the WireGuard device,
//! which follows [`Encryption::subscribe`] and reports its peers with
//! [`Encryption::set_status`]) and the daemon (`mesh info`).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::private_fs::{self, FILE_MODE};

/// The key file's name inside the state dir.
pub const KEY_FILE: &str = "wireguard.json";

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({why}); move it away and restart the daemon for a new key")]
    Corrupt { path: PathBuf, why: String },
    #[error("invalid WireGuard key {0:?}: it must be standard base64 of exactly 32 bytes")]
    BadKey(String),
    #[error("cannot draw a new key from the system's random source: {0}")]
    Random(String),
}

/// What the key file holds; the private key in base64 as `wg` writes it.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    private_key: String,
    /// Seconds since the Unix epoch: an interval rotation counts from here.
    created_at: u64,
    /// The last `rotate_key` generation the managers asked for that this
    /// node has acted on (so a restart does not rotate again).
    rotations_done: u64,
}

struct Keys {
    secret: StaticSecret,
    public: [u8; 32],
    created_at: SystemTime,
    rotations_done: u64,
}

/// What the WireGuard device last reported (the agent sets it).
#[derive(Default)]
struct Status {
    datapath: String,
    listen_port: u32,
    peers: Vec<mesh_proto::EncryptionPeer>,
}

pub struct Encryption {
    path: PathBuf,
    keys: Mutex<Keys>,
    status: Mutex<Status>,
    /// Bumped on every rotation: the device re-keys when it changes.
    rotated: watch::Sender<u64>,
}

impl Encryption {
    /// Loads the node's key from `state_dir`, or makes one (and writes it)
    /// if there is none yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Arc<Self>, EncryptionError> {
        let path = state_dir.join(KEY_FILE);
        let keys = match fs::read(&path) {
            Ok(data) => parse_file(&path, &data)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Keys::fresh(0)?;
                save(&path, &keys)?;
                tracing::info!(public_key = %STANDARD.encode(keys.public), "made the node's WireGuard key");
                keys
            }
            Err(source) => {
                return Err(EncryptionError::Io {
                    what: "read",
                    path,
                    source,
                });
            }
        };
        // A file an older daemon or a person left wider is tightened.
        if let Err(e) = private_fs::tighten(&path, FILE_MODE) {
            tracing::warn!("cannot tighten {}: {e}", path.display());
        }
        Ok(Arc::new(Self {
            path,
            keys: Mutex::new(keys),
            status: Mutex::default(),
            rotated: watch::channel(0).0,
        }))
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn private_key(&self) -> [u8; 32] {
        self.keys().secret.to_bytes()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.keys().public
    }

    /// Standard base64, as `wg` prints keys.
    pub fn public_key_b64(&self) -> String {
        encode_key(&self.public_key())
    }

    pub fn created_at(&self) -> SystemTime {
        self.keys().created_at
    }

    pub fn rotations_done(&self) -> u64 {
        self.keys().rotations_done
    }

    /// Replaces the key pair and records `rotations_done`; the new key is on
    /// disk (atomically, 0600) before anyone is told, so a crash right after
    /// never leaves the node announcing a key it lost.
    pub fn rotate(&self, rotations_done: u64) -> Result<(), EncryptionError> {
        let fresh = Keys::fresh(rotations_done)?;
        let public = STANDARD.encode(fresh.public);
        {
            let mut keys = self.keys();
            save(&self.path, &fresh)?;
            *keys = fresh;
        }
        tracing::info!(public_key = %public, rotations_done, "rotated the node's WireGuard key");
        self.rotated.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes whenever the key is rotated.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.rotated.subscribe()
    }

    /// The device's state as the agent last saw it: which I/O path it
    /// runs, its port, and its peers.
    pub fn set_status(
        &self,
        datapath: String,
        listen_port: u32,
        peers: Vec<mesh_proto::EncryptionPeer>,
    ) {
        *self.status() = Status {
            datapath,
            listen_port,
            peers,
        };
    }

    /// For `mesh info`.
    pub fn info(&self) -> mesh_proto::EncryptionInfo {
        let (public, created_at) = {
            let k = self.keys();
            (encode_key(&k.public), k.created_at)
        };
        let st = self.status();
        mesh_proto::EncryptionInfo {
            public_key: public,
            datapath: st.datapath.clone(),
            listen_port: st.listen_port,
            peers: st.peers.clone(),
            key_created_at: crate::rfc3339(created_at),
        }
    }

    /// For the heartbeat (`node inspect` on a manager).
    pub fn peers(&self) -> Vec<mesh_proto::EncryptionPeer> {
        self.status().peers.clone()
    }

    /// Whether the key is older than `interval` (an interval of zero: never).
    pub fn older_than(&self, interval: Duration, now: SystemTime) -> bool {
        !interval.is_zero()
            && now
                .duration_since(self.created_at())
                .is_ok_and(|age| age >= interval)
    }
}

impl Keys {
    fn fresh(rotations_done: u64) -> Result<Self, EncryptionError> {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| EncryptionError::Random(e.to_string()))?;
        let secret = StaticSecret::from(bytes);
        Ok(Keys {
            public: PublicKey::from(&secret).to_bytes(),
            secret,
            // Whole seconds, as the file keeps it.
            created_at: UNIX_EPOCH + Duration::from_secs(unix_secs(SystemTime::now())),
            rotations_done,
        })
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn parse_file(path: &Path, data: &[u8]) -> Result<Keys, EncryptionError> {
    let corrupt = |why: String| EncryptionError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let f: KeyFile = serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
    let bytes = parse_public_key(&f.private_key).map_err(|_| corrupt("bad private key".into()))?;
    let secret = StaticSecret::from(bytes);
    Ok(Keys {
        public: PublicKey::from(&secret).to_bytes(),
        secret,
        created_at: UNIX_EPOCH + Duration::from_secs(f.created_at),
        rotations_done: f.rotations_done,
    })
}

fn save(path: &Path, keys: &Keys) -> Result<(), EncryptionError> {
    let file = KeyFile {
        private_key: STANDARD.encode(keys.secret.as_bytes()),
        created_at: unix_secs(keys.created_at),
        rotations_done: keys.rotations_done,
    };
    let data = serde_json::to_vec_pretty(&file).map_err(|e| EncryptionError::Corrupt {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    private_fs::write_atomic(path, &data, FILE_MODE).map_err(|source| EncryptionError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// A key as `wg` prints it: standard base64 of exactly 32 bytes.
/// A key as `wg` prints it (standard base64).
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

pub fn parse_public_key(b64: &str) -> Result<[u8; 32], EncryptionError> {
    STANDARD
        .decode(b64)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| EncryptionError::BadKey(b64.chars().take(60).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-enc-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        private_fs::create_dir(&dir).expect("dir");
        dir
    }

    #[test]
    fn key_is_made_once_kept_private_and_survives_a_restart() {
        let dir = tmp("keep");
        let e = Encryption::load_or_create(&dir).expect("create");
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            parse_public_key(&e.public_key_b64()).expect("b64"),
            e.public_key()
        );
        assert_eq!(e.public_key_b64().len(), 44, "as wg prints keys");
        let expected = PublicKey::from(&StaticSecret::from(e.private_key())).to_bytes();
        assert_eq!(e.public_key(), expected, "the pair matches");
        let again = Encryption::load_or_create(&dir).expect("load");
        assert_eq!(again.public_key(), e.public_key());
        assert_eq!(again.private_key(), e.private_key());
        assert_eq!(again.created_at(), e.created_at());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_replaces_the_pair_notifies_and_is_kept() {
        let dir = tmp("rotate");
        let e = Encryption::load_or_create(&dir).expect("create");
        let before = e.public_key();
        let mut rx = e.subscribe();
        e.rotate(3).expect("rotate");
        assert_ne!(e.public_key(), before);
        assert_eq!(e.rotations_done(), 3);
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(*rx.borrow_and_update(), 1);
        let again = Encryption::load_or_create(&dir).expect("load");
        assert_eq!(again.public_key(), e.public_key());
        assert_eq!(again.rotations_done(), 3);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "the rewritten file too");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_and_info() {
        let dir = tmp("info");
        let e = Encryption::load_or_create(&dir).expect("create");
        assert_eq!(e.info().datapath, "", "no device yet");
        let peer = mesh_proto::EncryptionPeer {
            node_id: "n2".into(),
            endpoint: "192.168.1.2:51820".into(),
            ..Default::default()
        };
        e.set_status("batch".into(), 51820, vec![peer.clone()]);
        let info = e.info();
        assert_eq!((info.datapath.as_str(), info.listen_port), ("batch", 51820));
        assert_eq!(info.peers, vec![peer.clone()]);
        assert_eq!(e.peers(), vec![peer]);
        assert_eq!(info.public_key, e.public_key_b64());
        assert!(
            info.key_created_at.ends_with('Z'),
            "{}",
            info.key_created_at
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn age_against_the_interval() {
        let dir = tmp("age");
        let e = Encryption::load_or_create(&dir).expect("create");
        let t = e.created_at();
        assert!(!e.older_than(Duration::ZERO, t + Duration::from_secs(1 << 30)));
        assert!(!e.older_than(Duration::from_secs(60), t + Duration::from_secs(59)));
        assert!(e.older_than(Duration::from_secs(60), t + Duration::from_secs(60)));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_files_and_bad_keys_are_refused() {
        let dir = tmp("bad");
        fs::write(dir.join(KEY_FILE), b"{not json").expect("write");
        assert!(matches!(
            Encryption::load_or_create(&dir),
            Err(EncryptionError::Corrupt { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
        for bad in [
            "",
            "abc",
            "!!!!",
            &STANDARD.encode([1u8; 31]),
            &STANDARD.encode([1u8; 33]),
        ] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_public_key(&STANDARD.encode([7u8; 32])).expect("ok"),
            [7u8; 32]
        );
    }
}
