//! End-to-end tests of the embedded DNS: real `dig` from inside sandboxes on
//! a 3-node lab, names across nodes, scoped by network, forwarding to an
//! upstream (dnsmasq) that the test runs inside the lab.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;

/// Kills the upstream DNS server even when the test fails.
struct Upstream(std::process::Child);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn names_resolve_across_nodes_scoped_by_network() -> Result<()> {
    let lab = up_with("dn", 3, 1, &[], &["--dns-upstream", "127.0.0.1:5353"])?;
    let _upstream = Upstream(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.node("node3")?.netns,
                "dnsmasq",
                "--no-daemon",
                "--port=5353",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--address=/example.test/192.0.2.10"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("dnsmasq (Debian's dnsmasq-base) is needed")?,
    );
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "other",
        ],
    )?;
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--network",
            "app",
            "--network-alias",
            "www",
            "--",
            "sleep",
            "600",
        ],
    )?;
    lab.mesh_ok(
        "node3",
        &[
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "app",
            "--",
            "sleep",
            "600",
        ],
    )?;
    lab.mesh_ok(
        "node3",
        &[
            "run",
            "-d",
            "--name",
            "db",
            "--network",
            "other",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let web = sandbox_ip(&lab, "node2", "web")?;

    let resolv = lab.mesh_ok(
        "node3",
        &["exec", "client", "--", "cat", "/etc/resolv.conf"],
    )?;
    ensure!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");
    let (_, _) = wait_for("web resolvable from node3", Duration::from_secs(10), || {
        dig_answers(&dig(&lab, "node3", "client", "web").ok()?)
            .contains(&web)
            .then_some(())
    })?;
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "www")?) == vec![web.clone()],
        "alias"
    );
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "WEB.")?) == vec![web.clone()],
        "case and trailing dot"
    );
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "tasks.web")?) == vec![web.clone()],
        "tasks.NAME"
    );
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "+tcp web")?) == vec![web.clone()],
        "TCP"
    );
    // Docker's `<name>.<network>`: names, aliases and tasks.NAME qualified
    // by the network's name; another network's qualified name stays hidden.
    for q in ["web.app", "WWW.App.", "tasks.web.app"] {
        ensure!(
            dig_answers(&dig(&lab, "node3", "client", q)?) == vec![web.clone()],
            "qualified {q}"
        );
    }
    ensure!(
        dig_status(&dig(&lab, "node3", "client", "db.other")?) == "NXDOMAIN",
        "db.other leaked across networks"
    );
    // With and without EDNS, and an EDNS size below 512.
    for opts in ["+noedns web", "+bufsize=1232 web", "+bufsize=100 web"] {
        ensure!(
            dig_answers(&dig(&lab, "node3", "client", opts)?) == vec![web.clone()],
            "{opts}"
        );
    }
    let aaaa = dig(&lab, "node3", "client", "AAAA web")?;
    ensure!(
        dig_status(&aaaa) == "NOERROR" && dig_answers(&aaaa).is_empty(),
        "AAAA: {aaaa}"
    );
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", &format!("-x {web}"))?)
            == vec!["web.".to_string()],
        "PTR"
    );
    // Scoped: db is on another network, even on the same node.
    ensure!(
        dig_status(&dig(&lab, "node3", "client", "db")?) == "NXDOMAIN",
        "db leaked across networks"
    );
    ensure!(
        dig_status(&dig(&lab, "node3", "db", "web")?) == "NXDOMAIN",
        "web leaked to other"
    );
    ensure!(
        dig_status(&dig(&lab, "node3", "client", "nosuch")?) == "NXDOMAIN",
        "unknown name"
    );
    // Forwarded to the upstream, over UDP and TCP.
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "example.test")?)
            == vec!["192.0.2.10".to_string()],
        "forwarding"
    );
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "+tcp example.test")?)
            == vec!["192.0.2.10".to_string()],
        "TCP fwd"
    );
    // Garbage does not hurt the server.
    lab.mesh(
        "node3",
        &["exec", "client", "--", "sh", "-c", "head -c 300 /dev/urandom > /dev/udp/127.0.0.11/53; head -c 300 /dev/urandom > /dev/tcp/127.0.0.11/53; true"],
    )?;
    ensure!(
        dig_answers(&dig(&lab, "node3", "client", "web")?) == vec![web.clone()],
        "server hurt by garbage"
    );

    // Propagation: a new sandbox on node2 becomes resolvable on node3, and
    // goes away as fast.
    let t = Instant::now();
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "late",
            "--network",
            "app",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let (_, _) = wait_for("late resolvable on node3", Duration::from_secs(10), || {
        (!dig_answers(&dig(&lab, "node3", "client", "late").ok()?).is_empty()).then_some(())
    })?;
    println!(
        "sandbox started on node2 resolvable on node3 after {:?} (including mesh run)",
        t.elapsed()
    );
    lab.mesh_ok("node2", &["rm", "-f", "late"])?;
    let (_, gone) = wait_for("late gone on node3", Duration::from_secs(10), || {
        (dig_status(&dig(&lab, "node3", "client", "late").ok()?) == "NXDOMAIN").then_some(())
    })?;
    println!("removed sandbox NXDOMAIN on node3 after {gone:?}");
    lab.down()?;
    Ok(())
}

/// User-defined bridge networks resolve their sandboxes' names too.
#[test]
fn names_on_a_local_bridge() -> Result<()> {
    let lab = up("db", 1, 1, &[])?;
    lab.mesh_ok("node1", &["network", "create", "mine"])?;
    // (Not "a" or "b": to dig those are record types.)
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "alpha",
            "--network",
            "mine",
            "--",
            "sleep",
            "600",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "beta",
            "--network",
            "mine",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let alpha = sandbox_ip(&lab, "node1", "alpha")?;
    wait_for(
        "alpha resolvable from beta",
        Duration::from_secs(10),
        || {
            dig_answers(&dig(&lab, "node1", "beta", "alpha").ok()?)
                .contains(&alpha)
                .then_some(())
        },
    )?;
    ensure!(
        dig_answers(&dig(&lab, "node1", "beta", "alpha.mine")?) == vec![alpha.clone()],
        "alpha.mine"
    );
    let ping = lab.mesh(
        "node1",
        &["exec", "beta", "--", "ping", "-c1", "-W1", "alpha"],
    )?;
    ensure!(ping.status.success(), "ping by name on a bridge");
    lab.down()?;
    Ok(())
}
