//! The node simulator's network (`mesh lab sim`): one namespace on the
//! lab's underlay bridge that answers for a whole range of addresses, one
//! per simulated node, and a way to make some of them fall silent at once.
//!
//! - netns `mlab-L-sim` has `eth0` at 192.168.k.254/24 on the underlay and
//!   a local route for [`SIM_RANGE`] (any address in it can be bound
//!   without adding it);
//! - every node's namespace routes [`SIM_RANGE`] to 192.168.k.254, so
//!   managers answer simulated nodes and can knock on their hosts;
//! - a "dead" address is one in the nftables set `dead` of table
//!   `inet mesh_lab_sim`: its packets are dropped both ways, so to the
//!   managers that node is silent and its host does not answer, as a
//!   machine that lost power.

use std::net::Ipv4Addr;

use crate::error::{LabError, Result};
use crate::lab::{Lab, UNDERLAY_BRIDGE};
use crate::names::{self, SIM_RANGE};
use crate::sys;

/// The simulator's nftables table, in its namespace.
const SIM_TABLE: &str = "mesh_lab_sim";
/// Bridge-side end of the simulator's underlay link.
const SIM_VETH: &str = "sim";

/// A lab's simulator namespace, made by [`Lab::sim_net_up`].
#[derive(Debug, Clone)]
pub struct SimNet {
    pub netns: String,
    pub gateway: Ipv4Addr,
    /// The nodes' namespaces that route [`SIM_RANGE`] here.
    routed: Vec<String>,
    lab_dir: std::path::PathBuf,
}

fn range() -> String {
    format!("{}/{}", SIM_RANGE.0, SIM_RANGE.1)
}

impl Lab {
    /// Makes the simulator's namespace and routes, replacing what a
    /// crashed simulator of this lab left; refused while one still runs.
    pub fn sim_net_up(&self) -> Result<SimNet> {
        let netns = names::sim_netns(&self.name);
        if sys::netns_path(&netns).exists() {
            if let Some((pid, _)) = sys::netns_members(&netns).first() {
                return Err(LabError::InvalidSpec(format!(
                    "a node simulator already runs in lab {} (pid {pid}); stop it first",
                    self.name
                )));
            }
            sys::ip(&["netns", "del", netns.as_str()])?;
        }
        let gateway = names::sim_gateway(self.subnet_index);
        let net = SimNet {
            netns: netns.clone(),
            gateway,
            routed: self.nodes.iter().map(|n| n.netns.clone()).collect(),
            lab_dir: self.dir.clone(),
        };
        let made = (|| {
            let ul = self.underlay_netns.as_str();
            let ns = netns.as_str();
            let _ = sys::ip(&["-n", ul, "link", "del", SIM_VETH]);
            sys::ip(&["netns", "add", ns])?;
            sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
            sys::ip(&[
                "-n", ul, "link", "add", SIM_VETH, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            sys::ip(&[
                "-n",
                ul,
                "link",
                "set",
                SIM_VETH,
                "master",
                UNDERLAY_BRIDGE,
                "up",
            ])?;
            sys::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                "eth0",
            ])?;
            sys::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            sys::ip(&["-n", ns, "route", "add", "local", &range(), "dev", "lo"])?;
            let script = format!(
                "table inet {SIM_TABLE} {{\n\
                 \tset dead {{ type ipv4_addr; }}\n\
                 \tchain in {{ type filter hook input priority 0; ip daddr @dead drop; }}\n\
                 \tchain out {{ type filter hook output priority 0; ip saddr @dead drop; }}\n\
                 }}\n"
            );
            self.nft_script(ns, "sim.nft", &script)?;
            for node in &net.routed {
                sys::ip(&[
                    "-n",
                    node.as_str(),
                    "route",
                    "replace",
                    &range(),
                    "via",
                    &gateway.to_string(),
                ])?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            net.down();
            return Err(e);
        }
        Ok(net)
    }
}

impl SimNet {
    /// Makes these simulated nodes' addresses silent both ways.
    pub fn kill(&self, addrs: &[Ipv4Addr]) -> Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        let script = format!(
            "add element inet {SIM_TABLE} dead {{ {} }}\n",
            list.join(", ")
        );
        sys::nft_file(&self.lab_dir.join("sim-kill.nft"), &self.netns, &script)
    }

    /// Removes the routes and the namespace; what is already gone is fine.
    pub fn down(&self) {
        for node in &self.routed {
            if sys::netns_path(node).exists() {
                let _ = sys::ip(&["-n", node.as_str(), "route", "del", &range()]);
            }
        }
        if sys::netns_path(&self.netns).exists()
            && let Err(e) = sys::ip(&["netns", "del", self.netns.as_str()])
        {
            tracing::warn!(netns = %self.netns, "removing the simulator's namespace: {e}");
        }
    }
}
