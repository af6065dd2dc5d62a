//! Faults a lab can inject besides `kill` and `cut`: partitions of the
//! underlay between groups of nodes, paused daemons, and healing all of it
//! at once. Fault campaigns (tests/faults.rs) drive these.
//!
//! A partition is an nftables `bridge` table of the lab's own in the
//! underlay namespace: frames whose in-port and out-port belong to
//! different groups are dropped in the bridge's forward hook (flooded
//! frames pass it once per out-port, so ARP is cut too). Ports in no group
//! forward as before. The table goes with the underlay namespace at
//! teardown.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::{LabError, Result};
use crate::lab::{CONTROL_CUT_TABLE, Lab};
use crate::names;
use crate::registry::read_state;
use crate::sys;

/// nftables table (bridge family, underlay namespace) of [`Lab::partition`].
const PARTITION_TABLE: &str = "mesh_lab_partition";

/// The nftables script that replaces any partition with one between
/// `groups` (bridge port names), atomically.
fn partition_script(groups: &[Vec<String>]) -> String {
    let mut rules = String::new();
    for (i, from) in groups.iter().enumerate() {
        for (j, to) in groups.iter().enumerate() {
            if i != j {
                rules.push_str(&format!(
                    "    iifname {{ {} }} oifname {{ {} }} drop\n",
                    quoted(from),
                    quoted(to)
                ));
            }
        }
    }
    format!(
        "table bridge {PARTITION_TABLE} {{}}\n\
         delete table bridge {PARTITION_TABLE}\n\
         table bridge {PARTITION_TABLE} {{\n\
         \x20 chain forward {{\n\
         \x20   type filter hook forward priority -200; policy accept;\n\
         {rules}\
         \x20 }}\n\
         }}\n"
    )
}

fn quoted(ports: &[String]) -> String {
    ports
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes the partition table if there is one (idempotent).
const UNPARTITION_SCRIPT: &str =
    "table bridge mesh_lab_partition {}\ndelete table bridge mesh_lab_partition\n";

impl Lab {
    /// Runs an nftables script in the underlay namespace.
    fn underlay_nft(&self, file: &str, script: &str) -> Result<()> {
        self.nft_script(&self.underlay_netns, file, script)
    }

    /// Cuts the underlay between `groups` (two or more, of node or outside
    /// host names), and only between them: members of one group reach each
    /// other, and nodes in no group reach everyone. A new partition replaces
    /// the previous one; [`Lab::heal_all`] removes it.
    pub fn partition(&mut self, groups: &[&[&str]]) -> Result<()> {
        if groups.len() < 2 {
            return Err(LabError::InvalidSpec(
                "a partition needs two or more groups (node1,node2 node3)".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut ports = Vec::with_capacity(groups.len());
        for group in groups {
            if group.is_empty() {
                return Err(LabError::InvalidSpec(
                    "a partition group is empty: name at least one node in each".into(),
                ));
            }
            let mut names_in = Vec::with_capacity(group.len());
            for member in group.iter() {
                let name = self.port_of(member)?;
                if !seen.insert(name.clone()) {
                    return Err(LabError::InvalidSpec(format!(
                        "{name} is in more than one partition group"
                    )));
                }
                names_in.push(name);
            }
            ports.push(names_in);
        }
        self.underlay_nft("partition.nft", &partition_script(&ports))?;
        self.partition = ports;
        self.save()
    }

    /// The bridge port (= name) of a node (`node2`, `2`) or host (`host1`).
    fn port_of(&self, member: &str) -> Result<String> {
        if let Some(h) = self.hosts.iter().find(|h| h.name == member) {
            return Ok(h.veth.clone());
        }
        Ok(self.nodes[self.index(member)?].veth.clone())
    }

    /// Restores everything: removes the partition, restores cut links and
    /// control cuts, and resumes paused daemons.
    pub fn heal_all(&mut self) -> Result<()> {
        self.underlay_nft("partition.nft", UNPARTITION_SCRIPT)?;
        self.partition.clear();
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            if self.nodes[i].cut {
                self.set_link(&name, true)?;
            }
            if self.nodes[i].paused {
                self.resume(&name)?;
            }
            let netns = self.nodes[i].netns.clone();
            let tables =
                sys::ip_output(&["netns", "exec", netns.as_str(), "nft", "list", "tables"])?;
            if tables.contains(CONTROL_CUT_TABLE) {
                self.heal_control(&name)?;
            }
        }
        self.save()
    }

    /// Freezes `node`'s daemon (SIGSTOP): its sockets stay open but nothing
    /// answers, as a daemon stuck in a long pause. Its sandboxes keep
    /// running: they are other processes.
    pub fn pause(&mut self, node: &str) -> Result<()> {
        self.signal_daemon(node, Signal::SIGSTOP, true)
    }

    /// Thaws a daemon frozen by [`Lab::pause`] (SIGCONT).
    pub fn resume(&mut self, node: &str) -> Result<()> {
        self.signal_daemon(node, Signal::SIGCONT, false)
    }

    fn signal_daemon(&mut self, node: &str, sig: Signal, paused: bool) -> Result<()> {
        let i = self.index(node)?;
        let n = &self.nodes[i];
        let (Some(pid), true) = (n.pid, n.running()) else {
            return Err(LabError::InvalidSpec(format!(
                "{}'s daemon is not running (`mesh lab start {} {}`)",
                n.name, self.name, n.name
            )));
        };
        sys::signal(pid, n.pid_start, sig)?;
        self.nodes[i].paused = paused;
        self.save()
    }

    /// Reloads what other handles of this lab changed (daemons restarted,
    /// links cut, partitions) from its state file, so that this handle's
    /// teardown finds the current daemons. A campaign's nemesis works on
    /// its own handle ([`Lab::open`]) while clients share this one.
    pub fn refresh(&mut self) -> Result<()> {
        let mut saved =
            read_state(&self.name)?.ok_or_else(|| LabError::NotFound(self.name.clone()))?;
        self.nodes = std::mem::take(&mut saved.nodes);
        self.partition = std::mem::take(&mut saved.partition);
        Ok(())
    }

    /// Like [`Lab::mesh`] with its own time limit: past it the command is
    /// killed and [`LabError::Timeout`] returned.
    pub fn mesh_timeout<S: AsRef<OsStr>>(
        &self,
        node: &str,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        self.mesh_idx(self.index(node)?, args, timeout)
    }
}

/// Parses `node1,node2` groups of `mesh lab partition`.
pub(crate) fn parse_groups(groups: &[String]) -> Vec<Vec<String>> {
    groups
        .iter()
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(names::normalize_node_arg)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_drops_only_between_groups() {
        let groups = vec![
            vec!["node1".to_string(), "node2".to_string()],
            vec!["node3".to_string()],
        ];
        let s = partition_script(&groups);
        assert!(s.contains("iifname { \"node1\", \"node2\" } oifname { \"node3\" } drop"));
        assert!(s.contains("iifname { \"node3\" } oifname { \"node1\", \"node2\" } drop"));
        assert_eq!(s.matches(" drop").count(), 2, "{s}");
        // Replacing: the old table is created (if absent) and deleted first.
        assert!(s.starts_with("table bridge mesh_lab_partition {}\ndelete table"));
    }

    #[test]
    fn groups_parse() {
        let g = parse_groups(&["node1,2".into(), " node3 ,host1".into()]);
        assert_eq!(g, vec![vec!["node1", "node2"], vec!["node3", "host1"]]);
    }
}
