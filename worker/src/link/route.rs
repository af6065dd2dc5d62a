//! IPv4 routes as the kernel lists them, reduced to what mesh looks at:
//! the node's own routes (reported to the managers), default routes of
//! sandboxes and the ingress sandbox.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::RouteMessageBuilder;

use super::{NetError, Netlink};

/// One IPv4 route of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub destination: Ipv4Net,
    /// Tables above 255 are only in the attribute, so this is read from it.
    pub table: u32,
    pub unicast: bool,
    pub gateway: Option<Ipv4Addr>,
    /// The output device, or the first next hop's for a multipath route.
    pub oif: Option<u32>,
}

impl Route4 {
    /// A unicast route of the main table (what `ip route` shows).
    pub fn in_main(&self) -> bool {
        self.table == u32::from(RouteHeader::RT_TABLE_MAIN) && self.unicast
    }

    /// `None` for anything but IPv4.
    fn from_message(m: &RouteMessage) -> Option<Self> {
        if m.header.address_family != AddressFamily::Inet {
            return None;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut r = Route4 {
            destination: Ipv4Net::default(),
            table: u32::from(m.header.table),
            unicast: m.header.kind == RouteType::Unicast,
            gateway: None,
            oif: None,
        };
        let mut first_hop = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::MultiPath(hops) => {
                    first_hop = hops.first().map(|h| h.interface_index)
                }
                _ => {}
            }
        }
        r.destination = Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?;
        r.oif = r.oif.or(first_hop);
        Some(r)
    }
}

impl Netlink {
    /// Every IPv4 route of every table of this namespace.
    pub async fn routes_v4(&self) -> Result<Vec<Route4>, NetError> {
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err("list the routes", e))?;
        Ok(msgs.iter().filter_map(Route4::from_message).collect())
    }

    /// Whether the main table has an IPv4 default route.
    pub async fn has_default_route_v4(&self) -> Result<bool, NetError> {
        Ok(self
            .routes_v4()
            .await?
            .iter()
            .any(|r| r.destination.prefix_len() == 0 && r.in_main()))
    }
}
