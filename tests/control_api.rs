//! The Control API's refusals keep their kind on the wire: a test calls the
//! API over a daemon's unix socket, as the CLI does, and checks the gRPC
//! code, then checks what the CLI makes of the same refusal.
//! Needs root (a namespace lab).

mod common;

use anyhow::{Result, ensure};
use common::*;
use mesh_proto::{NetworkCreateRequest, NetworkRef};
use tonic::Code;

fn overlay(name: &str, subnet: &str) -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: name.into(),
        driver: "overlay".into(),
        subnet: subnet.into(),
        ..Default::default()
    }
}

#[test]
fn refusals_carry_their_grpc_code() -> Result<()> {
    let lab = up("capi", 1, 1, &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = control(&lab, "node1").await?;
        let missing = c
            .network_inspect(NetworkRef {
                network: "nosuch".into(),
            })
            .await
            .expect_err("no network is called nosuch");
        ensure!(missing.code() == Code::NotFound, "{missing:?}");
        ensure!(
            missing.message().starts_with("No such network: nosuch"),
            "{missing:?}"
        );
        let rm = c
            .network_remove(NetworkRef {
                network: "nosuch".into(),
            })
            .await
            .expect_err("nothing to remove");
        ensure!(rm.code() == Code::NotFound, "{rm:?}");

        c.network_create(overlay("dup", "10.77.0.0/24")).await?;
        let dup = c
            .network_create(overlay("dup", ""))
            .await
            .expect_err("the name is taken");
        ensure!(dup.code() == Code::AlreadyExists, "{dup:?}");

        let bad = c
            .network_create(overlay("bad", "10.78.0.0/33"))
            .await
            .expect_err("a /33 is malformed");
        ensure!(bad.code() == Code::InvalidArgument, "{bad:?}");
        let overlap = c
            .network_create(overlay("over", "10.77.0.128/25"))
            .await
            .expect_err("overlaps dup");
        ensure!(overlap.code() == Code::FailedPrecondition, "{overlap:?}");
        let found = c
            .network_inspect(NetworkRef {
                network: "dup".into(),
            })
            .await?
            .into_inner();
        ensure!(found.subnet == "10.77.0.0/24", "{found:?}");
        Ok::<_, anyhow::Error>(())
    })?;

    // The CLI: non-zero, one line, Docker's words.
    let err = refused(
        &lab,
        "node1",
        &["network", "inspect", "nosuch"],
        "No such network: nosuch",
    )?;
    ensure!(err.starts_with("Error: No such network: nosuch"), "{err}");
    lab.down()?;
    Ok(())
}
