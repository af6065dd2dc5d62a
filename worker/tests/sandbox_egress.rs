//! Sandboxes and gwbridge egress on real namespaces (needs root).
//!
//! Every namespace is named `t<pid>-...` and made by the test itself; guards
//! stop processes and delete namespaces even when an assertion fails, and
//! traffic never leaves those namespaces: the "host" and the "outside
//! world" are namespaces joined by a veth.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use mesh_worker::egress::{self, DEFAULT_GW_SUBNET, GWBRIDGE, Repaired, SANDBOX_IFNAME, TABLE};
use mesh_worker::sandbox::{self, SandboxSpec};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces: run them as root"
    );
}

fn tag() -> String {
    format!("t{}", std::process::id())
}

/// A named network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    async fn new(name: String) -> Self {
        sandbox::create_netns(&name).await.expect("create netns");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Drop cannot await: the blocking twin of `sandbox::delete_netns`.
        if let Err(e) = mesh_worker::netns::delete(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A sandbox process, killed on drop.
struct Running(u32);

impl Drop for Running {
    fn drop(&mut self) {
        // Drop cannot await `sandbox::stop`: kill the group outright.
        if sandbox::alive(self.0)
            && let Ok(raw) = i32::try_from(self.0)
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_for("a killed sandbox to exit", Duration::from_secs(5), || {
                !sandbox::alive(self.0)
            });
        }
        let _ = sandbox::wait_exit(self.0);
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-{name}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn spec(name: &str, netns: &str, dir: &Path, cmd: &[&str]) -> SandboxSpec {
    SandboxSpec {
        name: name.to_owned(),
        netns: netns.to_owned(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        env: vec![("GREETING".into(), "hello".into())],
        hosts: format!("127.0.0.1\tlocalhost\n10.9.8.7\t{name} marker-{name}\n"),
        resolv_conf: "nameserver 127.0.0.11\noptions ndots:0\n".into(),
        dir: dir.to_owned(),
    }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_gets_its_own_hostname_hosts_and_resolv_conf() {
    require_root();
    let t = tag();
    let ns = Netns::new(format!("{t}-sa")).await;
    let scratch = Scratch::new(&format!("{t}-sa"));
    let name = format!("{t}-web");
    let host_hosts = fs::read("/etc/hosts").expect("read host /etc/hosts");
    let host_name = nix::unistd::gethostname().expect("hostname");

    let dir = scratch.0.join("web");
    let s = spec(
        &name,
        &ns.0,
        &dir,
        &[
            "sh",
            "-c",
            "hostname; cat /etc/hosts; echo \"env=$GREETING\"; sleep 30",
        ],
    );
    let pid = sandbox::start(&s).expect("start sandbox");
    let proc_guard = Running(pid);
    let log = dir.join("output.log");
    wait_for("the sandbox's output", Duration::from_secs(10), || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains("env=hello"))
    });
    let out = fs::read_to_string(&log).expect("output.log");
    assert_eq!(
        out.lines().next(),
        Some(name.as_str()),
        "hostname line: {out}"
    );
    assert!(
        out.contains(&format!("marker-{name}")),
        "hosts content: {out}"
    );
    assert!(sandbox::alive(pid));
    assert_eq!(sandbox::wait_exit(pid), None, "still running");

    // The host saw none of it.
    assert_eq!(
        fs::read("/etc/hosts").expect("reread /etc/hosts"),
        host_hosts
    );
    assert_eq!(nix::unistd::gethostname().expect("hostname"), host_name);

    // exec joins the sandbox: its hostname, its files, its network.
    let exec_out = dir.join("exec.out");
    let script = format!(
        "hostname > {0}; grep -c 127.0.0.11 /etc/resolv.conf >> {0}; ip -o link show | wc -l >> {0}; \
         grep -c ' /run/netns' /proc/self/mountinfo >> {0} || true",
        exec_out.display()
    );
    let status = sandbox::exec(pid, &argv(&["sh", "-c", &script]), &[]).expect("exec");
    assert!(status.success(), "exec: {status}");
    let seen = fs::read_to_string(&exec_out).expect("exec output");
    let seen: Vec<&str> = seen.lines().map(str::trim).collect();
    // Last: no copy of /run/netns, which would keep deleted namespaces alive.
    assert_eq!(
        seen,
        [name.as_str(), "1", "1", "0"],
        "hostname, resolv.conf, only lo, no /run/netns mounts"
    );
    let status = sandbox::exec(pid, &argv(&["sh", "-c", "exit 3"]), &[]).expect("exec");
    assert_eq!(status.code(), Some(3));

    sandbox::stop(pid, Duration::from_secs(5))
        .await
        .expect("stop");
    assert!(!sandbox::alive(pid));
    assert_eq!(sandbox::wait_exit(pid), Some(128 + 15), "ended by SIGTERM");
    drop(proc_guard);

    // A command that exits at once is reported with its code.
    let quick = spec(
        &name,
        &ns.0,
        &scratch.0.join("quick"),
        &["sh", "-c", "exit 7"],
    );
    let pid = sandbox::start(&quick).expect("start quick sandbox");
    let _quick_guard = Running(pid);
    wait_for("the quick sandbox to exit", Duration::from_secs(10), || {
        !sandbox::alive(pid)
    });
    assert_eq!(sandbox::wait_exit(pid), Some(7));
    sandbox::stop(pid, Duration::ZERO)
        .await
        .expect("stopping an exited sandbox is fine");

    // Errors a user can act on.
    let missing = spec(&name, &ns.0, &scratch.0.join("x"), &["no-such-command-xyz"]);
    let err = sandbox::start(&missing).expect_err("unknown command");
    assert_eq!(
        err.to_string(),
        format!("cannot start sandbox {name}: command \"no-such-command-xyz\" not found in PATH")
    );
    let no_ns = spec(&name, &format!("{t}-nope"), &scratch.0.join("x"), &["true"]);
    let err = sandbox::start(&no_ns).expect_err("missing netns");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // Namespaces: create is idempotent, delete is fine when absent.
    sandbox::create_netns(&ns.0).await.expect("create again");
    sandbox::delete_netns(&format!("{t}-never-made"))
        .await
        .expect("delete absent");
}

/// Accepts one TCP connection inside namespace `ns` and returns the peer
/// address it saw. Runs on its own thread, which alone enters `ns`.
fn serve_once(ns: &str, addr: SocketAddr) -> thread::JoinHandle<Option<SocketAddr>> {
    let ns_file = fs::File::open(sandbox::netns_path(ns)).expect("open netns");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(addr).expect("bind in outside namespace");
        listener.set_nonblocking(true).expect("nonblocking");
        let _ = ready_tx.send(());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, peer)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf);
                    let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                    return Some(peer);
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        None
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listener ready");
    handle
}

fn nft_in(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .expect("run nft")
}

#[tokio::test(flavor = "multi_thread")]
async fn gwbridge_masquerades_egress_and_isolates_sandboxes() {
    require_root();
    let t = tag();
    let host = Netns::new(format!("{t}-h")).await;
    let outside = Netns::new(format!("{t}-o")).await;
    let s1 = Netns::new(format!("{t}-s1")).await;
    let s2 = Netns::new(format!("{t}-s2")).await;
    let scratch = Scratch::new(&format!("{t}-gw"));
    let h = host.0.as_str();

    // The fake host's uplink to the fake outside world.
    ip(&[
        "-n", h, "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns",
        &outside.0,
    ]);
    ip(&["-n", h, "addr", "add", "203.0.113.1/24", "dev", "uplink0"]);
    ip(&["-n", h, "link", "set", "uplink0", "up"]);
    ip(&[
        "-n",
        &outside.0,
        "addr",
        "add",
        "203.0.113.2/24",
        "dev",
        "eth0",
    ]);
    ip(&["-n", &outside.0, "link", "set", "eth0", "up"]);
    ip(&["-n", h, "route", "add", "default", "via", "203.0.113.2"]);

    egress::ensure_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("ensure gwbridge");
    egress::ensure_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("ensure gwbridge again");
    let addrs = ip(&["-n", h, "-4", "-o", "addr", "show", "dev", GWBRIDGE]);
    assert!(addrs.contains("172.18.0.1/16"), "{addrs}");
    assert_eq!(addrs.lines().count(), 1, "one address: {addrs}");
    let listed = nft_in(h, &["list", "tables"]);
    let tables = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(tables.matches(TABLE).count(), 1, "{tables}");

    // The reconcile loop's check: nothing to do on what ensure made, and
    // each part put back once it is broken.
    let fixed = egress::check_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("check");
    assert_eq!(fixed, Repaired::default(), "freshly made egress drifted");
    assert!(
        nft_in(h, &["delete", "table", "ip", TABLE])
            .status
            .success()
    );
    ip(&["-n", h, "addr", "flush", "dev", GWBRIDGE]);
    ip(&["-n", h, "link", "set", GWBRIDGE, "down"]);
    let fixed = egress::check_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("repair");
    assert!(fixed.table && fixed.address && fixed.up, "{fixed:?}");
    assert!(nft_in(h, &["list", "table", "ip", TABLE]).status.success());
    let addrs = ip(&["-n", h, "-4", "-o", "addr", "show", "dev", GWBRIDGE]);
    assert!(addrs.contains("172.18.0.1/16"), "{addrs}");
    assert!(
        nft_in(h, &["flush", "chain", "ip", TABLE, "forward"])
            .status
            .success()
    );
    let fixed = egress::check_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("repair rules");
    assert!(fixed.table && !fixed.address, "{fixed:?}");
    let fixed = egress::check_gwbridge(Some(h), DEFAULT_GW_SUBNET).expect("check again");
    assert!(!fixed.any(), "{fixed:?}");

    let mut guards = Vec::new();
    let mut pids = Vec::new();
    for (ns, last) in [(&s1.0, 2u8), (&s2.0, 3u8)] {
        let dir = scratch.0.join(ns);
        let pid = sandbox::start(&spec(ns, ns, &dir, &["sleep", "60"])).expect("start sandbox");
        guards.push(Running(pid));
        pids.push(pid);
        let addr = Ipv4Addr::new(172, 18, 0, last);
        egress::attach(Some(h), ns, addr, 16, true).expect("attach");
        egress::attach(Some(h), ns, addr, 16, true).expect("attach again");
    }
    let route = ip(&["-n", &s1.0, "route", "show", "default"]);
    assert!(route.contains("via 172.18.0.1 dev gw0"), "{route}");
    let port = egress::host_ifname(&s1.0);
    let details = ip(&["-n", h, "-d", "link", "show", "dev", &port]);
    assert!(details.contains(&format!("master {GWBRIDGE}")), "{details}");
    assert!(details.contains("isolated on"), "{details}");

    // Both sandboxes reach the outside world, through a real client.
    for pid in &pids {
        let ping = argv(&["ping", "-c", "1", "-W", "3", "203.0.113.2"]);
        let status = sandbox::exec(*pid, &ping, &[]).expect("exec ping");
        assert!(
            status.success(),
            "sandbox {pid} cannot reach the outside: {status}"
        );
    }

    // The outside sees the host's address, never a sandbox's: masquerade.
    let server = serve_once(&outside.0, "203.0.113.2:8080".parse().expect("addr"));
    let curl = argv(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "http://203.0.113.2:8080/",
    ]);
    let status = sandbox::exec(pids[0], &curl, &[]).expect("exec curl");
    let peer = server.join().expect("server thread");
    assert!(status.success(), "curl from the sandbox: {status}");
    assert_eq!(
        peer.map(|p| p.ip()),
        Some("203.0.113.1".parse().expect("ip")),
        "the outside saw the sandbox's own address"
    );
    let rules = nft_in(h, &["list", "table", "ip", TABLE]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    let masq = rules
        .lines()
        .find(|l| l.contains("masquerade"))
        .expect("masquerade rule");
    assert!(
        !masq.contains("packets 0 "),
        "masquerade never counted: {masq}"
    );

    // The gateway answers each sandbox; the sandboxes cannot see each other.
    for (pid, other) in [(pids[0], "172.18.0.3"), (pids[1], "172.18.0.2")] {
        let gw = sandbox::exec(
            pid,
            &argv(&["ping", "-c", "1", "-W", "3", "172.18.0.1"]),
            &[],
        )
        .expect("exec ping");
        assert!(gw.success(), "sandbox {pid} cannot reach its gateway");
        let peer = sandbox::exec(pid, &argv(&["ping", "-c", "1", "-W", "1", other]), &[])
            .expect("exec ping");
        assert!(
            !peer.success(),
            "sandbox {pid} reached {other} over {GWBRIDGE}"
        );
    }

    // Teardown leaves nothing: no veth, no bridge, no table.
    for ns in [&s1.0, &s2.0] {
        egress::detach(Some(h), ns).expect("detach");
        egress::detach(Some(h), ns).expect("detach again");
        assert!(!succeeds(
            "ip",
            &["-n", ns, "link", "show", "dev", SANDBOX_IFNAME]
        ));
        assert!(!succeeds(
            "ip",
            &["-n", h, "link", "show", "dev", &egress::host_ifname(ns)]
        ));
    }
    egress::remove_gwbridge(Some(h)).expect("remove gwbridge");
    egress::remove_gwbridge(Some(h)).expect("remove gwbridge again");
    assert!(!succeeds("ip", &["-n", h, "link", "show", "dev", GWBRIDGE]));
    assert!(!nft_in(h, &["list", "table", "ip", TABLE]).status.success());

    for pid in &pids {
        sandbox::stop(*pid, Duration::from_secs(2))
            .await
            .expect("stop");
    }
    drop(guards);
    let names = [
        host.0.clone(),
        outside.0.clone(),
        s1.0.clone(),
        s2.0.clone(),
    ];
    drop((host, outside, s1, s2));
    let left = ip(&["netns", "list"]);
    for n in &names {
        assert!(
            !left
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n.as_str())),
            "{n} left behind: {left}"
        );
    }
}
