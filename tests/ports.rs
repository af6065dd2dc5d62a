//! End-to-end tests of `mesh run -p`, `mesh port` and `mesh inspect` on a
//! namespace lab: published ports answer from another node and from the
//! node itself, a taken port is refused without leaving anything behind,
//! and `rm` frees it.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use serde_json::Value;

/// Runs `ip netns exec NS ARGS` and returns (success, stdout).
fn in_ns(ns: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .context("ip netns exec")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// `curl` from node `from`'s namespace until it answers with a body.
fn curl_ok(lab: &mesh_lab::Lab, from: &str, url: &str) -> Result<String> {
    let ns = lab.node(from)?.netns.clone();
    let (body, _) = wait_for(
        &format!("{url} from {from}"),
        Duration::from_secs(10),
        || {
            in_ns(&ns, &["curl", "-s", "--max-time", "2", url])
                .ok()
                .filter(|(ok, body)| *ok && !body.is_empty())
                .map(|(_, body)| body)
        },
    )?;
    Ok(body)
}

fn curl_fails(lab: &mesh_lab::Lab, from: &str, url: &str) -> Result<()> {
    let ns = lab.node(from)?.netns.clone();
    let (ok, body) = in_ns(&ns, &["curl", "-s", "--max-time", "2", url])?;
    ensure!(!ok, "{url} from {from} answered {body:?}; it must not");
    Ok(())
}

/// Serves `body` over HTTP on port 80.
fn http_server(body: &str) -> String {
    format!(
        "import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(s):
        b=b'{body}'
        s.send_response(200)
        s.send_header('Content-Length',str(len(b)))
        s.end_headers()
        s.wfile.write(b)
    def log_message(s,*a):
        pass
http.server.ThreadingHTTPServer(('',80),H).serve_forever()"
    )
}

/// A UDP echo on port 53 of the sandbox's own address: 127.0.0.11:53 is
/// the embedded resolver's, so the wildcard address is taken.
const UDP_ECHO: &str = "import socket
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.bind((socket.gethostbyname(socket.gethostname()),53))
while True:
    d,a=s.recvfrom(2048)
    s.sendto(b'echo:'+d,a)";

const UDP_CLIENT: &str = "import socket,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
s.settimeout(1)
for i in range(10):
    s.sendto(b'ping',(sys.argv[1],int(sys.argv[2])))
    try:
        print(s.recvfrom(2048)[0].decode()); break
    except socket.timeout:
        pass";

fn records_named(lab: &mesh_lab::Lab, node: &str, name: &str) -> Result<usize> {
    Ok(ps(lab, node)?.iter().filter(|s| s["Names"] == name).count())
}

#[test]
fn published_ports_answer_and_are_freed() -> Result<()> {
    let mut lab = up("pp", 2, 1, &[])?;
    let n1 = lab.node("node1")?.clone();
    let ip1 = n1.ip.to_string();

    // -p 8080:80: from another node and from the node itself.
    let web = http_server("web");
    lab.mesh_ok(
        "node1",
        &[
            "run", "-d", "--name", "web", "-p", "8080:80", "--", "python3", "-c", &web,
        ],
    )?;
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:8080/"))? == "web");
    ensure!(curl_ok(&lab, "node1", "http://127.0.0.1:8080/")? == "web");
    ensure!(curl_ok(&lab, "node1", &format!("http://{ip1}:8080/"))? == "web");
    let (code, out, _) = mesh(&lab, "node1", &["port", "web"])?;
    ensure!(
        code == 0 && out.trim() == "80/tcp -> 0.0.0.0:8080",
        "port: {out:?}"
    );
    let (_, out, _) = mesh(&lab, "node1", &["port", "web", "80/tcp"])?;
    ensure!(out.trim() == "0.0.0.0:8080", "port 80/tcp: {out:?}");

    // The same port again is refused, and nothing is left of the attempt.
    let prefix = ns_prefix(&lab, "node1")?;
    let before = netns_with_prefix(&prefix).len();
    let err = refused(
        &lab,
        "node1",
        &[
            "run", "-d", "--name", "web2", "-p", "8080:80", "--", "sleep", "100",
        ],
        "port is already allocated",
    )?;
    ensure!(
        err.contains("Bind for 0.0.0.0:8080 failed: port is already allocated"),
        "{err}"
    );
    ensure!(
        records_named(&lab, "node1", "web2")? == 0,
        "a record was left"
    );
    ensure!(
        netns_with_prefix(&prefix).len() == before,
        "a namespace was left"
    );
    // An address-bound binding overlaps 0.0.0.0 too.
    refused(
        &lab,
        "node1",
        &["run", "-d", "-p", "127.0.0.1:8080:80", "--", "sleep", "100"],
        "port is already allocated",
    )?;

    // rm frees it at once: the rule is gone and a new run gets the port.
    lab.mesh_ok("node1", &["rm", "-f", "web"])?;
    curl_fails(&lab, "node2", &format!("http://{ip1}:8080/"))?;
    let web2 = http_server("web2");
    lab.mesh_ok(
        "node1",
        &[
            "run", "-d", "--name", "web2", "-p", "8080:80", "--", "python3", "-c", &web2,
        ],
    )?;
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:8080/"))? == "web2");

    // Bound to loopback: answers on the node only.
    let lo = http_server("lo");
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "lo",
            "-p",
            "127.0.0.1:8181:80",
            "--",
            "python3",
            "-c",
            &lo,
        ],
    )?;
    ensure!(curl_ok(&lab, "node1", "http://127.0.0.1:8181/")? == "lo");
    curl_fails(&lab, "node2", &format!("http://{ip1}:8181/"))?;
    curl_fails(&lab, "node1", &format!("http://{ip1}:8181/"))?;

    // -p 80: a port from the ephemeral range, shown by `mesh port`.
    let dyn_ = http_server("dyn");
    lab.mesh_ok(
        "node1",
        &[
            "run", "-d", "--name", "dyn", "-p", "80", "--", "python3", "-c", &dyn_,
        ],
    )?;
    let out = lab.mesh_ok("node1", &["port", "dyn", "80"])?;
    let host = out.trim().to_string();
    let port: u16 = host
        .strip_prefix("0.0.0.0:")
        .context("no 0.0.0.0:")?
        .parse()?;
    ensure!((32768..=60999).contains(&port), "chosen port {port}");
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:{port}/"))? == "dyn");

    // UDP.
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "echo",
            "-p",
            "5353:53/udp",
            "--",
            "python3",
            "-c",
            UDP_ECHO,
        ],
    )?;
    let n2 = lab.node("node2")?.netns.clone();
    let ((_, out), _) = wait_for("udp echo", Duration::from_secs(10), || {
        in_ns(&n2, &["python3", "-c", UDP_CLIENT, &ip1, "5353"])
            .ok()
            .filter(|(_, o)| o.contains("echo:ping"))
    })?;
    ensure!(out.trim() == "echo:ping", "{out:?}");

    // inspect: Docker's shape, with the ports.
    let out = lab.mesh_ok("node1", &["inspect", "web2"])?;
    let v: Value = serde_json::from_str(&out)?;
    let o = &v[0];
    ensure!(o["Name"] == "/web2", "{o}");
    ensure!(o["State"]["Running"] == true, "{o}");
    let bind = &o["NetworkSettings"]["Ports"]["80/tcp"][0];
    ensure!(
        bind["HostPort"] == "8080" && bind["HostIp"] == "0.0.0.0",
        "{o}"
    );
    ensure!(
        o["HostConfig"]["PortBindings"]["80/tcp"][0]["HostPort"] == "8080",
        "{o}"
    );
    let net = &o["NetworkSettings"]["Networks"]["bridge"];
    ensure!(
        net["IPAddress"].as_str().is_some_and(|s| !s.is_empty()),
        "{o}"
    );
    ensure!(
        o["NetworkSettings"]["SandboxKey"]
            .as_str()
            .is_some_and(|s| s.starts_with("/run/netns/")),
        "{o}"
    );

    // Unknown sandboxes: one line, exit 1.
    for args in [&["port", "nosuch"][..], &["inspect", "nosuch"][..]] {
        let (code, _, err) = mesh(&lab, "node1", args)?;
        ensure!(
            code == 1 && err.trim().lines().count() == 1,
            "{args:?}: {code} {err}"
        );
    }
    // A rule deleted by hand comes back with the next pass.
    let (ok, _) = in_ns(&n1.netns, &["nft", "delete", "table", "ip", "mesh_ports"])?;
    ensure!(ok, "could not delete the table");
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:8080/"))? == "web2");

    // Hairpin: a sandbox on the node reaches a published port through the
    // node's address.
    let (out, _) = wait_for("hairpin", Duration::from_secs(10), || {
        let (code, out, _) = mesh(
            &lab,
            "node1",
            &[
                "exec",
                "lo",
                "--",
                "curl",
                "-s",
                "--max-time",
                "2",
                &format!("http://{ip1}:8080/"),
            ],
        )
        .ok()?;
        (code == 0 && out == "web2").then_some(out)
    })?;
    ensure!(out == "web2");

    // An overlay-only sandbox publishes through its egress address.
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "ovp"],
    )?;
    let ov = http_server("ov");
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "ov",
            "--network",
            "ovp",
            "-p",
            "8282:80",
            "--",
            "python3",
            "-c",
            &ov,
        ],
    )?;
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:8282/"))? == "ov");
    ensure!(curl_ok(&lab, "node1", "http://127.0.0.1:8282/")? == "ov");

    // Nowhere to forward to: refused, nothing left.
    refused(
        &lab,
        "node1",
        &[
            "run",
            "-d",
            "--name",
            "nonet",
            "--network",
            "none",
            "-p",
            "8383:80",
            "--",
            "sleep",
            "100",
        ],
        "publishing a port needs a bridge network",
    )?;
    ensure!(
        records_named(&lab, "node1", "nonet")? == 0,
        "a record was left"
    );

    // A restarted daemon rebuilds the table at start.
    lab.kill("node1")?;
    let (ok, _) = in_ns(&n1.netns, &["nft", "delete", "table", "ip", "mesh_ports"])?;
    ensure!(ok, "could not delete the table");
    lab.start("node1")?;
    let (ok, listed) = in_ns(&n1.netns, &["nft", "list", "table", "ip", "mesh_ports"])?;
    ensure!(
        ok && listed.contains("dport 8080"),
        "table not rebuilt at start: {listed}"
    );
    ensure!(curl_ok(&lab, "node2", &format!("http://{ip1}:8080/"))? == "web2");
    lab.down()?;
    Ok(())
}
