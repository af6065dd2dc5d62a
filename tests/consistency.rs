//! Consistency a user meets (issue 14): `service rm` waits for its tasks
//! and `network rm` right after it works, also on another manager; an
//! exhausted address pool ends `create` with the reason; a restarted
//! manager never answers from an old state; a minority refuses reads
//! rather than hanging. One lab of 3 managers and a worker, in steps.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_lab::Lab;
use serde_json::Value;

const MANAGERS: [&str; 3] = ["node1", "node2", "node3"];
const WORKER: &str = "node4";

/// `mesh ARGS` on a node: exit code, stdout, stderr and how long it took.
fn timed(lab: &Lab, node: &str, args: &[&str]) -> Result<(i32, String, String, Duration)> {
    let start = Instant::now();
    let (code, out, err) = mesh(lab, node, args)?;
    Ok((code, out, err, start.elapsed()))
}

fn service_id(lab: &Lab, node: &str, name: &str) -> Result<String> {
    let v: Value = serde_json::from_str(&lab.mesh_ok(node, &["service", "inspect", name])?)?;
    v[0]["ID"]
        .as_str()
        .map(String::from)
        .with_context(|| format!("no ID in service inspect {name}: {v}"))
}

/// Whether a service ID is gone with all its tasks, as `node` sees it.
fn gone(lab: &Lab, node: &str, id: &str) -> Result<bool> {
    match status(lab, node, id) {
        Ok(st) => Ok(st.service.is_none() && st.tasks.is_empty()),
        Err(e) if e.to_string().contains("not found") => Ok(true),
        Err(e) => Err(e),
    }
}

/// One `node inspect` of the labelled node on a manager: Ok(labels) when
/// it answers, Err(true) when it refuses because it cannot confirm it is
/// current, Err(false) for anything else (not up yet).
fn labels_on(lab: &Lab, node: &str) -> Result<usize, bool> {
    let (code, out, err) = mesh(lab, node, &["node", "inspect", WORKER]).map_err(|_| false)?;
    if code != 0 {
        return Err(err.contains("cannot confirm"));
    }
    let v: Value = serde_json::from_str(&out).map_err(|_| false)?;
    Ok(v[0]["Spec"]["Labels"].as_object().map_or(0, |m| m.len()))
}

/// A label write, retried while the cluster elects a leader (a retry of a
/// write that did commit the first time writes the same label again).
fn add_label(lab: &Lab, via: &str, i: usize) -> Result<()> {
    let kv = format!("k{i}=v{i}");
    wait_for(
        &format!("label {kv} accepted via {via}"),
        Duration::from_secs(20),
        || {
            mesh(lab, via, &["node", "update", "--label-add", &kv, WORKER])
                .ok()
                .filter(|(code, _, _)| *code == 0)
        },
    )?;
    Ok(())
}

#[test]
fn removals_wait_exhaustion_ends_and_reads_are_current() -> Result<()> {
    let mut lab = up(
        "cw",
        4,
        3,
        &[
            "--default-addr-pool",
            "10.30.0.0/23",
            "--default-addr-pool-mask-length",
            "24",
        ],
    )?;
    lab.set_command_timeout(Duration::from_secs(60));
    let sleep = ["--", "sleep", "3600"];

    // The walkthrough: `service rm` then `network rm` on another manager,
    // with nothing in between.
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "nginx-net"],
    )?;
    let mut args = vec![
        "service",
        "create",
        "--name",
        "my-nginx",
        "--replicas",
        "3",
        "--network",
        "nginx-net",
    ];
    args.extend(sleep);
    lab.mesh_ok("node1", &args)?;
    let id = service_id(&lab, "node1", "my-nginx")?;
    let (code, out, err, t_rm) = timed(&lab, "node1", &["service", "rm", "my-nginx"])?;
    ensure!(
        code == 0 && out.trim() == "my-nginx",
        "service rm: {code} {out:?} {err:?}"
    );
    ensure!(
        gone(&lab, "node1", &id)?,
        "service rm returned while tasks of {id} remained"
    );
    let (code, _, err, t_net) = timed(&lab, "node2", &["network", "rm", "nginx-net"])?;
    ensure!(code == 0, "network rm right after service rm: {err}");
    println!("walkthrough: service rm waited {t_rm:?} for 3 tasks; network rm on node2 {t_net:?}");

    // The default pool (two /24s) runs out: the second network takes the
    // last one, the third is refused with the reason.
    lab.mesh_ok("node1", &["network", "create", "-d", "overlay", "net2"])?;
    lab.mesh_ok("node1", &["network", "create", "-d", "overlay", "net2b"])?;
    let line = refused(
        &lab,
        "node2",
        &["network", "create", "-d", "overlay", "net3"],
        "no free /24 subnet left in address pools 10.30.0.0/23",
    )?;
    println!("default pool exhausted: {line}");
    lab.mesh_ok("node1", &["network", "rm", "net2b"])?;

    // `rm --detach` returns at once; a `network rm` elsewhere then waits
    // for the tasks being removed instead of failing.
    let mut args = vec![
        "service",
        "create",
        "--name",
        "s2",
        "--replicas",
        "2",
        "--network",
        "net2",
    ];
    args.extend(sleep);
    lab.mesh_ok("node1", &args)?;
    let (code, _, err, t_detach) = timed(&lab, "node1", &["service", "rm", "--detach", "s2"])?;
    ensure!(code == 0, "service rm --detach: {err}");
    let (code, _, err, t_net) = timed(&lab, "node3", &["network", "rm", "net2"])?;
    ensure!(code == 0, "network rm after rm --detach: {err}");
    println!("rm --detach returned in {t_detach:?}; network rm on node3 waited {t_net:?}");

    // A /30 has one host address besides the gateway: the VIP takes it,
    // and create ends with the reason rather than waiting forever.
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.20.0.0/30",
            "tiny",
        ],
    )?;
    let reason = "network tiny has no free address (10.20.0.0/30)";
    let mut args = vec![
        "service",
        "create",
        "--name",
        "small",
        "--replicas",
        "2",
        "--network",
        "tiny",
    ];
    args.extend(sleep);
    let start = Instant::now();
    let line = refused(&lab, "node1", &args, reason)?;
    println!(
        "exhausted /30: create ended after {:?}: {line}",
        start.elapsed()
    );
    let ps = lab.mesh_ok("node2", &["service", "ps", "small"])?;
    ensure!(
        ps.matches(reason).count() == 2,
        "service ps should show the reason for both tasks:\n{ps}"
    );
    lab.mesh_ok("node1", &["service", "rm", "small"])?;
    // Without a VIP one task gets the address and the other is blocked.
    let mut args = vec![
        "service",
        "create",
        "--name",
        "rr",
        "--endpoint-mode",
        "dnsrr",
        "--replicas",
        "2",
        "--network",
        "tiny",
    ];
    args.extend(sleep);
    refused(&lab, "node1", &args, reason)?;
    let st = status(&lab, "node1", "rr")?;
    let states: Vec<&str> = st.tasks.iter().map(|t| t.state.as_str()).collect();
    ensure!(
        states.iter().filter(|s| **s == "running").count() == 1
            && states.iter().filter(|s| **s == "pending").count() == 1,
        "dnsrr on a /30: one task runs, one waits for an address: {states:?}"
    );
    lab.mesh_ok("node1", &["service", "rm", "rr"])?;
    lab.mesh_ok("node2", &["network", "rm", "tiny"])?;

    // A task on a node that died: rm does not hang, the node's tasks are
    // freed once it is Down.
    let mut args = vec![
        "service",
        "create",
        "--name",
        "onworker",
        "--constraint",
        "node.role==worker",
    ];
    args.extend(sleep);
    lab.mesh_ok("node1", &args)?;
    lab.kill(WORKER)?;
    let (code, _, err, t_down) = timed(&lab, "node1", &["service", "rm", "onworker"])?;
    ensure!(
        code == 0 && t_down < Duration::from_secs(15),
        "service rm with its node dead: exit {code} after {t_down:?}: {err}"
    );
    println!("service rm with the task's node killed returned after {t_down:?}");
    lab.start(WORKER)?;

    // Finding 1: 20 writes via node1, kill -9 the leader, 20 more via
    // another manager, kill that one too, restart both; every answer shows
    // all 40.
    let old = leader(&lab, "node1").context("no leader")?;
    for i in 0..20 {
        add_label(&lab, "node1", i)?;
    }
    lab.kill(&old)?;
    let second = MANAGERS
        .iter()
        .find(|m| **m != "node1" && **m != old)
        .copied()
        .context("a third manager")?;
    for i in 20..40 {
        add_label(&lab, second, i)?;
    }
    lab.kill(second)?;
    let mut reads = 0;
    let mut refusals = 0;
    let mut served_after = Vec::new();
    for m in [old.as_str(), second] {
        let start = Instant::now();
        lab.start(m)?;
        loop {
            match labels_on(&lab, m) {
                Ok(n) => {
                    reads += 1;
                    ensure!(n >= 40, "{m} answered with {n} of 40 labels after restart");
                    served_after.push((m.to_string(), start.elapsed()));
                    break;
                }
                Err(true) => refusals += 1,
                Err(false) => {}
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{m} did not serve a read within 30 s of its restart");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Until every manager sees every node Ready, every answer has all 40.
    let start = Instant::now();
    loop {
        let mut all_ready = true;
        for m in MANAGERS {
            match labels_on(&lab, m) {
                Ok(n) => {
                    reads += 1;
                    ensure!(n >= 40, "{m} answered with {n} of 40 labels");
                }
                Err(true) => refusals += 1,
                Err(false) => {}
            }
            let ready = node_ls(&lab, m)
                .map(|ns| ns.len() == 4 && ns.iter().all(|n| n["Status"] == "Ready"))
                .unwrap_or(false);
            all_ready &= ready;
        }
        if all_ready {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("not every manager saw every node Ready within 30 s");
        }
    }
    println!(
        "restarted managers: {reads} reads, all with 40 labels; {refusals} refused (not yet current); served reads after {served_after:?}"
    );

    // A minority cannot confirm it is current: it says so, in bounded time.
    let (a, b) = (MANAGERS[1], MANAGERS[2]);
    lab.kill(a)?;
    lab.kill(b)?;
    let start = Instant::now();
    let line = refused(
        &lab,
        "node1",
        &["node", "ls"],
        "cannot confirm that its state is current",
    )?;
    let took = start.elapsed();
    ensure!(
        took < Duration::from_secs(8),
        "a minority read took {took:?}"
    );
    println!("minority read refused after {took:?}: {line}");
    Ok(())
}
