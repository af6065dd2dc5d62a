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
    if s.code() == tonic::Code::Unavailable && msg.contains("error trying to connect") {
        return anyhow!("lost the connection to the mesh daemon: {msg}");
    }
    anyhow!("{msg}")
}
