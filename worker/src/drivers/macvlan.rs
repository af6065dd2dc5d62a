//! The `macvlan` driver: a macvlan in bridge mode on the network's parent
//! interface, moved into each sandbox (the kernel code is [`crate::macvlan`]).

use async_trait::async_trait;
use mesh_common::model::DriverKind;

use super::{Ctx, Desired, DriverError, NetworkDriver, Repair};
use crate::macvlan as link;
use crate::sandboxes::{Attachment, Record};

pub struct Macvlan;

#[async_trait]
impl NetworkDriver for Macvlan {
    fn kind(&self) -> DriverKind {
        DriverKind::Macvlan
    }

    /// The network is the operator's parent interface: nothing to make.
    async fn ensure(&self, _cx: &Ctx<'_>, _a: &Attachment) -> Result<(), DriverError> {
        Ok(())
    }

    async fn attach(&self, cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        let parent = a.parent.as_deref().unwrap_or_default();
        link::attach_macvlan(&cx.dp.node(), parent, &a.link(rec), Some(a.gateway)).await?;
        Ok(())
    }

    async fn detach(&self, _cx: &Ctx<'_>, rec: &Record, a: &Attachment) -> Result<(), DriverError> {
        link::detach_macvlan(&a.link(rec)).await?;
        Ok(())
    }

    async fn repair(&self, cx: &Ctx<'_>, want: &Desired<'_>) -> Repair {
        let mut out = Repair::default();
        for (rec, a) in want.attachments(DriverKind::Macvlan) {
            let r = self.attach(cx, rec, a).await;
            out.note(
                || format!("sandbox {} on network {}", rec.name, a.network),
                r,
            );
        }
        out
    }
}
