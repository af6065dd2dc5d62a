//! The per-sandbox servers: sockets opened inside each sandbox's namespace,
//! served on the daemon's runtime, started, updated and stopped by the node
//! agent.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nix::errno::Errno;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tracing::{info, warn};

use super::RESOLVER_IP;
use super::forward::Forwarder;
use super::handler::{MAX_INFLIGHT_FORWARDS, NetworksSlot, SandboxHandler, Shared};
use super::records::{Records, SandboxNetwork};
use super::tcp::serve_tcp;
use super::udp::serve_udp;
use crate::netns::{self, NetError};

/// How long [`DnsServer::stop_sandbox`] waits for the server tasks to end;
/// they only have to notice cancellation, so this is generous.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of the embedded DNS server, each naming the sandbox or namespace.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Entering the sandbox's namespace or configuring its loopback failed.
    #[error("DNS for sandbox {sandbox}: {source}")]
    Net {
        sandbox: String,
        #[source]
        source: NetError,
    },
    /// The resolver's socket could not be bound inside the namespace
    /// (something else listening on 127.0.0.11:53 there?).
    #[error(
        "cannot bind {proto} {RESOLVER_IP}:53 in namespace {ns} for sandbox {sandbox}: {source} (is another DNS server listening there?)"
    )]
    Bind {
        proto: &'static str,
        ns: String,
        sandbox: String,
        #[source]
        source: io::Error,
    },
}

/// One served sandbox.
struct Served {
    netns: String,
    networks: NetworksSlot,
    /// The UDP and TCP loops, each owning its queries' or connections'
    /// tasks (aborting a loop ends them all). A set, so dropping it aborts
    /// the loops.
    loops: tokio::task::JoinSet<()>,
}

impl Served {
    /// Whether both loops still run; a loop that ended (its socket failed)
    /// is what the agent's pass re-serves.
    fn serving(&mut self) -> bool {
        while self.loops.try_join_next().is_some() {}
        self.loops.len() == 2
    }
}

/// The embedded DNS server. One instance per daemon; one set of sockets per
/// sandbox.
pub struct DnsServer {
    shared: Arc<Shared>,
    sandboxes: Mutex<HashMap<String, Served>>,
    /// Serializes serve/stop so two calls for one sandbox cannot both bind.
    lifecycle: tokio::sync::Mutex<()>,
}

impl DnsServer {
    /// A server forwarding unknown names to `upstreams` (from the host's
    /// resolv.conf or `--dns-upstream`), giving up after `timeout` with
    /// SERVFAIL.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Arc<Self> {
        Arc::new(DnsServer {
            shared: Arc::new(Shared {
                records: RwLock::new(Arc::new(Records::default())),
                generation: AtomicU64::new(0),
                forwarder: Forwarder { upstreams, timeout },
            }),
            sandboxes: Mutex::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
        })
    }

    /// Replaces all records at once (normalized first). The agent calls
    /// this on every view, mostly with the same records: only a real change
    /// makes the sandboxes' tables stale (each rebuild walks every name).
    pub fn set_records(&self, r: Records) {
        let r = r.normalized();
        let mut current = self
            .shared
            .records
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if **current != r {
            *current = Arc::new(r);
            self.shared.changed();
        }
    }

    /// Serves the sandbox `sandbox_id`, whose network namespace is `netns`,
    /// at 127.0.0.11:53 (UDP and TCP) inside that namespace.
    ///
    /// The sockets are created on a thread that entered the namespace and
    /// keep it; they are then served on the current tokio runtime, in the
    /// daemon's namespace. Idempotent: serving a sandbox again only updates
    /// its networks (or moves it if its namespace changed).
    pub async fn serve_sandbox(
        self: &Arc<Self>,
        sandbox_id: &str,
        netns: &str,
        networks: Vec<SandboxNetwork>,
    ) -> Result<(), DnsError> {
        let _serial = self.lifecycle.lock().await;
        let moved = {
            let mut map = self.lock_sandboxes();
            let current = map
                .get_mut(sandbox_id)
                .filter(|s| s.netns == netns)
                .is_some_and(|s| s.serving());
            match map.get(sandbox_id) {
                Some(s) if current => {
                    set_networks(&self.shared, &s.networks, networks);
                    return Ok(());
                }
                // Moved, or a loop ended: serve it anew.
                Some(_) => map.remove(sandbox_id),
                None => None,
            }
        };
        if let Some(old) = moved {
            shutdown(sandbox_id, old).await;
        }

        let net_err = |source| DnsError::Net {
            sandbox: sandbox_id.to_string(),
            source,
        };
        ensure_loopback(netns).await.map_err(net_err)?;
        let bind_err = |proto, source| DnsError::Bind {
            proto,
            ns: netns.to_string(),
            sandbox: sandbox_id.to_string(),
            source,
        };
        let (udp, tcp) = netns::run_in(netns, bind_sockets)
            .map_err(net_err)?
            .map_err(|(proto, e)| bind_err(proto, e))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| bind_err("udp", e))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| bind_err("tcp", e))?;

        let networks: NetworksSlot = Arc::new(RwLock::new(Arc::from(networks)));
        let handler = SandboxHandler {
            sandbox_id: sandbox_id.to_string(),
            shared: self.shared.clone(),
            networks: networks.clone(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_FORWARDS)),
            table: Arc::default(),
        };
        // Neither loop is hickory's: its TCP listener takes every
        // connection, with no cap, and its UDP loop drops answers that do
        // not fit a small shared queue.
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(serve_tcp(tcp, handler.clone()));
        loops.spawn(serve_udp(udp, handler));
        info!(
            sandbox = sandbox_id,
            netns, "serving DNS at {RESOLVER_IP}:53"
        );
        self.lock_sandboxes().insert(
            sandbox_id.to_string(),
            Served {
                netns: netns.to_string(),
                networks,
                loops,
            },
        );
        Ok(())
    }

    /// Changes the networks whose names a served sandbox sees; unknown
    /// sandboxes are ignored (the next `serve_sandbox` brings them).
    pub fn update_sandbox_networks(&self, sandbox_id: &str, networks: Vec<SandboxNetwork>) {
        if let Some(s) = self.lock_sandboxes().get(sandbox_id) {
            set_networks(&self.shared, &s.networks, networks);
        }
    }

    /// Stops serving a sandbox and closes its sockets. The 127.0.0.11
    /// address is left on the sandbox's `lo`: it is harmless, and the
    /// namespace is usually about to go.
    pub async fn stop_sandbox(&self, sandbox_id: &str) {
        let _serial = self.lifecycle.lock().await;
        let served = self.lock_sandboxes().remove(sandbox_id);
        if let Some(s) = served {
            shutdown(sandbox_id, s).await;
        }
    }

    /// Sandbox ids currently served, sorted (for reconcile-by-diff).
    pub fn served(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock_sandboxes().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn lock_sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn set_networks(
    shared: &Shared,
    slot: &RwLock<Arc<[SandboxNetwork]>>,
    networks: Vec<SandboxNetwork>,
) {
    let mut current = slot.write().unwrap_or_else(|p| p.into_inner());
    // The agent re-serves every sandbox each pass: only a real change
    // makes the tables stale.
    if **current != *networks {
        *current = Arc::from(networks);
        shared.changed();
    }
}

async fn shutdown(sandbox_id: &str, mut served: Served) {
    // Aborts both loops and waits for them, so the sockets are closed
    // when this returns.
    match timeout(STOP_GRACE, served.loops.shutdown()).await {
        Ok(()) => info!(sandbox = sandbox_id, "stopped DNS"),
        Err(_) => warn!(
            sandbox = sandbox_id,
            "DNS loops did not confirm their end in time; dropped (aborted)"
        ),
    }
}

/// Makes 127.0.0.11 reachable in `ns`: `lo` up (a fresh namespace has it
/// down, and then nothing on loopback answers) and the address on it.
/// 127.0.0.0/8 is routed to `lo` already, so binding would work without the
/// address; adding it makes the resolver visible in `ip addr` and keeps it
/// working if the sandbox narrows its loopback.
async fn ensure_loopback(ns: &str) -> Result<(), NetError> {
    let nl = crate::link::Netlink::open(Some(ns)).await?;
    nl.set_up("lo").await?;
    if nl
        .addresses_v4("lo")
        .await?
        .iter()
        .any(|(ip, _)| *ip == RESOLVER_IP)
    {
        return Ok(());
    }
    match nl.add_address_v4("lo", RESOLVER_IP, 32).await {
        Err(e) if e.errno() == Some(Errno::EEXIST) => Ok(()),
        r => r,
    }
}

/// Runs inside the sandbox's namespace: binds the resolver's sockets there.
fn bind_sockets() -> Result<(std::net::UdpSocket, std::net::TcpListener), (&'static str, io::Error)>
{
    let addr = SocketAddr::from((RESOLVER_IP, 53));
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| ("udp", e))?;
    udp.set_nonblocking(true).map_err(|e| ("udp", e))?;
    let tcp = std::net::TcpListener::bind(addr).map_err(|e| ("tcp", e))?;
    tcp.set_nonblocking(true).map_err(|e| ("tcp", e))?;
    Ok((udp, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(loops: tokio::task::JoinSet<()>) -> Served {
        Served {
            netns: "n".into(),
            networks: Arc::new(RwLock::new(Arc::from(Vec::new()))),
            loops,
        }
    }

    /// A sandbox whose loop ended is no longer served, so the agent's next
    /// pass binds it anew.
    #[tokio::test]
    async fn a_dead_loop_means_not_serving() {
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(std::future::pending::<()>());
        loops.spawn(std::future::pending::<()>());
        assert!(served(loops).serving());

        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(std::future::pending::<()>());
        loops.spawn(async {});
        let mut s = served(loops);
        // Let the finished loop end.
        while s.loops.len() == 2 && s.serving() {
            tokio::task::yield_now().await;
        }
        assert!(!s.serving());
    }
}
