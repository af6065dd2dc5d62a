//! The sandboxes of this node: their records, and the steps of `run`, `rm`,
//! `network connect`/`disconnect` and of service tasks. Wiring asks the
//! network drivers ([`crate::drivers`]); any failure undoes every step
//! already taken, so nothing is left half-made.
//!
//! - `record`: records and attachments, ID and name checks, the store on disk;
//! - `datapath`: node-wide data-path settings (namespace prefix, underlay);
//! - `run`: `mesh run` and `mesh rm` of standalone sandboxes, and teardown;
//! - `wiring`: endpoints from the managers or the local networks, and
//!   `network connect`/`disconnect`;
//! - `task`: service tasks' sandboxes and their kept logs;
//! - `names`: the DNS records derived from a node's view (pure);
//! - `resolver`: each sandbox's DNS listener, kept serving;
//! - `vips`: which VIP services a sandbox needs (pure) and their tables;
//! - `files`: /etc/hosts and resolv.conf as a sandbox gets them.

mod datapath;
mod files;
mod names;
mod record;
mod resolver;
mod run;
mod task;
mod vips;
mod wiring;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use datapath::{DataPath, WIREGUARD_OVERHEAD, overlay_mtu_for};
pub use record::{Attachment, Record, RunSpec, check_id};

use crate::drivers::{self, Ctx};
use crate::sandbox;

#[derive(Debug, thiserror::Error)]
pub enum SandboxesError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    #[error(transparent)]
    Driver(#[from] drivers::DriverError),
    #[error("{0}")]
    Manager(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Sandboxes {
    store: record::Store,
    records: Mutex<BTreeMap<String, Record>>,
    /// Names of sandboxes being built: taken at once, under the same lock
    /// as the records, so two concurrent runs cannot both get one name.
    building: Mutex<BTreeSet<String>>,
    /// Host ports of sandboxes being built, by name (see `run.rs`).
    building_ports: Mutex<BTreeMap<String, Vec<crate::ports::Published>>>,
    /// This node's local networks (bridge, macvlan, host, none).
    pub local: Arc<crate::local_networks::LocalNetworks>,
    /// The embedded DNS server every sandbox asks at 127.0.0.11.
    pub dns: Arc<crate::dns::DnsServer>,
    /// The managers' last view of this node: the cluster half of the DNS
    /// records.
    view: Mutex<Option<mesh_proto::NodeView>>,
    /// The VIP ruleset last applied per sandbox namespace, so a pass only
    /// forks `nft` where something changed.
    vip_applied: Mutex<BTreeMap<String, Arc<str>>>,
    /// VIP tables rendered from the current view, by set of networks
    /// (see `vip_text_for`); emptied when the view changes.
    vip_texts: Mutex<BTreeMap<String, Arc<str>>>,
    /// Bounds the sandbox starts running at once: each forks `nft` and
    /// its process, and more than a few only compete for the same CPUs.
    starts: tokio::sync::Semaphore,
    /// A reconcile pass (write) against teardowns (read): a pass acts on
    /// the sandboxes it listed, and must not re-serve a resolver or rewire
    /// a sandbox whose namespace is going. A teardown holds it only while
    /// it takes the sandbox out of the records. Starts never take it: a
    /// sandbox being started is not in the records a pass lists.
    gate: tokio::sync::RwLock<()>,
    /// Overlay networks a start ensured since the last pass began (see
    /// `wire_kernel`), by everything their ensuring depends on.
    ensured: Mutex<BTreeSet<String>>,
    /// Egress addresses given to sandboxes being started, not yet in a
    /// record, so two concurrent starts never get the same one.
    egress_reserved: Mutex<BTreeSet<std::net::Ipv4Addr>>,
    /// Whether `mesh_gwbridge` was made by this daemon: starts then only
    /// add their port (the pass checks the bridge and its table).
    gwbridge_ready: std::sync::atomic::AtomicBool,
}

/// Whether a sandbox's record gives DNS names of its own: only on local
/// (bridge, macvlan) networks; on overlays every name comes from the view,
/// which the next pass brings. A commit of a task on overlays only
/// rebuilt every network's names and every sandbox's table: with 100 tasks
/// starting on a node, a twentieth of its CPU.
fn names_from_record(rec: &Record) -> bool {
    rec.networks
        .iter()
        .any(|a| a.driver != mesh_common::model::DriverKind::Overlay)
}

/// Sandbox starts at once on a node (see `Sandboxes::starts`). Once a start
/// no longer forks the daemon or `nft`, much of it is waiting on the
/// kernel (RCU, netlink): 300 replicas on 3 nodes answered in 4.0–4.2 s
/// with 16 against 4.5–4.7 s with 8 (hand runs on the 2-core lab machine).
const CONCURRENT_STARTS: usize = 16;

impl Sandboxes {
    /// Loads the records a previous run of the daemon left.
    pub fn load(
        dir: PathBuf,
        local: Arc<crate::local_networks::LocalNetworks>,
        dns: Arc<crate::dns::DnsServer>,
    ) -> Result<Self, SandboxesError> {
        let store = record::Store { dir };
        let records = store.load();
        Ok(Self {
            store,
            records: Mutex::new(records),
            building: Mutex::new(BTreeSet::new()),
            building_ports: Mutex::new(BTreeMap::new()),
            local,
            dns,
            view: Mutex::new(None),
            vip_applied: Mutex::new(BTreeMap::new()),
            vip_texts: Mutex::new(BTreeMap::new()),
            starts: tokio::sync::Semaphore::new(CONCURRENT_STARTS),
            gate: tokio::sync::RwLock::new(()),
            ensured: Mutex::new(BTreeSet::new()),
            egress_reserved: Mutex::new(BTreeSet::new()),
            gwbridge_ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The drivers' context for this node.
    pub fn ctx<'a>(&'a self, dp: &'a DataPath) -> Ctx<'a> {
        Ctx {
            dp,
            local: &self.local,
        }
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every record, with exit state refreshed.
    pub fn list(&self) -> Vec<Record> {
        let mut recs = self.lock_records();
        for r in recs.values_mut() {
            if r.exit_code.is_none() && !sandbox::alive(r.pid) {
                r.exit_code = Some(sandbox::wait_exit(r.pid).unwrap_or(-1));
            }
        }
        recs.values().cloned().collect()
    }

    /// By name, ID, or unique ID prefix.
    pub fn find(&self, r: &str) -> Result<Record, SandboxesError> {
        let all = self.list();
        if let Some(x) = all.iter().find(|x| x.name == r || x.id == r) {
            return Ok(x.clone());
        }
        let by_prefix: Vec<&Record> = all
            .iter()
            .filter(|x| !r.is_empty() && x.id.starts_with(r))
            .collect();
        match by_prefix.as_slice() {
            [x] => Ok((*x).clone()),
            [] => Err(SandboxesError::Refused(format!("no such sandbox: {r}"))),
            _ => Err(SandboxesError::Refused(format!(
                "sandbox reference {r:?} is ambiguous; use more of the ID"
            ))),
        }
    }

    /// Takes `name` for a sandbox about to be built, or refuses with
    /// Docker's conflict message if a sandbox has it or is being built with
    /// it. Give it back with [`Self::release_name`].
    fn claim_name(&self, name: &str) -> Result<(), SandboxesError> {
        let records = self.lock_records();
        let mut building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let holder = records
            .values()
            .find(|r| r.name == name)
            .map(|r| r.id.clone());
        if holder.is_some() || building.contains(name) {
            let by = holder.map_or_else(|| "being created".to_string(), |id| format!("{id:?}"));
            return Err(SandboxesError::Refused(format!(
                "Conflict. The container name \"/{name}\" is already in use by container {by}. You have to remove (or rename) that container to be able to reuse that name (`mesh rm {name}`)."
            )));
        }
        building.insert(name.to_string());
        Ok(())
    }

    fn release_name(&self, name: &str) {
        self.building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Records a changed sandbox: on disk, in the index, and in the DNS
    /// (its networks and every network's names).
    fn commit(&self, rec: &Record) -> Result<(), SandboxesError> {
        self.store.save(rec)?;
        self.lock_records().insert(rec.id.clone(), rec.clone());
        if let Some(ip) = rec.egress_ip {
            self.release_egress_ip(ip);
        }
        self.dns
            .update_sandbox_networks(&rec.id, resolver::dns_networks(rec));
        if names_from_record(rec) {
            self.refresh_dns();
        }
        Ok(())
    }

    /// Forgets a removed sandbox.
    fn forget(&self, rec: &Record) {
        self.lock_records().remove(&rec.id);
        if names_from_record(rec) {
            self.refresh_dns();
        }
    }

    /// Rebuilds the NAT and isolation table of all local bridge networks
    /// (after one was removed).
    pub fn sync_local_nat(&self, dp: &DataPath) -> Result<(), SandboxesError> {
        Ok(drivers::sync_bridge_nat(&self.ctx(dp))?)
    }

    /// The egress address for a new sandbox, reserved until its record is
    /// committed or it is torn down ([`Self::release_egress_ip`]).
    fn reserve_egress_ip(&self) -> Result<std::net::Ipv4Addr, SandboxesError> {
        let records = self.lock_records();
        let mut reserved = self
            .egress_reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let used: BTreeSet<std::net::Ipv4Addr> = records
            .values()
            .filter_map(|r| r.egress_ip)
            .chain(reserved.iter().copied())
            .collect();
        let ip = drivers::next_egress_ip(&used)?;
        reserved.insert(ip);
        Ok(ip)
    }

    fn release_egress_ip(&self, ip: std::net::Ipv4Addr) {
        self.egress_reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }

    /// The key an overlay attachment's network is ensured under; None for
    /// other drivers, which are ensured at every start.
    fn ensured_key(a: &Attachment) -> Option<String> {
        (a.driver == mesh_common::model::DriverKind::Overlay).then(|| {
            format!(
                "{}/{}/{}/{}/{}",
                a.vni,
                a.subnet(),
                a.gateway,
                a.mtu,
                a.encrypted
            )
        })
    }

    fn is_ensured(&self, a: &Attachment) -> bool {
        Self::ensured_key(a).is_some_and(|k| {
            self.ensured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&k)
        })
    }

    fn mark_ensured(&self, a: &Attachment) {
        if let Some(k) = Self::ensured_key(a) {
            self.ensured
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(k);
        }
    }

    /// Called by a pass holding the kernel lock: it checks every network
    /// itself, and may remove some, so starts ensure theirs again.
    pub fn forget_ensured(&self) {
        self.ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Held by a reconcile pass for its whole length: teardowns wait, starts
    /// do not (see `Sandboxes::gate`).
    pub async fn pass_gate(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sandboxes(root: &std::path::Path) -> Sandboxes {
        Sandboxes::load(
            root.join("sandboxes"),
            Arc::new(crate::local_networks::LocalNetworks::load(
                root.join("networks.json"),
                "t",
            )),
            crate::dns::DnsServer::new(Vec::new(), Duration::from_secs(1)),
        )
        .expect("load")
    }

    #[test]
    fn task_log_path_refuses_bad_ids() {
        let root = std::env::temp_dir().join(format!("mesh-sbx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("sandboxes");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A file a `../` ID would reach.
        std::fs::write(root.join("output.log"), b"secret").expect("write");
        let sbx = sandboxes(&root);
        assert_eq!(sbx.task_log_path(".."), None);
        let id = mesh_common::id::new_id();
        assert_eq!(sbx.task_log_path(&id), None);
        std::fs::create_dir_all(dir.join(&id)).expect("mkdir");
        std::fs::write(dir.join(&id).join("output.log"), b"hi").expect("write");
        assert_eq!(
            sbx.task_log_path(&id),
            Some(dir.join(&id).join("output.log"))
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_name_is_claimed_once() {
        let root = std::env::temp_dir().join(format!("mesh-sbn-{}", std::process::id()));
        let sbx = sandboxes(&root);
        sbx.claim_name("x").expect("first");
        let e = sbx.claim_name("x").expect_err("second").to_string();
        assert!(
            e.starts_with("Conflict. The container name \"/x\" is already in use"),
            "{e}"
        );
        sbx.release_name("x");
        sbx.claim_name("x").expect("after release");
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[cfg(test)]
mod concurrency_tests {
    use super::*;
    use std::time::Duration;

    fn sandboxes(tag: &str) -> (std::path::PathBuf, Sandboxes) {
        let root = std::env::temp_dir().join(format!("mesh-sbc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sandboxes")).expect("mkdir");
        let sbx = Sandboxes::load(
            root.join("sandboxes"),
            Arc::new(crate::local_networks::LocalNetworks::load(
                root.join("networks.json"),
                "t",
            )),
            crate::dns::DnsServer::new(Vec::new(), Duration::from_secs(1)),
        )
        .expect("load");
        (root, sbx)
    }

    /// Concurrent starts never get one egress address twice, and an
    /// address given back is handed out again.
    #[test]
    fn egress_addresses_are_reserved_until_released() {
        let (root, sbx) = sandboxes("egress");
        let a = sbx.reserve_egress_ip().expect("first");
        let b = sbx.reserve_egress_ip().expect("second");
        assert_ne!(a, b);
        sbx.release_egress_ip(a);
        let c = sbx.reserve_egress_ip().expect("third");
        assert_eq!(c, a, "a released address is free again");
        assert_ne!(c, b);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A teardown (a reader of the gate) waits while a pass holds it, and
    /// gets it once the pass ends.
    #[tokio::test]
    async fn teardowns_wait_for_the_pass() {
        let (root, sbx) = sandboxes("gate");
        let pass = sbx.pass_gate().await;
        assert!(sbx.gate.try_read().is_err(), "a teardown ran during a pass");
        drop(pass);
        assert!(sbx.gate.try_read().is_ok());
        let _ = std::fs::remove_dir_all(&root);
    }
}
