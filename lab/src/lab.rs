//! A lab: building one (namespaces, underlay, daemons, the cluster), its
//! state file, and cutting and healing its links. Its daemons are in
//! `daemon.rs`, commands in its nodes in `exec.rs`, removal in `teardown.rs`.
//!
//! Layout of lab `L` with nodes `node1..nodeN`:
//! - netns `mlab-L-ul` holds bridge `br0` (the underlay switch) and one veth
//!   end per node, named after the node;
//! - netns `mlab-L-nodeI` holds the other end as `eth0` with 192.168.k.(10+I)/24;
//! - netns `mlab-L-hostJ` (outside hosts: no daemon, not in the cluster) is
//!   wired the same way with the addresses after the nodes' (10+N+J);
//! - `/run/mesh-lab/L/lab.json` records all of it so separate `mesh lab`
//!   invocations (and `down` after a crash) see the same lab;
//! - `/run/mesh-lab/L/nodeI/{state/,mesh.sock,daemon.log}` belong to the node's daemon.
//!
//! Nothing is routed out of the lab: the only addresses are on the lab's own
//! /24 and the host namespace gets no link, so traffic cannot leave it.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};
use crate::names;
use crate::readiness::{NodeRow, cluster_complete, parse_node_ls};
use crate::registry::{
    LAB_ROOT, lab_dir, lock_root, owned_netns, read_state, require_root, state_file,
};
use crate::spec::{LabHost, LabNode, LabStatus, Role, UpSpec};
use crate::sys;
use crate::teardown::teardown;

/// Port managers listen on for joins, as in Swarm.
pub const CLUSTER_PORT: u16 = 2377;

/// nftables table (in a node's namespace) of [`Lab::cut_control`].
pub(crate) const CONTROL_CUT_TABLE: &str = "mesh_lab_cut";

/// Name of the underlay bridge inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "br0";

/// Default limit for one command run in a node through the API.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Limit for one `mesh` CLI call made while forming the cluster.
const MESH_STEP_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// Outside hosts (`host1`..): clients on the underlay, not cluster nodes.
    #[serde(default)]
    pub hosts: Vec<LabHost>,
    #[serde(default)]
    pub created_unix: u64,
    /// Groups of the current [`Lab::partition`] (node or host names); empty
    /// when the underlay is whole.
    #[serde(default)]
    pub partition: Vec<Vec<String>>,
    #[serde(skip, default = "default_command_timeout")]
    pub(crate) command_timeout: Duration,
    /// Daemons started by this process, kept to reap them.
    #[serde(skip)]
    pub(crate) children: HashMap<String, Child>,
    /// Tear down on drop.
    #[serde(skip)]
    pub(crate) owned: bool,
}

fn default_command_timeout() -> Duration {
    DEFAULT_COMMAND_TIMEOUT
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub(crate) fn create_dir(path: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| LabError::io(format!("creating {}", path.display()), e))
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
                match teardown(&lab.name, &lab.nodes, &lab.hosts, &mut children) {
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
                    paused: false,
                    name: node,
                }
            })
            .collect();
        let hosts = (1..=spec.hosts)
            .map(|j| {
                let host = names::host_name(j);
                LabHost {
                    ip: names::host_ip(k, spec.nodes, j),
                    netns: names::host_netns(name, &host),
                    veth: host.clone(),
                    name: host,
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
            hosts,
            created_unix: now_unix(),
            partition: Vec::new(),
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
    pub(crate) fn save(&self) -> Result<()> {
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
            self.wire(&node.netns, &node.veth, node.ip)?;
            create_dir(&node.dir, 0o755)?;
            create_dir(&node.state_dir, 0o700)?;
        }
        for host in &self.hosts {
            sys::check_interrupt()?;
            self.wire(&host.netns, &host.veth, host.ip)?;
        }
        Ok(())
    }

    /// Makes namespace `ns` with `eth0` at `ip`/24, linked to the underlay
    /// bridge through `veth`.
    fn wire(&self, ns: &str, veth: &str, ip: std::net::Ipv4Addr) -> Result<()> {
        let ul = self.underlay_netns.as_str();
        sys::ip(&["netns", "add", ns])?;
        sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        sys::ip(&[
            "-n", ul, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        sys::ip(&[
            "-n",
            ul,
            "link",
            "set",
            veth,
            "master",
            UNDERLAY_BRIDGE,
            "up",
        ])?;
        sys::ip(&["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        sys::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Runs a `mesh` step of cluster formation on node `i`; fails with the node's log.
    pub(crate) fn mesh_step(&self, i: usize, args: &[&str]) -> Result<String> {
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

    pub(crate) fn index(&self, node: &str) -> Result<usize> {
        let want = names::normalize_node_arg(node);
        if self.hosts.iter().any(|h| h.name == want) {
            return Err(LabError::NotANode {
                lab: self.name.clone(),
                host: want,
                nodes: self.nodes.len(),
            });
        }
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

    /// Outside host by name (`host1`).
    pub fn host(&self, host: &str) -> Result<&LabHost> {
        self.hosts
            .iter()
            .find(|h| h.name == host)
            .ok_or_else(|| LabError::NoSuchHost {
                lab: self.name.clone(),
                host: host.into(),
                known: self
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
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

    pub(crate) fn set_link(&mut self, node: &str, up: bool) -> Result<()> {
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

    /// Cuts only `node`'s control plane: an nftables table of the lab's own
    /// in the node's namespace drops TCP to and from the cluster port, so the
    /// node loses its managers (or they lose it) while its data path (VXLAN,
    /// WireGuard) keeps running on the last view it had. The table goes with
    /// the namespace at teardown.
    pub fn cut_control(&self, node: &str) -> Result<()> {
        let n = self.node(node)?;
        let (netns, name) = (n.netns.clone(), n.name.clone());
        let p = CLUSTER_PORT;
        let rules = format!(
            "table inet {CONTROL_CUT_TABLE} {{\n\
             chain input {{ type filter hook input priority -300; tcp dport {p} drop; tcp sport {p} drop; }}\n\
             chain output {{ type filter hook output priority -300; tcp dport {p} drop; tcp sport {p} drop; }}\n\
             }}\n"
        );
        self.nft_script(&netns, &format!("{name}-cut-control.nft"), &rules)
    }

    /// Runs an nftables script (kept in the lab dir as `file`) in `netns`.
    pub(crate) fn nft_script(&self, netns: &str, file: &str, script: &str) -> Result<()> {
        sys::nft_file(&self.dir.join(file), netns, script)
    }

    /// Undoes [`Lab::cut_control`].
    pub fn heal_control(&self, node: &str) -> Result<()> {
        let netns = self.node(node)?.netns.clone();
        sys::ip(&[
            "netns",
            "exec",
            netns.as_str(),
            "nft",
            "delete",
            "table",
            "inet",
            CONTROL_CUT_TABLE,
        ])
    }

    /// Tears the lab down now, reporting every problem.
    pub fn down(mut self) -> Result<()> {
        self.owned = false;
        let mut children = std::mem::take(&mut self.children);
        teardown(&self.name, &self.nodes, &self.hosts, &mut children)
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
        if let Err(e) = teardown(&self.name, &self.nodes, &self.hosts, &mut children) {
            tracing::error!(lab = %self.name, error = %e, "lab teardown failed");
            eprintln!("mesh-lab: {e}");
        }
    }
}
