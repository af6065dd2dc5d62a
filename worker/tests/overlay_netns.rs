//! The overlay driver against the real kernel: two fake hosts (namespaces
//! joined by a veth "underlay"), a network on both, a sandbox on each, and
//! real `ping`, `bridge`, `ip` and (when present) `tcpdump` inside them.
//!
//! Needs root (namespaces, veth, bridge, vxlan). Traffic never leaves the
//! namespaces the tests create; every namespace is removed at the end, by
//! the test or, if it fails half-way, by a drop guard.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_common::model::Mac;
use mesh_worker::link::Netlink;
use mesh_worker::netns;
use mesh_worker::overlay::{
    self, Attachment, Node, OverlaySpec, Peer, SyncReport, network_ns_name,
};

mod common;
use common::*;

fn ping(from_ns: &str, to: Ipv4Addr, count: &str, wait: &str) -> bool {
    let to = to.to_string();
    run(&[
        "ip", "netns", "exec", from_ns, "ping", "-n", "-c", count, "-W", wait, &to,
    ])
    .status
    .success()
}

fn spec(vni: u32, local_ip: Ipv4Addr) -> OverlaySpec {
    OverlaySpec {
        vni,
        subnet: "10.77.0.0/24".parse().expect("valid subnet"),
        gateway: Ipv4Addr::new(10, 77, 0, 1),
        mtu: 1450,
        local_ip,
        port: 4789,
        encrypted: false,
    }
}

fn attachment(sandbox_ns: &str, ip: Ipv4Addr) -> Attachment {
    Attachment {
        sandbox_ns: sandbox_ns.to_string(),
        ifname: "eth0".into(),
        ip,
        prefix: 24,
        mac: Mac::for_ip(ip).octets(),
        mtu: 1450,
        default_route: true,
    }
}

fn peer(a: &Attachment, node_ip: Ipv4Addr) -> Peer {
    Peer {
        ip: a.ip,
        mac: a.mac,
        node_ip,
    }
}

/// Makes a namespace that stands for one host, with `lo` up.
async fn host(name: &str, cleanup: &mut Cleanup) -> Netlink {
    namespace(name, cleanup).await
}

/// Starts `tcpdump` on the underlay when it is installed; returns the child
/// once it is listening.
fn start_capture(ns: &str, dev: &str) -> Option<std::process::Child> {
    if !run(&["sh", "-c", "command -v tcpdump"]).status.success() {
        eprintln!("tcpdump not installed: skipping the capture");
        return None;
    }
    let mut child = Command::new("ip")
        .args([
            "netns", "exec", ns, "tcpdump", "-l", "-n", "-c", "1", "-i", dev,
        ])
        .args(["udp", "port", "4789"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // tcpdump says "listening on ..." on stderr once the capture is armed;
    // the rest of stderr is drained so tcpdump never writes into a closed
    // pipe.
    let stderr = child.stderr.take()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    for line in lines.by_ref() {
        match line {
            Ok(l) if l.contains("listening on") => break,
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Some(child)
}

fn finish_capture(mut child: std::process::Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("tcpdump output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn two_hosts_ping_over_vxlan_heal_drift_and_isolate_vnis() {
    require_root("overlay namespace tests");
    let tag = format!("t{}-h", std::process::id());
    let (h1, h2) = (format!("{tag}1"), format!("{tag}2"));
    let mut cleanup = Cleanup(Vec::new());

    // Underlay: u1 in h1 and u2 in h2, one veth pair, 192.168.250.0/24.
    let n1 = host(&h1, &mut cleanup).await;
    let n2 = host(&h2, &mut cleanup).await;
    let (ip1, ip2) = (
        Ipv4Addr::new(192, 168, 250, 1),
        Ipv4Addr::new(192, 168, 250, 2),
    );
    let h2_fd = netns::open(&h2).expect("open h2");
    n1.create_veth("u1", "u2", 1500, Some(h2_fd.as_fd()))
        .await
        .expect("underlay veth");
    n1.add_address_v4("u1", ip1, 24).await.expect("u1 address");
    n2.add_address_v4("u2", ip2, 24).await.expect("u2 address");
    n1.set_up("u1").await.expect("u1 up");
    n2.set_up("u2").await.expect("u2 up");

    // The network on both hosts; each host's VXLAN socket lives in the host.
    let node1 = Node::in_ns(h1.clone(), h1.clone());
    let node2 = Node::in_ns(h2.clone(), h2.clone());
    let (net1, net2) = (network_ns_name(&h1, 4242), network_ns_name(&h2, 4242));
    cleanup.add(&net1);
    cleanup.add(&net2);
    overlay::ensure_network(&node1, &spec(4242, ip1))
        .await
        .expect("network on h1");
    overlay::ensure_network(&node2, &spec(4242, ip2))
        .await
        .expect("network on h2");
    assert!(
        n1.link("vxlan0").await.expect("lookup").is_none(),
        "vxlan0 must live in the network namespace, not in the host"
    );

    // One sandbox per host.
    let (sb1, sb2) = (format!("{tag}1-sb"), format!("{tag}2-sb"));
    for sb in [&sb1, &sb2] {
        cleanup.add(sb);
        netns::create(sb).expect("sandbox namespace");
    }
    let a1 = attachment(&sb1, Ipv4Addr::new(10, 77, 0, 2));
    let a2 = attachment(&sb2, Ipv4Addr::new(10, 77, 0, 3));
    overlay::attach(&node1, &spec(4242, ip1), &a1)
        .await
        .expect("attach sb1");
    overlay::attach(&node2, &spec(4242, ip2), &a2)
        .await
        .expect("attach sb2");
    let addr = exec_ok(&sb1, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.77.0.2/24"), "{addr}");
    let route = exec_ok(&sb1, &["ip", "route", "show", "default"]);
    assert!(route.contains("via 10.77.0.1 dev eth0"), "{route}");

    // Peers: each host learns the other's endpoint.
    let (p1, p2) = (peer(&a1, ip1), peer(&a2, ip2));
    let r1 = overlay::sync_peers(&node1, 4242, &[p2])
        .await
        .expect("sync h1");
    let r2 = overlay::sync_peers(&node2, 4242, &[p1])
        .await
        .expect("sync h2");
    for r in [r1, r2] {
        assert_eq!(
            (r.fdb_added, r.neigh_added, r.changed()),
            (1, 1, 2),
            "{r:?}"
        );
    }
    let again = overlay::sync_peers(&node1, 4242, &[p2])
        .await
        .expect("resync");
    assert_eq!(
        again,
        SyncReport::default(),
        "a matching kernel must not be touched"
    );
    assert_eq!(
        overlay::peers_in_kernel(&node1, 4242).await.expect("peers"),
        vec![p2]
    );

    // Sandbox to sandbox across the underlay, encapsulated in VNI 4242.
    let capture = start_capture(&h1, "u1");
    assert!(
        ping(&sb1, a2.ip, "2", "2"),
        "sb1 cannot ping sb2 over the overlay"
    );
    if let Some(child) = capture {
        let seen = finish_capture(child);
        assert!(
            seen.contains(".4789") && seen.contains("vni 4242"),
            "no VXLAN packet of VNI 4242 on the underlay: {seen:?}"
        );
        eprintln!("underlay capture: {}", seen.trim());
    }

    // Drift: an FDB entry deleted by hand, a neighbour entry deleted, a
    // stale FDB entry added. One sync repairs all three.
    let mac2 = "02:42:0a:4d:00:03";
    exec_ok(
        &net1,
        &[
            "bridge",
            "fdb",
            "del",
            mac2,
            "dev",
            "vxlan0",
            "self",
            "dst",
            "192.168.250.2",
        ],
    );
    assert!(
        overlay::peers_in_kernel(&node1, 4242)
            .await
            .expect("peers")
            .is_empty()
    );
    let broken = ping(&sb1, a2.ip, "1", "1");
    eprintln!("ping without the FDB entry succeeded: {broken}");
    let r = overlay::sync_peers(&node1, 4242, &[p2])
        .await
        .expect("repair");
    assert_eq!(
        r,
        SyncReport {
            fdb_added: 1,
            ..SyncReport::default()
        }
    );
    assert_eq!(r.changed(), 1);
    assert!(ping(&sb1, a2.ip, "2", "2"), "ping after the FDB repair");

    exec_ok(&net1, &["ip", "neigh", "del", "10.77.0.3", "dev", "vxlan0"]);
    exec_ok(
        &net1,
        &[
            "bridge",
            "fdb",
            "append",
            "02:42:0a:4d:00:63",
            "dev",
            "vxlan0",
            "self",
            "dst",
            "192.168.250.99",
            "permanent",
        ],
    );
    let r = overlay::sync_peers(&node1, 4242, &[p2])
        .await
        .expect("repair");
    assert_eq!(
        (r.neigh_added, r.fdb_removed, r.changed()),
        (1, 1, 2),
        "{r:?}"
    );
    assert_eq!(
        overlay::peers_in_kernel(&node1, 4242).await.expect("peers"),
        vec![p2]
    );
    assert!(
        ping(&sb1, a2.ip, "2", "2"),
        "ping after the neighbour repair"
    );

    // attach is idempotent: same device, same addresses, still reachable.
    let before = Netlink::open(Some(&sb1))
        .await
        .expect("nl")
        .link("eth0")
        .await
        .expect("eth0");
    overlay::attach(&node1, &spec(4242, ip1), &a1)
        .await
        .expect("attach again");
    let after = Netlink::open(Some(&sb1))
        .await
        .expect("nl")
        .link("eth0")
        .await
        .expect("eth0");
    assert_eq!(before.map(|l| l.index), after.map(|l| l.index));

    // Isolation: a sandbox on VNI 4243 on h2, told where sb1 is. Its frames
    // reach h1 in VNI 4243, which h1 does not have, so they are dropped.
    let net3 = network_ns_name(&h2, 4243);
    cleanup.add(&net3);
    overlay::ensure_network(&node2, &spec(4243, ip2))
        .await
        .expect("second network on h2");
    let sb3 = format!("{tag}2-sb3");
    cleanup.add(&sb3);
    netns::create(&sb3).expect("sandbox 3");
    let a3 = attachment(&sb3, Ipv4Addr::new(10, 77, 0, 4));
    overlay::attach(&node2, &spec(4243, ip2), &a3)
        .await
        .expect("attach sb3");
    overlay::sync_peers(&node2, 4243, &[p1])
        .await
        .expect("sync 4243");
    assert!(
        !ping(&sb3, a1.ip, "1", "1"),
        "VNI 4243 reached a sandbox on VNI 4242"
    );
    assert!(
        !ping(&sb1, a3.ip, "1", "1"),
        "VNI 4242 reached a sandbox on VNI 4243"
    );
    assert!(ping(&sb1, a2.ip, "1", "2"), "the first network still works");

    // Teardown through the API, then nothing of ours may be left.
    overlay::detach(&node1, 4242, &a1)
        .await
        .expect("detach sb1");
    overlay::detach(&node1, 4242, &a1)
        .await
        .expect("detach is idempotent");
    assert!(
        exec_ok(&sb1, &["ip", "-o", "link"])
            .lines()
            .all(|l| !l.contains("eth0"))
    );
    overlay::detach(&node2, 4242, &a2)
        .await
        .expect("detach sb2");
    overlay::detach(&node2, 4243, &a3)
        .await
        .expect("detach sb3");
    overlay::remove_network(&node1, 4242)
        .await
        .expect("remove on h1");
    overlay::remove_network(&node2, 4242)
        .await
        .expect("remove on h2");
    overlay::remove_network(&node2, 4243)
        .await
        .expect("remove 4243 on h2");
    assert!(
        overlay::networks_in_kernel(&node2)
            .expect("list")
            .is_empty()
    );
    for n in [&n1, &n2] {
        let left: Vec<String> = n
            .links()
            .await
            .expect("links")
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert!(
            left.iter()
                .all(|name| name == "lo" || name.starts_with('u')),
            "devices left in a host: {left:?}"
        );
    }
    drop((n1, n2));
    drop(cleanup);
    let left = netns::list_with_prefix(&tag).expect("list namespaces");
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let ip_list = String::from_utf8_lossy(&run(&["ip", "netns", "list"]).stdout).into_owned();
    assert!(
        !ip_list.contains(&tag),
        "`ip netns list` still shows ours: {ip_list}"
    );
}

#[tokio::test]
async fn ensure_network_is_idempotent_and_repairs_pieces() {
    require_root("overlay namespace tests");
    let tag = format!("t{}-n", std::process::id());
    let mut cleanup = Cleanup(Vec::new());
    let hostn = host(&tag, &mut cleanup).await;

    // run_in: a sysctl written inside the fake host lands there, and the
    // calling thread stays in its own namespace.
    let own_ns = || std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
    let before = own_ns().expect("own namespace");
    let seen = netns::run_in(&tag, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
    })
    .expect("enter the fake host")
    .expect("sysctl in the fake host");
    assert_eq!(seen.trim(), "1");
    let there = exec_ok(&tag, &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(there.trim(), "1");
    assert_eq!(own_ns().expect("own namespace"), before);
    // An underlay address for the VXLAN's `local`; both ends stay in the
    // fake host.
    hostn
        .create_veth("n0", "n1", 1500, None)
        .await
        .expect("veth");
    hostn
        .add_address_v4("n0", Ipv4Addr::new(192, 168, 251, 1), 24)
        .await
        .expect("address");
    hostn.set_up("n0").await.expect("up");
    let local = Ipv4Addr::new(192, 168, 251, 1);
    let node = Node::in_ns(tag.clone(), tag.clone());
    let s = spec(4242, local);
    let net_ns = network_ns_name(&tag, 4242);
    cleanup.add(&net_ns);

    // A missing network is reported as such.
    let err = overlay::sync_peers(&node, 4242, &[])
        .await
        .expect_err("no network yet");
    assert!(err.to_string().contains(&net_ns), "{err}");

    overlay::ensure_network(&node, &s)
        .await
        .expect("first ensure");
    let net = Netlink::open(Some(&net_ns)).await.expect("netlink");
    let vx = net
        .link("vxlan0")
        .await
        .expect("get")
        .expect("vxlan0 exists");
    let br = net.link("br0").await.expect("get").expect("br0 exists");
    overlay::ensure_network(&node, &s)
        .await
        .expect("second ensure");
    let vx2 = net
        .link("vxlan0")
        .await
        .expect("get")
        .expect("vxlan0 exists");
    assert_eq!(
        vx2.index, vx.index,
        "an unchanged vxlan0 must not be recreated"
    );
    assert_eq!(vx2.master, Some(br.index));
    assert!(vx2.up && br.up);
    assert_eq!((vx2.mtu, br.mtu), (1450, 1450));
    let info = vx2.vxlan.expect("vxlan details");
    assert_eq!(
        (info.vni, info.local, info.port, info.learning, info.proxy),
        (Some(4242), Some(local), Some(4789), Some(false), Some(true))
    );
    assert_eq!(
        net.addresses_v4("br0").await.expect("addresses"),
        vec![(Ipv4Addr::new(10, 77, 0, 1), 24)]
    );

    // Hand-deleted vxlan0 comes back, enslaved and up.
    exec_ok(&net_ns, &["ip", "link", "del", "vxlan0"]);
    overlay::ensure_network(&node, &s)
        .await
        .expect("repair vxlan0");
    let vx3 = net
        .link("vxlan0")
        .await
        .expect("get")
        .expect("vxlan0 recreated");
    assert_eq!((vx3.master, vx3.up, vx3.mtu), (Some(br.index), true, 1450));

    // Changed MTU, lost address, detached vxlan0: all put back.
    exec_ok(&net_ns, &["ip", "link", "set", "vxlan0", "nomaster"]);
    exec_ok(&net_ns, &["ip", "link", "set", "br0", "mtu", "1300"]);
    exec_ok(&net_ns, &["ip", "addr", "flush", "dev", "br0"]);
    overlay::ensure_network(&node, &s)
        .await
        .expect("repair settings");
    let br2 = net.link("br0").await.expect("get").expect("br0");
    let vx4 = net.link("vxlan0").await.expect("get").expect("vxlan0");
    assert_eq!(
        (br2.mtu, vx4.master, vx4.index),
        (1450, Some(br2.index), vx3.index)
    );
    assert_eq!(net.addresses_v4("br0").await.expect("addrs").len(), 1);

    // A hand-deleted bridge is recreated and vxlan0 re-enslaved to it.
    exec_ok(&net_ns, &["ip", "link", "del", "br0"]);
    overlay::ensure_network(&node, &s)
        .await
        .expect("repair br0");
    let br3 = net.link("br0").await.expect("get").expect("br0 recreated");
    let vx5 = net.link("vxlan0").await.expect("get").expect("vxlan0");
    assert_eq!(vx5.master, Some(br3.index));

    // A changed underlay address cannot be patched: vxlan0 is recreated.
    let moved = Ipv4Addr::new(192, 168, 251, 7);
    hostn
        .add_address_v4("n0", moved, 24)
        .await
        .expect("second address");
    overlay::ensure_network(&node, &spec(4242, moved))
        .await
        .expect("new local");
    let vx6 = net.link("vxlan0").await.expect("get").expect("vxlan0");
    assert_ne!(vx6.index, vx5.index);
    assert_eq!(vx6.vxlan.and_then(|v| v.local), Some(moved));
    // ...and the temporary VXLAN name in the host is never left behind.
    let host_links = hostn.links().await.expect("links");
    assert!(
        host_links
            .iter()
            .all(|l| l.kind.as_deref() != Some("vxlan")),
        "{host_links:?}"
    );

    // attach heals a changed MAC and a hand-deleted veth.
    let sb = format!("{tag}-sb");
    cleanup.add(&sb);
    netns::create(&sb).expect("sandbox");
    let s = spec(4242, moved);
    let a = attachment(&sb, Ipv4Addr::new(10, 77, 0, 9));
    overlay::attach(&node, &s, &a).await.expect("attach");
    exec_ok(
        &sb,
        &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:01"],
    );
    overlay::attach(&node, &s, &a)
        .await
        .expect("attach fixes the MAC");
    let out = exec_ok(&sb, &["ip", "-o", "link", "show", "eth0"]);
    assert!(out.contains("02:42:0a:4d:00:09"), "{out}");
    let outer: Vec<String> = net
        .links()
        .await
        .expect("links")
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .map(|l| l.name)
        .collect();
    assert_eq!(outer.len(), 1, "{outer:?}");
    exec_ok(&net_ns, &["ip", "link", "del", &outer[0]]);
    overlay::attach(&node, &s, &a)
        .await
        .expect("attach recreates the pair");
    assert!(
        ping(&sb, Ipv4Addr::new(10, 77, 0, 1), "1", "2"),
        "sandbox cannot reach its gateway"
    );

    // A foreign eth0 is not clobbered.
    let other = Attachment {
        ifname: "eth0".into(),
        ip: Ipv4Addr::new(10, 77, 0, 10),
        mac: Mac::for_ip(Ipv4Addr::new(10, 77, 0, 10)).octets(),
        ..a.clone()
    };
    let s2 = OverlaySpec {
        vni: 4343,
        ..s.clone()
    };
    let net2 = network_ns_name(&tag, 4343);
    cleanup.add(&net2);
    overlay::ensure_network(&node, &s2)
        .await
        .expect("second network");
    let err = overlay::attach(&node, &s2, &other)
        .await
        .expect_err("eth0 is taken");
    assert!(err.to_string().contains("already exists"), "{err}");

    // Removal is complete and idempotent.
    overlay::detach(&node, 4242, &a).await.expect("detach");
    drop(net);
    for vni in [4242, 4343] {
        overlay::remove_network(&node, vni).await.expect("remove");
        overlay::remove_network(&node, vni)
            .await
            .expect("remove again");
    }
    assert!(!netns::exists(&net_ns));
    assert!(overlay::networks_in_kernel(&node).expect("list").is_empty());
    drop(hostn);
    drop(cleanup);
    let left = netns::list_with_prefix(&tag).expect("list");
    assert!(left.is_empty(), "namespaces left: {left:?}");
}
