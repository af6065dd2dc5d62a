//! Secrets at rest: a daemon started by hand (not by the lab, which makes
//! the state dir 0700 itself), under umask 022, keeps its state dir private —
//! directories 0700, files 0600 (a sandbox's `hosts` and `resolv.conf`,
//! bind-mounted as its /etc files, 0644) — and tightens what it finds looser.
//!
//! Two network namespaces of the test's own, joined by a veth pair, one
//! daemon in each. A guard kills the daemons and what runs in their
//! namespaces, deletes the namespaces (the test's and the daemons') and the
//! dirs, even when the test fails; leftovers of a crashed run are removed
//! first.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::common::{mesh_bin, wait_for};

/// Namespaces and dirs of this test are named `<PREFIX><pid><role>`.
const PREFIX: &str = "msecf";
const SUBNET: &str = "10.250.77";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn netns_list() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills every process in `ns`, then deletes it.
fn delete_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    for _ in 0..20 {
        if ip(&["netns", "del", ns]).is_ok() || !Path::new("/run/netns").join(ns).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The namespace prefix a daemon derives from its state dir.
fn daemon_prefix(state_dir: &Path) -> Option<String> {
    let id = fs::read_to_string(state_dir.join("instance")).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| format!("mesh{id}"))
}

/// One hand-started node: its namespace, dirs and daemon.
struct Node {
    netns: String,
    dir: PathBuf,
    ip: String,
    daemon: Option<Child>,
}

impl Node {
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("mesh.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    /// Starts `mesh daemon` in the node's namespace with umask 022, its own
    /// session and hostname, logging to daemon.log; waits for its socket.
    fn start(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let err = log.try_clone()?;
        let net: OwnedFd = fs::File::open(Path::new("/run/netns").join(&self.netns))?.into();
        let hostname = self.netns.clone();
        let mut cmd = Command::new(mesh_bin());
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .env_remove("MESH_HOST")
            .env_remove("MESH_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: runs in the forked child before exec; only system calls on
        // values prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                nix::sched::setns(&net, nix::sched::CloneFlags::CLONE_NEWNET)?;
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)?;
                nix::unistd::sethostname(&hostname)?;
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
                Ok(())
            });
        }
        self.daemon = Some(cmd.spawn().context("starting mesh daemon")?);
        wait_for("the daemon's socket", Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = self.daemon.as_mut().map(Child::try_wait) {
                return Some(Err(()));
            }
            let out = self.mesh(&["info"]).ok()?;
            out.status.success().then_some(Ok(()))
        })?
        .0
        .map_err(|()| anyhow::anyhow!("the daemon exited: {}", self.log_text()))
    }

    /// SIGTERM, then SIGKILL after 15 s.
    fn stop(&mut self) {
        let Some(mut child) = self.daemon.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn mesh(&self, args: &[&str]) -> Result<Output> {
        let host = format!("unix://{}", self.socket().display());
        Ok(Command::new(mesh_bin())
            .arg("-H")
            .arg(host)
            .args(args)
            .env_remove("MESH_HOST")
            .stdin(Stdio::null())
            .output()?)
    }

    fn mesh_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.mesh(args)?;
        ensure!(
            out.status.success(),
            "`mesh {}` on {} failed: {}\n--- daemon log ---\n{}",
            args.join(" "),
            self.netns,
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log_text()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }
}

/// The two nodes; dropping it removes everything they made.
struct Pair {
    nodes: Vec<Node>,
}

impl Pair {
    /// Removes what a crashed run left (its pid is gone), then makes the two
    /// namespaces, linked by a veth pair.
    fn new() -> Result<Self> {
        clean_stale();
        let pid = std::process::id();
        let mut pair = Pair { nodes: Vec::new() };
        for (role, host) in [("m", 1), ("w", 2)] {
            let name = format!("{PREFIX}{pid}{role}");
            let dir = std::env::temp_dir().join(&name);
            let _ = fs::remove_dir_all(&dir);
            // The test's own dir: only the state dir below it is the daemon's.
            fs::create_dir_all(&dir)?;
            pair.nodes.push(Node {
                netns: name,
                dir,
                ip: format!("{SUBNET}.{host}"),
                daemon: None,
            });
        }
        for n in &pair.nodes {
            ip(&["netns", "add", &n.netns])?;
            ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
        }
        let (a, b) = (&pair.nodes[0], &pair.nodes[1]);
        ip(&[
            "-n", &a.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &b.netns,
        ])?;
        for n in &pair.nodes {
            ip(&[
                "-n",
                &n.netns,
                "addr",
                "add",
                &format!("{}/24", n.ip),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
        }
        Ok(pair)
    }
}

/// Namespaces and dirs of earlier runs whose process is gone, with the
/// namespaces their daemons made.
fn clean_stale() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .map(|rest| rest.trim_end_matches(['m', 'w']))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
    };
    let mut prefixes = Vec::new();
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                prefixes.extend(daemon_prefix(&e.path().join("state")));
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    for ns in netns_list() {
        if stale(&ns) || prefixes.iter().any(|p| ns.starts_with(&format!("{p}-"))) {
            delete_netns(&ns);
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let prefixes: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| daemon_prefix(&n.state_dir()))
            .collect();
        for n in &mut self.nodes {
            n.stop();
        }
        for ns in netns_list() {
            if prefixes.iter().any(|p| ns.starts_with(&format!("{p}-"))) {
                delete_netns(&ns);
            }
        }
        for n in &self.nodes {
            delete_netns(&n.netns);
            let _ = fs::remove_dir_all(&n.dir);
        }
    }
}

fn mode(p: &Path) -> Result<u32> {
    Ok(fs::symlink_metadata(p)
        .with_context(|| format!("{} is missing", p.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Every directory below `root` is 0700 and every file 0600, but for a
/// sandbox's hosts and resolv.conf (0644); `required` must exist.
fn check_private(root: &Path, required: &[&str]) -> Result<()> {
    for r in required {
        let p = root.join(r);
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        let m = mode(&p)?;
        ensure!(m == want, "{} is {m:04o}, want {want:04o}", p.display());
    }
    let mut todo = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(p) = todo.pop() {
        let meta = fs::symlink_metadata(&p)?;
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let want = if meta.is_dir() {
            todo.extend(fs::read_dir(&p)?.flatten().map(|e| e.path()));
            0o700
        } else if meta.is_file() && ["hosts", "resolv.conf"].contains(&name) {
            0o644
        } else if meta.is_file() {
            0o600
        } else {
            continue;
        };
        let m = mode(&p)?;
        ensure!(m == want, "{} is {m:04o}, want {want:04o}", p.display());
        seen += 1;
    }
    ensure!(
        seen > required.len(),
        "too few files under {}",
        root.display()
    );
    Ok(())
}

#[test]
fn state_files_are_private() -> Result<()> {
    let mut pair = Pair::new()?;
    pair.nodes[0].start()?;
    let manager_ip = pair.nodes[0].ip.clone();
    pair.nodes[0].mesh_ok(&["init", "--advertise-addr", &manager_ip])?;
    let token = pair.nodes[0].mesh_ok(&["join-token", "-q", "worker"])?;

    pair.nodes[1].start()?;
    let worker_ip = pair.nodes[1].ip.clone();
    pair.nodes[1].mesh_ok(&[
        "join",
        "--token",
        &token,
        "--advertise-addr",
        &worker_ip,
        &format!("{manager_ip}:2377"),
    ])?;
    wait_for("both nodes Ready", Duration::from_secs(60), || {
        let ls = pair.nodes[0].mesh_ok(&["node", "ls"]).ok()?;
        (ls.matches("Ready").count() == 2).then_some(())
    })?;

    // A task on each node, its environment holding a secret.
    pair.nodes[0].mesh_ok(&[
        "service",
        "create",
        "--name",
        "secret",
        "--mode",
        "global",
        "--env",
        "TOKEN=hunter2",
        "--detach",
        "--",
        "sh",
        "-c",
        "echo started; sleep 600",
    ])?;
    wait_for("a task log on each node", Duration::from_secs(60), || {
        pair.nodes
            .iter()
            .all(|n| has_file(&n.state_dir().join("sandboxes"), "output.log"))
            .then_some(())
    })?;

    let common = [
        "",
        "certs",
        "certs/ca.pem",
        "certs/node.pem",
        "certs/node.key",
        "node.json",
        "instance",
        "sandboxes",
    ];
    let mut manager = common.to_vec();
    manager.extend(["raft", "raft/raft.redb"]);
    check_private(&pair.nodes[0].state_dir(), &manager).context("manager")?;
    check_private(&pair.nodes[1].state_dir(), &common).context("worker")?;

    // Loosened while the daemon is stopped: tightened at the next start,
    // with one warning per path.
    let m = &mut pair.nodes[0];
    m.stop();
    let sd = m.state_dir();
    let loosened = [
        ("node.json", 0o644),
        ("raft/raft.redb", 0o644),
        ("certs/node.key", 0o644),
        ("certs", 0o755),
    ];
    for (p, mode) in loosened {
        fs::set_permissions(sd.join(p), fs::Permissions::from_mode(mode))?;
    }
    let before = m.log_text().len();
    m.start()?;
    check_private(&sd, &manager).context("manager after restart")?;
    let log = m.log_text();
    let log = log.get(before..).unwrap_or_default();
    for (p, mode) in loosened {
        let needle = format!("{} was mode {mode:04o}", sd.join(p).display());
        let n = log.matches(&needle).count();
        ensure!(n == 1, "{n} warnings with {needle:?} in:\n{log}");
    }
    if log.contains("was mode 0") && log.matches("was mode 0").count() != loosened.len() {
        bail!("warnings about paths that were not loosened:\n{log}");
    }
    Ok(())
}

fn has_file(dir: &Path, name: &str) -> bool {
    fs::read_dir(dir).is_ok_and(|d| d.flatten().any(|e| e.path().join(name).is_file()))
}
