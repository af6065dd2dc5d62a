//! End-to-end tests of the cluster foundation on labs of network namespaces:
//! real daemons, a real Raft group of several processes, mutual TLS on the
//! lab's underlay.
//!
//! Over 600 lines: each test is one whole lab scenario, and they share
//! this file's helpers; splitting them apart would only move the helpers.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;

/// 3 managers + 2 workers: roles, one leader, everyone Ready, and the
/// manager-only commands refused on workers.
#[test]
fn five_nodes_three_managers() -> Result<()> {
    let lab = up("cf", 5, 3, &[])?;
    let nodes = node_ls(&lab, "node2")?;
    ensure!(nodes.len() == 5, "expected 5 nodes, got {nodes:?}");
    for (i, n) in ["node1", "node2", "node3", "node4", "node5"]
        .iter()
        .enumerate()
    {
        let row = nodes
            .iter()
            .find(|r| r["Hostname"] == *n)
            .context(format!("{n} missing"))?;
        ensure!(row["Status"] == "Ready", "{n} not Ready: {row}");
        ensure!(row["Availability"] == "Active", "{n}: {row}");
        let ms = row["ManagerStatus"].as_str().unwrap_or_default();
        if i < 3 {
            ensure!(
                ms == "Leader" || ms == "Reachable",
                "{n} should be a manager: {row}"
            );
        } else {
            ensure!(ms.is_empty(), "{n} should be a worker: {row}");
        }
    }
    ensure!(
        nodes
            .iter()
            .filter(|r| r["ManagerStatus"] == "Leader")
            .count()
            == 1,
        "one leader"
    );
    let managers = json_lines(&lab.mesh_ok(
        "node3",
        &["node", "ls", "--filter", "role=manager", "--format", "json"],
    )?)?;
    ensure!(managers.len() == 3, "role=manager filter: {managers:?}");

    // Every manager sees the same cluster; the table marks this node.
    let table = lab.mesh_ok("node1", &["node", "ls"])?;
    ensure!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .contains("MANAGER STATUS"),
        "{table}"
    );
    ensure!(
        table.lines().filter(|l| l.contains(" * ")).count() == 1,
        "{table}"
    );

    // Workers cannot use cluster-wide commands.
    refused(&lab, "node4", &["node", "ls"], "not a manager")?;
    refused(&lab, "node5", &["join-token", "worker"], "not a manager")?;
    let info: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node4", &["info", "--format", "json"])?)?;
    ensure!(
        info["Swarm"]["ControlAvailable"] == false && info["Swarm"]["LocalNodeState"] == "active",
        "{info}"
    );
    ensure!(
        info["Swarm"]["RemoteManagers"].as_array().map(Vec::len) == Some(3),
        "{info}"
    );

    // inspect prints Docker's shape.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["node", "inspect", "node4"])?)?;
    ensure!(
        inspect[0]["Spec"]["Role"] == "worker" && inspect[0]["Description"]["Hostname"] == "node4",
        "{inspect}"
    );
    ensure!(
        inspect[0]["Status"]["Addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("192.168.")),
        "{inspect}"
    );
    lab.down()?;
    Ok(())
}

/// kill -9 of the leader: a new leader, writes accepted, the old one shown
/// Down, and after a restart it catches up on what it missed.
#[test]
fn leader_failover_and_catch_up() -> Result<()> {
    let mut lab = up("fo", 5, 3, &[])?;
    let old = leader(&lab, "node1").context("no leader")?;
    let others: Vec<&str> = ["node1", "node2", "node3"]
        .into_iter()
        .filter(|n| *n != old)
        .collect();
    lab.kill(&old)?;

    let ((), t_write) = wait_for(
        "a write accepted after the leader died",
        Duration::from_secs(20),
        || {
            lab.mesh(
                others[0],
                &["node", "update", "--label-add", "after=failover", "node4"],
            )
            .ok()
            .filter(|o| o.status.success())
            .map(|_| ())
        },
    )?;
    let (new, _) = wait_for("a new leader", Duration::from_secs(10), || {
        leader(&lab, others[1]).filter(|l| *l != old)
    })?;
    let (_, t_down) = wait_for(
        "the killed leader shown Down",
        Duration::from_secs(20),
        || {
            let nodes = node_ls(&lab, &new).ok()?;
            (status_of(&nodes, &old)? == "Down").then_some(())
        },
    )?;
    println!(
        "leader {old} killed: write accepted after {t_write:?}, {new} leads, {old} Down after {:?}",
        t_write + t_down
    );
    // Writes made while it was down.
    lab.mesh_ok(
        &new,
        &["node", "update", "--label-add", "while=down", "node5"],
    )?;

    lab.start(&old)?;
    wait_for(
        "the restarted manager Ready",
        Duration::from_secs(20),
        || {
            let nodes = node_ls(&lab, &new).ok()?;
            (status_of(&nodes, &old)? == "Ready").then_some(())
        },
    )?;
    // Its own replica (read locally) has everything committed meanwhile.
    wait_for(
        "the restarted manager caught up",
        Duration::from_secs(20),
        || {
            let out = lab.mesh_ok(&old, &["node", "inspect", "node5"]).ok()?;
            out.contains("\"while\": \"down\"").then_some(())
        },
    )?;
    let nodes = node_ls(&lab, &old)?;
    ensure!(
        nodes
            .iter()
            .filter(|n| n["ManagerStatus"] == "Leader")
            .count()
            == 1,
        "{nodes:?}"
    );
    ensure!(nodes.iter().all(|n| n["Status"] == "Ready"), "{nodes:?}");
    lab.down()?;
    Ok(())
}

/// A worker's daemon killed shows Down within a few seconds and Ready again
/// after it restarts from its state dir; a cut underlay link likewise.
#[test]
fn worker_down_and_back() -> Result<()> {
    let mut lab = up("wd", 3, 1, &[])?;
    lab.kill("node3")?;
    let (_, t) = wait_for("node3 Down", Duration::from_secs(15), || {
        (status_of(&node_ls(&lab, "node1").ok()?, "node3")? == "Down").then_some(())
    })?;
    println!("killed worker shown Down after {t:?}");
    lab.start("node3")?;
    let (_, t) = wait_for("node3 Ready", Duration::from_secs(15), || {
        (status_of(&node_ls(&lab, "node1").ok()?, "node3")? == "Ready").then_some(())
    })?;
    println!("restarted worker Ready after {t:?}");

    lab.cut("node2")?;
    wait_for(
        "node2 Down after its link was cut",
        Duration::from_secs(15),
        || (status_of(&node_ls(&lab, "node1").ok()?, "node2")? == "Down").then_some(()),
    )?;
    lab.heal("node2")?;
    wait_for("node2 Ready after heal", Duration::from_secs(15), || {
        (status_of(&node_ls(&lab, "node1").ok()?, "node2")? == "Ready").then_some(())
    })?;
    lab.down()?;
    Ok(())
}

/// With two of three managers down, writes are refused with a reason rather
/// than hanging; with one back, they are accepted again.
#[test]
fn quorum_loss_refuses_writes() -> Result<()> {
    let mut lab = up("ql", 3, 3, &[])?;
    lab.kill("node2")?;
    lab.kill("node3")?;
    // The lab's command timeout bounds a hang; the "majority" reason shows
    // the write was refused by the managers rather than timed out.
    let start = std::time::Instant::now();
    let err = refused(
        &lab,
        "node1",
        &["node", "update", "--label-add", "x=y", "node1"],
        "managers",
    )?;
    let took = start.elapsed();
    println!("write without quorum refused after {took:?}: {err}");
    ensure!(err.contains("majority"), "{err}");

    lab.start("node2")?;
    wait_for(
        "writes accepted with quorum back",
        Duration::from_secs(30),
        || {
            lab.mesh("node1", &["node", "update", "--label-add", "x=y", "node1"])
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    lab.down()?;
    Ok(())
}

/// Promotion makes a worker a Raft voter with a manager certificate;
/// demotion takes both away.
#[test]
fn promote_and_demote() -> Result<()> {
    let lab = up("pd", 3, 1, &[])?;
    lab.mesh_ok("node1", &["node", "promote", "node2"])?;
    wait_for("node2 to act as a manager", Duration::from_secs(20), || {
        let nodes = node_ls(&lab, "node2").ok()?;
        let row = nodes.iter().find(|n| n["Hostname"] == "node2")?;
        (row["ManagerStatus"] == "Reachable").then_some(())
    })?;
    // node2 is a voter now: node1 + node2 must both agree on writes.
    lab.mesh_ok(
        "node2",
        &["node", "update", "--label-add", "via=node2", "node3"],
    )?;
    lab.mesh_ok("node1", &["node", "demote", "node2"])?;
    wait_for(
        "node2 to be a worker again",
        Duration::from_secs(20),
        || {
            let (code, _, err) = mesh(&lab, "node2", &["node", "ls"]).ok()?;
            (code != 0 && err.contains("not a manager")).then_some(())
        },
    )?;
    refused(&lab, "node1", &["node", "demote", "node1"], "last manager")?;
    // With node2 out of Raft, node1 alone still commits.
    lab.mesh_ok(
        "node1",
        &["node", "update", "--label-add", "after=demote", "node3"],
    )?;
    lab.down()?;
    Ok(())
}

/// With snapshots every 50 entries, managers added later catch up from a
/// snapshot (the early log is gone), and all of them restart from their
/// snapshot plus the log after it.
#[test]
fn managers_catch_up_from_snapshots() -> Result<()> {
    let mut lab = up_with("sn", 3, 1, &[], &["--raft-snapshot-every", "50"])?;
    for i in 0..300 {
        lab.mesh_ok(
            "node1",
            &[
                "node",
                "update",
                "--label-add",
                &format!("k{}=v{i}", i % 7),
                "node1",
            ],
        )?;
    }
    let raft_files = std::fs::read_dir(lab.node("node1")?.state_dir.join("raft"))?.count();
    ensure!(raft_files > 0, "no Raft store on disk");
    let want = lab.mesh_ok("node1", &["node", "inspect", "node1"])?;
    lab.mesh_ok("node1", &["node", "promote", "node2", "node3"])?;
    for n in ["node2", "node3"] {
        wait_for(&format!("{n} to catch up"), Duration::from_secs(30), || {
            let got = lab.mesh_ok(n, &["node", "inspect", "node1"]).ok()?;
            (got.contains("\"k6\": \"v299\"") || got.contains("\"k6\": \"v293\"")).then_some(())
        })?;
    }
    for n in ["node1", "node2", "node3"] {
        lab.kill(n)?;
    }
    for n in ["node1", "node2", "node3"] {
        lab.start(n)?;
    }
    wait_for(
        "a leader after a full restart",
        Duration::from_secs(30),
        || leader(&lab, "node2"),
    )?;
    let labels = |s: &str| -> Option<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(s).ok()?;
        Some(v[0]["Spec"]["Labels"].clone())
    };
    let want = labels(&want).context("labels")?;
    for n in ["node1", "node2", "node3"] {
        wait_for(
            &format!("{n} to reload its state"),
            Duration::from_secs(30),
            || {
                let got = lab.mesh_ok(n, &["node", "inspect", "node1"]).ok()?;
                (labels(&got)? == want).then_some(())
            },
        )?;
    }
    lab.mesh_ok(
        "node3",
        &["node", "update", "--label-add", "after=restart", "node1"],
    )?;
    lab.down()?;
    Ok(())
}

/// Certificates with a short lifetime renew themselves before expiring;
/// the cluster stays connected past the first certificates' expiry.
#[test]
fn certificates_renew_without_restart() -> Result<()> {
    let lab = up("cr", 3, 1, &["--cert-expiry", "16s"])?;
    let expiry = |node: &str| -> Result<String> {
        let info: serde_json::Value =
            serde_json::from_str(&lab.mesh_ok(node, &["info", "--format", "json"])?)?;
        Ok(info["Swarm"]["CertNotAfter"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let first: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| expiry(n))
        .collect::<Result<_>>()?;
    ensure!(first.iter().all(|e| !e.is_empty()), "{first:?}");
    // Past the first certificates' expiry (16 s) with margin.
    std::thread::sleep(Duration::from_secs(20));
    for (i, n) in ["node1", "node2", "node3"].iter().enumerate() {
        let now = expiry(n)?;
        ensure!(
            now > first[i],
            "{n}: certificate not renewed ({} -> {now})",
            first[i]
        );
    }
    let nodes = node_ls(&lab, "node1")?;
    ensure!(
        nodes.iter().all(|n| n["Status"] == "Ready"),
        "after expiry: {nodes:?}"
    );
    lab.mesh_ok(
        "node1",
        &["node", "update", "--label-add", "renewed=yes", "node2"],
    )?;
    lab.down()?;
    Ok(())
}

/// Every bad input of the issue: refused in one line, non-zero, nothing left
/// half-made.
#[test]
fn bad_input_is_refused_cleanly() -> Result<()> {
    let mut lab = up("bi", 3, 1, &[])?;
    let node1_ip = lab.node("node1")?.ip.to_string();
    let remote = format!("{node1_ip}:2377");
    refused(&lab, "node1", &["init"], "already part of a cluster")?;
    let wt = lab
        .mesh_ok("node1", &["join-token", "-q", "worker"])?
        .trim()
        .to_string();
    refused(
        &lab,
        "node2",
        &["join", "--token", &wt, &remote],
        "already part of a cluster",
    )?;

    // node3 leaves, then tries to come back with bad tokens.
    lab.mesh_ok("node3", &["leave"])?;
    let gone_after = |lab: &mesh_lab::Lab| -> Result<()> {
        let info: serde_json::Value =
            serde_json::from_str(&lab.mesh_ok("node3", &["info", "--format", "json"])?)?;
        ensure!(
            info["Swarm"]["LocalNodeState"] == "inactive",
            "node3 half-joined: {info}"
        );
        ensure!(
            !lab.node("node3")?.state_dir.join("node.json").exists(),
            "node.json left behind"
        );
        ensure!(
            !lab.node("node3")?.state_dir.join("certs").exists(),
            "certs left behind"
        );
        Ok(())
    };
    let before = node_ls(&lab, "node1")?.len();
    refused(
        &lab,
        "node3",
        &["join", "--token", "SWMTKN-1-nonsense", &remote],
        "invalid join token",
    )?;
    let (digest_secret, secret) = wt.rsplit_once('-').context("token shape")?;
    let wrong_secret = format!("{digest_secret}-{}", "0".repeat(secret.len()));
    refused(
        &lab,
        "node3",
        &["join", "--token", &wrong_secret, &remote],
        "wrong or has been rotated",
    )?;
    let wrong_digest = format!("SWMTKN-1-{}-{secret}", "1".repeat(50));
    refused(
        &lab,
        "node3",
        &["join", "--token", &wrong_digest, &remote],
        "does not match the join token",
    )?;
    lab.mesh_ok("node1", &["join-token", "--rotate", "worker"])?;
    refused(&lab, "node3", &["join", "--token", &wt, &remote], "rotated")?;
    refused(
        &lab,
        "node3",
        &["join", "--token", &wt, "192.168.254.254:1"],
        "no route",
    )?;
    // Routable, but nobody answers there.
    let wt = lab
        .mesh_ok("node1", &["join-token", "-q", "worker"])?
        .trim()
        .to_string();
    let prefix = node1_ip
        .rsplit_once('.')
        .map(|(n, _)| n.to_string())
        .unwrap_or_default();
    let nobody = format!("{prefix}.250:2377");
    refused(
        &lab,
        "node3",
        &["join", "--token", &wt, &nobody],
        "cannot reach manager",
    )?;
    // Bad network defaults at init: nothing is created.
    for (args, needle) in [
        (&["--default-addr-pool", "10.0.0.0/33"][..], "address pool"),
        (
            &[
                "--default-addr-pool",
                "10.20.0.0/20",
                "--default-addr-pool-mask-length",
                "16",
            ][..],
            "shorter than pool",
        ),
        (
            &[
                "--default-addr-pool",
                "10.0.0.0/8",
                "--default-addr-pool",
                "10.1.0.0/16",
            ][..],
            "overlaps",
        ),
        (&["--data-path-port", "80"][..], "between 1024 and 49151"),
    ] {
        let mut full = vec!["init", "--advertise-addr", "192.168.254.1"];
        full.extend_from_slice(args);
        refused(&lab, "node3", &full, needle)?;
    }
    gone_after(&lab)?;
    ensure!(
        node_ls(&lab, "node1")?.len() == before,
        "a refused join added a node"
    );

    // A worker certificate calling the managers' API and Raft.
    worker_cert_is_refused(&lab, "node2", &remote)?;

    // A removed node reconnecting with its old certificate.
    lab.kill("node2")?;
    wait_for("node2 Down", Duration::from_secs(15), || {
        (status_of(&node_ls(&lab, "node1").ok()?, "node2")? == "Down").then_some(())
    })?;
    lab.mesh_ok("node1", &["node", "rm", "node2"])?;
    lab.start("node2")?;
    let (err, _) = wait_for("node2 told it was removed", Duration::from_secs(15), || {
        let info: serde_json::Value =
            serde_json::from_str(&lab.mesh_ok("node2", &["info", "--format", "json"]).ok()?)
                .ok()?;
        let e = info["Swarm"]["Error"].as_str()?.to_string();
        e.contains("removed").then_some(e)
    })?;
    println!("removed node: {err}");
    ensure!(
        node_ls(&lab, "node1")?
            .iter()
            .all(|n| n["Hostname"] != "node2"),
        "node2 still listed"
    );

    // Managers cannot be removed before demotion; Ready nodes need --force.
    refused(&lab, "node1", &["node", "rm", "node1"], "demote it")?;
    refused(
        &lab,
        "node1",
        &["node", "inspect", "nosuchnode"],
        "no such node",
    )?;

    // A daemon that is not running.
    lab.kill("node3")?;
    refused(&lab, "node3", &["info"], "is `mesh daemon` running?")?;
    lab.down()?;
    Ok(())
}

/// Calls the leader's cluster port with a worker's own certificate, from
/// inside the worker's network namespace.
fn worker_cert_is_refused(lab: &mesh_lab::Lab, worker: &str, remote: &str) -> Result<()> {
    let node = lab.node(worker)?;
    let certs = mesh_worker::state_dir::StateDir::new(&node.state_dir).load_certs()?;
    let netns = std::path::PathBuf::from("/run/netns").join(&node.netns);
    let remote = remote.to_string();
    let result = std::thread::spawn(move || -> Result<Vec<(String, tonic::Code, String)>> {
        // setns affects only this thread; it never returns to a shared pool.
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let id = mesh_common::tls::ReloadableIdentity::new(&certs.cert, &certs.key)?;
            let cfg = mesh_common::tls::client_config(&certs.ca, Some(id))?;
            let ch = mesh_common::tls::connect(
                &remote,
                cfg,
                mesh_common::tls::MANAGER_SERVER_NAME,
                Duration::from_secs(5),
            )
            .await?;
            let mut out = Vec::new();
            let cmd =
                serde_json::to_vec(&mesh_manager::state::Command::RemoveNode { id: "x".into() })?;
            let r = mesh_proto::cluster_client::ClusterClient::new(ch.clone())
                .propose(mesh_proto::ProposeRequest { command: cmd })
                .await;
            out.push((
                "propose".into(),
                r.err().map(|s| s.code()).unwrap_or(tonic::Code::Ok),
                String::new(),
            ));
            let r = mesh_proto::raft_client::RaftClient::new(ch.clone())
                .vote(mesh_proto::RaftBytes {
                    data: b"{}".to_vec(),
                })
                .await;
            out.push((
                "raft vote".into(),
                r.err().map(|s| s.code()).unwrap_or(tonic::Code::Ok),
                String::new(),
            ));
            // The heartbeat is what workers may call: it must work.
            let r = mesh_proto::cluster_client::ClusterClient::new(ch)
                .heartbeat(mesh_proto::HeartbeatRequest::default())
                .await;
            out.push((
                "heartbeat".into(),
                r.as_ref()
                    .err()
                    .map(|s| s.code())
                    .unwrap_or(tonic::Code::Ok),
                r.err().map(|s| s.message().to_string()).unwrap_or_default(),
            ));
            Ok(out)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("worker-certificate thread panicked"))??;
    for (what, code, msg) in &result {
        match what.as_str() {
            "heartbeat" => ensure!(
                *code == tonic::Code::Ok,
                "worker heartbeat refused: {code:?} {msg}"
            ),
            _ => ensure!(
                *code == tonic::Code::PermissionDenied,
                "{what} with a worker certificate: {code:?}"
            ),
        }
    }
    if result.len() != 3 {
        bail!("expected 3 calls, got {result:?}");
    }
    Ok(())
}
