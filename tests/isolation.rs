//! End-to-end isolation: a sandbox on one overlay can neither reach nor
//! resolve anything on another, on its own node or across nodes; and a
//! sandbox flooding the embedded DNS server does not starve another
//! sandbox on the same node.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_lab::Lab;

fn vip_of(st: &mesh_proto::ServiceStatusReply, network: &str) -> Result<String> {
    let s = st.service.as_ref().context("no service in status")?;
    let v = s
        .vips
        .iter()
        .find(|v| v.network == network)
        .with_context(|| format!("no VIP on {network}"))?;
    Ok(v.addr.split('/').next().unwrap_or_default().to_string())
}

/// Whether `sh -c script` in a sandbox exits 0.
fn sh_ok(lab: &Lab, node: &str, sandbox: &str, script: &str) -> Result<bool> {
    Ok(lab
        .mesh(node, &["exec", sandbox, "--", "sh", "-c", script])?
        .status
        .success())
}

/// Running tasks of a service: (node, address on `network`).
fn task_addrs(lab: &Lab, service: &str) -> Result<Vec<(String, String)>> {
    let st = status(lab, "node1", service)?;
    Ok(st
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running" && t.state == "running")
        .flat_map(|t| {
            t.addresses
                .iter()
                .map(|a| {
                    let ip = a.rsplit('=').next().unwrap_or(a);
                    (
                        t.node.clone(),
                        ip.split('/').next().unwrap_or("").to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect())
}

fn service(lab: &Lab, name: &str, network: &str, replicas: &str) -> Result<()> {
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--network",
            network,
            "--",
            "python3",
            "-c",
            HTTP_SERVER,
        ],
    )?;
    Ok(())
}

fn sandbox(lab: &Lab, node: &str, name: &str, network: &str) -> Result<()> {
    lab.mesh_ok(
        node,
        &[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "--",
            "sleep",
            "3600",
        ],
    )?;
    Ok(())
}

/// Two overlays on three nodes: B's tasks on every node, a sandbox on A
/// and one on B (the control) on node1. From A nothing of B answers or
/// resolves — the task on A's own node, those across nodes, B's VIP and
/// B's sandbox — while the same from B works, and A's own service works
/// from A.
#[test]
fn a_network_cannot_reach_or_resolve_another() -> Result<()> {
    let lab = up("is", 3, 1, &[])?;
    for net in ["neta", "netb"] {
        lab.mesh_ok(
            "node1",
            &["network", "create", "-d", "overlay", "--attachable", net],
        )?;
    }
    service(&lab, "sva", "neta", "1")?;
    service(&lab, "svb", "netb", "3")?;
    sandbox(&lab, "node1", "ca", "neta")?;
    sandbox(&lab, "node1", "cb", "netb")?;
    sandbox(&lab, "node2", "xb", "netb")?;
    let b_tasks = task_addrs(&lab, "svb")?;
    let nodes: std::collections::BTreeSet<&str> = b_tasks.iter().map(|(n, _)| n.as_str()).collect();
    ensure!(
        b_tasks.len() == 3 && nodes.len() == 3,
        "svb's tasks should be one per node: {b_tasks:?}"
    );
    let vip_a = vip_of(&status(&lab, "node1", "sva")?, "neta")?;
    let vip_b = vip_of(&status(&lab, "node1", "svb")?, "netb")?;
    let xb = sandbox_ip(&lab, "node2", "xb")?;

    // The controls first: from B everything of B answers, and from A, A's own.
    wait_for("svb answering from cb", Duration::from_secs(20), || {
        sh_ok(&lab, "node1", "cb", "curl -sf -m 2 http://svb:8080/")
            .ok()?
            .then_some(())
    })?;
    wait_for("sva answering from ca", Duration::from_secs(20), || {
        sh_ok(&lab, "node1", "ca", "curl -sf -m 2 http://sva:8080/")
            .ok()?
            .then_some(())
    })?;
    for (node, addr) in &b_tasks {
        ensure!(
            sh_ok(
                &lab,
                "node1",
                "cb",
                &format!("ping -c1 -W2 {addr} && curl -sf -m 2 http://{addr}:8080/")
            )?,
            "control: cb cannot reach svb's task {addr} on {node}"
        );
    }
    ensure!(
        sh_ok(&lab, "node1", "cb", &format!("ping -c1 -W2 {xb}"))?,
        "control: cb cannot reach xb"
    );
    ensure!(
        sh_ok(
            &lab,
            "node1",
            "cb",
            &format!("curl -sf -m 2 http://{vip_b}:8080/")
        )?,
        "control: cb cannot reach svb's VIP"
    );
    let b_answers = dig_answers(&dig(&lab, "node1", "cb", "svb")?);
    ensure!(b_answers == vec![vip_b.clone()], "cb: svb -> {b_answers:?}");
    let b_tasks_dns = dig_answers(&dig(&lab, "node1", "cb", "tasks.svb")?);
    ensure!(b_tasks_dns.len() == 3, "cb: tasks.svb -> {b_tasks_dns:?}");
    ensure!(
        dig_answers(&dig(&lab, "node1", "ca", "sva")?) == vec![vip_a.clone()],
        "ca cannot resolve its own service"
    );

    // From A: nothing of B, on this node or across.
    let mut leaks = Vec::new();
    let targets: Vec<(String, String)> = b_tasks
        .iter()
        .map(|(n, a)| (format!("svb's task on {n}"), a.clone()))
        .chain([
            ("svb's VIP".to_string(), vip_b.clone()),
            ("xb on node2".to_string(), xb.clone()),
        ])
        .collect();
    for (what, addr) in &targets {
        if sh_ok(&lab, "node1", "ca", &format!("ping -c1 -W1 {addr}"))? {
            leaks.push(format!("ping {what} ({addr})"));
        }
        if sh_ok(
            &lab,
            "node1",
            "ca",
            &format!("curl -s -m 2 -o /dev/null http://{addr}:8080/"),
        )? {
            leaks.push(format!("TCP to {what} ({addr}:8080)"));
        }
    }
    for name in ["svb", "tasks.svb", "xb", "cb"] {
        let out = dig(&lab, "node1", "ca", name)?;
        let answers = dig_answers(&out);
        if !answers.is_empty() || dig_status(&out) != "NXDOMAIN" {
            leaks.push(format!("dig {name}: {} {answers:?}", dig_status(&out)));
        }
    }
    ensure!(leaks.is_empty(), "A reaches B: {leaks:?}");
    println!(
        "from neta: {} addresses of netb unreachable (ping and TCP), 4 names NXDOMAIN; from netb all reachable",
        targets.len()
    );
    lab.down()?;
    Ok(())
}

/// One sandbox floods 127.0.0.11 with dnsperf for 10 s (8 clients, up to
/// 4000 queries outstanding: past the per-sandbox cap of queries in
/// flight; local names and one that goes upstream); meanwhile another
/// sandbox on the same node asks 20 times, and every answer comes within
/// a second.
#[test]
fn a_dns_flood_does_not_starve_another_sandbox() -> Result<()> {
    let lab = up("id", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    sandbox(&lab, "node2", "flood", "app")?;
    sandbox(&lab, "node2", "quiet", "app")?;
    sandbox(&lab, "node1", "far", "app")?;
    let far = sandbox_ip(&lab, "node1", "far")?;
    wait_for("far resolvable from quiet", Duration::from_secs(20), || {
        dig_answers(&dig(&lab, "node2", "quiet", "far").ok()?)
            .contains(&far)
            .then_some(())
    })?;
    // Names of ours (answered, and NXDOMAIN) so the flood measures the
    // server and not an upstream.
    let queries = std::env::temp_dir().join(format!("{}-queries", lab.name));
    std::fs::write(
        &queries,
        "far A\nquiet A\nflood A\nnosuch A\ntasks.far A\nfar AAAA\nexample.com A\n",
    )?;
    let q = queries.to_string_lossy().into_owned();
    let (flood, quiet) = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            lab.mesh(
                "node2",
                &[
                    "exec",
                    "flood",
                    "--",
                    "dnsperf",
                    "-s",
                    "127.0.0.11",
                    "-d",
                    &q,
                    "-l",
                    "10",
                    "-c",
                    "4",
                    "-q",
                    "500",
                    "-t",
                    "1",
                ],
            )
        });
        // Give the flood a moment to reach its rate.
        std::thread::sleep(Duration::from_secs(2));
        let mut times = Vec::new();
        let mut failed = Vec::new();
        for i in 0..20 {
            let t = Instant::now();
            let out = dig(&lab, "node2", "quiet", "+time=1 far");
            let took = t.elapsed();
            match out {
                Ok(out) if dig_answers(&out).contains(&far) => {
                    let ms: u64 = out
                        .split(";; Query time: ")
                        .nth(1)
                        .and_then(|x| x.split(' ').next())
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(u64::MAX);
                    times.push(ms);
                }
                Ok(out) => failed.push(format!("query {i}: {} after {took:?}", dig_status(&out))),
                Err(e) => failed.push(format!("query {i}: {e}")),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        (flood.join(), (times, failed))
    });
    let _ = std::fs::remove_file(&queries);
    let flood = match flood {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the flood thread panicked"),
    };
    let report = String::from_utf8_lossy(&flood.stdout).into_owned();
    ensure!(
        flood.status.success(),
        "dnsperf failed: {report} {}",
        String::from_utf8_lossy(&flood.stderr)
    );
    let line = |key: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    };
    let (times, failed) = quiet;
    println!(
        "flood: {}; {}; {}",
        line("Queries sent:"),
        line("Queries completed:"),
        line("Queries per second:")
    );
    println!(
        "quiet sandbox during the flood: {} of 20 answered, query times (ms) {times:?}",
        times.len()
    );
    ensure!(failed.is_empty(), "quiet sandbox starved: {failed:?}");
    ensure!(
        times.iter().all(|t| *t < 1000),
        "answers slower than 1 s: {times:?}"
    );
    let qps: f64 = line("Queries per second:")
        .split(':')
        .nth(1)
        .and_then(|x| x.trim().parse().ok())
        .unwrap_or(0.0);
    ensure!(qps > 1000.0, "the flood did not flood: {qps} queries/s");
    // The flooded daemon kept its own heartbeats going too.
    let log = std::fs::read_to_string(&lab.node("node1")?.log).unwrap_or_default();
    ensure!(
        !log.contains("marking node down"),
        "a node was marked down during the flood"
    );
    lab.down()?;
    Ok(())
}
