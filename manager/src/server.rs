//! The manager's cluster port (default 2377): the Cluster and Raft services
//! over TLS. Every method checks its caller against the cluster state itself
//! (`authz`): joining nodes have no certificate yet, and a certificate alone
//! proves nothing about the caller's current membership or role.

use std::sync::Arc;

use mesh_common::tls;
use mesh_proto::{cluster_server::ClusterServer, raft_server::RaftServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::warn;

use crate::cluster_service::ClusterService;
use crate::manager::Manager;
use crate::network::RaftService;

/// A running cluster-port server; dropping `stop` ends it.
pub struct ServerHandle {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.task.await;
    }
}

pub fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    mgr: Arc<Manager>,
) -> ServerHandle {
    let (stop, stop_rx) = oneshot::channel::<()>();
    let cluster = ClusterServer::new(ClusterService::new(mgr.clone()));
    let raft = RaftServer::new(RaftService::new(mgr.clone()))
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let incoming = tls::incoming(listener, config);
    let task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(cluster)
            .add_service(raft)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            warn!("cluster port server ended: {e}");
        }
    });
    ServerHandle {
        stop: Some(stop),
        task,
    }
}
