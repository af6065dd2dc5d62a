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
    // tonic's own words for a broken unix socket; a daemon's refusal that
    // quotes such an error further in (a manager's lost leader) is not one.
    let transport = [
        "transport error",
        "error trying to connect",
        "Connection refused",
        "h2 protocol error",
    ]
    .iter()
    .any(|p| msg.starts_with(p));
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

#[cfg(test)]
mod tests {
    use super::status;

    #[test]
    fn whose_connection_broke() {
        let lost = status(tonic::Status::unknown("transport error")).to_string();
        assert!(
            lost.contains("lost the connection to the mesh daemon"),
            "{lost}"
        );
        let down = status(tonic::Status::unavailable(
            "error trying to connect: No such file or directory (os error 2)",
        ))
        .to_string();
        assert!(down.contains("cannot reach the mesh daemon"), "{down}");
        // A manager's own refusal that quotes a transport error is passed on.
        let quoted = "cannot forward the write to the leader at 10.0.0.1:2377: h2 protocol error: http2 error";
        assert_eq!(
            status(tonic::Status::unavailable(quoted)).to_string(),
            quoted
        );
    }
}
