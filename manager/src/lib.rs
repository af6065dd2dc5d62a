//! The control plane of a mesh cluster.
//!
//! Owns the Raft-replicated cluster state and everything that changes it:
//! - `authz`: who may call what, decided from the current state;
//! - `state`: the deterministic state machine (cluster, nodes, tokens, networks,
//!   endpoints and their allocations) and its commands;
//! - `store`: openraft log and snapshot storage on disk (redb);
//! - `network`: Raft RPCs between managers over mutual TLS, one channel per peer;
//! - `ca`: the cluster root CA that signs node certificates;
//! - `manager`: the running manager (Raft instance, writes forwarded to the leader,
//!   heartbeat monitor that marks silent nodes down);
//! - `cluster_service`: the gRPC service nodes call (join, heartbeat, renew,
//!   propose, assignments, attach, task reports, logs);
//! - `server`: the cluster port serving it and the Raft service over TLS;
//! - `join_limit`: failed joins counted per source address;
//! - `dispatcher`: each node's view (its networks, peers, tasks) derived from the state;
//! - `services`: services and tasks inside the state machine (orchestration,
//!   addresses, restarts, rolling updates);
//! - `scheduler`: which nodes may take a task and which one does (pure);
//! - `logs`: routing task-log requests to nodes and their answers back;
//! - `control`: the Control API's cluster calls (nodes, networks, services,
//!   join tokens): their policy and defaults, served by the daemon;
//! - `pb`: conversions of nodes, networks, services and tasks to the
//!   Control API's messages;
//!
//! It must not touch the kernel's networking: that belongs to the worker.

use std::io::Cursor;

pub mod authz;
pub mod ca;
pub mod cluster_service;
pub mod control;
pub mod dispatcher;
pub mod join_limit;
pub mod logs;
pub mod manager;
pub mod network;
pub mod pb;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod state;
pub mod store;

openraft::declare_raft_types!(
    /// Raft types of the cluster store: commands in, results out, u64 Raft IDs.
    pub TypeConfig:
        D = state::Command,
        R = state::CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
