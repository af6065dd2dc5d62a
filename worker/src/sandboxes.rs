//! The sandboxes of this node: records on disk (so a restarted daemon knows
//! them), and the steps of `run` and `rm`. `run` asks the managers for an
//! endpoint per network, wires the kernel (overlay veth, egress veth),
//! writes /etc/hosts and resolv.conf, and starts the process; any failure
//! undoes every step already taken, so nothing is left half-made.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{AttachRequest, DetachRequest, EndpointInfo};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::managers::Managers;
use crate::{egress, overlay, sandbox};

#[derive(Debug, thiserror::Error)]
pub enum SandboxesError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    #[error(transparent)]
    Egress(#[from] egress::EgressError),
    #[error("{0}")]
    Manager(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

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
    /// overlay (cluster) | bridge | macvlan (local).
    #[serde(default = "overlay_driver")]
    pub driver: String,
    /// macvlan parent interface.
    #[serde(default)]
    pub parent: Option<String>,
    /// Whether the sandbox's default route goes out this interface.
    #[serde(default)]
    pub default_route: bool,
}

fn overlay_driver() -> String {
    "overlay".into()
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
}

/// Node-wide data-path settings the sandboxes are wired with.
#[derive(Clone, Debug)]
pub struct DataPath {
    /// Prefix of every namespace this daemon makes (unique per node).
    pub prefix: String,
    pub local_ip: Ipv4Addr,
    pub port: u16,
    /// MTU for overlays without --opt mtu: the underlay's, minus VXLAN's 50.
    pub overlay_mtu: u32,
    /// Held while changing the kernel: the agent's reconcile passes and a
    /// sandbox's wiring must not interleave (both create the same VXLAN).
    pub kernel: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// MTU of the interface holding `ip` (the underlay), minus VXLAN's 50 bytes
/// of headers; 1450 if it cannot be found.
pub async fn overlay_mtu_for(ip: Ipv4Addr) -> u32 {
    let Ok(nl) = crate::link::Netlink::open(None).await else {
        return 1450;
    };
    let Ok(links) = nl.links().await else {
        return 1450;
    };
    for l in links {
        if nl
            .addresses_v4(&l.name)
            .await
            .is_ok_and(|a| a.iter().any(|(a, _)| *a == ip))
        {
            return l.mtu.saturating_sub(50).max(576);
        }
    }
    1450
}

impl DataPath {
    /// The overlay driver's view of this node: its namespace prefix, and
    /// the daemon's own namespace as the underlay.
    pub fn underlay_mtu(&self) -> u32 {
        self.overlay_mtu + 50
    }

    pub fn node(&self) -> overlay::Node {
        overlay::Node::host(self.prefix.clone())
    }
}

pub struct RunSpec {
    pub name: String,
    pub networks: Vec<String>,
    pub aliases: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub struct Sandboxes {
    dir: PathBuf,
    records: Mutex<BTreeMap<String, Record>>,
    /// This node's local networks (bridge, macvlan, host, none).
    pub local: std::sync::Arc<crate::local_networks::LocalNetworks>,
    /// The embedded DNS server every sandbox asks at 127.0.0.11.
    pub dns: std::sync::Arc<crate::dns::DnsServer>,
    /// The managers' last view of this node: the cluster half of the DNS
    /// records.
    view: Mutex<Option<mesh_proto::NodeView>>,
    /// The VIP ruleset last applied per sandbox namespace, so a pass only
    /// forks `nft` where something changed.
    vip_applied: Mutex<BTreeMap<String, String>>,
}

const EGRESS_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 18, 0, 0), 16);

/// Docker's name rule, within a hostname's 63-character label.
fn valid_name(name: &str) -> bool {
    name.len() <= 63 && mesh_common::id::valid_name(name)
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

impl Sandboxes {
    /// Loads the records a previous run of the daemon left.
    pub fn load(
        dir: PathBuf,
        local: std::sync::Arc<crate::local_networks::LocalNetworks>,
        dns: std::sync::Arc<crate::dns::DnsServer>,
    ) -> Result<Self, SandboxesError> {
        let mut records = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
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
        }
        Ok(Self {
            dir,
            records: Mutex::new(records),
            local,
            dns,
            view: Mutex::new(None),
            vip_applied: Mutex::new(BTreeMap::new()),
        })
    }

    fn save(&self, r: &Record) -> Result<(), SandboxesError> {
        let dir = self.dir.join(&r.id);
        let io = |what, source| SandboxesError::Io {
            what,
            path: dir.clone(),
            source,
        };
        // Private: the record holds the command's environment.
        crate::private_fs::create_dir(&dir).map_err(|e| io("create", e))?;
        let data = serde_json::to_vec_pretty(r).unwrap_or_default();
        crate::private_fs::write_atomic(
            &dir.join("sandbox.json"),
            &data,
            crate::private_fs::FILE_MODE,
        )
        .map_err(|e| io("write", e))
    }

    /// Every record, with exit state refreshed.
    pub fn list(&self) -> Vec<Record> {
        let mut recs = self.records.lock().unwrap_or_else(|e| e.into_inner());
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

    fn next_egress_ip(&self) -> Ipv4Addr {
        let used: std::collections::BTreeSet<Ipv4Addr> = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|r| r.egress_ip)
            .collect();
        let base = u32::from(EGRESS_SUBNET.0);
        (2..(1u32 << (32 - EGRESS_SUBNET.1)) - 1)
            .map(|i| Ipv4Addr::from(base + i))
            .find(|ip| !used.contains(ip))
            .unwrap_or(Ipv4Addr::new(172, 18, 255, 254))
    }

    /// `mesh run`: everything or nothing.
    pub async fn run(
        &self,
        spec: RunSpec,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Result<Record, SandboxesError> {
        let id = mesh_common::id::new_id();
        let name = if spec.name.is_empty() {
            format!("sandbox-{}", &id[..8])
        } else {
            spec.name.clone()
        };
        if !valid_name(&name) {
            return Err(SandboxesError::Refused(format!(
                "invalid sandbox name {name:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
            )));
        }
        if self.list().iter().any(|r| r.name == name) {
            return Err(SandboxesError::Refused(format!(
                "the name {name:?} is already in use by a sandbox on this node; remove it with `mesh rm {name}` or choose another"
            )));
        }
        if spec.cmd.is_empty() {
            return Err(SandboxesError::Refused(
                "no command given: mesh run [OPTIONS] -- CMD [ARG...]".into(),
            ));
        }
        let mut dedup = spec.networks.clone();
        dedup.sort();
        dedup.dedup();
        if dedup.len() != spec.networks.len() {
            return Err(SandboxesError::Refused("a network is given twice".into()));
        }
        let mut rec = Record {
            id: id.clone(),
            name: name.clone(),
            netns: format!("{}-sb-{}", dp.prefix, &id[..12]),
            pid: 0,
            cmd: spec.cmd.clone(),
            env: spec.env.clone(),
            networks: Vec::new(),
            egress_ip: None,
            created_at: String::new(),
            exit_code: None,
            host_network: false,
            service: None,
        };
        match self.build(&mut rec, &spec, dp, managers).await {
            Ok(()) => {
                self.save(&rec)?;
                self.records
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(rec.id.clone(), rec.clone());
                self.refresh_dns();
                info!(sandbox = %rec.name, pid = rec.pid, "sandbox started");
                Ok(rec)
            }
            Err(e) => {
                self.teardown(&rec, dp, managers).await;
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        rec: &mut Record,
        spec: &RunSpec,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Result<(), SandboxesError> {
        // Docker's default: the local `bridge` network.
        let requested = if spec.networks.is_empty() {
            vec!["bridge".to_string()]
        } else {
            spec.networks.clone()
        };
        let mut none = false;
        // Endpoints first: the managers (or the local registry) refuse what
        // is wrong before the kernel is touched.
        for net in &requested {
            let index = rec.networks.len();
            if let Some(l) = self.local.find(net) {
                match l.driver.as_str() {
                    "host" | "none" => {
                        if requested.len() > 1 {
                            return Err(SandboxesError::Refused(format!(
                                "a sandbox on the {} network cannot be connected to other networks",
                                l.name
                            )));
                        }
                        rec.host_network = l.driver == "host";
                        none = l.driver == "none";
                    }
                    _ => {
                        let a = self.local_attachment(&l, rec, index, dp)?;
                        rec.networks.push(a);
                    }
                }
                continue;
            }
            let Some(m) = managers else {
                return Err(SandboxesError::Refused(format!(
                    "network {net} not found: it is not a local network and this node is not part of a cluster"
                )));
            };
            let req = AttachRequest {
                network: net.clone(),
                sandbox: rec.name.clone(),
                sandbox_id: rec.id.clone(),
                aliases: spec.aliases.clone(),
                endpoint_id: mesh_common::id::new_id(),
            };
            let info = attach_endpoint(m, req).await?;
            rec.networks.push(attachment(&info, index, dp)?);
        }
        self.start_built(rec, dp, none).await
    }

    /// The kernel and process half of `run`, once every attachment has its
    /// address: links, egress, DNS, VIP rules, then the process.
    async fn start_built(
        &self,
        rec: &mut Record,
        dp: &DataPath,
        none: bool,
    ) -> Result<(), SandboxesError> {
        // The first local (bridge/macvlan) network carries the default route.
        if let Some(a) = rec.networks.iter_mut().find(|a| a.driver != "overlay") {
            a.default_route = true;
        }
        let _kernel = dp.kernel.lock().await;
        if rec.host_network {
            rec.netns = format!("{}-host", dp.prefix);
            crate::netns::attach_current(&rec.netns)?;
        } else {
            sandbox::create_netns(&rec.netns).await?;
        }
        for a in &rec.networks {
            self.wire(rec, a, dp).await?;
        }
        if rec.networks.iter().any(|a| a.driver == "bridge") {
            self.sync_local_nat(dp)?;
        }
        // Egress like docker_gwbridge for overlay-only sandboxes, unless
        // every network is --internal.
        let local_route = rec.networks.iter().any(|a| a.driver != "overlay");
        if !rec.host_network && !none && !local_route && rec.networks.iter().any(|a| !a.internal) {
            let ip = self.next_egress_ip();
            // Both run `ip`/`nft`: off the async worker thread.
            tokio::task::block_in_place(|| {
                egress::ensure_gwbridge(None, &format!("{}/{}", EGRESS_SUBNET.0, EGRESS_SUBNET.1))?;
                egress::attach(None, &rec.netns, ip, EGRESS_SUBNET.1, true)
            })?;
            rec.egress_ip = Some(ip);
        }
        if !rec.host_network && !none {
            let services = self.vip_services_for(rec);
            tokio::task::block_in_place(|| crate::vip::sync(&rec.netns, &services))
                .map_err(|e| SandboxesError::Refused(format!("cannot set up service VIPs: {e}")))?;
        }
        let dir = self.dir.join(&rec.id);
        crate::private_fs::create_dir(&dir).map_err(|source| SandboxesError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        rec.created_at = now();
        rec.pid = sandbox::start(&sandbox::SandboxSpec {
            name: rec.name.clone(),
            netns: rec.netns.clone(),
            cmd: rec.cmd.clone(),
            env: rec.env.clone(),
            hosts: hosts_file(rec),
            resolv_conf: if rec.host_network || none {
                resolv_conf()
            } else {
                self.sandbox_dns(rec).await?
            },
            dir,
        })?;
        Ok(())
    }

    /// Undoes whatever exists of a sandbox; keeps going past failures.
    async fn teardown(
        &self,
        rec: &Record,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        self.dns.stop_sandbox(&rec.id).await;
        // Before taking the kernel lock: stopping may take seconds.
        if rec.pid != 0
            && let Err(e) = sandbox::stop(rec.pid, Duration::from_secs(5)).await
        {
            errors.push(e.to_string());
        }
        let kernel = dp.kernel.lock().await;
        for a in &rec.networks {
            if let Err(e) = self.unwire(rec, a, dp).await {
                errors.push(e.to_string());
            }
        }
        if rec.egress_ip.is_some()
            && let Err(e) = egress::detach(None, &rec.netns)
        {
            errors.push(e.to_string());
        }
        // The host namespace is shared: only a sandbox's own one goes.
        if !rec.host_network
            && let Err(e) = sandbox::delete_netns(&rec.netns).await
        {
            errors.push(e.to_string());
        }
        drop(kernel);
        if let Some(m) = managers {
            for a in rec.networks.iter().filter(|a| a.driver == "overlay") {
                let r = detach_endpoint(m, &a.endpoint_id).await;
                if let Err(s) = r {
                    errors.push(format!("detach from {}: {}", a.network, s.message()));
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.dir.join(&rec.id));
        for e in &errors {
            warn!(sandbox = %rec.name, "teardown: {e}");
        }
        errors
    }

    /// `mesh rm`: a running sandbox needs `force`.
    pub async fn remove(
        &self,
        r: &str,
        force: bool,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Result<Record, SandboxesError> {
        let rec = self.find(r)?;
        if rec.exit_code.is_none() && !force {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is running: stop it first or use `mesh rm -f {}`",
                rec.name, rec.name
            )));
        }
        let errors = self.teardown(&rec, dp, managers).await;
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&rec.id);
        self.refresh_dns();
        if !errors.is_empty() {
            return Err(SandboxesError::Refused(format!(
                "removed {} with errors: {}",
                rec.name,
                errors.join("; ")
            )));
        }
        Ok(rec)
    }
}

fn attachment(
    info: &EndpointInfo,
    index: usize,
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
        ifname: format!("eth{index}"),
        ip: info.ip.parse().map_err(|_| bad("address"))?,
        prefix: u8::try_from(info.prefix).map_err(|_| bad("prefix"))?,
        mac: info.mac.clone(),
        gateway: info.gateway.parse().map_err(|_| bad("gateway"))?,
        vni: info.vni,
        mtu: if info.mtu == 0 {
            dp.overlay_mtu
        } else {
            info.mtu
        },
        internal: info.internal,
        driver: overlay_driver(),
        parent: None,
        default_route: false,
    })
}

pub fn overlay_spec(a: &Attachment, dp: &DataPath) -> overlay::OverlaySpec {
    overlay::OverlaySpec {
        vni: a.vni,
        subnet: ipnet::Ipv4Net::new(a.ip, a.prefix)
            .map(|n| n.trunc())
            .unwrap_or_default(),
        gateway: a.gateway,
        mtu: a.mtu,
        local_ip: dp.local_ip,
        port: dp.port,
    }
}

pub fn overlay_attachment(rec: &Record, a: &Attachment) -> overlay::Attachment {
    overlay::Attachment {
        sandbox_ns: rec.netns.clone(),
        ifname: a.ifname.clone(),
        ip: a.ip,
        prefix: a.prefix,
        mac: parse_mac(&a.mac).unwrap_or_else(|| overlay::mac_for(a.ip)),
        mtu: a.mtu,
        // Overlays leave the default route to the gwbridge or a local
        // network, as in Docker.
        default_route: a.default_route,
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    parts.try_into().ok()
}

/// /etc/hosts as Docker writes it: localhost, then the sandbox's own name on
/// its first address.
fn hosts_file(rec: &Record) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    if let Some(a) = rec.networks.first() {
        s.push_str(&format!("{}\t{}\n", a.ip, rec.name));
    } else if let Some(ip) = rec.egress_ip {
        s.push_str(&format!("{ip}\t{}\n", rec.name));
    }
    s
}

/// The host's resolvers, minus loopback ones a sandbox cannot reach.
fn resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    host.lines()
        .filter(|l| !(l.starts_with("nameserver") && (l.contains(" 127.") || l.contains(" ::1"))))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Sandboxes {
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
        if rec.exit_code.is_some() {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is not running",
                rec.name
            )));
        }
        if rec
            .networks
            .iter()
            .any(|a| a.network == network || a.network_id == network)
        {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is already connected to network {network}",
                rec.name
            )));
        }
        if let Some(l) = self.local.find(network) {
            if matches!(l.driver.as_str(), "host" | "none") || rec.host_network {
                return Err(SandboxesError::Refused(format!(
                    "cannot connect {} to {}: host and none networks take a sandbox's whole network stack",
                    rec.name, l.name
                )));
            }
            let index = (0..)
                .find(|i| !rec.networks.iter().any(|a| a.ifname == format!("eth{i}")))
                .unwrap_or(0);
            let a = self.local_attachment(&l, &rec, index, dp)?;
            {
                let _kernel = dp.kernel.lock().await;
                self.wire(&rec, &a, dp).await?;
                if a.driver == "bridge" {
                    self.sync_local_nat(dp)?;
                }
            }
            rec.networks.push(a);
            self.commit(&rec)?;
            return Ok(rec);
        }
        let Some(m) = managers else {
            return Err(SandboxesError::Refused(format!(
                "network {network} not found: this node is not part of a cluster"
            )));
        };
        let req = AttachRequest {
            network: network.to_string(),
            sandbox: rec.name.clone(),
            sandbox_id: rec.id.clone(),
            aliases,
            endpoint_id: mesh_common::id::new_id(),
        };
        let info = attach_endpoint(m, req).await?;
        // The first free ethN.
        let index = (0..)
            .find(|i| !rec.networks.iter().any(|a| a.ifname == format!("eth{i}")))
            .unwrap_or(0);
        let a = attachment(&info, index, dp)?;
        let wired = {
            let _kernel = dp.kernel.lock().await;
            let spec = overlay_spec(&a, dp);
            match overlay::ensure_network(&dp.node(), &spec).await {
                Ok(()) => overlay::attach(&dp.node(), &spec, &overlay_attachment(&rec, &a)).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = wired {
            // Give the address back: nothing half-made.
            let _ = detach_endpoint(m, &a.endpoint_id).await;
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
        let Some(pos) = rec
            .networks
            .iter()
            .position(|a| a.network == network || a.network_id == network)
        else {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is not connected to network {network}",
                rec.name
            )));
        };
        let a = rec.networks.remove(pos);
        {
            let _kernel = dp.kernel.lock().await;
            self.unwire(&rec, &a, dp).await?;
        }
        if let Some(m) = managers.filter(|_| a.driver == "overlay") {
            detach_endpoint(m, &a.endpoint_id)
                .await
                .map_err(|s| SandboxesError::Manager(s.message().to_string()))?;
        }
        self.commit(&rec)?;
        Ok(rec)
    }
}

impl Sandboxes {
    /// Removes sandbox namespaces (and their egress links) of ours that no
    /// record names: what a crash between two steps of `run` or `rm` can
    /// leave. Returns what it removed.
    pub async fn remove_orphans(&self, dp: &DataPath) -> Vec<String> {
        let known: std::collections::BTreeSet<String> =
            self.list().into_iter().map(|r| r.netns).collect();
        let sb_prefix = format!("{}-sb-", dp.prefix);
        let Ok(names) = crate::netns::list_with_prefix(&sb_prefix) else {
            return Vec::new();
        };
        let _kernel = dp.kernel.lock().await;
        let mut removed = Vec::new();
        for ns in names.into_iter().filter(|n| !known.contains(n)) {
            let _ = egress::detach(None, &ns);
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

impl Sandboxes {
    /// A bridge or macvlan attachment with the next free local address.
    fn local_attachment(
        &self,
        l: &crate::local_networks::LocalNetwork,
        rec: &Record,
        index: usize,
        dp: &DataPath,
    ) -> Result<Attachment, SandboxesError> {
        let bad =
            || SandboxesError::Refused(format!("local network {} is damaged; recreate it", l.name));
        let subnet: ipnet::Ipv4Net = l.subnet.parse().map_err(|_| bad())?;
        let gateway: Ipv4Addr = l.gateway.parse().map_err(|_| bad())?;
        let used: std::collections::BTreeSet<Ipv4Addr> = self
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
        let mac = overlay::mac_for(ip);
        Ok(Attachment {
            network: l.name.clone(),
            network_id: l.id.clone(),
            endpoint_id: mesh_common::id::new_id(),
            ifname: format!("eth{index}"),
            ip,
            prefix: subnet.prefix_len(),
            mac: mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            gateway,
            vni: 0,
            mtu: l
                .options
                .get("mtu")
                .and_then(|m| m.parse().ok())
                .unwrap_or(dp.underlay_mtu()),
            internal: l.internal,
            driver: l.driver.clone(),
            parent: l.options.get("parent").cloned(),
            default_route: false,
        })
    }

    /// Rebuilds the NAT and isolation table of all local bridge networks.
    /// The rules depend only on the set of networks, so this runs once per
    /// change (and once per repair pass), not per attachment; it forks
    /// `nft`, so it leaves the async worker thread while it does.
    pub fn sync_local_nat(&self, dp: &DataPath) -> Result<(), SandboxesError> {
        let specs = self.bridge_specs(dp);
        tokio::task::block_in_place(|| crate::local::sync_nat(&dp.node(), &specs))?;
        Ok(())
    }

    /// Every local bridge network, for the NAT table that covers them all.
    fn bridge_specs(&self, dp: &DataPath) -> Vec<crate::local::BridgeSpec> {
        self.local
            .list()
            .iter()
            .filter_map(|n| n.bridge_spec(dp.underlay_mtu()))
            .collect()
    }

    /// Connects one attachment in the kernel (caller holds `dp.kernel`).
    pub async fn wire(
        &self,
        rec: &Record,
        a: &Attachment,
        dp: &DataPath,
    ) -> Result<(), SandboxesError> {
        let oa = overlay_attachment(rec, a);
        match a.driver.as_str() {
            "bridge" => {
                let l = self.local.find(&a.network_id).ok_or_else(|| {
                    SandboxesError::Refused(format!("network {} is gone", a.network))
                })?;
                let spec = l.bridge_spec(dp.underlay_mtu()).ok_or_else(|| {
                    SandboxesError::Refused(format!("network {} is damaged", a.network))
                })?;
                crate::local::ensure_bridge(&dp.node(), &spec).await?;
                crate::local::attach_bridge(&dp.node(), &spec, &oa).await?;
            }
            "macvlan" => {
                let parent = a.parent.clone().unwrap_or_default();
                crate::local::attach_macvlan(&dp.node(), &parent, &oa, Some(a.gateway)).await?;
            }
            _ => {
                let spec = overlay_spec(a, dp);
                overlay::ensure_network(&dp.node(), &spec).await?;
                overlay::attach(&dp.node(), &spec, &oa).await?;
            }
        }
        Ok(())
    }

    async fn unwire(
        &self,
        rec: &Record,
        a: &Attachment,
        dp: &DataPath,
    ) -> Result<(), SandboxesError> {
        let oa = overlay_attachment(rec, a);
        match a.driver.as_str() {
            "bridge" => {
                if let Some(spec) = self
                    .local
                    .find(&a.network_id)
                    .and_then(|l| l.bridge_spec(dp.underlay_mtu()))
                {
                    crate::local::detach_bridge(&dp.node(), &spec, &oa).await?;
                }
            }
            "macvlan" => crate::local::detach_macvlan(&oa).await?,
            _ => overlay::detach(&dp.node(), a.vni, &oa).await?,
        }
        Ok(())
    }
}

/// Asks the managers for an endpoint on a cluster network.
async fn attach_endpoint(m: &Managers, req: AttachRequest) -> Result<EndpointInfo, SandboxesError> {
    m.call(|ch| {
        let req = req.clone();
        async move {
            ClusterClient::new(ch)
                .attach(req)
                .await
                .map(|r| r.into_inner())
        }
    })
    .await
    .map_err(|s| SandboxesError::Manager(s.message().to_string()))
}

/// Gives an endpoint back to the managers.
async fn detach_endpoint(m: &Managers, endpoint_id: &str) -> Result<(), tonic::Status> {
    let req = DetachRequest {
        endpoint_id: endpoint_id.to_string(),
    };
    m.call(|ch| {
        let req = req.clone();
        async move { ClusterClient::new(ch).detach(req).await.map(|_| ()) }
    })
    .await
}

/// A sandbox's networks as its resolver needs them: whose names it sees,
/// and whether each is `--internal` (a sandbox on internal networks only
/// gets nothing forwarded upstream, as it gets no egress).
fn dns_networks(rec: &Record) -> Vec<crate::dns::SandboxNetwork> {
    rec.networks
        .iter()
        .map(|a| crate::dns::SandboxNetwork::new(a.network_id.clone(), a.internal))
        .collect()
}

/// The DNS side of sandboxes: which names each network holds, and one
/// listener per sandbox.
impl Sandboxes {
    /// Starts the sandbox's DNS listener and returns its resolv.conf.
    async fn sandbox_dns(&self, rec: &Record) -> Result<String, SandboxesError> {
        self.dns
            .serve_sandbox(&rec.id, &rec.netns, dns_networks(rec))
            .await
            .map_err(|e| {
                SandboxesError::Refused(format!("cannot start DNS for {}: {e}", rec.name))
            })?;
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Ok(crate::dns::sandbox_resolv_conf(&host))
    }

    /// Keeps the managers' latest view for the DNS records.
    pub fn set_view(&self, view: &mesh_proto::NodeView) {
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = Some(view.clone());
        self.refresh_dns();
    }

    /// Rebuilds every network's names: cluster networks from the view,
    /// user-defined local networks from this node's sandboxes (the default
    /// bridge has no names, as in Docker).
    pub fn refresh_dns(&self) {
        let mut records = crate::dns::Records::default();
        if let Some(view) = self.view.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            for net in &view.networks {
                let mut r = crate::dns::NetworkRecords::new(net.id.clone());
                for e in &net.local {
                    if let Ok(ip) = e.ip.parse() {
                        r.insert_sandbox(&e.sandbox, ip);
                        for a in &e.aliases {
                            r.insert_alias(a, ip);
                        }
                    }
                }
                for p in &net.peers {
                    if let Ok(ip) = p.ip.parse() {
                        r.insert_sandbox(&p.name, ip);
                        for a in &p.aliases {
                            r.insert_alias(a, ip);
                        }
                    }
                }
                // Services: NAME is the VIP (or, in dnsrr mode, the tasks),
                // tasks.NAME always the running tasks.
                for svc in &net.services {
                    let backends: Vec<Ipv4Addr> =
                        svc.backends.iter().filter_map(|b| b.parse().ok()).collect();
                    match svc.vip.parse::<Ipv4Addr>() {
                        Ok(vip) => r.insert_alias(&svc.name, vip),
                        Err(_) => {
                            for ip in &backends {
                                r.insert_alias(&svc.name, *ip);
                            }
                        }
                    }
                    let tasks = format!("tasks.{}", svc.name);
                    r.names.entry(tasks.clone()).or_default();
                    for ip in backends {
                        r.insert_alias(&tasks, ip);
                    }
                }
                records.networks.insert(net.id.clone(), r);
            }
        }
        for rec in self.list().iter().filter(|r| r.exit_code.is_none()) {
            for a in rec.networks.iter().filter(|a| a.driver != "overlay") {
                if self.local.find(&a.network_id).is_some_and(|l| l.builtin) {
                    continue;
                }
                records
                    .networks
                    .entry(a.network_id.clone())
                    .or_insert_with(|| crate::dns::NetworkRecords::new(a.network_id.clone()))
                    .insert_sandbox(&rec.name, a.ip);
            }
        }
        self.dns.set_records(records);
    }

    /// After a daemon restart: listeners for every running sandbox again.
    pub async fn serve_dns_all(&self) {
        for rec in self
            .list()
            .iter()
            .filter(|r| r.exit_code.is_none() && !r.host_network)
        {
            if let Err(e) = self
                .dns
                .serve_sandbox(&rec.id, &rec.netns, dns_networks(rec))
                .await
            {
                warn!(sandbox = %rec.name, "cannot restart DNS: {e}");
            }
        }
        self.refresh_dns();
    }
}

impl Sandboxes {
    /// Records a changed sandbox: on disk, in the index, and in the DNS
    /// (its networks and every network's names).
    fn commit(&self, rec: &Record) -> Result<(), SandboxesError> {
        self.save(rec)?;
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(rec.id.clone(), rec.clone());
        self.dns.update_sandbox_networks(&rec.id, dns_networks(rec));
        self.refresh_dns();
        Ok(())
    }
}

/// Service tasks: sandboxes whose addresses the managers chose when they
/// placed the task, so nothing is asked of them here; and the services
/// every sandbox sees (VIP rules, names).
impl Sandboxes {
    /// Starts a task's sandbox; on failure nothing is left behind.
    pub async fn run_task(
        &self,
        task: &mesh_proto::TaskAssignment,
        dp: &DataPath,
    ) -> Result<Record, SandboxesError> {
        check_id(&task.id)?;
        let env = task
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut rec = Record {
            id: task.id.clone(),
            name: task.name.clone(),
            netns: format!("{}-sb-{}", dp.prefix, &task.id[..task.id.len().min(12)]),
            pid: 0,
            cmd: task.cmd.clone(),
            env,
            networks: Vec::new(),
            egress_ip: None,
            created_at: String::new(),
            exit_code: None,
            host_network: false,
            service: Some(task.service_id.clone()),
        };
        let built = async {
            for (i, info) in task.networks.iter().enumerate() {
                rec.networks.push(attachment(info, i, dp)?);
            }
            self.start_built(&mut rec, dp, false).await
        }
        .await;
        match built {
            Ok(()) => {
                self.commit(&rec)?;
                info!(task = %rec.name, pid = rec.pid, "task started");
                Ok(rec)
            }
            Err(e) => {
                self.teardown(&rec, dp, None).await;
                Err(e)
            }
        }
    }

    /// Stops and removes a task's sandbox (the managers own its
    /// addresses). Its output is kept for `mesh service logs`.
    pub async fn remove_task(&self, id: &str, dp: &DataPath) -> Result<(), SandboxesError> {
        check_id(id)?;
        let Some(rec) = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
        else {
            return Ok(());
        };
        // Stop first, so the whole output is in the log we keep.
        if rec.pid != 0 && rec.exit_code.is_none() {
            let pid = rec.pid;
            let _ = sandbox::stop(pid, Duration::from_secs(10)).await;
        }
        self.keep_task_log(&rec);
        let errors = self.teardown(&rec, dp, None).await;
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&rec.id);
        self.refresh_dns();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SandboxesError::Refused(format!(
                "removed task {} with errors: {}",
                rec.name,
                errors.join("; ")
            )))
        }
    }

    fn task_logs_dir(&self) -> PathBuf {
        self.dir.with_file_name("task-logs")
    }

    /// Moves a task's output aside, keeping the newest 200 logs.
    fn keep_task_log(&self, rec: &Record) {
        let dir = self.task_logs_dir();
        if crate::private_fs::create_dir(&dir).is_err() {
            return;
        }
        let from = self.dir.join(&rec.id).join("output.log");
        let _ = std::fs::rename(&from, dir.join(format!("{}.log", rec.id)));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
                .flatten()
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            if logs.len() > 200 {
                logs.sort();
                for (_, p) in &logs[..logs.len() - 200] {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    /// Where the output of a task is, whether its sandbox still exists or
    /// not; None for an ID that is not a mesh ID or a task without output.
    pub fn task_log_path(&self, id: &str) -> Option<PathBuf> {
        check_id(id).ok()?;
        let live = self.dir.join(id).join("output.log");
        let kept = self.task_logs_dir().join(format!("{id}.log"));
        [live, kept].into_iter().find(|p| p.is_file())
    }

    /// Services on the sandbox's overlay networks, from the managers' view,
    /// in VIP mode: what its `mesh_vip` table must balance.
    pub fn vip_services_for(&self, rec: &Record) -> Vec<crate::vip::VipService> {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let Some(view) = view.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for net in view
            .networks
            .iter()
            .filter(|n| rec.networks.iter().any(|a| a.network_id == n.id))
        {
            for svc in &net.services {
                let Ok(vip) = svc.vip.parse() else {
                    continue; // dnsrr
                };
                out.push(crate::vip::VipService {
                    name: svc.name.clone(),
                    vip,
                    backends: svc.backends.iter().filter_map(|b| b.parse().ok()).collect(),
                });
            }
        }
        out
    }
}

impl Sandboxes {
    /// Brings every running sandbox's VIP table in line with the view.
    pub fn sync_vips(&self, records: &[Record]) {
        let live: Vec<&Record> = records
            .iter()
            .filter(|r| {
                r.exit_code.is_none()
                    && !r.host_network
                    && r.networks.iter().any(|a| a.driver == "overlay")
            })
            .collect();
        let mut todo = Vec::new();
        let mut rendered = BTreeMap::new();
        {
            let applied = self.vip_applied.lock().unwrap_or_else(|e| e.into_inner());
            for rec in &live {
                let services = self.vip_services_for(rec);
                let text = crate::vip::render(&services);
                if applied.get(&rec.netns) != Some(&text) {
                    todo.push((rec.netns.clone(), services));
                }
                rendered.insert(rec.netns.clone(), text);
            }
        }
        let failed = if todo.is_empty() {
            Vec::new()
        } else {
            tokio::task::block_in_place(|| crate::vip::sync_many(&todo))
        };
        let mut applied = self.vip_applied.lock().unwrap_or_else(|e| e.into_inner());
        for (ns, e) in &failed {
            warn!(netns = %ns, "cannot apply service VIP rules, will retry: {e}");
            rendered.remove(ns);
        }
        *applied = rendered;
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
    fn task_log_path_refuses_bad_ids() {
        let root = std::env::temp_dir().join(format!("mesh-sbx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("sandboxes");
        std::fs::create_dir_all(&dir).expect("mkdir");
        // A file a `../` ID would reach.
        std::fs::write(root.join("output.log"), b"secret").expect("write");
        let sbx = Sandboxes::load(
            dir.clone(),
            std::sync::Arc::new(crate::local_networks::LocalNetworks::load(
                root.join("networks.json"),
                "t",
            )),
            crate::dns::DnsServer::new(Vec::new(), Duration::from_secs(1)),
        )
        .expect("load");
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
}
