//! Overlay data-path benchmark on a 3-node lab. Prints, in one run:
//! iperf3 TCP throughput (1 and 2 streams) and ping latency between sandboxes
//! on two nodes over the VXLAN overlay, and between the same two nodes over
//! the plain underlay, with their ratios (medians of several runs).
//!
//! Run: `cargo bench --bench overlay` (as root; needs iperf3 and ping).

use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_lab::{Lab, UpSpec};

const RUNS: usize = 5;
const SECONDS: &str = "3";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn iperf_bps(json: &[u8]) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no throughput in iperf3 output: {}",
                String::from_utf8_lossy(json)
            )
        })
}

fn ping_avg_ms(out: &[u8]) -> anyhow::Result<f64> {
    let s = String::from_utf8_lossy(out);
    let line = s
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| anyhow::anyhow!("no ping summary: {s}"))?;
    let nums = line.split('=').nth(1).unwrap_or_default().trim();
    Ok(nums.split('/').nth(1).unwrap_or_default().parse()?)
}

fn main() -> anyhow::Result<()> {
    let name = format!("bo{}", std::process::id() % 100_000);
    let _ = mesh_lab::cleanup_stale(&name);
    let lab = Lab::up(
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
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "srv",
            "--network",
            "bench",
            "--",
            "iperf3",
            "-s",
        ],
    )?;
    lab.mesh_ok(
        "node3",
        &[
            "run",
            "-d",
            "--name",
            "cli",
            "--network",
            "bench",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let ps = lab.mesh_ok("node2", &["ps", "--format", "json"])?;
    let srv_ip = ps
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|s| s["Names"] == "srv")
        .and_then(|s| s["IPs"].as_str().map(String::from))
        .ok_or_else(|| anyhow::anyhow!("no srv sandbox"))?;
    let node2_ip = lab.node("node2")?.ip.to_string();
    // The underlay reference: iperf3 in node2's own namespace.
    let mut under_srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node("node2")?.netns,
            "iperf3",
            "-s",
            "-p",
            "5202",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let node3 = lab.node("node3")?.netns.clone();
    let underlay = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let out = Command::new("ip")
            .args(["netns", "exec", &node3])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    };
    let overlay = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let mut full = vec!["exec", "cli", "--"];
        full.extend_from_slice(args);
        let out = lab.mesh("node3", &full)?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    };
    // Warm up ARP/FDB paths.
    overlay(&["ping", "-c", "2", "-W", "1", &srv_ip])?;
    for streams in ["1", "2"] {
        let (mut o, mut u) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            o.push(iperf_bps(&overlay(&[
                "iperf3", "-c", &srv_ip, "-t", SECONDS, "-P", streams, "-J",
            ])?)?);
            u.push(iperf_bps(&underlay(&[
                "iperf3", "-c", &node2_ip, "-p", "5202", "-t", SECONDS, "-P", streams, "-J",
            ])?)?);
        }
        let (o, u) = (median(o), median(u));
        println!(
            "TCP, {streams} stream(s), median of {RUNS}: overlay {:.2} Gbit/s, underlay {:.2} Gbit/s, ratio {:.2}",
            o / 1e9,
            u / 1e9,
            o / u
        );
    }
    let (mut o, mut u) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        o.push(ping_avg_ms(&overlay(&[
            "ping", "-c", "50", "-i", "0.01", "-q", &srv_ip,
        ])?)?);
        u.push(ping_avg_ms(&underlay(&[
            "ping", "-c", "50", "-i", "0.01", "-q", &node2_ip,
        ])?)?);
    }
    let (o, u) = (median(o), median(u));
    println!(
        "ping RTT, median of {RUNS}x50: overlay {o:.3} ms, underlay {u:.3} ms, ratio {:.2}",
        o / u
    );
    let _ = under_srv.kill();
    let _ = under_srv.wait();
    lab.down()?;
    Ok(())
}
