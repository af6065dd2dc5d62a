//! Multi-host labs on one machine: N network namespaces on one underlay
//! bridge, each running its own `mesh daemon`, formed into a cluster.
//!
//! This crate owns `mesh lab` (the README's "run it" command) and the
//! [`Lab`] API that every end-to-end test uses. It owns only what it makes:
//! namespaces named `mlab-<LAB>-*`, the links inside them, the daemons it
//! starts, and `/run/mesh-lab/<LAB>/`. It must not touch the host's own
//! network namespace (no links, routes or addresses there), so lab traffic
//! cannot leave the lab. It drives the `mesh` binary only through its
//! command line, like a user would.
//!
//! Modules:
//! - `cli`: `mesh lab ...` parsing and printing;
//! - `spec`: what a lab is made of (nodes, roles, the spec `up` builds from);
//! - `lab`: building a lab (namespaces, underlay, cluster) and its links;
//! - `daemon`: a node's daemon: start, wait for its socket, kill, restart;
//! - `exec`: commands (and `mesh`) run inside a node;
//! - `faults`: partitions, paused daemons, healing everything at once;
//! - `readiness`: whether the cluster is complete, from `mesh node ls`;
//! - `registry`: the labs on this machine, their state files and lock;
//! - `teardown`: removing a lab, also a half-made or crashed one;
//! - `names`: lab, node and namespace names, subnets and addresses;
//! - `sys`: processes, namespaces, signals and `ip`, for the rest;
//! - `error`: [`LabError`], one line a user can act on.
//!
//! ```no_run
//! use mesh_lab::{Lab, UpSpec};
//! # fn main() -> Result<(), mesh_lab::LabError> {
//! mesh_lab::cleanup_stale("e2e-ping")?;
//! let lab = Lab::up(&UpSpec::new("e2e-ping", 3, 1), std::path::Path::new("target/debug/mesh"))?;
//! let ip = lab.node("node2")?.ip.to_string();
//! lab.exec_ok("node1", &["ping", "-c1", &ip])?;
//! println!("{}", lab.mesh_ok("node1", &["node", "ls"])?);
//! // Outside hosts (`spec.hosts = 1`) are reached the same way: `lab.exec_ok("host1", ...)`.
//! # Ok(()) } // dropping `lab` tears it down
//! ```

mod cli;
mod daemon;
mod error;
mod exec;
mod faults;
mod lab;
mod names;
mod readiness;
mod registry;
mod sim_net;
mod spec;
mod sys;
mod teardown;

pub use cli::{Format, LabCommand, run};
pub use error::{LabError, Result};
pub use lab::{CLUSTER_PORT, Lab, UNDERLAY_BRIDGE};
pub use names::{
    MAX_LAB_NAME, MAX_NODES, SIM_RANGE, host_name, host_netns, node_name, node_netns, sim_node_ip,
    underlay_netns, validate_lab_name,
};
pub use readiness::{NodeRow, parse_node_ls};
pub use registry::{LAB_ROOT, LabListing, cleanup_stale, down, lab_dir, list};
pub use sim_net::SimNet;
pub use spec::{LabHost, LabNode, LabStatus, Role, UpSpec};
