//! End-to-end tests of services on namespace labs: tasks placed over nodes,
//! real HTTP through the VIP from a sandbox (`curl`), `dig` for the names,
//! scaling, rolling network changes, and a worker dying.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_lab::Lab;

/// Running tasks per node hostname.
fn running_per_node(st: &mesh_proto::ServiceStatusReply) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in st
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running" && t.state == "running")
    {
        *m.entry(t.node.clone()).or_default() += 1;
    }
    m
}

/// `n` requests to `url` from a sandbox; the answers in order.
fn curl_many(lab: &Lab, node: &str, sandbox: &str, url: &str, n: usize) -> Result<Vec<String>> {
    let script = format!("for i in $(seq {n}); do curl -s -m 3 {url} || printf FAIL; echo; done");
    let out = lab.mesh_ok(node, &["exec", sandbox, "--", "sh", "-c", &script])?;
    Ok(out.lines().map(str::to_string).collect())
}

fn dig_short(lab: &Lab, node: &str, sandbox: &str, name: &str) -> Result<BTreeSet<String>> {
    let out = lab.mesh_ok(
        node,
        &[
            "exec", sandbox, "--", "dig", "+short", "+time=2", "+tries=1", name,
        ],
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn vip_of(st: &mesh_proto::ServiceStatusReply, network: &str) -> Result<String> {
    let s = st.service.as_ref().context("no service in status")?;
    let v = s
        .vips
        .iter()
        .find(|v| v.network == network)
        .with_context(|| format!("no VIP on {network}"))?;
    Ok(v.addr.split('/').next().unwrap_or_default().to_string())
}

fn distinct(answers: &[String]) -> BTreeSet<String> {
    answers.iter().cloned().collect()
}

#[test]
fn replicas_vip_dns_scale_update_and_a_dead_worker() -> Result<()> {
    let mut lab = up("sv", 3, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app2"],
    )?;
    let out = lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "6",
            "--network",
            "app",
            "--health-cmd",
            "curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/",
            "--health-start-interval",
            "100ms",
            "--health-start-period",
            "30s",
            "--",
            "python3",
            "-c",
            HTTP_SERVER,
        ],
    )?;
    ensure!(
        out.contains("verify: Service converged"),
        "create did not report convergence: {out}"
    );
    let st = status(&lab, "node1", "web")?;
    let per = running_per_node(&st);
    ensure!(
        per.values().copied().collect::<Vec<_>>() == vec![2, 2, 2],
        "6 replicas on 3 nodes should be 2 per node: {per:?}"
    );
    ensure!(st.converged, "create returned before every node applied");

    // A client sandbox on the network, on the manager.
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    // Converged means every server passed its check: every request
    // succeeds at once.
    let answers = curl_many(&lab, "node1", "client", "http://web:8080/", 60)?;
    ensure!(
        !answers.iter().any(|a| a.contains("FAIL")),
        "a request failed after create converged: {answers:?}"
    );
    let hosts = distinct(&answers);
    ensure!(
        hosts.len() == 6,
        "60 requests reached {} tasks: {hosts:?}",
        hosts.len()
    );
    ensure!(hosts.iter().all(|h| h.starts_with("web.")), "{hosts:?}");
    let vip = vip_of(&st, "app")?;
    ensure!(
        dig_short(&lab, "node1", "client", "web")? == BTreeSet::from([vip.clone()]),
        "web should resolve to its VIP {vip}"
    );
    let tasks = dig_short(&lab, "node1", "client", "tasks.web")?;
    ensure!(tasks.len() == 6, "tasks.web: {tasks:?}");
    ensure!(!tasks.contains(&vip), "tasks.web must not hold the VIP");

    // Scale down while a client keeps asking: stopping tasks leave the
    // rotation before they get SIGTERM, so no request fails.
    let load = {
        let name = lab.name.clone();
        std::thread::spawn(move || -> Result<Vec<String>> {
            let lab = Lab::open(&name, mesh_bin())?;
            let r = curl_many(&lab, "node1", "client", "http://web:8080/", 150);
            lab.keep();
            r
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.mesh_ok("node1", &["service", "scale", "web=2"])?;
    ensure!(out.contains("converged"), "scale output: {out}");
    let during = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let failed = during.iter().filter(|a| a.contains("FAIL")).count();
    ensure!(
        failed == 0,
        "{failed} of {} requests failed during scale-down",
        during.len()
    );
    let answers = curl_many(&lab, "node1", "client", "http://web:8080/", 20)?;
    ensure!(
        distinct(&answers).len() == 2,
        "after scale 2: {:?}",
        distinct(&answers)
    );
    ensure!(dig_short(&lab, "node1", "client", "tasks.web")?.len() == 2);
    lab.mesh_ok("node1", &["service", "scale", "web=6"])?;
    // The new tasks are in rotation only once healthy.
    let answers = curl_many(&lab, "node1", "client", "http://web:8080/", 60)?;
    ensure!(
        distinct(&answers).len() == 6 && !answers.iter().any(|a| a.contains("FAIL")),
        "after scale 6: {answers:?}"
    );

    // Move the tasks to app2: rolled one at a time, then reachable there
    // and gone from app.
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "client2",
            "--network",
            "app2",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &["service", "update", "--network-add", "app2", "web"],
    )?;
    let answers = curl_many(&lab, "node1", "client2", "http://web:8080/", 60)?;
    ensure!(
        distinct(&answers).len() == 6 && !answers.iter().any(|a| a.contains("FAIL")),
        "after the update to app2: {answers:?}"
    );
    lab.mesh_ok(
        "node1",
        &["service", "update", "--network-rm", "app", "web"],
    )?;
    let st = status(&lab, "node1", "web")?;
    ensure!(
        st.tasks
            .iter()
            .filter(|t| t.desired_state == "running")
            .all(|t| t.addresses.iter().all(|a| a.starts_with("app2="))),
        "tasks still on app: {:?}",
        st.tasks
    );
    ensure!(
        dig_short(&lab, "node1", "client", "web")?.is_empty(),
        "web still resolves on app"
    );

    // A worker dies: daemon killed and its link cut.
    let st = status(&lab, "node1", "web")?;
    let on_node3: BTreeSet<String> = st
        .tasks
        .iter()
        .filter(|t| t.node == "node3" && t.state == "running")
        .map(|t| format!("{}.{}", t.name, t.id))
        .collect();
    ensure!(
        on_node3.len() == 2,
        "node3 should run 2 tasks: {on_node3:?}"
    );
    lab.kill("node3")?;
    lab.cut("node3")?;
    let (per, took) = wait_for("tasks to move off node3", Duration::from_secs(30), || {
        let st = status(&lab, "node1", "web").ok()?;
        let per = running_per_node(&st);
        (!per.contains_key("node3") && per.values().sum::<usize>() == 6 && st.converged)
            .then_some(per)
    })?;
    eprintln!("tasks rescheduled in {took:?}: {per:?}");
    // The replacements run, so they passed their check.
    let answers = curl_many(&lab, "node1", "client2", "http://web:8080/", 60)?;
    ensure!(
        !answers.iter().any(|a| a.contains("FAIL")),
        "a request failed after the node loss converged: {answers:?}"
    );
    let hosts = distinct(&answers);
    ensure!(hosts.len() == 6, "after node loss: {hosts:?}");
    ensure!(
        hosts.is_disjoint(&on_node3),
        "the VIP still sends to node3's dead tasks: {hosts:?}"
    );
    lab.down()?;
    Ok(())
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() -> Result<()> {
    let lab = up("sb", 2, 1, &[])?;
    lab.mesh_ok("node1", &["network", "create", "-d", "overlay", "app"])?;
    lab.mesh_ok("node1", &["network", "create", "lan"])?;
    let create = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["service", "create", "--detach"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            create(&["--name", "a", "--network", "nope", "--", "sleep", "1"]),
            "network nope not found",
        ),
        (
            create(&["--name", "a", "--network", "lan", "--", "sleep", "1"]),
            "overlay",
        ),
        (
            create(&[
                "--name",
                "a",
                "--mode",
                "global",
                "--replicas",
                "2",
                "--",
                "sleep",
                "1",
            ]),
            "replicated mode",
        ),
        (
            create(&["--name", "a", "--replicas", "-1", "--", "sleep", "1"]),
            "-1",
        ),
        (
            create(&["--name", "a", "--replicas", "1000000", "--", "sleep", "1"]),
            "limit",
        ),
        (
            create(&[
                "--name",
                "a",
                "--constraint",
                "node.color=red",
                "--",
                "sleep",
                "1",
            ]),
            "invalid constraint",
        ),
    ];
    for (args, needle) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&lab, "node1", &a, needle)?;
    }
    let ls = lab.mesh_ok("node1", &["service", "ls", "-q"])?;
    ensure!(ls.trim().is_empty(), "refused creates left services: {ls}");

    // Duplicate names.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "dup",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    refused(
        &lab,
        "node1",
        &["service", "create", "--name", "dup", "--", "sleep", "1"],
        "already exists",
    )?;

    // A command that does not exist: the create says so and fails, and
    // `service ps` shows why.
    let (code, out, err) = mesh(
        &lab,
        "node1",
        &[
            "service",
            "create",
            "--name",
            "ghost",
            "--",
            "no-such-command-here",
        ],
    )?;
    ensure!(code != 0, "create of a missing command succeeded: {out}");
    ensure!(
        err.contains("no-such-command-here"),
        "error does not name the command: {err}"
    );
    let ps = lab.mesh_ok("node1", &["service", "ps", "ghost"])?;
    ensure!(
        ps.contains("not found"),
        "service ps does not show the error: {ps}"
    );

    // Constraints nobody satisfies: pending, with the reason.
    let (code, _out, err) = mesh(
        &lab,
        "node1",
        &[
            "service",
            "create",
            "--name",
            "picky",
            "--constraint",
            "node.hostname==nobody",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    ensure!(code != 0, "unplaceable service reported success");
    ensure!(err.contains("no suitable node"), "no reason given: {err}");
    let st = status(&lab, "node1", "picky")?;
    ensure!(
        st.tasks.iter().all(|t| t.state == "pending"),
        "{:?}",
        st.tasks
    );

    // rm frees tasks, endpoints and VIPs: the network can go afterwards.
    lab.mesh_ok("node1", &["service", "rm", "dup", "ghost", "picky"])?;
    wait_for("the network to be free", Duration::from_secs(15), || {
        lab.mesh_ok("node1", &["network", "rm", "app"]).ok()
    })?;
    let left: Vec<String> = ["node1", "node2"]
        .iter()
        .flat_map(|n| common::ps(&lab, n).unwrap_or_default())
        .filter_map(|s| s["Names"].as_str().map(String::from))
        .collect();
    ensure!(left.is_empty(), "task sandboxes left behind: {left:?}");
    lab.down()?;
    Ok(())
}

#[test]
fn restarts_logs_dnsrr_and_global() -> Result<()> {
    let lab = up("sr", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    // A task that fails after a moment is restarted, with its history.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "flaky",
            "--restart-condition",
            "on-failure",
            "--restart-delay",
            "200ms",
            "--",
            "sh",
            "-c",
            "echo started; sleep 1; exit 3",
        ],
    )?;
    wait_for("two failed runs", Duration::from_secs(20), || {
        let st = status(&lab, "node1", "flaky").ok()?;
        (st.tasks.iter().filter(|t| t.state == "failed").count() >= 2).then_some(())
    })?;
    let ps = lab.mesh_ok("node1", &["service", "ps", "flaky"])?;
    ensure!(ps.contains("non-zero exit (3)"), "ps lacks the exit: {ps}");
    let logs = lab.mesh_ok("node1", &["service", "logs", "flaky"])?;
    let started = logs.lines().filter(|l| l.contains("started")).count();
    ensure!(started >= 2, "logs should show every run: {logs}");
    ensure!(
        logs.contains("flaky.1."),
        "log lines lack task prefixes: {logs}"
    );

    // dnsrr: the name gives the task addresses, no VIP.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "rr",
            "--replicas",
            "3",
            "--endpoint-mode",
            "dnsrr",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "c",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let st = status(&lab, "node1", "rr")?;
    ensure!(
        st.service.as_ref().is_some_and(|s| s.vips.is_empty()),
        "dnsrr has no VIP"
    );
    let addrs = dig_short(&lab, "node1", "c", "rr")?;
    let tasks = dig_short(&lab, "node1", "c", "tasks.rr")?;
    ensure!(
        addrs.len() == 3 && addrs == tasks,
        "rr {addrs:?} tasks.rr {tasks:?}"
    );

    // Global: one task per node.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "g",
            "--mode",
            "global",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let st = status(&lab, "node1", "g")?;
    let per = running_per_node(&st);
    ensure!(per.len() == 2 && per.values().all(|n| *n == 1), "{per:?}");
    lab.mesh_ok("node1", &["service", "rm", "flaky", "rr", "g"])?;
    lab.down()?;
    Ok(())
}

/// A manager promoted after the others joined gets the older nodes' log
/// streams too: `service logs` run on it shows their tasks' lines.
#[test]
fn logs_reach_a_manager_promoted_later() -> Result<()> {
    let lab = up("lp", 3, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "hello",
            "--mode",
            "global",
            "--",
            "sh",
            "-c",
            "echo hello-line; sleep 3600",
        ],
    )?;
    let st = status(&lab, "node1", "hello")?;
    let per = running_per_node(&st);
    ensure!(per.len() == 3, "one task per node: {per:?}");

    lab.mesh_ok("node1", &["node", "promote", "node3"])?;
    wait_for("node3 to act as a manager", Duration::from_secs(20), || {
        let nodes = node_ls(&lab, "node3").ok()?;
        let row = nodes.iter().find(|n| n["Hostname"] == "node3")?;
        (row["ManagerStatus"] == "Reachable").then_some(())
    })?;
    let (logs, _) = wait_for(
        "every node's lines in `service logs` on node3",
        Duration::from_secs(20),
        || {
            let logs = lab.mesh_ok("node3", &["service", "logs", "hello"]).ok()?;
            ["node1", "node2", "node3"]
                .iter()
                .all(|n| {
                    logs.lines()
                        .any(|l| l.contains(&format!("@{n} ")) && l.ends_with("hello-line"))
                })
                .then_some(logs)
        },
    )?;
    println!("{logs}");
    lab.mesh_ok("node1", &["service", "rm", "hello"])?;
    lab.down()?;
    Ok(())
}
