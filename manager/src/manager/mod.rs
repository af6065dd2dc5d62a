//! A running manager: the Raft instance, its storage, and the logic that
//! needs to be on the leader (writes, heartbeats, marking silent nodes down).
//!
//! This file starts it and carries writes to the leader; `liveness` has
//! heartbeats, convergence and the monitor that marks silent nodes down;
//! `membership` changes the Raft voters.

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
use mesh_common::model::NodeState;

mod liveness;
mod membership;
mod view_cache;

pub use view_cache::{NodeViewAt, Published, Streaming};

/// How often nodes heartbeat and how long a silent node stays Ready are
/// cluster settings (`ClusterInfo::heartbeat_period`, `node_down_grace`).
/// After an election every node gets at least this long to find the new
/// leader (a node whose old leader vanished waits out its call timeout
/// first), whatever the grace.
const NEW_LEADER_GRACE: Duration = Duration::from_millis(1500);
/// The previous leader, if alive, heartbeats within a period or two of
/// learning it lost: it gets at most this long (and at most the grace).
const PREVIOUS_LEADER_GRACE: Duration = Duration::from_millis(800);
/// How long a write may wait for a quorum before the user is told why not.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read may wait to confirm this manager is current.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot start Raft: {0}")]
    Start(String),
    #[error("the write was not committed within {0:?}: {1}")]
    NoQuorum(Duration, String),
    #[error("no leader took the command: {0}")]
    NoLeader(String),
    #[error("cannot forward the write to the leader at {addr}: {msg}")]
    Forward { addr: String, msg: String },
    #[error(
        "the leader at {0} went away before answering: the write may or may not have been committed; check with ls/inspect before retrying"
    )]
    LeaderLost(String),
    #[error("{0}")]
    Refused(mesh_common::refusal::Refusal),
    #[error(
        "this manager cannot confirm that its state is current ({0}); it does not answer from a possibly old state: retry, or ask another manager"
    )]
    NotCurrent(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// The one mapping of a manager's failures to gRPC codes: refusals keep
/// their kind; no quorum, no leader or an unreachable leader are worth a
/// retry; anything else is ours.
impl From<ManagerError> for tonic::Status {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::Refused(r) => r.into(),
            ManagerError::NoQuorum(..)
            | ManagerError::NoLeader(_)
            | ManagerError::Forward { .. }
            | ManagerError::LeaderLost(_)
            | ManagerError::NotCurrent(_) => tonic::Status::unavailable(e.to_string()),
            other => tonic::Status::internal(other.to_string()),
        }
    }
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
    /// Heartbeats being handled per node: a node whose heartbeat waits on
    /// this leader (a slow Raft write) is not silent.
    beats_in_flight: Mutex<HashMap<String, usize>>,
    /// Digest of the node view each node says it has applied to the
    /// kernel: how the managers know, rather than guess, that a change has
    /// reached every node.
    applied: Mutex<HashMap<String, u64>>,
    /// Woken whenever a node reports a new applied view.
    acked: tokio::sync::Notify,
    /// Node views at the last applied index (see `view_cache`).
    view_cache: Mutex<view_cache::ViewCache>,
    /// The views of every node with an open Assignments stream, computed
    /// together (see `view_cache::publish`).
    published: watch::Sender<Arc<view_cache::Published>>,
    /// Nodes with open Assignments streams here, and how many each.
    streaming: Mutex<HashMap<String, usize>>,
    /// Log requests to nodes and their answers (see `logs`).
    pub logs: crate::logs::LogRouter,
    /// The managers this node knew of as a member (join reply, heartbeat
    /// replies): whom a fresh manager, with no state yet, accepts Raft from.
    pub trusted: TrustedManagers,
    /// Per node, when its underlay address last changed (rate limit), and
    /// when a refused change was last logged (so a flood logs once).
    addr_changed: Mutex<HashMap<String, Instant>>,
    addr_refused: Mutex<HashMap<String, Instant>>,
    /// Per node, when a refused WireGuard key was last logged.
    key_refused: Mutex<HashMap<String, Instant>>,
    /// Each node's WireGuard peers as its last heartbeat to this manager
    /// reported them (handshakes change every few minutes: not worth Raft);
    /// `node inspect` shows them.
    encryption_peers: Mutex<HashMap<String, Vec<mesh_proto::EncryptionPeer>>>,
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
            beats_in_flight: Mutex::default(),
            applied: Mutex::default(),
            acked: tokio::sync::Notify::new(),
            view_cache: Mutex::default(),
            published: watch::channel(Arc::default()).0,
            streaming: Mutex::default(),
            logs: Default::default(),
            trusted: tls.trusted,
            addr_changed: Mutex::default(),
            addr_refused: Mutex::default(),
            key_refused: Mutex::default(),
            encryption_peers: Mutex::default(),
            stop,
        });
        tokio::spawn(liveness::monitor(
            Arc::downgrade(&mgr),
            mgr.stop.subscribe(),
        ));
        tokio::spawn(view_cache::publish(
            Arc::downgrade(&mgr),
            mgr.stop.subscribe(),
        ));
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
                "no leader is elected, and a majority of managers ({needed} of {}) is needed to elect one: bring managers back up or wait for them to reconnect",
                voters.len()
            );
        }
        let seen = self
            .last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let grace = self.liveness().1;
        let up = self.read(|s| {
            voters
                .iter()
                .filter(|v| {
                    **v == self.raft_id
                        || s.nodes.values().any(|n| {
                            n.raft_id == **v && seen.get(&n.id).is_some_and(|t| t.elapsed() < grace)
                        })
                })
                .count()
        });
        if up < needed {
            format!(
                "fewer than a majority of managers are reachable ({up} of {} are heard from, {needed} needed): bring managers back or wait for them to reconnect",
                voters.len()
            )
        } else {
            format!(
                "{up} of {} managers are heard from, yet a majority did not confirm in time (a manager just restarted or is overloaded): retry",
                voters.len()
            )
        }
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

    /// The kept channel to another manager, for a call forwarded to it.
    fn forward_channel(&self, addr: &str) -> Result<tonic::transport::Channel, ManagerError> {
        self.peers.channel(addr).map_err(|e| ManagerError::Forward {
            addr: addr.to_string(),
            msg: e.to_string(),
        })
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
            // The connection broke after the command was sent: it may have
            // been committed, so it is not sent again.
            Err(s)
                if matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
                    || s.message().contains("h2 protocol error") =>
            {
                Err(Retry::Fail(ManagerError::LeaderLost(addr)))
            }
            Err(s) => Err(Retry::Fail(ManagerError::Forward {
                addr,
                msg: s.message().to_string(),
            })),
        }
    }

    /// Makes the next `read` linearizable: it reflects every write
    /// acknowledged before this call began. The leader confirms with a
    /// quorum that it still leads (openraft's read index); a follower asks
    /// the leader for that index. Either then waits until this manager has
    /// applied that far. Fails, rather than answering from an old state,
    /// when that cannot be confirmed within READ_TIMEOUT.
    pub async fn ensure_current(&self) -> Result<(), ManagerError> {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        let index = loop {
            match tokio::time::timeout_at(deadline, self.read_index_once()).await {
                Err(_) => return Err(ManagerError::NotCurrent(self.quorum_note())),
                Ok(Ok(i)) => break i,
                Ok(Err(Retry::Fail(e))) => return Err(e),
                Ok(Err(Retry::Later(why))) => {
                    debug!("read index retry: {why}");
                    if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                        return Err(ManagerError::NotCurrent(why));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.raft
            .wait(Some(left.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| {
                ManagerError::NotCurrent(format!(
                    "it has not applied the cluster's log up to index {index}: {e}"
                ))
            })
    }

    async fn read_index_once(&self) -> Result<u64, Retry> {
        if self.is_leader() {
            return self.leader_read_index().await.map_err(|e| match e {
                ManagerError::NotCurrent(why) => Retry::Later(why),
                other => Retry::Fail(other),
            });
        }
        let Some(addr) = self.leader_addr() else {
            return Err(Retry::Later("no leader is known".into()));
        };
        let channel = self
            .peers
            .channel(&addr)
            .map_err(|e| Retry::Later(e.to_string()))?;
        match ClusterClient::new(channel)
            .read_index(mesh_proto::Empty {})
            .await
        {
            Ok(r) => Ok(r.into_inner().index),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(Retry::Later(format!(
                "{addr} is no longer the leader and no other is known yet"
            ))),
            Err(s) if s.code() == tonic::Code::Unavailable => Err(Retry::Later(format!(
                "the leader at {addr} could not confirm that it still leads"
            ))),
            Err(s) => Err(Retry::Fail(ManagerError::Forward {
                addr,
                msg: s.message().to_string(),
            })),
        }
    }

    /// The leader's read index, once a quorum has confirmed it still
    /// leads: the end of its log, not only openraft's read log id. A
    /// leader restarted by kill -9 resumes its old term at once, and its
    /// commit index (saved without an fsync) may predate writes it had
    /// acknowledged; those are in its log (every committed entry is in the
    /// leader's log), so waiting for the log's end covers them.
    pub async fn leader_read_index(&self) -> Result<u64, ManagerError> {
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => {
                let last = self.raft.metrics().borrow().last_log_index;
                Ok(read.map(|l| l.index).unwrap_or(0).max(last.unwrap_or(0)))
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(ManagerError::NotCurrent("leadership moved".into()))
            }
            Err(RaftError::APIError(_)) => Err(ManagerError::NotCurrent(
                "a majority of managers did not confirm this leader".into(),
            )),
            Err(e) => Err(ManagerError::Raft(e.to_string())),
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
}

enum Retry {
    Later(String),
    Fail(ManagerError),
}
