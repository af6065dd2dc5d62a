//! A state dir written by the code before issue 11 (main at 713ec91, see
//! tests/fixtures/compat-713ec91.README) starts under this code with its
//! networks, services and tasks intact: the Raft log, its snapshot and the
//! node files are read as they were written.
//!
//! Two namespaces of the test's own with the fixture's underlay addresses
//! (192.168.1.11 and .12, so the recorded addresses still reach), one
//! daemon each on the unpacked state dirs. A guard kills the daemons and
//! what runs in their namespaces and deletes the namespaces and dirs, even
//! when the test fails. Needs root.

mod common;

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{json_lines, mesh_bin, wait_for};
use serde_json::Value;

const FIXTURE: &str = "tests/fixtures/compat-713ec91.tar.gz";
const PREFIX: &str = "mcompat";
const APP: &str = "c0dlw28lry5f5it7y1qh18wgz";
const BACK: &str = "08hfnj6cbfuvqbzl6i82jinii";
const WEB: &str = "emxy00pxr5tnunvdkuqzv9p6b";
const GLOB: &str = "f1zky02qpe82szo1ewzan81xu";
/// web.1 on node1 (10.20.0.3), web.2 on node2 (10.20.0.4).
const WEB_TASKS: [&str; 2] = ["ebsmlnrsf5t1t4ax59xn9rwu6", "7eaqpc3k8x4othwjxinern1f0"];
const GLOB_TASKS: [&str; 2] = ["dw53aogydck466lkweuolm3vr", "99grn4lbg8j7estz2o09dx3qf"];

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

/// Kills every process in `ns`, then deletes it.
fn delete_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
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

/// One node of the fixture: its namespace, its unpacked dir, its daemon.
struct Node {
    netns: String,
    dir: PathBuf,
    daemon: Option<Child>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("mesh.sock")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn start(&mut self) -> Result<()> {
        let log = fs::File::create(self.dir.join("daemon.log"))?;
        let err = log.try_clone()?;
        let net: OwnedFd = fs::File::open(Path::new("/run/netns").join(&self.netns))?.into();
        let hostname = self.netns.clone();
        let mut cmd = Command::new(mesh_bin());
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(self.socket())
            .env_remove("MESH_HOST")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        // SAFETY: runs in the forked child before exec; only system calls on
        // values prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                nix::sched::setns(&net, nix::sched::CloneFlags::CLONE_NEWNET)?;
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)?;
                nix::unistd::sethostname(&hostname)?;
                Ok(())
            });
        }
        self.daemon = Some(cmd.spawn().context("starting mesh daemon")?);
        wait_for("the daemon's socket", Duration::from_secs(60), || {
            self.mesh(&["info"]).ok()?.status.success().then_some(())
        })
        .with_context(|| format!("daemon log:\n{}", self.log_text()))?;
        Ok(())
    }

    fn mesh(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(mesh_bin())
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .env_remove("MESH_HOST")
            .stdin(Stdio::null())
            .output()?)
    }

    fn mesh_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.mesh(args)?;
        ensure!(
            out.status.success(),
            "`mesh {}` failed: {}\n--- daemon log ---\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log_text()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The two nodes; dropping it removes everything they made.
struct Fixture {
    root: PathBuf,
    nodes: Vec<Node>,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let pid = std::process::id();
        let root = std::env::temp_dir().join(format!("{PREFIX}{pid}"));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        let mut fx = Fixture {
            root: root.clone(),
            nodes: Vec::new(),
        };
        let tar = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
        let out = Command::new("tar")
            .arg("-xzf")
            .arg(&tar)
            .arg("-C")
            .arg(&root)
            .output()?;
        ensure!(out.status.success(), "unpacking {}: {out:?}", tar.display());
        for i in 1..=2 {
            let netns = format!("{PREFIX}{pid}n{i}");
            ip(&["netns", "add", &netns])?;
            fx.nodes.push(Node {
                netns,
                dir: root.join(format!("node{i}")),
                daemon: None,
            });
        }
        let (a, b) = (&fx.nodes[0].netns, &fx.nodes[1].netns);
        ip(&[
            "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b,
        ])?;
        for (i, n) in fx.nodes.iter().enumerate() {
            let addr = format!("192.168.1.{}/24", 11 + i);
            ip(&["-n", &n.netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &n.netns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &n.netns, "link", "set", "eth0", "up"])?;
        }
        Ok(fx)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The daemons name their namespaces after their state dir's instance.
        let prefixes: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| fs::read_to_string(n.dir.join("state/instance")).ok())
            .map(|id| format!("mesh{}-", id.trim()))
            .collect();
        for n in &mut self.nodes {
            if let Some(mut d) = n.daemon.take() {
                let _ = d.kill();
                let _ = d.wait();
            }
        }
        for ns in netns_list() {
            if prefixes.iter().any(|p| ns.starts_with(p)) {
                delete_netns(&ns);
            }
        }
        for n in &self.nodes {
            delete_netns(&n.netns);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn service_status(node: &Node, service: &str) -> Result<mesh_proto::ServiceStatusReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ch = mesh_common::transport::unix_channel(&node.socket()).await?;
        let mut c = mesh_proto::control_client::ControlClient::new(ch);
        let r = c
            .service_status(mesh_proto::ServiceRef {
                service: service.into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("service status {service}: {}", s.message()))?;
        Ok(r.into_inner())
    })
}

fn by_name<'a>(list: &'a [Value], name: &str) -> Result<&'a Value> {
    list.iter()
        .find(|n| n["Name"] == name)
        .with_context(|| format!("no {name} in {list:?}"))
}

#[test]
fn state_written_before_issue_11_loads() -> Result<()> {
    let mut fx = Fixture::new()?;
    fx.nodes[0].start()?;
    let manager = &fx.nodes[0];

    // Networks, cluster and local, with their allocations.
    let nets = json_lines(&manager.mesh_ok(&["network", "ls", "--format", "json"])?)?;
    let app = by_name(&nets, "app")?;
    ensure!(
        app["ID"] == APP && app["Subnet"] == "10.20.0.0/24" && app["Scope"] == "swarm",
        "{app}"
    );
    let back = by_name(&nets, "back")?;
    ensure!(back["ID"] == BACK && back["Internal"] == "true", "{back}");
    by_name(&nets, "ingress")?;
    ensure!(by_name(&nets, "localnet")?["Scope"] == "local");

    // Services with their specs, and the tasks the old code placed.
    let web = service_status(manager, "web")?;
    let svc = web.service.as_ref().context("no web service")?;
    ensure!(
        (svc.id.as_str(), svc.mode.as_str(), svc.replicas) == (WEB, "replicated", 2),
        "{svc:?}"
    );
    ensure!(svc.vips.iter().any(|v| v.network_id == APP), "{svc:?}");
    let glob = service_status(manager, "glob")?;
    let gsvc = glob.service.as_ref().context("no glob service")?;
    ensure!(
        (
            gsvc.id.as_str(),
            gsvc.mode.as_str(),
            gsvc.endpoint_mode.as_str()
        ) == (GLOB, "global", "dnsrr"),
        "{gsvc:?}"
    );
    for (status, ids) in [(&web, WEB_TASKS), (&glob, GLOB_TASKS)] {
        for id in ids {
            ensure!(
                status.tasks.iter().any(|t| t.id == id),
                "task {id} is missing: {:?}",
                status.tasks
            );
        }
    }

    // And the cluster goes on: the worker rejoins, every task runs.
    fx.nodes[1].start()?;
    let manager = &fx.nodes[0];
    wait_for("web and glob to run", Duration::from_secs(90), || {
        let w = service_status(manager, "web").ok()?.service?;
        let g = service_status(manager, "glob").ok()?.service?;
        (w.running == 2 && g.running == 2).then_some(())
    })
    .with_context(|| format!("manager log:\n{}", manager.log_text()))?;
    Ok(())
}
