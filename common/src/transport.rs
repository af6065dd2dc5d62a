//! The daemon's local control socket as a tonic channel, for the CLI, the
//! tests and the benchmarks alike.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Connects to a daemon's unix socket. The URI is a placeholder: the
/// connector ignores it and dials the socket.
pub async fn unix_channel(path: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let path = path.into();
    Endpoint::from_static("http://mesh.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
}
