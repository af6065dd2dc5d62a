//! Our nftables tables against the real `nft` (needs root): each table, as
//! applied, reads back in sync; a table changed behind our back is seen
//! as drifted and repaired; an unwanted table is removed. Everything
//! happens in a namespace the test makes and removes.

use ipnet::Ipv4Net;
use mesh_common::ipam;
use mesh_worker::firewall::{self, Drift, bridge_nat::BridgeNat, egress::EgressTable};
use mesh_worker::local::BridgeSpec;
use mesh_worker::netns;

/// A namespace removed on drop.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(&self.0) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn spec(bridge: &str, subnet: &str, internal: bool) -> BridgeSpec {
    let subnet: Ipv4Net = subnet.parse().expect("test subnet");
    BridgeSpec {
        name: format!("net-{bridge}"),
        bridge: bridge.into(),
        subnet,
        gateway: ipam::default_gateway(&subnet),
        mtu: 1500,
        internal,
    }
}

fn nft(ns: &str, args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn tables_read_back_in_sync_and_drift_is_repaired() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create network namespaces: run them as root"
    );
    let ns = Ns(format!("fw{}", std::process::id()));
    netns::create(&ns.0).expect("create namespace");
    let n = Some(ns.0.as_str());

    let nets = [
        spec("mbr-a", "10.88.0.0/24", false),
        spec("mbr-b", "10.89.0.0/24", false),
        spec("mbr-i", "10.90.0.0/24", true),
    ];
    let bridges = BridgeNat { nets: &nets };
    let egress = EgressTable {
        subnet: ipam::parse_subnet("172.18.0.0/16").expect("subnet"),
    };
    assert_eq!(firewall::drift(n, &bridges).expect("drift"), Drift::Missing);
    firewall::sync(n, &bridges).expect("sync bridge NAT");
    firewall::sync(n, &egress).expect("sync egress");
    assert_eq!(firewall::drift(n, &bridges).expect("drift"), Drift::InSync);
    assert_eq!(firewall::drift(n, &egress).expect("drift"), Drift::InSync);

    // Another set of networks is another table.
    let fewer = BridgeNat { nets: &nets[..2] };
    assert_eq!(firewall::drift(n, &fewer).expect("drift"), Drift::Differs);

    // A rule deleted by hand: seen and put back, the other table untouched.
    assert!(nft(
        &ns.0,
        &["flush", "chain", "ip", "mesh_local", "fwd-mbr-a"]
    ));
    assert_eq!(firewall::drift(n, &bridges).expect("drift"), Drift::Differs);
    assert_eq!(firewall::drift(n, &egress).expect("drift"), Drift::InSync);
    assert_eq!(
        firewall::repair(n, &bridges).expect("repair"),
        Drift::Differs
    );
    assert_eq!(
        firewall::repair(n, &bridges).expect("repair"),
        Drift::InSync
    );

    // No networks: the table should not exist, and repair removes it.
    let none = BridgeNat { nets: &[] };
    assert_eq!(firewall::drift(n, &none).expect("drift"), Drift::Differs);
    firewall::repair(n, &none).expect("remove");
    assert_eq!(firewall::drift(n, &none).expect("drift"), Drift::InSync);
    assert!(!nft(&ns.0, &["list", "table", "ip", "mesh_local"]));
    assert!(nft(&ns.0, &["list", "table", "ip", "mesh_egress"]));

    // A missing namespace is an error, not a missing table.
    let gone = format!("{}-gone", ns.0);
    assert!(firewall::drift(Some(&gone), &egress).is_err());
}
