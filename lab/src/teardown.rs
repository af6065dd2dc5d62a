//! Removing a lab, also half-made or crashed: daemons politely first, then
//! every process left in its namespaces or the daemons' sessions, then the
//! namespaces and files. It keeps going past failures and reports them all.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::process::Child;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::{LabError, Result};
use crate::names;
use crate::registry::{lab_dir, owned_netns};
use crate::spec::{LabHost, LabNode};
use crate::sys;

/// How long a daemon gets to exit after SIGTERM before it is SIGKILLed:
/// long enough to remove what it made, as Docker's default stop timeout.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(10);

/// Reaps daemons this process started that have exited, so they do not
/// linger as zombies.
pub(crate) fn reap(children: &mut HashMap<String, Child>) {
    children.retain(|_, c| matches!(c.try_wait(), Ok(None)));
}

/// Namespaces the lab's daemons made for networks and sandboxes: each
/// daemon names them with the prefix kept in its state dir (`instance`), and
/// a sandbox's processes live in them, outside the daemon's session.
fn daemon_netns(nodes: &[LabNode]) -> Vec<String> {
    let prefixes: Vec<String> = nodes
        .iter()
        .filter_map(|n| fs::read_to_string(n.state_dir.join("instance")).ok())
        .map(|id| format!("mesh{}-", id.trim()))
        .filter(|p| p.len() > "mesh-".len())
        .collect();
    let Ok(entries) = fs::read_dir(sys::NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|ns| prefixes.iter().any(|p| ns.starts_with(p.as_str())))
        .collect()
}

pub(crate) fn teardown(
    name: &str,
    nodes: &[LabNode],
    hosts: &[LabHost],
    children: &mut HashMap<String, Child>,
) -> Result<()> {
    let mut problems = Vec::new();

    // Daemons first, politely, so they can remove what they made.
    let mut daemons = Vec::new();
    let mut members = Vec::new();
    for n in nodes {
        for &old in &n.previous_pids {
            // Its pid number stays reserved while its session has members.
            if sys::proc_info(old).is_none() {
                members.extend(sys::session_members(old));
            }
        }
        let Some(pid) = n.pid else { continue };
        let Some(start) = n.pid_start.or_else(|| sys::proc_info(pid).map(|i| i.start)) else {
            members.extend(sys::session_members(pid));
            continue;
        };
        if !sys::alive(pid, Some(start)) {
            // A dead daemon's pid stays reserved while its session has members
            // (its sandboxes); if nobody holds the pid now, those are ours.
            if sys::proc_info(pid).is_none() {
                members.extend(sys::session_members(pid));
            }
            continue;
        }
        members.extend(sys::session_members(pid));
        // A paused daemon (`mesh lab pause`) must run to handle SIGTERM.
        let _ = sys::signal(pid, Some(start), Signal::SIGCONT);
        match sys::signal(pid, Some(start), Signal::SIGTERM) {
            Ok(()) => daemons.push((pid, start)),
            Err(e) => problems.push(format!("{}: {e}", n.name)),
        }
    }
    for (pid, start) in sys::wait_gone(&daemons, DAEMON_STOP_GRACE) {
        tracing::warn!(
            lab = name,
            pid,
            "daemon did not exit on SIGTERM; killing it"
        );
        if let Err(e) = sys::signal(pid, Some(start), Signal::SIGKILL) {
            problems.push(e.to_string());
        }
    }
    reap(children);

    // Then everything else living in the lab's namespaces or the daemons' sessions.
    let mut namespaces: BTreeSet<String> = owned_netns(name).into_iter().collect();
    namespaces.extend(nodes.iter().map(|n| n.netns.clone()));
    // Hosts run no daemon, but what was started in them (servers, clients) dies here too.
    namespaces.extend(hosts.iter().map(|h| h.netns.clone()));
    namespaces.extend(daemon_netns(nodes));
    namespaces.insert(names::underlay_netns(name));
    namespaces.retain(|ns| sys::netns_path(ns).exists());
    let mut left = Vec::new();
    for _ in 0..3 {
        let mut procs: Vec<(i32, u64)> = members
            .iter()
            .copied()
            .filter(|&(p, s)| sys::alive(p, Some(s)))
            .collect();
        for ns in &namespaces {
            procs.extend(sys::netns_members(ns));
        }
        procs.sort_unstable();
        procs.dedup();
        if procs.is_empty() {
            left.clear();
            break;
        }
        for &(p, s) in &procs {
            let _ = sys::signal(p, Some(s), Signal::SIGKILL);
        }
        left = sys::wait_gone(&procs, Duration::from_secs(5));
        reap(children);
    }
    for (pid, _) in left {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        problems.push(format!(
            "process {pid} ({}) survived SIGKILL (stuck in the kernel?)",
            comm.trim()
        ));
    }

    // Node and host namespaces (and with them the veths), then the underlay.
    let ul = names::underlay_netns(name);
    let ordered = namespaces
        .iter()
        .filter(|ns| **ns != ul)
        .chain(namespaces.iter().filter(|ns| **ns == ul));
    for ns in ordered {
        if let Err(e) = sys::ip(&["netns", "del", ns.as_str()]) {
            problems.push(e.to_string());
        }
    }

    let dir = lab_dir(name);
    if dir.exists() {
        problems.extend(sys::unmount_below(&dir));
        if let Err(e) = fs::remove_dir_all(&dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if problems.is_empty() {
        tracing::info!(lab = name, "lab removed");
        Ok(())
    } else {
        Err(LabError::Teardown {
            lab: name.into(),
            problems,
        })
    }
}
