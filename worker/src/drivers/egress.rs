//! Egress like `docker_gwbridge`: sandboxes on overlays only reach the
//! outside through `mesh_gwbridge`, one isolated port each, behind the
//! `ip mesh_egress` NAT table (the kernel code is [`crate::egress`]). Not a
//! network of its own, so not a [`super::NetworkDriver`]; it has the same
//! lifecycle and is repaired on the same pass.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::debug;

use super::{Desired, DriverError, Repair};
use crate::egress;
use crate::link::Netlink;
use crate::sandboxes::Record;

/// The gwbridge's subnet, as Docker's 172.18.0.0/16.
pub const EGRESS_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 18, 0, 0), 16);

fn subnet() -> Ipv4Net {
    Ipv4Net::new(EGRESS_SUBNET.0, EGRESS_SUBNET.1).unwrap_or_default()
}

/// The lowest free sandbox address on the gwbridge (the first host address
/// is its gateway), or an error once every one is taken: two sandboxes
/// sharing an address would each break the other's way out.
pub fn next_egress_ip(used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, DriverError> {
    let net = subnet();
    let first = u32::from(net.network()) + 2;
    let last = u32::from(net.broadcast()) - 1;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
        .ok_or_else(|| {
            DriverError::Refused(format!(
                "no free address left on {} ({net}): every one is held by a sandbox with egress; remove some sandboxes",
                egress::GWBRIDGE
            ))
        })
}

/// The gwbridge part of the data path.
pub struct Egress;

impl Egress {
    /// Makes the bridge and its table (replacing the table), as a
    /// sandbox's first egress needs them.
    pub fn ensure_bridge(&self) -> Result<(), DriverError> {
        // Runs `nft`: off the async worker thread.
        tokio::task::block_in_place(|| egress::ensure_gwbridge(None, &subnet().to_string()))?;
        Ok(())
    }

    /// Gives sandbox `rec` its way out at `ip` on a bridge that exists:
    /// its port and default route only, so concurrent starts do not each
    /// rebuild the node-wide table.
    pub fn attach_port(&self, rec: &Record, ip: Ipv4Addr) -> Result<(), DriverError> {
        tokio::task::block_in_place(|| {
            egress::attach(None, &rec.netns, ip, EGRESS_SUBNET.1, true)
        })?;
        Ok(())
    }

    pub fn detach(&self, netns: &str) -> Result<(), DriverError> {
        egress::detach(None, netns)?;
        Ok(())
    }

    /// The bridge and its table every pass while some sandbox has egress,
    /// rebuilt only where the kernel's copy is missing or drifted; a
    /// sandbox's port only where the kernel differs from what it should be.
    pub async fn repair(&self, want: &Desired<'_>) -> Repair {
        let mut out = Repair::default();
        let users: Vec<(&Record, Ipv4Addr)> = want
            .sandboxes
            .iter()
            .filter_map(|r| Some((r, r.egress_ip?)))
            .collect();
        if users.is_empty() {
            return out;
        }
        let bridge =
            tokio::task::block_in_place(|| egress::check_gwbridge(None, &subnet().to_string()));
        match bridge {
            Ok(fixed) if fixed.any() => {
                debug!(?fixed, "egress bridge or table drifted; repaired");
                out.repairs += 1;
            }
            Ok(_) => {}
            Err(e) => {
                out.fail(
                    || {
                        format!(
                            "egress bridge {} and table {}",
                            egress::GWBRIDGE,
                            egress::TABLE
                        )
                    },
                    e,
                );
                return out;
            }
        }
        // The node's side is looked at once per pass, not once per sandbox.
        let host = Netlink::open(None).await.ok();
        let bridge = match &host {
            Some(h) => h.link(egress::GWBRIDGE).await.ok().flatten(),
            None => None,
        };
        for (rec, ip) in users {
            if let (Some(host), Some(bridge)) = (&host, &bridge)
                && attached(host, bridge.index, rec, ip).await
            {
                continue;
            }
            debug!(sandbox = %rec.name, "egress port drifted; repairing it");
            out.repairs += 1;
            let r = tokio::task::block_in_place(|| {
                egress::attach(None, &rec.netns, ip, EGRESS_SUBNET.1, true)
            });
            out.note(|| format!("sandbox {} egress", rec.name), r);
        }
        out
    }
}

/// Whether the kernel holds the sandbox's egress as attach makes it: its
/// port up on the bridge, and `gw0` with its address in the sandbox. Any
/// doubt counts as not attached (attach is idempotent).
async fn attached(host: &Netlink, bridge: u32, rec: &Record, ip: Ipv4Addr) -> bool {
    let check = async {
        let port = host.link(&egress::host_ifname(&rec.netns)).await.ok()??;
        let sb = Netlink::open(Some(&rec.netns)).await.ok()?;
        let inner = sb.link(egress::SANDBOX_IFNAME).await.ok()??;
        let addrs = sb.addresses_v4(egress::SANDBOX_IFNAME).await.ok()?;
        Some(
            port.master == Some(bridge)
                && port.up
                && inner.up
                && addrs.contains(&(ip, EGRESS_SUBNET.1)),
        )
    };
    check.await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_addresses_start_after_the_gateway_and_run_out() {
        let mut used = BTreeSet::new();
        assert_eq!(
            next_egress_ip(&used).expect("free"),
            Ipv4Addr::new(172, 18, 0, 2)
        );
        used.insert(Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(
            next_egress_ip(&used).expect("free"),
            Ipv4Addr::new(172, 18, 0, 3)
        );
        let all: BTreeSet<Ipv4Addr> = (u32::from(Ipv4Addr::new(172, 18, 0, 2))
            ..=u32::from(Ipv4Addr::new(172, 18, 255, 254)))
            .map(Ipv4Addr::from)
            .collect();
        let e = next_egress_ip(&all).expect_err("full").to_string();
        assert!(e.contains("no free address left on mesh_gwbridge"), "{e}");
    }
}
