//! Service VIPs against the real kernel: a client sandbox and three task
//! sandboxes on one bridge (in a hub namespace of its own), a TCP server in
//! each task answering its name, and `mesh_vip` in the client spreading
//! connections to the VIP over them.
//!
//! Needs root (namespaces, veth, bridge, nftables) and python3 for the
//! servers. Traffic never leaves the namespaces the tests create; drop
//! guards kill the servers and remove the namespaces even when an assertion
//! fails half-way.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_worker::firewall::Drift;
use mesh_worker::netns;
use mesh_worker::vip::{self, VipService};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const PORT: u16 = 8080;
const PREFIX: &str = "24";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 100);
/// A second service whose tasks never run.
const IDLE_VIP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 101);

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 77, 11 + i)
}

/// A second address of task `i`, so three namespaces make six backends.
fn second_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, 77, 21 + i)
}

/// Removes the namespaces it lists when dropped.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn create(&mut self, name: &str) {
        self.0.push(name.to_string());
        netns::create(name).expect("create namespace");
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Kills the servers' process groups when dropped (declared after
/// `Namespaces`, so it runs first).
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// These tests need root: without it they fail, so a run that could not
/// test says so instead of passing.
fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root: VIP tests make namespaces and devices"
    );
}

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn ip(args: &[&str]) -> String {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    let out = run(&full);
    assert!(
        out.status.success(),
        "{full:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nft_in(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns, "nft"];
    full.extend_from_slice(args);
    ip(&full)
}

/// Plugs `ns` into the hub's bridge with address `addr` on its `eth0`.
fn plug(hub: &str, port: &str, ns: &str, addr: Ipv4Addr) {
    ip(&[
        "-n", hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ]);
    ip(&["-n", hub, "link", "set", port, "master", "br0", "up"]);
    let cidr = format!("{addr}/{PREFIX}");
    ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
    ip(&["-n", ns, "link", "set", "eth0", "up"]);
}

/// A TCP server in `ns` that answers every connection with `name` and the
/// address it was reached at.
fn serve(ns: &str, name: &str) -> Child {
    const SERVER: &str = "\
import socketserver, sys
name = sys.argv[1].encode()
port = int(sys.argv[2])
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(name + b' ' + self.request.getsockname()[0].encode())
socketserver.TCPServer.allow_reuse_address = True
socketserver.TCPServer(('0.0.0.0', port), H).serve_forever()
";
    let port = PORT.to_string();
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", SERVER, name, &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start python3 server")
}

/// Connects from `ns` to `to` and reads the whole answer.
fn ask(ns: &str, to: Ipv4Addr) -> io::Result<String> {
    netns::run_in(ns, || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .map_err(io::Error::other)?
}

/// Who answered `n` connections to the VIP, and how often.
fn tally(ns: &str, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let who = ask(ns, VIP).expect("connection to the VIP");
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

fn wait_until_serving(client: &str, backends: &[Ipv4Addr]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for b in backends {
        while ask(client, *b).is_err() {
            assert!(Instant::now() < deadline, "server at {b} never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn ping(ns: &str, to: Ipv4Addr) -> bool {
    let to = to.to_string();
    run(&[
        "ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "1", &to,
    ])
    .status
    .success()
}

fn service(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> VipService {
    VipService {
        name: name.into(),
        vip,
        backends: backends.to_vec(),
    }
}

/// Each of `backends` (task `i` at `.11+i` or `.21+i`) answering `each` times.
fn expected(backends: &[Ipv4Addr], each: usize) -> BTreeMap<String, usize> {
    backends
        .iter()
        .map(|b| (format!("task{} {b}", (b.octets()[3] - 1) % 10), each))
        .collect()
}

#[test]
fn vip_round_robin_refuse_and_remove() {
    require_root();
    let tag = format!("vip{}", std::process::id());
    let (hub, client) = (format!("{tag}-hub"), format!("{tag}-c"));
    let task_ns: Vec<String> = (0..3).map(|i| format!("{tag}-t{i}")).collect();
    let backends: Vec<Ipv4Addr> = (0..3).map(backend_ip).collect();
    let seconds: Vec<Ipv4Addr> = (0..3).map(second_ip).collect();

    let mut spaces = Namespaces(Vec::new());
    let mut servers = Servers(Vec::new());
    spaces.create(&hub);
    ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &hub, "link", "set", "br0", "up"]);
    spaces.create(&client);
    plug(&hub, "pc", &client, CLIENT);
    for (i, ns) in task_ns.iter().enumerate() {
        spaces.create(ns);
        plug(&hub, &format!("p{i}"), ns, backends[i]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{PREFIX}", seconds[i]),
            "dev",
            "eth0",
        ]);
        servers.0.push(serve(ns, &format!("task{i}")));
    }
    wait_until_serving(&client, &backends);

    let web = |b: &[Ipv4Addr]| [service("web", VIP, b), service("idle", IDLE_VIP, &[])];
    // Six backends: 60 connections, 10 each.
    let six: Vec<Ipv4Addr> = backends.iter().chain(&seconds).copied().collect();
    vip::sync(&client, &web(&six)).expect("sync with 6 backends");
    assert_eq!(tally(&client, 60), expected(&six, 10));

    // Three tasks: 30 connections, 10 each, in turn.
    let started = Instant::now();
    vip::sync(&client, &web(&backends)).expect("sync with 3 tasks");
    eprintln!("one sync: {:?}", started.elapsed());
    let listed = nft_in(&client, &["list", "table", "ip", vip::TABLE]);
    eprintln!("{listed}");
    assert_eq!(tally(&client, 30), expected(&backends, 10));

    // Two tasks: only they answer.
    vip::sync(&client, &web(&backends[..2])).expect("sync with 2 tasks");
    // What the reconcile loop asks: the kernel's copy reads back as made.
    let drift = vip::drift(&client, &web(&backends[..2])).expect("drift");
    assert_eq!(drift, Drift::InSync);
    let drift = vip::drift(&client, &web(&backends)).expect("drift");
    assert_eq!(drift, Drift::Differs, "a VIP table for other tasks");
    assert_eq!(tally(&client, 20), expected(&backends[..2], 10));
    // Every protocol goes to a task: a ping to the VIP is answered.
    assert!(ping(&client, VIP), "ping to the VIP with tasks");

    // No task: refused at once rather than hanging, TCP and UDP alike.
    vip::sync(&client, &web(&[])).expect("sync with no task");
    for vip_ in [VIP, IDLE_VIP] {
        // ECONNREFUSED is the clean refusal; a hang would end in the
        // client's own 2 s connect timeout (TimedOut) instead.
        let err = ask(&client, vip_).expect_err("no task, no answer");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");

        // A dropped locally generated datagram fails its send with EPERM
        // (as under kube-proxy); a later read would see the ICMP error. A
        // silent drop would end in the 2 s read timeout (WouldBlock) instead.
        let udp = netns::run_in(&client, || -> io::Result<usize> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.connect((vip_, PORT))?;
            s.send(b"hello")?;
            s.recv(&mut [0u8; 16])
        })
        .expect("enter client");
        let err = udp.expect_err("no task, no UDP answer");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ConnectionRefused
            ),
            "{err}"
        );
        assert!(!ping(&client, vip_), "ping to a VIP without tasks");
    }
    let listed = nft_in(&client, &["list", "table", "ip", vip::TABLE]);
    eprintln!("{listed}");
    assert!(!listed.contains("dnat"), "{listed}");

    // Same services, same rendering; another set, another one.
    assert_eq!(vip::render(&web(&[])), vip::render(&web(&[])));
    assert_ne!(vip::render(&web(&[])), vip::render(&web(&backends)));

    let flushed = Command::new("ip")
        .args(["netns", "exec", &client, "nft", "flush", "chain", "ip"])
        .args([vip::TABLE, "output_filter"])
        .status()
        .expect("run nft");
    assert!(flushed.success());
    let drift = vip::drift(&client, &web(&[])).expect("drift");
    assert_eq!(drift, Drift::Differs, "a flushed chain");
    vip::remove(&client).expect("remove");
    let drift = vip::drift(&client, &web(&[])).expect("drift");
    assert_eq!(drift, Drift::Missing);
    let tables = nft_in(&client, &["list", "tables"]);
    assert!(!tables.contains(vip::TABLE), "{tables}");
    vip::remove(&client).expect("remove again: missing is fine");
    // The tasks are reachable directly again, and the VIP is just an address.
    let direct = ask(&client, backends[0]).expect("direct");
    assert_eq!(direct, "task0 10.250.77.11");
}

#[test]
fn sync_many_updates_every_namespace_and_reports_failures() {
    require_root();
    let tag = format!("vipm{}", std::process::id());
    let mut spaces = Namespaces(Vec::new());
    let names: Vec<String> = (0..20).map(|i| format!("{tag}-{i}")).collect();
    for ns in &names {
        spaces.create(ns);
    }
    let services: Vec<VipService> = (0..10u8)
        .map(|i| {
            service(
                &format!("svc{i}"),
                Ipv4Addr::new(10, 250, 78, 100 + i),
                &(0..6)
                    .map(|j| Ipv4Addr::new(10, 250, 78, 10 + j))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    // Rendered once, applied to every namespace, as a pass does.
    let rendered: std::sync::Arc<str> = vip::render(&services).into();
    let items: Vec<(String, std::sync::Arc<str>)> = names
        .iter()
        .map(|n| (n.clone(), rendered.clone()))
        .collect();

    let started = Instant::now();
    let failed = vip::sync_many(&items);
    eprintln!(
        "sync_many over {} namespaces: {:?}",
        items.len(),
        started.elapsed()
    );
    assert!(failed.is_empty(), "{failed:?}");

    let started = Instant::now();
    for (ns, _) in &items {
        vip::sync(ns, &services).expect("sync");
    }
    eprintln!(
        "sequential sync over {} namespaces: {:?}",
        items.len(),
        started.elapsed()
    );

    for ns in &names {
        let listed = nft_in(ns, &["list", "table", "ip", vip::TABLE]);
        assert_eq!(listed.matches("numgen inc mod 6").count(), 10, "{listed}");
    }

    // One missing namespace fails alone.
    let mut with_missing = items[..2].to_vec();
    with_missing.push((format!("{tag}-missing"), rendered.clone()));
    let failed = vip::sync_many(&with_missing);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, format!("{tag}-missing"));
}
