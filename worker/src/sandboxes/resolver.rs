//! Each sandbox's resolver at 127.0.0.11: its listener, kept serving, and
//! the names the node's DNS server answers.

use tracing::warn;

use super::{Record, Sandboxes, names};
use crate::drivers::{Fault, Repair};

/// A sandbox's networks as its resolver needs them: whose names it sees,
/// and whether each is `--internal` (a sandbox on internal networks only
/// gets nothing forwarded upstream, as it gets no egress).
pub(super) fn dns_networks(rec: &Record) -> Vec<crate::dns::SandboxNetwork> {
    rec.networks
        .iter()
        .map(|a| crate::dns::SandboxNetwork::new(a.network_id.clone(), a.internal))
        .collect()
}

impl Sandboxes {
    /// Keeps the managers' latest view for the VIP tables and the DNS
    /// records. The names are not published here: the pass does that
    /// (`refresh_dns`) once the VIP tables have the view's services, or a
    /// client resolving a new service at once would send its SYN to a VIP
    /// its sandbox does not route yet, and wait a retransmission (1 s) or
    /// its own timeout.
    pub fn set_view(&self, view: &mesh_proto::NodeView) {
        let mut held = self.view.lock().unwrap_or_else(|e| e.into_inner());
        *held = Some(view.clone());
        // Rendered from the view just replaced (see `vip_text_for`).
        self.vip_texts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Rebuilds every network's names from the view and this node's
    /// sandboxes.
    pub fn refresh_dns(&self) {
        let sandboxes = self.list();
        let records = {
            let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
            names::records(view.as_ref(), &sandboxes, |id| {
                self.local.find(id).is_some_and(|l| l.builtin)
            })
        };
        self.dns.set_records(records);
    }

    /// After a daemon restart: listeners for every running sandbox again.
    pub async fn serve_dns_all(&self) {
        for f in self.repair_dns(&self.list()).await.faults {
            warn!("cannot restart DNS: {f}");
        }
        self.refresh_dns();
    }

    /// Every running sandbox with a resolver has its listener: serving is
    /// idempotent, and brings back one whose loops ended.
    pub async fn repair_dns(&self, records: &[Record]) -> Repair {
        let mut out = Repair::default();
        for rec in records.iter().filter(|r| r.running() && r.has_dns()) {
            if let Err(e) = self
                .dns
                .serve_sandbox(&rec.id, &rec.netns, dns_networks(rec))
                .await
            {
                out.faults
                    .push(Fault::new(format!("sandbox {} DNS", rec.name), e));
            }
        }
        out
    }
}
