//! Faults (issue 14): the lab's partitions and pauses, and a short fault
//! campaign on 3 and on 5 managers whose checker must find nothing lost,
//! duplicated or stale, no hung operation, minority writes refused, and
//! the cluster converged within its bound. `cargo bench --bench faults`
//! runs the long campaign.

mod campaign;
mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mesh_lab::{Lab, UpSpec};

use campaign::{Config, FaultKind};
use common::{lab_name, mesh_bin};

/// `ping -c1 -W1` from `from` to `to`'s underlay address: did it answer?
fn pings(lab: &Lab, from: &str, to: &str) -> Result<bool> {
    let ip = match lab.hosts.iter().find(|h| h.name == to) {
        Some(h) => h.ip.to_string(),
        None => lab.node(to)?.ip.to_string(),
    };
    let out = lab.exec(from, &["ping", "-c1", "-W1", &ip])?;
    Ok(out.status.success())
}

/// Who reaches whom, as "from>to" for each pair that answers.
fn reach(lab: &Lab, names: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for a in names {
        for b in names.iter().filter(|b| *b != a) {
            if pings(lab, a, b)? {
                out.push(format!("{a}>{b}"));
            }
        }
    }
    Ok(out)
}

fn lab_cli(args: &[&str]) -> Result<String> {
    let out = Command::new(mesh_bin()).arg("lab").args(args).output()?;
    if !out.status.success() {
        bail!(
            "mesh lab {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mesh lab partition` cuts only between its groups (a host in no group
/// reaches everyone), `mesh lab heal LAB` restores it, and a paused daemon
/// answers nothing until it is resumed; `lab ls` shows both.
#[test]
fn partition_pause_and_heal() -> Result<()> {
    let name = lab_name("fcl");
    let _ = mesh_lab::cleanup_stale(&name);
    let mut spec = UpSpec::new(&name, 3, 1);
    spec.hosts = 1;
    let mut lab = Lab::up(&spec, mesh_bin())?;
    let all = ["node1", "node2", "node3", "host1"];
    let whole = reach(&lab, &all)?;
    ensure!(
        whole.len() == 12,
        "before any fault, not all pairs ping: {whole:?}"
    );

    let said = lab_cli(&["partition", &name, "node1,node2", "3"])?;
    ensure!(said.contains("node1,node2 | node3"), "{said}");
    let split = reach(&lab, &all)?;
    let expect: Vec<String> = [
        "node1>node2",
        "node1>host1",
        "node2>node1",
        "node2>host1",
        "node3>host1",
        "host1>node1",
        "host1>node2",
        "host1>node3",
    ]
    .map(String::from)
    .to_vec();
    ensure!(
        split == expect,
        "partitioned: {split:?}, expected {expect:?}"
    );
    let ls = lab_cli(&["ls"])?;
    ensure!(
        ls.contains(&format!("lab {name} is partitioned: node1,node2 | node3")),
        "{ls}"
    );
    // A new partition replaces the old one.
    lab_cli(&["partition", &name, "node1", "node2"])?;
    ensure!(pings(&lab, "node1", "node3")? && !pings(&lab, "node1", "node2")?);
    // Bad groups are refused with one line, and change nothing.
    let out = Command::new(mesh_bin())
        .args(["lab", "partition", &name, "node1,node2", "node2"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("more than one partition group")
            && err.trim().lines().count() == 1,
        "overlapping groups: {err}"
    );
    ensure!(
        !pings(&lab, "node1", "node2")?,
        "a refused partition changed the old one"
    );

    // Pause a worker's daemon: `mesh info` hangs, then works after resume.
    lab_cli(&["pause", &name, "node3"])?;
    let ls = lab_cli(&["ls"])?;
    ensure!(
        ls.lines()
            .any(|l| l.contains("node3") && l.contains("paused")),
        "lab ls does not show node3 paused: {ls}"
    );
    let r = lab.mesh_timeout("node3", &["info"], Duration::from_secs(3));
    ensure!(
        match &r {
            Err(mesh_lab::LabError::Timeout { .. }) => true,
            Ok(out) => !out.status.success(),
            Err(_) => false,
        },
        "a paused daemon answered: {r:?}"
    );

    // `heal LAB` restores the partition, a cut link and the paused daemon.
    lab.refresh()?;
    lab.cut("node2")?;
    lab_cli(&["heal", &name])?;
    lab.refresh()?;
    ensure!(lab.partition.is_empty() && lab.nodes.iter().all(|n| !n.cut && !n.paused));
    let healed = reach(&lab, &all)?;
    ensure!(
        healed.len() == 12,
        "after heal, not all pairs ping: {healed:?}"
    );
    lab.mesh_timeout("node3", &["info"], Duration::from_secs(10))
        .context("mesh info after resume")?;
    // Pause again and tear down while paused: `down` must not wait on it.
    lab.pause("node3")?;
    lab.down().context("down of a lab with a paused daemon")?;
    ensure!(
        Lab::open(&name, mesh_bin()).is_err(),
        "lab {name} still there"
    );
    Ok(())
}

fn campaign(tag: &str, nodes: usize, managers: usize) -> Result<()> {
    let mut lab = common::up(tag, nodes, managers, &[])?;
    let cfg = Config {
        // Each kind twice: once at the leader, once at a follower.
        rounds: 2 * FaultKind::ALL.len(),
        ..Config::default()
    };
    let report = campaign::run(&mut lab, &cfg)?;
    println!(
        "campaign on {managers} managers + {} worker(s):",
        nodes - managers
    );
    print!("{}", report.table);
    let s = &report.summary;
    for (what, lines) in [
        ("lost", &s.lost),
        ("duplicates", &s.duplicates),
        ("stale", &s.stale),
        ("scale", &s.scale),
        ("hung", &s.hung),
        ("minority hung", &s.minority_hung),
        ("minority acked", &s.minority_acked),
        ("problems", &s.problems),
    ] {
        for l in lines.iter().take(10) {
            println!("{what}: {l}");
        }
    }
    for (n, line) in s.refusals.iter().take(8) {
        println!("refused {n:5}x: {line}");
    }
    ensure!(s.acked > 50, "only {} operations acknowledged", s.acked);
    ensure!(s.lost.is_empty(), "lost = {}", s.lost.len());
    ensure!(
        s.duplicates.is_empty(),
        "duplicates = {}",
        s.duplicates.len()
    );
    ensure!(s.stale.is_empty(), "stale = {}", s.stale.len());
    ensure!(s.scale.is_empty(), "scale = {:?}", s.scale);
    ensure!(s.hung.is_empty(), "hung = {}", s.hung.len());
    ensure!(s.minority_hung.is_empty(), "minority writes hung");
    ensure!(s.minority.0 > 0, "no write reached a minority-side manager");
    ensure!(
        s.minority_acked.is_empty(),
        "a minority-side manager acknowledged writes before the heal"
    );
    ensure!(
        s.unrecovered.is_empty(),
        "writes never recovered after rounds {:?}",
        s.unrecovered
    );
    ensure!(report.converged_after.is_some(), "{:?}", s.problems);
    Ok(())
}

#[test]
fn campaign_3_managers() -> Result<()> {
    campaign("fc", 4, 3)
}

#[test]
fn campaign_5_managers() -> Result<()> {
    campaign("fc5", 6, 5)
}
