//! IPv4 addresses and routes of a namespace's devices: what a gateway, a
//! sandbox end or the gwbridge needs.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{AddressMessageBuilder, RouteMessageBuilder};

use super::{NetError, Netlink};

impl Netlink {
    /// The device's IPv4 addresses with their prefix lengths.
    pub async fn addresses_v4(&self, name: &str) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        let idx = self.require_any(name).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute()
            .try_collect()
            .await
            .map_err(|e| self.err(format!("list the addresses of {name}"), e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.family != AddressFamily::Inet || m.header.index != idx {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS differs
            // from it only on point-to-point links.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((ip, m.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// Adds an IPv4 address to a device.
    pub async fn add_address_v4(
        &self,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        self.handle
            .address()
            .add(idx, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| self.err(format!("add address {ip}/{prefix} to {name}"), e))
    }

    /// Removes one IPv4 address from a device.
    pub async fn del_address_v4(
        &self,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let idx = self.require_any(name).await?;
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(idx)
            .address(ip, prefix)
            .build();
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(|e| self.err(format!("remove address {ip}/{prefix} from {name}"), e))
    }

    /// Removes every IPv4 address from a device.
    pub async fn flush_addresses_v4(&self, name: &str) -> Result<(), NetError> {
        for (ip, prefix) in self.addresses_v4(name).await? {
            self.del_address_v4(name, ip, prefix).await?;
        }
        Ok(())
    }

    /// Makes the device carry exactly this IPv4 address: adds it if missing
    /// and removes any other (a stale one from a changed subnet).
    pub async fn ensure_only_address_v4(
        &self,
        name: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let current = self.addresses_v4(name).await?;
        for &(other, p) in &current {
            if (other, p) != (ip, prefix) {
                self.del_address_v4(name, other, p).await?;
            }
        }
        if !current.contains(&(ip, prefix)) {
            self.add_address_v4(name, ip, prefix).await?;
        }
        Ok(())
    }

    /// Adds or replaces the default route via `gateway` on `dev`.
    pub async fn replace_default_route(
        &self,
        gateway: Ipv4Addr,
        dev: &str,
    ) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(idx)
            .build();
        self.replace_route(msg, || {
            format!("set the default route via {gateway} on {dev}")
        })
        .await
    }

    /// Adds or replaces a link-scope route to `dst/prefix` out of `dev`.
    pub async fn replace_dev_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        dev: &str,
    ) -> Result<(), NetError> {
        let idx = self.require_any(dev).await?;
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        self.replace_route(msg, || format!("add route {dst}/{prefix} dev {dev}"))
            .await
    }

    /// Adds a route, replacing one to the same destination.
    async fn replace_route(
        &self,
        msg: RouteMessage,
        what: impl FnOnce() -> String,
    ) -> Result<(), NetError> {
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| self.err(what(), e))
    }
}
