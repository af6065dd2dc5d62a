//! `mesh run` and `mesh rm` of standalone sandboxes: endpoints first, then
//! the kernel, then the process; everything or nothing. Service tasks share
//! the kernel half ([`Sandboxes::start_built`]) and the teardown.

use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_common::model::DriverKind;
use mesh_common::ports::PortBinding;
use tracing::{debug, info, warn};

use super::{
    Attachment, DataPath, Record, RunSpec, Sandboxes, SandboxesError, files, record, wiring,
};
use crate::drivers::{self, Egress, Repair};
use crate::firewall::{self, ports::PortRule, ports::PortsTable};
use crate::managers::Managers;
use crate::ports::Published;
use crate::sandbox;

impl Sandboxes {
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
        if !record::valid_name(&name) {
            return Err(SandboxesError::Refused(format!(
                "invalid sandbox name {name:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit"
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
        self.claim_name(&name)?;
        let ports = match self.claim_ports(&name, &spec.ports) {
            Ok(p) => p,
            Err(e) => {
                self.release_name(&name);
                return Err(e);
            }
        };
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
            ports,
        };
        let built = self.build(&mut rec, &spec, dp, managers).await;
        let mut result = match built {
            Ok(()) => self.commit(&rec).map(|()| rec.clone()),
            Err(e) => Err(e),
        };
        // The ports answer before `run` returns, not at the next pass.
        if result.is_ok()
            && !rec.ports.is_empty()
            && let Err(e) = self.sync_ports(dp).await
        {
            self.forget(&rec);
            result = Err(e);
        }
        match result {
            Ok(rec) => {
                self.release_ports(&name);
                self.release_name(&name);
                info!(sandbox = %rec.name, pid = rec.pid, "sandbox started");
                Ok(rec)
            }
            Err(e) => {
                self.teardown(&rec, dp, managers).await;
                self.release_ports(&name);
                self.release_name(&name);
                Err(e)
            }
        }
    }

    /// Takes the host side of `wanted` for sandbox `name`, under the
    /// records' lock so two runs cannot both get one port; refuses with
    /// Docker's words. Give it back with [`Self::release_ports`] once the
    /// record holds it (or the run failed).
    fn claim_ports(
        &self,
        name: &str,
        wanted: &[PortBinding],
    ) -> Result<Vec<Published>, SandboxesError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let records = self.lock_records();
        let mut building = self
            .building_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let taken: Vec<Published> = records
            .values()
            .flat_map(|r| r.ports.iter().copied())
            .chain(building.values().flatten().copied())
            .collect();
        let got = crate::ports::allocate(wanted, &taken, crate::ports::probe)
            .map_err(|e| SandboxesError::Refused(e.to_string()))?;
        building.insert(name.to_string(), got.clone());
        Ok(got)
    }

    fn release_ports(&self, name: &str) {
        self.building_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Where the published ports of `rec` go: its address on its first
    /// bridge network, else its egress address; with the node-side
    /// interface that reaches it.
    fn port_target(&self, rec: &Record, dp: &DataPath) -> Option<(Ipv4Addr, String)> {
        if let Some(a) = rec.networks.iter().find(|a| a.driver == DriverKind::Bridge) {
            let spec = self
                .local
                .find(&a.network_id)?
                .bridge_spec(dp.underlay_mtu())?;
            return Some((a.ip, spec.bridge));
        }
        rec.egress_ip
            .map(|ip| (ip, crate::egress::GWBRIDGE.to_string()))
    }

    /// The `ip mesh_ports` rules every record with ports needs.
    fn port_rules(&self, dp: &DataPath) -> Vec<PortRule> {
        let mut rules = Vec::new();
        for rec in self.lock_records().values() {
            if rec.ports.is_empty() {
                continue;
            }
            let Some((target, iface)) = self.port_target(rec, dp) else {
                warn!(sandbox = %rec.name, "published ports without a bridge network or egress: not forwarded");
                continue;
            };
            for p in &rec.ports {
                rules.push(PortRule {
                    host_ip: p.host_ip,
                    host_port: p.host_port,
                    protocol: p.protocol,
                    target,
                    target_port: p.container_port,
                    iface: iface.clone(),
                    sandbox: rec.name.clone(),
                });
            }
        }
        rules
    }

    /// Makes `ip mesh_ports` exactly what the records need, now (after a
    /// run or rm, and at daemon start, before any view arrives).
    pub async fn sync_ports(&self, dp: &DataPath) -> Result<(), SandboxesError> {
        let rules = self.port_rules(dp);
        let _kernel = dp.kernel.lock().await;
        tokio::task::block_in_place(|| {
            route_localnet(&rules)?;
            firewall::sync(None, &PortsTable { rules: &rules })
                .map_err(|e| SandboxesError::Refused(format!("cannot publish ports: {e}")))
        })
    }

    /// The reconcile pass's step: rebuild `ip mesh_ports` if it drifted.
    /// The caller holds the kernel lock.
    pub fn repair_ports(&self, dp: &DataPath) -> Repair {
        let rules = self.port_rules(dp);
        let mut r = Repair::default();
        let scope = || format!("table {}", crate::firewall::ports::TABLE);
        let done = tokio::task::block_in_place(|| {
            route_localnet(&rules)?;
            firewall::repair(None, &PortsTable { rules: &rules })
                .map_err(|e| SandboxesError::Refused(e.to_string()))
        });
        match done {
            Ok(firewall::Drift::InSync) => {}
            Ok(found) => {
                info!(?found, "rebuilt table {}", crate::firewall::ports::TABLE);
                r.repairs += 1;
            }
            Err(e) => r.fail(scope, e),
        }
        r
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
            if let Some(l) = self.local.find(net) {
                let kind = l.kind().map_err(SandboxesError::Refused)?;
                if !drivers::driver(kind).has_interface() {
                    if requested.len() > 1 {
                        return Err(SandboxesError::Refused(format!(
                            "a sandbox on the {} network cannot be connected to other networks",
                            l.name
                        )));
                    }
                    rec.host_network = kind == DriverKind::Host;
                    none = kind == DriverKind::None;
                    continue;
                }
                let a = self.local_attachment(&l, rec, dp)?;
                rec.networks.push(a);
                continue;
            }
            let a = wiring::cluster_attachment(managers, rec, net, &spec.aliases, dp).await?;
            rec.networks.push(a);
        }
        // Ports go to a bridge address, or to the egress address an
        // overlay-only sandbox gets (as `start_built` decides it).
        let bridge = rec.networks.iter().any(|a| a.driver == DriverKind::Bridge);
        if !rec.ports.is_empty() && !bridge && !gets_egress(rec, none) {
            return Err(SandboxesError::Refused(
                "publishing a port needs a bridge network (or an overlay with egress); host, none, macvlan and internal networks cannot publish".into(),
            ));
        }
        self.start_built(rec, dp, none).await
    }

    /// The kernel and process half of `run`, once every attachment has its
    /// address: links, egress, DNS, VIP rules, then the process.
    ///
    /// Starts run concurrently, at most [`super::CONCURRENT_STARTS`] at once.
    /// The kernel lock (`DataPath::kernel`) is held only around what is
    /// node-wide and shared (a network's namespace, bridge and VXLAN; the
    /// bridge networks' NAT; `mesh_gwbridge`); the sandbox's own namespace,
    /// its veths, VIP table and process need no lock.
    pub(super) async fn start_built(
        &self,
        rec: &mut Record,
        dp: &DataPath,
        none: bool,
    ) -> Result<(), SandboxesError> {
        // The first local (bridge/macvlan) network carries the default route.
        if let Some(a) = rec.networks.iter_mut().find(|a| !a.driver.is_cluster()) {
            a.default_route = true;
        }
        let mut steps = crate::timing::Steps::new();
        let _slot = self
            .starts
            .acquire()
            .await
            .map_err(|_| SandboxesError::Refused("the daemon is shutting down".into()))?;
        steps.mark("slot_wait");
        if rec.host_network {
            rec.netns = format!("{}-host", dp.prefix);
            let _kernel = dp.kernel.lock().await;
            crate::netns::attach_current(&rec.netns)?;
        } else {
            sandbox::create_netns(&rec.netns).await?;
        }
        steps.mark("netns");
        // The resolver needs only the namespace: it is served while the
        // links are made, not after (the DNS server serves one sandbox at a
        // time, and a start used to spend most of its time waiting there).
        let dns = (!rec.host_network && !none).then(|| {
            let dns = self.dns.clone();
            let (id, netns) = (rec.id.clone(), rec.netns.clone());
            let networks = super::resolver::dns_networks(rec);
            tokio::spawn(async move { dns.serve_sandbox(&id, &netns, networks).await })
        });
        let wired = self.wire_kernel(rec, dp, none, &mut steps).await;
        // Awaited whatever happened: a teardown must find the resolver to
        // stop it, not have it appear after.
        let served = match dns {
            Some(h) => Some(h.await),
            None => None,
        };
        steps.mark("dns_wait");
        wired?;
        let dns_failed = |e: &dyn std::fmt::Display| {
            SandboxesError::Refused(format!("cannot start DNS for {}: {e}", rec.name))
        };
        let resolv_conf = match served {
            None => files::host_resolv_conf(&files::read_host_resolv_conf()),
            Some(Ok(Ok(()))) => crate::dns::sandbox_resolv_conf(&files::read_host_resolv_conf()),
            Some(Ok(Err(e))) => return Err(dns_failed(&e)),
            Some(Err(e)) => return Err(dns_failed(&e)),
        };
        let dir = self.store.create_dir(&rec.id)?;
        rec.created_at = files::now();
        rec.pid = sandbox::start(&sandbox::SandboxSpec {
            name: rec.name.clone(),
            netns: rec.netns.clone(),
            cmd: rec.cmd.clone(),
            env: rec.env.clone(),
            hosts: files::hosts_file(rec),
            resolv_conf,
            dir,
        })?;
        steps.mark("spawn");
        debug!(sandbox = %rec.name, total_ms = format!("{:.1}", steps.total_ms()), "start: {}", steps.summary());
        Ok(())
    }

    /// The links, egress and VIP table of a sandbox whose namespace exists.
    async fn wire_kernel(
        &self,
        rec: &mut Record,
        dp: &DataPath,
        none: bool,
        steps: &mut crate::timing::Steps,
    ) -> Result<(), SandboxesError> {
        let cx = self.ctx(dp);
        // A network another start ensured since the last pass is not
        // ensured again: each would wait for the kernel lock, which a pass
        // holds for its whole node-wide half.
        let todo: Vec<&Attachment> = rec
            .networks
            .iter()
            .filter(|a| !self.is_ensured(a))
            .collect();
        if !todo.is_empty() {
            let _kernel = dp.kernel.lock().await;
            for a in todo {
                drivers::driver(a.driver).ensure(&cx, a).await?;
                self.mark_ensured(a);
            }
        }
        steps.mark("ensure");
        for a in &rec.networks {
            drivers::driver(a.driver).attach(&cx, rec, a).await?;
        }
        steps.mark("attach");
        let settling: Vec<_> = wiring::kinds_of(rec)
            .into_iter()
            .map(drivers::driver)
            .filter(|d| d.settles())
            .collect();
        if !settling.is_empty() {
            let _kernel = dp.kernel.lock().await;
            for d in settling {
                d.settle(&cx).await?;
            }
        }
        steps.mark("settle");
        if gets_egress(rec, none) {
            let ip = self.reserve_egress_ip()?;
            // Recorded at once, so a failure below gives it back.
            rec.egress_ip = Some(ip);
            self.attach_egress(rec, ip, dp).await?;
        }
        steps.mark("egress");
        if !rec.host_network && !none {
            let text = self.vip_text_for(rec);
            tokio::task::block_in_place(|| crate::vip::apply(&rec.netns, &text))
                .map_err(|e| SandboxesError::Refused(format!("cannot set up service VIPs: {e}")))?;
            self.vip_synced(&rec.netns, text);
        }
        steps.mark("vip");
        Ok(())
    }

    /// The sandbox's port on `mesh_gwbridge`. The bridge is made (under the
    /// kernel lock) by the first start only; if it went missing since, the
    /// port fails, and the bridge is made again before one more try.
    async fn attach_egress(
        &self,
        rec: &Record,
        ip: Ipv4Addr,
        dp: &DataPath,
    ) -> Result<(), SandboxesError> {
        use std::sync::atomic::Ordering;
        if self.gwbridge_ready.load(Ordering::Acquire) && Egress.attach_port(rec, ip).is_ok() {
            return Ok(());
        }
        {
            let _kernel = dp.kernel.lock().await;
            Egress.ensure_bridge()?;
            self.gwbridge_ready.store(true, Ordering::Release);
        }
        Egress.attach_port(rec, ip)?;
        Ok(())
    }

    /// Undoes whatever exists of a sandbox; keeps going past failures.
    pub(super) async fn teardown(
        &self,
        rec: &Record,
        dp: &DataPath,
        managers: Option<&Managers>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        // The process first, without the kernel lock: stopping may take
        // seconds.
        if rec.pid != 0
            && let Err(e) = sandbox::stop(rec.pid, Duration::from_secs(5)).await
        {
            errors.push(e.to_string());
        }
        // Out of the records before anything is undone, so no reconcile pass
        // serves its resolver again or rewires it in a namespace about to
        // go: a pass lists the records while it holds the gate, so once this
        // has the gate, a pass that listed the sandbox has ended and later
        // ones do not see it. Held only for that: a pass must not wait
        // behind teardowns queued for the kernel lock (one waited 14 s
        // behind 300 of them).
        {
            let _gate = self.gate.read().await;
            self.lock_records().remove(&rec.id);
        }
        self.dns.stop_sandbox(&rec.id).await;
        let cx = self.ctx(dp);
        // An overlay detach deletes only this sandbox's own veth, so it
        // needs no node-wide lock: deleting a device waits for the kernel's
        // RCU grace periods (~75 ms here), and 100 teardowns queued one by
        // one for the lock made `service rm` of 300 tasks take 8 s and the
        // next pass wait 7.5 s. The pass cannot re-attach it: the sandbox
        // left the records above. Other drivers' detaches keep the lock.
        for a in rec
            .networks
            .iter()
            .filter(|a| a.driver == DriverKind::Overlay)
        {
            if let Err(e) = drivers::driver(a.driver).detach(&cx, rec, a).await {
                errors.push(e.to_string());
            }
        }
        if rec.networks.iter().any(|a| a.driver != DriverKind::Overlay) {
            let _kernel = dp.kernel.lock().await;
            for a in rec
                .networks
                .iter()
                .filter(|a| a.driver != DriverKind::Overlay)
            {
                if let Err(e) = drivers::driver(a.driver).detach(&cx, rec, a).await {
                    errors.push(e.to_string());
                }
            }
        }
        if rec.egress_ip.is_some()
            && let Err(e) = Egress.detach(&rec.netns)
        {
            errors.push(e.to_string());
        }
        // The host namespace is shared: only a sandbox's own one goes.
        if !rec.host_network
            && let Err(e) = sandbox::delete_netns(&rec.netns).await
        {
            errors.push(e.to_string());
        }
        self.vip_forget(&rec.netns);
        if let Some(ip) = rec.egress_ip {
            self.release_egress_ip(ip);
        }
        if let Some(m) = managers {
            for a in rec.networks.iter().filter(|a| a.driver.is_cluster()) {
                let r = wiring::detach_endpoint(m, &a.endpoint_id).await;
                if let Err(s) = r {
                    errors.push(format!("detach from {}: {}", a.network, s.message()));
                }
            }
        }
        self.store.remove(&rec.id);
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
        if rec.running() && !force {
            return Err(SandboxesError::Refused(format!(
                "sandbox {} is running: stop it first or use `mesh rm -f {}`",
                rec.name, rec.name
            )));
        }
        let mut errors = self.teardown(&rec, dp, managers).await;
        self.forget(&rec);
        if !rec.ports.is_empty()
            && let Err(e) = self.sync_ports(dp).await
        {
            errors.push(e.to_string());
        }
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

/// Whether a sandbox gets an address on `mesh_gwbridge` (egress like
/// docker_gwbridge): overlay-only sandboxes, unless every network is
/// --internal; a task without networks gets it too, as every Swarm task
/// does (its host-mode ports arrive there). Decided before the kernel is
/// touched (may it publish ports?) and when wiring it, alike.
fn gets_egress(rec: &Record, none: bool) -> bool {
    let local_route = rec.networks.iter().any(|a| !a.driver.is_cluster());
    let no_networks_task = rec.networks.is_empty() && rec.service.is_some();
    !rec.host_network
        && !none
        && !local_route
        && (no_networks_task || rec.networks.iter().any(|a| !a.internal))
}

/// `route_localnet=1` on every interface a published port is reached
/// through, so `127.0.0.1:PORT` on the node can be routed to a sandbox
/// (and then masqueraded). Never turned off: other ports may rely on it.
fn route_localnet(rules: &[PortRule]) -> Result<(), SandboxesError> {
    let items: Vec<(String, &str)> = rules
        .iter()
        .map(|r| r.iface.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|iface| (format!("ipv4/conf/{iface}/route_localnet"), "1"))
        .collect();
    crate::sysctl::ensure(None, &items).map_err(|e| match e {
        crate::sysctl::SysctlError::Io { path, source, .. } => SandboxesError::Io {
            what: "turn on route_localnet in",
            path: path.into(),
            source,
        },
        e => SandboxesError::Refused(e.to_string()),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_common::model::Protocol;

    use super::*;

    fn rec(drivers: &[(DriverKind, bool)], service: bool) -> Record {
        let networks = drivers
            .iter()
            .map(|(driver, internal)| super::super::Attachment {
                network: "n".into(),
                network_id: "n".into(),
                endpoint_id: "e".into(),
                ifname: "eth0".into(),
                ip: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                mac: String::new(),
                gateway: Ipv4Addr::new(10, 0, 0, 1),
                vni: 0,
                mtu: 1450,
                internal: *internal,
                driver: *driver,
                parent: None,
                default_route: false,
                encrypted: false,
            })
            .collect();
        Record {
            id: "i".into(),
            name: "s".into(),
            netns: "ns".into(),
            pid: 0,
            cmd: Vec::new(),
            env: Vec::new(),
            networks,
            egress_ip: None,
            created_at: String::new(),
            exit_code: None,
            host_network: false,
            service: service.then(|| "svc".into()),
            ports: Vec::new(),
        }
    }

    #[test]
    fn egress_for_overlay_only_sandboxes_and_network_less_tasks() {
        use DriverKind::{Bridge, Overlay};
        assert!(gets_egress(&rec(&[(Overlay, false)], false), false));
        assert!(gets_egress(
            &rec(&[(Overlay, true), (Overlay, false)], false),
            false
        ));
        assert!(!gets_egress(&rec(&[(Overlay, true)], false), false));
        assert!(!gets_egress(
            &rec(&[(Overlay, false), (Bridge, false)], false),
            false
        ));
        assert!(!gets_egress(&rec(&[(Overlay, false)], false), true), "none");
        assert!(
            gets_egress(&rec(&[], true), false),
            "a task without networks"
        );
        assert!(!gets_egress(&rec(&[], false), false));
        let mut host = rec(&[], true);
        host.host_network = true;
        assert!(!gets_egress(&host, false));
    }

    #[test]
    fn a_port_is_claimed_once_until_released() {
        let root = std::env::temp_dir().join(format!("mesh-sbp-{}", std::process::id()));
        let sbx = Sandboxes::load(
            root.join("sandboxes"),
            Arc::new(crate::local_networks::LocalNetworks::load(
                root.join("networks.json"),
                "t",
            )),
            crate::dns::DnsServer::new(Vec::new(), Duration::from_secs(1)),
        )
        .expect("load");
        // A port no process holds: the probe binds it for a moment.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let want = |ip: Option<Ipv4Addr>| {
            vec![PortBinding {
                host_ip: ip,
                host_port: Some(free),
                container_port: 80,
                protocol: Protocol::Tcp,
            }]
        };
        let got = sbx
            .claim_ports("a", &want(Some(Ipv4Addr::LOCALHOST)))
            .expect("first");
        assert_eq!(got[0].host_port, free);
        let e = sbx
            .claim_ports("b", &want(None))
            .expect_err("overlaps")
            .to_string();
        assert_eq!(
            e,
            format!("Bind for 0.0.0.0:{free} failed: port is already allocated")
        );
        sbx.release_ports("a");
        sbx.claim_ports("b", &want(None)).expect("after release");
        sbx.release_ports("b");
        let _ = std::fs::remove_dir_all(&root);
    }
}
