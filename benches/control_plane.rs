//! Control-plane benchmark on a lab of 3 managers + 2 workers. Prints:
//! - time from `lab up` to every node Ready;
//! - committed writes per second and p50/p99 latency of 1,000 sequential
//!   node-label updates through the control API, sent to the leader and to a
//!   follower (which forwards to the leader);
//! - network creates: p50/p99 latency of 1,000 sequential creates through
//!   a follower, and creates per second with 24 concurrent clients spread
//!   over the three managers;
//! - leader failover: kill -9 of the leader → first write accepted, and →
//!   the dead leader shown Down.
//!
//! Run: `cargo bench --bench control_plane` (as root). Figures, not
//! assertions: compare runs on the same machine.

use std::time::{Duration, Instant};

use mesh_lab::{Lab, UpSpec};
use mesh_proto::NodeUpdateRequest;
use mesh_proto::control_client::ControlClient;

const WRITES: usize = 1000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn client(lab: &Lab, node: &str) -> anyhow::Result<ControlClient<tonic::transport::Channel>> {
    let ch = mesh_common::transport::unix_channel(&lab.node(node)?.socket).await?;
    Ok(ControlClient::new(ch))
}

async fn writes(lab: &Lab, via: &str, target: &str) -> anyhow::Result<(f64, Duration, Duration)> {
    let mut c = client(lab, via).await?;
    let mut lat = Vec::with_capacity(WRITES);
    let start = Instant::now();
    for i in 0..WRITES {
        let t = Instant::now();
        c.node_update(NodeUpdateRequest {
            node: target.into(),
            label_add: [("bench".to_string(), i.to_string())].into(),
            ..Default::default()
        })
        .await?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    Ok((
        WRITES as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
}

fn create_req(name: String) -> mesh_proto::NetworkCreateRequest {
    mesh_proto::NetworkCreateRequest {
        name,
        driver: "overlay".into(),
        ..Default::default()
    }
}

async fn network_creates(lab: &Lab, via: &str) -> anyhow::Result<(f64, Duration, Duration)> {
    let mut c = client(lab, via).await?;
    let mut lat = Vec::with_capacity(WRITES);
    let start = Instant::now();
    for i in 0..WRITES {
        let t = Instant::now();
        c.network_create(create_req(format!("seq{i}"))).await?;
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    Ok((
        WRITES as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
}

async fn concurrent_creates(lab: &Lab) -> anyhow::Result<(f64, Duration, Duration)> {
    let mut clients = Vec::new();
    for n in ["node1", "node2", "node3"] {
        clients.push(client(lab, n).await?);
    }
    let streams = 24;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..streams {
        let mut c = clients[k % clients.len()].clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            for i in (k..WRITES).step_by(streams) {
                let t = Instant::now();
                c.network_create(create_req(format!("con{i}"))).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut lat = Vec::with_capacity(WRITES);
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let total = start.elapsed();
    lat.sort();
    Ok((
        WRITES as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    ))
}

fn leader(lab: &Lab, via: &str) -> Option<String> {
    let out = lab.mesh_ok(via, &["node", "ls", "--format", "json"]).ok()?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|n| n["ManagerStatus"] == "Leader")
        .and_then(|n| n["Hostname"].as_str().map(String::from))
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let name = format!("bc{}", std::process::id() % 100_000);
    let _ = mesh_lab::cleanup_stale(&name);
    let t = Instant::now();
    let mut lab = Lab::up(
        &UpSpec::new(&name, 5, 3),
        std::path::Path::new(env!("CARGO_BIN_EXE_mesh")),
    )?;
    let up = t.elapsed();
    println!(
        "lab up (5 nodes, 3 managers) -> all Ready: {:.2} s",
        up.as_secs_f64()
    );

    let lead = leader(&lab, "node1").ok_or_else(|| anyhow::anyhow!("no leader"))?;
    let follower = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != lead)
        .unwrap_or("node2");
    let rt = tokio::runtime::Runtime::new()?;
    for (label, via) in [("leader", lead.as_str()), ("follower", follower)] {
        let (rate, p50, p99) = rt.block_on(writes(&lab, via, "node4"))?;
        println!(
            "{WRITES} sequential writes via {label} ({via}): {rate:.0} writes/s, p50 {:.2} ms, p99 {:.2} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    let (rate, p50, p99) = rt.block_on(network_creates(&lab, follower))?;
    println!(
        "{WRITES} sequential network creates via follower: {rate:.0} creates/s, p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    let (rate, p50, p99) = rt.block_on(concurrent_creates(&lab))?;
    println!(
        "{WRITES} network creates from 24 concurrent clients over 3 managers: {rate:.0} creates/s, p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );

    lab.kill(&lead)?;
    let t = Instant::now();
    let other = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != lead)
        .unwrap_or("node2");
    let write_after = loop {
        let ok = lab
            .mesh(other, &["node", "update", "--label-add", "f=1", "node5"])
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("no write accepted within 30 s of killing the leader");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let down_after = loop {
        let out = lab
            .mesh_ok(other, &["node", "ls", "--format", "json"])
            .unwrap_or_default();
        let down = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|n| n["Hostname"] == lead.as_str() && n["Status"] == "Down");
        if down {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("dead leader not shown Down within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "kill -9 of the leader: write accepted after {:.2} s, leader shown Down after {:.2} s",
        write_after.as_secs_f64(),
        down_after.as_secs_f64()
    );
    let t = Instant::now();
    lab.kill("node5")?;
    loop {
        let out = lab
            .mesh_ok(other, &["node", "ls", "--format", "json"])
            .unwrap_or_default();
        if out
            .lines()
            .any(|l| l.contains("\"node5\"") && l.contains("\"Down\""))
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("dead worker not shown Down within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "kill -9 of a worker: shown Down after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    lab.down()?;
    Ok(())
}
