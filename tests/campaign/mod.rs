//! A fault campaign, Jepsen-style, shared by tests/faults.rs (a few rounds)
//! and benches/faults.rs (100): clients write and read through every
//! manager while a nemesis kills, partitions, pauses and cuts; a checker
//! then verifies the history and the final state.
//!
//! It lives beside the end-to-end tests, not in `lab/`, because it needs
//! the Control API (tonic, `mesh-proto`) to read convergence and
//! allocations, and the lab crate drives `mesh` only through its CLI.
//!
//! - `clients`: the client threads and the operations they record;
//! - `nemesis`: the fault rounds and the time to recover writes;
//! - `checker`: pure functions on the history and the final state.
#![allow(dead_code)]

pub mod checker;
pub mod clients;
pub mod nemesis;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::{Lab, Role};

use checker::{Allocations, FinalState};

/// What the nemesis does in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// kill -9 a manager (the leader every other time) and restart it.
    KillManager,
    /// Partition a minority of managers away, then a different minority
    /// (the first one joins the majority), then heal.
    Partition,
    /// SIGSTOP a manager (the leader every other time), then SIGCONT.
    PauseManager,
    /// Cut a worker's underlay link, then restore it.
    CutWorker,
}

impl FaultKind {
    pub const ALL: [FaultKind; 4] = [
        FaultKind::KillManager,
        FaultKind::Partition,
        FaultKind::PauseManager,
        FaultKind::CutWorker,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillManager => "kill-manager",
            FaultKind::Partition => "partition",
            FaultKind::PauseManager => "pause-manager",
            FaultKind::CutWorker => "cut-worker",
        }
    }
}

/// Which grow-only set a write adds to, or a read shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Node labels (`node update --label-add`, read with `node ls`).
    Label,
    /// Overlay networks (`network create`, read with `network ls`).
    Network,
}

/// One operation a client (or the nemesis) made.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// Adds `key` to the set `scope`; keys are unique in a campaign.
    Write { scope: Scope, key: String },
    /// `service scale SERVICE=REPLICAS`.
    Scale { service: String, replicas: u64 },
    /// Reads the set `scope`; what it saw is in [`Op::observed`].
    Read { scope: Scope },
    /// `service ps`: recorded for timing and refusals only.
    ReadTasks,
}

impl OpKind {
    pub fn is_write(&self) -> bool {
        matches!(self, OpKind::Write { .. } | OpKind::Scale { .. })
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Exit 0: acknowledged.
    Ok,
    /// Non-zero exit, with the first line it printed.
    Refused(String),
    /// Still running at the client's time limit, killed.
    TimedOut,
    /// Could not be run at all (the lab's error).
    Failed(String),
}

/// One recorded operation; times are from the campaign's start.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    /// Client number; `usize::MAX` for the nemesis's probe writes.
    pub client: usize,
    /// The manager it was sent to.
    pub node: String,
    pub kind: OpKind,
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
    /// For a successful read: the keys it saw in its scope.
    pub observed: Option<BTreeSet<String>>,
}

impl Op {
    pub fn acked(&self) -> bool {
        self.outcome == Outcome::Ok
    }
}

/// A stretch of time in which some nodes were on the minority side of a
/// partition (or otherwise cut off), for the minority-refusal check.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub start: Duration,
    pub end: Duration,
    pub nodes: BTreeSet<String>,
}

/// One nemesis round.
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    pub index: usize,
    pub kind: FaultKind,
    /// The node(s) it hit, for the log.
    pub target: String,
    pub start: Duration,
    /// When the fault was undone (heal, restart, resume).
    pub healed: Duration,
    /// When the round ended: writes recovered (or gave up) and its checks ran.
    pub end: Duration,
    /// From `healed` to the first acknowledged write; None if none came
    /// within the limit.
    pub recover: Option<Duration>,
    /// Kill rounds: from the restarted manager's start to its first
    /// successful read (`node ls`).
    pub reads_back: Option<Duration>,
    /// Minority windows of a partition round.
    pub minority: Vec<Window>,
    /// Duplicate allocations seen at the end of the round.
    pub duplicates: Vec<String>,
}

/// What a campaign does.
#[derive(Clone, Debug)]
pub struct Config {
    pub rounds: usize,
    pub kinds: Vec<FaultKind>,
    pub clients_per_manager: usize,
    /// Limit of one client operation.
    pub op_timeout: Duration,
    /// Pause between a client's operations.
    pub think: Duration,
    /// How long a fault is held.
    pub hold: Duration,
    /// Quiet time between rounds.
    pub between: Duration,
    /// Longest wait for writes to come back after a round.
    pub recover_limit: Duration,
    /// Longest wait for every node to converge at the end.
    pub converge_bound: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rounds: 4,
            kinds: FaultKind::ALL.to_vec(),
            clients_per_manager: 2,
            op_timeout: Duration::from_secs(15),
            think: Duration::from_millis(150),
            hold: Duration::from_secs(4),
            between: Duration::from_secs(1),
            recover_limit: Duration::from_secs(60),
            converge_bound: Duration::from_secs(90),
        }
    }
}

/// Services the clients scale; made at the start with published ports so
/// VIPs, endpoints and ports exist to be checked.
pub const SERVICES: [&str; 2] = ["fcweb", "fcapi"];
/// The network the services are on.
pub const BASE_NETWORK: &str = "fcbase";
/// Prefix of every label key and network name the campaign writes.
pub const KEY_PREFIX: &str = "fc";

/// What a campaign found.
#[derive(Debug)]
pub struct Report {
    pub history: Vec<Op>,
    pub rounds: Vec<Round>,
    pub summary: checker::Summary,
    /// From the end of the last round (everything healed) until every
    /// node is Ready, the managers agree and every service converged.
    pub converged_after: Option<Duration>,
    pub table: String,
}

/// The lab's managers and workers by name.
pub fn roles(lab: &Lab) -> (Vec<String>, Vec<String>) {
    let of = |r: Role| {
        lab.nodes
            .iter()
            .filter(|n| n.role == r)
            .map(|n| n.name.clone())
            .collect()
    };
    (of(Role::Manager), of(Role::Worker))
}

/// Makes the campaign's network and services.
fn setup(lab: &Lab) -> Result<()> {
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", BASE_NETWORK],
    )?;
    let publish = [
        "published=18080,target=80",
        // No published port: one is allocated from 30000-32767.
        "target=81",
    ];
    for (service, publish) in SERVICES.iter().zip(publish) {
        lab.mesh_ok(
            "node1",
            &[
                "service",
                "create",
                "--detach",
                "--name",
                service,
                "--replicas",
                "2",
                "--network",
                BASE_NETWORK,
                "--publish",
                publish,
                "--",
                "sleep",
                "1000000",
            ],
        )?;
    }
    Ok(())
}

/// Runs a campaign on `lab` (made by the caller, every node Ready) and
/// checks it. Errors are failures of the harness (a lab command that could
/// not run); what the checker finds is in the report.
pub fn run(lab: &mut Lab, cfg: &Config) -> Result<Report> {
    setup(lab)?;
    let (managers, _) = roles(lab);
    let t0 = Instant::now();
    // The services were created with 2 replicas before anything started.
    let mut history: Vec<Op> = SERVICES
        .iter()
        .map(|s| Op {
            client: usize::MAX,
            node: "node1".into(),
            kind: OpKind::Scale {
                service: s.to_string(),
                replicas: 2,
            },
            start: Duration::ZERO,
            end: Duration::ZERO,
            outcome: Outcome::Ok,
            observed: None,
        })
        .collect();
    let mut nemesis_lab = Lab::open(&lab.name, &lab.mesh_bin)?;
    let stop = AtomicBool::new(false);
    let probe_ops = Mutex::new(Vec::new());
    let shared: &Lab = lab;
    let (client_ops, rounds) = std::thread::scope(|s| -> Result<_> {
        let handles: Vec<_> = managers
            .iter()
            .flat_map(|m| std::iter::repeat_n(m.clone(), cfg.clients_per_manager))
            .enumerate()
            .map(|(id, node)| {
                let stop = &stop;
                s.spawn(move || clients::client(shared, id, &node, cfg, t0, stop))
            })
            .collect();
        let rounds = nemesis::rounds(&mut nemesis_lab, cfg, t0, &probe_ops);
        stop.store(true, Ordering::SeqCst);
        let mut ops = Vec::new();
        for h in handles {
            match h.join() {
                Ok(v) => ops.extend(v),
                Err(_) => bail!("a client thread panicked"),
            }
        }
        Ok((ops, rounds))
    })?;
    history.extend(client_ops);
    history.extend(probe_ops.into_inner().unwrap_or_default());
    // Whatever happened, leave the lab whole before judging.
    let healed = nemesis::restore(&mut nemesis_lab);
    lab.refresh()?;
    let rounds = rounds?;
    healed?;
    let settle = Instant::now();
    let converged = converge(lab, cfg.converge_bound);
    let converged_after = converged.as_ref().ok().map(|_| settle.elapsed());
    let final_state = final_state(lab).context("reading the final state")?;
    let mut summary = checker::summarize(&history, &rounds, &final_state);
    if let Err(e) = &converged {
        summary.problems.push(format!("not converged: {e:#}"));
    }
    let table = checker::table(&history, &rounds, &summary, converged_after, cfg);
    history.sort_by_key(|o| o.start);
    Ok(Report {
        history,
        rounds,
        summary,
        converged_after,
        table,
    })
}

/// Runs `mesh ARGS` on `node` with a time limit; Ok(stdout) only on exit 0.
pub fn mesh_quick(lab: &Lab, node: &str, args: &[&str], limit: Duration) -> Result<String> {
    let out = lab.mesh_timeout(node, args, limit)?;
    if !out.status.success() {
        bail!(
            "mesh {} on {node}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The leader's hostname, asked of each manager in turn.
pub fn find_leader(lab: &Lab, managers: &[String]) -> Option<String> {
    managers.iter().find_map(|m| {
        let text = mesh_quick(
            lab,
            m,
            &["node", "ls", "--format", "json"],
            Duration::from_secs(5),
        )
        .ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|n| n["ManagerStatus"] == "Leader")
            .and_then(|n| n["Hostname"].as_str().map(String::from))
    })
}

/// Label keys of the campaign in `node ls --format json` output, and
/// whether every node is Ready.
pub fn parse_labels(text: &str) -> Result<(BTreeSet<String>, bool)> {
    let mut keys = BTreeSet::new();
    let mut ready = true;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ready &= v["Status"] == "Ready";
        if let Some(labels) = v["Labels"].as_object() {
            keys.extend(labels.keys().filter(|k| k.starts_with(KEY_PREFIX)).cloned());
        }
    }
    Ok((keys, ready))
}

/// Campaign network names in `network ls --format json` output.
pub fn parse_networks(text: &str) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        if let Some(n) = v["Name"].as_str().filter(|n| n.starts_with("fcnet")) {
            names.insert(n.to_string());
        }
    }
    Ok(names)
}

/// Waits until every node is Ready on every manager, the managers show the
/// same labels and networks, and every service has converged (every Ready
/// node applied its current view).
fn converge(lab: &Lab, bound: Duration) -> Result<()> {
    let (managers, _) = roles(lab);
    let deadline = Instant::now() + bound;
    let mut last = String::new();
    while Instant::now() < deadline {
        match converged_once(lab, &managers) {
            Ok(()) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("after {}s: {last}", bound.as_secs())
}

fn converged_once(lab: &Lab, managers: &[String]) -> Result<()> {
    let limit = Duration::from_secs(10);
    let mut views = BTreeMap::new();
    for m in managers {
        let (labels, ready) = parse_labels(&mesh_quick(
            lab,
            m,
            &["node", "ls", "--format", "json"],
            limit,
        )?)?;
        if !ready {
            bail!("{m} does not show every node Ready");
        }
        let nets = parse_networks(&mesh_quick(
            lab,
            m,
            &["network", "ls", "--format", "json"],
            limit,
        )?)?;
        views.insert(m.clone(), (labels, nets));
    }
    let first = views.values().next().cloned().unwrap_or_default();
    for (m, v) in &views {
        if *v != first {
            bail!(
                "{m} shows {} labels and {} networks, {} shows {} and {}",
                v.0.len(),
                v.1.len(),
                managers[0],
                first.0.len(),
                first.1.len()
            );
        }
    }
    let leader = find_leader(lab, managers).context("no leader")?;
    for s in SERVICES {
        let st = crate::common::status(lab, &leader, s)?;
        if !st.converged {
            bail!("{s} not converged: behind {:?}", st.behind);
        }
    }
    Ok(())
}

/// Reads allocations (networks, endpoints, VIPs, ports) through `node`.
pub fn allocations(lab: &Lab, node: &str) -> Result<Allocations> {
    let text = mesh_quick(
        lab,
        node,
        &["network", "ls", "--format", "json"],
        Duration::from_secs(10),
    )?;
    let mut a = Allocations::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["Scope"] != "swarm" {
            continue;
        }
        a.networks.push(checker::NetAlloc {
            name: v["Name"].as_str().unwrap_or_default().to_string(),
            subnet: v["Subnet"].as_str().unwrap_or_default().to_string(),
            vni: v["VNI"].as_u64().unwrap_or_default(),
        });
    }
    for s in SERVICES {
        let st = crate::common::status(lab, node, s)?;
        let svc = st.service.unwrap_or_default();
        for vip in &svc.vips {
            let ip = vip.addr.split('/').next().unwrap_or_default();
            a.addresses
                .push((format!("vip {s}"), vip.network.clone(), ip.to_string()));
        }
        for p in &svc.endpoint_ports {
            if p.published_port != 0 && p.publish_mode != "host" {
                a.ports
                    .push((s.to_string(), p.protocol.clone(), p.published_port));
            }
        }
        for t in &st.tasks {
            for addr in &t.addresses {
                if let Some((net, ip)) = addr.split_once('=') {
                    let ip = ip.split('/').next().unwrap_or_default();
                    a.addresses
                        .push((format!("task {}", t.id), net.to_string(), ip.to_string()));
                }
            }
        }
    }
    Ok(a)
}

/// The final state, read through the leader.
fn final_state(lab: &Lab) -> Result<FinalState> {
    let (managers, _) = roles(lab);
    let leader = find_leader(lab, &managers).context("no leader at the end")?;
    let limit = Duration::from_secs(10);
    let (labels, _) = parse_labels(&mesh_quick(
        lab,
        &leader,
        &["node", "ls", "--format", "json"],
        limit,
    )?)?;
    let networks = parse_networks(&mesh_quick(
        lab,
        &leader,
        &["network", "ls", "--format", "json"],
        limit,
    )?)?;
    let mut replicas = BTreeMap::new();
    for s in SERVICES {
        let st = crate::common::status(lab, &leader, s)?;
        replicas.insert(
            s.to_string(),
            st.service.map(|v| v.replicas).unwrap_or_default(),
        );
    }
    Ok(FinalState {
        labels,
        networks,
        replicas,
        allocations: allocations(lab, &leader)?,
    })
}
