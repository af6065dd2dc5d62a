//! Service benchmark on a 3-node lab. Prints, in one run:
//! - convergence: `service create --replicas 30` until all 30 tasks answer
//!   through the VIP from a sandbox (p50 over several runs), and how long
//!   `create` itself took to report convergence;
//! - recovery: a worker killed (daemon and link) until its tasks run
//!   elsewhere and every node has applied it;
//! - VIP-balanced HTTP request rate vs the same client spreading requests
//!   over the task IPs itself, as a ratio (same run, same tasks).
//!
//! Run: `cargo bench --bench services` (as root; needs python3).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::{Lab, UpSpec};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{HTTP_SERVER, status};

const RUNS: usize = 3;
const REPLICAS: usize = 30;

/// Asks URL host until `want` distinct task names answered; prints them.
const UNTIL_ALL: &str = "import http.client,sys,time
host,want=sys.argv[1],int(sys.argv[2]);seen=set();end=time.time()+120
while len(seen)<want and time.time()<end:
    try:
        h=http.client.HTTPConnection(host,8080,timeout=2);h.request('GET','/');seen.add(h.getresponse().read().decode());h.close()
    except Exception:
        time.sleep(0.01)
print(len(seen))";

/// Requests per second over `secs` from 4 threads, a new connection each,
/// cycling over the comma-separated targets.
const RATE: &str = "import http.client,sys,time,threading
targets=sys.argv[1].split(',');dur=float(sys.argv[2]);n=[0];lock=threading.Lock()
def w(k):
    c=0;i=k;end=time.time()+dur
    while time.time()<end:
        h=http.client.HTTPConnection(targets[i%len(targets)],8080,timeout=3);h.request('GET','/');h.getresponse().read();h.close();c+=1;i+=1
    with lock:
        n[0]+=c
ts=[threading.Thread(target=w,args=(k,)) for k in range(4)]
[t.start() for t in ts];[t.join() for t in ts]
print(n[0]/dur)";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn py(lab: &Lab, script: &str, args: &[&str]) -> Result<String> {
    let mut argv = vec!["exec", "client", "--", "python3", "-c", script];
    argv.extend_from_slice(args);
    Ok(lab.mesh_ok("node1", &argv)?.trim().to_string())
}

fn main() -> Result<()> {
    let name = format!("bs{}", std::process::id() % 100_000);
    let _ = mesh_lab::cleanup_stale(&name);
    let mut lab = Lab::up(
        &UpSpec::new(&name, 3, 1),
        std::path::Path::new(env!("CARGO_BIN_EXE_mesh")),
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "bench",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "bench",
            "--",
            "sleep",
            "86400",
        ],
    )?;
    let replicas = REPLICAS.to_string();

    let mut converge = Vec::new();
    let mut create_returned = Vec::new();
    for run in 0..RUNS {
        let svc = format!("s{run}");
        let start = Instant::now();
        lab.mesh_ok(
            "node1",
            &[
                "service",
                "create",
                "--name",
                &svc,
                "--replicas",
                &replicas,
                "--network",
                "bench",
                "--",
                "python3",
                "-c",
                HTTP_SERVER,
            ],
        )?;
        create_returned.push(start.elapsed().as_secs_f64());
        let seen = py(&lab, UNTIL_ALL, &[&svc, &replicas])?;
        let took = start.elapsed().as_secs_f64();
        if seen != replicas {
            bail!("only {seen} of {REPLICAS} tasks answered through the VIP of {svc}");
        }
        converge.push(took);
        eprintln!(
            "run {run}: create returned {:.2} s, all {REPLICAS} answering {took:.2} s",
            create_returned[run]
        );
        if run + 1 < RUNS {
            lab.mesh_ok("node1", &["service", "rm", &svc])?;
        }
    }
    let svc = format!("s{}", RUNS - 1);

    // Request rate: through the VIP vs the client cycling over task IPs.
    let st = status(&lab, "node1", &svc)?;
    let vip = st
        .service
        .as_ref()
        .and_then(|s| s.vips.first())
        .map(|v| v.addr.split('/').next().unwrap_or_default().to_string())
        .context("no VIP")?;
    let ips: Vec<String> = st
        .tasks
        .iter()
        .filter(|t| t.state == "running")
        .filter_map(|t| t.addresses.first())
        .map(|a| a.split('=').nth(1).unwrap_or_default().to_string())
        .collect();
    let mut vip_rate = Vec::new();
    let mut direct_rate = Vec::new();
    for _ in 0..RUNS {
        vip_rate.push(py(&lab, RATE, &[&vip, "3"])?.parse::<f64>()?);
        direct_rate.push(py(&lab, RATE, &[&ips.join(","), "3"])?.parse::<f64>()?);
    }

    // Recovery: node3 dies.
    let on3: BTreeSet<String> = st
        .tasks
        .iter()
        .filter(|t| t.node == "node3" && t.state == "running")
        .map(|t| t.id.clone())
        .collect();
    let start = Instant::now();
    lab.kill("node3")?;
    lab.cut("node3")?;
    let recovered = loop {
        let st = status(&lab, "node1", &svc)?;
        let ok = st
            .tasks
            .iter()
            .filter(|t| t.desired_state == "running" && t.state == "running" && t.node != "node3")
            .count()
            == REPLICAS
            && st.converged;
        if ok {
            break start.elapsed().as_secs_f64();
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "node3's {} tasks were not rescheduled within 60 s",
                on3.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    println!("services benchmark, 3-node lab, {REPLICAS} replicas, {RUNS} runs");
    println!(
        "convergence (create -> all {REPLICAS} answer via VIP from another node): p50 {:.2} s (runs {:?})",
        median(converge.clone()),
        converge
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
    );
    println!(
        "  `service create` returned (every node applied, all running): p50 {:.2} s",
        median(create_returned)
    );
    println!(
        "node death -> its {} tasks running elsewhere, all nodes applied: {recovered:.2} s",
        on3.len()
    );
    let (v, d) = (median(vip_rate), median(direct_rate));
    println!(
        "HTTP requests/s (new connection each): via VIP {v:.0}, client-side over task IPs {d:.0}, ratio {:.2}",
        v / d
    );
    lab.down()?;
    Ok(())
}
