//! Shared helpers of the end-to-end tests: labs with unique names, the mesh
//! binary under test, polling, and JSON output parsing.
#![allow(dead_code)]

pub mod sim;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_lab::{Lab, UpSpec};
use serde_json::Value;

pub fn mesh_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mesh"))
}

/// A lab name unique to this test run (and short enough for interface names).
pub fn lab_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Brings up a lab, cleaning leftovers of an earlier crashed run first.
pub fn up(tag: &str, nodes: usize, managers: usize, init_args: &[&str]) -> Result<Lab> {
    up_with(tag, nodes, managers, init_args, &[])
}

/// `up` with extra `mesh daemon` arguments for every node.
pub fn up_with(
    tag: &str,
    nodes: usize,
    managers: usize,
    init_args: &[&str],
    daemon_args: &[&str],
) -> Result<Lab> {
    let name = lab_name(tag);
    let _ = mesh_lab::cleanup_stale(&name);
    let mut spec = UpSpec::new(&name, nodes, managers);
    spec.init_args = init_args.iter().map(|s| s.to_string()).collect();
    spec.daemon_args = daemon_args.iter().map(|s| s.to_string()).collect();
    Lab::up(&spec, mesh_bin()).with_context(|| format!("lab {name} did not come up"))
}

/// Parses `--format json` output: one JSON object per line.
pub fn json_lines(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

pub fn node_ls(lab: &Lab, node: &str) -> Result<Vec<Value>> {
    json_lines(&lab.mesh_ok(node, &["node", "ls", "--format", "json"])?)
}

/// Hostname of the node `ls` calls Leader, if any.
pub fn leader(lab: &Lab, via: &str) -> Option<String> {
    let nodes = node_ls(lab, via).ok()?;
    nodes
        .iter()
        .find(|n| n["ManagerStatus"] == "Leader")
        .and_then(|n| n["Hostname"].as_str().map(String::from))
}

pub fn status_of(nodes: &[Value], hostname: &str) -> Option<String> {
    nodes
        .iter()
        .find(|n| n["Hostname"] == hostname)
        .and_then(|n| n["Status"].as_str().map(String::from))
}

/// Polls `f` until it returns Some, or fails after `limit` with `what`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs mesh on a node and returns (exit code, stdout, stderr).
pub fn mesh(lab: &Lab, node: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = lab.mesh(node, args)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Asserts that a command is refused: non-zero exit, one line on stderr
/// containing `needle`.
pub fn refused(lab: &Lab, node: &str, args: &[&str], needle: &str) -> Result<String> {
    let (code, _out, err) = mesh(lab, node, args)?;
    if code == 0 {
        bail!(
            "`mesh {}` on {node} succeeded; expected a refusal containing {needle:?}",
            args.join(" ")
        );
    }
    let err = err.trim().to_string();
    if !err.contains(needle) {
        bail!(
            "`mesh {}` on {node}: stderr {err:?} lacks {needle:?}",
            args.join(" ")
        );
    }
    if err.lines().count() != 1 {
        bail!(
            "`mesh {}` on {node}: error is not one line: {err:?}",
            args.join(" ")
        );
    }
    Ok(err)
}

/// A Control API client on a node's unix socket (reachable from the host:
/// the socket lives in the filesystem, not in the node's network namespace).
pub async fn control(
    lab: &Lab,
    node: &str,
) -> Result<mesh_proto::control_client::ControlClient<tonic::transport::Channel>> {
    let ch = mesh_common::transport::unix_channel(&lab.node(node)?.socket).await?;
    Ok(mesh_proto::control_client::ControlClient::new(ch))
}

/// The cluster (swarm-scope) networks a manager lists.
pub fn network_ls(lab: &Lab, node: &str) -> Result<Vec<Value>> {
    let all = json_lines(&lab.mesh_ok(node, &["network", "ls", "--format", "json"])?)?;
    Ok(all.into_iter().filter(|n| n["Scope"] == "swarm").collect())
}

/// `mesh ps --format json` of a node.
pub fn ps(lab: &Lab, node: &str) -> Result<Vec<Value>> {
    json_lines(&lab.mesh_ok(node, &["ps", "-a", "--format", "json"])?)
}

/// The overlay address of a sandbox (first network).
pub fn sandbox_ip(lab: &Lab, node: &str, name: &str) -> Result<String> {
    let list = ps(lab, node)?;
    let s = list
        .iter()
        .find(|s| s["Names"] == name)
        .with_context(|| format!("no sandbox {name} on {node}"))?;
    let ips = s["IPs"].as_str().unwrap_or_default();
    Ok(ips.split(',').next().unwrap_or_default().to_string())
}

/// The namespace prefix of a node's daemon (from its state dir).
pub fn ns_prefix(lab: &Lab, node: &str) -> Result<String> {
    let id = std::fs::read_to_string(lab.node(node)?.state_dir.join("instance"))?;
    Ok(format!("mesh{}", id.trim()))
}

/// Named namespaces starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A service task that answers HTTP GET on port 8080 with its hostname
/// (the task's name), for tests and benchmarks of VIPs.
pub const HTTP_SERVER: &str = "import http.server,socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b=socket.gethostname().encode()
        s.send_response(200)
        s.send_header('Content-Length',str(len(b)))
        s.end_headers()
        s.wfile.write(b)
    def log_message(s,*a):
        pass
http.server.ThreadingHTTPServer(('',8080),H).serve_forever()";

/// A service, its tasks and convergence, through a node's Control API.
pub fn status(lab: &Lab, node: &str, service: &str) -> Result<mesh_proto::ServiceStatusReply> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = control(lab, node).await?;
        let r = c
            .service_status(mesh_proto::ServiceRef {
                service: service.to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("service status {service}: {}", s.message()))?;
        Ok(r.into_inner())
    })
}

/// `dig ARGS` inside a sandbox: its output (one try, 2 s).
pub fn dig(lab: &Lab, node: &str, sandbox: &str, args: &str) -> Result<String> {
    let out = lab.mesh(
        node,
        &[
            "exec",
            sandbox,
            "--",
            "sh",
            "-c",
            &format!("dig +time=2 +tries=1 {args}"),
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The status of a dig answer (NOERROR, NXDOMAIN, REFUSED...).
pub fn dig_status(text: &str) -> &str {
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
}

/// The values of a dig answer's ANSWER section.
pub fn dig_answers(text: &str) -> Vec<String> {
    text.split(";; ANSWER SECTION:")
        .nth(1)
        .map(|a| {
            // The first line is the rest of the section header.
            a.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Busy and total ticks of all CPUs.
pub fn cpu_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    anyhow::ensure!(f.len() >= 5, "unexpected /proc/stat line: {line}");
    // user nice system idle iowait irq softirq steal ...; guest is in user.
    let total: u64 = f.iter().take(8).sum();
    let idle = f[3] + f[4];
    Ok((total - idle, total))
}
