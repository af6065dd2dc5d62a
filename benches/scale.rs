//! Control-plane scale with simulated nodes (`mesh lab sim`) on a lab of 3
//! real managers and one real worker. For each size (1,000 and 5,000 by
//! default; `MESH_SCALE_NODES=200,1000` to choose) it prints:
//! - join rate;
//! - the leader's CPU and resident memory while idle, and memory per node;
//! - heartbeat and view traffic per second (protobuf bytes, from the
//!   simulator's counters);
//! - `network create` plus a global service (one task per node) → every
//!   node acknowledged (`service create` returns only then);
//! - a replicated service of `MESH_SCALE_TASKS` tasks (100,000 by default)
//!   → all running and acknowledged;
//! - 10% of the nodes silenced → seen down and their tasks running
//!   elsewhere;
//! - the leader's state dir (Raft log and snapshot) size, and the time for
//!   a promoted worker to restore the state and become a manager.
//!
//! A step that cannot finish within its limit prints what it reached and
//! the run goes on to the next size. Run as root: `cargo bench --bench scale`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::{Lab, UpSpec};

#[path = "../tests/common/mod.rs"]
mod common;
use common::sim::Sim;
use common::{node_ls, status};

/// Leader's CPU time (user + system ticks) and resident memory (bytes).
fn proc_usage(pid: i32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((ticks, rss_kb * 1024))
}

fn leader(lab: &Lab) -> Result<(String, i32)> {
    let name = common::leader(lab, "node1").context("no leader")?;
    let pid = lab.node(&name)?.pid.context("leader has no pid")?;
    Ok((name, pid))
}

fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mb(b: f64) -> String {
    format!("{:.1} MB", b / 1e6)
}

/// Polls the service until `done` says so, or `limit`; returns the time
/// taken, or what it last reached.
fn wait_service(
    lab: &Lab,
    service: &str,
    limit: Duration,
    mut done: impl FnMut(&mesh_proto::ServiceStatusReply) -> bool,
) -> std::result::Result<Duration, String> {
    let mut last = String::new();
    common::wait_for(service, limit, || {
        let st = status(lab, "node1", service).ok()?;
        let running = st.tasks.iter().filter(|t| t.state == "running").count();
        last = format!("{running} running, converged {}", st.converged);
        done(&st).then_some(())
    })
    .map(|(_, d)| d)
    .map_err(|e| format!("{e} ({last})"))
}

fn run(n: usize, tasks: usize) -> Result<()> {
    println!("\n== {n} simulated nodes ==");
    let name = common::lab_name("scale");
    let _ = mesh_lab::cleanup_stale(&name);
    let lab = Lab::up(&UpSpec::new(&name, 4, 3), common::mesh_bin())?;
    let (lname, pid) = leader(&lab)?;
    let (_, rss0) = proc_usage(pid)?;
    let start = Instant::now();
    let mut sim = Sim::start(&lab, n, Duration::from_secs(1200))?;
    let joined = sim
        .seen
        .iter()
        .find(|l| l.starts_with("joined:"))
        .cloned()
        .unwrap_or_default();
    println!(
        "join: {joined} (ready after {:.1} s)",
        start.elapsed().as_secs_f64()
    );

    // Idle: heartbeats only.
    std::thread::sleep(Duration::from_secs(3));
    let hz = 100.0; // USER_HZ
    let (t0, _) = proc_usage(pid)?;
    let s0 = sim.stats()?;
    let idle = Duration::from_secs(10);
    std::thread::sleep(idle);
    let (t1, rss1) = proc_usage(pid)?;
    let s1 = sim.stats()?;
    let per_s = |k: &str| {
        (s1.get(k).copied().unwrap_or(0) - s0.get(k).copied().unwrap_or(0)) as f64
            / idle.as_secs_f64()
    };
    println!(
        "leader ({lname}) idle: CPU {:.0}% of one core, RSS {} ({:.0} bytes per node over the empty cluster)",
        (t1 - t0) as f64 / hz / idle.as_secs_f64() * 100.0,
        mb(rss1 as f64),
        rss1.saturating_sub(rss0) as f64 / n as f64
    );
    println!(
        "traffic idle: {:.0} heartbeats/s, heartbeat {}/s, views {}/s",
        per_s("heartbeats"),
        mb(per_s("heartbeat_bytes")),
        mb(per_s("view_bytes"))
    );

    // A network and a global service: one task per node, all acknowledged.
    let t = Instant::now();
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.64.0.0/12",
            "scale",
        ],
    )?;
    let (code, _, err) = common::mesh(
        &lab,
        "node1",
        &[
            "service",
            "create",
            "--name",
            "g",
            "--mode",
            "global",
            "--network",
            "scale",
            "--",
            "sleep",
            "86400",
        ],
    )?;
    if code == 0 {
        println!(
            "network create + global service ({} tasks) → every node acknowledged: {:.2} s",
            n + 4,
            t.elapsed().as_secs_f64()
        );
    } else {
        println!("global service: did not converge: {}", err.trim());
    }

    // A big replicated service, detached, then watched.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "-d",
            "--name",
            "r",
            "--replicas",
            &tasks.to_string(),
            "--network",
            "scale",
            "--",
            "sleep",
            "86400",
        ],
    )?;
    match wait_service(&lab, "r", Duration::from_secs(600), |st| {
        st.converged && st.tasks.iter().filter(|t| t.state == "running").count() == tasks
    }) {
        Ok(d) => println!(
            "replicated service of {tasks} tasks → all running and acknowledged: {:.2} s",
            d.as_secs_f64()
        ),
        Err(e) => println!("replicated service of {tasks} tasks: {e}"),
    }
    let stats = sim.stats()?;
    println!(
        "simulated nodes hold {} tasks; {} of views received in all",
        stats.get("tasks").copied().unwrap_or(0),
        mb(stats.get("view_bytes").copied().unwrap_or(0) as f64)
    );

    // 10% of the nodes die.
    let k = n / 10;
    let t = Instant::now();
    let killed = sim.kill(k)?;
    let down = common::wait_for("silenced nodes down", Duration::from_secs(300), || {
        let nodes = node_ls(&lab, "node1").ok()?;
        let down = nodes
            .iter()
            .filter(|x| {
                x["Status"] == "Down" && x["ID"].as_str().is_some_and(|id| killed.contains(id))
            })
            .count();
        (down == k).then_some(())
    });
    match down {
        Ok((_, d)) => println!(
            "{k} nodes silenced → all seen down: {:.2} s",
            d.as_secs_f64()
        ),
        Err(e) => println!("{k} nodes silenced → {e}"),
    }
    match wait_service(&lab, "r", Duration::from_secs(600), |st| {
        let live: Vec<_> = st
            .tasks
            .iter()
            .filter(|x| x.desired_state == "running" && x.state == "running")
            .collect();
        live.len() == tasks && !live.iter().any(|x| killed.contains(&x.node_id))
    }) {
        Ok(_) => println!(
            "→ their tasks running elsewhere: {:.2} s after the kill",
            t.elapsed().as_secs_f64()
        ),
        Err(e) => println!("→ their tasks running elsewhere: {e}"),
    }

    // The state's size on disk, and a new manager restoring it.
    let state = dir_size(&lab.node(&lname)?.state_dir);
    println!(
        "leader's state dir (Raft log, snapshot, keys): {}",
        mb(state as f64)
    );
    lab.mesh_ok("node1", &["node", "promote", "node4"])?;
    let restored = common::wait_for("node4 Reachable", Duration::from_secs(300), || {
        let nodes = node_ls(&lab, "node1").ok()?;
        nodes
            .iter()
            .any(|x| x["Hostname"] == "node4" && x["ManagerStatus"] == "Reachable")
            .then_some(())
    });
    match restored {
        Ok((_, d)) => println!(
            "node4 promoted → a Reachable manager with the state: {:.2} s",
            d.as_secs_f64()
        ),
        Err(e) => println!("node4 promoted → {e}"),
    }
    let left = sim.stop(Duration::from_secs(600));
    if let Err(e) = left {
        println!("simulator stop: {e}");
    }
    lab.down()?;
    Ok(())
}

fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("run as root (it builds labs of network namespaces)");
    }
    let sizes: Vec<usize> = std::env::var("MESH_SCALE_NODES")
        .unwrap_or_else(|_| "1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let tasks: usize = std::env::var("MESH_SCALE_TASKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    for n in sizes {
        if let Err(e) = run(n, tasks) {
            println!("{n} nodes: stopped: {e:#}");
        }
    }
    Ok(())
}
