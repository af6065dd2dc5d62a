//! The harness on real namespaces, with a stand-in `mesh` shell script so it
//! is tested on its own: layout, underlay reachability, hostnames, exit
//! codes, kill/start, cut/heal, and that nothing is left behind. Needs root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_lab::{Lab, LabError, UpSpec};

/// Answers just enough of the mesh CLI for `up`: the daemon touches its
/// socket path and sleeps; init/join record `hostname role` in the lab dir;
/// `node ls` prints them as Docker-style JSON lines.
const FAKE_MESH: &str = r#"#!/bin/sh
host="${MESH_HOST#unix://}"
if [ "$1" = "-H" ]; then host="${2#unix://}"; shift 2; fi
labdir="$(dirname "$(dirname "$host")")"
cmd="$1"; shift
case "$cmd" in
daemon)
    [ -n "$FAKE_DAEMON_FAILS" ] && { echo "fake failure: cannot bind socket" >&2; exit 1; }
    while [ $# -gt 0 ]; do [ "$1" = --socket ] && sock="$2"; shift; done
    echo "fake daemon on $(hostname)"
    # A "sandbox": its own netns, in the daemon's session, outliving a crash.
    unshare --net sleep @SANDBOX@ &
    : > "$sock"
    exec sleep 100000 ;;
info) [ -e "$host" ] ;;
init) echo "$(hostname) Leader" >> "$labdir/fake-nodes" ;;
join)
    role=""
    case "$2" in *manager*) role=Reachable ;; esac
    echo "$(hostname) $role" >> "$labdir/fake-nodes" ;;
join-token) echo "SWMTKN-1-fake-$2" ;;
node)
    while read -r h r; do
        printf '{"ID":"id-%s","Hostname":"%s","Status":"Ready","Availability":"Active","ManagerStatus":"%s"}\n' "$h" "$h" "$r"
    done < "$labdir/fake-nodes" ;;
*) echo "fake mesh: unknown command $cmd" >&2; exit 2 ;;
esac
"#;

/// Lab tests need root (network namespaces): without it they fail, so a
/// run that could not test says so instead of passing.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root: lab tests make network namespaces"
    );
}

/// A unique lab name per test and process.
fn lab_name(tag: &str) -> String {
    format!("lt{}{tag}", std::process::id() % 100_000)
}

/// The fake binary in a temp dir that is removed on drop.
struct Fake(PathBuf);

impl Fake {
    fn bin(&self) -> PathBuf {
        self.0.join("mesh")
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fake_mesh(tag: &str, daemon_fails: bool) -> Fake {
    let dir = std::env::temp_dir().join(format!("mesh-lab-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh");
    let script = FAKE_MESH.replace("@SANDBOX@", &sandbox_secs(tag).to_string());
    let script = if daemon_fails {
        script.replace("[ -n \"$FAKE_DAEMON_FAILS\" ]", "true")
    } else {
        script
    };
    std::fs::write(&path, script).expect("write fake mesh");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Fake(dir)
}

/// The sleep time that marks the fake sandboxes of one test.
fn sandbox_secs(tag: &str) -> u64 {
    200_000 + u64::from(std::process::id() % 10_000) * 10 + u64::from(tag.as_bytes()[0] % 10)
}

/// Live fake sandboxes of one test.
fn sandboxes(tag: &str) -> usize {
    let want = format!("sleep\0{}\0", sandbox_secs(tag));
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .filter(|c| c == want.as_bytes())
                .count()
        })
        .unwrap_or_default()
}

fn namespaces_of(name: &str) -> Vec<String> {
    let prefix = format!("mlab-{name}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_gone(name: &str) {
    assert_eq!(namespaces_of(name), Vec::<String>::new(), "namespaces left");
    assert!(!mesh_lab::lab_dir(name).exists(), "lab dir left");
}

/// Whether node `from` reaches node `to` on the underlay (over TCP, as
/// `ping` is not installed everywhere).
fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    let ip = lab.node(to).expect("node").ip.to_string();
    reaches(lab, from, &ip)
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lab_lifecycle() {
    require_root();
    let name = lab_name("a");
    let fake = fake_mesh("a", false);
    let bin = fake.bin();
    mesh_lab::cleanup_stale(&name).expect("cleanup");

    let mut lab = Lab::up(&UpSpec::new(&name, 3, 2), &bin).expect("lab up");
    assert_eq!(lab.nodes.len(), 3);
    let mut ns = namespaces_of(&name);
    ns.sort();
    assert_eq!(
        ns,
        [
            format!("mlab-{name}-node1"),
            format!("mlab-{name}-node2"),
            format!("mlab-{name}-node3"),
            format!("mlab-{name}-ul"),
        ]
    );
    assert!(lab.nodes.iter().all(|n| n.running()));
    assert_eq!(lab.nodes[1].id.as_deref(), Some("id-node2"));
    assert!(matches!(
        Lab::up(&UpSpec::new(&name, 1, 1), &bin),
        Err(LabError::Exists(_))
    ));

    // Each node has its own hostname and MESH_HOST, and exit codes come through.
    assert_eq!(
        lab.exec_ok("node2", &["hostname"])
            .expect("hostname")
            .trim(),
        "node2"
    );
    assert_eq!(
        lab.exec_ok("3", &["hostname"]).expect("hostname").trim(),
        "node3"
    );
    let host = lab
        .exec_ok("node1", &["sh", "-c", "echo $MESH_HOST"])
        .expect("env");
    assert_eq!(host.trim(), lab.nodes[0].host());
    let out = lab.exec("node1", &["sh", "-c", "exit 7"]).expect("sh");
    assert_eq!(out.status.code(), Some(7));
    assert!(matches!(
        lab.exec("node9", &["true"]),
        Err(LabError::NoSuchNode { .. })
    ));

    // The underlay connects every node; nothing else is reachable.
    for (a, b) in [("node1", "node2"), ("node2", "node3"), ("node3", "node1")] {
        assert!(ping(&lab, a, b), "{a} -> {b}");
    }
    let routes = lab
        .exec_ok("node1", &["ip", "-4", "route"])
        .expect("routes");
    assert!(
        !routes.contains("default"),
        "no way out of the lab: {routes}"
    );

    // cut / heal
    lab.cut("node3").expect("cut");
    assert!(!ping(&lab, "node1", "node3"));
    lab.heal("node3").expect("heal");
    eventually("node3 reachable after heal", || {
        ping(&lab, "node1", "node3")
    });

    // kill / start; another "invocation" sees the new pid.
    let old = lab.node("node2").expect("node2").pid;
    assert!(lab.kill("node2").expect("kill"));
    assert!(!lab.node("node2").expect("node2").running());
    assert!(!lab.kill("node2").expect("second kill"));
    assert_eq!(
        lab.exec_ok("node2", &["hostname"])
            .expect("hostname")
            .trim(),
        "node2"
    );
    lab.start("node2").expect("start");
    assert!(lab.node("node2").expect("node2").running());
    assert!(matches!(
        lab.start("node2"),
        Err(LabError::AlreadyRunning { .. })
    ));
    let other = Lab::open(&name, &bin).expect("open");
    assert_ne!(other.node("node2").expect("node2").pid, old);
    assert_eq!(
        other.node("node2").expect("node2").pid,
        lab.node("node2").expect("node2").pid
    );
    drop(other);
    assert!(
        mesh_lab::list()
            .expect("ls")
            .iter()
            .any(|l| l.name == name && l.lab.is_some())
    );

    // One sandbox per daemon started, including the one that was killed.
    eventually("4 sandboxes", || sandboxes("a") == 4);

    let pids: Vec<i32> = lab.nodes.iter().filter_map(|n| n.pid).collect();
    lab.down().expect("down");
    assert_eq!(
        sandboxes("a"),
        0,
        "down left sandboxes of its daemons running"
    );
    assert_gone(&name);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "daemon {pid} survived"
        );
    }
    assert!(matches!(mesh_lab::down(&name), Err(LabError::NotFound(_))));
}

#[test]
fn failed_up_leaves_nothing() {
    require_root();
    let name = lab_name("b");
    let fake = fake_mesh("b", true);
    let bin = fake.bin();
    mesh_lab::cleanup_stale(&name).expect("cleanup");
    let err = Lab::up(&UpSpec::new(&name, 2, 1), &bin).expect_err("daemon fails");
    let msg = err.to_string();
    assert!(
        msg.contains("daemon.log") && msg.contains("fake failure"),
        "{msg}"
    );
    assert_gone(&name);
}

#[test]
fn down_removes_crash_leftovers() {
    require_root();
    let name = lab_name("c");
    mesh_lab::cleanup_stale(&name).expect("cleanup");
    // What a crashed `up` can leave: namespaces, and a process inside one.
    for ns in [format!("mlab-{name}-ul"), format!("mlab-{name}-node1")] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .expect("ip");
        assert!(ok.success());
    }
    let mut sleeper = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("mlab-{name}-node1"),
            "sleep",
            "1000",
        ])
        .spawn()
        .expect("sleep in netns");
    // Wait until it is inside: a process still entering is not found by anyone.
    let inside = std::fs::metadata(format!("/run/netns/mlab-{name}-node1")).map(|m| m.ino());
    eventually("sleeper inside node1's namespace", || {
        std::fs::metadata(format!("/proc/{}/ns/net", sleeper.id()))
            .map(|m| m.ino())
            .ok()
            == inside.as_ref().ok().copied()
    });
    let listed = mesh_lab::list().expect("ls");
    let entry = listed
        .iter()
        .find(|l| l.name == name)
        .expect("stale lab listed");
    assert!(entry.lab.is_none() && entry.stale_netns.len() == 2);

    let result = mesh_lab::down(&name);
    let killed = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match sleeper.try_wait() {
                Ok(Some(_)) => break true,
                _ if Instant::now() >= deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    if !killed {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
    result.expect("down of leftovers");
    assert!(killed, "down left a process running in the lab's namespace");
    assert_gone(&name);
    assert!(!mesh_lab::cleanup_stale(&name).expect("nothing left"));
}

#[test]
fn dropped_lab_is_torn_down() {
    require_root();
    let name = lab_name("d");
    let fake = fake_mesh("d", false);
    let bin = fake.bin();
    mesh_lab::cleanup_stale(&name).expect("cleanup");
    {
        let lab = Lab::up(&UpSpec::new(&name, 1, 1), &bin).expect("lab up");
        assert_eq!(
            lab.mesh_ok("node1", &["join-token", "-q", "worker"])
                .expect("mesh")
                .trim(),
            "SWMTKN-1-fake-worker"
        );
    }
    assert_gone(&name);
}

/// Whether `from` reaches `ip` over TCP: only a refused connection (an
/// RST from the address) counts; a timeout or "no route" does not. Works
/// without `ping`, which not every machine has.
fn reaches(lab: &Lab, from: &str, ip: &str) -> bool {
    let script = format!(
        "import socket,sys\ns=socket.socket()\ns.settimeout(2)\ntry:\n    s.connect(('{ip}', 9))\nexcept ConnectionRefusedError:\n    sys.exit(0)\nexcept OSError:\n    sys.exit(1)\n"
    );
    let out = lab
        .exec(from, &["python3", "-c", &script])
        .expect("python3 runs");
    out.status.success()
}

#[test]
fn outside_hosts() {
    require_root();
    let name = lab_name("e");
    let fake = fake_mesh("e", false);
    let bin = fake.bin();
    mesh_lab::cleanup_stale(&name).expect("cleanup");
    let mut spec = UpSpec::new(&name, 2, 1);
    spec.hosts = 2;
    let mut lab = Lab::up(&spec, &bin).expect("lab up with hosts");
    let mut ns = namespaces_of(&name);
    ns.sort();
    assert_eq!(
        ns,
        [
            format!("mlab-{name}-host1"),
            format!("mlab-{name}-host2"),
            format!("mlab-{name}-node1"),
            format!("mlab-{name}-node2"),
            format!("mlab-{name}-ul"),
        ]
    );
    // Hosts are not cluster nodes: no daemon, not in `nodes`.
    assert_eq!(lab.nodes.len(), 2);
    let h1 = lab.host("host1").expect("host1").clone();
    assert_eq!(h1.netns, format!("mlab-{name}-host1"));
    assert_eq!(
        h1.ip.octets()[3],
        13,
        "host1 follows node1 (.11) and node2 (.12)"
    );
    assert!(matches!(
        lab.host("host3"),
        Err(LabError::NoSuchHost { .. })
    ));
    assert!(matches!(
        lab.mesh("host1", &["info"]),
        Err(LabError::NotANode { .. })
    ));

    assert!(matches!(lab.kill("host1"), Err(LabError::NotANode { .. })));

    // Commands run in the host, with its name and address and no daemon to talk to.
    assert_eq!(
        lab.exec_ok("host1", &["hostname"])
            .expect("hostname")
            .trim(),
        "host1"
    );
    let addrs = lab
        .exec_ok("host2", &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .expect("addr");
    let h2 = lab.host("host2").expect("host2").ip.to_string();
    assert!(addrs.contains(&format!("{h2}/24")), "{addrs}");
    let env = lab
        .exec_ok("host1", &["sh", "-c", "echo \"[$MESH_HOST]\""])
        .expect("env");
    assert_eq!(
        env.trim(),
        "[]",
        "a host has no daemon to point MESH_HOST at"
    );
    let n1 = lab.node("node1").expect("node1").ip.to_string();
    assert!(
        reaches(&lab, "host1", &n1),
        "host1 cannot reach node1 on the underlay"
    );
    assert!(
        reaches(&lab, "node2", &h2),
        "node2 cannot reach host2 on the underlay"
    );
    let nobody = format!("192.168.{}.250", lab.subnet_index);
    assert!(
        !reaches(&lab, "host1", &nobody),
        "an unused address answered"
    );
    // And nothing beyond the lab's own /24.
    let routes = lab
        .exec_ok("host1", &["ip", "-4", "route"])
        .expect("routes");
    assert!(
        !routes.contains("default"),
        "no way out of the lab: {routes}"
    );

    // Another invocation (the CLI's `exec`, `ls`) sees the hosts.
    let other = Lab::open(&name, &bin).expect("open");
    assert_eq!(other.hosts.len(), 2);
    drop(other);

    // A process left in a host (a client, a server) dies with the lab.
    let mut sleeper = lab
        .command("host2", "sleep")
        .expect("command in host2")
        .arg("1000")
        .spawn()
        .expect("sleep in host2");
    lab.down().expect("down");
    let deadline = Instant::now() + Duration::from_secs(5);
    let killed = loop {
        match sleeper.try_wait() {
            Ok(Some(_)) => break true,
            _ if Instant::now() >= deadline => break false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    if !killed {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
    assert!(killed, "down left a process running in host2");
    assert_gone(&name);
}

#[test]
fn down_removes_a_crashed_runs_host() {
    require_root();
    let name = lab_name("f");
    mesh_lab::cleanup_stale(&name).expect("cleanup");
    // A crash between making a host's namespace and writing lab.json.
    let ns = format!("mlab-{name}-host1");
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("ip");
    assert!(ok.success());
    let listed = mesh_lab::list().expect("ls");
    let entry = listed
        .iter()
        .find(|l| l.name == name)
        .expect("stale host listed under its lab");
    assert_eq!(entry.stale_netns, [ns]);
    mesh_lab::down(&name).expect("down of a leftover host");
    assert_gone(&name);
}
