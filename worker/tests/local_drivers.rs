//! The local drivers (`bridge`, `macvlan`) against the real kernel: a fake
//! node namespace with a fake uplink to a fake outside namespace, sandboxes
//! as namespaces, real `ping` and UDP sockets inside them, `nft` to look at
//! the table.
//!
//! Needs root (namespaces, veth, bridge, macvlan, nftables). Traffic never
//! leaves the namespaces the tests create; every namespace is removed at the
//! end, by the test or, if it fails half-way, by a drop guard, and devices
//! and nftables tables go with their namespaces.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Duration;

use mesh_common::model::Mac;
use mesh_worker::link::Netlink;
use mesh_worker::local::{self, BridgeSpec};
use mesh_worker::macvlan;
use mesh_worker::netns::{self, NetError};
use mesh_worker::overlay::{Attachment, Node};

mod common;
use common::*;

fn ping_once(from_ns: &str, to: Ipv4Addr, count: &str) -> bool {
    let to = to.to_string();
    run(&[
        "ip", "netns", "exec", from_ns, "ping", "-n", "-q", "-c", count, "-W", "1", &to,
    ])
    .status
    .success()
}

/// Whether `to` answers; a few tries, since the first probe may be spent on
/// ARP.
fn reachable(from_ns: &str, to: Ipv4Addr) -> bool {
    (0..3).any(|_| ping_once(from_ns, to, "1"))
}

/// Whether `to` stays silent: two probes, one second each.
fn unreachable(from_ns: &str, to: Ipv4Addr) -> bool {
    !ping_once(from_ns, to, "2")
}

/// A UDP socket bound inside a namespace. The socket keeps the namespace it
/// was made in, so the test thread uses it from here on.
fn udp_in(ns: &str, bind: SocketAddr) -> UdpSocket {
    let socket = netns::run_in(ns, || UdpSocket::bind(bind))
        .expect("enter namespace")
        .expect("bind UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    socket
}

/// Sends datagrams from `from_ns` to a listener in `to_ns` at `to`; returns
/// the source address the listener saw, or `None` if nothing arrived.
fn udp_source_seen(from_ns: &str, to_ns: &str, to: Ipv4Addr) -> Option<Ipv4Addr> {
    let listener = udp_in(to_ns, SocketAddr::from((to, 0)));
    let dest = listener.local_addr().expect("listener address");
    let sender = udp_in(from_ns, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        // Unreachable destinations may be refused locally; what matters is
        // what arrives.
        let _ = sender.send_to(b"who am i", dest);
        if let Ok((_, SocketAddr::V4(peer))) = listener.recv_from(&mut buf) {
            return Some(*peer.ip());
        }
    }
    None
}

fn bridge_spec(name: &str, bridge: &str, subnet: &str, internal: bool) -> BridgeSpec {
    let subnet: ipnet::Ipv4Net = subnet.parse().expect("subnet");
    BridgeSpec {
        name: name.into(),
        bridge: bridge.into(),
        subnet,
        gateway: subnet.hosts().next().expect("gateway"),
        mtu: 1500,
        internal,
    }
}

/// Allocates the next address of `spec` with the local IPAM.
fn attachment(sandbox_ns: &str, spec: &BridgeSpec, used: &mut BTreeSet<Ipv4Addr>) -> Attachment {
    let ip = local::next_address(&spec.subnet, spec.gateway, used).expect("free address");
    used.insert(ip);
    Attachment {
        sandbox_ns: sandbox_ns.into(),
        ifname: "eth0".into(),
        ip,
        prefix: spec.subnet.prefix_len(),
        mac: Mac::for_ip(ip).octets(),
        mtu: spec.mtu,
        default_route: true,
    }
}

async fn index_of(nl: &Netlink, dev: &str) -> Option<u32> {
    nl.index(dev).await.expect("lookup")
}

const NODE_UP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

#[tokio::test]
async fn bridge_networks_masquerade_isolate_and_clean_up() {
    require_root("local driver tests");
    let tag = format!("t{}", std::process::id());
    let names = |s: &str| format!("{tag}-{s}");
    let (node_ns, out_ns) = (names("n"), names("o"));
    let (a1, a2, b1, i1) = (names("a1"), names("a2"), names("b1"), names("i1"));
    let mut cleanup = Cleanup(Vec::new());

    // The node and its uplink: up0 (203.0.113.1) to up1 (.2) in "outside",
    // the node's default route through it.
    let n = namespace(&node_ns, &mut cleanup).await;
    let o = namespace(&out_ns, &mut cleanup).await;
    let out_fd = netns::open(&out_ns).expect("open outside");
    n.create_veth("up0", "up1", 1500, Some(out_fd.as_fd()))
        .await
        .expect("uplink veth");
    n.add_address_v4("up0", NODE_UP, 24)
        .await
        .expect("up0 address");
    o.add_address_v4("up1", OUTSIDE, 24)
        .await
        .expect("up1 address");
    n.set_up("up0").await.expect("up0 up");
    o.set_up("up1").await.expect("up1 up");
    n.replace_default_route(OUTSIDE, "up0")
        .await
        .expect("node default route");
    let mut sandboxes = Vec::new();
    for sb in [&a1, &a2, &b1, &i1] {
        sandboxes.push(namespace(sb, &mut cleanup).await);
    }
    let node = Node::in_ns(node_ns.clone(), node_ns.clone());

    let net_a = bridge_spec("net-a", "mbr-a", "10.88.0.0/24", false);
    let net_b = bridge_spec("net-b", "mbr-b", "10.89.0.0/24", false);
    let net_i = bridge_spec("net-i", "mbr-i", "10.90.0.0/24", true);
    let nets = [net_a.clone(), net_b.clone(), net_i.clone()];

    // A bridge network needs its bridge first, and a device that is not a
    // bridge of ours is never taken over.
    let mut used = BTreeSet::new();
    let early = attachment(&a1, &net_a, &mut used.clone());
    let err = local::attach_bridge(&node, &net_a, &early)
        .await
        .expect_err("no bridge yet");
    assert!(
        err.to_string().contains("ensure_bridge must succeed first"),
        "{err}"
    );
    let hijack = BridgeSpec {
        bridge: "up0".into(),
        ..net_a.clone()
    };
    let err = local::ensure_bridge(&node, &hijack)
        .await
        .expect_err("up0 is not ours");
    assert!(matches!(err, NetError::Conflict(_)), "{err}");

    // Twice: the second pass must change nothing.
    for _ in 0..2 {
        for s in &nets {
            local::ensure_bridge(&node, s).await.expect("ensure bridge");
        }
        local::sync_nat(&node, &nets).expect("sync nat");
    }
    let bridges = local::bridges_in_kernel(&node).await.expect("bridges");
    assert_eq!(bridges, vec!["mbr-a", "mbr-b", "mbr-i"]);
    assert_eq!(
        n.addresses_v4("mbr-a").await.expect("addresses"),
        vec![(net_a.gateway, 24)]
    );
    assert_eq!(
        exec_ok(&node_ns, &["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
        "1"
    );

    let att_a1 = attachment(&a1, &net_a, &mut used);
    let att_a2 = attachment(&a2, &net_a, &mut used);
    let att_b1 = attachment(&b1, &net_b, &mut BTreeSet::new());
    let att_i1 = attachment(&i1, &net_i, &mut BTreeSet::new());
    assert_eq!(att_a1.ip, Ipv4Addr::new(10, 88, 0, 2));
    assert_eq!(att_a2.ip, Ipv4Addr::new(10, 88, 0, 3));
    let attached = [
        (&net_a, &att_a1),
        (&net_a, &att_a2),
        (&net_b, &att_b1),
        (&net_i, &att_i1),
    ];
    for (spec, a) in attached {
        local::attach_bridge(&node, spec, a).await.expect("attach");
    }
    let eth0_before = index_of(&sandboxes[0], "eth0").await;
    for (spec, a) in attached {
        local::attach_bridge(&node, spec, a)
            .await
            .expect("attach again");
    }
    assert_eq!(
        index_of(&sandboxes[0], "eth0").await,
        eth0_before,
        "a second attach must not recreate the veth"
    );
    let route = exec_ok(&a1, &["ip", "-4", "route", "show", "default"]);
    assert!(route.contains("via 10.88.0.1 dev eth0"), "{route}");

    // Same network: sandboxes and gateway reachable.
    assert!(reachable(&a1, att_a2.ip), "a1 -> a2");
    assert!(reachable(&a2, att_a1.ip), "a2 -> a1");
    assert!(reachable(&a1, net_a.gateway), "a1 -> gateway");

    // Outside: reachable, and seen with the node's address.
    assert!(reachable(&a1, OUTSIDE), "a1 -> outside");
    assert_eq!(
        udp_source_seen(&a1, &out_ns, OUTSIDE),
        Some(NODE_UP),
        "a1's traffic must leave masqueraded to the uplink address"
    );
    assert!(reachable(&b1, OUTSIDE), "b1 -> outside");

    // Between networks: nothing.
    assert!(unreachable(&b1, att_a1.ip), "b1 must not reach a1");
    assert!(unreachable(&a1, att_b1.ip), "a1 must not reach b1");

    // Internal: its gateway, but nothing out, not even unmasqueraded.
    assert!(reachable(&i1, net_i.gateway), "i1 -> its gateway");
    assert!(unreachable(&i1, OUTSIDE), "i1 must not reach outside");
    assert_eq!(udp_source_seen(&i1, &out_ns, OUTSIDE), None);
    assert!(unreachable(&i1, att_a1.ip), "i1 must not reach a1");
    let table = exec_ok(&node_ns, &["nft", "list", "table", "ip", "mesh_local"]);
    assert!(
        !table.contains("10.90.0.0"),
        "no NAT for internal:\n{table}"
    );

    // Drift heals: a lost address comes back with the next attach.
    sandboxes[0]
        .flush_addresses_v4("eth0")
        .await
        .expect("flush a1");
    assert!(unreachable(&a1, att_a2.ip));
    local::attach_bridge(&node, &net_a, &att_a1)
        .await
        .expect("re-attach");
    assert!(reachable(&a1, att_a2.ip), "a1 -> a2 after repair");

    // Teardown. Detach is idempotent; removing B with b1 still attached
    // takes b1's interface along.
    for _ in 0..2 {
        local::detach_bridge(&node, &net_a, &att_a1)
            .await
            .expect("detach a1");
    }
    assert_eq!(index_of(&sandboxes[0], "eth0").await, None);
    assert!(reachable(&a2, net_a.gateway), "a2 unaffected");
    local::detach_bridge(&node, &net_a, &att_a2)
        .await
        .expect("detach a2");
    local::detach_bridge(&node, &net_i, &att_i1)
        .await
        .expect("detach i1");
    for _ in 0..2 {
        for s in &nets {
            local::remove_bridge(&node, &s.bridge)
                .await
                .expect("remove bridge");
        }
        local::sync_nat(&node, &[]).expect("empty table");
    }
    for sb in &sandboxes {
        assert_eq!(index_of(sb, "eth0").await, None, "no eth0 left");
    }
    assert!(
        local::bridges_in_kernel(&node)
            .await
            .expect("list")
            .is_empty()
    );
    let left: Vec<String> = n
        .links()
        .await
        .expect("links")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(left, vec!["lo", "up0"], "only the fake uplink remains");
    let tables = exec_ok(&node_ns, &["nft", "list", "tables"]);
    assert!(!tables.contains("mesh_local"), "{tables}");

    drop((n, o, sandboxes));
    let all = [&node_ns, &out_ns, &a1, &a2, &b1, &i1];
    drop(cleanup);
    for ns in all {
        assert!(!netns::exists(ns), "{ns} left behind");
    }
}

#[tokio::test]
async fn macvlan_sandboxes_talk_over_a_parent_and_missing_parent_is_clear() {
    require_root("local driver tests");
    let tag = format!("t{}", std::process::id());
    let (node_ns, m1, m2) = (format!("{tag}-m"), format!("{tag}-m1"), format!("{tag}-m2"));
    let mut cleanup = Cleanup(Vec::new());
    let n = namespace(&node_ns, &mut cleanup).await;
    let s1 = namespace(&m1, &mut cleanup).await;
    let s2 = namespace(&m2, &mut cleanup).await;
    // The parent: one end of a veth pair inside the node (the kernel here
    // has no dummy devices); both ends up so the parent has carrier.
    n.create_veth("mvp0", "mvp1", 1500, None)
        .await
        .expect("parent veth");
    n.set_up("mvp0").await.expect("mvp0 up");
    n.set_up("mvp1").await.expect("mvp1 up");
    let node = Node::in_ns(node_ns.clone(), node_ns.clone());

    let gateway = Ipv4Addr::new(10, 50, 0, 1);
    let att = |ns: &str, ip: Ipv4Addr| Attachment {
        sandbox_ns: ns.into(),
        ifname: "eth0".into(),
        ip,
        prefix: 24,
        mac: Mac::for_ip(ip).octets(),
        mtu: 1500,
        default_route: true,
    };
    let att1 = att(&m1, Ipv4Addr::new(10, 50, 0, 2));
    let att2 = att(&m2, Ipv4Addr::new(10, 50, 0, 3));

    let err = macvlan::attach_macvlan(&node, "nope0", &att1, Some(gateway))
        .await
        .expect_err("missing parent");
    assert!(
        err.to_string()
            .contains("macvlan parent interface nope0 does not exist on this node"),
        "{err}"
    );
    assert_eq!(index_of(&s1, "eth0").await, None);

    for _ in 0..2 {
        macvlan::attach_macvlan(&node, "mvp0", &att1, Some(gateway))
            .await
            .expect("attach m1");
        macvlan::attach_macvlan(&node, "mvp0", &att2, None)
            .await
            .expect("attach m2");
    }
    let link = s1.link("eth0").await.expect("lookup").expect("eth0 in m1");
    assert_eq!(link.kind.as_deref(), Some("macvlan"));
    assert_eq!(link.mac, Some(att1.mac));
    let route = exec_ok(&m1, &["ip", "-4", "route", "show", "default"]);
    assert!(route.contains("via 10.50.0.1 dev eth0"), "{route}");
    let route = exec_ok(&m2, &["ip", "-4", "route", "show", "default"]);
    assert!(route.trim().is_empty(), "no gateway given: {route}");

    assert!(reachable(&m1, att2.ip), "m1 -> m2");
    assert!(reachable(&m2, att1.ip), "m2 -> m1");

    // Nothing of ours stays in the node: the macvlans moved out.
    let mut in_node: Vec<String> = n
        .links()
        .await
        .expect("links")
        .into_iter()
        .map(|l| l.name)
        .collect();
    in_node.sort();
    assert_eq!(in_node, vec!["lo", "mvp0", "mvp1"]);

    for _ in 0..2 {
        macvlan::detach_macvlan(&att1).await.expect("detach m1");
        macvlan::detach_macvlan(&att2).await.expect("detach m2");
    }
    assert_eq!(index_of(&s1, "eth0").await, None);
    assert_eq!(index_of(&s2, "eth0").await, None);

    drop((n, s1, s2));
    let all = [node_ns, m1, m2];
    drop(cleanup);
    for ns in &all {
        assert!(!netns::exists(ns), "{ns} left behind");
    }
}
