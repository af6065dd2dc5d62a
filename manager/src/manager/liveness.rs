//! Heartbeats, convergence (which nodes applied the current view) and the
//! leader's monitor that marks silent nodes down.

use super::*;
use std::collections::BTreeSet;

use crate::state::{MAX_NODE_ROUTES, NodeRoute, RouteReport, check_route};

impl Manager {
    /// Records a heartbeat and marks the node Ready again if it was not.
    /// `node` is the caller as its certificate says, so a node only ever
    /// reports (and sets the WireGuard key of) itself.
    pub async fn heartbeat(
        &self,
        node: &Node,
        r: &mesh_proto::HeartbeatRequest,
        peer: Option<IpAddr>,
    ) -> Result<(), ManagerError> {
        let (addr, digest) = (r.addr.as_str(), r.applied_hash);
        // Seen now, and again when the reply leaves: the node sends its
        // next heartbeat a period after our reply, so time this leader
        // spends on the beat (Raft writes) is never counted as silence.
        let _beat = BeatInFlight::enter(self, &node.id);
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id.clone(), digest);
        self.acked.notify_waiters();
        let addr = self.accepted_addr(node, addr, peer);
        if node.state != NodeState::Ready || addr.is_some() {
            info!(node = %node.id, "node is ready");
            self.write(Command::SetNodeState {
                id: node.id.clone(),
                state: NodeState::Ready,
                addr,
                at: now(),
            })
            .await?;
        }
        let errors = bounded_errors(&r.datapath_errors);
        if node.datapath_errors != errors {
            self.write(Command::SetNodeErrors {
                id: node.id.clone(),
                errors,
            })
            .await?;
        }
        self.record_routes(node, &r.routes).await?;
        self.encryption_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id.clone(), bounded_peers(&r.encryption_peers));
        self.record_encryption_key(node, &r.encryption_public_key)
            .await
    }

    /// Proposes the node's reported WireGuard key if it differs from the
    /// record. A key the state machine would refuse (malformed, another
    /// node's) is not proposed: it is logged, once per period, and the
    /// node keeps its recorded key.
    async fn record_encryption_key(&self, node: &Node, key: &str) -> Result<(), ManagerError> {
        if key.is_empty() || node.encryption_public_key == key {
            return Ok(());
        }
        if let Some(why) = self.read(|s| s.wireguard_key_refusal(&node.id, key)) {
            let mut logged = self.key_refused.lock().unwrap_or_else(|e| e.into_inner());
            if logged
                .get(&node.id)
                .is_none_or(|t| t.elapsed() >= ADDR_CHANGE_EVERY)
            {
                logged.insert(node.id.clone(), Instant::now());
                warn!(node = %node.id, "WireGuard key refused: {why}");
            }
            return Ok(());
        }
        info!(node = %node.id, key, "node's WireGuard key changed");
        match self
            .write(Command::SetNodeEncryptionKey {
                id: node.id.clone(),
                public_key: key.to_string(),
            })
            .await
        {
            // Lost a race with another node's report: logged, not fatal.
            Err(ManagerError::Refused(why)) => {
                warn!(node = %node.id, "WireGuard key refused: {why}");
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Proposes the node's reported routes if they differ from the record.
    /// Entries the state machine would refuse (not a CIDR, not a device
    /// name) and any beyond the bound are dropped first, so a bad report
    /// costs no log entry and the good routes still count.
    async fn record_routes(
        &self,
        node: &Node,
        reported: &[mesh_proto::NodeRoute],
    ) -> Result<(), ManagerError> {
        let (routes, dropped) = usable_routes(reported);
        if dropped > 0 {
            debug!(node = %node.id, dropped, "unusable routes left out of the node's report");
        }
        if node.routes == routes {
            return Ok(());
        }
        info!(node = %node.id, routes = routes.len(), "node's routes changed");
        let routes = routes
            .iter()
            .map(|r| RouteReport {
                destination: r.destination.to_string(),
                device: r.device.clone(),
            })
            .collect();
        match self
            .write(Command::SetNodeRoutes {
                id: node.id.clone(),
                routes,
            })
            .await
        {
            Err(ManagerError::Refused(why)) => {
                warn!(node = %node.id, "routes refused: {why}");
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Each node's WireGuard peers as its last heartbeat here reported
    /// them.
    pub fn encryption_peers(&self, node_id: &str) -> Vec<mesh_proto::EncryptionPeer> {
        self.encryption_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node_id)
            .cloned()
            .unwrap_or_default()
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
        self.node_views(|s| {
            s.nodes
                .values()
                .filter(|n| n.state == NodeState::Ready && n.id != exclude)
                .map(|n| n.id.clone())
                .collect()
        })
        .into_iter()
        .filter(|(node, want)| acks.get(node).is_none_or(|a| *a != want.digest))
        .map(|(node, _)| node)
        .collect()
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
            let channel = self.forward_channel(&addr)?;
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
}

impl Manager {
    /// The cluster's heartbeat period and down grace (defaults before
    /// `init` has been applied), stretched for large clusters (see
    /// [`scaled_liveness`]).
    pub fn liveness(&self) -> (Duration, Duration) {
        self.read(|s| {
            let c = s.cluster.clone().unwrap_or_default();
            scaled_liveness(c.heartbeat_period(), c.node_down_grace(), s.nodes.len())
        })
    }
}

/// Heartbeats the leader takes per second at most: past it, the period
/// and the grace grow together with the number of nodes. With 1,000
/// simulated nodes at 200 ms the leader spent 58% of a core on heartbeats
/// alone; 5,000 would need all of it. Detection then takes longer in
/// proportion, as in Swarm, whose period is 5 s at any size.
const MAX_BEATS_PER_SEC: u128 = 2500;

/// `period` and `grace` for `nodes` nodes: unchanged up to
/// [`MAX_BEATS_PER_SEC`], stretched by the same factor above it.
pub fn scaled_liveness(period: Duration, grace: Duration, nodes: usize) -> (Duration, Duration) {
    let period_ms = period.as_millis().max(1);
    let beats_per_sec = nodes as u128 * 1000 / period_ms;
    if beats_per_sec <= MAX_BEATS_PER_SEC {
        return (period, grace);
    }
    let factor = beats_per_sec.div_ceil(MAX_BEATS_PER_SEC) as u32;
    (period * factor, grace * factor)
}

/// A heartbeat being handled: the node counts as seen when it arrives,
/// while it is handled, and when its reply leaves.
struct BeatInFlight<'a> {
    mgr: &'a Manager,
    node: String,
}

impl<'a> BeatInFlight<'a> {
    fn enter(mgr: &'a Manager, node: &str) -> Self {
        mgr.last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), Instant::now());
        *mgr.beats_in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(node.to_string())
            .or_default() += 1;
        BeatInFlight {
            mgr,
            node: node.to_string(),
        }
    }
}

impl Drop for BeatInFlight<'_> {
    fn drop(&mut self) {
        self.mgr
            .last_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.node.clone(), Instant::now());
        let mut inflight = self
            .mgr
            .beats_in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = inflight.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inflight.remove(&self.node);
            }
        }
    }
}

/// How much longer than the grace a silent node stays Ready while its host
/// still answers: a daemon restart (about 0.7 s here) or a starved daemon
/// must not cost the node its tasks, which keep running meanwhile.
pub const HOST_UP_GRACE: Duration = Duration::from_secs(5);
/// How long a probe of a silent node's host may take: a host on the same
/// network refuses or accepts within milliseconds.
const PROBE_TIMEOUT: Duration = Duration::from_millis(150);

/// Where to knock on a node's host: its cluster port (a manager accepts,
/// a worker's kernel refuses; both prove the host is up).
fn probe_target(n: &Node) -> Option<std::net::SocketAddr> {
    if let Ok(a) = n.manager_addr.parse() {
        return Some(a);
    }
    let ip: IpAddr = n.addr.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, PROBE_PORT))
}

/// The port probed on a worker: the default cluster port; nothing needs to
/// listen there, a refusal is the answer.
const PROBE_PORT: u16 = 2377;

/// Whether the host answers a TCP connect at all: accepted or refused
/// (RST) both mean its kernel runs; a timeout or an unreachable route do
/// not, and neither does a firewall that drops the probe, so such a host
/// is treated as before (Down after the grace).
async fn host_answers(to: std::net::SocketAddr) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// How often the monitor looks: a small part of the grace, so detection
/// costs at most that much beyond it.
fn monitor_tick(grace: Duration) -> Duration {
    (grace / 16).clamp(Duration::from_millis(20), Duration::from_millis(200))
}

/// The instant from which `grace` of silence ends `wanted` from `now`.
fn ends_after(now: Instant, grace: Duration, wanted: Duration) -> Instant {
    if wanted >= grace {
        now.checked_add(wanted - grace).unwrap_or(now)
    } else {
        now.checked_sub(grace - wanted).unwrap_or(now)
    }
}

/// Pure decision of the monitor: the Ready nodes silent for longer than
/// `grace`. A node with a heartbeat being handled is not silent.
fn silent_nodes<'a>(
    ready: impl Iterator<Item = &'a str>,
    seen: &HashMap<String, Instant>,
    in_flight: &HashMap<String, usize>,
    now: Instant,
    grace: Duration,
) -> Vec<String> {
    ready
        .filter(|id| !in_flight.contains_key(*id))
        .filter(|id| {
            seen.get(*id)
                .is_none_or(|t| now.saturating_duration_since(*t) > grace)
        })
        .map(str::to_string)
        .collect()
}

/// While this manager leads, marks nodes whose heartbeats stopped as down.
///
/// Only the node's own silence counts: a heartbeat this leader is still
/// handling keeps its node alive (`BeatInFlight`), and when this manager
/// itself stalls (its monitor wakes late: CPU starved, a long fsync on the
/// runtime) every node is forgiven the stall, since heartbeats queued
/// meanwhile were not yet read.
pub(super) async fn monitor(mgr: std::sync::Weak<Manager>, mut stop: watch::Receiver<bool>) {
    let mut was_leader = false;
    // The leader seen before this manager took over: most likely dead.
    let mut previous_leader: Option<u64> = None;
    let mut last_tick = Instant::now();
    // Silent nodes whose host still answered a probe: since when, and when
    // it was last asked.
    let mut answering: HashMap<String, (Instant, Instant)> = HashMap::new();
    let mut tick = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        let Some(mgr) = mgr.upgrade() else { return };
        let (period, grace) = mgr.liveness();
        let woke = Instant::now();
        let late = woke
            .saturating_duration_since(last_tick)
            .saturating_sub(tick);
        last_tick = woke;
        tick = monitor_tick(grace);
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
            // session), more if their old leader vanished silently.
            let now = Instant::now();
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
            let everyone = ends_after(now, grace, grace.max(NEW_LEADER_GRACE));
            for id in ids {
                seen.insert(id, everyone);
            }
            // If the old leader is alive it heartbeats within a period or
            // two; if not, calling it down early is what the user wants.
            if let Some(prev) = prev {
                let wanted = PREVIOUS_LEADER_GRACE.max(period * 2).min(grace);
                seen.insert(prev, ends_after(now, grace, wanted));
            }
        } else if leader && late > period / 2 {
            // This manager did not run for `late`: heartbeats that arrived
            // meanwhile are still queued, so the stall is not the nodes'.
            debug!(?late, "leader stalled: forgiving the nodes that long");
            let mut seen = mgr.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            for t in seen.values_mut() {
                *t = t.checked_add(late).unwrap_or(*t).min(woke);
            }
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        let silent: Vec<String> = {
            let seen = mgr.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            let in_flight = mgr
                .beats_in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            mgr.read(|s| {
                silent_nodes(
                    s.nodes
                        .values()
                        .filter(|n| n.state == NodeState::Ready)
                        .map(|n| n.id.as_str()),
                    &seen,
                    &in_flight,
                    now,
                    grace,
                )
            })
        };
        answering.retain(|id, _| silent.contains(id));
        // A host that answered is asked again once per grace, not every
        // tick: a paused daemon's listen queue must not fill with probes.
        let probes = silent.iter().map(|id| {
            let recent = answering
                .get(id)
                .is_some_and(|(_, checked)| checked.elapsed() < grace);
            let target = mgr.read(|s| s.nodes.get(id).and_then(probe_target));
            async move {
                match target {
                    _ if recent => true,
                    Some(t) => host_answers(t).await,
                    None => false,
                }
            }
        });
        let answers = futures::future::join_all(probes).await;
        for (id, host_up) in silent.into_iter().zip(answers) {
            if host_up {
                // The daemon is gone but its host answers: a restart, or a
                // daemon too busy to beat. Its tasks run on the kernel's
                // state meanwhile, so moving them would only cost.
                let probed = Instant::now();
                let (since, checked) = answering.entry(id.clone()).or_insert((probed, probed));
                if checked.elapsed() >= grace {
                    *checked = probed;
                }
                if since.elapsed() < HOST_UP_GRACE {
                    continue;
                }
                info!(node = %id, ?grace, "host answers but its daemon has not for {HOST_UP_GRACE:?} more: marking node down");
            } else {
                info!(node = %id, ?grace, "no heartbeat within the grace and the host does not answer: marking node down");
            }
            answering.remove(&id);
            let cmd = Command::SetNodeState {
                id,
                state: NodeState::Down,
                addr: None,
                at: now(),
            };
            if let Err(e) = mgr.write(cmd).await {
                warn!("cannot mark node down: {e}");
            }
        }
    }
}

/// What a node may say about its own faults is bounded, so a node cannot
/// grow the replicated state by reporting: at most this many lines, each cut
/// to this many characters.
const MAX_DATAPATH_ERRORS: usize = 16;
const MAX_DATAPATH_ERROR_LEN: usize = 300;

fn bounded_errors(errors: &[String]) -> Vec<String> {
    errors
        .iter()
        .take(MAX_DATAPATH_ERRORS)
        .map(|e| cut(e, MAX_DATAPATH_ERROR_LEN))
        .collect()
}

fn cut(e: &str, len: usize) -> String {
    match e.char_indices().nth(len) {
        Some((i, _)) => format!("{}…", &e[..i]),
        None => e.to_string(),
    }
}

/// The reported routes the state machine accepts, checked, sorted and
/// deduplicated as it keeps them, at most [`MAX_NODE_ROUTES`] of them, and
/// how many reported entries were not kept.
fn usable_routes(reported: &[mesh_proto::NodeRoute]) -> (Vec<NodeRoute>, usize) {
    let usable: BTreeSet<NodeRoute> = reported
        .iter()
        .filter_map(|r| {
            check_route(&RouteReport {
                destination: r.destination.clone(),
                device: r.device.clone(),
            })
            .ok()
        })
        .collect();
    let usable: Vec<NodeRoute> = usable.into_iter().take(MAX_NODE_ROUTES).collect();
    let dropped = reported.len() - usable.len();
    (usable, dropped)
}

/// A node's peer report is kept in memory only, but still bounded: a
/// member must not be able to grow a manager's memory by reporting.
const MAX_ENCRYPTION_PEERS: usize = 1024;
const MAX_PEER_FIELD_LEN: usize = 80;

fn bounded_peers(peers: &[mesh_proto::EncryptionPeer]) -> Vec<mesh_proto::EncryptionPeer> {
    peers
        .iter()
        .take(MAX_ENCRYPTION_PEERS)
        .map(|p| mesh_proto::EncryptionPeer {
            node_id: cut(&p.node_id, MAX_PEER_FIELD_LEN),
            public_key: cut(&p.public_key, MAX_PEER_FIELD_LEN),
            endpoint: cut(&p.endpoint, MAX_PEER_FIELD_LEN),
            last_handshake: cut(&p.last_handshake, MAX_PEER_FIELD_LEN),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        })
        .collect()
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[test]
    fn only_nodes_silent_beyond_the_grace_and_not_being_heard_are_down() {
        let now = Instant::now();
        let grace = Duration::from_millis(800);
        let ago = |ms| now.checked_sub(Duration::from_millis(ms)).expect("uptime");
        let seen: HashMap<String, Instant> = [
            ("fresh".to_string(), ago(100)),
            ("edge".to_string(), ago(800)),
            ("silent".to_string(), ago(900)),
            ("slow-reply".to_string(), ago(5000)),
        ]
        .into();
        let in_flight: HashMap<String, usize> = [("slow-reply".to_string(), 1)].into();
        let ready = ["fresh", "edge", "silent", "slow-reply", "never"];
        let down = silent_nodes(ready.into_iter(), &seen, &in_flight, now, grace);
        assert_eq!(down, ["silent", "never"]);
    }

    #[tokio::test]
    async fn a_host_answers_when_it_accepts_or_refuses_not_when_silent() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = l.local_addr().expect("addr");
        assert!(host_answers(open).await, "accepting host");
        drop(l);
        assert!(host_answers(open).await, "refusing host (nothing listens)");
        // A multicast address is no host: the kernel says unreachable,
        // which is not an answer.
        let nowhere: std::net::SocketAddr = "224.0.0.1:2377".parse().expect("addr");
        let t = Instant::now();
        assert!(!host_answers(nowhere).await, "no host");
        assert!(t.elapsed() < PROBE_TIMEOUT + Duration::from_millis(500));
    }

    #[test]
    fn probes_go_to_the_cluster_port_or_the_default_one() {
        let mut n = Node {
            addr: "192.168.1.12".into(),
            ..Default::default()
        };
        assert_eq!(probe_target(&n), "192.168.1.12:2377".parse().ok());
        n.manager_addr = "192.168.1.11:4000".into();
        assert_eq!(probe_target(&n), "192.168.1.11:4000".parse().ok());
        n.manager_addr.clear();
        n.addr = "not an ip".into();
        assert_eq!(probe_target(&n), None);
    }

    #[test]
    fn a_new_leaders_grace_can_end_after_or_before_the_configured_one() {
        let now = Instant::now();
        let grace = Duration::from_millis(800);
        let later = ends_after(now, grace, Duration::from_millis(1500));
        assert_eq!(later + grace, now + Duration::from_millis(1500));
        let sooner = ends_after(now, Duration::from_secs(20), Duration::from_millis(800));
        assert_eq!(
            sooner + Duration::from_secs(20),
            now + Duration::from_millis(800)
        );
        assert_eq!(monitor_tick(grace), Duration::from_millis(50));
        assert_eq!(
            monitor_tick(Duration::from_secs(60)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn reported_errors_are_bounded_in_number_and_length() {
        let many: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        assert_eq!(bounded_errors(&many).len(), MAX_DATAPATH_ERRORS);
        let long = vec!["é".repeat(1000)];
        let cut = bounded_errors(&long);
        assert_eq!(cut[0].chars().count(), MAX_DATAPATH_ERROR_LEN + 1);
        assert_eq!(bounded_errors(&["ok".to_string()]), ["ok"]);
    }

    #[test]
    fn unusable_reported_routes_are_dropped_and_the_rest_bounded() {
        let r = |d: &str, dev: &str| mesh_proto::NodeRoute {
            destination: d.into(),
            device: dev.into(),
        };
        let (kept, dropped) = usable_routes(&[
            r("10.0.0.0/8", "eth0"),
            r("junk", "eth0"),
            r("10.1.0.0/16", ""),
        ]);
        assert_eq!((kept.len(), dropped), (1, 2));
        assert_eq!(kept[0].destination.to_string(), "10.0.0.0/8");
        let many: Vec<_> = (0..100)
            .map(|i| r(&format!("10.{i}.0.0/16"), "eth0"))
            .collect();
        let (kept, dropped) = usable_routes(&many);
        assert_eq!(
            (kept.len(), dropped),
            (MAX_NODE_ROUTES, 100 - MAX_NODE_ROUTES)
        );
        let reports: Vec<RouteReport> = kept
            .iter()
            .map(|r| RouteReport {
                destination: r.destination.to_string(),
                device: r.device.clone(),
            })
            .collect();
        assert_eq!(crate::state::check_routes(&reports), Ok(kept));
    }

    #[test]
    fn reported_peers_are_bounded() {
        let p = mesh_proto::EncryptionPeer {
            node_id: "n".repeat(500),
            last_handshake: "2026-01-01T00:00:00Z".into(),
            rx_bytes: 7,
            ..Default::default()
        };
        let many = vec![p; MAX_ENCRYPTION_PEERS + 5];
        let kept = bounded_peers(&many);
        assert_eq!(kept.len(), MAX_ENCRYPTION_PEERS);
        assert_eq!(kept[0].node_id.chars().count(), MAX_PEER_FIELD_LEN + 1);
        assert_eq!(kept[0].last_handshake, "2026-01-01T00:00:00Z");
        assert_eq!(kept[0].rx_bytes, 7);
    }
}

#[cfg(test)]
mod scale_tests {
    use super::scaled_liveness;
    use std::time::Duration;

    #[test]
    fn liveness_stretches_only_past_the_beat_budget() {
        let (p, g) = (Duration::from_millis(200), Duration::from_millis(800));
        assert_eq!(scaled_liveness(p, g, 5), (p, g));
        assert_eq!(scaled_liveness(p, g, 500), (p, g));
        assert_eq!(scaled_liveness(p, g, 1000), (p * 2, g * 2));
        assert_eq!(scaled_liveness(p, g, 5000), (p * 10, g * 10));
        // A slower configured period leaves more room.
        let slow = Duration::from_secs(5);
        assert_eq!(scaled_liveness(slow, slow * 4, 5000), (slow, slow * 4));
    }
}
