//! Ingress benchmark on a 3-node lab with an outside host. Prints, in one run,
//! from host1: requests per second with a new TCP connection each (connect,
//! GET, read the reply, close), and p50/p99 connect time, two ways:
//! - mesh: to node3's address on the ingress port; node3 runs no task, so
//!   every connection crosses the routing mesh and the ingress overlay;
//! - direct: to the task nodes' addresses on a host-mode port of the same
//!   tasks. Host mode DNATs straight to the task on its own node: no overlay
//!   hop and no other node, which is as direct as an outside client can get
//!   (the task addresses themselves are on the ingress overlay, which the
//!   underlay does not route to, and adding a route would change the path
//!   under test).
//!
//! Same tasks, same server, same client, same run; the ratio is what counts.
//! The client runs in this process: worker threads `setns` into host1's
//! network namespace and use std::net, so Python does not time the client.
//!
//! Run: `cargo bench --bench ingress` (as root; needs python3).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_lab::{Lab, UpSpec};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{status, wait_for};

/// Tasks of the service: one on node1 and one on node2 (node3 is excluded).
const REPLICAS: usize = 2;
/// Server processes per task (SO_REUSEPORT), so the server is not the limit.
const SERVER_PROCS: &str = "2";
/// Client threads, each one connection at a time.
const CLIENTS: usize = 4;
/// How long each way is measured.
const MEASURE: Duration = Duration::from_secs(5);
const INGRESS_PORT: u16 = 8080;
const HOST_PORT: u16 = 8081;

const SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ingress_server.py"
);

/// What one way measured.
struct Figures {
    ok: usize,
    failed: usize,
    secs: f64,
    /// Connect times of the successful requests, sorted.
    connect: Vec<Duration>,
}

impl Figures {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn pct(&self, p: f64) -> Duration {
        if self.connect.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.connect.len() as f64 - 1.0) * p).round() as usize;
        self.connect[i]
    }
}

/// Enters `netns` (a named namespace) with this thread only.
fn enter(netns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {netns}"))?;
    Ok(())
}

/// One request on a new connection: its connect time.
fn request(to: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    let connect = start.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::with_capacity(256);
    s.read_to_end(&mut buf)?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 reply"));
    }
    Ok(connect)
}

/// `CLIENTS` threads in `netns`, cycling over `targets` for `MEASURE`.
fn measure(netns: &str, targets: &[SocketAddr]) -> Result<Figures> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (netns, targets, stop) = (netns.to_string(), targets.to_vec(), stop.clone());
            std::thread::spawn(move || -> Result<(usize, Vec<Duration>)> {
                enter(&netns)?;
                let (mut failed, mut times) = (0, Vec::new());
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    match request(targets[i % targets.len()]) {
                        Ok(t) => times.push(t),
                        Err(_) => failed += 1,
                    }
                    i += 1;
                }
                Ok((failed, times))
            })
        })
        .collect();
    std::thread::sleep(MEASURE);
    stop.store(true, Ordering::Relaxed);
    let mut f = Figures {
        ok: 0,
        failed: 0,
        secs: 0.0,
        connect: Vec::new(),
    };
    for h in handles {
        let (failed, times) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        f.failed += failed;
        f.ok += times.len();
        f.connect.extend(times);
    }
    f.secs = start.elapsed().as_secs_f64();
    f.connect.sort();
    Ok(f)
}

/// Waits until every target answers from host1.
fn answering(netns: &str, targets: &[SocketAddr]) -> Result<()> {
    for &t in targets {
        let netns = netns.to_string();
        let ok = std::thread::spawn(move || -> Result<bool> {
            enter(&netns)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if request(t).is_ok() {
                    return Ok(true);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(false)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
        ensure!(ok, "{t} did not answer from host1 within 30 s");
    }
    Ok(())
}

fn main() -> Result<()> {
    let name = format!("bi{}", std::process::id() % 100_000);
    let _ = mesh_lab::cleanup_stale(&name);
    let mut spec = UpSpec::new(&name, 3, 1);
    spec.hosts = 1;
    // Dropping `lab` (also on an early return) tears it down.
    let lab = Lab::up(&spec, std::path::Path::new(env!("CARGO_BIN_EXE_mesh")))?;
    let replicas = REPLICAS.to_string();
    let ingress = format!("{INGRESS_PORT}:80");
    let host = format!("published={HOST_PORT},target=80,mode=host");
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            &replicas,
            "--constraint",
            "node.hostname!=node3",
            "-p",
            &ingress,
            "--publish",
            &host,
            "--",
            "python3",
            SERVER,
            "80",
            "tcp",
            SERVER_PROCS,
        ],
    )?;
    let (nodes, _) = wait_for("web's tasks running", Duration::from_secs(60), || {
        let st = status(&lab, "node1", "web").ok()?;
        let nodes: Vec<String> = st
            .tasks
            .iter()
            .filter(|t| t.desired_state == "running" && t.state == "running")
            .map(|t| t.node.clone())
            .collect();
        (st.converged && nodes.len() == REPLICAS).then_some(nodes)
    })?;
    if nodes.iter().any(|n| n == "node3") {
        bail!("node3 runs a task of web despite the constraint: {nodes:?}");
    }
    let addr = |node: &str, port: u16| -> Result<SocketAddr> {
        Ok(SocketAddr::new(lab.node(node)?.ip.into(), port))
    };
    let through_mesh = vec![addr("node3", INGRESS_PORT)?];
    let direct = nodes
        .iter()
        .map(|n| addr(n.as_str(), HOST_PORT))
        .collect::<Result<Vec<_>>>()?;
    let netns = lab.host("host1")?.netns.clone();
    answering(&netns, &through_mesh)?;
    answering(&netns, &direct)?;

    // Warm up both paths (ARP, conntrack, Python), then measure each way.
    let _ = measure(&netns, &through_mesh)?;
    let _ = measure(&netns, &direct)?;
    let mesh = measure(&netns, &through_mesh)?;
    let dir = measure(&netns, &direct)?;

    println!(
        "ingress: {CLIENTS} client threads on host1, a new TCP connection per request, {}s each way, {REPLICAS} tasks x {SERVER_PROCS} server processes",
        MEASURE.as_secs()
    );
    println!(
        "{:<34} {:>10} {:>8} {:>12} {:>12}",
        "path", "req/s", "failed", "connect p50", "connect p99"
    );
    let row = |label: &str, f: &Figures| {
        println!(
            "{:<34} {:>10.0} {:>8} {:>12.3?} {:>12.3?}",
            label,
            f.rps(),
            f.failed,
            f.pct(0.50),
            f.pct(0.99)
        );
    };
    row("routing mesh via node3 (no task)", &mesh);
    row("direct (host mode on task nodes)", &dir);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "ratio mesh/direct: req/s {:.2}, connect p50 {:.2}, connect p99 {:.2}",
        ratio(mesh.rps(), dir.rps()),
        ratio(mesh.pct(0.50).as_secs_f64(), dir.pct(0.50).as_secs_f64()),
        ratio(mesh.pct(0.99).as_secs_f64(), dir.pct(0.99).as_secs_f64()),
    );
    ensure!(
        mesh.ok > 0 && dir.ok > 0,
        "a path answered nothing (mesh {} ok, direct {} ok)",
        mesh.ok,
        dir.ok
    );
    lab.down()?;
    Ok(())
}
