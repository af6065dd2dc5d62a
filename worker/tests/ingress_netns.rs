//! The routing mesh against the real kernel: a "client" namespace sends
//! TCP to a fake node's address on a published port; the node's
//! `mesh_ingress` and its ingress sandbox's `mesh_ingress_lb` DNAT it over
//! the ingress overlay to a "task" namespace serving on :80, whose default
//! route points elsewhere. The task must see the client's own address, and
//! the reply must come back (only the policy route chosen by the sender's
//! MAC can carry it). Then tables deleted by hand come back, and the
//! sandbox goes with the ingress network.
//!
//! Needs root. Every namespace is removed by a drop guard.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_common::model::{DriverKind, Mac};
use mesh_proto::{
    EndpointInfo, IngressNode, IngressPort, IngressView, NodeView, PortConfig, TaskAssignment,
};
use mesh_worker::ingress::{self, sandbox_ns};
use mesh_worker::link::Netlink;
use mesh_worker::netns;
use mesh_worker::overlay::{self, Node, OverlaySpec, network_ns_name};
use mesh_worker::sandboxes::{Attachment, DataPath, Record};

mod common;
use common::*;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const SBOX_ING: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
const OTHER_NODE_ING: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 3);
const TASK_ING: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 5);
const VNI: u32 = 4321;
const TASK_ID: &str = "0123456789abcdef0123456789abcdef";

/// Kills the server it holds (a process this test started) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP server on :80 in `ns` that answers each connection with the
/// peer address it sees.
fn serve_peer_address(ns: &str) -> Server {
    let code = concat!(
        "import socket\n",
        "s=socket.socket()\n",
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n",
        "s.bind(('0.0.0.0',80))\n",
        "s.listen(16)\n",
        "while True:\n",
        "  c,a=s.accept()\n",
        "  c.sendall(a[0].encode())\n",
        "  c.close()\n",
    );
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", code])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3 server");
    Server(child)
}

/// What the server answered to a connection from `ns` to `to:port`, or
/// None when no answer came within a few seconds.
fn ask(ns: &str, to: Ipv4Addr, port: u16) -> Option<String> {
    let code = format!(
        "import socket\ns=socket.create_connection(('{to}',{port}),timeout=2)\nprint(s.recv(100).decode())"
    );
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let out = run(&["ip", "netns", "exec", ns, "python3", "-c", &code]);
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn view(backends: &[Ipv4Addr], with_ingress: bool) -> NodeView {
    let ep = EndpointInfo {
        network_id: "ingnet".into(),
        network_name: "ingress".into(),
        ip: SBOX_ING.to_string(),
        prefix: 16,
        mac: Mac::for_ip(SBOX_ING).to_string(),
        gateway: "10.255.0.1".into(),
        vni: VNI,
        mtu: 1450,
        ..Default::default()
    };
    NodeView {
        generation: 1,
        ingress: with_ingress.then(|| IngressView {
            network_id: "ingnet".into(),
            endpoint: Some(ep),
            nodes: [SBOX_ING, OTHER_NODE_ING]
                .iter()
                .map(|ip| IngressNode {
                    node_id: ip.to_string(),
                    ip: ip.to_string(),
                    mac: Mac::for_ip(*ip).to_string(),
                })
                .collect(),
            ports: vec![IngressPort {
                service_id: "svc".into(),
                service_name: "web".into(),
                protocol: "tcp".into(),
                published_port: 8080,
                target_port: 80,
                backends: backends.iter().map(ToString::to_string).collect(),
            }],
        }),
        tasks: vec![TaskAssignment {
            id: TASK_ID.into(),
            name: "web.1.x".into(),
            service_id: "svc".into(),
            desired_state: "running".into(),
            ports: vec![PortConfig {
                protocol: "tcp".into(),
                target_port: 80,
                published_port: 8080,
                publish_mode: "ingress".into(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn task_record(ns: &str) -> Record {
    Record {
        id: TASK_ID.into(),
        name: "web.1.x".into(),
        netns: ns.into(),
        pid: 0,
        cmd: Vec::new(),
        env: Vec::new(),
        networks: vec![Attachment {
            network: "ingress".into(),
            network_id: "ingnet".into(),
            endpoint_id: "ep".into(),
            ifname: "eth1".into(),
            ip: TASK_ING,
            prefix: 16,
            mac: Mac::for_ip(TASK_ING).to_string(),
            gateway: Ipv4Addr::new(10, 255, 0, 1),
            vni: VNI,
            mtu: 1450,
            internal: false,
            driver: DriverKind::Overlay,
            parent: None,
            default_route: false,
            encrypted: false,
        }],
        egress_ip: None,
        created_at: String::new(),
        exit_code: None,
        host_network: false,
        service: Some("svc".into()),
        ports: Vec::new(),
    }
}

fn has_table(ns: &str, table: &str) -> bool {
    run(&[
        "ip", "netns", "exec", ns, "nft", "list", "table", "ip", table,
    ])
    .status
    .success()
}

/// The namespaces of one test: a fake node, an outside client wired to
/// it (`up0`, NODE_IP <-> CLIENT_IP) and a task; removed on drop.
struct Setup {
    prefix: String,
    node_ns: String,
    client_ns: String,
    task_ns: String,
    node_nl: Netlink,
    task_nl: Netlink,
    cleanup: Cleanup,
}

async fn setup(tag: &str) -> Setup {
    let prefix = format!("{tag}{}", std::process::id() % 100_000);
    let (node_ns, client_ns, task_ns) = (
        format!("{prefix}-host"),
        format!("{prefix}-client"),
        format!("{prefix}-task"),
    );
    let mut cleanup = Cleanup(Vec::new());
    let node_nl = namespace(&node_ns, &mut cleanup).await;
    namespace(&client_ns, &mut cleanup).await;
    let task_nl = namespace(&task_ns, &mut cleanup).await;

    // The client's wire to the node.
    let client_fd = netns::open(&client_ns).expect("client ns");
    node_nl
        .create_veth(
            "up0",
            "up0",
            1500,
            Some(std::os::fd::AsFd::as_fd(&client_fd)),
        )
        .await
        .expect("veth");
    node_nl
        .add_address_v4("up0", NODE_IP, 24)
        .await
        .expect("addr");
    node_nl.set_up("up0").await.expect("up");
    let client_nl = Netlink::open(Some(&client_ns)).await.expect("netlink");
    client_nl
        .add_address_v4("up0", CLIENT_IP, 24)
        .await
        .expect("addr");
    client_nl.set_up("up0").await.expect("up");
    Setup {
        prefix,
        node_ns,
        client_ns,
        task_ns,
        node_nl,
        task_nl,
        cleanup,
    }
}

/// The node's data path as the daemon would have it.
fn data_path(prefix: &str) -> DataPath {
    DataPath {
        prefix: prefix.to_string(),
        local_ip: NODE_IP,
        port: 4789,
        overlay_mtu: 1450,
        kernel: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_port_reaches_the_task_with_the_client_address() {
    require_root("ingress tests");
    let Setup {
        prefix,
        node_ns,
        client_ns,
        task_ns,
        node_nl,
        task_nl,
        mut cleanup,
    } = setup("ti").await;
    cleanup.add(&network_ns_name(&prefix, VNI));
    cleanup.add(&sandbox_ns(&prefix));

    // The ingress overlay on this node, and the task on it.
    let node = Node::in_ns(prefix.clone(), node_ns.clone());
    let spec = OverlaySpec {
        vni: VNI,
        subnet: "10.255.0.0/16".parse().expect("subnet"),
        gateway: Ipv4Addr::new(10, 255, 0, 1),
        mtu: 1450,
        local_ip: NODE_IP,
        port: 4789,
        encrypted: false,
    };
    overlay::ensure_network(&node, &spec)
        .await
        .expect("ingress network");
    overlay::attach(
        &node,
        &spec,
        &overlay::Attachment {
            sandbox_ns: task_ns.clone(),
            ifname: "eth1".into(),
            ip: TASK_ING,
            prefix: 16,
            mac: Mac::for_ip(TASK_ING).octets(),
            mtu: 1450,
            default_route: false,
        },
    )
    .await
    .expect("task on the ingress network");
    // The task's default route leads nowhere useful: only the policy route
    // can bring a reply back.
    exec_ok(
        &task_ns,
        &[
            "ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1",
        ],
    );
    task_nl.set_up("dummy1").await.expect("up");
    task_nl
        .add_address_v4("dummy0", Ipv4Addr::new(192, 168, 77, 2), 24)
        .await
        .expect("addr");
    task_nl.set_up("dummy0").await.expect("up");
    task_nl
        .replace_default_route(Ipv4Addr::new(192, 168, 77, 1), "dummy0")
        .await
        .expect("route");

    let dp = data_path(&prefix);
    let live = [task_record(&task_ns)];
    let pass = ingress::repair_in(&dp, &node, &view(&[TASK_ING], true), &live).await;
    assert!(pass.faults.is_empty(), "{:?}", pass.faults);
    assert!(pass.repairs > 0);
    let _server = serve_peer_address(&task_ns);

    // From another host: the task sees the client itself.
    assert_eq!(
        ask(&client_ns, NODE_IP, 8080).as_deref(),
        Some("198.51.100.2")
    );
    // From the node itself, to its own address and to 127.0.0.1.
    assert!(
        ask(&node_ns, NODE_IP, 8080).is_some(),
        "node to its own address"
    );
    assert_eq!(
        ask(&node_ns, Ipv4Addr::LOCALHOST, 8080).as_deref(),
        Some("169.254.254.1"),
        "127.0.0.1 is masqueraded to the node's end of the link"
    );

    // Hairpin: a sandbox of this node, on the gateway bridge, reaching the
    // node's published port.
    let nb_ns = format!("{prefix}-nb");
    namespace(&nb_ns, &mut cleanup).await;
    tokio::task::block_in_place(|| {
        mesh_worker::egress::ensure_gwbridge(Some(&node_ns), "172.18.0.0/16")?;
        mesh_worker::egress::attach(
            Some(&node_ns),
            &nb_ns,
            Ipv4Addr::new(172, 18, 0, 8),
            16,
            true,
        )
    })
    .expect("egress");
    assert!(
        ask(&nb_ns, NODE_IP, 8080).is_some(),
        "a sandbox of this node reaching a published port"
    );

    // A second pass finds nothing to do.
    let again = ingress::repair_in(&dp, &node, &view(&[TASK_ING], true), &live).await;
    assert!(again.faults.is_empty(), "{:?}", again.faults);
    assert_eq!(again.repairs, 0);

    // Tables and a rule deleted by hand come back on the next pass.
    let sbox = sandbox_ns(&prefix);
    exec_ok(&node_ns, &["nft", "delete", "table", "ip", "mesh_ingress"]);
    exec_ok(&sbox, &["nft", "delete", "table", "ip", "mesh_ingress_lb"]);
    exec_ok(
        &task_ns,
        &["nft", "delete", "table", "ip", "mesh_ingress_task"],
    );
    exec_ok(
        &task_ns,
        &["ip", "rule", "del", "fwmark", "0x102", "lookup", "258"],
    );
    let healed = ingress::repair_in(&dp, &node, &view(&[TASK_ING], true), &live).await;
    assert!(healed.faults.is_empty(), "{:?}", healed.faults);
    assert!(healed.repairs >= 4, "{healed:?}");
    for (ns, t) in [
        (&node_ns, "mesh_ingress"),
        (&sbox, "mesh_ingress_lb"),
        (&task_ns, "mesh_ingress_task"),
    ] {
        assert!(has_table(ns, t), "{t} in {ns}");
    }
    assert_eq!(
        ask(&client_ns, NODE_IP, 8080).as_deref(),
        Some("198.51.100.2")
    );

    // A node leaving the ingress network takes its rule and route along.
    let mut one = view(&[TASK_ING], true);
    if let Some(i) = one.ingress.as_mut() {
        i.nodes.retain(|n| n.ip == SBOX_ING.to_string());
    }
    let left = ingress::repair_in(&dp, &node, &one, &live).await;
    assert!(left.faults.is_empty(), "{:?}", left.faults);
    let rules = exec_ok(&task_ns, &["ip", "rule"]);
    assert!(!rules.contains("0x103"), "{rules}");
    assert!(rules.contains("0x102"), "{rules}");
    let table = exec_ok(&task_ns, &["ip", "route", "show", "table", "259"]);
    assert!(table.trim().is_empty(), "{table}");
    assert_eq!(
        ask(&client_ns, NODE_IP, 8080).as_deref(),
        Some("198.51.100.2")
    );

    // A deleted ingress sandbox is rebuilt.
    netns::delete(&sbox).expect("delete the sandbox by hand");
    let rebuilt = ingress::repair_in(&dp, &node, &view(&[TASK_ING], true), &live).await;
    assert!(rebuilt.faults.is_empty(), "{:?}", rebuilt.faults);
    assert_eq!(
        ask(&client_ns, NODE_IP, 8080).as_deref(),
        Some("198.51.100.2")
    );

    // Without backends the port is refused at once.
    let idle = ingress::repair_in(&dp, &node, &view(&[], true), &live).await;
    assert!(idle.faults.is_empty(), "{:?}", idle.faults);
    let refused = run(&[
        "ip",
        "netns",
        "exec",
        &client_ns,
        "python3",
        "-c",
        "import socket\ntry:\n  socket.create_connection(('198.51.100.1',8080),timeout=2)\nexcept ConnectionRefusedError:\n  print('refused')\n",
    ]);
    assert_eq!(String::from_utf8_lossy(&refused.stdout).trim(), "refused");

    // The ingress network goes: nothing of the mesh stays on the node.
    let gone = ingress::repair_in(&dp, &node, &view(&[], false), &live).await;
    assert!(gone.faults.is_empty(), "{:?}", gone.faults);
    assert!(!netns::exists(&sbox));
    assert!(!has_table(&node_ns, "mesh_ingress"));
    assert!(
        node_nl
            .link("mesh_ingress")
            .await
            .expect("netlink")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_mode_port_reaches_the_local_task() {
    require_root("ingress tests");
    let Setup {
        prefix,
        node_ns,
        client_ns,
        task_ns,
        cleanup: _cleanup,
        ..
    } = setup("th").await;

    let task_gw = Ipv4Addr::new(172, 18, 0, 7);
    tokio::task::block_in_place(|| {
        mesh_worker::egress::ensure_gwbridge(Some(&node_ns), "172.18.0.0/16")?;
        mesh_worker::egress::attach(Some(&node_ns), &task_ns, task_gw, 16, true)
    })
    .expect("egress");
    let node = Node::in_ns(prefix.clone(), node_ns.clone());
    let dp = data_path(&prefix);
    let mut rec = task_record(&task_ns);
    rec.networks.clear();
    rec.egress_ip = Some(task_gw);
    let mut v = view(&[], false);
    v.tasks[0].ports[0].publish_mode = "host".into();
    v.tasks[0].ports[0].published_port = 9090;
    let pass = ingress::repair_in(&dp, &node, &v, std::slice::from_ref(&rec)).await;
    assert!(pass.faults.is_empty(), "{:?}", pass.faults);
    let _server = serve_peer_address(&task_ns);
    assert_eq!(
        ask(&client_ns, NODE_IP, 9090).as_deref(),
        Some("198.51.100.2")
    );
    assert!(
        ask(&node_ns, Ipv4Addr::LOCALHOST, 9090).is_some(),
        "127.0.0.1 on the node"
    );

    // Leaving the cluster takes the table away at once.
    ingress::remove(&node).expect("remove");
    assert!(!has_table(&node_ns, "mesh_ingress"));
    let pass = ingress::repair_in(&dp, &node, &v, std::slice::from_ref(&rec)).await;
    assert!(pass.faults.is_empty(), "{:?}", pass.faults);
    assert!(has_table(&node_ns, "mesh_ingress"));

    // The task gone from the view: its port is gone from the node.
    let pass = ingress::repair_in(&dp, &node, &view(&[], false), &[]).await;
    assert!(pass.faults.is_empty(), "{:?}", pass.faults);
    assert!(!has_table(&node_ns, "mesh_ingress"));
}
