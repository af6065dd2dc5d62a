//! The `bridge` driver: Docker's local bridge networks, a Linux bridge per
//! network in the node's namespace and one NAT table covering them all (the
//! kernel code is [`crate::local`]).

use async_trait::async_trait;
use mesh_common::model::DriverKind;

use super::{Ctx, Desired, DriverError, NetworkDriver, Repair};
use crate::local::{self, BridgeSpec};
use crate::sandboxes::{Attachment, Record};

pub struct Bridge;

/// The bridge of the network `a` is on.
fn spec_of(cx: &Ctx<'_>, a: &Attachment) -> Result<BridgeSpec, DriverError> {
    let l = cx
        .local
        .find(&a.network_id)
        .ok_or_else(|| DriverError::Refused(format!("network {} is gone", a.network)))?;
    l.bridge_spec(cx.dp.underlay_mtu())
        .ok_or_else(|| DriverError::Refused(format!("network {} is damaged", a.network)))
}

/// Rebuilds the NAT and isolation table of every local bridge network. The
/// rules depend only on the set of networks, so this runs once per change
/// (and once per repair pass), not per attachment; it forks `nft`, so it
/// leaves the async worker thread while it does.
pub fn sync_nat(cx: &Ctx<'_>) -> Result<(), DriverError> {
    let specs: Vec<BridgeSpec> = cx
        .local
        .list()
        .iter()
        .filter_map(|n| n.bridge_spec(cx.dp.underlay_mtu()))
        .collect();
    tokio::task::block_in_place(|| local::sync_nat(&cx.dp.node(), &specs))?;
    Ok(())
}

#[async_trait]
impl NetworkDriver for Bridge {
    fn kind(&self) -> DriverKind {
        DriverKind::Bridge
    }

    async fn ensure(&self, cx: &Ctx<'_>, a: &Attachment) -> Result<(), DriverError> {
        local::ensure_bridge(&cx.dp.node(), &spec_of(cx, a)?).await?;
        Ok(())
    }

    async fn attach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        local::attach_bridge(&cx.dp.node(), &spec_of(cx, a)?, &a.link(rec)).await?;
        Ok(())
    }

    /// A network removed meanwhile took its bridge and ports with it.
    async fn detach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        if let Ok(spec) = spec_of(cx, a) {
            local::detach_bridge(&cx.dp.node(), &spec, &a.link(rec)).await?;
        }
        Ok(())
    }

    async fn settle(&self, cx: &Ctx<'_>) -> Result<(), DriverError> {
        sync_nat(cx)
    }

    fn settles(&self) -> bool {
        true
    }

    /// Every sandbox's bridge attachment, then the NAT table once.
    async fn repair(&self, cx: &Ctx<'_>, want: &Desired<'_>) -> Repair {
        let mut out = Repair::default();
        let mut any = false;
        for (rec, a) in want.attachments(DriverKind::Bridge) {
            any = true;
            let r = super::wire(cx, rec, a).await;
            out.note(
                || format!("sandbox {} on network {}", rec.name, a.network),
                r,
            );
        }
        if any {
            out.note(
                || format!("bridge networks' NAT table {}", local::TABLE),
                sync_nat(cx),
            );
        }
        out
    }
}
