//! End-to-end: the agent's reconcile pass keeps going when one part of the
//! data path breaks, repairs the rest, and shows what it cannot fix in the
//! node's status until it can.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use serde_json::Value;

/// `mesh info --format json` of a node, its Swarm part.
fn info(lab: &mesh_lab::Lab, node: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&lab.mesh_ok(node, &["info", "--format", "json"])?)?;
    Ok(v["Swarm"].clone())
}

fn errors_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The data-path errors `mesh info` on `node` shows.
fn info_errors(lab: &mesh_lab::Lab, node: &str) -> Result<Vec<String>> {
    Ok(errors_of(&info(lab, node)?["DataPathErrors"]))
}

/// The data-path errors the managers record for `node_id`.
fn inspect_errors(lab: &mesh_lab::Lab, manager: &str, node_id: &str) -> Result<Vec<String>> {
    let v: Value = serde_json::from_str(&lab.mesh_ok(manager, &["node", "inspect", node_id])?)?;
    Ok(errors_of(&v[0]["Status"]["DataPathErrors"]))
}

fn in_netns(ns: &str, argv: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()?)
}

fn ok(what: &str, out: std::process::Output) -> Result<()> {
    ensure!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// On a node with an overlay in use and a sandbox with egress, the
/// network's bridge, `mesh_gwbridge` and the `mesh_egress` table go at
/// once, and the network's VXLAN cannot come back while another device
/// holds its VNI. The pass repairs the gwbridge, the table and the bridge
/// anyway, `mesh info` and `node inspect` show the VXLAN's error while it
/// lasts, and once the VNI is free everything works and the error clears.
#[test]
fn the_loop_stays_up_when_one_part_breaks() -> Result<()> {
    let lab = up("rp", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    for (node, name) in [("node1", "a"), ("node2", "b")] {
        lab.mesh_ok(
            node,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                "app",
                "--",
                "sleep",
                "600",
            ],
        )?;
    }
    let a = sandbox_ip(&lab, "node1", "a")?;
    let ping = || {
        lab.mesh(
            "node2",
            &["exec", "b", "--", "ping", "-c1", "-W1", a.as_str()],
        )
        .ok()
        .filter(|o| o.status.success())
    };
    wait_for("ping b -> a", Duration::from_secs(20), ping)?;
    ensure!(
        info_errors(&lab, "node2")?.is_empty(),
        "errors on a healthy node"
    );
    let node2 = info(&lab, "node2")?;
    let node2_id = node2["NodeID"].as_str().context("node2's ID")?.to_string();
    let node2_addr = node2["NodeAddr"].as_str().context("node2's address")?;
    let node2_addr = node2_addr
        .split(':')
        .next()
        .unwrap_or(node2_addr)
        .to_string();
    ensure!(
        inspect_errors(&lab, "node1", &node2_id)?.is_empty(),
        "node inspect shows errors on a healthy node"
    );
    let vni = json_lines(&lab.mesh_ok(
        "node1",
        &["network", "ls", "--format", "json", "--filter", "name=app"],
    )?)?[0]["VNI"]
        .as_u64()
        .context("VNI")?
        .to_string();
    let ovns = format!("{}-ov-{vni}", ns_prefix(&lab, "node2")?);

    // Break it all at once.
    ok(
        "delete br0",
        in_netns(&ovns, &["ip", "link", "del", "br0"])?,
    )?;
    ok(
        "delete vxlan0",
        in_netns(&ovns, &["ip", "link", "del", "vxlan0"])?,
    )?;
    let blocker = [
        "ip",
        "link",
        "add",
        "rpblock0",
        "type",
        "vxlan",
        "id",
        &vni,
        "dstport",
        "4789",
        "local",
        &node2_addr,
    ];
    lab.exec_ok("node2", &blocker)?;
    lab.exec_ok("node2", &["ip", "link", "del", "mesh_gwbridge"])?;
    lab.exec_ok("node2", &["nft", "delete", "table", "ip", "mesh_egress"])?;

    // The VXLAN stays broken, and says so.
    let (errors, _) = wait_for(
        "mesh info on node2 to show the overlay's error",
        Duration::from_secs(30),
        || {
            info_errors(&lab, "node2")
                .ok()
                .filter(|e| e.iter().any(|e| e.contains("network app")))
        },
    )?;
    println!("mesh info showed: {errors:?}");
    wait_for(
        "node inspect on the manager to show node2's error",
        Duration::from_secs(30),
        || {
            inspect_errors(&lab, "node1", &node2_id)
                .ok()
                .filter(|e| e.iter().any(|e| e.contains("network app")))
        },
    )?;
    // Meanwhile the same passes repaired everything else.
    wait_for(
        "mesh_gwbridge, the egress table and br0 to come back",
        Duration::from_secs(30),
        || {
            let gw = lab
                .exec("node2", &["ip", "link", "show", "mesh_gwbridge"])
                .ok()?;
            let table = lab
                .exec("node2", &["nft", "list", "table", "ip", "mesh_egress"])
                .ok()?;
            let br = in_netns(&ovns, &["ip", "link", "show", "br0"]).ok()?;
            (gw.status.success() && table.status.success() && br.status.success()).then_some(())
        },
    )?;
    ensure!(
        info_errors(&lab, "node2")?
            .iter()
            .any(|e| e.contains("network app")),
        "the error went while its cause is still there"
    );

    // Free the VNI: the overlay comes back and the errors clear.
    lab.exec_ok("node2", &["ip", "link", "del", "rpblock0"])?;
    wait_for(
        "ping b -> a after the repair",
        Duration::from_secs(30),
        ping,
    )?;
    wait_for(
        "mesh info on node2 to clear",
        Duration::from_secs(30),
        || info_errors(&lab, "node2").ok().filter(|e| e.is_empty()),
    )?;
    wait_for(
        "node inspect to clear node2's errors",
        Duration::from_secs(30),
        || {
            inspect_errors(&lab, "node1", &node2_id)
                .ok()
                .filter(|e| e.is_empty())
        },
    )?;
    // Egress works again: the default route through the gwbridge.
    let route = lab.mesh_ok(
        "node2",
        &["exec", "b", "--", "ip", "route", "show", "default"],
    )?;
    ensure!(route.contains("172.18.0.1"), "no gwbridge route: {route}");
    lab.down()?;
    Ok(())
}

/// Two `mesh run --name x` at the same time: one runs, the other is refused
/// with Docker's one-line conflict, and only one sandbox has the name.
#[test]
fn concurrent_runs_cannot_share_a_name() -> Result<()> {
    let lab = up("rn", 1, 1, &[])?;
    for round in 0..3 {
        let name = format!("x{round}");
        let args = ["run", "-d", "--name", &name, "--", "sleep", "600"];
        let outs: Vec<std::process::Output> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| lab.mesh("node1", &args)))
                .collect();
            runs.into_iter()
                .map(|h| match h.join() {
                    Ok(out) => Ok(out?),
                    Err(_) => Err(anyhow::anyhow!("a run thread panicked")),
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let won = outs.iter().filter(|o| o.status.success()).count();
        ensure!(won == 1, "{won} of two concurrent runs of {name} succeeded");
        let lost = outs
            .iter()
            .find(|o| !o.status.success())
            .context("the refused run")?;
        let err = String::from_utf8_lossy(&lost.stderr).trim().to_string();
        ensure!(
            err.contains(&format!(
                "Conflict. The container name \"/{name}\" is already in use"
            )),
            "{err}"
        );
        ensure!(err.lines().count() == 1, "not one line: {err}");
        let named = ps(&lab, "node1")?
            .iter()
            .filter(|s| s["Names"] == name.as_str())
            .count();
        ensure!(named == 1, "{named} sandboxes are called {name}");
    }
    lab.down()?;
    Ok(())
}
