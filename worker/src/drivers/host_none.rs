//! The `host` and `none` drivers: no kernel work. A `host` sandbox shares
//! the node's network namespace; a `none` sandbox has only its loopback.
//! Either takes the sandbox's whole network stack, so it has no attachment
//! record and excludes every other network.

use async_trait::async_trait;
use mesh_common::model::DriverKind;

use super::{Ctx, Desired, DriverError, NetworkDriver, Repair};
use crate::sandboxes::{Attachment, Record};

pub struct Stackless(DriverKind);

pub static HOST: Stackless = Stackless(DriverKind::Host);
pub static NONE: Stackless = Stackless(DriverKind::None);

#[async_trait]
impl NetworkDriver for Stackless {
    fn kind(&self) -> DriverKind {
        self.0
    }

    fn has_interface(&self) -> bool {
        false
    }

    async fn ensure(&self, _cx: &Ctx<'_>, _a: &Attachment) -> Result<(), DriverError> {
        Ok(())
    }

    async fn attach(
        &self,
        _cx: &Ctx<'_>,
        _rec: &Record,
        _a: &Attachment,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    async fn detach(
        &self,
        _cx: &Ctx<'_>,
        _rec: &Record,
        _a: &Attachment,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    async fn repair(&self, _cx: &Ctx<'_>, _want: &Desired<'_>) -> Repair {
        Repair::default()
    }
}
