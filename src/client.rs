//! The CLI's connection to its local daemon.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use mesh_proto::control_client::ControlClient;
use tonic::transport::Channel;

pub const DEFAULT_HOST: &str = "unix:///run/mesh/mesh.sock";

/// Connects to `unix:///path` (the only transport the daemon serves).
pub async fn connect(host: &str) -> Result<ControlClient<Channel>> {
    let path: PathBuf = host
        .strip_prefix("unix://")
        .ok_or_else(|| anyhow!("unsupported host {host:?}: use unix:///path/to/mesh.sock"))?
        .into();
    let channel = mesh_common::transport::unix_channel(&path).await.map_err(|_| {
            anyhow!(
                "cannot connect to the mesh daemon at unix://{}: is `mesh daemon` running? (set -H or MESH_HOST to use another socket)",
                path.display()
            )
        })?;
    Ok(ControlClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Turns a daemon refusal into the one-line error the user sees.
pub fn status(s: tonic::Status) -> anyhow::Error {
    let msg = s.message();
    let transport = msg.contains("transport error")
        || msg.contains("error trying to connect")
        || msg.contains("os error")
        || msg.contains("h2 protocol error");
    match s.code() {
        // tonic's own failures carry no context: say whose connection broke.
        tonic::Code::Unavailable if transport => {
            anyhow!("cannot reach the mesh daemon (it is not running or is restarting): {msg}")
        }
        tonic::Code::Unknown | tonic::Code::Cancelled if transport => anyhow!(
            "lost the connection to the mesh daemon mid-call (it stopped or restarted): the command may or may not have taken effect; check before retrying"
        ),
        _ => anyhow!("{msg}"),
    }
}
