//! End-to-end: nodes report their own routes with their heartbeats, and an
//! overlay subnet that overlaps a Ready node's route is refused, naming the
//! node and the route (finding 4 of issue 14: the lab's underlay subnet was
//! taken as an overlay's without a word).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use mesh_lab::Lab;
use serde_json::Value;

/// `node inspect NODE` on node1, the one object.
fn inspect(lab: &Lab, node: &str) -> Result<Value> {
    let out = lab.mesh_ok("node1", &["node", "inspect", node])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v[0].clone())
}

/// The node's routes as `node inspect` shows them, as `DEST dev DEVICE`.
fn routes(lab: &Lab, node: &str) -> Result<Vec<String>> {
    let v = inspect(lab, node)?;
    let list = v["Status"]["Routes"]
        .as_array()
        .context("no Status.Routes")?;
    Ok(list
        .iter()
        .map(|r| {
            format!(
                "{} dev {}",
                r["Destination"].as_str().unwrap_or("?"),
                r["Device"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// Waits until `node inspect` shows `route` for `node`; returns how long.
fn wait_route(lab: &Lab, node: &str, route: &str) -> Result<Duration> {
    let (_, took) = wait_for(
        &format!("{route} in {node}'s routes"),
        Duration::from_secs(15),
        || {
            routes(lab, node)
                .ok()
                .filter(|r| r.iter().any(|x| x == route))
        },
    )?;
    Ok(took)
}

fn names(lab: &Lab) -> Result<Vec<String>> {
    let mut n: Vec<String> = network_ls(lab, "node1")?
        .iter()
        .filter_map(|n| n["Name"].as_str().map(String::from))
        .collect();
    n.sort();
    Ok(n)
}

fn create(name: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["network", "create", "-d", "overlay"];
    args.extend_from_slice(extra);
    args.push(name);
    args.into_iter().map(String::from).collect()
}

fn refused_create(lab: &Lab, name: &str, extra: &[&str], needle: &str) -> Result<String> {
    let args = create(name, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(lab, "node1", &args, needle)
}

fn create_ok(lab: &Lab, name: &str, extra: &[&str]) -> Result<()> {
    let args = create(name, extra);
    lab.mesh_ok("node1", &args)?;
    Ok(())
}

fn subnet_of(lab: &Lab, name: &str) -> Result<mesh_common::ipam::Ipv4Net> {
    let out = lab.mesh_ok("node1", &["network", "inspect", name])?;
    let v: Value = serde_json::from_str(&out)?;
    let s = v[0]["IPAM"]["Config"][0]["Subnet"]
        .as_str()
        .context("no subnet")?;
    Ok(s.parse()?)
}

#[test]
fn subnets_overlapping_a_ready_nodes_routes_are_refused() -> Result<()> {
    let mut lab = up("ov", 3, 1, &[])?;
    let underlay = lab.subnet();
    let net: mesh_common::ipam::Ipv4Net = underlay.parse()?;
    let route = format!("{underlay} dev eth0");

    // Every node reports the underlay's link route; none of ours.
    for n in ["node1", "node2", "node3"] {
        wait_route(&lab, n, &route)?;
    }
    let shown = routes(&lab, "node2")?;
    ensure!(
        shown
            .iter()
            .all(|r| !r.contains("mesh_") && !r.contains("mesh0")),
        "mesh's own devices are reported: {shown:?}"
    );
    let node2_id = inspect(&lab, "node2")?["ID"]
        .as_str()
        .context("no ID")?
        .to_string();

    // The underlay itself, a part of it, and a block around it.
    let before = names(&lab)?;
    let octets = net.network().octets();
    let inside = format!("{}.{}.{}.128/25", octets[0], octets[1], octets[2]);
    let around = format!("{}.{}.0.0/16", octets[0], octets[1]);
    for (i, subnet) in [underlay.as_str(), &inside, &around]
        .into_iter()
        .enumerate()
    {
        let err = refused_create(
            &lab,
            &format!("clash{i}"),
            &["--subnet", subnet],
            &format!("subnet {subnet} overlaps route {route} on node node"),
        )?;
        ensure!(
            err.contains("pick another subnet, or pass --opt no-overlap-check"),
            "{err}"
        );
        println!("refused: {err}");
    }
    ensure!(names(&lab)? == before, "a refused create left something");

    // An unrelated subnet, and the escape hatch.
    create_ok(&lab, "fine", &["--subnet", "10.123.0.0/24"])?;
    create_ok(
        &lab,
        "forced",
        &["--subnet", &underlay, "--opt", "no-overlap-check"],
    )?;
    let forced = lab.mesh_ok("node1", &["network", "inspect", "forced"])?;
    let forced: Value = serde_json::from_str(&forced)?;
    ensure!(
        forced[0]["Options"]["no-overlap-check"] == "",
        "the option is not shown: {}",
        forced[0]["Options"]
    );

    // A route added later on one node shows within seconds and blocks;
    // one over the pool's start moves where subnets are carved.
    lab.exec_ok(
        "node2",
        &["ip", "route", "add", "10.77.0.0/16", "dev", "eth0"],
    )?;
    lab.exec_ok(
        "node2",
        &["ip", "route", "add", "10.0.0.0/20", "dev", "eth0"],
    )?;
    let took = wait_route(&lab, "node2", "10.77.0.0/16 dev eth0")?;
    println!("a new route on node2 shows in node inspect after {took:?}");
    ensure!(took < Duration::from_secs(8), "took {took:?}");
    wait_route(&lab, "node2", "10.0.0.0/20 dev eth0")?;
    let short: String = node2_id.chars().take(12).collect();
    refused_create(
        &lab,
        "late",
        &["--subnet", "10.77.1.0/24"],
        &format!(
            "subnet 10.77.1.0/24 overlaps route 10.77.0.0/16 dev eth0 on node node2 ({short})"
        ),
    )?;
    create_ok(&lab, "carved", &[])?;
    let carved = subnet_of(&lab, "carved")?;
    let pool_start: mesh_common::ipam::Ipv4Net = "10.0.0.0/20".parse()?;
    ensure!(
        !pool_start.contains(&carved.network()),
        "carved {carved} inside node2's route {pool_start}"
    );
    println!("carved {carved} past node2's route 10.0.0.0/20");

    // A Down node's routes do not block.
    lab.exec_ok(
        "node3",
        &["ip", "route", "add", "10.78.0.0/16", "dev", "eth0"],
    )?;
    wait_route(&lab, "node3", "10.78.0.0/16 dev eth0")?;
    refused_create(
        &lab,
        "down",
        &["--subnet", "10.78.1.0/24"],
        "overlaps route 10.78.0.0/16 dev eth0 on node node3",
    )?;
    lab.kill("node3")?;
    wait_for("node3 Down", Duration::from_secs(15), || {
        (status_of(&node_ls(&lab, "node1").ok()?, "node3")? == "Down").then_some(())
    })?;
    create_ok(&lab, "down", &["--subnet", "10.78.1.0/24"])?;
    ensure!(
        subnet_of(&lab, "down")?.network() == "10.78.1.0".parse::<Ipv4Addr>()?,
        "wrong subnet"
    );
    Ok(())
}
