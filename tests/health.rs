//! Health checks end to end, as Docker's `--health-*` flags: a task with a
//! check serves (VIP, DNS) only once healthy, so `service create` returning
//! means every task answers; a task whose check never passes, or starts
//! failing later, is reported failed ("unhealthy container"), leaves the
//! rotation and is replaced; `--no-healthcheck` and clearing a check on
//! update; and bad flags refused in one line.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_lab::Lab;

/// Answers of `n` requests to `url` from a sandbox, one per line ("FAIL"
/// for a failed one).
fn curl_many(lab: &Lab, node: &str, sandbox: &str, url: &str, n: usize) -> Result<Vec<String>> {
    let script = format!("for i in $(seq {n}); do curl -s -m 3 {url} || printf FAIL; echo; done");
    let out = lab.mesh_ok(node, &["exec", sandbox, "--", "sh", "-c", &script])?;
    Ok(out.lines().map(String::from).collect())
}

/// The addresses `tasks.NAME` resolves to from a sandbox.
fn task_ips(lab: &Lab, node: &str, sandbox: &str, name: &str) -> Result<BTreeSet<String>> {
    let out = dig(lab, node, sandbox, &format!("tasks.{name}"))?;
    Ok(dig_answers(&out).into_iter().collect())
}

/// The address of a task on network `net` ("net=IP" in its addresses).
fn task_ip(t: &mesh_proto::Task, net: &str) -> Option<String> {
    t.addresses
        .iter()
        .find_map(|a| a.strip_prefix(&format!("{net}=")).map(String::from))
}

fn live(st: &mesh_proto::ServiceStatusReply) -> Vec<&mesh_proto::Task> {
    st.tasks
        .iter()
        .filter(|t| t.desired_state == "running")
        .collect()
}

/// `service create` with the check that the HTTP server answers.
fn create_http(lab: &Lab, name: &str, replicas: &str, check: &str) -> Result<String> {
    Ok(lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            name,
            "--replicas",
            replicas,
            "--network",
            "app",
            "--restart-delay",
            "200ms",
            "--health-cmd",
            check,
            "--health-interval",
            "500ms",
            "--health-start-interval",
            "100ms",
            "--health-start-period",
            "20s",
            "--health-retries",
            "2",
            "--",
            "python3",
            "-c",
            HTTP_SERVER,
        ],
    )?)
}

const LISTENS: &str = "curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/";

#[test]
fn health_gates_rotation_and_unhealthy_tasks_are_replaced() -> Result<()> {
    let lab = up("hc", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
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

    // Healthy path: create returns once both tasks pass their check, and
    // then every request through the VIP succeeds, with no retry.
    let out = create_http(&lab, "web", "2", LISTENS)?;
    ensure!(out.contains("converged"), "create did not converge: {out}");
    let answers = curl_many(&lab, "node1", "client", "http://web:8080/", 20)?;
    ensure!(
        !answers.iter().any(|a| a.contains("FAIL")),
        "a request failed right after create: {answers:?}"
    );
    let hosts: BTreeSet<&String> = answers.iter().collect();
    ensure!(hosts.len() == 2, "20 requests reached {hosts:?}");
    let st = status(&lab, "node1", "web")?;
    ensure!(
        live(&st)
            .iter()
            .all(|t| t.state == "running" && t.health == "healthy"),
        "tasks not running (healthy): {:?}",
        st.tasks
    );
    let ps = lab.mesh_ok("node1", &["service", "ps", "web"])?;
    ensure!(
        ps.matches("(healthy)").count() == 2,
        "ps should show two healthy tasks: {ps}"
    );
    let inspect = lab.mesh_ok("node1", &["service", "inspect", "web"])?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    ensure!(
        v[0]["HealthStatus"]["Healthy"] == 2,
        "inspect HealthStatus: {inspect}"
    );
    ensure!(
        v[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"][1] == LISTENS,
        "inspect Healthcheck: {inspect}"
    );

    // A check that starts failing later: a marker file (the sandboxes
    // share /tmp with the host) makes one task's check fail.
    let marks = std::env::temp_dir().join(format!("meshhc-{}", std::process::id()));
    std::fs::create_dir_all(&marks)?;
    let check = format!("{LISTENS} && test ! -e {}/$(hostname)", marks.display());
    let out = create_http(&lab, "flaky", "2", &check)?;
    ensure!(out.contains("converged"), "create did not converge: {out}");
    let st = status(&lab, "node1", "flaky")?;
    let sick = live(&st)
        .into_iter()
        .find(|t| t.slot == 1)
        .context("no task in slot 1")?
        .clone();
    let sick_ip = task_ip(&sick, "app").context("slot 1 has no address")?;
    ensure!(
        task_ips(&lab, "node1", "client", "flaky")?.contains(&sick_ip),
        "tasks.flaky lacks {sick_ip} while healthy"
    );
    let sick_host = lab
        .mesh_ok(
            "node1",
            &[
                "exec",
                "client",
                "--",
                "curl",
                "-s",
                "-m",
                "3",
                &format!("http://{sick_ip}:8080/"),
            ],
        )?
        .trim()
        .to_string();
    ensure!(
        sick_host.starts_with("flaky."),
        "{sick_ip} answered {sick_host:?}"
    );
    std::fs::write(marks.join(&sick_host), b"")?;
    let (_, took) = wait_for("the task to be unhealthy", Duration::from_secs(20), || {
        let st = status(&lab, "node1", "flaky").ok()?;
        st.tasks
            .iter()
            .find(|t| t.id == sick.id && t.state == "failed")
            .map(|t| (t.error.clone(), t.health.clone()))
    })?;
    let st = status(&lab, "node1", "flaky")?;
    let failed = st
        .tasks
        .iter()
        .find(|t| t.id == sick.id)
        .context("the failed task is gone")?;
    ensure!(
        failed.error == "unhealthy container" && failed.health == "unhealthy",
        "failed for another reason: {failed:?}"
    );
    println!("failing check to task failed: {took:?}");
    // It leaves the rotation at once; its slot is refilled.
    wait_for(
        "tasks.flaky to drop the task",
        Duration::from_secs(10),
        || {
            let ips = task_ips(&lab, "node1", "client", "flaky").ok()?;
            (!ips.contains(&sick_ip)).then_some(())
        },
    )?;
    let answers = curl_many(&lab, "node1", "client", "http://flaky:8080/", 20)?;
    ensure!(
        !answers.iter().any(|a| a == &sick_host),
        "the VIP still reaches the unhealthy task: {answers:?}"
    );
    wait_for("a healthy replacement", Duration::from_secs(30), || {
        let st = status(&lab, "node1", "flaky").ok()?;
        let healthy = live(&st)
            .iter()
            .filter(|t| t.state == "running" && t.health == "healthy")
            .count();
        (healthy == 2).then_some(())
    })?;
    let ps = lab.mesh_ok("node1", &["service", "ps", "flaky"])?;
    ensure!(
        ps.contains("unhealthy container") && ps.contains("(unhealthy)"),
        "ps should show the unhealthy task: {ps}"
    );
    let _ = std::fs::remove_dir_all(&marks);

    // A check that never passes: never in rotation, failed and replaced.
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "never",
            "--network",
            "app",
            "--restart-delay",
            "200ms",
            "--health-cmd",
            "false",
            "--health-interval",
            "200ms",
            "--health-retries",
            "2",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    wait_for("two unhealthy runs", Duration::from_secs(30), || {
        let st = status(&lab, "node1", "never").ok()?;
        let unhealthy = st
            .tasks
            .iter()
            .filter(|t| t.state == "failed" && t.error == "unhealthy container")
            .count();
        (unhealthy >= 2).then_some(())
    })?;
    ensure!(
        task_ips(&lab, "node1", "client", "never")?.is_empty(),
        "a never-healthy task is in tasks.never"
    );
    let ps = lab.mesh_ok("node1", &["service", "ps", "never"])?;
    ensure!(
        ps.contains("unhealthy container"),
        "ps lacks the reason: {ps}"
    );

    // --no-healthcheck: running without health; an update adds a check,
    // and `--health-cmd ""` removes it again.
    let out = lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "plain",
            "--no-healthcheck",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    ensure!(out.contains("converged"), "create did not converge: {out}");
    let st = status(&lab, "node1", "plain")?;
    ensure!(
        live(&st)
            .iter()
            .all(|t| t.state == "running" && t.health.is_empty()),
        "{:?}",
        st.tasks
    );
    let inspect = lab.mesh_ok("node1", &["service", "inspect", "plain"])?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    ensure!(
        v[0]["Spec"]["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"][0] == "NONE",
        "{inspect}"
    );
    ensure!(v[0].get("HealthStatus").is_none(), "{inspect}");
    let out = lab.mesh_ok(
        "node1",
        &[
            "service",
            "update",
            "--health-cmd",
            "true",
            "--health-start-interval",
            "100ms",
            "plain",
        ],
    )?;
    ensure!(out.contains("converged"), "update did not converge: {out}");
    let st = status(&lab, "node1", "plain")?;
    ensure!(
        live(&st)
            .iter()
            .all(|t| t.state == "running" && t.health == "healthy"),
        "{:?}",
        st.tasks
    );
    lab.mesh_ok("node1", &["service", "update", "--health-cmd", "", "plain"])?;
    let inspect = lab.mesh_ok("node1", &["service", "inspect", "plain"])?;
    let v: serde_json::Value = serde_json::from_str(&inspect)?;
    ensure!(
        v[0]["Spec"]["TaskTemplate"]["ContainerSpec"]
            .get("Healthcheck")
            .is_none(),
        "the check was not removed: {inspect}"
    );
    let st = status(&lab, "node1", "plain")?;
    ensure!(
        live(&st)
            .iter()
            .all(|t| t.state == "running" && t.health.is_empty()),
        "{:?}",
        st.tasks
    );
    lab.down()?;
    Ok(())
}

#[test]
fn bad_health_flags_are_refused_in_one_line() -> Result<()> {
    let lab = up("hcb", 1, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["service", "create", "--name", "base", "--", "sleep", "3600"],
    )?;
    let create = |flags: &[&str]| {
        let mut a = vec!["service", "create", "--detach", "--name", "bad"];
        a.extend_from_slice(flags);
        a.extend_from_slice(&["--", "sleep", "1"]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let update = |flags: &[&str]| {
        let mut a = vec!["service", "update", "--detach"];
        a.extend_from_slice(flags);
        a.push("base");
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let rows: Vec<(Vec<String>, &str)> = vec![
        (
            create(&["--health-cmd", "true", "--health-retries", "-1"]),
            "cannot be negative",
        ),
        (
            create(&["--health-cmd", "true", "--health-retries", "x"]),
            "whole number",
        ),
        (
            create(&["--health-cmd", "true", "--health-interval", "10us"]),
            "at least 1ms",
        ),
        (
            create(&["--health-cmd", "true", "--health-timeout", "soon"]),
            "invalid duration",
        ),
        (
            create(&["--health-cmd", "true", "--health-start-period", "-1s"]),
            "cannot be negative",
        ),
        (
            create(&["--health-cmd", "true", "--health-interval", "48h"]),
            "at most 24h",
        ),
        (
            create(&["--health-cmd", "true", "--health-retries", "101"]),
            "limit of 100",
        ),
        (
            create(&["--health-cmd", "true", "--no-healthcheck"]),
            "cannot be combined",
        ),
        (create(&["--health-interval", "1s"]), "needs a command"),
        (create(&["--health-cmd", ""]), "needs a command"),
        (
            update(&["--health-retries", "2"]),
            "no health check to change",
        ),
        (
            update(&["--health-cmd", "", "--health-retries", "2"]),
            "removes the check",
        ),
        (
            update(&["--no-healthcheck", "--health-cmd", "true"]),
            "cannot be combined",
        ),
        (
            update(&["--health-cmd", "true", "--health-timeout", "25h"]),
            "at most 24h",
        ),
    ];
    for (args, says) in &rows {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = refused(&lab, "node1", &args, says)?;
        ensure!(err.starts_with("Error: "), "{args:?}: {err:?}");
    }
    // Nothing was made or changed.
    let ls = lab.mesh_ok("node1", &["service", "ls", "-q"])?;
    ensure!(
        ls.lines().count() == 1,
        "a refused create made a service: {ls}"
    );
    let inspect = lab.mesh_ok("node1", &["service", "inspect", "base"])?;
    ensure!(
        !inspect.contains("Healthcheck"),
        "a refused update changed the service: {inspect}"
    );
    lab.down()?;
    Ok(())
}
