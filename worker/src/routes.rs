//! The node's own IPv4 routes, as its heartbeat reports them: the managers
//! refuse an overlay subnet that collides with one (a sandbox on such an
//! overlay could no longer reach what the node reaches through that route,
//! the underlay included).
//!
//! Only what the node had before mesh counts: the main table's unicast
//! routes with a prefix (not the default route), less those through the
//! devices mesh itself made in the node's namespace (`mesh_gwbridge`,
//! `mesh_ingress`, the local bridges and their ports). Overlays live in
//! namespaces of their own, so their routes never show here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tracing::warn;

use crate::link::{Link, Netlink, Route4};
use crate::netns::NetError;

/// At most this many routes are reported: a node with a full routing table
/// (a BGP speaker) must not grow the replicated state; the managers bound
/// it again.
pub const MAX_ROUTES: usize = 64;

/// Devices of ours that carry no alias saying so, by name.
const OUR_DEVICES: &[&str] = &[
    crate::egress::GWBRIDGE,
    crate::ingress::NODE_IFNAME,
    crate::tunnel::TAP,
    crate::local::DEFAULT_BRIDGE,
];

/// Every device mesh labels as its own has an alias starting so (bridges,
/// bridge ports, macvlans, encrypted VXLANs).
const OUR_ALIAS_PREFIX: &str = "mesh ";

/// One route of the node: where it goes, and through which device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub destination: Ipv4Net,
    pub device: String,
}

impl From<&Route> for mesh_proto::NodeRoute {
    fn from(r: &Route) -> Self {
        mesh_proto::NodeRoute {
            destination: r.destination.to_string(),
            device: r.device.clone(),
        }
    }
}

/// Whether mesh made this device (see the module's comment).
fn is_ours(link: &Link) -> bool {
    OUR_DEVICES.contains(&link.name.as_str())
        || link
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(OUR_ALIAS_PREFIX))
}

/// The routes worth reporting, sorted, deduplicated and capped: main table,
/// unicast, a prefix of at least /1, through a device that is not ours.
/// A route through a device that vanished meanwhile is left out.
fn select(listed: &[Route4], links: &BTreeMap<u32, Link>) -> Vec<Route> {
    let set: BTreeSet<Route> = listed
        .iter()
        .filter(|r| r.in_main() && r.destination.prefix_len() > 0)
        .filter_map(|r| {
            let link = links.get(&r.oif?)?;
            (!is_ours(link)).then(|| Route {
                destination: r.destination.trunc(),
                device: link.name.clone(),
            })
        })
        .collect();
    set.into_iter().take(MAX_ROUTES).collect()
}

/// Reads the routes of the calling task's namespace (the node's).
pub async fn read() -> Result<Vec<Route>, NetError> {
    let nl = Netlink::open(None).await?;
    let listed = nl.routes_v4().await?;
    let links: BTreeMap<u32, Link> = nl
        .links()
        .await?
        .into_iter()
        .map(|l| (l.index, l))
        .collect();
    Ok(select(&listed, &links))
}

/// How often the routes are read again: they rarely change, and a
/// heartbeat goes every 200 ms (by default).
pub const READ_EVERY: Duration = Duration::from_secs(2);

/// The node's routes as last read, for the heartbeat: read again at most
/// every [`READ_EVERY`]; a failed read keeps the last ones (logged once
/// until a read succeeds again).
#[derive(Default)]
pub struct Reader {
    last: Vec<mesh_proto::NodeRoute>,
    read_at: Option<Instant>,
    failing: bool,
}

impl Reader {
    pub async fn current(&mut self) -> Vec<mesh_proto::NodeRoute> {
        if self.read_at.is_some_and(|t| t.elapsed() < READ_EVERY) {
            return self.last.clone();
        }
        self.read_at = Some(Instant::now());
        // Short: the heartbeat waits for it, and a node is Down after 2 s.
        match tokio::time::timeout(Duration::from_millis(300), read()).await {
            Ok(Ok(routes)) => {
                self.last = routes.iter().map(Into::into).collect();
                self.failing = false;
            }
            Ok(Err(e)) => self.failed(&e.to_string()),
            Err(_) => self.failed("the kernel did not answer in time"),
        }
        self.last.clone()
    }

    fn failed(&mut self, why: &str) {
        if !self.failing {
            warn!("cannot read the node's routes (reporting the last ones read): {why}");
        }
        self.failing = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteHeader;

    fn link(index: u32, name: &str, alias: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: None,
            mtu: 1500,
            mac: None,
            up: true,
            master: None,
            link: None,
            alias: alias.map(String::from),
            vxlan: None,
        }
    }

    fn route(dst: &str, table: u8, oif: u32) -> Route4 {
        Route4 {
            destination: dst.parse().expect("a CIDR"),
            table: u32::from(table),
            unicast: true,
            gateway: None,
            oif: Some(oif),
        }
    }

    fn shown(routes: &[Route]) -> Vec<String> {
        routes
            .iter()
            .map(|r| format!("{} dev {}", r.destination, r.device))
            .collect()
    }

    #[test]
    fn keeps_the_nodes_own_routes_and_drops_ours_and_the_rest() {
        let main = RouteHeader::RT_TABLE_MAIN;
        let links: BTreeMap<u32, Link> = [
            link(2, "eth0", None),
            link(3, "mesh_gwbridge", None),
            link(4, "mesh_ingress", None),
            link(5, "mbr-abc", Some("mesh bridge network web")),
            link(6, "mesh0", Some("mesh bridge network bridge")),
            link(7, "wg-corp", Some("corporate VPN")),
        ]
        .into_iter()
        .map(|l| (l.index, l))
        .collect();
        let mut blackhole = route("10.9.0.0/16", main, 2);
        blackhole.unicast = false;
        let mut no_dev = route("10.8.0.0/16", main, 2);
        no_dev.oif = None;
        let listed = vec![
            route("192.168.1.0/24", main, 2),
            route("192.168.1.0/24", main, 2), // listed twice (two sources)
            route("0.0.0.0/0", main, 2),      // the default route
            route("172.18.0.0/16", main, 3),
            route("169.254.254.0/30", main, 4),
            route("172.19.0.0/24", main, 5),
            route("172.17.0.0/16", main, 6),
            route("10.200.0.0/16", main, 7),
            route("192.168.1.11/32", 255, 2), // the local table
            route("10.1.0.0/24", 100, 2),
            route("10.2.0.0/24", main, 99), // its device went meanwhile
            blackhole,
            no_dev,
        ];
        assert_eq!(
            shown(&select(&listed, &links)),
            ["10.200.0.0/16 dev wg-corp", "192.168.1.0/24 dev eth0"]
        );
    }

    #[test]
    fn reports_are_capped() {
        let links: BTreeMap<u32, Link> = [(2, link(2, "eth0", None))].into();
        let listed: Vec<Route4> = (0..200u32)
            .map(|i| {
                let dst = format!("10.{}.{}.0/24", i / 256, i % 256);
                route(&dst, RouteHeader::RT_TABLE_MAIN, 2)
            })
            .collect();
        let got = select(&listed, &links);
        assert_eq!(got.len(), MAX_ROUTES);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "sorted");
    }
}
