//! `mesh run` and `mesh rm` of standalone sandboxes: endpoints first, then
//! the kernel, then the process; everything or nothing. Service tasks share
//! the kernel half ([`Sandboxes::start_built`]) and the teardown.

use std::time::Duration;

use mesh_common::model::DriverKind;
use tracing::{info, warn};

use super::{DataPath, Record, RunSpec, Sandboxes, SandboxesError, files, record, wiring};
use crate::drivers::{self, Egress};
use crate::managers::Managers;
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
        let built = self.build(&mut rec, &spec, dp, managers).await;
        let result = match built {
            Ok(()) => self.commit(&rec).map(|()| rec.clone()),
            Err(e) => Err(e),
        };
        match result {
            Ok(rec) => {
                self.release_name(&name);
                info!(sandbox = %rec.name, pid = rec.pid, "sandbox started");
                Ok(rec)
            }
            Err(e) => {
                self.teardown(&rec, dp, managers).await;
                self.release_name(&name);
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
        self.start_built(rec, dp, none).await
    }

    /// The kernel and process half of `run`, once every attachment has its
    /// address: links, egress, DNS, VIP rules, then the process.
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
        let _kernel = dp.kernel.lock().await;
        if rec.host_network {
            rec.netns = format!("{}-host", dp.prefix);
            crate::netns::attach_current(&rec.netns)?;
        } else {
            sandbox::create_netns(&rec.netns).await?;
        }
        let cx = self.ctx(dp);
        for a in &rec.networks {
            drivers::wire(&cx, rec, a).await?;
        }
        for kind in wiring::kinds_of(rec) {
            drivers::driver(kind).settle(&cx).await?;
        }
        // Egress like docker_gwbridge for overlay-only sandboxes, unless
        // every network is --internal.
        let local_route = rec.networks.iter().any(|a| !a.driver.is_cluster());
        if !rec.host_network && !none && !local_route && rec.networks.iter().any(|a| !a.internal) {
            let ip = self.next_egress_ip()?;
            Egress.attach(rec, ip)?;
            rec.egress_ip = Some(ip);
        }
        if !rec.host_network && !none {
            let services = self.vip_services_for(rec);
            tokio::task::block_in_place(|| crate::vip::sync(&rec.netns, &services))
                .map_err(|e| SandboxesError::Refused(format!("cannot set up service VIPs: {e}")))?;
        }
        let dir = self.store.create_dir(&rec.id)?;
        rec.created_at = files::now();
        rec.pid = sandbox::start(&sandbox::SandboxSpec {
            name: rec.name.clone(),
            netns: rec.netns.clone(),
            cmd: rec.cmd.clone(),
            env: rec.env.clone(),
            hosts: files::hosts_file(rec),
            resolv_conf: if rec.host_network || none {
                files::host_resolv_conf(&files::read_host_resolv_conf())
            } else {
                self.sandbox_dns(rec).await?
            },
            dir,
        })?;
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
        // The resolver under the kernel lock: a reconcile pass between the
        // two would serve it again, in a namespace about to go.
        let kernel = dp.kernel.lock().await;
        self.dns.stop_sandbox(&rec.id).await;
        let cx = self.ctx(dp);
        for a in &rec.networks {
            if let Err(e) = drivers::driver(a.driver).detach(&cx, rec, a).await {
                errors.push(e.to_string());
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
        drop(kernel);
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
        let errors = self.teardown(&rec, dp, managers).await;
        self.forget(&rec.id);
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
