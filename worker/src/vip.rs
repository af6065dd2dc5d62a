//! Service virtual IPs, load-balanced inside each client sandbox.
//!
//! Swarm gives a service one VIP per network; a connection from a sandbox
//! to that VIP must reach one of the service's running tasks. The kernel we
//! target has no IPVS, so, as kube-proxy's nftables mode, each client
//! sandbox gets a table of its own, `ip mesh_vip`, with:
//!
//! - a nat chain hooked at `output` (the traffic is generated in the
//!   sandbox), one rule per service with tasks:
//!   `ip daddr VIP dnat to numgen inc mod N map { 0 : b0, 1 : b1, ... }`.
//!   NAT chains only see the first packet of a connection, so `numgen inc`
//!   (one counter per rule) spreads connections round robin and conntrack
//!   keeps each connection on its task. Every protocol is translated, ICMP
//!   echo included: a ping to the VIP is answered by one of the tasks, which
//!   is what Docker users expect from a VIP (Docker binds the VIP in the
//!   sandbox and answers locally; we cannot without owning its addresses).
//! - a filter chain at `output` refusing connections to the VIPs of
//!   services without tasks: TCP reset, ICMP port unreachable otherwise, so
//!   the client fails at once instead of waiting for a timeout.
//!
//! The table itself is built by `crate::firewall::vip`; this module says
//! which namespaces get it. It is replaced whole in one nftables batch per
//! namespace (in process where libnftables loads, see
//! `crate::firewall::libnft`); [`render`] tells callers when a namespace is
//! already up to date, [`drift`] whether the kernel's copy was changed
//! behind our back, and [`sync_many`] updates many namespaces at once.

use std::io;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::firewall::{self, Drift, FirewallError, vip::VipTable};

/// Our table (family `ip`) in each client sandbox.
pub use crate::firewall::vip::TABLE;

/// Namespaces updated at once by [`sync_many`]. An update costs about
/// 1 ms of CPU (libnftables in process) and then waits out the kernel's
/// RCU grace period (about 12 ms on the lab machine) for the table it
/// replaced: waiting is what most of them do, so many go at once.
const PARALLEL: usize = 16;

/// One service as a client sandbox sees it on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipService {
    /// Shown in the rule's comment, for whoever reads `nft list`.
    pub name: String,
    pub vip: Ipv4Addr,
    /// Addresses of the running tasks on this network; order and duplicates
    /// do not matter.
    pub backends: Vec<Ipv4Addr>,
}

/// Makes table `ip mesh_vip` in namespace `ns` hold exactly these services:
/// created if missing, replaced atomically otherwise (one `nft` run), so a
/// sandbox never sees half an update. Replacing restarts the round robin;
/// established connections keep their task (conntrack).
pub fn sync(ns: &str, services: &[VipService]) -> io::Result<()> {
    firewall::sync(Some(ns), &VipTable { services }).map_err(|e| in_ns(ns, e))
}

/// Applies a ruleset [`render`] made in `ns`: what [`sync`] does, for a
/// table rendered once and applied to many namespaces.
pub fn apply(ns: &str, rendered: &str) -> io::Result<()> {
    firewall::apply_text(Some(ns), rendered).map_err(|e| in_ns(ns, e))
}

/// Removes the table from `ns`; a table that is not there is fine.
pub fn remove(ns: &str) -> io::Result<()> {
    firewall::remove(Some(ns), firewall::vip::ID).map_err(|e| in_ns(ns, e))
}

/// Whether the table in `ns` still is what [`sync`] made for `services`
/// (see `crate::firewall::drift` for what is compared). Changes nothing.
pub fn drift(ns: &str, services: &[VipService]) -> io::Result<Drift> {
    firewall::drift(Some(ns), &VipTable { services }).map_err(|e| in_ns(ns, e))
}

/// The ruleset [`sync`] would apply, as its JSON text: equal inputs (in any
/// order, duplicates aside) give equal strings, so callers can skip
/// namespaces whose last sync rendered the same.
pub fn render(services: &[VipService]) -> String {
    let table = VipTable { services };
    match firewall::batch(&table).and_then(|b| firewall::encode(firewall::vip::ID, b)) {
        Ok(json) => json,
        // Only for input `sync` refuses too; never equal to a real ruleset.
        Err(e) => format!("error: {e}"),
    }
}

/// [`apply`] of rendered tables in many namespaces, at most [`PARALLEL`] at a time. Returns the
/// namespaces that failed with their errors; the others are up to date.
pub fn sync_many(items: &[(String, Arc<str>)]) -> Vec<(String, io::Error)> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let worker = || {
        while let Some((ns, rendered)) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(e) = apply(ns, rendered) {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((ns.clone(), e));
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(worker);
        }
    });
    failed.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// The error as callers of this module know it: an `io::Error` naming the
/// table and the namespace.
fn in_ns(ns: &str, e: FirewallError) -> io::Error {
    let kind = match &e {
        FirewallError::NoNft(source) => source.kind(),
        FirewallError::Invalid { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("table {TABLE} in namespace {ns}: {e}"))
}
