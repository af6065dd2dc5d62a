//! Raft RPCs between managers over mutual TLS.
//!
//! openraft's messages travel as JSON inside `RaftBytes`, so the wire follows
//! the openraft version without a hand-kept protobuf mirror. Each peer gets
//! one lazily connected channel, reused for every RPC (HTTP/2 multiplexes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_common::tls;
use mesh_proto::RaftBytes;
use mesh_proto::raft_client::RaftClient;
use mesh_proto::raft_server;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::TypeConfig;
use crate::manager::Manager;

/// One channel per manager address, shared by Raft replication and by
/// writes forwarded to the leader.
#[derive(Clone)]
pub struct Peers {
    tls: Arc<rustls::ClientConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls,
            channels: Arc::default(),
        }
    }

    /// The channel to a manager's cluster port, made on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, tls::TlsError> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let ch = tls::channel(
            addr,
            self.tls.clone(),
            tls::MANAGER_SERVER_NAME,
            Duration::from_millis(500),
        )?;
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            peers: self.clone(),
        }
    }
}

pub struct PeerConnection {
    target: u64,
    addr: String,
    peers: Peers,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

impl PeerConnection {
    /// Sends one request and decodes the peer's `Result<Resp, Err>`.
    async fn call<Req, Resp, Err>(
        &self,
        which: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, Err>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        Err: std::error::Error + DeserializeOwned,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let channel = self
            .peers
            .channel(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let mut request = tonic::Request::new(RaftBytes { data });
        request.set_timeout(option.hard_ttl());
        let reply = match which {
            Rpc::Vote => client.vote(request).await,
            Rpc::Append => client.append(request).await,
            Rpc::Snapshot => client.snapshot(request).await,
        };
        let reply = reply.map_err(|status| {
            let e = WireError(format!("{}: {}", self.addr, status.message()));
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            }
        })?;
        let result: Result<Resp, Err> = serde_json::from_slice(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Rpc {
    Vote,
    Append,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The receiving side: hands peers' messages to the local Raft instance,
/// after checking the caller is a current member of the Raft group and
/// speaks for its own Raft ID only (openraft itself takes any node ID a
/// message claims).
pub struct RaftService {
    mgr: Arc<Manager>,
}

impl RaftService {
    pub fn new(mgr: Arc<Manager>) -> Self {
        Self { mgr }
    }

    /// Decodes a message and checks its sender against the Raft node ID it
    /// claims (`claimed` picks it out of the decoded message).
    fn admit<T: DeserializeOwned>(
        &self,
        req: tonic::Request<RaftBytes>,
        claimed: impl FnOnce(&T) -> u64,
    ) -> Result<T, tonic::Status> {
        let who = tls::peer_identity(&req)
            .ok_or_else(|| tonic::Status::unauthenticated("a manager certificate is required"))?;
        let refuse = |e: crate::authz::Denied| {
            tracing::warn!(node = %who.node_id, "Raft message refused: {e}");
            tonic::Status::permission_denied(e.to_string())
        };
        // Who may speak first, so a stranger's bytes are never even parsed.
        self.mgr.check_raft_caller(&who, None).map_err(refuse)?;
        let rpc: T = decode(req)?;
        self.mgr
            .check_raft_caller(&who, Some(claimed(&rpc)))
            .map_err(refuse)?;
        Ok(rpc)
    }
}

fn decode<T: DeserializeOwned>(req: tonic::Request<RaftBytes>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&req.into_inner().data)
        .map_err(|e| tonic::Status::invalid_argument(format!("bad raft message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
    serde_json::to_vec(value)
        .map(|data| tonic::Response::new(RaftBytes { data }))
        .map_err(|e| tonic::Status::internal(format!("cannot encode raft reply: {e}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn vote(
        &self,
        req: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: VoteRequest<u64> =
            self.admit(req, |r: &VoteRequest<u64>| r.vote.leader_id.node_id)?;
        encode(&self.mgr.raft.vote(rpc).await)
    }

    async fn append(
        &self,
        req: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self
            .admit(req, |r: &AppendEntriesRequest<TypeConfig>| {
                r.vote.leader_id.node_id
            })?;
        encode(&self.mgr.raft.append_entries(rpc).await)
    }

    async fn snapshot(
        &self,
        req: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self
            .admit(req, |r: &InstallSnapshotRequest<TypeConfig>| {
                r.vote.leader_id.node_id
            })?;
        encode(&self.mgr.raft.install_snapshot(rpc).await)
    }
}
