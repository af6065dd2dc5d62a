//! Security findings on the embedded DNS: no forwarding for sandboxes
//! without egress (CVE-2024-29018 in Docker), and DNS-over-TCP connections
//! capped per sandbox.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mesh_lab::Lab;

use crate::common::*;

/// Kills the upstream DNS server and removes its log even when the test
/// fails.
struct Upstream {
    child: std::process::Child,
    log: PathBuf,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// dnsmasq on 127.0.0.1:5353 in `node`'s namespace (where the daemon
/// forwards from, see `--dns-upstream`), answering `*.example.test` with
/// 192.0.2.10 and logging every query it gets.
fn start_upstream(lab: &Lab, node: &str) -> Result<Upstream> {
    let log = std::env::temp_dir().join(format!("{}-dnsmasq.log", lab.name));
    let _ = std::fs::remove_file(&log);
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node(node)?.netns, "dnsmasq"])
        .args(["--no-daemon", "--port=5353", "--listen-address=127.0.0.1"])
        .args(["--bind-interfaces", "--no-resolv", "--no-hosts"])
        .args(["--address=/example.test/192.0.2.10", "--log-queries"])
        .arg(format!("--log-facility={}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("dnsmasq (Debian's dnsmasq-base) is needed")?;
    Ok(Upstream { child, log })
}

fn run_sleeper(lab: &Lab, node: &str, name: &str, networks: &[&str]) -> Result<()> {
    let mut args = vec!["run", "-d", "--name", name];
    for n in networks {
        args.extend(["--network", n]);
    }
    args.extend(["--", "sleep", "600"]);
    lab.mesh_ok(node, &args)?;
    Ok(())
}

/// A sandbox whose networks are all `--internal` (overlay or local bridge)
/// has no egress, so its resolver must not be one either: what would be
/// forwarded is REFUSED, and the upstream sees nothing. Sandboxes with a
/// non-internal network on the same node still forward.
#[test]
fn internal_network_dns_is_not_forwarded() -> Result<()> {
    let lab = up_with("sdi", 2, 1, &[], &["--dns-upstream", "127.0.0.1:5353"])?;
    let upstream = start_upstream(&lab, "node2")?;
    let overlay = |args: &[&str]| -> Result<()> {
        let mut a = vec!["network", "create", "-d", "overlay", "--attachable"];
        a.extend(args);
        lab.mesh_ok("node1", &a)?;
        Ok(())
    };
    overlay(&["--internal", "sealed"])?;
    overlay(&["open"])?;
    lab.mesh_ok(
        "node2",
        &["network", "create", "-d", "bridge", "--internal", "lsealed"],
    )?;
    run_sleeper(&lab, "node2", "locked", &["sealed"])?;
    run_sleeper(&lab, "node2", "lbr", &["lsealed"])?;
    run_sleeper(&lab, "node2", "free", &["open"])?;
    run_sleeper(&lab, "node2", "mixed", &["sealed", "open"])?;

    // The upstream answers (and logs) before anything is asked of it by a
    // sealed sandbox, so "nothing logged" below means "nothing sent".
    wait_for("the upstream answers", Duration::from_secs(10), || {
        (dig_answers(&dig(&lab, "node2", "free", "example.test").ok()?) == ["192.0.2.10"])
            .then_some(())
    })?;

    for (sandbox, args) in [
        ("locked", "leak1.example.test"),
        ("locked", "+tcp leak2.example.test"),
        ("locked", "TXT leak3.example.test"),
        ("locked", "-x 192.0.2.99"),
        ("lbr", "leak4.example.test"),
    ] {
        let out = dig(&lab, "node2", sandbox, args)?;
        ensure!(
            dig_status(&out) == "REFUSED",
            "{sandbox}: dig {args} was not refused: {out}"
        );
    }
    // A sandbox on the internal network and another one forwards.
    let out = dig(&lab, "node2", "mixed", "last.example.test")?;
    ensure!(dig_answers(&out) == ["192.0.2.10"], "mixed: {out}");
    // Own names still resolve on an internal network.
    let own = dig(&lab, "node2", "mixed", "locked")?;
    ensure!(
        dig_status(&own) == "NOERROR" && dig_answers(&own).len() == 1,
        "locked by name on sealed: {own}"
    );

    // dnsmasq answers in order: once the last query is logged, any leak
    // before it would be too.
    let (log, _) = wait_for("the last query logged", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&upstream.log).ok()?;
        log.contains("last.example.test").then_some(log)
    })?;
    ensure!(
        !log.contains("leak") && !log.contains("99.2.0.192"),
        "an internal-only sandbox's query reached the upstream:\n{log}"
    );
    lab.down()?;
    Ok(())
}

/// Opens N TCP connections to the resolver (see the script).
const TCP_HOG: &str = include_str!("../../worker/tests/tcp_hog.py");

fn fd_count(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A sandbox opening hundreds of DNS-over-TCP connections holds at most the
/// per-sandbox cap of them; the daemon's descriptors stay bounded and the
/// resolver answers over TCP afterwards.
#[test]
fn dns_tcp_connections_per_sandbox_are_capped() -> Result<()> {
    const CLIENTS: usize = 800;
    const CAP: usize = mesh_worker::dns::MAX_TCP_CONNECTIONS;
    let lab = up("sdt", 1, 1, &[])?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    run_sleeper(&lab, "node1", "hog", &["app"])?;
    wait_for("hog resolvable over TCP", Duration::from_secs(10), || {
        (dig_answers(&dig(&lab, "node1", "hog", "+tcp hog").ok()?).len() == 1).then_some(())
    })?;
    let pid = lab.node("node1")?.pid.context("node1's daemon pid")?;
    let baseline = fd_count(pid).context("daemon fds")?;

    // Sample the daemon's descriptors while the sandbox hogs.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(baseline));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(n) = fd_count(pid) {
                    peak.fetch_max(n, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = lab.mesh(
        "node1",
        &[
            "exec",
            "hog",
            "--",
            "python3",
            "-c",
            TCP_HOG,
            &CLIENTS.to_string(),
            "1",
        ],
    );
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let counts: Vec<usize> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let &[opened, open] = counts.as_slice() else {
        anyhow::bail!(
            "hog printed {text:?} (stderr {})",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let peak = peak.load(Ordering::SeqCst);
    println!("{opened} connections made, {open} kept open; daemon fds {baseline}, peak {peak}");
    ensure!(opened == CLIENTS, "only {opened} connections made");
    ensure!(
        (1..=CAP).contains(&open),
        "{open} of {opened} connections kept open, cap {CAP}"
    );
    // The cap, plus room for whatever else the daemon does meanwhile
    // (heartbeats, the exec's API call); uncapped it was one per
    // connection.
    ensure!(
        peak <= baseline + CAP + 32,
        "daemon fds went from {baseline} to {peak}"
    );

    // Slots are freed when the connections close: TCP answers again.
    wait_for("TCP answers again", Duration::from_secs(10), || {
        (dig_answers(&dig(&lab, "node1", "hog", "+tcp hog").ok()?).len() == 1).then_some(())
    })?;
    lab.down()?;
    Ok(())
}
