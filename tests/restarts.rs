//! End-to-end: a worker's daemon killed with SIGKILL and started again, 20
//! times, while a client on another node keeps a TCP stream and repeated
//! HTTP requests going to the worker's tasks over an overlay. The
//! workloads keep their connectivity, the node's kernel state after the
//! last restart is what it was before (no leaked link, namespace, nftables
//! table, FDB or neighbour entry), and `lab down` leaves nothing at all.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_lab::Lab;
use serde_json::Value;

/// A task serving HTTP on 8080 (its hostname, as [`HTTP_SERVER`]) and a
/// line echo on 9000, one thread per connection.
const ECHO_AND_HTTP: &str = "import http.server,socket,socketserver,threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b=socket.gethostname().encode()
        s.send_response(200)
        s.send_header('Content-Length',str(len(b)))
        s.end_headers()
        s.wfile.write(b)
    def log_message(s,*a):
        pass
class E(socketserver.StreamRequestHandler):
    def handle(s):
        for line in s.rfile:
            s.wfile.write(line)
            s.wfile.flush()
class T(socketserver.ThreadingTCPServer):
    allow_reuse_address=True
    daemon_threads=True
threading.Thread(target=T(('',9000),E).serve_forever,daemon=True).start()
http.server.ThreadingHTTPServer(('',8080),H).serve_forever()";

/// The client: one TCP stream to `web:9000` kept open for the whole run
/// (a numbered line every 200 ms, each echoed within 3 s), and an HTTP GET
/// of `web:8080` every 200 ms, until the stop file appears. Prints its
/// counts as one JSON line. A stream that breaks is counted and opened
/// again, so the counts go on.
const CLIENT: &str = "import json,os,socket,sys,time,urllib.request
stop=sys.argv[1]
st=dict(echo_ok=0,echo_fail=0,stream_breaks=0,http_ok=0,http_fail=0,max_echo_ms=0,max_http_ms=0,errors=[])
def connect():
    s=socket.create_connection(('web',9000),timeout=3)
    s.settimeout(3)
    return s,s.makefile('rb')
s,f=connect()
i=0
while not os.path.exists(stop):
    i+=1
    t=time.time()
    try:
        line=b'%d\\n'%i
        s.sendall(line)
        got=f.readline()
        if got!=line:
            raise Exception('echo %r for %r'%(got,line))
        st['echo_ok']+=1
        st['max_echo_ms']=max(st['max_echo_ms'],int((time.time()-t)*1000))
    except Exception as e:
        st['echo_fail']+=1
        st['stream_breaks']+=1
        st['errors'].append('%.1f echo %d: %s'%(t,i,e))
        try:
            s.close()
            s,f=connect()
        except Exception as e:
            st['errors'].append('%.1f reconnect: %s'%(t,e))
    t=time.time()
    try:
        urllib.request.urlopen('http://web:8080/',timeout=3).read()
        st['http_ok']+=1
        st['max_http_ms']=max(st['max_http_ms'],int((time.time()-t)*1000))
    except Exception as e:
        st['http_fail']+=1
        st['errors'].append('%.1f http %d: %s'%(t,i,e))
    time.sleep(0.2)
print(json.dumps(st),flush=True)";

/// Runs a host command and parses its JSON output (`[]` when it prints
/// nothing, as `ip -j` does for an empty list).
fn json_of(argv: &[&str]) -> Result<Value> {
    let out = Command::new(argv[0]).args(&argv[1..]).output()?;
    ensure!(
        out.status.success(),
        "{}: {}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON: {text}", argv.join(" ")))
}

fn items(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

/// What a node's daemon has made in the kernel, in its namespace and in
/// every namespace of its prefix.
#[derive(Debug, Default, PartialEq)]
struct Kernel {
    namespaces: BTreeSet<String>,
    /// `ns/ifname`.
    links: BTreeSet<String>,
    /// `ns/ifname` to its index: a link deleted and made again gets a new one.
    ifindex: BTreeMap<String, u64>,
    /// `ns/family name`.
    tables: BTreeSet<String>,
    /// FDB entries the daemon installs (permanent or static):
    /// `ns/dev mac dst`.
    fdb: Vec<String>,
    /// FDB entries the bridges learned from traffic (not compared: they
    /// come and go with packets).
    fdb_learned: usize,
    /// Permanent neighbour entries: `ns/dev ip lladdr`.
    neigh: Vec<String>,
    /// Neighbour entries resolved by ARP (not compared).
    neigh_learned: usize,
}

impl Kernel {
    fn take(lab: &Lab, node: &str) -> Result<Kernel> {
        let mut k = Kernel::default();
        let prefix = format!("{}-", ns_prefix(lab, node)?);
        let node_ns = lab.node(node)?.netns.clone();
        let mut all = vec![node_ns.clone()];
        for ns in netns_with_prefix(&prefix) {
            k.namespaces.insert(ns.clone());
            all.push(ns);
        }
        for ns in &all {
            for l in items(&json_of(&["ip", "-n", ns, "-j", "link", "show"])?) {
                let name = format!("{ns}/{}", s(&l, "ifname"));
                k.ifindex
                    .insert(name.clone(), l["ifindex"].as_u64().unwrap_or_default());
                k.links.insert(name);
            }
            let tables = json_of(&["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"])?;
            for t in items(&tables["nftables"]) {
                let t = &t["table"];
                if t.is_object() {
                    k.tables
                        .insert(format!("{ns}/{} {}", s(t, "family"), s(t, "name")));
                }
            }
            for e in items(&json_of(&["bridge", "-n", ns, "-j", "fdb", "show"])?) {
                let state = s(&e, "state");
                if state == "permanent" || state == "static" || e.get("dst").is_some() {
                    k.fdb.push(format!(
                        "{ns}/{} {} {}",
                        s(&e, "ifname"),
                        s(&e, "mac"),
                        s(&e, "dst")
                    ));
                } else {
                    k.fdb_learned += 1;
                }
            }
            for n in items(&json_of(&["ip", "-n", ns, "-j", "neigh", "show"])?) {
                let states: Vec<String> = items(&n["state"])
                    .iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect();
                if states.iter().any(|x| x == "PERMANENT" || x == "NOARP") {
                    k.neigh.push(format!(
                        "{ns}/{} {} {}",
                        s(&n, "dev"),
                        s(&n, "dst"),
                        s(&n, "lladdr")
                    ));
                } else {
                    k.neigh_learned += 1;
                }
            }
        }
        k.fdb.sort();
        k.neigh.sort();
        // Names in the report are shorter without the lab's prefixes.
        let short = |x: &String| x.replace(&prefix, "P-").replace(&node_ns, "NODE");
        k.namespaces = k.namespaces.iter().map(short).collect();
        k.links = k.links.iter().map(short).collect();
        k.ifindex = k.ifindex.iter().map(|(n, i)| (short(n), *i)).collect();
        k.tables = k.tables.iter().map(short).collect();
        k.fdb = k.fdb.iter().map(short).collect();
        k.neigh = k.neigh.iter().map(short).collect();
        Ok(k)
    }

    fn counts(&self) -> String {
        format!(
            "namespaces {}, links {}, nft tables {}, FDB {} (+{} learned), neighbours {} (+{} learned)",
            self.namespaces.len(),
            self.links.len(),
            self.tables.len(),
            self.fdb.len(),
            self.fdb_learned,
            self.neigh.len(),
            self.neigh_learned
        )
    }

    /// Entries that could only be leftovers: one MAC sent to two VTEPs, or
    /// one address with two neighbour entries on a device.
    fn duplicates(&self) -> Vec<String> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for e in &self.fdb {
            let mut f = e.split(' ');
            let (dev, mac) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            // The all-zero MAC is the flood list: one entry per peer VTEP.
            if mac != "00:00:00:00:00:00" {
                *seen.entry(format!("fdb {dev} {mac}")).or_default() += 1;
            }
        }
        for e in &self.neigh {
            let mut f = e.split(' ');
            let (dev, ip) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            *seen.entry(format!("neigh {dev} {ip}")).or_default() += 1;
        }
        seen.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, n)| format!("{k} x{n}"))
            .collect()
    }
}

fn diff(what: &str, before: &[String], after: &[String]) -> Option<String> {
    let b: BTreeSet<&String> = before.iter().collect();
    let a: BTreeSet<&String> = after.iter().collect();
    let gone: Vec<_> = b.difference(&a).collect();
    let new: Vec<_> = a.difference(&b).collect();
    (before.len() != after.len() || !gone.is_empty() || !new.is_empty())
        .then(|| format!("{what}: gone {gone:?}, new {new:?}"))
}

/// The addresses of every sandbox and task on other nodes than `node`:
/// the only peers its VXLANs may hold neighbour entries for.
fn remote_endpoints(lab: &Lab, node: &str) -> Result<BTreeSet<String>> {
    let mut addrs = BTreeSet::new();
    for other in lab
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| *n != node)
    {
        for sb in ps(lab, other)? {
            let ips = sb["IPs"].as_str().unwrap_or_default();
            addrs.extend(ips.split(',').filter(|ip| !ip.is_empty()).map(String::from));
        }
    }
    Ok(addrs)
}

/// The pids of every sandbox `mesh ps` shows on `node`.
fn sandbox_pids(lab: &Lab, node: &str) -> Result<Vec<u32>> {
    Ok(ps(lab, node)?
        .iter()
        .filter_map(|s| s["Pid"].as_u64())
        .filter(|p| *p > 0)
        .map(|p| p as u32)
        .collect())
}

/// Host nftables tables (the host's own namespace), `family name`.
fn host_tables() -> Result<BTreeSet<String>> {
    let v = json_of(&["nft", "-j", "list", "tables"])?;
    Ok(items(&v["nftables"])
        .iter()
        .filter(|t| t["table"].is_object())
        .map(|t| format!("{} {}", s(&t["table"], "family"), s(&t["table"], "name")))
        .collect())
}

/// The command name of process `pid` if it runs (a zombie waiting for
/// its parent to reap it runs nothing and holds nothing).
fn alive(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (comm, rest) = stat.rsplit_once(')')?;
    let state = rest.split_whitespace().next()?;
    (state != "Z" && state != "X").then(|| comm.split_once('(').map_or("", |c| c.1).to_string())
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        .filter_map(|p| {
            alive(p.parse().ok()?)?;
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then(|| format!("{p}: {cmd}"))
        })
        .collect()
}

/// Waits until `node`'s restarted daemon has a session (a heartbeat
/// answered); returns the time since `killed`, about the longest the
/// managers went without a heartbeat from it, less up to one period.
fn wait_session(lab: &Lab, node: &str, killed: Instant) -> Result<Duration> {
    wait_for(
        &format!("{node}'s session after a restart"),
        Duration::from_secs(20),
        || {
            let v: Value =
                serde_json::from_str(&lab.mesh_ok(node, &["info", "--format", "json"]).ok()?)
                    .ok()?;
            (v["Swarm"]["LocalNodeState"] == "active").then_some(())
        },
    )?;
    Ok(killed.elapsed())
}

/// Waits until the managers count the service converged again after
/// [`wait_session`], that is the new daemon's agent applied the node's view.
fn wait_applied(lab: &Lab, node: &str) -> Result<()> {
    wait_for(
        &format!("{node}'s view applied after a restart"),
        Duration::from_secs(20),
        || {
            let st = status(lab, "node1", "web").ok()?;
            let running = st
                .tasks
                .iter()
                .filter(|t| t.desired_state == "running" && t.state == "running")
                .count();
            (st.converged && running == 2).then_some(())
        },
    )?;
    Ok(())
}

/// The service, the client and the 20 restarts, with the node's kernel
/// compared before and after.
fn restarts(lab: &mut Lab) -> Result<()> {
    let lab_name = lab.name.clone();
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--network",
            "app",
            "--constraint",
            "node.hostname==node2",
            "--",
            "python3",
            "-c",
            ECHO_AND_HTTP,
        ],
    )?;
    lab.mesh_ok(
        "node3",
        &[
            "run",
            "-d",
            "--name",
            "c",
            "--network",
            "app",
            "--",
            "sleep",
            "3600",
        ],
    )?;
    wait_for("web answering from c", Duration::from_secs(20), || {
        lab.mesh(
            "node3",
            &[
                "exec",
                "c",
                "--",
                "curl",
                "-sf",
                "-m",
                "2",
                "http://web:8080/",
            ],
        )
        .ok()
        .filter(|o| o.status.success())
    })?;
    let before = Kernel::take(lab, "node2")?;
    println!("node2 before: {}", before.counts());
    ensure!(
        before.duplicates().is_empty(),
        "duplicates before any restart: {:?}",
        before.duplicates()
    );
    let tasks_before: BTreeSet<String> = status(lab, "node1", "web")?
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running")
        .map(|t| t.id.clone())
        .collect();

    // The client runs in c through `mesh exec` until the stop file appears.
    let stop = std::env::temp_dir().join(format!("{lab_name}-stop"));
    let _ = std::fs::remove_file(&stop);
    let mesh_bin = lab.mesh_bin.clone();
    let mut cmd = lab.command("node3", &mesh_bin)?;
    cmd.arg("-H")
        .arg(lab.node("node3")?.host())
        .args(["exec", "c", "--", "python3", "-c", CLIENT])
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = cmd.spawn().context("starting the client")?;
    // Let the stream open and a few requests pass before the first kill.
    std::thread::sleep(Duration::from_secs(2));

    let loop_start = Instant::now();
    let mut waits = Vec::new();
    let mut gaps = Vec::new();
    let result = (|| -> Result<()> {
        for round in 0..20u64 {
            let killed = Instant::now();
            ensure!(lab.kill("node2")?, "node2's daemon was not running");
            // The workloads run on the kernel's state alone for a moment
            // (short: a silent node is Down after its grace, or 5 s more while
            // its host answers, and loses its tasks).
            std::thread::sleep(Duration::from_millis(200));
            let mut started = Instant::now();
            lab.start("node2")?;
            if round % 4 == 3 {
                // Killed again in the middle of its start-up and first pass.
                std::thread::sleep(Duration::from_millis(20 * (round % 3)));
                ensure!(lab.kill("node2")?, "node2's daemon was not running");
                started = Instant::now();
                lab.start("node2")?;
            }
            gaps.push(wait_session(lab, "node2", killed)?);
            wait_applied(lab, "node2")?;
            waits.push(started.elapsed());
            // Its agent runs its periodic passes for a while, or not at all.
            std::thread::sleep(Duration::from_millis(400 * (round % 4)));
        }
        Ok(())
    })();
    let loop_time = loop_start.elapsed();
    // A little traffic after the last restart, then stop the client.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(&stop, b"")?;
    let out = client.wait_with_output()?;
    let _ = std::fs::remove_file(&stop);
    result?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_str(text.trim()).with_context(|| format!("{text}"))?;
    let max_wait = waits.iter().max().copied().unwrap_or_default();
    let mean_wait = waits.iter().sum::<Duration>() / waits.len().max(1) as u32;
    println!(
        "20 restarts of node2's daemon in {loop_time:.1?}: view applied again {mean_wait:.2?} after the start on average, at most {max_wait:.2?}"
    );
    println!(
        "client on node3 during the restarts: stream echoes {} ok, {} failed, {} breaks (slowest {} ms); HTTP {} ok, {} failed (slowest {} ms)",
        stats["echo_ok"],
        stats["echo_fail"],
        stats["stream_breaks"],
        stats["max_echo_ms"],
        stats["http_ok"],
        stats["http_fail"],
        stats["max_http_ms"]
    );
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    println!("kill to the restarted daemon's first heartbeat answered: at most {max_gap:.2?}");
    // A restart slower than the managers' patience is a different failure
    // from a data path that breaks: say which it was.
    let log = std::fs::read_to_string(&lab.node("node1")?.log).unwrap_or_default();
    let node2_id = lab.node("node2")?.id.clone().unwrap_or_default();
    ensure!(
        !log.lines()
            .any(|l| l.contains("marking node down") && l.contains(&node2_id)),
        "node2 was marked down during a restart (no heartbeat within the grace; slowest gap {max_gap:?}), so its tasks were replaced"
    );
    let errors = items(&stats["errors"]);
    ensure!(
        stats["echo_fail"] == 0 && stats["http_fail"] == 0 && errors.is_empty(),
        "the workloads lost connectivity: {errors:?}"
    );
    ensure!(
        stats["echo_ok"].as_u64().unwrap_or(0) > 60,
        "too few echoes to count: {stats}"
    );
    let tasks_after: BTreeSet<String> = status(lab, "node1", "web")?
        .tasks
        .iter()
        .filter(|t| t.desired_state == "running")
        .map(|t| t.id.clone())
        .collect();
    ensure!(
        tasks_after == tasks_before,
        "the tasks were replaced: {tasks_before:?} -> {tasks_after:?}"
    );

    // The kernel holds what it held, and nothing twice.
    let after = Kernel::take(lab, "node2")?;
    println!("node2 after:  {}", after.counts());
    let mut problems: Vec<String> = [
        diff(
            "namespaces",
            &before.namespaces.iter().cloned().collect::<Vec<_>>(),
            &after.namespaces.iter().cloned().collect::<Vec<_>>(),
        ),
        diff(
            "links",
            &before.links.iter().cloned().collect::<Vec<_>>(),
            &after.links.iter().cloned().collect::<Vec<_>>(),
        ),
        diff(
            "nft tables",
            &before.tables.iter().cloned().collect::<Vec<_>>(),
            &after.tables.iter().cloned().collect::<Vec<_>>(),
        ),
        diff("FDB", &before.fdb, &after.fdb),
        diff("neighbours", &before.neigh, &after.neigh),
    ]
    .into_iter()
    .flatten()
    .collect();
    problems.extend(after.duplicates());
    // Every permanent neighbour on the overlay is a current remote endpoint.
    let remote = remote_endpoints(lab, "node2")?;
    let vni = network_ls(lab, "node1")?
        .iter()
        .find(|n| n["Name"] == "app")
        .and_then(|n| n["VNI"].as_u64())
        .context("app's VNI")?;
    let ov = format!("P-ov-{vni}/");
    let peers_neigh = after.neigh.iter().filter(|n| n.starts_with(&ov)).count();
    let peers_fdb = after
        .fdb
        .iter()
        .filter(|e| e.starts_with(&ov) && !e.ends_with(' '))
        .count();
    println!(
        "app's VXLAN on node2: {peers_neigh} neighbour and {peers_fdb} FDB entries for remote endpoints"
    );
    ensure!(
        peers_neigh > 0 && peers_fdb > 0,
        "no peer entries on app's VXLAN to check: {:?} {:?}",
        after.neigh,
        after.fdb
    );
    for n in after.neigh.iter().filter(|n| n.starts_with(&ov)) {
        let ip = n.split(' ').nth(1).unwrap_or_default();
        if !remote.contains(ip) {
            problems.push(format!("neighbour {n} is no remote endpoint of app"));
        }
    }
    // Every FDB entry of the overlay's VXLAN points at another node, for
    // the MAC of a current remote endpoint (02:42 + its address).
    let macs: BTreeSet<String> = remote
        .iter()
        .filter_map(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
        .map(|ip| {
            let o = ip.octets();
            format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
        })
        .collect();
    let vteps: BTreeSet<String> = lab
        .nodes
        .iter()
        .filter(|n| n.name != "node2")
        .map(|n| n.ip.to_string())
        .collect();
    for e in after.fdb.iter().filter(|e| e.starts_with(&ov)) {
        let f: Vec<&str> = e.split(' ').collect();
        let (mac, dst) = (
            f.get(1).copied().unwrap_or(""),
            f.get(2).copied().unwrap_or(""),
        );
        if dst.is_empty() {
            continue;
        }
        if !vteps.contains(dst) || (mac != "00:00:00:00:00:00" && !macs.contains(mac)) {
            problems.push(format!("FDB {e} is no remote endpoint of app"));
        }
    }
    ensure!(problems.is_empty(), "after 20 restarts: {problems:?}");
    // A new daemon repairs what differs and leaves the rest alone.
    let remade: Vec<&String> = before
        .ifindex
        .iter()
        .filter(|(n, i)| after.ifindex.get(*n).is_some_and(|j| j != *i))
        .map(|(n, _)| n)
        .collect();
    println!("links made anew by the restarts: {}", remade.len());
    ensure!(
        remade.is_empty(),
        "links deleted and made again: {remade:?}"
    );

    // Inside the tasks, the restarted daemon serves DNS again and their
    // VIP tables are in place: a task reaches its own service by name.
    let task = ps(lab, "node2")?
        .iter()
        .filter_map(|s| s["Names"].as_str().map(String::from))
        .find(|n| n.starts_with("web."))
        .context("no task sandbox on node2")?;
    let answers = dig_answers(&dig(lab, "node2", &task, "c")?);
    ensure!(
        answers == vec![sandbox_ip(lab, "node3", "c")?],
        "a task on node2 resolves c to {answers:?}"
    );
    lab.mesh_ok(
        "node2",
        &[
            "exec",
            &task,
            "--",
            "curl",
            "-sf",
            "-m",
            "2",
            "http://web:8080/",
        ],
    )
    .context("a task on node2 cannot reach its own service's VIP")?;
    Ok(())
}

#[test]
fn worker_restarts_keep_workloads_and_leak_nothing() -> Result<()> {
    let host_tables_before = host_tables()?;
    let mut lab = up("rs", 3, 1, &[])?;
    if let Err(e) = restarts(&mut lab) {
        // The lab goes with this test; its daemons' logs say what happened.
        let keep = std::env::temp_dir().join(format!("{}-logs", lab.name));
        let _ = std::fs::create_dir_all(&keep);
        for n in &lab.nodes {
            let _ = std::fs::copy(&n.log, keep.join(format!("{}.log", n.name)));
        }
        return Err(e.context(format!("daemon logs kept in {}", keep.display())));
    }
    let lab_name = lab.name.clone();
    // `lab down` leaves nothing: no namespace, no process, no directory,
    // no host link or table.
    let prefixes: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| ns_prefix(&lab, n).map(|p| format!("{p}-")))
        .collect::<Result<_>>()?;
    let mut pids: Vec<u32> = Vec::new();
    for n in ["node1", "node2", "node3"] {
        pids.extend(sandbox_pids(&lab, n)?);
        pids.extend(lab.node(n)?.pid.map(|p| p as u32));
    }
    let dir = lab.dir.clone();
    lab.down()?;
    let mut left = Vec::new();
    for p in &prefixes {
        left.extend(netns_with_prefix(p));
    }
    left.extend(netns_with_prefix(&format!("mlab-{lab_name}-")));
    for p in pids {
        if let Some(comm) = alive(p) {
            left.push(format!("process {p} ({comm})"));
        }
    }
    left.extend(processes_mentioning(&dir.to_string_lossy()));
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    for l in items(&json_of(&["ip", "-j", "link", "show"])?) {
        let name = s(&l, "ifname");
        if name.contains(&lab_name) || prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            left.push(format!("host link {name}"));
        }
    }
    let new_tables: Vec<String> = host_tables()?
        .difference(&host_tables_before)
        .cloned()
        .collect();
    left.extend(new_tables.into_iter().map(|t| format!("host table {t}")));
    if !left.is_empty() {
        bail!("after lab down: {left:?}");
    }
    println!("after lab down: nothing left");
    Ok(())
}
