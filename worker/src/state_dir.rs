//! The node's state directory (default /var/lib/mesh).
//!
//! ```text
//! node.json          identity: node and cluster IDs, role, addresses, managers
//! certs/ca.pem       the cluster root CA (pinned at join)
//! certs/node.pem     this node's certificate (renewed in place)
//! certs/node.key     this node's private key; never leaves the node
//! wireguard.json     the WireGuard static key pair (`crate::encryption`)
//! raft/              the Raft store, managers only
//! ```
//!
//! Everything here is private to the daemon's user (see [`crate::private_fs`]):
//! directories 0700, files 0600.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::private_fs::{self, FILE_MODE};

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({source}); move it away and join the cluster again")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What a node remembers about its cluster membership.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeConfig {
    pub node_id: String,
    pub cluster_id: String,
    pub role: String,
    /// Underlay IP other nodes reach this one at.
    pub advertise_addr: String,
    /// ADDR:PORT the cluster port listens on (managers).
    pub listen_addr: String,
    /// ADDR:PORT other nodes use to reach this node's cluster port.
    pub cluster_addr: String,
    /// Managers' cluster ports, refreshed from every heartbeat, so that a
    /// restarted node finds the cluster even if its first manager is gone.
    pub managers: Vec<String>,
    /// Node ID to key fingerprint of every current manager, as the cluster
    /// last said: the only servers this node accepts as managers.
    #[serde(default)]
    pub manager_keys: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// Certificates and key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Certs {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the records of this node's sandboxes live.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// A short ID of this daemon's state dir, made once: it prefixes every
    /// namespace the daemon creates, so nodes sharing one /run/netns (a lab
    /// on one machine) never collide, and a restarted daemon finds its own.
    pub fn instance_prefix(&self) -> Result<String, StateDirError> {
        let path = self.root.join("instance");
        if let Ok(s) = fs::read_to_string(&path) {
            let s = s.trim();
            if !s.is_empty() {
                return Ok(format!("mesh{s}"));
            }
        }
        let id: String = mesh_common::id::new_id().chars().take(6).collect();
        write_atomic(&path, id.as_bytes())?;
        Ok(format!("mesh{id}"))
    }

    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// Creates the state dir (0700), or tightens what an earlier daemon (or
    /// a person) left more open, warning once per path.
    pub fn create(&self) -> Result<(), StateDirError> {
        private_fs::create_dir(&self.root).map_err(|source| StateDirError::Io {
            what: "create",
            path: self.root.clone(),
            source,
        })?;
        private_fs::tighten_tree(&self.root);
        Ok(())
    }

    pub fn load_config(&self) -> Result<Option<NodeConfig>, StateDirError> {
        let path = self.root.join("node.json");
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateDirError::Io {
                    what: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| StateDirError::Corrupt { path, source })
    }

    /// Written last when joining: its presence means "member of a cluster".
    pub fn save_config(&self, config: &NodeConfig) -> Result<(), StateDirError> {
        let data = serde_json::to_vec_pretty(config).map_err(|source| StateDirError::Corrupt {
            path: self.root.join("node.json"),
            source,
        })?;
        write_atomic(&self.root.join("node.json"), &data)
    }

    pub fn save_certs(&self, certs: &Certs) -> Result<(), StateDirError> {
        let dir = self.certs_dir();
        private_fs::create_dir(&dir).map_err(|source| StateDirError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        write_atomic(&dir.join("ca.pem"), certs.ca.as_bytes())?;
        write_atomic(&dir.join("node.key"), certs.key.as_bytes())?;
        write_atomic(&dir.join("node.pem"), certs.cert.as_bytes())
    }

    pub fn load_certs(&self) -> Result<Certs, StateDirError> {
        let dir = self.certs_dir();
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| StateDirError::Io {
                what: "read",
                path,
                source,
            })
        };
        Ok(Certs {
            ca: read("ca.pem")?,
            cert: read("node.pem")?,
            key: read("node.key")?,
        })
    }

    /// Forgets the cluster: identity, certificates, the WireGuard key and
    /// Raft data. Keeps going past failures and reports the first.
    pub fn wipe_cluster(&self) -> Result<(), StateDirError> {
        let mut first = None;
        for (path, dir) in [
            (self.root.join("node.json"), false),
            (self.root.join(crate::encryption::KEY_FILE), false),
            (self.certs_dir(), true),
            (self.raft_dir(), true),
        ] {
            let r = if dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(source) = r
                && source.kind() != std::io::ErrorKind::NotFound
                && first.is_none()
            {
                first = Some(StateDirError::Io {
                    what: "remove",
                    path,
                    source,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Every file here is 0600: even the public ones (certificates) say who is
/// in the cluster, and nothing outside the daemon needs to read them.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StateDirError> {
    private_fs::write_atomic(path, data, FILE_MODE).map_err(|source| StateDirError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip_and_wipe() {
        let dir = std::env::temp_dir().join(format!("mesh-sd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sd = StateDir::new(&dir);
        sd.create().expect("create");
        assert_eq!(sd.load_config().expect("load"), None);
        let cfg = NodeConfig {
            node_id: "n1".into(),
            managers: vec!["1.2.3.4:2377".into()],
            manager_keys: Default::default(),
            ..Default::default()
        };
        sd.save_config(&cfg).expect("save");
        sd.save_certs(&Certs {
            ca: "a".into(),
            cert: "b".into(),
            key: "c".into(),
        })
        .expect("certs");
        assert_eq!(sd.load_config().expect("load"), Some(cfg));
        assert_eq!(sd.load_certs().expect("certs").key, "c");
        sd.instance_prefix().expect("instance");
        let key = crate::encryption::Encryption::load_or_create(&dir).expect("key");
        let mode = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.join(p))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        for p in ["", "certs"] {
            assert_eq!(mode(p), 0o700, "{p}");
        }
        for p in [
            "node.json",
            "instance",
            "certs/ca.pem",
            "certs/node.pem",
            "certs/node.key",
            crate::encryption::KEY_FILE,
        ] {
            assert_eq!(mode(p), 0o600, "{p}");
        }
        sd.wipe_cluster().expect("wipe");
        assert_eq!(sd.load_config().expect("load"), None);
        assert!(sd.load_certs().is_err());
        assert!(
            !dir.join(crate::encryption::KEY_FILE).exists(),
            "leaving forgets the WireGuard key"
        );
        let fresh = crate::encryption::Encryption::load_or_create(&dir).expect("key");
        assert_ne!(
            fresh.public_key(),
            key.public_key(),
            "a new member, a new key"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
