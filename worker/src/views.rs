//! Following this node's view: the Assignments stream sends the whole view
//! first, then deltas; this module rebuilds the whole view from them and
//! says what changed with each, so the parts that act on the view can act
//! only on that.
//!
//! A delta is applied only on the generation it was made for, and the
//! rebuilt view must have the digest the manager computed: otherwise the
//! stream is dropped and a new one starts with a whole view.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::view_update::Update;
use mesh_proto::{Empty, NodeView, ViewDelta, ViewUpdate};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::managers::Managers;

/// Why an update could not be applied; the stream is then reopened.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ViewError {
    #[error("a delta on generation {base} arrived while the view is at {have:?}")]
    WrongBase { have: Option<u64>, base: u64 },
    #[error("the delta removes {kind} {id}, which the view does not have")]
    UnknownId { kind: &'static str, id: String },
    #[error("the delta's {kind} order is not a reordering of the view's")]
    BadOrder { kind: &'static str },
    #[error("the view rebuilt at generation {generation} does not have the manager's digest")]
    Digest { generation: u64 },
    #[error("an update with neither a view nor a delta")]
    Empty,
}

/// What one new view changed, by what the data path keys on. Ids are of
/// networks and tasks added, replaced or removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Anything may have changed: no earlier view to compare with.
    pub all: bool,
    pub networks: BTreeSet<String>,
    pub tasks: BTreeSet<String>,
    pub ingress: bool,
    pub encryption: bool,
    pub data_path_port: bool,
}

impl Changed {
    pub fn everything() -> Self {
        Changed {
            all: true,
            ..Default::default()
        }
    }

    /// Whether network `id` may have changed.
    pub fn network(&self, id: &str) -> bool {
        self.all || self.networks.contains(id)
    }

    /// Whether task `id` may have changed.
    pub fn task(&self, id: &str) -> bool {
        self.all || self.tasks.contains(id)
    }

    fn of(d: &ViewDelta) -> Self {
        Changed {
            all: false,
            networks: d
                .networks
                .iter()
                .map(|n| n.id.clone())
                .chain(d.removed_networks.iter().cloned())
                .collect(),
            tasks: d
                .tasks
                .iter()
                .map(|t| t.id.clone())
                .chain(d.removed_tasks.iter().cloned())
                .collect(),
            ingress: d.ingress.is_some(),
            encryption: d.encryption.is_some(),
            data_path_port: d.data_path_port.is_some(),
        }
    }

    fn merge(&mut self, o: Changed) {
        self.all |= o.all;
        self.networks.extend(o.networks);
        self.tasks.extend(o.tasks);
        self.ingress |= o.ingress;
        self.encryption |= o.encryption;
        self.data_path_port |= o.data_path_port;
    }
}

/// Applies one update of the stream on `current`: the new whole view and
/// what it changed. Pure: the follower, the tests and nothing else call it.
pub fn apply(
    current: Option<&NodeView>,
    update: ViewUpdate,
) -> Result<(NodeView, Changed), ViewError> {
    let (mut view, changed) = match update.update {
        Some(Update::Full(full)) => {
            // A whole view after a reconnect: what differs from the last one.
            let changed = current
                .and_then(|c| mesh_proto::view_delta(c, &full))
                .map_or_else(Changed::everything, |d| Changed::of(&d));
            (full, changed)
        }
        Some(Update::Delta(delta)) => {
            let Some(cur) = current.filter(|c| c.generation == update.base_generation) else {
                return Err(ViewError::WrongBase {
                    have: current.map(|c| c.generation),
                    base: update.base_generation,
                });
            };
            let changed = Changed::of(&delta);
            (apply_delta(cur, delta)?, changed)
        }
        None => return Err(ViewError::Empty),
    };
    view.generation = update.generation;
    if mesh_proto::view_digest(&view) != update.digest {
        return Err(ViewError::Digest {
            generation: update.generation,
        });
    }
    Ok((view, changed))
}

/// `cur` with `d` applied (the inverse of `mesh_proto::view_delta`).
fn apply_delta(cur: &NodeView, d: ViewDelta) -> Result<NodeView, ViewError> {
    let mut v = cur.clone();
    apply_list(
        &mut v.networks,
        d.networks,
        &d.removed_networks,
        &d.network_order,
        |n| n.id.as_str(),
        "network",
    )?;
    apply_list(
        &mut v.tasks,
        d.tasks,
        &d.removed_tasks,
        &d.task_order,
        |t| t.id.as_str(),
        "task",
    )?;
    if let Some(p) = d.data_path_port {
        v.data_path_port = p;
    }
    if let Some(i) = d.ingress {
        v.ingress = i.view;
    }
    if let Some(e) = d.encryption {
        v.encryption = e.view;
    }
    Ok(v)
}

/// One keyed list: removals, then replacements in place (new ids at the
/// end), then the order if the delta gives one.
fn apply_list<T>(
    list: &mut Vec<T>,
    set: Vec<T>,
    removed: &[String],
    order: &[String],
    id: impl Fn(&T) -> &str,
    kind: &'static str,
) -> Result<(), ViewError> {
    for r in removed {
        let Some(i) = list.iter().position(|t| id(t) == r) else {
            return Err(ViewError::UnknownId {
                kind,
                id: r.clone(),
            });
        };
        list.remove(i);
    }
    let mut at: HashMap<String, usize> = list
        .iter()
        .enumerate()
        .map(|(i, t)| (id(t).to_string(), i))
        .collect();
    for t in set {
        match at.get(id(&t)) {
            Some(&i) => list[i] = t,
            None => {
                at.insert(id(&t).to_string(), list.len());
                list.push(t);
            }
        }
    }
    if !order.is_empty() {
        if order.len() != list.len() {
            return Err(ViewError::BadOrder { kind });
        }
        let mut slots: Vec<Option<T>> = list.drain(..).map(Some).collect();
        for o in order {
            let Some(t) = at.get(o).and_then(|&i| slots[i].take()) else {
                return Err(ViewError::BadOrder { kind });
            };
            list.push(t);
        }
    }
    Ok(())
}

/// How many views' changes are kept for readers that fell behind.
const KEPT_CHANGES: usize = 64;

/// What changed with each recent view, for the parts that read the view
/// watch channel: they remember the generation they last acted on and ask
/// what changed since.
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// (generation before, generation after, what changed), oldest first.
    entries: Mutex<VecDeque<(Option<u64>, u64, Changed)>>,
}

impl ChangeLog {
    fn push(&self, before: Option<u64>, after: u64, changed: Changed) {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if e.len() == KEPT_CHANGES {
            e.pop_front();
        }
        e.push_back((before, after, changed));
    }

    /// What changed from the view at generation `since` (`None`: no view
    /// yet) to the latest one. Everything when that is not known (too old,
    /// or never seen). A generation names one content, whichever manager
    /// computed it, so the walk stops at the latest view that had it.
    pub fn changed_since(&self, since: Option<u64>) -> Changed {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if e.back().is_some_and(|(_, after, _)| Some(*after) == since) {
            return Changed::default();
        }
        let mut sum = Changed::default();
        for (before, _, changed) in e.iter().rev() {
            sum.merge(changed.clone());
            if *before == since && since.is_some() {
                return sum;
            }
        }
        Changed::everything()
    }
}

/// Opens the Assignments stream on the first manager that gives one, and
/// says which manager that is.
async fn open(
    managers: &Managers,
) -> Result<(String, tonic::Streaming<ViewUpdate>), tonic::Status> {
    let mut last = tonic::Status::unavailable("no manager known");
    for addr in managers.addrs() {
        let ch = match managers.channel_to(&addr) {
            Ok(ch) => ch,
            Err(e) => {
                last = tonic::Status::unavailable(e.to_string());
                continue;
            }
        };
        match ClusterClient::new(ch).assignments(Empty {}).await {
            Ok(r) => return Ok((addr, r.into_inner())),
            Err(s) => last = s,
        }
    }
    Err(last)
}

/// Keeps one Assignments stream open to some manager, reconnecting on loss
/// or on an update that does not apply, and publishes each rebuilt view on
/// `tx` after its changes are in `log`. The stream is dropped as soon as
/// its manager leaves the set of current managers: a connection is checked
/// only when it is made, so a demoted or removed manager must not go on
/// pushing views (and so tasks) over it.
pub async fn follow(
    managers: Managers,
    tx: watch::Sender<Option<NodeView>>,
    log: Arc<ChangeLog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut set_changed = managers.subscribe();
    loop {
        match open(&managers).await {
            Ok((addr, mut s)) => loop {
                tokio::select! {
                    m = s.message() => match m {
                        Ok(Some(update)) => {
                            let current = tx.borrow().clone();
                            match apply(current.as_ref(), update) {
                                Ok((view, changed)) => {
                                    debug!(
                                        generation = view.generation,
                                        networks = changed.networks.len(),
                                        tasks = changed.tasks.len(),
                                        all = changed.all,
                                        "new node view"
                                    );
                                    log.push(current.map(|c| c.generation), view.generation, changed);
                                    let _ = tx.send(Some(view));
                                }
                                Err(e) => {
                                    warn!(manager = %addr, "view stream: {e}; reopening it for a whole view");
                                    break;
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = set_changed.changed() => {
                        if !managers.addrs().contains(&addr) {
                            info!(manager = %addr, "view stream's manager is no longer a manager; leaving it");
                            break;
                        }
                    }
                    _ = stop.changed() => return,
                }
            },
            Err(s) => debug!("no view stream: {}", s.message()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::{
        EncryptionView, EndpointInfo, IngressPort, IngressView, NetworkAssignment, PeerEntry,
        TaskAssignment, WireguardPeer,
    };
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    /// A view drawn from small pools, so two draws share most ids and
    /// differ in content, membership and order.
    fn gen_view(r: &mut StdRng, generation: u64) -> NodeView {
        let nets: Vec<u32> = (0..8).filter(|_| r.random_bool(0.6)).collect();
        let mut networks: Vec<NetworkAssignment> = nets
            .into_iter()
            .map(|i| NetworkAssignment {
                id: format!("net{i}"),
                name: format!("n{i}"),
                vni: 4096 + i,
                mtu: r.random_range(0..2) * 1400,
                peers: (0..r.random_range(0..4))
                    .map(|p| PeerEntry {
                        ip: format!("10.0.{i}.{p}"),
                        node_addr: format!("192.168.1.{}", r.random_range(1..4)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        networks.shuffle(r);
        let ids: Vec<u32> = (0..12).filter(|_| r.random_bool(0.6)).collect();
        let mut tasks: Vec<TaskAssignment> = ids
            .into_iter()
            .map(|i| TaskAssignment {
                id: format!("task{i}"),
                desired_state: if r.random_bool(0.8) {
                    "running"
                } else {
                    "shutdown"
                }
                .into(),
                known_state: ["new", "assigned", "running"][r.random_range(0..3)].into(),
                networks: vec![EndpointInfo {
                    id: format!("ep{i}"),
                    ip: format!("10.0.0.{i}"),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect();
        if r.random_bool(0.5) {
            tasks.sort_by(|a, b| a.id.cmp(&b.id));
        } else {
            tasks.shuffle(r);
        }
        NodeView {
            generation,
            data_path_port: [4789, 7777][r.random_range(0..2)],
            networks,
            tasks,
            ingress: r.random_bool(0.7).then(|| IngressView {
                network_id: "ing".into(),
                ports: vec![IngressPort {
                    published_port: 8080,
                    backends: (0..r.random_range(0..3))
                        .map(|b| format!("10.255.0.{b}"))
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            encryption: r.random_bool(0.3).then(|| EncryptionView {
                listen_port: 51820,
                peers: vec![WireguardPeer {
                    node_id: format!("n{}", r.random_range(0..3)),
                    ..Default::default()
                }],
            }),
        }
    }

    fn delta_update(a: &NodeView, b: &NodeView) -> ViewUpdate {
        ViewUpdate {
            generation: b.generation,
            base_generation: a.generation,
            digest: mesh_proto::view_digest(b),
            update: Some(Update::Delta(
                mesh_proto::view_delta(a, b).expect("unique ids"),
            )),
        }
    }

    fn full_update(v: &NodeView) -> ViewUpdate {
        ViewUpdate {
            generation: v.generation,
            base_generation: 0,
            digest: mesh_proto::view_digest(v),
            update: Some(Update::Full(v.clone())),
        }
    }

    #[test]
    fn a_delta_applied_on_its_base_gives_the_new_view() {
        let mut r = StdRng::seed_from_u64(15);
        for round in 0..2000 {
            let a = gen_view(&mut r, 10 + round);
            let b = gen_view(&mut r, 11 + round);
            let d = mesh_proto::view_delta(&a, &b).expect("unique ids");
            let (got, changed) = apply(Some(&a), delta_update(&a, &b)).expect("applies");
            assert_eq!(got, b, "round {round}");
            // What changed is exactly the ids whose entry differs.
            for n in a.networks.iter().chain(&b.networks) {
                let before = a.networks.iter().find(|x| x.id == n.id);
                let after = b.networks.iter().find(|x| x.id == n.id);
                assert_eq!(changed.network(&n.id), before != after, "round {round}");
            }
            for t in a.tasks.iter().chain(&b.tasks) {
                let before = a.tasks.iter().find(|x| x.id == t.id);
                let after = b.tasks.iter().find(|x| x.id == t.id);
                assert_eq!(changed.task(&t.id), before != after, "round {round}");
            }
            assert_eq!(changed.ingress, a.ingress != b.ingress);
            assert_eq!(changed.encryption, a.encryption != b.encryption);
            assert!(!changed.all);
            // The delta is no bigger than what changed.
            assert!(d.networks.len() <= b.networks.len());
            assert!(d.tasks.len() <= b.tasks.len());
        }
    }

    #[test]
    fn removals_reorders_and_no_change() {
        let mut r = StdRng::seed_from_u64(7);
        let a = gen_view(&mut r, 5);
        // Everything removed.
        let empty = NodeView {
            generation: 6,
            data_path_port: a.data_path_port,
            ..Default::default()
        };
        assert_eq!(
            apply(Some(&a), delta_update(&a, &empty))
                .expect("applies")
                .0,
            empty
        );
        // Same members, reversed order: only the order travels.
        let mut rev = a.clone();
        rev.generation = 7;
        rev.networks.reverse();
        rev.tasks.reverse();
        let d = mesh_proto::view_delta(&a, &rev).expect("unique ids");
        assert!(d.networks.is_empty() && d.tasks.is_empty());
        if a.tasks.len() > 1 {
            assert_eq!(d.task_order.len(), a.tasks.len());
        }
        assert_eq!(
            apply(Some(&a), delta_update(&a, &rev)).expect("applies").0,
            rev
        );
        // The same content at a new generation: an empty delta.
        let same = NodeView {
            generation: 8,
            ..a.clone()
        };
        assert!(mesh_proto::delta_is_empty(
            &mesh_proto::view_delta(&a, &same).expect("unique ids")
        ));
    }

    #[test]
    fn a_delta_on_another_base_or_a_wrong_result_is_refused() {
        let mut r = StdRng::seed_from_u64(3);
        let a = gen_view(&mut r, 20);
        let b = gen_view(&mut r, 21);
        let mut u = delta_update(&a, &b);
        u.base_generation = 19;
        assert_eq!(
            apply(Some(&a), u),
            Err(ViewError::WrongBase {
                have: Some(20),
                base: 19
            })
        );
        assert!(matches!(
            apply(None, delta_update(&a, &b)),
            Err(ViewError::WrongBase { have: None, .. })
        ));
        // A delta that does not rebuild the manager's view fails the digest.
        let mut u = delta_update(&a, &b);
        u.digest ^= 1;
        assert_eq!(
            apply(Some(&a), u),
            Err(ViewError::Digest { generation: 21 })
        );
        let mut u = delta_update(&a, &b);
        if let Some(Update::Delta(d)) = u.update.as_mut() {
            d.removed_tasks.push("no-such-task".into());
        }
        assert!(matches!(
            apply(Some(&a), u),
            Err(ViewError::UnknownId { kind: "task", .. })
        ));
        assert_eq!(
            apply(
                Some(&a),
                ViewUpdate {
                    update: None,
                    ..Default::default()
                }
            ),
            Err(ViewError::Empty)
        );
    }

    #[test]
    fn a_whole_view_says_what_changed_since_the_last() {
        let mut r = StdRng::seed_from_u64(11);
        let a = gen_view(&mut r, 30);
        let (first, changed) = apply(None, full_update(&a)).expect("applies");
        assert_eq!((first, changed), (a.clone(), Changed::everything()));
        let mut b = a.clone();
        b.generation = 31;
        b.tasks.push(TaskAssignment {
            id: "new-task".into(),
            ..Default::default()
        });
        let (got, changed) = apply(Some(&a), full_update(&b)).expect("applies");
        assert_eq!(got, b);
        assert_eq!(
            changed,
            Changed {
                tasks: ["new-task".to_string()].into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn the_change_log_sums_what_a_reader_missed() {
        let log = ChangeLog::default();
        let task = |id: &str| Changed {
            tasks: [id.to_string()].into(),
            ..Default::default()
        };
        log.push(None, 1, Changed::everything());
        log.push(Some(1), 2, task("a"));
        log.push(Some(2), 3, task("b"));
        assert_eq!(log.changed_since(Some(3)), Changed::default());
        assert_eq!(log.changed_since(Some(2)), task("b"));
        let mut ab = task("a");
        ab.tasks.insert("b".into());
        assert_eq!(log.changed_since(Some(1)), ab);
        assert!(log.changed_since(None).all, "no view yet: everything");
        assert!(log.changed_since(Some(99)).all, "unknown: everything");
        for g in 3..3 + KEPT_CHANGES as u64 {
            log.push(Some(g), g + 1, task("c"));
        }
        assert!(log.changed_since(Some(1)).all, "forgotten: everything");
    }
}
