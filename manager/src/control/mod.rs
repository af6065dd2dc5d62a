//! The Control API's cluster half: what `mesh node`, `network`, `service`
//! and `join-token` may do and the defaults they fill in, decided here on
//! a manager. The daemon only routes each call to these functions (or to
//! the node's own sandboxes and local networks) and prints nothing.
//!
//! - `cluster`: `init`'s network settings and first manager;
//! - `nodes`: references, demotion and removal rules, updates;
//! - `networks`: cluster network specs, create, inspect, remove, prune;
//! - `services`: service specs with Docker's defaults, create, update with
//!   retries on a lost race, status, removal, log streams;
//! - `tokens`: join tokens and their rotation.
//!
//! Every function answers with a `tonic::Status` built from a typed
//! `Refusal` or `ManagerError`, so each refusal keeps its gRPC code.

pub mod cluster;
pub mod networks;
pub mod nodes;
pub mod services;
pub mod tokens;
