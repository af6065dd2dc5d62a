//! Network drivers behind one trait.
//!
//! A driver owns what the kernel holds for its kind of network on this node:
//! it ensures the network, attaches and detaches a sandbox, and on every
//! reconcile pass observes and repairs all of it, reporting each thing it
//! could not fix as a [`Fault`] and going on with the rest.
//!
//! - `overlay`: VXLAN networks from the managers' view (the kernel code is
//!   [`crate::overlay`]);
//! - `bridge`, `macvlan`, `host_none`: Docker's local drivers (the kernel
//!   code is [`crate::local`]);
//! - `egress`: `mesh_gwbridge` and its NAT table, the way out for sandboxes
//!   on overlays only (the kernel code is [`crate::egress`]); not a driver
//!   of networks, but repaired on the same pass.
//!
//! Adding a driver is one file here and one line in [`driver`].

mod bridge;
mod egress;
mod host_none;
mod macvlan;
mod overlay;

use std::fmt;

use async_trait::async_trait;
use mesh_common::model::DriverKind;
use mesh_proto::NodeView;

pub use bridge::sync_nat as sync_bridge_nat;
pub use egress::{EGRESS_SUBNET, Egress, next_egress_ip};
pub use overlay::overlay_spec;

use crate::local_networks::LocalNetworks;
use crate::netns::NetError;
use crate::sandboxes::{Attachment, DataPath, Record};

/// What a driver works with: the node's data-path settings and its local
/// networks.
pub struct Ctx<'a> {
    pub dp: &'a DataPath,
    pub local: &'a LocalNetworks,
}

/// What the kernel must hold: the managers' view of this node and its
/// running sandboxes.
pub struct Desired<'a> {
    pub view: &'a NodeView,
    pub sandboxes: &'a [Record],
}

impl Desired<'_> {
    /// Every (sandbox, attachment) pair served by `kind`.
    pub fn attachments(&self, kind: DriverKind) -> impl Iterator<Item = (&Record, &Attachment)> {
        self.sandboxes.iter().flat_map(move |r| {
            r.networks
                .iter()
                .filter(move |a| a.driver == kind)
                .map(move |a| (r, a))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    #[error("{0}")]
    Refused(String),
}

/// One thing a reconcile pass could not make right, and where: the pass
/// goes on with everything else, and the node's status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// What it is about: "network app", "sandbox web on network app"…
    pub scope: String,
    pub error: String,
}

impl Fault {
    pub fn new(scope: impl Into<String>, error: impl fmt::Display) -> Self {
        Fault {
            scope: scope.into(),
            error: error.to_string(),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.scope, self.error)
    }
}

/// What one driver's repair did: how many things it fixed, and what it
/// could not.
#[derive(Debug, Default)]
pub struct Repair {
    pub repairs: usize,
    pub faults: Vec<Fault>,
}

impl Repair {
    /// Records the outcome of one item.
    pub fn note<T>(&mut self, scope: impl FnOnce() -> String, r: Result<T, impl fmt::Display>) {
        if let Err(e) = r {
            self.fail(scope, e);
        }
    }

    /// Records an item that failed.
    pub fn fail(&mut self, scope: impl FnOnce() -> String, e: impl fmt::Display) {
        self.faults.push(Fault::new(scope(), e));
    }
}

/// The lifecycle of one kind of network on this node.
#[async_trait]
pub trait NetworkDriver: Send + Sync {
    fn kind(&self) -> DriverKind;

    /// Whether a sandbox on such a network gets an interface on it; `host`
    /// and `none` give it a whole network stack instead, and so exclude
    /// every other network.
    fn has_interface(&self) -> bool {
        true
    }

    /// Makes the network `a` is on exist on this node.
    async fn ensure(&self, cx: &Ctx<'_>, a: &Attachment) -> Result<(), DriverError>;

    /// Connects sandbox `rec` to the network (ensured first).
    async fn attach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError>;

    /// Disconnects it; absent is fine.
    async fn detach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError>;

    /// Brings node-wide state that covers all of this driver's networks
    /// (the bridge networks' NAT table) in line after attachments changed.
    async fn settle(&self, _cx: &Ctx<'_>) -> Result<(), DriverError> {
        Ok(())
    }

    /// Whether [`Self::settle`] does anything: a start takes the node-wide
    /// kernel lock for it only then.
    fn settles(&self) -> bool {
        false
    }

    /// One reconcile pass: compares `want` with the kernel and fixes every
    /// difference it can; one failure never stops the rest.
    async fn repair(&self, cx: &Ctx<'_>, want: &Desired<'_>) -> Repair;
}

/// The registry: the driver serving each kind of network.
pub fn driver(kind: DriverKind) -> &'static dyn NetworkDriver {
    match kind {
        DriverKind::Overlay => &overlay::Overlay,
        DriverKind::Bridge => &bridge::Bridge,
        DriverKind::Macvlan => &macvlan::Macvlan,
        DriverKind::Host => &host_none::HOST,
        DriverKind::None => &host_none::NONE,
    }
}

/// Every registered driver, in a fixed order (overlays first: sandboxes'
/// overlay links need their networks).
pub fn all() -> impl Iterator<Item = &'static dyn NetworkDriver> {
    DriverKind::ALL.iter().map(|k| driver(*k))
}

/// Connects one attachment: the network, then the link.
pub async fn wire(cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
    let d = driver(a.driver);
    d.ensure(cx, a).await?;
    d.attach(cx, rec, a).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_driver() {
        for k in DriverKind::ALL {
            assert_eq!(driver(*k).kind(), *k);
        }
        assert!(!driver(DriverKind::Host).has_interface());
        assert!(!driver(DriverKind::None).has_interface());
        assert!(driver(DriverKind::Macvlan).has_interface());
    }

    #[test]
    fn faults_say_where() {
        let f = Fault::new("network app", "no such device");
        assert_eq!(f.to_string(), "network app: no such device");
        let mut r = Repair::default();
        r.note(|| "a".into(), Ok::<(), String>(()));
        r.note(|| "b".into(), Err::<(), _>("broken"));
        assert_eq!(r.faults, vec![Fault::new("b", "broken")]);
    }
}
