//! Calls from a node to "some manager": one gRPC channel per manager the
//! session last heard of, tried in turn starting with the one that answered
//! last, over mutual TLS with the node's own certificate; a server counts as
//! a manager only if the cluster lists it as one, with the key its
//! certificate is for.
//!
//! The set follows the heartbeat replies ([`Managers::set_addrs`], called by
//! the session): a manager promoted later gets a channel (and the node's
//! log streams, which watch [`Managers::subscribe`]); a demoted one loses
//! its channel.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_common::tls::{self, ReloadableIdentity, TrustedManagers};
use tokio::sync::watch;
use tonic::transport::Channel;

/// How long dialling one manager may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A kept channel pings its manager this often: calls made on a dead
/// connection (a cut link) fail within about twice this, not minutes.
const PING_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Managers {
    tls: Arc<rustls::ClientConfig>,
    /// In the order to try them: the one that answered last first.
    set: Arc<Mutex<Vec<Conn>>>,
    /// Bumped whenever the set of addresses changes.
    changed: Arc<watch::Sender<u64>>,
}

/// One manager and the channel kept to it. A channel that could not be
/// made (an address that does not parse) stays an error, reported by
/// every call that reaches it, as when the node dialled per call.
#[derive(Clone)]
struct Conn {
    addr: String,
    channel: Result<Channel, String>,
}

impl Managers {
    /// Managers are accepted only if `trusted` lists them with the key
    /// their certificate is for.
    pub fn new(
        ca_pem: &str,
        identity: ReloadableIdentity,
        addrs: Vec<String>,
        trusted: TrustedManagers,
    ) -> Result<Self, tls::TlsError> {
        let m = Self {
            tls: tls::member_client_config(ca_pem, identity, Arc::new(trusted))?,
            set: Arc::new(Mutex::new(Vec::new())),
            changed: Arc::new(watch::channel(0).0),
        };
        m.set_addrs(addrs);
        Ok(m)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Conn>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dial(&self, addr: &str) -> Result<Channel, String> {
        tls::kept_channel(
            addr,
            self.tls.clone(),
            tls::MANAGER_SERVER_NAME,
            CONNECT_TIMEOUT,
            PING_EVERY,
        )
        .map_err(|e| e.to_string())
    }

    /// Takes the current managers' addresses. Channels to managers still
    /// listed are kept (and their place in the order); new ones are made;
    /// those of managers no longer listed are dropped. An empty list is
    /// ignored: it says nothing about who the managers are.
    pub fn set_addrs(&self, addrs: Vec<String>) {
        let mut set = self.lock();
        let current: Vec<String> = set.iter().map(|c| c.addr.clone()).collect();
        let Some(order) = refreshed_order(&current, &addrs) else {
            return;
        };
        let mut next = Vec::with_capacity(order.len());
        for addr in order {
            let conn = match set.iter().position(|c| c.addr == addr) {
                Some(i) => set.swap_remove(i),
                None => Conn {
                    channel: self.dial(&addr),
                    addr,
                },
            };
            next.push(conn);
        }
        *set = next;
        drop(set);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Drops every channel and makes new ones: after a certificate renewal
    /// new connections must present the new certificate.
    pub fn reconnect(&self) {
        let mut set = self.lock();
        for c in set.iter_mut() {
            c.channel = self.dial(&c.addr);
        }
    }

    /// Wakes when the set of managers changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The channel kept to one manager (for streams kept per manager); a
    /// manager not (or no longer) in the set gets a channel of its own.
    pub fn channel_to(&self, addr: &str) -> Result<Channel, tls::TlsError> {
        if let Some(c) = self.lock().iter().find(|c| c.addr == addr)
            && let Ok(ch) = &c.channel
        {
            return Ok(ch.clone());
        }
        tls::channel(
            addr,
            self.tls.clone(),
            tls::MANAGER_SERVER_NAME,
            CONNECT_TIMEOUT,
        )
    }

    /// Every manager this node knows of.
    pub fn addrs(&self) -> Vec<String> {
        self.lock().iter().map(|c| c.addr.clone()).collect()
    }

    /// Runs `f` against each manager in turn until one answers with
    /// something other than "unavailable"; remembers who answered.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let conns = self.lock().clone();
        let mut last =
            tonic::Status::unavailable("no manager known: is this node part of a cluster?");
        for (i, conn) in conns.into_iter().enumerate() {
            let ch = match conn.channel {
                Ok(c) => c,
                Err(e) => {
                    last = tonic::Status::unavailable(e);
                    continue;
                }
            };
            match f(ch).await {
                Err(s) if s.code() == tonic::Code::Unavailable => last = s,
                r => {
                    if i != 0 {
                        let mut set = self.lock();
                        if let Some(pos) = set.iter().position(|c| c.addr == conn.addr) {
                            let c = set.remove(pos);
                            set.insert(0, c);
                        }
                    }
                    return r;
                }
            }
        }
        Err(last)
    }
}

/// The order of the managers after a heartbeat listed `listed`: None when
/// nothing changes (an empty list, or the same managers: their order then
/// stays the one calls taught); otherwise those still listed in their
/// current order, then the new ones in the order given.
fn refreshed_order(current: &[String], listed: &[String]) -> Option<Vec<String>> {
    if listed.is_empty() {
        return None;
    }
    let mut order: Vec<String> = current
        .iter()
        .filter(|a| listed.contains(a))
        .cloned()
        .collect();
    for a in listed {
        if !order.contains(a) {
            order.push(a.clone());
        }
    }
    (order != current).then_some(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_empty_or_same_list_changes_nothing() {
        assert_eq!(refreshed_order(&v(&["a", "b"]), &[]), None);
        // Same set, another order: the order calls taught stays.
        assert_eq!(refreshed_order(&v(&["b", "a"]), &v(&["a", "b"])), None);
        assert_eq!(refreshed_order(&[], &v(&["a"])), Some(v(&["a"])));
    }

    #[test]
    fn new_managers_come_last_and_gone_ones_drop_out() {
        assert_eq!(
            refreshed_order(&v(&["b", "a"]), &v(&["a", "b", "c"])),
            Some(v(&["b", "a", "c"]))
        );
        assert_eq!(
            refreshed_order(&v(&["b", "a", "c"]), &v(&["c", "a"])),
            Some(v(&["a", "c"]))
        );
        // Duplicates in a reply do not make two channels.
        assert_eq!(
            refreshed_order(&v(&["a"]), &v(&["b", "b"])),
            Some(v(&["b"]))
        );
    }
}
