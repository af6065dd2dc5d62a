//! What a lab is made of: its nodes and their roles, whether it is
//! complete, and the spec [`crate::Lab::up`] builds from.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::names;
use crate::sys;

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        })
    }
}

/// Whether `up` finished: a lab stuck in `creating` was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabStatus {
    Creating,
    Ready,
}

/// One node of a lab: a network namespace with its own `mesh daemon`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    /// `node1`, `node2`, ...; also the hostname its daemon sees.
    pub name: String,
    pub role: Role,
    /// Underlay address, on `eth0` in [`LabNode::netns`].
    pub ip: Ipv4Addr,
    /// Named network namespace (`ip netns exec` works on it).
    pub netns: String,
    /// The bridge-side end of the node's underlay link, in the underlay namespace.
    pub veth: String,
    /// Directory holding everything below.
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Pid of the daemon last started (it may have died since).
    pub pid: Option<i32>,
    /// Start time of that pid (/proc/PID/stat), so a recycled pid is not taken for it.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Pids of earlier daemons of this node (before `kill` + `start`): `down`
    /// still finds what they left running in their sessions.
    #[serde(default)]
    pub previous_pids: Vec<i32>,
    /// The node's cluster ID once it joined.
    #[serde(default)]
    pub id: Option<String>,
    /// True while its underlay link is cut.
    #[serde(default)]
    pub cut: bool,
    /// True while its daemon is stopped by [`crate::Lab::pause`].
    #[serde(default)]
    pub paused: bool,
}

impl LabNode {
    /// True while the daemon started for this node is running.
    pub fn running(&self) -> bool {
        self.pid.is_some_and(|p| sys::alive(p, self.pid_start))
    }

    /// The daemon's address in `-H`/`MESH_HOST` form.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// An outside host of a lab: a namespace on the underlay with an address
/// and no daemon, standing for a client outside the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    /// `host1`, `host2`, ...; also the hostname commands in it see.
    pub name: String,
    /// Underlay address, on `eth0` in [`LabHost::netns`].
    pub ip: Ipv4Addr,
    /// Named network namespace (`ip netns exec` works on it).
    pub netns: String,
    /// The bridge-side end of the host's underlay link, in the underlay namespace.
    pub veth: String,
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct UpSpec {
    pub name: String,
    pub nodes: usize,
    /// The first `managers` nodes are managers (node1 initializes the cluster).
    pub managers: usize,
    /// Outside hosts (`host1`..) on the underlay: no daemon, not in the cluster.
    pub hosts: usize,
    /// Extra arguments for `mesh init`.
    pub init_args: Vec<String>,
    /// Extra arguments for every `mesh daemon`.
    pub daemon_args: Vec<String>,
    /// How long a daemon may take until its socket answers.
    pub socket_timeout: Duration,
    /// How long the cluster may take until every node is Ready.
    pub ready_timeout: Duration,
    /// Print progress lines on stderr (the CLI does; tests need not).
    pub progress: bool,
}

impl Default for UpSpec {
    fn default() -> Self {
        UpSpec {
            name: "lab".into(),
            nodes: 3,
            managers: 1,
            hosts: 0,
            init_args: Vec::new(),
            daemon_args: Vec::new(),
            socket_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(90),
            progress: false,
        }
    }
}

impl UpSpec {
    /// A spec with the given name and size and default timeouts.
    pub fn new(name: &str, nodes: usize, managers: usize) -> Self {
        UpSpec {
            name: name.into(),
            nodes,
            managers,
            ..UpSpec::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        names::validate_lab_name(&self.name)?;
        if self.nodes == 0 || self.nodes > names::MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "--nodes {} is out of range; use 1 to {}",
                self.nodes,
                names::MAX_NODES
            )));
        }
        if self.nodes + self.hosts > names::MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "--nodes {} plus --hosts {} is more than the {} addresses of a lab",
                self.nodes,
                self.hosts,
                names::MAX_NODES
            )));
        }
        if self.managers == 0 || self.managers > self.nodes {
            return Err(LabError::InvalidSpec(format!(
                "--managers {} must be between 1 and --nodes ({})",
                self.managers, self.nodes
            )));
        }
        if self.managers.is_multiple_of(2) {
            tracing::warn!(
                managers = self.managers,
                "an even number of managers tolerates no more failures than one fewer"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_validation() {
        assert!(UpSpec::new("ok", 3, 1).validate().is_ok());
        assert!(UpSpec::new("ok", 0, 1).validate().is_err());
        assert!(UpSpec::new("ok", 3, 4).validate().is_err());
        assert!(UpSpec::new("ok", 3, 0).validate().is_err());
        assert!(
            UpSpec::new("ok", names::MAX_NODES + 1, 1)
                .validate()
                .is_err()
        );
        assert!(UpSpec::new("Bad", 3, 1).validate().is_err());
        let mut hosts = UpSpec::new("ok", 3, 1);
        hosts.hosts = 2;
        assert!(hosts.validate().is_ok());
        hosts.hosts = names::MAX_NODES - 2;
        assert!(hosts.validate().is_err());
    }
}
