//! End-to-end tests of the overlay data path on namespace labs: sandboxes on
//! different nodes talk over VXLAN; networks are isolated; the data path heals
//! and cleans up after itself.
//!
//! Over 600 lines: each test is one whole lab scenario, and they share
//! this file's helpers; splitting them apart would only move the helpers.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;

fn run(lab: &mesh_lab::Lab, node: &str, name: &str, net: &str, cmd: &[&str]) -> Result<String> {
    let mut args = vec!["run", "-d", "--name", name, "--network", net, "--"];
    args.extend_from_slice(cmd);
    Ok(lab.mesh_ok(node, &args)?.trim().to_string())
}

fn sh(lab: &mesh_lab::Lab, node: &str, sandbox: &str, cmd: &str) -> Result<std::process::Output> {
    Ok(lab.mesh(node, &["exec", sandbox, "--", "sh", "-c", cmd])?)
}

/// Ping and TCP between sandboxes on two nodes; the underlay carries VXLAN
/// on the data-path port with the network's VNI; networks are isolated.
#[test]
fn sandboxes_talk_across_nodes() -> Result<()> {
    let lab = up("ov", 3, 1, &[])?;
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
    lab.mesh_ok("node1", &["network", "create", "-d", "overlay", "plain"])?;
    run(
        &lab,
        "node2",
        "web",
        "app",
        &["python3", "-m", "http.server", "8080"],
    )?;
    run(&lab, "node3", "client", "app", &["sleep", "600"])?;
    run(&lab, "node3", "stranger", "other", &["sleep", "600"])?;
    let web = sandbox_ip(&lab, "node2", "web")?;
    ensure!(web.starts_with("10.0.1."), "web got {web}");

    let (_, t) = wait_for("ping across nodes", Duration::from_secs(10), || {
        sh(&lab, "node3", "client", &format!("ping -c1 -W1 {web}"))
            .ok()
            .filter(|o| o.status.success())
    })?;
    println!("cross-node ping works {t:?} after run");
    let (out, _) = wait_for("HTTP across nodes", Duration::from_secs(10), || {
        let o = sh(
            &lab,
            "node3",
            "client",
            &format!("curl -s -m 2 http://{web}:8080/"),
        )
        .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    })?;
    ensure!(
        out.contains("Directory listing"),
        "unexpected HTTP answer: {out}"
    );

    // The underlay carries UDP to port 4789 with the network's VNI.
    let vni = json_lines(&lab.mesh_ok(
        "node1",
        &["network", "ls", "--format", "json", "--filter", "name=app"],
    )?)?[0]["VNI"]
        .as_u64()
        .context("VNI")?;
    let node2 = lab.node("node2")?.netns.clone();
    let capture = std::process::Command::new("ip")
        .args([
            "netns", "exec", &node2, "timeout", "8", "tcpdump", "-i", "eth0", "-c", "2", "-nn",
            "udp", "port", "4789",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(700));
    sh(
        &lab,
        "node3",
        "client",
        &format!("ping -c3 -i0.2 -W1 {web}"),
    )?;
    let dump = String::from_utf8_lossy(&capture.wait_with_output()?.stdout).into_owned();
    println!("tcpdump on node2's underlay:\n{dump}");
    ensure!(
        dump.contains(&format!("vni {vni}")) && dump.contains(".4789"),
        "no VXLAN with VNI {vni} seen: {dump}"
    );

    // Isolation: another network, on the same node and across nodes.
    let stranger = sandbox_ip(&lab, "node3", "stranger")?;
    ensure!(
        !sh(&lab, "node3", "stranger", &format!("ping -c1 -W1 {web}"))?
            .status
            .success(),
        "other network reached web"
    );
    let client = sandbox_ip(&lab, "node3", "client")?;
    ensure!(
        !sh(&lab, "node3", "client", &format!("ping -c1 -W1 {stranger}"))?
            .status
            .success(),
        "app reached other"
    );
    ensure!(
        !sh(&lab, "node3", "stranger", &format!("ping -c1 -W1 {client}"))?
            .status
            .success(),
        "same-node isolation"
    );

    // Egress through mesh_gwbridge: the sandbox's default route.
    let route = sh(&lab, "node3", "client", "ip route show default")?;
    ensure!(
        String::from_utf8_lossy(&route.stdout).contains("172.18.0.1"),
        "no gwbridge default route"
    );

    // /etc/hosts and hostname as Docker writes them.
    let hosts = sh(&lab, "node2", "web", "cat /etc/hosts; hostname")?;
    let hosts = String::from_utf8_lossy(&hosts.stdout).into_owned();
    ensure!(
        hosts.contains(&format!("{web}\tweb")) && hosts.trim_end().ends_with("web"),
        "{hosts}"
    );

    // Bad input: nothing half-made.
    let before = netns_with_prefix(&ns_prefix(&lab, "node3")?);
    refused(
        &lab,
        "node3",
        &[
            "run",
            "--name",
            "x",
            "--network",
            "plain",
            "--",
            "sleep",
            "1",
        ],
        "not manually attachable",
    )?;
    refused(
        &lab,
        "node3",
        &[
            "run",
            "--name",
            "x",
            "--network",
            "nosuch",
            "--",
            "sleep",
            "1",
        ],
        "not found",
    )?;
    refused(
        &lab,
        "node3",
        &[
            "run",
            "--name",
            "client",
            "--network",
            "app",
            "--",
            "sleep",
            "1",
        ],
        "already in use",
    )?;
    refused(
        &lab,
        "node3",
        &[
            "run",
            "--name",
            "x",
            "--network",
            "app",
            "--",
            "no-such-command-xyz",
        ],
        "not found in PATH",
    )?;
    ensure!(
        netns_with_prefix(&ns_prefix(&lab, "node3")?) == before,
        "a refused run left a namespace"
    );
    let eps = lab.mesh_ok("node1", &["network", "inspect", "app"])?;
    ensure!(!eps.contains("\"x\""), "a refused run left an endpoint");
    refused(&lab, "node1", &["network", "rm", "app"], "web on node2")?;
    refused(&lab, "node2", &["rm", "web"], "is running")?;
    lab.down()?;
    Ok(())
}

/// FDB entries deleted by hand come back; a daemon restart keeps running
/// sandboxes connected; removing the last sandbox removes the network's
/// namespace and links; nothing is left.
#[test]
fn data_path_heals_and_cleans_up() -> Result<()> {
    let mut lab = up("oh", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    run(&lab, "node1", "a", "app", &["sleep", "600"])?;
    run(&lab, "node2", "b", "app", &["sleep", "600"])?;
    let b = sandbox_ip(&lab, "node2", "b")?;
    wait_for("ping a -> b", Duration::from_secs(10), || {
        sh(&lab, "node1", "a", &format!("ping -c1 -W1 {b}"))
            .ok()
            .filter(|o| o.status.success())
    })?;
    let vni = json_lines(&lab.mesh_ok(
        "node1",
        &["network", "ls", "--format", "json", "--filter", "name=app"],
    )?)?[0]["VNI"]
        .as_u64()
        .context("VNI")?;
    let ovns = format!("{}-ov-{vni}", ns_prefix(&lab, "node1")?);
    let fdb = |ns: &str| -> Result<String> {
        let o = std::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "bridge", "fdb", "show", "dev", "vxlan0",
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let before = fdb(&ovns)?;
    let mac = before
        .lines()
        .find(|l| l.contains("dst "))
        .and_then(|l| l.split_whitespace().next())
        .context(format!("no remote FDB entry in {ovns}: {before}"))?
        .to_string();
    let st = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ovns, "bridge", "fdb", "del", &mac, "dev", "vxlan0", "self",
        ])
        .status()?;
    ensure!(st.success(), "could not delete the FDB entry");
    // Only the static entry pointing at the remote node counts (the bridge
    // may also have learned the MAC on vxlan0, without a dst).
    let has_static = |f: &str| f.lines().any(|l| l.starts_with(&mac) && l.contains("dst "));
    ensure!(!has_static(&fdb(&ovns)?), "the FDB entry did not go away");
    let (_, t) = wait_for(
        "the FDB entry to come back",
        Duration::from_secs(10),
        || fdb(&ovns).ok().filter(|f| has_static(f)).map(|_| ()),
    )?;
    println!("FDB entry deleted by hand was restored after {t:?}");

    // Restart the daemon: the sandbox keeps its connectivity, nothing leaks.
    let links_before = netns_with_prefix(&ns_prefix(&lab, "node1")?);
    lab.kill("node1")?;
    // What a crash half-way through `mesh run` could leave: it must go.
    let orphan = format!("{}-sb-orphan0000", ns_prefix(&lab, "node1")?);
    ensure!(
        std::process::Command::new("ip")
            .args(["netns", "add", &orphan])
            .status()?
            .success()
    );
    lab.start("node1")?;
    wait_for(
        "the orphaned namespace to be removed",
        Duration::from_secs(10),
        || (!netns_with_prefix(&orphan).contains(&orphan)).then_some(()),
    )?;
    wait_for(
        "ping after a daemon restart",
        Duration::from_secs(10),
        || {
            sh(&lab, "node1", "a", &format!("ping -c1 -W1 {b}"))
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    ensure!(
        netns_with_prefix(&ns_prefix(&lab, "node1")?) == links_before,
        "namespaces changed across a restart"
    );

    // Removing the last sandbox on a node removes the network from it.
    lab.mesh_ok("node1", &["rm", "-f", "a"])?;
    wait_for(
        "the network namespace to go",
        Duration::from_secs(10),
        || (!netns_with_prefix(&ns_prefix(&lab, "node1").ok()?).contains(&ovns)).then_some(()),
    )?;
    // What stays is the routing mesh every node has, as Swarm's
    // ingress_sbox: the ingress sandbox and the ingress network.
    let ingress_vni = json_lines(&lab.mesh_ok(
        "node1",
        &[
            "network",
            "ls",
            "--format",
            "json",
            "--filter",
            "name=ingress",
        ],
    )?)?[0]["VNI"]
        .as_u64()
        .context("ingress VNI")?;
    let mesh_only = |node: &str| -> Option<Vec<String>> {
        let p = ns_prefix(&lab, node).ok()?;
        let mut left = netns_with_prefix(&p);
        left.retain(|n| *n != format!("{p}-ingress") && *n != format!("{p}-ov-{ingress_vni}"));
        Some(left)
    };
    ensure!(
        mesh_only("node1").is_some_and(|l| l.is_empty()),
        "node1 left namespaces behind: {:?}",
        mesh_only("node1")
    );
    lab.mesh_ok("node2", &["rm", "-f", "b"])?;
    lab.mesh_ok("node1", &["network", "rm", "app"])?;
    wait_for("node2 to clean up", Duration::from_secs(10), || {
        mesh_only("node2")?.is_empty().then_some(())
    })?;

    // Sandboxes still running when the lab goes down go with it.
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "late"],
    )?;
    run(&lab, "node2", "c", "late", &["sleep", "600"])?;
    let node2_prefix = ns_prefix(&lab, "node2")?;
    let c_ns = netns_with_prefix(&format!("{node2_prefix}-sb-"))
        .into_iter()
        .next()
        .context("c's namespace")?;
    let c_pids = std::process::Command::new("ip")
        .args(["netns", "pids", &c_ns])
        .output()?;
    let c_pids = String::from_utf8_lossy(&c_pids.stdout).into_owned();
    ensure!(!c_pids.trim().is_empty(), "no process in {c_ns}");
    refused(&lab, "node1", &["network", "rm", "late"], "c on node2")?;
    lab.down()?;
    ensure!(
        netns_with_prefix(&node2_prefix).is_empty(),
        "lab down left node2's namespaces"
    );
    for pid in c_pids.split_whitespace() {
        // A zombie waiting for init to reap it is not running.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        ensure!(
            matches!(state, None | Some('Z')),
            "sandbox process {pid} outlived lab down: {stat}"
        );
    }
    Ok(())
}

/// Interfaces added and removed at run time; inspect shows Containers and
/// Peers; the MTU follows the underlay (minus 50) unless --opt mtu says.
#[test]
fn connect_disconnect_inspect_and_mtu() -> Result<()> {
    let lab = up("oc", 2, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "a1"],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "--opt",
            "mtu=1400",
            "a2",
        ],
    )?;
    run(&lab, "node2", "s1", "a1", &["sleep", "600"])?;
    run(&lab, "node1", "s0", "a2", &["sleep", "600"])?;
    let s0 = sandbox_ip(&lab, "node1", "s0")?;
    let mtu = |node: &str, sb: &str, ifname: &str| -> Result<String> {
        let o = sh(&lab, node, sb, &format!("cat /sys/class/net/{ifname}/mtu"))?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let m = mtu("node2", "s1", "eth0")?;
    ensure!(m == "1450", "underlay 1500 - 50 expected, got {m}");
    ensure!(
        mtu("node1", "s0", "eth0")? == "1400",
        "--opt mtu=1400 expected"
    );
    ensure!(
        !sh(&lab, "node2", "s1", &format!("ping -c1 -W1 {s0}"))?
            .status
            .success(),
        "a1 reached a2"
    );

    lab.mesh_ok("node2", &["network", "connect", "a2", "s1"])?;
    refused(
        &lab,
        "node2",
        &["network", "connect", "a2", "s1"],
        "already connected",
    )?;
    let addrs =
        String::from_utf8_lossy(&sh(&lab, "node2", "s1", "ip -br addr")?.stdout).into_owned();
    ensure!(
        addrs.contains("eth1") && addrs.contains("10.0.2."),
        "{addrs}"
    );
    wait_for(
        "s1 to reach s0 over the connected network",
        Duration::from_secs(10),
        || {
            sh(&lab, "node2", "s1", &format!("ping -c1 -W1 {s0}"))
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "a2"])?)?;
    let containers = inspect[0]["Containers"].as_object().context("Containers")?;
    ensure!(
        containers
            .values()
            .any(|c| c["Name"] == "s0" && c["IPv4Address"] == format!("{s0}/24")),
        "{inspect}"
    );
    let peers = inspect[0]["Peers"].as_array().context("Peers")?;
    ensure!(peers.len() == 2, "both nodes have a2 now: {inspect}");

    lab.mesh_ok("node2", &["network", "disconnect", "a2", "s1"])?;
    refused(
        &lab,
        "node2",
        &["network", "disconnect", "a2", "s1"],
        "not connected",
    )?;
    let addrs =
        String::from_utf8_lossy(&sh(&lab, "node2", "s1", "ip -br addr")?.stdout).into_owned();
    ensure!(!addrs.contains("eth1"), "{addrs}");
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "a2"])?)?;
    ensure!(
        inspect[0]["Peers"].as_array().map(Vec::len) == Some(1),
        "{inspect}"
    );
    lab.down()?;
    Ok(())
}

/// Docker's local drivers on one node: the default bridge (with NAT to the
/// underlay), an isolated user bridge, host, none and macvlan.
#[test]
fn local_drivers() -> Result<()> {
    let lab = up("ol", 2, 1, &[])?;
    let node1_ip = lab.node("node1")?.ip.to_string();
    // Attached: the command's output, then its exit code.
    let out = lab.mesh(
        "node2",
        &[
            "run",
            "--name",
            "t1",
            "--",
            "sh",
            "-c",
            "echo hello from $(hostname); exit 3",
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == Some(3) && text.contains("hello from t1"),
        "attached run: {:?} {text}",
        out.status
    );
    refused(&lab, "node2", &["exec", "t1", "--", "true"], "not running")?;
    lab.mesh_ok(
        "node2",
        &["run", "-d", "--name", "b1", "--", "sleep", "600"],
    )?;
    lab.mesh_ok(
        "node2",
        &["run", "-d", "--name", "b2", "--", "sleep", "600"],
    )?;
    let b2 = sandbox_ip(&lab, "node2", "b2")?;
    ensure!(b2.starts_with("172.17."), "default bridge address {b2}");
    ensure!(
        sh(&lab, "node2", "b1", &format!("ping -c1 -W1 {b2}"))?
            .status
            .success(),
        "b1 -> b2 on bridge"
    );
    // NAT out of the node: the underlay sees node2's address.
    ensure!(
        sh(&lab, "node2", "b1", &format!("ping -c1 -W1 {node1_ip}"))?
            .status
            .success(),
        "bridge egress"
    );

    // A sandbox link deleted by hand comes back on the agent's next pass.
    let b1_id = ps(&lab, "node2")?
        .iter()
        .find(|s| s["Names"] == "b1")
        .and_then(|s| s["ID"].as_str().map(String::from))
        .context("b1")?;
    let b1_ns = format!("{}-sb-{}", ns_prefix(&lab, "node2")?, &b1_id[..12]);
    ensure!(
        std::process::Command::new("ip")
            .args(["netns", "exec", &b1_ns, "ip", "link", "del", "eth0"])
            .status()?
            .success()
    );
    let (_, t) = wait_for("b1's eth0 to be restored", Duration::from_secs(10), || {
        sh(&lab, "node2", "b1", &format!("ping -c1 -W1 {b2}"))
            .ok()
            .filter(|o| o.status.success())
    })?;
    println!("bridge link deleted by hand restored after {t:?}");

    lab.mesh_ok("node2", &["network", "create", "priv"])?;
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "p1",
            "--network",
            "priv",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let p1 = sandbox_ip(&lab, "node2", "p1")?;
    ensure!(p1.starts_with("172.19."), "user bridge address {p1}");
    ensure!(
        !sh(&lab, "node2", "p1", &format!("ping -c1 -W1 {b2}"))?
            .status
            .success(),
        "priv reached bridge"
    );
    ensure!(
        !sh(&lab, "node2", "b1", &format!("ping -c1 -W1 {p1}"))?
            .status
            .success(),
        "bridge reached priv"
    );

    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "h1",
            "--network",
            "host",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let addrs =
        String::from_utf8_lossy(&sh(&lab, "node2", "h1", "ip -br addr")?.stdout).into_owned();
    ensure!(
        addrs.contains(&lab.node("node2")?.ip.to_string()),
        "host sandbox sees the node's address: {addrs}"
    );
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "n1",
            "--network",
            "none",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let addrs =
        String::from_utf8_lossy(&sh(&lab, "node2", "n1", "ip -br addr")?.stdout).into_owned();
    ensure!(
        addrs.lines().count() == 1 && addrs.starts_with("lo"),
        "none sandbox: {addrs}"
    );

    let prefix = lab
        .node("node2")?
        .ip
        .to_string()
        .rsplit_once('.')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    lab.mesh_ok(
        "node2",
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "-o",
            "parent=eth0",
            "--subnet",
            &format!("{prefix}.0/24"),
            "--ip-range",
            &format!("{prefix}.128/25"),
            "mv",
        ],
    )?;
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "m1",
            "--network",
            "mv",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let m1 = sandbox_ip(&lab, "node2", "m1")?;
    ensure!(
        m1.starts_with(&format!("{prefix}.12")) || m1.starts_with(&format!("{prefix}.1")),
        "macvlan address {m1}"
    );
    let (_, _) = wait_for(
        "macvlan sandbox to reach node1 on the underlay",
        Duration::from_secs(10),
        || {
            sh(&lab, "node2", "m1", &format!("ping -c1 -W1 {node1_ip}"))
                .ok()
                .filter(|o| o.status.success())
        },
    )?;

    refused(
        &lab,
        "node2",
        &[
            "network",
            "create",
            "-d",
            "macvlan",
            "-o",
            "parent=nope0",
            "mv2",
        ],
        "does not exist",
    )?;
    refused(&lab, "node2", &["network", "rm", "bridge"], "pre-defined")?;
    refused(&lab, "node2", &["network", "rm", "priv"], "in use by p1")?;
    refused(
        &lab,
        "node2",
        &[
            "run",
            "--network",
            "host",
            "--network",
            "priv",
            "--",
            "true",
        ],
        "cannot be connected",
    )?;
    lab.mesh_ok("node2", &["rm", "-f", "p1"])?;
    lab.mesh_ok("node2", &["network", "rm", "priv"])?;
    let prefix_ns = ns_prefix(&lab, "node2")?;
    lab.down()?;
    ensure!(
        netns_with_prefix(&prefix_ns).is_empty(),
        "namespaces left behind"
    );
    Ok(())
}

/// An --internal overlay connects its sandboxes across nodes but gives them
/// no way out: no gwbridge interface, no default route.
#[test]
fn internal_overlay_has_no_egress() -> Result<()> {
    let lab = up("oi", 2, 1, &[])?;
    let node1_ip = lab.node("node1")?.ip.to_string();
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "--internal",
            "int",
        ],
    )?;
    run(&lab, "node1", "i1", "int", &["sleep", "600"])?;
    run(&lab, "node2", "i2", "int", &["sleep", "600"])?;
    let i1 = sandbox_ip(&lab, "node1", "i1")?;
    wait_for(
        "i2 to reach i1 over the internal overlay",
        Duration::from_secs(10),
        || {
            sh(&lab, "node2", "i2", &format!("ping -c1 -W1 {i1}"))
                .ok()
                .filter(|o| o.status.success())
        },
    )?;
    let links = String::from_utf8_lossy(&sh(&lab, "node2", "i2", "ip -br link; ip route")?.stdout)
        .into_owned();
    ensure!(
        !links.contains("gw0") && !links.contains("default"),
        "internal sandbox has a way out: {links}"
    );
    ensure!(
        !sh(&lab, "node2", "i2", &format!("ping -c1 -W1 {node1_ip}"))?
            .status
            .success(),
        "reached the underlay"
    );
    lab.down()?;
    Ok(())
}
