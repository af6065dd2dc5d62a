//! Embedded DNS for sandboxes: the resolver every sandbox finds at
//! `127.0.0.11:53` (UDP and TCP), as Docker's is.
//!
//! Three layers, kept apart so the middle one can be tested without sockets:
//!
//! - [`Records`]: plain data (names and addresses per network), built by the
//!   node agent from the managers' view and swapped in whole by
//!   [`DnsServer::set_records`]; a query never sees half an update.
//! - [`answer`]: pure logic deciding, for the networks of the sandbox that
//!   asks, whether a query is ours (an answer, NXDOMAIN, an empty NOERROR),
//!   goes to the host's resolvers, or is refused because the sandbox has no
//!   egress (all its networks `--internal`).
//! - [`DnsServer`]: the wire side. Each served sandbox gets its own sockets,
//!   opened inside its network namespace, and its own tasks on the daemon's
//!   runtime (our own UDP and TCP loops around hickory's request handler:
//!   they cap queries and connections and send each answer directly), so a
//!   sandbox flooding its resolver only queues behind itself. Forwarded queries leave from the daemon's (node's) namespace,
//!   where the host's resolvers are reachable.
//!
//! Modules: `records` (the data and [`answer`]), `handler` (one sandbox's
//! queries on the wire), `forward` (relaying to the host's resolvers),
//! `raw` (one raw query in, its encoded answer out), `udp` and `tcp` (the
//! capped loops), `server` ([`DnsServer`]: sockets
//! and tasks per sandbox), `resolv_conf` (reading the host's, writing the
//! sandboxes').

use std::net::Ipv4Addr;

mod batch;
mod forward;
mod handler;
mod raw;
mod records;
mod resolv_conf;
mod server;
mod tcp;
mod udp;
mod wire;

pub use handler::{MAX_INFLIGHT_FORWARDS, TTL};
pub use records::{
    Answer, Lookup, NetworkRecords, Records, SandboxNetwork, SandboxTable, answer,
    forward_or_refuse, may_forward,
};
pub use resolv_conf::{sandbox_resolv_conf, upstreams_from_resolv_conf};
pub use server::{DnsError, DnsServer};
pub use tcp::{MAX_TCP_CONNECTIONS, TCP_IDLE, TCP_LIFETIME};
pub use udp::MAX_UDP_QUERIES;

/// Where the resolver listens inside every sandbox, as in Docker: an address
/// on the sandbox's own loopback, so it needs no route and no interface of
/// any network, and is the same whatever networks the sandbox is on.
pub const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
