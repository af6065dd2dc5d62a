//! A lab: its namespaces, its daemons, its state file, and the operations the
//! CLI and the end-to-end tests perform on it.
//!
//! Layout of lab `L` with nodes `node1..nodeN`:
//! - netns `mlab-L-ul` holds bridge `br0` (the underlay switch) and one veth
//!   end per node, named after the node;
//! - netns `mlab-L-nodeI` holds the other end as `eth0` with 192.168.k.(10+I)/24;
//! - `/run/mesh-lab/L/lab.json` records all of it so separate `mesh lab`
//!   invocations (and `down` after a crash) see the same lab;
//! - `/run/mesh-lab/L/nodeI/{state/,mesh.sock,daemon.log}` belong to the node's daemon.
//!
//! Nothing is routed out of the lab: the only addresses are on the lab's own
//! /24 and the host namespace gets no link, so traffic cannot leave it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::names;
use crate::sys::{self, Uts};

/// Where labs keep their state; under /run so a reboot (which also drops
/// every namespace) forgets them too.
pub const LAB_ROOT: &str = "/run/mesh-lab";

/// Port managers listen on for joins, as in Swarm.
pub const CLUSTER_PORT: u16 = 2377;

/// Name of the underlay bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

/// How long a daemon gets to exit after SIGTERM before it is SIGKILLed:
/// long enough to remove what it made, as Docker's default stop timeout.
const DAEMON_STOP_GRACE: Duration = Duration::from_secs(10);

/// Default limit for one command run in a node through the API.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Limit for one `mesh` CLI call made while forming the cluster.
const MESH_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Log lines shown in errors about a node.
const LOG_TAIL_LINES: usize = 30;

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        })
    }
}

/// Whether `up` finished: a lab stuck in `creating` was interrupted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabStatus {
    Creating,
    Ready,
}

/// One node of a lab: a network namespace with its own `mesh daemon`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    /// `node1`, `node2`, ...; also the hostname its daemon sees.
    pub name: String,
    pub role: Role,
    /// Underlay address, on `eth0` in [`LabNode::netns`].
    pub ip: Ipv4Addr,
    /// Named network namespace (`ip netns exec` works on it).
    pub netns: String,
    /// The bridge-side end of the node's underlay link, in the underlay namespace.
    pub veth: String,
    /// Directory holding everything below.
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// Pid of the daemon last started (it may have died since).
    pub pid: Option<i32>,
    /// Start time of that pid (/proc/PID/stat), so a recycled pid is not taken for it.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Pids of earlier daemons of this node (before `kill` + `start`): `down`
    /// still finds what they left running in their sessions.
    #[serde(default)]
    pub previous_pids: Vec<i32>,
    /// The node's cluster ID once it joined.
    #[serde(default)]
    pub id: Option<String>,
    /// True while its underlay link is cut.
    #[serde(default)]
    pub cut: bool,
}

impl LabNode {
    /// True while the daemon started for this node is running.
    pub fn running(&self) -> bool {
        self.pid.is_some_and(|p| sys::alive(p, self.pid_start))
    }

    /// The daemon's address in `-H`/`MESH_HOST` form.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct UpSpec {
    pub name: String,
    pub nodes: usize,
    /// The first `managers` nodes are managers (node1 initializes the cluster).
    pub managers: usize,
    /// Extra arguments for `mesh init`.
    pub init_args: Vec<String>,
    /// Extra arguments for every `mesh daemon`.
    pub daemon_args: Vec<String>,
    /// How long a daemon may take until its socket answers.
    pub socket_timeout: Duration,
    /// How long the cluster may take until every node is Ready.
    pub ready_timeout: Duration,
    /// Print progress lines on stderr (the CLI does; tests need not).
    pub progress: bool,
}

impl Default for UpSpec {
    fn default() -> Self {
        UpSpec {
            name: "lab".into(),
            nodes: 3,
            managers: 1,
            init_args: Vec::new(),
            daemon_args: Vec::new(),
            socket_timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(90),
            progress: false,
        }
    }
}

impl UpSpec {
    /// A spec with the given name and size and default timeouts.
    pub fn new(name: &str, nodes: usize, managers: usize) -> Self {
        UpSpec {
            name: name.into(),
            nodes,
            managers,
            ..UpSpec::default()
        }
    }

    fn validate(&self) -> Result<()> {
        names::validate_lab_name(&self.name)?;
        if self.nodes == 0 || self.nodes > names::MAX_NODES {
            return Err(LabError::InvalidSpec(format!(
                "--nodes {} is out of range; use 1 to {}",
                self.nodes,
                names::MAX_NODES
            )));
        }
        if self.managers == 0 || self.managers > self.nodes {
            return Err(LabError::InvalidSpec(format!(
                "--managers {} must be between 1 and --nodes ({})",
                self.managers, self.nodes
            )));
        }
        if self.managers.is_multiple_of(2) {
            tracing::warn!(
                managers = self.managers,
                "an even number of managers tolerates no more failures than one fewer"
            );
        }
        Ok(())
    }
}

/// A running (or half-made, or crashed) lab.
///
/// A lab made by [`Lab::up`] is torn down when dropped, so a test that fails
/// leaves nothing behind; set `MESH_LAB_KEEP=1` to keep the lab of a failing
/// test for inspection, or call [`Lab::keep`]. A lab from [`Lab::open`] is
/// never torn down by drop.
///
/// The methods block; from async code call them through `spawn_blocking`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
    /// The lab's underlay is 192.168.`subnet_index`.0/24.
    pub subnet_index: u8,
    pub underlay_netns: String,
    pub dir: PathBuf,
    /// The `mesh` binary daemons are started from.
    pub mesh_bin: PathBuf,
    pub status: LabStatus,
    #[serde(default)]
    pub daemon_args: Vec<String>,
    pub nodes: Vec<LabNode>,
    #[serde(default)]
    pub created_unix: u64,
    #[serde(skip, default = "default_command_timeout")]
    command_timeout: Duration,
    /// Daemons started by this process, kept to reap them.
    #[serde(skip)]
    children: HashMap<String, Child>,
    /// Tear down on drop.
    #[serde(skip)]
    owned: bool,
}

fn default_command_timeout() -> Duration {
    DEFAULT_COMMAND_TIMEOUT
}

/// Directory of lab `name`.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

fn state_file(name: &str) -> PathBuf {
    lab_dir(name).join("lab.json")
}

fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

/// Serializes changes to lab state across `mesh lab` processes (subnet
/// picking, name reservation, lab.json updates).
fn lock_root() -> Result<Flock<File>> {
    fs::create_dir_all(LAB_ROOT).map_err(|e| LabError::io(format!("creating {LAB_ROOT}"), e))?;
    let path = Path::new(LAB_ROOT).join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| LabError::sys(format!("locking {}", path.display()), e))
}

/// Reads lab.json of `name`; None if there is none.
fn read_state(name: &str) -> Result<Option<Lab>> {
    let path = state_file(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LabError::State {
                lab: name.into(),
                path,
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LabError::State {
            lab: name.into(),
            path,
            reason: e.to_string(),
        })
}

/// Namespaces on this machine that belong to lab `name`.
fn owned_netns(name: &str) -> Vec<String> {
    let mut v: Vec<String> = sys::list_netns()
        .into_iter()
        .filter(|ns| names::parse_netns(ns).is_some_and(|(lab, _)| lab == name))
        .collect();
    v.sort();
    v
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn create_dir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| LabError::io(format!("creating {}", path.display()), e))
}

/// One row of `mesh node ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub manager_status: String,
}

/// Parses `mesh node ls --format json`: JSON lines (Docker's style), or one array.
pub fn parse_node_ls(text: &str) -> Result<Vec<NodeRow>, String> {
    let trimmed = text.trim();
    let values: Vec<serde_json::Value> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| format!("not JSON: {e}"))?
    } else {
        trimmed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("line {l:?} is not JSON: {e}")))
            .collect::<Result<_, _>>()?
    };
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Ok(values
        .iter()
        .map(|v| NodeRow {
            id: field(v, "ID"),
            hostname: field(v, "Hostname"),
            status: field(v, "Status"),
            manager_status: field(v, "ManagerStatus"),
        })
        .collect())
}

/// Whether `rows` show the expected cluster; otherwise what is missing.
fn cluster_complete(rows: &[NodeRow], expect: &[&str], managers: usize) -> Result<(), String> {
    let mut problems = Vec::new();
    let missing: Vec<&str> = expect
        .iter()
        .copied()
        .filter(|n| !rows.iter().any(|r| r.hostname == *n))
        .collect();
    if rows.len() != expect.len() {
        problems.push(format!(
            "{} of {} nodes listed{}",
            rows.len(),
            expect.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (missing: {})", missing.join(", "))
            }
        ));
    }
    let not_ready: Vec<String> = rows
        .iter()
        .filter(|r| r.status != "Ready")
        .map(|r| {
            format!(
                "{} is {}",
                r.hostname,
                if r.status.is_empty() { "?" } else { &r.status }
            )
        })
        .collect();
    if !not_ready.is_empty() {
        problems.push(not_ready.join(", "));
    }
    let reachable = rows
        .iter()
        .filter(|r| matches!(r.manager_status.as_str(), "Leader" | "Reachable"))
        .count();
    let leaders = rows.iter().filter(|r| r.manager_status == "Leader").count();
    if reachable != managers || leaders != 1 {
        problems.push(format!(
            "{reachable} reachable managers of {managers}, {leaders} leader(s)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// What `mesh lab ls` shows for one lab.
#[derive(Debug)]
pub struct LabListing {
    pub name: String,
    /// The lab's state, if its lab.json is readable.
    pub lab: Option<Lab>,
    /// Why lab.json is unusable, if it is.
    pub problem: Option<String>,
    /// Namespaces of this lab name left without a lab.json (a crashed run).
    pub stale_netns: Vec<String>,
}

/// Every lab on this machine, including leftovers of crashed runs.
pub fn list() -> Result<Vec<LabListing>> {
    let mut out: BTreeMap<String, LabListing> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir(LAB_ROOT) {
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if names::validate_lab_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let (lab, problem) = match read_state(&name) {
                Ok(Some(lab)) => (Some(lab), None),
                Ok(None) => (None, Some("no lab.json (interrupted run)".to_string())),
                Err(e) => (None, Some(e.to_string())),
            };
            out.insert(
                name.clone(),
                LabListing {
                    name,
                    lab,
                    problem,
                    stale_netns: Vec::new(),
                },
            );
        }
    }
    for ns in sys::list_netns() {
        if let Some((lab, _)) = names::parse_netns(&ns) {
            let entry = out.entry(lab.clone()).or_insert_with(|| LabListing {
                name: lab,
                lab: None,
                problem: Some("leftover namespaces without lab state (crashed run)".into()),
                stale_netns: Vec::new(),
            });
            if entry.lab.is_none() {
                entry.stale_netns.push(ns);
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Tears down lab `name`: daemons, processes in its namespaces, namespaces,
/// links, files. Works on half-made and crashed labs (it also finds
/// namespaces named after the lab without any state), keeps going past
/// failures and reports them all.
pub fn down(name: &str) -> Result<()> {
    names::validate_lab_name(name)?;
    require_root()?;
    let nodes = match read_state(name) {
        Ok(Some(lab)) => lab.nodes.clone(),
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::warn!(lab = name, error = %e, "lab state unreadable; removing what can be found by name");
            Vec::new()
        }
    };
    if nodes.is_empty() && !lab_dir(name).exists() && owned_netns(name).is_empty() {
        return Err(LabError::NotFound(name.into()));
    }
    teardown(name, &nodes, &mut HashMap::new())
}

/// Removes whatever a previous (crashed) run left under lab name `name`;
/// Ok(false) when there was nothing. Tests call it before [`Lab::up`].
pub fn cleanup_stale(name: &str) -> Result<bool> {
    match down(name) {
        Ok(()) => Ok(true),
        Err(LabError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reaps daemons this process started that have exited, so they do not
/// linger as zombies.
fn reap(children: &mut HashMap<String, Child>) {
    children.retain(|_, c| matches!(c.try_wait(), Ok(None)));
}

/// Namespaces the lab's daemons made for networks and sandboxes: each
/// daemon names them with the prefix kept in its state dir (`instance`), and
/// a sandbox's processes live in them, outside the daemon's session.
fn daemon_netns(nodes: &[LabNode]) -> Vec<String> {
    let prefixes: Vec<String> = nodes
        .iter()
        .filter_map(|n| fs::read_to_string(n.state_dir.join("instance")).ok())
        .map(|id| format!("mesh{}-", id.trim()))
        .filter(|p| p.len() > "mesh-".len())
        .collect();
    let Ok(entries) = fs::read_dir(sys::NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|ns| prefixes.iter().any(|p| ns.starts_with(p.as_str())))
        .collect()
}

fn teardown(name: &str, nodes: &[LabNode], children: &mut HashMap<String, Child>) -> Result<()> {
    let mut problems = Vec::new();

    // Daemons first, politely, so they can remove what they made.
    let mut daemons = Vec::new();
    let mut members = Vec::new();
    for n in nodes {
        for &old in &n.previous_pids {
            // Its pid number stays reserved while its session has members.
            if sys::proc_info(old).is_none() {
                members.extend(sys::session_members(old));
            }
        }
        let Some(pid) = n.pid else { continue };
        let Some(start) = n.pid_start.or_else(|| sys::proc_info(pid).map(|i| i.start)) else {
            members.extend(sys::session_members(pid));
            continue;
        };
        if !sys::alive(pid, Some(start)) {
            // A dead daemon's pid stays reserved while its session has members
            // (its sandboxes); if nobody holds the pid now, those are ours.
            if sys::proc_info(pid).is_none() {
                members.extend(sys::session_members(pid));
            }
            continue;
        }
        members.extend(sys::session_members(pid));
        match sys::signal(pid, Some(start), Signal::SIGTERM) {
            Ok(()) => daemons.push((pid, start)),
            Err(e) => problems.push(format!("{}: {e}", n.name)),
        }
    }
    for (pid, start) in sys::wait_gone(&daemons, DAEMON_STOP_GRACE) {
        tracing::warn!(
            lab = name,
            pid,
            "daemon did not exit on SIGTERM; killing it"
        );
        if let Err(e) = sys::signal(pid, Some(start), Signal::SIGKILL) {
            problems.push(e.to_string());
        }
    }
    reap(children);

    // Then everything else living in the lab's namespaces or the daemons' sessions.
    let mut namespaces: BTreeSet<String> = owned_netns(name).into_iter().collect();
    namespaces.extend(nodes.iter().map(|n| n.netns.clone()));
    namespaces.extend(daemon_netns(nodes));
    namespaces.insert(names::underlay_netns(name));
    namespaces.retain(|ns| sys::netns_path(ns).exists());
    let mut left = Vec::new();
    for _ in 0..3 {
        let mut procs: Vec<(i32, u64)> = members
            .iter()
            .copied()
            .filter(|&(p, s)| sys::alive(p, Some(s)))
            .collect();
        for ns in &namespaces {
            procs.extend(sys::netns_members(ns));
        }
        procs.sort_unstable();
        procs.dedup();
        if procs.is_empty() {
            left.clear();
            break;
        }
        for &(p, s) in &procs {
            let _ = sys::signal(p, Some(s), Signal::SIGKILL);
        }
        left = sys::wait_gone(&procs, Duration::from_secs(5));
        reap(children);
    }
    for (pid, _) in left {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        problems.push(format!(
            "process {pid} ({}) survived SIGKILL (stuck in the kernel?)",
            comm.trim()
        ));
    }

    // Node namespaces (and with them the veths), then the underlay.
    let ul = names::underlay_netns(name);
    let ordered = namespaces
        .iter()
        .filter(|ns| **ns != ul)
        .chain(namespaces.iter().filter(|ns| **ns == ul));
    for ns in ordered {
        if let Err(e) = sys::ip(&["netns", "del", ns.as_str()]) {
            problems.push(e.to_string());
        }
    }

    let dir = lab_dir(name);
    if dir.exists() {
        problems.extend(sys::unmount_below(&dir));
        if let Err(e) = fs::remove_dir_all(&dir) {
            problems.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if problems.is_empty() {
        tracing::info!(lab = name, "lab removed");
        Ok(())
    } else {
        Err(LabError::Teardown {
            lab: name.into(),
            problems,
        })
    }
}

impl Lab {
    /// Builds lab `spec.name`: namespaces, underlay, one daemon per node, and
    /// the cluster (node1 initializes it, the other managers join one at a
    /// time, workers join together); returns once every node is Ready.
    /// On failure everything made so far is removed and the error carries the
    /// tail of the failing node's daemon log.
    pub fn up(spec: &UpSpec, mesh_bin: &Path) -> Result<Lab> {
        spec.validate()?;
        require_root()?;
        let mesh_bin = fs::canonicalize(mesh_bin).map_err(|e| {
            LabError::io(
                format!(
                    "mesh binary {} not found (build it with `cargo build`)",
                    mesh_bin.display()
                ),
                e,
            )
        })?;
        let mut lab = Lab::reserve(spec, mesh_bin)?;
        match lab.build(spec) {
            Ok(()) => Ok(lab),
            Err(err) => {
                lab.owned = false;
                sys::clear_interrupt();
                if spec.progress {
                    eprintln!("mesh lab: up failed; removing lab {}", lab.name);
                }
                let mut children = std::mem::take(&mut lab.children);
                match teardown(&lab.name, &lab.nodes, &mut children) {
                    Ok(()) => Err(err),
                    Err(LabError::Teardown { problems, .. }) => Err(LabError::UpCleanup {
                        lab: lab.name.clone(),
                        error: Box::new(err),
                        cleanup: problems,
                    }),
                    Err(other) => Err(LabError::UpCleanup {
                        lab: lab.name.clone(),
                        error: Box::new(err),
                        cleanup: vec![other.to_string()],
                    }),
                }
            }
        }
    }

    /// Opens an existing lab by name (for CLI commands after `up`); dropping
    /// it leaves the lab running.
    pub fn open(name: &str, mesh_bin: &Path) -> Result<Lab> {
        names::validate_lab_name(name)?;
        let mut lab = read_state(name)?.ok_or_else(|| LabError::NotFound(name.into()))?;
        if let Ok(bin) = fs::canonicalize(mesh_bin) {
            lab.mesh_bin = bin;
        }
        Ok(lab)
    }

    /// Claims the name and a subnet and writes the initial lab.json, so that
    /// `down` can find everything made from here on.
    fn reserve(spec: &UpSpec, mesh_bin: PathBuf) -> Result<Lab> {
        let _lock = lock_root()?;
        let name = &spec.name;
        let dir = lab_dir(name);
        if dir.exists() || !owned_netns(name).is_empty() {
            return Err(LabError::Exists(name.clone()));
        }
        let used: BTreeSet<u8> = fs::read_dir(LAB_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|n| read_state(&n).ok().flatten())
            .map(|l| l.subnet_index)
            .collect();
        let k = names::pick_subnet_index(&used).ok_or_else(|| {
            LabError::InvalidSpec(
                "every lab subnet 192.168.1-254.0/24 is taken; remove a lab with `mesh lab down`"
                    .into(),
            )
        })?;
        let nodes = (1..=spec.nodes)
            .map(|i| {
                let node = names::node_name(i);
                let ndir = dir.join(&node);
                LabNode {
                    role: if i <= spec.managers {
                        Role::Manager
                    } else {
                        Role::Worker
                    },
                    ip: names::node_ip(k, i),
                    netns: names::node_netns(name, &node),
                    veth: node.clone(),
                    state_dir: ndir.join("state"),
                    socket: ndir.join("mesh.sock"),
                    log: ndir.join("daemon.log"),
                    dir: ndir,
                    pid: None,
                    pid_start: None,
                    previous_pids: Vec::new(),
                    id: None,
                    cut: false,
                    name: node,
                }
            })
            .collect();
        create_dir(&dir, 0o755)?;
        let lab = Lab {
            name: name.clone(),
            subnet_index: k,
            underlay_netns: names::underlay_netns(name),
            dir: dir.clone(),
            mesh_bin,
            status: LabStatus::Creating,
            daemon_args: spec.daemon_args.clone(),
            nodes,
            created_unix: now_unix(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            children: HashMap::new(),
            owned: true,
        };
        if let Err(e) = lab.write_state() {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(lab)
    }

    /// Writes lab.json atomically; the caller holds the root lock.
    fn write_state(&self) -> Result<()> {
        let path = state_file(&self.name);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| LabError::State {
            lab: self.name.clone(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&tmp, text + "\n")
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| LabError::io(format!("writing {}", path.display()), e))
    }

    /// Records the current state in lab.json for other `mesh lab` invocations.
    fn save(&self) -> Result<()> {
        let _lock = lock_root()?;
        self.write_state()
    }

    fn say(&self, progress: bool, msg: impl std::fmt::Display) {
        tracing::info!(lab = %self.name, "{msg}");
        if progress {
            eprintln!("mesh lab {}: {msg}", self.name);
        }
    }

    fn build(&mut self, spec: &UpSpec) -> Result<()> {
        self.say(
            spec.progress,
            format_args!(
                "creating {} namespaces on 192.168.{}.0/24",
                self.nodes.len(),
                self.subnet_index
            ),
        );
        self.build_network()?;
        self.say(spec.progress, "starting daemons");
        for i in 0..self.nodes.len() {
            sys::check_interrupt()?;
            self.spawn_daemon(i)?;
        }
        self.save()?;
        let timeout = spec.socket_timeout;
        let this = &*self;
        std::thread::scope(|s| {
            let waits: Vec<_> = (0..this.nodes.len())
                .map(|i| s.spawn(move || this.wait_socket(i, timeout)))
                .collect();
            // Report the first failure in node order; every wait ends by its timeout.
            waits
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(LabError::InvalidSpec(
                            "a socket wait thread panicked".into(),
                        ))
                    })
                })
                .collect::<Result<Vec<()>>>()
        })?;
        self.form_cluster(spec)?;
        self.status = LabStatus::Ready;
        self.save()
    }

    fn build_network(&self) -> Result<()> {
        let ul = self.underlay_netns.as_str();
        {
            // `ip netns add` sets up /run/netns on first use; serialize that across labs.
            let _lock = lock_root()?;
            sys::ip(&["netns", "add", ul])?;
        }
        sys::ip(&["-n", ul, "link", "set", "lo", "up"])?;
        sys::ip(&["-n", ul, "link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        sys::ip(&["-n", ul, "link", "set", UNDERLAY_BRIDGE, "up"])?;
        for node in &self.nodes {
            sys::check_interrupt()?;
            let ns = node.netns.as_str();
            sys::ip(&["netns", "add", ns])?;
            sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
            sys::ip(&[
                "-n", ul, "link", "add", &node.veth, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            sys::ip(&[
                "-n",
                ul,
                "link",
                "set",
                &node.veth,
                "master",
                UNDERLAY_BRIDGE,
                "up",
            ])?;
            sys::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ])?;
            sys::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            create_dir(&node.dir, 0o755)?;
            create_dir(&node.state_dir, 0o700)?;
        }
        Ok(())
    }

    /// Starts node `i`'s daemon in its netns and a fresh UTS namespace whose
    /// hostname is the node's name, detached, logging to daemon.log.
    fn spawn_daemon(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        create_dir(&node.state_dir, 0o700)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&node.log)
            .map_err(|e| LabError::io(format!("opening {}", node.log.display()), e))?;
        let mut cmd = Command::new(&self.mesh_bin);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--socket")
            .arg(&node.socket)
            .args(&self.daemon_args)
            .current_dir(&node.dir)
            .env_remove("MESH_HOST")
            // Plain text in daemon.log: its tail goes into error messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let line = sys::cmd_line(&cmd);
        let _ = writeln!(log, "--- mesh lab: {} starting `{line}` ---", node.name);
        let err_log = log
            .try_clone()
            .map_err(|e| LabError::io(format!("opening {}", node.log.display()), e))?;
        cmd.stdout(log).stderr(err_log);
        sys::enter_node(&mut cmd, &node.netns, Uts::New(node.name.clone()), true)?;
        let child = cmd
            .spawn()
            .map_err(|error| LabError::Spawn { cmd: line, error })?;
        let pid = i32::try_from(child.id()).map_err(|_| {
            LabError::InvalidSpec(format!("pid {} does not fit a pid_t", child.id()))
        })?;
        let name = node.name.clone();
        let node = &mut self.nodes[i];
        if let Some(old) = node.pid {
            node.previous_pids.push(old);
        }
        node.pid = Some(pid);
        node.pid_start = sys::proc_info(pid).map(|p| p.start);
        self.children.insert(name, child);
        tracing::debug!(lab = %self.name, node = %self.nodes[i].name, pid, "daemon started");
        Ok(())
    }

    /// An error about node `i`, with the tail of its daemon log.
    fn node_error(&self, i: usize, msg: String) -> LabError {
        let node = &self.nodes[i];
        LabError::Node {
            lab: self.name.clone(),
            node: node.name.clone(),
            msg,
            log: node.log.clone(),
            tail: sys::log_tail(&node.log, LOG_TAIL_LINES),
        }
    }

    /// Waits until node `i`'s socket answers `mesh info`.
    fn wait_socket(&self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            sys::check_interrupt()?;
            if !self.nodes[i].running() {
                return Err(
                    self.node_error(i, "its daemon exited before its socket answered".into())
                );
            }
            // Spawn `mesh info` only once the socket exists: cheap for big labs.
            if !self.nodes[i].socket.exists() {
                last = "the socket was not created".to_string();
            } else {
                match self.mesh_idx(i, &["info"], Duration::from_secs(5)) {
                    Ok(out) if out.status.success() => return Ok(()),
                    Ok(out) => last = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    Err(LabError::Timeout { .. }) => last = "`mesh info` hung for 5s".into(),
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(self.node_error(
                    i,
                    format!(
                        "its socket {} did not answer `mesh info` within {}s (last: {last})",
                        self.nodes[i].socket.display(),
                        timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a `mesh` step of cluster formation on node `i`; fails with the node's log.
    fn mesh_step(&self, i: usize, args: &[&str]) -> Result<String> {
        let shown = format!("mesh {}", args.join(" "));
        match self.mesh_idx(i, args, MESH_STEP_TIMEOUT) {
            Ok(out) if out.status.success() => {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            }
            Ok(out) => Err(self.node_error(
                i,
                format!(
                    "`{shown}` failed ({}): {}",
                    sys::status_text(out.status),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            )),
            Err(LabError::Timeout { secs, .. }) => {
                Err(self.node_error(i, format!("`{shown}` did not finish within {secs}s")))
            }
            Err(e) => Err(e),
        }
    }

    fn form_cluster(&mut self, spec: &UpSpec) -> Result<()> {
        let leader_ip = self.nodes[0].ip.to_string();
        let remote = format!("{leader_ip}:{CLUSTER_PORT}");
        self.say(spec.progress, "node1: mesh init");
        let mut init = vec!["init", "--advertise-addr", leader_ip.as_str()];
        init.extend(spec.init_args.iter().map(String::as_str));
        self.mesh_step(0, &init)?;
        self.wait_cluster(1, 1, spec.ready_timeout)?;

        let managers = spec.managers;
        if managers > 1 {
            let token = self.mesh_step(0, &["join-token", "-q", "manager"])?;
            // Raft membership changes one at a time: each manager is in before the next joins.
            for i in 1..managers {
                self.say(
                    spec.progress,
                    format_args!("{}: joining as manager", self.nodes[i].name),
                );
                let ip = self.nodes[i].ip.to_string();
                self.mesh_step(
                    i,
                    &["join", "--token", &token, "--advertise-addr", &ip, &remote],
                )?;
                self.wait_cluster(i + 1, i + 1, spec.ready_timeout)?;
            }
        }
        if self.nodes.len() > managers {
            let token = self.mesh_step(0, &["join-token", "-q", "worker"])?;
            self.say(
                spec.progress,
                format_args!("joining {} worker(s)", self.nodes.len() - managers),
            );
            let this = &*self;
            std::thread::scope(|s| {
                let joins: Vec<_> = (managers..this.nodes.len())
                    .map(|i| {
                        let (token, remote) = (&token, &remote);
                        s.spawn(move || {
                            let ip = this.nodes[i].ip.to_string();
                            this.mesh_step(
                                i,
                                &["join", "--token", token, "--advertise-addr", &ip, remote],
                            )
                        })
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(LabError::InvalidSpec("a join thread panicked".into()))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
        }
        self.say(spec.progress, "waiting for every node to be Ready");
        let rows = self.wait_cluster(self.nodes.len(), managers, spec.ready_timeout)?;
        for node in &mut self.nodes {
            node.id = rows
                .iter()
                .find(|r| r.hostname == node.name)
                .map(|r| r.id.clone());
        }
        Ok(())
    }

    /// Polls `mesh node ls` on node1 until the first `count` nodes are listed
    /// and Ready and `managers` of them are reachable managers with one leader.
    fn wait_cluster(
        &self,
        count: usize,
        managers: usize,
        timeout: Duration,
    ) -> Result<Vec<NodeRow>> {
        let expect: Vec<&str> = self.nodes[..count]
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        let deadline = Instant::now() + timeout;
        let mut last;
        let mut rows = Vec::new();
        loop {
            sys::check_interrupt()?;
            match self.mesh_idx(
                0,
                &["node", "ls", "--format", "json"],
                Duration::from_secs(10),
            ) {
                Ok(out) if out.status.success() => {
                    match parse_node_ls(&String::from_utf8_lossy(&out.stdout)) {
                        Ok(r) => {
                            rows = r;
                            match cluster_complete(&rows, &expect, managers) {
                                Ok(()) => return Ok(rows),
                                Err(why) => last = why,
                            }
                        }
                        Err(e) => last = format!("`mesh node ls --format json` printed {e}"),
                    }
                }
                Ok(out) => {
                    last = format!(
                        "`mesh node ls` failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                Err(LabError::Timeout { .. }) => last = "`mesh node ls` hung for 10s".into(),
                Err(e) => return Err(e),
            }
            if !self.nodes[0].running() {
                return Err(self.node_error(0, "its daemon exited while the cluster formed".into()));
            }
            if Instant::now() >= deadline {
                // Point at the first node that is missing or not Ready: its log says why.
                let culprit = (0..count)
                    .find(|&i| {
                        !rows
                            .iter()
                            .any(|r| r.hostname == self.nodes[i].name && r.status == "Ready")
                    })
                    .unwrap_or(0);
                return Err(self.node_error(
                    culprit,
                    format!("cluster not complete after {}s: {last}", timeout.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn index(&self, node: &str) -> Result<usize> {
        let want = names::normalize_node_arg(node);
        self.nodes
            .iter()
            .position(|n| n.name == want)
            .ok_or_else(|| LabError::NoSuchNode {
                lab: self.name.clone(),
                node: node.into(),
                known: self
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Node by name (`node2`, or just `2`).
    pub fn node(&self, node: &str) -> Result<&LabNode> {
        Ok(&self.nodes[self.index(node)?])
    }

    /// The underlay subnet, `192.168.k.0/24`.
    pub fn subnet(&self) -> String {
        format!("192.168.{}.0/24", self.subnet_index)
    }

    /// Limit for [`Lab::exec`] and [`Lab::mesh`] (default 120 s); a command
    /// running past it is killed and reported as a timeout.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Leaves the lab running when this value is dropped (prints nothing).
    pub fn keep(mut self) {
        self.owned = false;
    }

    /// PATH for commands in a node: the mesh binary's directory first, so
    /// `mesh` works there even when it is not installed.
    fn path_env(&self) -> OsString {
        let default =
            OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let old = std::env::var_os("PATH").unwrap_or(default);
        let mut dirs: Vec<PathBuf> = self
            .mesh_bin
            .parent()
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        dirs.extend(std::env::split_paths(&old));
        std::env::join_paths(dirs).unwrap_or(old)
    }

    /// The node's UTS namespace: the running daemon's, else a new one with
    /// the node's hostname.
    fn uts_for(&self, node: &LabNode) -> Uts {
        if let Some(pid) = node.pid
            && node.running()
            && let Ok(f) = File::open(format!("/proc/{pid}/ns/uts"))
            // Re-check: the fd must be the daemon's, not a recycled pid's.
            && node.running()
        {
            return Uts::Join(f.into());
        }
        Uts::New(node.name.clone())
    }

    fn command_idx(&self, i: usize, program: &OsStr) -> Result<Command> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(program);
        cmd.env("MESH_HOST", node.host())
            .env("MESH_LAB", &self.name)
            .env("MESH_LAB_NODE", &node.name)
            .env("PATH", self.path_env());
        sys::enter_node(&mut cmd, &node.netns, self.uts_for(node), false)?;
        Ok(cmd)
    }

    /// A `Command` that runs `program` inside `node` (its network and UTS
    /// namespaces, `MESH_HOST` set): for background processes such as
    /// `iperf3 -s` that the caller spawns and stops itself.
    pub fn command(&self, node: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        self.command_idx(self.index(node)?, program.as_ref())
    }

    /// Runs `argv` inside `node`, capturing its output; the exit status is
    /// the caller's to check.
    pub fn exec<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<Output> {
        let i = self.index(node)?;
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| LabError::InvalidSpec("exec needs a command to run".into()))?;
        let mut cmd = self.command_idx(i, program.as_ref())?;
        cmd.args(args);
        sys::run_capture(cmd, Some(self.command_timeout))
    }

    /// Like [`Lab::exec`], but fails unless the command exits 0; returns its stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<String> {
        let out = self.exec(node, argv)?;
        let shown = argv
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        sys::check(&format!("{shown} (on {node})"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn mesh_idx<S: AsRef<OsStr>>(&self, i: usize, args: &[S], timeout: Duration) -> Result<Output> {
        let mut cmd = self.command_idx(i, self.mesh_bin.as_os_str())?;
        cmd.arg("-H").arg(self.nodes[i].host()).args(args);
        sys::run_capture(cmd, Some(timeout))
    }

    /// Runs `mesh -H unix://SOCK ARGS` inside `node`.
    pub fn mesh<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<Output> {
        self.mesh_idx(self.index(node)?, args, self.command_timeout)
    }

    /// Like [`Lab::mesh`], but fails unless it exits 0; returns its stdout.
    pub fn mesh_ok<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<String> {
        let out = self.mesh(node, args)?;
        let shown = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        sys::check(&format!("mesh {shown} (on {node})"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILLs `node`'s daemon (a crash: it removes nothing). Ok(false) if it
    /// was not running.
    pub fn kill(&mut self, node: &str) -> Result<bool> {
        let i = self.index(node)?;
        let n = &self.nodes[i];
        let (Some(pid), true) = (n.pid, n.running()) else {
            return Ok(false);
        };
        let start = n
            .pid_start
            .or_else(|| sys::proc_info(pid).map(|p| p.start))
            .unwrap_or(0);
        sys::signal(pid, Some(start), Signal::SIGKILL)?;
        if !sys::wait_gone(&[(pid, start)], Duration::from_secs(10)).is_empty() {
            return Err(self.node_error(i, format!("daemon pid {pid} survived SIGKILL for 10s")));
        }
        reap(&mut self.children);
        tracing::info!(lab = %self.name, node = %self.nodes[i].name, pid, "daemon killed");
        Ok(true)
    }

    /// Starts `node`'s daemon again on the same state dir and socket and waits
    /// until its socket answers.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        let n = &self.nodes[i];
        if let (Some(pid), true) = (n.pid, n.running()) {
            return Err(LabError::AlreadyRunning {
                lab: self.name.clone(),
                node: n.name.clone(),
                pid,
            });
        }
        if !sys::netns_path(&n.netns).exists() {
            return Err(LabError::InvalidSpec(format!(
                "{}'s namespace {} is gone; the lab is broken: `mesh lab down {}` and `up` again",
                n.name, n.netns, self.name
            )));
        }
        reap(&mut self.children);
        self.spawn_daemon(i)?;
        self.save()?;
        self.wait_socket(i, UpSpec::default().socket_timeout)
    }

    fn set_link(&mut self, node: &str, up: bool) -> Result<()> {
        let i = self.index(node)?;
        let veth = self.nodes[i].veth.clone();
        let state = if up { "up" } else { "down" };
        sys::ip(&[
            "-n",
            self.underlay_netns.as_str(),
            "link",
            "set",
            "dev",
            &veth,
            state,
        ])?;
        self.nodes[i].cut = !up;
        self.save()
    }

    /// Cuts `node`'s underlay link (its switch port goes down; eth0 loses
    /// carrier, as when a cable is pulled).
    pub fn cut(&mut self, node: &str) -> Result<()> {
        self.set_link(node, false)
    }

    /// Restores `node`'s underlay link.
    pub fn heal(&mut self, node: &str) -> Result<()> {
        self.set_link(node, true)
    }

    /// Tears the lab down now, reporting every problem.
    pub fn down(mut self) -> Result<()> {
        self.owned = false;
        let mut children = std::mem::take(&mut self.children);
        teardown(&self.name, &self.nodes, &mut children)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if std::thread::panicking()
            && std::env::var("MESH_LAB_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
        {
            eprintln!(
                "mesh-lab: keeping lab {} of the failed test (MESH_LAB_KEEP); remove it with `mesh lab down {}`",
                self.name, self.name
            );
            return;
        }
        let mut children = std::mem::take(&mut self.children);
        if let Err(e) = teardown(&self.name, &self.nodes, &mut children) {
            tracing::error!(lab = %self.name, error = %e, "lab teardown failed");
            eprintln!("mesh-lab: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(h: &str, status: &str, ms: &str) -> NodeRow {
        NodeRow {
            id: format!("id-{h}"),
            hostname: h.into(),
            status: status.into(),
            manager_status: ms.into(),
        }
    }

    #[test]
    fn node_ls_parsing() {
        let lines = concat!(
            r#"{"ID":"a1","Hostname":"node1","Status":"Ready","Availability":"Active","ManagerStatus":"Leader"}"#,
            "\n",
            r#"{"ID":"b2","Hostname":"node2","Status":"Down","Availability":"Active","ManagerStatus":""}"#,
            "\n"
        );
        let rows = parse_node_ls(lines).expect("valid JSON lines");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], row_with("a1", "node1", "Ready", "Leader"));
        assert_eq!(rows[1].status, "Down");
        let arr = r#"[{"ID":"a1","Hostname":"node1","Status":"Ready"}]"#;
        assert_eq!(parse_node_ls(arr).expect("array").len(), 1);
        assert_eq!(parse_node_ls("").expect("empty").len(), 0);
        assert!(parse_node_ls("ID HOSTNAME\n").is_err());
    }

    fn row_with(id: &str, h: &str, s: &str, m: &str) -> NodeRow {
        NodeRow {
            id: id.into(),
            hostname: h.into(),
            status: s.into(),
            manager_status: m.into(),
        }
    }

    #[test]
    fn completeness() {
        let expect = ["node1", "node2", "node3"];
        let full = vec![
            row("node1", "Ready", "Leader"),
            row("node2", "Ready", "Reachable"),
            row("node3", "Ready", ""),
        ];
        assert!(cluster_complete(&full, &expect, 2).is_ok());
        let e = cluster_complete(&full, &expect, 3).expect_err("wants 3 managers");
        assert!(e.contains("2 reachable managers of 3"), "{e}");
        let e = cluster_complete(&full[..2], &expect, 2).expect_err("node3 missing");
        assert!(e.contains("missing: node3"), "{e}");
        let mut down = full.clone();
        down[2].status = "Down".into();
        let e = cluster_complete(&down, &expect, 2).expect_err("node3 down");
        assert!(e.contains("node3 is Down"), "{e}");
        let mut two_leaders = full;
        two_leaders[1].manager_status = "Leader".into();
        assert!(cluster_complete(&two_leaders, &expect, 2).is_err());
    }

    #[test]
    fn spec_validation() {
        assert!(UpSpec::new("ok", 3, 1).validate().is_ok());
        assert!(UpSpec::new("ok", 0, 1).validate().is_err());
        assert!(UpSpec::new("ok", 3, 4).validate().is_err());
        assert!(UpSpec::new("ok", 3, 0).validate().is_err());
        assert!(
            UpSpec::new("ok", names::MAX_NODES + 1, 1)
                .validate()
                .is_err()
        );
        assert!(UpSpec::new("Bad", 3, 1).validate().is_err());
    }
}
