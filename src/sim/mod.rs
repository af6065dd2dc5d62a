//! `mesh lab sim LAB --nodes N`: N simulated nodes joined to the real
//! managers of a lab, for measuring the control plane at a scale no lab of
//! namespaces reaches. Each node joins for real (token proof, its own key
//! and CSR), then keeps one TLS connection from its own address carrying
//! its heartbeats, its Assignments stream (applied in memory by the
//! worker's own code, the digest reported back) and its task reports.
//!
//! Lines on stdin drive it: `kill K` makes K live nodes fall silent at
//! once (their addresses dropped both ways, as a machine losing power),
//! `stats` prints the counters. Interrupted (SIGINT/SIGTERM), the nodes
//! stop and are removed from the cluster, and the namespace goes.

mod node;
mod stats;

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use mesh_common::token;
use mesh_lab::{CLUSTER_PORT, Lab, Role, SimNet};
use mesh_proto::{JoinTokenRequest, NodeRemoveRequest};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use node::{Cluster, SimNode};
use stats::Stats;

/// How many times one node's join is tried before the run gives up.
const JOIN_TRIES: usize = 5;
/// How long joined nodes may take to get their first heartbeat answered.
const READY_WITHIN: Duration = Duration::from_secs(120);

pub struct SimArgs {
    pub lab: String,
    pub nodes: usize,
    pub join_concurrency: usize,
}

/// Runs the simulator to its end: sets up its namespace from here, then
/// enters it with the whole process before the runtime starts.
pub fn main(args: SimArgs) -> Result<ExitCode> {
    if args.nodes == 0 || mesh_lab::sim_node_ip(args.nodes - 1).is_none() {
        bail!(
            "--nodes must be between 1 and {} (the simulated nodes' address range, {}/{})",
            (1usize << (32 - mesh_lab::SIM_RANGE.1)) - 2,
            mesh_lab::SIM_RANGE.0,
            mesh_lab::SIM_RANGE.1
        );
    }
    if args.join_concurrency == 0 {
        bail!("--join-concurrency must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let lab = Lab::open(&args.lab, &exe)?;
    let managers: Vec<_> = lab
        .nodes
        .iter()
        .filter(|n| n.role == Role::Manager)
        .collect();
    let Some(first) = managers.first() else {
        bail!("lab {} has no manager", lab.name);
    };
    let socket = format!("unix://{}", first.socket.display());
    let addrs: Vec<String> = managers
        .iter()
        .map(|n| format!("{}:{CLUSTER_PORT}", n.ip))
        .collect();
    let net = lab.sim_net_up()?;
    let _net_guard = NetGuard(net.clone());
    let ns = std::fs::File::open(format!("/run/netns/{}", net.netns))
        .with_context(|| format!("opening namespace {}", net.netns))?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering namespace {}", net.netns))?;
    println!(
        "simulating {} nodes in namespace {} (addresses from {}), managers {}",
        args.nodes,
        net.netns,
        mesh_lab::SIM_RANGE.0,
        addrs.join(", ")
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(simulate(args, addrs, socket, net));
    // The stdin reader is a blocking read no runtime can cancel: waiting
    // for it would keep an interrupted simulator alive until its input ends.
    rt.shutdown_background();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Removes the simulator's namespace and routes however the run ends.
struct NetGuard(SimNet);

impl Drop for NetGuard {
    fn drop(&mut self) {
        self.0.down();
    }
}

/// A simulated node while it runs.
struct Running {
    id: String,
    ip: Ipv4Addr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn simulate(args: SimArgs, managers: Vec<String>, socket: String, net: SimNet) -> Result<()> {
    let mut control = crate::client::connect(&socket).await?;
    let token = control
        .join_token(JoinTokenRequest {
            role: "worker".into(),
            rotate: false,
        })
        .await
        .map_err(crate::client::status)?
        .into_inner()
        .token;
    let token = token::parse(&token)?;
    let stats = Arc::new(Stats::default());
    let ca_pem = mesh_worker::join::fetch_ca(&managers[0], &token).await?;
    let cluster = Arc::new(Cluster {
        managers,
        ca_pem,
        token,
        stats: stats.clone(),
    });
    let started = Instant::now();
    let mut running: Vec<Running> = Vec::with_capacity(args.nodes);
    let joined = join_all(&cluster, args.nodes, args.join_concurrency, &mut running).await;
    if let Err(e) = joined {
        leave(&socket, running).await;
        return Err(e);
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "joined: {} nodes in {took:.2} s ({:.0} joins/s)",
        args.nodes,
        args.nodes as f64 / took
    );
    let deadline = Instant::now() + READY_WITHIN;
    while (stats.beating.load(std::sync::atomic::Ordering::Relaxed) as usize) < args.nodes {
        if Instant::now() >= deadline {
            let beating = stats.beating.load(std::sync::atomic::Ordering::Relaxed);
            leave(&socket, running).await;
            bail!(
                "only {beating} of {} simulated nodes had a heartbeat answered within {} s",
                args.nodes,
                READY_WITHIN.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "ready: {} nodes heartbeating {took:.2} s after the first join",
        args.nodes
    );
    println!("{}", stats.line(running.len(), alive(&running)));
    drive(&net, &stats, &mut running).await;
    println!("stopping: {}", stats.line(running.len(), alive(&running)));
    leave(&socket, running).await;
    Ok(())
}

/// Joins `n` nodes, `concurrency` at a time, starting each session as soon
/// as its node is in; progress once a second.
async fn join_all(
    cluster: &Arc<Cluster>,
    n: usize,
    concurrency: usize,
    running: &mut Vec<Running>,
) -> Result<()> {
    let started = Instant::now();
    let mut last = Instant::now();
    let mut joins = futures::stream::iter(0..n)
        .map(|i| {
            let cluster = cluster.clone();
            async move {
                let ip = mesh_lab::sim_node_ip(i).ok_or_else(|| anyhow!("no address for {i}"))?;
                let mut tries = 0;
                loop {
                    tries += 1;
                    match SimNode::join(&cluster, i, ip).await {
                        Ok(node) => return Ok(node),
                        Err(e) if tries >= JOIN_TRIES => return Err(e),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200 * tries as u64)).await
                        }
                    }
                }
            }
        })
        .buffer_unordered(concurrency);
    while let Some(joined) = joins.next().await {
        let node: SimNode = joined?;
        let (stop, stopped) = watch::channel(false);
        let (id, ip) = (node.id.clone(), node.ip);
        let task = tokio::spawn(node.run(cluster.clone(), stopped));
        running.push(Running { id, ip, stop, task });
        if last.elapsed() >= Duration::from_secs(1) || running.len() == n {
            last = Instant::now();
            let rate = running.len() as f64 / started.elapsed().as_secs_f64();
            println!("joining: {}/{n} ({rate:.0} joins/s)", running.len());
        }
    }
    Ok(())
}

fn alive(running: &[Running]) -> usize {
    running.iter().filter(|r| !*r.stop.borrow()).count()
}

/// Follows commands on stdin until SIGINT or SIGTERM.
async fn drive(net: &SimNet, stats: &Stats, running: &mut [Running]) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot watch SIGTERM: {e}");
            return;
        }
    };
    loop {
        let line = tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            l = lines.next_line(), if stdin_open => l,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => {
                stdin_open = false;
                continue;
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["stats"] => println!("{}", stats.line(running.len(), alive(running))),
            ["kill", k] => match k.parse::<usize>() {
                Ok(k) => kill(net, running, k).await,
                Err(_) => eprintln!("kill: {k:?} is not a number of nodes"),
            },
            [] => {}
            _ => eprintln!("unknown command {line:?}: use `kill K` or `stats`"),
        }
    }
}

/// Silences the last `k` live nodes: their packets are dropped first, so
/// nothing (not even a FIN) reaches the managers, then their sessions end.
async fn kill(net: &SimNet, running: &mut [Running], k: usize) {
    let victims: Vec<usize> = (0..running.len())
        .rev()
        .filter(|&i| !*running[i].stop.borrow())
        .take(k)
        .collect();
    let addrs: Vec<Ipv4Addr> = victims.iter().map(|&i| running[i].ip).collect();
    let net = net.clone();
    match tokio::task::spawn_blocking(move || net.kill(&addrs)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("kill: {e}");
            return;
        }
        Err(e) => {
            eprintln!("kill: {e}");
            return;
        }
    }
    let mut ids = Vec::new();
    for &i in &victims {
        let _ = running[i].stop.send(true);
        ids.push(running[i].id.clone());
    }
    println!("killed {}: {}", ids.len(), ids.join(" "));
}

/// Stops every node and removes them all from the cluster, as `mesh node
/// rm --force` would, so the lab is as it was.
async fn leave(socket: &str, running: Vec<Running>) {
    for r in &running {
        let _ = r.stop.send(true);
    }
    let started = Instant::now();
    let mut ids = Vec::with_capacity(running.len());
    for r in running {
        let _ = r.task.await;
        ids.push(r.id);
    }
    println!(
        "stopped: {} sessions ended in {:.2} s; removing them from the cluster",
        ids.len(),
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let control = match crate::client::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot remove the simulated nodes: {e}");
            return;
        }
    };
    let total = ids.len();
    let failed: Vec<String> = futures::stream::iter(ids)
        .map(|id| {
            let mut control = control.clone();
            async move {
                let r = control
                    .node_remove(NodeRemoveRequest {
                        node: id.clone(),
                        force: true,
                    })
                    .await;
                r.err().map(|s| format!("{id}: {}", s.message()))
            }
        })
        .buffer_unordered(16)
        .filter_map(|r| async move { r })
        .collect()
        .await;
    if let Some(first) = failed.first() {
        eprintln!(
            "left: {} of {total} simulated nodes could not be removed (first: {first})",
            failed.len()
        );
    } else {
        println!(
            "left: {total} simulated nodes removed from the cluster in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
}
