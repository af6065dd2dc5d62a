//! Types and pure helpers shared by managers, workers and the CLI.
//!
//! - `id`: node and cluster IDs (Swarm's 25-character base-36 shape);
//! - `input`: limits on free-form words users type (labels, DNS aliases);
//! - `ipam`: subnet and address allocation math over the managers' state;
//! - `model`: the cluster's words as enums (roles, states, modes, drivers)
//!   and the MAC type, serialized as the strings older versions wrote;
//! - `ports`: published ports as users write them (`--publish`, `-p`);
//! - `refusal`: the typed "no" of the managers' state machine, the control
//!   API and the node's own checks, mapped once to gRPC codes;
//! - `token`: join tokens `SWMTKN-1-<CA digest>-<secret>`, and the join
//!   proofs made from their secret;
//! - `pki`: the cluster CA, node certificates and CSRs (rcgen), and reading
//!   node ID / role back out of a certificate;
//! - `tls`: rustls configurations for mutual TLS with a certificate that can be
//!   swapped at run time (renewal without restart), and tonic glue for them
//!   (what a server knows of each connection: peer, certificate, exporter);
//! - `trust`: which servers a member accepts as current managers (pinned keys);
//! - `transport`: the daemon's unix control socket as a tonic channel.
//!
//! No sockets are opened and no files are read here.

pub mod id;
pub mod input;
pub mod ipam;
pub mod model;
pub mod pki;
pub mod ports;
pub mod refusal;
pub mod tls;
pub mod token;
pub mod transport;
pub mod trust;
