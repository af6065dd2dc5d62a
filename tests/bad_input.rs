//! The bad-input catalogue: every command, run with malformed and hostile
//! values on a real lab (one manager, one worker, and a third node that
//! has left the cluster for `init` and `join`), next to a real network,
//! service and sandbox. Each row must be refused with a non-zero exit and
//! exactly one clear line that says what is wrong, and must leave nothing
//! behind: the state listed on every node is the same before and after.
//! README's "What is refused" lists the same classes.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_lab::Lab;
use serde_json::Value;

/// Where a row runs: inside a lab node against its daemon, or on the host
/// (`mesh lab ...`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum On {
    Node(&'static str),
    Host,
}

/// One bad command and a word its refusal must contain.
struct Row {
    on: On,
    args: Vec<OsString>,
    says: String,
    /// It reaches a daemon that could make or change something: the state
    /// is listed again after it.
    changes: bool,
}

impl Row {
    fn shown(&self) -> String {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                let s = a.to_string_lossy();
                let s: String = s.chars().take(60).collect();
                if s.is_empty() || s.contains(' ') {
                    format!("{s:?}")
                } else {
                    s
                }
            })
            .collect();
        format!("{:?}: mesh {}", self.on, args.join(" "))
    }
}

/// The catalogue under construction.
#[derive(Default)]
struct Rows(Vec<Row>);

impl Rows {
    fn add(&mut self, on: On, args: &[&str], says: &str, changes: bool) {
        self.add_os(on, args.iter().map(OsString::from).collect(), says, changes);
    }

    fn add_os(&mut self, on: On, args: Vec<OsString>, says: &str, changes: bool) {
        self.0.push(Row {
            on,
            args,
            says: says.to_string(),
            changes,
        });
    }

    /// A command that only reads.
    fn read(&mut self, on: On, args: &[&str], says: &str) {
        self.add(on, args, says, false);
    }

    /// A command that could make or change something.
    fn write(&mut self, on: On, args: &[&str], says: &str) {
        self.add(on, args, says, true);
    }
}

/// `a` then the bytes 0xff 0xfe: not UTF-8.
fn not_utf8() -> OsString {
    OsString::from_vec(b"a\xff\xfe".to_vec())
}

fn with_os(args: &[&str], at: usize, bad: OsString) -> Vec<OsString> {
    let mut v: Vec<OsString> = args.iter().map(OsString::from).collect();
    v.insert(at, bad);
    v
}

/// What the row's output must be: a failure, one line on stderr starting
/// with `Error: ` and containing the row's word, nothing on stdout, and
/// none of the shapes of a crash or a usage dump.
fn judge(row: &Row, out: &Output) -> Result<String> {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.trim_end();
    match out.status.code() {
        Some(0) => bail!(
            "succeeded (stdout {:?})",
            String::from_utf8_lossy(&out.stdout)
        ),
        None => bail!("killed by a signal: {line:?}"),
        Some(_) => {}
    }
    ensure!(!line.is_empty(), "nothing on stderr");
    ensure!(
        line.lines().count() == 1,
        "stderr is not one line: {line:?}"
    );
    ensure!(line.starts_with("Error: "), "stderr {line:?}");
    for crash in [
        "panicked",
        "RUST_BACKTRACE",
        "Status {",
        "Some(",
        "Usage:",
        "For more information",
        "code: ",
    ] {
        ensure!(!line.contains(crash), "stderr has {crash:?}: {line:?}");
    }
    ensure!(
        line.contains(&row.says),
        "stderr {line:?} lacks {:?}",
        row.says
    );
    ensure!(
        out.stdout.is_empty(),
        "stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(line.to_string())
}

fn run_row(lab: &Lab, row: &Row) -> Result<Output> {
    match row.on {
        On::Node(node) => lab.mesh(node, &row.args).map_err(Into::into),
        On::Host => Ok(Command::new(mesh_bin())
            .env_remove("MESH_HOST")
            .args(&row.args)
            .output()?),
    }
}

/// The fields of a JSON object that say what it is, not how it is doing.
fn pick(v: &Value, fields: &[&str]) -> String {
    let kept: serde_json::Map<String, Value> = fields
        .iter()
        .map(|f| (f.to_string(), v.pointer(f).cloned().unwrap_or(Value::Null)))
        .collect();
    Value::Object(kept).to_string()
}

/// Everything the nodes list: nodes (with labels and versions), networks
/// (cluster and local, on every node), services (with versions),
/// sandboxes on every node, the join tokens and node3's membership.
fn snapshot(lab: &Lab) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for n in node_ls(lab, "node1")? {
        out.push(format!(
            "node {}",
            pick(
                &n,
                &[
                    "/ID",
                    "/Hostname",
                    "/Availability",
                    "/ManagerStatus",
                    "/Labels"
                ]
            )
        ));
    }
    let inspect: Vec<Value> =
        serde_json::from_str(&lab.mesh_ok("node1", &["node", "inspect", "node1", "node2"])?)?;
    for n in &inspect {
        out.push(format!(
            "node {}",
            pick(n, &["/ID", "/Version/Index", "/Spec"])
        ));
    }
    for node in ["node1", "node2", "node3"] {
        for n in json_lines(&lab.mesh_ok(node, &["network", "ls", "--format", "json"])?)? {
            out.push(format!(
                "{node} network {}",
                pick(
                    &n,
                    &[
                        "/ID", "/Name", "/Driver", "/Labels", "/Subnet", "/Gateway", "/VNI"
                    ]
                )
            ));
        }
        for s in ps(lab, node)? {
            out.push(format!(
                "{node} sandbox {}",
                pick(
                    &s,
                    &["/ID", "/Names", "/State", "/Networks", "/IPs", "/Pid"]
                )
            ));
        }
    }
    for s in json_lines(&lab.mesh_ok("node1", &["service", "ls", "--format", "json"])?)? {
        let name = s["Name"].as_str().unwrap_or_default().to_string();
        out.push(format!(
            "service {}",
            pick(&s, &["/ID", "/Name", "/Mode", "/Command", "/Ports"])
        ));
        let inspect: Vec<Value> =
            serde_json::from_str(&lab.mesh_ok("node1", &["service", "inspect", &name])?)?;
        for i in &inspect {
            out.push(format!(
                "service {}",
                pick(i, &["/ID", "/Version/Index", "/Spec"])
            ));
        }
    }
    for role in ["worker", "manager"] {
        let t = lab.mesh_ok("node1", &["join-token", "-q", role])?;
        out.push(format!("token {role} {}", t.trim()));
    }
    let info: Value = serde_json::from_str(&lab.mesh_ok("node3", &["info", "--format", "json"])?)?;
    out.push(format!("node3 {}", info["Swarm"]["LocalNodeState"]));
    out.sort();
    Ok(out)
}

/// Lines only in `a`, then lines only in `b`.
fn diff(a: &[String], b: &[String]) -> String {
    let gone: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
    let new: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
    format!("gone {gone:#?}; new {new:#?}")
}

/// The longest prefix two of `ids` share, if any, that is no prefix of
/// the fixed local networks' IDs (a node looks those up first).
fn shared_prefix(ids: &[String]) -> Option<String> {
    const LOCAL: [&str; 3] = ["627269646765", "686f73740000", "6e6f6e650000"];
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            let n = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
            let p = &a[..n];
            if n > 0 && !LOCAL.iter().any(|l| l.starts_with(p)) {
                return Some(p.to_string());
            }
        }
    }
    None
}

/// Cluster networks' IDs as node1 lists them.
fn network_ids(lab: &Lab) -> Result<Vec<String>> {
    Ok(network_ls(lab, "node1")?
        .iter()
        .filter_map(|n| n["ID"].as_str().map(String::from))
        .collect())
}

#[test]
fn every_command_refuses_bad_input_in_one_line_and_makes_nothing() -> Result<()> {
    let started = Instant::now();
    let lab = up("bi", 3, 1, &[])?;
    let node1_ip = lab.node("node1")?.ip.to_string();
    let node3_ip = lab.node("node3")?.ip.to_string();
    let remote = format!("{node1_ip}:2377");

    // node3 leaves: it is the node `init` and `join` are tried on.
    lab.mesh_ok("node3", &["leave"])?;
    lab.mesh_ok("node1", &["node", "rm", "--force", "node3"])?;
    // Real things next to the bad values.
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "--subnet",
            "10.77.0.0/24",
            "--label",
            "team=a",
            "net1",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "1",
            "--network",
            "net1",
            "--constraint",
            "node.hostname==node2",
            "--",
            "sleep",
            "100000",
        ],
    )?;
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "sb1",
            "--network",
            "net1",
            "--",
            "sleep",
            "100000",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &["node", "update", "--label-add", "zone=a", "node2"],
    )?;
    // Networks until two IDs share a prefix, for the ambiguous rows.
    let mut ids = network_ids(&lab)?;
    for i in 0..12 {
        if shared_prefix(&ids).is_some() {
            break;
        }
        lab.mesh_ok(
            "node1",
            &["network", "create", "-d", "overlay", &format!("amb{i}")],
        )?;
        ids = network_ids(&lab)?;
    }
    let wt = lab
        .mesh_ok("node1", &["join-token", "-q", "worker"])?
        .trim()
        .to_string();
    let (digest_part, secret) = wt.rsplit_once('-').context("token shape")?;
    let node_ids: Vec<String> = node_ls(&lab, "node1")?
        .iter()
        .filter_map(|n| n["ID"].as_str().map(String::from))
        .collect();
    println!(
        "fixtures ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let long = "a".repeat(300);
    let big = format!("k={}", "v".repeat(10 * 1024));
    let lab_name = lab.name.clone();
    let (n1, n2, n3, host) = (
        On::Node("node1"),
        On::Node("node2"),
        On::Node("node3"),
        On::Host,
    );
    let mut r = Rows::default();

    // Anywhere.
    r.read(n1, &["bogus"], "unrecognized subcommand 'bogus'");
    r.read(host, &["-H", "tcp://x", "info"], "unsupported host");

    // init: on a member, and bad values on node3 (which is in no cluster).
    r.write(n1, &["init"], "already part of a cluster");
    let init = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "init".to_string(),
            "--advertise-addr".into(),
            node3_ip.clone(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    r.write(n3, &["init", "--advertise-addr", "bogus"], "\"bogus\"");
    r.write(
        n3,
        &["init", "--advertise-addr", "999.1.1.1"],
        "\"999.1.1.1\"",
    );
    for (extra, says) in [
        (&["--listen-addr", "bogus"][..], "\"bogus\""),
        (&["--default-addr-pool", "10.0.0.0/33"], "10.0.0.0/33"),
        (&["--default-addr-pool", "10.0.0.1/8"], "host bits"),
        (&["--default-addr-pool", "127.0.0.0/8"], "loopback"),
        (&["--default-addr-pool", "224.0.0.0/8"], "multicast"),
        (&["--default-addr-pool-mask-length", "0"], "no network part"),
        (&["--default-addr-pool-mask-length", "99"], "too long"),
        (&["--default-addr-pool-mask-length", "-1"], "'-1'"),
        (&["--data-path-port", "99999"], "out of range"),
        (&["--data-path-port", "0"], "not a port"),
        (&["--data-path-port", "abc"], "'abc'"),
        (&["--cert-expiry", "1s"], "too short"),
        (&["--cert-expiry", "10x"], "10x"),
        (&["--cert-expiry", "99999999999h"], "too long"),
        (&["--encryption-key-rotation", "10x"], "10x"),
        (&["--encryption-key-rotation", "99999999h"], "too long"),
    ] {
        let args = init(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        r.write(n3, &args, says);
    }

    // join: tokens and addresses.
    r.write(
        n2,
        &["join", "--token", &wt, &remote],
        "already part of a cluster",
    );
    let truncated = &wt[..wt.len() - 5];
    let wrong_prefix = format!("X{}", &wt[1..]);
    let wrong_digest = format!("SWMTKN-1-{}-{secret}", "1".repeat(50));
    let wrong_secret = format!("{digest_part}-{}", "0".repeat(secret.len()));
    let hostile = "SWMTKN-1-$(reboot);'\"`\\";
    let long_token = format!("SWMTKN-1-{long}");
    for (token, says) in [
        ("", "invalid join token"),
        (truncated, "cut short"),
        (&wrong_prefix, "invalid join token"),
        (&wrong_digest, "does not match"),
        (&wrong_secret, "wrong or has been rotated"),
        (hostile, "invalid join token"),
        (&long_token, "invalid join token"),
        ("SWMTKN-1-\n-x", "invalid join token"),
    ] {
        r.write(n3, &["join", "--token", token, &remote], says);
    }
    r.add_os(
        n3,
        with_os(&["join", "--token", &remote], 2, not_utf8()),
        "not valid UTF-8",
        true,
    );
    r.write(n3, &["join", "--token", &wt, ""], "invalid address");
    r.write(n3, &["join", "--token", &wt, "bogus host"], "bogus host");
    r.write(n3, &["join", "--token", &wt, "192.0.2.1:99999"], "99999");
    r.write(
        n3,
        &["join", "--token", &wt, "--advertise-addr", "x", &remote],
        "\"x\"",
    );

    // node: references, labels, roles.
    r.read(n1, &["node", "inspect", "nosuch"], "no such node: nosuch");
    r.read(n1, &["node", "inspect", ""], "it is empty");
    r.add_os(
        n1,
        with_os(&["node", "inspect"], 2, not_utf8()),
        "not valid UTF-8",
        false,
    );
    r.read(
        n1,
        &["node", "ls", "--filter", "role=bogus"],
        "role=\"bogus\"",
    );
    r.read(n1, &["node", "ls", "--filter", "bogus"], "bogus");
    r.read(n1, &["node", "ls", "--format", "bogus"], "'bogus'");
    r.write(
        n1,
        &["node", "update", "--label-add", "=v", "node2"],
        "\"=v\"",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", "", "node2"],
        "invalid label",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", &big, "node2"],
        "at most 4096",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", "a b=c", "node2"],
        "space",
    );
    r.write(
        n1,
        &["node", "update", "--label-rm", "nosuch", "node2"],
        "has no label \"nosuch\"",
    );
    r.write(
        n1,
        &["node", "update", "--label-rm", "", "node2"],
        "it is empty",
    );
    r.write(
        n1,
        &["node", "update", "--availability", "bogus", "node2"],
        "'bogus'",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", "a=b", "nosuch"],
        "nosuch",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", "a=b", ""],
        "it is empty",
    );
    r.write(
        n1,
        &["node", "update", "--label-add", "a=b", &long],
        "not found",
    );
    r.write(n1, &["node", "rm", "nosuch"], "nosuch");
    r.write(n1, &["node", "rm", "node1"], "demote it");
    r.write(n1, &["node", "rm", "node2"], "not down");
    r.write(n1, &["node", "promote", "nosuch"], "nosuch");
    r.write(n1, &["node", "promote", ""], "it is empty");
    r.write(n1, &["node", "demote", "nosuch"], "nosuch");
    r.write(n1, &["node", "demote", "node1"], "last manager");
    r.write(
        n2,
        &["node", "update", "--label-add", "a=b", "node2"],
        "not a manager",
    );
    if let Some(p) = shared_prefix(&node_ids) {
        r.read(n1, &["node", "inspect", &p], "ambiguous");
        r.write(n1, &["node", "rm", &p], "ambiguous");
    }

    // network create: names.
    let create = ["network", "create", "-d", "overlay"];
    let with = |extra: &[&str]| -> Vec<String> {
        create.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (extra, says) in [
        (&[""][..], "invalid network name"),
        (&["--", "-x"], "\"-x\""),
        (&["a/b"], "\"a/b\""),
        (&[".."], "\"..\""),
        (&[long.as_str()], "at most 63"),
        (&["a b"], "\"a b\""),
        (&["héllo"], "héllo"),
        (&["日本"], "日本"),
        (&["net1"], "already exists"),
        // CIDRs.
        (&["--subnet", "10.0.0.0/33", "n"], "10.0.0.0/33"),
        (&["--subnet", "10.0.0.1/24", "n"], "host bits"),
        (&["--subnet", "::1/64", "n"], "only IPv4"),
        (&["--subnet", "300.1.1.1/24", "n"], "300.1.1.1/24"),
        (&["--subnet", "abc", "n"], "\"abc\""),
        (&["--subnet", "10.0.0.0/32", "n"], "too small"),
        (&["--subnet", "127.0.0.0/24", "n"], "loopback"),
        (&["--subnet", "224.0.0.0/24", "n"], "multicast"),
        (&["--subnet", "169.254.1.0/24", "n"], "link-local"),
        (&["--subnet", "0.0.0.0/0", "n"], "overlaps"),
        (&["--subnet", "10.77.0.0/16", "n"], "overlaps"),
        (
            &["--subnet", "10.9.0.0/24", "--gateway", "10.8.0.1", "n"],
            "outside subnet",
        ),
        (
            &["--subnet", "10.9.0.0/24", "--gateway", "10.9.0.0", "n"],
            "network address",
        ),
        (
            &["--subnet", "10.9.0.0/24", "--gateway", "bogus", "n"],
            "\"bogus\"",
        ),
        (
            &["--subnet", "10.9.0.0/24", "--ip-range", "10.8.0.0/25", "n"],
            "not inside subnet",
        ),
        (&["--gateway", "10.9.0.1", "n"], "need --subnet"),
        // Options and labels.
        (&["--opt", "bogus=1", "n"], "unknown option \"bogus\""),
        (&["--opt", "mtu=abc", "n"], "\"abc\""),
        (&["--opt", "mtu=10", "n"], "\"10\""),
        (&["--label", "=v", "n"], "\"=v\""),
        (&["--label", "", "n"], "--label"),
        (&["--label", big.as_str(), "n"], "at most 4096"),
        (&["--label", "a\nb=c", "n"], "control character"),
        (&["--ingress", "n"], "ingress network already exists"),
    ] {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        r.write(n1, &args, says);
    }
    r.add_os(n1, with_os(&create, 4, not_utf8()), "not valid UTF-8", true);
    r.write(
        n1,
        &["network", "create", "-d", "nonsense", "n"],
        "\"nonsense\"",
    );
    r.write(
        n1,
        &[
            "network",
            "create",
            "-d",
            "bridge",
            "--opt",
            "encrypted",
            "n",
        ],
        "needs -d overlay",
    );
    r.write(
        n2,
        &["network", "create", "-d", "overlay", "n"],
        "not a manager",
    );
    // Local networks on the worker.
    r.write(
        n2,
        &["network", "create", "--subnet", "127.0.0.0/24", "n"],
        "loopback",
    );
    r.write(
        n2,
        &["network", "create", "--opt", "bogus=1", "n"],
        "unknown option \"bogus\"",
    );
    r.write(
        n2,
        &["network", "create", "--label", big.as_str(), "n"],
        "at most 4096",
    );
    r.write(n2, &["network", "create", "-d", "macvlan", "n"], "parent");
    r.write(n2, &["network", "create", "-d", "host", "n"], "pre-defined");
    // network rm, inspect, connect, disconnect, ls.
    r.write(n1, &["network", "rm", "nosuch"], "nosuch");
    r.write(n1, &["network", "rm", ""], "it is empty");
    r.write(n1, &["network", "rm", "bridge"], "pre-defined");
    r.write(n1, &["network", "rm", "net1"], "in use");
    r.read(n1, &["network", "inspect", "nosuch"], "nosuch");
    r.read(n1, &["network", "inspect", ""], "it is empty");
    if let Some(p) = shared_prefix(&ids) {
        r.read(n1, &["network", "inspect", &p], "ambiguous");
        r.write(n1, &["network", "rm", &p], "ambiguous");
    }
    r.read(n1, &["network", "ls", "--filter", "bogus=1"], "\"bogus\"");
    r.read(n1, &["network", "ls", "--format", "bogus"], "'bogus'");
    r.write(n2, &["network", "connect", "nosuch", "sb1"], "nosuch");
    r.write(n2, &["network", "connect", "net1", "nosuch"], "nosuch");
    r.write(
        n2,
        &["network", "connect", "net1", "sb1"],
        "already connected",
    );
    r.write(n2, &["network", "connect", "", "sb1"], "it is empty");
    r.write(
        n2,
        &["network", "connect", "--alias", "a b", "bridge", "sb1"],
        "invalid alias",
    );
    r.write(
        n2,
        &["network", "connect", "--alias", &long, "bridge", "sb1"],
        "invalid alias",
    );
    r.write(
        n2,
        &["network", "disconnect", "nosuch", "sb1"],
        "not connected",
    );
    r.write(n2, &["network", "disconnect", "net1", "nosuch"], "nosuch");

    // run and the sandbox commands.
    let run = ["run", "-d"];
    let with_run = |extra: &[&str]| -> Vec<String> {
        run.iter()
            .chain(extra)
            .chain(&["--", "sleep", "1"])
            .map(|s| s.to_string())
            .collect()
    };
    for (extra, says) in [
        (&["--name", "a b"][..], "invalid sandbox name"),
        (&["--name", long.as_str()], "invalid sandbox name"),
        (&["--name", "sb1"], "already in use"),
        (&["--network", "nosuch"], "nosuch"),
        (&["--network", ""], "it is empty"),
        (&["--network", "net1", "--network", "net1"], "given twice"),
        (
            &["--network", "net1", "--network-alias", "a b"],
            "invalid alias",
        ),
        (
            &["--network", "net1", "--network-alias=-x.y"],
            "invalid alias",
        ),
        (&["-p", "70000:80"], "70000"),
        (&["-p", "80:80/sctp"], "sctp"),
        (&["-p", "abc"], "\"abc\""),
        (&["-e", "=x"], "\"=x\""),
        (&["-e", "x"], "\"x\""),
    ] {
        let args = with_run(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        r.write(n2, &args, says);
    }
    r.add_os(
        n2,
        with_os(&["run", "-d", "--name", "sleep", "1"], 3, not_utf8()),
        "not valid UTF-8",
        true,
    );
    r.write(
        n2,
        &["run", "-d", "--", "nosuchcommand-xyz"],
        "not found in PATH",
    );
    r.read(n2, &["exec", "nosuch", "true"], "nosuch");
    r.read(n2, &["exec", "", "true"], "it is empty");
    r.write(n2, &["rm", "nosuch"], "nosuch");
    r.write(n2, &["rm", ""], "it is empty");
    r.read(n2, &["port", "sb1", "abc"], "\"abc\"");
    r.read(n2, &["port", "sb1", "80/sctp"], "sctp");
    r.read(n2, &["inspect", "nosuch"], "nosuch");
    r.read(n2, &["ps", "--format", "bogus"], "'bogus'");
    r.read(n2, &["info", "--format", "bogus"], "'bogus'");

    // service create.
    let svc = |extra: &[&str], detach: bool| -> Vec<String> {
        let mut v: Vec<String> = ["service", "create"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if detach {
            v.push("--detach".into());
        }
        if !extra.contains(&"--name") {
            v.extend(["--name".to_string(), "s1".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--") {
            v.extend(["--", "sleep", "1"].iter().map(|s| s.to_string()));
        }
        v
    };
    for (extra, says, detach) in [
        (&["--replicas", "-1"][..], "cannot be negative", false),
        (&["--replicas", "abc"], "\"abc\"", false),
        (&["--replicas", "1e9"], "\"1e9\"", false),
        (
            &["--replicas", "99999999999999999999999"],
            "whole number",
            false,
        ),
        (&["--replicas", "1000000000"], "limit of 10000", false),
        (
            &["--constraint", "node.role=manager"],
            "\"node.role=manager\"",
            false,
        ),
        (
            &["--constraint", "node.bogus==x"],
            "\"node.bogus==x\"",
            true,
        ),
        (&["--constraint", ""], "invalid constraint", true),
        (
            &["--constraint", "node.role==boss"],
            "worker or manager",
            true,
        ),
        (&["--constraint", "node.labels.a b==x"], "space", true),
        (&["--restart-delay", "-1s"], "cannot be negative", true),
        (&["--restart-delay", "10x"], "10x", true),
        (&["--restart-delay", "99999h"], "at most 24h", true),
        (
            &["--restart-max-attempts", "99999999999999999999"],
            "too large",
            true,
        ),
        (&["--restart-condition", "bogus"], "'bogus'", true),
        (&["--publish", "bogus"], "\"bogus\"", true),
        (&["--publish", "80:80:80"], "80:80:80", true),
        (&["--publish", "70000:80"], "70000", true),
        (
            &["--publish", "8080:80", "--publish", "8080:80"],
            "published twice",
            true,
        ),
        (&["--mode", "nonsense"], "'nonsense'", true),
        (&["--endpoint-mode", "nonsense"], "'nonsense'", true),
        (
            &["--mode", "global", "--replicas", "2"],
            "replicated mode",
            true,
        ),
        (&["--name", ""], "invalid service name", false),
        (&["--name", "a b"], "invalid service name", true),
        (&["--name", long.as_str()], "invalid service name", true),
        (&["--name", "web"], "already exists", false),
        (&["--network", "nosuch"], "nosuch", false),
        (&["--network", ""], "it is empty", true),
        (&["--network", "bridge"], "local network", true),
        (
            &["--network", "net1", "--network", "net1"],
            "given twice",
            true,
        ),
        (&["--label", "=v"], "\"=v\"", true),
        (&["--label", big.as_str()], "at most 4096", true),
        (&["-e", "=v"], "\"=v\"", true),
        (&["--", ""], "command is empty", false),
    ] {
        let args = svc(extra, detach);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        r.write(n1, &args, says);
    }
    r.add_os(
        n1,
        with_os(
            &["service", "create", "--name", "--", "sleep", "1"],
            3,
            not_utf8(),
        ),
        "not valid UTF-8",
        true,
    );
    r.write(
        n2,
        &["service", "create", "--name", "s1", "--", "sleep", "1"],
        "not a manager",
    );
    // service update, scale, rm, ps, logs, inspect, ls.
    let upd = |extra: &[&str]| -> Vec<String> {
        ["service", "update", "--detach"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (extra, says) in [
        (&["--replicas", "-1", "web"][..], "cannot be negative"),
        (&["--replicas", "abc", "web"], "\"abc\""),
        (&["--replicas", "20000", "web"], "limit of 10000"),
        (&["nosuch"], "nosuch"),
        (&[""], "it is empty"),
        (
            &["--constraint-add", "node.role=manager", "web"],
            "node.role=manager",
        ),
        (&["--constraint-add", "", "web"], "invalid constraint"),
        (&["--constraint-rm", "", "web"], "it is empty"),
        (&["--network-add", "nosuch", "web"], "nosuch"),
        (&["--network-add", "net1", "web"], "already attached"),
        (&["--network-rm", "nosuch", "web"], "nosuch"),
        (&["--env-add", "=x", "web"], "\"=x\""),
        (&["--env-rm", "", "web"], "it is empty"),
        (&["--publish-add", "bogus", "web"], "\"bogus\""),
        (&["--publish-rm", "bogus", "web"], "\"bogus\""),
        (&["--publish-rm", "99999", "web"], "99999"),
    ] {
        let args = upd(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        r.write(n1, &args, says);
    }
    for (spec, says) in [
        ("web=-1", "cannot be negative"),
        ("web=abc", "\"abc\""),
        ("web", "SERVICE=REPLICAS"),
        ("=3", "SERVICE=REPLICAS"),
        ("web=1e9", "\"1e9\""),
        ("web=20000", "limit of 10000"),
        ("nosuch=1", "nosuch"),
    ] {
        r.write(n1, &["service", "scale", spec], says);
    }
    r.write(n1, &["service", "rm", "nosuch"], "nosuch");
    r.write(n1, &["service", "rm", ""], "it is empty");
    r.read(n1, &["service", "ps", "nosuch"], "nosuch");
    r.read(n1, &["service", "ps", ""], "it is empty");
    r.read(
        n1,
        &["service", "ps", "--format", "bogus", "web"],
        "'bogus'",
    );
    r.read(n1, &["service", "logs", "nosuch"], "nosuch");
    r.read(n1, &["service", "logs", ""], "it is empty");
    r.read(n1, &["service", "inspect", "nosuch"], "nosuch");
    r.read(n1, &["service", "ls", "--format", "bogus"], "'bogus'");
    r.read(n2, &["service", "ls"], "not a manager");

    // mesh lab, from the host.
    for (args, says) in [
        (&["lab", "up", "--name", "Bad"][..], "\"Bad\""),
        (&["lab", "up", "--name", ""], "it is empty"),
        (&["lab", "up", "--name", long.as_str()], "too long"),
        (&["lab", "up", "--name", "../x"], "\"../x\""),
        (
            &["lab", "up", "--name", lab_name.as_str()],
            "already exists",
        ),
        (
            &["lab", "up", "--name", "bi-bad", "--nodes", "0"],
            "--nodes 0",
        ),
        (
            &["lab", "up", "--name", "bi-bad", "--nodes", "abc"],
            "'abc'",
        ),
        (
            &[
                "lab",
                "up",
                "--name",
                "bi-bad",
                "--nodes",
                "2",
                "--managers",
                "5",
            ],
            "--managers 5",
        ),
        (
            &["lab", "exec", "nosuchlab", "node1", "true"],
            "no lab named nosuchlab",
        ),
        (&["lab", "exec", "../x", "node1", "true"], "\"../x\""),
        (
            &["lab", "exec", lab_name.as_str(), "node9", "true"],
            "\"node9\"",
        ),
        (
            &["lab", "exec", lab_name.as_str(), "", "true"],
            "no node \"\"",
        ),
        (&["lab", "kill", lab_name.as_str(), "node9"], "\"node9\""),
        (&["lab", "start", lab_name.as_str(), "nosuch"], "\"nosuch\""),
        (&["lab", "cut", lab_name.as_str(), "nosuch"], "\"nosuch\""),
        (&["lab", "heal", lab_name.as_str(), "nosuch"], "\"nosuch\""),
        (&["lab", "down", ""], "it is empty"),
        (&["lab", "down", "../../etc"], "\"../../etc\""),
        (&["lab", "down", "nosuchlab"], "no lab named nosuchlab"),
        (&["lab", "ls", "--format", "bogus"], "'bogus'"),
        (&["lab", "bogus"], "'bogus'"),
    ] {
        r.write(host, args, says);
    }
    r.add_os(
        host,
        with_os(&["lab", "up", "--name"], 3, not_utf8()),
        "not valid UTF-8",
        true,
    );

    // Run them all.
    let before = snapshot(&lab)?;
    let rows_started = Instant::now();
    let mut failures = Vec::new();
    let mut checked = 0;
    for row in &r.0 {
        let out = match run_row(&lab, row) {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("{}: did not run: {e:#}", row.shown()));
                continue;
            }
        };
        match judge(row, &out) {
            Ok(line) => println!("ok   {} -> {line}", row.shown()),
            Err(e) => {
                println!("FAIL {}: {e:#}", row.shown());
                failures.push(format!("{}: {e:#}", row.shown()));
            }
        }
        // A usage error (2) never reached a daemon; anything else that
        // could change state is checked against the listing right away.
        if row.changes && row.on != On::Host && out.status.code() != Some(2) {
            checked += 1;
            let now = snapshot(&lab)?;
            if now != before {
                failures.push(format!(
                    "{}: changed state: {}",
                    row.shown(),
                    diff(&before, &now)
                ));
                break;
            }
        }
    }
    let after = snapshot(&lab)?;
    ensure!(after == before, "state changed: {}", diff(&before, &after));
    let state_dir = &lab.node("node3")?.state_dir;
    for leftover in ["node.json", "certs"] {
        ensure!(
            !state_dir.join(leftover).exists(),
            "node3 has {leftover} after refused init/join"
        );
    }
    let labs = mesh_lab::list()?;
    ensure!(
        labs.iter().all(|l| l.name != "bi-bad"),
        "a refused `lab up` left lab bi-bad"
    );
    println!(
        "bad-input catalogue: {} rows run, {} failed, state listed after {checked} of them; rows took {:.1}s, test {:.1}s",
        r.0.len(),
        failures.len(),
        rows_started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    ensure!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
