//! What a sandbox is on disk: its record and its network attachments, the
//! checks on names and IDs before they name a path, a namespace or a link,
//! and the record store (one `sandbox.json` per sandbox directory) that lets
//! a restarted daemon know its sandboxes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use mesh_common::model::{DriverKind, Mac};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::SandboxesError;

/// One network attachment of a sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub network: String,
    pub network_id: String,
    pub endpoint_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub mac: String,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub mtu: u32,
    pub internal: bool,
    /// overlay (cluster) | bridge | macvlan (local). Records written before
    /// local drivers existed have none: they were all overlays.
    #[serde(default = "overlay_driver")]
    pub driver: DriverKind,
    /// macvlan parent interface.
    #[serde(default)]
    pub parent: Option<String>,
    /// Whether the sandbox's default route goes out this interface.
    #[serde(default)]
    pub default_route: bool,
    /// An overlay carried inside WireGuard (`--opt encrypted`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

fn overlay_driver() -> DriverKind {
    DriverKind::Overlay
}

impl Attachment {
    /// The MAC the record holds, or Docker's derived one if it is damaged.
    pub fn mac(&self) -> Mac {
        self.mac.parse().unwrap_or(Mac::for_ip(self.ip))
    }

    /// The subnet the attachment's address is in.
    pub fn subnet(&self) -> ipnet::Ipv4Net {
        ipnet::Ipv4Net::new(self.ip, self.prefix)
            .map(|n| n.trunc())
            .unwrap_or_default()
    }

    /// The kernel side of this attachment in sandbox `rec`: what the
    /// drivers' link code takes.
    pub fn link(&self, rec: &Record) -> crate::overlay::Attachment {
        crate::overlay::Attachment {
            sandbox_ns: rec.netns.clone(),
            ifname: self.ifname.clone(),
            ip: self.ip,
            prefix: self.prefix,
            mac: self.mac().octets(),
            mtu: self.mtu,
            // Overlays leave the default route to the gwbridge or a local
            // network, as in Docker.
            default_route: self.default_route,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub name: String,
    pub netns: String,
    pub pid: u32,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub networks: Vec<Attachment>,
    /// Address on mesh_gwbridge, if the sandbox has egress.
    pub egress_ip: Option<Ipv4Addr>,
    pub created_at: String,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// `--network host`: the sandbox shares the node's network namespace.
    #[serde(default)]
    pub host_network: bool,
    /// The service this sandbox is a task of (its ID is the task's).
    #[serde(default)]
    pub service: Option<String>,
    /// `-p` bindings with the host port as chosen; records from before
    /// published ports have none.
    #[serde(default)]
    pub ports: Vec<crate::ports::Published>,
}

impl Record {
    pub fn running(&self) -> bool {
        self.exit_code.is_none()
    }

    /// Whether the sandbox has a resolver of its own at 127.0.0.11: not on
    /// the host's stack, and not with `--network none` (no interface).
    pub fn has_dns(&self) -> bool {
        !self.host_network && !self.networks.is_empty()
    }

    /// The first ethN no attachment uses.
    pub fn free_ifname(&self) -> String {
        (0..)
            .map(|i| format!("eth{i}"))
            .find(|n| !self.networks.iter().any(|a| a.ifname == *n))
            .unwrap_or_else(|| "eth0".into())
    }

    /// The attachment to `network` (name or ID), if any.
    pub fn attachment(&self, network: &str) -> Option<usize> {
        self.networks
            .iter()
            .position(|a| a.network == network || a.network_id == network)
    }
}

pub struct RunSpec {
    pub name: String,
    pub networks: Vec<String>,
    pub aliases: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `-p`, checked again here (the CLI is not trusted).
    pub ports: Vec<mesh_common::ports::PortBinding>,
}

/// Docker's name rule, within a hostname's 63-character label.
pub(super) fn valid_name(name: &str) -> bool {
    name.len() <= mesh_common::id::MAX_NAME && mesh_common::id::valid_name(name)
}

/// Refuses an ID that is not the shape mesh makes (25 characters of 0-9 and
/// a-z) before it is joined into a path or names a namespace or a link: task
/// IDs come from the managers, and a `../` or `/` in one would reach outside
/// the state dir.
pub fn check_id(id: &str) -> Result<(), SandboxesError> {
    if mesh_common::id::is_valid_id(id) {
        return Ok(());
    }
    // Bounded and escaped: the ID is untrusted and goes into logs.
    let shown: String = id.chars().take(40).collect();
    let more = if shown.len() < id.len() { "…" } else { "" };
    Err(SandboxesError::Refused(format!(
        "refusing task or sandbox ID {shown:?}{more}: not a mesh ID (25 characters, 0-9 and a-z)"
    )))
}

/// The sandboxes' directory in the state dir: one directory per sandbox,
/// named by its checked ID.
pub(super) struct Store {
    pub dir: PathBuf,
}

impl Store {
    /// The directory of sandbox `id`; refuses an ID that is not a mesh ID,
    /// so no path is ever made from one.
    pub fn dir_of(&self, id: &str) -> Result<PathBuf, SandboxesError> {
        check_id(id)?;
        Ok(self.dir.join(id))
    }

    /// The records a previous run of the daemon left.
    pub fn load(&self) -> BTreeMap<String, Record> {
        let mut records = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return records;
        };
        for e in entries.flatten() {
            let path = e.path().join("sandbox.json");
            match std::fs::read(&path).map(|d| serde_json::from_slice::<Record>(&d)) {
                Ok(Ok(r)) => {
                    // An older daemon took task IDs as sent: never let one
                    // name a path now (teardown removes its directory).
                    if let Err(e) = check_id(&r.id) {
                        warn!("ignoring {}: {e}", path.display());
                        continue;
                    }
                    records.insert(r.id.clone(), r);
                }
                Ok(Err(err)) => warn!("ignoring damaged {}: {err}", path.display()),
                Err(_) => {}
            }
        }
        records
    }

    /// Creates the sandbox's private directory (it holds the command's
    /// environment and output) and returns it.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, SandboxesError> {
        let dir = self.dir_of(id)?;
        crate::private_fs::create_dir(&dir).map_err(|source| io("create", &dir, source))?;
        Ok(dir)
    }

    pub fn save(&self, r: &Record) -> Result<(), SandboxesError> {
        let dir = self.create_dir(&r.id)?;
        let data = serde_json::to_vec_pretty(r).unwrap_or_default();
        // Describes namespaces and a process, which a crash of the
        // machine ends too: no fsync (it was most of a commit's cost).
        crate::private_fs::write_atomic_unsynced(
            &dir.join("sandbox.json"),
            &data,
            crate::private_fs::FILE_MODE,
        )
        .map_err(|e| io("write", &dir, e))
    }

    /// Removes the sandbox's directory (and its record) for good.
    pub fn remove(&self, id: &str) {
        if let Ok(dir) = self.dir_of(id) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> SandboxesError {
    SandboxesError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_the_network_are_checked() {
        assert!(check_id(&mesh_common::id::new_id()).is_ok());
        for bad in ["", "..", "../../etc/passwd", "a/b", &"x".repeat(10_000)] {
            let e = check_id(bad).expect_err(bad);
            let msg = e.to_string();
            assert!(msg.contains("not a mesh ID"), "{msg}");
            assert!(msg.len() < 200, "the message quotes a bounded part: {msg}");
        }
    }

    #[test]
    fn store_paths_go_through_the_id_check() {
        let store = Store {
            dir: PathBuf::from("/nonexistent/sandboxes"),
        };
        assert!(store.dir_of("../x").is_err());
        let id = mesh_common::id::new_id();
        assert_eq!(
            store.dir_of(&id).expect("valid"),
            PathBuf::from("/nonexistent/sandboxes").join(&id)
        );
    }

    #[test]
    fn records_without_a_driver_are_overlays_and_round_trip() {
        let json = r#"{"network":"app","network_id":"n","endpoint_id":"e","ifname":"eth0",
            "ip":"10.0.1.2","prefix":24,"mac":"02:42:0a:00:01:02","gateway":"10.0.1.1",
            "vni":4097,"mtu":1450,"internal":false}"#;
        let a: Attachment = serde_json::from_str(json).expect("old attachment");
        assert_eq!(a.driver, DriverKind::Overlay);
        let back = serde_json::to_value(&a).expect("json");
        assert_eq!(back["driver"], "overlay");
        assert_eq!(a.mac(), Mac::for_ip(Ipv4Addr::new(10, 0, 1, 2)));
        assert_eq!(a.subnet().to_string(), "10.0.1.0/24");
    }

    #[test]
    fn free_ifname_fills_gaps() {
        let mut r: Record = serde_json::from_str(
            r#"{"id":"x","name":"x","netns":"n","pid":0,"cmd":[],"env":[],"networks":[],
                "egress_ip":null,"created_at":""}"#,
        )
        .expect("record");
        assert_eq!(r.free_ifname(), "eth0");
        assert!(!r.has_dns());
        assert!(
            r.ports.is_empty(),
            "records from before -p load without ports"
        );
        let a: Attachment = serde_json::from_str(
            r#"{"network":"app","network_id":"n","endpoint_id":"e","ifname":"eth1",
            "ip":"10.0.1.2","prefix":24,"mac":"x","gateway":"10.0.1.1",
            "vni":1,"mtu":1450,"internal":false}"#,
        )
        .expect("attachment");
        r.networks.push(a);
        assert_eq!(r.free_ifname(), "eth0");
        assert!(r.has_dns());
        assert_eq!(r.attachment("app"), Some(0));
    }
}
