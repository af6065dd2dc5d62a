//! Mutual TLS between nodes, and the tonic glue for it.
//!
//! - `error`: [`TlsError`] and the user-facing reasons in it;
//! - `identity`: [`ReloadableIdentity`], the node's swappable certificate;
//! - `config`: rustls server and client configurations;
//! - `dial`: gRPC channels to a peer (lazy, eager, or bound to one
//!   connection for a join);
//! - `accept`: the server side, TLS connections for tonic and what a
//!   handler knows of each ([`PeerInfo`], [`peer_identity`]);
//! - who counts as a current manager is `crate::trust`, re-exported here.
//!
//!
//! - Every config is built on the ring provider explicitly, so nothing depends
//!   on a process-wide default provider.
//! - A node's certificate lives in a [`ReloadableIdentity`] that both server
//!   and client configs read on every handshake: renewing the certificate is
//!   a [`ReloadableIdentity::set`], no restart and no new configs.
//! - Servers ask for client certificates but do not require them (a joining
//!   node has none yet); handlers decide with [`peer_identity`].
//! - Only TLS 1.3 is offered: both ends are always mesh.
//! - Session resumption is off on both sides: a resumed session carries the
//!   certificate of the original handshake, so after a renewal or a role
//!   change the peer would still see the old identity.

mod accept;
mod config;
mod dial;
mod error;
mod identity;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use crate::trust::{ManagerCheck, TrustedManagers, member_client_config};
pub use accept::{PeerInfo, ServerIo, incoming, peer_identity, peer_info};
pub use config::{client_config, server_config, unverified_client_config};
pub(crate) use config::{provider, roots};
pub use dial::{channel, connect, connect_bound, kept_channel, kept_channel_from};
pub use error::TlsError;
pub use identity::ReloadableIdentity;

/// The DNS SAN every manager certificate carries. Clients dial managers by IP
/// but verify this name, so any manager of the cluster is acceptable and a
/// worker certificate is not.
pub const MANAGER_SERVER_NAME: &str = "mesh-manager";

/// A TLS handshake that has not finished by then is dropped, so half-open or
/// stalled clients cannot pile up on a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Label of the TLS exporter both ends of a join derive their proofs from
/// (RFC 8446 section 7.5): the proofs are bound to this one connection, so
/// nobody can relay them over another.
pub const JOIN_EXPORTER_LABEL: &[u8] = b"EXPORTER-mesh-join";
