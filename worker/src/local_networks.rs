//! This node's local networks (Docker's local scope): the built-in `bridge`,
//! `host` and `none`, and user-defined `bridge` and `macvlan` networks. They
//! live in the node's state dir, not in Raft: no other node needs them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use mesh_common::ipam;
use mesh_common::model::DriverKind;
use serde::{Deserialize, Serialize};

use crate::local::BridgeSpec;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LocalNetwork {
    pub id: String,
    pub name: String,
    /// bridge | macvlan | host | none
    pub driver: String,
    pub subnet: String,
    pub gateway: String,
    pub ip_range: Option<String>,
    pub internal: bool,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub created_at: String,
    /// bridge/host/none exist on every node and cannot be removed.
    pub builtin: bool,
}

impl LocalNetwork {
    /// Its driver. The word is kept as written on disk (the file predates
    /// the typed model); one that is not a driver's is a damaged record.
    pub fn kind(&self) -> Result<DriverKind, String> {
        self.driver
            .parse()
            .map_err(|e| format!("local network {}: {e}", self.name))
    }

    /// The Linux bridge of a bridge network.
    pub fn bridge_spec(&self, mtu: u32) -> Option<BridgeSpec> {
        if self.kind() != Ok(DriverKind::Bridge) {
            return None;
        }
        Some(BridgeSpec {
            name: self.name.clone(),
            bridge: if self.builtin {
                crate::local::DEFAULT_BRIDGE.to_string()
            } else {
                crate::local::bridge_name(&self.id)
            },
            subnet: self.subnet.parse().ok()?,
            gateway: self.gateway.parse().ok()?,
            mtu: self
                .options
                .get("mtu")
                .and_then(|m| m.parse().ok())
                .unwrap_or(mtu),
            internal: self.internal,
        })
    }
}

/// What `mesh network create` asks of a local driver.
pub struct LocalSpec {
    pub name: String,
    pub driver: String,
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    pub ip_range: Option<String>,
    pub internal: bool,
    pub options: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

pub struct LocalNetworks {
    path: PathBuf,
    nets: Mutex<Vec<LocalNetwork>>,
}

/// Docker's default bridge subnet; user bridges are carved after the
/// gwbridge's 172.18.0.0/16.
const DEFAULT_BRIDGE_SUBNET: &str = "172.17.0.0/16";
const LOCAL_POOL: &str = "172.19.0.0/16";
const LOCAL_POOL_MASK: u8 = 24;

fn builtins(now: &str) -> Vec<LocalNetwork> {
    let mk = |name: &str, driver: DriverKind, subnet: &str, gateway: &str| LocalNetwork {
        id: format!(
            "{:0<25}",
            name.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        name: name.into(),
        driver: driver.to_string(),
        subnet: subnet.into(),
        gateway: gateway.into(),
        ip_range: None,
        internal: false,
        options: BTreeMap::new(),
        labels: BTreeMap::new(),
        created_at: now.into(),
        builtin: true,
    };
    vec![
        mk(
            "bridge",
            DriverKind::Bridge,
            DEFAULT_BRIDGE_SUBNET,
            "172.17.0.1",
        ),
        mk("host", DriverKind::Host, "", ""),
        mk("none", DriverKind::None, "", ""),
    ]
}

impl LocalNetworks {
    /// Loads `path`, adding the built-in networks if they are missing.
    pub fn load(path: PathBuf, now: &str) -> Self {
        let mut nets: Vec<LocalNetwork> = std::fs::read(&path)
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default();
        for b in builtins(now) {
            if !nets.iter().any(|n| n.name == b.name) {
                nets.push(b);
            }
        }
        Self {
            path,
            nets: Mutex::new(nets),
        }
    }

    fn save(&self, nets: &[LocalNetwork]) -> Result<(), String> {
        let data = serde_json::to_vec_pretty(nets).map_err(|e| e.to_string())?;
        crate::private_fs::write_atomic(&self.path, &data, crate::private_fs::FILE_MODE)
            .map_err(|e| format!("cannot save {}: {e}", self.path.display()))
    }

    pub fn list(&self) -> Vec<LocalNetwork> {
        self.nets.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// By exact ID, name, or unique ID prefix; None if no local network matches.
    pub fn find(&self, r: &str) -> Option<LocalNetwork> {
        let nets = self.list();
        if let Some(n) = nets.iter().find(|n| n.id == r || n.name == r) {
            return Some(n.clone());
        }
        let by_prefix: Vec<&LocalNetwork> = nets
            .iter()
            .filter(|n| !r.is_empty() && n.id.starts_with(r))
            .collect();
        match by_prefix.as_slice() {
            [n] => Some((*n).clone()),
            _ => None,
        }
    }

    /// Creates a bridge or macvlan network. `parent_exists` checks a macvlan
    /// parent interface in the node's namespace.
    pub fn create(
        &self,
        spec: LocalSpec,
        id: String,
        now: &str,
        parent_exists: impl Fn(&str) -> bool,
    ) -> Result<LocalNetwork, String> {
        let mut nets = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        if nets.iter().any(|n| n.name == spec.name) {
            return Err(format!("network with name {} already exists", spec.name));
        }
        let driver: DriverKind = spec.driver.parse().map_err(|e| format!("{e}"))?;
        let mut options = BTreeMap::new();
        for (k, v) in &spec.options {
            match (driver, k.as_str()) {
                (DriverKind::Macvlan, "parent") => {
                    if !parent_exists(v) {
                        return Err(format!(
                            "macvlan parent interface {v} does not exist on this node; see `ip link`"
                        ));
                    }
                    options.insert(k.clone(), v.clone());
                }
                (_, "mtu" | "com.docker.network.driver.mtu") => match v.parse::<u32>() {
                    Ok(m) if (576..=9000).contains(&m) => {
                        options.insert("mtu".into(), m.to_string());
                    }
                    _ => {
                        return Err(format!(
                            "invalid mtu {v:?}: use --opt mtu=N with N between 576 and 9000"
                        ));
                    }
                },
                (d, _) => return Err(format!("unknown option {k:?} for the {d} driver")),
            }
        }
        if driver == DriverKind::Macvlan && !options.contains_key("parent") {
            return Err("a macvlan network needs its parent interface: -o parent=IF".into());
        }
        let used: Vec<(&str, Ipv4Net)> = nets
            .iter()
            .filter_map(|n| n.subnet.parse().ok().map(|s| (n.name.as_str(), s)))
            .chain(std::iter::once((
                "mesh_gwbridge",
                Ipv4Net::new(Ipv4Addr::new(172, 18, 0, 0), 16).unwrap_or_default(),
            )))
            .collect();
        let subnet = match &spec.subnet {
            Some(s) => {
                let subnet = ipam::parse_subnet(s).map_err(|e| e.to_string())?;
                ipam::check_overlap(&subnet, used.iter().map(|(n, s)| (*n, s)))
                    .map_err(|e| e.to_string())?;
                subnet
            }
            None => {
                let pool = ipam::parse_pool(LOCAL_POOL).map_err(|e| e.to_string())?;
                let taken: Vec<Ipv4Net> = used.iter().map(|(_, s)| *s).collect();
                ipam::carve(&[pool], LOCAL_POOL_MASK, &taken).map_err(|e| e.to_string())?
            }
        };
        let gateway = match &spec.gateway {
            Some(g) => ipam::parse_gateway(g, &subnet).map_err(|e| e.to_string())?,
            None => ipam::default_gateway(&subnet),
        };
        if let Some(r) = &spec.ip_range {
            ipam::parse_ip_range(r, &subnet).map_err(|e| e.to_string())?;
        }
        let net = LocalNetwork {
            id,
            name: spec.name,
            driver: spec.driver,
            subnet: subnet.to_string(),
            gateway: gateway.to_string(),
            ip_range: spec.ip_range,
            internal: spec.internal,
            options,
            labels: spec.labels,
            created_at: now.into(),
            builtin: false,
        };
        nets.push(net.clone());
        self.save(&nets)?;
        Ok(net)
    }

    /// Removes a user-defined network; `users` names the sandboxes on it.
    pub fn remove(&self, r: &str, users: &[String]) -> Result<LocalNetwork, String> {
        let net = self
            .find(r)
            .ok_or_else(|| format!("network {r} not found"))?;
        if net.builtin {
            return Err(format!(
                "{} is a pre-defined network and cannot be removed",
                net.name
            ));
        }
        if !users.is_empty() {
            return Err(format!(
                "network {} is in use by {}; remove those first",
                net.name,
                users.join(", ")
            ));
        }
        let mut nets = self.nets.lock().unwrap_or_else(|e| e.into_inner());
        nets.retain(|n| n.id != net.id);
        self.save(&nets)?;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, driver: &str) -> LocalSpec {
        LocalSpec {
            name: name.into(),
            driver: driver.into(),
            subnet: None,
            gateway: None,
            ip_range: None,
            internal: false,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn builtins_carving_and_refusals() {
        let dir = std::env::temp_dir().join(format!("mesh-ln-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("networks.json");
        let l = LocalNetworks::load(path.clone(), "t");
        assert_eq!(l.list().iter().filter(|n| n.builtin).count(), 3);
        let a = l
            .create(spec("a", "bridge"), "ida".into(), "t", |_| true)
            .expect("create a");
        assert_eq!(
            (a.subnet.as_str(), a.gateway.as_str()),
            ("172.19.0.0/24", "172.19.0.1")
        );
        let b = l
            .create(spec("b", "bridge"), "idb".into(), "t", |_| true)
            .expect("create b");
        assert_eq!(b.subnet, "172.19.1.0/24");
        assert!(
            l.create(spec("a", "bridge"), "x".into(), "t", |_| true)
                .is_err_and(|e| e.contains("already exists"))
        );
        let mut overlap = spec("c", "bridge");
        overlap.subnet = Some("172.17.5.0/24".into());
        assert!(
            l.create(overlap, "x".into(), "t", |_| true)
                .is_err_and(|e| e.contains("overlaps"))
        );
        let mut mv = spec("m", "macvlan");
        assert!(
            l.create(spec("m", "macvlan"), "x".into(), "t", |_| true)
                .is_err_and(|e| e.contains("parent"))
        );
        mv.options.insert("parent".into(), "nope0".into());
        assert!(
            l.create(mv, "x".into(), "t", |_| false)
                .is_err_and(|e| e.contains("does not exist"))
        );
        assert!(
            l.remove("bridge", &[])
                .is_err_and(|e| e.contains("pre-defined"))
        );
        assert!(
            l.remove("a", &["web".into()])
                .is_err_and(|e| e.contains("web"))
        );
        l.remove("a", &[]).expect("remove a");
        // Persisted: a reload sees b but not a.
        let again = LocalNetworks::load(path, "t");
        assert!(again.find("b").is_some() && again.find("a").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
