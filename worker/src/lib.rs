//! The node agent: its cluster side and its data path.
//!
//! - `state_dir`: what a node keeps on disk (identity, certificates, the
//!   managers it knows), written atomically so a crash never leaves half a file;
//! - `private_fs`: directories 0700 and files 0600 in the state dir, from
//!   the start, and tightening what an older daemon left more open;
//! - `session`: the node's link to the managers: heartbeats to the leader,
//!   following leader changes, renewing its certificate before it expires and
//!   when its role changes, and noticing that it was removed;
//! - `managers`: one channel per current manager, refreshed from the
//!   session's heartbeat replies; calls to "some manager" over them;
//! - `agent`: makes the kernel match the node's view, and re-checks it: one
//!   reconcile pass over every driver, egress, VIPs and DNS listeners;
//! - `drivers`: the network drivers behind one trait (overlay, bridge,
//!   macvlan, host/none) and egress, and their registry;
//! - `overlay`, `link`, `veth`, `netns`: the overlay data path over rtnetlink;
//! - `local`, `macvlan`, `local_networks`: Docker's local drivers' kernel
//!   code (bridge; macvlan), and the node's local networks;
//! - `local_request`: what a local network create may ask for, and how a
//!   local network is shown through the Control API;
//! - `stable_hash`: the one hash device names are derived with;
//! - `sysctl`: network sysctls of a namespace, written only when they differ;
//! - `egress`: `mesh_gwbridge` and NAT for traffic leaving the node;
//! - `vip`: which sandboxes get which service VIPs;
//! - `firewall`: our nftables tables (egress NAT, bridge NAT, VIP), one type
//!   each, the one way to apply a batch in a namespace, and drift checks;
//! - `dns`: the embedded resolver at 127.0.0.11 in every sandbox;
//! - `sandbox`: one sandbox's namespaces and process;
//! - `sandboxes`: the node's sandboxes: records, `run`/`rm`, connect and
//!   disconnect, task sandboxes, their DNS names and VIP services;
//! - `tasks`: the task runner, carrying out `task_plan`'s decisions;
//! - `task_plan`: the runner's decision table (view + records → start, stop,
//!   remove, report), free of I/O;
//! - `task_logs`: the node's side of task logs, a stream to every manager;
//! - `routes`: the node's own IPv4 routes (not mesh's), sent with heartbeats
//!   so managers refuse overlay subnets that collide with them.
//!
//! It must not touch Raft or cluster state: it only asks managers.

pub mod agent;
pub mod dns;
pub mod drivers;
pub mod egress;
pub mod encryption;
pub mod firewall;
pub mod health;
pub mod ingress;
pub mod join;
pub mod link;
pub mod local;
pub mod local_networks;
pub mod local_request;
pub mod macvlan;
pub mod managers;
pub mod netns;
pub mod overlay;
pub mod ports;
pub mod private_fs;
pub mod routes;
pub mod sandbox;
pub mod sandboxes;
pub mod session;
pub mod stable_hash;
pub mod state_dir;
pub mod sysctl;
pub mod task_logs;
pub mod task_plan;
pub mod tasks;
pub mod timing;
pub mod tunnel;
mod veth;
pub mod views;
pub mod vip;
pub mod wg;

/// A time as the managers and `mesh info` write times (RFC 3339, UTC).
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
