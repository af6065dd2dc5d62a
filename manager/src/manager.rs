//! A running manager: the Raft instance, its storage, and the logic that
//! needs to be on the leader (writes, heartbeats, marking silent nodes down).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::cluster_client::ClusterClient;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use mesh_common::pki::NodeIdentity;
use mesh_common::tls::{self, ManagerCheck, ReloadableIdentity, TrustedManagers};

use crate::Raft;
use crate::authz::{self, Need};
use crate::network::Peers;
use crate::state::{ClusterState, Command, CommandResult, Node};
use crate::store::{self, StateMachineStore};

/// How often nodes heartbeat, and how long a silent node stays Ready. Swarm
/// waits ~15 s; a 500 ms period with a 2 s grace shows a dead node as Down
/// within 3 s while tolerating a few lost heartbeats.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_millis(500);
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(2);
const NEW_LEADER_GRACE: Duration = Duration::from_millis(1500);
const PREVIOUS_LEADER_GRACE: Duration = Duration::from_millis(800);
/// How long a write may wait for a quorum before the user is told why not.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot start Raft: {0}")]
    Start(String),
    #[error(
        "the write was not committed within {0:?}: fewer than a majority of managers are reachable ({1}); bring managers back or wait for them to reconnect"
    )]
    NoQuorum(Duration, String),
    #[error(
        "the cluster has no leader: fewer than a majority of managers are reachable ({0}); bring managers back up"
    )]
    NoLeader(String),
    #[error("cannot forward the write to the leader at {addr}: {msg}")]
    Forward { addr: String, msg: String },
    #[error("{0}")]
    Refused(String),
    #[error("raft: {0}")]
    Raft(String),
}

pub struct Manager {
    pub node_id: String,
    pub raft_id: u64,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub peers: Peers,
    /// Last heartbeat seen per node, kept only while this manager leads; a
    /// new leader starts everyone afresh so it never marks nodes down for
    /// heartbeats that went to its predecessor.
    last_seen: Mutex<HashMap<String, Instant>>,
    /// Digest of the node view each node says it has applied to the
    /// kernel: how the managers know, rather than guess, that a change has
    /// reached every node.
    applied: Mutex<HashMap<String, u64>>,
    /// Woken whenever a node reports a new applied view.
    acked: tokio::sync::Notify,
    /// Log requests to nodes and their answers (see `logs`).
    pub logs: crate::logs::LogRouter,
    /// The managers this node knew of as a member (join reply, heartbeat
    /// replies): whom a fresh manager, with no state yet, accepts Raft from.
    pub trusted: TrustedManagers,
    /// Per node, when its underlay address last changed (rate limit), and
    /// when a refused change was last logged (so a flood logs once).
    addr_changed: Mutex<HashMap<String, Instant>>,
    addr_refused: Mutex<HashMap<String, Instant>>,
    stop: watch::Sender<bool>,
}

/// Whether a server is a current manager, as this manager's state says; a
/// manager whose state is still empty (just promoted, not caught up) goes
/// by what it knew as a member.
#[derive(Debug)]
struct StateCheck {
    sm: StateMachineStore,
    fallback: TrustedManagers,
}

impl ManagerCheck for StateCheck {
    fn check_manager(&self, id: &NodeIdentity) -> Result<(), String> {
        let strict = self.sm.read(|s| {
            s.cluster
                .as_ref()
                .map(|_| authz::caller(s, id, Need::Manager).map(|_| ()))
        });
        match strict {
            // A lagging state that has not seen this manager join yet.
            Some(Err(authz::Denied::Unknown(_))) | None => self.fallback.check_manager(id),
            Some(r) => r.map_err(|e| e.to_string()),
        }
    }
}

/// How a manager reaches its peers over TLS.
pub struct PeerTls {
    pub ca_pem: String,
    pub identity: ReloadableIdentity,
    pub trusted: TrustedManagers,
}

/// At most one accepted change of a node's underlay address per this long:
/// each is a Raft write, and a node must not churn everyone's FDB entries.
pub const ADDR_CHANGE_EVERY: Duration = Duration::from_secs(10);

/// Default number of log entries between snapshots.
pub const SNAPSHOT_EVERY: u64 = 5000;

fn raft_config(snapshot_every: u64) -> Result<Arc<openraft::Config>, ManagerError> {
    let config = openraft::Config {
        cluster_name: "mesh".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1000,
        // Keep a bounded log: snapshot every 5,000 entries.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        // Keep some log after a snapshot so a briefly absent follower
        // catches up from entries rather than a whole snapshot.
        max_in_snapshot_log_to_keep: snapshot_every.min(1000),
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| ManagerError::Start(e.to_string()))
}

pub fn now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as the state records it (RFC 3339, UTC).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Manager {
    /// Opens the Raft store in `dir` and starts the Raft instance. A fresh
    /// store stays a pristine learner until `bootstrap` or a leader adds it.
    pub async fn start(
        dir: &Path,
        node_id: &str,
        tls: PeerTls,
        snapshot_every: u64,
    ) -> Result<Arc<Self>, ManagerError> {
        let (log, sm) = store::open(dir)?;
        let check = Arc::new(StateCheck {
            sm: sm.clone(),
            fallback: tls.trusted.clone(),
        });
        let client = tls::member_client_config(&tls.ca_pem, tls.identity, check)
            .map_err(|e| ManagerError::Start(e.to_string()))?;
        let peers = Peers::new(client);
        let raft_id = mesh_common::id::raft_id(node_id);
        let raft = Raft::new(
            raft_id,
            raft_config(snapshot_every)?,
            peers.clone(),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| ManagerError::Start(e.to_string()))?;
        let (stop, _) = watch::channel(false);
        let mgr = Arc::new(Self {
            node_id: node_id.to_string(),
            raft_id,
            raft,
            sm,
            peers,
            last_seen: Mutex::default(),
            applied: Mutex::default(),
            acked: tokio::sync::Notify::new(),
            logs: Default::default(),
            trusted: tls.trusted,
            addr_changed: Mutex::default(),
            addr_refused: Mutex::default(),
            stop,
        });
        tokio::spawn(monitor(Arc::downgrade(&mgr), mgr.stop.subscribe()));
        Ok(mgr)
    }

    /// Makes this manager the single voter of a new cluster and waits until
    /// it leads.
    pub async fn bootstrap(&self, cluster_addr: &str) -> Result<(), ManagerError> {
        let mut members = BTreeMap::new();
        members.insert(
            self.raft_id,
            BasicNode {
                addr: cluster_addr.to_string(),
            },
        );
        self.raft
            .initialize(members)
            .await
            .map_err(|e| ManagerError::Start(e.to_string()))?;
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if metrics.borrow().current_leader == Some(self.raft_id) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(ManagerError::Start(
                    "this manager did not become leader".into(),
                ));
            }
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.raft.shutdown().await {
            warn!("raft shutdown: {e}");
        }
    }

    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        self.sm.read(f)
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.raft_id)
    }

    /// Node ID of the current leader, if one is known.
    pub fn leader_node_id(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader?;
        self.read(|s| {
            s.nodes
                .values()
                .find(|n| n.raft_id == leader)
                .map(|n| n.id.clone())
        })
    }

    /// Cluster-port address of the current leader, from Raft membership.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }

    /// A short account of which managers are up, for error messages. Only
    /// the leader knows (from heartbeats); a follower knows there is none.
    fn quorum_note(&self) -> String {
        let voters = self.voters();
        let needed = voters.len() / 2 + 1;
        if !self.is_leader() {
            return format!(
                "no leader is elected; {needed} of {} managers are needed",
                voters.len()
            );
        }
        let seen = self
            .last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let up = self.read(|s| {
            voters
                .iter()
                .filter(|v| {
                    **v == self.raft_id
                        || s.nodes.values().any(|n| {
                            n.raft_id == **v
                                && seen
                                    .get(&n.id)
                                    .is_some_and(|t| t.elapsed() < NODE_DOWN_AFTER)
                        })
                })
                .count()
        });
        format!(
            "{up} of {} managers are heard from, {needed} needed",
            voters.len()
        )
    }

    /// Commits a command: on the leader directly, elsewhere by forwarding it
    /// to the leader over mutual TLS. Never hangs longer than WRITE_TIMEOUT.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, ManagerError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.write_once(&cmd)).await {
                Err(_) => return Err(ManagerError::NoQuorum(WRITE_TIMEOUT, self.quorum_note())),
                Ok(Err(Retry::Later(why))) => {
                    debug!("write retry: {why}");
                    if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(ManagerError::NoLeader(self.quorum_note()));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(Retry::Fail(e))) => return Err(e),
                Ok(Ok(CommandResult::Refused(msg))) => return Err(ManagerError::Refused(msg)),
                Ok(Ok(r)) => return Ok(r),
            }
        }
    }

    async fn write_once(&self, cmd: &Command) -> Result<CommandResult, Retry> {
        if self.is_leader() {
            return match self.raft.client_write(cmd.clone()).await {
                Ok(resp) => Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    Err(Retry::Later("leadership moved".into()))
                }
                Err(e) => Err(Retry::Fail(ManagerError::Raft(e.to_string()))),
            };
        }
        let Some(addr) = self.leader_addr() else {
            return Err(Retry::Later("no leader yet".into()));
        };
        let command =
            serde_json::to_vec(cmd).map_err(|e| Retry::Fail(ManagerError::Raft(e.to_string())))?;
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| Retry::Later(e.to_string()))?;
        let reply = ClusterClient::new(channel)
            .propose(mesh_proto::ProposeRequest { command })
            .await;
        match reply {
            Ok(r) => serde_json::from_slice(&r.into_inner().result)
                .map_err(|e| Retry::Fail(ManagerError::Raft(e.to_string()))),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                Err(Retry::Later(format!("{addr}: {}", s.message())))
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                Err(Retry::Later(format!("{addr}: {}", s.message())))
            }
            Err(s) => Err(Retry::Fail(ManagerError::Forward {
                addr,
                msg: s.message().to_string(),
            })),
        }
    }

    /// Leader side of a forwarded write.
    pub async fn propose_local(&self, cmd: Command) -> Result<CommandResult, tonic::Status> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(tonic::Status::failed_precondition("not the leader"))
            }
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        }
    }

    /// Records a heartbeat and marks the node Ready again if it was not.
    pub async fn heartbeat(
        &self,
        node: &Node,
        addr: &str,
        peer: Option<IpAddr>,
        digest: u64,
        datapath_errors: &[String],
    ) -> Result<(), ManagerError> {
        self.last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id.clone(), Instant::now());
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id.clone(), digest);
        self.acked.notify_waiters();
        let addr = self.accepted_addr(node, addr, peer);
        if node.state != "ready" || addr.is_some() {
            info!(node = %node.id, "node is ready");
            self.write(Command::SetNodeState {
                id: node.id.clone(),
                state: "ready".into(),
                addr,
                at: now(),
            })
            .await?;
        }
        if node.datapath_errors != datapath_errors {
            self.write(Command::SetNodeErrors {
                id: node.id.clone(),
                errors: datapath_errors.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// The new underlay address a heartbeat may set, if any. A node may
    /// only move to the address it joined with or the one its connection
    /// comes from (it cannot point traffic at a third party), and at most
    /// once per [`ADDR_CHANGE_EVERY`].
    fn accepted_addr(&self, node: &Node, addr: &str, peer: Option<IpAddr>) -> Option<String> {
        if addr.is_empty() || node.addr == addr {
            return None;
        }
        let from_peer = peer.is_some_and(|p| addr.parse::<IpAddr>().ok() == Some(p));
        if addr != node.joined_addr && !from_peer {
            self.log_addr_refusal(node, addr, "it is neither the address the node joined with nor the one its connection comes from");
            return None;
        }
        let mut changed = self.addr_changed.lock().unwrap_or_else(|e| e.into_inner());
        if changed
            .get(&node.id)
            .is_some_and(|t| t.elapsed() < ADDR_CHANGE_EVERY)
        {
            return None;
        }
        changed.insert(node.id.clone(), Instant::now());
        info!(node = %node.id, from = %node.addr, to = %addr, "node's underlay address changed");
        Some(addr.to_string())
    }

    /// Logs a refused address change once per node per rate-limit period.
    fn log_addr_refusal(&self, node: &Node, addr: &str, why: &str) {
        let mut logged = self.addr_refused.lock().unwrap_or_else(|e| e.into_inner());
        if logged
            .get(&node.id)
            .is_none_or(|t| t.elapsed() >= ADDR_CHANGE_EVERY)
        {
            logged.insert(node.id.clone(), Instant::now());
            warn!(node = %node.id, claimed = %addr, "heartbeat address refused: {why}");
        }
    }

    /// Ready nodes (but `exclude`) whose last applied view differs from
    /// the one they should have now. Meaningful on the leader, which gets
    /// the heartbeats.
    pub fn behind(&self, exclude: &str) -> Vec<String> {
        let acks = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.read(|s| {
            s.nodes
                .values()
                .filter(|n| n.state == "ready" && n.id != exclude)
                .filter(|n| {
                    let want = mesh_proto::view_digest(&crate::dispatcher::view_for(s, &n.id, 0));
                    acks.get(&n.id).is_none_or(|a| *a != want)
                })
                .map(|n| n.id.clone())
                .collect()
        })
    }

    /// Waits until every Ready node (but `exclude`) has applied its current
    /// view, or `timeout` passes; returns the nodes still behind. Asks the
    /// leader, which is where the acknowledgements arrive.
    pub async fn wait_converged(
        &self,
        exclude: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, ManagerError> {
        if !self.is_leader() {
            let addr = self
                .leader_addr()
                .ok_or_else(|| ManagerError::NoLeader(self.quorum_note()))?;
            let channel = self
                .peers
                .channel(&addr)
                .map_err(|e| ManagerError::Forward {
                    addr: addr.clone(),
                    msg: e.to_string(),
                })?;
            let r = ClusterClient::new(channel)
                .wait_converged(mesh_proto::WaitConvergedRequest {
                    exclude_node: exclude.to_string(),
                    timeout_ms: timeout.as_millis() as u64,
                })
                .await
                .map_err(|s| ManagerError::Forward {
                    addr,
                    msg: s.message().to_string(),
                })?;
            return Ok(r.into_inner().behind);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut state = self.sm.subscribe();
        loop {
            let acked = self.acked.notified();
            let behind = self.behind(exclude);
            if behind.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(behind);
            }
            tokio::select! {
                _ = acked => {}
                _ = state.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Adds a manager to the Raft voters: as a learner first (it catches up
    /// from the log or a snapshot), then as a voter.
    pub async fn add_voter(&self, raft_id: u64, addr: &str) -> Result<(), ManagerError> {
        self.raft
            .add_learner(
                raft_id,
                BasicNode {
                    addr: addr.to_string(),
                },
                true,
            )
            .await
            .map_err(|e| ManagerError::Raft(format!("adding {addr} as learner: {e}")))?;
        let mut voters: std::collections::BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(raft_id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| ManagerError::Raft(format!("adding {addr} as voter: {e}")))?;
        Ok(())
    }

    /// Removes a manager from the Raft voters (demotion or removal).
    pub async fn remove_voter(&self, raft_id: u64) -> Result<(), ManagerError> {
        let mut voters: std::collections::BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if !voters.remove(&raft_id) {
            return Ok(());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| ManagerError::Raft(format!("removing manager from Raft: {e}")))?;
        Ok(())
    }

    /// Raft IDs of the current membership, voters and learners.
    pub fn raft_members(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `who` may send this manager Raft messages, as Raft node
    /// `claimed` if given. Until this manager has any state (just promoted,
    /// not yet caught up), it accepts the managers it knew of as a member.
    pub fn check_raft_caller(
        &self,
        who: &NodeIdentity,
        claimed: Option<u64>,
    ) -> Result<(), authz::Denied> {
        let own = mesh_common::id::raft_id(&who.node_id);
        let claimed = claimed.unwrap_or(own);
        let members = self.raft_members();
        let strict = self.read(|s| {
            s.cluster
                .as_ref()
                .map(|_| authz::raft_caller(s, &members, who, claimed))
        });
        // What this node was told of the managers (join reply, heartbeats).
        let by_trusted = || {
            self.trusted
                .check_manager(who)
                .map_err(|_| authz::Denied::NotInRaft(who.node_id.clone()))?;
            if own != claimed {
                return Err(authz::Denied::NotOwnRaftId {
                    node: who.node_id.clone(),
                    own,
                    claimed,
                });
            }
            Ok(())
        };
        match strict {
            // No state yet (just promoted), or a node this replica's state
            // does not know yet (it lags: the manager joined in entries not
            // applied here) but its Raft membership holds.
            None => by_trusted(),
            Some(Err(authz::Denied::Unknown(_))) if members.contains(&own) => by_trusted(),
            Some(r) => r,
        }
    }

    /// Raft IDs of the current voters.
    pub fn voters(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    pub fn server_state(&self) -> ServerState {
        self.raft.metrics().borrow().state
    }
}

enum Retry {
    Later(String),
    Fail(ManagerError),
}

/// While this manager leads, marks nodes whose heartbeats stopped as down.
async fn monitor(mgr: std::sync::Weak<Manager>, mut stop: watch::Receiver<bool>) {
    let mut was_leader = false;
    // The leader seen before this manager took over: most likely dead.
    let mut previous_leader: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(mgr) = mgr.upgrade() else { return };
        let leader = mgr.is_leader();
        if !leader {
            previous_leader = mgr
                .raft
                .metrics()
                .borrow()
                .current_leader
                .or(previous_leader);
        }
        if leader && !was_leader {
            // A new leader gives every node a grace period: nodes re-home
            // within a few hundred ms of an election (see the worker's
            // session), so a shorter grace than NODE_DOWN_AFTER suffices.
            let now = Instant::now()
                .checked_sub(NODE_DOWN_AFTER - NEW_LEADER_GRACE)
                .unwrap_or_else(Instant::now);
            let ids: Vec<String> = mgr.read(|s| s.nodes.keys().cloned().collect());
            let prev = previous_leader.filter(|p| *p != mgr.raft_id).and_then(|p| {
                mgr.read(|s| {
                    s.nodes
                        .values()
                        .find(|n| n.raft_id == p)
                        .map(|n| n.id.clone())
                })
            });
            let mut seen = mgr.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.clear();
            for id in ids {
                seen.insert(id, now);
            }
            // If the old leader is alive it heartbeats within one period; if
            // not, calling it down early is what the user wants to see.
            if let Some(prev) = prev {
                let t = Instant::now()
                    .checked_sub(NODE_DOWN_AFTER - PREVIOUS_LEADER_GRACE)
                    .unwrap_or_else(Instant::now);
                seen.insert(prev, t);
            }
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        let silent: Vec<String> = {
            let seen = mgr.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            mgr.read(|s| {
                s.nodes
                    .values()
                    .filter(|n| n.state == "ready")
                    .filter(|n| {
                        seen.get(&n.id)
                            .is_none_or(|t| t.elapsed() > NODE_DOWN_AFTER)
                    })
                    .map(|n| n.id.clone())
                    .collect()
            })
        };
        for id in silent {
            info!(node = %id, "no heartbeat for {NODE_DOWN_AFTER:?}: marking node down");
            let cmd = Command::SetNodeState {
                id,
                state: "down".into(),
                addr: None,
                at: now(),
            };
            if let Err(e) = mgr.write(cmd).await {
                warn!("cannot mark node down: {e}");
            }
        }
    }
}

impl Manager {
    /// Asks the leader to change Raft membership for `node_id`: add it (it
    /// must be the caller) or remove it. Runs locally on the leader.
    pub async fn membership_call(
        &self,
        req: mesh_proto::JoinRaftRequest,
    ) -> Result<(), ManagerError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT * 2;
        loop {
            if self.is_leader() && req.remove {
                let raft_id = self.read(|s| s.nodes.get(&req.node_id).map(|n| n.raft_id));
                let raft_id = raft_id.ok_or_else(|| {
                    ManagerError::Refused(format!("node {} not found", req.node_id))
                })?;
                return self.remove_voter(raft_id).await;
            }
            if let Some(addr) = self.leader_addr() {
                let channel = self
                    .peers
                    .channel(&addr)
                    .map_err(|e| ManagerError::Forward {
                        addr: addr.clone(),
                        msg: e.to_string(),
                    })?;
                match ClusterClient::new(channel).join_raft(req.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                        ) => {}
                    Err(s) => {
                        return Err(ManagerError::Forward {
                            addr,
                            msg: s.message().to_string(),
                        });
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ManagerError::NoLeader(self.quorum_note()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
