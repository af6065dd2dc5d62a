//! End-to-end tests of published ports (issue 12) on namespace labs with an
//! outside host (`host1`): the ingress routing mesh keeps the client's
//! address, UDP through ingress, host mode, a node dying, `network rm
//! ingress` and a custom ingress network with its MTU, a restart of every
//! daemon leaving the same rules, and `mesh run -p`. The servers are
//! tests/fixtures/ingress_server.py (they answer "HOSTNAME PEER").
//!
//! Two labs, one per test, so CI's two test threads run them side by side.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_lab::{Lab, UpSpec};

/// The server every task runs; tasks see the host's filesystem.
const SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ingress_server.py"
);

/// A 3-node lab with one outside host.
fn up_with_host(tag: &str) -> Result<Lab> {
    let name = lab_name(tag);
    let _ = mesh_lab::cleanup_stale(&name);
    let mut spec = UpSpec::new(&name, 3, 1);
    spec.hosts = 1;
    Lab::up(&spec, mesh_bin()).with_context(|| format!("lab {name} did not come up"))
}

/// Says which step runs, so a failure in CI's log is placed at once.
fn step(what: &str) {
    eprintln!("ingress test: {what}");
}

/// One answer of the test server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Answer {
    /// The task (its hostname, `name.id`) that answered.
    task: String,
    /// The client address that task saw.
    peer: String,
}

/// Parses answers, one per line; "FAIL" lines (a request that got no answer) are counted.
fn parse_answers(out: &str) -> (Vec<Answer>, usize) {
    let mut answers = Vec::new();
    let mut failed = 0;
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some(task), Some(peer)) if task != "FAIL" => answers.push(Answer {
                task: task.into(),
                peer: peer.into(),
            }),
            _ => failed += 1,
        }
    }
    (answers, failed)
}

/// `n` HTTP requests to `url` from `from` (a node or host), a new connection each.
fn curl_many(lab: &Lab, from: &str, url: &str, n: usize) -> Result<(Vec<Answer>, usize)> {
    let script = format!("for i in $(seq {n}); do curl -s -m 2 {url} || echo FAIL; done; true");
    let out = lab.exec_ok(from, &["sh", "-c", &script])?;
    Ok(parse_answers(&out))
}

/// `n` UDP datagrams to `ip:port` from `from`, each waiting up to 2 s for its echo.
fn udp_many(lab: &Lab, from: &str, ip: &str, port: u16, n: usize) -> Result<(Vec<Answer>, usize)> {
    let script = format!(
        "import socket\n\
         for i in range({n}):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   s.sendto(b'ping', ('{ip}', {port}))\n\
         \x20   try:\n\
         \x20       print(s.recvfrom(2048)[0].decode())\n\
         \x20   except OSError:\n\
         \x20       print('FAIL')\n\
         \x20   s.close()\n"
    );
    let out = lab.exec_ok(from, &["python3", "-c", &script])?;
    Ok(parse_answers(&out))
}

/// Running tasks of a service: hostname (`name.id`) -> node.
fn running_tasks(lab: &Lab, service: &str) -> Result<BTreeMap<String, String>> {
    let st = status(lab, "node1", service)?;
    Ok(st
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running" && t.state == "running")
        .map(|t| (format!("{}.{}", t.name, t.id), t.node.clone()))
        .collect())
}

/// Waits until `service` has `n` running tasks and has converged.
fn converged(lab: &Lab, service: &str, n: usize) -> Result<BTreeMap<String, String>> {
    let (tasks, _) = wait_for(
        &format!("service {service} to run {n} tasks and converge"),
        Duration::from_secs(60),
        || {
            let st = status(lab, "node1", service).ok()?;
            let tasks = running_tasks(lab, service).ok()?;
            (st.converged && tasks.len() == n).then_some(tasks)
        },
    )?;
    Ok(tasks)
}

/// Creates a service running the test server on `port` (`udp` for the
/// echo). An HTTP server gets a health check, so `create` returns once every
/// task listens and the first request through the mesh must answer: no
/// "until it listens" retries.
fn create(lab: &Lab, name: &str, flags: &[&str], port: u16, udp: bool) -> Result<()> {
    let check = format!("curl -sf -m 1 -o /dev/null http://127.0.0.1:{port}/");
    let port = port.to_string();
    let mut args = vec!["service", "create", "--name", name];
    args.extend(flags);
    if !udp {
        args.extend([
            "--health-cmd",
            check.as_str(),
            "--health-start-interval",
            "100ms",
            "--health-start-period",
            "30s",
        ]);
    }
    args.extend(["--", "python3", SERVER, port.as_str()]);
    if udp {
        args.push("udp");
    }
    lab.mesh_ok("node1", &args)
        .with_context(|| format!("creating service {name} with {flags:?}"))?;
    Ok(())
}

/// Waits up to 20 s for host1's first answers from `url` (`n` requests a
/// try): for `mesh run -p`, which has no health check, so running means
/// started and the server gets a bounded while to listen.
fn host1_answers(lab: &Lab, what: &str, url: &str, n: usize) -> Result<Vec<Answer>> {
    let (answers, _) = wait_for(what, Duration::from_secs(20), || {
        let (a, _) = curl_many(lab, "host1", url, n).ok()?;
        (!a.is_empty()).then_some(a)
    })?;
    Ok(answers)
}

/// host1's answers from `url` at once (`n` requests), for a healthy
/// service: there is nothing left to wait for, so every request must answer.
fn host1_answers_now(lab: &Lab, what: &str, url: &str, n: usize) -> Result<Vec<Answer>> {
    let (answers, failed) = curl_many(lab, "host1", url, n)?;
    ensure!(
        failed == 0 && answers.len() == n,
        "{what}: {failed} of {n} requests to {url} got no answer although the service was healthy and converged"
    );
    Ok(answers)
}

/// `http://NODE_IP:PORT/`
fn node_url(lab: &Lab, node: &str, port: u16) -> Result<String> {
    Ok(format!("http://{}:{port}/", lab.node(node)?.ip))
}

/// `network create --driver overlay --ingress` with `more` arguments.
fn create_ingress_args<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["network", "create", "--driver", "overlay", "--ingress"];
    args.extend(more);
    args
}

/// `mesh run -d --name NAME -p 8090:80` of the test server.
fn run_on_8090_args(name: &str) -> [&str; 10] {
    [
        "run", "-d", "--name", name, "-p", "8090:80", "--", "python3", SERVER, "80",
    ]
}

/// Asks through `node`'s address from host1 until every task in `want`
/// answered; every answer must come from one of them and carry host1's
/// address as the peer (the client address kept through the mesh).
fn reaches_all(lab: &Lab, node: &str, port: u16, want: &BTreeSet<String>) -> Result<()> {
    let ip = lab.node(node)?.ip.to_string();
    let client = lab.host("host1")?.ip.to_string();
    let url = format!("http://{ip}:{port}/");
    let mut seen = BTreeSet::new();
    let mut failed = 0;
    let mut tries = 0;
    while !want.is_subset(&seen) {
        tries += 1;
        if tries > 15 {
            bail!(
                "through {node} ({url}) host1 reached only {seen:?} of the tasks {want:?} in {} requests ({failed} got no answer)",
                tries * 10
            );
        }
        let (answers, f) = curl_many(lab, "host1", &url, 10)?;
        failed += f;
        for a in answers {
            ensure!(
                want.contains(&a.task),
                "through {node} ({url}) an answer came from {:?}, which is not a running task of the service ({want:?})",
                a.task
            );
            ensure!(
                a.peer == client,
                "task {} saw the peer {} instead of host1's address {client}: the routing mesh through {node} does not keep the client's address",
                a.task,
                a.peer
            );
            seen.insert(a.task);
        }
    }
    Ok(())
}

/// `nft list ruleset` without what changes on its own (counters, handles),
/// as sorted lines: a stale or missing rule shows as a line in one only.
fn ruleset_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            let l = match l.find("# handle") {
                Some(at) => &l[..at],
                None => l,
            };
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split_whitespace().peekable();
            while let Some(w) = it.next() {
                // "counter packets N bytes M" -> "counter"; a named
                // counter's own "packets N bytes M" line -> "".
                if (w == "packets" || w == "bytes") && words.last().is_none_or(|p| *p == "counter")
                {
                    it.next();
                    continue;
                }
                // A dynamic set element's remaining lifetime ticks down.
                if w == "expires" {
                    it.next();
                    continue;
                }
                words.push(w);
            }
            words.join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort();
    lines
}

/// Rulesets of every node: its own namespace and those its daemon made.
fn rulesets(lab: &Lab) -> Result<BTreeMap<String, Vec<String>>> {
    let mut all = BTreeMap::new();
    for n in ["node1", "node2", "node3"] {
        let text = lab.exec_ok(n, &["nft", "list", "ruleset"])?;
        all.insert(n.to_string(), ruleset_lines(&text));
        for ns in netns_with_prefix(&ns_prefix(lab, n)?) {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "nft", "list", "ruleset"])
                .output()?;
            // A namespace going away between listing and reading is reported by the comparison.
            if out.status.success() {
                all.insert(ns, ruleset_lines(&String::from_utf8_lossy(&out.stdout)));
            }
        }
    }
    Ok(all)
}

/// What differs between two snapshots of [`rulesets`], for the message.
fn ruleset_diff(
    before: &BTreeMap<String, Vec<String>>,
    after: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (ns, b) in before {
        let Some(a) = after.get(ns) else {
            out.push(format!("{ns}: namespace gone after the restart"));
            continue;
        };
        let (bs, as_): (BTreeSet<&String>, BTreeSet<&String>) =
            (b.iter().collect(), a.iter().collect());
        for l in bs.difference(&as_) {
            out.push(format!("{ns}: missing after restart: {l}"));
        }
        for l in as_.difference(&bs) {
            out.push(format!("{ns}: stale/new after restart: {l}"));
        }
        if bs == as_ && a.len() != b.len() {
            out.push(format!(
                "{ns}: {} rule lines before, {} after (duplicates)",
                b.len(),
                a.len()
            ));
        }
    }
    for ns in after.keys().filter(|ns| !before.contains_key(*ns)) {
        out.push(format!("{ns}: new namespace after the restart"));
    }
    out
}

/// The routing mesh from outside: every node's address (node3 runs no task)
/// reaches all 5 tasks, each seeing host1's address; `127.0.0.1` on a node;
/// UDP through ingress; host mode only where a task runs; then a node dies
/// and the rest keeps answering, never from its tasks.
#[test]
fn routing_mesh_udp_host_mode_and_a_dead_node() -> Result<()> {
    let mut lab = up_with_host("ig1")?;
    create(
        &lab,
        "web",
        &[
            "--replicas",
            "5",
            "--constraint",
            "node.hostname!=node3",
            "-p",
            "8080:80",
        ],
        80,
        false,
    )?;
    let tasks = converged(&lab, "web", 5)?;
    ensure!(
        !tasks.values().any(|n| n == "node3"),
        "node3 should run no task of web (constraint): {tasks:?}"
    );
    let want: BTreeSet<String> = tasks.keys().cloned().collect();
    step("the routing mesh from host1");
    host1_answers_now(
        &lab,
        "web to answer through node3 from host1",
        &node_url(&lab, "node3", 8080)?,
        1,
    )
    .context("the published port 8080 never answered through node3 (a node with no task)")?;
    for node in ["node1", "node2", "node3"] {
        reaches_all(&lab, node, 8080, &want)?;
    }
    // The node itself, on its loopback (Swarm's moby#23812).
    let (answers, failed) = curl_many(&lab, "node3", "http://127.0.0.1:8080/", 10)?;
    ensure!(
        failed == 0 && answers.iter().all(|a| want.contains(&a.task)),
        "curl 127.0.0.1:8080 on node3 (no task there): {failed} of 10 failed, answers {answers:?}"
    );

    step("UDP through ingress");
    // UDP through ingress, through every node.
    create(
        &lab,
        "echo",
        &["--replicas", "2", "-p", "9000:9000/udp"],
        9000,
        true,
    )?;
    let echo: BTreeSet<String> = converged(&lab, "echo", 2)?.keys().cloned().collect();
    for node in ["node1", "node2", "node3"] {
        let ip = lab.node(node)?.ip.to_string();
        let (answers, _) = wait_for(
            &format!("a UDP echo on {ip}:9000 (through {node}) from host1"),
            Duration::from_secs(20),
            || {
                let (a, _) = udp_many(&lab, "host1", &ip, 9000, 3).ok()?;
                (!a.is_empty()).then_some(a)
            },
        )?;
        for a in answers {
            ensure!(
                echo.contains(&a.task),
                "the UDP echo through {node} came from {:?}, not a task of echo ({echo:?})",
                a.task
            );
        }
    }

    step("host mode");
    // Host mode: only where a task runs, straight to it.
    create(
        &lab,
        "hm",
        &[
            "--replicas",
            "2",
            "--publish",
            "published=8081,target=80,mode=host",
        ],
        80,
        false,
    )?;
    let hm = converged(&lab, "hm", 2)?;
    let host_nodes: BTreeSet<&String> = hm.values().collect();
    ensure!(
        host_nodes.len() == 2,
        "two host-mode tasks on port 8081 share a node: {hm:?}"
    );
    let client = lab.host("host1")?.ip.to_string();
    for node in ["node1", "node2", "node3"] {
        let ip = lab.node(node)?.ip.to_string();
        let url = format!("http://{ip}:8081/");
        let here: Vec<&String> = hm
            .iter()
            .filter(|(_, n)| *n == node)
            .map(|(t, _)| t)
            .collect();
        if let Some(task) = here.first() {
            let answers =
                host1_answers_now(&lab, &format!("host-mode port {url} to answer"), &url, 3)?;
            for a in answers {
                ensure!(
                    &a.task == *task && a.peer == client,
                    "host-mode {url} must answer from {node}'s own task {task} seeing {client}; got {a:?}"
                );
            }
        } else {
            let (answers, _) = curl_many(&lab, "host1", &url, 3)?;
            ensure!(
                answers.is_empty(),
                "host-mode port 8081 answered on {node}, which runs no task of hm: {answers:?}"
            );
        }
    }

    step("node2 dies");
    // A node dies (daemon killed, link cut): the rest keeps answering, never from its tasks.
    let dead: BTreeSet<String> = tasks
        .iter()
        .filter(|(_, n)| *n == "node2")
        .map(|(t, _)| t.clone())
        .collect();
    ensure!(!dead.is_empty(), "node2 runs no task of web: {tasks:?}");
    lab.kill("node2")?;
    lab.cut("node2")?;
    for node in ["node1", "node3"] {
        let ip = lab.node(node)?.ip.to_string();
        let url = format!("http://{ip}:8080/");
        wait_for(
            &format!("{url} to answer every request again after node2 died"),
            Duration::from_secs(45),
            || {
                let (a, f) = curl_many(&lab, "host1", &url, 10).ok()?;
                (f == 0 && a.len() == 10).then_some(())
            },
        )?;
        let (answers, failed) = curl_many(&lab, "host1", &url, 30)?;
        ensure!(
            failed == 0,
            "through {node}, {failed} of 30 requests failed after node2's death was seen"
        );
        let from_dead: Vec<&Answer> = answers.iter().filter(|a| dead.contains(&a.task)).collect();
        ensure!(
            answers.iter().all(|a| a.peer == client),
            "through {node} after node2 died, a task saw a peer other than host1 ({client}): {answers:?}"
        );
        ensure!(
            from_dead.is_empty(),
            "through {node}, answers came from node2's dead tasks: {from_dead:?}"
        );
    }
    lab.down()?;
    Ok(())
}

/// A restart of every daemon leaves the same rules; `network rm ingress` is
/// refused while publishing and allowed after; a custom ingress network with
/// MTU 1200 works and its MTU reaches the task; `mesh run -p` publishes from
/// a bridge and refuses a taken port.
#[test]
fn restart_custom_ingress_and_standalone_ports() -> Result<()> {
    let mut lab = up_with_host("ig2")?;
    create(
        &lab,
        "web",
        &["--replicas", "3", "-p", "8080:80"],
        80,
        false,
    )?;
    let want: BTreeSet<String> = converged(&lab, "web", 3)?.keys().cloned().collect();
    host1_answers_now(
        &lab,
        "web to answer through node1 from host1",
        &node_url(&lab, "node1", 8080)?,
        1,
    )?;
    // Let every node finish applying before the snapshot.
    wait_for(
        "two equal ruleset snapshots in a row",
        Duration::from_secs(20),
        || {
            let a = rulesets(&lab).ok()?;
            std::thread::sleep(Duration::from_millis(500));
            let b = rulesets(&lab).ok()?;
            (a == b).then_some(())
        },
    )?;
    let before = rulesets(&lab)?;

    step("restart every daemon");
    // Restart every daemon: the rules are rebuilt as they were.
    for n in ["node1", "node2", "node3"] {
        lab.kill(n)?;
    }
    for n in ["node1", "node2", "node3"] {
        lab.start(n)?;
    }
    wait_for(
        "every node Ready after the restart",
        Duration::from_secs(60),
        || {
            let nodes = node_ls(&lab, "node1").ok()?;
            (nodes.len() == 3 && nodes.iter().all(|n| n["Status"] == "Ready")).then_some(())
        },
    )?;
    converged(&lab, "web", 3)?;
    let same = wait_for(
        "the rulesets to be as before the restart",
        Duration::from_secs(30),
        || (rulesets(&lab).ok()? == before).then_some(()),
    );
    if let Err(e) = same {
        let after = rulesets(&lab)?;
        bail!(
            "{e}: after restarting every daemon the nftables rules differ:\n{}",
            ruleset_diff(&before, &after).join("\n")
        );
    }
    for node in ["node1", "node2", "node3"] {
        reaches_all(&lab, node, 8080, &want)?;
    }

    step("network rm ingress, then my-ingress");
    // The ingress network cannot go while a service publishes through it.
    refused(
        &lab,
        "node1",
        &["network", "rm", "ingress"],
        "in use by service web",
    )?;
    lab.mesh_ok("node1", &["service", "rm", "web"])?;
    wait_for(
        "`network rm ingress` to succeed once web is gone",
        Duration::from_secs(30),
        || lab.mesh_ok("node1", &["network", "rm", "ingress"]).ok(),
    )?;
    // An ingress network is never attachable: sandboxes join it only as service tasks.
    refused(
        &lab,
        "node1",
        &create_ingress_args(&["--attachable", "bad-ingress"]),
        "attachable",
    )?;
    lab.mesh_ok(
        "node1",
        &create_ingress_args(&[
            "--subnet",
            "10.11.0.0/16",
            "--gateway",
            "10.11.0.2",
            "--opt",
            "com.docker.network.driver.mtu=1200",
            "my-ingress",
        ]),
    )?;
    refused(
        &lab,
        "node1",
        &create_ingress_args(&["second"]),
        "ingress network already exists",
    )?;
    create(&lab, "w2", &["--replicas", "2", "-p", "8080:80"], 80, false)?;
    let w2 = converged(&lab, "w2", 2)?;
    let want2: BTreeSet<String> = w2.keys().cloned().collect();
    host1_answers_now(
        &lab,
        "w2 to answer through my-ingress from host1",
        &node_url(&lab, "node1", 8080)?,
        1,
    )?;
    for node in ["node1", "node2", "node3"] {
        reaches_all(&lab, node, 8080, &want2)?;
    }
    // The task's interface on my-ingress (its only network) has MTU 1200.
    let (task, node) = w2.iter().next().context("w2 has no task")?;
    let sandboxes = ps(&lab, node)?;
    let name = sandboxes
        .iter()
        .filter_map(|s| s["Names"].as_str())
        .find(|n| !n.is_empty() && (*n == task.as_str() || n.starts_with("w2.")))
        .with_context(|| {
            format!("no sandbox of w2's task {task} in `mesh ps` on {node}: {sandboxes:?}")
        })?
        .to_string();
    let links = lab.mesh_ok(node, &["exec", &name, "--", "ip", "-o", "link"])?;
    ensure!(
        links
            .lines()
            .any(|l| !l.contains(" lo:") && l.contains("mtu 1200")),
        "the task {name} on {node} has no interface with MTU 1200 on my-ingress:\n{links}"
    );
    lab.mesh_ok("node1", &["service", "rm", "w2"])?;

    step("mesh run -p");
    // `mesh run -p` on a bridge: published from other hosts and the node's
    // loopback; a second sandbox on the same port is refused and leaves nothing.
    lab.mesh_ok("node2", &run_on_8090_args("s1"))?;
    let answers = host1_answers(
        &lab,
        "s1 to answer on node2:8090 from host1",
        &node_url(&lab, "node2", 8090)?,
        1,
    )?;
    ensure!(!answers.is_empty());
    let (_, failed) = curl_many(&lab, "node2", "http://127.0.0.1:8090/", 3)?;
    ensure!(
        failed == 0,
        "s1's -p 8090:80 does not answer on node2's 127.0.0.1"
    );
    let ports = lab.mesh_ok("node2", &["port", "s1"])?;
    ensure!(
        ports.contains("80/tcp") && ports.contains("8090"),
        "`mesh port s1` does not list 80/tcp -> 8090: {ports:?}"
    );
    refused(
        &lab,
        "node2",
        &run_on_8090_args("s2"),
        "port is already allocated",
    )?;
    ensure!(
        !ps(&lab, "node2")?.iter().any(|s| s["Names"] == "s2"),
        "the refused sandbox s2 was left behind"
    );
    lab.mesh_ok("node2", &["rm", "-f", "s1"])?;
    lab.mesh_ok("node2", &run_on_8090_args("s3"))
        .context("`mesh rm` did not free port 8090")?;
    lab.down()?;
    Ok(())
}

#[test]
fn ruleset_normalization_ignores_counters_and_handles() {
    let a = "table ip t { # handle 7\n\tchain c { # handle 1\n\t\ttcp dport 80 counter packets 3 bytes 180 accept # handle 4\n\t}\n}\n";
    let b = "table ip t { # handle 9\n\tchain c { # handle 2\n\t\ttcp dport 80 counter packets 0 bytes 0 accept # handle 5\n\t}\n}\n";
    assert_eq!(ruleset_lines(a), ruleset_lines(b));
    let c =
        "table ip t {\n\tchain c {\n\t\ttcp dport 81 counter packets 0 bytes 0 accept\n\t}\n}\n";
    assert_ne!(ruleset_lines(a), ruleset_lines(c));
    assert!(ruleset_lines(a).contains(&"tcp dport 80 counter accept".to_string()));
}

#[test]
fn answers_are_parsed() {
    let (a, failed) = parse_answers("web.1.abc 192.168.1.14\nFAIL\n\nweb.2.def 10.0.0.1\n");
    assert_eq!(failed, 1);
    assert_eq!(
        a,
        [
            Answer {
                task: "web.1.abc".into(),
                peer: "192.168.1.14".into()
            },
            Answer {
                task: "web.2.def".into(),
                peer: "10.0.0.1".into()
            },
        ]
    );
}
