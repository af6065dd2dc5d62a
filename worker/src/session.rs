//! The node's session with the managers.
//!
//! Every `period` the node sends a heartbeat to the manager it believes leads;
//! a follower answers with the leader's address and the node moves there, an
//! unreachable manager makes it try the next one it knows. Heartbeat answers
//! carry the node's role as the cluster sees it: a change (promote/demote)
//! makes the node renew its certificate, so the role inside the certificate
//! follows, and then tells the daemon to start or stop its manager role.
//! Certificates are also renewed once half their lifetime has passed.
//!
//! The managers listed in each heartbeat reply are handed to [`Managers`],
//! so the node's other calls and its log streams follow the same set.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_common::pki::{self, Role};
use mesh_common::tls::{self, ReloadableIdentity, TrustedManagers};
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{HeartbeatRequest, MANAGERS_HEADER, RenewCertRequest};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::encryption::Encryption;
use crate::managers::Managers;
use crate::state_dir::{Certs, NodeConfig, StateDir};

const CALL_TIMEOUT: Duration = Duration::from_millis(1500);
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(150);

enum Beat {
    Ok,
    Redirected,
    Failed,
    Removed,
}

/// What the daemon must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The node's certificate now carries this role.
    RoleChanged(Role),
    /// The cluster removed this node; its certificate is refused.
    Removed(String),
}

/// What `mesh info` shows about the session.
#[derive(Debug, Clone, Default)]
pub struct SessionStatus {
    pub connected: bool,
    pub manager: String,
    pub leader_id: String,
    pub managers: Vec<mesh_proto::RemoteManager>,
    pub last_error: String,
    pub cert_not_after: Option<SystemTime>,
    /// The cluster's key rotation interval as the last reply gave it
    /// (0 = never).
    pub encryption_key_rotation_secs: u64,
    /// The cluster's heartbeat period and down grace as the last reply
    /// gave them (0 = not heard yet).
    pub heartbeat_ms: u64,
    pub node_down_grace_ms: u64,
}

pub struct Session {
    state_dir: StateDir,
    config: NodeConfig,
    certs: Certs,
    identity: ReloadableIdentity,
    /// The managers this node accepts (shared with every client config of
    /// the node), refreshed from each heartbeat reply.
    trusted: TrustedManagers,
    /// The channels the node's other calls use; told of every change in
    /// the set of managers.
    managers: Managers,
    tls: Arc<rustls::ClientConfig>,
    /// The heartbeat's own channels: their short connect timeout makes a
    /// dead leader cost little before the next manager is tried.
    channels: HashMap<String, Channel>,
    /// Index into `config.managers` of the manager to try next.
    next: usize,
    leader: Option<String>,
    /// The cluster's heartbeat period, from the last reply.
    period: Duration,
    /// The silence after which the leader calls this node Down, from the
    /// last reply.
    grace: Duration,
    status: Arc<Mutex<SessionStatus>>,
    events: mpsc::Sender<SessionEvent>,
    /// The last node view applied to the kernel, reported to the managers
    /// with each heartbeat (set by the data-path agent).
    applied: Arc<Applied>,
    /// The node's WireGuard key: its public half goes with each heartbeat,
    /// and the replies say when to replace it.
    encryption: Arc<Encryption>,
    /// The node's own routes, sent with each heartbeat (read every few
    /// seconds).
    routes: crate::routes::Reader,
}

/// What the agent last applied; a change triggers a heartbeat at once, so
/// the managers learn it without waiting a period.
#[derive(Default)]
pub struct Applied {
    generation: std::sync::atomic::AtomicU64,
    digest: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
    /// What the agent's last pass could not fix: sent with each heartbeat,
    /// and what `mesh info` shows.
    faults: Mutex<Vec<String>>,
}

impl Applied {
    pub fn set(&self, generation: u64, digest: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let old = self.digest.swap(digest, Relaxed);
        let old_gen = self.generation.swap(generation, Relaxed);
        if old != digest || old_gen != generation {
            self.changed.notify_one();
        }
    }

    pub fn get(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.generation.load(Relaxed), self.digest.load(Relaxed))
    }

    /// A change is sent at once, as a new generation is.
    pub fn set_faults(&self, faults: Vec<String>) {
        let mut cur = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        if *cur != faults {
            *cur = faults;
            self.changed.notify_one();
        }
    }

    pub fn faults(&self) -> Vec<String> {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct SessionHandle {
    pub status: Arc<Mutex<SessionStatus>>,
    pub applied: Arc<Applied>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionHandle {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// What the session hands on to the rest of the daemon: the managers it
/// learns (for the node's other calls), events to act on, and the node's
/// WireGuard key (sent with each heartbeat, rotated when asked).
pub struct Links {
    pub managers: Managers,
    pub events: mpsc::Sender<SessionEvent>,
    pub encryption: Arc<Encryption>,
}

impl Session {
    /// Starts the heartbeat loop. `identity` is the node's TLS identity, shared
    /// with its server (if a manager) so renewal updates both. `managers`
    /// gets the current set of managers from every heartbeat reply.
    pub fn spawn(
        state_dir: StateDir,
        config: NodeConfig,
        certs: Certs,
        identity: ReloadableIdentity,
        trusted: TrustedManagers,
        links: Links,
    ) -> Result<SessionHandle, SessionError> {
        let Links {
            managers,
            events,
            encryption,
        } = links;
        let tls =
            tls::member_client_config(&certs.ca, identity.clone(), Arc::new(trusted.clone()))?;
        let status = Arc::new(Mutex::new(SessionStatus {
            cert_not_after: pki::identity_from_pem(&certs.cert)
                .ok()
                .map(|i| i.not_after),
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let applied = Arc::new(Applied::default());
        let session = Session {
            state_dir,
            config,
            certs,
            identity,
            trusted,
            managers,
            tls,
            channels: HashMap::new(),
            next: 0,
            leader: None,
            // Until the first reply says otherwise: the cluster default.
            period: Duration::from_millis(200),
            grace: Duration::from_millis(800),
            status: status.clone(),
            events,
            applied: applied.clone(),
            encryption,
            routes: crate::routes::Reader::default(),
        };
        let task = tokio::spawn(session.run(stop_rx));
        Ok(SessionHandle {
            status,
            applied,
            stop,
            task,
        })
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let wait = match self.beat().await {
                Beat::Removed => return,
                Beat::Ok => {
                    if let Err(e) = self.renew_if_due().await {
                        warn!("certificate renewal failed, will retry: {e}");
                    }
                    self.period
                }
                // Re-home fast after a leader change: the managers are
                // waiting to hear from us before calling us down.
                Beat::Redirected => Duration::ZERO,
                Beat::Failed => RETRY_AFTER_ERROR,
            };
            let applied = self.applied.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = applied.changed.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn channel(&mut self, addr: &str) -> Result<Channel, tls::TlsError> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let c = tls::channel(
            addr,
            self.tls.clone(),
            tls::MANAGER_SERVER_NAME,
            Duration::from_millis(500),
        )?;
        self.channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn pick_manager(&mut self) -> Option<String> {
        if let Some(l) = &self.leader {
            return Some(l.clone());
        }
        if self.config.managers.is_empty() {
            return None;
        }
        let addr = self.config.managers[self.next % self.config.managers.len()].clone();
        self.next += 1;
        Some(addr)
    }

    fn set_error(&self, msg: String) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.connected = false;
        st.last_error = msg;
    }

    /// One heartbeat.
    async fn beat(&mut self) -> Beat {
        let Some(addr) = self.pick_manager() else {
            self.set_error("no manager known".into());
            return Beat::Failed;
        };
        let channel = match self.channel(&addr) {
            Ok(c) => c,
            Err(e) => {
                self.set_error(e.to_string());
                return Beat::Failed;
            }
        };
        let routes = self.routes.current().await;
        let mut req = tonic::Request::new(HeartbeatRequest {
            addr: self.config.advertise_addr.clone(),
            hostname: String::new(),
            tls_not_after: String::new(),
            applied_generation: self.applied.get().0,
            applied_hash: self.applied.get().1,
            datapath_errors: self.applied.faults(),
            encryption_public_key: self.encryption.public_key_b64(),
            encryption_key_rotations_done: self.encryption.rotations_done(),
            encryption_peers: self.encryption.peers(),
            routes,
        });
        req.set_timeout(CALL_TIMEOUT);
        let sent = std::time::Instant::now();
        let reply = ClusterClient::new(channel).heartbeat(req).await;
        // The leader counts a beat it is still handling as heard, so a slow
        // reply costs nothing; one near the grace is worth a line, since it
        // is what a node marked down under load would show.
        let took = sent.elapsed();
        if took > self.grace / 2 {
            warn!(?took, manager = %addr, "slow heartbeat reply");
        }
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(s) => {
                self.leader = None;
                match s.code() {
                    tonic::Code::FailedPrecondition => {
                        // A follower: it says where the leader is.
                        if let Some(l) = s
                            .metadata()
                            .get("mesh-leader")
                            .and_then(|v| v.to_str().ok())
                            && !l.is_empty()
                            && l != addr
                        {
                            debug!("{addr} is not the leader; moving to {l}");
                            self.leader = Some(l.to_string());
                            let keys = s
                                .metadata()
                                .get(MANAGERS_HEADER)
                                .and_then(|v| v.to_str().ok())
                                .map(parse_managers)
                                .unwrap_or_default();
                            self.learn_managers(keys);
                            self.set_error(format!("{addr}: {}", s.message()));
                            return Beat::Redirected;
                        }
                        self.set_error(format!("{addr}: {}", s.message()));
                    }
                    tonic::Code::PermissionDenied if s.message().contains("removed") => {
                        warn!("{}", s.message());
                        self.set_error(s.message().to_string());
                        let _ = self
                            .events
                            .send(SessionEvent::Removed(s.message().to_string()))
                            .await;
                        return Beat::Removed;
                    }
                    _ => self.set_error(format!("{addr}: {}", s.message())),
                }
                return Beat::Failed;
            }
        };
        self.leader = Some(addr.clone());
        if reply.period_ms > 0 {
            self.period = Duration::from_millis(u64::from(reply.period_ms));
        }
        if reply.node_down_grace_ms > 0 {
            self.grace = Duration::from_millis(reply.node_down_grace_ms);
        }
        let managers: Vec<String> = reply.managers.iter().map(|m| m.addr.clone()).collect();
        let keys: BTreeMap<String, String> = reply
            .managers
            .iter()
            .filter(|m| !m.key_fingerprint.is_empty())
            .map(|m| (m.node_id.clone(), m.key_fingerprint.clone()))
            .collect();
        if !managers.is_empty() && managers != self.config.managers {
            self.config.managers = managers.clone();
            if let Err(e) = self.state_dir.save_config(&self.config) {
                warn!("cannot save manager list: {e}");
            }
        }
        // The keys first: a new manager's channel must find it trusted.
        self.learn_managers(keys);
        if !managers.is_empty() {
            // A connection is checked only when it is made: one kept to a
            // manager that has since been demoted or removed must go.
            self.channels.retain(|a, _| managers.contains(a));
        }
        self.managers.set_addrs(managers);
        {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            st.connected = true;
            st.manager = addr;
            st.leader_id = reply.leader_id.clone();
            st.managers = reply.managers.clone();
            st.last_error.clear();
            st.encryption_key_rotation_secs = reply.encryption_key_rotation_secs;
            st.heartbeat_ms = u64::from(reply.period_ms);
            st.node_down_grace_ms = reply.node_down_grace_ms;
        }
        self.rotate_key_if_due(&reply);
        if reply.role != self.config.role {
            info!(
                "the cluster says this node is now a {}; renewing its certificate",
                reply.role
            );
            match self.renew().await {
                Ok(role) if role.as_str() == reply.role => {
                    self.config.role = reply.role.clone();
                    if let Err(e) = self.state_dir.save_config(&self.config) {
                        warn!("cannot save role: {e}");
                    }
                    let _ = self.events.send(SessionEvent::RoleChanged(role)).await;
                }
                Ok(_) => {}
                Err(e) => warn!("renewal for role change failed, will retry: {e}"),
            }
        }
        Beat::Ok
    }

    /// Replaces the WireGuard key when the managers asked for a rotation
    /// this node has not acted on yet, or when the key is older than the
    /// cluster's interval. The new public key goes with the next heartbeat.
    fn rotate_key_if_due(&self, reply: &mesh_proto::HeartbeatResponse) {
        let Some(done) = rotation_due(
            self.encryption.rotations_done(),
            reply.encryption_key_rotations,
            self.encryption.older_than(
                Duration::from_secs(reply.encryption_key_rotation_secs),
                SystemTime::now(),
            ),
        ) else {
            return;
        };
        if let Err(e) = self.encryption.rotate(done) {
            warn!("cannot rotate the WireGuard key, will retry: {e}");
        }
    }

    /// Takes the current managers and their keys from a manager this node
    /// trusts (a heartbeat reply or a follower's redirect). A demoted or
    /// removed manager drops out here, and from then on no new connection
    /// to it is accepted.
    fn learn_managers(&mut self, keys: BTreeMap<String, String>) {
        if keys.is_empty() || !self.trusted.set(keys.clone()) {
            return;
        }
        self.config.manager_keys = keys;
        if let Err(e) = self.state_dir.save_config(&self.config) {
            warn!("cannot save manager list: {e}");
        }
    }

    async fn renew_if_due(&mut self) -> Result<(), String> {
        let Ok(id) = pki::identity_from_pem(&self.certs.cert) else {
            return Ok(());
        };
        let life = id
            .not_after
            .duration_since(id.not_before)
            .unwrap_or_default();
        let age = SystemTime::now()
            .duration_since(id.not_before)
            .unwrap_or_default();
        if age < life / 2 {
            return Ok(());
        }
        info!("certificate is past half its lifetime; renewing");
        self.renew().await.map(|_| ())
    }

    /// Asks a manager for a new certificate for a new key; the manager
    /// decides the role. Saves and swaps it in without a restart.
    async fn renew(&mut self) -> Result<Role, String> {
        let addr = self
            .leader
            .clone()
            .or_else(|| self.config.managers.first().cloned());
        let Some(addr) = addr else {
            return Err("no manager known".into());
        };
        // The same key: the cluster pins the node to it.
        let key = self.certs.key.clone();
        let csr = pki::csr_for_key(&key).map_err(|e| e.to_string())?;
        let channel = self.channel(&addr).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(RenewCertRequest { csr_pem: csr });
        req.set_timeout(CALL_TIMEOUT * 2);
        let reply = ClusterClient::new(channel)
            .renew_cert(req)
            .await
            .map_err(|s| format!("{addr}: {}", s.message()))?
            .into_inner();
        let id = pki::identity_from_pem(&reply.cert_pem).map_err(|e| e.to_string())?;
        let certs = Certs {
            ca: self.certs.ca.clone(),
            cert: reply.cert_pem,
            key,
        };
        self.state_dir
            .save_certs(&certs)
            .map_err(|e| e.to_string())?;
        self.identity
            .set(&certs.cert, &certs.key)
            .map_err(|e| e.to_string())?;
        self.certs = certs;
        // New handshakes must present the new certificate.
        self.channels.clear();
        self.managers.reconnect();
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cert_not_after = Some(id.not_after);
        info!(
            "node certificate renewed; role {}, valid until {:?}",
            id.role, id.not_after
        );
        Ok(id.role)
    }
}

/// The `rotations_done` to record if the key must be replaced now: the
/// managers asked for more rotations than were done, or the key is too old.
fn rotation_due(done: u64, asked: u64, too_old: bool) -> Option<u64> {
    (asked > done || too_old).then_some(asked.max(done))
}

/// Reads [`MANAGERS_HEADER`]: `NODE_ID=KEY_FINGERPRINT,...`.
fn parse_managers(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managers_header_round_trips_and_skips_junk() {
        let m = parse_managers("a=1,,b=2,=3,c=,junk");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert_eq!(m.get("b").map(String::as_str), Some("2"));
        assert!(parse_managers("").is_empty());
    }

    #[test]
    fn keys_rotate_when_asked_or_too_old_and_only_once_per_ask() {
        assert_eq!(rotation_due(0, 0, false), None);
        assert_eq!(rotation_due(0, 1, false), Some(1));
        assert_eq!(rotation_due(1, 1, false), None, "already done");
        assert_eq!(rotation_due(2, 1, false), None, "an older ask");
        assert_eq!(rotation_due(2, 1, true), Some(2), "age keeps the count");
        assert_eq!(rotation_due(1, 3, true), Some(3));
    }
}
