//! The node simulator end to end (`mesh lab sim`): 200 simulated nodes join
//! a real lab's manager through the real join, a global service reaches
//! every one of them and every node acknowledges its view, and 20 nodes
//! that fall silent are seen down and their replicated tasks placed
//! elsewhere. After `stop`, the simulated nodes are gone from the cluster.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::sim::Sim;
use common::*;

const SIMULATED: usize = 200;

#[test]
fn two_hundred_simulated_nodes_join_run_a_global_service_and_die() -> Result<()> {
    let lab = up("sim", 2, 1, &[])?;
    let mut sim = Sim::start(&lab, SIMULATED, Duration::from_secs(120))?;
    let nodes = node_ls(&lab, "node1")?;
    let ready = nodes.iter().filter(|n| n["Status"] == "Ready").count();
    ensure!(
        ready == SIMULATED + 2,
        "{ready} nodes Ready, want {}",
        SIMULATED + 2
    );

    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.91.0.0/16",
            "simnet",
        ],
    )?;
    // `service create` returns once every task runs and every Ready node
    // has acknowledged the view that holds it.
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
            "simnet",
            "--",
            "sleep",
            "86400",
        ],
    )?;
    let st = status(&lab, "node1", "g")?;
    let running = st.tasks.iter().filter(|t| t.state == "running").count();
    ensure!(
        running == SIMULATED + 2 && st.converged,
        "global service: {running} running, converged {}, behind {:?}",
        st.converged,
        st.behind
    );
    let held = sim.stats()?;
    ensure!(
        held.get("tasks") == Some(&(SIMULATED as i64)),
        "the simulated nodes hold {:?} tasks, want {SIMULATED}",
        held.get("tasks")
    );

    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "r",
            "--replicas",
            "400",
            "--network",
            "simnet",
            "--",
            "sleep",
            "86400",
        ],
    )?;
    let killed = sim.kill(20)?;
    ensure!(killed.len() == 20, "the simulator killed {killed:?}");

    let (_, took) = wait_for("20 killed nodes Down", Duration::from_secs(60), || {
        let nodes = node_ls(&lab, "node1").ok()?;
        let down = nodes
            .iter()
            .filter(|n| {
                n["Status"] == "Down" && n["ID"].as_str().is_some_and(|id| killed.contains(id))
            })
            .count();
        (down == 20).then_some(())
    })?;
    eprintln!("20 silent nodes marked down within {took:?}");
    let (_, took) = wait_for(
        "400 replicas running on live nodes",
        Duration::from_secs(60),
        || {
            let st = status(&lab, "node1", "r").ok()?;
            let live: Vec<_> = st
                .tasks
                .iter()
                .filter(|t| t.desired_state == "running" && t.state == "running")
                .collect();
            let on_dead = live.iter().filter(|t| killed.contains(&t.node_id)).count();
            (live.len() == 400 && on_dead == 0).then_some(())
        },
    )?;
    eprintln!("their tasks rescheduled within {took:?} more");

    sim.stop(Duration::from_secs(60))?;
    let left = node_ls(&lab, "node1")?;
    ensure!(
        left.len() == 2,
        "after the simulator stopped, {} nodes are listed",
        left.len()
    );
    Ok(())
}
