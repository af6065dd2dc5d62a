//! Encrypted overlay benchmark (issue 13) on a 2-node lab. Prints, in one
//! run, iperf3 TCP throughput node1 -> node2 with 1 and 4 streams (medians of
//! 3 short runs) for:
//! 1. plain: two sandboxes on an attachable overlay;
//! 2. encrypted: the same on an overlay with `--opt encrypted`;
//! 3. stock: `boringtun-cli` (userspace WireGuard, one thread) in the two
//!    node namespaces, configured with `wg` through its UAPI socket, and a
//!    plain kernel VXLAN (MTU 1390, as (2)'s inner MTU) over it, iperf3
//!    between the nodes' VXLAN addresses.
//!
//! Then the ratios (2)/(3) (target >= 5x) and (2)/(1), CPU seconds per GB
//! moved (all CPUs' busy time from /proc/stat over each run, so other load on
//! the machine counts too), and which datapath (2) used (from `mesh info`).
//!
//! `boringtun-cli` 0.7 is built once with `cargo install` into
//! `<target>/boringtun-cli/` and reused. Needs iperf3 and wg (wireguard-tools);
//! `deploy/install.sh` installs them. Run: `cargo bench --bench encrypted`
//! (as root). Everything (lab, processes, UAPI sockets) goes at the end, also
//! on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

#[path = "../tests/common/mod.rs"]
mod common;
use common::cpu_ticks;
use mesh_lab::{Lab, UpSpec};
use serde_json::Value;

const RUNS: usize = 3;
const SECONDS: &str = "3";
const STREAMS: [&str; 2] = ["1", "4"];
/// Underlay MTU of the lab (a veth).
const UNDERLAY_MTU: u32 = 1500;
/// Inner MTU of an encrypted overlay: underlay - WireGuard 60 - VXLAN 50.
const INNER_MTU: u32 = UNDERLAY_MTU - 110;
/// Ports of the stock setup, beside the mesh's own 51820 and 4789 in the
/// same node namespaces.
const STOCK_WG_PORT: &str = "51821";
const STOCK_VXLAN_PORT: &str = "4790";
const STOCK_IPERF_PORT: &str = "5301";
/// Linux reports /proc/stat in USER_HZ, 100 per second on every arch.
const USER_HZ: f64 = 100.0;
const UAPI_DIR: &str = "/var/run/wireguard";

/// One configuration's figures for one stream count.
#[derive(Clone, Copy, Default)]
struct Figure {
    /// Median bits per second.
    bps: f64,
    /// CPU seconds (all CPUs) per GB received, over all runs.
    cpu_per_gb: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Received bits per second and bytes of an iperf3 `-J` report.
fn iperf_result(json: &[u8]) -> Result<(f64, u64)> {
    let v: Value = serde_json::from_slice(json)?;
    let r = &v["end"]["sum_received"];
    match (r["bits_per_second"].as_f64(), r["bytes"].as_u64()) {
        (Some(b), Some(n)) => Ok((b, n)),
        _ => bail!(
            "no throughput in iperf3 output: {}",
            String::from_utf8_lossy(json)
        ),
    }
}

/// Runs `client` (an iperf3 client command for `streams`) RUNS times.
fn measure(mut client: impl FnMut(&str) -> Result<Vec<u8>>, streams: &str) -> Result<Figure> {
    // Warm-up: ARP, FDB, handshakes.
    client(streams)?;
    let (mut bps, mut bytes, mut busy) = (Vec::new(), 0u64, 0u64);
    for _ in 0..RUNS {
        let (b0, _) = cpu_ticks()?;
        let out = client(streams)?;
        let (b1, _) = cpu_ticks()?;
        let (b, n) = iperf_result(&out)?;
        bps.push(b);
        bytes += n;
        busy += b1.saturating_sub(b0);
    }
    let gb = bytes as f64 / 1e9;
    Ok(Figure {
        bps: median(bps),
        cpu_per_gb: if gb > 0.0 {
            busy as f64 / USER_HZ / gb
        } else {
            f64::NAN
        },
    })
}

/// Processes and UAPI sockets of the stock setup, removed on drop.
#[derive(Default)]
struct Stock {
    children: Vec<Child>,
    sockets: Vec<PathBuf>,
}

impl Drop for Stock {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for c in &mut self.children {
            // boringtun exits on SIGTERM; make sure anyway.
            for _ in 0..20 {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// `boringtun-cli` 0.7, built once into the target dir.
fn boringtun_cli() -> Result<PathBuf> {
    let target = Path::new(env!("CARGO_BIN_EXE_mesh"))
        .parent()
        .and_then(Path::parent)
        .context("no target dir above the mesh binary")?;
    let root = target.join("boringtun-cli");
    let bin = root.join("bin/boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "bench: building boringtun-cli 0.7 into {} (once)",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["install", "boringtun-cli", "--version", "~0.7", "--locked"])
        .arg("--root")
        .arg(&root)
        .arg("--target-dir")
        .arg(root.join("build"))
        .stdin(Stdio::null())
        .status()
        .context("running cargo install boringtun-cli")?;
    ensure!(
        st.success() && bin.exists(),
        "cargo install boringtun-cli failed ({st})"
    );
    Ok(bin)
}

/// Runs `argv` in `node`'s namespace; fails with its stderr.
fn in_node(lab: &Lab, node: &str, argv: &[&str]) -> Result<String> {
    Ok(lab.exec_ok(node, argv)?)
}

/// Runs `argv` in `node`'s namespace with `input` on stdin.
fn in_node_stdin(lab: &Lab, node: &str, argv: &[&str], input: &str) -> Result<String> {
    use std::io::Write;
    let (program, args) = argv.split_first().context("empty command")?;
    let mut cmd = lab.command(node, program)?;
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{argv:?} on {node}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Stock boringtun-cli + `wg` + kernel VXLAN between node1 and node2.
/// Returns the address of node2's end of the VXLAN.
fn stock_setup(lab: &Lab, stock: &mut Stock, tag: &str) -> Result<String> {
    let bin = boringtun_cli()?;
    let bin = bin.to_string_lossy().into_owned();
    let nodes = ["node1", "node2"];
    // Interface names are global through the UAPI socket path: unique per lab.
    let ifs = [format!("{tag}a"), format!("{tag}b")];
    let tun = ["10.213.0.1", "10.213.0.2"];
    let vx = ["10.214.0.1", "10.214.0.2"];
    let mut keys = Vec::new();
    for _ in nodes {
        let private = in_node(lab, "node1", &["wg", "genkey"])?.trim().to_string();
        let public = in_node_stdin(lab, "node1", &["wg", "pubkey"], &private)?;
        keys.push((private, public));
    }
    for (i, node) in nodes.iter().enumerate() {
        let sock = Path::new(UAPI_DIR).join(format!("{}.sock", ifs[i]));
        ensure!(
            !sock.exists(),
            "{} exists: another run uses {}",
            sock.display(),
            ifs[i]
        );
        let mut cmd = lab.command(node, &bin)?;
        cmd.args([
            "--foreground",
            "--disable-drop-privileges",
            "--threads",
            "1",
            "--log",
        ])
        .arg(lab.dir.join(format!("{node}-boringtun.log")))
        .arg(&ifs[i])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        stock
            .children
            .push(cmd.spawn().context("starting boringtun-cli")?);
        stock.sockets.push(sock.clone());
        let mut waited = 0;
        while !sock.exists() {
            ensure!(
                waited < 100,
                "boringtun-cli made no UAPI socket {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(50));
            waited += 1;
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let j = 1 - i;
        let keyfile = lab.dir.join(format!("{node}-stock.key"));
        std::fs::write(&keyfile, &keys[i].0)?;
        let endpoint = format!("{}:{STOCK_WG_PORT}", lab.node(nodes[j])?.ip);
        let allowed = format!("{}/32", tun[j]);
        in_node(
            lab,
            node,
            &[
                "wg",
                "set",
                &ifs[i],
                "private-key",
                &keyfile.to_string_lossy(),
                "listen-port",
                STOCK_WG_PORT,
                "peer",
                &keys[j].1,
                "allowed-ips",
                &allowed,
                "endpoint",
                &endpoint,
            ],
        )?;
        let tun_mtu = (UNDERLAY_MTU - 60).to_string();
        let vx_mtu = INNER_MTU.to_string();
        let vxname = format!("{}x", ifs[i]);
        for argv in [
            vec![
                "ip",
                "addr",
                "add",
                &format!("{}/24", tun[i]),
                "dev",
                &ifs[i],
            ],
            vec!["ip", "link", "set", &ifs[i], "mtu", &tun_mtu, "up"],
            vec![
                "ip",
                "link",
                "add",
                &vxname,
                "type",
                "vxlan",
                "id",
                "4242",
                "local",
                tun[i],
                "remote",
                tun[j],
                "dstport",
                STOCK_VXLAN_PORT,
                "dev",
                &ifs[i],
            ],
            vec![
                "ip",
                "addr",
                "add",
                &format!("{}/24", vx[i]),
                "dev",
                &vxname,
            ],
            vec!["ip", "link", "set", &vxname, "mtu", &vx_mtu, "up"],
        ] {
            in_node(lab, node, &argv)?;
        }
    }
    let mut srv = lab.command("node2", "iperf3")?;
    srv.args(["-s", "-p", STOCK_IPERF_PORT])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    stock.children.push(srv.spawn()?);
    // The tunnel answers once the handshake is done.
    let mut ok = false;
    for _ in 0..20 {
        if lab
            .exec("node1", &["ping", "-c1", "-W1", vx[1]])
            .is_ok_and(|o| o.status.success())
        {
            ok = true;
            break;
        }
    }
    ensure!(ok, "no ping across the stock VXLAN over boringtun-cli");
    let probe = format!("{}", INNER_MTU - 28);
    in_node(
        lab,
        "node1",
        &["ping", "-M", "do", "-c1", "-W2", "-s", &probe, vx[1]],
    )
    .context("the stock VXLAN does not carry its full MTU")?;
    Ok(vx[1].to_string())
}

/// Two sandboxes on `net` (iperf3 server on node2, client on node1); the
/// server's address.
fn sandboxes(lab: &Lab, net: &str, srv: &str, cli: &str) -> Result<String> {
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            srv,
            "--network",
            net,
            "--",
            "iperf3",
            "-s",
        ],
    )?;
    lab.mesh_ok(
        "node1",
        &[
            "run",
            "-d",
            "--name",
            cli,
            "--network",
            net,
            "--",
            "sleep",
            "3600",
        ],
    )?;
    let ps = lab.mesh_ok("node2", &["ps", "--format", "json"])?;
    let ip = ps
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|s| s["Names"] == srv)
        .and_then(|s| s["IPs"].as_str().map(String::from))
        .with_context(|| format!("no sandbox {srv}"))?;
    let ip = ip.split(',').next().unwrap_or_default().to_string();
    let mut ok = false;
    for _ in 0..30 {
        if lab
            .mesh("node1", &["exec", cli, "--", "ping", "-c1", "-W1", &ip])
            .is_ok_and(|o| o.status.success())
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    ensure!(ok, "{cli} cannot reach {srv} ({ip}) on {net}");
    // iperf3 -s needs a moment to listen.
    std::thread::sleep(Duration::from_millis(300));
    Ok(ip)
}

fn overlay_client(lab: &Lab, cli: &str, ip: &str, streams: &str) -> Result<Vec<u8>> {
    let out = lab.mesh(
        "node1",
        &[
            "exec", cli, "--", "iperf3", "-c", ip, "-t", SECONDS, "-P", streams, "-J",
        ],
    )?;
    ensure!(
        out.status.success(),
        "iperf3 from {cli}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The datapath node1's `mesh info --format json` reports for its
/// WireGuard device (key names compared lowercased without '_').
fn datapath(lab: &Lab) -> String {
    fn find(v: &Value) -> Option<String> {
        match v {
            Value::Object(m) => m
                .iter()
                .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case("datapath"))
                .and_then(|(_, x)| x.as_str().map(String::from))
                .or_else(|| m.values().find_map(find)),
            Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    lab.mesh_ok("node1", &["info", "--format", "json"])
        .ok()
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .and_then(|v| find(&v))
        .unwrap_or_else(|| "unknown (mesh info shows none)".into())
}

fn gbit(f: &Option<Figure>) -> String {
    f.map(|f| format!("{:.2} Gbit/s", f.bps / 1e9))
        .unwrap_or_else(|| "n/a".into())
}

fn cpu(f: &Option<Figure>) -> String {
    f.map(|f| format!("{:.1} CPU-s/GB", f.cpu_per_gb))
        .unwrap_or_else(|| "n/a".into())
}

fn ratio(a: &Option<Figure>, b: &Option<Figure>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.bps > 0.0 => format!("{:.2}x", a.bps / b.bps),
        _ => "n/a".into(),
    }
}

fn main() -> Result<()> {
    let id = std::process::id() % 100_000;
    let name = format!("be{id}");
    let _ = mesh_lab::cleanup_stale(&name);
    // Dropping `lab` (also on an early return) tears it down; `stock` is
    // declared after it, so it goes first.
    let lab = Lab::up(
        &UpSpec::new(&name, 2, 1),
        Path::new(env!("CARGO_BIN_EXE_mesh")),
    )?;
    let mut stock = Stock::default();

    // (1) plain overlay.
    lab.mesh_ok(
        "node1",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "bplain",
        ],
    )?;
    let plain_ip = sandboxes(&lab, "bplain", "psrv", "pcli")?;

    // (2) encrypted overlay: reported, not fatal, so (1) and (3) still print.
    let enc = lab
        .mesh_ok(
            "node1",
            &[
                "network",
                "create",
                "-d",
                "overlay",
                "--opt",
                "encrypted",
                "--attachable",
                "bsec",
            ],
        )
        .map_err(anyhow::Error::from)
        .and_then(|_| sandboxes(&lab, "bsec", "ssrv", "scli"));
    let enc_ip = match enc {
        Ok(ip) => Some(ip),
        Err(e) => {
            eprintln!("bench: encrypted overlay unavailable: {e:#}");
            None
        }
    };

    // (3) stock boringtun-cli with VXLAN over it.
    let stock_ip = stock_setup(&lab, &mut stock, &format!("bt{}", id % 10_000))?;

    // CPU figures count the whole machine: show what was busy before.
    let (b0, t0) = cpu_ticks()?;
    std::thread::sleep(Duration::from_secs(2));
    let (b1, t1) = cpu_ticks()?;
    let background = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;

    let mut rows: Vec<(&str, [Option<Figure>; 3])> = Vec::new();
    for streams in STREAMS {
        let plain = measure(|s| overlay_client(&lab, "pcli", &plain_ip, s), streams)?;
        let encrypted = match &enc_ip {
            Some(ip) => Some(measure(|s| overlay_client(&lab, "scli", ip, s), streams)?),
            None => None,
        };
        let stock_fig = measure(
            |s| {
                Ok(lab
                    .exec_ok(
                        "node1",
                        &[
                            "iperf3",
                            "-c",
                            &stock_ip,
                            "-p",
                            STOCK_IPERF_PORT,
                            "-t",
                            SECONDS,
                            "-P",
                            s,
                            "-J",
                        ],
                    )?
                    .into_bytes())
            },
            streams,
        )?;
        rows.push((streams, [Some(plain), encrypted, Some(stock_fig)]));
    }
    let path = if enc_ip.is_some() {
        datapath(&lab)
    } else {
        "n/a".into()
    };

    println!(
        "encrypted overlay bench: iperf3 TCP node1 -> node2, median of {RUNS} x {SECONDS}s; inner MTU {INNER_MTU}; CPU = all CPUs' busy time per GB received"
    );
    for (streams, [plain, encrypted, stock_fig]) in &rows {
        println!("TCP, {streams} stream(s):");
        println!(
            "  (1) plain overlay           {:>14}  {:>14}",
            gbit(plain),
            cpu(plain)
        );
        println!(
            "  (2) encrypted overlay       {:>14}  {:>14}",
            gbit(encrypted),
            cpu(encrypted)
        );
        println!(
            "  (3) stock boringtun-cli+VXLAN {:>12}  {:>14}",
            gbit(stock_fig),
            cpu(stock_fig)
        );
        println!(
            "  (2)/(3) {} (target >= 5x), (2)/(1) {}",
            ratio(encrypted, stock_fig),
            ratio(encrypted, plain)
        );
    }
    println!("datapath of (2): {path}");
    println!(
        "background before the runs: {:.0}% of all CPUs busy (included in the CPU figures)",
        background * 100.0
    );
    drop(stock);
    lab.down()?;
    ensure!(
        enc_ip.is_some(),
        "the encrypted overlay could not be measured (see above)"
    );
    Ok(())
}
