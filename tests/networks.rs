//! End-to-end tests of cluster networks and IPAM on namespace labs.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use serde_json::Value;

fn subnet(v: &Value) -> Result<(u32, u8)> {
    let s = v["Subnet"].as_str().context("no Subnet")?;
    let (ip, len) = s.split_once('/').context("not a CIDR")?;
    Ok((u32::from(ip.parse::<Ipv4Addr>()?), len.parse()?))
}

/// Every subnet distinct and non-overlapping, every VNI distinct.
fn check_disjoint(nets: &[Value]) -> Result<()> {
    let mut ranges: Vec<(u32, u32, String)> = Vec::new();
    let mut vnis = HashSet::new();
    for n in nets {
        let (ip, len) = subnet(n)?;
        let size = 1u64 << (32 - len);
        ranges.push((
            ip,
            (ip as u64 + size - 1) as u32,
            n["Name"].as_str().unwrap_or_default().to_string(),
        ));
        let vni = n["VNI"].as_u64().context("no VNI")?;
        ensure!(vni >= 4096, "VNI {vni} below 4096");
        ensure!(vnis.insert(vni), "VNI {vni} given twice");
    }
    ranges.sort();
    for w in ranges.windows(2) {
        ensure!(w[0].1 < w[1].0, "{} and {} overlap", w[0].2, w[1].2);
    }
    Ok(())
}

/// 1,000 networks created concurrently through all three managers, with the
/// leader killed in the middle: no subnet or VNI is ever handed out twice.
#[test]
fn concurrent_creates_never_collide() -> Result<()> {
    let mut lab = up("nc", 3, 3, &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    let old_leader = leader(&lab, "node1").context("no leader")?;
    let create = |lab: &mesh_lab::Lab, range: std::ops::Range<usize>| -> Result<usize> {
        rt.block_on(async {
            let mut clients = Vec::new();
            for n in ["node1", "node2", "node3"] {
                if let Ok(c) = control(lab, n).await {
                    clients.push(c);
                }
            }
            let mut tasks = tokio::task::JoinSet::new();
            // 8 concurrent streams of requests per manager.
            let names: Vec<usize> = range.collect();
            for (k, chunk) in names
                .chunks(names.len().div_ceil(clients.len() * 8).max(1))
                .enumerate()
            {
                let mut c = clients[k % clients.len()].clone();
                let chunk = chunk.to_vec();
                tasks.spawn(async move {
                    let mut ok = 0;
                    for i in chunk {
                        let req = mesh_proto::NetworkCreateRequest {
                            name: format!("net{i}"),
                            driver: "overlay".into(),
                            ..Default::default()
                        };
                        if c.network_create(req).await.is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                });
            }
            let mut ok = 0;
            while let Some(r) = tasks.join_next().await {
                ok += r?;
            }
            anyhow::Ok(ok)
        })
    };
    let first = create(&lab, 0..500)?;
    ensure!(
        first == 500,
        "only {first} of 500 creates succeeded with all managers up"
    );
    // Kill the leader while the second half is in flight.
    let killer = {
        let name = lab.name.clone();
        let bin = mesh_bin().to_path_buf();
        let old = old_leader.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let out = std::process::Command::new(bin)
                .args(["lab", "kill", &name, &old])
                .output();
            out.map(|o| o.status.success()).unwrap_or(false)
        })
    };
    let second = create(&lab, 500..1000)?;
    ensure!(killer.join().unwrap_or(false), "could not kill the leader");
    lab.kill(&old_leader).ok(); // keep the Lab's record in step
    println!("with the leader killed mid-way: {second} of 500 creates answered OK");
    // Retry what failed (a create may have committed without its answer).
    let survivor = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != old_leader)
        .unwrap_or("node1");
    let present: BTreeSet<String> = network_ls(&lab, survivor)?
        .iter()
        .filter_map(|n| n["Name"].as_str().map(String::from))
        .collect();
    for i in 500..1000 {
        let name = format!("net{i}");
        if !present.contains(&name) {
            // The list is this follower's, read without the leader: a
            // create that was still in flight when it was read may have
            // committed since. That one exists: all the test needs.
            let out = lab.mesh(survivor, &["network", "create", "-d", "overlay", &name])?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.success() || err.contains("already exists"),
                "retrying {name} on {survivor}: {err}"
            );
        }
    }
    lab.start(&old_leader)?;
    let (nets, _) = wait_for("all managers to agree", Duration::from_secs(30), || {
        let lists: Vec<Vec<Value>> = ["node1", "node2", "node3"]
            .iter()
            .filter_map(|n| network_ls(&lab, n).ok())
            .collect();
        let same = lists.len() == 3 && lists.iter().all(|l| l.len() == 1001 && *l == lists[0]);
        same.then(|| lists[0].clone())
    })?;
    ensure!(
        nets.iter()
            .filter(|n| n["Name"].as_str().is_some_and(|s| s.starts_with("net")))
            .count()
            == 1000
    );
    check_disjoint(&nets)?;
    // inspect agrees with ls for a sample.
    let inspect: Value =
        serde_json::from_str(&lab.mesh_ok("node2", &["network", "inspect", "net777"])?)?;
    let ls777 = nets
        .iter()
        .find(|n| n["Name"] == "net777")
        .context("net777")?;
    ensure!(
        inspect[0]["IPAM"]["Config"][0]["Subnet"] == ls777["Subnet"],
        "{inspect}"
    );
    ensure!(
        inspect[0]["Options"]["com.docker.network.driver.overlay.vxlanid_list"].as_str()
            == Some(ls777["VNI"].to_string().as_str()),
        "{inspect}"
    );
    lab.down()?;
    Ok(())
}

/// A /20 pool with /24 networks holds exactly 16; the 17th is refused with
/// the pool named; removing one makes room for one more.
#[test]
fn small_pool_exhausts_and_reuses() -> Result<()> {
    let lab = up(
        "np",
        3,
        1,
        &[
            "--default-addr-pool",
            "10.20.0.0/20",
            "--default-addr-pool-mask-length",
            "24",
        ],
    )?;
    for i in 0..16 {
        lab.mesh_ok(
            "node1",
            &["network", "create", "-d", "overlay", &format!("p{i}")],
        )?;
    }
    let err = refused(
        &lab,
        "node1",
        &["network", "create", "-d", "overlay", "p16"],
        "10.20.0.0/20",
    )?;
    println!("17th network: {err}");
    let nets = network_ls(&lab, "node1")?;
    ensure!(
        nets.len() == 17,
        "16 + ingress expected, got {}",
        nets.len()
    );
    check_disjoint(&nets)?;
    let freed = nets.iter().find(|n| n["Name"] == "p7").context("p7")?["Subnet"].clone();
    lab.mesh_ok("node1", &["network", "rm", "p7"])?;
    lab.mesh_ok("node1", &["network", "create", "-d", "overlay", "again"])?;
    let nets = network_ls(&lab, "node1")?;
    let again = nets
        .iter()
        .find(|n| n["Name"] == "again")
        .context("again")?;
    ensure!(
        again["Subnet"] == freed,
        "expected the freed {freed}, got {}",
        again["Subnet"]
    );
    refused(
        &lab,
        "node1",
        &["network", "create", "-d", "overlay", "p17"],
        "no free /24 subnet",
    )?;
    lab.down()?;
    Ok(())
}

/// The ingress network made at init, Docker's inspect shape, ID prefixes,
/// and that networks survive every manager restarting and a leader change.
#[test]
fn ingress_inspect_and_restarts() -> Result<()> {
    let mut lab = up("ni", 3, 3, &[])?;
    let nets = network_ls(&lab, "node1")?;
    let ingress = nets
        .iter()
        .find(|n| n["Name"] == "ingress")
        .context("no ingress network")?;
    ensure!(ingress["Subnet"] == "10.0.0.0/24", "{ingress}");
    let i: Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "ingress"])?)?;
    ensure!(
        i[0]["Ingress"] == true && i[0]["Scope"] == "swarm" && i[0]["Driver"] == "overlay",
        "{i}"
    );

    let id = lab
        .mesh_ok(
            "node2",
            &[
                "network",
                "create",
                "-d",
                "overlay",
                "--attachable",
                "--opt",
                "mtu=1400",
                "--label",
                "team=blue",
                "front",
            ],
        )?
        .trim()
        .to_string();
    ensure!(id.len() == 25, "network ID {id:?}");
    lab.mesh_ok(
        "node3",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "172.28.0.0/16",
            "--gateway",
            "172.28.5.254",
            "--ip-range",
            "172.28.5.0/24",
            "--internal",
            "back",
        ],
    )?;
    let front: Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", &id[..6]])?)?;
    let f = &front[0];
    ensure!(
        f["Name"] == "front" && f["Id"] == id.as_str() && f["Attachable"] == true,
        "{f}"
    );
    ensure!(
        f["IPAM"]["Config"][0]["Subnet"] == "10.0.1.0/24",
        "first pool network: {f}"
    );
    ensure!(f["IPAM"]["Config"][0]["Gateway"] == "10.0.1.1", "{f}");
    ensure!(f["Options"]["mtu"] == "1400", "{f}");
    ensure!(f["Labels"]["team"] == "blue", "{f}");
    for key in [
        "Created",
        "EnableIPv6",
        "Internal",
        "ConfigFrom",
        "ConfigOnly",
        "Containers",
        "Peers",
    ] {
        ensure!(f.get(key).is_some(), "inspect lacks {key}: {f}");
    }
    let back: Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "back"])?)?;
    ensure!(
        back[0]["IPAM"]["Config"][0]["IPRange"] == "172.28.5.0/24" && back[0]["Internal"] == true,
        "{back}"
    );
    let filtered = json_lines(&lab.mesh_ok(
        "node1",
        &[
            "network",
            "ls",
            "--filter",
            "name=front",
            "--format",
            "json",
        ],
    )?)?;
    ensure!(filtered.len() == 1, "{filtered:?}");

    let before = network_ls(&lab, "node1")?;
    for n in ["node1", "node2", "node3"] {
        lab.kill(n)?;
    }
    for n in ["node1", "node2", "node3"] {
        lab.start(n)?;
    }
    wait_for(
        "a leader after restarting every manager",
        Duration::from_secs(30),
        || leader(&lab, "node1"),
    )?;
    // Each replica replays its log once a leader tells it what is committed.
    wait_for(
        "every manager to replay the networks",
        Duration::from_secs(20),
        || {
            ["node1", "node2", "node3"]
                .iter()
                .all(|n| network_ls(&lab, n).is_ok_and(|l| l == before))
                .then_some(())
        },
    )?;
    let old = leader(&lab, "node1").context("no leader")?;
    lab.kill(&old)?;
    let other = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| *n != old)
        .unwrap_or("node1");
    wait_for("a new leader", Duration::from_secs(20), || {
        leader(&lab, other).filter(|l| *l != old)
    })?;
    wait_for(
        "the same networks after a leader change",
        Duration::from_secs(20),
        || {
            network_ls(&lab, other)
                .is_ok_and(|l| l == before)
                .then_some(())
        },
    )?;
    // A prefix of the ID works for rm; the subnet is free again afterwards.
    lab.mesh_ok(other, &["network", "rm", &id[..8]])?;
    lab.mesh_ok(other, &["network", "create", "-d", "overlay", "front2"])?;
    let f2: Value = serde_json::from_str(&lab.mesh_ok(other, &["network", "inspect", "front2"])?)?;
    ensure!(
        f2[0]["IPAM"]["Config"][0]["Subnet"] == "10.0.1.0/24",
        "freed subnet not reused: {f2}"
    );
    let pruned = lab.mesh_ok(other, &["network", "prune", "-f"])?;
    ensure!(
        pruned.contains("front2") && pruned.contains("back") && !pruned.contains("ingress"),
        "{pruned}"
    );
    ensure!(
        network_ls(&lab, other)?.len() == 1,
        "only ingress should remain"
    );
    lab.down()?;
    Ok(())
}

/// Every bad input of the issue: one line, non-zero, no allocation left.
#[test]
fn network_bad_input() -> Result<()> {
    let lab = up("nb", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.50.0.0/16",
            "taken",
        ],
    )?;
    let before = network_ls(&lab, "node1")?;
    let cases: &[(&[&str], &str)] = &[
        (&["--subnet", "10.1.0.0/33", "a"], "invalid subnet"),
        (&["--subnet", "banana", "a"], "invalid subnet"),
        (&["--subnet", "10.1.0.5/24", "a"], "host bits"),
        (
            &["--subnet", "10.1.0.0/24", "--gateway", "10.2.0.1", "a"],
            "gateway",
        ),
        (
            &["--subnet", "10.1.0.0/24", "--gateway", "10.1.0.0", "a"],
            "gateway",
        ),
        (
            &["--subnet", "10.1.0.0/24", "--gateway", "10.1.0.255", "a"],
            "gateway",
        ),
        (
            &["--subnet", "10.1.0.0/24", "--ip-range", "10.1.1.0/25", "a"],
            "range",
        ),
        (&["--subnet", "10.50.3.0/24", "a"], "overlaps"),
        (&["--subnet", "10.0.0.0/8", "a"], "overlaps"),
        (&["--ingress", "ing2"], "ingress network already exists"),
        (&["taken"], "already exists"),
        (&["--opt", "colour=blue", "a"], "unknown option"),
        (&["--gateway", "10.1.0.1", "a"], "need --subnet"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["network", "create", "-d", "overlay"];
        full.extend_from_slice(args);
        refused(&lab, "node1", &full, needle)?;
    }
    refused(
        &lab,
        "node1",
        &["network", "create", "-d", "vlan", "a"],
        "unknown network driver",
    )?;
    for driver in ["bridge", "macvlan"] {
        refused(
            &lab,
            "node1",
            &["network", "create", "-d", driver, "--opt", "encrypted", "a"],
            "--opt encrypted needs -d overlay",
        )?;
    }
    refused(
        &lab,
        "node1",
        &["network", "create", "a b"],
        "invalid network name",
    )?;
    refused(
        &lab,
        "node2",
        &["network", "create", "-d", "overlay", "w"],
        "not a manager",
    )?;
    // A worker lists its local networks only.
    let local = json_lines(&lab.mesh_ok("node2", &["network", "ls", "--format", "json"])?)?;
    ensure!(
        local.iter().all(|n| n["Scope"] == "local") && local.len() == 3,
        "{local:?}"
    );
    refused(&lab, "node1", &["network", "rm", "nosuch"], "not found")?;
    refused(
        &lab,
        "node1",
        &["network", "inspect", "nosuch"],
        "not found",
    )?;
    let after = network_ls(&lab, "node1")?;
    if after != before {
        bail!("a refused create left something: {after:?}");
    }
    let local = json_lines(&lab.mesh_ok("node1", &["network", "ls", "--format", "json"])?)?;
    ensure!(
        local.iter().all(|n| n["Name"] != "a"),
        "a refused local create left something: {local:?}"
    );
    // Docker ignores the option's value and shows `"encrypted": ""`.
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--opt",
            "encrypted=yes",
            "sec",
        ],
    )?;
    let inspect: Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "sec"])?)?;
    ensure!(inspect[0]["Options"]["encrypted"] == "", "{inspect}");
    lab.mesh_ok("node1", &["network", "rm", "sec"])?;
    lab.down()?;
    Ok(())
}
