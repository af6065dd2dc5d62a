//! `ip mesh_ports` against the real `nft` (needs root): as applied it reads
//! back in sync (so a reconcile pass does not rebuild it every time), a
//! rule deleted by hand is seen as drift and repaired, and with no ports
//! the table goes. Everything happens in a namespace the test makes and
//! removes.

mod common;

use std::net::Ipv4Addr;

use common::{Cleanup, exec_ok, require_root};
use mesh_common::model::Protocol;
use mesh_worker::firewall::{self, Drift, ports::PortRule, ports::PortsTable};
use mesh_worker::netns;

fn rule(ip: Option<Ipv4Addr>, port: u16, protocol: Protocol) -> PortRule {
    PortRule {
        host_ip: ip,
        host_port: port,
        protocol,
        target: Ipv4Addr::new(172, 17, 0, 2),
        target_port: 80,
        iface: "mesh0".into(),
        sandbox: "web".into(),
    }
}

#[test]
fn ports_table_reads_back_in_sync_and_drift_is_repaired() {
    require_root("the ports table tests");
    let name = format!("pt{}", std::process::id());
    let mut guard = Cleanup(Vec::new());
    netns::create(&name).expect("create namespace");
    guard.add(&name);
    let n = Some(name.as_str());

    let rules = [
        rule(None, 8080, Protocol::Tcp),
        rule(Some(Ipv4Addr::LOCALHOST), 8181, Protocol::Tcp),
        rule(None, 5353, Protocol::Udp),
    ];
    let table = PortsTable { rules: &rules };
    assert_eq!(firewall::drift(n, &table).expect("drift"), Drift::Missing);
    firewall::sync(n, &table).expect("apply");
    assert_eq!(firewall::drift(n, &table).expect("drift"), Drift::InSync);
    let listed = exec_ok(&name, &["nft", "list", "table", "ip", "mesh_ports"]);
    for want in [
        "fib daddr type local",
        "tcp dport 8080",
        "dnat to 172.17.0.2:80",
        "ip daddr 127.0.0.1 tcp dport 8181",
        "udp dport 5353",
        "ct status dnat",
        "masquerade",
    ] {
        assert!(listed.contains(want), "{want:?} missing from:\n{listed}");
    }

    // A rule flushed by hand is drift; a repair puts it back.
    exec_ok(
        &name,
        &["nft", "flush", "chain", "ip", "mesh_ports", "prerouting"],
    );
    assert_eq!(firewall::drift(n, &table).expect("drift"), Drift::Differs);
    assert_eq!(firewall::repair(n, &table).expect("repair"), Drift::Differs);
    assert_eq!(firewall::drift(n, &table).expect("drift"), Drift::InSync);

    // One port fewer differs; no ports removes the table.
    let fewer = PortsTable { rules: &rules[..1] };
    assert_eq!(firewall::drift(n, &fewer).expect("drift"), Drift::Differs);
    let none = PortsTable { rules: &[] };
    firewall::sync(n, &none).expect("remove");
    assert_eq!(firewall::drift(n, &none).expect("drift"), Drift::InSync);
    let out = common::run(&["ip", "netns", "exec", &name, "nft", "list", "tables"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("mesh_ports"));
}
